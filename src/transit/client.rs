//! An HTTP client for Vault/OpenBao: a list of addresses, a token behind a swappable handle, and
//! every call bounded by the caller's deadline.

use std::{
    fmt,
    io::BufReader,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use arc_swap::ArcSwap;
use reqwest::{Method, StatusCode, header::HeaderValue};
use serde::Deserialize;
use tokio::time::Instant;
use zeroize::Zeroizing;

/// How to reach Vault.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// Base addresses, tried in order on failure (`https://vault-1:8200`).
    pub addresses: Vec<String>,
    /// Vault Enterprise namespace; empty for none.
    pub namespace: String,
    /// File holding the Vault token.
    pub token_file: PathBuf,
    /// PEM bundle of CAs to trust instead of the system roots.
    pub ca_cert: Option<PathBuf>,
}

/// Setting up or calling Vault failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Vault answered with an error status.
    #[error("{address} answered HTTP {status}: {message}")]
    Api { address: String, status: u16, message: String },
    /// The CA bundle could not be used.
    #[error("CA bundle {path}: {problem}")]
    CaBundle { path: PathBuf, problem: String },
    /// The caller's deadline passed.
    #[error("Vault did not answer before the deadline")]
    Deadline,
    /// Vault's answer is not the JSON expected.
    #[error("{address} answered with a body that does not parse: {problem}")]
    Decode { address: String, problem: String },
    /// The HTTP client could not be built.
    #[error("HTTP client setup failed: {0}")]
    Setup(String),
    /// The token file could not be read or is empty.
    #[error("token file {path}: {problem}")]
    TokenFile { path: PathBuf, problem: String },
    /// Every address failed to connect or was not serving.
    #[error("{address} is unreachable: {problem}")]
    Transport { address: String, problem: String },
}

impl ClientError {
    /// Whether another address (or a later retry) may succeed.
    fn retryable(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Api { status, .. } => *status == 429 || *status >= 500 || *status == 412,
            _ => false,
        }
    }
}

/// A Vault client. Its token and TLS setup can be replaced at run time without a restart.
pub struct VaultClient {
    addresses: Vec<String>,
    namespace: Option<HeaderValue>,
    current: AtomicUsize,
    handle: ArcSwap<Handle>,
}

struct Handle {
    http: reqwest::Client,
    token: HeaderValue,
}

impl fmt::Debug for VaultClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // NB: the token never reaches Debug output.
        f.debug_struct("VaultClient").field("addresses", &self.addresses).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<String>,
}

impl VaultClient {
    /// Builds a client; reads the token file and CA bundle once.
    pub fn new(settings: &VaultSettings) -> Result<Self, ClientError> {
        let namespace = match settings.namespace.as_str() {
            "" => None,
            ns => Some(
                HeaderValue::from_str(ns)
                    .map_err(|_| ClientError::Setup("namespace is not a valid header".into()))?,
            ),
        };
        let client = Self {
            addresses: settings.addresses.iter().map(|a| a.trim_end_matches('/').to_owned()).collect(),
            namespace,
            current: AtomicUsize::new(0),
            handle: ArcSwap::from_pointee(Handle {
                http: http_client(settings.ca_cert.as_deref())?,
                token: read_token(&settings.token_file)?,
            }),
        };
        Ok(client)
    }

    /// Re-reads the token file and swaps it in for every later call.
    pub fn reload_token(&self, token_file: &Path) -> Result<(), ClientError> {
        let token = read_token(token_file)?;
        let http = self.handle.load().http.clone();
        self.handle.store(Arc::new(Handle { http, token }));
        Ok(())
    }

    /// Calls `path` (below `/v1/`) and returns the response's `data`, or `Null` for 204.
    /// Moves to the next address on transport errors and 5xx while the deadline allows.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<serde_json::Value, ClientError> {
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for attempt in 0..self.addresses.len() {
            let index = (start + attempt) % self.addresses.len();
            let address = &self.addresses[index];
            let call = self.call_once(address, method.clone(), path, body);
            let result = match tokio::time::timeout_at(deadline, call).await {
                Ok(result) => result,
                Err(_) => return Err(ClientError::Deadline),
            };
            match result {
                Err(e) if e.retryable() => {
                    tracing::warn!(address = %address, error = %e, "Vault address failed; trying the next");
                    self.current.store((index + 1) % self.addresses.len(), Ordering::Relaxed);
                    last = Some(e);
                }
                other => return other,
            }
        }
        // NB: addresses is never empty (config validation), so the loop ran and set `last`.
        Err(last.unwrap_or(ClientError::Setup("no Vault address configured".into())))
    }

    async fn call_once(
        &self,
        address: &str,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<serde_json::Value, ClientError> {
        let handle = self.handle.load_full();
        let url = format!("{address}/v1/{path}");
        let mut request = handle.http.request(method, &url).header("X-Vault-Token", handle.token.clone());
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns.clone());
        }
        if let Some(body) = body {
            request = request.header("Content-Type", "application/json").body(body.to_vec());
        }
        let transport = |e: reqwest::Error| ClientError::Transport {
            address: address.to_owned(),
            problem: error_chain(&e.without_url()),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let bytes = Zeroizing::new(response.bytes().await.map_err(transport)?.to_vec());
        if status == StatusCode::NO_CONTENT {
            return Ok(serde_json::Value::Null);
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
        #[derive(Deserialize)]
        struct Envelope {
            data: Option<serde_json::Value>,
        }
        let envelope: Envelope = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Decode { address: address.to_owned(), problem: e.to_string() })?;
        Ok(envelope.data.unwrap_or(serde_json::Value::Null))
    }
}

fn read_token(path: &Path) -> Result<HeaderValue, ClientError> {
    let problem = |problem: String| ClientError::TokenFile { path: path.to_owned(), problem };
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?);
    let token = text.trim();
    if token.is_empty() {
        return Err(problem("it is empty".into()));
    }
    let mut value = HeaderValue::from_str(token)
        .map_err(|_| problem("it holds characters a token cannot have".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

fn http_client(ca_cert: Option<&Path>) -> Result<reqwest::Client, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_cert {
        Some(path) => {
            let problem = |problem: String| ClientError::CaBundle { path: path.to_owned(), problem };
            let file = std::fs::File::open(path).map_err(|e| problem(e.to_string()))?;
            let mut count = 0;
            for cert in rustls_pemfile::certs(&mut BufReader::new(file)) {
                let cert = cert.map_err(|e| problem(e.to_string()))?;
                roots.add(cert).map_err(|e| problem(e.to_string()))?;
                count += 1;
            }
            if count == 0 {
                return Err(problem("it holds no PEM certificates".into()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // NB: one unreadable system certificate must not stop the others from loading.
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| ClientError::Setup(error_chain(&e)))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
