//! Audit scan against its floor: `cargo bench --bench audit`.
//!
//! Writes 100 000 objects into a real etcd (90% KMS v2 sealed through the storage transformer
//! with a seed wrapped by a real local-keyring plugin, 10% plaintext), then, in the same run and
//! against the same etcd, times `etcdctl get --prefix` (the baseline) and `kmsgate audit`, and
//! `kmsgate audit --deep`. Each is run once to warm up, then five times, taking turns run by run;
//! medians and the ratio are printed with the machine and the load average. Beside the wall time, each run's CPU is
//! split between the command itself (its user+system time) and etcd's (the etcd process's
//! user+system time over the run), which a shared machine's load does not inflate the way it
//! does wall time. Needs `etcd`/`etcdctl` (scripts/setup.sh --etcd).

use kmsgate_testkit as common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Etcd, Plugin};
use kmsgate::{
    proto::v2::{EncryptRequest, StatusRequest},
    storage::{self, DekSourceType, EncryptedObject},
};

const OBJECTS: usize = 100_000;
const RUNS: usize = 5;

#[tokio::main]
async fn main() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keyring = ("local.keyring".to_owned(), dir.path().join("k.json").display().to_string());
    let plugin = Plugin::start(dir.path(), &[keyring, ("plugin.audit_log".into(), "off".into())]).await;
    plugin.wait_healthy().await;
    let mut kms = plugin.client().await;
    let key_id = kms.status(StatusRequest {}).await.unwrap().into_inner().key_id;
    let seed = [3u8; 32];
    let wrapped =
        kms.encrypt(EncryptRequest { plaintext: seed.to_vec(), uid: "bench".into() }).await.unwrap();
    let wrapped = wrapped.into_inner().ciphertext;

    let writer = etcd.writer().await;
    for chunk in 0..OBJECTS / 100 {
        let values = (0..100).map(|i| {
                let n = chunk * 100 + i;
                let key = format!("/registry/secrets/ns{}/secret-{n}", n % 100);
                let object = format!(r#"{{"kind":"Secret","metadata":{{"name":"secret-{n}","namespace":"ns{}"}},"data":{{"k":"dmFsdWU="}}}}"#, n % 100);
                let value = if n % 10 == 0 {
                    object.into_bytes()
                } else {
                    EncryptedObject {
                        encrypted_data: storage::seal_with_seed(&seed, object.as_bytes(), key.as_bytes()).unwrap(),
                        key_id: key_id.clone(),
                        encrypted_dek_source: wrapped.clone(),
                        annotations: Default::default(),
                        dek_source_type: DekSourceType::HkdfSha256XnonceAesGcmSeed,
                    }
                    .to_value("kmsgate")
                };
                (key, value)
            });
        writer.put_all(values).await;
    }

    let socket = plugin.socket.display().to_string();
    if std::env::var_os("KMSGATE_BENCH_HOLD").is_some() {
        // NB: for profiling by hand (BENCHMARKS.md, "Audit scan"): the loaded etcd and the plugin
        // stay up until a line is read.
        println!(
            "etcd {} (pid {}), plugin socket {socket}; press Enter to measure",
            etcd.endpoint,
            etcd.pid()
        );
        let _ = std::io::stdin().read_line(&mut String::new());
    }
    let etcdctl = || {
        let mut c = Command::new("etcdctl");
        c.args(["--endpoints", &etcd.endpoint, "get", "--prefix", "/registry/secrets/"]);
        c
    };
    // NB: `paging` empty is the default paging; `--page-mib 0` pages by count alone.
    let audit = |deep: bool, paging: &[&str]| {
        let mut c = common::kmsgate_command();
        c.args(["audit", "--endpoints", &etcd.endpoint, "--plugin-socket", &socket, "--output", "json"]);
        c.args(paging);
        if deep {
            c.arg("--deep");
        }
        c
    };
    let etcd_pid = etcd.pid();
    let load = common::bench::load_average();
    let commands: [&dyn Fn() -> Command; 5] = [
        &etcdctl,
        &|| audit(false, &[]),
        &|| audit(false, &["--page-size", "500", "--page-mib", "0"]),
        &|| audit(false, &["--page-size", "5000", "--page-mib", "0"]),
        &|| audit(true, &[]),
    ];
    let [baseline, scan, count_small, count_big, deep] = measure(etcd_pid, &commands);
    let load_after = common::bench::load_average();

    println!("machine: {}", common::bench::machine());
    println!("objects: {OBJECTS} (90% KMS v2, 10% plaintext), median of {RUNS} runs after one warm-up");
    println!("load average before: {load}, after: {load_after}");
    println!("{:<44}{:>8} {:>7} {:>11} {:>10}", "", "wall", "ratio", "own CPU", "etcd CPU");
    for (label, run) in [
        ("etcdctl get --prefix (baseline)", &baseline),
        ("kmsgate audit (default paging)", &scan),
        ("kmsgate audit --page-size 500 --page-mib 0", &count_small),
        ("kmsgate audit --page-size 5000 --page-mib 0", &count_big),
        ("kmsgate audit --deep (default paging)", &deep),
    ] {
        let ratio = run.wall.as_secs_f64() / baseline.wall.as_secs_f64();
        println!(
            "{label:<44}{:>6.3} s {ratio:>6.2}x {:>8.0} ms {:>7.0} ms",
            run.wall.as_secs_f64(),
            run.own_cpu.as_secs_f64() * 1e3,
            run.etcd_cpu.as_secs_f64() * 1e3,
        );
    }
    println!("kmsgate audit --deep: {:.0} KMS v2 objects/s", OBJECTS as f64 * 0.9 / deep.wall.as_secs_f64());
}

/// The medians of one command's runs.
struct Run {
    wall: Duration,
    own_cpu: Duration,
    etcd_cpu: Duration,
}

/// Runs each command once to warm up, then RUNS times, one run of each in turn so that a change
/// in the machine's load falls on all of them alike; returns, per command, the medians of its wall
/// time, its own CPU time and etcd's CPU time over the run.
fn measure<const N: usize>(etcd_pid: u32, commands: &[&dyn Fn() -> Command; N]) -> [Run; N] {
    let mut samples: [(Vec<Duration>, Vec<Duration>, Vec<Duration>); N] =
        std::array::from_fn(|_| Default::default());
    for run in 0..=RUNS {
        for (command, (walls, own, etcd)) in commands.iter().zip(samples.iter_mut()) {
            let (children_before, etcd_before) = (children_cpu(), process_cpu(etcd_pid));
            let started = Instant::now();
            let status = command().stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
            // NB: the audit exits 1 because of the planted plaintext; only 2 means it failed.
            assert!(status.code().is_some_and(|c| c < 2), "benchmark command failed: {status}");
            if run > 0 {
                walls.push(started.elapsed());
                own.push(children_cpu() - children_before);
                etcd.push(process_cpu(etcd_pid) - etcd_before);
            }
        }
    }
    let median = common::bench::median::<Duration>;
    samples.map(|(walls, own, etcd)| Run {
        wall: median(walls),
        own_cpu: median(own),
        etcd_cpu: median(etcd),
    })
}

/// The CPU time of a process.
fn process_cpu(pid: u32) -> Duration {
    Duration::from_secs_f64(common::bench::cpu_seconds(pid))
}

/// The CPU time of this process's children that have been waited for.
fn children_cpu() -> Duration {
    Duration::from_secs_f64(common::bench::children_cpu_seconds())
}
