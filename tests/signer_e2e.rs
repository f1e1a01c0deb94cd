//! End to end: the kube-apiserver stand-in (tests/common/externaljwt_apiserver.rs) against the real
//! `kmsgate signer` process. On the local keyring: both API packages, a rotation that publishes
//! before it signs, and verify-only key files. On real OpenBao, logged in with the shipped
//! least-privilege signer policy: every key type signs and verifies, an outage keeps FetchKeys
//! answering with its old data_timestamp while Sign fails fast, and a signer restarted during the
//! outage still lets the stand-in start, and signs again under its old kid once OpenBao is back.

use kmsgate_testkit as common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD},
};
use common::{
    Bao, SignerProcess, eventually,
    externaljwt_apiserver::{Curve, ExternalJwtApiServer, KeyKind, Package},
    fake_signing::signer_channel,
};
use kmsgate::{jwt::KeyType, keyring::SigningKeyring, proto::externaljwt::v1};
use serde_json::{Value, json};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Long enough that a poll publishes a new version well before it may sign.
const LOCAL_LEAD_SECONDS: u64 = 6;
const WAIT: Duration = Duration::from_secs(60);

/// A raw v1 client of `signer`, to read FetchKeys as it answers now.
async fn v1(
    signer: &SignerProcess,
) -> v1::external_jwt_signer_client::ExternalJwtSignerClient<tonic::transport::Channel> {
    v1::external_jwt_signer_client::ExternalJwtSignerClient::new(signer_channel(&signer.socket).await)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Claims as kube-apiserver's `serviceaccount.Claims` builds them for a bound pod token.
fn claims(name: &str) -> String {
    let now = unix_now();
    json!({
        "aud": [ISSUER],
        "exp": now + 3600,
        "iat": now,
        "iss": ISSUER,
        "jti": uuid::Uuid::new_v4().to_string(),
        "kubernetes.io": {
            "namespace": "default",
            "node": { "name": "node-1", "uid": uuid::Uuid::new_v4().to_string() },
            "pod": { "name": format!("{name}-pod"), "uid": uuid::Uuid::new_v4().to_string() },
            "serviceaccount": { "name": name, "uid": uuid::Uuid::new_v4().to_string() }
        },
        "nbf": now,
        "sub": format!("system:serviceaccount:default:{name}")
    })
    .to_string()
}

/// The token's header as JSON.
fn header(token: &str) -> Value {
    let part = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn kid_of(token: &str) -> String {
    header(token)["kid"].as_str().unwrap().to_owned()
}

/// Checks a token's header is exactly alg, kid and typ, with `alg`, and that the stand-in verifies
/// it with a published key not excluded from discovery. Returns the kid.
async fn check_token(api: &ExternalJwtApiServer, token: &str, alg: &str) -> String {
    let h = header(token);
    assert_eq!(h.as_object().unwrap().len(), 3, "exactly alg, kid, typ: {h}");
    assert_eq!(h["alg"], alg, "{h}");
    assert_eq!(h["typ"], "JWT", "{h}");
    let claims = api.verify(token).await.unwrap_or_else(|e| panic!("the token verifies: {e}"));
    assert_eq!(claims["iss"], ISSUER);
    let kid = kid_of(token);
    let published = api.keys();
    let key = published.iter().find(|k| k.kid == kid).expect("the kid is in FetchKeys");
    assert!(!key.exclude_from_oidc_discovery);
    kid
}

/// Signs through the stand-in once the signer has a version old enough to sign.
async fn first_token(api: &ExternalJwtApiServer, name: &str) -> String {
    eventually(WAIT, "a signed token", async || api.sign(&claims(name)).await).await
}

fn local_settings(keyring: &Path, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut settings = vec![
        ("signer.backend".to_owned(), "local".to_owned()),
        ("signer.keyring".to_owned(), keyring.display().to_string()),
        ("signer.poll_interval".to_owned(), "200ms".to_owned()),
        ("signer.publish_lead".to_owned(), format!("{LOCAL_LEAD_SECONDS}s")),
    ];
    settings.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    settings
}

#[tokio::test(flavor = "multi_thread")]
async fn local_keyring_signs_for_both_packages_and_rotates_publishing_first() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    let signer = SignerProcess::start(dir.path(), &local_settings(&keyring, &[])).await;
    let v1 = ExternalJwtApiServer::start(&signer.socket, Package::V1, ISSUER).await.unwrap();
    let alpha = ExternalJwtApiServer::start(&signer.socket, Package::V1alpha1, ISSUER).await.unwrap();
    assert_eq!(v1.max_token_expiration_seconds(), 24 * 3600);
    assert_eq!(alpha.max_token_expiration_seconds(), 24 * 3600);

    let old_v1 = first_token(&v1, "app").await;
    let old = check_token(&v1, &old_v1, "ES256").await;
    let old_alpha = first_token(&alpha, "app").await;
    assert_eq!(check_token(&alpha, &old_alpha, "ES256").await, old);
    assert_eq!(v1.oidc_keys().unwrap(), vec![(old.clone(), "ES256")]);

    // Rotate: the stand-in sees the new version on its refresh, before any token carries it.
    let rotated = SigningKeyring::rotate(&keyring).unwrap();
    let new = eventually(WAIT, "the new version in FetchKeys", async || {
        v1.keys().into_iter().map(|k| k.kid).find(|k| *k != old)
    })
    .await;
    assert!(alpha.keys().iter().any(|k| k.kid == old), "the old version stays published");
    let may_sign_at = rotated.created + LOCAL_LEAD_SECONDS;
    let mut old_after_publish = 0;
    let token = eventually(WAIT, "a token signed by the new version", async || {
        let token = v1.sign(&claims("app")).await.map_err(|e| format!("sign: {e}"))?;
        // NB: the signer decided no later than now, so a new kid before the lead is a violation.
        let now = unix_now();
        let kid = kid_of(&token);
        if kid == new {
            assert!(now >= may_sign_at, "the new version signed at {now}, before {may_sign_at}");
            return Ok(token);
        }
        assert_eq!(kid, old);
        old_after_publish += 1;
        Err(format!("still the old kid at {now}"))
    })
    .await;
    // NB: on a machine stalled past the lead the old kid may never be seen again; the check in
    // the loop is what proves the order, so the count is only reported.
    eprintln!("old kid signed {old_after_publish} times after the new one was published");
    assert_eq!(check_token(&v1, &token, "ES256").await, new);
    let token = first_token(&alpha, "app").await;
    assert_eq!(check_token(&alpha, &token, "ES256").await, new);

    // Tokens of the old version still verify, on both packages.
    for api in [&v1, &alpha] {
        for token in [&old_v1, &old_alpha] {
            api.verify(token).await.unwrap();
        }
        let mut oidc = api.oidc_keys().unwrap();
        oidc.sort();
        let mut want = vec![(old.clone(), "ES256"), (new.clone(), "ES256")];
        want.sort();
        assert_eq!(oidc, want);
    }
    signer.stop().await;
}

/// A PEM file's first block as DER.
fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    B64.decode(body).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_only_keys_verify_and_excluded_ones_stay_out_of_discovery() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/keyfile");
    let sa_key = data.join("rsa-pkcs1.pem");
    let excluded = data.join("p256-pkix.pem");
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    let verify_keys = format!("{},excluded:{}", sa_key.display(), excluded.display());
    let signer =
        SignerProcess::start(dir.path(), &local_settings(&keyring, &[("signer.verify_keys", verify_keys)]))
            .await;
    let api = ExternalJwtApiServer::start(&signer.socket, Package::V1, ISSUER).await.unwrap();

    let sa_pem = std::fs::read_to_string(&sa_key).unwrap();
    let sa_kid = kmsgate::jwt::keyfile::public_keys(sa_pem.as_bytes()).unwrap()[0].kid();
    let excluded_kid =
        kmsgate::jwt::keyfile::public_keys(&std::fs::read(&excluded).unwrap()).unwrap()[0].kid();
    // The derivation openssl gives (tests/data/keyfile/generate.sh).
    let openssl_kids = std::fs::read_to_string(data.join("kids.txt")).unwrap();
    assert!(openssl_kids.contains(&format!("rsa {sa_kid}\n")), "{sa_kid}");
    assert!(openssl_kids.contains(&format!("p256 {excluded_kid}\n")), "{excluded_kid}");
    let keys = api.keys();
    let served = |kid: &str| keys.iter().find(|k| k.kid == kid).map(|k| k.exclude_from_oidc_discovery);
    assert_eq!(served(&sa_kid), Some(false), "the sa.key's public part is served for verification");
    assert_eq!(served(&excluded_kid), Some(true), "the excluded file is served, excluded");
    assert!(keys.iter().any(|k| k.kind == KeyKind::Rsa && k.kid == sa_kid));
    assert!(api.excluded(&excluded_kid));
    let oidc = api.oidc_keys().unwrap();
    assert!(oidc.contains(&(sa_kid.clone(), "RS256")), "{oidc:?}");
    assert!(oidc.iter().all(|(kid, _)| *kid != excluded_kid), "{oidc:?}");

    // A token the old `sa.key` signed, as kube-apiserver signed them before the signer.
    let pair = ring::signature::RsaKeyPair::from_der(&pem_der(&sa_pem)).unwrap();
    let head = URL_SAFE_NO_PAD.encode(json!({ "alg": "RS256", "kid": sa_kid, "typ": "JWT" }).to_string());
    let input = format!("{head}.{}", URL_SAFE_NO_PAD.encode(claims("legacy")));
    let mut signature = vec![0; pair.public().modulus_len()];
    pair.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .unwrap();
    let legacy = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&signature));
    assert_eq!(api.verify(&legacy).await.unwrap()["sub"], "system:serviceaccount:default:legacy");
    let mut tampered = legacy.clone();
    tampered.pop();
    tampered.push(if legacy.ends_with('A') { 'B' } else { 'A' });
    assert!(api.verify(&tampered).await.is_err(), "a changed signature does not verify");

    // A key left out of discovery still verifies: exclusion hides it from the OIDC documents only.
    let rng = ring::rand::SystemRandom::new();
    let p256_pem = std::fs::read_to_string(data.join("p256-pkcs8.pem")).unwrap();
    let p256 = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &pem_der(&p256_pem),
        &rng,
    )
    .unwrap();
    let head =
        URL_SAFE_NO_PAD.encode(json!({ "alg": "ES256", "kid": excluded_kid, "typ": "JWT" }).to_string());
    let input = format!("{head}.{}", URL_SAFE_NO_PAD.encode(claims("hidden")));
    let signature = p256.sign(&rng, input.as_bytes()).unwrap();
    let hidden = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
    assert_eq!(api.verify(&hidden).await.unwrap()["sub"], "system:serviceaccount:default:hidden");

    // The signer signs with its keyring only, never with a verify-only key.
    let first = first_token(&api, "app").await;
    let kid = check_token(&api, &first, "ES256").await;
    for _ in 0..5 {
        let token = api.sign(&claims("app")).await.unwrap();
        assert_eq!(check_token(&api, &token, "ES256").await, kid);
    }
    assert_ne!(kid, sa_kid);
    assert_ne!(kid, excluded_kid);
    signer.stop().await;
}

/// The curve or RSA kind the stand-in must parse a key type's published key as.
fn kind_of(key_type: KeyType) -> KeyKind {
    match key_type {
        KeyType::EcdsaP256 => KeyKind::Ecdsa(Curve::P256),
        KeyType::EcdsaP384 => KeyKind::Ecdsa(Curve::P384),
        KeyType::EcdsaP521 => KeyKind::Ecdsa(Curve::P521),
        _ => KeyKind::Rsa,
    }
}

/// The signer's Transit key for `key_type`, and a token holding only the shipped signer policy
/// for it (deploy/vault/signer-policy.hcl, with the key renamed as setup.sh `signer_policy` does).
async fn signer_key(bao: &Bao, key_type: KeyType, dir: &Path) -> (String, PathBuf) {
    let key = format!("signer-{key_type}");
    bao.post(&format!("transit/keys/{key}"), json!({ "type": key_type.as_str() })).await;
    let policy = std::fs::read_to_string("deploy/vault/signer-policy.hcl")
        .unwrap()
        .replace("/kmsgate-signer\"", &format!("/{key}\""));
    bao.post(&format!("sys/policies/acl/{key}"), json!({ "policy": policy })).await;
    let login = bao
        .post("auth/token/create", json!({ "policies": [key], "no_default_policy": true, "ttl": "1h" }))
        .await;
    let token = login["auth"]["client_token"].as_str().unwrap().to_owned();
    assert_eq!(login["auth"]["policies"], json!([key]), "the signer policy alone");
    let file = dir.join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    (key, file)
}

/// One signer on OpenBao and the stand-in started against it.
struct OnBao {
    key_type: KeyType,
    settings: Vec<(String, String)>,
    dir: tempfile::TempDir,
    signer: SignerProcess,
    api: ExternalJwtApiServer,
    token: String,
}

async fn sign_on_bao(bao: &Bao, key_type: KeyType, package: Package) -> OnBao {
    let dir = tempfile::tempdir().unwrap();
    let (key, token_file) = signer_key(bao, key_type, dir.path()).await;
    let settings: Vec<(String, String)> = [
        ("signer.backend", "vault".to_owned()),
        ("backend.kind", "vault".to_owned()),
        ("backend.identity", "test-bao".to_owned()),
        ("vault.addresses", bao.addr.clone()),
        ("vault.token_file", token_file.display().to_string()),
        ("signer.key", key),
        ("signer.key_type", key_type.as_str().to_owned()),
        ("signer.poll_interval", "300ms".to_owned()),
        ("signer.publish_lead", "2s".to_owned()),
        ("signer.backend_timeout", "2s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let signer = SignerProcess::start(dir.path(), &settings).await;
    let api = ExternalJwtApiServer::start(&signer.socket, package, ISSUER)
        .await
        .unwrap_or_else(|e| panic!("{key_type}: the stand-in starts: {e}\n{}", signer.log()));
    let token = first_token(&api, "app").await;
    let alg = key_type.alg().as_str();
    let kid = check_token(&api, &token, alg).await;
    let published = api.keys();
    let key = published.iter().find(|k| k.kid == kid).unwrap();
    assert_eq!(key.kind, kind_of(key_type), "{key_type}");
    assert_eq!(api.oidc_keys().unwrap(), vec![(kid, alg)], "{key_type}");
    OnBao { key_type, settings, dir, signer, api, token }
}

/// With OpenBao frozen: FetchKeys answers with the data_timestamp of the last read before the
/// freeze, and Sign fails fast with UNAVAILABLE. Then the signer restarts, and the stand-in starts
/// on the persisted set. Returns the restarted signer and its stand-in.
/// OpenBao was frozen between the Unix seconds `paused` (before, after).
async fn outage(one: OnBao, paused: (u64, u64)) -> Restarted {
    let key_type = one.key_type;
    let failing_fast = async || match one.api.sign(&claims("app")).await {
        Err(e) if e.contains("code = Unavailable") && e.contains("failing fast") => Ok(()),
        other => Err(format!("{other:?}")),
    };
    eventually(WAIT, &format!("{key_type}: Sign fails fast"), failing_fast).await;
    let mut raw = v1(&one.signer).await;
    let during = raw.fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    let stamp = during.data_timestamp.unwrap();
    // NB: a read whose answer OpenBao sent just before the freeze may land a moment after it.
    assert!(stamp.seconds as u64 <= paused.1 + 1, "{key_type}: the last read, not now: {stamp:?}");
    // Failing fast took two failed polls, the second waiting out the 2 s backend_timeout.
    assert!(unix_now() >= paused.0 + 2, "{key_type}: failing fast only after the failed polls");
    let published: Vec<String> = one.api.keys().into_iter().map(|k| k.kid).collect();
    assert_eq!(during.keys.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>(), published);
    // The stand-in's own refreshes keep succeeding on the cached answer.
    let calls = one.api.fetch_calls();
    eventually(WAIT, "a stand-in refresh during the outage", async || one.api.fetch_calls() > calls).await;
    assert_eq!(one.api.data_timestamp(), Some((stamp.seconds, stamp.nanos)), "{key_type}");
    let later = raw.fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    assert_eq!((later.data_timestamp, later.keys), (Some(stamp), during.keys), "{key_type}: unchanged");
    one.api.verify(&one.token).await.unwrap();

    drop(one.api);
    one.signer.stop().await;
    let state = std::fs::metadata(one.dir.path().join("keys.json")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&state.permissions()) & 0o777, 0o600, "{key_type}");
    let signer = SignerProcess::start(one.dir.path(), &one.settings).await;
    let api = ExternalJwtApiServer::start(&signer.socket, Package::V1, ISSUER)
        .await
        .unwrap_or_else(|e| panic!("{key_type}: the stand-in starts on the persisted set: {e}"));
    assert_eq!(
        api.data_timestamp(),
        Some((stamp.seconds, stamp.nanos)),
        "{key_type}: its old data_timestamp"
    );
    assert_eq!(api.keys().into_iter().map(|k| k.kid).collect::<Vec<_>>(), published);
    api.verify(&one.token).await.unwrap();
    let err = api.sign(&claims("app")).await.unwrap_err();
    assert!(err.contains("code = Unavailable"), "{key_type}: {err}");
    Restarted { key_type, signer, api, kid: kid_of(&one.token), _dir: one.dir }
}

/// A signer restarted during the outage, and what it signed with before.
struct Restarted {
    key_type: KeyType,
    signer: SignerProcess,
    api: ExternalJwtApiServer,
    kid: String,
    _dir: tempfile::TempDir,
}

/// Once OpenBao is back, the restarted signer signs again under the kid it signed with before.
async fn recovered(again: Restarted) {
    let token = first_token(&again.api, "app").await;
    let kid = check_token(&again.api, &token, again.key_type.alg().as_str()).await;
    assert_eq!(kid, again.kid, "{}: the kid is stable across the restart", again.key_type);
    again.signer.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn openbao_every_key_type_signs_with_the_signer_policy_and_survives_an_outage() {
    let bao = Bao::start().await;
    let runs = KeyType::ALL.into_iter().enumerate().map(|(i, key_type)| {
        let package = if i % 2 == 0 { Package::V1 } else { Package::V1alpha1 };
        sign_on_bao(&bao, key_type, package)
    });
    let signers = futures::future::join_all(runs).await;
    assert_eq!(signers.len(), 6);

    let before = unix_now();
    bao.pause();
    let paused = (before, unix_now());
    let restarted = futures::future::join_all(signers.into_iter().map(|one| outage(one, paused))).await;
    bao.resume();
    futures::future::join_all(restarted.into_iter().map(recovered)).await;
}
