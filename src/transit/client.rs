//! An HTTP client for Vault/OpenBao: several addresses with health-checked failover, backoff with
//! jitter inside the caller's deadline, a cap on concurrent calls, token lifecycle (renewal,
//! re-login, file reloads) and TLS files reloaded on change, all behind swappable handles.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use reqwest::{Method, StatusCode, header::HeaderValue};
use serde::Deserialize;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use zeroize::Zeroizing;

use super::{auth::AuthMethod, settings::VaultSettings};
use crate::metrics::{AddressLabels, OutcomeLabels, VaultMetrics};

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A single attempt may use at most this share of the remaining time while other addresses
/// remain, so a hanging node cannot eat the whole deadline.
const ATTEMPT_SHARE: u32 = 2;
/// A failed address's sys/health check gets this long.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Background renewals and logins get this long.
const MAINTENANCE_DEADLINE: Duration = Duration::from_secs(10);

/// Setting up or calling Vault failed. No variant carries a token or credential.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Vault answered with an error status.
    #[error("{address} answered HTTP {status}: {message}")]
    Api { address: String, status: u16, message: String },
    /// A credential file (token, role_id, secret_id, JWT) could not be used.
    #[error("credential file {path}: {problem}")]
    CredentialFile { path: std::path::PathBuf, problem: String },
    /// The caller's deadline passed.
    #[error("Vault did not answer before the deadline")]
    Deadline,
    /// Vault's answer is not the JSON expected.
    #[error("{address} answered with a body that does not parse: {problem}")]
    Decode { address: String, problem: String },
    /// A login answered without a token.
    #[error("login with {method} returned no token")]
    NoToken { method: &'static str },
    /// The HTTP client could not be built.
    #[error("HTTP client setup failed: {0}")]
    Setup(String),
    /// A TLS file (CA bundle, client certificate or key) could not be used.
    #[error("TLS file {path}: {problem}")]
    TlsFile { path: std::path::PathBuf, problem: String },
    /// The address could not be reached, or did not answer in its share of the deadline.
    #[error("{address} is unreachable: {problem}")]
    Transport { address: String, problem: String },
}

impl ClientError {
    /// Whether another address, or a later attempt, may succeed: transport errors, 5xx,
    /// sealed or standby answers (429, 472, 473), redirects not followed, and 412.
    fn retryable(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Api { status, .. } => *status >= 500 || matches!(status, 300..=399 | 412 | 429 | 472 | 473),
            _ => false,
        }
    }
}

/// A Vault client. Token, TLS setup and the preferred address change at run time.
pub struct VaultClient {
    settings: VaultSettings,
    namespace: Option<HeaderValue>,
    http: ArcSwap<reqwest::Client>,
    token: ArcSwap<Option<Token>>,
    generation: AtomicU64,
    login: tokio::sync::Mutex<()>,
    current: AtomicUsize,
    healthy: Vec<AtomicBool>,
    limiter: Arc<Semaphore>,
    watched: Mutex<([u8; 32], [u8; 32])>,
    metrics: VaultMetrics,
}

/// A token and what is known of its lifetime.
#[derive(Clone)]
struct Token {
    header: HeaderValue,
    generation: u64,
    renewable: bool,
    /// TTL granted at login (or first lookup); renewals shorter than a share of it mean the
    /// token is near its max TTL.
    initial_ttl: Option<Duration>,
    renew_at: Option<Instant>,
    expires_at: Option<Instant>,
}

impl fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // NB: the token never reaches Debug output.
        f.debug_struct("VaultClient")
            .field("addresses", &self.settings.addresses)
            .field("auth", &self.settings.auth.name())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

#[derive(Deserialize)]
struct Envelope {
    data: Option<serde_json::Value>,
    auth: Option<AuthInfo>,
}

#[derive(Deserialize)]
struct AuthInfo {
    client_token: Zeroizing<String>,
    #[serde(default)]
    lease_duration: u64,
    #[serde(default)]
    renewable: bool,
}

impl VaultClient {
    /// Builds a client. A token file is read now; login methods log in on first use, so the
    /// plugin can start while Vault is down.
    pub fn new(settings: &VaultSettings, metrics: VaultMetrics) -> Result<Arc<Self>, ClientError> {
        if settings.addresses.is_empty() {
            return Err(ClientError::Setup("no Vault address configured".into()));
        }
        let namespace = match settings.namespace.as_str() {
            "" => None,
            ns => Some(
                HeaderValue::from_str(ns)
                    .map_err(|_| ClientError::Setup("namespace is not a valid header".into()))?,
            ),
        };
        let mut settings = settings.clone();
        settings.addresses = settings.addresses.iter().map(|a| a.trim_end_matches('/').to_owned()).collect();
        let client = Self {
            namespace,
            http: ArcSwap::from_pointee(settings.tls.http_client(&settings.addresses)?),
            token: ArcSwap::from_pointee(None),
            generation: AtomicU64::new(0),
            login: tokio::sync::Mutex::new(()),
            current: AtomicUsize::new(0),
            healthy: settings.addresses.iter().map(|_| AtomicBool::new(true)).collect(),
            limiter: Arc::new(Semaphore::new(settings.max_concurrent_calls.max(1))),
            watched: Mutex::new((settings.tls.fingerprint(), settings.auth.fingerprint())),
            metrics,
            settings,
        };
        if let AuthMethod::Token { file } = &client.settings.auth {
            client.install_token_file(file)?;
        }
        client.publish_address();
        Ok(Arc::new(client))
    }

    /// Calls `path` (below `/v1/`) and returns the response's `data` (`Null` for 204).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<serde_json::Value, ClientError> {
        let permit = self.permit(deadline).await?;
        self.call_permitted(&permit, method, path, body, deadline).await
    }

    /// The client's metrics.
    pub fn metrics(&self) -> &VaultMetrics {
        &self.metrics
    }

    /// Waits, within the deadline, for one of the `vault.max_concurrent_calls` slots.
    pub async fn permit(&self, deadline: Instant) -> Result<OwnedSemaphorePermit, ClientError> {
        /// Counts a waiting call, also when its caller is cancelled mid-wait.
        struct Waiting<'a>(&'a prometheus_client::metrics::gauge::Gauge);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.metrics.calls_waiting.inc();
        let _waiting = Waiting(&self.metrics.calls_waiting);
        let permit = tokio::time::timeout_at(deadline, self.limiter.clone().acquire_owned()).await;
        match permit {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ClientError::Deadline),
        }
    }

    /// [`Self::call`] for a caller that already holds a slot (a batch flusher).
    pub async fn call_permitted(
        &self,
        _permit: &OwnedSemaphorePermit,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<serde_json::Value, ClientError> {
        let token = self.token(deadline).await?;
        let result = self.route(method.clone(), path, body, Some(&token.0), deadline).await;
        match result {
            Err(ClientError::Api { status: 403, .. }) => {
                // NB: any 403 may mean the token was revoked or expired: get a new one, retry once.
                tracing::info!(path, "Vault answered 403; getting a new token and retrying once");
                self.reauthenticate(Some(token.1), deadline).await?;
                let token = self.token(deadline).await?;
                self.route(method, path, body, Some(&token.0), deadline)
                    .await
                    .map(|e| e.data.unwrap_or_default())
            }
            other => other.map(|e| e.data.unwrap_or_default()),
        }
    }

    /// Runs renewals, re-logins, file reloads and address health checks until the task is dropped.
    pub async fn maintain(self: Arc<Self>) {
        loop {
            self.check_files().await;
            self.check_token().await;
            self.check_addresses().await;
            self.publish_ttl();
            let next_renewal = (**self.token.load()).as_ref().and_then(|t| t.renew_at);
            let wake = match next_renewal {
                Some(at) => at.min(Instant::now() + self.settings.check_interval),
                None => Instant::now() + self.settings.check_interval,
            };
            tokio::time::sleep_until(wake.max(Instant::now() + Duration::from_millis(10))).await;
        }
    }

    /// The current token and its generation, logging in first if there is none.
    async fn token(&self, deadline: Instant) -> Result<(HeaderValue, u64), ClientError> {
        if let Some(token) = &**self.token.load() {
            return Ok((token.header.clone(), token.generation));
        }
        self.reauthenticate(None, deadline).await?;
        match &**self.token.load() {
            Some(token) => Ok((token.header.clone(), token.generation)),
            None => Err(ClientError::NoToken { method: self.settings.auth.name() }),
        }
    }

    /// Gets a new token, unless another task replaced the token the caller saw (`seen`, or `None`
    /// when it saw none) while this one waited: one login serves every waiting caller.
    async fn reauthenticate(&self, seen: Option<u64>, deadline: Instant) -> Result<(), ClientError> {
        let _single_flight =
            tokio::time::timeout_at(deadline, self.login.lock()).await.map_err(|_| ClientError::Deadline)?;
        let current = (**self.token.load()).as_ref().map(|t| t.generation);
        if current != seen {
            return Ok(());
        }
        let result = match &self.settings.auth {
            AuthMethod::Token { file } => self.install_token_file(file),
            _ => self.login(deadline).await,
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.logins.get_or_create(&OutcomeLabels { outcome }).inc();
        if let Err(e) = &result {
            tracing::warn!(method = self.settings.auth.name(), error = %e, "Vault authentication failed");
        }
        result
    }

    async fn login(&self, deadline: Instant) -> Result<(), ClientError> {
        let Some((path, body)) = self.settings.auth.login_request()? else { return Ok(()) };
        let envelope = self.route(Method::POST, &path, Some(&body), None, deadline).await?;
        let auth = envelope.auth.ok_or(ClientError::NoToken { method: self.settings.auth.name() })?;
        self.install(&auth, true)?;
        tracing::info!(
            method = self.settings.auth.name(),
            ttl_seconds = auth.lease_duration,
            "logged in to Vault"
        );
        Ok(())
    }

    fn install_token_file(&self, file: &std::path::Path) -> Result<(), ClientError> {
        let token = super::auth::read_secret(file)?;
        let header = sensitive(&token).ok_or_else(|| ClientError::CredentialFile {
            path: file.to_owned(),
            problem: "it holds characters a token cannot have".into(),
        })?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        // NB: a token from a file has an unknown TTL until the first lookup (check_token).
        self.token.store(Arc::new(Some(Token {
            header,
            generation,
            renewable: false,
            initial_ttl: None,
            renew_at: Some(Instant::now()),
            expires_at: None,
        })));
        Ok(())
    }

    /// Installs a token from a login or renewal answer.
    fn install(&self, auth: &AuthInfo, fresh: bool) -> Result<(), ClientError> {
        let header = sensitive(&auth.client_token)
            .ok_or(ClientError::NoToken { method: self.settings.auth.name() })?;
        let now = Instant::now();
        let ttl = (auth.lease_duration > 0).then(|| Duration::from_secs(auth.lease_duration));
        let previous = self.token.load();
        let initial_ttl = if fresh { ttl } else { (**previous).as_ref().and_then(|t| t.initial_ttl).or(ttl) };
        let generation = match (&**previous, fresh) {
            (Some(p), false) => p.generation,
            _ => self.generation.fetch_add(1, Ordering::Relaxed) + 1,
        };
        self.token.store(Arc::new(Some(Token {
            header,
            generation,
            renewable: auth.renewable,
            initial_ttl,
            renew_at: ttl.map(|t| now + t.mul_f64(self.settings.renew_fraction)),
            expires_at: ttl.map(|t| now + t),
        })));
        Ok(())
    }

    async fn check_token(&self) {
        let due =
            (**self.token.load()).as_ref().and_then(|t| t.renew_at).is_some_and(|at| Instant::now() >= at);
        if !due {
            return;
        }
        let deadline = Instant::now() + MAINTENANCE_DEADLINE;
        let Some((header, generation, renewable, initial_ttl)) = (**self.token.load())
            .as_ref()
            .map(|t| (t.header.clone(), t.generation, t.renewable, t.initial_ttl))
        else {
            return;
        };
        let is_file = matches!(self.settings.auth, AuthMethod::Token { .. });
        if is_file && initial_ttl.is_none() {
            return self.lookup_file_token(&header, deadline).await;
        }
        if renewable {
            match self.renew(&header, deadline).await {
                Ok(ttl) => {
                    self.metrics.renewals.get_or_create(&OutcomeLabels { outcome: "ok" }).inc();
                    // A renewal capped well below the original TTL means max TTL is near.
                    let floor = initial_ttl.map(|t| t.mul_f64(1.0 - self.settings.renew_fraction));
                    let near_max = matches!((ttl, floor), (Some(ttl), Some(floor)) if ttl < floor);
                    if !near_max || is_file {
                        return;
                    }
                    tracing::info!("Vault token is near its max TTL; logging in again");
                }
                Err(e) => {
                    self.metrics.renewals.get_or_create(&OutcomeLabels { outcome: "error" }).inc();
                    tracing::warn!(error = %e, "Vault token renewal failed; getting a new token");
                }
            }
        }
        let relogin = self.reauthenticate(Some(generation), deadline).await;
        // NB: a file token that cannot be renewed is re-read each check (only its file changes
        // it), and a failed login must not be retried in a tight loop while Vault is down.
        if is_file || relogin.is_err() {
            self.postpone_renewal();
        }
    }

    async fn renew(&self, header: &HeaderValue, deadline: Instant) -> Result<Option<Duration>, ClientError> {
        let envelope =
            self.route(Method::POST, "auth/token/renew-self", Some(b"{}"), Some(header), deadline).await?;
        let auth = envelope.auth.ok_or(ClientError::NoToken { method: "renew-self" })?;
        self.install(&auth, false)?;
        Ok((auth.lease_duration > 0).then(|| Duration::from_secs(auth.lease_duration)))
    }

    async fn lookup_file_token(&self, header: &HeaderValue, deadline: Instant) {
        #[derive(Deserialize)]
        struct Lookup {
            #[serde(default)]
            ttl: u64,
            #[serde(default)]
            renewable: bool,
        }
        let looked = self.route(Method::GET, "auth/token/lookup-self", None, Some(header), deadline).await;
        let Ok(Some(Ok(lookup))) = looked.map(|e| e.data.map(serde_json::from_value::<Lookup>)) else {
            self.postpone_renewal();
            return;
        };
        let now = Instant::now();
        let ttl = (lookup.ttl > 0).then(|| Duration::from_secs(lookup.ttl));
        self.update_token(|token| Token {
            renewable: lookup.renewable,
            // NB: a token without a TTL never expires; MAX marks "looked up, nothing to renew".
            initial_ttl: ttl.or(Some(Duration::MAX)),
            renew_at: ttl.map(|t| now + t.mul_f64(self.settings.renew_fraction)),
            expires_at: ttl.map(|t| now + t),
            ..token
        });
    }

    fn postpone_renewal(&self) {
        let renew_at = Some(Instant::now() + self.settings.check_interval);
        self.update_token(|token| Token { renew_at, ..token });
    }

    /// Replaces the current token's lifetime facts; does nothing when there is no token.
    fn update_token(&self, change: impl FnOnce(Token) -> Token) {
        let current = self.token.load();
        let Some(token) = &**current else { return };
        self.token.store(Arc::new(Some(change(token.clone()))));
    }

    async fn check_files(&self) {
        let tls = self.settings.tls.fingerprint();
        let auth = self.settings.auth.fingerprint();
        let (tls_changed, auth_changed) = {
            let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
            let changed = (watched.0 != tls, watched.1 != auth);
            *watched = (tls, auth);
            changed
        };
        if tls_changed {
            match self.settings.tls.http_client(&self.settings.addresses) {
                Ok(http) => {
                    self.http.store(Arc::new(http));
                    tracing::info!("TLS files changed; Vault client rebuilt");
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS files changed but cannot be used; keeping the previous client")
                }
            }
        }
        if tls_changed && matches!(self.settings.auth, AuthMethod::Cert { .. }) || auth_changed {
            tracing::info!(method = self.settings.auth.name(), "credentials changed; getting a new token");
            let seen = (**self.token.load()).as_ref().map(|t| t.generation);
            let _ = self.reauthenticate(seen, Instant::now() + MAINTENANCE_DEADLINE).await;
        }
    }

    /// Asks sys/health of every address marked failed; an unsealed node is healthy again.
    async fn check_addresses(&self) {
        for (index, address) in self.settings.addresses.iter().enumerate() {
            if self.healthy[index].load(Ordering::Relaxed) {
                continue;
            }
            let http = self.http.load_full();
            let probe =
                http.get(format!("{address}/v1/sys/health")).timeout(HEALTH_CHECK_TIMEOUT).send().await;
            // NB: unsealed standbys (429, 473) forward requests, so they are usable again too.
            if probe.is_ok_and(|r| matches!(r.status().as_u16(), 200 | 429 | 473)) {
                tracing::info!(address, "Vault address is healthy again");
                self.healthy[index].store(true, Ordering::Relaxed);
            }
        }
    }

    /// Sends one request, failing over across addresses with backoff until the deadline.
    async fn route(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&HeaderValue>,
        deadline: Instant,
    ) -> Result<Envelope, ClientError> {
        let n = self.settings.addresses.len();
        let mut backoff = BACKOFF_START;
        loop {
            let start = self.current.load(Ordering::Relaxed) % n;
            let ring = (0..n).map(|i| (start + i) % n);
            let order: Vec<usize> = ring
                .clone()
                .filter(|&i| self.healthy[i].load(Ordering::Relaxed))
                .chain(ring.filter(|&i| !self.healthy[i].load(Ordering::Relaxed)))
                .collect();
            let mut last = None;
            for (tried, &index) in order.iter().enumerate() {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(last.unwrap_or(ClientError::Deadline));
                }
                let others_left = tried + 1 < order.len();
                let budget = if others_left { remaining / ATTEMPT_SHARE } else { remaining };
                let address = &self.settings.addresses[index];
                let attempt = self.send(address, method.clone(), path, body, token);
                let result = match tokio::time::timeout(budget, attempt).await {
                    Ok(result) => result,
                    Err(_) if others_left => Err(ClientError::Transport {
                        address: address.clone(),
                        problem: "no answer in time".into(),
                    }),
                    Err(_) => return Err(ClientError::Deadline),
                };
                match result {
                    Ok(envelope) => {
                        // NB: concurrent calls may all fail over at once; only the one that moves
                        // `current` counts the failover.
                        let moved =
                            self.current.compare_exchange(start, index, Ordering::Relaxed, Ordering::Relaxed);
                        if index != start && moved.is_ok() {
                            self.metrics.failovers.inc();
                            self.publish_address();
                            tracing::info!(address, "now using this Vault address");
                        }
                        return Ok(envelope);
                    }
                    Err(e) if e.retryable() => {
                        tracing::warn!(address, error = %e, "Vault address failed");
                        self.healthy[index].store(false, Ordering::Relaxed);
                        self.metrics
                            .address_errors
                            .get_or_create(&AddressLabels { address: address.clone() })
                            .inc();
                        last = Some(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            let jitter = 0.5 + f64::from(random_u8()) / 255.0;
            let pause = backoff.mul_f64(jitter);
            if Instant::now() + pause >= deadline {
                return Err(last.unwrap_or(ClientError::Deadline));
            }
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn send(
        &self,
        address: &str,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&HeaderValue>,
    ) -> Result<Envelope, ClientError> {
        let http = self.http.load_full();
        let mut request = http.request(method, format!("{address}/v1/{path}"));
        if let Some(token) = token {
            request = request.header("X-Vault-Token", token.clone());
        }
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns.clone());
        }
        if let Some(body) = body {
            request = request.header("Content-Type", "application/json").body(body.to_vec());
        }
        let transport = |e: reqwest::Error| ClientError::Transport {
            address: address.to_owned(),
            problem: crate::error::chain(&e.without_url()),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let bytes = Zeroizing::new(response.bytes().await.map_err(transport)?.to_vec());
        if status == StatusCode::NO_CONTENT {
            return Ok(Envelope { data: None, auth: None });
        }
        if status == StatusCode::BAD_REQUEST {
            // NB: a batch with some failed items answers 400 with per-item results; those are
            // answers for the caller to read item by item, not a failed call.
            if let Ok(envelope) = serde_json::from_slice::<Envelope>(&bytes)
                && envelope.data.as_ref().is_some_and(|d| d.get("batch_results").is_some())
            {
                return Ok(envelope);
            }
        }
        if !status.is_success() {
            let errors = serde_json::from_slice::<ErrorBody>(&bytes).map(|b| b.errors).unwrap_or_default();
            let mut message = errors.join("; ");
            if message.is_empty() {
                message = status.canonical_reason().unwrap_or("error").to_owned();
            }
            message.truncate(300);
            return Err(ClientError::Api { address: address.to_owned(), status: status.as_u16(), message });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Decode { address: address.to_owned(), problem: e.to_string() })
    }

    fn publish_address(&self) {
        let current = self.current.load(Ordering::Relaxed) % self.settings.addresses.len();
        for (index, address) in self.settings.addresses.iter().enumerate() {
            let value = i64::from(index == current);
            self.metrics
                .current_address
                .get_or_create(&AddressLabels { address: address.clone() })
                .set(value);
        }
    }

    fn publish_ttl(&self) {
        let ttl = (**self.token.load())
            .as_ref()
            .and_then(|t| t.expires_at)
            .map(|at| at.saturating_duration_since(Instant::now()));
        self.metrics.token_ttl_seconds.set(ttl.map_or(-1.0, |t| t.as_secs_f64()));
    }
}

fn sensitive(token: &str) -> Option<HeaderValue> {
    let mut header = HeaderValue::from_str(token).ok()?;
    header.set_sensitive(true);
    Some(header)
}

fn random_u8() -> u8 {
    let mut byte = [0u8; 1];
    // NB: jitter only spreads retries; a failed random source just means no spread.
    let _ = getrandom::fill(&mut byte);
    byte[0]
}
