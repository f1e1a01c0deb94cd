//! The one judge of a public key before it is published: a PKIX DER (SubjectPublicKeyInfo) that
//! kube-apiserver will accept in a FetchKeys answer. kube-apiserver parses every key of the answer
//! with Go's `x509.ParsePKIXPublicKey` and rejects the whole answer if one fails, so a restarting
//! API server could not start; every key store and the key-file reader call [`check_public_key`]
//! before a key is served or persisted.
//!
//! Modelled on golang/go `src/crypto/x509/parser.go` `parsePublicKey`:
//! - RSA: the algorithm parameters are exactly NULL ("x509: RSA key missing NULL parameters"), the
//!   modulus and exponent parse and are positive ("RSA modulus/public exponent is not a positive
//!   number"); and what Go's `crypto/rsa` then demands to verify: `rsa.go` `checkPublicKeySize`
//!   refuses a modulus under 1024 bits, and the exponent must lie in 2..2^31-1;
//! - ECDSA: the parameters are a named curve Go knows (`namedCurveFromOID`: P-224/256/384/521, of
//!   which kube-apiserver signs with P-256/384/521 only), and the key is an uncompressed point on
//!   that curve (`ecdsa.ParseUncompressedPublicKey`). The on-curve check is RustCrypto's
//!   (`PublicKey::from_sec1_bytes` of `p256`, `p384`, `p521`), not ours.

use der::{
    Decode as _,
    asn1::{ObjectIdentifier, UintRef},
};
use spki::SubjectPublicKeyInfoRef;

use super::Alg;

/// Longest PKIX DER judged: an RSA-8192 SubjectPublicKeyInfo is about 1.1 KiB.
pub const PUBLIC_KEY_MAX_BYTES: usize = 4096;

/// Smallest RSA modulus Go's `crypto/rsa` verifies with (`rsa.go` `checkKeySize`).
pub const RSA_MIN_BITS: usize = 1024;

/// A public key kube-apiserver would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublicKeyError {
    /// The DER is not a SubjectPublicKeyInfo.
    #[error("the public key is not PKIX DER (SubjectPublicKeyInfo): {0}")]
    Der(String),
    /// The EC key names a curve kube-apiserver cannot verify with.
    #[error("the EC public key is on {0}; kube-apiserver verifies only P-256, P-384 and P-521")]
    EcCurve(String),
    /// The EC key's parameters are not a named curve.
    #[error("the EC public key's parameters are not a named curve")]
    EcParameters,
    /// The EC key is not an uncompressed point on its curve.
    #[error("the EC public key is not an uncompressed point on {0}")]
    EcPoint(&'static str),
    /// The key is of an algorithm kube-apiserver cannot verify with.
    #[error("the public key is {0}; kube-apiserver verifies only RSA and ECDSA")]
    KeyAlgorithm(String),
    /// The RSA exponent is outside what Go's crypto/rsa accepts.
    #[error("the RSA public exponent is outside 2..2^31-1")]
    RsaExponent,
    /// The RSAPublicKey inside does not parse.
    #[error("the RSA public key does not parse: {0}")]
    RsaKey(String),
    /// The RSA modulus is zero or too small.
    #[error("the RSA modulus is {0} bits; Go's crypto/rsa verifies with 1024 bits or more")]
    RsaModulus(usize),
    /// The RSA algorithm parameters are not exactly NULL.
    #[error("the RSA key's algorithm parameters are not NULL (RFC 3279 2.3.1)")]
    RsaParameters,
    /// The DER is longer than any key kube-apiserver uses.
    #[error("the public key is {len} bytes, over the limit of {max}")]
    TooLong { len: usize, max: usize },
}

/// What a judged key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyInfo {
    /// The one algorithm kube-apiserver verifies it with.
    pub alg: Alg,
    /// The RSA modulus size in bits; `None` for ECDSA, whose size is its algorithm's.
    pub rsa_bits: Option<usize>,
}

/// Judges a PKIX DER public key as kube-apiserver's Go parser does, and names its algorithm.
pub fn check_public_key(der: &[u8]) -> Result<KeyInfo, PublicKeyError> {
    if der.len() > PUBLIC_KEY_MAX_BYTES {
        return Err(PublicKeyError::TooLong { len: der.len(), max: PUBLIC_KEY_MAX_BYTES });
    }
    let spki = SubjectPublicKeyInfoRef::from_der(der).map_err(|e| PublicKeyError::Der(e.to_string()))?;
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| PublicKeyError::Der("the key's BIT STRING is not whole bytes".into()))?;
    match spki.algorithm.oid {
        RSA_ENCRYPTION => {
            // NB: absent parameters are not NULL ones; spki's `oids()` would take both for None.
            if !spki.algorithm.parameters.is_some_and(|p| p.is_null()) {
                return Err(PublicKeyError::RsaParameters);
            }
            let bits = check_rsa(key)?;
            Ok(KeyInfo { alg: Alg::Rs256, rsa_bits: Some(bits) })
        }
        EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
                .ok_or(PublicKeyError::EcParameters)?;
            let alg = check_ec(curve, key)?;
            Ok(KeyInfo { alg, rsa_bits: None })
        }
        other => Err(PublicKeyError::KeyAlgorithm(algorithm_name(other))),
    }
}

/// The size in bits of a valid `RSAPublicKey`.
fn check_rsa(key: &[u8]) -> Result<usize, PublicKeyError> {
    // NB: UintRef refuses a negative INTEGER and drops the sign byte of a positive one, so these
    // are magnitudes and a zero is all zero bytes.
    let parsed = pkcs1::RsaPublicKey::from_der(key).map_err(|e| PublicKeyError::RsaKey(e.to_string()))?;
    let bits = bit_len(parsed.modulus);
    if bits < RSA_MIN_BITS {
        return Err(PublicKeyError::RsaModulus(bits));
    }
    let exponent = parsed
        .public_exponent
        .as_bytes()
        .iter()
        .try_fold(0u64, |acc, b| acc.checked_mul(256).map(|v| v + u64::from(*b)));
    if !exponent.is_some_and(|e| (2..=i32::MAX as u64).contains(&e)) {
        return Err(PublicKeyError::RsaExponent);
    }
    Ok(bits)
}

/// The algorithm of an EC key on `curve`, if `point` is an uncompressed point on it.
fn check_ec(curve: ObjectIdentifier, point: &[u8]) -> Result<Alg, PublicKeyError> {
    let (alg, name) = match curve {
        P256 => (Alg::Es256, "P-256"),
        P384 => (Alg::Es384, "P-384"),
        P521 => (Alg::Es512, "P-521"),
        other => return Err(PublicKeyError::EcCurve(curve_name(other))),
    };
    // NB: Go reads the uncompressed form only; RustCrypto would also take a compressed one.
    let uncompressed = point.first() == Some(&0x04);
    let on_curve = uncompressed
        && match alg {
            Alg::Es256 => p256::PublicKey::from_sec1_bytes(point).is_ok(),
            Alg::Es384 => p384::PublicKey::from_sec1_bytes(point).is_ok(),
            Alg::Es512 => p521::PublicKey::from_sec1_bytes(point).is_ok(),
            Alg::Rs256 => false,
        };
    if !on_curve {
        return Err(PublicKeyError::EcPoint(name));
    }
    Ok(alg)
}

/// The bit length of a big-endian magnitude.
fn bit_len(value: UintRef<'_>) -> usize {
    let bytes = value.as_bytes();
    match bytes.iter().position(|b| *b != 0) {
        Some(at) => (bytes.len() - at) * 8 - bytes[at].leading_zeros() as usize,
        None => 0,
    }
}

/// `rsaEncryption` (RFC 3279 2.3.1).
pub(crate) const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// `id-ecPublicKey` (RFC 5480 2.1.1).
pub(crate) const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `secp256r1` (RFC 5480 2.1.1.1).
pub(crate) const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
/// `secp384r1` (RFC 5480 2.1.1.1).
pub(crate) const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
/// `secp521r1` (RFC 5480 2.1.1.1).
pub(crate) const P521: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.35");

/// A key algorithm's name for a refusal.
pub(crate) fn algorithm_name(oid: ObjectIdentifier) -> String {
    let name = match oid.to_string().as_str() {
        "1.3.101.110" => "an X25519 key",
        "1.3.101.111" => "an X448 key",
        "1.3.101.112" => "an Ed25519 key",
        "1.3.101.113" => "an Ed448 key",
        "1.2.840.10040.4.1" => "a DSA key",
        "1.2.840.113549.1.1.10" => "an RSA-PSS key",
        _ => return format!("a key of algorithm {oid}"),
    };
    name.to_owned()
}

/// A curve's name for a refusal.
pub(crate) fn curve_name(oid: ObjectIdentifier) -> String {
    let name = match oid.to_string().as_str() {
        "1.3.132.0.33" => "P-224",
        "1.3.132.0.10" => "secp256k1",
        "1.3.36.3.3.2.8.1.1.7" => "brainpoolP256r1",
        _ => return format!("curve {oid}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use der::{
        Encode as _,
        asn1::{AnyRef, BitStringRef},
    };
    use spki::AlgorithmIdentifierRef;

    use super::*;

    /// A vector from tests/data/keyfile, its PEM body as DER.
    fn pkix(name: &str) -> Vec<u8> {
        use base64::Engine as _;
        let path = format!("{}/tests/data/keyfile/{name}.pem", env!("CARGO_MANIFEST_DIR"));
        let pem = std::fs::read_to_string(&path).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap()
    }

    fn spki(oid: ObjectIdentifier, parameters: Option<AnyRef<'_>>, key: &[u8]) -> Vec<u8> {
        SubjectPublicKeyInfoRef {
            algorithm: AlgorithmIdentifierRef { oid, parameters },
            subject_public_key: BitStringRef::from_bytes(key).unwrap(),
        }
        .to_der()
        .unwrap()
    }

    fn rsa_key(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
        pkcs1::RsaPublicKey {
            modulus: UintRef::new(modulus).unwrap(),
            public_exponent: UintRef::new(exponent).unwrap(),
        }
        .to_der()
        .unwrap()
    }

    #[test]
    fn good_keys_of_every_kind_pass_with_their_algorithm() {
        let rsa = check_public_key(&pkix("rsa-pkix")).unwrap();
        assert_eq!(rsa.alg, Alg::Rs256);
        assert!(rsa.rsa_bits.unwrap() >= 2048);
        assert_eq!(check_public_key(&pkix("p256-pkix")).unwrap().alg, Alg::Es256);
    }

    #[test]
    fn rsa_keys_go_refuses_are_refused() {
        let der = pkix("rsa-pkix");
        let good = SubjectPublicKeyInfoRef::from_der(&der).unwrap();
        let inner = good.subject_public_key.as_bytes().unwrap();
        let parsed = pkcs1::RsaPublicKey::from_der(inner).unwrap();
        let modulus = parsed.modulus.as_bytes();
        // Absent parameters: Go says "x509: RSA key missing NULL parameters".
        assert_eq!(check_public_key(&spki(RSA_ENCRYPTION, None, inner)), Err(PublicKeyError::RsaParameters));
        let other = AnyRef::from(&P256);
        assert_eq!(
            check_public_key(&spki(RSA_ENCRYPTION, Some(other), inner)),
            Err(PublicKeyError::RsaParameters)
        );
        let null = Some(AnyRef::NULL);
        assert!(check_public_key(&spki(RSA_ENCRYPTION, null, inner)).is_ok());
        for exponent in [&[0u8][..], &[1], &[0x80, 0, 0, 0], &[1, 0, 0, 0, 0]] {
            let key = rsa_key(modulus, exponent);
            assert_eq!(
                check_public_key(&spki(RSA_ENCRYPTION, null, &key)),
                Err(PublicKeyError::RsaExponent),
                "{exponent:?}"
            );
        }
        let zero = rsa_key(&[0], &[1, 0, 1]);
        assert_eq!(check_public_key(&spki(RSA_ENCRYPTION, null, &zero)), Err(PublicKeyError::RsaModulus(0)));
        let small = rsa_key(&modulus[..64], &[1, 0, 1]);
        assert_eq!(
            check_public_key(&spki(RSA_ENCRYPTION, null, &small)),
            Err(PublicKeyError::RsaModulus(512))
        );
        assert!(matches!(
            check_public_key(&spki(RSA_ENCRYPTION, null, b"\x30\x00")),
            Err(PublicKeyError::RsaKey(_))
        ));
    }

    #[test]
    fn ec_points_off_the_curve_compressed_or_on_other_curves_are_refused() {
        let der = pkix("p256-pkix");
        let good = SubjectPublicKeyInfoRef::from_der(&der).unwrap();
        let point = good.subject_public_key.as_bytes().unwrap().to_vec();
        let curve = Some(AnyRef::from(&P256));
        // The right prefix and length, but y changed: not on P-256.
        let mut off = point.clone();
        off[64] ^= 1;
        assert_eq!(
            check_public_key(&spki(EC_PUBLIC_KEY, curve, &off)),
            Err(PublicKeyError::EcPoint("P-256"))
        );
        // The same point compressed: RustCrypto reads it, Go does not.
        let mut compressed = vec![2 + (point[64] & 1)];
        compressed.extend_from_slice(&point[1..33]);
        assert_eq!(
            check_public_key(&spki(EC_PUBLIC_KEY, curve, &compressed)),
            Err(PublicKeyError::EcPoint("P-256"))
        );
        // P-521 is checked too: 133 bytes of 0x04 and zeros is no point on it.
        let mut p521 = vec![0u8; 133];
        p521[0] = 4;
        let on_p521 = Some(AnyRef::from(&P521));
        assert_eq!(
            check_public_key(&spki(EC_PUBLIC_KEY, on_p521, &p521)),
            Err(PublicKeyError::EcPoint("P-521"))
        );
        let k1 = ObjectIdentifier::new_unwrap("1.3.132.0.10");
        assert_eq!(
            check_public_key(&spki(EC_PUBLIC_KEY, Some(AnyRef::from(&k1)), &point)),
            Err(PublicKeyError::EcCurve("secp256k1".into()))
        );
        assert_eq!(check_public_key(&spki(EC_PUBLIC_KEY, None, &point)), Err(PublicKeyError::EcParameters));
        assert!(check_public_key(&spki(EC_PUBLIC_KEY, curve, &point)).is_ok());
    }

    #[test]
    fn other_algorithms_garbage_and_oversized_input_are_refused_by_name() {
        let ed = ObjectIdentifier::new_unwrap("1.3.101.112");
        assert_eq!(
            check_public_key(&spki(ed, None, &[0; 32])),
            Err(PublicKeyError::KeyAlgorithm("an Ed25519 key".into()))
        );
        assert!(matches!(check_public_key(b"\x30\x03\x02\x01\x01"), Err(PublicKeyError::Der(_))));
        assert!(matches!(check_public_key(&[0x30; 5000]), Err(PublicKeyError::TooLong { .. })));
    }
}
