//! The signer over its unix socket, as kube-apiserver calls it (facts/externaljwt.md 2.3-2.6):
//! both API packages, the answers' shape, bad input, outages and restarts, duplicate and vanished
//! kids, and which version signs. The key store is `FakeSigning` (real ES256 signatures), so every
//! token is verified with the key FetchKeys published.

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use kmsgate::{
    clock::Clock,
    config::{Config, SignerConfig},
    metrics::Metrics,
    proto::externaljwt::{v1, v1alpha1},
    serving::{audit_log::AuditLog, socket},
    signer::{Shared, keyset::KeySet, serve_on},
};
use kmsgate_testkit::fake_signing::{FakeSigning, ManualClock, signer_channel, verify_es256};
use tonic::{Code, transport::Channel};

/// "Now" for the tests on the manual clock: every fake version below is older than the lead.
const NOW: i64 = 1_800_000_000;
const LEAD: u64 = 100;

fn config(dir: &Path, extra: &[(&str, &str)]) -> SignerConfig {
    let path = |name: &str| dir.join(name).display().to_string();
    let mut set: Vec<(String, String)> = vec![
        ("signer.socket".into(), path("signer.sock")),
        ("signer.state_file".into(), path("keys.json")),
        ("signer.audit_log".into(), path("audit.log")),
        ("signer.http_listen".into(), "off".into()),
        // NB: the tests poll by hand; 40s + the 60s refresh hint is the least lead config accepts.
        ("signer.poll_interval".into(), "40s".into()),
        ("signer.publish_lead".into(), format!("{LEAD}s")),
    ];
    set.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Config::load(None, &set, &HashMap::new()).unwrap().signer
}

struct Running {
    shared: Arc<Shared<FakeSigning>>,
    channel: Channel,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn v1(&self) -> v1::external_jwt_signer_client::ExternalJwtSignerClient<Channel> {
        v1::external_jwt_signer_client::ExternalJwtSignerClient::new(self.channel.clone())
    }

    fn v1alpha1(&self) -> v1alpha1::external_jwt_signer_client::ExternalJwtSignerClient<Channel> {
        v1alpha1::external_jwt_signer_client::ExternalJwtSignerClient::new(self.channel.clone())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

/// An in-process signer on a socket in `dir`, loading the persisted set as `kmsgate signer` does,
/// after one poll of `fake`.
async fn start(
    dir: &Path,
    fake: &FakeSigning,
    clock: Arc<dyn Clock>,
    verify_only: Vec<(kmsgate::jwt::PublicKey, bool)>,
) -> Running {
    let cfg = config(dir, &[]);
    let now = u64::try_from(clock.now().as_second()).unwrap();
    let persisted = KeySet::load(&cfg.state_file, now).unwrap();
    let audit = AuditLog::open(&cfg.audit_log).unwrap();
    let shared = Arc::new(Shared::new(
        fake.clone(),
        cfg.clone(),
        verify_only,
        persisted,
        clock,
        audit,
        Metrics::new(),
    ));
    shared.poll().await;
    let (listener, guard) = socket::bind(&cfg.socket).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = shared.clone();
    let task = tokio::spawn(async move {
        serve_on(server, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
        drop(guard);
    });
    let channel = signer_channel(&dir.join("signer.sock")).await;
    Running { shared, channel, stop: Some(tx), task }
}

fn claims(json: &str) -> String {
    URL_SAFE_NO_PAD.encode(json)
}

const CLAIMS: &str = r#"{"iss":"https://k8s","sub":"system:serviceaccount:ns:app","aud":["vault"],"exp":1}"#;

/// Checks a signed token as kube-apiserver would (`plugin.go` `validateJWTHeader`) and verifies its
/// signature with the published key of its kid.
fn verify(header: &str, claims: &str, signature: &str, keys: &[v1::Key]) -> String {
    assert!(!header.contains('=') && !signature.contains('='), "no padding");
    let json: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    let object = json.as_object().unwrap();
    assert_eq!(object.len(), 3, "exactly alg, kid, typ: {json}");
    assert_eq!(json["typ"], "JWT");
    assert_eq!(json["alg"], "ES256");
    let kid = json["kid"].as_str().unwrap().to_owned();
    let key = keys.iter().find(|k| k.key_id == kid).expect("kid is published");
    assert!(!key.exclude_from_oidc_discovery, "never signs with an excluded kid");
    let input = format!("{header}.{claims}");
    assert!(verify_es256(&key.key, input.as_bytes(), &URL_SAFE_NO_PAD.decode(signature).unwrap()));
    kid
}

#[tokio::test]
async fn both_packages_sign_fetch_and_answer_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSigning::new(&[1_000, 2_000]);
    let s = start(dir.path(), &fake, ManualClock::at(NOW), vec![]).await;
    let c = claims(CLAIMS);

    let keys = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    assert_eq!(keys.keys.len(), 2);
    assert_eq!(keys.refresh_hint_seconds, 60);
    assert_eq!(keys.data_timestamp.unwrap().seconds, NOW, "the time of the key store read");
    let signed = s.v1().sign(v1::SignJwtRequest { claims: c.clone() }).await.unwrap().into_inner();
    let kid = verify(&signed.header, &c, &signed.signature, &keys.keys);
    assert_eq!(kid, fake.public_key(2).kid(), "the newest version old enough signs");
    let meta = s.v1().metadata(v1::MetadataRequest {}).await.unwrap().into_inner();
    assert_eq!(meta.max_token_expiration_seconds, 24 * 3600);

    let alpha = s.v1alpha1().fetch_keys(v1alpha1::FetchKeysRequest {}).await.unwrap().into_inner();
    let alpha_keys: Vec<v1::Key> = alpha
        .keys
        .into_iter()
        .map(|k| v1::Key {
            key_id: k.key_id,
            key: k.key,
            exclude_from_oidc_discovery: k.exclude_from_oidc_discovery,
        })
        .collect();
    assert_eq!(alpha_keys, keys.keys);
    let signed =
        s.v1alpha1().sign(v1alpha1::SignJwtRequest { claims: c.clone() }).await.unwrap().into_inner();
    verify(&signed.header, &c, &signed.signature, &keys.keys);
    let meta = s.v1alpha1().metadata(v1alpha1::MetadataRequest {}).await.unwrap().into_inner();
    assert_eq!(meta.max_token_expiration_seconds, 24 * 3600);

    // One audit line per Sign, naming sub and aud, never the token.
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let lines: Vec<&str> = audit.lines().collect();
    assert_eq!(lines.len(), 2, "{audit}");
    let line: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(line["sub"], "system:serviceaccount:ns:app");
    assert_eq!(line["aud"], serde_json::json!(["vault"]));
    assert_eq!(line["kid"], kid.as_str());
    assert_eq!(line["outcome"], "OK");
    assert!(!audit.contains(&c) && !audit.contains(&signed.signature), "the token never reaches the log");
    s.stop().await;
}

#[tokio::test]
async fn bad_claims_and_unknown_methods_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSigning::new(&[1_000]);
    let s = start(dir.path(), &fake, ManualClock::at(NOW), vec![]).await;
    let padded = base64::engine::general_purpose::URL_SAFE.encode(r#"{"a":1}"#);
    let cases = [
        (padded, "without padding"),
        (claims("not json"), "not a JSON object"),
        (claims("[1]"), "expected a JSON object"),
        ("a".repeat(kmsgate::jwt::CLAIMS_MAX_BYTES + 1), "over the limit"),
    ];
    for (bad, needle) in cases {
        let err = s.v1().sign(v1::SignJwtRequest { claims: bad }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    assert_eq!(
        fake.sign_calls.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "bad claims never reach the key store"
    );
    // A request larger than any claims could be is refused before it is decoded.
    let huge = "a".repeat(kmsgate::signer::MAX_REQUEST_BYTES + 1);
    let err = s.v1().sign(v1::SignJwtRequest { claims: huge }).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // A method the signer does not serve.
    let mut kms =
        kmsgate::proto::v2::key_management_service_client::KeyManagementServiceClient::new(s.channel.clone());
    let err = kms.status(kmsgate::proto::v2::StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    // Still serving after all that.
    let c = claims(CLAIMS);
    s.v1().sign(v1::SignJwtRequest { claims: c }).await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn an_outage_serves_the_cache_with_its_old_timestamp_and_sign_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSigning::new(&[1_000]);
    let clock = ManualClock::at(NOW);
    let s = start(dir.path(), &fake, clock.clone(), vec![]).await;
    let before = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();

    fake.set_down(true);
    clock.set(NOW + 600);
    s.shared.poll().await;
    s.shared.poll().await;
    let during = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    assert_eq!(during.keys, before.keys);
    assert_eq!(during.data_timestamp.unwrap().seconds, NOW, "the last successful read, not now");
    let calls = fake.sign_calls.load(std::sync::atomic::Ordering::Relaxed);
    let err = s.v1().sign(v1::SignJwtRequest { claims: claims(CLAIMS) }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("failing fast"), "{}", err.message());
    assert_eq!(fake.sign_calls.load(std::sync::atomic::Ordering::Relaxed), calls, "no key store call");
    let status = s.shared.status_doc();
    assert!(!status.last_poll.as_ref().unwrap().ok);
    assert!(status.last_poll.unwrap().error.unwrap().contains("connection refused"));

    fake.set_down(false);
    s.shared.poll().await;
    let after = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    assert_eq!(after.data_timestamp.unwrap().seconds, NOW + 600);
    s.v1().sign(v1::SignJwtRequest { claims: claims(CLAIMS) }).await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_restart_with_the_key_store_down_serves_the_persisted_set() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSigning::new(&[1_000, 2_000]);
    let s = start(dir.path(), &fake, ManualClock::at(NOW), vec![]).await;
    let before = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    s.stop().await;

    fake.set_down(true);
    let s = start(dir.path(), &fake, ManualClock::at(NOW + 3600), vec![]).await;
    let after = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    assert_eq!(after.keys, before.keys);
    assert_eq!(after.data_timestamp, before.data_timestamp, "with its old data_timestamp");
    let err = s.v1().sign(v1::SignJwtRequest { claims: claims(CLAIMS) }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("not been read successfully since start"), "{}", err.message());
    assert!(s.shared.status_doc().signing.is_none());
    s.stop().await;

    // Without a persisted set there is nothing to serve: FetchKeys says so.
    let empty = tempfile::tempdir().unwrap();
    let s = start(empty.path(), &fake, ManualClock::at(NOW), vec![]).await;
    let err = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    s.stop().await;
}

#[tokio::test]
async fn a_duplicate_kid_is_served_once_not_excluded_if_any_copy_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSigning::new(&[1_000]);
    let legacy = FakeSigning::new(&[1]).public_key(1);
    let verify_only = vec![
        // The signing key also listed as an excluded verify-only key.
        (fake.public_key(1), true),
        // A legacy key twice: once excluded, once not.
        (legacy.clone(), true),
        (legacy.clone(), false),
    ];
    let s = start(dir.path(), &fake, ManualClock::at(NOW), verify_only).await;
    let keys = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner().keys;
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.iter().all(|k| !k.exclude_from_oidc_discovery));
    let c = claims(CLAIMS);
    let signed = s.v1().sign(v1::SignJwtRequest { claims: c.clone() }).await.unwrap().into_inner();
    assert_eq!(verify(&signed.header, &c, &signed.signature, &keys), fake.public_key(1).kid());
    s.stop().await;
}

#[tokio::test]
async fn a_vanished_kid_stays_served_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSigning::new(&[1_000, 2_000]);
    let clock = ManualClock::at(NOW);
    let s = start(dir.path(), &fake, clock.clone(), vec![]).await;
    let old = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner().keys;

    // The key is deleted and recreated under the same name: new key material, same versions.
    fake.recreate(&[NOW as u64 - 5_000]);
    clock.set(NOW + 60);
    s.shared.poll().await;
    let keys = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner().keys;
    for k in &old {
        assert!(keys.iter().any(|n| n.key_id == k.key_id), "old kid {} dropped silently", k.key_id);
    }
    assert!(keys.iter().any(|k| k.key_id == fake.public_key(1).kid()), "the new key is published");
    let status = s.shared.status_doc();
    let conflict = status.conflict.unwrap();
    assert!(conflict.contains("recreated"), "{conflict}");
    assert_eq!(status.published.iter().filter(|k| k.vanished_at.is_some()).count(), 2);
    // A recreated key fails closed: no token is signed until an operator resolves it.
    let err = s.v1().sign(v1::SignJwtRequest { claims: claims(CLAIMS) }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    // A restart keeps them: the persisted set is the previous set of the first poll.
    s.stop().await;
    let s = start(dir.path(), &fake, clock.clone(), vec![]).await;
    let after = s.shared.status_doc();
    assert_eq!(after.published.iter().filter(|k| k.vanished_at.is_some()).count(), 2, "{after:?}");
    assert_eq!(
        after.published.iter().find(|k| k.vanished_at.is_some()).unwrap().vanished_at,
        status.published.iter().find(|k| k.vanished_at.is_some()).unwrap().vanished_at
    );

    // Past max_token_expiration plus the margin, the vanished kids leave.
    let keep = 24 * 3600 + kmsgate::signer::VANISHED_MARGIN.as_secs() as i64;
    clock.set(NOW + 60 + keep + 1);
    s.shared.poll().await;
    let keys = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner().keys;
    assert_eq!(keys.len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn a_retired_kid_leaves_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSigning::new(&[1_000, 2_000]);
    let s = start(dir.path(), &fake, ManualClock::at(NOW), vec![]).await;
    fake.set_floors(2, 0);
    s.shared.poll().await;
    let keys = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner().keys;
    assert_eq!(keys.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>(), vec![fake.public_key(2).kid()]);
    assert_eq!(s.shared.status_doc().conflict, None);
    s.stop().await;
}

/// A rotation's Switch raises `min_encryption_version` between two polls: the key store refuses
/// the old version at once, and the Sign reads the key again and signs with the pinned version
/// instead of failing.
#[tokio::test]
async fn a_sign_refused_after_the_pin_moved_signs_with_the_pinned_version() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSigning::new(&[1_000, 2_000]);
    fake.set_floors(1, 1);
    let s = start(dir.path(), &fake, ManualClock::at(NOW), vec![]).await;
    assert_eq!(s.shared.signing().unwrap().0, 1);
    fake.set_floors(1, 2);
    let c = claims(CLAIMS);
    let signed = s.v1().sign(v1::SignJwtRequest { claims: c.clone() }).await.unwrap().into_inner();
    let keys = s.v1().fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner().keys;
    let kid = verify(&signed.header, &c, &signed.signature, &keys);
    assert_eq!(kid, fake.public_key(2).kid());
    assert_eq!(s.shared.signing().unwrap().0, 2, "the refusal's read moved the signer");
    s.stop().await;
}

/// The signing-version rule with time moved by tokio's paused clock alone.
#[tokio::test(start_paused = true)]
async fn the_signing_version_follows_publish_lead_and_the_pin_on_paused_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(kmsgate::clock::TokioClock::starting_at(
        k8s_openapi::jiff::Timestamp::from_second(NOW).unwrap(),
    ));
    // Version 2 was made a second ago; version 1 long before.
    let fake = FakeSigning::new(&[1_000, NOW as u64 - 1]);
    let cfg = config(dir.path(), &[]);
    let audit = AuditLog::open(&cfg.audit_log).unwrap();
    let shared = Shared::new(fake.clone(), cfg, vec![], None, clock, audit, Metrics::new());
    shared.poll().await;
    assert_eq!(shared.signing().unwrap().0, 1, "the latest is not adopted at start");

    tokio::time::advance(Duration::from_secs(LEAD - 2)).await;
    shared.poll().await;
    assert_eq!(shared.signing().unwrap().0, 1, "not yet publish_lead old");
    tokio::time::advance(Duration::from_secs(2)).await;
    shared.poll().await;
    let (version, kid, _) = shared.signing().unwrap();
    assert_eq!((version, kid), (2, fake.public_key(2).kid()));

    // A fresh rotation with the pin on it signs at once; the pin back on 1 goes back to 1.
    let v3 = fake.rotate(NOW as u64 + LEAD);
    fake.set_floors(1, v3);
    shared.poll().await;
    assert_eq!(shared.signing().unwrap().0, 3);
    fake.set_floors(1, 1);
    shared.poll().await;
    assert_eq!(shared.signing().unwrap().0, 1);
    assert_eq!(shared.status_doc().signing.unwrap().version, 1);

    // A fresh key with one young version: nothing signs until it is old enough.
    let young = FakeSigning::new(&[NOW as u64 + LEAD]);
    let dir2 = tempfile::tempdir().unwrap();
    let cfg = config(dir2.path(), &[]);
    let audit = AuditLog::open(&cfg.audit_log).unwrap();
    let clock = Arc::new(kmsgate::clock::TokioClock::starting_at(
        k8s_openapi::jiff::Timestamp::from_second(NOW + LEAD as i64).unwrap(),
    ));
    let fresh = Shared::new(young, cfg, vec![], None, clock, audit, Metrics::new());
    fresh.poll().await;
    let err = fresh.signing().unwrap_err();
    assert!(err.contains("publish_lead"), "{err}");
    tokio::time::advance(Duration::from_secs(LEAD)).await;
    fresh.poll().await;
    assert_eq!(fresh.signing().unwrap().0, 1);
}

/// GETs `path` from the signer's read-only HTTP endpoint.
async fn get(view: Arc<dyn kmsgate::http::HttpView>, path: &str) -> (u16, String) {
    use http_body_util::BodyExt as _;
    let request = http::Request::get(path).body(()).unwrap();
    let response = kmsgate::http::answer(view.as_ref(), &request);
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn status_readyz_and_metrics_report_the_signing_key_and_the_last_poll() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeSigning::new(&[1_000, 2_000]);
    let clock = ManualClock::at(NOW);
    let s = start(dir.path(), &fake, clock.clone(), vec![]).await;
    s.v1().sign(v1::SignJwtRequest { claims: claims(CLAIMS) }).await.unwrap();
    let view: Arc<dyn kmsgate::http::HttpView> = s.shared.clone();

    let (code, body) = get(view.clone(), "/status").await;
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    // The controller reads it through the shared type.
    let status: kmsgate::signer_status::SignerStatus = serde_json::from_value(doc.clone()).unwrap();
    let signing = status.signing.unwrap();
    assert_eq!(
        (signing.version, signing.kid.as_str(), signing.alg.as_str()),
        (2, fake.public_key(2).kid().as_str(), "ES256")
    );
    assert_eq!(status.published.len(), 2);
    assert!(status.last_poll.unwrap().ok);
    assert_eq!(status.data_timestamp.as_deref(), Some("2027-01-15T08:00:00Z"));
    assert_eq!(status.conflict, None);
    // What Metadata and FetchKeys answer, for the rotation's Drain and Publish waits.
    assert_eq!(status.max_token_expiration_seconds, Some(24 * 3600));
    assert_eq!(status.refresh_hint_seconds, Some(60));
    assert_eq!(doc["publish_lead_seconds"], LEAD);
    assert_eq!(doc["served_from_disk"], false);
    assert_eq!(get(view.clone(), "/readyz").await.0, 200);
    let (_, metrics) = get(view.clone(), "/metrics").await;
    assert!(metrics.contains(r#"method="Sign",code="OK""#), "{metrics}");
    clock.set(NOW + 42);
    let (_, metrics) = get(view.clone(), "/metrics").await;
    assert!(
        metrics.contains("kmsgate_seconds_since_last_round_trip 42"),
        "the age of the key set: {metrics}"
    );

    // An outage makes /readyz fail with the reason, and /status name the poll's error.
    fake.set_down(true);
    s.shared.poll().await;
    s.shared.poll().await;
    let (code, reason) = get(view.clone(), "/readyz").await;
    assert_eq!(code, 503);
    assert!(reason.contains("unreachable"), "{reason}");
    let (_, body) = get(view, "/status").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["last_poll"]["ok"], false);
    assert_eq!(doc["unreachable_polls"], 2);
    s.stop().await;
}

/// `signer::serve` on `fake` in a task, as `kmsgate signer` runs it, until the sender fires.
fn serve(
    cfg: &SignerConfig,
    fake: &FakeSigning,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), kmsgate::signer::SignerError>>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (cfg, fake) = (cfg.clone(), fake.clone());
    let task = tokio::spawn(async move {
        kmsgate::signer::serve(&cfg, fake, vec![], Metrics::new(), async {
            let _ = rx.await;
        })
        .await
    });
    (tx, task)
}

/// `signer::serve`, as `kmsgate signer` runs it: the socket, the persisted set (0600), the HTTP
/// endpoint, and the socket removed at shutdown.
#[tokio::test]
async fn serve_binds_persists_and_cleans_up() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let port = kmsgate_testkit::free_port();
    let cfg = config(dir.path(), &[("signer.http_listen", &format!("127.0.0.1:{port}"))]);
    let fake = FakeSigning::new(&[1_000]);
    let (tx, task) = serve(&cfg, &fake);
    let socket = dir.path().join("signer.sock");
    kmsgate_testkit::eventually(Duration::from_secs(30), "the signer socket", async || socket.exists()).await;
    let channel = signer_channel(&socket).await;
    let mut client = v1::external_jwt_signer_client::ExternalJwtSignerClient::new(channel);
    let keys = client.fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    assert_eq!(keys.keys[0].key_id, fake.public_key(1).kid());
    let mode = std::fs::metadata(&cfg.state_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the persisted key set is private");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let readyz = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(readyz.is_ok(), "the HTTP endpoint listens on signer.http_listen");
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(!socket.exists(), "socket removed on exit");
}

/// A persisted key set that cannot be read back (here: not JSON) does not stop `signer::serve`
/// while the key store answers: it serves the key store's keys.
#[tokio::test]
async fn serve_starts_from_the_key_store_when_the_persisted_set_is_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[]);
    std::fs::write(&cfg.state_file, b"{ not a key set").unwrap();
    let fake = FakeSigning::new(&[1_000]);
    let (tx, task) = serve(&cfg, &fake);
    let socket = dir.path().join("signer.sock");
    kmsgate_testkit::eventually(Duration::from_secs(30), "the signer socket", async || {
        socket.exists() || task.is_finished()
    })
    .await;
    assert!(!task.is_finished(), "serve stopped on the unreadable key set file");
    let channel = signer_channel(&socket).await;
    let mut client = v1::external_jwt_signer_client::ExternalJwtSignerClient::new(channel);
    let keys = client.fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    assert_eq!(keys.keys[0].key_id, fake.public_key(1).kid());
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}

/// Kills the child when the test ends, passing or not.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real `kmsgate signer` process on the `local` keyring: it starts, publishes, signs once its
/// version is `publish_lead` old, and removes its socket on SIGTERM.
#[tokio::test]
async fn the_kmsgate_signer_process_signs_with_the_local_keyring() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let socket = dir.path().join("signer.sock");
    let child = kmsgate_testkit::kmsgate_command()
        .args(["signer", "--backend", "local", "--keyring", &path("keyring.json"), "--socket"])
        .arg(&socket)
        .args(["--set", &format!("signer.state_file={}", path("keys.json"))])
        .args(["--set", &format!("signer.audit_log={}", path("audit.log"))])
        .args(["--set", "signer.http_listen=off", "--set", "signer.publish_lead=2s"])
        .args(["--set", "signer.poll_interval=1s", "--set", "signer.refresh_hint_seconds=1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Child(child);
    kmsgate_testkit::eventually(Duration::from_secs(60), "the signer socket", async || socket.exists()).await;
    let mut client =
        v1::external_jwt_signer_client::ExternalJwtSignerClient::new(signer_channel(&socket).await);
    let c = claims(CLAIMS);
    // The keyring's first version was made at start: it signs once it is two seconds old.
    let signed = kmsgate_testkit::eventually(Duration::from_secs(60), "a signed token", async || {
        client.sign(v1::SignJwtRequest { claims: c.clone() }).await.map(|r| r.into_inner())
    })
    .await;
    let keys = client.fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner().keys;
    verify(&signed.header, &c, &signed.signature, &keys);
    let meta = client.metadata(v1::MetadataRequest {}).await.unwrap().into_inner();
    assert_eq!(meta.max_token_expiration_seconds, 24 * 3600);
    kmsgate_testkit::signal(child.0.id(), "-TERM");
    kmsgate_testkit::eventually(Duration::from_secs(60), "the socket removed", async || !socket.exists())
        .await;
}

/// Starts `kmsgate signer` with `settings`, its files in `dir`.
fn spawn_signer(dir: &Path, settings: &[(String, String)]) -> Child {
    let path = |name: &str| dir.join(name).display().to_string();
    let mut command = kmsgate_testkit::kmsgate_command();
    command.args(["signer", "--socket", &path("signer.sock")]);
    let mut all = vec![
        ("signer.state_file".to_owned(), path("keys.json")),
        ("signer.audit_log".to_owned(), path("audit.log")),
        ("signer.http_listen".to_owned(), "off".to_owned()),
        ("signer.publish_lead".to_owned(), "2s".to_owned()),
        ("signer.poll_interval".to_owned(), "1s".to_owned()),
        ("signer.refresh_hint_seconds".to_owned(), "1".to_owned()),
    ];
    all.extend(settings.iter().cloned());
    for (key, value) in all {
        command.args(["--set", &format!("{key}={value}")]);
    }
    Child(command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap())
}

/// End to end on real OpenBao: `kmsgate signer` signs with a Transit key and publishes its key;
/// after Vault goes away and the signer restarts, FetchKeys serves the persisted set with its old
/// data_timestamp (so kube-apiserver can start) and Sign fails with UNAVAILABLE.
#[tokio::test(flavor = "multi_thread")]
async fn on_openbao_the_signer_signs_and_survives_a_restart_during_an_outage() {
    let bao = kmsgate_testkit::Bao::start().await;
    bao.post("transit/keys/kmsgate-signer", serde_json::json!({ "type": "ecdsa-p256" })).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = bao.plugin_settings(dir.path());
    settings.push(("signer.backend".into(), "vault".into()));
    let socket = dir.path().join("signer.sock");

    let child = spawn_signer(dir.path(), &settings);
    kmsgate_testkit::eventually(Duration::from_secs(60), "the signer socket", async || socket.exists()).await;
    let mut client =
        v1::external_jwt_signer_client::ExternalJwtSignerClient::new(signer_channel(&socket).await);
    let c = claims(CLAIMS);
    let signed = kmsgate_testkit::eventually(Duration::from_secs(60), "a signed token", async || {
        client.sign(v1::SignJwtRequest { claims: c.clone() }).await.map(|r| r.into_inner())
    })
    .await;
    let before = client.fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    verify(&signed.header, &c, &signed.signature, &before.keys);
    kmsgate_testkit::signal(child.0.id(), "-TERM");
    kmsgate_testkit::eventually(Duration::from_secs(60), "the socket removed", async || !socket.exists())
        .await;
    drop(child);

    drop(bao);
    let _child = spawn_signer(dir.path(), &settings);
    kmsgate_testkit::eventually(Duration::from_secs(60), "the signer socket", async || socket.exists()).await;
    let mut client =
        v1::external_jwt_signer_client::ExternalJwtSignerClient::new(signer_channel(&socket).await);
    let after = client.fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner();
    assert_eq!(after.keys, before.keys, "the persisted set");
    assert_eq!(after.data_timestamp, before.data_timestamp, "with its old data_timestamp");
    let err = client.sign(v1::SignJwtRequest { claims: c }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}
