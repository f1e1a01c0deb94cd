//! A whole rotation at scale against its floors: `cargo bench --bench rotation`.
//!
//! One run, on the end-to-end stand-in the rotation test uses (real OpenBao, a real plugin, real
//! etcd, the fake API server writing each Secret through the plugin into etcd the way
//! kube-apiserver does: `kmsgate_testkit::storage_standin`):
//! 1. seeds `KMSGATE_BENCH_OBJECTS` Secrets (default 100 000) on key version 1;
//! 2. rotates the Transit key by hand, waits for the plugin and the stand-in to switch, and times
//!    the **Migrate floor**: the bare list + no-op patch loop (`Kube::list_page`, `Kube::touch`)
//!    with the same page size and concurrency, no QPS limit, no status writes;
//! 3. times `etcdctl get --prefix` right after those writes, printed but not a floor;
//! 4. runs the controller's rotation (Rotate, Converge, Migrate, Verify from etcd) on the same
//!    objects and times its Migrate and Verify phases, read from the policy status as the
//!    controller steps. Its QPS limit is the highest a policy accepts (10 000), above what the
//!    stand-in sustains, so the pacer never waits. A phase's span includes the controller's step
//!    overhead (policy read, status write, Events);
//! 5. times the **Verify floors** on the state Verify read: `etcdctl get --prefix` of the same
//!    Secrets (to /dev/null; a warm-up, then the median of 3), the bare paged scan Verify is built
//!    on (`etcd::Pages`), and that scan judging every value as Verify does.
//!
//! Each phase runs once (a migration leaves nothing to migrate), so rerun the command to see
//! the spread; the ratios are what to compare.

use kmsgate_testkit as common;

use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Bao, Etcd, Plugin, fake_api::FakeApi, storage_standin::ApiServerStorage};
use futures::StreamExt;
use kmsgate::{
    crd::rotation::ResourceId,
    k8s::{Kube, Touch},
    metrics::{ControllerMetrics, VaultMetrics},
    rotation::{Context, Step, VaultKeys},
    storage::{Current, Judge, Standing},
    transit::VaultClient,
};
use serde_json::json;

const PAGE_SIZE: u32 = 500;
const CONCURRENCY: usize = 16;

#[tokio::main]
async fn main() {
    let objects: usize =
        std::env::var("KMSGATE_BENCH_OBJECTS").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let bao = Bao::start().await;
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = bao.plugin_settings(dir.path());
    settings.extend(common::fast_probes());
    settings.push(("plugin.audit_log".into(), "off".into()));
    let plugin = Plugin::start(dir.path(), &settings).await;
    let v1 = plugin.wait_healthy().await;
    let storage = ApiServerStorage::new(plugin.client().await, etcd.writer().await);
    let fake = FakeApi::new(&v1).with_store(Arc::new(storage.clone()));

    let started = Instant::now();
    for i in 0..objects {
        let namespace = ["a", "b", "c", "d"][i % 4];
        fake.insert(namespace, &format!("s{i:06}"), "", format!("{{\"value\":{i}}}").as_bytes()).await;
    }
    eprintln!("seeded {objects} Secrets in {:.1} s", started.elapsed().as_secs_f64());

    // 2. The Migrate floor: rotate by hand, let the plugin and the stand-in switch, then the bare loop.
    bao.rotate().await;
    let (_, v2) = plugin.wait_status(|_, key_id| key_id != v1).await;
    let kube = Kube::new(fake.client());
    let target = kube.resolve(&"secrets".parse::<ResourceId>().unwrap()).await.unwrap();
    let started = Instant::now();
    let (mut token, mut rewritten) = (None::<String>, 0usize);
    loop {
        let page = kube.list_page(&target, None, None, PAGE_SIZE, token.as_deref()).await.unwrap();
        let touched: Vec<Touch> = futures::stream::iter(page.items.iter())
            .map(|key| {
                let kube = &kube;
                let target = &target;
                async move { kube.touch(target, key).await.unwrap() }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        rewritten += touched.iter().filter(|t| **t == Touch::Rewritten).count();
        match page.next {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    let migrate_floor = started.elapsed();
    assert_eq!(rewritten, objects, "the floor loop must rewrite every Secret onto {v2}");

    // 3. etcdctl right after the floor's writes, kept apart: the first run's figure was 9 times
    // the audit bench's for the same read, so it is printed, not used as the floor (step 5).
    let cold_etcdctl = etcdctl_get(&etcd.endpoint);

    // 4. The controller's rotation.
    fake.set_policy(json!({
        "apiVersion": "kmsgate.io/v1alpha1",
        "kind": "RotationPolicy",
        "metadata": {"name": "p", "annotations": {"kmsgate.io/rotate-requested": "now"}},
        "spec": {
            "transit": {"key": "kmsgate"},
            "converge": {"plugins": [plugin.http], "settle": "0s", "apiServerMetrics": false, "timeout": "60s"},
            "migrate": {"qps": 10000.0, "concurrency": CONCURRENCY, "pageSize": PAGE_SIZE},
            "verify": {"mode": "Etcd", "provider": "kmsgate"},
        },
        "status": {"knownVersion": 2},
    }))
    .await;
    let client = VaultClient::new(&bao.vault_settings(dir.path()), VaultMetrics::default()).unwrap();
    let etcd_settings =
        kmsgate::config::EtcdConfig { endpoints: vec![etcd.endpoint.clone()], ..Default::default() };
    let ctx = Context::new(
        Kube::new(fake.client()),
        VaultKeys::new(client, "test-bao", ""),
        Some(etcd_settings),
        Arc::new(ControllerMetrics::new()),
        Duration::from_millis(50),
    );
    let mut entered: Vec<(String, Instant)> = Vec::new();
    let status = loop {
        let step = ctx.step("p").await.unwrap();
        let phase = fake.status().await["phase"].as_str().unwrap_or_default().to_owned();
        if entered.last().is_none_or(|(last, _)| *last != phase) {
            entered.push((phase, Instant::now()));
        }
        match step {
            Step::Again => {}
            Step::Wait(d) => tokio::time::sleep(d).await,
            Step::Rest(_) => break fake.status().await,
        }
    };
    assert_eq!(status["result"], "Succeeded", "{status:#}");
    assert_eq!(status["totals"]["rewritten"], objects, "{status:#}");
    assert_eq!(status["verification"]["current"], objects, "{status:#}");
    let span = |phase: &str| {
        let at = entered.iter().position(|(p, _)| p == phase).unwrap_or_else(|| panic!("never {phase}"));
        let end = entered.get(at + 1).map_or_else(Instant::now, |(_, t)| *t);
        end - entered[at].1
    };
    let (migrate, verify) = (span("Migrating"), span("Verifying"));

    // 5. The Verify floors, on the state the controller's Verify read: `etcdctl get --prefix`
    // (one warm-up, then the median of three) and the bare paged scan the Verify phase is built on
    // (`etcd::Pages` at the same page bytes, counting values, judging none).
    etcdctl_get(&etcd.endpoint);
    let mut runs: Vec<Duration> = (0..3).map(|_| etcdctl_get(&etcd.endpoint)).collect();
    runs.sort();
    let verify_floor = runs[1];
    let etcd_settings =
        kmsgate::config::EtcdConfig { endpoints: vec![etcd.endpoint.clone()], ..Default::default() };
    let key_id = status["toKeyId"].as_str().unwrap().to_owned();
    bare_scan(&etcd_settings, objects, None).await;
    let (mut scans, mut judged) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        scans.push(bare_scan(&etcd_settings, objects, None).await);
        judged.push(bare_scan(&etcd_settings, objects, Some(&key_id)).await);
    }
    scans.sort();
    judged.sort();
    let (scan_floor, judged_scan) = (scans[1], judged[1]);

    println!("machine: {}", common::bench::machine());
    println!("objects: {objects} Secrets, page size {PAGE_SIZE}, concurrency {CONCURRENCY}, no QPS limit");
    println!("phase    controller   floor        ratio");
    for (name, time, floor, what) in [
        ("Migrate", migrate, migrate_floor, "bare list + no-op patch loop"),
        ("Verify", verify, verify_floor, "etcdctl get --prefix, median of 3"),
        ("Verify", verify, scan_floor, "bare paged etcd scan, median of 3"),
    ] {
        let ratio = time.as_secs_f64() / floor.as_secs_f64();
        println!(
            "{name:<8} {:>9.3} s  {:>9.3} s  {ratio:.2}x  (floor: {what})",
            time.as_secs_f64(),
            floor.as_secs_f64()
        );
    }
    println!(
        "the bare scan judging every value as Verify does (median of 3): {:.3} s",
        judged_scan.as_secs_f64()
    );
    println!(
        "etcdctl get --prefix right after the floor loop's {objects} writes (not a floor): {:.3} s",
        cold_etcdctl.as_secs_f64()
    );
}

/// One `etcdctl get --prefix` of the Secrets, output discarded.
fn etcdctl_get(endpoint: &str) -> Duration {
    let started = Instant::now();
    let status = Command::new("etcdctl")
        .args(["--endpoints", endpoint, "get", "--prefix", "/registry/secrets/"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    started.elapsed()
}

/// One paged read of every Secret at one revision, paged as the Verify phase pages (a first page
/// of 5 000, then by bytes); with `key_id`, each value is also judged against it as Verify judges.
async fn bare_scan(settings: &kmsgate::config::EtcdConfig, objects: usize, key_id: Option<&str>) -> Duration {
    let started = Instant::now();
    let client = kmsgate::etcd::connect(settings).await.unwrap();
    let scanner = kmsgate::etcd::Scanner::prefix(b"/registry/secrets/", 5000)
        .with_page_bytes(kmsgate::etcd::DEFAULT_PAGE_BYTES);
    let mut pages = kmsgate::etcd::Pages::new(scanner, client);
    let (mut seen, mut current) = (0, 0);
    while let Some(page) = pages.next_page().await.unwrap() {
        seen += page.len();
        if let Some(key_id) = key_id {
            let judge = Judge { provider: Some("kmsgate"), current: Current::KeyId(key_id) };
            current += page.iter().filter(|kv| judge.judge(&kv.value).standing == Standing::Current).count();
        }
    }
    assert_eq!(seen, objects);
    assert!(key_id.is_none() || current == objects, "{current} of {objects} current");
    started.elapsed()
}
