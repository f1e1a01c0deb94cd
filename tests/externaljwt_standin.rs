//! The kube-apiserver stand-in for ExternalJWTSigner (`kmsgate_testkit::externaljwt_apiserver`),
//! driven against a mock signer modelled on kubernetes/kubernetes
//! `pkg/serviceaccount/externaljwt/plugin/testing/v1/externalsigner_mock.go` `MockSigner`: a
//! header of `alg`, `kid`, `typ` (Go struct order, `omitempty`) as unpadded base64url, the
//! signature over `header "." claims`, FetchKeys answering the configured keys with a refresh hint
//! and a timestamp, Metadata answering the configured maximum, and settable errors. Each test
//! proves one behaviour of the stand-in, so the stand-in can be trusted against the real signer.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD},
};
use kmsgate::proto::externaljwt::{v1, v1alpha1};
use kmsgate_testkit::{
    eventually,
    externaljwt_apiserver::{ExternalJwtApiServer, KeyKind, Package},
};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, RsaKeyPair},
};
use spki::{
    AlgorithmIdentifierRef, SubjectPublicKeyInfoRef,
    der::{
        Encode as _,
        asn1::{AnyRef, BitStringRef, ObjectIdentifier},
    },
};
use tonic::{Request, Response, Status};

const ISSUER: &str = "https://kubernetes.default.svc";

/// A key the mock can sign with.
#[derive(Clone)]
enum SigningKey {
    Rsa(Arc<RsaKeyPair>),
    Ecdsa(Arc<EcdsaKeyPair>),
    P521(Box<p521::ecdsa::SigningKey>),
}

/// A signing key with its PKIX DER and the alg it signs.
#[derive(Clone)]
struct TestKey {
    signing: SigningKey,
    der: Vec<u8>,
    alg: &'static str,
}

impl TestKey {
    fn kid(&self) -> String {
        kmsgate::jwt::kid(&self.der)
    }

    fn rsa() -> Self {
        let pem = |name: &str| {
            let text = std::fs::read_to_string(format!(
                "{}/tests/data/keyfile/{name}.pem",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap();
            let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
            STANDARD.decode(body).unwrap()
        };
        let pair = RsaKeyPair::from_pkcs8(&pem("rsa-pkcs8")).unwrap();
        Self { signing: SigningKey::Rsa(Arc::new(pair)), der: pem("rsa-pkix"), alg: "RS256" }
    }

    fn ecdsa(p384: bool) -> Self {
        let (alg, curve, name) = if p384 {
            (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "1.3.132.0.34", "ES384")
        } else {
            (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "1.2.840.10045.3.1.7", "ES256")
        };
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        use ring::signature::KeyPair as _;
        let der = ec_spki(curve, pair.public_key().as_ref());
        Self { signing: SigningKey::Ecdsa(Arc::new(pair)), der, alg: name }
    }

    fn p521() -> Self {
        let mut scalar = [0x5a_u8; 66];
        scalar[0] = 0;
        let key = p521::ecdsa::SigningKey::from_slice(&scalar).unwrap();
        let point = p521::ecdsa::VerifyingKey::from(&key).to_encoded_point(false);
        Self {
            der: ec_spki("1.3.132.0.35", point.as_bytes()),
            signing: SigningKey::P521(Box::new(key)),
            alg: "ES512",
        }
    }

    fn sign(&self, input: &[u8]) -> Vec<u8> {
        match &self.signing {
            SigningKey::Rsa(pair) => {
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &SystemRandom::new(), input, &mut out).unwrap();
                out
            }
            SigningKey::Ecdsa(pair) => pair.sign(&SystemRandom::new(), input).unwrap().as_ref().to_vec(),
            SigningKey::P521(key) => {
                use p521::ecdsa::signature::Signer as _;
                let sig: p521::ecdsa::Signature = key.sign(input);
                sig.to_bytes().to_vec()
            }
        }
    }
}

fn ec_spki(curve: &str, point: &[u8]) -> Vec<u8> {
    let curve = ObjectIdentifier::new_unwrap(curve);
    SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef {
            oid: ObjectIdentifier::new_unwrap("1.2.840.10045.2.1"),
            parameters: Some(AnyRef::from(&curve)),
        },
        subject_public_key: BitStringRef::from_bytes(point).unwrap(),
    }
    .to_der()
    .unwrap()
}

/// A change to the mock's answers, for a table of cases.
type Change<'a> = Box<dyn Fn(&mut Config) + 'a>;

/// One `Key` of a FetchKeys answer.
#[derive(Clone)]
struct Published {
    kid: String,
    der: Vec<u8>,
    exclude: bool,
}

/// What the mock answers; tests change it between calls (`MockSigner`'s exported fields).
#[derive(Clone)]
struct Config {
    key: TestKey,
    /// `SigningAlg`, `SigningKeyID`, `TokenType`.
    alg: String,
    kid: String,
    typ: String,
    /// A raw header (already base64url) in place of the one built from the fields above.
    raw_header: Option<String>,
    /// A raw signature in place of the real one.
    raw_signature: Option<String>,
    keys: Vec<Published>,
    refresh_hint_seconds: i64,
    data_timestamp: Option<prost_types::Timestamp>,
    fetch_error: Option<Status>,
    metadata_error: Option<Status>,
    max_token_expiration_seconds: i64,
}

impl Config {
    /// `MockSigner.Reset` with `key`: it signs, and it is the one key published.
    fn signing_with(key: TestKey) -> Self {
        Self {
            alg: key.alg.to_owned(),
            kid: key.kid(),
            typ: "JWT".to_owned(),
            raw_header: None,
            raw_signature: None,
            keys: vec![Published { kid: key.kid(), der: key.der.clone(), exclude: false }],
            refresh_hint_seconds: 5,
            data_timestamp: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
            fetch_error: None,
            metadata_error: None,
            max_token_expiration_seconds: 10 * 60,
            key,
        }
    }
}

struct Mock {
    config: Mutex<Config>,
    fetches: AtomicU64,
    /// While set, FetchKeys waits for a permit before answering.
    gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
}

impl Mock {
    fn with(&self, change: impl FnOnce(&mut Config)) {
        change(&mut self.config.lock().unwrap());
    }

    fn sign_claims(&self, claims: &str) -> Result<(String, String), Status> {
        let config = self.config.lock().unwrap().clone();
        let header = config.raw_header.clone().unwrap_or_else(|| {
            // Go struct order with `omitempty`, as MockSigner.Sign marshals it.
            let mut members = Vec::new();
            for (name, value) in [("alg", &config.alg), ("kid", &config.kid), ("typ", &config.typ)] {
                if !value.is_empty() {
                    members.push(format!("{name:?}:{}", serde_json::Value::from(value.as_str())));
                }
            }
            URL_SAFE_NO_PAD.encode(format!("{{{}}}", members.join(",")))
        });
        let signature = config.raw_signature.clone().unwrap_or_else(|| {
            URL_SAFE_NO_PAD.encode(config.key.sign(format!("{header}.{claims}").as_bytes()))
        });
        Ok((header, signature))
    }

    async fn answer(&self) -> Result<Config, Status> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let gate = self.gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
        let config = self.config.lock().unwrap().clone();
        match config.fetch_error.clone() {
            Some(error) => Err(error),
            None => Ok(config),
        }
    }

    fn metadata(&self) -> Result<i64, Status> {
        let config = self.config.lock().unwrap();
        match &config.metadata_error {
            Some(error) => Err(error.clone()),
            None => Ok(config.max_token_expiration_seconds),
        }
    }
}

/// The same service in both packages, whose messages are identical.
macro_rules! serve_package {
    ($package:ident) => {
        #[tonic::async_trait]
        impl $package::external_jwt_signer_server::ExternalJwtSigner for Mock {
            async fn sign(
                &self,
                request: Request<$package::SignJwtRequest>,
            ) -> Result<Response<$package::SignJwtResponse>, Status> {
                let (header, signature) = self.sign_claims(&request.into_inner().claims)?;
                Ok(Response::new($package::SignJwtResponse { header, signature }))
            }

            async fn fetch_keys(
                &self,
                _: Request<$package::FetchKeysRequest>,
            ) -> Result<Response<$package::FetchKeysResponse>, Status> {
                let config = self.answer().await?;
                let keys = config
                    .keys
                    .into_iter()
                    .map(|k| $package::Key {
                        key_id: k.kid,
                        key: k.der,
                        exclude_from_oidc_discovery: k.exclude,
                    })
                    .collect();
                Ok(Response::new($package::FetchKeysResponse {
                    keys,
                    data_timestamp: config.data_timestamp,
                    refresh_hint_seconds: config.refresh_hint_seconds,
                }))
            }

            async fn metadata(
                &self,
                _: Request<$package::MetadataRequest>,
            ) -> Result<Response<$package::MetadataResponse>, Status> {
                Ok(Response::new($package::MetadataResponse {
                    max_token_expiration_seconds: self.metadata()?,
                }))
            }
        }
    };
}

serve_package!(v1);
serve_package!(v1alpha1);

/// A mock signer serving both packages on a socket in a temporary directory.
struct Signer {
    mock: Arc<Mock>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Signer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn signer(config: Config) -> Signer {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("signer.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let mock =
        Arc::new(Mock { config: Mutex::new(config), fetches: AtomicU64::new(0), gate: Mutex::new(None) });
    let server = tonic::transport::Server::builder()
        .add_service(v1::external_jwt_signer_server::ExternalJwtSignerServer::from_arc(Arc::clone(&mock)))
        .add_service(v1alpha1::external_jwt_signer_server::ExternalJwtSignerServer::from_arc(Arc::clone(
            &mock,
        )))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener));
    let server = tokio::spawn(async move {
        let _ = server.await;
    });
    Signer { mock, socket, _dir: dir, server }
}

/// The DER of a one-block vector in tests/data/keyfile.
fn vector_der(name: &str) -> Vec<u8> {
    let text =
        std::fs::read_to_string(format!("{}/tests/data/keyfile/{name}.pem", env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    STANDARD.decode(text.lines().filter(|l| !l.starts_with("-----")).collect::<String>()).unwrap()
}

fn claims(sub: &str) -> String {
    serde_json::json!({"iss": ISSUER, "sub": sub, "aud": ["api"], "exp": 4_000_000_000_u64}).to_string()
}

async fn start(signer: &Signer) -> Result<ExternalJwtApiServer, String> {
    ExternalJwtApiServer::start(&signer.socket, Package::V1, ISSUER).await
}

#[tokio::test]
async fn tokens_of_every_algorithm_are_signed_and_verified_on_both_packages() {
    for key in [TestKey::rsa(), TestKey::ecdsa(false), TestKey::ecdsa(true), TestKey::p521()] {
        for package in [Package::V1, Package::V1alpha1] {
            let signer = signer(Config::signing_with(key.clone()));
            let api = ExternalJwtApiServer::start(&signer.socket, package, ISSUER).await.unwrap();
            assert_eq!(api.max_token_expiration_seconds(), 600);
            assert_eq!(api.keys().len(), 1);
            assert_eq!(api.oidc_keys().unwrap(), vec![(key.kid(), key.alg)]);
            let token = api.sign(&claims("system:serviceaccount:a:b")).await.unwrap();
            let verified =
                api.verify(&token).await.unwrap_or_else(|e| panic!("{} {package:?}: {e}", key.alg));
            assert_eq!(verified["sub"], "system:serviceaccount:a:b");
            // Another payload under the same signature fails.
            let parts: Vec<&str> = token.split('.').collect();
            let forged =
                format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims("system:admin")), parts[2]);
            assert!(api.verify(&forged).await.is_err(), "{}", key.alg);
        }
    }
}

#[tokio::test]
async fn every_header_kube_apiserver_refuses_is_refused_with_its_message() {
    let key = TestKey::ecdsa(false);
    let kid = key.kid();
    let signer = signer(Config::signing_with(key.clone()));
    let api = start(&signer).await.unwrap();
    let b64 = |json: &str| URL_SAFE_NO_PAD.encode(json);
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|c: &mut Config| {
                c.raw_header =
                    Some(b64(&format!(r#"{{"alg":"ES256","kid":"{}","typ":"JWT","x5u":"u"}}"#, c.kid)))
            }),
            "unknown field \"x5u\"",
        ),
        (
            Box::new(|c: &mut Config| {
                c.raw_header =
                    Some(URL_SAFE.encode(format!(r#"{{"alg":"ES256","kid":"{}","typ":"JWT"}}"#, c.kid)))
            }),
            "while unwrapping header",
        ),
        (Box::new(|c: &mut Config| c.typ = "JOSE".to_owned()), "bad type"),
        (Box::new(|c: &mut Config| c.typ = String::new()), "bad type"),
        (Box::new(|c: &mut Config| c.alg = "PS256".to_owned()), "bad signing algorithm \"PS256\""),
        (Box::new(|c: &mut Config| c.alg = "EdDSA".to_owned()), "bad signing algorithm \"EdDSA\""),
        (Box::new(|c: &mut Config| c.kid = String::new()), "key id missing"),
        (Box::new(|c: &mut Config| c.kid = "k".repeat(1025)), "key id longer than 1 kb"),
        (Box::new(|c: &mut Config| c.raw_signature = Some(String::new())), "empty signature returned"),
        (Box::new(|c: &mut Config| c.raw_header = Some(b64("[1]"))), "while parsing header JSON"),
    ];
    for (change, message) in cases {
        signer.mock.with(|c| *c = Config::signing_with(key.clone()));
        signer.mock.with(change);
        let err = api.sign(&claims("a")).await.unwrap_err();
        assert!(err.contains(message), "{err:?} lacks {message:?}");
    }
    // A 1024-byte kid passes the header checks (kube-apiserver does not reject an unknown kid
    // when signing); the member names match ignoring case, as Go's decoder matches them.
    signer.mock.with(|c| *c = Config::signing_with(key.clone()));
    signer.mock.with(|c| c.kid = "k".repeat(1024));
    api.sign(&claims("a")).await.unwrap();
    signer.mock.with(|c| c.kid.clone_from(&kid));
    signer
        .mock
        .with(|c| c.raw_header = Some(b64(&format!(r#"{{"ALG":"ES256","Kid":"{kid}","typ":"JWT"}}"#))));
    api.sign(&claims("a")).await.unwrap();

    // An excluded kid: the signer publishes its own key as verify-only.
    signer.mock.with(|c| *c = Config::signing_with(key.clone()));
    signer.mock.with(|c| {
        c.keys[0].exclude = true;
        c.keys.push(Published { kid: "other".to_owned(), der: TestKey::ecdsa(false).der, exclude: false });
        c.data_timestamp = Some(prost_types::Timestamp { seconds: 1_800_000_000, nanos: 0 });
    });
    // The cache still holds the key as not excluded: the first Sign passes, a sync picks up the
    // flag, and then Sign refuses it.
    api.sign(&claims("a")).await.unwrap();
    assert!(!api.excluded(&kid));
    let fetched = api.fetch_calls();
    let unknown =
        format!("{}.{}.AAAA", b64(r#"{"alg":"ES256","kid":"unknown","typ":"JWT"}"#), b64(&claims("a")));
    assert_eq!(api.verify(&unknown).await.unwrap_err(), "invalid signature, no keys found");
    assert_eq!(api.fetch_calls(), fetched + 1, "the unknown kid synced once");
    assert!(api.excluded(&kid));
    let err = api.sign(&claims("a")).await.unwrap_err();
    assert!(
        err.contains(&format!("key used for signing JWT (kid: {kid}) is excluded from OIDC discovery docs")),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_fetch_keys_answer_stops_start_with_kube_apiserver_s_message() {
    let key = TestKey::ecdsa(false);
    let pem =
        format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", STANDARD.encode(&key.der));
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|c: &mut Config| c.keys.clear()), "found no keys"),
        (
            Box::new(move |c: &mut Config| c.keys[0].der = pem.clone().into_bytes()),
            "while parsing external public keys",
        ),
        (Box::new(|c: &mut Config| c.keys[0].der.clear()), "found empty public key"),
        (Box::new(|c: &mut Config| c.keys[0].kid = String::new()), "found invalid public key id"),
        (Box::new(|c: &mut Config| c.keys[0].kid = "k".repeat(1025)), "found invalid public key id"),
        (Box::new(|c: &mut Config| c.refresh_hint_seconds = 0), "found invalid refresh hint (0s)"),
        (Box::new(|c: &mut Config| c.refresh_hint_seconds = -5), "found invalid refresh hint (-5s)"),
        (Box::new(|c: &mut Config| c.data_timestamp = None), "invalid data timestamp"),
        (
            Box::new(|c: &mut Config| {
                c.data_timestamp = Some(prost_types::Timestamp { seconds: 0, nanos: -1 })
            }),
            "invalid data timestamp",
        ),
        (
            Box::new(|c: &mut Config| c.fetch_error = Some(Status::unavailable("vault down"))),
            "code = Unavailable desc = vault down",
        ),
    ];
    for (change, message) in cases {
        let mut config = Config::signing_with(key.clone());
        change(&mut config);
        let signer = signer(config);
        let err = start(&signer).await.err().expect("start refused");
        assert!(
            err.starts_with(
                "while setting up external-jwt-signer: while initially filling key cache: while performing \
                 initial cache fill: while fetching token verification keys: "
            ) && err.contains(message),
            "{err:?} lacks {message:?}"
        );
    }
}

#[tokio::test]
async fn metadata_and_the_oidc_key_set_are_checked_at_start() {
    let key = TestKey::rsa();
    let refused = |change: Change<'static>, message: &'static str| {
        let key = key.clone();
        async move {
            let mut config = Config::signing_with(key);
            change(&mut config);
            let signer = signer(config);
            let err = start(&signer).await.err().expect("start refused");
            assert!(err.contains(message), "{err:?} lacks {message:?}");
        }
    };
    refused(
        Box::new(|c| c.max_token_expiration_seconds = 300),
        "max token life supported by external-jwt-signer (300s) is less than acceptable (min 600s)",
    )
    .await;
    refused(
        Box::new(|c| c.metadata_error = Some(Status::internal("no"))),
        "while setting up external-jwt-signer: rpc error: code = Internal desc = no",
    )
    .await;
    refused(Box::new(|c| c.keys[0].exclude = true), "no keys provided for validating keyset").await;
    // Ed25519 parses as PKIX, so FetchKeys takes it, but the OIDC key set cannot list it.
    let ed25519 = vector_der("ed25519-pkix");
    let listed = ed25519.clone();
    refused(
        Box::new(move |c| {
            c.keys.push(Published { kid: "ed".to_owned(), der: listed.clone(), exclude: false })
        }),
        "unsupported key type Ed25519",
    )
    .await;
    // Excluded, the same key is only cached, and start succeeds.
    let mut config = Config::signing_with(key.clone());
    config.keys.push(Published { kid: "ed".to_owned(), der: ed25519, exclude: true });
    let signer = signer(config);
    let api = start(&signer).await.unwrap();
    assert_eq!(api.keys()[1].kind, KeyKind::Ed25519);
    assert!(api.excluded("ed"));
}

#[tokio::test]
async fn an_unknown_kid_syncs_the_cache_and_concurrent_syncs_share_one_fetch() {
    let first = TestKey::ecdsa(false);
    let signer = signer(Config::signing_with(first.clone()));
    let api = Arc::new(start(&signer).await.unwrap());
    assert_eq!(api.fetch_calls(), 1);
    assert_eq!(api.data_timestamp(), Some((1_700_000_000, 0)));

    // The signer rotates to a key the cache has not seen: signing with it syncs once.
    let second = TestKey::p521();
    signer.mock.with(|c| {
        let old = c.keys[0].clone();
        *c = Config::signing_with(second.clone());
        c.keys.insert(0, old);
        c.data_timestamp = Some(prost_types::Timestamp { seconds: 1_700_000_100, nanos: 5 });
    });
    let token = api.sign(&claims("b")).await.unwrap();
    assert_eq!(api.fetch_calls(), 2, "the unknown kid in the header synced");
    api.verify(&token).await.unwrap();
    assert_eq!(api.fetch_calls(), 2, "the kid is known now");
    let kids: Vec<String> = api.keys().into_iter().map(|k| k.kid).collect();
    assert_eq!(kids, [first.kid(), second.kid()]);
    assert_eq!(api.data_timestamp(), Some((1_700_000_100, 5)));

    // Eight tokens with unknown kids at once: one FetchKeys answers them all.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *signer.mock.gate.lock().unwrap() = Some(Arc::clone(&gate));
    let fetches = signer.mock.fetches.load(Ordering::SeqCst);
    let token = format!(
        "{}.{}.AAAA",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"nobody","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("c"))
    );
    let waiting: Vec<_> = (0..8)
        .map(|_| {
            let (api, token) = (Arc::clone(&api), token.clone());
            tokio::spawn(async move { api.verify(&token).await })
        })
        .collect();
    eventually(Duration::from_secs(30), "eight syncs in flight, one FetchKeys", async || {
        api.syncs_in_flight() == 8 && signer.mock.fetches.load(Ordering::SeqCst) == fetches + 1
    })
    .await;
    gate.add_permits(100);
    for task in waiting {
        assert_eq!(task.await.unwrap().unwrap_err(), "invalid signature, no keys found");
    }
    assert_eq!(signer.mock.fetches.load(Ordering::SeqCst), fetches + 1);
    assert_eq!(api.fetch_calls(), 3);
}

#[tokio::test]
async fn a_bad_answer_later_keeps_the_old_keys_and_only_real_changes_count() {
    let key = TestKey::ecdsa(true);
    let signer = signer(Config::signing_with(key.clone()));
    let api = start(&signer).await.unwrap();
    assert_eq!(api.key_set_changes(), 1, "the initial fill is a change from nothing");
    let unknown = format!(
        "{}.{}.AAAA",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"ES384","kid":"unknown","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("a"))
    );
    // The same answer again: synced, not a change.
    assert!(api.verify(&unknown).await.is_err());
    assert_eq!((api.fetch_calls(), api.key_set_changes()), (2, 1));
    // A bad answer is refused whole: the old keys stay.
    signer.mock.with(|c| {
        c.keys.push(Published { kid: String::new(), der: TestKey::ecdsa(false).der, exclude: false });
    });
    assert!(api.verify(&unknown).await.is_err());
    assert_eq!((api.fetch_calls(), api.key_set_changes()), (3, 1));
    assert_eq!(api.keys().len(), 1);
    let token = api.sign(&claims("a")).await.unwrap();
    api.verify(&token).await.unwrap();
    // A flipped exclude flag and a new timestamp each count.
    signer.mock.with(|c| {
        c.keys.pop();
        c.keys.push(Published { kid: "k2".to_owned(), der: TestKey::ecdsa(false).der, exclude: false });
    });
    assert!(api.verify(&unknown).await.is_err());
    assert_eq!(api.key_set_changes(), 2);
    signer.mock.with(|c| c.keys[1].exclude = true);
    assert!(api.verify(&unknown).await.is_err());
    assert_eq!(api.key_set_changes(), 3);
    signer
        .mock
        .with(|c| c.data_timestamp = Some(prost_types::Timestamp { seconds: 1_700_000_001, nanos: 0 }));
    assert!(api.verify(&unknown).await.is_err());
    assert_eq!(api.key_set_changes(), 4);
}

#[tokio::test(start_paused = true)]
async fn the_cache_refreshes_at_the_hint_and_every_ten_seconds_after_a_failure() {
    let signer = signer(Config::signing_with(TestKey::ecdsa(false)));
    let api = start(&signer).await.unwrap();
    let t0 = tokio::time::Instant::now();
    assert_eq!(api.fetch_calls(), 1);
    assert_eq!(api.cache_age_max_seconds(), 5);
    let at = |secs: u64| tokio::time::sleep_until(t0 + Duration::from_millis(secs * 1000 + 500));
    at(4).await;
    assert_eq!(api.fetch_calls(), 1, "not before the hint");
    at(5).await;
    assert_eq!(api.fetch_calls(), 2, "at the 5 s hint");
    signer.mock.with(|c| c.fetch_error = Some(Status::unavailable("down")));
    at(10).await;
    assert_eq!(api.fetch_calls(), 3, "at the next hint, which fails");
    assert_eq!(api.keys().len(), 1, "the stale keys stay");
    at(19).await;
    assert_eq!(api.fetch_calls(), 3, "no retry before the 10 s fallback");
    at(20).await;
    assert_eq!(api.fetch_calls(), 4, "the fallback retry, which fails too");
    signer.mock.with(|c| {
        c.fetch_error = None;
        c.refresh_hint_seconds = 30;
    });
    at(30).await;
    assert_eq!(api.fetch_calls(), 5, "the next fallback retry succeeds");
    at(59).await;
    assert_eq!(api.fetch_calls(), 5, "then the new 30 s hint holds");
    at(60).await;
    assert_eq!(api.fetch_calls(), 6);
}

#[tokio::test]
async fn a_token_without_a_kid_is_tried_against_every_key_and_its_alg_must_fit_the_key() {
    let (ec, rsa) = (TestKey::ecdsa(false), TestKey::rsa());
    let mut config = Config::signing_with(rsa.clone());
    config.keys.insert(0, Published { kid: ec.kid(), der: ec.der.clone(), exclude: false });
    let signer = signer(config);
    let api = start(&signer).await.unwrap();
    let payload = URL_SAFE_NO_PAD.encode(claims("d"));
    let signed = |header: &str| {
        let header = URL_SAFE_NO_PAD.encode(header);
        let signature = URL_SAFE_NO_PAD.encode(rsa.sign(format!("{header}.{payload}").as_bytes()));
        format!("{header}.{payload}.{signature}")
    };
    // jwt.go: an empty kid gets every key; the RSA key, second, verifies it.
    api.verify(&signed(r#"{"alg":"RS256","typ":"JWT"}"#)).await.unwrap();
    // The RSA key's kid with an ECDSA alg: each key verifies only its one alg (facts 2.7).
    let wrong = signed(&format!(r#"{{"alg":"ES256","kid":"{}","typ":"JWT"}}"#, rsa.kid()));
    let err = api.verify(&wrong).await.unwrap_err();
    assert!(err.contains("does not fit"), "{err}");
    // Another issuer's token is not ours to verify.
    let foreign = URL_SAFE_NO_PAD.encode(r#"{"iss":"https://elsewhere"}"#);
    let err = api.verify(&format!("e30.{foreign}.AAAA")).await.unwrap_err();
    assert!(err.contains("issuer"), "{err}");
}

#[tokio::test]
async fn keys_read_from_key_files_are_taken_and_verify_tokens() {
    // Each form of the RSA key, read as the signer reads verify-only key files, is the same key
    // with the same kid, and the stand-in verifies the signing key's tokens with it.
    let rsa = TestKey::rsa();
    for form in ["rsa-pkcs1", "rsa-pkcs8", "rsa-cert", "rsa-pkcs1-public"] {
        let pem =
            std::fs::read(format!("{}/tests/data/keyfile/{form}.pem", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let [read] = kmsgate::jwt::keyfile::public_keys(&pem).unwrap().try_into().unwrap();
        let mut config = Config::signing_with(rsa.clone());
        config.keys = vec![Published { kid: read.kid(), der: read.der.clone(), exclude: false }];
        let signer = signer(config);
        let api = start(&signer).await.unwrap();
        assert_eq!(api.keys()[0].kind, KeyKind::Rsa, "{form}");
        let token = api.sign(&claims("e")).await.unwrap();
        api.verify(&token).await.unwrap_or_else(|e| panic!("{form}: {e}"));
    }
    // A P-384 key from a SEC1 file and a P-256 one from a certificate, side by side.
    let bundle =
        std::fs::read(format!("{}/tests/data/keyfile/bundle.pem", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let read = kmsgate::jwt::keyfile::public_keys(&bundle).unwrap();
    let mut config = Config::signing_with(rsa.clone());
    config.keys =
        read.iter().map(|k| Published { kid: k.kid(), der: k.der.clone(), exclude: false }).collect();
    let signer = signer(config);
    let api = start(&signer).await.unwrap();
    let algs: Vec<&str> = api.oidc_keys().unwrap().into_iter().map(|(_, alg)| alg).collect();
    assert_eq!(algs, ["RS256", "ES256", "ES384"]);
}
