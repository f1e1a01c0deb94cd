//! The `EncryptedObject` kube-apiserver writes after `k8s:enc:kms:v2:<provider>:`, and the checks
//! it runs on every decode.

use std::collections::HashMap;

use prost::Message;

use super::limits::{self, LimitError};
use crate::proto::storage as pb;

/// The prefix of every KMS v2 value, before the provider name.
pub const KMS_V2_PREFIX: &str = "k8s:enc:kms:v2:";

/// The full value prefix kube-apiserver writes for a KMS v2 provider.
pub fn kms_v2_prefix(provider: &str) -> String {
    format!("{KMS_V2_PREFIX}{provider}:")
}

/// What the plugin-protected bytes are: the AES-GCM key itself, or a seed for per-write keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DekSourceType {
    /// Type 0: the 32 bytes are the AES-256-GCM DEK (1.27, and 1.28 with KMSv2KDF off).
    AesGcmKey,
    /// Type 1: the bytes are an HKDF-SHA256 seed; each write derives its own key (1.29+).
    HkdfSha256XnonceAesGcmSeed,
}

/// A stored KMS v2 object that passed the API server's validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedObject {
    /// The object's ciphertext; its layout depends on `dek_source_type`.
    pub encrypted_data: Vec<u8>,
    /// The plugin's key_id when the object was written.
    pub key_id: String,
    /// The plugin's `ciphertext` for the DEK source.
    pub encrypted_dek_source: Vec<u8>,
    /// The plugin's annotations, stored in plaintext.
    pub annotations: HashMap<String, Vec<u8>>,
    /// What the encrypted DEK source holds.
    pub dek_source_type: DekSourceType,
}

/// A stored value is not a KMS v2 object the API server would accept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// The protobuf bytes do not decode.
    #[error("EncryptedObject does not decode")]
    Decode(#[source] prost::DecodeError),
    /// `encryptedData` is empty.
    #[error("encryptedData is empty")]
    EncryptedDataEmpty,
    /// A field breaks a KMS v2 limit.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The value does not start with this provider's prefix.
    #[error("value does not start with {expected:?}")]
    Prefix { expected: String },
    /// `encryptedDEKSourceType` is neither 0 nor 1.
    #[error("encryptedDEKSourceType {0} is unknown (must be 0 or 1)")]
    UnknownDekSourceType(i32),
}

impl EncryptedObject {
    /// Parses and validates a full etcd value written by KMS v2 provider `provider`.
    pub fn from_value(value: &[u8], provider: &str) -> Result<Self, ObjectError> {
        let prefix = kms_v2_prefix(provider);
        let body = value.strip_prefix(prefix.as_bytes()).ok_or(ObjectError::Prefix { expected: prefix })?;
        Self::decode(body)
    }

    /// Parses and validates the protobuf body that follows the prefix.
    pub fn decode(body: &[u8]) -> Result<Self, ObjectError> {
        let raw = pb::EncryptedObject::decode(body).map_err(ObjectError::Decode)?;
        let dek_source_type = match raw.encrypted_dek_source_type {
            0 => DekSourceType::AesGcmKey,
            1 => DekSourceType::HkdfSha256XnonceAesGcmSeed,
            other => return Err(ObjectError::UnknownDekSourceType(other)),
        };
        let object = Self {
            encrypted_data: raw.encrypted_data,
            key_id: raw.key_id,
            encrypted_dek_source: raw.encrypted_dek_source,
            annotations: raw.annotations,
            dek_source_type,
        };
        object.validate()?;
        Ok(object)
    }

    /// The API server's `ValidateEncryptedObject`.
    pub fn validate(&self) -> Result<(), ObjectError> {
        if self.encrypted_data.is_empty() {
            return Err(ObjectError::EncryptedDataEmpty);
        }
        limits::validate_ciphertext(&self.encrypted_dek_source)?;
        limits::validate_key_id(&self.key_id)?;
        limits::validate_annotations(&self.annotations)?;
        Ok(())
    }

    /// The protobuf body, as the API server marshals it.
    pub fn encode(&self) -> Vec<u8> {
        pb::EncryptedObject {
            encrypted_data: self.encrypted_data.clone(),
            key_id: self.key_id.clone(),
            encrypted_dek_source: self.encrypted_dek_source.clone(),
            annotations: self.annotations.clone(),
            encrypted_dek_source_type: match self.dek_source_type {
                DekSourceType::AesGcmKey => 0,
                DekSourceType::HkdfSha256XnonceAesGcmSeed => 1,
            },
        }
        .encode_to_vec()
    }

    /// The full etcd value for KMS v2 provider `provider`.
    pub fn to_value(&self, provider: &str) -> Vec<u8> {
        let mut value = kms_v2_prefix(provider).into_bytes();
        value.extend_from_slice(&self.encode());
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object() -> EncryptedObject {
        EncryptedObject {
            encrypted_data: vec![1, 2, 3],
            key_id: "kid".into(),
            encrypted_dek_source: b"vault:v1:abc".to_vec(),
            annotations: HashMap::from([("a.example.io".to_owned(), b"v".to_vec())]),
            dek_source_type: DekSourceType::HkdfSha256XnonceAesGcmSeed,
        }
    }

    #[test]
    fn round_trips_through_a_value() {
        let value = object().to_value("kmsgate");
        assert!(value.starts_with(b"k8s:enc:kms:v2:kmsgate:"));
        assert_eq!(EncryptedObject::from_value(&value, "kmsgate").unwrap(), object());
    }

    #[test]
    fn wire_layout_matches_upstream_field_numbers() {
        let mut one = object();
        one.annotations.clear();
        let bytes = one.encode();
        // field 1 (bytes) len 3, field 2 (string) len 3, field 3 (bytes) len 12, field 5 varint 1.
        let mut expected = vec![0x0a, 3, 1, 2, 3, 0x12, 3, b'k', b'i', b'd', 0x1a, 12];
        expected.extend_from_slice(b"vault:v1:abc");
        expected.extend_from_slice(&[0x28, 1]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn missing_type_decodes_as_type_0() {
        let mut zero = object();
        zero.dek_source_type = DekSourceType::AesGcmKey;
        let bytes = zero.encode();
        assert!(!bytes.ends_with(&[0x28, 0]), "proto3 default is not written");
        assert_eq!(EncryptedObject::decode(&bytes).unwrap().dek_source_type, DekSourceType::AesGcmKey);
    }

    #[test]
    fn validation_refuses_what_the_api_server_refuses() {
        let cases: Vec<(EncryptedObject, &str)> = vec![
            (EncryptedObject { encrypted_data: vec![], ..object() }, "encryptedData is empty"),
            (EncryptedObject { key_id: String::new(), ..object() }, "key_id is empty"),
            (EncryptedObject { encrypted_dek_source: vec![], ..object() }, "ciphertext is empty"),
            (EncryptedObject { encrypted_dek_source: vec![7; 1025], ..object() }, "limit is 1024"),
            (
                EncryptedObject { annotations: HashMap::from([("invalid".to_owned(), vec![])]), ..object() },
                "at least two segments",
            ),
        ];
        for (bad, message) in cases {
            let err = EncryptedObject::decode(&bad.encode()).unwrap_err().to_string();
            assert!(err.contains(message), "{err:?} should mention {message:?}");
        }
        let mut raw = pb::EncryptedObject::decode(object().encode().as_slice()).unwrap();
        raw.encrypted_dek_source_type = 2;
        assert!(matches!(
            EncryptedObject::decode(&raw.encode_to_vec()),
            Err(ObjectError::UnknownDekSourceType(2))
        ));
        assert!(matches!(EncryptedObject::decode(&[0xff, 0xff]), Err(ObjectError::Decode(_))));
        assert!(matches!(
            EncryptedObject::from_value(b"k8s:enc:kms:v2:other:xx", "kmsgate"),
            Err(ObjectError::Prefix { .. })
        ));
    }
}
