//! The one in-memory kube-apiserver the controller tests use (rotation, tokens, and later the
//! signer loop): Secrets (metadata-only lists with paging, a watch, writes that rewrite stale
//! objects the way the storage layer does), ServiceAccounts and the TokenRequest API, a token
//! controller, the kmsgate policies with their status subresource, Leases, Events and /metrics.
//!
//! Every request is logged (`METHOD path`) and authorized against `kmsgate::k8s::RBAC` as
//! kube-apiserver's RBAC authorizer would: a request the list does not grant gets 403, is
//! recorded in [`State::denied`], and fails the test when the test's last [`FakeApi`] is dropped.
//!
//! Each Secret remembers the key_id it was last written with. An optional [`Store`] mirrors every
//! write into real storage (the end-to-end test seals it through the plugin into etcd).

mod apiservers;
mod secrets;
mod tokens;
mod wire;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::future::BoxFuture;
use http::Response;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};

pub use apiservers::{ApiServer, METRICS_TOKEN, ServingCert, api_server_id};
pub use tokens::{Issued, TestClock};
pub use wire::{
    Incoming, client_for, conflict, json_response, merge, metadata_list, not_found, status_response,
    text_response,
};

use crate::rbac::{self, Needs};

/// Where written objects go besides memory.
pub trait Store: Send + Sync {
    /// Stores one object's bytes; returns the key_id it was encrypted under.
    fn write(&self, namespace: &str, name: &str, data: &[u8]) -> BoxFuture<'static, String>;
    /// The key_id a write would use now.
    fn current_key_id(&self) -> BoxFuture<'static, String>;
}

/// One Secret.
#[derive(Debug, Clone)]
pub struct Secret {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`, new for every create.
    pub uid: String,
    /// `metadata.resourceVersion`, new for every write.
    pub resource_version: u64,
    /// `type`.
    pub type_: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// Decoded values.
    pub data: BTreeMap<String, String>,
    /// `metadata.creationTimestamp`.
    pub created: Timestamp,
    /// The key_id of the last write.
    pub key_id: String,
}

/// A ServiceAccount's parts that token rotation reads and writes, besides its uid.
#[derive(Debug, Clone, Default)]
pub struct AccountRefs {
    /// `metadata.resourceVersion`.
    pub resource_version: u64,
    /// The names in `secrets`, in order.
    pub secrets: Vec<String>,
}

/// Faults to inject into Secret patches, by `namespace/name`.
#[derive(Default)]
pub struct Faults {
    /// Another client writes the object just before our patch lands (so ours gets 409).
    pub race_writes: HashSet<String>,
    /// The object is deleted just before our patch lands (404).
    pub race_deletes: HashSet<String>,
    /// Answer this many 503s to patches of the object first.
    pub unavailable: HashMap<String, u32>,
}

/// Everything the fake holds.
pub struct State {
    /// Secrets by (namespace, name).
    pub secrets: BTreeMap<(String, String), Secret>,
    /// ServiceAccounts by (namespace, name), with their uid.
    pub service_accounts: BTreeMap<(String, String), String>,
    /// ServiceAccounts' resourceVersion and `secrets` names, by (namespace, name).
    pub account_refs: BTreeMap<(String, String), AccountRefs>,
    /// How long the token controller takes to remove a deleted token Secret's reference.
    pub unref_delay: Duration,
    /// Another client writes the next this-many ServiceAccount patches' target first (409).
    pub account_races: u32,
    /// The one policy object served (a RotationPolicy, a TokenPolicy or a SigningKeyPolicy, by its
    /// `kind`).
    pub policy: Value,
    /// Leases by (namespace, name).
    pub leases: HashMap<(String, String), Value>,
    /// The API server processes: identity Leases, `default/kubernetes`, each one's /metrics.
    pub api_servers: Vec<ApiServer>,
    /// The EncryptionConfiguration provider name the API servers label their metrics with.
    pub provider_name: String,
    /// SelfSubjectAccessReviews asked, as `verb resource.group`.
    pub reviews: Vec<String>,
    /// Events created, as sent.
    pub events: Vec<Value>,
    /// What `/metrics` through the Service answers (one server behind the load balancer).
    pub metrics: String,
    /// The key_id a write uses now (without a [`Store`]).
    pub current_key_id: String,
    /// Writes of each existing Secret (by anyone), by `namespace/name`.
    pub rewrites: HashMap<String, u32>,
    /// Patches of Secrets that reached the fake (any outcome).
    pub patches: u64,
    /// Faults to inject into Secret patches.
    pub faults: Faults,
    /// Every Secret patch must be the migrate patch (only `metadata.resourceVersion`): the
    /// rotation tests prove so that the controller never sends Secret data.
    pub touch_only: bool,
    /// TokenRequests answered with a token.
    pub issued: Vec<Issued>,
    /// TokenRequests refused, as (seconds since start, `status namespace/sa`).
    pub refused: Vec<(u64, String)>,
    /// The server's `--service-account-max-token-expiration`, in seconds.
    pub max_expiration: Option<u64>,
    /// ServiceAccounts (`namespace/name`) kmsgate may not create tokens for (403).
    pub forbidden: BTreeSet<String>,
    /// How long the token controller takes to fill a new legacy token Secret.
    pub fill_delay: Duration,
    /// Every request as `METHOD path` (`WATCH path` for a watch).
    pub log: Vec<String>,
    /// Requests RBAC refused, with what they needed.
    pub denied: Vec<(String, Needs)>,
    /// After the first request whose line starts with this, answer 503 to all.
    pub crash_after: Option<String>,
    /// Answer 503 to all once `patches` reaches this.
    pub crash_after_patches: Option<u64>,
    /// Whether the fake answers 503 to everything.
    pub crashed: bool,
    /// The last resourceVersion given out.
    pub next_rv: u64,
    /// The last uid number given out.
    pub next_uid: u64,
    /// The last token number given out.
    pub next_token: u64,
}

impl Default for State {
    fn default() -> Self {
        Self {
            secrets: BTreeMap::new(),
            service_accounts: BTreeMap::new(),
            account_refs: BTreeMap::new(),
            unref_delay: Duration::from_millis(100),
            account_races: 0,
            policy: Value::Null,
            leases: HashMap::new(),
            api_servers: Vec::new(),
            provider_name: "kmsgate".into(),
            reviews: Vec::new(),
            events: Vec::new(),
            metrics: String::new(),
            current_key_id: String::new(),
            rewrites: HashMap::new(),
            patches: 0,
            faults: Faults::default(),
            touch_only: false,
            issued: Vec::new(),
            refused: Vec::new(),
            max_expiration: None,
            forbidden: BTreeSet::new(),
            fill_delay: Duration::from_millis(300),
            log: Vec::new(),
            denied: Vec::new(),
            crash_after: None,
            crash_after_patches: None,
            crashed: false,
            next_rv: 100,
            next_uid: 0,
            next_token: 0,
        }
    }
}

/// The fake API server as the test holds it; clone it to share. When the test's last clone is
/// dropped, the test fails if RBAC refused any request.
#[derive(Clone)]
pub struct FakeApi {
    /// Everything the fake holds, for tests to read and change.
    pub state: Arc<Mutex<State>>,
    /// Wall-clock time that advances with tokio's clock.
    pub clock: Arc<TestClock>,
    server: Server,
    serving: Arc<ServingCert>,
    _rbac: Arc<RbacCheck>,
}

/// What answers requests: shared by the test's handles and the clients.
#[derive(Clone)]
struct Server {
    state: Arc<Mutex<State>>,
    clock: Arc<TestClock>,
    store: Option<Arc<dyn Store>>,
    changed: Arc<Notify>,
}

/// Fails the test if RBAC refused a request (checked when the test's handles are gone, since a
/// refused call in a background loop may never surface as an error).
struct RbacCheck(Arc<Mutex<State>>);

impl Drop for RbacCheck {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        if let Ok(state) = self.0.try_lock() {
            assert!(state.denied.is_empty(), "kmsgate::k8s::RBAC does not grant: {:#?}", state.denied);
        }
    }
}

impl FakeApi {
    /// An empty cluster whose writes use `key_id`, for the rotation tests: every Secret patch
    /// must be the migrate patch.
    pub fn new(key_id: &str) -> Self {
        let fake = Self::empty();
        {
            let mut state = fake.state.try_lock().unwrap();
            state.current_key_id = key_id.into();
            state.touch_only = true;
        }
        fake
    }

    /// An empty cluster with a TokenPolicy `kmsgate` holding `spec`, for the token tests.
    pub fn with_token_policy(spec: Value) -> Self {
        let fake = Self::empty();
        fake.state.try_lock().unwrap().policy = json!({
            "apiVersion": "kmsgate.io/v1alpha1", "kind": "TokenPolicy",
            "metadata": {"name": "kmsgate", "resourceVersion": "1"},
            "spec": spec,
        });
        fake
    }

    fn empty() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let clock = Arc::new(TestClock::new());
        let server = Server {
            state: state.clone(),
            clock: clock.clone(),
            store: None,
            changed: Arc::new(Notify::new()),
        };
        let serving = Arc::new(ServingCert::new());
        Self { state: state.clone(), clock, server, serving, _rbac: Arc::new(RbacCheck(state)) }
    }

    /// Mirrors every Secret write into `store`.
    pub fn with_store(mut self, store: Arc<dyn Store>) -> Self {
        self.server.store = Some(store);
        self
    }

    /// A kube client talking to this fake.
    pub fn client(&self) -> kube::Client {
        let server = self.server.clone();
        client_for(move |incoming| {
            let server = server.clone();
            async move { server.handle(incoming).await }
        })
    }

    /// Adds `count` Secrets named `s00000...` in `namespaces` round robin, on `key_id`.
    pub async fn seed(&self, count: usize, namespaces: &[&str], key_id: &str) {
        for i in 0..count {
            let namespace = namespaces[i % namespaces.len()];
            self.insert(namespace, &format!("s{i:05}"), key_id, format!("{{\"n\":{i}}}").as_bytes()).await;
        }
    }

    /// Adds one Opaque Secret stored under `key_id` (through the store, when there is one).
    pub async fn insert(&self, namespace: &str, name: &str, key_id: &str, data: &[u8]) {
        let data = [("value".to_owned(), String::from_utf8_lossy(data).into_owned())].into();
        let now = kmsgate::tokens::Clock::now(&*self.clock);
        self.server.create(Secret { data, ..Secret::unstored(namespace, name, "Opaque", now) }).await;
        if self.server.store.is_none() {
            let mut state = self.state.lock().await;
            state.secrets.get_mut(&(namespace.into(), name.into())).unwrap().key_id = key_id.into();
        }
    }

    /// Sets the policy object.
    pub async fn set_policy(&self, policy: Value) {
        self.state.lock().await.policy = policy;
    }

    /// The policy's status.
    pub async fn status(&self) -> Value {
        self.state.lock().await.policy["status"].clone()
    }

    /// Secrets (`namespace/name`) whose key_id is not `key_id`.
    pub async fn stale(&self, key_id: &str) -> Vec<String> {
        let state = self.state.lock().await;
        state
            .secrets
            .values()
            .filter(|o| o.key_id != key_id)
            .map(|o| format!("{}/{}", o.namespace, o.name))
            .collect()
    }

    /// A Secret.
    pub async fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.state.lock().await.secrets.get(&(namespace.into(), name.into())).cloned()
    }

    /// Stops failing after a crash.
    pub async fn recover(&self) {
        let mut state = self.state.lock().await;
        state.crashed = false;
        state.crash_after = None;
        state.crash_after_patches = None;
    }
}

impl Server {
    async fn handle(&self, incoming: Incoming) -> Response<kube::client::Body> {
        let line = incoming.line();
        {
            let mut state = self.state.lock().await;
            if state.crash_after_patches.is_some_and(|n| state.patches >= n) {
                state.crashed = true;
            }
            if state.crashed {
                return status_response(503, "ServiceUnavailable", "the fake has crashed");
            }
            state.log.push(line.clone());
            // The authorization filter runs before any handler
            // (staging/src/k8s.io/apiserver/pkg/endpoints/filters/authorization.go,
            // `withAuthorization`, answering `responsewriters.Forbidden`).
            if let Err(needs) = rbac::authorize(&line) {
                state.denied.push((line.clone(), needs.clone()));
                return status_response(
                    403,
                    "Forbidden",
                    &format!("{line} is forbidden: kmsgate's RBAC does not grant {needs:?}"),
                );
            }
        }
        let Incoming { method, path, query, accept, body, .. } = &incoming;
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let response = match (method.as_str(), segments.as_slice()) {
            ("GET", ["metrics"]) => text_response(self.state.lock().await.metrics.clone()),
            ("GET", ["api", "v1", "secrets"]) if incoming.is_watch() => self.watch(query).await,
            ("GET", ["api", "v1", "secrets"]) => self.list(None, query, accept).await,
            ("GET", ["api", "v1", "namespaces", ns, "secrets"]) => self.list(Some(ns), query, accept).await,
            ("GET", ["api", "v1", "namespaces", ns, "secrets", name]) => self.get(ns, name, accept).await,
            ("DELETE", ["api", "v1", "namespaces", ns, "secrets", name]) => self.delete(ns, name, body).await,
            ("POST", ["api", "v1", "namespaces", ns, "secrets"]) => self.create_from(ns, body).await,
            ("PATCH", ["api", "v1", "namespaces", ns, "secrets", name]) => self.patch(ns, name, body).await,
            ("GET", ["api", "v1", "namespaces", ns, "serviceaccounts", name]) => {
                self.service_account(ns, name, accept).await
            }
            ("PATCH", ["api", "v1", "namespaces", ns, "serviceaccounts", name]) => {
                self.patch_service_account(ns, name, body).await
            }
            ("POST", ["api", "v1", "namespaces", ns, "serviceaccounts", name, "token"]) => {
                self.token_request(ns, name, body).await
            }
            ("GET", ["apis", "kmsgate.io", "v1alpha1", plural, name]) => self.get_policy(plural, name).await,
            ("PATCH", ["apis", "kmsgate.io", "v1alpha1", plural, name, rest @ ..]) => {
                self.patch_policy(plural, name, rest == ["status"], body).await
            }
            ("GET", ["apis", "coordination.k8s.io", "v1", "namespaces", "kube-system", "leases"]) => {
                self.identity_leases().await
            }
            ("GET", ["apis", "discovery.k8s.io", "v1", "namespaces", ns, "endpointslices", name]) => {
                self.endpoint_slice(ns, name).await
            }
            ("POST", ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"]) => {
                self.access_review(body).await
            }
            ("GET", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => {
                let state = self.state.lock().await;
                match state.leases.get(&(ns.to_string(), name.to_string())) {
                    Some(lease) => json_response(200, lease.clone()),
                    None => not_found("leases.coordination.k8s.io", name),
                }
            }
            ("POST", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"]) => {
                let mut state = self.state.lock().await;
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                // A create of an existing key fails in storage (staging/src/k8s.io/apiserver/pkg/
                // storage/etcd3/store.go, `store.Create`: `storage.NewKeyExistsError`), which the
                // registry answers as 409 AlreadyExists.
                if state.leases.contains_key(&(ns.to_string(), name.clone())) {
                    return status_response(
                        409,
                        "AlreadyExists",
                        &format!("leases.coordination.k8s.io \"{name}\" already exists"),
                    );
                }
                let mut lease = body.clone();
                state.next_rv += 1;
                lease["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
                lease["metadata"]["namespace"] = json!(ns);
                state.leases.insert((ns.to_string(), name), lease.clone());
                json_response(201, lease)
            }
            ("PUT", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => {
                let mut state = self.state.lock().await;
                let id = (ns.to_string(), name.to_string());
                let Some(existing) = state.leases.get(&id) else {
                    return not_found("leases.coordination.k8s.io", name);
                };
                if existing["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                    return conflict("leases.coordination.k8s.io", name);
                }
                let mut lease = body.clone();
                state.next_rv += 1;
                lease["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
                state.leases.insert(id, lease.clone());
                json_response(200, lease)
            }
            ("POST", ["apis", "events.k8s.io", "v1", "namespaces", _ns, "events"]) => {
                self.state.lock().await.events.push(body.clone());
                json_response(201, body.clone())
            }
            _ => status_response(404, "NotFound", &format!("the fake does not serve {method} {path}")),
        };
        let mut state = self.state.lock().await;
        if state.crash_after.as_deref().is_some_and(|prefix| line.starts_with(prefix)) {
            state.crashed = true;
        }
        response
    }

    async fn get_policy(&self, plural: &str, name: &str) -> Response<kube::client::Body> {
        let state = self.state.lock().await;
        if serves(&state.policy, plural, name) {
            json_response(200, state.policy.clone())
        } else {
            not_found(&format!("{plural}.kmsgate.io"), name)
        }
    }

    /// A merge patch of the policy. The CRDs have a status subresource, so the main resource
    /// ignores status and `/status` changes only status (staging/src/k8s.io/apiextensions-apiserver/
    /// pkg/registry/customresource/strategy.go, `customResourceStrategy.PrepareForUpdate`, and
    /// status_strategy.go, `statusStrategy.PrepareForUpdate`). A resourceVersion in the patch is
    /// a precondition (staging/src/k8s.io/apiserver/pkg/registry/generic/registry/store.go,
    /// `Store.Update`).
    async fn patch_policy(
        &self,
        plural: &str,
        name: &str,
        status: bool,
        body: &Value,
    ) -> Response<kube::client::Body> {
        let mut state = self.state.lock().await;
        if !serves(&state.policy, plural, name) {
            return not_found(&format!("{plural}.kmsgate.io"), name);
        }
        if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
            && state.policy["metadata"]["resourceVersion"] != rv
        {
            return conflict(&format!("{plural}.kmsgate.io"), name);
        }
        let mut patched = state.policy.clone();
        merge(&mut patched, body);
        if status {
            let status = patched["status"].take();
            patched = state.policy.clone();
            patched["status"] = status;
        } else {
            patched["status"] = state.policy["status"].clone();
        }
        state.next_rv += 1;
        patched["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
        state.policy = patched;
        json_response(200, state.policy.clone())
    }

    async fn service_account(&self, ns: &str, name: &str, accept: &str) -> Response<kube::client::Body> {
        let state = self.state.lock().await;
        let id = (ns.to_string(), name.to_string());
        match state.service_accounts.get(&id) {
            Some(uid) if accept.contains("as=PartialObjectMetadata") => json_response(
                200,
                json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                       "metadata": {"name": name, "namespace": ns, "uid": uid}}),
            ),
            Some(uid) => json_response(200, account_json(ns, name, uid, &state.account_refs[&id])),
            None => not_found("serviceaccounts", name),
        }
    }

    /// A merge patch of a ServiceAccount's `secrets` (a list, so replaced whole: staging/src/
    /// k8s.io/apimachinery/pkg/util/json merge semantics in staging/src/k8s.io/apiserver/pkg/
    /// endpoints/handlers/patch.go, `jsonPatcher.applyJSPatch`). A resourceVersion in the patch
    /// is a precondition (staging/src/k8s.io/apiserver/pkg/registry/generic/registry/store.go,
    /// `Store.Update`: 409 when it is not the stored one).
    async fn patch_service_account(
        &self,
        ns: &str,
        name: &str,
        body: &Value,
    ) -> Response<kube::client::Body> {
        let mut state = self.state.lock().await;
        let id = (ns.to_string(), name.to_string());
        let Some(uid) = state.service_accounts.get(&id).cloned() else {
            return not_found("serviceaccounts", name);
        };
        if state.account_races > 0 {
            state.account_races -= 1;
            state.next_rv += 1;
            let rv = state.next_rv;
            state.account_refs.get_mut(&id).unwrap().resource_version = rv;
        }
        let current = state.account_refs[&id].resource_version.to_string();
        if body["metadata"]["resourceVersion"].as_str().is_some_and(|rv| rv != current) {
            return conflict("serviceaccounts", name);
        }
        state.next_rv += 1;
        let rv = state.next_rv;
        let refs = state.account_refs.get_mut(&id).unwrap();
        if let Some(secrets) = body["secrets"].as_array() {
            refs.secrets = secrets.iter().filter_map(|s| s["name"].as_str().map(str::to_owned)).collect();
        }
        refs.resource_version = rv;
        json_response(200, account_json(ns, name, &uid, refs))
    }
}

/// A v1 ServiceAccount as the API server serves it.
fn account_json(ns: &str, name: &str, uid: &str, refs: &AccountRefs) -> Value {
    let secrets: Vec<Value> = refs.secrets.iter().map(|s| json!({"name": s})).collect();
    json!({"apiVersion": "v1", "kind": "ServiceAccount",
           "metadata": {"name": name, "namespace": ns, "uid": uid,
                        "resourceVersion": refs.resource_version.to_string()},
           "secrets": secrets})
}

/// Whether the policy object is the one a `{plural}/{name}` path names.
fn serves(policy: &Value, plural: &str, name: &str) -> bool {
    let kind = match plural {
        "rotationpolicies" => "RotationPolicy",
        "tokenpolicies" => "TokenPolicy",
        "signingkeypolicies" => "SigningKeyPolicy",
        _ => return false,
    };
    policy["kind"] == kind && policy["metadata"]["name"] == name
}
