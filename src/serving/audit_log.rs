//! The audit log both servers write: one JSON line per Encrypt/Decrypt (with who called, which
//! key_id, the outcome and the latency) or per Sign (the signer's own record). It never holds
//! plaintext, seeds, ciphertexts or tokens.

use std::{
    fs::OpenOptions,
    io::{LineWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::config::AuditSink;

/// The audit log file could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}")]
pub struct AuditLogError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Where audit records are written.
pub struct AuditLog {
    sink: Option<Mutex<Box<dyn Write + Send>>>,
}

/// The caller, from SO_PEERCRED on the unix socket.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Peer {
    /// Caller uid.
    pub uid: Option<u32>,
    /// Caller gid.
    pub gid: Option<u32>,
    /// Caller pid, where visible.
    pub pid: Option<i32>,
}

/// One KMS audit record.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    /// Wall-clock time, RFC 3339.
    pub time: String,
    /// `Encrypt` or `Decrypt`.
    pub method: &'static str,
    /// The API server's correlation uid.
    pub uid: &'a str,
    /// The key_id used or asked for.
    pub key_id: &'a str,
    /// `OK` or the gRPC code name.
    pub outcome: &'static str,
    /// Latency in milliseconds.
    pub latency_ms: f64,
    /// The caller.
    pub peer: Peer,
}

impl AuditLog {
    /// Opens the configured sink; files are created 0600 and appended to.
    pub fn open(sink: &AuditSink) -> Result<Self, AuditLogError> {
        let writer: Option<Box<dyn Write + Send>> = match sink {
            AuditSink::Off => None,
            AuditSink::Stderr => Some(Box::new(std::io::stderr())),
            AuditSink::File(path) => Some(Box::new(LineWriter::new(open_append(path)?))),
        };
        Ok(Self { sink: writer.map(Mutex::new) })
    }

    /// Writes one record; a failed write is logged, never fatal to the call.
    pub fn write(&self, record: &impl Serialize) {
        let Some(sink) = &self.sink else { return };
        let Ok(mut line) = serde_json::to_vec(record) else { return };
        line.push(b'\n');
        let mut sink = sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = sink.write_all(&line) {
            tracing::error!(error = %e, "audit log write failed");
        }
    }
}

/// A record's time field.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A latency in milliseconds, for records.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn open_append(path: &Path) -> Result<std::fs::File, AuditLogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| AuditLogError { path: path.to_owned(), source })
}
