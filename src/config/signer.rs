//! `signer.*`: the ExternalJWTSigner server (`kmsgate signer`): its key store, socket, HTTP
//! endpoint, the Metadata and FetchKeys answers, and when a new key version may sign.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::{AuditSink, ConfigError, SocketConfig, field, source::Values};
use crate::jwt::KeyType;

/// The least `max_token_expiration_seconds` kube-apiserver accepts from Metadata
/// (facts/externaljwt.md 1.2: "at least 600").
pub const MIN_TOKEN_EXPIRATION: Duration = Duration::from_secs(600);

/// Margin added to the poll interval and refresh hint in the default `signer.publish_lead`: room
/// for a slow poll, a slow API server resync and clock skew between replicas.
const PUBLISH_LEAD_MARGIN: Duration = Duration::from_secs(60);

/// Which key store signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignerBackend {
    /// An ES256 keyring file on this node (not for production).
    Local {
        /// The keyring file.
        keyring: PathBuf,
    },
    /// A Transit key, reached through the `vault.*` client section.
    Vault {
        /// The Transit key's name.
        key: String,
        /// Its type, which fixes the algorithm.
        key_type: KeyType,
    },
}

/// A public key file served for verification only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyKeyFile {
    /// The file (PEM public keys, certificates or private keys).
    pub path: PathBuf,
    /// Leave its keys out of the OIDC discovery documents (and never sign with them).
    pub exclude_from_oidc_discovery: bool,
}

/// The signer's settings.
#[derive(Debug, Clone)]
pub struct SignerConfig {
    /// The key store.
    pub backend: SignerBackend,
    /// The socket and its permissions.
    pub socket: SocketConfig,
    /// The read-only HTTP endpoint; `None` when off.
    pub http_listen: Option<SocketAddr>,
    /// How often the key's versions are read.
    pub poll_interval: Duration,
    /// FetchKeys `refresh_hint_seconds`.
    pub refresh_hint: Duration,
    /// How old a version must be before it signs (when no version is pinned).
    pub publish_lead: Duration,
    /// Metadata `max_token_expiration_seconds`.
    pub max_token_expiration: Duration,
    /// Deadline of each key store call.
    pub backend_timeout: Duration,
    /// Public key files served for verification only.
    pub verify_keys: Vec<VerifyKeyFile>,
    /// Where the last good key set is kept.
    pub state_file: PathBuf,
    /// Audit log sink.
    pub audit_log: AuditSink,
}

impl SignerConfig {
    /// Metadata's `max_token_expiration_seconds`, as the signer answers and reports it.
    pub fn max_token_expiration_seconds(&self) -> i64 {
        i64::try_from(self.max_token_expiration.as_secs()).unwrap_or(i64::MAX)
    }

    /// FetchKeys' `refresh_hint_seconds`, as the signer answers and reports it (at least 1, which
    /// kube-apiserver requires).
    pub fn refresh_hint_seconds(&self) -> i64 {
        i64::try_from(self.refresh_hint.as_secs()).unwrap_or(i64::MAX).max(1)
    }

    /// Reads `signer.*`; `backend_kind` is `backend.kind`, the default key store.
    pub(super) fn read(v: &Values, backend_kind: &str) -> Result<Self, ConfigError> {
        let kind = v.nonempty("signer.backend")?.unwrap_or_else(|| backend_kind.to_owned());
        let backend = match kind.as_str() {
            "local" => {
                SignerBackend::Local { keyring: PathBuf::from(v.text("signer.keyring")?.unwrap_or_default()) }
            }
            "vault" => {
                if backend_kind != "vault" {
                    return Err(field(
                        "signer.backend",
                        "vault needs the vault.* client settings: set backend.kind = vault as well",
                    ));
                }
                let key = v.text("signer.key")?.unwrap_or_default();
                super::source::name_chars("signer.key", &key, 128, |b| {
                    b.is_ascii_alphanumeric() || b"-_.".contains(&b)
                })?;
                let type_text = v.text("signer.key_type")?.unwrap_or_default();
                let key_type = type_text.parse().map_err(|e| field("signer.key_type", e))?;
                SignerBackend::Vault { key, key_type }
            }
            other => return Err(field("signer.backend", format!("{other:?} must be local or vault"))),
        };
        let http_listen = match v.text("signer.http_listen")?.unwrap_or_default().as_str() {
            "off" | "" => None,
            addr => Some(
                addr.parse()
                    .map_err(|_| field("signer.http_listen", format!("{addr:?} is not HOST:PORT or off")))?,
            ),
        };
        let poll_interval = v.required_duration("signer.poll_interval")?;
        let refresh_hint = Duration::from_secs(v.int("signer.refresh_hint_seconds", 1)? as u64);
        let publish_lead = v
            .duration("signer.publish_lead")?
            .unwrap_or(poll_interval * 2 + refresh_hint + PUBLISH_LEAD_MARGIN);
        // NB: a shorter lead lets a version sign before another replica has polled it or an API
        // server has refreshed its keys, so its tokens are refused there.
        let least_lead = poll_interval + refresh_hint;
        if publish_lead < least_lead {
            return Err(field(
                "signer.publish_lead",
                format!(
                    "{} is below signer.poll_interval + signer.refresh_hint_seconds ({}): a new key \
                     version would sign before every replica and API server has fetched it",
                    humantime::format_duration(publish_lead),
                    humantime::format_duration(least_lead)
                ),
            ));
        }
        let max_token_expiration = v.required_duration("signer.max_token_expiration")?;
        if max_token_expiration < MIN_TOKEN_EXPIRATION {
            return Err(field(
                "signer.max_token_expiration",
                format!(
                    "{} is below kube-apiserver's minimum of {}s (10m)",
                    humantime::format_duration(max_token_expiration),
                    MIN_TOKEN_EXPIRATION.as_secs()
                ),
            ));
        }
        let verify_keys = v
            .list("signer.verify_keys")?
            .into_iter()
            .map(|item| {
                let (path, exclude) = match item.strip_prefix("excluded:") {
                    Some(path) => (path, true),
                    None => (item.as_str(), false),
                };
                if !path.starts_with('/') {
                    return Err(field(
                        "signer.verify_keys",
                        format!("{item:?} is not an absolute path, or excluded: and one"),
                    ));
                }
                Ok(VerifyKeyFile { path: PathBuf::from(path), exclude_from_oidc_discovery: exclude })
            })
            .collect::<Result<_, _>>()?;
        let state_file = v
            .nonempty("signer.state_file")?
            .map(PathBuf::from)
            .ok_or_else(|| field("signer.state_file", "must be a file path"))?;
        // NB: checked before the shared socket rules, whose message offers
        // allow_abstract_socket as the way out.
        if v.text("signer.socket")?.is_some_and(|s| s.starts_with('@')) {
            return Err(field(
                "signer.socket",
                "abstract sockets (@name) have no file permissions, so any process in the host's \
                 network namespace could call Sign and mint a token for any service account; the \
                 signer refuses them even with signer.allow_abstract_socket: use a socket file",
            ));
        }
        Ok(Self {
            backend,
            socket: SocketConfig::read(v, "signer", "Sign")?,
            http_listen,
            poll_interval,
            refresh_hint,
            publish_lead,
            max_token_expiration,
            backend_timeout: v.required_duration("signer.backend_timeout")?,
            verify_keys,
            state_file,
            audit_log: AuditSink::read(v, "signer.audit_log")?,
        })
    }
}
