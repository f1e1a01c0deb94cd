//! `KeyId::parse`: never panics, and only the canonical spelling parses.
#![no_main]

use kmsgate::keyid::KeyId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(id) = KeyId::parse(text) {
        assert_eq!(id.to_string(), text, "a parsed key_id must print as its input");
    }
});
