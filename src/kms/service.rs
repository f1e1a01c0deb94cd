//! The `v2.KeyManagementService` gRPC service: Status from cached state, Encrypt and Decrypt
//! through the backend within the caller's deadline, every input checked against the limits the
//! API server enforces.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::{Shared, audit_log};
use crate::{
    backend::{Backend, BackendError},
    keyid::KeyId,
    proto::v2::{
        DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
        key_management_service_server::KeyManagementService,
    },
    storage,
};

/// Time kept back from the caller's deadline so our own error reaches it first.
const DEADLINE_MARGIN_MAX: Duration = Duration::from_millis(100);

/// The gRPC service over a shared plugin state.
pub struct KmsService<B> {
    shared: Arc<Shared<B>>,
}

impl<B: Backend> KmsService<B> {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared<B>>) -> Self {
        Self { shared }
    }

    /// Counts a Status call; Status is not audited.
    fn finish_status(&self, started: Instant, result: &Result<StatusResponse, Status>) {
        let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        self.shared.metrics.record_grpc("Status", code, started.elapsed().as_secs_f64());
    }

    async fn encrypt_inner(&self, plaintext: &[u8], deadline: Instant) -> Result<EncryptResponse, Status> {
        let max = self.shared.config.max_plaintext_bytes;
        if plaintext.is_empty() {
            return Err(Status::invalid_argument("plaintext is empty"));
        }
        if plaintext.len() > max {
            return Err(Status::invalid_argument(format!(
                "plaintext is {} bytes; the limit is plugin.max_plaintext_bytes = {max}",
                plaintext.len()
            )));
        }
        if let Some(reason) = self.shared.failing_fast() {
            return Err(Status::unavailable(reason));
        }
        let current = self
            .shared
            .current()
            .map_err(|reason| Status::unavailable(format!("no usable key: {reason}")))?;
        let ciphertext = self
            .shared
            .timed(
                "encrypt",
                self.shared.backend.encrypt(current.version, plaintext, current.key_id.as_bytes(), deadline),
            )
            .await
            .inspect_err(|e| self.shared.hint(e))
            .map_err(|e| match e {
                // NB: the plaintext was already checked, so a refusal here is the key store's
                // state (e.g. a node that lacks this version), never the caller's input.
                BackendError::Rejected(reason) => Status::failed_precondition(format!(
                    "key store refused to encrypt with version {}: {reason}",
                    current.version
                )),
                other => self.shared.to_status(other, current.version),
            })?;
        storage::validate_ciphertext(&ciphertext)
            .map_err(|e| Status::internal(format!("key store returned an unusable ciphertext: {e}")))?;
        Ok(EncryptResponse { ciphertext, key_id: current.key_id.clone(), annotations: Default::default() })
    }

    async fn decrypt_inner(
        &self,
        request: &DecryptRequest,
        deadline: Instant,
    ) -> Result<DecryptResponse, Status> {
        storage::validate_ciphertext(&request.ciphertext)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        storage::validate_key_id(&request.key_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        storage::validate_annotations(&request.annotations)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !request.annotations.is_empty() {
            return Err(Status::invalid_argument(
                "annotations do not match: kmsgate issues no annotations, so a ciphertext carrying them is not ours",
            ));
        }
        let id = KeyId::parse(&request.key_id)
            .map_err(|e| Status::invalid_argument(format!("unknown key_id: {e}")))?;
        let ours = self.shared.backend.scope();
        if id.scope != *ours {
            return Err(Status::invalid_argument(format!(
                "key_id belongs to another key ({} {:?} {:?}/{:?}); this plugin serves {} {:?} {:?}/{:?}",
                id.scope.kind.as_str(),
                id.scope.identity,
                id.scope.mount,
                id.scope.key,
                ours.kind.as_str(),
                ours.identity,
                ours.mount,
                ours.key
            )));
        }
        let recreated = self.shared.check_known_version(&id)?;
        if let Some(reason) = self.shared.failing_fast() {
            return Err(Status::unavailable(reason));
        }
        // NB: a key_id whose creation time no longer matches still goes to the key store. Between
        // a key's recreation and the next poll, Encrypt wrapped seeds with the new key under the
        // old key_id; AES-GCM authentication over the key_id tells those from the deleted key's
        // ciphertexts, so the key store decides, and the conflict is reported only if it refuses.
        let plaintext = self
            .shared
            .timed(
                "decrypt",
                self.shared.backend.decrypt(
                    id.version,
                    &request.ciphertext,
                    request.key_id.as_bytes(),
                    deadline,
                ),
            )
            .await
            .inspect_err(|e| self.shared.hint(e))
            .map_err(|e| match (e, recreated) {
                (BackendError::Rejected(_), Some(conflict)) => Status::invalid_argument(conflict),
                (e, _) => self.shared.to_status(e, id.version),
            })?;
        // NB: the response owns a plain Vec; tonic encodes and drops it. Our copy is zeroized.
        Ok(DecryptResponse { plaintext: plaintext.to_vec() })
    }
}

#[tonic::async_trait]
impl<B: Backend> KeyManagementService for KmsService<B> {
    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let started = Instant::now();
        let result = match self.shared.conflict() {
            // NB: only a gRPC error stops the API server's writes (a non-ok healthz with the same
            // key_id extends its seed), and it also fails /readyz on every API server at once. So
            // it is kept for the one case where writing stores data that can never be read back.
            Some(conflict) => Err(Status::failed_precondition(format!("key conflict: {conflict}"))),
            None => {
                let (healthz, key_id) = self.shared.status_now();
                Ok(StatusResponse {
                    version: self.shared.config.status_version.as_str().to_owned(),
                    healthz,
                    key_id,
                })
            }
        };
        self.finish_status(started, &result);
        result.map(Response::new)
    }

    async fn encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        let deadline = deadline_of(&request, self.shared.config.default_deadline);
        let peer = peer_of(&request);
        let EncryptRequest { plaintext, uid } = request.into_inner();
        let call = self.shared.begin("Encrypt", short(&uid), "", peer);
        let plaintext = Zeroizing::new(plaintext);
        let result = self.encrypt_inner(&plaintext, deadline).await;
        call.finish(&result, result.as_ref().map_or("", |r| r.key_id.as_str()));
        result.map(Response::new)
    }

    async fn decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        let deadline = deadline_of(&request, self.shared.config.default_deadline);
        let peer = peer_of(&request);
        let request = request.into_inner();
        let key_id: String = request.key_id.chars().take(storage::KEY_ID_MAX_BYTES).collect();
        let call = self.shared.begin("Decrypt", short(&request.uid), &key_id, peer);
        let result = self.decrypt_inner(&request, deadline).await;
        call.finish(&result, "");
        result.map(Response::new)
    }
}

impl<B: Backend> Shared<B> {
    /// Why Status must fail at the gRPC level, if it must.
    fn conflict(&self) -> Option<String> {
        self.lock().tracker.conflict().map(str::to_owned)
    }

    /// Wakes the metadata poll when a key store answer could mean the key changed under us
    /// (deleted, recreated, retired or trimmed), so the key_id follows within one round trip
    /// instead of one `poll_interval`; an outage or a deadline says nothing about the key.
    fn hint(&self, error: &BackendError) {
        if !matches!(error, BackendError::Deadline | BackendError::Unavailable(_)) {
            self.repoll.notify_one();
        }
    }

    /// Maps a backend error to the gRPC status the API server sees.
    fn to_status(&self, error: BackendError, version: u64) -> Status {
        match error {
            BackendError::Deadline => Status::deadline_exceeded(error.to_string()),
            BackendError::KeyNotFound(_) => Status::failed_precondition(error.to_string()),
            BackendError::Misconfigured(_) => Status::failed_precondition(error.to_string()),
            BackendError::PermissionDenied(_) => Status::permission_denied(error.to_string()),
            BackendError::Protocol(_) => Status::internal(error.to_string()),
            BackendError::Rejected(_) => Status::invalid_argument(error.to_string()),
            BackendError::Retired(reason) => {
                let min = self.lock().metadata.as_ref().map(|m| m.min_decryption_version);
                Status::failed_precondition(retired_message(version, min, &reason))
            }
            BackendError::Unavailable(_) => Status::unavailable(error.to_string()),
        }
    }

    /// Refuses, before calling the key store, a version the last poll showed retired. For a version
    /// the last poll showed with another creation time, returns the conflict to report if the key
    /// store refuses the ciphertext.
    fn check_known_version(&self, id: &KeyId) -> Result<Option<String>, Status> {
        let state = self.lock();
        let Some(meta) = &state.metadata else { return Ok(None) };
        if id.version < meta.min_decryption_version {
            return Err(Status::failed_precondition(retired_message(
                id.version,
                Some(meta.min_decryption_version),
                "",
            )));
        }
        Ok(meta.versions.get(&id.version).filter(|created| **created != id.created).map(|created| {
            format!(
                "key_id names version {} created at {}, but the key's version {} was created at {}: the key was \
                 recreated and this ciphertext cannot be decrypted",
                id.version, id.created, id.version, created
            )
        }))
    }
}

/// Names the retired version, and the key's floor where the last poll saw one above it.
fn retired_message(version: u64, min_decryption_version: Option<u64>, reason: &str) -> String {
    match min_decryption_version {
        Some(min) if min > version => {
            format!("key version {version} is retired: the key's min_decryption_version is {min}")
        }
        _ => format!("key version {version} is retired: {reason}"),
    }
}

/// The API server's deadline (grpc-timeout), less a margin, or the configured default.
fn deadline_of<T>(request: &Request<T>, default: Duration) -> Instant {
    let timeout = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(default);
    let margin = (timeout / 20).min(DEADLINE_MARGIN_MAX);
    Instant::now() + timeout.saturating_sub(margin)
}

/// Parses the gRPC `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn peer_of<T>(request: &Request<T>) -> audit_log::Peer {
    let cred =
        request.extensions().get::<tonic::transport::server::UdsConnectInfo>().and_then(|i| i.peer_cred);
    match cred {
        Some(c) => audit_log::Peer { uid: Some(c.uid()), gid: Some(c.gid()), pid: c.pid() },
        None => audit_log::Peer::default(),
    }
}

/// The uid is caller-chosen; cap what reaches logs.
fn short(uid: &str) -> &str {
    match uid.char_indices().nth(128) {
        Some((i, _)) => &uid[..i],
        None => uid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("2999m"), Some(Duration::from_millis(2999)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("500u"), Some(Duration::from_micros(500)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    #[test]
    fn uid_is_capped() {
        assert_eq!(short("abc"), "abc");
        assert_eq!(short(&"é".repeat(300)).chars().count(), 128);
    }
}
