//! `plugin.*`: the KMS plugin server's socket, probes, deadlines and audit log.

use std::{path::PathBuf, time::Duration};

use super::{ConfigError, SocketConfig, field, hostname, source::Values};
use crate::{ciphertext, storage::CIPHERTEXT_MAX_BYTES};

/// What Status reports as `version`; fixed for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusVersion {
    /// For 1.29+.
    V2,
    /// For 1.27 and 1.28.
    V2beta1,
}

impl StatusVersion {
    /// The string Status returns.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V2 => "v2",
            Self::V2beta1 => "v2beta1",
        }
    }
}

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    /// A file, opened for append.
    File(PathBuf),
    /// Nowhere.
    Off,
    /// Standard error, one JSON line each.
    Stderr,
}

impl AuditSink {
    /// Reads an audit log setting: `stderr`, `off` or a file path.
    pub(super) fn read(v: &Values, name: &str) -> Result<Self, ConfigError> {
        Ok(match v.text(name)?.unwrap_or_default().as_str() {
            "stderr" => Self::Stderr,
            "off" => Self::Off,
            "" => return Err(field(name, "must be stderr, off, or a file path")),
            path => Self::File(PathBuf::from(path)),
        })
    }
}

/// The KMS plugin server's settings.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// The socket and its permissions.
    pub socket: SocketConfig,
    /// Status version.
    pub status_version: StatusVersion,
    /// Node name for /status.
    pub node_name: String,
    /// Largest Encrypt plaintext.
    pub max_plaintext_bytes: usize,
    /// Consecutive polls before a promotion.
    pub promote_after_polls: u32,
    /// Metadata poll interval.
    pub poll_interval: Duration,
    /// Round-trip probe interval.
    pub round_trip_interval: Duration,
    /// Longest time without a good round trip before healthz fails.
    pub staleness_window: Duration,
    /// Consecutive failed probes before healthz fails.
    pub unhealthy_after_failures: u32,
    /// Deadline of each probe call.
    pub probe_timeout: Duration,
    /// Deadline of a gRPC call without grpc-timeout.
    pub default_deadline: Duration,
    /// Graceful shutdown limit.
    pub shutdown_timeout: Duration,
    /// `Some` in grace outage mode: how long an outage may keep Status "ok"; `None` is honest.
    pub outage_grace: Option<Duration>,
    /// Audit log sink.
    pub audit_log: AuditSink,
}

impl PluginConfig {
    /// Reads `plugin.*`; `ciphertext_tag` is the tag of the configured key store's ciphertexts.
    pub(super) fn read(v: &Values, ciphertext_tag: &str) -> Result<Self, ConfigError> {
        let text = |name| v.text(name).map(Option::unwrap_or_default);
        let socket = SocketConfig::read(v, "plugin", "Decrypt")?;
        let status_version = match text("plugin.status_version")?.as_str() {
            "v2" => StatusVersion::V2,
            "v2beta1" => StatusVersion::V2beta1,
            other => return Err(field("plugin.status_version", format!("{other:?} must be v2 or v2beta1"))),
        };
        let round_trip_interval = v.required_duration("plugin.round_trip_interval")?;
        let staleness_window = v.duration("plugin.staleness_window")?.unwrap_or(round_trip_interval * 2);
        if staleness_window < round_trip_interval {
            return Err(field("plugin.staleness_window", "must be at least plugin.round_trip_interval"));
        }
        let max_plaintext_bytes = v.int("plugin.max_plaintext_bytes", 1)? as usize;
        let worst = ciphertext::versioned_len(ciphertext_tag, max_plaintext_bytes);
        if worst > CIPHERTEXT_MAX_BYTES {
            return Err(field(
                "plugin.max_plaintext_bytes",
                format!(
                    "{max_plaintext_bytes} bytes could encrypt to {worst} bytes; the API server accepts at \
                     most {CIPHERTEXT_MAX_BYTES}"
                ),
            ));
        }
        let outage_grace = match text("plugin.outage_mode")?.as_str() {
            "grace" => Some(v.required_duration("plugin.outage_grace")?),
            "honest" => None,
            other => return Err(field("plugin.outage_mode", format!("{other:?} must be grace or honest"))),
        };
        let audit_log = AuditSink::read(v, "plugin.audit_log")?;
        Ok(Self {
            socket,
            status_version,
            node_name: v.nonempty("plugin.node_name")?.unwrap_or_else(hostname),
            max_plaintext_bytes,
            promote_after_polls: v.int("plugin.promote_after_polls", 1)? as u32,
            poll_interval: v.required_duration("plugin.poll_interval")?,
            round_trip_interval,
            staleness_window,
            unhealthy_after_failures: v.int("plugin.unhealthy_after_failures", 1)? as u32,
            probe_timeout: v.required_duration("plugin.probe_timeout")?,
            default_deadline: v.required_duration("plugin.default_deadline")?,
            shutdown_timeout: v.required_duration("plugin.shutdown_timeout")?,
            outage_grace,
            audit_log,
        })
    }
}
