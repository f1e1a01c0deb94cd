//! Vault access fit for production, against real OpenBao: TLS trust and reloads, AppRole,
//! certificate and JWT logins, token renewal and re-login across short TTLs.

use kmsgate_testkit as common;

use std::{path::Path, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use common::{Bao, eventually, http_standin};
use kmsgate::{
    backend::Backend,
    config::{VaultAuth, VaultClientConfig},
    metrics::{OutcomeLabels, VaultMetrics},
    transit::{Transit, VaultClient},
};
use serde_json::json;
use tokio::time::Instant;

fn transit(settings: &VaultClientConfig, metrics: &VaultMetrics) -> (Transit, tokio::task::JoinHandle<()>) {
    let client = VaultClient::new(settings, metrics.clone()).unwrap();
    let maintenance = tokio::spawn(client.clone().maintain());
    (Transit::new(client, "test-bao", "", "transit", "kmsgate"), maintenance)
}

/// A Transit backend whose client allows one Vault call at a time.
fn one_slot_transit(
    bao: &Bao,
    dir: &Path,
) -> (std::sync::Arc<Transit>, VaultMetrics, tokio::task::JoinHandle<()>) {
    let mut settings = bao.vault_settings(dir);
    settings.max_concurrent_calls = 1;
    let metrics = VaultMetrics::default();
    let (transit, maintenance) = transit(&settings, &metrics);
    (std::sync::Arc::new(transit), metrics, maintenance)
}

/// Waits until the Decrypt queue's Debug shows `state` (its length and calls in flight): the
/// batching tests resume a frozen server only once every Decrypt is where they expect it.
async fn queued(transit: &Transit, state: &str) {
    eventually(Duration::from_secs(10), "the Decrypt queue to settle", async || {
        format!("{transit:?}").contains(state)
    })
    .await;
}

/// Twelve values sealed for the batching tests: `seed-<i>`, associated data `kid-<i>`.
async fn seal_seeds(transit: &Transit) -> Vec<Vec<u8>> {
    let mut sealed = Vec::new();
    for i in 0..12 {
        let seed = format!("seed-{i}");
        sealed
            .push(transit.encrypt(1, seed.as_bytes(), format!("kid-{i}").as_bytes(), soon()).await.unwrap());
    }
    sealed
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(3)
}

fn count(
    family: &prometheus_client::metrics::family::Family<
        OutcomeLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    outcome: &'static str,
) -> u64 {
    family.get_or_create(&OutcomeLabels { outcome }).get()
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_right_ca_works_wrong_ca_is_refused_and_a_replaced_ca_is_picked_up() {
    let bao = Bao::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = bao.vault_settings(dir.path());
    settings.tls.ca = bao.ca.clone();
    let (right, _m) = transit(&settings, &VaultMetrics::default());
    assert_eq!(right.metadata(soon()).await.unwrap().latest, 1);

    // A CA directory works too: every certificate file in it is trusted.
    let ca_dir = dir.path().join("cas");
    std::fs::create_dir(&ca_dir).unwrap();
    std::fs::copy(bao.ca.as_ref().unwrap(), ca_dir.join("vault.pem")).unwrap();
    std::fs::write(ca_dir.join("README"), "not a certificate").unwrap();
    settings.tls.ca = Some(ca_dir);
    let (from_dir, _m) = transit(&settings, &VaultMetrics::default());
    assert_eq!(from_dir.metadata(soon()).await.unwrap().latest, 1);

    // Some other CA: refused, with a reason that says why.
    let other = rcgen::CertificateParams::new(vec!["other-ca".into()]).unwrap();
    let other = other.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap();
    let wrong_ca = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, other.pem()).unwrap();
    settings.tls.ca = Some(wrong_ca.clone());
    let (wrong, _m) = transit(&settings, &VaultMetrics::default());
    let err = wrong.metadata(soon()).await.unwrap_err().to_string();
    assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "{err}");

    // Replace the CA file in place: the client rebuilds itself, no restart.
    std::fs::copy(bao.ca.as_ref().unwrap(), &wrong_ca).unwrap();
    eventually(Duration::from_secs(10), "the replaced CA to be picked up", async || {
        wrong.metadata(soon()).await.is_ok()
    })
    .await;

    // http:// to a non-loopback address is refused at config time (see config tests); a missing
    // CA file is a clear setup error.
    settings.tls.ca = Some(dir.path().join("missing.pem"));
    let err = VaultClient::new(&settings, VaultMetrics::default()).unwrap_err().to_string();
    assert!(err.contains("missing.pem"), "{err}");
}

async fn approle(bao: &Bao, dir: &Path, ttl: &str, max_ttl: &str) -> (VaultClientConfig, std::path::PathBuf) {
    bao.plugin_policy().await;
    bao.post("sys/auth/approle", json!({"type": "approle"})).await;
    bao.post(
        "auth/approle/role/kmsgate",
        // NB: no `default` policy, so renewal and lookup work through the shipped policy alone.
        json!({"token_policies": ["kmsgate"], "token_no_default_policy": true, "token_ttl": ttl, "token_max_ttl": max_ttl}),
    )
    .await;
    let role_id =
        bao.get("auth/approle/role/kmsgate/role-id").await["data"]["role_id"].as_str().unwrap().to_owned();
    let secret_id = bao.post("auth/approle/role/kmsgate/secret-id", json!({})).await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(dir.join("role_id"), &role_id).unwrap();
    let secret_file = dir.join("secret_id");
    std::fs::write(&secret_file, &secret_id).unwrap();
    let mut settings = bao.vault_settings(dir);
    settings.auth = VaultAuth::AppRole {
        mount: "approle".into(),
        role_id_file: dir.join("role_id"),
        secret_id_file: secret_file.clone(),
    };
    (settings, secret_file)
}

#[tokio::test(flavor = "multi_thread")]
async fn approle_login_renewal_and_relogin_after_secret_id_rotation() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (settings, secret_file) = approle(&bao, dir.path(), "1h", "2h").await;
    let metrics = VaultMetrics::default();
    let (transit, _m) = transit(&settings, &metrics);
    let sealed = transit.encrypt(1, b"seed", b"kid", soon()).await.unwrap();
    assert_eq!(count(&metrics.logins, "ok"), 1);
    assert!(metrics.token_ttl_seconds.get() > 3000.0 || metrics.token_ttl_seconds.get() == -1.0);

    // Rotate the secret_id: the file change logs in again with the new one.
    let new_secret = bao.post("auth/approle/role/kmsgate/secret-id", json!({})).await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(&secret_file, &new_secret).unwrap();
    eventually(Duration::from_secs(10), "a re-login after the secret_id changed", async || {
        count(&metrics.logins, "ok") >= 2
    })
    .await;
    assert_eq!(transit.decrypt(1, &sealed, b"kid", soon()).await.unwrap().as_slice(), b"seed");

    // A bad secret_id is a clear error that does not contain it.
    std::fs::write(&secret_file, "not-the-secret-id").unwrap();
    eventually(Duration::from_secs(10), "the failed login to be counted", async || {
        count(&metrics.logins, "error") >= 1
    })
    .await;
    let text = format!("{:?}", transit.client());
    assert!(!text.contains(&new_secret) && !text.contains("not-the-secret-id"));
}

#[tokio::test(flavor = "multi_thread")]
async fn short_ttl_tokens_are_renewed_then_replaced_while_calls_keep_succeeding() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    // TTL 4s, max TTL 9s: renewals at ~2.7s, then the max TTL forces re-logins.
    let (mut settings, _) = approle(&bao, dir.path(), "4s", "9s").await;
    settings.check_interval = Duration::from_millis(200);
    let metrics = VaultMetrics::default();
    let (transit, _m) = transit(&settings, &metrics);
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(20) {
        let sealed = transit.encrypt(1, b"seed", b"kid", soon()).await;
        assert!(sealed.is_ok(), "call {calls} at {:?} failed: {sealed:?}", started.elapsed());
        calls += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let renewals = count(&metrics.renewals, "ok");
    let logins = count(&metrics.logins, "ok");
    assert!(renewals >= 2, "renewals {renewals}");
    assert!(logins >= 3, "logins {logins}: the 9s max TTL must force re-logins across 20s");
    assert!(calls > 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_login() {
    let bao = Bao::start_tls().await;
    let dir = tempfile::tempdir().unwrap();
    bao.plugin_policy().await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["kmsgate-plugin".into()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("client.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("client-key.pem"), key.serialize_pem()).unwrap();
    bao.post("sys/auth/cert", json!({"type": "cert"})).await;
    bao.post("auth/cert/certs/kmsgate", json!({"certificate": cert.pem(), "token_policies": ["kmsgate"]}))
        .await;

    let mut settings = bao.vault_settings(dir.path());
    settings.tls.ca = bao.ca.clone();
    settings.tls.client_cert = Some(dir.path().join("client.pem"));
    settings.tls.client_key = Some(dir.path().join("client-key.pem"));
    settings.auth = VaultAuth::Cert { mount: "cert".into(), role: "kmsgate".into() };
    let metrics = VaultMetrics::default();
    let (transit, _m) = transit(&settings, &metrics);
    let sealed = transit.encrypt(1, b"seed", b"kid", soon()).await.unwrap();
    assert_eq!(transit.decrypt(1, &sealed, b"kid", soon()).await.unwrap().as_slice(), b"seed");
    assert_eq!(count(&metrics.logins, "ok"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_login_from_a_file() {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    bao.plugin_policy().await;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    // SubjectPublicKeyInfo for a P-256 key: a fixed DER header, then the uncompressed point.
    let mut spki = hex("3059301306072a8648ce3d020106082a8648ce3d030107034200");
    spki.extend_from_slice(pair.public_key().as_ref());
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    bao.post("sys/auth/jwt", json!({"type": "jwt"})).await;
    bao.post("auth/jwt/config", json!({"jwt_validation_pubkeys": [pem]})).await;
    bao.post(
        "auth/jwt/role/kmsgate",
        json!({"role_type": "jwt", "bound_audiences": ["kmsgate"], "user_claim": "sub", "token_policies": ["kmsgate"]}),
    )
    .await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let header = B64URL.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
    let claims =
        B64URL.encode(json!({"sub": "cp-1", "aud": "kmsgate", "iat": now, "exp": now + 600}).to_string());
    let signing_input = format!("{header}.{claims}");
    let signature = pair.sign(&rng, signing_input.as_bytes()).unwrap();
    let jwt = format!("{signing_input}.{}", B64URL.encode(signature.as_ref()));
    std::fs::write(dir.path().join("jwt"), &jwt).unwrap();

    let mut settings = bao.vault_settings(dir.path());
    settings.auth =
        VaultAuth::Jwt { mount: "jwt".into(), role: "kmsgate".into(), jwt_file: dir.path().join("jwt") };
    let metrics = VaultMetrics::default();
    let (transit, _m) = transit(&settings, &metrics);
    transit.encrypt(1, b"seed", b"kid", soon()).await.unwrap();
    assert_eq!(count(&metrics.logins, "ok"), 1);
    assert!(!format!("{:?}", transit.client()).contains(&jwt));
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_calls_are_capped_and_waiting_ones_honour_their_deadline() {
    use kmsgate::backend::BackendError;
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (transit, metrics, _m) = one_slot_transit(&bao, dir.path());
    transit.metadata(soon()).await.unwrap();
    bao.pause();
    let holder = {
        let transit = transit.clone();
        tokio::spawn(async move { transit.metadata(Instant::now() + Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiter = {
        let transit = transit.clone();
        // NB: a deadline long enough that a loaded machine still sees the call waiting before it
        // gives up; the proof below is by order, so a longer wait weakens nothing.
        tokio::spawn(async move { transit.metadata(Instant::now() + Duration::from_secs(6)).await })
    };
    let mut waiting = 0;
    eventually(Duration::from_millis(5500), "the second call waits", async || {
        waiting = metrics.calls_waiting.get();
        waiting == 1
    })
    .await;
    assert_eq!(waiting, 1, "the second call waits for the one slot");
    let result = waiter.await.unwrap();
    assert!(matches!(result, Err(BackendError::Deadline)), "{result:?}");
    // Vault is still paused, so the slot is still held: the waiter left at its own deadline, not
    // when the slot came free. Proven by order, not by a wall-clock bound a busy machine breaks.
    assert!(!holder.is_finished(), "the holder keeps the slot while Vault is paused");
    assert_eq!(metrics.calls_waiting.get(), 0);
    // A waiting call whose caller goes away (a cancelled gRPC request) is no longer counted.
    let abandoned = {
        let transit = transit.clone();
        tokio::spawn(async move { transit.metadata(Instant::now() + Duration::from_secs(5)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    abandoned.abort();
    let _ = abandoned.await;
    assert_eq!(metrics.calls_waiting.get(), 0, "a cancelled waiter must not stay counted");
    bao.resume();
    assert!(holder.await.unwrap().is_ok(), "the call holding the slot completes once Vault answers");
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_login_for_the_controller() {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    // A stand-in for kube-apiserver's TokenReview API: it vouches for one service account.
    let reviews = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = reviews.clone();
    let api = http_standin::serve(
        http::Method::POST,
        "/apis/authentication.k8s.io/v1/tokenreviews",
        move |request| {
            let content_type =
                request.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
            assert!(content_type.is_some_and(|t| t.starts_with("application/json")), "{content_type:?}");
            let review: serde_json::Value = serde_json::from_slice(request.body()).unwrap();
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            http_standin::json(json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": review["spec"],
                "status": {
                    "authenticated": true,
                    "audiences": review["spec"]["audiences"],
                    "user": {
                        "username": "system:serviceaccount:kube-system:kmsgate",
                        "uid": "11111111-2222-3333-4444-555555555555",
                        "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system"],
                    },
                },
            }))
        },
    )
    .await;

    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    bao.plugin_policy().await;
    bao.post("sys/auth/kubernetes", json!({"type": "kubernetes"})).await;
    // NB: the CA is required by the config call but unused over the stand-in's plain http.
    let ca = rcgen::CertificateParams::new(vec!["kubernetes".into()]).unwrap();
    let ca = ca.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem();
    bao.post(
        "auth/kubernetes/config",
        json!({"kubernetes_host": api, "disable_local_ca_jwt": true, "kubernetes_ca_cert": ca}),
    )
    .await;
    bao.post(
        "auth/kubernetes/role/kmsgate",
        json!({
            "bound_service_account_names": ["kmsgate"],
            "bound_service_account_namespaces": ["kube-system"],
            "token_policies": ["kmsgate"],
        }),
    )
    .await;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let header = B64URL.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
    let claims = B64URL.encode(
        json!({
            "iss": "https://kubernetes.default.svc",
            "sub": "system:serviceaccount:kube-system:kmsgate",
            "aud": ["https://kubernetes.default.svc"],
            "iat": now,
            "exp": now + 600,
            "kubernetes.io": {
                "namespace": "kube-system",
                "serviceaccount": {"name": "kmsgate", "uid": "11111111-2222-3333-4444-555555555555"},
            },
        })
        .to_string(),
    );
    let input = format!("{header}.{claims}");
    let jwt = format!("{input}.{}", B64URL.encode(pair.sign(&rng, input.as_bytes()).unwrap().as_ref()));
    std::fs::write(dir.path().join("sa-token"), &jwt).unwrap();

    let mut settings = bao.vault_settings(dir.path());
    settings.auth = VaultAuth::Kubernetes {
        mount: "kubernetes".into(),
        role: "kmsgate".into(),
        jwt_file: dir.path().join("sa-token"),
    };
    let metrics = VaultMetrics::default();
    let (transit, _m) = transit(&settings, &metrics);
    let sealed = transit.encrypt(1, b"seed", b"kid", soon()).await;
    assert!(
        sealed.is_ok(),
        "{sealed:?}; TokenReview calls: {}; log: {}",
        reviews.load(std::sync::atomic::Ordering::Relaxed),
        std::fs::read_to_string(bao.dir().join("bao.log")).unwrap_or_default()
    );
    assert_eq!(count(&metrics.logins, "ok"), 1);
    assert!(reviews.load(std::sync::atomic::Ordering::Relaxed) >= 1, "Vault asked the TokenReview API");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_token_file_is_picked_up_before_the_old_token_dies() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    bao.plugin_policy().await;
    let first = bao.post("auth/token/create", json!({"policies": ["kmsgate"], "ttl": "1h"})).await["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = bao.post("auth/token/create", json!({"policies": ["kmsgate"], "ttl": "1h"})).await["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut settings = bao.vault_settings(dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &first).unwrap();
    settings.auth = VaultAuth::Token { file: token_file.clone() };
    let metrics = VaultMetrics::default();
    let (transit, _m) = transit(&settings, &metrics);
    transit.encrypt(1, b"seed", b"kid", soon()).await.unwrap();
    let loads = count(&metrics.logins, "ok");

    std::fs::write(&token_file, &second).unwrap();
    eventually(Duration::from_secs(10), "the new token file to be read", async || {
        count(&metrics.logins, "ok") > loads
    })
    .await;
    bao.post("auth/token/revoke", json!({"token": first})).await;
    transit.encrypt(1, b"seed", b"kid", soon()).await.unwrap();
    eventually(Duration::from_secs(10), "the token TTL to be known", async || {
        metrics.token_ttl_seconds.get() > 3000.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_namespace_header_reaches_vault_and_the_key_id() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    bao.post("sys/namespaces/team-a", json!({})).await;
    let http = reqwest::Client::new();
    for (path, body) in
        [("sys/mounts/transit", json!({"type": "transit"})), ("transit/keys/kmsgate", json!({}))]
    {
        let r = http
            .post(format!("{}/v1/{path}", bao.addr))
            .header("X-Vault-Token", &bao.token)
            .header("X-Vault-Namespace", "team-a")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.text().await.unwrap());
    }
    bao.post("transit/keys/kmsgate/rotate", json!({})).await;
    let mut settings = bao.vault_settings(dir.path());
    settings.namespace = "team-a".into();
    let client = VaultClient::new(&settings, VaultMetrics::default()).unwrap();
    let in_namespace = Transit::new(client, "test-bao", "team-a", "transit", "kmsgate");
    // The root namespace's key was rotated to 2; the team's key is still at 1.
    assert_eq!(in_namespace.metadata(soon()).await.unwrap().latest, 1);
    let sealed = in_namespace.encrypt(1, b"seed", b"kid", soon()).await.unwrap();
    assert_eq!(in_namespace.decrypt(1, &sealed, b"kid", soon()).await.unwrap().as_slice(), b"seed");
    let key_id = in_namespace.scope().key_id(1, 0).to_string();
    assert!(key_id.contains(":team-a:"), "{key_id}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_renewals_and_logins_are_paced_not_spun() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut settings, _) = approle(&bao, dir.path(), "2s", "1h").await;
    settings.check_interval = Duration::from_millis(200);
    let metrics = VaultMetrics::default();
    let (transit, _m) = transit(&settings, &metrics);
    transit.metadata(soon()).await.unwrap();
    // Revoke the token and delete the role: renewal (due at ~1.3s) and login now fail at once.
    bao.post("sys/leases/revoke-prefix/auth/approle/login", json!({})).await;
    let delete = reqwest::Client::new()
        .delete(format!("{}/v1/auth/approle/role/kmsgate", bao.addr))
        .header("X-Vault-Token", &bao.token)
        .send()
        .await
        .unwrap();
    assert!(delete.status().is_success());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = count(&metrics.renewals, "error") + count(&metrics.logins, "error");
    assert!(attempts >= 1, "a renewal was due and must have been tried");
    assert!(attempts <= 30, "{attempts} failed renewals/logins in 3s: the maintenance loop spins");
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_decrypts_are_batched_and_each_gets_its_own_answer() {
    use kmsgate::backend::BackendError;
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (transit, metrics, _m) = one_slot_transit(&bao, dir.path());
    let sealed = seal_seeds(&transit).await;
    // The first Decrypt takes the only slot and hangs on the frozen server; the rest queue up.
    bao.pause();
    let mut tasks = Vec::new();
    for (i, ciphertext) in sealed.into_iter().enumerate() {
        let transit = transit.clone();
        // One item carries the wrong associated data: only it may fail.
        let aad = if i == 7 { "kid-wrong".to_owned() } else { format!("kid-{i}") };
        tasks.push(tokio::spawn(async move {
            transit.decrypt(1, &ciphertext, aad.as_bytes(), Instant::now() + Duration::from_secs(8)).await
        }));
        if i == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    queued(&transit, "waiting: 11").await;
    bao.resume();
    for (i, task) in tasks.into_iter().enumerate() {
        let result = task.await.unwrap();
        if i == 7 {
            assert!(matches!(result, Err(BackendError::Rejected(_))), "{result:?}");
        } else {
            assert_eq!(result.unwrap().as_slice(), format!("seed-{i}").as_bytes());
        }
    }
    assert_eq!(metrics.batch_calls.get(), 1, "the eleven waiting Decrypts go out as one batch");
    assert_eq!(metrics.batched_items.get(), 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_decrypt_backlog_waits_for_few_calls_in_flight_and_leaves_as_one_batch() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    // NB: the default cap of 32 calls: before, each of these Decrypts took a free slot of its own
    // and went out alone, so a cold-start storm cost OpenBao one call per seed.
    let settings = bao.vault_settings(dir.path());
    assert!(settings.max_concurrent_calls >= 12);
    let metrics = VaultMetrics::default();
    let (transit, _maintenance) = transit(&settings, &metrics);
    let transit = std::sync::Arc::new(transit);
    let sealed = seal_seeds(&transit).await;
    // The first two Decrypts take the two decrypt slots and hang on the frozen server; the other
    // ten queue behind them although the client has free slots.
    bao.pause();
    let mut tasks = Vec::new();
    for (i, ciphertext) in sealed.into_iter().enumerate() {
        let t = transit.clone();
        tasks.push(tokio::spawn(async move {
            let aad = format!("kid-{i}");
            t.decrypt(1, &ciphertext, aad.as_bytes(), Instant::now() + Duration::from_secs(8)).await
        }));
        if i < 2 {
            queued(&transit, &format!("waiting: 0, in_flight: {}", i + 1)).await;
        }
    }
    queued(&transit, "waiting: 10, in_flight: 2").await;
    bao.resume();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap().as_slice(), format!("seed-{i}").as_bytes());
    }
    assert_eq!(metrics.batch_calls.get(), 1, "the ten queued Decrypts go out as one batch");
    assert_eq!(metrics.batched_items.get(), 10);
}
