//! The API servers behind the fake: each one is its own TLS listener serving its own `/metrics`
//! at its own loopback address (127.0.0.1, 127.0.0.2, ... on one port, as the `default/kubernetes`
//! EndpointSlice lists one port for all), with an identity Lease named and renewed as upstream
//! names and renews it. The fake's client answers everything else, as the Service would.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use http::Response;
use k8s_openapi::jiff::Timestamp;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

use super::{FakeApi, State, json_response, not_found};
use crate::rbac;

/// The bearer token the fake's API servers accept on `/metrics`.
pub const METRICS_TOKEN: &str = "controller-service-account-token";

/// One API server process.
pub struct ApiServer {
    /// Its host name, from which its ID is derived.
    pub hostname: String,
    /// The API server ID: the identity Lease's name.
    pub id: String,
    /// The identity Lease's holder: `<id>_<uuid>`.
    pub holder: String,
    /// Where its own listener serves.
    pub address: SocketAddr,
    /// Seconds (on the fake's clock) when it started.
    pub started: u64,
    /// When it started, in Unix seconds.
    pub started_unix: i64,
    /// Seconds when it stopped; `None` while it runs.
    pub stopped: Option<u64>,
    /// Whether the endpoint reconciler lists it in `default/kubernetes`.
    pub in_endpoints: bool,
    /// The key_ids its Status calls returned, with the time of the last one (seconds).
    pub status_key_ids: BTreeMap<String, f64>,
    /// When it last fetched the external signer's keys (Unix seconds); `None` on a server not
    /// flipped to the signer, which then has no such series.
    pub fetch_keys_success: Option<f64>,
    /// The kid its external signer signs with now; `None` on a server not flipped.
    pub signing_kid: Option<String>,
    task: Option<JoinHandle<()>>,
}

/// The API server ID kube-apiserver derives from its host name
/// (staging/src/k8s.io/apiserver/pkg/server/config.go, `NewConfig`: sha256 over the
/// length-prefixed host name and "kube-apiserver", the first 16 bytes in unpadded base32,
/// lower case, after `apiserver-`).
pub fn api_server_id(hostname: &str) -> String {
    let mut data = Vec::new();
    for part in [hostname.as_bytes(), b"kube-apiserver".as_slice()] {
        data.extend((part.len() as u16).to_be_bytes());
        data.extend(part);
    }
    let hash = Sha256::digest(&data);
    format!("apiserver-{}", base32_lower(&hash[..16]))
}

fn base32_lower(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The cluster CA and serving certificate every fake API server uses.
pub struct ServingCert {
    /// The CA certificate (DER), as the controller's in-cluster `ca.crt` holds it.
    pub ca: CertificateDer<'static>,
    config: Arc<rustls::ServerConfig>,
}

impl ServingCert {
    /// A CA and a certificate for the Service names only, with no IP address: a client that
    /// checked the address instead of `kubernetes.default.svc` would fail.
    pub fn new() -> Self {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "kubernetes");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let names = [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        let params = rcgen::CertificateParams::new(names.map(String::from).to_vec()).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        Self { ca: ca.der().clone(), config: Arc::new(config) }
    }
}

impl Default for ServingCert {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApi {
    /// Starts one API server per host name, each at its own loopback address on one shared
    /// port, all in `default/kubernetes`.
    pub async fn start_api_servers(&self, hostnames: &[&str]) {
        let listeners = bind_same_port(hostnames.len()).await;
        let now = self.clock.elapsed();
        let now_unix = kmsgate::clock::Clock::now(&*self.clock).as_second();
        let mut state = self.state.lock().await;
        for (hostname, listener) in hostnames.iter().zip(listeners) {
            let address = listener.local_addr().unwrap();
            let id = api_server_id(hostname);
            let task =
                tokio::spawn(serve(listener, self.state.clone(), self.serving.config.clone(), id.clone()));
            state.api_servers.push(ApiServer {
                hostname: hostname.to_string(),
                // pkg/controlplane/apiserver/server.go, `completedConfig.New`: the Lease is named
                // by the ID and held by `<ID>_<uuid>`.
                holder: format!("{id}_{}", uuid::Uuid::new_v4()),
                id,
                address,
                started: now,
                started_unix: now_unix,
                stopped: None,
                in_endpoints: true,
                status_key_ids: BTreeMap::new(),
                fetch_keys_success: None,
                signing_kid: None,
                task: Some(task),
            });
        }
    }

    /// The controller's way to the API servers: the fake's cluster CA and the token they accept.
    pub fn api_server_access(&self) -> kmsgate::k8s::ApiServerAccess {
        kmsgate::k8s::ApiServerAccess::new(
            vec![self.serving.ca.clone()],
            zeroize::Zeroizing::new(METRICS_TOKEN.to_owned()),
        )
    }

    /// API server `index` got `key_id` from a Status call now
    /// (staging/src/k8s.io/apiserver/pkg/storage/value/encrypt/envelope/metrics/metrics.go,
    /// `RecordKeyIDFromStatus`: the gauge is set to the current time).
    pub async fn status_returned(&self, index: usize, key_id: &str) {
        let now = kmsgate::clock::Clock::now(&*self.clock).as_second() as f64;
        self.state.lock().await.api_servers[index].status_key_ids.insert(key_id.to_owned(), now);
    }

    /// API server `index` fetched its external signer's keys now, and signs with `kid` from now
    /// on (pkg/serviceaccount/externaljwt/metrics/metrics.go, `RecordFetchKeysAttempt`: the
    /// gauge is set to the current time on success).
    pub async fn keys_fetched(&self, index: usize, kid: &str) {
        let now = kmsgate::clock::Clock::now(&*self.clock).as_second() as f64;
        let mut state = self.state.lock().await;
        state.api_servers[index].fetch_keys_success = Some(now);
        state.api_servers[index].signing_kid = Some(kid.to_owned());
    }

    /// Stops API server `index`: its listener closes, its Lease is no longer renewed (it lingers
    /// until garbage-collected) and, on a graceful shutdown, the endpoint reconciler drops its
    /// address (pkg/controlplane/reconcilers/lease.go, `leaseEndpointReconciler.RemoveEndpoints`).
    pub async fn stop_api_server(&self, index: usize) {
        let now = self.clock.elapsed();
        let mut state = self.state.lock().await;
        let server = &mut state.api_servers[index];
        server.stopped = Some(now);
        server.in_endpoints = false;
        if let Some(task) = server.task.take() {
            task.abort();
        }
    }
}

/// Binds `count` listeners on 127.0.0.1, 127.0.0.2, ... with one port, as the EndpointSlice has
/// one port for every address.
async fn bind_same_port(count: usize) -> Vec<TcpListener> {
    for _ in 0..50 {
        let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for i in 2..=count {
            let ip = Ipv4Addr::new(127, 0, 0, i as u8);
            match TcpListener::bind(SocketAddr::new(ip.into(), port)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => break,
            }
        }
        if listeners.len() == count {
            return listeners;
        }
    }
    panic!("no port free on {count} loopback addresses");
}

/// One API server's listener: TLS, then `GET /metrics` or a TokenRequest (`POST
/// /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token`) with a bearer token. Authentication runs
/// before authorization (staging/src/k8s.io/apiserver/pkg/endpoints/filters/authentication.go,
/// `withAuthentication`, answering 401), then RBAC (filters/authorization.go, `withAuthorization`).
async fn serve(
    listener: TcpListener,
    state: Arc<tokio::sync::Mutex<State>>,
    tls: Arc<rustls::ServerConfig>,
    id: String,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((socket, _)) = listener.accept().await else { return };
        let (acceptor, state, id) = (acceptor.clone(), state.clone(), id.clone());
        tokio::spawn(async move {
            let Ok(mut stream) = acceptor.accept(socket).await else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let split = head.windows(4).position(|w| w == b"\r\n\r\n").map_or(head.len(), |p| p + 4);
            let mut body = head.split_off(split);
            let head = String::from_utf8_lossy(&head).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0)
                .min(64 * 1024);
            while body.len() < length {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => body.extend_from_slice(&buf[..n]),
                }
            }
            let mut words = head.split_whitespace();
            let method = words.next().unwrap_or_default().to_owned();
            let path = words.next().unwrap_or_default().to_owned();
            let authorized = head.lines().any(|l| {
                l.to_ascii_lowercase().starts_with("authorization:")
                    && l.split_once(':').is_some_and(|(_, v)| v.trim() == format!("Bearer {METRICS_TOKEN}"))
            });
            let (code, content_type, body) = if !authorized {
                (401, "text/plain", "Unauthorized".to_owned())
            } else if rbac::authorize(&format!("{method} {path}")).is_err() {
                (403, "text/plain", "forbidden".to_owned())
            } else if method == "GET" && path == "/metrics" {
                let mut state = state.lock().await;
                state.log.push(format!("GET {path}"));
                (200, "text/plain; version=0.0.4", metrics_of(&state, &id))
            } else if let Some((ns, sa)) = token_path(&path).filter(|_| method == "POST") {
                let mut state = state.lock().await;
                state.log.push(format!("POST {path}"));
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let (code, answer) = token_of(&state, &id, &ns, &sa, &request);
                (code, "application/json", answer.to_string())
            } else {
                (404, "text/plain", "not found".to_owned())
            };
            let reason = match code {
                200 => "OK",
                201 => "Created",
                401 => "Unauthorized",
                403 => "Forbidden",
                422 => "Unprocessable Entity",
                _ => "Not Found",
            };
            let response = format!(
                "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// `(namespace, service account)` of a TokenRequest path.
fn token_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (ns, rest) = rest.split_once('/')?;
    let sa = rest.strip_prefix("serviceaccounts/")?.strip_suffix("/token")?;
    Some((ns.to_owned(), sa.to_owned()))
}

/// A TokenRequest answered by one server (pkg/registry/core/serviceaccount/storage/token.go,
/// `TokenREST.Create`): the lifetime is at least 10 minutes (422, pkg/apis/authentication/
/// validation/validation.go, `ValidateTokenRequest`), and the token is signed by this server's
/// external signer, so its header carries that signer's kid (pkg/serviceaccount/externaljwt/
/// plugin/plugin.go, `signer.signPayload`, takes the header the signer returns). A server not
/// flipped signs with its own key file, `kid` `legacy-sa-key`.
fn token_of(state: &State, id: &str, ns: &str, sa: &str, request: &Value) -> (u16, Value) {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    if request["spec"]["expirationSeconds"].as_i64().is_some_and(|s| s < 600) {
        return (
            422,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                   "message": "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes"}),
        );
    }
    let kid = state
        .api_servers
        .iter()
        .find(|s| s.id == id)
        .and_then(|s| s.signing_kid.clone())
        .unwrap_or_else(|| "legacy-sa-key".to_owned());
    let header = kmsgate::jwt::header(kmsgate::jwt::Alg::Es256, &kid).unwrap();
    let claims = URL_SAFE_NO_PAD.encode(
        json!({"aud": request["spec"]["audiences"], "sub": format!("system:serviceaccount:{ns}:{sa}")})
            .to_string(),
    );
    let token = format!("{header}.{claims}.{}", URL_SAFE_NO_PAD.encode(b"stand-in signature"));
    (
        201,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": request["spec"],
               "status": {"token": token, "expirationTimestamp": "2030-01-01T00:00:00Z"}}),
    )
}

/// One server's own metrics: only its own ID, as each server labels its gauges with its own
/// `apiServerID` (staging/src/k8s.io/apiserver/pkg/server/options/encryptionconfig/config.go,
/// `kmsv2PluginProbe.isKMSv2ProviderHealthyAndMaybeRotateDEK` passes `h.apiServerID`).
fn metrics_of(state: &State, id: &str) -> String {
    let mut text = String::from(
        "# HELP apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds [ALPHA] The last time in seconds when a keyID was returned by the Status RPC call.\n\
         # TYPE apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds gauge\n",
    );
    let Some(server) = state.api_servers.iter().find(|s| s.id == id) else { return text };
    for (key_id, at) in &server.status_key_ids {
        text.push_str(&format!(
            "{}{{apiserver_id_hash=\"{}\",key_id_hash=\"{}\",provider_name=\"{}\"}} {at:e}\n",
            kmsgate::k8s::STATUS_METRIC,
            kmsgate::k8s::sha256_label(&server.id),
            kmsgate::k8s::sha256_label(key_id),
            state.provider_name,
        ));
    }
    // An unlabeled gauge, present only once the server has fetched keys from an external signer.
    if let Some(at) = server.fetch_keys_success {
        text.push_str(&format!("{} {at:e}\n", kmsgate::k8s::FETCH_KEYS_SUCCESS_METRIC));
    }
    // Every server exports its start time (staging/src/k8s.io/component-base/metrics/
    // processstarttime.go, `processStartTime`, an unlabeled gauge in Unix seconds).
    text.push_str(&format!("{} {:e}\n", kmsgate::k8s::PROCESS_START_METRIC, server.started_unix as f64));
    text.push_str("apiserver_request_total{code=\"200\"} 12\n");
    text
}

impl super::Server {
    /// The identity Leases in kube-system. A running server renews every 10 s (pkg/controlplane/
    /// apiserver/server.go, `IdentityLeaseRenewIntervalPeriod`, through staging/src/k8s.io/
    /// component-helpers/apimachinery/lease/controller.go, `controller.Run`); a stopped one's
    /// Lease keeps its last renew time.
    pub(super) async fn identity_leases(&self) -> Response<kube::client::Body> {
        let now = self.clock.elapsed();
        let state = self.state.lock().await;
        let base = kmsgate::clock::Clock::now(&*self.clock).as_second() - now as i64;
        let items: Vec<Value> = state
            .api_servers
            .iter()
            .map(|s| {
                let until = s.stopped.unwrap_or(now);
                let renewed = s.started + (until - s.started) / 10 * 10;
                let renew_time = Timestamp::from_second(base + renewed as i64).unwrap();
                json!({
                    "metadata": {
                        "name": s.id, "namespace": "kube-system",
                        "labels": {"apiserver.kubernetes.io/identity": "kube-apiserver", "kubernetes.io/hostname": s.hostname},
                    },
                    "spec": {
                        "holderIdentity": s.holder, "leaseDurationSeconds": 3600,
                        "renewTime": renew_time.strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string(),
                    },
                })
            })
            .collect();
        json_response(
            200,
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {}, "items": items}),
        )
    }

    /// `default/kubernetes`, as the endpoint reconciler writes it (pkg/controlplane/reconcilers/
    /// endpointsadapter.go, `endpointSliceFromEndpoints`: one endpoint per address, ready, and the
    /// `https` port).
    pub(super) async fn endpoint_slice(&self, namespace: &str, name: &str) -> Response<kube::client::Body> {
        let state = self.state.lock().await;
        if namespace != "default" || name != "kubernetes" || state.api_servers.is_empty() {
            return not_found("endpointslices.discovery.k8s.io", name);
        }
        let serving: Vec<&ApiServer> = state.api_servers.iter().filter(|s| s.in_endpoints).collect();
        let port = state.api_servers[0].address.port();
        let endpoints: Vec<Value> = serving
            .iter()
            .map(|s| {
                let ip: IpAddr = s.address.ip();
                json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})
            })
            .collect();
        json_response(
            200,
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubernetes"}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            }),
        )
    }

    /// A SelfSubjectAccessReview, decided by the shipped RBAC (pkg/registry/authorization/
    /// selfsubjectaccessreview/rest.go, `REST.Create`: `allowed` when the authorizer allows; RBAC
    /// never denies, it has no opinion, plugin/pkg/auth/authorizer/rbac/rbac.go,
    /// `RBACAuthorizer.Authorize`).
    pub(super) async fn access_review(&self, body: &Value) -> Response<kube::client::Body> {
        let attributes = &body["spec"]["resourceAttributes"];
        let text = |k: &str| attributes[k].as_str().unwrap_or_default().to_owned();
        let (group, resource, verb) = (text("group"), text("resource"), text("verb"));
        let allowed = kmsgate::k8s::RBAC
            .iter()
            .any(|(g, r, verbs)| *g == group && *r == resource && verbs.contains(&verb.as_str()));
        self.state.lock().await.reviews.push(format!("{verb} {resource}.{group}"));
        let mut answer = body.clone();
        answer["status"] = json!({"allowed": allowed, "denied": false});
        json_response(201, answer)
    }
}
