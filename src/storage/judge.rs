//! The one judgement of a stored etcd value, without decrypting: how it is encrypted (facts §3.3),
//! and, for one KMS v2 provider, whether it is on a current key. `audit`, the rotation's verify and
//! `retire`'s check all call [`Judge::judge`]; they differ only in what they do with the answer.

use serde::Serialize;

use super::{DekSourceType, EncryptedObject, KMS_V2_PREFIX};
use crate::keyid::{KeyId, KeyScope};

/// Which key_ids count as current.
#[derive(Debug, Clone, Copy)]
pub enum Current<'a> {
    /// Any key_id: only the encoding is judged.
    Any,
    /// This key at this version or later (a `min_decryption_version` floor). A key_id that is not
    /// this key's cannot be proven safe, so it is not current.
    AtLeast { scope: &'a KeyScope, version: u64 },
    /// Exactly this key_id.
    KeyId(&'a str),
}

impl Current<'_> {
    /// Whether a valid KMS v2 value with this key_id is current.
    pub fn accepts(self, key_id: &str) -> bool {
        match self {
            Self::Any => true,
            Self::AtLeast { scope, version } => {
                matches!(KeyId::parse(key_id), Ok(id) if id.scope == *scope && id.version >= version)
            }
            Self::KeyId(current) => key_id == current,
        }
    }
}

/// Where a value stands for the judged provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// A valid value of the provider on a current key_id.
    Current,
    /// The provider's prefix followed by something the API server would refuse.
    Invalid,
    /// Not the provider's: unencrypted, another transformer, or another KMS provider.
    Other,
    /// A valid value of the provider on a key_id that is not current.
    Stale,
}

/// What a value is and where it stands.
#[derive(Debug)]
pub struct Judgement {
    /// How it is encrypted.
    pub class: Class,
    /// The parsed object, for valid KMS v2 values.
    pub object: Option<EncryptedObject>,
    /// Where it stands for the provider.
    pub standing: Standing,
}

/// Judges values for one KMS v2 provider (or every provider) against one idea of "current".
#[derive(Debug, Clone, Copy)]
pub struct Judge<'a> {
    /// The KMS v2 provider name; `None` judges every KMS v2 provider.
    pub provider: Option<&'a str>,
    /// Which key_ids are current.
    pub current: Current<'a>,
}

impl Judge<'_> {
    /// Classifies a value and says where it stands.
    pub fn judge(&self, value: &[u8]) -> Judgement {
        let (class, object) = classify(value);
        let ours = |provider: &str| self.provider.is_none_or(|wanted| wanted == provider);
        let standing = match &class {
            Class::KmsV2 { provider, key_id, .. } if ours(provider) => match self.current.accepts(key_id) {
                true => Standing::Current,
                false => Standing::Stale,
            },
            Class::KmsV2Invalid { provider, .. } if ours(provider) => Standing::Invalid,
            _ => Standing::Other,
        };
        Judgement { class, object, standing }
    }
}

/// How a stored value is encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "class", rename_all = "snake_case")]
pub enum Class {
    /// `k8s:enc:aescbc:v1:<key>:`.
    Aescbc { key: String },
    /// `k8s:enc:aesgcm:v1:<key>:`.
    Aesgcm { key: String },
    /// `k8s:enc:kms:v1:<name>:`: no key_id is stored.
    KmsV1 { provider: String },
    /// `k8s:enc:kms:v2:<name>:` followed by a valid EncryptedObject.
    KmsV2 { provider: String, key_id: String, dek_source_type: &'static str },
    /// `k8s:enc:kms:v2:<name>:` followed by something the API server would refuse.
    KmsV2Invalid { provider: String, reason: String },
    /// Unencrypted JSON (custom resources are always JSON).
    PlaintextJson,
    /// Unencrypted protobuf (`k8s\0`).
    PlaintextProtobuf,
    /// Unencrypted YAML.
    PlaintextYaml,
    /// `k8s:enc:secretbox:v1:<key>:`.
    Secretbox { key: String },
    /// Nothing the API server writes.
    Unknown { reason: String },
}

impl Class {
    /// A short name for counts and `--fail-on`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Aescbc { .. } => "aescbc",
            Self::Aesgcm { .. } => "aesgcm",
            Self::KmsV1 { .. } => "kms_v1",
            Self::KmsV2 { .. } => "kms_v2",
            Self::KmsV2Invalid { .. } => "kms_v2_invalid",
            Self::PlaintextJson => "plaintext_json",
            Self::PlaintextProtobuf => "plaintext_protobuf",
            Self::PlaintextYaml => "plaintext_yaml",
            Self::Secretbox { .. } => "secretbox",
            Self::Unknown { .. } => "unknown",
        }
    }

    /// Whether the value is stored unencrypted.
    pub fn is_plaintext(&self) -> bool {
        matches!(self, Self::PlaintextJson | Self::PlaintextProtobuf | Self::PlaintextYaml)
    }
}

/// Classifies a value, returning the parsed object for valid KMS v2 values.
pub fn classify(value: &[u8]) -> (Class, Option<EncryptedObject>) {
    if let Some(rest) = value.strip_prefix(KMS_V2_PREFIX.as_bytes()) {
        // NB: KMS v2 provider names cannot contain ':', so the first ':' ends the name.
        let Some(colon) = rest.iter().position(|&b| b == b':') else {
            return (Class::Unknown { reason: "KMS v2 prefix without a provider name".into() }, None);
        };
        let provider = String::from_utf8_lossy(&rest[..colon]).into_owned();
        return match EncryptedObject::decode(&rest[colon + 1..]) {
            Ok(object) => {
                let dek_source_type = match object.dek_source_type {
                    DekSourceType::AesGcmKey => "AES_GCM_KEY",
                    DekSourceType::HkdfSha256XnonceAesGcmSeed => "HKDF_SHA256_XNONCE_AES_GCM_SEED",
                };
                let class = Class::KmsV2 { provider, key_id: object.key_id.clone(), dek_source_type };
                (class, Some(object))
            }
            Err(e) => (Class::KmsV2Invalid { provider, reason: crate::error::chain(&e) }, None),
        };
    }
    for (prefix, make) in [
        ("k8s:enc:aescbc:v1:", (|key| Class::Aescbc { key }) as fn(String) -> Class),
        ("k8s:enc:aesgcm:v1:", |key| Class::Aesgcm { key }),
        ("k8s:enc:secretbox:v1:", |key| Class::Secretbox { key }),
        // NB: KMS v1 names may contain ':'; the first ':' is the best split without the config.
        ("k8s:enc:kms:v1:", |provider| Class::KmsV1 { provider }),
    ] {
        if let Some(rest) = value.strip_prefix(prefix.as_bytes()) {
            let name = rest.iter().position(|&b| b == b':').map(|end| &rest[..end]);
            return match name {
                Some(name) => (make(String::from_utf8_lossy(name).into_owned()), None),
                None => (Class::Unknown { reason: format!("{prefix} without a key name") }, None),
            };
        }
    }
    if value.starts_with(b"k8s:enc:") {
        return (Class::Unknown { reason: "unknown k8s:enc: transformer".into() }, None);
    }
    if value.starts_with(b"k8s\x00") {
        return (Class::PlaintextProtobuf, None);
    }
    let text = value.trim_ascii_start();
    if text.starts_with(b"{") {
        return (Class::PlaintextJson, None);
    }
    if text.starts_with(b"apiVersion:") || text.starts_with(b"kind:") || text.starts_with(b"---") {
        return (Class::PlaintextYaml, None);
    }
    let reason = if value.is_empty() { "empty value" } else { "no known prefix" };
    (Class::Unknown { reason: reason.into() }, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kms_v2(provider: &str) -> Vec<u8> {
        EncryptedObject {
            encrypted_data: vec![1; 40],
            key_id: "kmsgate:1:local:k:::kmsgate:1:1".into(),
            encrypted_dek_source: b"local:v1:abc".to_vec(),
            annotations: Default::default(),
            dek_source_type: DekSourceType::HkdfSha256XnonceAesGcmSeed,
        }
        .to_value(provider)
    }

    #[test]
    fn every_format() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"k8s\x00\x0a\x0c\x0a\x02v1\x12\x06Secret".to_vec(), "plaintext_protobuf"),
            (br#"{"kind":"Secret"}"#.to_vec(), "plaintext_json"),
            (b"apiVersion: v1\nkind: Secret\n".to_vec(), "plaintext_yaml"),
            (b"k8s:enc:aescbc:v1:key1:\x00\x01".to_vec(), "aescbc"),
            (b"k8s:enc:aesgcm:v1:key1:\x00\x01".to_vec(), "aesgcm"),
            (b"k8s:enc:secretbox:v1:key1:\x00\x01".to_vec(), "secretbox"),
            (b"k8s:enc:kms:v1:vault:\x00\x10".to_vec(), "kms_v1"),
            (kms_v2("kmsgate"), "kms_v2"),
            (b"k8s:enc:kms:v2:kmsgate:\xff\xff".to_vec(), "kms_v2_invalid"),
            (b"k8s:enc:rot13:v1:x:".to_vec(), "unknown"),
            (b"\x00\x01\x02".to_vec(), "unknown"),
            (Vec::new(), "unknown"),
        ];
        for (value, want) in cases {
            assert_eq!(classify(&value).0.name(), want, "{:?}", String::from_utf8_lossy(&value));
        }
    }

    #[test]
    fn kms_v2_details_and_invalid_reasons() {
        let (class, object) = classify(&kms_v2("vault-kms"));
        assert!(object.is_some());
        assert_eq!(
            class,
            Class::KmsV2 {
                provider: "vault-kms".into(),
                key_id: "kmsgate:1:local:k:::kmsgate:1:1".into(),
                dek_source_type: "HKDF_SHA256_XNONCE_AES_GCM_SEED",
            }
        );
        let mut truncated = kms_v2("p");
        truncated.truncate(truncated.len() - 5);
        let (class, _) = classify(&truncated);
        assert!(
            matches!(&class, Class::KmsV2Invalid { reason, .. } if reason.contains("decode")),
            "{class:?}"
        );
    }

    #[test]
    fn one_judge_says_where_each_value_stands() {
        use crate::keyid::{BackendKind, KeyScope};
        let scope = KeyScope {
            kind: BackendKind::Local,
            identity: "k".into(),
            namespace: String::new(),
            mount: String::new(),
            key: "kmsgate".into(),
        };
        let with_key_id = |key_id: String, provider: &str| {
            EncryptedObject {
                encrypted_data: vec![1; 40],
                key_id,
                encrypted_dek_source: b"local:v1:abc".to_vec(),
                annotations: Default::default(),
                dek_source_type: DekSourceType::HkdfSha256XnonceAesGcmSeed,
            }
            .to_value(provider)
        };
        let (v1, v2) = (scope.key_id(1, 10).to_string(), scope.key_id(2, 20).to_string());
        let exact = Judge { provider: Some("p"), current: Current::KeyId(&v2) };
        let floor = Judge { provider: Some("p"), current: Current::AtLeast { scope: &scope, version: 2 } };
        let any = Judge { provider: None, current: Current::Any };
        let cases = [
            (with_key_id(v2.clone(), "p"), [Standing::Current, Standing::Current, Standing::Current]),
            (with_key_id(v1.clone(), "p"), [Standing::Stale, Standing::Stale, Standing::Current]),
            (with_key_id("not-a-key-id".into(), "p"), [Standing::Stale, Standing::Stale, Standing::Current]),
            (with_key_id(v2.clone(), "q"), [Standing::Other, Standing::Other, Standing::Current]),
            (b"k8s:enc:kms:v2:p:\xff".to_vec(), [Standing::Invalid, Standing::Invalid, Standing::Invalid]),
            (b"k8s\x00plain".to_vec(), [Standing::Other, Standing::Other, Standing::Other]),
        ];
        for (value, want) in cases {
            let got = [exact, floor, any].map(|j| j.judge(&value).standing);
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&value));
        }
    }
}
