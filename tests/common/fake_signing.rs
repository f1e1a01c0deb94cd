//! A signing key store in memory for the signer's tests: ES256 key versions with creation times
//! and floors, real ECDSA P-256 signatures (ring), and an outage switch.
//!
//! It models what a Transit signing key answers, as facts/externaljwt.md 3.2 and 3.3 record it
//! (OpenBao `path_keys.go` `formatKeyPolicy`/`asymKey` for the key read; the sign call's
//! `key_version` check and JWS marshaling from `keysutil/policy.go` `SignWithOptions`): per version a PKIX public key and a creation time; `min_decryption_version`
//! and `min_encryption_version` floors; a sign call with an explicit `key_version` that is refused
//! below `min_encryption_version` ("requested version for signing is less than the minimum
//! encryption key version"); JWS marshaling (fixed-width r‖s, 64 bytes for P-256).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use hyper_util::rt::TokioIo;
use kmsgate::{
    backend::{BackendError, KeyMetadata, PublicKey, SigningBackend, SigningKeyMetadata},
    jwt::Alg,
    keyid::{BackendKind, KeyScope},
};
use ring::{
    rand::SystemRandom,
    signature::{self, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
};
use tonic::transport::{Channel, Endpoint};

/// The SubjectPublicKeyInfo prefix of an uncompressed P-256 point (RFC 5480: id-ecPublicKey,
/// prime256v1, then a BIT STRING of 66 bytes).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
    0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

struct Version {
    created: u64,
    pair: EcdsaKeyPair,
}

struct Inner {
    versions: BTreeMap<u64, Version>,
    min_decryption_version: u64,
    min_encryption_version: u64,
    down: bool,
}

/// A Transit-like ES256 signing key in memory; clones share it.
#[derive(Clone)]
pub struct FakeSigning {
    inner: Arc<Mutex<Inner>>,
    scope: KeyScope,
    /// Sign calls that reached the store (also refused ones, but not those made while down).
    pub sign_calls: Arc<AtomicUsize>,
    /// Metadata reads that reached the store while it was up.
    pub metadata_calls: Arc<AtomicUsize>,
}

impl FakeSigning {
    /// A key with one version per creation time (Unix seconds), versions 1, 2, ...
    pub fn new(created: &[u64]) -> Self {
        let fake = Self {
            inner: Arc::new(Mutex::new(Inner {
                versions: BTreeMap::new(),
                min_decryption_version: 1,
                min_encryption_version: 0,
                down: false,
            })),
            scope: KeyScope {
                kind: BackendKind::Transit,
                identity: "test".into(),
                namespace: String::new(),
                mount: "transit".into(),
                key: "signer".into(),
            },
            sign_calls: Arc::new(AtomicUsize::new(0)),
            metadata_calls: Arc::new(AtomicUsize::new(0)),
        };
        for at in created {
            fake.rotate(*at);
        }
        fake
    }

    /// Adds version latest+1 created at `created` (Transit `rotate`).
    pub fn rotate(&self, created: u64) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        let version = inner.versions.keys().next_back().copied().unwrap_or(0) + 1;
        inner.versions.insert(version, Version { created, pair: new_pair() });
        version
    }

    /// Deletes the key and makes it again with versions created at `created`: new key material
    /// under the same version numbers.
    pub fn recreate(&self, created: &[u64]) {
        let mut inner = self.inner.lock().unwrap();
        inner.versions.clear();
        inner.min_decryption_version = 1;
        inner.min_encryption_version = 0;
        for (i, at) in created.iter().enumerate() {
            inner.versions.insert(i as u64 + 1, Version { created: *at, pair: new_pair() });
        }
    }

    /// Sets the floors (Transit `keys/<name>/config`).
    pub fn set_floors(&self, min_decryption_version: u64, min_encryption_version: u64) {
        let mut inner = self.inner.lock().unwrap();
        inner.min_decryption_version = min_decryption_version;
        inner.min_encryption_version = min_encryption_version;
    }

    /// Makes every call fail as unreachable (`true`) or answer again.
    pub fn set_down(&self, down: bool) {
        self.inner.lock().unwrap().down = down;
    }

    /// The public key (PKIX DER) of `version`.
    pub fn public_key(&self, version: u64) -> PublicKey {
        let inner = self.inner.lock().unwrap();
        spki(&inner.versions[&version].pair)
    }
}

fn new_pair() -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
}

fn spki(pair: &EcdsaKeyPair) -> PublicKey {
    let mut der = P256_SPKI_PREFIX.to_vec();
    der.extend_from_slice(pair.public_key().as_ref());
    PublicKey { alg: Alg::Es256, der }
}

impl SigningBackend for FakeSigning {
    fn scope(&self) -> &KeyScope {
        &self.scope
    }

    async fn metadata(&self, _deadline: tokio::time::Instant) -> Result<SigningKeyMetadata, BackendError> {
        let inner = self.inner.lock().unwrap();
        if inner.down {
            return Err(BackendError::Unavailable("connection refused (fake outage)".into()));
        }
        self.metadata_calls.fetch_add(1, Ordering::Relaxed);
        let latest = inner.versions.keys().next_back().copied().unwrap_or(0);
        let floor = inner.min_decryption_version;
        Ok(SigningKeyMetadata {
            key: KeyMetadata {
                versions: inner.versions.iter().map(|(v, k)| (*v, k.created)).collect(),
                latest,
                min_decryption_version: floor,
                min_encryption_version: inner.min_encryption_version,
            },
            public_keys: inner.versions.range(floor..).map(|(v, k)| (*v, spki(&k.pair))).collect(),
        })
    }

    async fn sign(
        &self,
        version: u64,
        alg: Alg,
        input: &[u8],
        _deadline: tokio::time::Instant,
    ) -> Result<Vec<u8>, BackendError> {
        let inner = self.inner.lock().unwrap();
        if inner.down {
            return Err(BackendError::Unavailable("connection refused (fake outage)".into()));
        }
        self.sign_calls.fetch_add(1, Ordering::Relaxed);
        if alg != Alg::Es256 {
            return Err(BackendError::Misconfigured(format!("{alg} asked of an ES256 key")));
        }
        if version < inner.min_encryption_version {
            return Err(BackendError::Retired(
                "requested version for signing is less than the minimum encryption key version".into(),
            ));
        }
        let key = inner
            .versions
            .get(&version)
            .ok_or_else(|| BackendError::KeyNotFound(format!("no version {version}")))?;
        let signature = key
            .pair
            .sign(&SystemRandom::new(), input)
            .map_err(|_| BackendError::Protocol("sign failed".into()))?;
        Ok(signature.as_ref().to_vec())
    }
}

/// Verifies an ES256 JWS signature (r‖s) over `input` with a P-256 public key in PKIX DER.
pub fn verify_es256(der: &[u8], input: &[u8], signature: &[u8]) -> bool {
    let Some(point) = der.strip_prefix(&P256_SPKI_PREFIX[..]) else { return false };
    signature::UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(input, signature).is_ok()
}

/// A gRPC channel over a signer's unix socket, with `:authority` localhost as kube-apiserver
/// sends it (`plugin.go` `New`).
pub async fn signer_channel(socket: &std::path::Path) -> Channel {
    let path = socket.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .unwrap()
}

/// A wall clock a test sets by hand (Unix seconds).
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    /// A clock reading `seconds`.
    pub fn at(seconds: i64) -> Arc<Self> {
        Arc::new(Self(std::sync::atomic::AtomicI64::new(seconds)))
    }

    /// Sets it to `seconds`.
    pub fn set(&self, seconds: i64) {
        self.0.store(seconds, Ordering::Relaxed);
    }
}

impl kmsgate::clock::Clock for ManualClock {
    fn now(&self) -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::from_second(self.0.load(Ordering::Relaxed)).unwrap()
    }
}
