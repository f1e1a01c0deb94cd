//! The real kmsgate binary: `kmsgate plugin` as a process, and the command for one-shot runs.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use kmsgate::{config::SocketSpec, kms};
use serde_json::Value;

use crate::{eventually, free_port, signal};

/// A running `kmsgate plugin`, killed on drop.
pub struct Plugin {
    child: Option<Child>,
    /// The KMS socket.
    pub socket: PathBuf,
    /// The HTTP endpoint, `http://127.0.0.1:port`.
    pub http: String,
    /// The file collecting stdout and stderr.
    pub log: PathBuf,
    settings: Vec<(String, String)>,
}

impl Plugin {
    /// Starts the plugin with these settings (as `--set` flags) plus a socket and HTTP port in `dir`.
    pub async fn start(dir: &Path, settings: &[(String, String)]) -> Self {
        // NB: the HTTP helpers below build reqwest clients, which need a rustls provider.
        crate::init_crypto();
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
    pub async fn client(&self) -> kms::client::KmsClient {
        kms::client::connect(&SocketSpec::Path(self.socket.clone())).await.unwrap()
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

/// An Encrypt request as kube-apiserver sends it: a fresh uid per call.
pub fn encrypt_request(plaintext: &[u8]) -> kmsgate::proto::v2::EncryptRequest {
    kmsgate::proto::v2::EncryptRequest {
        plaintext: plaintext.to_vec(),
        uid: uuid::Uuid::new_v4().to_string(),
    }
}

/// A Decrypt request as kube-apiserver sends it: a fresh uid, no annotations.
pub fn decrypt_request(ciphertext: &[u8], key_id: &str) -> kmsgate::proto::v2::DecryptRequest {
    kmsgate::proto::v2::DecryptRequest {
        ciphertext: ciphertext.to_vec(),
        uid: uuid::Uuid::new_v4().to_string(),
        key_id: key_id.to_owned(),
        annotations: std::collections::HashMap::new(),
    }
}
