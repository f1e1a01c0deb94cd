//! Real OpenBao: a dev server, or a 3-node raft cluster with TLS.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

use crate::{eventually, free_port, init_crypto, signal};

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
    /// The API address, `http(s)://127.0.0.1:port`.
    pub addr: String,
    /// The root token.
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

    /// DELETEs `/v1/{path}` as root; panics on failure.
    pub async fn delete(&self, path: &str) {
        let request = self.http.delete(format!("{}/v1/{path}", self.addr));
        send_as(request, &self.token, &format!("DELETE {path}")).await;
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
    pub fn vault_settings(&self, dir: &Path) -> kmsgate::config::VaultClientConfig {
        kmsgate::config::VaultClientConfig {
            addresses: vec![self.addr.clone()],
            namespace: String::new(),
            tls: kmsgate::config::VaultTls::default(),
            auth: kmsgate::config::VaultAuth::Token { file: self.token_file(dir) },
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
