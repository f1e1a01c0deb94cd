//! What the plugin's Status does to an API server's writes, row by row of the README's failure
//! table: the plugin's service and probes run in-process on paused tokio time, against an
//! in-memory Transit key (or a real keyring file), and a stand-in for kube-apiserver's KMS v2
//! loop (`kmsgate_testkit::kms_apiserver`) decides, as upstream does, when writes stop.

use kmsgate_testkit as common;

use std::{sync::Arc, time::Duration};

use common::{
    eventually,
    fake_transit::{FakeTransit, Fault},
    kms_apiserver::{ApiServer, POLL_FAILING, POLL_HEALTHY, StoredSeed, WRITE_SEED_TTL},
};
use kmsgate::{
    backend::Backend,
    config::{AuditSink, Config, PluginConfig},
    keyring::Keyring,
    kms::{Shared, audit_log::AuditLog, probe, service::KmsService},
    metrics::Metrics,
    proto::v2::{StatusRequest, key_management_service_server::KeyManagementService},
};
use tokio::{task::JoinHandle, time::Instant};
use tonic::{Code, Request};

const POLL: Duration = Duration::from_secs(30);

/// The shipped defaults, except `promote_after_polls`, which is high so that a test can tell a
/// promotion at once from one after consecutive polls. Loaded through the config, so a new
/// setting gets its shipped default here too.
fn config(grace: Option<Duration>) -> PluginConfig {
    let mut flags: Vec<(String, String)> = [
        ("plugin.socket", "@unused"),
        ("plugin.allow_abstract_socket", "true"),
        ("plugin.node_name", "test"),
        ("plugin.promote_after_polls", "20"),
        ("plugin.poll_interval", "30s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    match grace {
        Some(grace) => {
            flags.push(("plugin.outage_mode".into(), "grace".into()));
            flags.push(("plugin.outage_grace".into(), format!("{}s", grace.as_secs())));
        }
        None => flags.push(("plugin.outage_mode".into(), "honest".into())),
    }
    let config = Config::load(None, &flags, &std::collections::HashMap::new()).unwrap();
    assert_eq!(config.plugin.poll_interval, POLL);
    config.plugin
}

/// The plugin's service with its background probes running; the probes stop on drop.
struct Plugin<B: Backend> {
    service: Arc<KmsService<B>>,
    probes: JoinHandle<()>,
}

impl<B: Backend> Drop for Plugin<B> {
    fn drop(&mut self) {
        self.probes.abort();
    }
}

async fn plugin<B: Backend>(backend: B, grace: Option<Duration>) -> Plugin<B> {
    let audit = AuditLog::open(&AuditSink::Off).unwrap();
    let shared = Arc::new(Shared::new(backend, config(grace), audit, Metrics::new()));
    let probes = tokio::spawn(probe::run(shared.clone()));
    let service = Arc::new(KmsService::new(shared));
    eventually(Duration::from_secs(5), "the plugin adopts a key version and says ok", async || {
        let status = service.status(Request::new(StatusRequest {})).await.map(|r| r.into_inner());
        status.is_ok_and(|s| s.healthz == "ok")
    })
    .await;
    Plugin { service, probes }
}

async fn status<B: Backend>(plugin: &Plugin<B>) -> Result<(String, String), tonic::Status> {
    let answer = plugin.service.status(Request::new(StatusRequest {})).await?.into_inner();
    Ok((answer.healthz, answer.key_id))
}

/// Steps `span` in `step`s, writing once per step; returns the first write that failed, with
/// how long after the start it failed.
async fn writes_for<S: KeyManagementService>(
    api: &mut ApiServer<S>,
    span: Duration,
    step: Duration,
) -> Option<(Duration, String)> {
    let start = Instant::now();
    while start.elapsed() < span {
        api.run_for(step).await;
        if let Err(e) = api.write() {
            return Some((start.elapsed(), e));
        }
    }
    None
}

const STEP: Duration = Duration::from_secs(5);

/// Asserts that writes, which just failed, stopped because the seed expired three minutes after
/// its last renewal, and not before (within one step).
fn stopped_at_expiry<S: KeyManagementService>(api: &ApiServer<S>, err: &str) {
    assert!(err.contains("expired"), "{err}");
    let expiry = api.last_seed_renewal.expect("a seed was made") + WRITE_SEED_TTL;
    let now = Instant::now();
    assert!(now > expiry && now - expiry <= STEP, "writes failed {:?} after the expiry", now - expiry);
}

/// Long enough for any fail-closed Status to stop writes: the plugin's poll, the API server's
/// poll, then the seed's expiry, plus a step.
fn stop_bound() -> Duration {
    POLL + POLL_HEALTHY + WRITE_SEED_TTL + STEP
}

#[tokio::test(start_paused = true)]
async fn vault_unreachable_within_grace_keeps_writes_and_readiness_but_a_restarted_api_server_cannot_start() {
    let vault = FakeTransit::new();
    let plugin = plugin(vault.clone(), Some(Duration::from_secs(300))).await;
    let mut api = ApiServer::start(plugin.service.clone()).await;
    let before = api.write().unwrap();
    vault.set_fault(Some(Fault::Unreachable));
    assert_eq!(writes_for(&mut api, Duration::from_secs(240), STEP).await, None);
    assert!(api.readyz().await.is_ok());
    assert_eq!(api.seed_key_id(), Some(vault.key_id(1).as_str()));

    // A restarted API server has neither a seed nor the old seeds in its cache.
    let mut restarted = ApiServer::start(plugin.service.clone()).await;
    assert!(restarted.write().is_err());
    let err = restarted.read(&before).await.unwrap_err();
    assert!(err.starts_with("Unavailable"), "{err}");

    // Recovery needs no restart of anything.
    vault.set_fault(None);
    restarted.run_for(POLL + POLL_FAILING).await;
    restarted.write().unwrap();
    restarted.read(&before).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn vault_unreachable_past_grace_or_honest_fails_readiness_but_never_stops_writes() {
    for grace in [Some(Duration::from_secs(60)), None] {
        let vault = FakeTransit::new();
        let plugin = plugin(vault.clone(), grace).await;
        let mut api = ApiServer::start(plugin.service.clone()).await;
        let before = api.write().unwrap();
        vault.set_fault(Some(Fault::Unreachable));
        api.run_for(Duration::from_secs(180)).await;
        let err = api.readyz().await.unwrap_err();
        assert!(err.contains("healthz"), "{err}");
        // Status still answers at the gRPC level with the same key_id, which extends the seed:
        // writes go on for as long as the outage lasts (checked over ten times the seed's TTL).
        assert_eq!(writes_for(&mut api, WRITE_SEED_TTL * 10, STEP).await, None, "grace {grace:?}");
        // Reads continue only for seeds this API server holds.
        api.read(&before).await.unwrap();
        let mut restarted = ApiServer::start(plugin.service.clone()).await;
        assert!(restarted.read(&before).await.is_err());
        assert!(restarted.write().is_err());
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_token_keeps_the_key_id_and_the_writes() {
    let vault = FakeTransit::new();
    let plugin = plugin(vault.clone(), Some(Duration::from_secs(300))).await;
    let mut api = ApiServer::start(plugin.service.clone()).await;
    vault.set_fault(Some(Fault::Forbidden));
    api.run_for(Duration::from_secs(120)).await;
    // Grace never covers a refusal: not ready at once, but the seed is still good.
    assert!(api.readyz().await.is_err());
    assert_eq!(writes_for(&mut api, WRITE_SEED_TTL * 3, STEP).await, None);
    let (healthz, key_id) = status(&plugin).await.unwrap();
    assert!(healthz.contains("permission"), "{healthz}");
    assert_eq!(key_id, vault.key_id(1));
}

#[tokio::test(start_paused = true)]
async fn a_vault_node_that_is_behind_keeps_the_key_id_and_the_writes() {
    let vault = FakeTransit::new();
    vault.rotate();
    let plugin = plugin(vault.clone(), Some(Duration::from_secs(300))).await;
    let mut api = ApiServer::start(plugin.service.clone()).await;
    let v2 = vault.key_id(2);
    assert_eq!(api.seed_key_id(), Some(v2.as_str()));
    vault.set_behind(Some(1));
    assert_eq!(writes_for(&mut api, WRITE_SEED_TTL * 3, STEP).await, None);
    let (_, key_id) = status(&plugin).await.unwrap();
    assert_eq!(key_id, v2, "version 1 was not adopted back");
    // That node cannot encrypt with version 2, so a restarted API server gets no seed...
    let mut restarted = ApiServer::start(plugin.service.clone()).await;
    assert!(restarted.write().is_err());
    // ...until the node catches up.
    vault.set_behind(None);
    restarted.run_for(POLL_FAILING).await;
    assert_eq!(restarted.write().unwrap().key_id, v2);
}

#[tokio::test(start_paused = true)]
async fn a_retired_promoted_version_moves_writes_to_the_newer_version_without_waiting_for_polls() {
    let vault = FakeTransit::new();
    let plugin = plugin(vault.clone(), Some(Duration::from_secs(300))).await;
    let mut api = ApiServer::start(plugin.service.clone()).await;
    // Someone rotates and retires the promoted version by hand, at once.
    vault.rotate();
    vault.set_min_decryption_version(2);
    assert_eq!(writes_for(&mut api, POLL + POLL_HEALTHY + STEP, STEP).await, None);
    let v2 = vault.key_id(2);
    assert_eq!(
        api.seed_key_id(),
        Some(v2.as_str()),
        "promote_after_polls is 20: this was a promotion at once"
    );
    assert_eq!(api.seeds_made, [vault.key_id(1), v2.clone()]);
    // What is written now can be read by a restarted API server.
    let written = api.write().unwrap();
    let mut restarted = ApiServer::start(plugin.service.clone()).await;
    restarted.read(&written).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_key_id_change_whose_encrypt_fails_extends_nothing() {
    let vault = FakeTransit::new();
    let plugin = plugin(vault.clone(), Some(Duration::from_secs(300))).await;
    let mut api = ApiServer::start(plugin.service.clone()).await;
    let v1 = vault.key_id(1);
    // The plugin promotes version 2 (at once: version 1 is retired), then Vault goes away before
    // the API server's next Status.
    vault.rotate();
    vault.set_min_decryption_version(2);
    let v2 = vault.key_id(2);
    eventually(POLL * 2, "the plugin promotes version 2", async || {
        status(&plugin).await.is_ok_and(|(_, key_id)| key_id == v2)
    })
    .await;
    vault.set_fault(Some(Fault::Unreachable));
    // Status keeps answering version 2, Encrypt of a new seed fails, and the version 1 seed is
    // not extended: writes coast on it and stop three minutes after its last renewal.
    let (_, err) =
        writes_for(&mut api, POLL_HEALTHY + WRITE_SEED_TTL + STEP, STEP).await.expect("writes stop");
    stopped_at_expiry(&api, &err);
    assert_eq!(api.seed_key_id(), Some(v1.as_str()));
    assert!(api.readyz().await.unwrap_err().contains("failed to rotate DEK"));
    // Vault back: once the plugin's next probe sees it, the next Status gets the new seed.
    vault.set_fault(None);
    api.run_for(POLL + POLL_FAILING).await;
    assert_eq!(api.write().unwrap().key_id, v2);
}

#[tokio::test(start_paused = true)]
async fn a_retired_promoted_version_with_nothing_newer_stops_writes_until_a_rotation() {
    let vault = FakeTransit::new();
    let plugin = plugin(vault.clone(), Some(Duration::from_secs(300))).await;
    let mut api = ApiServer::start(plugin.service.clone()).await;
    vault.set_min_decryption_version(2);
    let (_, err) = writes_for(&mut api, stop_bound(), STEP).await.expect("writes stop");
    stopped_at_expiry(&api, &err);
    let status_err = status(&plugin).await.unwrap_err();
    assert_eq!(status_err.code(), Code::FailedPrecondition);
    assert!(status_err.message().contains("no newer usable version"), "{}", status_err.message());
    assert!(api.readyz().await.is_err());

    vault.rotate();
    api.run_for(POLL + POLL_FAILING).await;
    assert_eq!(api.write().unwrap().key_id, vault.key_id(2));
}

#[tokio::test(start_paused = true)]
async fn a_deleted_key_stops_writes() {
    let vault = FakeTransit::new();
    let plugin = plugin(vault.clone(), Some(Duration::from_secs(300))).await;
    let mut api = ApiServer::start(plugin.service.clone()).await;
    vault.delete();
    let (_, err) = writes_for(&mut api, stop_bound(), STEP).await.expect("writes stop");
    stopped_at_expiry(&api, &err);
    let status_err = status(&plugin).await.unwrap_err();
    assert!(status_err.message().contains("not found"), "{}", status_err.message());
}

#[tokio::test(start_paused = true)]
async fn a_recreated_key_stops_writes_and_what_was_wrapped_in_the_window_still_decrypts() {
    let vault = FakeTransit::new();
    let first = plugin(vault.clone(), Some(Duration::from_secs(300))).await;
    let mut api = ApiServer::start(first.service.clone()).await;
    let old_key_id = vault.key_id(1);
    let before = api.write().unwrap();
    assert_eq!(before.key_id, old_key_id);

    // Between the recreation and the plugin's next poll, a starting API server gets a seed that
    // the new key wrapped under the old key_id: the window that is left.
    vault.recreate();
    let mut starting = ApiServer::start(first.service.clone()).await;
    let window: StoredSeed = starting.write().unwrap();
    assert_eq!(window.key_id, old_key_id);

    let (_, err) = writes_for(&mut api, stop_bound(), STEP).await.expect("writes stop");
    stopped_at_expiry(&api, &err);
    let status_err = status(&first).await.unwrap_err();
    assert!(status_err.message().contains("deleted and recreated"), "{}", status_err.message());

    // The operator restarts the plugin: it adopts the new key under a new key_id.
    drop(first);
    let second = plugin(vault.clone(), Some(Duration::from_secs(300))).await;
    let (_, new_key_id) = status(&second).await.unwrap();
    assert_ne!(new_key_id, old_key_id);
    let mut fresh = ApiServer::start(second.service.clone()).await;
    // Vault authenticates the window's seed under the old key_id, so it is not lost...
    fresh.read(&window).await.unwrap();
    // ...while the deleted key's seeds are refused, naming the recreation.
    let err = fresh.read(&before).await.unwrap_err();
    assert!(err.starts_with("InvalidArgument") && err.contains("recreated"), "{err}");
}

fn keyring_without(path: &std::path::Path, version: u64) {
    use std::os::unix::fs::PermissionsExt;
    let mut file: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    file["versions"].as_array_mut().unwrap().retain(|v| v["version"] != version);
    let tmp = path.with_extension("edit");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&file).unwrap()).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_keyring_version_removed_while_running_stops_writes_until_a_newer_one_exists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    Keyring::init(&path, Some("demo"), "kmsgate").unwrap();
    Keyring::rotate(&path).unwrap();
    let plugin = plugin(Keyring::open(&path, false).unwrap(), None).await;
    let mut api = ApiServer::start(plugin.service.clone()).await;
    let v2 = api.seed_key_id().unwrap().to_owned();
    assert!(v2.contains(":2:"), "{v2}");

    // Removed with a newer version present: that one is promoted at once (a second rotation
    // would otherwise wait for 20 polls), and writes never stop.
    Keyring::rotate(&path).unwrap();
    keyring_without(&path, 2);
    assert_eq!(writes_for(&mut api, POLL + POLL_HEALTHY + STEP, STEP).await, None);
    let v3 = api.write().unwrap();
    assert!(v3.key_id.contains(":3:"), "{}", v3.key_id);
    assert_eq!(api.seeds_made.len(), 2);

    // Removed with nothing newer: a seed wrapped under it could never be read back, so Status
    // fails and the API server stops writing once its seed expires.
    keyring_without(&path, 3);
    let (_, err) = writes_for(&mut api, stop_bound(), STEP).await.expect("writes stop");
    stopped_at_expiry(&api, &err);
    let status_err = status(&plugin).await.unwrap_err();
    assert_eq!(status_err.code(), Code::FailedPrecondition);
    assert!(status_err.message().contains("no longer exists"), "{}", status_err.message());
}
