//! Test fixtures for kmsgate's integration tests: a real OpenBao dev server (or raft cluster) and
//! etcd on free loopback ports, the real kmsgate binary, and the fake Kubernetes API servers.

mod eventually;
pub mod fake_api;
pub mod fake_keys;
pub mod mock_api;
pub mod rbac;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

pub use eventually::{Settled, eventually};
use kmsgate::{config::SocketSpec, selftest};
use serde_json::{Value, json};

/// Installs the ring provider once per test binary.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A free loopback port (best effort: another process may take it before we bind).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The `bao` binary the tests use.
pub fn bao_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KMSGATE_TEST_BAO") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|p| p.join("bao")).find(|p| p.is_file()));
    found
        .flatten()
        .expect("OpenBao `bao` not found: run the tests with scripts/test.sh, or set KMSGATE_TEST_BAO")
}

/// A real `bao server -dev`, killed on drop.
pub struct Bao {
    child: Child,
    pub addr: String,
    pub token: String,
    /// With TLS: the CA that signed the server certificate.
    pub ca: Option<PathBuf>,
    home: tempfile::TempDir,
    http: reqwest::Client,
}

impl Bao {
    /// Starts OpenBao with a random root token and a Transit mount with key `kmsgate`.
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// The same, serving HTTPS with a CA of its own (`-dev-tls`).
    pub async fn start_tls() -> Self {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Self {
        init_crypto();
        let home = tempfile::tempdir().unwrap();
        let token = format!("kgtest{}", uuid::Uuid::new_v4().simple());
        let port = free_port();
        let scheme = if tls { "https" } else { "http" };
        let addr = format!("{scheme}://127.0.0.1:{port}");
        let cert_dir = home.path().join("tls");
        let mut command = Command::new(bao_binary());
        if tls {
            std::fs::create_dir(&cert_dir).unwrap();
            command
                .arg("server")
                .arg("-dev")
                .arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", cert_dir.display()));
        } else {
            command.args(["server", "-dev"]);
        }
        let child = command
            .arg("-dev-no-store-token")
            .arg(format!("-dev-root-token-id={token}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            // NB: keep the dev server off the developer's ~/.vault-token and config.
            .env("HOME", home.path())
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(home.path().join("bao.log")).map(Stdio::from).unwrap_or(Stdio::null()),
            )
            .spawn()
            .expect("start bao");
        let ca = tls.then(|| cert_dir.join("vault-ca.pem"));
        let mut http = reqwest::Client::builder();
        if let Some(ca) = &ca {
            eventually(Duration::from_secs(5), "OpenBao writes its CA", async || ca.exists()).await;
            let pem = std::fs::read(ca).unwrap();
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        let bao = Self { child, addr, token, ca, home, http: http.build().unwrap() };
        eventually(
            Duration::from_secs(10),
            &format!("OpenBao becomes healthy on {}", bao.addr),
            async || {
                let health = bao.http.get(format!("{}/v1/sys/health", bao.addr)).send().await;
                health.is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
        bao.post("sys/mounts/transit", json!({"type": "transit"})).await;
        bao.post("transit/keys/kmsgate", json!({"type": "aes256-gcm96"})).await;
        bao
    }

    /// POSTs to `/v1/{path}` as root; panics on failure.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let request = self.http.post(format!("{}/v1/{path}", self.addr)).json(&body);
        send_as(request, &self.token, &format!("POST {path}")).await
    }

    /// GETs `/v1/{path}` as root; panics on failure.
    pub async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", &self.token)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "GET {path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Policy `kmsgate`: the shipped plugin policy (deploy/vault/plugin-policy.hcl), so every
    /// test that logs in with it proves the policy is enough.
    pub async fn plugin_policy(&self) {
        let policy = std::fs::read_to_string("deploy/vault/plugin-policy.hcl").unwrap();
        self.post("sys/policies/acl/kmsgate", json!({ "policy": policy })).await;
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A scratch directory that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.home.path()
    }

    /// Rotates the Transit key.
    pub async fn rotate(&self) {
        self.post("transit/keys/kmsgate/rotate", json!({})).await;
    }

    /// Freezes the process: connections hang, state is kept.
    pub fn pause(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// Thaws the process.
    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }

    /// A token file holding the root token.
    pub fn token_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("token");
        std::fs::write(&path, format!("{}\n", self.token)).unwrap();
        path
    }

    /// Client settings for this server with token auth from a file in `dir`.
    pub fn vault_settings(&self, dir: &Path) -> kmsgate::transit::VaultSettings {
        kmsgate::transit::VaultSettings {
            addresses: vec![self.addr.clone()],
            namespace: String::new(),
            tls: kmsgate::transit::TlsSettings::default(),
            auth: kmsgate::transit::AuthMethod::Token { file: self.token_file(dir) },
            renew_fraction: 0.67,
            max_concurrent_calls: 32,
            check_interval: Duration::from_millis(200),
        }
    }

    /// Plugin settings for this server.
    pub fn plugin_settings(&self, dir: &Path) -> Vec<(String, String)> {
        vec![
            ("backend.kind".into(), "vault".into()),
            ("backend.identity".into(), "test-bao".into()),
            ("vault.addresses".into(), self.addr.clone()),
            ("vault.token_file".into(), self.token_file(dir).display().to_string()),
        ]
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        signal(self.child.id(), "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a Vault request with a token; panics with `what` and the answer unless it succeeds.
async fn send_as(request: reqwest::RequestBuilder, token: &str, what: &str) -> Value {
    let r = request.header("X-Vault-Token", token).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(status.is_success(), "{what}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Sends `sig` (as `kill` spells it, `-TERM`) to a process; panics unless it was delivered.
pub fn signal(pid: u32, sig: &str) {
    let ok =
        Command::new("kill").arg(sig).arg(pid.to_string()).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}

/// A running `kmsgate plugin`, killed on drop.
pub struct Plugin {
    child: Option<Child>,
    pub socket: PathBuf,
    pub http: String,
    pub log: PathBuf,
    settings: Vec<(String, String)>,
}

impl Plugin {
    /// Starts the plugin with these settings (as `--set` flags) plus a socket and HTTP port in `dir`.
    pub async fn start(dir: &Path, settings: &[(String, String)]) -> Self {
        let socket = dir.join("kms.sock");
        let port = free_port();
        let mut all = vec![
            ("plugin.socket".to_owned(), socket.display().to_string()),
            ("http.listen".to_owned(), format!("127.0.0.1:{port}")),
            ("log.level".to_owned(), "debug".to_owned()),
        ];
        all.extend_from_slice(settings);
        let log = dir.join(format!("plugin-{}.log", uuid::Uuid::new_v4().simple()));
        let mut plugin =
            Self { child: None, socket, http: format!("http://127.0.0.1:{port}"), log, settings: all };
        plugin.spawn();
        plugin.wait_for_socket().await;
        plugin
    }

    fn spawn(&mut self) {
        let mut command = kmsgate_command();
        command.arg("plugin");
        for (k, v) in &self.settings {
            command.arg("--set").arg(format!("{k}={v}"));
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        command.stdout(log.try_clone().unwrap()).stderr(log);
        self.child = Some(command.spawn().expect("start kmsgate"));
    }

    async fn wait_for_socket(&mut self) {
        eventually(Duration::from_secs(5), "the plugin socket appears", async || {
            // NB: connect, not exists(): a stale socket file may be there before the plugin binds.
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("plugin exited with {status}: {}", self.log_text());
            }
            Err(self.log_text())
        })
        .await;
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops with SIGTERM and returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), "-TERM");
        child.wait().unwrap().code()
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            signal(child.id(), "-TERM");
        }
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> Option<i32> {
        self.child.take()?.wait().unwrap().code()
    }

    /// Stops and starts again with the same settings.
    pub async fn restart(&mut self) {
        assert_eq!(self.stop(), Some(0), "{}", self.log_text());
        self.spawn();
        self.wait_for_socket().await;
    }

    /// The plugin's combined stdout and stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A KMS client on the socket.
    pub async fn client(&self) -> selftest::KmsClient {
        selftest::connect(&SocketSpec::Path(self.socket.clone())).await.unwrap()
    }

    /// GET /status.
    pub async fn status_json(&self) -> Value {
        reqwest::get(format!("{}/status", self.http)).await.unwrap().json().await.unwrap()
    }

    /// GET a path as text, with its status code.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("{}{path}", self.http)).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Waits until Status says ok.
    pub async fn wait_healthy(&self) -> String {
        self.wait_status(|healthz, _| healthz == "ok").await.1
    }

    /// Polls Status until `done(healthz, key_id)` holds; returns the last answer.
    pub async fn wait_status(&self, done: impl Fn(&str, &str) -> bool) -> (String, String) {
        let mut client = self.client().await;
        let mut last = (String::new(), String::new());
        eventually(Duration::from_secs(10), "Status reaches the wanted state", async || {
            if let Ok(r) = client.status(kmsgate::proto::v2::StatusRequest {}).await {
                let r = r.into_inner();
                last = (r.healthz, r.key_id);
                if done(&last.0, &last.1) {
                    return Ok(last.clone());
                }
            }
            Err(format!("{last:?}; log:\n{}", self.log_text()))
        })
        .await
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The kmsgate binary, with no KMSGATE_* or VAULT_* variables from the developer's shell.
pub fn kmsgate_command() -> Command {
    // NB: cargo also sets CARGO_BIN_EXE_<name> in a running integration test's environment, so
    // a library can find the binary without the test's `env!`.
    let binary = std::env::var_os("CARGO_BIN_EXE_kmsgate")
        .expect("CARGO_BIN_EXE_kmsgate is unset: run this from an integration test under `cargo test`");
    let mut command = Command::new(binary);
    for (key, _) in std::env::vars() {
        if key.starts_with("KMSGATE_") || key.starts_with("VAULT_") {
            command.env_remove(key);
        }
    }
    command
}

/// Settings that make probes fast enough for tests.
pub fn fast_probes() -> Vec<(String, String)> {
    vec![
        ("plugin.poll_interval".into(), "100ms".into()),
        ("plugin.round_trip_interval".into(), "1s".into()),
        ("plugin.probe_timeout".into(), "500ms".into()),
    ]
}

/// A real 3-node OpenBao raft cluster on loopback, serving HTTPS with a test CA, initialised and
/// unsealed, with Transit key `kmsgate` and a root token; every node is killed on drop.
pub struct RaftCluster {
    nodes: Vec<Child>,
    /// API addresses, node 1 first (node 1 starts as leader).
    pub addrs: Vec<String>,
    /// The root token.
    pub token: String,
    /// The CA that signed every node's certificate.
    pub ca: PathBuf,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl RaftCluster {
    /// Starts, initialises, unseals and joins three nodes; waits until all three are voters.
    pub async fn start() -> Self {
        init_crypto();
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "kmsgate test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let mut server = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        server.subject_alt_names.push(rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        let server_cert = server.signed_by(&server_key, &ca).unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), server_cert.pem()).unwrap();
        std::fs::write(dir.path().join("server-key.pem"), server_key.serialize_pem()).unwrap();
        let mut nodes = Vec::new();
        let mut addrs = Vec::new();
        for i in 1..=3 {
            let (api, cluster) = (free_port(), free_port());
            let data = dir.path().join(format!("n{i}"));
            std::fs::create_dir(&data).unwrap();
            let config = dir.path().join(format!("n{i}.hcl"));
            std::fs::write(
                &config,
                format!(
                    "storage \"raft\" {{\n  path = \"{}\"\n  node_id = \"n{i}\"\n  performance_multiplier = 1\n}}\n\
                     listener \"tcp\" {{\n  address = \"127.0.0.1:{api}\"\n  cluster_address = \"127.0.0.1:{cluster}\"\n\
                     \x20 tls_cert_file = \"{dir}/server.pem\"\n  tls_key_file = \"{dir}/server-key.pem\"\n}}\n\
                     api_addr = \"https://127.0.0.1:{api}\"\ncluster_addr = \"https://127.0.0.1:{cluster}\"\n",
                    data.display(),
                    dir = dir.path().display(),
                ),
            )
            .unwrap();
            let child = Command::new(bao_binary())
                .arg("server")
                .arg(format!("-config={}", config.display()))
                .env("HOME", dir.path())
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::create(dir.path().join(format!("n{i}.log")))
                        .map(Stdio::from)
                        .unwrap_or(Stdio::null()),
                )
                .spawn()
                .unwrap();
            nodes.push(child);
            addrs.push(format!("https://127.0.0.1:{api}"));
        }
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
            .build()
            .unwrap();
        let mut cluster = Self { nodes, addrs, token: String::new(), ca: ca_path, _dir: dir, http };
        for addr in cluster.addrs.clone() {
            cluster.wait(&addr, |code| code == 501).await;
        }
        let init = cluster.put(0, "sys/init", json!({"secret_shares": 1, "secret_threshold": 1})).await;
        let key = init["keys"][0].as_str().unwrap().to_owned();
        cluster.token = init["root_token"].as_str().unwrap().to_owned();
        cluster.put(0, "sys/unseal", json!({"key": key})).await;
        cluster.wait(&cluster.addrs[0].clone(), |code| code == 200).await;
        cluster
            .put(0, "sys/storage/raft/autopilot/configuration", json!({"server_stabilization_time": "1s"}))
            .await;
        for node in 1..3 {
            let join = json!({"leader_api_addr": cluster.addrs[0], "leader_ca_cert": ca.pem()});
            cluster.put(node, "sys/storage/raft/join", join).await;
            cluster.put(node, "sys/unseal", json!({"key": key})).await;
        }
        eventually(Duration::from_secs(30), "the raft cluster has three voters", async || {
            let config = cluster.get(0, "sys/storage/raft/configuration").await;
            let servers = config["data"]["config"]["servers"].as_array().cloned().unwrap_or_default();
            servers.len() == 3 && servers.iter().all(|s| s["voter"] == true)
        })
        .await;
        cluster.put(0, "sys/mounts/transit", json!({"type": "transit"})).await;
        cluster.put(0, "transit/keys/kmsgate", json!({"type": "aes256-gcm96"})).await;
        cluster
    }

    async fn wait(&self, addr: &str, ready: impl Fn(u16) -> bool) {
        eventually(Duration::from_secs(15), &format!("{addr} reaches the wanted health state"), async || {
            let health = self.http.get(format!("{addr}/v1/sys/health")).send().await;
            health.is_ok_and(|r| ready(r.status().as_u16()))
        })
        .await;
    }

    /// PUTs to a node as root; panics on failure.
    pub async fn put(&self, node: usize, path: &str, body: Value) -> Value {
        let request = self.http.put(format!("{}/v1/{path}", self.addrs[node])).json(&body);
        send_as(request, &self.token, &format!("PUT {path} on node {node}")).await
    }

    /// GET from a node as root.
    pub async fn get(&self, node: usize, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/v1/{path}", self.addrs[node]))
            .header("X-Vault-Token", &self.token)
            .send()
            .await;
        match r {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// The nodes' own logs, for failure messages.
    pub fn logs(&self) -> String {
        (1..=3)
            .map(|i| std::fs::read_to_string(self._dir.path().join(format!("n{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    /// Kills a node outright (the leader loss case).
    pub fn kill(&mut self, node: usize) {
        let _ = self.nodes[node].kill();
        let _ = self.nodes[node].wait();
    }
}

impl Drop for RaftCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

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
