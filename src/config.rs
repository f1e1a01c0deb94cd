//! Typed configuration: a TOML file, `KMSGATE_*` environment variables and `--set` flags,
//! merged in that order of precedence (flags > env > file), validated once at start.
//!
//! Every setting has one dotted name (`plugin.socket`); its environment variable is that name in
//! upper case with `_` for `.` and a `KMSGATE_` prefix (`KMSGATE_PLUGIN_SOCKET`). The VAULT_*
//! variables operators expect are mapped explicitly (see [`VAULT_ENV`]) and rank below KMSGATE_*.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{backend::versioned_ciphertext_len, keyring, storage::CIPHERTEXT_MAX_BYTES, transit};

/// Where a pod's service-account token is mounted.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// The config file format this code reads.
pub const FORMAT: i64 = 1;

/// The value type of a setting, for converting env and flag strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// true or false.
    Bool,
    /// A whole number.
    Int,
    /// A comma-separated list of strings.
    List,
    /// Any string (paths, durations like `30s` or `250ms`, octal modes).
    Str,
}

/// Every setting: dotted name, kind, default (as documented), and what it does.
pub const SETTINGS: &[(&str, Kind, &str, &str)] = &[
    (
        "plugin.socket",
        Kind::Str,
        "/run/kmsgate/kms.sock",
        "unix socket path, or @name for an abstract socket",
    ),
    (
        "plugin.socket_mode",
        Kind::Str,
        "0600",
        "octal file mode of the socket; no access for others is allowed",
    ),
    (
        "plugin.socket_group",
        Kind::Str,
        "",
        "group (name or gid) given to the socket, e.g. the API server's group",
    ),
    (
        "plugin.create_socket_dir",
        Kind::Bool,
        "false",
        "create the socket's parent directory (mode 0750) if missing",
    ),
    (
        "plugin.allow_abstract_socket",
        Kind::Bool,
        "false",
        "allow @name sockets, which have no file permissions",
    ),
    ("plugin.status_version", Kind::Str, "v2", "Status version: v2 (1.29+) or v2beta1 (1.27/1.28)"),
    ("plugin.node_name", Kind::Str, "(hostname)", "node name reported on /status"),
    ("plugin.max_plaintext_bytes", Kind::Int, "256", "largest Encrypt plaintext; the API server sends 32"),
    ("plugin.promote_after_polls", Kind::Int, "2", "consecutive polls that must see a new key version"),
    ("plugin.poll_interval", Kind::Str, "30s", "how often key metadata is read"),
    ("plugin.round_trip_interval", Kind::Str, "5m", "how often a full encrypt+decrypt probe runs"),
    (
        "plugin.staleness_window",
        Kind::Str,
        "(2 x round_trip_interval)",
        "healthz fails with no good round trip for this long",
    ),
    ("plugin.unhealthy_after_failures", Kind::Int, "2", "consecutive failed probes that make healthz fail"),
    ("plugin.probe_timeout", Kind::Str, "5s", "deadline of each background probe call"),
    ("plugin.default_deadline", Kind::Str, "3s", "deadline of a gRPC call that carries no grpc-timeout"),
    ("plugin.shutdown_timeout", Kind::Str, "10s", "how long SIGTERM waits for in-flight calls"),
    (
        "plugin.outage_mode",
        Kind::Str,
        "grace",
        "Vault outage behaviour: grace (Status stays ok for outage_grace) or honest",
    ),
    ("plugin.outage_grace", Kind::Str, "5m", "grace mode: how long an outage may keep Status ok"),
    ("plugin.audit_log", Kind::Str, "stderr", "audit log of Encrypt/Decrypt: stderr, off, or a file path"),
    ("http.listen", Kind::Str, "127.0.0.1:8787", "read-only /metrics /livez /readyz /status address, or off"),
    ("log.level", Kind::Str, "info", "log filter (RUST_LOG syntax)"),
    ("log.format", Kind::Str, "text", "log format: text or json"),
    ("backend.kind", Kind::Str, "local", "key store: local (keyring file, not for production) or vault"),
    ("backend.identity", Kind::Str, "", "vault: immutable name of the Vault cluster, part of every key_id"),
    ("local.keyring", Kind::Str, "/var/lib/kmsgate/keyring.json", "local: keyring file"),
    ("local.create", Kind::Bool, "true", "local: create the keyring (mode 0600) if missing"),
    ("vault.addresses", Kind::List, "", "vault: addresses of one Vault/OpenBao cluster, tried in order"),
    ("vault.namespace", Kind::Str, "", "vault: Enterprise namespace"),
    ("vault.mount", Kind::Str, "transit", "vault: Transit mount path"),
    ("vault.key", Kind::Str, "kmsgate", "vault: Transit key name"),
    (
        "vault.auth",
        Kind::Str,
        "token",
        "vault: token, approle, cert or jwt; kubernetes for the controller only",
    ),
    ("vault.auth_mount", Kind::Str, "(the method name)", "vault: mount path of the auth method"),
    ("vault.token_file", Kind::Str, "", "vault auth token: file holding the token; re-read when it changes"),
    ("vault.role_id_file", Kind::Str, "", "vault auth approle: file holding the role_id"),
    (
        "vault.secret_id_file",
        Kind::Str,
        "",
        "vault auth approle: file holding the secret_id; a change logs in again",
    ),
    ("vault.role", Kind::Str, "", "vault auth cert/jwt: role to log in as (cert: optional)"),
    ("vault.jwt_file", Kind::Str, "", "vault auth jwt: file holding the JWT; a change logs in again"),
    (
        "vault.renew_fraction",
        Kind::Str,
        "0.67",
        "vault: renew the token when this fraction of its TTL has passed",
    ),
    (
        "vault.max_concurrent_calls",
        Kind::Int,
        "32",
        "vault: most Transit calls in flight; the rest wait within their deadline",
    ),
    (
        "vault.check_interval",
        Kind::Str,
        "5s",
        "vault: how often credential/TLS files and failed addresses are checked",
    ),
    (
        "vault.ca_cert",
        Kind::Str,
        "",
        "vault: PEM CA bundle file or directory to trust instead of the system roots",
    ),
    (
        "vault.client_cert",
        Kind::Str,
        "",
        "vault: PEM client certificate (cert auth or mutual TLS); reloaded on change",
    ),
    ("vault.client_key", Kind::Str, "", "vault: PEM key of vault.client_cert"),
    ("vault.insecure_allow_http", Kind::Bool, "false", "vault: allow http:// to non-loopback addresses"),
    ("controller.policy", Kind::Str, "kmsgate", "controller: the RotationPolicy it follows"),
    (
        "controller.token_policy",
        Kind::Str,
        "kmsgate",
        "controller: the TokenPolicy it follows (none there: token rotation idles)",
    ),
    (
        "controller.service_account",
        Kind::Str,
        "kmsgate/kmsgate-controller",
        "controller: its own ServiceAccount (namespace/name), never issued a managed token",
    ),
    (
        "controller.lease_namespace",
        Kind::Str,
        "kmsgate",
        "controller: namespace of its leader-election Lease",
    ),
    (
        "controller.lease_name",
        Kind::Str,
        "kmsgate-controller",
        "controller: name of its leader-election Lease",
    ),
    (
        "controller.lease_duration",
        Kind::Str,
        "15s",
        "controller: a leader that stops renewing loses the lease after this",
    ),
    (
        "controller.poll_interval",
        Kind::Str,
        "10s",
        "controller: longest wait between checks while a phase waits",
    ),
    (
        "etcd.endpoints",
        Kind::List,
        "",
        "controller verify.mode Etcd, retire: etcd client URLs (use a read-only etcd user)",
    ),
    ("etcd.ca_cert", Kind::Str, "", "etcd: PEM CA bundle of the etcd server"),
    ("etcd.client_cert", Kind::Str, "", "etcd: PEM client certificate"),
    ("etcd.client_key", Kind::Str, "", "etcd: PEM key of etcd.client_cert"),
    ("etcd.user", Kind::Str, "", "etcd: user whose role can only read the prefix"),
    ("etcd.password_file", Kind::Str, "", "etcd: file holding etcd.user's password"),
];

/// The VAULT_* variables read, and the setting each one fills.
pub const VAULT_ENV: &[(&str, &str)] = &[
    ("VAULT_ADDR", "vault.addresses"),
    ("VAULT_NAMESPACE", "vault.namespace"),
    ("VAULT_CACERT", "vault.ca_cert"),
];

/// Where environment variables come from: the process, or a map in tests.
pub trait Env {
    /// The variable's value, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

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
    /// An env variable or flag names no known setting.
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
    /// The read-only HTTP endpoint; `None` when off.
    pub http_listen: Option<SocketAddr>,
    /// Logging.
    pub log: LogConfig,
    /// The key store.
    pub backend: BackendConfig,
    /// The rotation controller.
    pub controller: ControllerConfig,
    /// etcd access for verification and retire; `None` when not configured.
    pub etcd: Option<crate::etcd::EtcdSettings>,
}

/// Who loads the configuration; the plugin and the controller accept different auth methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `kmsgate plugin` and the commands that share its file.
    Plugin,
    /// `kmsgate controller`, `rotate`, `retire`: may use Kubernetes auth.
    Controller,
}

/// The rotation controller's settings.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// RotationPolicy name.
    pub policy: String,
    /// TokenPolicy name.
    pub token_policy: String,
    /// The controller's own ServiceAccount, `namespace/name`.
    pub service_account: String,
    /// Lease namespace.
    pub lease_namespace: String,
    /// Lease name.
    pub lease_name: String,
    /// Lease duration.
    pub lease_duration: Duration,
    /// Longest wait between checks.
    pub poll_interval: Duration,
}

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

/// The KMS plugin server's settings.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// Socket location.
    pub socket: SocketSpec,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Socket group id.
    pub socket_gid: Option<u32>,
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

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Filter directives.
    pub level: String,
    /// JSON instead of text.
    pub json: bool,
}

/// The key store.
#[derive(Debug, Clone)]
pub enum BackendConfig {
    /// The local keyring (not for production).
    Local {
        /// Keyring file.
        keyring: PathBuf,
        /// Create it if missing.
        create: bool,
    },
    /// Vault/OpenBao Transit.
    Vault(Box<VaultConfig>),
}

/// Vault/OpenBao settings.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// Immutable name of the Vault cluster.
    pub identity: String,
    /// Transit mount.
    pub mount: String,
    /// Transit key.
    pub key: String,
    /// Connection settings.
    pub client: transit::VaultSettings,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    // NB: checked on the file before merging; kept here so deny_unknown_fields accepts it.
    #[serde(rename = "format")]
    _format: Option<i64>,
    #[serde(default)]
    plugin: RawPlugin,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    backend: RawBackend,
    #[serde(default)]
    local: RawLocal,
    #[serde(default)]
    vault: RawVault,
    #[serde(default)]
    controller: RawController,
    #[serde(default)]
    etcd: RawEtcd,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawController {
    policy: Option<String>,
    token_policy: Option<String>,
    service_account: Option<String>,
    lease_namespace: Option<String>,
    lease_name: Option<String>,
    lease_duration: Option<String>,
    poll_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    endpoints: Option<Vec<String>>,
    ca_cert: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
    user: Option<String>,
    password_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    socket: Option<String>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    create_socket_dir: Option<bool>,
    allow_abstract_socket: Option<bool>,
    status_version: Option<String>,
    node_name: Option<String>,
    max_plaintext_bytes: Option<i64>,
    promote_after_polls: Option<i64>,
    poll_interval: Option<String>,
    round_trip_interval: Option<String>,
    staleness_window: Option<String>,
    unhealthy_after_failures: Option<i64>,
    probe_timeout: Option<String>,
    default_deadline: Option<String>,
    shutdown_timeout: Option<String>,
    outage_mode: Option<String>,
    outage_grace: Option<String>,
    audit_log: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    kind: Option<String>,
    identity: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    keyring: Option<String>,
    create: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawVault {
    addresses: Option<Vec<String>>,
    namespace: Option<String>,
    mount: Option<String>,
    key: Option<String>,
    auth: Option<String>,
    auth_mount: Option<String>,
    token_file: Option<String>,
    role_id_file: Option<String>,
    secret_id_file: Option<String>,
    role: Option<String>,
    jwt_file: Option<String>,
    renew_fraction: Option<String>,
    max_concurrent_calls: Option<i64>,
    check_interval: Option<String>,
    ca_cert: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
    insecure_allow_http: Option<bool>,
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
        let mut table = match file {
            Some(path) => read_file(path)?,
            None => toml::Table::new(),
        };
        for (var, name) in VAULT_ENV {
            if let Some(value) = env.var(var) {
                set(&mut table, name, &value, var)?;
            }
        }
        for (name, _, _, _) in SETTINGS {
            let var = env_name(name);
            if let Some(value) = env.var(&var) {
                set(&mut table, name, &value, &var)?;
            }
        }
        for (name, value) in flags {
            set(&mut table, name, value, &format!("flag --set {name}"))?;
        }
        let text = toml::to_string(&table)
            .map_err(|e| ConfigError::Parse { origin: "settings".into(), message: e.to_string() })?;
        let raw: Raw = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { origin: "settings".into(), message: e.message().to_owned() })?;
        validate(raw, role)
    }
}

/// The environment variable of a dotted setting name.
pub fn env_name(setting: &str) -> String {
    format!("KMSGATE_{}", setting.replace('.', "_").to_ascii_uppercase())
}

/// Parses a `KEY=VALUE` flag argument.
pub fn parse_set_flag(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    Ok((key.trim().to_owned(), value.to_owned()))
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::File { path: path.to_owned(), source })?;
    let origin = path.display().to_string();
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| ConfigError::Parse { origin: origin.clone(), message: e.to_string() })?;
    match table.get("format") {
        Some(toml::Value::Integer(FORMAT)) => Ok(table),
        Some(other) => Err(ConfigError::Parse {
            origin,
            message: format!("format = {other} is not supported; this kmsgate reads format = {FORMAT}"),
        }),
        None => {
            Err(ConfigError::Parse { origin, message: format!("missing `format = {FORMAT}` at the top") })
        }
    }
}

fn set(table: &mut toml::Table, name: &str, value: &str, origin: &str) -> Result<(), ConfigError> {
    let kind =
        SETTINGS.iter().find(|(n, ..)| *n == name).map(|(_, kind, ..)| *kind).ok_or_else(|| {
            ConfigError::UnknownSetting { origin: origin.to_owned(), name: name.to_owned() }
        })?;
    let bad = |what: &str| field(name, format!("{origin}: {value:?} is not {what}"));
    let value = match kind {
        Kind::Bool => toml::Value::Boolean(value.parse().map_err(|_| bad("true or false"))?),
        Kind::Int => toml::Value::Integer(value.trim().parse().map_err(|_| bad("a whole number"))?),
        Kind::List => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.into()))
                .collect(),
        ),
        Kind::Str => toml::Value::String(value.to_owned()),
    };
    let (section, key) = name.split_once('.').unwrap_or(("", name));
    let entry = table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(section_table) = entry else {
        return Err(field(section, "must be a table"));
    };
    section_table.insert(key.to_owned(), value);
    Ok(())
}

fn validate(raw: Raw, role: Role) -> Result<Config, ConfigError> {
    let p = raw.plugin;
    let socket = SocketSpec::parse(p.socket.as_deref().unwrap_or("/run/kmsgate/kms.sock"))
        .map_err(|e| field("plugin.socket", e))?;
    let allow_abstract_socket = p.allow_abstract_socket.unwrap_or(false);
    if matches!(socket, SocketSpec::Abstract(_)) && !allow_abstract_socket {
        return Err(field(
            "plugin.socket",
            "abstract sockets (@name) have no file permissions, so any process in the network namespace \
             can call Decrypt; set plugin.allow_abstract_socket = true to accept that",
        ));
    }
    let mode_text = p.socket_mode.as_deref().unwrap_or("0600");
    let socket_mode = u32::from_str_radix(mode_text, 8).ok().filter(|m| *m <= 0o777).ok_or_else(|| {
        field("plugin.socket_mode", format!("{mode_text:?} is not an octal mode like 0600"))
    })?;
    if socket_mode & 0o007 != 0 {
        return Err(field(
            "plugin.socket_mode",
            format!(
                "{socket_mode:04o} gives every local user access to Decrypt; use 0600 or 0660 with socket_group"
            ),
        ));
    }
    let socket_gid = match p.socket_group.as_deref().unwrap_or("") {
        "" => None,
        group => Some(resolve_group(group).map_err(|e| field("plugin.socket_group", e))?),
    };
    let status_version = match p.status_version.as_deref().unwrap_or("v2") {
        "v2" => StatusVersion::V2,
        "v2beta1" => StatusVersion::V2beta1,
        other => return Err(field("plugin.status_version", format!("{other:?} must be v2 or v2beta1"))),
    };
    let round_trip_interval = duration("plugin.round_trip_interval", p.round_trip_interval.as_deref(), "5m")?;
    let staleness_window = match p.staleness_window.as_deref() {
        Some(text) => duration("plugin.staleness_window", Some(text), "")?,
        None => round_trip_interval * 2,
    };
    if staleness_window < round_trip_interval {
        return Err(field("plugin.staleness_window", "must be at least plugin.round_trip_interval"));
    }
    let backend = backend(raw.backend, raw.local, raw.vault, role)?;
    let max_plaintext_bytes = int("plugin.max_plaintext_bytes", p.max_plaintext_bytes, 256, 1)? as usize;
    let tag = match backend {
        BackendConfig::Local { .. } => keyring::CIPHERTEXT_TAG,
        BackendConfig::Vault(_) => transit::CIPHERTEXT_TAG,
    };
    let worst = versioned_ciphertext_len(tag, max_plaintext_bytes);
    if worst > CIPHERTEXT_MAX_BYTES {
        return Err(field(
            "plugin.max_plaintext_bytes",
            format!(
                "{max_plaintext_bytes} bytes could encrypt to {worst} bytes; the API server accepts at most \
                 {CIPHERTEXT_MAX_BYTES}"
            ),
        ));
    }
    let outage_grace = match p.outage_mode.as_deref().unwrap_or("grace") {
        "grace" => Some(duration("plugin.outage_grace", p.outage_grace.as_deref(), "5m")?),
        "honest" => None,
        other => return Err(field("plugin.outage_mode", format!("{other:?} must be grace or honest"))),
    };
    let audit_log = match p.audit_log.as_deref().unwrap_or("stderr") {
        "stderr" => AuditSink::Stderr,
        "off" => AuditSink::Off,
        "" => return Err(field("plugin.audit_log", "must be stderr, off, or a file path")),
        path => AuditSink::File(PathBuf::from(path)),
    };
    let plugin = PluginConfig {
        socket,
        socket_mode,
        socket_gid,
        create_socket_dir: p.create_socket_dir.unwrap_or(false),
        allow_abstract_socket,
        status_version,
        node_name: p.node_name.filter(|n| !n.is_empty()).unwrap_or_else(hostname),
        max_plaintext_bytes,
        promote_after_polls: int("plugin.promote_after_polls", p.promote_after_polls, 2, 1)? as u32,
        poll_interval: duration("plugin.poll_interval", p.poll_interval.as_deref(), "30s")?,
        round_trip_interval,
        staleness_window,
        unhealthy_after_failures: int("plugin.unhealthy_after_failures", p.unhealthy_after_failures, 2, 1)?
            as u32,
        probe_timeout: duration("plugin.probe_timeout", p.probe_timeout.as_deref(), "5s")?,
        default_deadline: duration("plugin.default_deadline", p.default_deadline.as_deref(), "3s")?,
        shutdown_timeout: duration("plugin.shutdown_timeout", p.shutdown_timeout.as_deref(), "10s")?,
        outage_grace,
        audit_log,
    };
    let http_listen = match raw.http.listen.as_deref().unwrap_or("127.0.0.1:8787") {
        "off" | "" => None,
        addr => Some(
            addr.parse().map_err(|_| field("http.listen", format!("{addr:?} is not HOST:PORT or off")))?,
        ),
    };
    let json = match raw.log.format.as_deref().unwrap_or("text") {
        "text" => false,
        "json" => true,
        other => return Err(field("log.format", format!("{other:?} must be text or json"))),
    };
    let log = LogConfig { level: raw.log.level.unwrap_or_else(|| "info".into()), json };
    let c = raw.controller;
    let name = |field: &str, value: Option<String>, default: &str| -> Result<String, ConfigError> {
        let value = value.unwrap_or_else(|| default.to_owned());
        name_chars(field, &value, 253, |b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
        })?;
        Ok(value)
    };
    let controller = ControllerConfig {
        policy: name("controller.policy", c.policy, "kmsgate")?,
        token_policy: name("controller.token_policy", c.token_policy, "kmsgate")?,
        service_account: {
            let value = c.service_account.unwrap_or_else(|| "kmsgate/kmsgate-controller".into());
            match value.split_once('/') {
                Some((ns, sa)) => {
                    name("controller.service_account", Some(ns.to_owned()), "")?;
                    name("controller.service_account", Some(sa.to_owned()), "")?;
                }
                None => return Err(field("controller.service_account", "must be namespace/name")),
            }
            value
        },
        lease_namespace: name("controller.lease_namespace", c.lease_namespace, "kmsgate")?,
        lease_name: name("controller.lease_name", c.lease_name, "kmsgate-controller")?,
        lease_duration: duration("controller.lease_duration", c.lease_duration.as_deref(), "15s")?,
        poll_interval: duration("controller.poll_interval", c.poll_interval.as_deref(), "10s")?,
    };
    if controller.lease_duration < Duration::from_secs(3) {
        return Err(field("controller.lease_duration", "must be at least 3s"));
    }
    let e = raw.etcd;
    let path = |value: Option<String>| value.filter(|p| !p.is_empty()).map(PathBuf::from);
    let endpoints = e.endpoints.unwrap_or_default().into_iter().filter(|e| !e.is_empty()).collect::<Vec<_>>();
    let etcd = if endpoints.is_empty() {
        None
    } else {
        let etcd = crate::etcd::EtcdSettings {
            endpoints,
            ca: path(e.ca_cert),
            cert: path(e.client_cert),
            key: path(e.client_key),
            user: e.user.filter(|u| !u.is_empty()),
            password_file: path(e.password_file),
        };
        if etcd.cert.is_some() != etcd.key.is_some() {
            return Err(field(
                "etcd.client_cert",
                "etcd.client_cert and etcd.client_key must be set together",
            ));
        }
        if etcd.user.is_some() != etcd.password_file.is_some() {
            return Err(field("etcd.user", "etcd.user and etcd.password_file must be set together"));
        }
        Some(etcd)
    };
    Ok(Config { plugin, http_listen, log, backend, controller, etcd })
}

fn backend(b: RawBackend, local: RawLocal, v: RawVault, role: Role) -> Result<BackendConfig, ConfigError> {
    match b.kind.as_deref().unwrap_or("local") {
        "local" => {
            if b.identity.as_deref().is_some_and(|i| !i.is_empty()) {
                return Err(field(
                    "backend.identity",
                    "the local keyring names itself; set it with `kmsgate keyring init --identity`",
                ));
            }
            Ok(BackendConfig::Local {
                keyring: PathBuf::from(
                    local.keyring.unwrap_or_else(|| "/var/lib/kmsgate/keyring.json".into()),
                ),
                create: local.create.unwrap_or(true),
            })
        }
        "vault" => {
            let identity = b.identity.unwrap_or_default();
            if identity.is_empty() {
                return Err(field(
                    "backend.identity",
                    "required for vault: a fixed name for this Vault cluster (it is part of every key_id)",
                ));
            }
            name_chars("backend.identity", &identity, 63, |b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
            })?;
            let mount = v.mount.unwrap_or_else(|| "transit".into());
            name_chars("vault.mount", &mount, 128, |b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))?;
            if mount.starts_with('/') || mount.ends_with('/') || mount.contains("//") {
                return Err(field("vault.mount", "must not start or end with '/' or contain '//'"));
            }
            let key = v.key.unwrap_or_else(|| "kmsgate".into());
            name_chars("vault.key", &key, 128, |b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))?;
            let namespace = v.namespace.unwrap_or_default();
            if namespace.len() > 128 || namespace.chars().any(char::is_control) {
                return Err(field("vault.namespace", "must be at most 128 printable characters"));
            }
            let addresses = v.addresses.unwrap_or_default();
            if addresses.is_empty() {
                return Err(field("vault.addresses", "at least one address is required (or set VAULT_ADDR)"));
            }
            let insecure = v.insecure_allow_http.unwrap_or(false);
            for address in &addresses {
                check_address(address, insecure).map_err(|e| field("vault.addresses", e))?;
            }
            let path = |value: Option<String>| value.filter(|p| !p.is_empty()).map(PathBuf::from);
            let tls = transit::TlsSettings {
                ca: path(v.ca_cert),
                client_cert: path(v.client_cert),
                client_key: path(v.client_key),
            };
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                return Err(field(
                    "vault.client_cert",
                    "vault.client_cert and vault.client_key must be set together",
                ));
            }
            let renew_text = v.renew_fraction.unwrap_or_else(|| "0.67".into());
            let renew_fraction: f64 =
                renew_text.parse().ok().filter(|f: &f64| *f >= 0.1 && *f <= 0.9).ok_or_else(|| {
                    field("vault.renew_fraction", format!("{renew_text:?} must be a number from 0.1 to 0.9"))
                })?;
            let auth = auth_method(
                v.auth.as_deref().unwrap_or("token"),
                v.auth_mount.filter(|m| !m.is_empty()),
                path(v.token_file),
                (path(v.role_id_file), path(v.secret_id_file)),
                (v.role.unwrap_or_default(), path(v.jwt_file)),
                tls.client_cert.is_some(),
                role,
            )?;
            Ok(BackendConfig::Vault(Box::new(VaultConfig {
                identity,
                mount,
                key,
                client: transit::VaultSettings {
                    addresses,
                    namespace,
                    tls,
                    auth,
                    renew_fraction,
                    max_concurrent_calls: int("vault.max_concurrent_calls", v.max_concurrent_calls, 32, 1)?
                        as usize,
                    check_interval: duration("vault.check_interval", v.check_interval.as_deref(), "5s")?,
                },
            })))
        }
        other => Err(field("backend.kind", format!("{other:?} must be local or vault"))),
    }
}

fn auth_method(
    method: &str,
    mount: Option<String>,
    token_file: Option<PathBuf>,
    approle: (Option<PathBuf>, Option<PathBuf>),
    (role, jwt_file): (String, Option<PathBuf>),
    has_client_cert: bool,
    who: Role,
) -> Result<transit::AuthMethod, ConfigError> {
    let mount = |default: &str| mount.clone().unwrap_or_else(|| default.to_owned());
    let required = |value: Option<PathBuf>, name: &str| {
        value.ok_or_else(|| field(name, format!("required for vault.auth = {method:?}")))
    };
    match method {
        "token" => Ok(transit::AuthMethod::Token { file: required(token_file, "vault.token_file")? }),
        "approle" => Ok(transit::AuthMethod::AppRole {
            mount: mount("approle"),
            role_id_file: required(approle.0, "vault.role_id_file")?,
            secret_id_file: required(approle.1, "vault.secret_id_file")?,
        }),
        "cert" if !has_client_cert => Err(field("vault.client_cert", "required for vault.auth = \"cert\"")),
        "cert" => Ok(transit::AuthMethod::Cert { mount: mount("cert"), role }),
        "jwt" if role.is_empty() => Err(field("vault.role", "required for vault.auth = \"jwt\"")),
        "jwt" => Ok(transit::AuthMethod::Jwt {
            mount: mount("jwt"),
            role,
            jwt_file: required(jwt_file, "vault.jwt_file")?,
        }),
        "kubernetes" if who == Role::Controller && role.is_empty() => {
            Err(field("vault.role", "required for vault.auth = \"kubernetes\""))
        }
        "kubernetes" if who == Role::Controller => Ok(transit::AuthMethod::Kubernetes {
            mount: mount("kubernetes"),
            role,
            jwt_file: jwt_file.unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT_TOKEN)),
        }),
        "kubernetes" => Err(field(
            "vault.auth",
            "the plugin cannot use kubernetes auth: a static pod has no service-account token, and Vault's \
             TokenReview needs the API server this plugin serves; use approle, cert, jwt or token",
        )),
        other => Err(field("vault.auth", format!("{other:?} must be token, approle, cert or jwt"))),
    }
}

fn check_address(address: &str, insecure: bool) -> Result<(), String> {
    let url = reqwest::Url::parse(address).map_err(|e| format!("{address:?} is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
        return Err(format!("{address:?} must not carry credentials or a query"));
    }
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if loopback || insecure {
                Ok(())
            } else {
                Err(format!(
                    "{address:?} uses http:// to a non-loopback host, which sends the token in clear; use https:// \
                     or set vault.insecure_allow_http = true"
                ))
            }
        }
        other => Err(format!("{address:?} has scheme {other:?}; use https://")),
    }
}

fn name_chars(name: &str, value: &str, max: usize, ok: impl Fn(u8) -> bool) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > max || !value.bytes().all(ok) {
        return Err(field(
            name,
            format!("{value:?} must be 1-{max} characters of the allowed set (see README)"),
        ));
    }
    Ok(())
}

fn duration(name: &str, value: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let text = value.unwrap_or(default);
    let parsed = humantime::parse_duration(text)
        .map_err(|e| field(name, format!("{text:?} is not a duration like 30s or 250ms: {e}")))?;
    if parsed.is_zero() {
        return Err(field(name, "must be greater than zero"));
    }
    Ok(parsed)
}

fn int(name: &str, value: Option<i64>, default: i64, min: i64) -> Result<i64, ConfigError> {
    let value = value.unwrap_or(default);
    if value < min || value > i64::from(u32::MAX) {
        return Err(field(name, format!("{value} must be between {min} and {}", u32::MAX)));
    }
    Ok(value)
}

fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group").map_err(|e| format!("cannot read /etc/group: {e}"))?;
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split(':');
            Some((parts.next()?, parts.nth(1)?))
        })
        .find(|(name, _)| *name == group)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| format!("group {group:?} not found in /etc/group"))
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
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn flags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn load(file: &str, f: &[(&str, &str)], e: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsgate.toml");
        std::fs::write(&path, file).unwrap();
        Config::load(Some(&path), &flags(f), &env(e))
    }

    #[test]
    fn the_controller_may_use_kubernetes_auth_and_reads_etcd_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, VAULT).unwrap();
        let set = flags(&[
            ("vault.auth", "kubernetes"),
            ("vault.role", "kmsgate-controller"),
            ("etcd.endpoints", "https://10.0.0.1:2379,https://10.0.0.2:2379"),
            ("etcd.user", "kmsgate-verify"),
            ("etcd.password_file", "/etc/kmsgate/etcd-password"),
            ("controller.policy", "prod"),
        ]);
        let config = Config::load_as(Role::Controller, Some(&path), &set, &env(&[])).unwrap();
        let BackendConfig::Vault(v) = &config.backend else { panic!("vault backend") };
        let transit::AuthMethod::Kubernetes { role, jwt_file, mount } = &v.client.auth else {
            panic!("kubernetes auth")
        };
        assert_eq!((role.as_str(), mount.as_str()), ("kmsgate-controller", "kubernetes"));
        assert_eq!(jwt_file, Path::new(SERVICE_ACCOUNT_TOKEN));
        assert_eq!(config.etcd.as_ref().unwrap().endpoints.len(), 2);
        assert_eq!(config.controller.policy, "prod");
        assert_eq!(config.controller.lease_duration, Duration::from_secs(15));
        assert_eq!(config.controller.token_policy, "kmsgate");
        assert_eq!(config.controller.service_account, "kmsgate/kmsgate-controller");
        let own = env(&[("KMSGATE_CONTROLLER_SERVICE_ACCOUNT", "platform/kmsgate")]);
        let config = Config::load_as(Role::Controller, Some(&path), &set, &own).unwrap();
        assert_eq!(config.controller.service_account, "platform/kmsgate");
        let bad = env(&[("KMSGATE_CONTROLLER_SERVICE_ACCOUNT", "kmsgate")]);
        let refused = Config::load_as(Role::Controller, Some(&path), &set, &bad).unwrap_err();
        assert!(refused.to_string().contains("controller.service_account"), "{refused}");
        // The same settings are refused for the plugin.
        let refused = Config::load_as(Role::Plugin, Some(&path), &set, &env(&[])).unwrap_err();
        assert!(refused.to_string().contains("static pod"), "{refused}");
        let no_role = flags(&[("vault.auth", "kubernetes")]);
        let refused = Config::load_as(Role::Controller, Some(&path), &no_role, &env(&[])).unwrap_err();
        assert!(refused.to_string().contains("vault.role"), "{refused}");
        let half = flags(&[("etcd.endpoints", "https://e:2379"), ("etcd.user", "u")]);
        let refused = Config::load_as(Role::Controller, Some(&path), &half, &env(&[])).unwrap_err();
        assert!(refused.to_string().contains("etcd.user"), "{refused}");
    }

    const VAULT: &str = r#"
format = 1
[backend]
kind = "vault"
identity = "prod-vault"
[vault]
addresses = ["https://vault.example:8200"]
token_file = "/etc/kmsgate/token"
"#;

    #[test]
    fn defaults_are_the_embedded_local_backend() {
        let c = Config::load(None, &[], &env(&[])).unwrap();
        assert!(matches!(c.backend, BackendConfig::Local { create: true, .. }));
        assert_eq!(c.plugin.socket, SocketSpec::Path("/run/kmsgate/kms.sock".into()));
        assert_eq!(c.plugin.socket_mode, 0o600);
        assert_eq!(c.plugin.status_version, StatusVersion::V2);
        assert_eq!(c.plugin.staleness_window, Duration::from_secs(600));
        assert_eq!(c.http_listen, Some("127.0.0.1:8787".parse().unwrap()));
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let file = "format = 1\n[plugin]\nsocket = \"/file.sock\"\npoll_interval = \"1s\"\nmax_plaintext_bytes = 100\n";
        let c = load(file, &[], &[]).unwrap();
        assert_eq!(c.plugin.socket, SocketSpec::Path("/file.sock".into()));
        let c = load(
            file,
            &[],
            &[("KMSGATE_PLUGIN_SOCKET", "/env.sock"), ("KMSGATE_PLUGIN_MAX_PLAINTEXT_BYTES", "64")],
        )
        .unwrap();
        assert_eq!(c.plugin.socket, SocketSpec::Path("/env.sock".into()));
        assert_eq!(c.plugin.max_plaintext_bytes, 64);
        assert_eq!(c.plugin.poll_interval, Duration::from_secs(1));
        let c = load(file, &[("plugin.socket", "/flag.sock")], &[("KMSGATE_PLUGIN_SOCKET", "/env.sock")])
            .unwrap();
        assert_eq!(c.plugin.socket, SocketSpec::Path("/flag.sock".into()));
    }

    #[test]
    fn vault_env_is_mapped_explicitly_and_ranks_below_kmsgate_env() {
        let c = load(VAULT, &[], &[("VAULT_ADDR", "https://a:8200"), ("VAULT_NAMESPACE", "team")]).unwrap();
        let BackendConfig::Vault(v) = c.backend else { panic!("vault expected") };
        assert_eq!(v.client.addresses, vec!["https://a:8200"]);
        assert_eq!(v.client.namespace, "team");
        let c = load(
            VAULT,
            &[],
            &[("VAULT_ADDR", "https://a:8200"), ("KMSGATE_VAULT_ADDRESSES", "https://b, https://c")],
        )
        .unwrap();
        let BackendConfig::Vault(v) = c.backend else { panic!("vault expected") };
        assert_eq!(v.client.addresses, vec!["https://b", "https://c"]);
    }

    #[test]
    fn sub_second_intervals() {
        let c = load(
            "format = 1\n[plugin]\npoll_interval = \"50ms\"\nround_trip_interval = \"200ms\"\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(c.plugin.poll_interval, Duration::from_millis(50));
        assert_eq!(c.plugin.staleness_window, Duration::from_millis(400));
    }

    #[test]
    fn errors_name_the_field() {
        type Pairs<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(&str, Pairs<'_>, Pairs<'_>, &str)] = &[
            ("format = 2\n", &[], &[], "format = 2 is not supported"),
            ("[plugin]\n", &[], &[], "missing `format = 1`"),
            ("format = 1\n[plugin]\nsokcet = \"/x\"\n", &[], &[], "sokcet"),
            ("format = 1\n", &[("plugin.sokcet", "/x")], &[], "unknown setting \"plugin.sokcet\""),
            ("format = 1\n", &[("plugin.socket", "relative.sock")], &[], "plugin.socket"),
            ("format = 1\n", &[("plugin.socket", "@kms")], &[], "allow_abstract_socket"),
            ("format = 1\n", &[("plugin.socket_mode", "0666")], &[], "plugin.socket_mode"),
            ("format = 1\n", &[("plugin.socket_mode", "rw")], &[], "plugin.socket_mode"),
            ("format = 1\n", &[("plugin.status_version", "v1")], &[], "plugin.status_version"),
            ("format = 1\n", &[("plugin.outage_mode", "lenient")], &[], "plugin.outage_mode"),
            ("format = 1\n", &[("plugin.poll_interval", "soon")], &[], "plugin.poll_interval"),
            ("format = 1\n", &[("plugin.poll_interval", "0s")], &[], "greater than zero"),
            (
                "format = 1\n",
                &[],
                &[("KMSGATE_PLUGIN_PROMOTE_AFTER_POLLS", "x")],
                "KMSGATE_PLUGIN_PROMOTE_AFTER_POLLS",
            ),
            ("format = 1\n", &[("plugin.promote_after_polls", "0")], &[], "plugin.promote_after_polls"),
            ("format = 1\n", &[("plugin.max_plaintext_bytes", "800")], &[], "at most 1024"),
            ("format = 1\n", &[("backend.kind", "aws")], &[], "backend.kind"),
            ("format = 1\n", &[("backend.kind", "vault")], &[], "backend.identity"),
            ("format = 1\n", &[("http.listen", "everywhere")], &[], "http.listen"),
            (VAULT, &[("vault.addresses", "http://10.0.0.1:8200")], &[], "insecure_allow_http"),
            (VAULT, &[("vault.addresses", "ftp://x")], &[], "vault.addresses"),
            (VAULT, &[("vault.addresses", "")], &[], "at least one address"),
            (VAULT, &[("vault.token_file", "")], &[], "vault.token_file"),
            (VAULT, &[("vault.auth", "kubernetes")], &[], "static pod has no service-account token"),
            (VAULT, &[("vault.auth", "approle")], &[], "vault.role_id_file"),
            (VAULT, &[("vault.auth", "cert")], &[], "vault.client_cert"),
            (VAULT, &[("vault.auth", "jwt")], &[], "vault.role"),
            (VAULT, &[("vault.auth", "ldap")], &[], "vault.auth"),
            (VAULT, &[("vault.client_key", "/k.pem")], &[], "set together"),
            (VAULT, &[("vault.renew_fraction", "1.5")], &[], "vault.renew_fraction"),
            (VAULT, &[("vault.max_concurrent_calls", "0")], &[], "vault.max_concurrent_calls"),
            (VAULT, &[("backend.identity", "Prod Vault")], &[], "backend.identity"),
            (VAULT, &[("vault.mount", "/transit")], &[], "vault.mount"),
            (VAULT, &[("vault.key", "a/b")], &[], "vault.key"),
        ];
        for (file, f, e, want) in cases {
            let err = load(file, f, e)
                .err()
                .unwrap_or_else(|| panic!("{file:?} {f:?} {e:?} should fail"))
                .to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn loopback_http_is_fine_and_the_max_plaintext_bound_is_tight() {
        assert!(
            load(VAULT, &[("vault.addresses", "http://127.0.0.1:8200,http://localhost:8200")], &[]).is_ok()
        );
        assert!(
            load(
                VAULT,
                &[("vault.addresses", "http://10.0.0.1:8200"), ("vault.insecure_allow_http", "true")],
                &[]
            )
            .is_ok()
        );
        let largest = (1..1024).rev().find(|n| versioned_ciphertext_len("vault", *n) <= 1024).unwrap();
        assert!(load(VAULT, &[("plugin.max_plaintext_bytes", &largest.to_string())], &[]).is_ok());
        assert!(load(VAULT, &[("plugin.max_plaintext_bytes", &(largest + 1).to_string())], &[]).is_err());
    }

    #[test]
    fn every_setting_has_an_env_name_and_reaches_the_schema() {
        for (name, kind, _, _) in SETTINGS {
            let value = match kind {
                Kind::Bool => "false",
                Kind::Int => "2",
                Kind::List => "https://a",
                Kind::Str => "x",
            };
            let var = env_name(name);
            let err = Config::load(None, &[], &env(&[(var.as_str(), value)])).err().map(|e| e.to_string());
            // Values may be invalid for the field, but the key itself must be known to the schema.
            if let Some(err) = err {
                assert!(!err.contains("unknown field") && !err.contains("unknown setting"), "{name}: {err}");
            }
        }
    }

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
