//! The JWT pieces of the ExternalJWTSigner API that do not depend on a key store: the algorithms
//! kube-apiserver accepts, the kid derivation, the claims check and the header it demands
//! (facts/externaljwt.md 2.5 and 2.7; kubernetes `pkg/serviceaccount/externaljwt/plugin/plugin.go`
//! `validateJWTHeader`, `pkg/serviceaccount/jwt.go` `keyIDFromPublicKey`).

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest as _, Sha256};

pub mod keyfile;
pub mod pkix;

pub use pkix::{KeyInfo, PublicKeyError, check_public_key};

/// Largest `claims` string accepted, in bytes of its base64 form. kube-apiserver's claims (issuer,
/// subject, audiences, pod and node references) are well under 4 KiB; the cap only bounds what a
/// caller can make us decode and parse.
pub const CLAIMS_MAX_BYTES: usize = 64 * 1024;

/// Longest kid kube-apiserver accepts (`validateJWTHeader`: "key id longer than 1 kb").
pub const KID_MAX_BYTES: usize = 1024;

/// Longest JWS header read to find a token's kid, in base64url bytes: kube-apiserver's headers
/// (`alg`, `kid` up to 1 KiB, `typ`) stay well under it.
pub const HEADER_MAX_BYTES: usize = 4096;

/// A signing request or key could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The claims are not URL-safe base64 without padding.
    #[error("claims are not URL-safe base64 without padding (the JWT's second segment)")]
    ClaimsEncoding,
    /// The claims are empty.
    #[error("claims are empty")]
    ClaimsEmpty,
    /// The decoded claims are not one JSON object.
    #[error("claims are not a JSON object: {0}")]
    ClaimsJson(String),
    /// The claims are longer than the cap.
    #[error("claims are {len} bytes, over the limit of {max}")]
    ClaimsTooLong { len: usize, max: usize },
    /// A token's header is not URL-safe base64 without padding.
    #[error("the token header is not URL-safe base64 without padding (the JWT's first segment)")]
    HeaderEncoding,
    /// A token's decoded header is not a JSON object.
    #[error("the token header is not a JSON object")]
    HeaderJson,
    /// A token's header is longer than the cap.
    #[error("the token header is over the limit of {max} bytes")]
    HeaderTooLong { max: usize },
    /// A token's header has no `kid`.
    #[error("the token header has no kid")]
    KidMissing,
    /// A token's header has a `kid` that is not a string.
    #[error("the token header's kid is not a string")]
    KidNotString,
    /// A kid is empty or too long for kube-apiserver.
    #[error("key id is {0} bytes; kube-apiserver accepts 1 to 1024")]
    KidLength(usize),
    /// A token is not three dot-separated segments (a compact JWS).
    #[error("the token is not a compact JWS (three dot-separated segments)")]
    NotCompact,
}

/// A JWS algorithm kube-apiserver accepts for service-account tokens (`validateJWTHeader`), and
/// the only one it publishes for each key type (`openidmetadata.go` `algorithmFromPublicKey`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256, for RSA keys of any size.
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// ECDSA on P-384 with SHA-384.
    Es384,
    /// ECDSA on P-521 with SHA-512.
    Es512,
}

impl Alg {
    /// The `alg` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Es512 => "ES512",
        }
    }

    /// The JWS signature length of an ECDSA algorithm: r and s, each left-padded to the curve
    /// size (RFC 7518 3.4); `None` for RSA, whose length is the modulus length.
    pub fn ecdsa_signature_len(self) -> Option<usize> {
        match self {
            Self::Rs256 => None,
            Self::Es256 => Some(64),
            Self::Es384 => Some(96),
            Self::Es512 => Some(132),
        }
    }
}

impl std::fmt::Display for Alg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Alg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "RS256" => Ok(Self::Rs256),
            "ES256" => Ok(Self::Es256),
            "ES384" => Ok(Self::Es384),
            "ES512" => Ok(Self::Es512),
            other => Err(format!("algorithm {other:?} is not one of RS256, ES256, ES384, ES512")),
        }
    }
}

/// A Transit key type that can sign tokens kube-apiserver verifies (facts/externaljwt.md 3.1): each
/// maps to exactly one algorithm, since kube-apiserver publishes RSA only as RS256 and each curve
/// only with its own hash (`openidmetadata.go` `algorithmFromPublicKey`). Ed25519 is not here:
/// kube-apiserver cannot verify EdDSA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// `ecdsa-p256`: ES256, the default.
    EcdsaP256,
    /// `ecdsa-p384`: ES384.
    EcdsaP384,
    /// `ecdsa-p521`: ES512.
    EcdsaP521,
    /// `rsa-2048`: RS256.
    Rsa2048,
    /// `rsa-3072`: RS256.
    Rsa3072,
    /// `rsa-4096`: RS256.
    Rsa4096,
}

impl KeyType {
    /// Every type, for messages and tests.
    pub const ALL: [Self; 6] =
        [Self::EcdsaP256, Self::EcdsaP384, Self::EcdsaP521, Self::Rsa2048, Self::Rsa3072, Self::Rsa4096];

    /// Transit's name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::EcdsaP521 => "ecdsa-p521",
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
        }
    }

    /// The one algorithm tokens signed with this type carry.
    pub fn alg(self) -> Alg {
        match self {
            Self::EcdsaP256 => Alg::Es256,
            Self::EcdsaP384 => Alg::Es384,
            Self::EcdsaP521 => Alg::Es512,
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => Alg::Rs256,
        }
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|t| t.as_str()).collect();
            format!(
                "key type {s:?} cannot sign tokens kube-apiserver verifies; use one of {}",
                names.join(", ")
            )
        })
    }
}

/// A public key as kube-apiserver wants it in FetchKeys.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The one algorithm this key verifies.
    pub alg: Alg,
    /// PKIX DER (SubjectPublicKeyInfo), never PEM.
    pub der: Vec<u8>,
}

impl PublicKey {
    /// Its kid.
    pub fn kid(&self) -> String {
        kid(&self.der)
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: public, but long; the kid names it in one line.
        f.debug_struct("PublicKey").field("alg", &self.alg).field("kid", &self.kid()).finish()
    }
}

/// The kid of a public key: base64url without padding of SHA-256 of its PKIX DER, as
/// kube-apiserver derives it for its own key files (`jwt.go` `keyIDFromPublicKey`). It depends only
/// on the key, so it is the same on every replica and after every restart, and a recreated key
/// (new key material) can never reuse one.
pub fn kid(public_key_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(public_key_der))
}

/// Checks a kid's length against kube-apiserver's bounds.
pub fn check_kid(kid: &str) -> Result<(), JwtError> {
    if kid.is_empty() || kid.len() > KID_MAX_BYTES {
        return Err(JwtError::KidLength(kid.len()));
    }
    Ok(())
}

/// What the audit log keeps of a token's claims: who it is for and whom it addresses, never the
/// token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimsSummary {
    /// The `sub` claim, when it is a string.
    pub sub: Option<String>,
    /// The `aud` claim: one string, or each string of an array.
    pub aud: Vec<String>,
}

/// Checks the `claims` of a Sign request: URL-safe base64 without padding, exactly as
/// kube-apiserver sends it (`plugin.go` `signAndAssembleJWT`: `base64.RawURLEncoding`), of a
/// JSON object, within the size cap.
pub fn check_claims(claims: &str) -> Result<ClaimsSummary, JwtError> {
    if claims.is_empty() {
        return Err(JwtError::ClaimsEmpty);
    }
    if claims.len() > CLAIMS_MAX_BYTES {
        return Err(JwtError::ClaimsTooLong { len: claims.len(), max: CLAIMS_MAX_BYTES });
    }
    // NB: the decoder's alphabet excludes `=`, `+` and `/`, so padding and standard base64 fail.
    let payload = URL_SAFE_NO_PAD.decode(claims).map_err(|_| JwtError::ClaimsEncoding)?;
    // NB: read as a stream that keeps only `sub` and `aud`: a whole JSON tree costs 32 bytes per
    // value, so 64 KiB of `[0,0,…]` would hold over 1 MiB.
    let Summary(summary) =
        serde_json::from_slice(&payload).map_err(|e| JwtError::ClaimsJson(short(&e.to_string())))?;
    Ok(summary)
}

/// The claims object, read for its `sub` and `aud` only; a later duplicate member wins, as in a
/// JSON map.
struct Summary(ClaimsSummary);

impl<'de> serde::Deserialize<'de> for Summary {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(SummaryVisitor)
    }
}

struct SummaryVisitor;

impl<'de> serde::de::Visitor<'de> for SummaryVisitor {
    type Value = Summary;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Summary, A::Error> {
        let mut summary = ClaimsSummary::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "sub" => summary.sub = map.next_value_seed(MemberVisitor { top: false })?.0.pop(),
                "aud" => summary.aud = map.next_value::<Member>()?.0,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Summary(summary))
    }
}

/// A member's strings: a string alone, or each string of an array; anything else is skipped
/// without being kept.
struct Member(Vec<String>);

impl<'de> serde::Deserialize<'de> for Member {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MemberVisitor { top: true })
    }
}

struct MemberVisitor {
    /// Whether an array's strings count (`aud`), or only a string itself (`sub`, and each
    /// element of `aud`).
    top: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for MemberVisitor {
    type Value = Member;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Member, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for MemberVisitor {
    type Value = Member;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Member, E> {
        Ok(Member(vec![v.to_owned()]))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Member, A::Error> {
        let mut strings = Vec::new();
        if self.top {
            while let Some(Member(found)) = seq.next_element_seed(MemberVisitor { top: false })? {
                strings.extend(found);
            }
        } else {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        }
        Ok(Member(strings))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Member, A::Error> {
        while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
        Ok(Member(Vec::new()))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Member, E> {
        Ok(Member(Vec::new()))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Member, E> {
        Ok(Member(Vec::new()))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Member, E> {
        Ok(Member(Vec::new()))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Member, E> {
        Ok(Member(Vec::new()))
    }

    fn visit_unit<E>(self) -> Result<Member, E> {
        Ok(Member(Vec::new()))
    }
}

/// The header of a Sign answer, base64url without padding: exactly `alg`, `kid` and `typ: "JWT"`,
/// in the order of the upstream mock signer, since kube-apiserver decodes it with
/// DisallowUnknownFields (`plugin.go` `validateJWTHeader`).
pub fn header(alg: Alg, kid: &str) -> Result<String, JwtError> {
    check_kid(kid)?;
    #[derive(serde::Serialize)]
    struct Header<'a> {
        alg: &'static str,
        kid: &'a str,
        typ: &'static str,
    }
    let json = serde_json::to_vec(&Header { alg: alg.as_str(), kid, typ: "JWT" })
        .map_err(|e| JwtError::ClaimsJson(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

/// The `kid` of a compact JWS's header. Only the header is decoded, at most
/// [`HEADER_MAX_BYTES`] of it, and no error carries any part of the token.
pub fn header_kid(token: &str) -> Result<String, JwtError> {
    let bytes = token.as_bytes();
    // NB: look for the first dot within the cap only, so a long token without one is not scanned.
    let end = bytes.iter().take(HEADER_MAX_BYTES + 1).position(|b| *b == b'.');
    let header = match end {
        Some(end) => &bytes[..end],
        None if bytes.len() > HEADER_MAX_BYTES => {
            return Err(JwtError::HeaderTooLong { max: HEADER_MAX_BYTES });
        }
        None => return Err(JwtError::NotCompact),
    };
    if bytes.iter().filter(|b| **b == b'.').count() != 2 {
        return Err(JwtError::NotCompact);
    }
    let json = URL_SAFE_NO_PAD.decode(header).map_err(|_| JwtError::HeaderEncoding)?;
    // NB: serde's messages quote what they reject; none is kept.
    let value: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|_| JwtError::HeaderJson)?;
    let kid = match value.get("kid") {
        None => return Err(JwtError::KidMissing),
        Some(serde_json::Value::String(kid)) => kid.clone(),
        Some(_) => return Err(JwtError::KidNotString),
    };
    check_kid(&kid)?;
    Ok(kid)
}

/// The bytes a signature covers: `header "." claims`, both already base64url.
pub fn signing_input(header: &str, claims: &str) -> Vec<u8> {
    let mut input = Vec::with_capacity(header.len() + 1 + claims.len());
    input.extend_from_slice(header.as_bytes());
    input.push(b'.');
    input.extend_from_slice(claims.as_bytes());
    input
}

/// Encodes a signature as the JWT's third segment.
pub fn encode_signature(signature: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(signature)
}

/// A parser message cut to a line, so a hostile payload cannot fill a log.
fn short(message: &str) -> String {
    const MAX: usize = 200;
    match message.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &message[..at]),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_kid_reads_the_kid_of_a_compact_jws_and_names_every_problem_without_the_token() {
        let b64 = |json: &str| URL_SAFE_NO_PAD.encode(json);
        let secret = "c2VjcmV0LWNsYWltcy10aGF0LW11c3Qtbm90LWxlYWs";
        let token = |header: &str| format!("{header}.{secret}.c2lnbmF0dXJl");
        let good = header(Alg::Es256, "kid-1").unwrap();
        assert_eq!(header_kid(&token(&good)).unwrap(), "kid-1");

        let padded = base64::engine::general_purpose::URL_SAFE.encode(r#"{"alg":"ES256","kid":"k1"}"#);
        assert!(padded.ends_with('='));
        let cases = [
            (token(&padded), JwtError::HeaderEncoding),
            (token("not*base64"), JwtError::HeaderEncoding),
            (token(&b64("kid: k")), JwtError::HeaderJson),
            (token(&b64(r#"["kid"]"#)), JwtError::HeaderJson),
            (token(&b64(r#"{"alg":"ES256"}"#)), JwtError::KidMissing),
            (token(&b64(r#"{"kid":7}"#)), JwtError::KidNotString),
            (token(&b64(r#"{"kid":""}"#)), JwtError::KidLength(0)),
            (token(&"A".repeat(HEADER_MAX_BYTES + 1)), JwtError::HeaderTooLong { max: HEADER_MAX_BYTES }),
            ("A".repeat(HEADER_MAX_BYTES * 4), JwtError::HeaderTooLong { max: HEADER_MAX_BYTES }),
            (format!("{good}.{secret}"), JwtError::NotCompact),
            (format!("{good}.{secret}.x.y"), JwtError::NotCompact),
            (good.clone(), JwtError::NotCompact),
            (String::new(), JwtError::NotCompact),
        ];
        for (bad, expected) in cases {
            let err = header_kid(&bad).unwrap_err();
            assert_eq!(err, expected, "{bad}");
            let said = format!("{err} {err:?}");
            assert!(!said.contains(secret) && !said.contains("kid-1") && !said.contains("k1"), "{said}");
        }
        // A kid at kube-apiserver's limit is read; one past it is refused.
        let longest = header(Alg::Es256, &"k".repeat(KID_MAX_BYTES)).unwrap();
        assert_eq!(header_kid(&token(&longest)).unwrap().len(), KID_MAX_BYTES);
        let over = b64(&format!(r#"{{"kid":"{}"}}"#, "k".repeat(KID_MAX_BYTES + 1)));
        assert_eq!(header_kid(&token(&over)).unwrap_err(), JwtError::KidLength(KID_MAX_BYTES + 1));
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn claims_of_a_kube_apiserver_token_pass_and_name_sub_and_aud() {
        let claims =
            b64(r#"{"aud":["https://kubernetes.default.svc"],"sub":"system:serviceaccount:a:b","exp":1}"#);
        let summary = check_claims(&claims).unwrap();
        assert_eq!(summary.sub.as_deref(), Some("system:serviceaccount:a:b"));
        assert_eq!(summary.aud, vec!["https://kubernetes.default.svc".to_owned()]);
        let one = check_claims(&b64(r#"{"aud":"vault"}"#)).unwrap();
        assert_eq!(one.aud, vec!["vault".to_owned()]);
    }

    #[test]
    fn padded_standard_or_non_json_claims_are_refused_by_name() {
        // `{"a":1}` is 7 bytes, so its base64 has padding.
        let padded = base64::engine::general_purpose::URL_SAFE.encode(r#"{"a":1}"#);
        assert!(padded.ends_with('='));
        assert_eq!(check_claims(&padded), Err(JwtError::ClaimsEncoding));
        // `>>>?` encodes to `+` and `/` in standard base64.
        let standard = base64::engine::general_purpose::STANDARD_NO_PAD.encode(r#"{"a":">>>?"}"#);
        assert!(standard.contains('+') || standard.contains('/'));
        assert_eq!(check_claims(&standard), Err(JwtError::ClaimsEncoding));
        assert!(matches!(check_claims(&b64("[1,2]")), Err(JwtError::ClaimsJson(_))));
        assert!(matches!(check_claims(&b64("not json")), Err(JwtError::ClaimsJson(_))));
        assert_eq!(check_claims(""), Err(JwtError::ClaimsEmpty));
        let long = "a".repeat(CLAIMS_MAX_BYTES + 1);
        assert!(matches!(check_claims(&long), Err(JwtError::ClaimsTooLong { .. })));
    }

    #[test]
    fn header_holds_exactly_alg_kid_and_typ_without_padding() {
        let h = header(Alg::Es256, "kid-1").unwrap();
        assert!(!h.contains('='));
        let json = URL_SAFE_NO_PAD.decode(&h).unwrap();
        assert_eq!(std::str::from_utf8(&json).unwrap(), r#"{"alg":"ES256","kid":"kid-1","typ":"JWT"}"#);
        assert_eq!(header(Alg::Rs256, ""), Err(JwtError::KidLength(0)));
        assert!(header(Alg::Rs256, &"k".repeat(1025)).is_err());
        assert!(header(Alg::Rs256, &"k".repeat(1024)).is_ok());
    }

    #[test]
    fn kid_is_unpadded_base64url_of_the_sha256_of_the_der() {
        // SHA-256 of the empty string, base64url without padding.
        assert_eq!(kid(b""), "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU");
        assert_eq!(kid(b"x").len(), 43);
    }

    #[test]
    fn algorithms_round_trip_through_their_names() {
        for alg in [Alg::Rs256, Alg::Es256, Alg::Es384, Alg::Es512] {
            assert_eq!(alg.as_str().parse::<Alg>().unwrap(), alg);
        }
        assert!("PS256".parse::<Alg>().unwrap_err().contains("PS256"));
        assert!("EdDSA".parse::<Alg>().is_err());
    }

    #[test]
    fn key_types_map_to_their_one_algorithm_and_refuse_others_by_name() {
        for t in KeyType::ALL {
            assert_eq!(t.as_str().parse::<KeyType>().unwrap(), t);
        }
        assert_eq!(KeyType::Rsa4096.alg(), Alg::Rs256);
        assert_eq!(KeyType::EcdsaP521.alg(), Alg::Es512);
        let err = "ed25519".parse::<KeyType>().unwrap_err();
        assert!(err.contains("ed25519") && err.contains("ecdsa-p256"), "{err}");
    }

    #[test]
    fn a_long_parser_message_is_cut() {
        assert!(short(&"é".repeat(500)).chars().count() <= 201);
    }
}
