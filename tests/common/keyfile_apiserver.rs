//! A kube-apiserver that has not flipped to an ExternalJWTSigner, or has rolled back from one:
//! it signs with `--service-account-signing-key-file` (kubeadm's `sa.key`) and verifies with its
//! `--service-account-key-file` keys only. Upstream makes those flags and
//! `--service-account-signing-endpoint` mutually exclusive (facts externaljwt.md 2.1), so such a
//! server knows no key but the ones in its files.
//!
//! Every behaviour models kubernetes/kubernetes as cited beside it:
//! - `pkg/controlplane/apiserver/config.go` `CreateConfig` (earlier `cmd/kube-apiserver/app/
//!   server.go`): each `--service-account-key-file` is read with `keyutil.PublicKeysFromFile`,
//!   and a file that does not parse stops the start ("failed to parse key file");
//! - `staging/src/k8s.io/client-go/util/keyutil/key.go` `ParsePublicKeysPEM` (every key block of
//!   the file) and `PrivateKeyFromFile` (the signing key), read here with kmsgate's
//!   `jwt::keyfile`, whose module documents where it is stricter;
//! - `pkg/serviceaccount/jwt.go`: `JWTTokenGenerator` and `signerFromRSAPrivateKey` (RS256, kid =
//!   `keyIDFromPublicKey`, go-jose's protected header `{"alg","kid"}` with no `typ`, `iss` set
//!   by the generator over the caller's claims), `StaticPublicKeysGetter` (keys by kid, all for
//!   an empty kid) and `jwtTokenAuthenticator.AuthenticateToken` with `hasCorrectIssuer`.
//!
//! Where it differs: only an RSA signing key (kubeadm's default `sa.key`) is supported; go-jose
//! also signs with ECDSA keys.

use std::path::Path;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use kmsgate::jwt::{PublicKey, keyfile};

use crate::externaljwt_apiserver::{CachedKey, SignedToken, cached_key};

/// One kube-apiserver with `--service-account-signing-key-file` and `--service-account-key-file`.
pub struct KeyFileApiServer {
    issuer: String,
    signing: ring::signature::RsaKeyPair,
    signing_kid: String,
    keys: Vec<CachedKey>,
}

impl std::fmt::Debug for KeyFileApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: the signing key stays out of test output.
        f.debug_struct("KeyFileApiServer").field("signing_kid", &self.signing_kid).finish_non_exhaustive()
    }
}

impl KeyFileApiServer {
    /// Starts as kube-apiserver reads its flags: `signing_key_file` (an RSA private key, PEM) signs,
    /// and the keys of every file in `key_files` verify; a file that does not parse fails the
    /// start with kube-apiserver's message.
    pub fn start(signing_key_file: &Path, key_files: &[&Path], issuer: &str) -> Result<Self, String> {
        let pem =
            std::fs::read(signing_key_file).map_err(|e| format!("{}: {e}", signing_key_file.display()))?;
        let signing = signing_key(&pem)
            .map_err(|e| format!("error reading private key file {}: {e}", signing_key_file.display()))?;
        let public = keyfile::public_keys(&pem).map_err(|e| e.to_string())?;
        let signing_kid = public.first().map(PublicKey::kid).ok_or("no key in the signing key file")?;
        let mut keys = Vec::new();
        for file in key_files {
            let read = std::fs::read(file)
                .map_err(|e| e.to_string())
                .and_then(|text| keyfile::public_keys(&text).map_err(|e| e.to_string()))
                .map_err(|e| format!("failed to parse key file {:?}: {e}", file.display().to_string()))?;
            for key in read {
                keys.push(cached_key(key.kid(), key.der, false)?);
            }
        }
        Ok(Self { issuer: issuer.to_owned(), signing, signing_kid, keys })
    }

    /// The kid this server signs with: `keyIDFromPublicKey` of the signing key.
    pub fn signing_kid(&self) -> &str {
        &self.signing_kid
    }

    /// The kids of its key files, in flag and file order.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }

    /// `jwtTokenGenerator.GenerateToken`: `claims_json` with `iss` set to this server's issuer,
    /// under the header `{"alg":"RS256","kid":…}`, signed RS256.
    pub fn sign(&self, claims_json: &str) -> Result<String, String> {
        let mut claims: serde_json::Value = serde_json::from_str(claims_json).map_err(|e| e.to_string())?;
        let object = claims.as_object_mut().ok_or("claims are not a JSON object")?;
        object.insert("iss".into(), self.issuer.clone().into());
        // NB: serde_json sorts members, as Go's map-backed go-jose header does: alg, kid.
        let header = serde_json::json!({ "alg": "RS256", "kid": self.signing_kid });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.signing.public().modulus_len()];
        self.signing
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "RS256 signing failed".to_owned())?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    /// `jwtTokenAuthenticator.AuthenticateToken` up to the issuer check: a token for another
    /// issuer is not this authenticator's; the kid picks the keys of the key files (all for
    /// none); none is "invalid signature, no keys found"; one must verify the signature.
    /// Returns the claims.
    pub fn verify(&self, token: &str) -> Result<serde_json::Value, String> {
        let token = SignedToken::read(token, &self.issuer)?;
        // StaticPublicKeysGetter.GetPublicKeys.
        let kid = token.kid().to_owned();
        token.verify(self.keys.iter().filter(|k| kid.is_empty() || k.kid == kid))
    }
}

/// keyutil `ParsePrivateKeyPEM` for an RSA key: the first `RSA PRIVATE KEY` (PKCS#1) or
/// `PRIVATE KEY` (PKCS#8) block that parses.
fn signing_key(pem: &[u8]) -> Result<ring::signature::RsaKeyPair, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not PEM text")?;
    let mut rest = text;
    while let Some(begin) = rest.find("-----BEGIN ") {
        let after = &rest[begin + 11..];
        let label_end = after.find("-----").ok_or("a BEGIN line without its dashes")?;
        let label = &after[..label_end];
        let end_marker = format!("-----END {label}-----");
        let body_start = label_end + 5;
        let end = after.find(&end_marker).ok_or("a block without its END line")?;
        let body: String = after[body_start..end].split_whitespace().collect();
        let der = base64::engine::general_purpose::STANDARD.decode(body).map_err(|e| e.to_string())?;
        let parsed = match label {
            "RSA PRIVATE KEY" => ring::signature::RsaKeyPair::from_der(&der).ok(),
            "PRIVATE KEY" => ring::signature::RsaKeyPair::from_pkcs8(&der).ok(),
            _ => None,
        };
        if let Some(key) = parsed {
            return Ok(key);
        }
        rest = &after[end + end_marker.len()..];
    }
    Err("data does not contain a valid RSA private key".to_owned())
}
