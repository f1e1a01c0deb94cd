//! The key_id format. It is stored in etcd beside every object for the life of the data, so this
//! format is frozen: change it only by adding a new format version and keeping this one parseable.
//!
//! ```text
//! kmsgate:1:<kind>:<identity>:<namespace>:<mount>:<key>:<version>:<created>
//! kmsgate:1:transit:prod-vault::transit:kmsgate:3:1732550000
//! ```
//!
//! Text fields are percent-encoded (every byte outside `A-Za-z0-9-._~/` becomes `%XX`), so `:`
//! only ever separates fields. `version` and `created` (the version's creation time, Unix
//! seconds) are decimal without leading zeros. Only the canonical spelling parses, so two equal
//! keys always have equal key_id strings.

use std::fmt;

/// The format version this code writes.
pub const FORMAT_VERSION: &str = "1";
const MAGIC: &str = "kmsgate";
const FIELDS: usize = 9;

/// Which backend kind issued a key_id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// The embedded local keyring (not for production).
    Local,
    /// Vault or OpenBao Transit.
    Transit,
}

impl BackendKind {
    /// The name used in key_ids and config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Transit => "transit",
        }
    }

    /// Whether a poll may reach a copy of the key store that is behind (Vault nodes, replicas),
    /// so that a missing newer version is lag rather than removal. A keyring file is one copy.
    pub fn has_lagging_replicas(self) -> bool {
        match self {
            Self::Local => false,
            Self::Transit => true,
        }
    }
}

/// Which key a backend serves: everything in a key_id but the version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyScope {
    /// The backend kind.
    pub kind: BackendKind,
    /// The configured, immutable name of the key store (Vault cluster or keyring).
    pub identity: String,
    /// The Vault Enterprise namespace, empty when none.
    pub namespace: String,
    /// The Transit mount path, empty for the local keyring.
    pub mount: String,
    /// The key name.
    pub key: String,
}

/// One version of one key: a parsed key_id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId {
    /// The key this version belongs to.
    pub scope: KeyScope,
    /// The key version (1-based).
    pub version: u64,
    /// When the version was created, Unix seconds.
    pub created: u64,
}

/// A string is not a key_id this code can route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyIdError {
    /// Wrong number of `:`-separated fields.
    #[error("key_id has {found} fields; kmsgate key_ids have {FIELDS}")]
    FieldCount { found: usize },
    /// Not a kmsgate key_id at all.
    #[error("key_id is not a kmsgate key_id")]
    Foreign,
    /// The backend kind is unknown.
    #[error("key_id names unknown backend kind {0:?}")]
    Kind(String),
    /// The string is not in canonical form.
    #[error("key_id is not in canonical form")]
    NotCanonical,
    /// A number field is not a canonical decimal.
    #[error("key_id field {field} is not a number")]
    Number { field: &'static str },
    /// A percent escape is malformed or does not decode to UTF-8.
    #[error("key_id field {field} has a bad percent escape")]
    Escape { field: &'static str },
    /// The format version is one this code does not know.
    #[error("key_id format version {0:?} is not supported")]
    UnsupportedFormat(String),
}

impl KeyScope {
    /// The key_id of one version of this key.
    pub fn key_id(&self, version: u64, created: u64) -> KeyId {
        KeyId { scope: self.clone(), version, created }
    }
}

impl KeyId {
    /// Parses a key_id; only the canonical form is accepted.
    pub fn parse(text: &str) -> Result<Self, KeyIdError> {
        // NB: at most FIELDS + 1 pieces, so a string of colons costs no more than a key_id.
        let fields: Vec<&str> = text.splitn(FIELDS + 1, ':').collect();
        if fields.first() != Some(&MAGIC) {
            return Err(KeyIdError::Foreign);
        }
        if fields.len() != FIELDS {
            return Err(KeyIdError::FieldCount { found: text.matches(':').count() + 1 });
        }
        if fields[1] != FORMAT_VERSION {
            return Err(KeyIdError::UnsupportedFormat(fields[1].chars().take(16).collect()));
        }
        let kind = match fields[2] {
            "local" => BackendKind::Local,
            "transit" => BackendKind::Transit,
            other => return Err(KeyIdError::Kind(other.chars().take(16).collect())),
        };
        let id = Self {
            scope: KeyScope {
                kind,
                identity: unescape(fields[3], "identity")?,
                namespace: unescape(fields[4], "namespace")?,
                mount: unescape(fields[5], "mount")?,
                key: unescape(fields[6], "key")?,
            },
            version: number(fields[7], "version")?,
            created: number(fields[8], "created")?,
        };
        if id.to_string() != text {
            return Err(KeyIdError::NotCanonical);
        }
        Ok(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.scope;
        write!(
            f,
            "{MAGIC}:{FORMAT_VERSION}:{}:{}:{}:{}:{}:{}:{}",
            s.kind.as_str(),
            escape(&s.identity),
            escape(&s.namespace),
            escape(&s.mount),
            escape(&s.key),
            self.version,
            self.created
        )
    }
}

/// Percent-encodes every byte outside the unreserved set and `/`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn unescape(text: &str, field: &'static str) -> Result<String, KeyIdError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or(KeyIdError::Escape { field })?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| KeyIdError::Escape { field })?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| KeyIdError::Escape { field })
}

fn number(text: &str, field: &'static str) -> Result<u64, KeyIdError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(KeyIdError::Number { field });
    }
    text.parse().map_err(|_| KeyIdError::Number { field })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transit() -> KeyScope {
        KeyScope {
            kind: BackendKind::Transit,
            identity: "prod-vault".into(),
            namespace: String::new(),
            mount: "transit".into(),
            key: "kmsgate".into(),
        }
    }

    #[test]
    fn frozen_spelling() {
        // NB: this string is stored in etcd; if this test fails, the format changed. Don't.
        let id = transit().key_id(3, 1_732_550_000);
        assert_eq!(id.to_string(), "kmsgate:1:transit:prod-vault::transit:kmsgate:3:1732550000");
        assert_eq!(KeyId::parse(&id.to_string()).unwrap(), id);
    }

    #[test]
    fn awkward_names_round_trip() {
        let scope = KeyScope {
            namespace: "team a/ns:1".into(),
            mount: "kv/transit%x".into(),
            key: "ключ".into(),
            ..transit()
        };
        let id = scope.key_id(1, 0);
        let text = id.to_string();
        assert_eq!(text.matches(':').count(), FIELDS - 1);
        assert!(text.contains("team%20a/ns%3A1"));
        assert_eq!(KeyId::parse(&text).unwrap(), id);
    }

    #[test]
    fn recreated_key_gets_a_new_id() {
        assert_ne!(transit().key_id(1, 100).to_string(), transit().key_id(1, 101).to_string());
    }

    #[test]
    fn refuses_what_it_cannot_route() {
        let cases = [
            ("", KeyIdError::Foreign),
            ("k8s-kms-plugin-key", KeyIdError::Foreign),
            ("kmsgate:1:transit:a::t:k:3", KeyIdError::FieldCount { found: 8 }),
            ("kmsgate:2:transit:a::t:k:3:1", KeyIdError::UnsupportedFormat("2".into())),
            ("kmsgate:1:aws:a::t:k:3:1", KeyIdError::Kind("aws".into())),
            ("kmsgate:1:transit:a::t:k:03:1", KeyIdError::NotCanonical),
            ("kmsgate:1:transit:a::t:k:+3:1", KeyIdError::Number { field: "version" }),
            ("kmsgate:1:transit:a::t:k:3:99999999999999999999999", KeyIdError::Number { field: "created" }),
            ("kmsgate:1:transit:a%2::t:k:3:1", KeyIdError::Escape { field: "identity" }),
            ("kmsgate:1:transit:a%ff::t:k:3:1", KeyIdError::Escape { field: "identity" }),
            ("kmsgate:1:transit:a%2d::t:k:3:1", KeyIdError::NotCanonical),
        ];
        for (text, want) in cases {
            assert_eq!(KeyId::parse(text), Err(want), "{text:?}");
        }
    }
}
