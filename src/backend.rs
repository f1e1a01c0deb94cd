//! The seam between the KMS service and a key store: key metadata, encrypt and decrypt with an
//! explicit key version, each bounded by the caller's deadline.

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

/// The longest `<tag>:v<version>:<base64(nonce ‖ plaintext ‖ tag)>` for a plaintext length, with
/// room for a 20-digit version. Both backends use this Vault-style layout.
pub fn versioned_ciphertext_len(tag: &str, plaintext_len: usize) -> usize {
    const NONCE_AND_TAG: usize = 12 + 16;
    tag.len() + ":v".len() + 20 + ":".len() + (plaintext_len + NONCE_AND_TAG).div_ceil(3) * 4
}

/// Reads the version out of a `<tag>:v<version>:<rest>` ciphertext.
pub fn ciphertext_version<'a>(tag: &str, ciphertext: &'a [u8]) -> Option<(u64, &'a [u8])> {
    let rest = ciphertext.strip_prefix(tag.as_bytes())?.strip_prefix(b":v")?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let digits = std::str::from_utf8(&rest[..colon]).ok()?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, &rest[colon + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciphertext_version_parses_only_canonical_prefixes() {
        assert_eq!(ciphertext_version("vault", b"vault:v12:abc"), Some((12, &b"abc"[..])));
        assert_eq!(ciphertext_version("vault", b"vault:v012:abc"), None);
        assert_eq!(ciphertext_version("vault", b"vault:v:abc"), None);
        assert_eq!(ciphertext_version("vault", b"vault:12:abc"), None);
        assert_eq!(ciphertext_version("vault", b"local:v1:abc"), None);
        assert_eq!(ciphertext_version("vault", b"vault:v1"), None);
    }

    #[test]
    fn worst_case_length_covers_a_real_layout() {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode([0u8; 12 + 32 + 16]);
        let real = format!("vault:v{}:{body}", u64::MAX);
        assert!(real.len() <= versioned_ciphertext_len("vault", 32));
    }
}
