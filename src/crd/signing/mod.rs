//! The `SigningKeyPolicy` custom resource (`kmsgate.io/v1alpha1`, cluster-scoped): how the
//! controller rotates the Transit key that signs service-account tokens, in `spec`, parsed once
//! into a [`Plan`]; the state of the current run in `status`, so a restarted controller resumes.
//!
//! A kind of its own rather than a section of `RotationPolicy`: the two keys have different
//! lifecycles (a data key's run ends when etcd is rewritten, a signing key's when every token it
//! signed has expired, which can be a year), different evidence (plugins' key_ids against
//! signers' kids and API servers' key fetches) and different operators (the migration runbook
//! pauses this policy alone while a cluster moves from `sa.key` to the signer). See
//! docs/signer-rotation.md.

mod plan;
mod spec;
mod status;

pub use plan::{DrainPlan, Plan, PublishPlan, RetirePlan, RotatePlan, SignerSource, SwitchPlan, parse};
pub use spec::{
    DrainSpec, PublishSpec, RetireSpec, RotateSpec, SignerDiscovery, SignersSpec, SigningKeyPolicy,
    SigningKeyPolicySpec, SwitchSpec,
};
pub use status::{SigningPhase, SigningStatus};

pub use crate::crd::field::SpecError;

/// Annotation a person (or `kmsgate signer rotate`) sets to ask for a signing-key rotation now;
/// any new value counts.
pub const REQUEST_ANNOTATION: &str = "kmsgate.io/signer-rotate-requested";

/// The shortest token lifetime kube-apiserver accepts from a signer's Metadata (600 s,
/// `validation.MinTokenAgeSec`, checked where kube-apiserver sets up the external signer in
/// pkg/controlplane/apiserver/options/options.go): no Drain is shorter.
pub const MIN_TOKEN_SECONDS: i64 = 600;
