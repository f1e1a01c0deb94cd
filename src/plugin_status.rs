//! The plugin's `/status` document as far as another process relies on it: `kms` writes these
//! fields and the rotation controller reads them, through one serde type.

use serde::{Deserialize, Serialize};

/// The key version a plugin encrypts with.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct PromotedKey {
    /// The key_id Status reports.
    pub key_id: String,
    /// Its key version.
    pub version: u64,
}

/// The outcome of the plugin's last key-metadata poll.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct LastPoll {
    /// When it finished (RFC 3339).
    pub at: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// Why it failed (no secret in it); absent when it succeeded, and from older plugins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The part of a plugin's `/status` the controller reads; other fields are for people.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PluginStatus {
    /// The promoted key, once the plugin adopted one.
    #[serde(default)]
    pub promoted: Option<PromotedKey>,
    /// What Status answers as healthz; absent from older plugins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthz: Option<String>,
    /// The last key-metadata poll; absent before the first and from older plugins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll: Option<LastPoll>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_promoted_key_reads_from_a_full_document() {
        let doc = serde_json::json!({
            "node": "cp-1", "healthz": "ok", "promoted": {"key_id": "kmsgate:1:k:2", "version": 2},
            "candidate": null,
        });
        let status: PluginStatus = serde_json::from_value(doc).unwrap();
        assert_eq!(status.promoted, Some(PromotedKey { key_id: "kmsgate:1:k:2".into(), version: 2 }));
        let none: PluginStatus = serde_json::from_value(serde_json::json!({"promoted": null})).unwrap();
        assert!(none.promoted.is_none());
    }

    #[test]
    fn the_last_poll_error_is_optional_so_older_plugins_still_parse() {
        let old =
            serde_json::json!({"promoted": null, "last_poll": {"at": "2026-01-01T00:00:00Z", "ok": false}});
        let status: PluginStatus = serde_json::from_value(old).unwrap();
        assert_eq!(status.last_poll.unwrap().error, None);
        let new = serde_json::json!({
            "promoted": null, "healthz": "no key version adopted yet",
            "last_poll": {"at": "2026-01-01T00:00:00Z", "ok": false, "error": "metadata: permission denied"},
        });
        let status: PluginStatus = serde_json::from_value(new).unwrap();
        assert_eq!(status.last_poll.unwrap().error.as_deref(), Some("metadata: permission denied"));
    }
}
