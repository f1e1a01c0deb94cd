//! The verify-only key-file reader: never panics, and every key it returns reads back, as a
//! PUBLIC KEY block of its own DER, to itself.
#![no_main]

use base64::{Engine as _, engine::general_purpose::STANDARD};
use kmsgate::jwt::keyfile::public_keys;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(keys) = public_keys(data) else { return };
    for key in keys {
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(&key.der));
        assert_eq!(public_keys(pem.as_bytes()).expect("our own DER reads back"), vec![key]);
    }
});
