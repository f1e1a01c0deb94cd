//! `backend.*`, `local.*` and `vault.*`: which key store serves the key, and how to reach it. The
//! key stores turn these sections into their own client settings.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    ConfigError, Role, field,
    source::{Values, name_chars},
};
use crate::ciphertext;

/// The settings only some auth methods read, and which methods read them.
const AUTH_SETTINGS: &[(&str, &[&str])] = &[
    ("vault.token_file", &["token"]),
    ("vault.role_id_file", &["approle"]),
    ("vault.secret_id_file", &["approle"]),
    ("vault.role", &["cert", "jwt", "kubernetes"]),
    ("vault.jwt_file", &["jwt", "kubernetes"]),
    ("vault.auth_mount", &["approle", "cert", "jwt", "kubernetes"]),
];

/// Where a pod's service-account token is mounted.
pub(super) const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

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

impl BackendConfig {
    /// The tag this key store puts on its ciphertexts.
    pub fn ciphertext_tag(&self) -> &'static str {
        match self {
            Self::Local { .. } => ciphertext::LOCAL_TAG,
            Self::Vault(_) => ciphertext::VAULT_TAG,
        }
    }
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
    pub client: VaultClientConfig,
}

/// How to reach and log in to one Vault/OpenBao cluster: what the Vault client is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct VaultClientConfig {
    /// Base addresses of one cluster, in order of preference (`https://vault-1:8200`).
    pub addresses: Vec<String>,
    /// Vault Enterprise namespace; empty for none.
    pub namespace: String,
    /// CA and client certificate files.
    pub tls: VaultTls,
    /// Where the token comes from.
    pub auth: VaultAuth,
    /// Renew the token when this fraction of its TTL has passed.
    pub renew_fraction: f64,
    /// Most Vault calls in flight at once; the rest wait (within their deadline).
    pub max_concurrent_calls: usize,
    /// How often credential and TLS files, and failed addresses, are checked.
    pub check_interval: Duration,
}

/// Which files make up the Vault client's TLS identity and trust.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VaultTls {
    /// A PEM CA bundle file, or a directory whose files are read for PEM certificates.
    /// `None` trusts the system roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain (for TLS certificate auth or mutual TLS).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key: Option<PathBuf>,
}

/// Where the Vault client's token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// AppRole login with role_id and secret_id read from files.
    AppRole {
        /// Auth mount path (default `approle`).
        mount: String,
        /// File holding the role_id.
        role_id_file: PathBuf,
        /// File holding the secret_id.
        secret_id_file: PathBuf,
    },
    /// TLS certificate login; the client certificate is the TLS client identity.
    Cert {
        /// Auth mount path (default `cert`).
        mount: String,
        /// The cert role to log in as; empty lets Vault pick by certificate.
        role: String,
    },
    /// JWT login with a token read from a file.
    Jwt {
        /// Auth mount path (default `jwt`).
        mount: String,
        /// The JWT role.
        role: String,
        /// File holding the JWT.
        jwt_file: PathBuf,
    },
    /// Kubernetes login with a service-account token; the controller's method, never the plugin's.
    Kubernetes {
        /// Auth mount path (default `kubernetes`).
        mount: String,
        /// The Kubernetes auth role.
        role: String,
        /// File holding the service-account token.
        jwt_file: PathBuf,
    },
    /// A token read from a file, re-read when the file changes.
    Token {
        /// File holding the token.
        file: PathBuf,
    },
}

impl BackendConfig {
    /// Reads `backend.*` and the section of the chosen kind.
    pub(super) fn read(v: &Values, role: Role) -> Result<Self, ConfigError> {
        let identity = v.text("backend.identity")?.unwrap_or_default();
        match v.text("backend.kind")?.unwrap_or_default().as_str() {
            "local" => {
                if !identity.is_empty() {
                    return Err(field(
                        "backend.identity",
                        "the local keyring names itself; set it with `kmsgate keyring init --identity`",
                    ));
                }
                Ok(Self::Local {
                    keyring: PathBuf::from(v.text("local.keyring")?.unwrap_or_default()),
                    create: v.flag("local.create")?,
                })
            }
            "vault" => Ok(Self::Vault(Box::new(VaultConfig::read(v, identity, role)?))),
            other => Err(field("backend.kind", format!("{other:?} must be local or vault"))),
        }
    }
}

impl VaultConfig {
    fn read(v: &Values, identity: String, role: Role) -> Result<Self, ConfigError> {
        if identity.is_empty() {
            return Err(field(
                "backend.identity",
                "required for vault: a fixed name for this Vault cluster (it is part of every key_id)",
            ));
        }
        name_chars("backend.identity", &identity, 63, |b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
        })?;
        let mount = v.text("vault.mount")?.unwrap_or_default();
        name_chars("vault.mount", &mount, 128, |b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))?;
        if mount.starts_with('/') || mount.ends_with('/') || mount.contains("//") {
            return Err(field("vault.mount", "must not start or end with '/' or contain '//'"));
        }
        let key = v.text("vault.key")?.unwrap_or_default();
        name_chars("vault.key", &key, 128, |b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))?;
        let namespace = v.text("vault.namespace")?.unwrap_or_default();
        if namespace.len() > 128 || namespace.chars().any(char::is_control) {
            return Err(field("vault.namespace", "must be at most 128 printable characters"));
        }
        let addresses = v.list("vault.addresses")?;
        if addresses.is_empty() {
            return Err(field("vault.addresses", "at least one address is required (or set VAULT_ADDR)"));
        }
        let insecure = v.flag("vault.insecure_allow_http")?;
        for address in &addresses {
            check_address(address, insecure).map_err(|e| field("vault.addresses", e))?;
        }
        let path = |name| v.nonempty(name).map(|p| p.map(PathBuf::from));
        let tls = VaultTls {
            ca: path("vault.ca_cert")?,
            client_cert: path("vault.client_cert")?,
            client_key: path("vault.client_key")?,
        };
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            return Err(field(
                "vault.client_cert",
                "vault.client_cert and vault.client_key must be set together",
            ));
        }
        let renew_text = v.text("vault.renew_fraction")?.unwrap_or_default();
        let renew_fraction: f64 =
            renew_text.parse().ok().filter(|f: &f64| *f >= 0.1 && *f <= 0.9).ok_or_else(|| {
                field("vault.renew_fraction", format!("{renew_text:?} must be a number from 0.1 to 0.9"))
            })?;
        let auth = VaultAuth::read(v, tls.client_cert.is_some(), role)?;
        Ok(Self {
            identity,
            mount,
            key,
            client: VaultClientConfig {
                addresses,
                namespace,
                tls,
                auth,
                renew_fraction,
                max_concurrent_calls: v.int("vault.max_concurrent_calls", 1)? as usize,
                check_interval: v.required_duration("vault.check_interval")?,
            },
        })
    }
}

impl VaultAuth {
    /// The method's name, as `vault.auth` spells it, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::AppRole { .. } => "approle",
            Self::Cert { .. } => "cert",
            Self::Jwt { .. } => "jwt",
            Self::Kubernetes { .. } => "kubernetes",
            Self::Token { .. } => "token",
        }
    }

    /// The files whose change means "get a new token".
    pub fn files(&self) -> Vec<&Path> {
        match self {
            Self::AppRole { role_id_file, secret_id_file, .. } => vec![role_id_file, secret_id_file],
            Self::Cert { .. } => vec![],
            Self::Jwt { jwt_file, .. } | Self::Kubernetes { jwt_file, .. } => vec![jwt_file],
            Self::Token { file } => vec![file],
        }
    }

    fn read(v: &Values, has_client_cert: bool, who: Role) -> Result<Self, ConfigError> {
        let auth = Self::read_method(v, has_client_cert, who)?;
        // NB: a credential file the method never reads is a mistake (a half-edited example, a
        // forgotten switch of method); silently ignoring it hides which identity is in use.
        for (name, used_by) in AUTH_SETTINGS {
            if !used_by.contains(&auth.name()) && v.nonempty(name)?.is_some() {
                return Err(field(
                    name,
                    format!(
                        "set, but vault.auth = {:?} ignores it; remove it, or use vault.auth = {}",
                        auth.name(),
                        used_by.iter().map(|m| format!("{m:?}")).collect::<Vec<_>>().join(" or ")
                    ),
                ));
            }
        }
        Ok(auth)
    }

    fn read_method(v: &Values, has_client_cert: bool, who: Role) -> Result<Self, ConfigError> {
        let method = v.text("vault.auth")?.unwrap_or_default();
        let auth_mount = v.nonempty("vault.auth_mount")?;
        let mount = |default: &str| auth_mount.clone().unwrap_or_else(|| default.to_owned());
        let required = |name: &str| {
            v.nonempty(name)?
                .map(PathBuf::from)
                .ok_or_else(|| field(name, format!("required for vault.auth = {method:?}")))
        };
        let role = v.text("vault.role")?.unwrap_or_default();
        match method.as_str() {
            "token" => Ok(Self::Token { file: required("vault.token_file")? }),
            "approle" => Ok(Self::AppRole {
                mount: mount("approle"),
                role_id_file: required("vault.role_id_file")?,
                secret_id_file: required("vault.secret_id_file")?,
            }),
            "cert" if !has_client_cert => {
                Err(field("vault.client_cert", "required for vault.auth = \"cert\""))
            }
            "cert" => Ok(Self::Cert { mount: mount("cert"), role }),
            "jwt" if role.is_empty() => Err(field("vault.role", "required for vault.auth = \"jwt\"")),
            "jwt" => Ok(Self::Jwt { mount: mount("jwt"), role, jwt_file: required("vault.jwt_file")? }),
            "kubernetes" if who == Role::Controller && role.is_empty() => {
                Err(field("vault.role", "required for vault.auth = \"kubernetes\""))
            }
            "kubernetes" if who == Role::Controller => Ok(Self::Kubernetes {
                mount: mount("kubernetes"),
                role,
                jwt_file: v
                    .nonempty("vault.jwt_file")?
                    .map_or_else(|| PathBuf::from(SERVICE_ACCOUNT_TOKEN), PathBuf::from),
            }),
            "kubernetes" => Err(field(
                "vault.auth",
                "the plugin cannot use kubernetes auth: a static pod has no service-account token, and Vault's \
                 TokenReview needs the API server this plugin serves; use approle, cert, jwt or token",
            )),
            other => Err(field("vault.auth", format!("{other:?} must be token, approle, cert or jwt"))),
        }
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
