//! The settings table: every setting's name, kind, default and doc. Validation takes its defaults
//! from here and the README's configuration reference is rendered from here, so the two agree.

/// The value type of a setting, for converting env, flag and file values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// true or false.
    Bool,
    /// A whole number.
    Int,
    /// A comma-separated list of strings (a TOML array in the file).
    List,
    /// Any string (paths, durations like `30s` or `250ms`, octal modes).
    Str,
}

impl Kind {
    /// What a value of this kind is, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Bool => "true or false",
            Self::Int => "a whole number",
            Self::List => "a list of strings",
            Self::Str => "a string",
        }
    }
}

/// What a setting is when nobody sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Computed from other settings or the machine; the text says how, as documented.
    Derived(&'static str),
    /// Nothing: the setting is empty or off.
    Unset,
    /// This value, written as an environment variable would give it.
    Value(&'static str),
}

/// One setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Dotted name, `section.key`.
    pub name: &'static str,
    /// How env, flag and file values convert.
    pub kind: Kind,
    /// The value when nobody sets it.
    pub default: Fallback,
    /// What it does, one line.
    pub doc: &'static str,
}

impl Setting {
    /// The entry named `name`.
    pub fn find(name: &str) -> Option<&'static Setting> {
        SETTINGS.iter().find(|s| s.name == name)
    }
}

const fn setting(name: &'static str, kind: Kind, default: Fallback, doc: &'static str) -> Setting {
    Setting { name, kind, default, doc }
}

use Fallback::{Derived, Unset, Value};
use Kind::{Bool, Int, List, Str};

/// Every setting, in the order the reference documents them.
pub const SETTINGS: &[Setting] = &[
    setting(
        "plugin.socket",
        Str,
        Value("/run/kmsgate/kms.sock"),
        "unix socket path, or @name for an abstract socket",
    ),
    setting(
        "plugin.socket_mode",
        Str,
        Value("0600"),
        "octal file mode of the socket; no access for others; group access needs socket_group",
    ),
    setting(
        "plugin.socket_group",
        Str,
        Unset,
        "group (name or gid) given to the socket, e.g. the API server's group",
    ),
    setting(
        "plugin.socket_dir_check",
        Str,
        Value("refuse"),
        "socket directory writable by others: refuse to start, or warn (a pod volume shared with the API server)",
    ),
    setting(
        "plugin.create_socket_dir",
        Bool,
        Value("false"),
        "create the socket's parent directory (mode 0750) if missing",
    ),
    setting(
        "plugin.allow_abstract_socket",
        Bool,
        Value("false"),
        "allow @name sockets, which have no file permissions",
    ),
    setting("plugin.status_version", Str, Value("v2"), "Status version: v2 (1.29+) or v2beta1 (1.27/1.28)"),
    setting("plugin.node_name", Str, Derived("(hostname)"), "node name reported on /status"),
    setting(
        "plugin.max_plaintext_bytes",
        Int,
        Value("256"),
        "largest Encrypt plaintext; the API server sends 32",
    ),
    setting(
        "plugin.promote_after_polls",
        Int,
        Value("2"),
        "consecutive polls that must see a new key version",
    ),
    setting("plugin.poll_interval", Str, Value("30s"), "how often key metadata is read"),
    setting("plugin.round_trip_interval", Str, Value("5m"), "how often a full encrypt+decrypt probe runs"),
    setting(
        "plugin.staleness_window",
        Str,
        Derived("(2 x round_trip_interval)"),
        "healthz fails with no good round trip for this long",
    ),
    setting(
        "plugin.unhealthy_after_failures",
        Int,
        Value("2"),
        "consecutive failed probes that make healthz fail",
    ),
    setting("plugin.probe_timeout", Str, Value("5s"), "deadline of each background probe call"),
    setting(
        "plugin.default_deadline",
        Str,
        Value("3s"),
        "deadline of a gRPC call that carries no grpc-timeout",
    ),
    setting("plugin.shutdown_timeout", Str, Value("10s"), "how long SIGTERM waits for in-flight calls"),
    setting(
        "plugin.outage_mode",
        Str,
        Value("grace"),
        "Vault outage behaviour: grace (Status stays ok for outage_grace) or honest",
    ),
    setting("plugin.outage_grace", Str, Value("5m"), "grace mode: how long an outage may keep Status ok"),
    setting(
        "plugin.audit_log",
        Str,
        Value("stderr"),
        "audit log of Encrypt/Decrypt: stderr, off, or a file path",
    ),
    setting(
        "signer.backend",
        Str,
        Derived("(backend.kind)"),
        "signer key store: local (keyring file, not for production) or vault (the vault.* client)",
    ),
    setting("signer.key", Str, Value("kmsgate-signer"), "signer, vault: Transit key that signs tokens"),
    setting(
        "signer.key_type",
        Str,
        Value("ecdsa-p256"),
        "signer, vault: the key's Transit type: ecdsa-p256/p384/p521 or rsa-2048/3072/4096",
    ),
    setting(
        "signer.keyring",
        Str,
        Value("/var/lib/kmsgate/signer-keyring.json"),
        "signer, local: ES256 keyring file",
    ),
    setting(
        "signer.socket",
        Str,
        Value("/run/kmsgate/signer.sock"),
        "signer unix socket path (--service-account-signing-endpoint), or @name",
    ),
    setting("signer.socket_mode", Str, Value("0600"), "octal file mode of the signer socket"),
    setting("signer.socket_group", Str, Unset, "group (name or gid) given to the signer socket"),
    setting(
        "signer.socket_dir_check",
        Str,
        Value("refuse"),
        "signer socket directory writable by others: refuse or warn",
    ),
    setting(
        "signer.create_socket_dir",
        Bool,
        Value("false"),
        "create the signer socket's parent directory (mode 0750) if missing",
    ),
    setting(
        "signer.allow_abstract_socket",
        Bool,
        Value("false"),
        "has no effect: the signer refuses @name sockets (no file permissions; Sign mints any token)",
    ),
    setting(
        "signer.http_listen",
        Str,
        Value("127.0.0.1:8789"),
        "signer's read-only /metrics /livez /readyz /status address, or off (the plugin holds 8787)",
    ),
    setting("signer.poll_interval", Str, Value("30s"), "how often the signer reads its key's versions"),
    setting(
        "signer.refresh_hint_seconds",
        Int,
        Value("60"),
        "FetchKeys refresh_hint_seconds: how often kube-apiserver re-reads the keys",
    ),
    setting(
        "signer.publish_lead",
        Str,
        Derived("(2 x poll_interval + refresh_hint_seconds + 1m)"),
        "a new key version signs only once it is this old, so every replica and API server has it; at least poll_interval + refresh_hint_seconds",
    ),
    setting(
        "signer.max_token_expiration",
        Str,
        Value("24h"),
        "Metadata max_token_expiration_seconds: the longest token the API server issues (at least 10m)",
    ),
    setting("signer.backend_timeout", Str, Value("5s"), "deadline of each key store call (key read, sign)"),
    setting(
        "signer.verify_keys",
        List,
        Unset,
        "public key files served for verification only; prefix excluded: to leave one out of OIDC discovery",
    ),
    setting(
        "signer.state_file",
        Str,
        Value("/var/lib/kmsgate/signer-keys.json"),
        "the last good key set (mode 0600), served at start while the key store is down",
    ),
    setting("signer.audit_log", Str, Value("stderr"), "audit log of Sign: stderr, off, or a file path"),
    setting(
        "http.listen",
        Str,
        Value("127.0.0.1:8787"),
        "read-only /metrics /livez /readyz /status address, or off",
    ),
    setting("log.level", Str, Value("info"), "log filter (RUST_LOG syntax)"),
    setting("log.format", Str, Value("text"), "log format: text or json"),
    setting(
        "backend.kind",
        Str,
        Value("local"),
        "key store: local (keyring file, not for production) or vault",
    ),
    setting(
        "backend.identity",
        Str,
        Unset,
        "vault: immutable name of the Vault cluster, part of every key_id",
    ),
    setting("local.keyring", Str, Value("/var/lib/kmsgate/keyring.json"), "local: keyring file"),
    setting("local.create", Bool, Value("true"), "local: create the keyring (mode 0600) if missing"),
    setting("vault.addresses", List, Unset, "vault: addresses of one Vault/OpenBao cluster, tried in order"),
    setting("vault.namespace", Str, Unset, "vault: Enterprise namespace"),
    setting("vault.mount", Str, Value("transit"), "vault: Transit mount path"),
    setting("vault.key", Str, Value("kmsgate"), "vault: Transit key name"),
    setting(
        "vault.auth",
        Str,
        Value("token"),
        "vault: token, approle, cert or jwt; kubernetes for the controller only",
    ),
    setting("vault.auth_mount", Str, Derived("(the method name)"), "vault: mount path of the auth method"),
    setting(
        "vault.token_file",
        Str,
        Unset,
        "vault auth token: file holding the token; re-read when it changes",
    ),
    setting("vault.role_id_file", Str, Unset, "vault auth approle: file holding the role_id"),
    setting(
        "vault.secret_id_file",
        Str,
        Unset,
        "vault auth approle: file holding the secret_id; a change logs in again",
    ),
    setting("vault.role", Str, Unset, "vault auth cert/jwt: role to log in as (cert: optional)"),
    setting("vault.jwt_file", Str, Unset, "vault auth jwt: file holding the JWT; a change logs in again"),
    setting(
        "vault.renew_fraction",
        Str,
        Value("0.67"),
        "vault: renew the token when this fraction of its TTL has passed",
    ),
    setting(
        "vault.max_concurrent_calls",
        Int,
        Value("32"),
        "vault: most Transit calls in flight; the rest wait within their deadline",
    ),
    setting(
        "vault.check_interval",
        Str,
        Value("5s"),
        "vault: how often credential/TLS files and failed addresses are checked",
    ),
    setting(
        "vault.ca_cert",
        Str,
        Unset,
        "vault: PEM CA bundle file or directory to trust instead of the system roots",
    ),
    setting(
        "vault.client_cert",
        Str,
        Unset,
        "vault: PEM client certificate (cert auth or mutual TLS); reloaded on change",
    ),
    setting("vault.client_key", Str, Unset, "vault: PEM key of vault.client_cert"),
    setting(
        "vault.insecure_allow_http",
        Bool,
        Value("false"),
        "vault: allow http:// to non-loopback addresses",
    ),
    setting("controller.policy", Str, Value("kmsgate"), "controller: the RotationPolicy it follows"),
    setting(
        "controller.token_policy",
        Str,
        Value("kmsgate"),
        "controller: the TokenPolicy it follows (none there: token rotation idles)",
    ),
    setting(
        "controller.signing_policy",
        Str,
        Unset,
        "controller: the SigningKeyPolicy it follows; empty: no signing-key rotation",
    ),
    setting(
        "controller.service_account",
        Str,
        Value("kmsgate/kmsgate-controller"),
        "controller: its own ServiceAccount (namespace/name), never issued a managed token",
    ),
    setting(
        "controller.lease_namespace",
        Str,
        Value("kmsgate"),
        "controller: namespace of its leader-election Lease",
    ),
    setting(
        "controller.lease_name",
        Str,
        Value("kmsgate-controller"),
        "controller: name of its leader-election Lease",
    ),
    setting(
        "controller.lease_duration",
        Str,
        Value("15s"),
        "controller: a leader that stops renewing loses the lease after this",
    ),
    setting(
        "controller.poll_interval",
        Str,
        Value("10s"),
        "controller: longest wait between checks while a phase waits",
    ),
    setting(
        "etcd.endpoints",
        List,
        Unset,
        "controller verify.mode Etcd, retire: etcd client URLs (use a read-only etcd user)",
    ),
    setting("etcd.ca_cert", Str, Unset, "etcd: PEM CA bundle of the etcd server"),
    setting("etcd.client_cert", Str, Unset, "etcd: PEM client certificate"),
    setting("etcd.client_key", Str, Unset, "etcd: PEM key of etcd.client_cert"),
    setting("etcd.user", Str, Unset, "etcd: user whose role can only read the prefix"),
    setting("etcd.password_file", Str, Unset, "etcd: file holding etcd.user's password"),
];

/// The VAULT_* variables read, and the setting each one fills.
pub const VAULT_ENV: &[(&str, &str)] = &[
    ("VAULT_ADDR", "vault.addresses"),
    ("VAULT_NAMESPACE", "vault.namespace"),
    ("VAULT_CACERT", "vault.ca_cert"),
];

/// `KMSGATE_*` variables that are not settings: `--config`'s, and those of the build and scripts.
pub const OTHER_ENV: &[&str] = &[
    "KMSGATE_CONFIG",
    "KMSGATE_GIT_COMMIT",
    "KMSGATE_TEST_BAO",
    "KMSGATE_TOOLS_DIR",
    "KMSGATE_UPDATE_DEPLOY",
    "KMSGATE_UPDATE_README",
];

/// The environment variable of a dotted setting name.
pub fn env_name(setting: &str) -> String {
    format!("KMSGATE_{}", setting.replace('.', "_").to_ascii_uppercase())
}

/// The README's configuration reference: a Markdown table of every setting, one row each.
pub fn reference() -> String {
    let mut table = String::from("| setting | env | default | what it does |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let default = match s.default {
            Derived(how) => how.to_owned(),
            Unset => "—".to_owned(),
            Value(value) => format!("`{value}`"),
        };
        table.push_str(&format!("| `{}` | `{}` | {default} | {} |\n", s.name, env_name(s.name), s.doc));
    }
    table
}
