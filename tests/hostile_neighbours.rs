//! Hostile neighbours and misbehaving peers: a Vault that answers forever, clients that hold
//! connections and streams open, a small descriptor limit, calls cancelled mid-way.

use kmsgate_testkit as common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use kmsgate::{
    backend::Backend,
    config::{VaultAuth, VaultClientConfig, VaultTls},
    metrics::VaultMetrics,
    transit::{Transit, VaultClient},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    time::Instant,
};

/// A server that answers every request with `200 OK` and a chunked JSON body that never ends.
/// It models no upstream function: it is the broken or hostile node the client must survive.
/// Returns its address and the most bytes it managed to send on one connection.
async fn endless_vault() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let most = Arc::new(AtomicU64::new(0));
    let seen = most.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let start = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n8\r\n{\"data\":\r\n";
                if conn.write_all(start).await.is_err() {
                    return;
                }
                let chunk = format!("{:x}\r\n{}\r\n", 65536, " ".repeat(65536));
                let mut sent = 0u64;
                while conn.write_all(chunk.as_bytes()).await.is_ok() {
                    sent += 65536;
                    seen.fetch_max(sent, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, most)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_vault_answer_is_cut_off_at_the_calls_limit() {
    common::init_crypto();
    let (addr, most) = endless_vault().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s.test").unwrap();
    let settings = VaultClientConfig {
        addresses: vec![addr],
        namespace: String::new(),
        tls: VaultTls::default(),
        auth: VaultAuth::Token { file: token },
        renew_fraction: 0.67,
        max_concurrent_calls: 4,
        check_interval: Duration::from_secs(60),
    };
    let client = VaultClient::new(&settings, VaultMetrics::default()).unwrap();
    let transit = Transit::new(client, "fake", "", "transit", "kmsgate");
    // NB: the deadline only ends the failover loop's retries; without a cap, one attempt reads
    // until it passes (gigabytes), and the error is the deadline's, not the size's.
    let err = transit.metadata(Instant::now() + Duration::from_secs(5)).await.unwrap_err().to_string();
    assert!(err.contains("larger than the 1048576-byte limit"), "{err}");
    // The client stopped reading near the limit: what was sent is the limit plus the kernel's
    // socket buffers, far below what 5 s of loopback would carry.
    let sent = most.load(Ordering::Relaxed);
    assert!(sent < 64 << 20, "the server sent {sent} bytes on one connection");
}

fn local(dir: &std::path::Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut settings = vec![("local.keyring".to_owned(), dir.join("keyring.json").display().to_string())];
    settings.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    settings
}

/// A gRPC request head for `method` of the KMS service.
fn grpc_head(method: &str) -> http::Request<()> {
    http::Request::post(format!("http://localhost/v2.KeyManagementService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grpc_server_advertises_a_stream_limit_and_half_open_streams_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = common::Plugin::start(dir.path(), &local(dir.path(), &[])).await;
    let pid = plugin.pid().unwrap();
    let io = tokio::net::UnixStream::connect(&plugin.socket).await.unwrap();
    let (client, mut conn) = h2::client::handshake(io).await.unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, mut body) = client.send_request(grpc_head("Status"), false).unwrap();
    body.send_data(vec![0u8; 5].into(), true).unwrap();
    // Drive the connection until Status answers: by then the server's SETTINGS are in.
    let response = tokio::select! {
        r = response => r.unwrap(),
        r = &mut conn => panic!("connection ended: {r:?}"),
    };
    assert_eq!(response.status(), 200);
    let advertised = conn.max_concurrent_send_streams();
    assert!((1024..=4096).contains(&advertised), "advertised MAX_CONCURRENT_STREAMS {advertised}");
    tokio::spawn(conn);

    // Hold as many half-open streams as allowed, each with a partial message, on top of a
    // settled baseline: what the server keeps for them is bounded by the stream limit and windows.
    let before = rss(pid);
    let mut held = Vec::new();
    for _ in 0..advertised {
        client = client.ready().await.unwrap();
        let (response, mut body) = client.send_request(grpc_head("Decrypt"), false).unwrap();
        // A 5-byte frame header announcing 1000 bytes, then 100 of them: never completed.
        let mut partial = vec![0u8, 0, 0, 0x03, 0xe8];
        partial.extend_from_slice(&[0x0a; 100]);
        body.send_data(partial.into(), false).unwrap();
        held.push((response, body));
    }
    // A second connection still gets Status answered while they are held.
    plugin.wait_healthy().await;
    // A message far beyond anything the API server sends is refused before it is buffered whole.
    let mut other = plugin.client().await;
    let huge = kmsgate::proto::v2::DecryptRequest {
        ciphertext: vec![b'a'; 1 << 20],
        uid: "huge".into(),
        key_id: "k".into(),
        annotations: Default::default(),
    };
    let refused = other.decrypt(huge).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    let grown = rss(pid).saturating_sub(before);
    assert!(grown < 64 << 20, "{} half-open streams grew memory by {grown} bytes", held.len());
}

/// A server that reads requests and never answers, counting the requests it holds. It models
/// no upstream function: it is a Vault that hangs, so a call stays in flight for the test.
async fn silent_vault() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let held = Arc::new(AtomicU64::new(0));
    let count = held.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut counted = false;
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if !counted {
                        counted = true;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    (addr, held)
}

fn vault_plugin_settings(dir: &std::path::Path, addr: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let token = dir.join("token");
    std::fs::write(&token, "s.test").unwrap();
    let mut settings: Vec<(String, String)> = [
        ("backend.kind", "vault"),
        ("backend.identity", "fake"),
        ("vault.addresses", addr),
        ("vault.token_file", token.to_str().unwrap()),
        ("plugin.outage_mode", "honest"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    settings.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    settings
}

/// A key_id this plugin's scope accepts (identity `fake`, mount `transit`, key `kmsgate`).
fn fake_key_id(dir: &std::path::Path) -> String {
    common::init_crypto();
    let settings = VaultClientConfig {
        addresses: vec!["http://127.0.0.1:1".into()],
        namespace: String::new(),
        tls: VaultTls::default(),
        auth: VaultAuth::Token { file: dir.join("token") },
        renew_fraction: 0.67,
        max_concurrent_calls: 1,
        check_interval: Duration::from_secs(60),
    };
    let client = VaultClient::new(&settings, VaultMetrics::default()).unwrap();
    Transit::new(client, "fake", "", "transit", "kmsgate").scope().key_id(1, 0).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_the_client_cancels_or_abandons_gets_a_cancelled_audit_line_and_a_log_line() {
    let (addr, held) = silent_vault().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let settings = vault_plugin_settings(
        dir.path(),
        &addr,
        &[("plugin.audit_log", audit.to_str().unwrap()), ("plugin.default_deadline", "60s")],
    );
    let plugin = common::Plugin::start(dir.path(), &settings).await;
    let key_id = fake_key_id(dir.path());
    let decrypt = |uid: &str| kmsgate::proto::v2::DecryptRequest {
        ciphertext: b"vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_vec(),
        uid: uid.to_owned(),
        key_id: key_id.clone(),
        annotations: Default::default(),
    };

    // 1. The client cancels the call (RST_STREAM) while Vault holds it; its connection stays.
    let kept = plugin.client().await;
    let mut client = kept.clone();
    let request = decrypt("cancelled-by-client");
    let call = tokio::spawn(async move { client.decrypt(request).await });
    let base = held.load(Ordering::Relaxed);
    common::eventually(Duration::from_secs(10), "the call reaches Vault", async || {
        held.load(Ordering::Relaxed) > base
    })
    .await;
    call.abort();

    // 2. The client's connection closes mid-call (the only handle to it is dropped).
    let mut client = plugin.client().await;
    let request = decrypt("connection-closed");
    let call = tokio::spawn(async move { client.decrypt(request).await });
    let base = held.load(Ordering::Relaxed);
    common::eventually(Duration::from_secs(10), "the second call reaches Vault", async || {
        held.load(Ordering::Relaxed) > base
    })
    .await;
    call.abort();

    for uid in ["cancelled-by-client", "connection-closed"] {
        let line = common::eventually(Duration::from_secs(10), "a CANCELLED audit line", async || {
            let text = std::fs::read_to_string(&audit).unwrap_or_default();
            text.lines().find(|l| l.contains(uid)).map(str::to_owned).ok_or(text)
        })
        .await;
        let record: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(record["outcome"], "CANCELLED", "{line}");
        assert_eq!(record["key_id"], key_id.as_str(), "{line}");
    }
    let log = plugin.log_text();
    assert_eq!(log.matches("KMS call cancelled by the client").count(), 2, "{log}");
    drop(kept);
}

#[tokio::test(flavor = "multi_thread")]
async fn successful_calls_are_audited_but_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let plugin = common::Plugin::start(
        dir.path(),
        &local(dir.path(), &[("plugin.audit_log", audit.to_str().unwrap())]),
    )
    .await;
    plugin.wait_healthy().await;
    let mut client = plugin.client().await;
    let request = kmsgate::proto::v2::EncryptRequest { plaintext: vec![7; 32], uid: "quiet-ok".into() };
    client.encrypt(request).await.unwrap();
    let audited = std::fs::read_to_string(&audit).unwrap();
    let line = audited.lines().find(|l| l.contains("quiet-ok")).unwrap_or_else(|| panic!("{audited}"));
    let record: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(record["outcome"], "OK", "{line}");
    // The caller's credentials still reach the record through the counted connection.
    assert!(record["peer"]["uid"].is_u64(), "{line}");
    let log = plugin.log_text();
    assert!(!log.contains("quiet-ok"), "a successful call was logged: {log}");
}

/// `kmsgate plugin` under `ulimit` (`limit` is what follows `ulimit`, e.g. `-n 64`).
fn plugin_under_ulimit(limit: &str, dir: &std::path::Path) -> (std::process::Child, std::path::PathBuf) {
    let socket = dir.join("kms.sock");
    let log = std::fs::File::create(dir.join("plugin.log")).unwrap();
    let keyring = dir.join("keyring.json").display().to_string();
    let child = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit {limit} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_kmsgate"))
        .args(["plugin", "--set", &format!("plugin.socket={}", socket.display())])
        .args(["--set", &format!("local.keyring={keyring}"), "--set", "http.listen=off"])
        .args(["--set", "plugin.poll_interval=1h", "--set", "plugin.round_trip_interval=1h"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, socket)
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // NB: fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

async fn connected(socket: &std::path::Path) -> kmsgate::kms::client::KmsClient {
    common::eventually(Duration::from_secs(10), "the plugin socket answers", async || {
        kmsgate::kms::client::connect(&kmsgate::config::SocketSpec::Path(socket.to_owned())).await.ok()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_descriptor_limit_accept_backs_off_and_status_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, socket) = plugin_under_ulimit("-n 64", dir.path());
    let mut client = connected(&socket).await;
    client.status(kmsgate::proto::v2::StatusRequest {}).await.unwrap();
    // Exhaust the plugin's descriptors: connections it accepts until EMFILE, then the backlog.
    let hogs: Vec<_> = (0..120).map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap()).collect();
    // Status on the kept connection answers while accept fails...
    client.status(kmsgate::proto::v2::StatusRequest {}).await.unwrap();
    let pid = child.id();
    common::eventually(Duration::from_secs(10), "the plugin reaches its descriptor limit", async || {
        std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() >= 63
    })
    .await;
    // ...and the process does not spin: over a second it uses a small share of one core.
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    client.status(kmsgate::proto::v2::StatusRequest {}).await.unwrap();
    assert!(used < 10, "the plugin used {used} ticks of CPU in one second at the descriptor limit");
    let log = std::fs::read_to_string(dir.path().join("plugin.log")).unwrap();
    assert!(log.contains("accept failed; backing off"), "{log}");
    drop(hogs);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, socket) = plugin_under_ulimit("-S -n 64", dir.path());
    let _client = connected(&socket).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
    let _ = child.kill();
    let _ = child.wait();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "soft limit not raised: {line}");
    assert_ne!(numbers[0], "64", "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_does_not_wait_for_a_connection_that_never_spoke() {
    let dir = tempfile::tempdir().unwrap();
    let mut plugin =
        common::Plugin::start(dir.path(), &local(dir.path(), &[("plugin.shutdown_timeout", "20s")])).await;
    let mut client = plugin.client().await;
    client.status(kmsgate::proto::v2::StatusRequest {}).await.unwrap();
    // Connected, never sent the HTTP/2 preface: it can hold no call.
    let silent = std::os::unix::net::UnixStream::connect(&plugin.socket).unwrap();
    assert_eq!(plugin.stop(), Some(0));
    let log = plugin.log_text();
    assert!(!log.contains("did not finish") && !log.contains("stayed open"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    drop((silent, client));
}

#[tokio::test(flavor = "multi_thread")]
async fn half_sent_requests_are_cut_off_and_connections_are_capped() {
    common::init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let plugin = common::Plugin::start(dir.path(), &local(dir.path(), &[])).await;
    let addr = plugin.http.trim_start_matches("http://").to_owned();
    let events = Arc::new(std::sync::Mutex::new(Vec::<&'static str>::new()));
    let mut hogs = Vec::new();
    for _ in 0..kmsgate::http::MAX_CONNECTIONS + 8 {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let events = events.clone();
        hogs.push(tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            // The server closes (or answers 408 and closes): read to the end.
            while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            events.lock().unwrap().push("hog closed");
        }));
    }
    let answered = {
        let events = events.clone();
        let url = format!("{}/livez", plugin.http);
        tokio::spawn(async move {
            let r = reqwest::get(url).await.unwrap();
            assert_eq!(r.status(), 200);
            events.lock().unwrap().push("answered");
        })
    };
    // NB: the bound only turns a hang into a failure; the header timeout is 5 s.
    tokio::time::timeout(Duration::from_secs(60), answered)
        .await
        .expect("the newcomer was never served")
        .unwrap();
    // The newcomer waited for a slot: half-sent requests were cut off before it was served.
    let seen = events.lock().unwrap().clone();
    assert_eq!(seen.first(), Some(&"hog closed"), "{seen:?}");
    for hog in hogs {
        hog.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = common::Plugin::start(dir.path(), &local(dir.path(), &[])).await;
    let addr = plugin.http.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.ends_with(b"ok\n") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // Kept alive, then idle: the server closes it rather than hold the slot for ever.
    // NB: the bound only turns a hang into a failure; the server's own timeout is 5 s.
    let rest = tokio::time::timeout(Duration::from_secs(60), conn.read(&mut buf))
        .await
        .expect("the idle connection is still open after a minute")
        .unwrap();
    assert_eq!(rest, 0, "{}", String::from_utf8_lossy(&buf[..rest]));
}
