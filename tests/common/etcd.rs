//! A real single-node etcd.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{eventually, free_port, init_crypto};

/// A real single-node etcd on free loopback ports, killed on drop.
pub struct Etcd {
    child: Child,
    /// The client URL.
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd (Debian `etcd-server`) and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// The same with extra flags; TLS flags (`--cert-file`) make it serve https.
    pub async fn start_with(extra: &[String]) -> Self {
        init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let scheme = if extra.iter().any(|a| a.starts_with("--cert-file")) { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let child = Command::new("etcd")
            .args(extra)
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-cluster=test=http://127.0.0.1:{peer}"))
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.path().join("etcd.log")).map(Stdio::from).unwrap_or(Stdio::null()),
            )
            .spawn()
            .expect("start etcd (Debian etcd-server; scripts/test.sh installs it)");
        let etcd = Self { child, endpoint, _dir: dir };
        eventually(Duration::from_secs(10), &format!("etcd starts on {}", etcd.endpoint), async || {
            if scheme == "https" {
                // NB: with client-certificate auth only a TCP connect can tell it is listening.
                tokio::net::TcpStream::connect(("127.0.0.1", client)).await.is_ok()
            } else {
                match etcd.client().await {
                    Ok(mut c) => c.status().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        etcd
    }

    /// The etcd process id, for benchmarks that read its CPU time.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client for writing fixtures.
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        etcd_client::Client::connect([self.endpoint.as_str()], None).await
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
