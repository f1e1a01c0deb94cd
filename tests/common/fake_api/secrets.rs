//! Secrets: metadata-only lists with paging, get, create, patch, delete and a watch; every write
//! goes through [`Server::write`], which models the storage layer's rewrite of stale objects.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use http::Response;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::{
    Secret, Server, State, conflict, json_response, merge, metadata_list, not_found, status_response,
};

impl Secret {
    /// A Secret not stored yet: no uid, resourceVersion, labels, annotations, data or key_id.
    pub(super) fn unstored(namespace: &str, name: &str, type_: &str, created: Timestamp) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            uid: String::new(),
            resource_version: 0,
            type_: type_.into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            data: BTreeMap::new(),
            created,
            key_id: String::new(),
        }
    }

    fn meta(&self) -> Value {
        json!({
            "name": self.name, "namespace": self.namespace, "uid": self.uid,
            "resourceVersion": self.resource_version.to_string(),
            "creationTimestamp": self.created.to_string(),
            "labels": self.labels, "annotations": self.annotations,
        })
    }

    /// The object as a `PartialObjectMetadata` (staging/src/k8s.io/apiserver/pkg/endpoints/
    /// handlers/response.go, `asPartialObjectMetadata`).
    pub fn partial(&self) -> Value {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": self.meta()})
    }

    /// The whole object, data base64-encoded.
    pub fn full(&self) -> Value {
        let data: BTreeMap<&String, String> =
            self.data.iter().map(|(k, v)| (k, base64::engine::general_purpose::STANDARD.encode(v))).collect();
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": self.type_, "metadata": self.meta(), "data": data,
        })
    }

    /// What storage holds: the object without its resourceVersion, which etcd keeps beside it.
    fn stored(&self) -> Vec<u8> {
        let mut object = self.full();
        object["metadata"].as_object_mut().unwrap().remove("resourceVersion");
        serde_json::to_vec(&object).unwrap()
    }
}

impl Server {
    /// The key_id a write uses now.
    async fn current_key_id(&self) -> String {
        match &self.store {
            Some(store) => store.current_key_id().await,
            None => self.state.lock().await.current_key_id.clone(),
        }
    }

    /// Stores `secret` under `id` as kube-apiserver's storage does: an update that changes
    /// nothing is skipped unless the stored value is stale (its key_id is not the one writes use
    /// now); anything else is encrypted with the current key and gets a new resourceVersion
    /// (staging/src/k8s.io/apiserver/pkg/storage/etcd3/store.go, `store.GuaranteedUpdate`:
    /// `if !origState.stale && bytes.Equal(data, origState.data)`). Returns whether it wrote.
    pub(super) async fn write(&self, state: &mut State, mut secret: Secret) -> bool {
        let id = (secret.namespace.clone(), secret.name.clone());
        let existing = state.secrets.get(&id);
        let current = match &self.store {
            Some(store) => store.current_key_id().await,
            None => state.current_key_id.clone(),
        };
        if let Some(old) = existing
            && old.key_id == current
            && old.stored() == secret.stored()
        {
            return false;
        }
        if existing.is_some() {
            *state.rewrites.entry(format!("{}/{}", id.0, id.1)).or_default() += 1;
        }
        secret.key_id = match &self.store {
            Some(store) => store.write(&id.0, &id.1, &secret.stored()).await,
            None => current,
        };
        state.next_rv += 1;
        secret.resource_version = state.next_rv;
        state.secrets.insert(id, secret);
        self.changed.notify_waiters();
        true
    }

    /// Creates a Secret with a new uid (the caller checked it does not exist).
    pub(super) async fn create(&self, mut secret: Secret) -> Secret {
        let mut state = self.state.lock().await;
        state.next_uid += 1;
        secret.uid = format!("uid-{}", state.next_uid);
        let id = (secret.namespace.clone(), secret.name.clone());
        self.write(&mut state, secret).await;
        state.secrets[&id].clone()
    }

    /// One page of a metadata-only list. The continue token names the last key returned, as
    /// kube-apiserver's (opaque to clients) token carries the next key to read from
    /// (staging/src/k8s.io/apiserver/pkg/storage/etcd3/store.go, `store.GetList`, with
    /// staging/src/k8s.io/apiserver/pkg/storage/continue.go, `EncodeContinue`). Label selectors
    /// `k=v` and the Secret field selector `type=` are served (pkg/registry/core/secret/
    /// strategy.go, `SelectableFields`).
    pub(super) async fn list(
        &self,
        namespace: Option<&str>,
        query: &HashMap<String, String>,
        accept: &str,
    ) -> Response<kube::client::Body> {
        let state = self.state.lock().await;
        let limit: usize =
            query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
        let after = query.get("continue").cloned().unwrap_or_default();
        let selector = query.get("labelSelector").and_then(|s| s.split_once('='));
        let type_ = query.get("fieldSelector").and_then(|f| f.strip_prefix("type="));
        let mut items = Vec::new();
        let mut last = String::new();
        let mut more = false;
        for secret in state.secrets.values() {
            let key = format!("{}/{}", secret.namespace, secret.name);
            if namespace.is_some_and(|ns| ns != secret.namespace)
                || (!after.is_empty() && key <= after)
                || type_.is_some_and(|t| t != secret.type_)
                || selector.is_some_and(|(k, v)| secret.labels.get(k).map(String::as_str) != Some(v))
            {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(secret.partial());
            last = key;
        }
        metadata_list(accept, state.next_rv, if more { &last } else { "" }, items)
    }

    pub(super) async fn get(&self, ns: &str, name: &str, accept: &str) -> Response<kube::client::Body> {
        let state = self.state.lock().await;
        match state.secrets.get(&(ns.to_owned(), name.to_owned())) {
            Some(s) if accept.contains("as=PartialObjectMetadata") => json_response(200, s.partial()),
            Some(s) => json_response(200, s.full()),
            None => not_found("secrets", name),
        }
    }

    /// A delete, with the uid precondition checked as storage does (staging/src/k8s.io/apiserver/
    /// pkg/storage/interfaces.go, `Preconditions.Check`, answered as 409 Conflict).
    pub(super) async fn delete(&self, ns: &str, name: &str, body: &Value) -> Response<kube::client::Body> {
        let mut state = self.state.lock().await;
        let id = (ns.to_owned(), name.to_owned());
        match state.secrets.get(&id) {
            None => not_found("secrets", name),
            Some(s) if body["preconditions"]["uid"].as_str().is_some_and(|u| u != s.uid) => status_response(
                409,
                "Conflict",
                &format!(
                    "Precondition failed: UID in precondition: {}, UID in object meta: {}",
                    body["preconditions"]["uid"].as_str().unwrap_or_default(),
                    s.uid
                ),
            ),
            Some(_) => {
                let deleted = state.secrets.remove(&id);
                drop(state);
                self.changed.notify_waiters();
                if let Some(deleted) = deleted.filter(|s| s.type_ == kmsgate::tokens::LEGACY_TYPE) {
                    self.spawn_reference_removal(deleted).await;
                }
                json_response(200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
            }
        }
    }

    /// A POST of a Secret; a legacy token Secret is then filled by the token controller.
    pub(super) async fn create_from(&self, ns: &str, body: &Value) -> Response<kube::client::Body> {
        let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let strings =
            |v: &Value| -> BTreeMap<String, String> { serde_json::from_value(v.clone()).unwrap_or_default() };
        if self.state.lock().await.secrets.contains_key(&(ns.to_owned(), name.clone())) {
            return status_response(409, "AlreadyExists", &format!("secrets \"{name}\" already exists"));
        }
        assert!(
            body.get("data").is_none_or(Value::is_null),
            "a recreated token Secret carries no data: {body}"
        );
        let now = kmsgate::tokens::Clock::now(&*self.clock);
        let type_ = body["type"].as_str().unwrap_or("Opaque");
        let secret = self
            .create(Secret {
                labels: strings(&body["metadata"]["labels"]),
                annotations: strings(&body["metadata"]["annotations"]),
                ..Secret::unstored(ns, &name, type_, now)
            })
            .await;
        if secret.type_ == kmsgate::tokens::LEGACY_TYPE {
            self.spawn_token_controller(ns, &name).await;
        }
        json_response(201, secret.full())
    }

    /// A merge patch of a Secret's annotations, labels and data, with the resourceVersion in the
    /// patch as a precondition (staging/src/k8s.io/apiserver/pkg/registry/generic/registry/
    /// store.go, `Store.Update`), and the faults the test injected.
    pub(super) async fn patch(&self, ns: &str, name: &str, body: &Value) -> Response<kube::client::Body> {
        let current = self.current_key_id().await;
        let mut state = self.state.lock().await;
        state.patches += 1;
        state.current_key_id = current;
        let id = (ns.to_owned(), name.to_owned());
        let full = format!("{ns}/{name}");
        if let Some(left) = state.faults.unavailable.get_mut(&full)
            && *left > 0
        {
            *left -= 1;
            return status_response(503, "ServiceUnavailable", "etcd leader changed");
        }
        if state.faults.race_deletes.remove(&full) {
            state.secrets.remove(&id);
        }
        if state.faults.race_writes.remove(&full)
            && let Some(secret) = state.secrets.get(&id).cloned()
        {
            // Someone else's update lands first: a write of the same content, which re-encrypts
            // the stale object.
            self.write(&mut state, secret).await;
        }
        let Some(secret) = state.secrets.get(&id).cloned() else {
            return not_found("secrets", name);
        };
        if state.touch_only {
            let only_rv = body["metadata"].as_object().is_some_and(|m| m.len() == 1)
                && body.as_object().is_some_and(|b| b.len() == 1);
            assert!(only_rv, "a migrate patch carries only metadata.resourceVersion, got {body}");
        }
        if let Some(wanted) = body["metadata"]["resourceVersion"].as_str()
            && wanted != secret.resource_version.to_string()
        {
            return conflict("secrets", name);
        }
        let mut object = json!({
            "metadata": {"labels": secret.labels, "annotations": secret.annotations},
            "data": secret.data,
        });
        let mut changes = body.clone();
        if let Some(data) = changes.get_mut("data").and_then(Value::as_object_mut) {
            for value in data.values_mut() {
                if let Some(encoded) = value.as_str() {
                    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
                    *value = json!(String::from_utf8(decoded).unwrap());
                }
            }
        }
        merge(&mut object, &changes);
        let strings =
            |v: &Value| -> BTreeMap<String, String> { serde_json::from_value(v.clone()).unwrap_or_default() };
        let updated = Secret {
            labels: strings(&object["metadata"]["labels"]),
            annotations: strings(&object["metadata"]["annotations"]),
            data: strings(&object["data"]),
            ..secret
        };
        self.write(&mut state, updated).await;
        json_response(200, state.secrets[&id].partial())
    }

    /// Holds the watch until something changes after the requested resourceVersion, or until
    /// `timeoutSeconds` (staging/src/k8s.io/apiserver/pkg/endpoints/handlers/get.go,
    /// `ListResource`, which passes it to `serveWatch`). NB: unlike upstream, the stream ends
    /// right after the first batch of changes, every one sent as `MODIFIED` and deletions not at
    /// all; the client re-watches from the last resourceVersion, as after a server timeout.
    pub(super) async fn watch(&self, query: &HashMap<String, String>) -> Response<kube::client::Body> {
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let timeout = query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
        loop {
            let notified = self.changed.notified();
            {
                let state = self.state.lock().await;
                let mut changes: Vec<(u64, Value)> = state
                    .secrets
                    .values()
                    .filter(|s| s.resource_version > from)
                    .map(|s| (s.resource_version, s.partial()))
                    .collect();
                if !changes.is_empty() || tokio::time::Instant::now() >= deadline {
                    changes.sort_by_key(|(rv, _)| *rv);
                    let mut body = Vec::new();
                    for (_, object) in changes {
                        body.extend(
                            serde_json::to_vec(&json!({"type": "MODIFIED", "object": object})).unwrap(),
                        );
                        body.push(b'\n');
                    }
                    return Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(body))
                        .unwrap();
                }
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }
}
