//! Every Kubernetes API call kmsgate makes goes through this module, so the RBAC in
//! deploy/controller/ can be checked against one list ([`RBAC`]).
//!
//! Object data never passes through here: lists and writes use the metadata-only
//! (`PartialObjectMetadata`) forms, so Secret values never reach the controller. The one
//! exception is a managed token the controller itself writes; it is never read back (the check
//! that a legacy Secret holds a token decodes presence, not the value).

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::crd::rotation::{RotationPolicy, Verification};

mod access;
mod apiservers;
mod bounded;
mod cluster;
mod jobs;
mod objects;
mod policy;
mod tokens;
mod watch;

pub use access::Review;
pub use apiservers::{
    ApiServerAccess, ApiServerAddresses, FETCH_KEYS_SUCCESS_METRIC, IdentityLease, LEASE_FRESH,
    MAX_API_SERVERS, PROCESS_START_METRIC, SERVICE_NAME, STATUS_METRIC, api_servers_on_key, gauge,
    live_leases, sha256_label,
};
pub use bounded::{Bounded, MAX_BODY_BYTES};
pub use jobs::{JobState, MigrationState};
pub use objects::{ObjectKey, Page, Target, Touch};
pub use policy::Policy;
pub use tokens::{BearerToken, Created, Deleted, IssuedToken, Referenced, ServiceAccountRefs, TokenSecret};

/// Every (API group, resource, verb) this module can call: the controller's RBAC must grant
/// exactly these, plus the resources a policy re-encrypts (`get`, `list`, `patch`).
pub const RBAC: &[(&str, &str, &[&str])] = &[
    ("kmsgate.io", "rotationpolicies", &["get", "patch"]),
    ("kmsgate.io", "rotationpolicies/status", &["patch"]),
    ("coordination.k8s.io", "leases", &["get", "list", "create", "update"]),
    ("discovery.k8s.io", "endpointslices", &["get"]),
    ("authorization.k8s.io", "selfsubjectaccessreviews", &["create"]),
    ("events.k8s.io", "events", &["create"]),
    ("", "nodes", &["list"]),
    ("batch", "jobs", &["get", "create"]),
    ("storagemigration.k8s.io", "storageversionmigrations", &["get", "create", "delete"]),
    ("", "secrets", &["get", "list", "watch", "create", "patch", "delete"]),
    ("", "serviceaccounts", &["get", "patch"]),
    ("", "serviceaccounts/token", &["create"]),
    ("kmsgate.io", "tokenpolicies", &["get"]),
    ("kmsgate.io", "tokenpolicies/status", &["patch"]),
    ("kmsgate.io", "signingkeypolicies", &["get", "patch"]),
    ("kmsgate.io", "signingkeypolicies/status", &["patch"]),
];

/// What the verify Job (`kmsgate verify`) calls: read its policy, report into the status.
pub const VERIFY_RBAC: &[(&str, &str, &[&str])] =
    &[("kmsgate.io", "rotationpolicies", &["get"]), ("kmsgate.io", "rotationpolicies/status", &["patch"])];

/// Non-resource URLs the controller reads (`/metrics` of each API server, at its own address).
pub const RBAC_NON_RESOURCE: &[(&str, &[&str])] = &[("/metrics", &["get"])];

/// Field manager recorded on every write.
pub const MANAGER: &str = "kmsgate";

/// A Kubernetes call failed; each variant names the operation.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No kubeconfig or in-cluster configuration could be loaded.
    #[error("cannot configure a Kubernetes client: {0}")]
    Config(String),
    /// An API call failed.
    #[error("{operation}: {source}")]
    Call {
        /// What was being done.
        operation: String,
        /// The client's error (carries the API server's Status message).
        #[source]
        source: kube::Error,
    },
    /// A resource is not served.
    #[error("resource {0} is not served by the API server")]
    NotServed(String),
    /// An answer did not have the expected shape.
    #[error("{0}")]
    Unexpected(String),
}

impl KubeError {
    /// The HTTP status the API server answered, if it answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Call { source: kube::Error::Api(status), .. } => Some(status.code),
            _ => None,
        }
    }

    /// Worth retrying: throttling, server errors, or no answer at all.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Call { source: kube::Error::Api(status), .. } => status.code == 429 || status.code >= 500,
            Self::Call { .. } => true,
            _ => false,
        }
    }
}

fn call(operation: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
    let operation = operation.into();
    move |source| KubeError::Call { operation, source }
}

/// `new` as a merge patch over `old`. In a merge patch an absent member means "keep" (RFC 7386;
/// kube-apiserver applies it with `jsonpatch.MergePatch` in `jsonPatcher.applyJSPatch`,
/// staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go), so a field the status
/// serializes as absent once empty (a mark a new run resets) would survive. Each such member is
/// set to null, recursively through members that are objects in both.
fn with_removals(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let (Value::Object(old), Value::Object(new)) = (old, new) else { return new.clone() };
    let mut patch = new.clone();
    for (key, old_value) in old {
        match new.get(key) {
            None => {
                patch.insert(key.clone(), Value::Null);
            }
            Some(new_value) => {
                patch.insert(key.clone(), with_removals(old_value, new_value));
            }
        }
    }
    Value::Object(patch)
}

/// The Kubernetes client kmsgate uses.
#[derive(Clone)]
pub struct Kube {
    client: Client,
    /// How each API server is read at its own address, or why it cannot be.
    api_servers: Result<ApiServerAccess, String>,
}

impl Kube {
    /// Wraps a client (tests pass a mock service); API servers are not read directly.
    pub fn new(client: Client) -> Self {
        Self { client, api_servers: Err("no cluster CA and token were given".into()) }
    }

    /// From the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or the in-cluster service account,
    /// with every answer's body bounded ([`bounded::MAX_BODY_BYTES`]).
    pub async fn infer() -> Result<Self, KubeError> {
        let config = kube::Config::infer().await.map_err(|e| KubeError::Config(e.to_string()))?;
        let api_servers = ApiServerAccess::from_config(&config);
        let builder =
            kube::client::ClientBuilder::try_from(config).map_err(|e| KubeError::Config(e.to_string()))?;
        let client = builder.with_layer(&tower::layer::layer_fn(Bounded::new)).build();
        Ok(Self { client, api_servers })
    }

    fn policies(&self) -> Api<RotationPolicy> {
        Api::all(self.client.clone())
    }

    /// Writes a verification result into a RotationPolicy status (the verify Job's only write).
    pub async fn report_verification(
        &self,
        name: &str,
        verification: &Verification,
    ) -> Result<(), KubeError> {
        let patch = json!({ "status": { "verification": verification } });
        self.policies()
            .patch_status(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(call(format!("report verification to RotationPolicy {name}")))
    }

    /// Creates an Event in `namespace` (best effort: a failure is logged, never fatal).
    async fn record(
        &self,
        namespace: Option<&str>,
        regarding: ObjectReference,
        kind: EventKind,
        reason: &str,
        note: &str,
    ) {
        let namespace = namespace.filter(|n| !n.is_empty()).unwrap_or("default");
        let events: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        let now = Timestamp::now();
        let prefix = regarding.name.clone().unwrap_or_else(|| "kmsgate".into());
        let event = Event {
            metadata: ObjectMeta { generate_name: Some(format!("{prefix}.")), ..ObjectMeta::default() },
            event_time: Some(MicroTime(now)),
            action: Some(reason.to_owned()),
            reason: Some(reason.to_owned()),
            note: Some(note.chars().take(1024).collect()),
            type_: Some(kind.as_str().to_owned()),
            reporting_controller: Some("kmsgate.io/controller".into()),
            reporting_instance: Some(crate::config::hostname()),
            regarding: Some(regarding),
            ..Event::default()
        };
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            tracing::warn!(namespace, reason, error = %e, "could not record an event");
        }
    }
}

/// Event type.
#[derive(Debug, Clone, Copy)]
pub enum EventKind {
    /// Progress.
    Normal,
    /// A problem.
    Warning,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_the_new_status_drops_is_nulled_so_the_merge_removes_it() {
        let old = json!({"phase": "Converging", "pluginsConvergedAt": "t", "verification": {"error": "x", "round": 1}});
        let new = json!({"phase": "Rotating", "verification": {"round": 2}});
        assert_eq!(
            with_removals(&old, &new),
            json!({"phase": "Rotating", "pluginsConvergedAt": null, "verification": {"error": null, "round": 2}})
        );
        assert_eq!(with_removals(&json!({}), &new), new);
    }
}
