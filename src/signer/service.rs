//! The ExternalJWTSigner gRPC service, one implementation behind both packages (`v1` for
//! kube-apiserver 1.34+, `v1alpha1` for 1.32 and 1.33; facts/externaljwt.md 1.1: the messages are
//! identical). FetchKeys and Metadata answer from the cache and config; Sign checks the claims,
//! picks the signing version's kid, and calls the key store with exactly that version.

use std::sync::Arc;

use serde::Serialize;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::Shared;
use crate::{
    backend::{BackendError, SigningBackend},
    jwt,
    metrics::{GrpcLabels, MethodLabels, code_name},
    proto::externaljwt::{v1, v1alpha1},
    serving::audit_log,
};

/// The service; cheap to clone.
pub struct SignerService<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for SignerService<B> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

/// One Sign in the audit log: who the token is for and whom it addresses, never the token.
#[derive(Serialize)]
struct SignRecord<'a> {
    time: String,
    method: &'static str,
    sub: Option<&'a str>,
    aud: &'a [String],
    kid: &'a str,
    version: Option<u64>,
    outcome: &'static str,
    error: Option<&'a str>,
    latency_ms: f64,
    peer: audit_log::Peer,
}

/// A signed token's header and signature, both base64url without padding.
struct Signed {
    header: String,
    signature: String,
}

impl<B: SigningBackend> SignerService<B> {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared<B>>) -> Self {
        Self { shared }
    }

    async fn sign(&self, claims: &str, peer: audit_log::Peer) -> Result<Signed, Status> {
        let started = Instant::now();
        let mut summary = jwt::ClaimsSummary::default();
        let mut used: Option<(u64, String)> = None;
        let result = self.sign_inner(claims, &mut summary, &mut used).await;
        let (code, error) = match &result {
            Ok(_) => (tonic::Code::Ok, None),
            Err(status) => (status.code(), Some(status.message())),
        };
        let elapsed = started.elapsed();
        self.record("Sign", code, elapsed);
        if let Some(error) = error {
            tracing::warn!(code = code_name(code), error, "Sign failed");
        }
        self.shared.audit.write(&SignRecord {
            time: audit_log::now_rfc3339(),
            method: "Sign",
            sub: summary.sub.as_deref(),
            aud: &summary.aud,
            kid: used.as_ref().map_or("", |(_, kid)| kid.as_str()),
            version: used.as_ref().map(|(v, _)| *v),
            outcome: code_name(code),
            error,
            latency_ms: audit_log::millis(elapsed),
            peer,
        });
        result
    }

    async fn sign_inner(
        &self,
        claims: &str,
        summary: &mut jwt::ClaimsSummary,
        used: &mut Option<(u64, String)>,
    ) -> Result<Signed, Status> {
        *summary = jwt::check_claims(claims).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (version, kid, alg) = self.shared.signing().map_err(Status::unavailable)?;
        *used = Some((version, kid.clone()));
        let (mut header, mut signed) = self.sign_version(version, &kid, alg, claims).await?;
        if matches!(signed, Err(BackendError::Retired(_))) {
            // NB: a rotation's Switch raises min_encryption_version, which Transit enforces at
            // once while this signer still signs with the old version until its next poll. The
            // refusal is itself the news: read the key now and sign once more with the version it
            // pins, which the rotation published before it switched, instead of failing the Sign.
            if let Some((version, kid, alg)) = self.signing_after_refusal(version).await {
                *used = Some((version, kid.clone()));
                (header, signed) = self.sign_version(version, &kid, alg, claims).await?;
            }
        }
        let signature = signed.map_err(|e| self.backend_status(&e))?;
        if signature.is_empty() {
            // NB: kube-apiserver refuses an empty signature ("empty signature returned").
            return Err(Status::internal("the key store returned an empty signature"));
        }
        Ok(Signed { header, signature: jwt::encode_signature(&signature) })
    }

    /// Signs `claims` under `kid` with key store `version`: the header, and the key store's answer.
    async fn sign_version(
        &self,
        version: u64,
        kid: &str,
        alg: jwt::Alg,
        claims: &str,
    ) -> Result<(String, Result<Vec<u8>, BackendError>), Status> {
        let header = jwt::header(alg, kid).map_err(|e| Status::internal(e.to_string()))?;
        let input = jwt::signing_input(&header, claims);
        let deadline = Instant::now() + self.shared.config.backend_timeout;
        let signed =
            self.shared.timed("sign", self.shared.backend.sign(version, alg, &input, deadline)).await;
        Ok((header, signed))
    }

    /// After the key store refused `refused` as retired: the version, kid and algorithm to sign
    /// with once the key is read again, if that is another version. Concurrent Signs refused
    /// together share one read.
    async fn signing_after_refusal(&self, refused: u64) -> Option<(u64, String, jwt::Alg)> {
        let _one_read = self.shared.refusal_read.lock().await;
        let moved = |s: &(u64, String, jwt::Alg)| s.0 != refused;
        if let Some(now) = self.shared.signing().ok().filter(moved) {
            return Some(now);
        }
        self.shared.poll().await;
        self.shared.signing().ok().filter(moved)
    }

    /// The gRPC status of a failed key store call. A refusal that says the key changed wakes the
    /// poll, so the next Sign uses what the key store now says.
    fn backend_status(&self, error: &BackendError) -> Status {
        if !matches!(error, BackendError::Deadline | BackendError::Unavailable(_)) {
            self.shared.repoll.notify_one();
        }
        match error {
            BackendError::Deadline | BackendError::Unavailable(_) => Status::unavailable(error.to_string()),
            BackendError::PermissionDenied(_) => Status::permission_denied(error.to_string()),
            BackendError::KeyNotFound(_) | BackendError::Retired(_) | BackendError::Misconfigured(_) => {
                Status::failed_precondition(error.to_string())
            }
            _ => Status::internal(error.to_string()),
        }
    }

    fn fetch_keys(&self) -> Result<(Vec<v1::Key>, prost_types::Timestamp, i64), Status> {
        let started = Instant::now();
        let result = match self.shared.keys() {
            // NB: kube-apiserver rejects an empty key list as a whole ("found no keys").
            Some(set) if !set.keys.is_empty() => {
                let keys = set
                    .keys
                    .iter()
                    .map(|k| v1::Key {
                        key_id: k.kid.clone(),
                        key: k.der.clone(),
                        exclude_from_oidc_discovery: k.exclude_from_oidc_discovery,
                    })
                    .collect();
                let timestamp = prost_types::Timestamp {
                    // NB: kube-apiserver checks the timestamp (timestamppb CheckValid); keep it
                    // within year 9999 whatever the set says.
                    seconds: i64::try_from(set.data_timestamp.min(super::keyset::TIMESTAMP_MAX_SECONDS))
                        .unwrap_or(0),
                    nanos: 0,
                };
                let hint = self.shared.config.refresh_hint_seconds();
                Ok((keys, timestamp, hint))
            }
            _ => Err(Status::unavailable(
                "no key set yet: the key store has not answered since start and no persisted set exists",
            )),
        };
        self.record(
            "FetchKeys",
            result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok),
            started.elapsed(),
        );
        result
    }

    fn max_token_expiration(&self) -> i64 {
        self.record("Metadata", tonic::Code::Ok, std::time::Duration::ZERO);
        self.shared.config.max_token_expiration_seconds()
    }

    fn record(&self, method: &'static str, code: tonic::Code, elapsed: std::time::Duration) {
        let metrics = &self.shared.metrics;
        metrics.grpc_requests.get_or_create(&GrpcLabels { method, code: code_name(code) }).inc();
        metrics.grpc_duration.get_or_create(&MethodLabels { method }).observe(elapsed.as_secs_f64());
    }
}

/// The caller, from SO_PEERCRED on the unix socket.
fn peer_of<T>(request: &Request<T>) -> audit_log::Peer {
    let cred =
        request.extensions().get::<tonic::transport::server::UdsConnectInfo>().and_then(|i| i.peer_cred);
    match cred {
        Some(c) => audit_log::Peer { uid: Some(c.uid()), gid: Some(c.gid()), pid: c.pid() },
        None => audit_log::Peer::default(),
    }
}

/// Both packages' services, from one implementation: the messages are the same, field for field.
macro_rules! serve_package {
    ($package:ident) => {
        #[tonic::async_trait]
        impl<B: SigningBackend> $package::external_jwt_signer_server::ExternalJwtSigner for SignerService<B> {
            async fn sign(
                &self,
                request: Request<$package::SignJwtRequest>,
            ) -> Result<Response<$package::SignJwtResponse>, Status> {
                let peer = peer_of(&request);
                let claims = request.into_inner().claims;
                let signed = SignerService::sign(self, &claims, peer).await?;
                Ok(Response::new($package::SignJwtResponse {
                    header: signed.header,
                    signature: signed.signature,
                }))
            }

            async fn fetch_keys(
                &self,
                _request: Request<$package::FetchKeysRequest>,
            ) -> Result<Response<$package::FetchKeysResponse>, Status> {
                let (keys, timestamp, hint) = SignerService::fetch_keys(self)?;
                let keys = keys
                    .into_iter()
                    .map(|k| $package::Key {
                        key_id: k.key_id,
                        key: k.key,
                        exclude_from_oidc_discovery: k.exclude_from_oidc_discovery,
                    })
                    .collect();
                Ok(Response::new($package::FetchKeysResponse {
                    keys,
                    data_timestamp: Some(timestamp),
                    refresh_hint_seconds: hint,
                }))
            }

            async fn metadata(
                &self,
                _request: Request<$package::MetadataRequest>,
            ) -> Result<Response<$package::MetadataResponse>, Status> {
                Ok(Response::new($package::MetadataResponse {
                    max_token_expiration_seconds: self.max_token_expiration(),
                }))
            }
        }
    };
}

serve_package!(v1);
serve_package!(v1alpha1);
