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
    metrics::VaultMetrics,
    transit::{AuthMethod, TlsSettings, Transit, VaultClient, VaultSettings},
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
    let settings = VaultSettings {
        addresses: vec![addr],
        namespace: String::new(),
        tls: TlsSettings::default(),
        auth: AuthMethod::Token { file: token },
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
