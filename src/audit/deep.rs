//! `--deep`: decrypts every KMS v2 object end to end as the API server would, and checks that
//! what comes out is an object stored under its own key. Plaintext never leaves this module:
//! only the verdict does.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use tonic::Request;
use zeroize::Zeroizing;

use crate::{
    kms::client::KmsClient,
    proto::v2::DecryptRequest,
    storage::{self, DekSourceType, EncryptedObject},
};

/// Why an object failed the deep check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeepError {
    /// The object decrypted, but to something that is not the object stored under this key.
    #[error("not an object for this key: {0}")]
    NotAnObject(String),
    /// The plugin refused to decrypt the DEK source.
    #[error("plugin refused the DEK source: {0}")]
    PluginRefused(String),
    /// The AES-GCM tag did not verify with the etcd key as AAD (tampered, or copied from another key).
    #[error("tag mismatch: {0}")]
    TagMismatch(String),
}

/// Decrypts objects, asking the plugin once per distinct DEK source.
pub struct Deep {
    client: KmsClient,
    timeout: std::time::Duration,
    seeds: HashMap<[u8; 32], Result<Zeroizing<Vec<u8>>, DeepError>>,
}

impl Deep {
    /// Uses a plugin's KMS v2 Decrypt over its socket.
    pub fn new(client: KmsClient, timeout: std::time::Duration) -> Self {
        Self { client, timeout, seeds: HashMap::new() }
    }

    /// How many distinct DEK sources were decrypted (one Decrypt call each).
    pub fn decrypt_calls(&self) -> usize {
        self.seeds.len()
    }

    /// Decrypts one object stored at `key` and checks it.
    pub async fn check(&mut self, key: &[u8], object: &EncryptedObject) -> Result<(), DeepError> {
        let cache_key = cache_key(object);
        if !self.seeds.contains_key(&cache_key) {
            let mut request = Request::new(DecryptRequest {
                ciphertext: object.encrypted_dek_source.clone(),
                uid: uuid::Uuid::new_v4().to_string(),
                key_id: object.key_id.clone(),
                annotations: object.annotations.clone(),
            });
            request.set_timeout(self.timeout);
            let seed = match self.client.decrypt(request).await {
                Ok(r) => Ok(Zeroizing::new(r.into_inner().plaintext)),
                Err(status) => {
                    Err(DeepError::PluginRefused(format!("{:?}: {}", status.code(), status.message())))
                }
            };
            self.seeds.insert(cache_key, seed);
        }
        let seed = match &self.seeds[&cache_key] {
            Ok(seed) => seed,
            Err(e) => return Err(e.clone()),
        };
        let plain = match object.dek_source_type {
            DekSourceType::HkdfSha256XnonceAesGcmSeed => {
                storage::open_with_seed(seed, &object.encrypted_data, key)
            }
            DekSourceType::AesGcmKey => storage::open_with_dek(seed, &object.encrypted_data, key),
        }
        .map_err(|e| DeepError::TagMismatch(e.to_string()))?;
        check_object(key, &plain)
    }
}

/// The API server's DEK cache key: source type, DEK source, key_id and sorted annotations.
fn cache_key(object: &EncryptedObject) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update([u8::from(object.dek_source_type == DekSourceType::HkdfSha256XnonceAesGcmSeed)]);
    for part in [object.encrypted_dek_source.as_slice(), object.key_id.as_bytes()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let mut annotations: Vec<_> = object.annotations.iter().collect();
    annotations.sort();
    for (key, value) in annotations {
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key.as_bytes());
        hash.update((value.len() as u64).to_be_bytes());
        hash.update(value);
    }
    hash.finalize().into()
}

/// The decrypted value must be an object (protobuf `k8s\0` + runtime.Unknown, or JSON) whose
/// name and namespace match the etcd key's last segments.
fn check_object(key: &[u8], plain: &[u8]) -> Result<(), DeepError> {
    let key = String::from_utf8_lossy(key);
    let mut segments = key.rsplit('/');
    let (name, parent) = (segments.next().unwrap_or(""), segments.next().unwrap_or(""));
    let (found_name, found_namespace) = if let Some(unknown) = plain.strip_prefix(b"k8s\x00") {
        // runtime.Unknown: field 2 is the object; the object's field 1 is ObjectMeta, whose
        // fields 1 and 3 are name and namespace.
        let raw =
            field(unknown, 2).ok_or_else(|| DeepError::NotAnObject("protobuf without an object".into()))?;
        let meta =
            field(raw, 1).ok_or_else(|| DeepError::NotAnObject("protobuf object without metadata".into()))?;
        let text = |n| field(meta, n).map(|b| String::from_utf8_lossy(b).into_owned());
        (text(1), text(3))
    } else if plain.trim_ascii_start().starts_with(b"{") {
        let value: serde_json::Value = serde_json::from_slice(plain)
            .map_err(|_| DeepError::NotAnObject("JSON that does not parse".into()))?;
        let text = |k: &str| value["metadata"][k].as_str().map(str::to_owned);
        (text("name"), text("namespace"))
    } else {
        return Err(DeepError::NotAnObject("neither protobuf nor JSON".into()));
    };
    match found_name {
        // NB: the decrypted name is plaintext; say only that it differs.
        Some(found) if found != name => {
            return Err(DeepError::NotAnObject("metadata.name differs from the key's name".into()));
        }
        _ => {}
    }
    match found_namespace {
        Some(ns) if !ns.is_empty() && ns != parent => {
            Err(DeepError::NotAnObject("metadata.namespace differs from the key's namespace".into()))
        }
        _ => Ok(()),
    }
}

/// The bytes of the first length-delimited field `number` of a protobuf message.
fn field(mut message: &[u8], number: u64) -> Option<&[u8]> {
    while !message.is_empty() {
        let (tag, rest) = varint(message)?;
        message = rest;
        match tag & 7 {
            0 => message = varint(message)?.1,
            1 => message = message.get(8..)?,
            2 => {
                let (len, rest) = varint(message)?;
                let len = usize::try_from(len).ok()?;
                let (value, rest) = (rest.get(..len)?, rest.get(len..)?);
                if tag >> 3 == number {
                    return Some(value);
                }
                message = rest;
            }
            5 => message = message.get(4..)?,
            _ => return None,
        }
    }
    None
}

fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(number: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![number << 3 | 2, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn protobuf_objects_are_checked_against_their_key() {
        let meta = [ld(1, b"db"), ld(3, b"prod")].concat();
        let secret = ld(1, &meta);
        let unknown = [ld(1, b"\x0a\x02v1\x12\x06Secret"), ld(2, &secret)].concat();
        let value = [b"k8s\x00".to_vec(), unknown].concat();
        assert_eq!(check_object(b"/registry/secrets/prod/db", &value), Ok(()));
        assert!(matches!(
            check_object(b"/registry/secrets/prod/other", &value),
            Err(DeepError::NotAnObject(_))
        ));
        assert!(matches!(check_object(b"/registry/secrets/dev/db", &value), Err(DeepError::NotAnObject(_))));
        assert!(matches!(
            check_object(b"/registry/secrets/prod/db", b"k8s\x00\xff"),
            Err(DeepError::NotAnObject(_))
        ));
    }

    #[test]
    fn json_objects_are_checked_against_their_key() {
        let json = br#"{"kind":"Secret","metadata":{"name":"db","namespace":"prod"}}"#;
        assert_eq!(check_object(b"/registry/secrets/prod/db", json), Ok(()));
        assert!(check_object(b"/registry/secrets/prod/x", json).is_err());
        assert!(check_object(b"/registry/secrets/prod/db", b"random bytes").is_err());
        // Cluster-scoped objects have no namespace.
        assert_eq!(check_object(b"/registry/namespaces/prod", br#"{"metadata":{"name":"prod"}}"#), Ok(()));
    }
}
