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

/// The part of a plugin's `/status` the controller reads; other fields are for people.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PluginStatus {
    /// The promoted key, once the plugin adopted one.
    #[serde(default)]
    pub promoted: Option<PromotedKey>,
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
}
