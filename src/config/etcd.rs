//! `etcd.*`: read-only etcd access for the controller's verify step and for retire.

use std::path::PathBuf;

use super::{ConfigError, field, source::Values};

/// How to reach etcd, as configured; the etcd client turns it into its own settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// PEM CA bundle of the etcd server.
    pub ca: Option<PathBuf>,
    /// PEM client certificate.
    pub cert: Option<PathBuf>,
    /// PEM key of the client certificate.
    pub key: Option<PathBuf>,
    /// etcd user.
    pub user: Option<String>,
    /// File holding the user's password.
    pub password_file: Option<PathBuf>,
}

impl EtcdConfig {
    /// Reads `etcd.*`; `None` when no endpoint is configured.
    pub(super) fn read(v: &Values) -> Result<Option<Self>, ConfigError> {
        let endpoints = v.list("etcd.endpoints")?.into_iter().filter(|e| !e.is_empty()).collect::<Vec<_>>();
        if endpoints.is_empty() {
            return Ok(None);
        }
        let path = |name| v.nonempty(name).map(|p| p.map(PathBuf::from));
        let etcd = Self {
            endpoints,
            ca: path("etcd.ca_cert")?,
            cert: path("etcd.client_cert")?,
            key: path("etcd.client_key")?,
            user: v.nonempty("etcd.user")?,
            password_file: path("etcd.password_file")?,
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
        Ok(Some(etcd))
    }
}
