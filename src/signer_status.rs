//! The signer's `/status` document as far as another process relies on it: `signer` writes these
//! fields and the rotation controller (next) reads them, through one serde type.

use serde::{Deserialize, Serialize};

/// The key version a signer signs with.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct SigningKey {
    /// The key store's version.
    pub version: u64,
    /// Its kid, as the token header carries it.
    pub kid: String,
    /// Its JWS algorithm.
    pub alg: String,
}

/// One kid FetchKeys serves.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct PublishedKey {
    /// The kid.
    pub kid: String,
    /// The key store's version; `None` for a verify-only key from a file.
    pub version: Option<u64>,
    /// Left out of the OIDC discovery documents (and never signed with).
    pub exclude_from_oidc_discovery: bool,
    /// When it vanished from the key store without being retired (RFC 3339); it stays served
    /// until every token it signed has expired.
    #[serde(default)]
    pub vanished_at: Option<String>,
}

/// The last key poll.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PollReport {
    /// When it finished (RFC 3339).
    pub at: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// Why it failed, with no secret in it.
    #[serde(default)]
    pub error: Option<String>,
}

/// The part of a signer's `/status` the controller reads; other fields are for people.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct SignerStatus {
    /// The signing key, once one is old enough (or pinned).
    #[serde(default)]
    pub signing: Option<SigningKey>,
    /// Every kid FetchKeys serves.
    #[serde(default)]
    pub published: Vec<PublishedKey>,
    /// FetchKeys `data_timestamp`: when the key store was last read successfully (RFC 3339).
    #[serde(default)]
    pub data_timestamp: Option<String>,
    /// The last key poll (the signer's round trip: a metadata read).
    #[serde(default)]
    pub last_poll: Option<PollReport>,
    /// Why no key signs, or kids vanished without being retired; `None` when all is well.
    #[serde(default)]
    pub conflict: Option<String>,
    /// The `max_token_expiration_seconds` Metadata answers: the longest token an API server that
    /// read it issues. `None` from a signer that predates the field.
    #[serde(default)]
    pub max_token_expiration_seconds: Option<i64>,
    /// The `refresh_hint_seconds` FetchKeys answers: how soon API servers read the keys again.
    #[serde(default)]
    pub refresh_hint_seconds: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signing_key_reads_from_a_full_document() {
        let doc = serde_json::json!({
            "node": "cp-1",
            "signing": {"version": 2, "kid": "abc", "alg": "ES256"},
            "published": [{"kid": "abc", "version": 2, "exclude_from_oidc_discovery": false}],
            "extra": true,
        });
        let status: SignerStatus = serde_json::from_value(doc).unwrap();
        assert_eq!(status.signing.unwrap().kid, "abc");
        assert_eq!(status.published[0].vanished_at, None);
        assert_eq!(status.max_token_expiration_seconds, None, "a signer that predates the field");
        let empty: SignerStatus = serde_json::from_value(serde_json::json!({})).unwrap();
        assert!(empty.signing.is_none());
        let timing: SignerStatus = serde_json::from_value(
            serde_json::json!({"max_token_expiration_seconds": 86400, "refresh_hint_seconds": 60}),
        )
        .unwrap();
        assert_eq!(
            (timing.max_token_expiration_seconds, timing.refresh_hint_seconds),
            (Some(86400), Some(60))
        );
    }
}
