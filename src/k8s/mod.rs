//! Every Kubernetes API call kmsgate makes goes through this module, so the RBAC in
//! deploy/controller/ can be checked against one list ([`RBAC`]).
//!
//! Object data never passes through here: lists and writes use the metadata-only
//! (`PartialObjectMetadata`) forms, so Secret values never reach the controller. The one
//! exception is a managed token the controller itself writes; it is never read back (the check
//! that a legacy Secret holds a token decodes presence, not the value).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::Job,
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, ObjectReference},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::policy::{RotationPolicy, RotationStatus};

mod tokens;

pub use tokens::{Created, Deleted, IssuedToken, TokenSecret};

/// Every (API group, resource, verb) this module can call: the controller's RBAC must grant
/// exactly these, plus the resources a policy re-encrypts (`get`, `list`, `patch`).
pub const RBAC: &[(&str, &str, &[&str])] = &[
    ("kmsgate.io", "rotationpolicies", &["get", "patch"]),
    ("kmsgate.io", "rotationpolicies/status", &["patch"]),
    ("coordination.k8s.io", "leases", &["get", "list", "create", "update"]),
    ("events.k8s.io", "events", &["create"]),
    ("", "nodes", &["list"]),
    ("batch", "jobs", &["get", "create"]),
    ("storagemigration.k8s.io", "storageversionmigrations", &["get", "create", "delete"]),
    ("", "secrets", &["get", "list", "watch", "create", "patch", "delete"]),
    ("", "serviceaccounts", &["get"]),
    ("", "serviceaccounts/token", &["create"]),
    ("kmsgate.io", "tokenpolicies", &["get"]),
    ("kmsgate.io", "tokenpolicies/status", &["patch"]),
];

/// What the verify Job (`kmsgate verify`) calls: read its policy, report into the status.
pub const VERIFY_RBAC: &[(&str, &str, &[&str])] =
    &[("kmsgate.io", "rotationpolicies", &["get"]), ("kmsgate.io", "rotationpolicies/status", &["patch"])];

/// Non-resource URLs the controller reads.
pub const RBAC_NON_RESOURCE: &[(&str, &[&str])] = &[("/metrics", &["get"])];

/// Field manager recorded on every write.
pub const MANAGER: &str = "kmsgate";

/// Label of the API servers' identity leases in kube-system.
const APISERVER_IDENTITY_SELECTOR: &str = "apiserver.kubernetes.io/identity=kube-apiserver";

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

/// A resource to rewrite, resolved to a group/version.
#[derive(Debug, Clone)]
pub struct Target {
    /// For the dynamic API.
    pub api: ApiResource,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
}

/// One object from a metadata-only list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectKey {
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The resourceVersion listed.
    pub resource_version: String,
}

/// One page of a metadata-only list.
#[derive(Debug, Clone)]
pub struct Page {
    /// The objects.
    pub items: Vec<ObjectKey>,
    /// The next page's token; `None` at the end.
    pub next: Option<String>,
}

/// What a no-op write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// The API server stored the object again (new resourceVersion): it was stale.
    Rewritten,
    /// The object was current; the API server skipped the write.
    Unchanged,
}

/// What became of a Job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Not there.
    Missing,
    /// Still running.
    Running,
    /// Completed.
    Succeeded,
    /// Failed, with the reason.
    Failed(String),
}

/// What became of a StorageVersionMigration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationState {
    /// Not there.
    Missing,
    /// No terminal condition yet.
    Running,
    /// `Succeeded` is True.
    Succeeded,
    /// `Failed` is True, with the message.
    Failed(String),
}

/// The Kubernetes client kmsgate uses.
#[derive(Clone)]
pub struct Kube {
    client: Client,
}

impl Kube {
    /// Wraps a client (tests pass a mock service).
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// From the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or the in-cluster service account.
    pub async fn infer() -> Result<Self, KubeError> {
        let config = kube::Config::infer().await.map_err(|e| KubeError::Config(e.to_string()))?;
        let client = Client::try_from(config).map_err(|e| KubeError::Config(e.to_string()))?;
        Ok(Self { client })
    }

    fn policies(&self) -> Api<RotationPolicy> {
        Api::all(self.client.clone())
    }

    /// Reads a RotationPolicy.
    pub async fn policy(&self, name: &str) -> Result<RotationPolicy, KubeError> {
        self.policies().get(name).await.map_err(call(format!("get RotationPolicy {name}")))
    }

    /// Replaces the status of a RotationPolicy (a merge patch of the whole status).
    pub async fn patch_status(
        &self,
        name: &str,
        status: &RotationStatus,
    ) -> Result<RotationPolicy, KubeError> {
        let patch = json!({ "status": status });
        self.policies()
            .patch_status(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
            .map_err(call(format!("patch RotationPolicy {name} status")))
    }

    /// Writes a verification result into a RotationPolicy status (the verify Job's only write).
    pub async fn report_verification(
        &self,
        name: &str,
        verification: &crate::policy::Verification,
    ) -> Result<(), KubeError> {
        let patch = json!({ "status": { "verification": verification } });
        self.policies()
            .patch_status(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(call(format!("report verification to RotationPolicy {name}")))
    }

    /// Sets an annotation on a RotationPolicy.
    pub async fn annotate_policy(&self, name: &str, key: &str, value: &str) -> Result<(), KubeError> {
        let patch = json!({ "metadata": { "annotations": { key: value } } });
        self.policies()
            .patch_metadata(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(call(format!("annotate RotationPolicy {name}")))
    }

    /// Resolves `secrets` or `deployments.apps` to its preferred version.
    pub async fn resolve(&self, resource: &crate::policy::ResourceRef) -> Result<Target, KubeError> {
        if resource.group.is_empty() && resource.resource == "secrets" {
            // NB: the default target needs no discovery round trips (and no discovery RBAC).
            let api = ApiResource {
                group: String::new(),
                version: "v1".into(),
                api_version: "v1".into(),
                kind: "Secret".into(),
                plural: "secrets".into(),
            };
            return Ok(Target { api, namespaced: true });
        }
        let group = kube::discovery::group(&self.client, &resource.group)
            .await
            .map_err(call(format!("discover API group {:?}", resource.group)))?;
        group
            .recommended_resources()
            .into_iter()
            .find(|(api, _)| api.plural == resource.resource)
            .map(|(api, caps)| Target { api, namespaced: caps.scope == kube::discovery::Scope::Namespaced })
            .ok_or_else(|| KubeError::NotServed(resource.to_string()))
    }

    fn dynamic(&self, target: &Target, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) if target.namespaced => Api::namespaced_with(self.client.clone(), ns, &target.api),
            _ => Api::all_with(self.client.clone(), &target.api),
        }
    }

    /// One page of names and resourceVersions (metadata only).
    pub async fn list_page(
        &self,
        target: &Target,
        namespace: Option<&str>,
        selector: Option<&str>,
        limit: u32,
        continue_token: Option<&str>,
    ) -> Result<Page, KubeError> {
        let mut params = ListParams::default().limit(limit);
        if let Some(selector) = selector {
            params = params.labels(selector);
        }
        if let Some(token) = continue_token.filter(|t| !t.is_empty()) {
            params = params.continue_token(token);
        }
        let list = self
            .dynamic(target, namespace)
            .list_metadata(&params)
            .await
            .map_err(call(format!("list {}", target.api.plural)))?;
        let items = list
            .items
            .into_iter()
            .map(|m| ObjectKey {
                namespace: m.metadata.namespace.unwrap_or_default(),
                name: m.metadata.name.unwrap_or_default(),
                resource_version: m.metadata.resource_version.unwrap_or_default(),
            })
            .collect();
        Ok(Page { items, next: list.metadata.continue_.filter(|c| !c.is_empty()) })
    }

    /// The current resourceVersion of one object, `None` when it is gone.
    pub async fn resource_version(
        &self,
        target: &Target,
        namespace: &str,
        name: &str,
    ) -> Result<Option<String>, KubeError> {
        let api = self.dynamic(target, Some(namespace).filter(|n| !n.is_empty()));
        let meta = api
            .get_metadata_opt(name)
            .await
            .map_err(call(format!("get {} {namespace}/{name}", target.api.plural)))?;
        Ok(meta.and_then(|m| m.metadata.resource_version))
    }

    /// The no-op write that re-encrypts a stale object: a merge patch carrying only the listed
    /// resourceVersion, so a concurrent write makes it fail with 409 instead of being undone.
    pub async fn touch(&self, target: &Target, key: &ObjectKey) -> Result<Touch, KubeError> {
        let api = self.dynamic(target, Some(key.namespace.as_str()).filter(|n| !n.is_empty()));
        let patch = json!({ "metadata": { "resourceVersion": key.resource_version } });
        let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
        let meta = api
            .patch_metadata(&key.name, &params, &Patch::Merge(&patch))
            .await
            .map_err(call(format!("patch {} {}/{}", target.api.plural, key.namespace, key.name)))?;
        let now = meta.metadata.resource_version.unwrap_or_default();
        Ok(if now == key.resource_version { Touch::Unchanged } else { Touch::Rewritten })
    }

    /// `http://<InternalIP>:<port>` of every Node matching the selector.
    pub async fn node_endpoints(&self, selector: &str, port: u16) -> Result<Vec<String>, KubeError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let list = nodes.list(&ListParams::default().labels(selector)).await.map_err(call("list nodes"))?;
        let mut endpoints = Vec::new();
        for node in list.items {
            let address = node
                .status
                .and_then(|s| s.addresses)
                .unwrap_or_default()
                .into_iter()
                .find(|a| a.type_ == "InternalIP")
                .map(|a| a.address);
            match address {
                Some(ip) if ip.contains(':') => endpoints.push(format!("http://[{ip}]:{port}")),
                Some(ip) => endpoints.push(format!("http://{ip}:{port}")),
                None => {
                    return Err(KubeError::Unexpected(format!(
                        "node {} has no InternalIP address",
                        node.metadata.name.unwrap_or_default()
                    )));
                }
            }
        }
        Ok(endpoints)
    }

    /// The identities of the running API servers, from their identity leases.
    pub async fn api_server_ids(&self) -> Result<Vec<String>, KubeError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-system");
        let list = leases
            .list(&ListParams::default().labels(APISERVER_IDENTITY_SELECTOR))
            .await
            .map_err(call("list API server identity leases"))?;
        Ok(list.items.into_iter().filter_map(|l| l.spec.and_then(|s| s.holder_identity)).collect())
    }

    /// The API server's own /metrics text.
    pub async fn api_server_metrics(&self) -> Result<String, KubeError> {
        let request = http::Request::get("/metrics")
            .body(Vec::new())
            .map_err(|e| KubeError::Unexpected(format!("build /metrics request: {e}")))?;
        self.client.request_text(request).await.map_err(call("read API server /metrics"))
    }

    /// Records an Event about a policy (best effort: a failure is logged, never fatal).
    pub async fn event(&self, policy: &str, kind: EventKind, reason: &str, note: &str) {
        let regarding = ObjectReference {
            api_version: Some("kmsgate.io/v1alpha1".into()),
            kind: Some("RotationPolicy".into()),
            name: Some(policy.to_owned()),
            ..ObjectReference::default()
        };
        self.record(Some("default"), regarding, kind, reason, note).await;
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

    /// Takes or renews a Lease for `holder`; `false` when someone else holds a fresh one.
    pub async fn acquire_lease(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        duration: std::time::Duration,
    ) -> Result<bool, KubeError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let seconds = duration.as_secs().max(1) as i32;
        let now = MicroTime(Timestamp::now());
        let existing = leases.get_opt(name).await.map_err(call(format!("get lease {namespace}/{name}")))?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.into()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(call(format!("create lease {namespace}/{name}"))(e)),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let mine = spec.holder_identity.as_deref() == Some(holder);
        // NB: a Lease with no holder was released and is free at once, as client-go's
        // tryAcquireOrRenew (tools/leaderelection/leaderelection.go) treats an empty HolderIdentity.
        let held = spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty());
        if !mine && held && lease_fresh(spec) {
            return Ok(false);
        }
        if !mine {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(holder.into());
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(seconds);
        // NB: replace carries the resourceVersion read above, so two candidates cannot both win.
        match leases.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(call(format!("update lease {namespace}/{name}"))(e)),
        }
    }

    /// Gives up a Lease `holder` holds, so the next candidate takes it without waiting for it to
    /// expire; `false` when `holder` did not hold it (then nothing changes).
    pub async fn release_lease(&self, namespace: &str, name: &str, holder: &str) -> Result<bool, KubeError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let lease = leases.get_opt(name).await.map_err(call(format!("get lease {namespace}/{name}")))?;
        let Some(mut lease) = lease else { return Ok(false) };
        let Some(spec) = lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(holder)) else {
            return Ok(false);
        };
        // NB: as client-go's LeaderElector.release (tools/leaderelection/leaderelection.go): clear
        // the holder and times, keep the duration and the transition count.
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        match leases.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(call(format!("release lease {namespace}/{name}"))(e)),
        }
    }

    /// The holder of a Lease, if it is held and fresh.
    pub async fn lease_holder(&self, namespace: &str, name: &str) -> Result<Option<String>, KubeError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let lease = leases.get_opt(name).await.map_err(call(format!("get lease {namespace}/{name}")))?;
        Ok(lease.and_then(|l| l.spec).filter(lease_fresh).and_then(|s| s.holder_identity))
    }

    /// Creates a Job (an existing one with the same name is kept).
    pub async fn create_job(&self, namespace: &str, job: &Job) -> Result<(), KubeError> {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        match jobs.create(&PostParams::default(), job).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => {
                Err(call(format!("create job {namespace}/{}", job.metadata.name.as_deref().unwrap_or("")))(e))
            }
        }
    }

    /// Where a Job stands.
    pub async fn job_state(&self, namespace: &str, name: &str) -> Result<JobState, KubeError> {
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        let Some(job) = jobs.get_opt(name).await.map_err(call(format!("get job {namespace}/{name}")))? else {
            return Ok(JobState::Missing);
        };
        let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
        for c in conditions {
            if c.status == "True" && c.type_ == "Complete" {
                return Ok(JobState::Succeeded);
            }
            if c.status == "True" && c.type_ == "Failed" {
                return Ok(JobState::Failed(c.message.or(c.reason).unwrap_or_default()));
            }
        }
        Ok(JobState::Running)
    }

    /// The served `storagemigration.k8s.io` version (v1 preferred), if any.
    pub async fn migration_version(&self) -> Result<Option<&'static str>, KubeError> {
        let request = http::Request::get("/apis/storagemigration.k8s.io")
            .body(Vec::new())
            .map_err(|e| KubeError::Unexpected(format!("build discovery request: {e}")))?;
        let group: serde_json::Value = match self.client.request(request).await {
            Ok(group) => group,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
            Err(e) => return Err(call("discover storagemigration.k8s.io")(e)),
        };
        let served: Vec<&str> = group["versions"]
            .as_array()
            .map(|v| v.iter().filter_map(|v| v["version"].as_str()).collect())
            .unwrap_or_default();
        Ok(["v1", "v1beta1"].into_iter().find(|v| served.contains(v)))
    }

    fn migrations(&self, version: &str) -> Api<DynamicObject> {
        let api = ApiResource {
            group: "storagemigration.k8s.io".into(),
            version: version.into(),
            api_version: format!("storagemigration.k8s.io/{version}"),
            kind: "StorageVersionMigration".into(),
            plural: "storageversionmigrations".into(),
        };
        Api::all_with(self.client.clone(), &api)
    }

    /// Creates a StorageVersionMigration for one resource (an existing one is kept).
    pub async fn create_migration(
        &self,
        version: &str,
        name: &str,
        group: &str,
        resource: &str,
    ) -> Result<(), KubeError> {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": format!("storagemigration.k8s.io/{version}"),
            "kind": "StorageVersionMigration",
            "metadata": { "name": name },
            "spec": { "resource": { "group": group, "resource": resource } }
        }))
        .map_err(|e| KubeError::Unexpected(format!("build StorageVersionMigration: {e}")))?;
        match self.migrations(version).create(&PostParams::default(), &object).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(call(format!("create StorageVersionMigration {name}"))(e)),
        }
    }

    /// Where a StorageVersionMigration stands.
    pub async fn migration_state(&self, version: &str, name: &str) -> Result<MigrationState, KubeError> {
        let Some(object) = self
            .migrations(version)
            .get_opt(name)
            .await
            .map_err(call(format!("get StorageVersionMigration {name}")))?
        else {
            return Ok(MigrationState::Missing);
        };
        let conditions = object.data["status"]["conditions"].as_array().cloned().unwrap_or_default();
        let truthy = |kind: &str| {
            conditions
                .iter()
                .find(|c| c["type"] == kind && c["status"] == "True")
                .map(|c| c["message"].as_str().unwrap_or_default().to_owned())
        };
        if truthy("Succeeded").is_some() {
            return Ok(MigrationState::Succeeded);
        }
        if let Some(message) = truthy("Failed") {
            return Ok(MigrationState::Failed(message));
        }
        Ok(MigrationState::Running)
    }

    /// Deletes a StorageVersionMigration (gone already is fine).
    pub async fn delete_migration(&self, version: &str, name: &str) -> Result<(), KubeError> {
        match self.migrations(version).delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(call(format!("delete StorageVersionMigration {name}"))(e)),
        }
    }
}

fn lease_fresh(spec: &LeaseSpec) -> bool {
    let (Some(renewed), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return false;
    };
    let age = Timestamp::now().as_second() - renewed.0.as_second();
    age < i64::from(seconds)
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

/// The `apiserver_id_hash` values that reported `key_id` from Status, read from the
/// `apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds` metric.
pub fn api_servers_on_key(metrics: &str, provider: &str, key_id: &str) -> BTreeMap<String, f64> {
    let wanted = sha256_label(key_id);
    let mut seen = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) =
            line.strip_prefix("apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{")
        else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else { continue };
        let label = |name: &str| {
            labels.split(',').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        if label("key_id_hash").as_deref() != Some(wanted.as_str())
            || label("provider_name").is_some_and(|p| p != provider)
        {
            continue;
        }
        let (Some(id), Ok(at)) = (label("apiserver_id_hash"), value.trim().parse::<f64>()) else { continue };
        seen.insert(id, at);
    }
    seen
}

/// `sha256:<hex>`, the form the API server's metrics use for key_ids and server ids.
pub fn sha256_label(value: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(value.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_status_metric_is_read_per_api_server() {
        let key = "kmsgate:1:vault:prod:::transit:k:2:100";
        let text = format!(
            "# HELP x\n\
             apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{{apiserver_id_hash=\"sha256:a\",key_id_hash=\"{new}\",provider_name=\"kmsgate\"}} 1.7e9\n\
             apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{{apiserver_id_hash=\"sha256:b\",key_id_hash=\"{old}\",provider_name=\"kmsgate\"}} 1.7e9\n\
             apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds{{apiserver_id_hash=\"sha256:c\",key_id_hash=\"{new}\",provider_name=\"other\"}} 1.7e9\n",
            new = sha256_label(key),
            old = sha256_label("kmsgate:1:vault:prod:::transit:k:1:50"),
        );
        let seen = api_servers_on_key(&text, "kmsgate", key);
        assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["sha256:a"]);
    }

    #[test]
    fn sha256_label_matches_a_known_digest() {
        assert_eq!(
            sha256_label("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
