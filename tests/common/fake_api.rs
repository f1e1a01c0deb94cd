//! An in-memory kube-apiserver for the controller: Secrets (metadata-only lists with paging, a
//! no-op merge patch that rewrites stale objects the way the real storage layer does), the
//! RotationPolicy with its status subresource, Leases, Events and /metrics.
//!
//! Each Secret remembers the key_id it was last written with. A write re-encrypts the object
//! (new resourceVersion) only when that key_id differs from the current write key_id, exactly
//! as kube-apiserver skips an unchanged, non-stale write. An optional [`Store`] mirrors every
//! write into real storage (the end-to-end test seals it through the plugin into etcd).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    convert::Infallible,
    sync::Arc,
};

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// Where written objects go besides memory.
pub trait Store: Send + Sync {
    /// Stores one object's bytes; returns the key_id it was encrypted under.
    fn write(&self, namespace: &str, name: &str, data: &[u8]) -> BoxFuture<'static, String>;
    /// The key_id a write would use now.
    fn current_key_id(&self) -> BoxFuture<'static, String>;
}

/// One Secret.
#[derive(Debug, Clone)]
pub struct Obj {
    pub namespace: String,
    pub name: String,
    pub resource_version: u64,
    pub key_id: String,
    pub labels: BTreeMap<String, String>,
    pub data: Vec<u8>,
}

/// Faults to inject, by `namespace/name`.
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
#[derive(Default)]
pub struct State {
    pub objects: BTreeMap<(String, String), Obj>,
    pub next_rv: u64,
    pub current_key_id: String,
    /// Writes that re-encrypted each object (by anyone).
    pub rewrites: HashMap<String, u32>,
    /// Our patches that reached the object (any outcome).
    pub patches: u64,
    pub policy: Value,
    pub leases: HashMap<(String, String), Value>,
    pub identity_leases: Vec<Value>,
    pub events: Vec<Value>,
    /// Extra /metrics text.
    pub metrics: String,
    pub faults: Faults,
    /// Every request as `METHOD path`.
    pub log: Vec<String>,
    /// Stop answering (every request gets 503) once `patches` reaches this.
    pub crash_after_patches: Option<u64>,
}

/// The fake API server; clone it to share.
#[derive(Clone, Default)]
pub struct FakeApi {
    pub state: Arc<Mutex<State>>,
    pub store: Option<Arc<dyn Store>>,
}

impl FakeApi {
    /// An empty fake with write key_id `key_id`.
    pub fn new(key_id: &str) -> Self {
        let fake = Self::default();
        {
            let mut state = fake.state.try_lock().unwrap();
            state.current_key_id = key_id.into();
            state.next_rv = 100;
        }
        fake
    }

    /// A kube client talking to this fake.
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        client_for(move |incoming| {
            let fake = fake.clone();
            async move { fake.handle(incoming).await }
        })
    }

    /// Adds `count` Secrets named `s00000...` in `namespaces` round robin, on `key_id`.
    pub async fn seed(&self, count: usize, namespaces: &[&str], key_id: &str) {
        for i in 0..count {
            let namespace = namespaces[i % namespaces.len()];
            self.insert(namespace, &format!("s{i:05}"), key_id, format!("{{\"n\":{i}}}").as_bytes()).await;
        }
    }

    /// Adds one Secret stored under `key_id` (through the store, when there is one).
    pub async fn insert(&self, namespace: &str, name: &str, key_id: &str, data: &[u8]) {
        let key_id = match &self.store {
            Some(store) => store.write(namespace, name, data).await,
            None => key_id.to_owned(),
        };
        let mut state = self.state.lock().await;
        state.next_rv += 1;
        let rv = state.next_rv;
        state.objects.insert(
            (namespace.into(), name.into()),
            Obj {
                namespace: namespace.into(),
                name: name.into(),
                resource_version: rv,
                key_id,
                labels: BTreeMap::new(),
                data: data.to_vec(),
            },
        );
    }

    /// Sets the RotationPolicy object.
    pub async fn set_policy(&self, policy: Value) {
        self.state.lock().await.policy = policy;
    }

    /// The RotationPolicy status.
    pub async fn status(&self) -> Value {
        self.state.lock().await.policy["status"].clone()
    }

    /// Objects whose key_id is not `key_id`.
    pub async fn stale(&self, key_id: &str) -> Vec<String> {
        let state = self.state.lock().await;
        state
            .objects
            .values()
            .filter(|o| o.key_id != key_id)
            .map(|o| format!("{}/{}", o.namespace, o.name))
            .collect()
    }

    async fn current_key_id(&self) -> String {
        match &self.store {
            Some(store) => store.current_key_id().await,
            None => self.state.lock().await.current_key_id.clone(),
        }
    }

    /// Rewrites one object as a real write would: new resourceVersion, current key_id.
    async fn rewrite(&self, state: &mut State, id: &(String, String)) {
        let Some(obj) = state.objects.get(id).cloned() else { return };
        let key_id = match &self.store {
            Some(store) => store.write(&obj.namespace, &obj.name, &obj.data).await,
            None => state.current_key_id.clone(),
        };
        state.next_rv += 1;
        let rv = state.next_rv;
        let obj = state.objects.get_mut(id).unwrap();
        obj.resource_version = rv;
        obj.key_id = key_id;
        *state.rewrites.entry(format!("{}/{}", id.0, id.1)).or_default() += 1;
    }

    async fn handle(&self, incoming: Incoming) -> Response<kube::client::Body> {
        let Incoming { method, path, query, accept, body } = incoming;
        {
            let mut state = self.state.lock().await;
            state.log.push(format!("{method} {path}"));
            if state.crash_after_patches.is_some_and(|n| state.patches >= n) {
                return status_response(503, "ServiceUnavailable", "the fake has crashed");
            }
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["metrics"]) => text_response(self.state.lock().await.metrics.clone()),
            ("GET", ["api", "v1", "secrets"]) => self.list(None, &query, &accept).await,
            ("GET", ["api", "v1", "namespaces", ns, "secrets"]) => self.list(Some(ns), &query, &accept).await,
            ("GET", ["api", "v1", "namespaces", ns, "secrets", name]) => {
                let state = self.state.lock().await;
                match state.objects.get(&(ns.to_string(), name.to_string())) {
                    Some(obj) => json_response(200, meta(obj)),
                    None => status_response(404, "NotFound", "secret not found"),
                }
            }
            ("PATCH", ["api", "v1", "namespaces", ns, "secrets", name]) => self.patch(ns, name, &body).await,
            ("GET", ["apis", "kmsgate.io", "v1alpha1", "rotationpolicies", name]) => {
                let state = self.state.lock().await;
                if state.policy["metadata"]["name"] == *name {
                    json_response(200, state.policy.clone())
                } else {
                    status_response(404, "NotFound", "rotationpolicy not found")
                }
            }
            ("PATCH", ["apis", "kmsgate.io", "v1alpha1", "rotationpolicies", _name, ..]) => {
                let mut state = self.state.lock().await;
                merge(&mut state.policy, &body);
                let rv = state.next_rv + 1;
                state.next_rv = rv;
                state.policy["metadata"]["resourceVersion"] = json!(rv.to_string());
                json_response(200, state.policy.clone())
            }
            ("GET", ["apis", "coordination.k8s.io", "v1", "namespaces", "kube-system", "leases"]) => {
                let state = self.state.lock().await;
                json_response(
                    200,
                    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {}, "items": state.identity_leases}),
                )
            }
            ("GET", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name]) => {
                let state = self.state.lock().await;
                match state.leases.get(&(ns.to_string(), name.to_string())) {
                    Some(lease) => json_response(200, lease.clone()),
                    None => status_response(404, "NotFound", "lease not found"),
                }
            }
            ("POST", ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"]) => {
                let mut state = self.state.lock().await;
                let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                if state.leases.contains_key(&(ns.to_string(), name.clone())) {
                    return status_response(409, "AlreadyExists", "lease exists");
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
                    return status_response(404, "NotFound", "lease not found");
                };
                if existing["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                    return status_response(409, "Conflict", "the object has been modified");
                }
                let mut lease = body.clone();
                state.next_rv += 1;
                lease["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
                state.leases.insert(id, lease.clone());
                json_response(200, lease)
            }
            ("POST", ["apis", "events.k8s.io", "v1", "namespaces", _ns, "events"]) => {
                self.state.lock().await.events.push(body.clone());
                json_response(201, body)
            }
            _ => status_response(404, "NotFound", &format!("the fake does not serve {method} {path}")),
        }
    }

    async fn list(
        &self,
        namespace: Option<&str>,
        query: &HashMap<String, String>,
        accept: &str,
    ) -> Response<kube::client::Body> {
        let state = self.state.lock().await;
        let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
        let after = query.get("continue").cloned().unwrap_or_default();
        let selector = query.get("labelSelector").and_then(|s| s.split_once('='));
        let mut items = Vec::new();
        let mut more = false;
        for obj in state.objects.values() {
            let key = format!("{}/{}", obj.namespace, obj.name);
            if namespace.is_some_and(|ns| ns != obj.namespace) || (!after.is_empty() && key <= after) {
                continue;
            }
            if let Some((k, v)) = selector
                && obj.labels.get(k).map(String::as_str) != Some(v)
            {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(meta(obj));
        }
        let continue_token = if more {
            let last = &items[items.len() - 1]["metadata"];
            format!("{}/{}", last["namespace"].as_str().unwrap(), last["name"].as_str().unwrap())
        } else {
            String::new()
        };
        metadata_list(accept, state.next_rv, &continue_token, items)
    }

    async fn patch(&self, ns: &str, name: &str, body: &Value) -> Response<kube::client::Body> {
        let current = self.current_key_id().await;
        let mut state = self.state.lock().await;
        state.patches += 1;
        state.current_key_id = current.clone();
        let id = (ns.to_owned(), name.to_owned());
        let full = format!("{ns}/{name}");
        if let Some(left) = state.faults.unavailable.get_mut(&full)
            && *left > 0
        {
            *left -= 1;
            return status_response(503, "ServiceUnavailable", "etcd leader changed");
        }
        if state.faults.race_deletes.remove(&full) {
            state.objects.remove(&id);
        }
        if state.faults.race_writes.remove(&full) {
            // Someone else's write lands first, re-encrypting the object.
            self.rewrite(&mut state, &id).await;
        }
        let Some(obj) = state.objects.get(&id) else {
            return status_response(404, "NotFound", &format!("secrets {name:?} not found"));
        };
        let only_rv = body["metadata"].as_object().is_some_and(|m| m.len() == 1)
            && body.as_object().is_some_and(|b| b.len() == 1);
        assert!(only_rv, "a migrate patch carries only metadata.resourceVersion, got {body}");
        let wanted = body["metadata"]["resourceVersion"].as_str().unwrap_or_default();
        if wanted != obj.resource_version.to_string() {
            return status_response(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version",
            );
        }
        if obj.key_id != current {
            self.rewrite(&mut state, &id).await;
        }
        json_response(200, meta(&state.objects[&id]))
    }
}

fn meta(obj: &Obj) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {
            "name": obj.name,
            "namespace": obj.namespace,
            "resourceVersion": obj.resource_version.to_string(),
            "labels": obj.labels,
        }
    })
}

/// A request as the fakes route it.
pub struct Incoming {
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Decoded query parameters.
    pub query: HashMap<String, String>,
    /// The Accept header.
    pub accept: String,
    /// The JSON body (`Null` when empty or not JSON).
    pub body: Value,
}

/// A kube client whose every request is read into an [`Incoming`] and answered by `handle`.
pub fn client_for<H, F>(handle: H) -> kube::Client
where
    H: Fn(Incoming) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Response<kube::client::Body>> + Send + 'static,
{
    let service = tower::service_fn(move |request: Request<kube::client::Body>| {
        let handle = handle.clone();
        async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let incoming = Incoming {
                method: parts.method.as_str().to_owned(),
                path: parts.uri.path().to_owned(),
                query: parts
                    .uri
                    .query()
                    .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                    .unwrap_or_default(),
                accept: parts.headers.get("accept").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            Ok::<_, Infallible>(handle(incoming).await)
        }
    });
    kube::Client::new(service, "default")
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().unwrap();
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The answer to a list; kmsgate's lists must ask for metadata only, so any other Accept fails
/// the test.
pub fn metadata_list(
    accept: &str,
    resource_version: u64,
    continue_token: &str,
    items: Vec<Value>,
) -> Response<kube::client::Body> {
    assert!(
        accept.contains("as=PartialObjectMetadataList"),
        "lists must be metadata-only, got Accept {accept:?}"
    );
    json_response(
        200,
        json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": resource_version.to_string(), "continue": continue_token},
            "items": items,
        }),
    )
}

pub fn json_response(code: u16, body: Value) -> Response<kube::client::Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn text_response(text: String) -> Response<kube::client::Body> {
    Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .body(kube::client::Body::from(text.into_bytes()))
        .unwrap()
}

/// A Status error like the API server's.
pub fn status_response(code: u16, reason: &str, message: &str) -> Response<kube::client::Body> {
    json_response(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}
