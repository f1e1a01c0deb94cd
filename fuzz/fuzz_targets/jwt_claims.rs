//! The ExternalJWTSigner claims check: never panics, and what it accepts is unpadded base64url
//! within the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(claims) = std::str::from_utf8(data) else { return };
    if kmsgate::jwt::check_claims(claims).is_ok() {
        assert!(!claims.contains(['=', '+', '/']), "accepted padded or standard base64");
        assert!(claims.len() <= kmsgate::jwt::CLAIMS_MAX_BYTES, "accepted claims over the cap");
    }
});
