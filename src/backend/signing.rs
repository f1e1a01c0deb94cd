//! The seam between the ExternalJWTSigner service and a key store that signs: the key's versions
//! with their public keys, and a signature made with an explicit version. Both the `vault`
//! (Transit) and the `local` keyring signing stores implement it, so the signer's rules (which
//! version signs, which keys are published) are written once, above it.

use std::{collections::BTreeMap, future::Future};

use tokio::time::Instant;

use super::{BackendError, KeyMetadata};
pub use crate::jwt::PublicKey;
use crate::{jwt::Alg, keyid::KeyScope};

/// What a signing key store knows about the key a signer serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyMetadata {
    /// Versions with their creation times, and the floors: the same shape the KMS plugin
    /// tracks, so the same rollback and recreated-key rules apply. For a signing key,
    /// `min_encryption_version` is the oldest version allowed to sign (0 = not pinned) and
    /// `min_decryption_version` the oldest one still published.
    pub key: KeyMetadata,
    /// The public key of each version from `min_decryption_version` to the latest.
    pub public_keys: BTreeMap<u64, PublicKey>,
}

/// A key store the signer signs service-account tokens with.
pub trait SigningBackend: Send + Sync + 'static {
    /// The key this backend serves.
    fn scope(&self) -> &KeyScope;

    /// Reads the key's versions, their public keys and the floors.
    fn metadata(
        &self,
        deadline: Instant,
    ) -> impl Future<Output = Result<SigningKeyMetadata, BackendError>> + Send;

    /// Signs `input` (the JWS signing input, `header "." claims`) with exactly `version`, whose
    /// algorithm is `alg`, and returns the raw JWS signature bytes: r‖s for ECDSA, the PKCS#1
    /// v1.5 signature for RSA.
    fn sign(
        &self,
        version: u64,
        alg: Alg,
        input: &[u8],
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<u8>, BackendError>> + Send;
}
