//! The seam between the KMS service and a key store: key metadata, encrypt and decrypt with an
//! explicit key version, each bounded by the caller's deadline; and its sibling for the signer,
//! [`SigningBackend`], which signs with an explicit key version.

mod signing;

pub use signing::{PublicKey, SigningBackend, SigningKeyMetadata};

use std::{collections::BTreeMap, future::Future};

use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::keyid::KeyScope;

/// What a key store knows about the key a plugin serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMetadata {
    /// Every version that still exists, with its creation time (Unix seconds).
    pub versions: BTreeMap<u64, u64>,
    /// The newest version.
    pub latest: u64,
    /// Versions below this cannot decrypt (Transit `min_decryption_version`); 1 when none retired.
    pub min_decryption_version: u64,
    /// Versions below this cannot encrypt (Transit `min_encryption_version`); 0 means latest only.
    pub min_encryption_version: u64,
}

impl KeyMetadata {
    /// The creation time of the latest version.
    pub fn latest_created(&self) -> Option<u64> {
        self.versions.get(&self.latest).copied()
    }
}

/// A backend call failed. Messages carry no key material, plaintext, ciphertext or token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The call did not finish before the caller's deadline.
    #[error("key store did not answer before the deadline")]
    Deadline,
    /// The key store answered that the key does not exist (deleted, or never made).
    #[error("key store has no such key: {0}")]
    KeyNotFound(String),
    /// The key store's configuration or key is unusable (wrong key type, missing key, ...).
    #[error("key store is misconfigured: {0}")]
    Misconfigured(String),
    /// The key store refused the call for lack of permission.
    #[error("key store denied permission: {0}")]
    PermissionDenied(String),
    /// The key store answered something this code cannot understand.
    #[error("key store answered unexpectedly: {0}")]
    Protocol(String),
    /// The key store refused the ciphertext: tampered, wrong key_id, or not ours.
    #[error("ciphertext was rejected: {0}")]
    Rejected(String),
    /// The key version is retired (below `min_decryption_version` / `min_encryption_version`).
    #[error("key version is retired: {0}")]
    Retired(String),
    /// The key store could not be reached or is not serving (network, sealed, 5xx).
    #[error("key store is unavailable: {0}")]
    Unavailable(String),
}

impl BackendError {
    /// The failure's name as a metric label (`outcome`), the same for every server and key store.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Deadline => "deadline",
            Self::KeyNotFound(_) => "key_not_found",
            Self::Misconfigured(_) => "misconfigured",
            Self::PermissionDenied(_) => "permission_denied",
            Self::Protocol(_) => "protocol",
            Self::Rejected(_) => "rejected",
            Self::Retired(_) => "retired",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

/// A key store the plugin can wrap DEK seeds with.
pub trait Backend: Send + Sync + 'static {
    /// The key this backend serves; with a version it makes a key_id.
    fn scope(&self) -> &KeyScope;

    /// The longest ciphertext `encrypt` can return for a plaintext of `plaintext_len` bytes.
    fn max_ciphertext_len(&self, plaintext_len: usize) -> usize;

    /// Reads the key's versions and retirement floors.
    fn metadata(&self, deadline: Instant) -> impl Future<Output = Result<KeyMetadata, BackendError>> + Send;

    /// Encrypts with exactly `version`, binding `aad`.
    fn encrypt(
        &self,
        version: u64,
        plaintext: &[u8],
        aad: &[u8],
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<u8>, BackendError>> + Send;

    /// Decrypts a ciphertext that `encrypt` made with `version` and `aad`.
    fn decrypt(
        &self,
        version: u64,
        ciphertext: &[u8],
        aad: &[u8],
        deadline: Instant,
    ) -> impl Future<Output = Result<Zeroizing<Vec<u8>>, BackendError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_its_own_outcome_label() {
        let all = [
            BackendError::Deadline,
            BackendError::KeyNotFound(String::new()),
            BackendError::Misconfigured(String::new()),
            BackendError::PermissionDenied(String::new()),
            BackendError::Protocol(String::new()),
            BackendError::Rejected(String::new()),
            BackendError::Retired(String::new()),
            BackendError::Unavailable(String::new()),
        ];
        let labels: std::collections::BTreeSet<&str> = all.iter().map(BackendError::outcome).collect();
        assert_eq!(labels.len(), all.len());
        assert!(!labels.contains("ok"), "ok is the success label");
        assert!(labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')), "{labels:?}");
    }
}
