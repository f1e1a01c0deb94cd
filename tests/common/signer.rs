//! The real `kmsgate signer` process, with its socket, state file and audit log in a directory
//! of the test's, killed when the test ends.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use crate::{eventually, kmsgate_command, signal};

const WAIT: Duration = Duration::from_secs(60);

/// A running `kmsgate signer`; killed on drop.
pub struct SignerProcess {
    child: Child,
    /// Its unix socket (`--service-account-signing-endpoint`).
    pub socket: PathBuf,
    dir: PathBuf,
}

impl Drop for SignerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SignerProcess {
    /// Starts `kmsgate signer` with its files in `dir` and `settings` as `--set` flags (after
    /// defaults for the state file, audit log, no HTTP endpoint and a 1 s refresh hint), and
    /// waits for its socket; panics with its log if it exits first.
    pub async fn start(dir: &Path, settings: &[(String, String)]) -> Self {
        let path = |name: &str| dir.join(name).display().to_string();
        let socket = dir.join("signer.sock");
        let mut command = kmsgate_command();
        command.args(["signer", "--socket", &path("signer.sock")]);
        let mut all = vec![
            ("signer.state_file".to_owned(), path("keys.json")),
            ("signer.audit_log".to_owned(), path("audit.log")),
            ("signer.http_listen".to_owned(), "off".to_owned()),
            ("signer.refresh_hint_seconds".to_owned(), "1".to_owned()),
        ];
        all.extend(settings.iter().cloned());
        for (key, value) in all {
            command.args(["--set", &format!("{key}={value}")]);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("signer.log")).unwrap();
        let child = command.stdout(Stdio::null()).stderr(Stdio::from(log)).spawn().unwrap();
        let mut signer = Self { child, socket: socket.clone(), dir: dir.to_owned() };
        eventually(WAIT, &format!("the signer socket {}", socket.display()), async || {
            match signer.child.try_wait() {
                _ if socket.exists() => Ok(()),
                Ok(Some(status)) => panic!("the signer exited with {status}:\n{}", signer.log()),
                _ => Err(signer.log()),
            }
        })
        .await;
        signer
    }

    /// SIGTERM, then waits for the socket to go.
    pub async fn stop(mut self) {
        signal(self.child.id(), "-TERM");
        let socket = self.socket.clone();
        eventually(WAIT, "the socket removed", async || !socket.exists()).await;
        let _ = self.child.wait();
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("signer.log")).unwrap_or_default()
    }
}
