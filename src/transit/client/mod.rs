//! An HTTP client for Vault/OpenBao: several addresses with health-checked failover, backoff with
//! jitter inside the caller's deadline, a cap on concurrent calls, token lifecycle (renewal,
//! re-login, file reloads) and TLS files reloaded on change, all behind swappable handles.
//!
//! This file holds the client and its public calls; `route` sends one request with failover and
//! `token` keeps a valid token.

mod route;
mod token;

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use reqwest::{Method, header::HeaderValue};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use super::{auth, error::ClientError, tls};
use crate::config::{VaultAuth, VaultClientConfig};
use crate::metrics::VaultMetrics;

/// Background renewals and logins get this long.
const MAINTENANCE_DEADLINE: Duration = Duration::from_secs(10);

/// A Vault client. Token, TLS setup and the preferred address change at run time.
pub struct VaultClient {
    settings: VaultClientConfig,
    /// `{address}/v1/` of each address, parsed once: a call only appends its path.
    bases: Vec<reqwest::Url>,
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

impl VaultClient {
    /// Builds a client. A token file is read now; login methods log in on first use, so the
    /// plugin can start while Vault is down.
    pub fn new(settings: &VaultClientConfig, metrics: VaultMetrics) -> Result<Arc<Self>, ClientError> {
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
        let bases = settings
            .addresses
            .iter()
            .map(|a| {
                reqwest::Url::parse(&format!("{a}/v1/"))
                    .ok()
                    .filter(|u| !u.cannot_be_a_base())
                    .ok_or_else(|| ClientError::Setup(format!("Vault address {a:?} is not a URL")))
            })
            .collect::<Result<_, _>>()?;
        let client = Self {
            bases,
            namespace,
            http: ArcSwap::from_pointee(tls::http_client(&settings.tls, &settings.addresses)?),
            token: ArcSwap::from_pointee(None),
            generation: AtomicU64::new(0),
            login: tokio::sync::Mutex::new(()),
            current: AtomicUsize::new(0),
            healthy: settings.addresses.iter().map(|_| AtomicBool::new(true)).collect(),
            limiter: Arc::new(Semaphore::new(settings.max_concurrent_calls.max(1))),
            watched: Mutex::new((tls::fingerprint(&settings.tls), auth::fingerprint(&settings.auth))),
            metrics,
            settings,
        };
        if let VaultAuth::Token { file } = &client.settings.auth {
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

    async fn check_files(&self) {
        let tls = tls::fingerprint(&self.settings.tls);
        let auth = auth::fingerprint(&self.settings.auth);
        let (tls_changed, auth_changed) = {
            let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
            let changed = (watched.0 != tls, watched.1 != auth);
            *watched = (tls, auth);
            changed
        };
        if tls_changed {
            match tls::http_client(&self.settings.tls, &self.settings.addresses) {
                Ok(http) => {
                    self.http.store(Arc::new(http));
                    tracing::info!("TLS files changed; Vault client rebuilt");
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS files changed but cannot be used; keeping the previous client")
                }
            }
        }
        if tls_changed && matches!(self.settings.auth, VaultAuth::Cert { .. }) || auth_changed {
            tracing::info!(method = self.settings.auth.name(), "credentials changed; getting a new token");
            let seen = (**self.token.load()).as_ref().map(|t| t.generation);
            let _ = self.reauthenticate(seen, Instant::now() + MAINTENANCE_DEADLINE).await;
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
