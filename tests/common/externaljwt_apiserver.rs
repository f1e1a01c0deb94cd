//! kube-apiserver's side of the ExternalJWTSigner API (KEP-740), as a stand-in that dials a
//! signer's unix socket with package `v1` or `v1alpha1`, keeps the key cache on tokio time (so a
//! test can pause the clock) and checks every answer as kube-apiserver does.
//!
//! Every behaviour models kubernetes/kubernetes as cited beside it:
//! - `pkg/serviceaccount/externaljwt/plugin/plugin.go`: `New` (dial, initial fill, the sync loop),
//!   `signAndAssembleJWT` (Sign and the token), `validateJWTHeader` (the header checks);
//! - `pkg/serviceaccount/externaljwt/plugin/keycache.go`: `initialFill`, `scheduleSync` (refresh at
//!   the hint, `fallbackRefreshDuration` after a failure), `GetPublicKeys` and `findKeyForKeyID`
//!   (sync on an unknown kid), `syncKeys` (one sync at a time, shared like `singleflight`),
//!   `keysChanged`, `getTokenVerificationKeys` (the whole-answer rejection rules);
//! - `pkg/serviceaccount/jwt.go`: `jwtTokenAuthenticator.AuthenticateToken` and
//!   `hasCorrectIssuer` (verification by kid);
//! - from the facts file (externaljwt.md 2.3, 2.4, 2.7): the Metadata check at start and
//!   `openidmetadata.go` `algorithmFromPublicKey` (which key types the OIDC documents accept).
//!
//! Where it differs: Go's `grpc.WaitForReady` waits for a socket that is not there yet, while this
//! fails at once; ring verifies RSA keys of 2048 bits and up only, where Go also takes 1024; an EC
//! point is checked for its length and form here, and for being on its curve only when a token is
//! verified with it.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hyper_util::rt::TokioIo;
use kmsgate::proto::externaljwt::{v1, v1alpha1};
use spki::{
    SubjectPublicKeyInfoRef,
    der::{Decode as _, asn1::ObjectIdentifier},
};
use tokio::{task::JoinHandle, time::Instant};
use tonic::transport::{Channel, Endpoint};

/// `New`'s `keySyncTimeout` as kube-apiserver passes it (facts 2.3, `plugin.New(ctx, issuer,
/// endpoint, 60*time.Second, false)`): the initial fill and each periodic sync.
pub const KEY_SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// keycache.go `fallbackRefreshDuration`: the next periodic sync after a failed one.
pub const FALLBACK_REFRESH: Duration = Duration::from_secs(10);
/// The Metadata call's timeout at start (facts 2.3).
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// `validation.MinTokenAgeSec`: the least `max_token_expiration_seconds` kube-apiserver starts with
/// (facts 2.4).
pub const MIN_TOKEN_AGE_SECONDS: i64 = 600;
/// `validateJWTHeader` and `getTokenVerificationKeys`: "key id longer than 1 kb".
pub const KID_MAX_BYTES: usize = 1024;

/// Which package of the API kube-apiserver calls: v1alpha1 in 1.32 and 1.33, v1 from 1.34 (facts
/// 1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Package {
    /// `v1.ExternalJWTSigner`.
    V1,
    /// `v1alpha1.ExternalJWTSigner`.
    V1alpha1,
}

/// The curve of an ECDSA key `x509.ParsePKIXPublicKey` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    /// P-224: Go parses it, but the OIDC documents refuse it.
    P224,
    /// P-256, verified as ES256.
    P256,
    /// P-384, verified as ES384.
    P384,
    /// P-521, verified as ES512.
    P521,
}

/// What kind of key `x509.ParsePKIXPublicKey` made of a `Key.key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// An RSA key; `material` is its PKCS#1 RSAPublicKey DER.
    Rsa,
    /// An ECDSA key; `material` is its uncompressed point.
    Ecdsa(Curve),
    /// An Ed25519 key: Go parses it, kube-apiserver cannot verify or publish with it.
    Ed25519,
}

/// One key in the cache, as keycache.go keeps a `serviceaccount.PublicKey`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedKey {
    /// `key_id` as the signer sent it.
    pub kid: String,
    /// `key`, the PKIX DER as sent.
    pub der: Vec<u8>,
    /// What the DER parsed as.
    pub kind: KeyKind,
    /// `exclude_from_oidc_discovery`.
    pub exclude_from_oidc_discovery: bool,
    material: Vec<u8>,
}

/// plugin.go `VerificationKeys`: one good FetchKeys answer.
#[derive(Debug, Clone, Default)]
pub struct VerificationKeys {
    /// The keys, in the answer's order.
    pub keys: Vec<CachedKey>,
    /// `data_timestamp` as (seconds, nanos).
    pub data_timestamp: Option<(i64, i32)>,
    /// now + `refresh_hint_seconds` when the answer came.
    pub next_refresh_hint: Option<Instant>,
}

/// The gRPC client of either package; the messages are the same, so answers are read as v1.
#[derive(Clone)]
enum Client {
    V1(v1::external_jwt_signer_client::ExternalJwtSignerClient<Channel>),
    V1alpha1(v1alpha1::external_jwt_signer_client::ExternalJwtSignerClient<Channel>),
}

impl Client {
    async fn sign(&self, claims: String) -> Result<v1::SignJwtResponse, tonic::Status> {
        match self.clone() {
            Self::V1(mut c) => Ok(c.sign(v1::SignJwtRequest { claims }).await?.into_inner()),
            Self::V1alpha1(mut c) => {
                let a = c.sign(v1alpha1::SignJwtRequest { claims }).await?.into_inner();
                Ok(v1::SignJwtResponse { header: a.header, signature: a.signature })
            }
        }
    }

    async fn fetch_keys(&self) -> Result<v1::FetchKeysResponse, tonic::Status> {
        match self.clone() {
            Self::V1(mut c) => Ok(c.fetch_keys(v1::FetchKeysRequest {}).await?.into_inner()),
            Self::V1alpha1(mut c) => {
                let a = c.fetch_keys(v1alpha1::FetchKeysRequest {}).await?.into_inner();
                let keys = a
                    .keys
                    .into_iter()
                    .map(|k| v1::Key {
                        key_id: k.key_id,
                        key: k.key,
                        exclude_from_oidc_discovery: k.exclude_from_oidc_discovery,
                    })
                    .collect();
                Ok(v1::FetchKeysResponse {
                    keys,
                    data_timestamp: a.data_timestamp,
                    refresh_hint_seconds: a.refresh_hint_seconds,
                })
            }
        }
    }

    async fn metadata(&self) -> Result<i64, tonic::Status> {
        Ok(match self.clone() {
            Self::V1(mut c) => {
                c.metadata(v1::MetadataRequest {}).await?.into_inner().max_token_expiration_seconds
            }
            Self::V1alpha1(mut c) => {
                c.metadata(v1alpha1::MetadataRequest {}).await?.into_inner().max_token_expiration_seconds
            }
        })
    }
}

/// A gRPC error as grpc-go prints it.
fn rpc(status: &tonic::Status) -> String {
    format!("rpc error: code = {:?} desc = {}", status.code(), status.message())
}

/// keycache.go `keyCache`.
struct KeyCache {
    client: Client,
    /// `verificationKeys`, an atomic pointer in Go.
    keys: Mutex<Arc<VerificationKeys>>,
    /// `syncGroup`: one sync at a time; the generation and result of the last one, so callers
    /// that waited behind it share its result as `singleflight.Do` callers do.
    sync_group: tokio::sync::Mutex<(u64, Result<(), String>)>,
    completed: AtomicU64,
    /// Callers in `sync_keys`, running or waiting, so a test can see syncs merge.
    in_sync: AtomicU64,
    fetches: AtomicU64,
    changes: AtomicU64,
}

impl KeyCache {
    fn current(&self) -> Arc<VerificationKeys> {
        Arc::clone(&self.keys.lock().unwrap())
    }

    /// keycache.go `syncKeys`: fetch, replace the whole set, count a change per `keysChanged`.
    async fn sync_keys(&self, timeout: Option<Duration>) -> Result<(), String> {
        self.in_sync.fetch_add(1, Ordering::SeqCst);
        let result = self.sync_once(timeout).await;
        self.in_sync.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn sync_once(&self, timeout: Option<Duration>) -> Result<(), String> {
        let seen = self.completed.load(Ordering::SeqCst);
        let mut group = self.sync_group.lock().await;
        if group.0 != seen {
            return group.1.clone();
        }
        let old = self.current();
        let fetched = match timeout {
            Some(limit) => tokio::time::timeout(limit, self.fetch()).await.unwrap_or_else(|_| {
                Err("rpc error: code = DeadlineExceeded desc = context deadline exceeded".into())
            }),
            None => self.fetch().await,
        };
        let result = fetched
            .map(|new| {
                if keys_changed(&old, &new) {
                    self.changes.fetch_add(1, Ordering::SeqCst);
                }
                *self.keys.lock().unwrap() = Arc::new(new);
            })
            .map_err(|e| format!("while fetching token verification keys: {e}"));
        group.0 += 1;
        group.1 = result.clone();
        self.completed.store(group.0, Ordering::SeqCst);
        result
    }

    /// keycache.go `getTokenVerificationKeys`: one FetchKeys, rejected whole on any bad part.
    async fn fetch(&self) -> Result<VerificationKeys, String> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let answer = self
            .client
            .fetch_keys()
            .await
            .map_err(|s| format!("while getting externally supported jwt signing keys: {}", rpc(&s)))?;
        if answer.refresh_hint_seconds <= 0 {
            return Err(format!("found invalid refresh hint ({}s)", answer.refresh_hint_seconds));
        }
        if answer.keys.is_empty() {
            return Err("found no keys".to_owned());
        }
        let timestamp = check_valid(answer.data_timestamp.as_ref())?;
        let mut keys = Vec::with_capacity(answer.keys.len());
        for key in answer.keys {
            if key.key_id.is_empty() || key.key_id.len() > KID_MAX_BYTES {
                return Err(format!("found invalid public key id {:?}", key.key_id));
            }
            if key.key.is_empty() {
                return Err("found empty public key".to_owned());
            }
            let (kind, material) =
                parse_pkix(&key.key).map_err(|e| format!("while parsing external public keys: {e}"))?;
            keys.push(CachedKey {
                kid: key.key_id,
                der: key.key,
                kind,
                exclude_from_oidc_discovery: key.exclude_from_oidc_discovery,
                material,
            });
        }
        let hint = Duration::from_secs(u64::try_from(answer.refresh_hint_seconds).unwrap_or(u64::MAX / 2));
        Ok(VerificationKeys {
            keys,
            data_timestamp: Some(timestamp),
            next_refresh_hint: Some(Instant::now() + hint),
        })
    }

    /// keycache.go `GetPublicKeys`: the keys of a kid (all for ""), syncing once if none match.
    async fn public_keys(&self, kid: &str) -> Vec<CachedKey> {
        if let Some(found) = self.find(kid) {
            return found;
        }
        if self.sync_keys(None).await.is_err() {
            return Vec::new();
        }
        self.find(kid).unwrap_or_default()
    }

    /// keycache.go `findKeyForKeyID`.
    fn find(&self, kid: &str) -> Option<Vec<CachedKey>> {
        let current = self.current();
        if current.keys.is_empty() {
            return None;
        }
        if kid.is_empty() {
            return Some(current.keys.clone());
        }
        let found: Vec<CachedKey> = current.keys.iter().filter(|k| k.kid == kid).cloned().collect();
        (!found.is_empty()).then_some(found)
    }

    /// keycache.go `scheduleSync`: wake at the hint of the last good answer, sync with the timeout,
    /// and after a failure try again in `fallbackRefreshDuration`. On-demand syncs move the hint
    /// but not this timer, as in Go.
    async fn schedule_sync(self: Arc<Self>) {
        let mut wake = self.current().next_refresh_hint.unwrap_or_else(Instant::now);
        loop {
            tokio::time::sleep_until(wake).await;
            wake = match self.sync_keys(Some(KEY_SYNC_TIMEOUT)).await {
                Ok(()) => self.current().next_refresh_hint.unwrap_or_else(Instant::now),
                Err(_) => Instant::now() + FALLBACK_REFRESH,
            };
        }
    }
}

/// keycache.go `keysChanged`: the timestamp, the count, and each kid and exclude flag in order.
fn keys_changed(old: &VerificationKeys, new: &VerificationKeys) -> bool {
    old.data_timestamp != new.data_timestamp
        || old.keys.len() != new.keys.len()
        || old
            .keys
            .iter()
            .zip(&new.keys)
            .any(|(o, n)| o.kid != n.kid || o.exclude_from_oidc_discovery != n.exclude_from_oidc_discovery)
}

/// `timestamppb.Timestamp.CheckValid`, called by `getTokenVerificationKeys`: present, between
/// 0001-01-01 and 9999-12-31 UTC, nanos in [0, 1e9).
fn check_valid(timestamp: Option<&prost_types::Timestamp>) -> Result<(i64, i32), String> {
    const MIN_SECONDS: i64 = -62_135_596_800;
    const MAX_SECONDS: i64 = 253_402_300_799;
    let t = timestamp.ok_or("invalid data timestamp: invalid nil Timestamp")?;
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(format!("invalid data timestamp: out of range: {t:?}"));
    }
    Ok((t.seconds, t.nanos))
}

const RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const ED25519: &str = "1.3.101.112";

/// The key types `x509.ParsePKIXPublicKey` returns that matter here: RSA (NULL parameters), ECDSA
/// on a named NIST curve (uncompressed point) and Ed25519; anything else, and PEM, is refused.
fn parse_pkix(der: &[u8]) -> Result<(KeyKind, Vec<u8>), String> {
    let spki =
        SubjectPublicKeyInfoRef::from_der(der).map_err(|e| format!("x509: malformed public key: {e}"))?;
    let bits = spki.subject_public_key.as_bytes().ok_or("x509: malformed public key bit string")?;
    match spki.algorithm.oid.to_string().as_str() {
        RSA_ENCRYPTION => {
            if !spki.algorithm.parameters.is_some_and(|p| p.is_null()) {
                return Err("x509: RSA key missing NULL parameters".to_owned());
            }
            Ok((KeyKind::Rsa, bits.to_vec()))
        }
        EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
                .ok_or("x509: invalid ECDSA parameters")?;
            let (curve, field) = match curve.to_string().as_str() {
                "1.3.132.0.33" => (Curve::P224, 28),
                "1.2.840.10045.3.1.7" => (Curve::P256, 32),
                "1.3.132.0.34" => (Curve::P384, 48),
                "1.3.132.0.35" => (Curve::P521, 66),
                _ => return Err("x509: unsupported elliptic curve".to_owned()),
            };
            if bits.first() != Some(&4) || bits.len() != 1 + 2 * field {
                return Err("x509: failed to unmarshal elliptic curve point".to_owned());
            }
            Ok((KeyKind::Ecdsa(curve), bits.to_vec()))
        }
        ED25519 if bits.len() == 32 => Ok((KeyKind::Ed25519, bits.to_vec())),
        _ => Err("x509: unknown public key algorithm".to_owned()),
    }
}

/// A key as `x509.ParsePKIXPublicKey` reads it, for a stand-in that holds keys from elsewhere
/// than FetchKeys (the key-file API server beside this one).
pub(crate) fn cached_key(
    kid: String,
    der: Vec<u8>,
    exclude_from_oidc_discovery: bool,
) -> Result<CachedKey, String> {
    let (kind, material) = parse_pkix(&der)?;
    Ok(CachedKey { kid, der, kind, exclude_from_oidc_discovery, material })
}

/// The one algorithm each key verifies (facts 2.7, `openidmetadata.go` `algorithmFromPublicKey`);
/// `None` for a key the OIDC documents refuse.
fn algorithm_of(kind: &KeyKind) -> Option<&'static str> {
    match kind {
        KeyKind::Rsa => Some("RS256"),
        KeyKind::Ecdsa(Curve::P256) => Some("ES256"),
        KeyKind::Ecdsa(Curve::P384) => Some("ES384"),
        KeyKind::Ecdsa(Curve::P521) => Some("ES512"),
        KeyKind::Ecdsa(Curve::P224) | KeyKind::Ed25519 => None,
    }
}

/// One kube-apiserver with `--service-account-signing-endpoint` set.
pub struct ExternalJwtApiServer {
    issuer: String,
    client: Client,
    cache: Arc<KeyCache>,
    refresher: JoinHandle<()>,
    max_token_expiration_seconds: i64,
}

impl Drop for ExternalJwtApiServer {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl ExternalJwtApiServer {
    /// Starts as kube-apiserver does (facts 2.3): `plugin.New` (the initial FetchKeys under
    /// `KEY_SYNC_TIMEOUT`, then the sync loop), Metadata (at least 600 s), then the OIDC key set
    /// from the keys not excluded. Fails with kube-apiserver's message.
    pub async fn start(socket: &Path, package: Package, issuer: &str) -> Result<Self, String> {
        let path = socket.to_owned();
        // NB: plugin.go `New` dials with :authority localhost; the URI only carries that.
        let channel = Endpoint::from_static("http://localhost").connect_with_connector_lazy(
            tower::service_fn(move |_| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
            }),
        );
        let client = match package {
            Package::V1 => Client::V1(v1::external_jwt_signer_client::ExternalJwtSignerClient::new(channel)),
            Package::V1alpha1 => {
                Client::V1alpha1(v1alpha1::external_jwt_signer_client::ExternalJwtSignerClient::new(channel))
            }
        };
        let cache = Arc::new(KeyCache {
            client: client.clone(),
            keys: Mutex::new(Arc::new(VerificationKeys::default())),
            sync_group: tokio::sync::Mutex::new((0, Ok(()))),
            completed: AtomicU64::new(0),
            in_sync: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            changes: AtomicU64::new(0),
        });
        const SETUP: &str = "while setting up external-jwt-signer";
        cache.sync_keys(Some(KEY_SYNC_TIMEOUT)).await.map_err(|e| {
            format!("{SETUP}: while initially filling key cache: while performing initial cache fill: {e}")
        })?;
        let refresher = tokio::spawn(Arc::clone(&cache).schedule_sync());
        let mut server =
            Self { issuer: issuer.to_owned(), client, cache, refresher, max_token_expiration_seconds: 0 };
        let max = tokio::time::timeout(METADATA_TIMEOUT, server.client.metadata())
            .await
            .map_err(|_| {
                format!("{SETUP}: rpc error: code = DeadlineExceeded desc = context deadline exceeded")
            })?
            .map_err(|s| format!("{SETUP}: {}", rpc(&s)))?;
        if max < MIN_TOKEN_AGE_SECONDS {
            return Err(format!(
                "max token life supported by external-jwt-signer ({max}s) is less than acceptable (min \
                 {MIN_TOKEN_AGE_SECONDS}s)"
            ));
        }
        server.max_token_expiration_seconds = max;
        server.oidc_keys()?;
        Ok(server)
    }

    /// The OIDC key set kube-apiserver builds from the cache (facts 2.3 and 2.7): the keys not
    /// excluded, each with its algorithm; an error for none or for a key type it cannot publish.
    pub fn oidc_keys(&self) -> Result<Vec<(String, &'static str)>, String> {
        let current = self.cache.current();
        let mut listed = Vec::new();
        for key in current.keys.iter().filter(|k| !k.exclude_from_oidc_discovery) {
            let alg = algorithm_of(&key.kind)
                .ok_or_else(|| format!("failed to construct JWKS: unsupported key type {:?}", key.kind))?;
            listed.push((key.kid.clone(), alg));
        }
        if listed.is_empty() {
            return Err("no keys provided for validating keyset".to_owned());
        }
        Ok(listed)
    }

    /// plugin.go `signAndAssembleJWT`: sends `claims_json` as unpadded base64url, checks the answer
    /// (`validateJWTHeader`, then a non-empty signature) and returns the token. The signature is not
    /// verified here, as kube-apiserver does not; [`Self::verify`] does that.
    pub async fn sign(&self, claims_json: &str) -> Result<String, String> {
        let claims = URL_SAFE_NO_PAD.encode(claims_json);
        let answer =
            self.client.sign(claims.clone()).await.map_err(|s| format!("while signing jwt: {}", rpc(&s)))?;
        self.validate_header(&answer.header).await.map_err(|e| format!("while validating header: {e}"))?;
        if answer.signature.is_empty() {
            return Err("empty signature returned".to_owned());
        }
        Ok(format!("{}.{claims}.{}", answer.header, answer.signature))
    }

    /// plugin.go `validateJWTHeader`, with `allowSigningWithNonOIDCKeys` false as kube-apiserver
    /// passes it.
    async fn validate_header(&self, header: &str) -> Result<(), String> {
        let json = URL_SAFE_NO_PAD.decode(header).map_err(|e| format!("while unwrapping header: {e}"))?;
        let parsed = go_header(&json).map_err(|e| format!("while parsing header JSON: {e}"))?;
        if parsed.typ != "JWT" {
            return Err("bad type".to_owned());
        }
        if parsed.kid.is_empty() {
            return Err("key id missing".to_owned());
        }
        if parsed.kid.len() > KID_MAX_BYTES {
            return Err("key id longer than 1 kb".to_owned());
        }
        if !["RS256", "ES256", "ES384", "ES512"].contains(&parsed.alg.as_str()) {
            return Err(format!("bad signing algorithm {:?}", parsed.alg));
        }
        if self.cache.public_keys(&parsed.kid).await.iter().any(|k| k.exclude_from_oidc_discovery) {
            return Err(format!(
                "key used for signing JWT (kid: {}) is excluded from OIDC discovery docs",
                parsed.kid
            ));
        }
        Ok(())
    }

    /// jwt.go `AuthenticateToken` up to the issuer check: the token must carry our issuer
    /// (`hasCorrectIssuer`), its kid picks the cached keys (a sync if unknown; all keys for none),
    /// and one of them must verify the signature. Returns the claims.
    pub async fn verify(&self, token: &str) -> Result<serde_json::Value, String> {
        let token = SignedToken::read(token, &self.issuer)?;
        let keys = self.cache.public_keys(token.kid()).await;
        token.verify(&keys)
    }

    /// Whether the cache holds `kid` with `exclude_from_oidc_discovery` on any copy, which makes
    /// Sign refuse it.
    pub fn excluded(&self, kid: &str) -> bool {
        self.cache.current().keys.iter().any(|k| k.kid == kid && k.exclude_from_oidc_discovery)
    }

    /// The cached keys, in the order of the last good answer.
    pub fn keys(&self) -> Vec<CachedKey> {
        self.cache.current().keys.clone()
    }

    /// The last good answer's `data_timestamp` as (seconds, nanos).
    pub fn data_timestamp(&self) -> Option<(i64, i32)> {
        self.cache.current().data_timestamp
    }

    /// keycache.go `GetCacheAgeMaxSeconds`: seconds to the next refresh hint, not below 0.
    pub fn cache_age_max_seconds(&self) -> u64 {
        let hint = self.cache.current().next_refresh_hint;
        hint.map_or(0, |h| h.saturating_duration_since(Instant::now()).as_secs())
    }

    /// How many FetchKeys calls this server made.
    pub fn fetch_calls(&self) -> u64 {
        self.cache.fetches.load(Ordering::SeqCst)
    }

    /// How many callers are in a key sync now, running it or waiting to share its result.
    pub fn syncs_in_flight(&self) -> u64 {
        self.cache.in_sync.load(Ordering::SeqCst)
    }

    /// How many good answers changed the key set per `keysChanged` (each would rebuild the OIDC
    /// documents).
    pub fn key_set_changes(&self) -> u64 {
        self.cache.changes.load(Ordering::SeqCst)
    }

    /// The Metadata answer kept at start.
    pub fn max_token_expiration_seconds(&self) -> i64 {
        self.max_token_expiration_seconds
    }
}

/// The header struct of `validateJWTHeader`: `alg`, `kid`, `typ` strings.
#[derive(Debug, Default)]
struct GoHeader {
    alg: String,
    kid: String,
    typ: String,
}

/// `json.NewDecoder(..).Decode` with `DisallowUnknownFields` into `GoHeader`: the first JSON value
/// is read (what follows it is not), `null` leaves every field empty, member names match the
/// field tags ignoring case (golang/go `src/encoding/json/decode.go` `Unmarshal`: "preferring an
/// exact match but also accepting a case-insensitive match"; Go also folds some non-ASCII letters,
/// which this does not), any other member is an error, a later duplicate wins, and a value must
/// be a string or null.
fn go_header(json: &[u8]) -> Result<GoHeader, String> {
    let first = serde_json::Deserializer::from_slice(json).into_iter::<serde_json::Value>().next();
    let value = first.ok_or("EOF")?.map_err(|e| e.to_string())?;
    let mut header = GoHeader::default();
    let members = match value {
        serde_json::Value::Null => return Ok(header),
        serde_json::Value::Object(members) => members,
        other => return Err(format!("json: cannot unmarshal {other} into Go value of type struct")),
    };
    for (name, value) in members {
        let field = match name.to_ascii_lowercase().as_str() {
            "alg" => &mut header.alg,
            "kid" => &mut header.kid,
            "typ" => &mut header.typ,
            _ => return Err(format!("json: unknown field {name:?}")),
        };
        match value {
            serde_json::Value::String(s) => *field = s,
            serde_json::Value::Null => {}
            other => {
                return Err(format!(
                    "json: cannot unmarshal {other} into Go struct field .{name} of type string"
                ));
            }
        }
    }
    Ok(header)
}

/// A compact JWT read as jwt.go `jwtTokenAuthenticator.AuthenticateToken` reads it before it asks
/// for keys: a token in JSON serialization or of other than three parts is not one, and a token
/// whose `iss` is another issuer's is not this authenticator's (`hasCorrectIssuer`).
pub(crate) struct SignedToken {
    claims: serde_json::Value,
    alg: String,
    kid: String,
    /// The signing input: `<header>.<payload>` as the token carries them.
    signed: String,
    signature: Vec<u8>,
}

impl SignedToken {
    /// Splits `token` and checks that `issuer` issued it.
    pub(crate) fn read(token: &str, issuer: &str) -> Result<Self, String> {
        if token.trim_start().starts_with('{') {
            return Err("not a compact JWT".to_owned());
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, signature] = parts.as_slice() else {
            return Err("not a JWT of three parts".to_owned());
        };
        let json = |part: &str, what: &str| {
            let decoded = URL_SAFE_NO_PAD.decode(part).ok();
            decoded
                .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                .ok_or(format!("the {what} is not base64url JSON"))
        };
        let claims = json(payload, "payload")?;
        if claims.get("iss").and_then(|i| i.as_str()) != Some(issuer) {
            return Err("the token's issuer is not this API server's".to_owned());
        }
        let head = json(header, "header")?;
        let field = |name: &str| head.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let signature =
            URL_SAFE_NO_PAD.decode(signature).map_err(|e| format!("bad signature encoding: {e}"))?;
        Ok(Self {
            claims,
            alg: field("alg"),
            kid: field("kid"),
            signed: format!("{header}.{payload}"),
            signature,
        })
    }

    /// The header's kid (empty when it names none).
    pub(crate) fn kid(&self) -> &str {
        &self.kid
    }

    /// The claims, once one of `keys` (those the authenticator's key getter gave for the kid)
    /// verifies the signature; with none, "invalid signature, no keys found".
    pub(crate) fn verify<'a>(
        self,
        keys: impl IntoIterator<Item = &'a CachedKey>,
    ) -> Result<serde_json::Value, String> {
        let mut keys = keys.into_iter().peekable();
        if keys.peek().is_none() {
            return Err("invalid signature, no keys found".to_owned());
        }
        let mut errors = Vec::new();
        for key in keys {
            match verify_with(key, &self.alg, self.signed.as_bytes(), &self.signature) {
                Ok(()) => return Ok(self.claims),
                Err(e) => errors.push(e),
            }
        }
        Err(errors.join(", "))
    }
}

/// Verifies one signature with one cached key; the header's alg must be the key's one algorithm
/// (facts 2.7: each key type verifies with one alg only).
pub(crate) fn verify_with(key: &CachedKey, alg: &str, signed: &[u8], signature: &[u8]) -> Result<(), String> {
    use ring::signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
    };
    if algorithm_of(&key.kind) != Some(alg) {
        return Err(format!("kid {}: alg {alg:?} does not fit a {:?} key", key.kid, key.kind));
    }
    let verified = match key.kind {
        KeyKind::Rsa => UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &key.material)
            .verify(signed, signature)
            .is_ok(),
        KeyKind::Ecdsa(Curve::P256) => {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key.material).verify(signed, signature).is_ok()
        }
        KeyKind::Ecdsa(Curve::P384) => {
            UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &key.material).verify(signed, signature).is_ok()
        }
        KeyKind::Ecdsa(Curve::P521) => {
            use p521::ecdsa::{Signature, VerifyingKey, signature::Verifier as _};
            let verifying = VerifyingKey::from_sec1_bytes(&key.material);
            let parsed = Signature::from_slice(signature);
            matches!((verifying, parsed), (Ok(v), Ok(s)) if v.verify(signed, &s).is_ok())
        }
        KeyKind::Ecdsa(Curve::P224) | KeyKind::Ed25519 => false,
    };
    if verified { Ok(()) } else { Err(format!("kid {}: the signature does not verify", key.kid)) }
}
