//! The signing-key rotation loop on paused time: the policy, its status and the Events through
//! the in-memory fake API server; the Transit key and the fleet (signers' `/status`, API servers'
//! metrics and TokenRequests) through fakes of the loop's two seams.

use kmsgate_testkit::{self as common, fake_api, http_standin};

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_api::{FakeApi, TestClock};
use kmsgate::{
    backend::BackendError,
    clock::Clock,
    crd::rotation::TransitKey,
    k8s::Kube,
    metrics::ControllerMetrics,
    signer_status::{PublishedKey, SignerStatus, SigningKey},
    signing_rotation::{
        ApiServerReport, Context, FetchKeysMetrics, Fleet, SigningKeyAdmin, SigningKeyState, Step,
    },
};
use serde_json::{Value, json};

fn kid(version: u64) -> String {
    format!("kid-{version}")
}

/// A Transit signing key: versions, `min_encryption_version`, `min_decryption_version`, with
/// Transit's rules (openbao builtin/logical/transit/path_config.go, `pathKeysConfigWrite`: a
/// `min_encryption_version` below `min_decryption_version` is refused; 0 means latest).
#[derive(Debug, Default)]
struct Key {
    latest: u64,
    min_encryption_version: u64,
    min_decryption_version: u64,
    /// Every call, in order: `rotate`, `pin N`, `retire N`.
    calls: Vec<String>,
    /// The next rotate lands in Transit but its answer is lost (a timeout).
    lose_next_rotate_answer: bool,
    /// Every pin is refused (a policy without the right to write the key's config).
    refuse_pins: bool,
}

#[derive(Clone)]
struct FakeKey(Arc<Mutex<Key>>);

impl FakeKey {
    fn new(latest: u64) -> Self {
        Self(Arc::new(Mutex::new(Key { latest, min_decryption_version: 1, ..Key::default() })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Key> {
        self.0.lock().unwrap()
    }
}

impl SigningKeyAdmin for FakeKey {
    async fn metadata(&self, _: &TransitKey) -> Result<SigningKeyState, BackendError> {
        let k = self.lock();
        Ok(SigningKeyState {
            latest: k.latest,
            min_encryption_version: k.min_encryption_version,
            min_decryption_version: k.min_decryption_version,
            kids: (1..=k.latest).map(|v| (v, kid(v))).collect(),
        })
    }

    async fn rotate(&self, _: &TransitKey) -> Result<(), BackendError> {
        let mut k = self.lock();
        k.latest += 1;
        k.calls.push("rotate".into());
        if std::mem::take(&mut k.lose_next_rotate_answer) {
            return Err(BackendError::Unavailable("deadline passed".into()));
        }
        Ok(())
    }

    async fn pin_signing(&self, _: &TransitKey, version: u64) -> Result<(), BackendError> {
        let mut k = self.lock();
        if k.refuse_pins {
            return Err(BackendError::PermissionDenied("permission denied".into()));
        }
        assert!(version >= k.min_decryption_version && version <= k.latest, "Transit refuses pin {version}");
        k.min_encryption_version = version;
        k.calls.push(format!("pin {version}"));
        Ok(())
    }

    async fn retire_below(&self, _: &TransitKey, version: u64) -> Result<(), BackendError> {
        let mut k = self.lock();
        assert!(k.min_encryption_version == 0 || version <= k.min_encryption_version, "Transit refuses");
        k.min_decryption_version = version;
        k.calls.push(format!("retire {version}"));
        Ok(())
    }
}

/// One signer, by endpoint: by default it shows the key as it is now (it publishes every version
/// from `min_decryption_version` up and signs with the pinned version).
#[derive(Debug, Clone)]
struct Signer {
    /// Shows this snapshot instead of the key (a signer whose polls stopped).
    frozen: Option<SignerStatus>,
    /// `/status` cannot be read.
    down: bool,
    max_token_expiration_seconds: Option<i64>,
    /// Kids of its verify-only keys from files (`sa.pub`).
    verify_only: Vec<String>,
}

/// One API server, at its address, on the same node as the signer of the same index.
#[derive(Debug, Clone)]
struct Server {
    address: String,
    /// Verifies through the signer (`--service-account-signing-endpoint`); otherwise only
    /// through its key files, so it exports no fetch-keys series.
    flipped: bool,
    /// `process_start_time_seconds`.
    started: f64,
    /// Its tokens carry this kid whatever the key says (a server still signing the old way).
    token_kid: Option<String>,
}

#[derive(Default)]
struct FleetState {
    signers: BTreeMap<String, Signer>,
    servers: Vec<Server>,
    refresh_hint: i64,
    /// TokenRequests sent, by address.
    token_requests: Vec<String>,
}

#[derive(Clone)]
struct FakeFleet {
    key: FakeKey,
    clock: Arc<TestClock>,
    state: Arc<Mutex<FleetState>>,
}

impl FakeFleet {
    fn new(key: &FakeKey, clock: Arc<TestClock>, signers: usize, max_token: i64) -> Self {
        let start = clock.now().as_second() as f64 - 86_400.0;
        let state = FleetState {
            signers: (1..=signers)
                .map(|i| {
                    let signer = Signer {
                        frozen: None,
                        down: false,
                        max_token_expiration_seconds: Some(max_token),
                        verify_only: Vec::new(),
                    };
                    (format!("http://10.0.0.{i}:8789"), signer)
                })
                .collect(),
            servers: (1..=signers)
                .map(|i| Server {
                    address: format!("10.0.0.{i}:6443"),
                    flipped: true,
                    started: start,
                    token_kid: None,
                })
                .collect(),
            refresh_hint: 60,
            token_requests: Vec::new(),
        };
        Self { key: key.clone(), clock, state: Arc::new(Mutex::new(state)) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FleetState> {
        self.state.lock().unwrap()
    }

    /// What a live signer shows now: the signer publishes every version from
    /// `min_decryption_version` up and signs with `min_encryption_version` once pinned.
    fn live(&self, signer: &Signer, refresh_hint: i64) -> SignerStatus {
        let k = self.key.lock();
        let signing = if k.min_encryption_version == 0 { k.latest } else { k.min_encryption_version };
        let mut published: Vec<PublishedKey> = (k.min_decryption_version..=k.latest)
            .map(|v| PublishedKey {
                kid: kid(v),
                version: Some(v),
                exclude_from_oidc_discovery: false,
                vanished_at: None,
            })
            .collect();
        // One entry per kid, a versioned copy winning over a verify-only one (the signer's
        // `keyset::publish`).
        for file_kid in &signer.verify_only {
            if !published.iter().any(|p| p.kid == *file_kid) {
                published.push(PublishedKey {
                    kid: file_kid.clone(),
                    version: None,
                    exclude_from_oidc_discovery: false,
                    vanished_at: None,
                });
            }
        }
        SignerStatus {
            signing: Some(SigningKey { version: signing, kid: kid(signing), alg: "ES256".into() }),
            published,
            max_token_expiration_seconds: signer.max_token_expiration_seconds,
            refresh_hint_seconds: Some(refresh_hint),
            ..SignerStatus::default()
        }
    }

    /// Freezes signer `index` (from 1) at what it shows now.
    fn freeze(&self, index: usize) {
        let endpoint = format!("http://10.0.0.{index}:8789");
        let snapshot = {
            let state = self.lock();
            self.live(&state.signers[&endpoint], state.refresh_hint)
        };
        self.lock().signers.get_mut(&endpoint).unwrap().frozen = Some(snapshot);
    }

    fn thaw(&self, index: usize) {
        self.lock().signers.get_mut(&format!("http://10.0.0.{index}:8789")).unwrap().frozen = None;
    }
}

impl Fleet for FakeFleet {
    async fn signer_status(&self, endpoint: &str) -> Result<SignerStatus, String> {
        let (signer, hint) = {
            let state = self.lock();
            let signer = state.signers.get(endpoint).cloned().ok_or("no such signer")?;
            (signer, state.refresh_hint)
        };
        if signer.down {
            return Err("connection refused".into());
        }
        Ok(signer.frozen.clone().unwrap_or_else(|| self.live(&signer, hint)))
    }

    async fn api_servers(&self) -> Result<Vec<ApiServerReport>, String> {
        let now = self.clock.now().as_second();
        let state = self.lock();
        // The key cache refreshes at `NextRefreshHint`, the last fetch plus
        // `refresh_hint_seconds` (kubernetes pkg/serviceaccount/externaljwt/plugin/keycache.go,
        // `keyCache.scheduleSync` resets its timer to `NextRefreshHint`), and the success metric
        // is set at each fetch (`recordFetchKeysAttempt`, the `fetch_keys_success_timestamp` gauge).
        let last_fetch = (now - now.rem_euclid(state.refresh_hint)) as f64;
        Ok(state
            .servers
            .iter()
            .map(|s| ApiServerReport {
                address: s.address.clone(),
                metrics: Ok(FetchKeysMetrics {
                    fetch_keys_success: s.flipped.then_some(last_fetch),
                    process_start: Some(s.started),
                }),
            })
            .collect())
    }

    async fn token_kid(&self, address: &str, audience: &str) -> Result<String, String> {
        assert_eq!(audience, "kmsgate.io/signing-key-check");
        let server = {
            let mut state = self.lock();
            state.token_requests.push(address.to_owned());
            state.servers.iter().find(|s| s.address == address).cloned().ok_or("no such server")?
        };
        if let Some(kid) = server.token_kid {
            return Ok(kid);
        }
        if !server.flipped {
            // A server that has not flipped signs with `sa.key`, whose kid kube-apiserver derives
            // itself (pkg/serviceaccount/jwt.go, `keyIDFromPublicKey`).
            return Ok("sa-key-kid".into());
        }
        // A flipped server's token is signed by its own node's signer.
        let index = self.lock().servers.iter().position(|s| s.address == address).unwrap() + 1;
        let status = self.signer_status(&format!("http://10.0.0.{index}:8789")).await?;
        Ok(status.signing.map(|s| s.kid).unwrap_or_default())
    }
}

/// When the test clock starts (`fake_api::TestClock`), Unix seconds.
fn test_start() -> i64 {
    fake_api::TestClock::new().now().as_second()
}

/// A policy whose status has followed the signers' token lifetime (at 600 s, kube-apiserver's
/// least) since two days before the test, before every API server of the rigs started: `extra`
/// removes that (`null`) to start without it.
fn policy(extra: Value) -> Value {
    let observed = test_start() - 2 * 86_400;
    let mut policy = json!({
        "apiVersion": "kmsgate.io/v1alpha1",
        "kind": "SigningKeyPolicy",
        "metadata": {"name": "p", "resourceVersion": "1", "annotations": {"kmsgate.io/signer-rotate-requested": "now"}},
        "spec": {
            "transit": {"key": "sa-signing"},
            "signers": {"endpoints": ["http://10.0.0.1:8789", "http://10.0.0.2:8789"]},
        },
        "status": {
            "knownVersion": 1,
            "nextRun": "",
            "maxTokenExpirationSeconds": 600,
            "maxTokenExpirationChangedAt": kmsgate::clock::seconds_text(observed),
            "maxTokenExpirationObservedSince": kmsgate::clock::seconds_text(observed),
        },
    });
    fake_api::merge(&mut policy, &extra);
    policy
}

struct Rig {
    fake: FakeApi,
    key: FakeKey,
    fleet: FakeFleet,
}

impl Rig {
    async fn new(extra: Value, max_token: i64) -> Self {
        common::init_crypto();
        let fake = FakeApi::new("");
        fake.set_policy(policy(extra)).await;
        let key = FakeKey::new(1);
        key.lock().min_encryption_version = 1;
        let fleet = FakeFleet::new(&key, fake.clock.clone(), 2, max_token);
        Self { fake, key, fleet }
    }

    /// A fresh context, as a restarted controller builds it.
    fn context(&self) -> Context<FakeKey, FakeFleet> {
        Context::new(
            Kube::new(self.fake.client()),
            self.key.clone(),
            self.fleet.clone(),
            Arc::new(ControllerMetrics::new()),
            Duration::from_secs(30),
        )
        .with_clock(self.fake.clock.clone())
    }

    async fn phase(&self) -> String {
        self.fake.status().await["phase"].as_str().unwrap_or_default().to_owned()
    }

    /// Steps (sleeping on paused time through each wait) until the phase is `until` or the
    /// policy rests; returns the status.
    async fn step_until(&self, ctx: &Context<FakeKey, FakeFleet>, until: &str) -> Value {
        for _ in 0..10_000 {
            if self.phase().await == until {
                break;
            }
            match ctx.step("p").await.unwrap() {
                Step::Again => {}
                Step::Wait(d) => tokio::time::sleep(d).await,
                Step::Rest(_) => break,
            }
        }
        self.fake.status().await
    }

    /// API servers `indexes` (from 0) restart now: their `process_start_time_seconds` moves.
    fn restart_api_servers(&self, indexes: &[usize]) {
        let now = self.fake.clock.now().as_second() as f64;
        for index in indexes {
            self.fleet.lock().servers[*index].started = now;
        }
    }

    async fn events(&self) -> Vec<String> {
        let state = self.fake.state.lock().await;
        state.events.iter().map(|e| e["reason"].as_str().unwrap_or_default().to_owned()).collect()
    }
}

fn seconds(text: &Value) -> i64 {
    kmsgate::clock::parse_time(text.as_str().unwrap()).unwrap().as_second()
}

/// The `Stalled` condition's status and reason.
fn stalled(status: &Value) -> (String, String) {
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    let Some(c) = conditions.iter().find(|c| c["type"] == "Stalled") else {
        return (String::new(), String::new());
    };
    (c["status"].as_str().unwrap().to_owned(), c["reason"].as_str().unwrap().to_owned())
}

#[tokio::test(start_paused = true)]
async fn a_requested_run_goes_through_every_phase_and_drains_for_the_longest_token() {
    let rig = Rig::new(json!({}), 3600).await;
    let ctx = rig.context();
    let status = rig.step_until(&ctx, "Idle-after-run").await;

    assert_eq!(status["phase"], "Idle", "{status:#}");
    assert_eq!(status["result"], "Succeeded", "{status:#}");
    assert_eq!((status["fromVersion"].clone(), status["toVersion"].clone()), (json!(1), json!(2)));
    assert_eq!((status["fromKid"].clone(), status["toKid"].clone()), (json!("kid-1"), json!("kid-2")));
    assert_eq!(status["knownVersion"], 2);
    assert_eq!(status["retiredBelow"], 2);
    assert_eq!(status["handledRequest"], "now");
    assert_eq!(status["maxTokenExpirationSeconds"], 3600);
    {
        let key = rig.key.lock();
        assert_eq!(
            key.calls,
            ["rotate", "pin 2", "retire 2"],
            "already pinned at 1: no pin before the rotate"
        );
        assert_eq!((key.latest, key.min_encryption_version, key.min_decryption_version), (2, 2, 2));
    }

    let published = seconds(&status["publishedAt"]);
    let fetched = seconds(&status["fetchedAt"]);
    let switched = seconds(&status["switchedAt"]);
    let finished = seconds(&status["lastSuccess"]);
    assert!(fetched > published, "the API servers fetched after the publication");
    assert!(switched - published >= 60 + 300, "the refresh hint and the margin passed before the switch");
    assert!(finished - switched >= 3600 + 300, "Drain waited for the longest token and the skew");
    assert!(finished - switched >= 600);
    let requests = rig.fleet.lock().token_requests.clone();
    assert_eq!(requests, ["10.0.0.1:6443", "10.0.0.2:6443"], "one TokenRequest per API server, once");

    let events = rig.events().await;
    for reason in
        ["Rotating", "Rotated", "Published", "Pinned", "Switched", "Draining", "Retired", "RotationFinished"]
    {
        assert!(events.iter().any(|e| e == reason), "no {reason} event in {events:?}");
    }
    let text = ctx.metrics.encode();
    assert!(text.contains("kmsgate_signing_rotation_phase{phase=\"Idle\"} 1"), "{text}");
    assert!(text.contains("kmsgate_signing_rotation_token_lifetime_bound_seconds 3600"), "{text}");
    assert!(!text.contains("kid-"), "no kid in any metric");
}

#[tokio::test(start_paused = true)]
async fn an_unpinned_key_is_pinned_before_the_rotate() {
    let rig = Rig::new(json!({}), 3600).await;
    rig.key.lock().min_encryption_version = 0;
    let ctx = rig.context();
    rig.step_until(&ctx, "Publishing").await;
    assert_eq!(rig.key.lock().calls, ["pin 1", "rotate"]);
}

#[tokio::test(start_paused = true)]
async fn a_crash_at_every_step_resumes_and_never_makes_a_second_version() {
    let rig = Rig::new(json!({}), 3600).await;
    rig.key.lock().lose_next_rotate_answer = true;
    let mut phases = Vec::new();
    for _ in 0..10_000 {
        // Each step first runs in a controller that dies before its status write lands (the
        // API server goes away after the read), then again in a fresh controller.
        rig.fake.state.lock().await.crash_after =
            Some("GET /apis/kmsgate.io/v1alpha1/signingkeypolicies/p".into());
        let _ = rig.context().step("p").await;
        rig.fake.recover().await;
        let phase = rig.phase().await;
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
        match rig.context().step("p").await {
            Ok(Step::Again) | Err(_) => {}
            Ok(Step::Wait(d)) => tokio::time::sleep(d).await,
            Ok(Step::Rest(_)) => break,
        }
    }
    let status = rig.fake.status().await;
    assert_eq!(status["result"], "Succeeded", "{status:#}");
    {
        let key = rig.key.lock();
        assert_eq!(key.latest, 2, "one new version, although the first rotate's answer was lost");
        assert!(!key.lose_next_rotate_answer, "the lost answer was met");
        assert_eq!(key.calls, ["rotate", "pin 2", "retire 2"], "each call once, though each step ran twice");
        assert_eq!((key.min_encryption_version, key.min_decryption_version), (2, 2));
    }
    for phase in ["Rotating", "Publishing", "Switching", "Draining", "Retiring"] {
        assert!(
            rig.events().await.iter().any(|e| e == phase),
            "the run passed through {phase} (seen as status: {phases:?})"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_straggling_signer_and_an_api_server_without_the_series_hold_publish_and_are_named() {
    let rig = Rig::new(json!({}), 3600).await;
    rig.fleet.freeze(2);
    rig.fleet.lock().servers[1].flipped = false;
    let ctx = rig.context();
    rig.step_until(&ctx, "Publishing").await;
    for _ in 0..5 {
        ctx.step("p").await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Publishing", "{status:#}");
    assert_eq!(status["signerStragglers"], json!(["http://10.0.0.2:8789 does not publish kid kid-2"]));
    assert!(status["publishedAt"].is_null(), "not every signer publishes it");

    rig.fleet.thaw(2);
    // NB: past the 300 s skew margin, so only the server without the series lags.
    for _ in 0..12 {
        ctx.step("p").await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Publishing", "{status:#}");
    assert!(status["signerStragglers"].is_null(), "{status:#}");
    let named = status["apiServerStragglers"][0].as_str().unwrap();
    assert!(
        named.starts_with("10.0.0.2:6443 exports no apiserver_externaljwt_fetch_keys_success_timestamp"),
        "{named}"
    );
    assert!(status["message"].as_str().unwrap().contains("has not flipped to the signer"));
    assert!(status["fetchedAt"].is_null());

    rig.fleet.lock().servers[1].flipped = true;
    let status = rig.step_until(&ctx, "Switching").await;
    assert_eq!(status["phase"], "Switching", "{status:#}");
    assert!(status["fetchedAt"].is_string());
}

#[tokio::test(start_paused = true)]
async fn an_api_server_whose_token_still_carries_the_old_kid_blocks_the_switch() {
    let rig = Rig::new(json!({"spec": {"switch": {"timeout": "10m"}}}), 3600).await;
    rig.fleet.lock().servers[0].token_kid = Some(kid(1));
    let ctx = rig.context();
    rig.step_until(&ctx, "Switching").await;
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Switching", "{status:#}");
    assert_eq!(status["apiServerStragglers"], json!(["10.0.0.1:6443 issued a token with kid kid-1"]));
    assert!(status["switchedAt"].is_null());

    let status = rig.step_until(&ctx, "Failed").await;
    assert_eq!(
        (status["phase"].clone(), status["failedPhase"].clone()),
        (json!("Failed"), json!("Switching"))
    );
    assert!(status["message"].as_str().unwrap().contains("10.0.0.1:6443 issued a token with kid kid-1"));
    assert!(rig.events().await.iter().any(|e| e == "SwitchTimeout"));

    rig.fleet.lock().servers[0].token_kid = None;
    let mut p = rig.fake.state.lock().await.policy.clone();
    p["metadata"]["annotations"]["kmsgate.io/signer-rotate-requested"] = json!("again");
    rig.fake.set_policy(p).await;
    let status = rig.step_until(&ctx, "Draining").await;
    assert_eq!(status["phase"], "Draining", "a new request resumes at Switching: {status:#}");
    assert_eq!(rig.key.lock().latest, 2);
}

/// A run from Idle whose status already keeps `bound` (reported `lower` now since `changed`),
/// with both API servers started at `started` (seconds from the test's start); returns when
/// Drain ends, after the switch and after the test's start.
async fn drain_length(bound: i64, lower: i64, changed: i64, started: i64) -> (i64, i64) {
    let rig = Rig::new(json!({}), lower).await;
    let now = rig.fake.clock.now().as_second();
    let mut p = rig.fake.state.lock().await.policy.clone();
    p["status"]["maxTokenExpirationSeconds"] = json!(bound);
    p["status"]["lowerTokenExpirationSeconds"] = json!(lower);
    p["status"]["maxTokenExpirationChangedAt"] = json!(kmsgate::clock::seconds_text(now + changed));
    // NB: followed since before every start here, so only the lowering rule is at play.
    p["status"]["maxTokenExpirationObservedSince"] = json!(kmsgate::clock::seconds_text(now - 4 * 86_400));
    rig.fake.set_policy(p).await;
    for server in &mut rig.fleet.lock().servers {
        server.started = (now + started) as f64;
    }
    let ctx = rig.context();
    let status = rig.step_until(&ctx, "Retiring").await;
    let until = seconds(&status["drainUntil"]);
    (until - seconds(&status["switchedAt"]), until - now)
}

#[tokio::test(start_paused = true)]
async fn drain_keeps_the_largest_lifetime_until_every_api_server_restarted_after_it_was_lowered() {
    let (day, hour) = (86_400, 3600);
    assert_eq!(
        drain_length(day, hour, -2 * day, -3 * day).await.0,
        day + 300,
        "the servers started before the signers lowered it: they still issue day-long tokens"
    );
    // NB: the first step that sees no process older than the change is the test's start: a
    // server gone from the EndpointSlice may have issued day-long tokens until then.
    assert_eq!(
        drain_length(day, hour, -3 * day, -2 * day).await.1,
        day + 300,
        "every listed server restarted after the change, but an unlisted one may not have"
    );
    let (after_switch, after_start) = drain_length(day, hour, -3 * day, -hour).await;
    assert_eq!(after_start, day + 300, "restarted an hour ago: the same reach from the first step");
    assert!(after_switch > hour + 300);
}

#[tokio::test(start_paused = true)]
async fn a_suspended_policy_holds_its_run_without_a_call() {
    let rig = Rig::new(json!({}), 3600).await;
    let ctx = rig.context();
    rig.step_until(&ctx, "Publishing").await;
    let mut p = rig.fake.state.lock().await.policy.clone();
    p["spec"]["suspend"] = json!(true);
    rig.fake.set_policy(p).await;
    let calls = rig.key.lock().calls.len();
    assert!(matches!(ctx.step("p").await.unwrap(), Step::Rest(_)));
    tokio::time::sleep(Duration::from_secs(7200)).await;
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Publishing");
    assert_eq!(status["message"], "suspended by spec.suspend in Publishing");
    let suspended =
        status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Suspended").unwrap();
    assert_eq!(suspended["status"], "True");
    assert_eq!(rig.key.lock().calls.len(), calls, "no Transit call while suspended");
}

#[tokio::test(start_paused = true)]
async fn a_schedule_that_comes_due_during_drain_starts_the_next_run_once_this_one_retired() {
    let rig = Rig::new(json!({"spec": {"schedule": "1h"}}), 7200).await;
    let ctx = rig.context();
    let status = rig.step_until(&ctx, "Draining").await;
    let next_run = seconds(&status["nextRun"]);
    assert!(next_run > seconds(&status["startedAt"]), "the run restarted the schedule's clock");
    let status = rig.step_until(&ctx, "Retiring").await;
    assert!(seconds(&status["drainUntil"]) > next_run, "the schedule came due during Drain");
    assert_eq!(rig.key.lock().latest, 2, "no second run started during Drain");
    let status = rig.step_until(&ctx, "Rotating").await;
    assert_eq!(status["trigger"], "schedule", "{status:#}");
    assert_eq!(status["fromVersion"], 2);
    assert!(rig.events().await.iter().any(|e| e == "RotationFinished"));
}

#[tokio::test(start_paused = true)]
async fn the_controller_steps_the_signing_policy_only_while_it_holds_the_lease() {
    let rig = Rig::new(json!({}), 3600).await;
    let ctx = Arc::new(rig.context());
    let (leader, lease) = tokio::sync::watch::channel(false);
    let follow = {
        let ctx = ctx.clone();
        tokio::spawn(async move { kmsgate::controller::follow_signing(&ctx, "p", lease).await })
    };
    let reads = || async {
        let state = rig.fake.state.lock().await;
        state.log.iter().filter(|l| l.contains("signingkeypolicies")).count()
    };
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(reads().await, 0, "no step without the Lease");
    leader.send_replace(true);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(rig.phase().await, "Publishing", "leading: the requested run started");
    leader.send_replace(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_loss = reads().await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(reads().await, after_loss, "no step after the Lease was lost");
    drop(leader);
    follow.await.unwrap();
}

/// A signer `/status` endpoint serving `status`, through the type the signer writes.
async fn signer_endpoint(status: SignerStatus) -> String {
    http_standin::serve(http::Method::GET, "/status", move |_| {
        http_standin::json(serde_json::to_value(&status).unwrap())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_fleet_reads_each_signer_and_each_api_server_at_its_own_address() {
    use kmsgate::signing_rotation::ClusterFleet;
    common::init_crypto();
    let fake = FakeApi::new("");
    fake.start_api_servers(&["cp-a", "cp-b"]).await;
    fake.keys_fetched(0, "kid-2").await;
    let kube = Kube::new(fake.client()).with_api_server_access(fake.api_server_access());
    let fleet = ClusterFleet::new(kube, "kmsgate/kmsgate-controller").with_clock(fake.clock.clone());

    let mut reports = fleet.api_servers().await.unwrap();
    reports.sort_by(|a, b| a.address.cmp(&b.address));
    let (flipped, not_flipped) = (&reports[0], &reports[1]);
    let started = fake.state.lock().await.api_servers[0].started_unix as f64;
    assert!(flipped.address.starts_with("127.0.0.1:"), "{reports:?}");
    let m = flipped.metrics.as_ref().unwrap();
    assert!(m.fetch_keys_success.is_some());
    assert_eq!(m.process_start, Some(started));
    let m = not_flipped.metrics.as_ref().unwrap();
    assert_eq!(m.fetch_keys_success, None, "no series on a server not flipped to the signer");
    assert_eq!(fleet.token_kid(&flipped.address, "kmsgate.io/signing-key-check").await.unwrap(), "kid-2");
    assert_eq!(
        fleet.token_kid(&not_flipped.address, "kmsgate.io/signing-key-check").await.unwrap(),
        "legacy-sa-key"
    );

    let status = SignerStatus {
        signing: Some(SigningKey { version: 2, kid: kid(2), alg: "ES256".into() }),
        refresh_hint_seconds: Some(60),
        max_token_expiration_seconds: Some(86_400),
        ..SignerStatus::default()
    };
    let endpoint = signer_endpoint(status.clone()).await;
    assert_eq!(fleet.signer_status(&endpoint).await.unwrap(), status);
    assert!(fleet.signer_status("http://127.0.0.1:1").await.is_err());

    // A /status that never ends is cut off at the bound instead of filling memory.
    let endless = http_standin::serve(http::Method::GET, "/status", |_| {
        use http_body_util::BodyExt as _;
        let chunk = hyper::body::Bytes::from(vec![b' '; 64 * 1024]);
        let frames = futures::stream::repeat_with(move || {
            Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))
        });
        http::Response::new(http_body_util::StreamBody::new(frames).boxed())
    })
    .await;
    let error = fleet.signer_status(&endless).await.unwrap_err();
    assert!(error.contains("larger than") || error.contains("limit"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn signer_rotate_without_a_controller_drives_the_requested_run_to_its_end() {
    let rig = Rig::new(json!({}), 3600).await;
    let ctx = rig.context();
    let mut lines = Vec::new();
    let status = kmsgate::controller::drive_signing(&ctx, "p", "now", |s| {
        lines.push(kmsgate::commands::signing::describe(s));
    })
    .await
    .unwrap();
    assert_eq!((status.phase.as_str(), status.result.as_str()), ("Idle", "Succeeded"));
    assert_eq!(status.handled_request, "now");
    assert!(lines.iter().any(|l| l.starts_with("Draining   v1 -> v2  until ")), "{lines:#?}");
}

#[tokio::test(start_paused = true)]
async fn drain_waits_rather_than_guess_while_no_signer_reports_a_token_lifetime() {
    let rig = Rig::new(json!({"status": {"maxTokenExpirationSeconds": null}}), 3600).await;
    for signer in rig.fleet.lock().signers.values_mut() {
        signer.max_token_expiration_seconds = None;
    }
    let ctx = rig.context();
    rig.step_until(&ctx, "Draining").await;
    for _ in 0..3 {
        ctx.step("p").await.unwrap();
        tokio::time::sleep(Duration::from_secs(86_400)).await;
    }
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Draining", "a day later, still waiting: {status:#}");
    assert!(status["drainUntil"].is_null());
    assert_eq!(stalled(&status), ("True".into(), "NoTokenLifetime".into()));
    assert!(status["message"].as_str().unwrap().contains("max_token_expiration_seconds"));

    for signer in rig.fleet.lock().signers.values_mut() {
        signer.max_token_expiration_seconds = Some(3600);
    }
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert!(status["drainUntil"].is_string());
    // The bound was first seen now, after both API servers started: they may have read a longer
    // one, so Drain's end waits until they restart.
    assert_eq!(status["phase"], "Draining", "{status:#}");
    assert_eq!(stalled(&status), ("True".into(), "TokenLifetimeNotEstablished".into()), "{status:#}");
    tokio::time::sleep(Duration::from_secs(301)).await;
    rig.restart_api_servers(&[0, 1]);
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Retiring", "{status:#}");
    assert_eq!(stalled(&status), ("False".into(), "TokenLifetimeEstablished".into()), "{status:#}");
}

#[tokio::test(start_paused = true)]
async fn a_whole_run_through_the_cluster_seam_reads_each_signer_and_each_api_server() {
    use kmsgate::signing_rotation::ClusterFleet;
    common::init_crypto();
    let fake = FakeApi::new("");
    fake.start_api_servers(&["cp-a", "cp-b"]).await;
    let key = FakeKey::new(1);
    key.lock().min_encryption_version = 1;
    // The signers' /status, each showing the key as it is now (the model of `FakeFleet::live`).
    let model = FakeFleet::new(&key, fake.clock.clone(), 1, 3600);
    let mut endpoints = Vec::new();
    for _ in 0..2 {
        let model = model.clone();
        let endpoint = http_standin::serve(http::Method::GET, "/status", move |_| {
            let signer = model.lock().signers.values().next().unwrap().clone();
            http_standin::json(serde_json::to_value(model.live(&signer, 60)).unwrap())
        })
        .await;
        endpoints.push(endpoint);
    }
    fake.set_policy(policy(json!({"spec": {"signers": {"endpoints": endpoints}}}))).await;
    // Each API server's key cache refreshes every refresh hint and then signs with what its
    // signer signs with (keycache.go `keyCache.scheduleSync`; plugin.go `signAndAssembleJWT`
    // takes the signer's header).
    let refresher = {
        let (fake, key) = (fake.clone(), key.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let signing = {
                    let k = key.lock();
                    if k.min_encryption_version == 0 { k.latest } else { k.min_encryption_version }
                };
                for server in 0..2 {
                    fake.keys_fetched(server, &kid(signing)).await;
                }
            }
        })
    };
    let kube = Kube::new(fake.client()).with_api_server_access(fake.api_server_access());
    let fleet = ClusterFleet::new(kube.clone(), "kmsgate/kmsgate-controller").with_clock(fake.clock.clone());
    let ctx =
        Context::new(kube, key.clone(), fleet, Arc::new(ControllerMetrics::new()), Duration::from_secs(30))
            .with_clock(fake.clock.clone());
    let status = kmsgate::controller::drive_signing(&ctx, "p", "now", |_| {}).await.unwrap();
    refresher.abort();
    assert_eq!((status.phase.as_str(), status.result.as_str()), ("Idle", "Succeeded"), "{status:#?}");
    assert_eq!(key.lock().calls, ["rotate", "pin 2", "retire 2"]);
    let state = fake.state.lock().await;
    let tokens: Vec<&String> = state.log.iter().filter(|l| l.ends_with("/token")).collect();
    // NB: the stand-in's servers take their signer's new kid at their next key refresh, so the
    // switch may be checked more than once, both servers each time.
    assert!(tokens.len() >= 2 && tokens.len().is_multiple_of(2), "{tokens:?}");
    assert!(
        tokens
            .iter()
            .all(|l| *l == "POST /api/v1/namespaces/kmsgate/serviceaccounts/kmsgate-controller/token"),
        "TokenRequests for the controller's own account only: {tokens:?}"
    );
    assert!(state.log.iter().filter(|l| *l == "GET /metrics").count() >= 4, "each server at its own address");
}

#[tokio::test(start_paused = true)]
async fn an_idle_policy_follows_the_bound_between_runs() {
    let rig = Rig::new(json!({"status": {"handledRequest": "now"}}), 7200).await;
    let ctx = rig.context();
    assert!(matches!(ctx.step("p").await.unwrap(), Step::Rest(_)));
    let status = rig.fake.status().await;
    assert_eq!(status["phase"].as_str().unwrap_or("Idle"), "Idle", "{status:#}");
    assert_eq!(status["maxTokenExpirationSeconds"], 7200, "read at rest: {status:#}");

    // One signer cannot be read and the other lowers: the bound stays.
    rig.fleet.lock().signers.get_mut("http://10.0.0.1:8789").unwrap().down = true;
    rig.fleet.lock().signers.get_mut("http://10.0.0.2:8789").unwrap().max_token_expiration_seconds =
        Some(3600);
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["maxTokenExpirationSeconds"], 7200);
    assert!(status["lowerTokenExpirationSeconds"].is_null(), "{status:#}");
}

#[tokio::test(start_paused = true)]
async fn after_the_sa_key_import_the_old_kid_stays_verify_only_and_runs_still_finish() {
    let rig = Rig::new(json!({"spec": {"retire": {"timeout": "1h"}}}), 3600).await;
    // The runbook's optional import: Transit v1 is `sa.key`, whose public half every signer also
    // serves from `sa.pub`, so both carry one kid.
    for signer in rig.fleet.lock().signers.values_mut() {
        signer.verify_only = vec![kid(1)];
    }
    let ctx = rig.context();
    let status = rig.step_until(&ctx, "Idle-after-run").await;
    assert_eq!(
        (status["phase"].clone(), status["result"].clone()),
        (json!("Idle"), json!("Succeeded")),
        "{status:#}"
    );
    let published = rig.fleet.signer_status("http://10.0.0.1:8789").await.unwrap().published;
    assert!(
        published.iter().any(|p| p.kid == kid(1) && p.version.is_none()),
        "sa.pub stays served, verify-only: {published:?}"
    );

    let mut p = rig.fake.state.lock().await.policy.clone();
    p["metadata"]["annotations"]["kmsgate.io/signer-rotate-requested"] = json!("again");
    rig.fake.set_policy(p).await;
    let status = rig.step_until(&ctx, "Idle-after-run").await;
    assert_eq!(
        (status["result"].clone(), status["toVersion"].clone()),
        (json!("Succeeded"), json!(3)),
        "{status:#}"
    );
    assert_eq!(rig.key.lock().calls, ["rotate", "pin 2", "retire 2", "rotate", "pin 3", "retire 3"]);
}

/// A run whose status was edited or restored to `status`, with Transit at version 2 and signing
/// pinned to 1.
async fn poisoned(status: Value) -> (Rig, Value) {
    let rig = Rig::new(json!({ "status": status }), 3600).await;
    rig.key.lock().latest = 2;
    let ctx = rig.context();
    let status = rig.step_until(&ctx, "Failed").await;
    (rig, status)
}

#[tokio::test(start_paused = true)]
async fn a_status_without_a_valid_version_pair_never_pins_or_retires() {
    for phase in ["Switching", "Retiring"] {
        for (from, to) in [(json!(1), Value::Null), (json!(0), json!(2)), (json!(2), json!(2))] {
            let status = json!({"phase": phase, "fromVersion": from, "toVersion": to, "fromKid": "kid-1", "toKid": "kid-2"});
            let (rig, status) = poisoned(status).await;
            assert_eq!(
                (status["phase"].clone(), status["failedPhase"].clone()),
                (json!("Failed"), json!(phase)),
                "{status:#}"
            );
            let stalled =
                status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Stalled").unwrap();
            assert_eq!(stalled["reason"], "InvalidStatus", "{status:#}");
            assert!(rig.key.lock().calls.is_empty(), "no pin and no retire: {:?}", rig.key.lock().calls);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_whose_kid_changed_under_the_same_version_is_never_pinned_or_retired() {
    for phase in ["Switching", "Retiring"] {
        let status = json!({"phase": phase, "fromVersion": 1, "toVersion": 2, "fromKid": "kid-1", "toKid": "kid-of-a-deleted-key", "publishedAt": "2020-01-01T00:00:00Z"});
        let (rig, status) = poisoned(status).await;
        assert_eq!(
            (status["phase"].clone(), status["failedPhase"].clone()),
            (json!("Failed"), json!(phase)),
            "{status:#}"
        );
        let stalled =
            status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Stalled").unwrap();
        assert_eq!(stalled["reason"], "KeyChanged", "{status:#}");
        assert!(stalled["message"].as_str().unwrap().contains("kid-2"), "{status:#}");
        assert!(rig.key.lock().calls.is_empty(), "no pin and no retire: {:?}", rig.key.lock().calls);
    }
}

#[tokio::test(start_paused = true)]
async fn switch_proves_publication_again_right_before_the_pin() {
    // A status that says Switching although the version was just made and never published.
    let rig = Rig::new(
        json!({"status": {"phase": "Switching", "fromVersion": 1, "toVersion": 2, "fromKid": "kid-1", "toKid": "kid-2"}}),
        3600,
    )
    .await;
    rig.key.lock().latest = 2;
    rig.fleet.freeze(2);
    // Signer 2 stopped polling before version 2 existed: it does not publish kid-2.
    {
        let mut state = rig.fleet.lock();
        let frozen = state.signers.get_mut("http://10.0.0.2:8789").unwrap().frozen.as_mut().unwrap();
        frozen.published.retain(|p| p.kid != kid(2));
    }
    let ctx = rig.context();
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Publishing", "{status:#}");
    assert!(status["message"].as_str().unwrap().contains("http://10.0.0.2:8789 does not publish kid kid-2"));
    assert!(rig.key.lock().calls.is_empty(), "no pin: {:?}", rig.key.lock().calls);
    assert!(rig.events().await.iter().any(|e| e == "PublicationLost"));

    rig.fleet.thaw(2);
    let status = rig.step_until(&ctx, "Draining").await;
    assert_eq!(status["phase"], "Draining", "{status:#}");
    let switched = seconds(&status["switchedAt"]);
    assert!(switched - seconds(&status["publishedAt"]) >= 60 + 300, "Publish's wait ran before the pin");
    assert_eq!(rig.key.lock().calls, ["pin 2"]);
}

#[tokio::test(start_paused = true)]
async fn a_pin_that_goes_back_during_drain_sends_the_run_back_to_switching() {
    let rig = Rig::new(json!({}), 3600).await;
    let ctx = rig.context();
    let status = rig.step_until(&ctx, "Draining").await;
    let first_switch = seconds(&status["switchedAt"]);
    tokio::time::sleep(Duration::from_secs(1800)).await;
    // The runbook's step 0 rerun, or a Vault restored from a snapshot taken during Rotate: the
    // signers sign with version 1 again.
    rig.key.lock().min_encryption_version = 1;
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Switching", "{status:#}");
    assert!(status["switchedAt"].is_null(), "{status:#}");
    assert!(rig.events().await.iter().any(|e| e == "SwitchLost"));

    let status = rig.step_until(&ctx, "Idle-after-run").await;
    assert_eq!(status["result"], "Succeeded", "{status:#}");
    let switched = seconds(&status["switchedAt"]);
    assert!(switched >= first_switch + 1800, "a new switch was proven after the pin came back");
    assert!(seconds(&status["lastSuccess"]) - switched >= 3600 + 300, "Drain counted from the new switch");
    assert_eq!(rig.key.lock().calls, ["rotate", "pin 2", "pin 2", "retire 2"]);
}

#[tokio::test(start_paused = true)]
async fn retire_refuses_while_the_pin_is_not_the_new_version() {
    let status =
        json!({"phase": "Retiring", "fromVersion": 1, "toVersion": 2, "fromKid": "kid-1", "toKid": "kid-2"});
    let rig = Rig::new(json!({ "status": status }), 3600).await;
    rig.key.lock().latest = 2;
    let ctx = rig.context();
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Switching", "{status:#}");
    assert!(rig.key.lock().calls.is_empty(), "no retire: {:?}", rig.key.lock().calls);

    // Pinned, but one signer still signs with the old kid: Retire waits, naming it.
    let status =
        json!({"phase": "Retiring", "fromVersion": 1, "toVersion": 2, "fromKid": "kid-1", "toKid": "kid-2"});
    let rig = Rig::new(json!({ "status": status }), 3600).await;
    rig.key.lock().latest = 2;
    rig.fleet.lock().signers.get_mut("http://10.0.0.2:8789").unwrap().down = true;
    rig.key.lock().min_encryption_version = 2;
    let ctx = rig.context();
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Retiring", "{status:#}");
    assert!(status["message"].as_str().unwrap().contains("http://10.0.0.2:8789"), "{status:#}");
    assert!(rig.key.lock().calls.is_empty(), "no retire: {:?}", rig.key.lock().calls);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_keeps_failing_is_shown_in_the_status_and_stops_the_run_at_the_timeout() {
    let rig = Rig::new(json!({"spec": {"switch": {"timeout": "10m"}}}), 3600).await;
    let ctx = rig.context();
    rig.step_until(&ctx, "Switching").await;
    rig.key.lock().refuse_pins = true;
    let error = ctx.step("p").await.unwrap_err();
    assert!(kmsgate::error::chain(&error).contains("permission denied"));
    let status = rig.fake.status().await;
    let stalled = |s: &Value| {
        s["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Stalled").unwrap().clone()
    };
    assert_eq!(status["phase"], "Switching", "{status:#}");
    assert_eq!(
        (stalled(&status)["status"].clone(), stalled(&status)["reason"].clone()),
        (json!("True"), json!("TransitError"))
    );
    assert!(status["message"].as_str().unwrap().contains("permission denied"), "{status:#}");
    assert!(rig.events().await.iter().any(|e| e == "TransitError"));

    for _ in 0..100 {
        if rig.phase().await == "Failed" {
            break;
        }
        let _ = ctx.step("p").await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let status = rig.fake.status().await;
    assert_eq!(
        (status["phase"].clone(), status["failedPhase"].clone()),
        (json!("Failed"), json!("Switching")),
        "{status:#}"
    );
    assert_eq!(stalled(&status)["reason"], "SwitchTimeout");
    assert!(status["message"].as_str().unwrap().contains("permission denied"), "{status:#}");

    // Once the pin is allowed again, a new request resumes and the error's stall clears.
    rig.key.lock().refuse_pins = false;
    let mut p = rig.fake.state.lock().await.policy.clone();
    p["metadata"]["annotations"]["kmsgate.io/signer-rotate-requested"] = json!("again");
    rig.fake.set_policy(p).await;
    let status = rig.step_until(&ctx, "Draining").await;
    assert_eq!(status["phase"], "Draining", "{status:#}");
    assert_eq!(stalled(&status)["status"], "False");
}

#[tokio::test(start_paused = true)]
async fn a_key_restored_below_the_version_that_signed_stops_rotate_and_names_a_restore() {
    // Restored while the run was in Rotate (an idle policy holds before a run starts; below).
    let rig = Rig::new(
        json!({"status": {"knownVersion": 3, "phase": "Rotating", "fromVersion": 3, "handledRequest": "now"}}),
        3600,
    )
    .await;
    let ctx = rig.context();
    let status = rig.step_until(&ctx, "Failed").await;
    assert_eq!(
        (status["phase"].clone(), status["failedPhase"].clone()),
        (json!("Failed"), json!("Rotating")),
        "{status:#}"
    );
    assert!(status["message"].as_str().unwrap().contains("Vault restored"), "{status:#}");
    assert!(rig.key.lock().calls.is_empty(), "{:?}", rig.key.lock().calls);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_api_server_missing_from_the_endpoint_slice_holds_the_fleet_read() {
    use kmsgate::signing_rotation::ClusterFleet;
    common::init_crypto();
    let fake = FakeApi::new("");
    fake.start_api_servers(&["cp-a", "cp-b"]).await;
    let kube = Kube::new(fake.client()).with_api_server_access(fake.api_server_access());
    let fleet = ClusterFleet::new(kube, "kmsgate/kmsgate-controller").with_clock(fake.clock.clone());
    assert_eq!(fleet.api_servers().await.unwrap().len(), 2);

    // NB: a stopped server leaves the EndpointSlice at once while its identity Lease still
    // counts as live (renewed within the last minute), as a running server the slice misses would.
    fake.stop_api_server(1).await;
    let err = fleet.api_servers().await.unwrap_err();
    assert!(err.contains("lists 1 API server addresses but 2 identity Leases are live"), "{err}");

    // Once its Lease is stale, the two sources agree again.
    fake.clock.advance(Duration::from_secs(kmsgate::k8s::LEASE_FRESH.as_secs() + 11));
    assert_eq!(fleet.api_servers().await.unwrap().len(), 1);
}

/// Steps `rig` past the end of the Drain it is in (a day at most), so the next step judges it.
async fn past_drain_end(rig: &Rig, ctx: &Context<FakeKey, FakeFleet>) -> Value {
    ctx.step("p").await.unwrap();
    let until = seconds(&rig.fake.status().await["drainUntil"]);
    let now = rig.fake.clock.now().as_second();
    tokio::time::sleep(Duration::from_secs((until - now + 1) as u64)).await;
    ctx.step("p").await.unwrap();
    rig.fake.status().await
}

#[tokio::test(start_paused = true)]
async fn drain_holds_at_its_end_while_an_api_server_started_before_the_bound_was_first_seen() {
    // A fresh status: the loop first sees the signers' bound now, a day after both API servers
    // started, when their signers may have reported a longer one.
    let fresh = json!({"status": {"maxTokenExpirationSeconds": null, "maxTokenExpirationChangedAt": null, "maxTokenExpirationObservedSince": null}});
    let rig = Rig::new(fresh, 3600).await;
    let ctx = rig.context();
    rig.step_until(&ctx, "Draining").await;
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["apiServerStragglers"].as_array().map(Vec::len), Some(2), "named early: {status:#}");
    assert!(status["message"].as_str().unwrap().contains("Drain holds at its end"), "{status:#}");
    assert_eq!(
        status["maxTokenExpirationObservedSince"],
        kmsgate::clock::seconds_text(test_start()),
        "{status:#}"
    );

    let status = past_drain_end(&rig, &ctx).await;
    assert_eq!(status["phase"], "Draining", "{status:#}");
    assert_eq!(stalled(&status), ("True".into(), "TokenLifetimeNotEstablished".into()), "{status:#}");
    let message = status["message"].as_str().unwrap();
    for server in ["10.0.0.1:6443 started at", "10.0.0.2:6443 started at"] {
        assert!(message.contains(server), "{message}");
    }
    ctx.step("p").await.unwrap();
    let events = rig.events().await;
    assert_eq!(events.iter().filter(|e| *e == "TokenLifetimeNotEstablished").count(), 1, "{events:?}");

    // One server restarts: it reads the signers' bound again; the other still holds Drain.
    rig.restart_api_servers(&[0]);
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Draining", "{status:#}");
    let stragglers = status["apiServerStragglers"].as_array().unwrap();
    assert_eq!(stragglers.len(), 1, "{status:#}");
    assert!(stragglers[0].as_str().unwrap().starts_with("10.0.0.2:6443 started at"), "{status:#}");

    rig.restart_api_servers(&[1]);
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["phase"], "Retiring", "{status:#}");
    assert_eq!(stalled(&status), ("False".into(), "TokenLifetimeEstablished".into()), "{status:#}");
    let status = rig.step_until(&ctx, "Idle-after-run").await;
    assert_eq!(status["result"], "Succeeded", "{status:#}");
    assert_eq!(
        status["maxTokenExpirationObservedSince"],
        kmsgate::clock::seconds_text(test_start()),
        "kept across runs: {status:#}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_bound_kept_without_an_observation_start_counts_from_its_last_change() {
    // A status written before the observation start was recorded: its bound last changed two
    // hours before the test, after both API servers had started.
    let changed = test_start() - 7200;
    let old = json!({"status": {
        "maxTokenExpirationSeconds": 3600,
        "maxTokenExpirationChangedAt": kmsgate::clock::seconds_text(changed),
        "maxTokenExpirationObservedSince": null,
    }});
    let rig = Rig::new(old, 3600).await;
    let ctx = rig.context();
    rig.step_until(&ctx, "Draining").await;
    let status = past_drain_end(&rig, &ctx).await;
    assert_eq!(status["phase"], "Draining", "{status:#}");
    assert_eq!(stalled(&status), ("True".into(), "TokenLifetimeNotEstablished".into()), "{status:#}");
    assert_eq!(
        status["maxTokenExpirationObservedSince"],
        kmsgate::clock::seconds_text(changed),
        "{status:#}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_policy_holds_on_a_key_restored_below_the_known_version_until_an_operator_acts() {
    // The status knows version 3 signs; Transit (restored from an older snapshot) holds only
    // version 1. A request is pending.
    let rig = Rig::new(json!({"status": {"knownVersion": 3}}), 3600).await;
    let ctx = rig.context();
    for _ in 0..3 {
        assert!(matches!(ctx.step("p").await.unwrap(), Step::Rest(_)));
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let status = rig.fake.status().await;
    assert_eq!(status["phase"].as_str().unwrap_or("Idle"), "Idle", "{status:#}");
    assert_eq!(status["knownVersion"], 3, "nothing adopted: {status:#}");
    assert!(status["handledRequest"].is_null(), "the request waits: {status:#}");
    assert_eq!(stalled(&status), ("True".into(), "KeyBehindStatus".into()), "{status:#}");
    let message = status["message"].as_str().unwrap();
    assert!(message.contains("Vault restored") && message.contains("status.knownVersion"), "{message}");
    assert!(rig.key.lock().calls.is_empty(), "{:?}", rig.key.lock().calls);
    let events = rig.events().await;
    assert_eq!(events.iter().filter(|e| *e == "KeyBehindStatus").count(), 1, "{events:?}");
    assert!(!ctx.metrics.encode().contains("kid-"), "no kid in any metric");

    // The operator removes knownVersion: the version that signs now is adopted, and the pending
    // request then runs from it.
    let mut p = rig.fake.state.lock().await.policy.clone();
    p["status"].as_object_mut().unwrap().remove("knownVersion");
    rig.fake.set_policy(p).await;
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(status["knownVersion"], 1, "{status:#}");
    assert_eq!(stalled(&status), ("False".into(), "KeyNotBehind".into()), "{status:#}");
    let status = rig.step_until(&ctx, "Idle-after-run").await;
    assert_eq!(status["result"], "Succeeded", "{status:#}");
    assert_eq!((status["fromVersion"].clone(), status["toVersion"].clone()), (json!(1), json!(2)));
    assert_eq!(rig.key.lock().calls, ["rotate", "pin 2", "retire 2"]);
}

#[tokio::test(start_paused = true)]
async fn an_idle_policy_holds_on_a_pin_set_back_and_goes_on_once_the_key_is_back() {
    // Transit holds version 3, which the status knows signs, but pins version 2 (a snapshot
    // from before the last run's switch). A request is pending.
    let rig = Rig::new(json!({"status": {"knownVersion": 3}}), 3600).await;
    {
        let mut key = rig.key.lock();
        key.latest = 3;
        key.min_encryption_version = 2;
    }
    let ctx = rig.context();
    assert!(matches!(ctx.step("p").await.unwrap(), Step::Rest(_)));
    let status = rig.fake.status().await;
    assert_eq!(stalled(&status), ("True".into(), "KeyBehindStatus".into()), "{status:#}");
    assert!(status["message"].as_str().unwrap().contains("min_encryption_version 2"), "{status:#}");
    assert!(rig.key.lock().calls.is_empty(), "no pin from a restored key: {:?}", rig.key.lock().calls);

    // The right snapshot is restored: the pending request starts its run.
    rig.key.lock().min_encryption_version = 3;
    ctx.step("p").await.unwrap();
    let status = rig.fake.status().await;
    assert_eq!(stalled(&status), ("False".into(), "KeyNotBehind".into()), "{status:#}");
    assert_eq!((status["phase"].clone(), status["fromVersion"].clone()), (json!("Rotating"), json!(3)));
}
