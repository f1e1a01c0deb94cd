//! How kube-apiserver stores KMS v2 objects: value prefixes, the `EncryptedObject` codec, the limits
//! it enforces, and the HKDF-SHA256 + AES-256-GCM transformer with the etcd key as AAD.
//!
//! This is the one implementation used by `selftest`, the tests' API-server stand-in and `audit`,
//! and [`judge`] is the one place that decides what a stored value is and whether it is current.
//! It imports nothing else from this crate but the generated protobuf types and `keyid`.

pub mod judge;
pub mod limits;
pub mod object;
pub mod transformer;

pub use judge::{Class, Current, Judge, Judgement, Standing, classify};
pub use limits::{
    ANNOTATIONS_MAX_BYTES, CIPHERTEXT_MAX_BYTES, KEY_ID_MAX_BYTES, LimitError, validate_annotations,
    validate_ciphertext, validate_key_id,
};
pub use object::{DekSourceType, EncryptedObject, KMS_V2_PREFIX, ObjectError, kms_v2_prefix};
pub use transformer::{TransformError, open_with_dek, open_with_seed, seal_with_dek, seal_with_seed};
