//! What the Vault client needs to know, and how the `vault.*` config section becomes it.

use std::time::Duration;

use super::{auth::AuthMethod, tls::TlsSettings};
use crate::config::{VaultAuth, VaultClientConfig, VaultTls};

/// How to reach and authenticate to Vault.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// Base addresses of one cluster, in order of preference (`https://vault-1:8200`).
    pub addresses: Vec<String>,
    /// Vault Enterprise namespace; empty for none.
    pub namespace: String,
    /// CA and client certificate files.
    pub tls: TlsSettings,
    /// Where the token comes from.
    pub auth: AuthMethod,
    /// Renew the token when this fraction of its TTL has passed.
    pub renew_fraction: f64,
    /// Most Vault calls in flight at once; the rest wait (within their deadline).
    pub max_concurrent_calls: usize,
    /// How often credential and TLS files, and failed addresses, are checked.
    pub check_interval: Duration,
}

impl From<&VaultClientConfig> for VaultSettings {
    fn from(config: &VaultClientConfig) -> Self {
        Self {
            addresses: config.addresses.clone(),
            namespace: config.namespace.clone(),
            tls: TlsSettings::from(&config.tls),
            auth: AuthMethod::from(&config.auth),
            renew_fraction: config.renew_fraction,
            max_concurrent_calls: config.max_concurrent_calls,
            check_interval: config.check_interval,
        }
    }
}

impl From<&VaultTls> for TlsSettings {
    fn from(tls: &VaultTls) -> Self {
        Self { ca: tls.ca.clone(), client_cert: tls.client_cert.clone(), client_key: tls.client_key.clone() }
    }
}

impl From<&VaultAuth> for AuthMethod {
    fn from(auth: &VaultAuth) -> Self {
        match auth.clone() {
            VaultAuth::AppRole { mount, role_id_file, secret_id_file } => {
                Self::AppRole { mount, role_id_file, secret_id_file }
            }
            VaultAuth::Cert { mount, role } => Self::Cert { mount, role },
            VaultAuth::Jwt { mount, role, jwt_file } => Self::Jwt { mount, role, jwt_file },
            VaultAuth::Kubernetes { mount, role, jwt_file } => Self::Kubernetes { mount, role, jwt_file },
            VaultAuth::Token { file } => Self::Token { file },
        }
    }
}
