//! The `vault` backend: Vault/OpenBao Transit encrypt and decrypt with an explicit key version
//! and the key_id as associated data, plus the key operations the rotation controller needs; and
//! beside it the signer's Transit store, [`SigningTransit`].

mod auth;
mod batch;
mod client;
mod error;
mod signing;
mod tls;

use std::{collections::BTreeMap, sync::Arc};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use reqwest::Method;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use zeroize::Zeroizing;

pub use client::VaultClient;
pub use error::ClientError;
pub use signing::{SigningTransit, read_signing_key};

use crate::{
    backend::{Backend, BackendError, KeyMetadata},
    ciphertext::{self, VAULT_TAG},
    keyid::{BackendKind, KeyScope},
};

/// Transit key types that authenticate associated data.
const AEAD_TYPES: &[&str] = &["aes128-gcm96", "aes256-gcm96", "chacha20-poly1305"];

/// One Transit key, served as a [`Backend`].
#[derive(Debug)]
pub struct Transit {
    client: Arc<VaultClient>,
    scope: KeyScope,
    decrypts: batch::DecryptQueue,
    /// `{mount}/encrypt/{key}`, built once rather than per call.
    encrypt_path: String,
    /// `{mount}/decrypt/{key}`.
    decrypt_path: String,
}

#[derive(Deserialize)]
struct KeyData {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    derived: bool,
    keys: BTreeMap<String, serde_json::Value>,
    latest_version: u64,
    #[serde(default)]
    min_decryption_version: u64,
    #[serde(default)]
    min_encryption_version: u64,
}

impl Transit {
    /// Serves key `key` on Transit mount `mount` through `client`.
    pub fn new(client: Arc<VaultClient>, identity: &str, namespace: &str, mount: &str, key: &str) -> Self {
        let scope = KeyScope {
            kind: BackendKind::Transit,
            identity: identity.to_owned(),
            namespace: namespace.to_owned(),
            mount: mount.to_owned(),
            key: key.to_owned(),
        };
        Self {
            client,
            encrypt_path: format!("{mount}/encrypt/{key}"),
            decrypt_path: format!("{mount}/decrypt/{key}"),
            scope,
            decrypts: batch::DecryptQueue::default(),
        }
    }

    /// The underlying Vault client (the controller reuses it).
    pub fn client(&self) -> &VaultClient {
        &self.client
    }

    /// Creates a new key version (Transit `rotate`); needs an identity allowed to rotate.
    pub async fn rotate(&self, deadline: Instant) -> Result<(), BackendError> {
        let path = format!("{}/keys/{}/rotate", self.scope.mount, self.scope.key);
        self.call(Method::POST, &path, Some(b"{}".to_vec()), deadline).await.map(drop)
    }

    /// Raises `min_decryption_version`, retiring every older version.
    pub async fn set_min_decryption_version(
        &self,
        version: u64,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let path = format!("{}/keys/{}/config", self.scope.mount, self.scope.key);
        let body = json!({ "min_decryption_version": version }).to_string().into_bytes();
        self.call(Method::POST, &path, Some(body), deadline).await.map(drop)
    }

    /// Sets `min_encryption_version`: `version` pins signing or encryption to that version and
    /// newer, 0 unpins. Transit refuses a pin below `min_decryption_version` or above the latest
    /// version; both come back as [`BackendError::Rejected`] naming the floors.
    pub async fn set_min_encryption_version(
        &self,
        version: u64,
        deadline: Instant,
    ) -> Result<(), BackendError> {
        let path = format!("{}/keys/{}/config", self.scope.mount, self.scope.key);
        let body = json!({ "min_encryption_version": version }).to_string().into_bytes();
        match self.client.call(Method::POST, &path, Some(&body), deadline).await {
            Ok(_) => Ok(()),
            Err(ClientError::Api { status: 400, message, .. }) => Err(BackendError::Rejected(format!(
                "Transit key {:?} refused min_encryption_version {version}: it must lie between \
                 min_decryption_version and latest_version (Transit says: {})",
                self.scope.key,
                crate::error::clipped(message.trim().to_owned(), 300)
            ))),
            Err(e) => Err(map_error(e)),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        deadline: Instant,
    ) -> Result<serde_json::Value, BackendError> {
        let body = body.map(Zeroizing::new);
        self.client.call(method, path, body.as_deref().map(Vec::as_slice), deadline).await.map_err(map_error)
    }
}

impl Backend for Transit {
    fn scope(&self) -> &KeyScope {
        &self.scope
    }

    fn max_ciphertext_len(&self, plaintext_len: usize) -> usize {
        ciphertext::versioned_len(VAULT_TAG, plaintext_len)
    }

    async fn metadata(&self, deadline: Instant) -> Result<KeyMetadata, BackendError> {
        let data = read_key(&self.client, &self.scope.mount, &self.scope.key, deadline).await?;
        let key: KeyData = serde_json::from_value(data)
            .map_err(|e| BackendError::Protocol(format!("key metadata does not parse: {e}")))?;
        if !AEAD_TYPES.contains(&key.kind.as_str()) {
            return Err(BackendError::Misconfigured(format!(
                "Transit key {:?} has type {:?}; kmsgate needs one of {AEAD_TYPES:?} (associated data)",
                self.scope.key, key.kind
            )));
        }
        if key.derived {
            return Err(BackendError::Misconfigured(format!(
                "Transit key {:?} is a derived key; kmsgate needs a non-derived key",
                self.scope.key
            )));
        }
        let mut versions = BTreeMap::new();
        for (version, created) in key.keys {
            let version: u64 = version
                .parse()
                .map_err(|_| BackendError::Protocol(format!("key version {version:?} is not a number")))?;
            versions.insert(
                version,
                creation_time(&created).ok_or_else(|| {
                    BackendError::Protocol(format!("key version {version} has no readable creation time"))
                })?,
            );
        }
        if !versions.contains_key(&key.latest_version) {
            return Err(BackendError::Protocol(format!(
                "latest_version {} is not among the key's versions",
                key.latest_version
            )));
        }
        Ok(KeyMetadata {
            versions,
            latest: key.latest_version,
            min_decryption_version: key.min_decryption_version.max(1),
            min_encryption_version: key.min_encryption_version,
        })
    }

    async fn encrypt(
        &self,
        version: u64,
        plaintext: &[u8],
        aad: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, BackendError> {
        #[derive(Deserialize)]
        struct Encrypted {
            ciphertext: String,
            key_version: Option<u64>,
        }
        let body = encrypt_body(plaintext, aad, version);
        let data = self
            .client
            .call(Method::POST, &self.encrypt_path, Some(&body), deadline)
            .await
            .map_err(map_error)?;
        let out: Encrypted = serde_json::from_value(data)
            .map_err(|e| BackendError::Protocol(format!("encrypt answer does not parse: {e}")))?;
        let made_by = ciphertext::version(VAULT_TAG, out.ciphertext.as_bytes()).map(|(v, _)| v);
        if made_by != Some(version) || out.key_version.is_some_and(|v| v != version) {
            return Err(BackendError::Protocol(format!(
                "asked Transit to encrypt with version {version}, but it used {made_by:?}"
            )));
        }
        Ok(out.ciphertext.into_bytes())
    }

    async fn decrypt(
        &self,
        version: u64,
        ciphertext: &[u8],
        aad: &[u8],
        deadline: Instant,
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let (made_by, _) = ciphertext::version(VAULT_TAG, ciphertext)
            .ok_or_else(|| BackendError::Rejected("ciphertext is not a Transit ciphertext".into()))?;
        if made_by != version {
            return Err(BackendError::Rejected(format!(
                "ciphertext was made by key version {made_by}, but key_id names version {version}"
            )));
        }
        let ciphertext = std::str::from_utf8(ciphertext)
            .map_err(|_| BackendError::Rejected("ciphertext is not a Transit ciphertext".into()))?;
        self.decrypts.decrypt(&self.client, &self.decrypt_path, ciphertext, aad, deadline).await
    }
}

/// `data` of `GET <mount>/keys/<key>`, the one read of a key's metadata for the KMS backend and
/// the signing store alike.
pub(crate) async fn read_key(
    client: &VaultClient,
    mount: &str,
    key: &str,
    deadline: Instant,
) -> Result<serde_json::Value, BackendError> {
    let path = format!("{mount}/keys/{key}");
    // NB: only here is a 404 known to mean the key itself: openbao
    // builtin/logical/transit/path_keys.go, pathPolicyRead, answers a missing policy with no
    // response, which the router turns into 404. Elsewhere it may be a wrong mount or path.
    match client.call(Method::GET, &path, None, deadline).await {
        Ok(data) => Ok(data),
        Err(ClientError::Api { status: 404, address, .. }) => Err(BackendError::KeyNotFound(format!(
            "{address}: Transit key {key:?} on mount {mount:?} not found (HTTP 404)"
        ))),
        Err(e) => Err(map_error(e)),
    }
}

/// The Transit encrypt request body, written straight into one zeroized buffer sized up front (so
/// it never reallocates and leaves a copy of the plaintext behind). Base64 and a number need no
/// JSON escaping.
fn encrypt_body(plaintext: &[u8], aad: &[u8], version: u64) -> Zeroizing<Vec<u8>> {
    const HEAD: &[u8] = br#"{"plaintext":""#;
    const MIDDLE: &[u8] = br#"","associated_data":""#;
    const TAIL: &[u8] = br#"","key_version":"#;
    let b64_len = |n: usize| n.div_ceil(3) * 4;
    let capacity =
        HEAD.len() + MIDDLE.len() + TAIL.len() + b64_len(plaintext.len()) + b64_len(aad.len()) + 21;
    let mut body = Zeroizing::new(Vec::with_capacity(capacity));
    body.extend_from_slice(HEAD);
    push_base64(&mut body, plaintext);
    body.extend_from_slice(MIDDLE);
    push_base64(&mut body, aad);
    body.extend_from_slice(TAIL);
    body.extend_from_slice(version.to_string().as_bytes());
    body.push(b'}');
    body
}

/// Appends `data` in base64 within `body`'s capacity.
fn push_base64(body: &mut Vec<u8>, data: &[u8]) {
    let start = body.len();
    body.resize(start + data.len().div_ceil(3) * 4, 0);
    // NB: the slice is exactly the padded encoded length, which encode_slice never exceeds.
    let written = B64.encode_slice(data, &mut body[start..]).unwrap_or(0);
    body.truncate(start + written);
}

/// Symmetric Transit keys report creation as Unix seconds; asymmetric ones as an object with
/// an RFC 3339 `creation_time`. Only the former carry AEAD keys, but accept both shapes.
fn creation_time(value: &serde_json::Value) -> Option<u64> {
    value.as_u64().or_else(|| {
        let text = value.get("creation_time")?.as_str()?;
        let when = humantime::parse_rfc3339_weak(text.split('.').next()?.trim_end_matches('Z')).ok()?;
        when.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
    })
}

pub(crate) fn map_error(error: ClientError) -> BackendError {
    match error {
        ClientError::Deadline => BackendError::Deadline,
        ClientError::Api { status: 400, message, .. } => {
            let lower = message.to_ascii_lowercase();
            if lower.contains("too old") || lower.contains("less than the minimum") {
                BackendError::Retired(message)
            } else {
                BackendError::Rejected(message)
            }
        }
        ClientError::Api { status: 403, message, .. } => BackendError::PermissionDenied(message),
        ClientError::Api { status: 404, address, .. } => {
            BackendError::Misconfigured(format!("{address}: Transit mount or key not found (HTTP 404)"))
        }
        e @ (ClientError::Api { .. } | ClientError::Transport { .. }) => {
            BackendError::Unavailable(e.to_string())
        }
        e @ ClientError::Decode { .. } => BackendError::Protocol(e.to_string()),
        e @ (ClientError::CredentialFile { .. }
        | ClientError::NoToken { .. }
        | ClientError::Setup(_)
        | ClientError::TlsFile { .. }) => BackendError::Misconfigured(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_time_shapes() {
        assert_eq!(creation_time(&json!(1_700_000_000u64)), Some(1_700_000_000));
        assert_eq!(
            creation_time(&json!({"creation_time": "2023-11-14T22:13:20.123456789Z"})),
            Some(1_700_000_000)
        );
        assert_eq!(creation_time(&json!("soon")), None);
    }

    #[test]
    fn encrypt_body_is_the_json_transit_reads_and_never_reallocates() {
        for n in [0usize, 1, 2, 3, 32, 100, 1000] {
            let plaintext: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let body = encrypt_body(&plaintext, b"key-id", u64::MAX);
            let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                parsed,
                json!({
                    "plaintext": B64.encode(&plaintext),
                    "associated_data": B64.encode(b"key-id"),
                    "key_version": u64::MAX,
                })
            );
            assert!(body.len() <= body.capacity() && body.capacity() <= body.len() + 21, "{n}");
        }
    }

    #[test]
    fn vault_errors_map_to_backend_errors() {
        let api = |status, message: &str| ClientError::Api {
            address: "https://v".into(),
            status,
            message: message.into(),
        };
        assert!(matches!(
            map_error(api(400, "ciphertext or signature version is disallowed by policy (too old)")),
            BackendError::Retired(_)
        ));
        assert!(matches!(
            map_error(api(400, "cipher: message authentication failed")),
            BackendError::Rejected(_)
        ));
        assert!(matches!(map_error(api(403, "permission denied")), BackendError::PermissionDenied(_)));
        assert!(matches!(map_error(api(503, "Vault is sealed")), BackendError::Unavailable(_)));
        assert!(matches!(map_error(api(404, "")), BackendError::Misconfigured(_)));
        assert!(matches!(map_error(ClientError::Deadline), BackendError::Deadline));
    }
}
