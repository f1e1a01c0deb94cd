//! The `EncryptedObject` decoder and validator: never panics; what decodes is valid and
//! round-trips through its encoding.
#![no_main]

use kmsgate::storage::EncryptedObject;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(object) = EncryptedObject::decode(data) {
        assert!(object.validate().is_ok(), "decode returned an invalid object");
        let again = EncryptedObject::decode(&object.encode()).expect("a decoded object re-decodes");
        assert_eq!(again, object);
    }
    let _ = EncryptedObject::from_value(data, "kmsgate");
});
