//! kube-apiserver's `EncryptionConfiguration` (`apiserver.config.k8s.io/v1`): the types
//! `kmsgate encryption-config` writes and the deploy tests read back. Unknown fields are refused,
//! so a misspelt key fails here instead of being ignored by a lenient parser.

use serde::{Deserialize, Serialize};

/// `apiVersion` of the file.
pub const API_VERSION: &str = "apiserver.config.k8s.io/v1";

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EncryptionConfiguration {
    /// `apiserver.config.k8s.io/v1`.
    pub api_version: String,
    /// `EncryptionConfiguration`.
    pub kind: String,
    /// Resource groups, in order.
    pub resources: Vec<ResourceConfiguration>,
}

/// Resources and the providers that encrypt them (the first writes, all read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfiguration {
    /// `secrets`, `*.apps`, `*.*`.
    pub resources: Vec<String>,
    /// Providers, writer first.
    pub providers: Vec<Provider>,
}

/// Exactly one provider.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    /// A KMS plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<Kms>,
    /// No encryption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Empty>,
    /// Static AES-GCM keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aesgcm: Option<StaticKeys>,
    /// Static AES-CBC keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aescbc: Option<StaticKeys>,
    /// Static secretbox keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secretbox: Option<StaticKeys>,
}

/// `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Static keys (only checked for shape here; kmsgate never writes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticKeys {
    /// Named keys.
    pub keys: Vec<StaticKey>,
}

/// One static key. Its value is never printed by kmsgate.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticKey {
    /// Name.
    pub name: String,
    /// Base64 key material.
    pub secret: String,
}

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKey").field("name", &self.name).field("secret", &"<redacted>").finish()
    }
}

/// A KMS provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Kms {
    /// `v2`.
    pub api_version: String,
    /// Provider name: part of every stored value, never changed.
    pub name: String,
    /// `unix:///path` or `unix:///@abstract`.
    pub endpoint: String,
    /// Per-call timeout, like `3s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// KMS v1 only (refused for v2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cachesize: Option<i32>,
}

/// What is wrong with a configuration, naming the place.
#[derive(Debug, thiserror::Error)]
pub enum EncryptionConfigError {
    /// Not YAML of this shape (unknown or missing fields included).
    #[error("not a valid EncryptionConfiguration: {0}")]
    Parse(String),
    /// A value breaks a rule kube-apiserver enforces.
    #[error("EncryptionConfiguration {place}: {problem}")]
    Invalid {
        /// Where, like `resources[0].providers[1]`.
        place: String,
        /// What.
        problem: String,
    },
}

impl EncryptionConfiguration {
    /// KMS v2 for `resources`, then `identity` so existing plaintext stays readable.
    pub fn kms_first(name: &str, endpoint: &str, timeout: &str, resources: &[String]) -> Self {
        let kms = Kms {
            api_version: "v2".into(),
            name: name.into(),
            endpoint: endpoint.into(),
            timeout: Some(timeout.into()),
            cachesize: None,
        };
        Self {
            api_version: API_VERSION.into(),
            kind: "EncryptionConfiguration".into(),
            resources: vec![ResourceConfiguration {
                resources: resources.to_vec(),
                providers: vec![
                    Provider { kms: Some(kms), ..Provider::default() },
                    Provider { identity: Some(Empty {}), ..Provider::default() },
                ],
            }],
        }
    }

    /// Parses and validates YAML.
    pub fn parse(yaml: &str) -> Result<Self, EncryptionConfigError> {
        let config: Self =
            serde_saphyr::from_str(yaml).map_err(|e| EncryptionConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The rules kube-apiserver's validation enforces that matter to kmsgate.
    pub fn validate(&self) -> Result<(), EncryptionConfigError> {
        let bad = |place: String, problem: &str| {
            Err(EncryptionConfigError::Invalid { place, problem: problem.into() })
        };
        if self.api_version != API_VERSION {
            return bad("apiVersion".into(), "must be apiserver.config.k8s.io/v1");
        }
        if self.kind != "EncryptionConfiguration" {
            return bad("kind".into(), "must be EncryptionConfiguration");
        }
        if self.resources.is_empty() {
            return bad("resources".into(), "list at least one entry");
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, entry) in self.resources.iter().enumerate() {
            if entry.resources.is_empty() || entry.resources.iter().any(String::is_empty) {
                return bad(format!("resources[{i}].resources"), "list resources like secrets or *.apps");
            }
            if entry.providers.is_empty() {
                return bad(format!("resources[{i}].providers"), "list at least one provider");
            }
            for (j, p) in entry.providers.iter().enumerate() {
                let place = format!("resources[{i}].providers[{j}]");
                let kinds = [
                    p.kms.is_some(),
                    p.identity.is_some(),
                    p.aesgcm.is_some(),
                    p.aescbc.is_some(),
                    p.secretbox.is_some(),
                ];
                if kinds.iter().filter(|k| **k).count() != 1 {
                    return bad(place, "must set exactly one of kms, identity, aesgcm, aescbc, secretbox");
                }
                let Some(kms) = &p.kms else { continue };
                if kms.api_version != "v2" {
                    return bad(
                        format!("{place}.kms.apiVersion"),
                        "must be v2 (KMS v1 is deprecated and off)",
                    );
                }
                if kms.name.is_empty() || kms.name.contains(':') {
                    return bad(format!("{place}.kms.name"), "required, without ':'");
                }
                if kms.cachesize.is_some() {
                    return bad(format!("{place}.kms.cachesize"), "is forbidden for KMS v2");
                }
                if !kms.endpoint.starts_with("unix:///") {
                    return bad(format!("{place}.kms.endpoint"), "must be unix:///path");
                }
                if let Some(timeout) = &kms.timeout
                    && humantime::parse_duration(timeout).map_or(true, |d| d.is_zero())
                {
                    return bad(format!("{place}.kms.timeout"), "must be a duration above 0, like 3s");
                }
                // NB: the same name may serve several resource entries; it must mean one plugin.
                names.insert((kms.name.clone(), kms.endpoint.clone()));
            }
        }
        let mut seen = std::collections::BTreeMap::new();
        for (name, endpoint) in &names {
            if let Some(other) = seen.insert(name.clone(), endpoint.clone()) {
                return bad(
                    format!("kms name {name}"),
                    &format!("used for two endpoints ({other} and {endpoint})"),
                );
            }
        }
        Ok(())
    }

    /// YAML, as kube-apiserver reads it.
    pub fn to_yaml(&self) -> Result<String, EncryptionConfigError> {
        serde_saphyr::to_string(self).map_err(|e| EncryptionConfigError::Parse(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_form_reads_back_and_validates() {
        let config = EncryptionConfiguration::kms_first(
            "kmsgate",
            "unix:///var/run/kmsgate/kms.sock",
            "3s",
            &["secrets".into()],
        );
        let yaml = config.to_yaml().unwrap();
        assert_eq!(EncryptionConfiguration::parse(&yaml).unwrap(), config);
        assert!(!yaml.contains("cachesize"), "{yaml}");
    }

    #[test]
    fn unknown_fields_and_broken_rules_are_named() {
        let base = "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets]\n  providers:\n";
        let check = |providers: &str, wanted: &str| {
            let error =
                EncryptionConfiguration::parse(&format!("{base}{providers}")).unwrap_err().to_string();
            assert!(error.contains(wanted), "{error}");
        };
        check("  - kms: {apiVersion: v2, name: k, endpoint: 'unix:///s', timout: 3s}\n", "timout");
        check("  - kms: {apiVersion: v2, name: 'a:b', endpoint: 'unix:///s'}\n", "providers[0].kms.name");
        check("  - kms: {apiVersion: v2, name: k, endpoint: 'unix:///s', cachesize: 10}\n", "cachesize");
        check("  - kms: {apiVersion: v1, name: k, endpoint: 'unix:///s'}\n", "kms.apiVersion");
        check("  - kms: {apiVersion: v2, name: k, endpoint: 'tcp://x'}\n", "kms.endpoint");
        check("  - kms: {apiVersion: v2, name: k, endpoint: 'unix:///s', timeout: 0s}\n", "kms.timeout");
        check("  - {identity: {}, kms: {apiVersion: v2, name: k, endpoint: 'unix:///s'}}\n", "exactly one");
        check(
            "  - identity: {}\n  - kms: {apiVersion: v2, name: k, endpoint: 'unix:///a'}\n  - kms: {apiVersion: v2, name: k, endpoint: 'unix:///b'}\n",
            "two endpoints",
        );
        let key = "  - aescbc: {keys: [{name: k1, secret: c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTIzNDU2Nzg=}]}\n";
        let config = EncryptionConfiguration::parse(&format!("{base}{key}")).unwrap();
        assert!(!format!("{config:?}").contains("c2VjcmV0"), "static keys never reach Debug output");
    }
}
