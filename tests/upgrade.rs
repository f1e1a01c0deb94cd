//! Upgrading kmsgate in place: the build it reports, the plugin's restart gap under constant load
//! from one long-lived gRPC channel (as kube-apiserver holds), and the controller handing its
//! Lease to the next replica on SIGTERM. The measured numbers are printed (`--nocapture`).

use kmsgate_testkit::{self as common, fake_api, fake_keys};

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{Plugin, eventually};
use fake_api::FakeApi;
use fake_keys::FakeKeys;
use kmsgate::{
    build_info::BuildInfo,
    config::Config,
    controller::{self, View},
    k8s::Kube,
    kms::client::KmsClient,
    metrics::ControllerMetrics,
    proto::v2::{DecryptRequest, EncryptRequest, StatusRequest},
    rotation::Context,
};
use tokio::{sync::oneshot, time::Instant};

fn local(dir: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("local.keyring".to_owned(), dir.join("keyring.json").display().to_string()),
        ("plugin.poll_interval".to_owned(), "100ms".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_surface_reports_the_same_build() {
    let build = BuildInfo::current();
    let version = common::kmsgate_command().arg("version").output().unwrap();
    let flag = common::kmsgate_command().arg("--version").output().unwrap();
    assert!(version.status.success() && flag.status.success());
    assert_eq!(version.stdout, flag.stdout, "`kmsgate version` and `--version` print the same");
    let text = String::from_utf8(version.stdout).unwrap();
    assert_eq!(text, format!("kmsgate {}\n", BuildInfo::long_version()));
    for needle in [&build.git_commit, &build.rustc, &build.crates["ring"], &build.crates["rustls"]] {
        assert!(text.contains(needle.as_str()), "{needle} missing from {text}");
    }

    let dir = tempfile::tempdir().unwrap();
    let mut plugin = Plugin::start(dir.path(), &local(dir.path())).await;
    plugin.wait_healthy().await;
    let status = plugin.status_json().await;
    let served: BuildInfo = serde_json::from_value(status["build"].clone()).unwrap();
    assert_eq!(&served, build);
    let (code, metrics) = plugin.get("/metrics").await;
    assert_eq!(code, 200);
    let line = metrics.lines().find(|l| l.starts_with("kmsgate_build_info{")).expect("kmsgate_build_info");
    assert!(line.ends_with("} 1"), "{line}");
    for (name, value) in build.labels() {
        assert!(line.contains(&format!("{name}=\"{value}\"")), "{name} missing from {line}");
    }
    assert_eq!(plugin.stop(), Some(0));
}

/// One call's outcome, by start time.
struct Call {
    method: &'static str,
    started: Instant,
    ended: Instant,
    ok: bool,
}

/// Calls `method` back to back on a clone of the one channel until `stop` is set.
async fn hammer(
    method: &'static str,
    mut client: KmsClient,
    sealed: (Vec<u8>, String),
    stop: Arc<AtomicBool>,
) -> Vec<Call> {
    let mut calls = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let started = Instant::now();
        let call = async {
            match method {
                "Status" => client.status(StatusRequest {}).await.map(|r| r.into_inner().healthz == "ok"),
                "Encrypt" => client
                    .encrypt(EncryptRequest { plaintext: b"seed".to_vec(), uid: "u".into() })
                    .await
                    .map(|r| !r.into_inner().ciphertext.is_empty()),
                _ => client
                    .decrypt(DecryptRequest {
                        ciphertext: sealed.0.clone(),
                        uid: "u".into(),
                        key_id: sealed.1.clone(),
                        annotations: Default::default(),
                    })
                    .await
                    .map(|r| r.into_inner().plaintext == b"seed"),
            }
        };
        let ok = matches!(tokio::time::timeout(Duration::from_secs(3), call).await, Ok(Ok(true)));
        calls.push(Call { method, started, ended: Instant::now(), ok });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    calls
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_restart_under_load_interrupts_calls_for_under_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let settings = local(dir.path());
    let mut old = Plugin::start(dir.path(), &settings).await;
    let key_id = old.wait_healthy().await;
    // NB: one channel for the whole test, as kube-apiserver holds one per provider.
    let mut client = old.client().await;
    let sealed = client
        .encrypt(EncryptRequest { plaintext: b"seed".to_vec(), uid: "u".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sealed.key_id, key_id);

    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = ["Status", "Encrypt", "Decrypt"]
        .into_iter()
        .map(|method| {
            let sealed = (sealed.ciphertext.clone(), sealed.key_id.clone());
            tokio::spawn(hammer(method, client.clone(), sealed, stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let term = Instant::now();
    old.terminate();
    // The old process unlinks its socket as SIGTERM arrives, before it drains.
    let unlinked = eventually(Duration::from_secs(2), "the old plugin removes its socket", async || {
        (!old.socket.exists()).then(|| term.elapsed())
    })
    .await;
    let new = Plugin::start(dir.path(), &settings).await;
    let bound = term.elapsed();
    assert_eq!(new.wait_healthy().await, key_id, "same keyring, same key_id");
    let healthy = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = Vec::new();
    for task in load {
        calls.extend(task.await.unwrap());
    }
    assert_eq!(old.wait(), Some(0), "the old plugin drained and exited cleanly: {}", old.log_text());

    calls.sort_by_key(|c| c.started);
    let failed: Vec<&Call> = calls.iter().filter(|c| !c.ok).collect();
    let gap = match (failed.first(), failed.last()) {
        (Some(first), Some(last)) => last.ended - first.started,
        _ => Duration::ZERO,
    };
    // The longest time in which no call of any kind completed successfully.
    let mut longest = Duration::ZERO;
    let mut last_ok = calls.iter().find(|c| c.ok).map(|c| c.ended).unwrap();
    for call in calls.iter().filter(|c| c.ok) {
        longest = longest.max(call.ended.saturating_duration_since(last_ok));
        last_ok = last_ok.max(call.ended);
    }
    let count = |method: &str, ok: bool| calls.iter().filter(|c| c.method == method && c.ok == ok).count();
    println!(
        "restart under load: socket unlinked {unlinked:?} after SIGTERM, successor bound at {bound:?}; \
         calls failed for {gap:?} ({} failed of {}); longest time without a good answer {longest:?}; \
         failed Status/Encrypt/Decrypt {}/{}/{}",
        failed.len(),
        calls.len(),
        count("Status", false),
        count("Encrypt", false),
        count("Decrypt", false),
    );
    // The channel reconnected by itself: every method succeeded after the new process took over.
    for method in ["Status", "Encrypt", "Decrypt"] {
        let after = calls.iter().filter(|c| c.method == method && c.started > healthy);
        assert!(after.clone().count() > 0 && after.clone().all(|c| c.ok), "{method} after the restart");
    }
    let (_, metrics) = new.get("/metrics").await;
    assert!(metrics.contains("kmsgate_grpc_requests_total{method=\"Encrypt\",code=\"OK\"}"), "{metrics}");
    // NB: the target is under 1 s; the bound leaves room for a loaded CI machine.
    assert!(longest < Duration::from_secs(3), "no good answer for {longest:?}");
}

fn controller_config() -> kmsgate::config::ControllerConfig {
    let set = [("controller.lease_duration", "3s"), ("controller.lease_namespace", "kmsgate")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
    Config::load(None, &set, &std::collections::HashMap::new()).unwrap().controller
}

/// A controller replica that runs until `stop` fires.
async fn replica(fake: FakeApi, holder: &str, stop: oneshot::Receiver<()>) {
    let metrics = Arc::new(ControllerMetrics::new());
    let ctx = Arc::new(Context::new(
        Kube::new(fake.client()),
        FakeKeys::new(1),
        None,
        metrics.clone(),
        Duration::from_millis(50),
    ));
    let view = Arc::new(View::new(metrics));
    controller::run(ctx, &controller_config(), holder.to_owned(), view, async {
        let _ = stop.await;
    })
    .await;
}

async fn holder(kube: &Kube) -> Option<String> {
    kube.lease_holder("kmsgate", "kmsgate-controller").await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_controller_hands_its_lease_to_the_next_replica() {
    common::init_crypto();
    let fake = FakeApi::new("k");
    let kube = Kube::new(fake.client());
    let (stop_a, stop_a_rx) = oneshot::channel();
    let (stop_b, stop_b_rx) = oneshot::channel();
    let (start_b, start_b_rx) = oneshot::channel::<()>();
    let (a_done, a_done_rx) = oneshot::channel();
    // NB: the replicas run as futures of this task, not spawned ones: controller::run is driven
    // by block_on in main and is not required to be Send.
    let a = async {
        replica(fake.clone(), "a", stop_a_rx).await;
        let _ = a_done.send(Instant::now());
    };
    let b = async {
        if start_b_rx.await.is_ok() {
            replica(fake.clone(), "b", stop_b_rx).await;
        }
    };
    let script = async {
        eventually(Duration::from_secs(10), "a leads", async || holder(&kube).await.as_deref() == Some("a"))
            .await;
        start_b.send(()).unwrap();
        // b campaigns and loses while a renews.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(holder(&kube).await.as_deref(), Some("a"));

        let sigterm = Instant::now();
        stop_a.send(()).unwrap();
        let released = a_done_rx.await.unwrap() - sigterm;
        let lease =
            fake.state.lock().await.leases[&("kmsgate".to_owned(), "kmsgate-controller".to_owned())].clone();
        assert!(lease["spec"].get("holderIdentity").is_none(), "released: {lease}");
        eventually(Duration::from_secs(10), "b leads", async || holder(&kube).await.as_deref() == Some("b"))
            .await;
        let new_leader = sigterm.elapsed();
        println!(
            "controller handover (lease_duration 3s, so replicas retry every 1s): lease released \
             {released:?} after SIGTERM, new leader after {new_leader:?}"
        );
        // NB: without the release, b would wait for the lease to expire (3 s) plus its retry period.
        assert!(new_leader < Duration::from_millis(2500), "{new_leader:?}");
        stop_b.send(()).unwrap();
    };
    tokio::join!(a, b, script);
}
