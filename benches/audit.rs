//! Audit scan against its floor: `cargo bench --bench audit`.
//!
//! Writes 100 000 objects into a real etcd (90% KMS v2 sealed through the storage transformer
//! with a seed wrapped by a real local-keyring plugin, 10% plaintext), then, in the same run and
//! against the same etcd, times `etcdctl get --prefix` (the baseline) and `kmsgate audit`, and
//! `kmsgate audit --deep`. Each is run once to warm up, then five times; medians and the ratio
//! are printed with the machine. Needs `etcd`/`etcdctl` (scripts/setup.sh --etcd).

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

    let mut client = etcd.client().await.unwrap();
    for chunk in 0..OBJECTS / 100 {
        let ops: Vec<etcd_client::TxnOp> = (0..100)
            .map(|i| {
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
                etcd_client::TxnOp::put(key, value, None)
            })
            .collect();
        client.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }

    let socket = plugin.socket.display().to_string();
    let etcdctl = || {
        let mut c = Command::new("etcdctl");
        c.args(["--endpoints", &etcd.endpoint, "get", "--prefix", "/registry/secrets/"]);
        c
    };
    let audit = |deep: bool, page: &str| {
        let mut c = common::kmsgate_command();
        c.args(["audit", "--endpoints", &etcd.endpoint, "--plugin-socket", &socket, "--output", "json"]);
        c.args(["--page-size", page]);
        if deep {
            c.arg("--deep");
        }
        c
    };
    let baseline = median(etcdctl);
    let scan = median(|| audit(false, "500"));
    let scan_big = median(|| audit(false, "5000"));
    let deep = median(|| audit(true, "5000"));

    println!("machine: {}", common::bench::machine());
    println!("objects: {OBJECTS} (90% KMS v2, 10% plaintext), median of {RUNS} runs after one warm-up");
    println!("etcdctl get --prefix (baseline): {:.3} s", baseline.as_secs_f64());
    for (label, time) in
        [("kmsgate audit (page 500):", scan), ("kmsgate audit (page 5000, default):", scan_big)]
    {
        let ratio = time.as_secs_f64() / baseline.as_secs_f64();
        println!("{label:<37}{:.3} s  ratio {ratio:.2}x", time.as_secs_f64());
    }
    println!(
        "kmsgate audit --deep (page 5000):     {:.3} s  {:.0} objects/s",
        deep.as_secs_f64(),
        OBJECTS as f64 * 0.9 / deep.as_secs_f64()
    );
}

/// Runs the command once to warm up, then RUNS times; returns the median wall time.
fn median(mut command: impl FnMut() -> Command) -> Duration {
    let mut times = Vec::new();
    for run in 0..=RUNS {
        let started = Instant::now();
        let status = command().stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
        // NB: the audit exits 1 because of the planted plaintext; only 2 means it failed.
        assert!(status.code().is_some_and(|c| c < 2), "benchmark command failed: {status}");
        if run > 0 {
            times.push(started.elapsed());
        }
    }
    times.sort();
    times[times.len() / 2]
}
