//! ServiceAccounts, the TokenRequest API and the legacy token controller, with a clock that
//! moves with tokio's so paused-time tests move both together.

use std::time::Duration;

use http::Response;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::{FakeApi, Secret, Server, json_response, not_found, status_response};

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

/// One TokenRequest the fake answered with a token.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Seconds since the clock started.
    pub at: u64,
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub service_account: String,
    /// The TokenRequest as sent.
    pub body: Value,
    /// The token given.
    pub token: String,
    /// Seconds since the clock started.
    pub expires: u64,
}

impl FakeApi {
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

    /// Adds a Secret created `age` ago; returns its uid.
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
        let secret = Secret {
            annotations: map(annotations),
            data: map(data),
            ..Secret::unstored(namespace, name, type_, created)
        };
        self.server.create(secret).await.uid
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
        let mut secret = state.secrets[&(namespace.to_owned(), name.to_owned())].clone();
        secret.labels.insert(key.into(), value.into());
        self.server.write(&mut state, secret).await;
    }

    /// Edits a Secret's annotations (`None` removes), as a user would.
    pub async fn annotate(&self, namespace: &str, name: &str, changes: &[(&str, Option<&str>)]) {
        let mut state = self.state.lock().await;
        let mut secret = state.secrets[&(namespace.to_owned(), name.to_owned())].clone();
        for (k, v) in changes {
            match v {
                Some(v) => secret.annotations.insert(k.to_string(), v.to_string()),
                None => secret.annotations.remove(*k),
            };
        }
        self.server.write(&mut state, secret).await;
    }
}

impl Server {
    /// The TokenRequest API (pkg/registry/core/serviceaccount/storage/token.go, `TokenREST.Create`):
    /// the ServiceAccount must exist (404), the lifetime is at least 10 minutes (422, pkg/apis/
    /// authentication/validation/validation.go, `ValidateTokenRequest`), a bound Secret must exist
    /// (404) with the uid given (409), and the lifetime granted is capped by
    /// `--service-account-max-token-expiration`. A ServiceAccount in `forbidden` models a
    /// RoleBinding that does not name it (403 from the authorizer).
    pub(super) async fn token_request(
        &self,
        ns: &str,
        sa: &str,
        body: &Value,
    ) -> Response<kube::client::Body> {
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
            return not_found("serviceaccounts", sa);
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
        let bound_name = bound["name"].as_str().unwrap_or_default();
        if bound["kind"] != "Secret" {
            state.refused.push((now, format!("400 {id}")));
            return status_response(
                400,
                "BadRequest",
                &format!("cannot bind token to object of type {}", bound["kind"]),
            );
        }
        let Some(secret) = state.secrets.get(&(ns.to_owned(), bound_name.to_owned())) else {
            state.refused.push((now, format!("404 {id}")));
            return not_found("secrets", bound_name);
        };
        if let Some(uid) = bound["uid"].as_str().filter(|u| !u.is_empty())
            && uid != secret.uid
        {
            let message = format!(
                "Operation cannot be fulfilled on Secret \"{bound_name}\": the UID in the bound object \
                 reference ({uid}) does not match the UID in record ({}). The object might have been \
                 deleted and then recreated",
                secret.uid
            );
            state.refused.push((now, format!("409 {id}")));
            return status_response(409, "Conflict", &message);
        }
        let granted = state.max_expiration.map_or(seconds, |cap| seconds.min(cap));
        state.next_token += 1;
        let token = format!("bound-{sa}-{}", state.next_token);
        state.issued.push(Issued {
            at: now,
            namespace: ns.into(),
            service_account: sa.into(),
            body: body.clone(),
            token: token.clone(),
            expires: now + granted,
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

    /// Runs the token controller for a new legacy token Secret after the fill delay.
    pub(super) async fn spawn_token_controller(&self, ns: &str, name: &str) {
        let delay = self.state.lock().await.fill_delay;
        let server = self.clone();
        let (ns, name) = (ns.to_owned(), name.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            server.token_controller(&ns, &name).await;
        });
    }

    /// kube-controller-manager's token controller for one legacy token Secret
    /// (pkg/controller/serviceaccount/tokens_controller.go, `TokensController.syncSecret`): the
    /// Secret is deleted when its ServiceAccount is missing, else `generateTokenIfNeeded` fills
    /// `token`, `ca.crt`, `namespace` and the ServiceAccount uid annotation.
    async fn token_controller(&self, ns: &str, name: &str) {
        let mut state = self.state.lock().await;
        let id = (ns.to_owned(), name.to_owned());
        let Some(mut secret) = state.secrets.get(&id).cloned() else { return };
        let sa = secret.annotations.get(kmsgate::tokens::SA_NAME_ANNOTATION).cloned().unwrap_or_default();
        let Some(sa_uid) = state.service_accounts.get(&(ns.to_owned(), sa)).cloned() else {
            state.secrets.remove(&id);
            drop(state);
            self.changed.notify_waiters();
            return;
        };
        state.next_token += 1;
        let n = state.next_token;
        secret.data.insert("token".into(), format!("legacy-{name}-{n}"));
        secret.data.insert("ca.crt".into(), "CA".into());
        secret.data.insert("namespace".into(), ns.into());
        secret.annotations.insert(kmsgate::tokens::SA_UID_ANNOTATION.into(), sa_uid);
        self.write(&mut state, secret).await;
    }
}
