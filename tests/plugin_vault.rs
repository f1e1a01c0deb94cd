//! The plugin over its real socket against a real OpenBao: round trip, rotation, retirement,
//! outages, bad input, log hygiene.

use kmsgate_testkit as common;

use std::time::Duration;

use common::{Bao, Plugin, decrypt_request as decrypt, encrypt_request as encrypt, eventually, fast_probes};
use kmsgate::{
    config::SocketSpec,
    keyid::KeyId,
    proto::v2::{DecryptRequest, StatusRequest},
    selftest,
};
use serde_json::json;
use tonic::{Code, Request};

fn with_settings(base: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut all = base;
    all.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn selftest_passes_and_status_document_is_complete() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(dir.path(), &with_settings(bao.plugin_settings(dir.path()), &[])).await;
    plugin.wait_healthy().await;
    let report = selftest::run(&selftest::Options {
        socket: SocketSpec::Path(plugin.socket.clone()),
        provider: "kmsgate".into(),
        timeout: Duration::from_secs(3),
        wait: Duration::from_secs(5),
    })
    .await;
    assert!(report.passed(), "{report}");

    let status = plugin.status_json().await;
    let key_id = status["promoted"]["key_id"].as_str().unwrap();
    let parsed = KeyId::parse(key_id).unwrap();
    assert_eq!(parsed.scope.identity, "test-bao");
    assert_eq!(parsed.scope.mount, "transit");
    assert_eq!(parsed.version, 1);
    assert_eq!(status["healthz"], "ok");
    assert_eq!(status["min_decryption_version"], 1);
    assert_eq!(status["status_version"], "v2");
    assert!(status["node"].as_str().is_some_and(|n| !n.is_empty()));
    assert!(status["last_good_round_trip"].is_string());
    assert_eq!(plugin.get("/livez").await, (200, "ok\n".into()));
    assert_eq!(plugin.get("/readyz").await.0, 200);
    let (code, metrics) = plugin.get("/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "kmsgate_grpc_requests_total{method=\"Encrypt\",code=\"OK\"}",
        "kmsgate_backend_calls_total{operation=\"metadata\",outcome=\"ok\"}",
        "kmsgate_key_version 1",
        "kmsgate_healthy 1",
        "kmsgate_seconds_since_last_round_trip",
        "kmsgate_key_promotions_total 0",
        "kmsgate_key_rollbacks_refused_total 0",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    // Read-only: no writes accepted.
    let put = reqwest::Client::new().post(format!("{}/status", plugin.http)).send().await.unwrap();
    assert_eq!(put.status(), 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_promotes_after_consecutive_polls_and_old_ciphertexts_still_decrypt() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = with_settings(
        bao.plugin_settings(dir.path()),
        &[("plugin.poll_interval", "300ms"), ("plugin.promote_after_polls", "2")],
    );
    let mut plugin = Plugin::start(dir.path(), &settings).await;
    let v1 = plugin.wait_healthy().await;
    let mut client = plugin.client().await;
    let old = client.encrypt(encrypt(b"seed-before-rotation-0123456789ab")).await.unwrap().into_inner();
    assert_eq!(old.key_id, v1);

    bao.rotate().await;
    // Watch /status: the new version must sit as a candidate (seen once) before it is promoted.
    let mut saw_pending = false;
    let v2 = eventually(Duration::from_secs(20), "the new version is promoted", async || {
        let status = plugin.status_json().await;
        let promoted = status["promoted"]["key_id"].as_str().unwrap().to_owned();
        if promoted != v1 {
            return Ok(promoted);
        }
        // NB: one snapshot of the state Status answers from: v1 still promoted, v2 seen once.
        if status["candidate"]["version"] == 2 && status["candidate"]["seen"] == 1 {
            saw_pending = true;
        }
        Err(plugin.log_text())
    })
    .await;
    assert!(saw_pending, "the new version was promoted without being seen in two polls");
    assert_eq!(KeyId::parse(&v2).unwrap().version, 2);
    let (_, status_key_id) = plugin.wait_status(|_, _| true).await;
    assert_eq!(status_key_id, v2);

    let new = client.encrypt(encrypt(b"seed-after-rotation-0123456789abc")).await.unwrap().into_inner();
    assert_eq!(new.key_id, v2);
    assert!(new.ciphertext.starts_with(b"vault:v2:"));
    let plain = client.decrypt(decrypt(&old.ciphertext, &old.key_id)).await.unwrap().into_inner().plaintext;
    assert_eq!(plain, b"seed-before-rotation-0123456789ab");
    let (_, metrics) = plugin.get("/metrics").await;
    assert!(metrics.contains("kmsgate_key_promotions_total 1"), "{metrics}");

    // A restart adopts the latest at once and still decrypts everything it ever issued.
    plugin.restart().await;
    let mut client = plugin.client().await;
    assert_eq!(plugin.wait_healthy().await, v2);
    for (ct, kid, want) in [
        (&old.ciphertext, &old.key_id, &b"seed-before-rotation-0123456789ab"[..]),
        (&new.ciphertext, &new.key_id, &b"seed-after-rotation-0123456789abc"[..]),
    ] {
        let plain = client.decrypt(decrypt(ct, kid)).await.unwrap().into_inner().plaintext;
        assert_eq!(plain, want);
    }

    // Retire version 1: its ciphertexts fail with FAILED_PRECONDITION naming the version.
    bao.post("transit/keys/kmsgate/config", json!({"min_decryption_version": 2})).await;
    for _ in 0..2 {
        // Once straight from Vault's refusal, once from the plugin's cached metadata.
        let err = client.decrypt(decrypt(&old.ciphertext, &old.key_id)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("key version 1 is retired"), "{}", err.message());
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(plugin.status_json().await["min_decryption_version"], 2);
    let plain = client.decrypt(decrypt(&new.ciphertext, &new.key_id)).await.unwrap().into_inner().plaintext;
    assert_eq!(plain, b"seed-after-rotation-0123456789abc");
}

#[tokio::test(flavor = "multi_thread")]
async fn honest_outage_fails_health_within_deadlines_and_recovers_without_restart() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = with_settings(bao.plugin_settings(dir.path()), &[("plugin.outage_mode", "honest")]);
    let plugin = Plugin::start(dir.path(), &[settings, fast_probes()].concat()).await;
    let key_id = plugin.wait_healthy().await;
    let mut client = plugin.client().await;
    let sealed = client.encrypt(encrypt(b"0123456789abcdef0123456789abcdef")).await.unwrap().into_inner();

    bao.pause();
    let (healthz, still) = plugin.wait_status(|healthz, _| healthz != "ok").await;
    assert!(healthz.contains("consecutive probes failed"), "{healthz}");
    assert!(!healthz.contains(&bao.token));
    assert_eq!(still, key_id, "key_id stays stable during an outage");
    assert_eq!(plugin.get("/readyz").await.0, 503);
    assert_eq!(plugin.get("/livez").await.0, 200, "livez never depends on Vault");

    for call in 0..2 {
        let started = std::time::Instant::now();
        let result = if call == 0 {
            let mut request = Request::new(encrypt(b"0123456789abcdef0123456789abcdef"));
            request.set_timeout(Duration::from_millis(500));
            client.encrypt(request).await.map(drop)
        } else {
            let mut request = Request::new(decrypt(&sealed.ciphertext, &sealed.key_id));
            request.set_timeout(Duration::from_millis(500));
            client.decrypt(request).await.map(drop)
        };
        let elapsed = started.elapsed();
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(elapsed < Duration::from_millis(1500), "call took {elapsed:?} past its 500ms deadline");
    }

    bao.resume();
    plugin.wait_healthy().await;
    let plain =
        client.decrypt(decrypt(&sealed.ciphertext, &sealed.key_id)).await.unwrap().into_inner().plaintext;
    assert_eq!(plain, b"0123456789abcdef0123456789abcdef");
    client.encrypt(encrypt(b"after the outage")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn grace_outage_keeps_status_ok_for_a_bounded_time_and_fails_calls_fast() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = with_settings(
        bao.plugin_settings(dir.path()),
        &[("plugin.outage_mode", "grace"), ("plugin.outage_grace", "3s")],
    );
    let plugin = Plugin::start(dir.path(), &[settings, fast_probes()].concat()).await;
    let key_id = plugin.wait_healthy().await;
    let mut client = plugin.client().await;
    let sealed = client.encrypt(encrypt(b"0123456789abcdef0123456789abcdef")).await.unwrap().into_inner();

    bao.pause();
    let paused = std::time::Instant::now();
    // Fail-fast starts once the outage is established (two consecutive unreachable probes).
    eventually(Duration::from_secs(5), "fail-fast starts", async || {
        plugin.status_json().await["failing_fast"] == true
    })
    .await;
    let status = plugin.status_json().await;
    assert!(
        status["unreachable_since"].is_string() && status["failing_fast"] == true,
        "outage not noticed: {status}"
    );
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.healthz.as_str(), status.key_id.as_str()), ("ok", key_id.as_str()), "within grace");
    for call in 0..2 {
        let started = std::time::Instant::now();
        let err = if call == 0 {
            let mut request = Request::new(encrypt(b"0123456789abcdef0123456789abcdef"));
            request.set_timeout(Duration::from_secs(3));
            client.encrypt(request).await.unwrap_err()
        } else {
            let mut request = Request::new(decrypt(&sealed.ciphertext, &sealed.key_id));
            request.set_timeout(Duration::from_secs(3));
            client.decrypt(request).await.unwrap_err()
        };
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains("failing fast"), "{}", err.message());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "fail fast took {:?} of a 3s deadline",
            started.elapsed()
        );
    }
    // Past the grace period Status tells the truth.
    let (healthz, _) = plugin.wait_status(|healthz, _| healthz != "ok").await;
    assert!(healthz.contains("past plugin.outage_grace"), "{healthz}");
    assert!(paused.elapsed() >= Duration::from_secs(3), "grace ended early: {:?}", paused.elapsed());

    bao.resume();
    plugin.wait_healthy().await;
    let plain =
        client.decrypt(decrypt(&sealed.ciphertext, &sealed.key_id)).await.unwrap().into_inner().plaintext;
    assert_eq!(plain, b"0123456789abcdef0123456789abcdef");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_its_documented_code() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(dir.path(), &bao.plugin_settings(dir.path())).await;
    let key_id = plugin.wait_healthy().await;
    let mut client = plugin.client().await;
    let good = client.encrypt(encrypt(&[7; 32])).await.unwrap().into_inner();

    let check = |result: Result<(), tonic::Status>, code: Code, text: &str| {
        let err = result.expect_err(text);
        assert_eq!(err.code(), code, "{text}: {err:?}");
        assert!(err.message().contains(text), "{:?} should contain {text:?}", err.message());
    };
    check(client.encrypt(encrypt(b"")).await.map(drop), Code::InvalidArgument, "plaintext is empty");
    check(
        client.encrypt(encrypt(&[1; 257])).await.map(drop),
        Code::InvalidArgument,
        "max_plaintext_bytes = 256",
    );
    assert!(client.encrypt(encrypt(&[1; 256])).await.is_ok());

    let d = |f: &dyn Fn(&mut DecryptRequest)| {
        let mut request = decrypt(&good.ciphertext, &good.key_id);
        f(&mut request);
        request
    };
    let cases: Vec<(DecryptRequest, Code, &str)> = vec![
        (d(&|r| r.ciphertext.clear()), Code::InvalidArgument, "ciphertext is empty"),
        (d(&|r| r.ciphertext = vec![b'a'; 1025]), Code::InvalidArgument, "limit is 1024"),
        (d(&|r| r.key_id.clear()), Code::InvalidArgument, "key_id is empty"),
        (d(&|r| r.key_id = "k".repeat(1025)), Code::InvalidArgument, "limit is 1024"),
        (
            d(&|r| _ = r.annotations.insert("invalid".into(), vec![])),
            Code::InvalidArgument,
            "at least two segments",
        ),
        (
            d(&|r| _ = r.annotations.insert("kms.example.io/x".into(), vec![])),
            Code::InvalidArgument,
            "contains '/'",
        ),
        (
            d(&|r| _ = r.annotations.insert("big.example.io".into(), vec![0; 32 * 1024])),
            Code::InvalidArgument,
            "limit is 32768",
        ),
        (
            d(&|r| _ = r.annotations.insert("a.example.io".into(), vec![1])),
            Code::InvalidArgument,
            "annotations do not match",
        ),
        (d(&|r| r.key_id = "some-other-plugin-key".into()), Code::InvalidArgument, "unknown key_id"),
        (
            d(&|r| r.key_id = r.key_id.replace("test-bao", "other-bao")),
            Code::InvalidArgument,
            "belongs to another key",
        ),
        (
            d(&|r| {
                let mut id = KeyId::parse(&r.key_id).unwrap();
                id.created += 1;
                r.key_id = id.to_string();
            }),
            Code::InvalidArgument,
            "recreated",
        ),
        (
            d(&|r| {
                let mut id = KeyId::parse(&r.key_id).unwrap();
                id.version = 2;
                r.key_id = id.to_string();
            }),
            Code::InvalidArgument,
            "made by key version 1",
        ),
        (
            d(&|r| {
                let last = r.ciphertext.len() - 2;
                r.ciphertext[last] = if r.ciphertext[last] == b'A' { b'B' } else { b'A' };
            }),
            Code::InvalidArgument,
            "rejected",
        ),
        (
            d(&|r| r.ciphertext = b"not-a-transit-ciphertext".to_vec()),
            Code::InvalidArgument,
            "not a Transit ciphertext",
        ),
        (d(&|r| r.ciphertext = vec![0xff, 0xfe, 0x00]), Code::InvalidArgument, "not a Transit ciphertext"),
    ];
    for (request, code, text) in cases {
        check(client.decrypt(request).await.map(drop), code, text);
    }

    // Nothing above hurt the plugin.
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.healthz.as_str(), status.key_id.as_str()), ("ok", key_id.as_str()));
    assert!(!plugin.log_text().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread")]
async fn transit_binds_the_key_id_as_associated_data() {
    use kmsgate::{
        backend::{Backend, BackendError},
        transit::{Transit, VaultClient},
    };
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = VaultClient::new(&bao.vault_settings(dir.path()), Default::default()).unwrap();
    assert!(!format!("{client:?}").contains(&bao.token), "Debug must not show the token");
    let transit = Transit::new(client, "test-bao", "", "transit", "kmsgate");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let sealed = transit.encrypt(1, b"seed", b"key-id-a", deadline).await.unwrap();
    assert_eq!(transit.decrypt(1, &sealed, b"key-id-a", deadline).await.unwrap().as_slice(), b"seed");
    let err = transit.decrypt(1, &sealed, b"key-id-b", deadline).await.unwrap_err();
    assert!(matches!(err, BackendError::Rejected(_)), "{err:?}");
    // Explicit key_version: after a rotation, asking for version 1 still encrypts with version 1.
    transit.rotate(deadline).await.unwrap();
    let old = transit.encrypt(1, b"seed", b"a", deadline).await.unwrap();
    assert!(old.starts_with(b"vault:v1:"));
    let meta = transit.metadata(deadline).await.unwrap();
    assert_eq!((meta.latest, meta.versions.len(), meta.min_decryption_version), (2, 2, 1));
    transit.set_min_decryption_version(2, deadline).await.unwrap();
    assert_eq!(transit.metadata(deadline).await.unwrap().min_decryption_version, 2);
    let err = transit.decrypt(1, &old, b"a", deadline).await.unwrap_err();
    assert!(matches!(err, BackendError::Retired(_)), "{err:?}");
    // A 403 re-reads the token file and retries once: a wrong token is a permission error that
    // does not show the token; the right one written back is picked up without a restart.
    let settings = bao.vault_settings(dir.path());
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, "wrong-token").unwrap();
    let wrong = Transit::new(
        VaultClient::new(&settings, Default::default()).unwrap(),
        "test-bao",
        "",
        "transit",
        "kmsgate",
    );
    let err = wrong.metadata(deadline).await.unwrap_err();
    assert!(matches!(err, BackendError::PermissionDenied(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-token"));
    std::fs::write(&token_path, &bao.token).unwrap();
    wrong.metadata(deadline).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn no_seed_ciphertext_or_token_reaches_the_logs() {
    use base64::{Engine, engine::general_purpose::STANDARD};
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let settings = with_settings(
        bao.plugin_settings(dir.path()),
        &[("log.level", "trace"), ("plugin.audit_log", "stderr")],
    );
    let mut plugin = Plugin::start(dir.path(), &[settings, fast_probes()].concat()).await;
    plugin.wait_healthy().await;
    let mut client = plugin.client().await;
    let seed: Vec<u8> = (0..32).map(|i| 0xA0 ^ i).collect();
    let sealed = client.encrypt(encrypt(&seed)).await.unwrap().into_inner();
    client.decrypt(decrypt(&sealed.ciphertext, &sealed.key_id)).await.unwrap();
    // A failing call too: error paths must not echo input either.
    let mut tampered = sealed.ciphertext.clone();
    tampered.truncate(tampered.len() - 4);
    assert!(client.decrypt(decrypt(&tampered, &sealed.key_id)).await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(plugin.stop(), Some(0));

    let log = plugin.log_text();
    assert!(log.contains("\"method\":\"Encrypt\""), "audit records expected in the log:\n{log}");
    assert!(log.contains("uid"), "calls must log their uid");
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    let forbidden = [
        ("token", bao.token.clone()),
        ("seed (base64)", STANDARD.encode(&seed)),
        ("seed (hex)", hex),
        ("ciphertext", String::from_utf8(sealed.ciphertext.clone()).unwrap()),
        ("ciphertext body", String::from_utf8(sealed.ciphertext[9..40].to_vec()).unwrap()),
    ];
    for (what, secret) in forbidden {
        assert!(!log.contains(&secret), "the {what} reached the log");
    }
    assert!(!String::from_utf8_lossy(&std::fs::read(&plugin.log).unwrap()).contains(&bao.token));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_calls_then_exits_0() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut plugin = Plugin::start(dir.path(), &bao.plugin_settings(dir.path())).await;
    plugin.wait_healthy().await;
    let mut client = plugin.client().await;
    bao.pause();
    let in_flight = tokio::spawn(async move {
        let mut request = Request::new(encrypt(b"0123456789abcdef0123456789abcdef"));
        request.set_timeout(Duration::from_secs(8));
        client.encrypt(request).await
    });
    // NB: generous pauses so the call is surely in flight (Vault frozen) before SIGTERM.
    tokio::time::sleep(Duration::from_secs(1)).await;
    plugin.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    bao.resume();
    let answer = in_flight.await.unwrap();
    assert!(answer.is_ok(), "the in-flight call must finish: {answer:?}");
    assert_eq!(plugin.wait(), Some(0), "{}", plugin.log_text());
    assert!(!plugin.socket.exists());
}
