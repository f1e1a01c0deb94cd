//! Sending one request: the failover loop over the addresses (healthy first, each attempt held to
//! a share of the deadline, backoff with jitter between rounds), the request itself and the
//! reading of Vault's answer, and the health checks that bring failed addresses back.

use std::{sync::atomic::Ordering, time::Duration};

use reqwest::{Method, StatusCode, header::HeaderValue};
use serde::Deserialize;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::VaultClient;
use crate::metrics::AddressLabels;
use crate::telemetry::{REPEAT_WINDOW, Repeats, Say};
use crate::transit::error::ClientError;

/// Failed attempts, per error text: said once, then counted once per window.
static ADDRESS_WARNINGS: Repeats = Repeats::new(REPEAT_WINDOW);

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A single attempt may use at most this share of the remaining time while other addresses
/// remain, so a hanging node cannot eat the whole deadline.
const ATTEMPT_SHARE: u32 = 2;
/// A failed address's sys/health check gets this long.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

#[derive(Deserialize)]
pub(super) struct Envelope {
    pub(super) data: Option<serde_json::Value>,
    pub(super) auth: Option<AuthInfo>,
}

#[derive(Deserialize)]
pub(super) struct AuthInfo {
    pub(super) client_token: Zeroizing<String>,
    #[serde(default)]
    pub(super) lease_duration: u64,
    #[serde(default)]
    pub(super) renewable: bool,
}

impl VaultClient {
    /// Asks sys/health of every address marked failed; an unsealed node is healthy again.
    pub(super) async fn check_addresses(&self) {
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
                ADDRESS_WARNINGS.clear();
                self.healthy[index].store(true, Ordering::Relaxed);
            }
        }
    }

    /// Sends one request, failing over across addresses with backoff until the deadline.
    pub(super) async fn route(
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
                let attempt = self.send(index, method.clone(), path, body, token);
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
                        // NB: every call retries, so an outage repeats this many times a second.
                        let error = e.to_string();
                        let say = ADDRESS_WARNINGS.check(Instant::now(), &error);
                        if say != Say::Nothing {
                            tracing::warn!(address, error, "Vault address failed{}", say.suffix());
                        }
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

    pub(super) async fn send(
        &self,
        index: usize,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&HeaderValue>,
    ) -> Result<Envelope, ClientError> {
        let address = self.settings.addresses[index].as_str();
        let http = self.http.load_full();
        let mut request = http.request(method, self.url(index, path));
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
        // NB: a too-large body is a broken node: Transport, so the call fails over to another.
        let bytes = crate::http::read_capped(response, body_limit(path)).await.map_err(|e| match e {
            crate::http::BodyError::Read(e) => transport(e),
            e @ crate::http::BodyError::TooLarge { .. } => {
                ClientError::Transport { address: address.to_owned(), problem: e.to_string() }
            }
        })?;
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
            let message = crate::error::clipped(message, 300);
            return Err(ClientError::Api { address: address.to_owned(), status: status.as_u16(), message });
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Decode { address: address.to_owned(), problem: e.to_string() })
    }

    /// `{address}/v1/{path}`. The base was parsed once; only the path is parsed here (reqwest
    /// parsed the whole URL, host and IDNA included, on every call).
    fn url(&self, index: usize, path: &str) -> reqwest::Url {
        let mut url = self.bases[index].clone();
        let full = format!("{}{path}", url.path());
        url.set_path(&full);
        url
    }

    pub(super) fn publish_address(&self) {
        let current = self.current.load(Ordering::Relaxed) % self.settings.addresses.len();
        for (index, address) in self.settings.addresses.iter().enumerate() {
            let value = i64::from(index == current);
            self.metrics
                .current_address
                .get_or_create(&AddressLabels { address: address.clone() })
                .set(value);
        }
    }
}

/// The largest answer a call below `/v1/` may have. A decrypt answers at most `MAX_BATCH` (64)
/// items of at most about 1 KiB of base64 plaintext each (about 100 KiB); a key's metadata grows
/// by about 100 bytes per version; logins and token calls are small.
fn body_limit(path: &str) -> usize {
    const KIB: usize = 1024;
    if path.starts_with("auth/") || path.starts_with("sys/") {
        64 * KIB
    } else if ["/encrypt/", "/decrypt/", "/rewrap/"].iter().any(|op| path.contains(op)) {
        512 * KIB
    } else {
        // Key metadata (`{mount}/keys/{name}`) and anything else: room for ~10 000 versions.
        MAX_OTHER_BODY
    }
}

/// The cap of a Vault answer other than a login, token, encrypt or decrypt call.
const MAX_OTHER_BODY: usize = 1024 * 1024;

fn random_u8() -> u8 {
    let mut byte = [0u8; 1];
    // NB: jitter only spreads retries; a failed random source just means no spread.
    let _ = getrandom::fill(&mut byte);
    byte[0]
}
