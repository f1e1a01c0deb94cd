//! `<server>.socket*`: where a gRPC server's unix socket lives and who may open it. The KMS plugin
//! (`plugin.*`) and the signer (`signer.*`) each hold one, read by the same code.

use std::path::{Path, PathBuf};

use super::{ConfigError, field, source::Values};

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

    /// The plain path or `@name` that `--service-account-signing-endpoint` takes (not a URL).
    pub fn plain(&self) -> String {
        match self {
            Self::Abstract(name) => format!("@{name}"),
            Self::Path(path) => path.display().to_string(),
        }
    }
}

/// What to do when the socket's directory, or one above it, is writable by others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirCheck {
    /// Refuse to start.
    Refuse,
    /// Start, with a warning (a pod volume shared with the API server).
    Warn,
}

/// One server's socket: location, mode, group and the checks made before binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketConfig {
    /// The section it was read from (`plugin`, `signer`), for messages.
    pub section: &'static str,
    /// Socket location.
    pub spec: SocketSpec,
    /// Socket file mode.
    pub mode: u32,
    /// Socket group id.
    pub gid: Option<u32>,
    /// Refuse or warn when the socket's directory is writable by others.
    pub dir_check: DirCheck,
    /// Create the socket's directory.
    pub create_dir: bool,
    /// Allow abstract sockets.
    pub allow_abstract: bool,
}

impl SocketConfig {
    /// Reads `<section>.socket`, `socket_mode`, `socket_group`, `socket_dir_check`,
    /// `create_socket_dir` and `allow_abstract_socket`; `guards` names the call the socket's
    /// permissions protect (`Decrypt`, `Sign`), for messages.
    pub(super) fn read(v: &Values, section: &'static str, guards: &str) -> Result<Self, ConfigError> {
        let name = |key: &str| format!("{section}.{key}");
        let text = |key: &str| v.text(&name(key)).map(Option::unwrap_or_default);
        let spec = SocketSpec::parse(&text("socket")?).map_err(|e| field(&name("socket"), e))?;
        let allow_abstract = v.flag(&name("allow_abstract_socket"))?;
        if matches!(spec, SocketSpec::Abstract(_)) && !allow_abstract {
            return Err(field(
                &name("socket"),
                format!(
                    "abstract sockets (@name) have no file permissions, so any process in the network \
                     namespace can call {guards}; set {section}.allow_abstract_socket = true to accept that"
                ),
            ));
        }
        let mode_text = text("socket_mode")?;
        let mode = u32::from_str_radix(&mode_text, 8).ok().filter(|m| *m <= 0o777).ok_or_else(|| {
            field(&name("socket_mode"), format!("{mode_text:?} is not an octal mode like 0600"))
        })?;
        if mode & 0o007 != 0 {
            return Err(field(
                &name("socket_mode"),
                format!(
                    "{mode:04o} gives every local user access to {guards}; use 0600 or 0660 with socket_group"
                ),
            ));
        }
        let gid = match v.nonempty(&name("socket_group"))? {
            None => None,
            Some(group) => Some(resolve_group(&group).map_err(|e| field(&name("socket_group"), e))?),
        };
        if mode & 0o070 != 0 && gid.is_none() {
            // NB: refused rather than warned: without a named group the socket gets the server's
            // own primary group (often root's, 0), so the group bits grant access to whoever shares
            // it by accident. Naming the group, even the server's own, makes the grant deliberate.
            return Err(field(
                &name("socket_mode"),
                format!(
                    "{mode:04o} gives group access, but {section}.socket_group is not set; name the group \
                     that may call {guards} (e.g. the API server's), or use 0600"
                ),
            ));
        }
        let dir_check = match text("socket_dir_check")?.as_str() {
            "refuse" => DirCheck::Refuse,
            "warn" => DirCheck::Warn,
            other => {
                return Err(field(&name("socket_dir_check"), format!("{other:?} must be refuse or warn")));
            }
        };
        Ok(Self {
            section,
            spec,
            mode,
            gid,
            dir_check,
            create_dir: v.flag(&name("create_socket_dir"))?,
            allow_abstract,
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
        assert_eq!(SocketSpec::parse("unix:///a/b.sock").unwrap().plain(), "/a/b.sock");
        assert_eq!(SocketSpec::parse("@s").unwrap().plain(), "@s");
        assert!(SocketSpec::parse(&format!("/{}", "a".repeat(107))).is_err());
    }
}
