//! A real single-node etcd, and a writer of fixtures into it.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use kmsgate::proto::etcd::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    kv_client::KvClient, request_op::Request,
};
use tonic::transport::Channel;

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
                match KvClient::connect(etcd.endpoint.clone()).await {
                    Ok(mut kv) => {
                        kv.range(RangeRequest { key: b"/".to_vec(), ..Default::default() }).await.is_ok()
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
        etcd
    }

    /// Runs `etcdctl` against this etcd; panics unless it succeeds.
    pub fn etcdctl(&self, args: &[&str]) {
        let out = Command::new("etcdctl").arg("--endpoints").arg(&self.endpoint).args(args).output().unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Turns authentication on, with a `root` user and `user`, whose role may only read
    /// `/registry/`: what an audit should run as. Writers must then authenticate, so plant first.
    pub fn enable_auth(&self, user: &str, password: &str) {
        self.etcdctl(&["user", "add", "root:root-pw"]);
        self.etcdctl(&["user", "add", &format!("{user}:{password}")]);
        self.etcdctl(&["role", "add", "audit"]);
        self.etcdctl(&["role", "grant-permission", "audit", "read", "/registry/", "--prefix"]);
        self.etcdctl(&["user", "grant-role", user, "audit"]);
        self.etcdctl(&["auth", "enable"]);
    }

    /// The etcd process id, for benchmarks that read its CPU time.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kmsgate's own read-only client, for scans.
    pub async fn client(&self) -> Result<kmsgate::etcd::Client, kmsgate::etcd::ScanError> {
        let settings =
            kmsgate::config::EtcdConfig { endpoints: vec![self.endpoint.clone()], ..Default::default() };
        kmsgate::etcd::connect(&settings).await
    }

    /// A writer of fixtures (plain http, no auth).
    pub async fn writer(&self) -> EtcdWriter {
        EtcdWriter { kv: KvClient::connect(self.endpoint.clone()).await.unwrap() }
    }
}

/// Writes into etcd as the API server would, through the checked-in etcd API (Put, Txn,
/// DeleteRange, Compact); every call panics on failure, and the writes return etcd's revision.
#[derive(Clone)]
pub struct EtcdWriter {
    kv: KvClient<Channel>,
}

impl EtcdWriter {
    /// Puts one value.
    pub async fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> i64 {
        let request = PutRequest { key: key.into(), value: value.into() };
        let answer = self.kv.clone().put(request).await.unwrap().into_inner();
        answer.header.unwrap().revision
    }

    /// Puts every value in one transaction (one revision), which keeps large fixtures fast.
    pub async fn put_all<K: Into<Vec<u8>>, V: Into<Vec<u8>>>(
        &self,
        values: impl IntoIterator<Item = (K, V)>,
    ) -> i64 {
        let success = values
            .into_iter()
            .map(|(key, value)| RequestOp {
                request: Some(Request::RequestPut(PutRequest { key: key.into(), value: value.into() })),
            })
            .collect();
        let answer = self.kv.clone().txn(TxnRequest { success }).await.unwrap().into_inner();
        assert!(answer.succeeded, "a transaction without comparisons applies");
        answer.header.unwrap().revision
    }

    /// Deletes one key.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> i64 {
        let request = DeleteRangeRequest { key: key.into(), range_end: Vec::new() };
        let answer = self.kv.clone().delete_range(request).await.unwrap().into_inner();
        answer.header.unwrap().revision
    }

    /// Compacts the history up to `revision`, as the API server does every few minutes.
    pub async fn compact(&self, revision: i64) {
        self.kv.clone().compact(CompactionRequest { revision, physical: true }).await.unwrap();
    }

    /// The value at `key` now, if any.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Option<Vec<u8>> {
        let request = RangeRequest { key: key.into(), ..Default::default() };
        let answer = self.kv.clone().range(request).await.unwrap().into_inner();
        answer.kvs.into_iter().next().map(|kv| kv.value)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
