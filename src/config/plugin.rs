//! `plugin.*`: the KMS plugin server's socket, probes, deadlines and audit log.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{ConfigError, field, hostname, source::Values};
use crate::{ciphertext, storage::CIPHERTEXT_MAX_BYTES};

/// Where the socket lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketSpec {
    /// A Linux abstract socket (`@name`): no file, no permissions.
    Abstract(String),
    /// A socket file.
    Path(PathBuf),
}

impl SocketSpec {
    /// Parses `@name`, `/abs/path` or `unix:///abs/path`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.strip_prefix("unix://").unwrap_or(text);
        if let Some(name) = text.strip_prefix('@') {
            if name.is_empty() || name.len() > 107 {
                return Err("abstract socket name must be 1-107 bytes".into());
            }
            return Ok(Self::Abstract(name.to_owned()));
        }
        if !text.starts_with('/') {
            return Err(format!("{text:?} is not an absolute path (write /path or unix:///path)"));
        }
        if text.len() > 107 {
            return Err("socket paths are limited to 107 bytes by the kernel".into());
        }
        Ok(Self::Path(PathBuf::from(text)))
    }

    /// The endpoint URL kube-apiserver's EncryptionConfiguration uses.
    pub fn endpoint(&self) -> String {
        match self {
            Self::Abstract(name) => format!("unix:///@{name}"),
            Self::Path(path) => format!("unix://{}", path.display()),
        }
    }
}

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

/// What to do when the socket's directory, or one above it, is writable by others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirCheck {
    /// Refuse to start.
    Refuse,
    /// Start, with a warning (a pod volume shared with the API server).
    Warn,
}

/// The KMS plugin server's settings.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Socket location.
    pub socket: SocketSpec,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Socket group id.
    pub socket_gid: Option<u32>,
    /// Refuse or warn when the socket's directory is writable by others.
    pub socket_dir_check: DirCheck,
    /// Create the socket's directory.
    pub create_socket_dir: bool,
    /// Allow abstract sockets.
    pub allow_abstract_socket: bool,
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
        let socket = SocketSpec::parse(&text("plugin.socket")?).map_err(|e| field("plugin.socket", e))?;
        let allow_abstract_socket = v.flag("plugin.allow_abstract_socket")?;
        if matches!(socket, SocketSpec::Abstract(_)) && !allow_abstract_socket {
            return Err(field(
                "plugin.socket",
                "abstract sockets (@name) have no file permissions, so any process in the network namespace \
                 can call Decrypt; set plugin.allow_abstract_socket = true to accept that",
            ));
        }
        let mode_text = text("plugin.socket_mode")?;
        let socket_mode =
            u32::from_str_radix(&mode_text, 8).ok().filter(|m| *m <= 0o777).ok_or_else(|| {
                field("plugin.socket_mode", format!("{mode_text:?} is not an octal mode like 0600"))
            })?;
        if socket_mode & 0o007 != 0 {
            return Err(field(
                "plugin.socket_mode",
                format!(
                    "{socket_mode:04o} gives every local user access to Decrypt; use 0600 or 0660 with \
                     socket_group"
                ),
            ));
        }
        let socket_gid = match v.nonempty("plugin.socket_group")? {
            None => None,
            Some(group) => Some(resolve_group(&group).map_err(|e| field("plugin.socket_group", e))?),
        };
        if socket_mode & 0o070 != 0 && socket_gid.is_none() {
            // NB: refused rather than warned: without a named group the socket gets the plugin's
            // own primary group (often root's, 0), so the group bits grant access to whoever shares
            // it by accident. Naming the group, even the plugin's own, makes the grant deliberate.
            return Err(field(
                "plugin.socket_mode",
                format!(
                    "{socket_mode:04o} gives group access, but plugin.socket_group is not set; name the group \
                     that may call Decrypt (e.g. the API server's), or use 0600"
                ),
            ));
        }
        let socket_dir_check = match text("plugin.socket_dir_check")?.as_str() {
            "refuse" => DirCheck::Refuse,
            "warn" => DirCheck::Warn,
            other => {
                return Err(field("plugin.socket_dir_check", format!("{other:?} must be refuse or warn")));
            }
        };
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
        let audit_log = match text("plugin.audit_log")?.as_str() {
            "stderr" => AuditSink::Stderr,
            "off" => AuditSink::Off,
            "" => return Err(field("plugin.audit_log", "must be stderr, off, or a file path")),
            path => AuditSink::File(PathBuf::from(path)),
        };
        Ok(Self {
            socket,
            socket_mode,
            socket_gid,
            socket_dir_check,
            create_socket_dir: v.flag("plugin.create_socket_dir")?,
            allow_abstract_socket,
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

fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let text = crate::files::read_text_capped(Path::new("/etc/group"), crate::files::DOCUMENT_MAX_BYTES)
        .map_err(|e| format!("cannot read /etc/group: {e}"))?;
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split(':');
            Some((parts.next()?, parts.nth(1)?))
        })
        .find(|(name, _)| *name == group)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| format!("group {group:?} not found in /etc/group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_specs() {
        assert_eq!(
            SocketSpec::parse("unix:///var/run/k.sock").unwrap(),
            SocketSpec::Path("/var/run/k.sock".into())
        );
        assert_eq!(SocketSpec::parse("@kms").unwrap().endpoint(), "unix:///@kms");
        assert_eq!(SocketSpec::parse("/a/b.sock").unwrap().endpoint(), "unix:///a/b.sock");
        assert!(SocketSpec::parse(&format!("/{}", "a".repeat(107))).is_err());
    }
}
