//! The API servers themselves, for convergence evidence: their identity Leases, their addresses in
//! the `default/kubernetes` EndpointSlice, and each one's own `/metrics`, read at its address.
//!
//! A request through the client reaches one API server behind the Service, and each server
//! exports only its own `apiserver_id_hash`, so every server is read at its own address. TLS is
//! verified with the cluster CA against `kubernetes.default.svc` (the name every serving
//! certificate carries, not the address), with the controller's own bearer token.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{coordination::v1::Lease, discovery::v1::EndpointSlice},
    jiff::Timestamp,
};
use kube::{Api, api::ListParams};
use rustls::pki_types::CertificateDer;
use zeroize::Zeroizing;

use super::{Kube, KubeError, call};

/// Label of the API servers' identity Leases in kube-system
/// (pkg/controlplane/apiserver/server.go, `IdentityLeaseComponentLabelKey` set to the server's
/// name by `labelAPIServerHeartbeatFunc`).
const APISERVER_IDENTITY_SELECTOR: &str = "apiserver.kubernetes.io/identity=kube-apiserver";

/// The name every API server's serving certificate carries and clients verify against.
pub const SERVICE_NAME: &str = "kubernetes.default.svc";

/// Most API server addresses read in one check.
pub const MAX_API_SERVERS: usize = 32;

/// Most bytes read from one server's `/metrics`. Only the matching lines are kept, so memory
/// stays small; the bound is on what a server can make us read.
pub const MAX_METRICS_BYTES: usize = 32 << 20;

/// Longest metrics line kept; the lines we want are a few hundred bytes.
const MAX_LINE: usize = 4096;

/// The metric each API server sets when a Status call returns a key_id.
pub const STATUS_METRIC: &str = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds";

/// When the API server last fetched the signer's keys successfully, in Unix seconds: a GaugeVec
/// with no labels, set to the current time on each successful FetchKeys
/// (pkg/serviceaccount/externaljwt/metrics/metrics.go, `lastKeyFetchTimeStamp`, set through
/// `WithLabelValues()` by `RecordFetchKeysAttempt`). A vector shows no series until set, so the
/// series is absent on a server not configured for an external signer and until its first
/// successful fetch.
pub const FETCH_KEYS_SUCCESS_METRIC: &str = "apiserver_externaljwt_fetch_keys_success_timestamp";

/// When the API server process started, in Unix seconds: an unlabeled gauge
/// (staging/src/k8s.io/component-base/metrics/processstarttime.go, `processStartTime`, and the
/// Prometheus process collector, prometheus/client_golang prometheus/process_collector.go,
/// `NewProcessCollector`, `startTime`).
pub const PROCESS_START_METRIC: &str = "process_start_time_seconds";

/// Longest TokenRequest answer read: a token of a few KiB in a small object.
const MAX_TOKEN_ANSWER_BYTES: usize = 64 * 1024;

/// One API server identity Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityLease {
    /// The Lease name: the API server ID (`apiserver-<base32 hash>`).
    pub name: String,
    /// `spec.renewTime`; `None` when unset.
    pub renewed: Option<Timestamp>,
}

/// How long an identity Lease may go unrenewed and still count as a running API server. Live
/// servers renew every 10 s (pkg/controlplane/apiserver/server.go,
/// `IdentityLeaseRenewIntervalPeriod`); a removed server's Lease lingers until it expires (1 h,
/// `IdentityLeaseDurationSeconds`) and the hourly garbage collection deletes it
/// (pkg/controlplane/controller/apiserverleasegc/gc_controller.go, `Controller.gc`).
pub const LEASE_FRESH: Duration = Duration::from_secs(60);

/// The names of the identity Leases renewed within [`LEASE_FRESH`] of `now`. A Lease without a
/// renew time is dead, as the garbage collector treats it (`isLeaseExpired`).
pub fn live_leases(leases: &[IdentityLease], now: Timestamp) -> Vec<String> {
    let fresh = LEASE_FRESH.as_secs() as i64;
    leases
        .iter()
        .filter(|l| l.renewed.is_some_and(|at| now.as_second() - at.as_second() <= fresh))
        .map(|l| l.name.clone())
        .collect()
}

/// The `default/kubernetes` EndpointSlice: one address per API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServerAddresses {
    /// Ready addresses.
    pub addresses: Vec<IpAddr>,
    /// The `https` port.
    pub port: Option<u16>,
}

/// How the controller reaches the API servers directly: the cluster CA and its bearer token.
#[derive(Clone)]
pub struct ApiServerAccess {
    ca: Vec<CertificateDer<'static>>,
    ca_file: Option<PathBuf>,
    token: Token,
}

#[derive(Clone)]
enum Token {
    Fixed(Arc<Zeroizing<String>>),
    File(PathBuf),
}

impl std::fmt::Debug for ApiServerAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: never the token.
        f.debug_struct("ApiServerAccess").field("ca_certs", &self.ca.len()).finish_non_exhaustive()
    }
}

impl ApiServerAccess {
    /// Trusts the DER certificates `ca` and sends `token`.
    pub fn new(ca: Vec<CertificateDer<'static>>, token: Zeroizing<String>) -> Self {
        Self { ca, ca_file: None, token: Token::Fixed(Arc::new(token)) }
    }

    /// From the client configuration: the cluster CA and a bearer token (the in-cluster token
    /// file, re-read at each use since kubelet rotates it). `Err` says why there is none.
    pub fn from_config(config: &kube::Config) -> Result<Self, String> {
        let ca: Vec<CertificateDer<'static>> =
            config.root_cert.iter().flatten().map(|der| CertificateDer::from(der.clone())).collect();
        if ca.is_empty() && config.root_cert_file.is_none() {
            return Err("the client configuration names no cluster CA".into());
        }
        let auth = &config.auth_info;
        let token = if let Some(file) = &auth.token_file {
            Token::File(PathBuf::from(file))
        } else if let Some(token) = &auth.token {
            use secrecy::ExposeSecret;
            Token::Fixed(Arc::new(Zeroizing::new(token.expose_secret().to_owned())))
        } else {
            return Err("the client authenticates without a bearer token".into());
        };
        Ok(Self { ca, ca_file: config.root_cert_file.clone(), token })
    }

    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        let mut ca = self.ca.clone();
        if let Some(file) = &self.ca_file {
            // NB: the file wins when readable: the CA may have been rotated since the start.
            let pem = read_file(file, crate::files::DOCUMENT_MAX_BYTES)?;
            let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
            ca = certs.map_err(|e| format!("{}: {e}", file.display()))?;
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| format!("cluster CA: {e}"))?;
        }
        if roots.is_empty() {
            return Err("the cluster CA holds no certificate".into());
        }
        Ok(roots)
    }

    fn token(&self) -> Result<Zeroizing<String>, String> {
        match &self.token {
            Token::Fixed(token) => Ok(Zeroizing::new(token.as_str().to_owned())),
            Token::File(path) => {
                let bytes = read_file(path, crate::files::CREDENTIAL_MAX_BYTES)?;
                let text =
                    std::str::from_utf8(&bytes).map_err(|_| format!("{} is not UTF-8", path.display()))?;
                Ok(Zeroizing::new(text.trim().to_owned()))
            }
        }
    }

    /// The `STATUS_METRIC` lines of the API server at `address`, read with a time and size bound.
    pub async fn status_metric_lines(&self, address: SocketAddr) -> Result<String, String> {
        self.metric_lines(address, &[STATUS_METRIC]).await
    }

    /// The sample lines of the metrics `names` (exact names) from the `/metrics` of the API
    /// server at `address`, read with a time and size bound.
    pub async fn metric_lines(&self, address: SocketAddr, names: &[&str]) -> Result<String, String> {
        let client = self.client(address)?;
        let url = format!("https://{SERVICE_NAME}:{}/metrics", address.port());
        let token = self.token()?;
        let mut response =
            client.get(&url).bearer_auth(token.as_str()).send().await.map_err(|e| chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("/metrics answered HTTP {}", response.status()));
        }
        let mut scanner = LineScanner::new(names);
        while let Some(chunk) = response.chunk().await.map_err(|e| chain(&e))? {
            scanner.feed(&chunk)?;
        }
        Ok(scanner.finish())
    }

    /// Asks the API server at `address` for a token of `namespace/service_account` (a
    /// TokenRequest for `audience`, lasting `expiration_seconds`, at least 600 upstream) and
    /// returns only the kid of its header: which key that server signs with now. The token is
    /// held in zeroized memory and dropped here; no error carries it.
    pub async fn token_kid_at(
        &self,
        address: SocketAddr,
        namespace: &str,
        service_account: &str,
        audience: &str,
        expiration_seconds: i64,
    ) -> Result<String, String> {
        for (what, name) in [("namespace", namespace), ("service account", service_account)] {
            if !is_object_name(name) {
                return Err(format!("{what} {name:?} is not a valid object name"));
            }
        }
        let client = self.client(address)?;
        let url = format!(
            "https://{SERVICE_NAME}:{}/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            address.port()
        );
        // authentication/v1 TokenRequest (staging/src/k8s.io/api/authentication/v1/types.go,
        // `TokenRequestSpec`: `audiences`, `expirationSeconds`).
        let body = serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": { "audiences": [audience], "expirationSeconds": expiration_seconds },
        });
        let bearer = self.token()?;
        let mut response =
            client.post(&url).bearer_auth(bearer.as_str()).json(&body).send().await.map_err(|e| chain(&e))?;
        let status = response.status();
        // NB: sized up front so it never reallocates and leaves a copy of the token behind.
        let mut answer = Zeroizing::new(Vec::with_capacity(MAX_TOKEN_ANSWER_BYTES));
        while let Some(chunk) = response.chunk().await.map_err(|e| chain(&e))? {
            if answer.len() + chunk.len() > MAX_TOKEN_ANSWER_BYTES {
                return Err(format!("the TokenRequest answer is larger than {MAX_TOKEN_ANSWER_BYTES} bytes"));
            }
            answer.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            // NB: a refusal is a Status object, which carries no token.
            return Err(format!("TokenRequest answered HTTP {status}: {}", status_message(&answer)));
        }
        token_kid(&answer)
    }

    /// A client for the one API server at `address`, with the cluster CA and time bounds.
    fn client(&self, address: SocketAddr) -> Result<reqwest::Client, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(self.roots()?)
            .with_no_client_auth();
        // NB: the name is resolved to this one address, so SNI and the certificate check use
        // the Service name while the connection goes to the server itself.
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .resolve(SERVICE_NAME, address)
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .build()
            .map_err(|e| e.to_string())
    }
}

/// The kid of the token in a TokenRequest answer; the token never leaves zeroized memory.
fn token_kid(answer: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        status: TokenStatus,
    }
    #[derive(serde::Deserialize)]
    struct TokenStatus {
        token: Zeroizing<String>,
    }
    // NB: serde's messages may quote what they reject; none is kept.
    let answer: Answer = serde_json::from_slice(answer)
        .map_err(|_| "the TokenRequest answer has no status.token string".to_owned())?;
    crate::jwt::header_kid(&answer.status.token).map_err(|e| format!("the issued token: {e}"))
}

/// The `message` of a Kubernetes Status answer, clipped; or that there is none.
fn status_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Status {
        message: String,
    }
    match serde_json::from_slice::<Status>(body) {
        Ok(status) => crate::error::clipped(status.message, 300),
        Err(_) => "no Status message".to_owned(),
    }
}

/// Whether `name` can be a namespace or ServiceAccount name in a request path (an RFC 1123
/// subdomain: lower-case letters, digits, `-` and `.`, at most 253 bytes).
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The value of the first sample of metric `name` (exact name) in Prometheus text-format
/// `lines`: `name value [timestamp]`, or `name{labels} value [timestamp]`. `None` when there is
/// no such sample or its value is not a finite number.
pub fn gauge(lines: &str, name: &str) -> Option<f64> {
    lines.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let rest = match rest.strip_prefix('{') {
            Some(labels) => &labels[label_set_end(labels)?..],
            None if rest.starts_with([' ', '\t']) => rest,
            None => return None,
        };
        let value: f64 = rest.split_ascii_whitespace().next()?.parse().ok()?;
        value.is_finite().then_some(value)
    })
}

/// The index just past the `}` that closes a label set (after its `{`), skipping quoted values,
/// which may hold `}` and escaped quotes.
fn label_set_end(labels: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (at, c) in labels.char_indices() {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => quoted = !quoted,
            (false, _, '}') => return Some(at + 1),
            _ => {}
        }
    }
    None
}

/// The metric name of a sample line: up to its labels or its value.
fn metric_name(line: &[u8]) -> &[u8] {
    let end = line.iter().position(|b| matches!(b, b'{' | b' ' | b'\t')).unwrap_or(line.len());
    &line[..end]
}

/// An error and its causes on one line (reqwest's own message omits the cause: timeout, TLS).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

fn read_file(path: &std::path::Path, max: u64) -> Result<Zeroizing<Vec<u8>>, String> {
    crate::files::read_capped(path, max).map_err(|e| format!("{}: {e}", path.display()))
}

/// Keeps the sample lines of the wanted metrics from a metrics body fed in chunks, and fails past
/// [`MAX_METRICS_BYTES`].
struct LineScanner<'a> {
    names: &'a [&'a str],
    read: usize,
    line: Vec<u8>,
    overlong: bool,
    kept: String,
}

impl<'a> LineScanner<'a> {
    fn new(names: &'a [&'a str]) -> Self {
        Self { names, read: 0, line: Vec::new(), overlong: false, kept: String::new() }
    }

    fn feed(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.read += chunk.len();
        if self.read > MAX_METRICS_BYTES {
            return Err(format!("/metrics is larger than {MAX_METRICS_BYTES} bytes"));
        }
        for &byte in chunk {
            if byte == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(byte);
            } else {
                self.overlong = true;
            }
        }
        Ok(())
    }

    fn end_line(&mut self) {
        if !self.overlong
            && self.names.iter().any(|n| metric_name(&self.line) == n.as_bytes())
            && let Ok(text) = std::str::from_utf8(&self.line)
        {
            self.kept.push_str(text);
            self.kept.push('\n');
        }
        self.line.clear();
        self.overlong = false;
    }

    fn finish(mut self) -> String {
        self.end_line();
        self.kept
    }
}

impl Kube {
    /// Uses `access` to read each API server's own `/metrics`.
    pub fn with_api_server_access(mut self, access: ApiServerAccess) -> Self {
        self.api_servers = Ok(access);
        self
    }

    /// How the API servers are reached directly, or why they cannot be.
    pub fn api_server_access(&self) -> Result<&ApiServerAccess, &str> {
        self.api_servers.as_ref().map_err(String::as_str)
    }

    /// The API servers' identity Leases.
    pub async fn identity_leases(&self) -> Result<Vec<IdentityLease>, KubeError> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-system");
        let list = leases
            .list(&ListParams::default().labels(APISERVER_IDENTITY_SELECTOR))
            .await
            .map_err(call("list API server identity leases"))?;
        Ok(list
            .items
            .into_iter()
            .map(|l| IdentityLease {
                name: l.metadata.name.unwrap_or_default(),
                renewed: l.spec.and_then(|s| s.renew_time).map(|t| t.0),
            })
            .collect())
    }

    /// The ready addresses and `https` port of the `default/kubernetes` EndpointSlice, which
    /// the API servers keep to one address each.
    pub async fn api_server_addresses(&self) -> Result<ApiServerAddresses, KubeError> {
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), "default");
        let slice = slices.get("kubernetes").await.map_err(call("get EndpointSlice default/kubernetes"))?;
        let addresses = slice
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .flat_map(|e| e.addresses.iter())
            .filter_map(|a| a.parse().ok())
            .collect();
        let ports = slice.ports.unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("https"))
            .or(ports.first())
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok());
        Ok(ApiServerAddresses { addresses, port })
    }
}

/// The `apiserver_id_hash` values that reported `key_id` from Status, read from
/// [`STATUS_METRIC`] lines.
pub fn api_servers_on_key(
    metrics: &str,
    provider: &str,
    key_id: &str,
) -> std::collections::BTreeMap<String, f64> {
    let wanted = sha256_label(key_id);
    let mut seen = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(STATUS_METRIC).and_then(|r| r.strip_prefix('{')) else {
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

/// `sha256:<hex>`, the form the API server's metrics use for key_ids and server IDs
/// (staging/src/k8s.io/apiserver/pkg/storage/value/encrypt/envelope/metrics/metrics.go,
/// `getHash`).
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
             {STATUS_METRIC}{{apiserver_id_hash=\"sha256:a\",key_id_hash=\"{new}\",provider_name=\"kmsgate\"}} 1.7e9\n\
             {STATUS_METRIC}{{apiserver_id_hash=\"sha256:b\",key_id_hash=\"{old}\",provider_name=\"kmsgate\"}} 1.7e9\n\
             {STATUS_METRIC}{{apiserver_id_hash=\"sha256:c\",key_id_hash=\"{new}\",provider_name=\"other\"}} 1.7e9\n",
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

    #[test]
    fn the_scanner_keeps_only_the_status_metric_across_chunks_and_stops_at_the_bound() {
        let body = format!("a 1\n{STATUS_METRIC}{{x=\"1\"}} 2\nb 3\n{STATUS_METRIC}{{x=\"2\"}} 4");
        let mut scanner = LineScanner::new(&[STATUS_METRIC]);
        for chunk in body.as_bytes().chunks(7) {
            scanner.feed(chunk).unwrap();
        }
        assert_eq!(scanner.finish(), format!("{STATUS_METRIC}{{x=\"1\"}} 2\n{STATUS_METRIC}{{x=\"2\"}} 4\n"));
        let mut scanner = LineScanner::new(&[STATUS_METRIC]);
        let big = vec![b'a'; 1 << 20];
        let fed: Result<Vec<()>, String> = (0..33).map(|_| scanner.feed(&big)).collect();
        assert!(fed.unwrap_err().contains("larger than"));
        let mut scanner = LineScanner::new(&[STATUS_METRIC]);
        let mut long = STATUS_METRIC.as_bytes().to_vec();
        long.extend(vec![b'x'; MAX_LINE]);
        scanner.feed(&long).unwrap();
        assert_eq!(scanner.finish(), "", "an overlong line is dropped, not cut");
    }

    #[test]
    fn gauge_reads_a_sample_with_or_without_labels_and_a_timestamp() {
        // As Go's text encoder writes the two upstream gauges (unlabeled, `%e`-style floats).
        let text = format!(
            "# HELP {FETCH_KEYS_SUCCESS_METRIC} [ALPHA] Unix Timestamp in seconds of the last successful FetchKeys request\n\
             # TYPE {FETCH_KEYS_SUCCESS_METRIC} gauge\n\
             {FETCH_KEYS_SUCCESS_METRIC} 1.7331234567891e+09\n\
             {PROCESS_START_METRIC} 1.73312e+09 1733123456789\n\
             labelled{{a=\"x}} y\",b=\"q\\\"}}\"}} 7\n\
             nan_gauge NaN\n"
        );
        assert_eq!(gauge(&text, FETCH_KEYS_SUCCESS_METRIC), Some(1.7331234567891e9));
        assert_eq!(gauge(&text, PROCESS_START_METRIC), Some(1.73312e9), "a timestamp is not the value");
        assert_eq!(gauge(&text, "labelled"), Some(7.0), "a brace inside a quoted label value");
        assert_eq!(gauge(&text, "nan_gauge"), None);
        assert_eq!(gauge(&text, "apiserver_externaljwt_fetch_keys"), None, "a prefix is not the name");
        assert_eq!(gauge(&text, "absent"), None);
        assert_eq!(gauge("m{a=\"1\"", "m"), None, "an unclosed label set");
        assert_eq!(gauge("m\t2", "m"), Some(2.0));
        assert_eq!(gauge("m", "m"), None);
    }

    #[test]
    fn the_scanner_keeps_exactly_the_named_metrics() {
        let body = format!(
            "{FETCH_KEYS_SUCCESS_METRIC} 1\n{FETCH_KEYS_SUCCESS_METRIC}_other 2\n{PROCESS_START_METRIC} 3\n\
             # TYPE {PROCESS_START_METRIC} gauge\nx 4"
        );
        let mut scanner = LineScanner::new(&[FETCH_KEYS_SUCCESS_METRIC, PROCESS_START_METRIC]);
        scanner.feed(body.as_bytes()).unwrap();
        assert_eq!(scanner.finish(), format!("{FETCH_KEYS_SUCCESS_METRIC} 1\n{PROCESS_START_METRIC} 3\n"));
    }

    #[test]
    fn the_kid_of_an_issued_token_is_read_and_the_token_never_reaches_an_error() {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        let secret = "c2VjcmV0LWNsYWltcw";
        let header = crate::jwt::header(crate::jwt::Alg::Es256, "kid-7").unwrap();
        let answer = |token: &str| {
            serde_json::to_vec(&serde_json::json!({
                "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "status": {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"},
            }))
            .unwrap()
        };
        assert_eq!(token_kid(&answer(&format!("{header}.{secret}.c2ln"))).unwrap(), "kid-7");
        let no_kid = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256"}"#);
        for bad in [
            answer(&format!("{no_kid}.{secret}.c2ln")),
            answer(&format!("{header}.{secret}")),
            serde_json::to_vec(&serde_json::json!({"status": {"token": 7, "x": secret}})).unwrap(),
            format!("{{\"status\": {{\"token\": \"{header}.{secret}.").into_bytes(),
        ] {
            let err = token_kid(&bad).unwrap_err();
            assert!(!err.contains(secret) && !err.contains(&header), "{err}");
        }
        assert_eq!(
            status_message(br#"{"kind":"Status","message":"serviceaccounts \"x\" is forbidden"}"#),
            "serviceaccounts \"x\" is forbidden"
        );
        assert_eq!(status_message(b"<html>"), "no Status message");
        assert!(is_object_name("kmsgate-controller") && is_object_name("kube-system"));
        for bad in ["", "a/b", "A", "x?y", "..%2f", &"a".repeat(254)] {
            assert!(!is_object_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_in_cluster_token_and_ca_files_are_read_at_use_and_other_auth_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, token) = (dir.path().join("ca.crt"), dir.path().join("token"));
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        std::fs::write(&token, "first\n").unwrap();
        let mut config = kube::Config::new("https://10.96.0.1".parse().unwrap());
        config.root_cert_file = Some(ca.clone());
        config.auth_info.token_file = Some(token.display().to_string());
        let access = ApiServerAccess::from_config(&config).unwrap();
        assert_eq!(access.roots().unwrap().len(), 1);
        assert_eq!(access.token().unwrap().as_str(), "first");
        std::fs::write(&token, "rotated").unwrap();
        assert_eq!(access.token().unwrap().as_str(), "rotated", "kubelet rotates the token file");
        assert!(!format!("{access:?}").contains("rotated"));

        config.auth_info.token_file = None;
        assert_eq!(
            ApiServerAccess::from_config(&config).unwrap_err(),
            "the client authenticates without a bearer token"
        );
        config.root_cert_file = None;
        assert_eq!(
            ApiServerAccess::from_config(&config).unwrap_err(),
            "the client configuration names no cluster CA"
        );
    }
}
