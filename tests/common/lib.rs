//! Test fixtures for kmsgate's integration tests: a real OpenBao dev server (or raft cluster) and
//! etcd on free loopback ports, the real kmsgate binary, one in-memory Kubernetes API server (with
//! a scripted verifier beside it), and `eventually`.
// NB: every public item is documented, so a test author sees what a fixture models.
#![warn(missing_docs)]

pub mod bench;
pub mod echo;
mod etcd;
mod eventually;
pub mod externaljwt_apiserver;
pub mod fake_api;
pub mod fake_keys;
pub mod fake_signing;
pub mod fake_transit;
pub mod http_standin;
pub mod keyfile_apiserver;
pub mod kms_apiserver;
pub mod mock_api;
mod openbao;
mod plugin;
pub mod rbac;
mod signer;
pub mod storage_standin;

use std::{net::TcpListener, process::Command};

pub use etcd::{Etcd, EtcdWriter};
pub use eventually::{Settled, eventually};
pub use openbao::{Bao, RaftCluster, bao_binary};
pub use plugin::{Plugin, decrypt_request, encrypt_request, fast_probes, kmsgate_command};
pub use signer::SignerProcess;

/// Installs the ring provider once per test binary.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A free loopback port (best effort: another process may take it before we bind).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sends `sig` (as `kill` spells it, `-TERM`) to a process; panics unless it was delivered.
pub fn signal(pid: u32, sig: &str) {
    let ok =
        Command::new("kill").arg(sig).arg(pid.to_string()).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}
