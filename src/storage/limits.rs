//! The size and shape limits kube-apiserver enforces on every KMS v2 response and stored object
//! (`kmsv2/envelope.go`, `ValidateEncryptedObject`).

use std::collections::HashMap;

/// Longest key_id the API server accepts (KeyIDMaxSize).
pub const KEY_ID_MAX_BYTES: usize = 1024;
/// Longest encrypted DEK source (the plugin's `ciphertext`) the API server accepts.
pub const CIPHERTEXT_MAX_BYTES: usize = 1024;
/// Largest total of annotation key and value lengths the API server accepts.
pub const ANNOTATIONS_MAX_BYTES: usize = 32 * 1024;

const DNS1123_SUBDOMAIN_MAX: usize = 253;
const DNS1123_LABEL_MAX: usize = 63;

/// A value breaks one of the API server's KMS v2 limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// The annotation key is not a fully qualified DNS name the API server accepts.
    #[error("annotation key {key:?} is invalid: {reason}")]
    AnnotationKey { key: String, reason: &'static str },
    /// The annotations are larger than the API server accepts.
    #[error("annotations total {size} bytes; the limit is {ANNOTATIONS_MAX_BYTES} bytes")]
    AnnotationsTooLarge { size: usize },
    /// The ciphertext is empty.
    #[error("ciphertext is empty")]
    CiphertextEmpty,
    /// The ciphertext is longer than the API server accepts.
    #[error("ciphertext is {len} bytes; the limit is {CIPHERTEXT_MAX_BYTES} bytes")]
    CiphertextTooLong { len: usize },
    /// The key_id is empty.
    #[error("key_id is empty")]
    KeyIdEmpty,
    /// The key_id is longer than the API server accepts.
    #[error("key_id is {len} bytes; the limit is {KEY_ID_MAX_BYTES} bytes")]
    KeyIdTooLong { len: usize },
}

/// Checks a key_id as the API server checks Status and Encrypt responses.
pub fn validate_key_id(key_id: &str) -> Result<(), LimitError> {
    match key_id.len() {
        0 => Err(LimitError::KeyIdEmpty),
        len if len > KEY_ID_MAX_BYTES => Err(LimitError::KeyIdTooLong { len }),
        _ => Ok(()),
    }
}

/// Checks an encrypted DEK source (the plugin's `ciphertext`).
pub fn validate_ciphertext(ciphertext: &[u8]) -> Result<(), LimitError> {
    match ciphertext.len() {
        0 => Err(LimitError::CiphertextEmpty),
        len if len > CIPHERTEXT_MAX_BYTES => Err(LimitError::CiphertextTooLong { len }),
        _ => Ok(()),
    }
}

/// Checks annotation keys (FQDNs with at least two labels, no `/`) and their total size.
pub fn validate_annotations(annotations: &HashMap<String, Vec<u8>>) -> Result<(), LimitError> {
    let mut size = 0usize;
    // NB: the smallest invalid key is reported, so the same value always gets the same reason
    // whatever order the map iterates in.
    let mut invalid: Option<(&str, &'static str)> = None;
    for (key, value) in annotations {
        if let Err(reason) = fully_qualified_domain_name(key)
            && invalid.is_none_or(|(smallest, _)| key.as_str() < smallest)
        {
            invalid = Some((key, reason));
        }
        size = size.saturating_add(key.len()).saturating_add(value.len());
    }
    if let Some((key, reason)) = invalid {
        // NB: keys are public (stored in etcd in plaintext), so they may appear in errors;
        // cap the length so a hostile caller cannot make huge error strings.
        return Err(LimitError::AnnotationKey { key: key.chars().take(64).collect(), reason });
    }
    if size > ANNOTATIONS_MAX_BYTES {
        return Err(LimitError::AnnotationsTooLarge { size });
    }
    Ok(())
}

/// apimachinery's `IsFullyQualifiedDomainName`: a lowercase RFC 1123 subdomain with at least two
/// labels; one trailing dot is tolerated.
fn fully_qualified_domain_name(name: &str) -> Result<(), &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > DNS1123_SUBDOMAIN_MAX {
        return Err("it is longer than 253 characters");
    }
    if name.contains('/') {
        return Err("it contains '/'");
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err("it needs at least two segments separated by dots");
    }
    for label in labels {
        if label.is_empty() || label.len() > DNS1123_LABEL_MAX {
            return Err("each dot-separated label must be 1 to 63 characters");
        }
        let bytes = label.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !bytes.iter().all(|&b| alnum(b) || b == b'-') {
            return Err("it may contain only lowercase letters, digits, '-' and '.'");
        }
        if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return Err("each label must start and end with a letter or digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(key: &str, value: &[u8]) -> HashMap<String, Vec<u8>> {
        HashMap::from([(key.to_owned(), value.to_vec())])
    }

    #[test]
    fn key_id_limits() {
        assert_eq!(validate_key_id(""), Err(LimitError::KeyIdEmpty));
        assert!(validate_key_id(&"a".repeat(1024)).is_ok());
        assert_eq!(validate_key_id(&"a".repeat(1025)), Err(LimitError::KeyIdTooLong { len: 1025 }));
    }

    #[test]
    fn ciphertext_limits() {
        assert_eq!(validate_ciphertext(b""), Err(LimitError::CiphertextEmpty));
        assert!(validate_ciphertext(&[1; 1024]).is_ok());
        assert_eq!(validate_ciphertext(&[1; 1025]), Err(LimitError::CiphertextTooLong { len: 1025 }));
    }

    #[test]
    fn annotation_keys_follow_the_api_server() {
        assert!(validate_annotations(&one("local-kek.kms.kubernetes.io", b"x")).is_ok());
        assert!(validate_annotations(&one("auditid.kms.example.io.", b"x")).is_ok());
        for bad in [
            "invalid",
            "kms.example.io/remote-kms-auditid",
            "Upper.example.io",
            "-a.example.io",
            "a..b",
            "",
            "under_score.io",
        ] {
            assert!(
                matches!(validate_annotations(&one(bad, b"x")), Err(LimitError::AnnotationKey { .. })),
                "{bad:?} should be refused"
            );
        }
        let long_label = format!("{}.io", "a".repeat(64));
        assert!(validate_annotations(&one(&long_label, b"")).is_err());
    }

    /// Found by the classifier's property test: with several invalid keys, the reason named
    /// whichever the map's random order met first.
    #[test]
    fn the_same_annotations_always_get_the_same_reason() {
        let keys = ["zz", "b/c.io", "Upper.io", "a", "m_n.io", "-x.io"];
        for _ in 0..20 {
            let annotations: HashMap<String, Vec<u8>> =
                keys.iter().map(|k| (k.to_string(), vec![])).collect();
            assert!(
                matches!(
                    validate_annotations(&annotations),
                    Err(LimitError::AnnotationKey { ref key, .. }) if key == "-x.io"
                ),
                "{:?}",
                validate_annotations(&annotations)
            );
        }
    }

    #[test]
    fn annotations_total_size() {
        let key = "a.example.io";
        assert!(validate_annotations(&one(key, &vec![0; ANNOTATIONS_MAX_BYTES - key.len()])).is_ok());
        assert_eq!(
            validate_annotations(&one(key, &vec![0; ANNOTATIONS_MAX_BYTES])),
            Err(LimitError::AnnotationsTooLarge { size: ANNOTATIONS_MAX_BYTES + key.len() })
        );
    }
}
