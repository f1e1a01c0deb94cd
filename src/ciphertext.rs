//! The `<tag>:v<version>:<base64>` ciphertext layout both key stores write. It is stored in etcd
//! (inside every KMS v2 object's DEK source) for as long as the data lives, so it is frozen, and
//! it sits at the bottom so config can bound `plugin.max_plaintext_bytes` without a key store.

/// The tag of the local keyring's ciphertexts: `local:v<N>:`.
pub const LOCAL_TAG: &str = "local";
/// The tag Transit puts on its ciphertexts: `vault:v<N>:`.
pub const VAULT_TAG: &str = "vault";

/// The longest `<tag>:v<version>:<base64(nonce ‖ plaintext ‖ tag)>` for a plaintext length, with
/// room for a 20-digit version. Both backends use this Vault-style layout.
pub const fn versioned_len(tag: &str, plaintext_len: usize) -> usize {
    const NONCE_AND_TAG: usize = 12 + 16;
    tag.len() + ":v".len() + 20 + ":".len() + (plaintext_len + NONCE_AND_TAG).div_ceil(3) * 4
}

/// Reads the version out of a `<tag>:v<version>:<rest>` ciphertext.
pub fn version<'a>(tag: &str, ciphertext: &'a [u8]) -> Option<(u64, &'a [u8])> {
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
    fn version_parses_only_canonical_prefixes() {
        assert_eq!(version("vault", b"vault:v12:abc"), Some((12, &b"abc"[..])));
        assert_eq!(version("vault", b"vault:v012:abc"), None);
        assert_eq!(version("vault", b"vault:v:abc"), None);
        assert_eq!(version("vault", b"vault:12:abc"), None);
        assert_eq!(version("vault", b"local:v1:abc"), None);
        assert_eq!(version("vault", b"vault:v1"), None);
    }

    #[test]
    fn worst_case_length_covers_a_real_layout() {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode([0u8; 12 + 32 + 16]);
        let real = format!("vault:v{}:{body}", u64::MAX);
        assert!(real.len() <= versioned_len("vault", 32));
    }
}
