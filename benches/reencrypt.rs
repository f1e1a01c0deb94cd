//! The re-encrypt engine against its floor: `cargo bench --bench reencrypt`.
//!
//! 10 000 Secrets in the in-memory API server the tests use (tests/common/fake_api/), all on an
//! old key. In one run, on one machine:
//!
//! - baseline: the same metadata-only list pages and resourceVersion-only patches, issued by a
//!   plain loop through the same Kubernetes client at the same concurrency (4), no engine;
//! - `kmsgate reencrypt`'s engine with no rate limit: objects per second, and the ratio;
//! - the engine at `--qps 100` over 3 000 objects: achieved rate against the target.
//!
//! One warm-up, then five runs; medians. No external services needed.

use kmsgate_testkit::{bench::median, fake_api};

use std::time::Instant;

use fake_api::FakeApi;
use futures::StreamExt;
use kmsgate::{
    commands::rotation::{Reencrypt, reencrypt},
    crd::rotation::{MigrateSettings, ResourceRef},
    k8s::Kube,
};

const OBJECTS: usize = 10_000;
const PACED: usize = 3_000;
const RUNS: usize = 5;
const CONCURRENCY: usize = 4;

async fn cluster(objects: usize) -> (FakeApi, Kube) {
    let fake = FakeApi::new("new");
    fake.seed(objects, &["a", "b", "c", "d"], "old").await;
    let kube = Kube::new(fake.client());
    (fake, kube)
}

fn secrets() -> ResourceRef {
    ResourceRef::parse("secrets").unwrap()
}

/// The floor: list pages and patch every object, nothing else.
async fn baseline() -> f64 {
    let (fake, kube) = cluster(OBJECTS).await;
    let target = kube.resolve(&secrets().id()).await.unwrap();
    let started = Instant::now();
    let mut token: Option<String> = None;
    loop {
        let page = kube.list_page(&target, None, None, 500, token.as_deref()).await.unwrap();
        futures::stream::iter(page.items)
            .for_each_concurrent(CONCURRENCY, |key| {
                let (kube, target) = (&kube, &target);
                async move {
                    kube.touch(target, &key).await.unwrap();
                }
            })
            .await;
        match page.next {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(fake.stale("new").await.is_empty());
    OBJECTS as f64 / elapsed
}

/// The engine's settings at `qps`, or unpaced for `None`.
fn engine_settings(qps: Option<f64>) -> MigrateSettings {
    match qps {
        Some(qps) => MigrateSettings::new(qps, CONCURRENCY, 500, 5).unwrap(),
        None => MigrateSettings::new(MigrateSettings::MAX_QPS, CONCURRENCY, 500, 5).unwrap().unpaced(),
    }
}

/// The engine at `qps` (`None`: no rate limit); objects per second.
async fn engine(objects: usize, qps: Option<f64>) -> f64 {
    let (fake, kube) = cluster(objects).await;
    let options = Reencrypt {
        resources: vec![secrets()],
        namespaces: Vec::new(),
        settings: engine_settings(qps),
        progress: false,
    };
    let started = Instant::now();
    let clean = reencrypt(&kube, &options, &mut std::io::sink()).await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(clean && fake.stale("new").await.is_empty());
    objects as f64 / elapsed
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    println!("# kmsgate re-encrypt engine ({})\n", kmsgate_testkit::bench::machine());
    baseline().await;
    engine(OBJECTS / 4, None).await;
    let (mut floor, mut unlimited) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        floor.push(baseline().await);
        unlimited.push(engine(OBJECTS, None).await);
    }
    let (floor, unlimited) = (median(floor), median(unlimited));
    let mut paced = Vec::new();
    for _ in 0..RUNS {
        paced.push(engine(PACED, Some(100.0)).await);
    }
    let paced = median(paced);
    println!("| what | objects/s | vs floor |");
    println!("|---|---:|---:|");
    println!("| floor: list + patch loop, concurrency {CONCURRENCY} | {floor:.0} | 1.00x |");
    println!(
        "| engine, no rate limit, concurrency {CONCURRENCY} | {unlimited:.0} | {:.2}x |",
        unlimited / floor
    );
    println!("| engine, --qps 100 ({PACED} objects) | {paced:.1} | {:.1}% of target |", paced);
    let verdict = if paced >= 95.0 { "met" } else { "MISSED" };
    println!("\nTarget: at least 95% of the target QPS: {:.1}% ({verdict})", paced);
}
