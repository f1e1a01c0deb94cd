//! Typed configuration: a TOML file, `KMSGATE_*` environment variables and `--set` flags,
//! merged in that order of precedence (flags > env > file), validated once at start.
//!
//! Every setting has one dotted name (`plugin.socket`); its environment variable is that name in
//! upper case with `_` for `.` and a `KMSGATE_` prefix (`KMSGATE_PLUGIN_SOCKET`). The VAULT_*
//! variables operators expect are mapped explicitly (see [`VAULT_ENV`]) and rank below KMSGATE_*.
//!
//! This module composes one section module per concern and imports none of the rooms it
//! configures: each room (or the command that starts it) turns its section into its own types.

mod backend;
mod controller;
mod etcd;
mod http_log;
mod plugin;
mod settings;
mod signer;
mod socket;
mod source;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

pub use backend::{BackendConfig, VaultAuth, VaultClientConfig, VaultConfig, VaultTls};
pub use controller::ControllerConfig;
pub use etcd::EtcdConfig;
pub use http_log::LogConfig;
pub use plugin::{AuditSink, PluginConfig, StatusVersion};
pub use settings::{Fallback, Kind, SETTINGS, Setting, VAULT_ENV, env_name, reference};
pub use signer::{MIN_TOKEN_EXPIRATION, SignerBackend, SignerConfig, VerifyKeyFile};
pub use socket::{DirCheck, SocketConfig, SocketSpec};
pub use source::{Env, ProcessEnv, parse_set_flag};

/// The config file format this code reads.
pub const FORMAT: i64 = 1;

/// The configuration is unusable. Each variant names the source and the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting's value is invalid.
    #[error("config: {field}: {problem}")]
    Field { field: String, problem: String },
    /// The config file could not be read.
    #[error("config file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file or the merged settings do not parse.
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    /// An env variable, flag or file key names no known setting.
    #[error("config: {origin} names unknown setting {name:?}")]
    UnknownSetting { origin: String, name: String },
}

fn field(field: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field { field: field.to_owned(), problem: problem.into() }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The KMS plugin server.
    pub plugin: PluginConfig,
    /// The ExternalJWTSigner server.
    pub signer: SignerConfig,
    /// The read-only HTTP endpoint; `None` when off.
    pub http_listen: Option<SocketAddr>,
    /// Logging.
    pub log: LogConfig,
    /// The key store.
    pub backend: BackendConfig,
    /// The rotation controller.
    pub controller: ControllerConfig,
    /// etcd access for verification and retire; `None` when not configured.
    pub etcd: Option<EtcdConfig>,
    /// What loading found worth saying once logging is up.
    pub notices: Notices,
}

/// Lines for the log at start: which values were used and where from, and what looks wrong.
#[derive(Debug, Clone, Default)]
pub struct Notices {
    /// Facts worth an info line (the effective Vault addresses and their source).
    pub info: Vec<String>,
    /// Likely mistakes (an environment variable that beat the file, an unknown `KMSGATE_*`).
    pub warnings: Vec<String>,
}

/// Who loads the configuration; the plugin and the controller accept different auth methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `kmsgate plugin` and the commands that share its file.
    Plugin,
    /// `kmsgate controller`, `rotate`, `retire`: may use Kubernetes auth.
    Controller,
}

impl Config {
    /// Loads the file (if any), applies env and `--set` overrides, and validates the result.
    pub fn load(
        file: Option<&Path>,
        flags: &[(String, String)],
        env: &impl Env,
    ) -> Result<Self, ConfigError> {
        Self::load_as(Role::Plugin, file, flags, env)
    }

    /// [`Config::load`] for a role.
    pub fn load_as(
        role: Role,
        file: Option<&Path>,
        flags: &[(String, String)],
        env: &impl Env,
    ) -> Result<Self, ConfigError> {
        let values = source::Values::gather(file, flags, env)?;
        // NB: the backend comes first because the plugin's plaintext bound depends on its
        // ciphertext layout.
        let backend = BackendConfig::read(&values, role)?;
        let plugin = PluginConfig::read(&values, backend.ciphertext_tag())?;
        let backend_kind = match backend {
            BackendConfig::Local { .. } => "local",
            BackendConfig::Vault(_) => "vault",
        };
        let signer = SignerConfig::read(&values, backend_kind)?;
        let mut notices = Notices { info: Vec::new(), warnings: values.warnings.clone() };
        if let BackendConfig::Vault(v) = &backend {
            let origin = values.origin("vault.addresses").unwrap_or("the default");
            notices.info.push(format!("Vault addresses {:?}, from {origin}", v.client.addresses));
        }
        Ok(Self {
            plugin,
            signer,
            http_listen: http_log::listen(&values)?,
            log: LogConfig::read(&values)?,
            backend,
            controller: ControllerConfig::read(&values)?,
            etcd: EtcdConfig::read(&values)?,
            notices,
        })
    }
}

/// This machine's host name (the pod name in a pod).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests;
