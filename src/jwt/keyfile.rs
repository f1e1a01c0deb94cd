//! Verify-only key files: what kube-apiserver's `--service-account-key-file` accepts, turned into
//! the PKIX DER public keys FetchKeys serves. kubernetes `staging/src/k8s.io/client-go/util/keyutil/
//! key.go` `ParsePublicKeysPEM` reads every PEM block of a file and keeps the public key of each
//! RSA or ECDSA private key (PKCS#1, SEC1, PKCS#8), public key (PKIX, PKCS#1) and certificate.
//! kube-apiserver then derives each kid from the key re-marshalled with `x509.MarshalPKIXPublicKey`
//! (`pkg/serviceaccount/jwt.go` `keyIDFromPublicKey`), so a key gets the same kid however the file
//! spells it; we re-encode the same way before deriving it.
//!
//! Two choices differ from keyutil on purpose, because a key dropped in silence means tokens that
//! stop verifying with no word why: a key block of a type kube-apiserver cannot use (Ed25519, DSA,
//! another curve) is refused naming the block, where keyutil skips it; and so is a block with an
//! unknown label. Only `EC PARAMETERS`, which `openssl ecparam -genkey` writes before the key, is
//! skipped as keyutil skips it.

use base64::{Engine as _, engine::general_purpose::STANDARD};
use der::{
    Decode as _, Encode as _,
    asn1::{AnyRef, BitStringRef, ObjectIdentifier, UintRef},
};
use spki::{AlgorithmIdentifierRef, SubjectPublicKeyInfoRef};
use zeroize::Zeroizing;

use super::{
    PublicKey, PublicKeyError, check_public_key,
    pkix::{EC_PUBLIC_KEY, RSA_ENCRYPTION, algorithm_name as key_type_name},
};

/// Largest key file read: a bundle of a few dozen certificates is well under it, and the cap
/// bounds what a file can make us decode.
pub const KEY_FILE_MAX_BYTES: usize = 1024 * 1024;

/// A key file could not be turned into public keys. Each variant names the block (counting from
/// 1) and its PEM label, never its bytes: the block may be a private key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// A block is a private key encrypted with a passphrase, which we cannot read.
    #[error("block {block} ({label:?}) is encrypted; give the public key or an unencrypted key instead")]
    Encrypted { block: usize, label: String },
    /// A block's DER does not parse as its label says.
    #[error("block {block} ({label:?}) is not a valid {label}: {reason}")]
    Der { block: usize, label: String, reason: String },
    /// An EC private key without its public key, which only curve arithmetic could recover.
    #[error(
        "block {block} ({label:?}) is an EC private key without its public key; give the public key \
         (openssl pkey -pubout) instead"
    )]
    EcPublicKeyMissing { block: usize, label: String },
    /// The file holds no key at all.
    #[error("the file holds no PEM key block (kube-apiserver wants at least one RSA or ECDSA key)")]
    NoKeys,
    /// The PEM framing or base64 of a block is broken.
    #[error("block {block} ({label:?}) is not valid PEM: {reason}")]
    Pem { block: usize, label: String, reason: String },
    /// The file is over the size cap.
    #[error("the key file is {len} bytes, over the limit of {max}")]
    TooLong { len: usize, max: usize },
    /// A block's label is not one that holds a key kube-apiserver reads.
    #[error(
        "block {block} ({label:?}) is not a key: expected PUBLIC KEY, RSA PUBLIC KEY, CERTIFICATE, \
         RSA PRIVATE KEY, EC PRIVATE KEY or PRIVATE KEY"
    )]
    UnknownBlock { block: usize, label: String },
    /// A block holds a key kube-apiserver cannot verify tokens with.
    #[error(
        "block {block} ({label:?}) holds {what}; kube-apiserver verifies only RSA and ECDSA P-256/384/521"
    )]
    Unsupported { block: usize, label: String, what: String },
}

/// The public keys of a key file in the formats kube-apiserver's `--service-account-key-file`
/// accepts, in file order, each as PKIX DER with the one algorithm kube-apiserver publishes for it.
pub fn public_keys(pem: &[u8]) -> Result<Vec<PublicKey>, KeyFileError> {
    if pem.len() > KEY_FILE_MAX_BYTES {
        return Err(KeyFileError::TooLong { len: pem.len(), max: KEY_FILE_MAX_BYTES });
    }
    let mut keys = Vec::new();
    for (index, block) in blocks(pem)?.into_iter().enumerate() {
        let at = Where { block: index + 1, label: &block.label };
        if let Some(key) = key_of(&at, &block.der)? {
            keys.push(key);
        }
    }
    if keys.is_empty() {
        return Err(KeyFileError::NoKeys);
    }
    Ok(keys)
}

/// `keys` as a file `--service-account-key-file` reads: one `PUBLIC KEY` block (PKIX DER, padded
/// standard base64 in 64-column lines, as Go's `pem.Encode` writes it) per key, in the given
/// order, with nothing between or around the blocks. keyutil `ParsePublicKeysPEM` (client-go
/// `util/keyutil/key.go`) reads each block's bytes with `x509.ParsePKIXPublicKey` whatever its
/// label, so this is the form it reads first; [`public_keys`] reads it back to the same keys.
/// Public keys only: nothing of a private key can reach this function's input.
pub fn to_pem(keys: &[PublicKey]) -> String {
    let mut out = String::new();
    for key in keys {
        out.push_str("-----BEGIN PUBLIC KEY-----\n");
        let body = STANDARD.encode(&key.der);
        // NB: base64 is ASCII, so every 64-byte chunk is valid UTF-8.
        for line in body.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
    }
    out
}

/// One PEM block: its label and its decoded bytes, which may be a private key.
struct Block {
    label: String,
    der: Zeroizing<Vec<u8>>,
}

/// Which block an error is about.
struct Where<'a> {
    block: usize,
    label: &'a str,
}

impl Where<'_> {
    fn label(&self) -> String {
        short_label(self.label)
    }

    fn der(&self, error: der::Error) -> KeyFileError {
        // NB: a der::Error names a tag and a position, never the bytes it read.
        KeyFileError::Der { block: self.block, label: self.label(), reason: error.to_string() }
    }

    fn invalid(&self, reason: &str) -> KeyFileError {
        KeyFileError::Der { block: self.block, label: self.label(), reason: reason.to_owned() }
    }

    fn unsupported(&self, what: &str) -> KeyFileError {
        KeyFileError::Unsupported { block: self.block, label: self.label(), what: what.to_owned() }
    }
}

/// The PEM blocks of a file, as Go's `encoding/pem` `Decode` frames them: text outside blocks is
/// ignored, a block runs from `-----BEGIN L-----` to `-----END L-----`, its body is padded
/// standard base64 with whitespace anywhere. rustls-pemfile and rustls-pki-types skip labels they
/// do not know, and we must name those, so the framing is read here; the DER is left to crates.
fn blocks(text: &[u8]) -> Result<Vec<Block>, KeyFileError> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const DASHES: &[u8] = b"-----";
    let mut found = Vec::new();
    let mut lines = text.split(|b| *b == b'\n').map(|line| line.trim_ascii());
    while let Some(line) = lines.next() {
        let Some(label) = line.strip_prefix(BEGIN).and_then(|rest| rest.strip_suffix(DASHES)) else {
            continue;
        };
        let block = found.len() + 1;
        let label = String::from_utf8_lossy(label).into_owned();
        let pem_error =
            |reason: &str| KeyFileError::Pem { block, label: short_label(&label), reason: reason.to_owned() };
        let end = format!("-----END {label}-----");
        // NB: sized for the whole file, so the buffer never grows: a grown Vec leaves its old
        // copy behind, unzeroized.
        let mut body = Zeroizing::new(Vec::with_capacity(text.len()));
        let mut closed = false;
        for line in lines.by_ref() {
            if line == end.as_bytes() {
                closed = true;
                break;
            }
            if line.starts_with(DASHES) {
                return Err(pem_error("a new block starts before this one's END line"));
            }
            if line.contains(&b':') {
                // NB: RFC 1421 headers (`Proc-Type: 4,ENCRYPTED`) only appear on encrypted keys.
                return Err(KeyFileError::Encrypted { block, label: short_label(&label) });
            }
            body.extend(line.iter().filter(|b| !b.is_ascii_whitespace()));
        }
        if !closed {
            return Err(pem_error("no END line"));
        }
        let der = Zeroizing::new(STANDARD.decode(&*body).map_err(|_| pem_error("the body is not base64"))?);
        found.push(Block { label, der });
    }
    Ok(found)
}

/// The public key of one block, or `None` for a block that holds no key and is skipped.
fn key_of(at: &Where<'_>, der: &[u8]) -> Result<Option<PublicKey>, KeyFileError> {
    let key = match at.label {
        "PUBLIC KEY" => from_spki(at, &SubjectPublicKeyInfoRef::from_der(der).map_err(|e| at.der(e))?)?,
        "RSA PUBLIC KEY" => {
            let key = pkcs1::RsaPublicKey::from_der(der).map_err(|e| at.der(e))?;
            rsa(at, key.modulus, key.public_exponent)?
        }
        "CERTIFICATE" => {
            let cert = x509_cert::Certificate::from_der(der).map_err(|e| at.der(e))?;
            let spki = cert.tbs_certificate.subject_public_key_info.to_der().map_err(|e| at.der(e))?;
            from_spki(at, &SubjectPublicKeyInfoRef::from_der(&spki).map_err(|e| at.der(e))?)?
        }
        "RSA PRIVATE KEY" => {
            let key = pkcs1::RsaPrivateKey::from_der(der).map_err(|e| at.der(e))?;
            rsa(at, key.modulus, key.public_exponent)?
        }
        "EC PRIVATE KEY" => ec_private(at, None, der)?,
        "PRIVATE KEY" => {
            let info = pkcs8::PrivateKeyInfo::from_der(der).map_err(|e| at.der(e))?;
            match info.algorithm.oid {
                RSA_ENCRYPTION => {
                    let key = pkcs1::RsaPrivateKey::from_der(info.private_key).map_err(|e| at.der(e))?;
                    rsa(at, key.modulus, key.public_exponent)?
                }
                EC_PUBLIC_KEY => ec_private(at, Some((&info.algorithm, info.public_key)), info.private_key)?,
                other => return Err(at.unsupported(&key_type_name(other))),
            }
        }
        // NB: written by `openssl ecparam -genkey` before the key; keyutil skips it too.
        "EC PARAMETERS" => return Ok(None),
        "ENCRYPTED PRIVATE KEY" => {
            return Err(KeyFileError::Encrypted { block: at.block, label: at.label() });
        }
        _ => return Err(KeyFileError::UnknownBlock { block: at.block, label: at.label() }),
    };
    Ok(Some(key))
}

/// The key in a SubjectPublicKeyInfo, re-encoded as Go's `x509.MarshalPKIXPublicKey` writes it.
fn from_spki(at: &Where<'_>, spki: &SubjectPublicKeyInfoRef<'_>) -> Result<PublicKey, KeyFileError> {
    let bits =
        spki.subject_public_key.as_bytes().ok_or_else(|| at.invalid("the key's bit string is ragged"))?;
    match spki.algorithm.oid {
        RSA_ENCRYPTION => {
            // NB: Go's ParsePKIXPublicKey wants NULL parameters for RSA (RFC 3279 2.3.1).
            if !spki.algorithm.parameters.is_some_and(|p| p.is_null()) {
                return Err(at.invalid("an RSA key's algorithm parameters are not NULL"));
            }
            let key = pkcs1::RsaPublicKey::from_der(bits).map_err(|e| at.der(e))?;
            rsa(at, key.modulus, key.public_exponent)
        }
        EC_PUBLIC_KEY => {
            let curve = spki.algorithm.parameters.ok_or_else(|| at.invalid("an EC key names no curve"))?;
            let curve = curve.decode_as::<ObjectIdentifier>().map_err(|e| at.der(e))?;
            ec(at, curve, bits)
        }
        other => Err(at.unsupported(&key_type_name(other))),
    }
}

/// The public part of a SEC1 EC private key, alone or inside PKCS#8, whose algorithm then names
/// the curve and whose v2 form may carry the public key. The private scalar is never read.
fn ec_private(
    at: &Where<'_>,
    pkcs8: Option<(&AlgorithmIdentifierRef<'_>, Option<&[u8]>)>,
    der: &[u8],
) -> Result<PublicKey, KeyFileError> {
    let key = sec1::EcPrivateKey::from_der(der).map_err(|e| at.der(e))?;
    let outer = match pkcs8.and_then(|(a, _)| a.parameters) {
        Some(params) => Some(params.decode_as::<ObjectIdentifier>().map_err(|e| at.der(e))?),
        None => None,
    };
    let inner = key.parameters.and_then(|p| p.named_curve());
    let curve = match (outer, inner) {
        (Some(outer), Some(inner)) if outer != inner => {
            return Err(at.invalid("the PKCS#8 and SEC1 curves differ"));
        }
        (Some(curve), _) | (None, Some(curve)) => curve,
        (None, None) => return Err(at.invalid("an EC key names no curve")),
    };
    let point = key
        .public_key
        .or(pkcs8.and_then(|(_, public)| public))
        .ok_or_else(|| KeyFileError::EcPublicKeyMissing { block: at.block, label: at.label() })?;
    ec(at, curve, point)
}

/// An RSA public key as PKIX DER: rsaEncryption with NULL parameters around the PKCS#1 key,
/// judged as kube-apiserver judges it.
fn rsa(at: &Where<'_>, modulus: UintRef<'_>, exponent: UintRef<'_>) -> Result<PublicKey, KeyFileError> {
    let pkcs1 = pkcs1::RsaPublicKey { modulus, public_exponent: exponent }.to_der().map_err(|e| at.der(e))?;
    let spki = SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef { oid: RSA_ENCRYPTION, parameters: Some(AnyRef::NULL) },
        subject_public_key: BitStringRef::from_bytes(&pkcs1).map_err(|e| at.der(e))?,
    };
    judged(at, spki.to_der().map_err(|e| at.der(e))?)
}

/// An ECDSA public key as PKIX DER: id-ecPublicKey with the named curve around the uncompressed
/// point, the only form Go's `x509.ParsePKIXPublicKey` reads, judged as kube-apiserver judges it.
fn ec(at: &Where<'_>, curve: ObjectIdentifier, point: &[u8]) -> Result<PublicKey, KeyFileError> {
    let spki = SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef { oid: EC_PUBLIC_KEY, parameters: Some(AnyRef::from(&curve)) },
        subject_public_key: BitStringRef::from_bytes(point).map_err(|e| at.der(e))?,
    };
    judged(at, spki.to_der().map_err(|e| at.der(e))?)
}

/// A PKIX DER key that kube-apiserver will accept, or why not, naming the block.
fn judged(at: &Where<'_>, der: Vec<u8>) -> Result<PublicKey, KeyFileError> {
    match check_public_key(&der) {
        Ok(info) => Ok(PublicKey { alg: info.alg, der }),
        Err(PublicKeyError::EcCurve(curve)) => Err(at.unsupported(&format!("an EC key on {curve}"))),
        Err(PublicKeyError::KeyAlgorithm(what)) => Err(at.unsupported(&what)),
        Err(e) => Err(at.invalid(&e.to_string())),
    }
}

/// A label from the file cut to a line, so a hostile file cannot fill a log.
fn short_label(label: &str) -> String {
    const MAX: usize = 40;
    match label.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &label[..at]),
        None => label.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::Alg;

    /// A vector from tests/data/keyfile (made by its generate.sh with openssl).
    fn vector(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/data/keyfile/{name}.pem", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The kid openssl derived for a key: base64url(SHA-256(`openssl pkey -pubout -outform DER`)).
    fn openssl_kid(key: &str) -> String {
        let path = format!("{}/tests/data/keyfile/kids.txt", env!("CARGO_MANIFEST_DIR"));
        let kids = std::fs::read_to_string(path).unwrap();
        let line = kids.lines().find(|l| l.split(' ').next() == Some(key)).unwrap();
        line.split(' ').nth(1).unwrap().to_owned()
    }

    fn one(name: &str) -> PublicKey {
        let keys = public_keys(&vector(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(keys.len(), 1, "{name}");
        keys.into_iter().next().unwrap()
    }

    #[test]
    fn every_form_of_a_key_gets_the_kid_openssl_derives_from_its_pkix_der() {
        let forms: [(&str, &[&str], Alg); 4] = [
            ("rsa", &["rsa-pkcs1", "rsa-pkcs8", "rsa-pkix", "rsa-pkcs1-public", "rsa-cert"], Alg::Rs256),
            ("p256", &["p256-sec1", "p256-pkcs8", "p256-pkix", "p256-cert"], Alg::Es256),
            ("p384", &["p384-sec1"], Alg::Es384),
            ("p521", &["p521-sec1", "p521-pkcs8"], Alg::Es512),
        ];
        for (key, files, alg) in forms {
            let expected = openssl_kid(key);
            for file in files {
                let found = one(file);
                assert_eq!(found.alg, alg, "{file}");
                assert_eq!(found.kid(), expected, "{file}");
            }
        }
        // The PKIX file's DER is exactly what we serve.
        let pkix = vector("p256-pkix");
        let body: String =
            std::str::from_utf8(&pkix).unwrap().lines().filter(|l| !l.starts_with("-----")).collect();
        assert_eq!(one("p256-pkix").der, STANDARD.decode(body).unwrap());
    }

    #[test]
    fn written_keys_read_back_to_the_same_kids_in_order() {
        let keys = [one("rsa-pkcs1"), one("p256-sec1"), one("p384-sec1"), one("p521-sec1")];
        let pem = to_pem(&keys);
        assert_eq!(pem.matches("-----BEGIN PUBLIC KEY-----\n").count(), 4);
        assert!(pem.lines().all(|l| l.len() <= 64), "64 columns, as pem.Encode");
        assert!(pem.starts_with("-----BEGIN") && pem.ends_with("-----END PUBLIC KEY-----\n"), "no comments");
        let back = public_keys(pem.as_bytes()).unwrap();
        assert_eq!(back, keys);
        // The same DER as openssl's `pkey -pubout` for the RSA key.
        assert_eq!(back[0].der, one("rsa-pkix").der);
        assert_eq!(to_pem(&[]), "");
    }

    #[test]
    fn several_blocks_give_several_keys_in_file_order() {
        let keys = public_keys(&vector("bundle")).unwrap();
        let kids: Vec<String> = keys.iter().map(PublicKey::kid).collect();
        assert_eq!(kids, [openssl_kid("rsa"), openssl_kid("p256"), openssl_kid("p384")]);
        let algs: Vec<Alg> = keys.iter().map(|k| k.alg).collect();
        assert_eq!(algs, [Alg::Rs256, Alg::Es256, Alg::Es384]);
    }

    #[test]
    fn keys_kube_apiserver_cannot_verify_with_are_refused_naming_block_and_type() {
        for (file, block, label, what) in [
            ("ed25519-pkix", 1, "PUBLIC KEY", "Ed25519"),
            ("ed25519-pkcs8", 1, "PRIVATE KEY", "Ed25519"),
            ("secp256k1-pkix", 1, "PUBLIC KEY", "secp256k1"),
            ("p224-sec1", 1, "EC PRIVATE KEY", "P-224"),
        ] {
            let err = public_keys(&vector(file)).unwrap_err();
            let KeyFileError::Unsupported { block: b, label: l, .. } = &err else {
                panic!("{file}: {err:?}")
            };
            assert_eq!((*b, l.as_str()), (block, label), "{file}");
            let message = err.to_string();
            assert!(message.contains(what) && message.contains(&format!("block {block}")), "{message}");
        }
        // A refused key after a good one still fails the whole file, naming the second block.
        let mixed = [vector("p256-pkix"), vector("ed25519-pkix")].concat();
        assert!(matches!(public_keys(&mixed), Err(KeyFileError::Unsupported { block: 2, .. })));
    }

    #[test]
    fn an_ec_private_key_without_its_public_key_asks_for_the_public_key_and_hides_the_scalar() {
        let pem = vector("p256-sec1-no-public");
        let err = public_keys(&pem).unwrap_err();
        assert!(matches!(err, KeyFileError::EcPublicKeyMissing { block: 1, .. }), "{err:?}");
        assert!(err.to_string().contains("public key"), "{err}");
        // The private scalar, in every spelling, is in neither the message nor the Debug form.
        let blocks = blocks(&pem).unwrap();
        let key = sec1::EcPrivateKey::from_der(&blocks[0].der).unwrap();
        let hex: String = key.private_key.iter().map(|b| format!("{b:02x}")).collect();
        let body: String = std::str::from_utf8(&pem)
            .unwrap()
            .lines()
            .skip_while(|l| !l.contains("BEGIN EC PRIVATE"))
            .nth(1)
            .unwrap()
            .to_owned();
        for shown in [err.to_string(), format!("{err:?}")] {
            for secret in
                [hex.clone(), hex.to_uppercase(), body[..16].to_owned(), format!("{:?}", key.private_key)]
            {
                assert!(!shown.contains(&secret), "{shown}");
            }
        }
    }

    #[test]
    fn a_pkcs8_v2_ec_key_with_its_public_key_outside_the_sec1_part_is_read() {
        // The SEC1 key without its public key, wrapped in PKCS#8 v2 with the public key beside it.
        let sec1 = blocks(&vector("p256-sec1-no-public")).unwrap().remove(0).der;
        let pkix = blocks(&vector("p256-pkix")).unwrap().remove(0).der;
        let spki = SubjectPublicKeyInfoRef::from_der(&pkix).unwrap();
        let mut info = pkcs8::PrivateKeyInfo::new(spki.algorithm, &sec1);
        info.public_key = spki.subject_public_key.as_bytes();
        let der = info.to_der().unwrap();
        let pem =
            format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", STANDARD.encode(der));
        let keys = public_keys(pem.as_bytes()).unwrap();
        assert_eq!(keys[0].kid(), openssl_kid("p256"));
        // Without it, the same key asks for the public key.
        info.public_key = None;
        let der = info.to_der().unwrap();
        let pem =
            format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", STANDARD.encode(der));
        assert!(matches!(
            public_keys(pem.as_bytes()),
            Err(KeyFileError::EcPublicKeyMissing { block: 1, .. })
        ));
    }

    #[test]
    fn a_damaged_private_key_is_refused_without_its_bytes() {
        let pem = String::from_utf8(vector("rsa-pkcs1")).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(&body).unwrap();
        // Cut inside the private exponent: the DER no longer parses.
        let cut = STANDARD.encode(&der[..600]);
        let damaged = format!("-----BEGIN RSA PRIVATE KEY-----\n{cut}\n-----END RSA PRIVATE KEY-----\n");
        let err = public_keys(damaged.as_bytes()).unwrap_err();
        assert!(matches!(err, KeyFileError::Der { block: 1, .. }), "{err:?}");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(&cut[40..72]), "{shown}");
            assert!(shown.len() < 300, "{shown}");
        }
    }

    #[test]
    fn broken_files_get_an_error_naming_the_problem() {
        type Expect = fn(&KeyFileError) -> bool;
        let cases: [(&str, Expect); 7] = [
            ("", |e| matches!(e, KeyFileError::NoKeys)),
            ("just text\n", |e| matches!(e, KeyFileError::NoKeys)),
            ("-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n", |e| {
                matches!(e, KeyFileError::NoKeys)
            }),
            ("-----BEGIN PUBLIC KEY-----\nAAAA\n", |e| matches!(e, KeyFileError::Pem { block: 1, .. })),
            ("-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n", |e| {
                matches!(e, KeyFileError::Pem { block: 1, .. })
            }),
            (
                "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
                |e| matches!(e, KeyFileError::UnknownBlock { block: 1, label } if label == "X509 CRL"),
            ),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n\
                 -----END RSA PRIVATE KEY-----\n",
                |e| matches!(e, KeyFileError::Encrypted { block: 1, .. }),
            ),
        ];
        for (text, expected) in cases {
            let err = public_keys(text.as_bytes()).unwrap_err();
            assert!(expected(&err), "{text:?}: {err:?}");
        }
        let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(matches!(public_keys(encrypted.as_bytes()), Err(KeyFileError::Encrypted { .. })));
        let not_der = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert!(matches!(public_keys(not_der.as_bytes()), Err(KeyFileError::Der { block: 1, .. })));
        let huge = vec![b'a'; KEY_FILE_MAX_BYTES + 1];
        assert!(matches!(public_keys(&huge), Err(KeyFileError::TooLong { .. })));
        let long_label = format!("-----BEGIN {}-----\nAAAA\n-----END {0}-----\n", "X".repeat(500));
        assert!(public_keys(long_label.as_bytes()).unwrap_err().to_string().len() < 300);
    }

    #[test]
    fn an_ec_point_off_its_curve_is_refused_naming_the_block() {
        // The right prefix and length, but y changed: Go's x509 refuses it, and so would
        // kube-apiserver, rejecting every key of the FetchKeys answer with it.
        let mut der = blocks(&vector("p256-pkix")).unwrap().remove(0).der.to_vec();
        let last = der.len() - 1;
        der[last] ^= 1;
        let pem =
            format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(&der));
        let err = public_keys(pem.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, KeyFileError::Der { block: 1, reason, .. } if reason.contains("P-256")),
            "{err:?}"
        );
    }

    #[test]
    fn crlf_line_ends_and_text_around_blocks_are_read_as_go_reads_them() {
        let pem = String::from_utf8(vector("p256-pkix")).unwrap();
        let dos = format!("comment before\r\n{}\r\ntrailing words", pem.replace('\n', "\r\n"));
        assert_eq!(one("p256-pkix"), public_keys(dos.as_bytes()).unwrap().remove(0));
    }
}
