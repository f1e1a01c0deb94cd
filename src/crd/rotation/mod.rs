//! The `RotationPolicy` custom resource (`kmsgate.io/v1alpha1`, cluster-scoped): the policy the
//! controller follows in `spec`, parsed once into a [`Plan`], and the state of the current
//! rotation in `status`, so a restarted controller resumes where the last one stopped.

mod plan;
mod resource;
mod spec;
mod status;

pub use plan::{
    ConvergePlan, MigrateKnob, MigratePlan, MigrateSettings, Plan, PluginSource, RetirePlan, SettingsError,
    Verifier, VerifyPlan, parse,
};
pub use resource::{ResourceId, ResourceRef};
pub use spec::{
    ConvergeSpec, MigrateSpec, MigrateStrategy, PluginDiscovery, RetireSpec, RotationPolicy,
    RotationPolicySpec, TransitKey, VerifyJob, VerifyMode, VerifySpec,
};
pub use status::{Phase, ResourceProgress, RotationStatus, Straggler, Totals, Verification};

pub use crate::crd::{field::SpecError, status::Condition};

/// Annotation a person (or `kmsgate rotate`) sets to ask for a rotation now; any new value counts.
pub const REQUEST_ANNOTATION: &str = "kmsgate.io/rotate-requested";
