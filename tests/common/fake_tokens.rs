//! An in-memory kube-apiserver for the token flows: Secrets with data (metadata-only lists and a
//! metadata watch), ServiceAccounts, the TokenRequest API with its validation and lifetime cap,
//! the TokenPolicy with its status, Events, and a token controller that fills legacy token
//! Secrets after creation (and deletes them when their ServiceAccount is missing), as
//! kube-controller-manager does.
//!
//! Time is a [`TestClock`] over tokio's clock, so paused-time tests move both together.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use base64::Engine;
use http::Response;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};

use crate::fake_api::{Incoming, client_for, json_response, merge, metadata_list, status_response};

/// Wall-clock time that advances with tokio's (paused) clock.
pub struct TestClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TestClock {
    /// Starts at 2026-11-26T20:00:00Z.
    pub fn new() -> Self {
        Self { base: Timestamp::from_second(1_795_723_200).unwrap(), start: tokio::time::Instant::now() }
    }

    /// Seconds since the clock started.
    pub fn elapsed(&self) -> u64 {
        self.start.elapsed().as_secs()
    }
}

impl Default for TestClock {
    fn default() -> Self {
        Self::new()
    }
}

impl kmsgate::tokens::Clock for TestClock {
    fn now(&self) -> Timestamp {
        let elapsed = self.start.elapsed();
        Timestamp::from_second(self.base.as_second() + elapsed.as_secs() as i64).unwrap()
    }
}

/// One Secret.
#[derive(Debug, Clone)]
pub struct FakeSecret {
    pub uid: String,
    pub rv: u64,
    pub type_: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Decoded values.
    pub data: BTreeMap<String, String>,
    pub created: Timestamp,
}

/// One TokenRequest the fake answered with a token.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Seconds since the clock started.
    pub at: u64,
    pub namespace: String,
    pub service_account: String,
    pub body: Value,
    pub token: String,
    /// Seconds since the clock started.
    pub expires: u64,
}

/// Everything the fake holds.
#[derive(Default)]
pub struct State {
    pub secrets: BTreeMap<(String, String), FakeSecret>,
    pub service_accounts: BTreeMap<(String, String), String>,
    pub policy: Value,
    pub events: Vec<Value>,
    pub issued: Vec<Issued>,
    /// TokenRequests refused, as `status namespace/sa`.
    pub refused: Vec<(u64, String)>,
    /// The server's `--service-account-max-token-expiration`, in seconds.
    pub max_expiration: Option<u64>,
    /// ServiceAccounts kmsgate may not create tokens for (403).
    pub forbidden: BTreeSet<String>,
    /// After the first request matching this prefix (`"DELETE /api/v1/..."`), answer 503 to all.
    pub crash_after: Option<String>,
    pub crashed: bool,
    /// Every request as `METHOD path`.
    pub log: Vec<String>,
    pub next_rv: u64,
    pub next_uid: u64,
    pub next_token: u64,
    /// How long the token controller takes to fill a new legacy token Secret.
    pub fill_delay: Duration,
}

/// The fake; clone to share.
#[derive(Clone)]
pub struct FakeTokens {
    pub state: Arc<Mutex<State>>,
    pub clock: Arc<TestClock>,
    changed: Arc<Notify>,
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

impl FakeTokens {
    /// An empty cluster with a TokenPolicy `kmsgate` holding `spec`.
    pub fn new(spec: Value) -> Self {
        let fake = Self {
            state: Arc::new(Mutex::new(State {
                next_rv: 100,
                fill_delay: Duration::from_millis(300),
                ..State::default()
            })),
            clock: Arc::new(TestClock::new()),
            changed: Arc::new(Notify::new()),
        };
        fake.state.try_lock().unwrap().policy = json!({
            "apiVersion": "kmsgate.io/v1alpha1", "kind": "TokenPolicy",
            "metadata": {"name": "kmsgate", "resourceVersion": "1"},
            "spec": spec,
        });
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

    /// Adds a ServiceAccount.
    pub async fn add_service_account(&self, namespace: &str, name: &str) -> String {
        let mut state = self.state.lock().await;
        state.next_uid += 1;
        let uid = format!("sa-uid-{}", state.next_uid);
        state.service_accounts.insert((namespace.into(), name.into()), uid.clone());
        uid
    }

    /// Removes a ServiceAccount.
    pub async fn delete_service_account(&self, namespace: &str, name: &str) {
        self.state.lock().await.service_accounts.remove(&(namespace.into(), name.into()));
    }

    /// Adds a Secret created `age` ago.
    pub async fn add_secret(
        &self,
        namespace: &str,
        name: &str,
        type_: &str,
        annotations: &[(&str, &str)],
        data: &[(&str, &str)],
        age: Duration,
    ) -> String {
        let map =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let created = Timestamp::from_second(
            kmsgate::tokens::Clock::now(&*self.clock).as_second() - age.as_secs() as i64,
        )
        .unwrap();
        let mut state = self.state.lock().await;
        state.next_uid += 1;
        state.next_rv += 1;
        let uid = format!("uid-{}", state.next_uid);
        let secret = FakeSecret {
            uid: uid.clone(),
            rv: state.next_rv,
            type_: type_.into(),
            labels: BTreeMap::new(),
            annotations: map(annotations),
            data: map(data),
            created,
        };
        state.secrets.insert((namespace.into(), name.into()), secret);
        drop(state);
        self.changed.notify_waiters();
        uid
    }

    /// Adds a legacy token Secret of `sa`, `age_days` old, filled as the token controller would.
    pub async fn add_legacy(&self, namespace: &str, name: &str, sa: &str, age_days: u64) -> String {
        let sa_uid = self
            .state
            .lock()
            .await
            .service_accounts
            .get(&(namespace.into(), sa.into()))
            .cloned()
            .unwrap_or_else(|| "sa-uid-gone".into());
        self.add_secret(
            namespace,
            name,
            kmsgate::tokens::LEGACY_TYPE,
            &[(kmsgate::tokens::SA_NAME_ANNOTATION, sa), (kmsgate::tokens::SA_UID_ANNOTATION, &sa_uid)],
            &[("token", &format!("legacy-{name}-0")), ("ca.crt", "CA"), ("namespace", namespace)],
            Duration::from_secs(age_days * 86_400),
        )
        .await
    }

    /// Sets a label on a Secret (as the API server or a user would).
    pub async fn label(&self, namespace: &str, name: &str, key: &str, value: &str) {
        let mut state = self.state.lock().await;
        let secret = state.secrets.get_mut(&(namespace.into(), name.into())).unwrap();
        secret.labels.insert(key.into(), value.into());
    }

    /// Edits a Secret's annotations (`None` removes), as a user would.
    pub async fn annotate(&self, namespace: &str, name: &str, changes: &[(&str, Option<&str>)]) {
        let mut state = self.state.lock().await;
        state.next_rv += 1;
        let rv = state.next_rv;
        let secret = state.secrets.get_mut(&(namespace.into(), name.into())).unwrap();
        for (k, v) in changes {
            match v {
                Some(v) => secret.annotations.insert(k.to_string(), v.to_string()),
                None => secret.annotations.remove(*k),
            };
        }
        secret.rv = rv;
        drop(state);
        self.changed.notify_waiters();
    }

    /// A Secret.
    pub async fn secret(&self, namespace: &str, name: &str) -> Option<FakeSecret> {
        self.state.lock().await.secrets.get(&(namespace.into(), name.into())).cloned()
    }

    /// The TokenPolicy status.
    pub async fn status(&self) -> Value {
        self.state.lock().await.policy["status"].clone()
    }

    /// Stops failing after a crash.
    pub async fn recover(&self) {
        let mut state = self.state.lock().await;
        state.crashed = false;
        state.crash_after = None;
    }

    fn meta(namespace: &str, name: &str, s: &FakeSecret) -> Value {
        json!({
            "name": name, "namespace": namespace, "uid": s.uid, "resourceVersion": s.rv.to_string(),
            "creationTimestamp": s.created.to_string(), "labels": s.labels, "annotations": s.annotations,
        })
    }

    fn partial(namespace: &str, name: &str, s: &FakeSecret) -> Value {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": Self::meta(namespace, name, s)})
    }

    fn full(namespace: &str, name: &str, s: &FakeSecret) -> Value {
        let data: BTreeMap<&String, String> = s.data.iter().map(|(k, v)| (k, b64(v))).collect();
        json!({"apiVersion": "v1", "kind": "Secret", "type": s.type_, "metadata": Self::meta(namespace, name, s), "data": data})
    }

    async fn handle(&self, incoming: Incoming) -> Response<kube::client::Body> {
        let Incoming { method, path, query, accept, body } = incoming;
        let line = format!("{method} {path}");
        {
            let mut state = self.state.lock().await;
            if state.crashed {
                return status_response(503, "ServiceUnavailable", "the fake has crashed");
            }
            let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
            state.log.push(if watch { format!("WATCH {path}") } else { line.clone() });
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let response = match (method.as_str(), segments.as_slice()) {
            ("GET", ["api", "v1", "secrets"]) if query.contains_key("watch") => self.watch(&query).await,
            ("GET", ["api", "v1", "secrets"]) => self.list(None, &query, &accept).await,
            ("GET", ["api", "v1", "namespaces", ns, "secrets"]) => self.list(Some(ns), &query, &accept).await,
            ("GET", ["api", "v1", "namespaces", ns, "secrets", name]) => {
                let state = self.state.lock().await;
                match state.secrets.get(&(ns.to_string(), name.to_string())) {
                    Some(s) if accept.contains("as=PartialObjectMetadata") => {
                        json_response(200, Self::partial(ns, name, s))
                    }
                    Some(s) => json_response(200, Self::full(ns, name, s)),
                    None => status_response(404, "NotFound", &format!("secrets {name:?} not found")),
                }
            }
            ("DELETE", ["api", "v1", "namespaces", ns, "secrets", name]) => {
                let mut state = self.state.lock().await;
                let id = (ns.to_string(), name.to_string());
                match state.secrets.get(&id) {
                    None => status_response(404, "NotFound", &format!("secrets {name:?} not found")),
                    Some(s) if body["preconditions"]["uid"].as_str().is_some_and(|u| u != s.uid) => {
                        status_response(
                            409,
                            "Conflict",
                            "Precondition failed: UID in precondition does not match",
                        )
                    }
                    Some(_) => {
                        state.secrets.remove(&id);
                        json_response(200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
                    }
                }
            }
            ("POST", ["api", "v1", "namespaces", ns, "secrets"]) => self.create_secret(ns, &body).await,
            ("PATCH", ["api", "v1", "namespaces", ns, "secrets", name]) => {
                self.patch_secret(ns, name, &body).await
            }
            ("GET", ["api", "v1", "namespaces", ns, "serviceaccounts", name]) => {
                let state = self.state.lock().await;
                match state.service_accounts.get(&(ns.to_string(), name.to_string())) {
                    Some(uid) => json_response(
                        200,
                        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                               "metadata": {"name": name, "namespace": ns, "uid": uid}}),
                    ),
                    None => status_response(404, "NotFound", &format!("serviceaccounts {name:?} not found")),
                }
            }
            ("POST", ["api", "v1", "namespaces", ns, "serviceaccounts", name, "token"]) => {
                self.token_request(ns, name, &body).await
            }
            ("GET", ["apis", "kmsgate.io", "v1alpha1", "tokenpolicies", name]) => {
                let state = self.state.lock().await;
                if state.policy["metadata"]["name"] == *name {
                    json_response(200, state.policy.clone())
                } else {
                    status_response(404, "NotFound", "tokenpolicy not found")
                }
            }
            ("PATCH", ["apis", "kmsgate.io", "v1alpha1", "tokenpolicies", _name, "status"]) => {
                let mut state = self.state.lock().await;
                if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
                    && state.policy["metadata"]["resourceVersion"] != rv
                {
                    status_response(409, "Conflict", "the object has been modified")
                } else {
                    let mut patch = body.clone();
                    patch.as_object_mut().unwrap().remove("metadata");
                    merge(&mut state.policy, &patch);
                    state.next_rv += 1;
                    state.policy["metadata"]["resourceVersion"] = json!(state.next_rv.to_string());
                    json_response(200, state.policy.clone())
                }
            }
            ("POST", ["apis", "events.k8s.io", "v1", "namespaces", _ns, "events"]) => {
                self.state.lock().await.events.push(body.clone());
                json_response(201, body)
            }
            _ => status_response(404, "NotFound", &format!("the fake does not serve {method} {path}")),
        };
        let mut state = self.state.lock().await;
        if state.crash_after.as_deref().is_some_and(|prefix| line.starts_with(prefix)) {
            state.crashed = true;
        }
        response
    }

    async fn list(
        &self,
        namespace: Option<&str>,
        query: &HashMap<String, String>,
        accept: &str,
    ) -> Response<kube::client::Body> {
        let state = self.state.lock().await;
        let selector = query.get("labelSelector").and_then(|s| s.split_once('='));
        let type_ = query.get("fieldSelector").and_then(|f| f.strip_prefix("type="));
        let items: Vec<Value> = state
            .secrets
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|n| n == ns))
            .filter(|(_, s)| type_.is_none_or(|t| t == s.type_))
            .filter(|(_, s)| selector.is_none_or(|(k, v)| s.labels.get(k).is_some_and(|l| l == v)))
            .map(|((ns, name), s)| Self::partial(ns, name, s))
            .collect();
        metadata_list(accept, state.next_rv, "", items)
    }

    /// Holds the watch until something changes after the requested resourceVersion, then sends
    /// those changes and ends the stream (the client re-watches from the last one).
    async fn watch(&self, query: &HashMap<String, String>) -> Response<kube::client::Body> {
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let timeout = query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            let notified = self.changed.notified();
            {
                let state = self.state.lock().await;
                let mut changes: Vec<(u64, Value)> = state
                    .secrets
                    .iter()
                    .filter(|(_, s)| s.rv > from)
                    .map(|((ns, name), s)| (s.rv, Self::partial(ns, name, s)))
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

    async fn create_secret(&self, ns: &str, body: &Value) -> Response<kube::client::Body> {
        let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let strings =
            |v: &Value| -> BTreeMap<String, String> { serde_json::from_value(v.clone()).unwrap_or_default() };
        let mut state = self.state.lock().await;
        let id = (ns.to_owned(), name.clone());
        if state.secrets.contains_key(&id) {
            return status_response(409, "AlreadyExists", &format!("secrets {name:?} already exists"));
        }
        state.next_uid += 1;
        state.next_rv += 1;
        let secret = FakeSecret {
            uid: format!("uid-{}", state.next_uid),
            rv: state.next_rv,
            type_: body["type"].as_str().unwrap_or("Opaque").into(),
            labels: strings(&body["metadata"]["labels"]),
            annotations: strings(&body["metadata"]["annotations"]),
            data: BTreeMap::new(),
            created: kmsgate::tokens::Clock::now(&*self.clock),
        };
        assert!(
            body.get("data").is_none_or(Value::is_null),
            "a recreated token Secret carries no data: {body}"
        );
        let answer = Self::full(ns, &name, &secret);
        let legacy = secret.type_ == kmsgate::tokens::LEGACY_TYPE;
        state.secrets.insert(id, secret);
        let delay = state.fill_delay;
        drop(state);
        self.changed.notify_waiters();
        if legacy {
            // The token controller: fills the token (or deletes the Secret when its ServiceAccount
            // is missing) a little later.
            let fake = self.clone();
            let (ns, name) = (ns.to_owned(), name.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                fake.token_controller(&ns, &name).await;
            });
        }
        json_response(201, answer)
    }

    async fn token_controller(&self, ns: &str, name: &str) {
        let mut state = self.state.lock().await;
        let id = (ns.to_owned(), name.to_owned());
        let Some(secret) = state.secrets.get(&id).cloned() else { return };
        let sa = secret.annotations.get(kmsgate::tokens::SA_NAME_ANNOTATION).cloned().unwrap_or_default();
        let Some(sa_uid) = state.service_accounts.get(&(ns.to_owned(), sa.clone())).cloned() else {
            state.secrets.remove(&id);
            return;
        };
        state.next_rv += 1;
        state.next_token += 1;
        let (rv, n) = (state.next_rv, state.next_token);
        let secret = state.secrets.get_mut(&id).unwrap();
        secret.data.insert("token".into(), format!("legacy-{name}-{n}"));
        secret.data.insert("ca.crt".into(), "CA".into());
        secret.data.insert("namespace".into(), ns.into());
        secret.annotations.insert(kmsgate::tokens::SA_UID_ANNOTATION.into(), sa_uid);
        secret.rv = rv;
        drop(state);
        self.changed.notify_waiters();
    }

    async fn patch_secret(&self, ns: &str, name: &str, body: &Value) -> Response<kube::client::Body> {
        let mut state = self.state.lock().await;
        state.next_rv += 1;
        let rv = state.next_rv;
        let Some(secret) = state.secrets.get_mut(&(ns.to_owned(), name.to_owned())) else {
            return status_response(404, "NotFound", &format!("secrets {name:?} not found"));
        };
        if let Some(wanted) = body["metadata"]["resourceVersion"].as_str()
            && wanted != secret.rv.to_string()
        {
            return status_response(409, "Conflict", "the object has been modified");
        }
        for (k, v) in body["metadata"]["annotations"].as_object().cloned().unwrap_or_default() {
            match v.as_str() {
                Some(v) => secret.annotations.insert(k, v.to_owned()),
                None => secret.annotations.remove(&k),
            };
        }
        for (k, v) in body["data"].as_object().cloned().unwrap_or_default() {
            let decoded = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
            secret.data.insert(k, String::from_utf8(decoded).unwrap());
        }
        secret.rv = rv;
        let answer = Self::partial(ns, name, secret);
        drop(state);
        self.changed.notify_waiters();
        json_response(200, answer)
    }

    async fn token_request(&self, ns: &str, sa: &str, body: &Value) -> Response<kube::client::Body> {
        let mut state = self.state.lock().await;
        let now = self.clock.elapsed();
        let id = format!("{ns}/{sa}");
        if state.forbidden.contains(&id) {
            state.refused.push((now, format!("403 {id}")));
            return status_response(
                403,
                "Forbidden",
                &format!(
                    "serviceaccounts \"{sa}\" is forbidden: User cannot create resource \"serviceaccounts/token\""
                ),
            );
        }
        if !state.service_accounts.contains_key(&(ns.to_owned(), sa.to_owned())) {
            state.refused.push((now, format!("404 {id}")));
            return status_response(404, "NotFound", &format!("serviceaccounts \"{sa}\" not found"));
        }
        let seconds = body["spec"]["expirationSeconds"].as_u64().unwrap_or(3600);
        if seconds < 600 {
            state.refused.push((now, format!("422 {id}")));
            return status_response(
                422,
                "Invalid",
                "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
            );
        }
        let bound = &body["spec"]["boundObjectRef"];
        let secret =
            state.secrets.get(&(ns.to_owned(), bound["name"].as_str().unwrap_or_default().to_owned()));
        if bound["kind"] != "Secret" || secret.is_none_or(|s| bound["uid"] != s.uid.as_str()) {
            state.refused.push((now, format!("422 {id}")));
            return status_response(422, "Invalid", "the bound object reference does not match a Secret");
        }
        let granted = state.max_expiration.map_or(seconds, |cap| seconds.min(cap));
        state.next_token += 1;
        let token = format!("bound-{sa}-{}", state.next_token);
        let expires = now + granted;
        state.issued.push(Issued {
            at: now,
            namespace: ns.into(),
            service_account: sa.into(),
            body: body.clone(),
            token: token.clone(),
            expires,
        });
        let expires_at =
            Timestamp::from_second(kmsgate::tokens::Clock::now(&*self.clock).as_second() + granted as i64)
                .unwrap();
        json_response(
            201,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": body["spec"],
                   "status": {"token": token, "expirationTimestamp": expires_at.to_string()}}),
        )
    }
}
