//! The API server's AES-GCM transformers for KMS v2 data: type 1 (HKDF-SHA256 seed, extended
//! nonce) for writes and reads, type 0 (the DEK itself) for reads of 1.27/1.28 data.

use aes_gcm::{
    Aes256Gcm, AesGcm, KeyInit,
    aead::{AeadInOut, Nonce},
    aes::Aes128,
};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Random HKDF `info` bytes at the start of every type-1 value (infoSizeExtendedNonceGCM).
pub const INFO_LEN: usize = 32;
/// AES-GCM standard nonce size.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag size.
pub const TAG_LEN: usize = 16;
/// Shortest seed the API server accepts for type 1 (MinSeedSizeExtendedNonceGCM).
pub const SEED_MIN_LEN: usize = 32;

type Aes128Gcm = AesGcm<Aes128, aes_gcm::aead::consts::U12>;

/// Object data could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransformError {
    /// The GCM tag did not verify: wrong key, wrong AAD (etcd key) or tampered data.
    #[error("object data failed authentication (wrong key, wrong etcd key, or tampered data)")]
    Authentication,
    /// The data is shorter than its fixed header.
    #[error("object data is {len} bytes; at least {min} are needed")]
    DataTooShort { len: usize, min: usize },
    /// The DEK is not a valid AES key size.
    #[error("DEK is {len} bytes; AES needs 16 or 32")]
    DekLength { len: usize },
    /// The system random source failed.
    #[error("random source failed")]
    Random,
    /// The seed is shorter than the API server allows.
    #[error("DEK seed is {len} bytes; at least {SEED_MIN_LEN} are needed")]
    SeedTooShort { len: usize },
}

/// Encrypts one object as a 1.29+ API server does: `info(32) ‖ nonce(12) ‖ ciphertext ‖ tag`.
pub fn seal_with_seed(seed: &[u8], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, TransformError> {
    let mut header = [0u8; INFO_LEN + NONCE_LEN];
    getrandom::fill(&mut header).map_err(|_| TransformError::Random)?;
    let (info, nonce) = header.split_at(INFO_LEN);
    let key = derive_key(seed, info)?;
    let cipher =
        Aes256Gcm::new_from_slice(key.as_slice()).map_err(|_| TransformError::DekLength { len: 32 })?;
    let mut out = Vec::with_capacity(header.len() + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&header);
    out.extend_from_slice(plaintext);
    let mut body = out.split_off(header.len());
    cipher
        .encrypt_in_place(&nonce_from(nonce), aad, &mut body)
        .map_err(|_| TransformError::Authentication)?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decrypts a type-1 value's `encryptedData` with the DEK seed and the etcd key as AAD.
pub fn open_with_seed(seed: &[u8], data: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, TransformError> {
    if data.len() < INFO_LEN {
        return Err(TransformError::DataTooShort { len: data.len(), min: INFO_LEN });
    }
    let (info, rest) = data.split_at(INFO_LEN);
    let key = derive_key(seed, info)?;
    open_gcm(key.as_slice(), rest, aad)
}

/// Encrypts one object as a 1.27/1.28 API server did (type 0): `nonce(12) ‖ ciphertext ‖ tag`.
pub fn seal_with_dek(dek: &[u8], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, TransformError> {
    let cipher = Aes256Gcm::new_from_slice(dek).map_err(|_| TransformError::DekLength { len: dek.len() })?;
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| TransformError::Random)?;
    let mut body = plaintext.to_vec();
    cipher
        .encrypt_in_place(&nonce_from(&nonce), aad, &mut body)
        .map_err(|_| TransformError::Authentication)?;
    Ok([nonce.as_slice(), &body].concat())
}

/// Decrypts a type-0 value's `encryptedData`: `nonce(12) ‖ ciphertext ‖ tag`, key = the DEK.
pub fn open_with_dek(dek: &[u8], data: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, TransformError> {
    open_gcm(dek, data, aad)
}

/// HKDF-SHA256 Expand only (the seed is the PRK; no Extract, no salt), first 32 bytes.
fn derive_key(seed: &[u8], info: &[u8]) -> Result<Zeroizing<[u8; 32]>, TransformError> {
    if seed.len() < SEED_MIN_LEN {
        return Err(TransformError::SeedTooShort { len: seed.len() });
    }
    // NB: from_prk only fails for a PRK shorter than the hash, which the length check excludes.
    let hkdf =
        Hkdf::<Sha256>::from_prk(seed).map_err(|_| TransformError::SeedTooShort { len: seed.len() })?;
    let mut key = Zeroizing::new([0u8; 32]);
    hkdf.expand(info, key.as_mut_slice()).map_err(|_| TransformError::SeedTooShort { len: seed.len() })?;
    Ok(key)
}

fn open_gcm(key: &[u8], data: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, TransformError> {
    let min = NONCE_LEN + TAG_LEN;
    if data.len() < min {
        return Err(TransformError::DataTooShort { len: data.len(), min });
    }
    let (nonce, sealed) = data.split_at(NONCE_LEN);
    let mut buffer = Zeroizing::new(sealed.to_vec());
    match key.len() {
        32 => Aes256Gcm::new_from_slice(key)
            .map_err(|_| TransformError::DekLength { len: key.len() })?
            .decrypt_in_place(&nonce_from(nonce), aad, &mut *buffer),
        16 => Aes128Gcm::new_from_slice(key)
            .map_err(|_| TransformError::DekLength { len: key.len() })?
            .decrypt_in_place(&nonce_from(nonce), aad, &mut *buffer),
        len => return Err(TransformError::DekLength { len }),
    }
    .map_err(|_| TransformError::Authentication)?;
    Ok(buffer)
}

fn nonce_from(bytes: &[u8]) -> Nonce<Aes256Gcm> {
    let mut nonce = Nonce::<Aes256Gcm>::default();
    nonce.copy_from_slice(bytes);
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    // facts/kms-v2-vectors.md §1: TestExtendedNonceGCMLegacyDataCompatibility.
    const SEED: &str = "5d40323a820ff95561675e3b95e81867c5fdd561d35a88a2d08b08aa9d4fcf5c";
    const DATA: &str = "2442759e33945fbad709db577a0f037fd8a709fc76979b8942209debcecb9d57efe3d6ff6a1ef6ee9a5003b9833b3043cec1e47b35175b151107a8d2416b0e296bbf66b5d102fcefdf9a78f293d271";

    #[test]
    fn upstream_known_answer_type_1() {
        let plain = open_with_seed(&hex(SEED), &hex(DATA), b"bamboo").unwrap();
        assert_eq!(plain.as_slice(), b"pandas are the best");
    }

    #[test]
    fn upstream_derived_key() {
        let data = hex(DATA);
        let key = derive_key(&hex(SEED), &data[..INFO_LEN]).unwrap();
        assert_eq!(key.to_vec(), hex("6e58b7659c304b0c382f42f16bd700465def1dead80bf6f1bf1d52073bdb0c00"));
    }

    // facts/kms-v2-vectors.md §2: TestGCMLegacyDataCompatibility (AES-128, layout only).
    #[test]
    fn upstream_known_answer_plain_gcm() {
        let data = hex(
            "9f27c8fcea8a58c467d8e437dbf2d85955f9b4bd912f4ef967d788a0cb07797dac0a3f0a0845605ca85ac8562b4ae1",
        );
        let plain = open_with_dek(b"snorlax_awesomes", &data, b"bamboo").unwrap();
        assert_eq!(plain.as_slice(), b"pandas are the best");
    }

    #[test]
    fn aad_is_bound() {
        let seed = [7u8; 32];
        let sealed = seal_with_seed(&seed, b"secret object", b"/registry/secrets/a/b").unwrap();
        assert_eq!(sealed.len(), INFO_LEN + NONCE_LEN + 13 + TAG_LEN);
        assert_eq!(
            open_with_seed(&seed, &sealed, b"/registry/secrets/a/b").unwrap().as_slice(),
            b"secret object"
        );
        assert_eq!(
            open_with_seed(&seed, &sealed, b"/registry/secrets/a/c"),
            Err(TransformError::Authentication)
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            open_with_seed(&seed, &tampered, b"/registry/secrets/a/b"),
            Err(TransformError::Authentication)
        );
    }

    #[test]
    fn type_0_round_trip() {
        let dek = [9u8; 32];
        let sealed = seal_with_dek(&dek, b"object", b"/registry/secrets/a/b").unwrap();
        assert_eq!(open_with_dek(&dek, &sealed, b"/registry/secrets/a/b").unwrap().as_slice(), b"object");
        assert_eq!(
            open_with_dek(&dek, &sealed, b"/registry/secrets/a/c"),
            Err(TransformError::Authentication)
        );
    }

    #[test]
    fn short_inputs_are_errors_not_panics() {
        assert!(matches!(open_with_seed(&[1; 32], &[0; 31], b""), Err(TransformError::DataTooShort { .. })));
        assert!(matches!(open_with_seed(&[1; 32], &[0; 40], b""), Err(TransformError::DataTooShort { .. })));
        assert!(matches!(
            open_with_seed(&[1; 31], &[0; 80], b""),
            Err(TransformError::SeedTooShort { len: 31 })
        ));
        assert!(matches!(open_with_dek(&[1; 20], &[0; 40], b""), Err(TransformError::DekLength { len: 20 })));
    }
}
