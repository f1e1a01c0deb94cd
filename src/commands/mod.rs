//! The commands behind the command line; main.rs parses and dispatches to these.

mod request;
pub mod rotation;
pub mod signer_keys;
pub mod signing;
pub mod tokens;

use std::{path::Path, time::Duration};

use crate::{
    audit,
    config::{BackendConfig, Config, SignerBackend, SocketSpec, VaultAuth, VaultClientConfig},
    keyring::{Floors, Keyring, KeyringError, SigningKeyring},
    kms::{self, PluginError},
    metrics::Metrics,
    selftest,
    transit::{ClientError, Transit, VaultClient},
};

/// `kmsgate audit`: how it ended when it could run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditVerdict {
    /// No finding of a kind in `--fail-on`.
    Clean,
    /// At least one such finding.
    Findings,
}

/// `kmsgate audit`: scans, streams findings to stdout, prints the summary.
pub async fn audit(
    etcd: &crate::config::EtcdConfig,
    options: &audit::Options,
    plugin_socket: Option<SocketSpec>,
    deep: bool,
    fail_on: &[audit::Finding],
) -> Result<AuditVerdict, CommandError> {
    let mut options = options.clone();
    let mut deep_checker = None;
    if let Some(socket) = plugin_socket {
        let mut client =
            kms::client::connect(&socket).await.map_err(|e| CommandError::Audit(e.to_string()))?;
        if deep {
            deep_checker = Some(audit::deep::Deep::new(client.clone(), Duration::from_secs(3)));
        }
        let status = client
            .status(crate::proto::v2::StatusRequest {})
            .await
            .map_err(|e| CommandError::Audit(format!("plugin Status failed: {}", e.message())))?
            .into_inner();
        if status.key_id.is_empty() {
            return Err(CommandError::Audit("the plugin reports no key_id yet".into()));
        }
        if options.current_key_id.is_none() {
            options.current_key_id = Some(status.key_id);
        }
    } else if deep {
        return Err(CommandError::Audit("--deep needs --plugin-socket to decrypt DEK sources".into()));
    }
    let mut client = crate::etcd::connect(etcd).await.map_err(|e| CommandError::Audit(e.to_string()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let summary = audit::run(&mut client, &options, deep_checker.as_mut(), &mut out)
        .await
        .map_err(|e| CommandError::Audit(e.to_string()))?;
    audit::write_summary(&summary, options.json, &mut out).map_err(|e| CommandError::Audit(e.to_string()))?;
    std::io::Write::flush(&mut out).map_err(|e| CommandError::Audit(e.to_string()))?;
    let failing = fail_on.iter().any(|f| summary.findings.get(f).is_some_and(|n| *n > 0));
    Ok(if failing { AuditVerdict::Findings } else { AuditVerdict::Clean })
}

/// A command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The audit could not run or finish.
    #[error("audit: {0}")]
    Audit(String),
    /// The keyring could not be used.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// The plugin failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The signer failed.
    #[error(transparent)]
    Signer(#[from] crate::signer::SignerError),
    /// The selftest found deviations.
    #[error("selftest failed")]
    Selftest,
    /// The Vault client could not be set up.
    #[error("vault: {0}")]
    Vault(#[from] ClientError),
    /// The command does not apply to the configured backend.
    #[error("{0}")]
    WrongBackend(&'static str),
    /// A Kubernetes call failed.
    #[error(transparent)]
    Kube(#[from] crate::k8s::KubeError),
    /// A rotation step failed.
    #[error(transparent)]
    Rotation(#[from] crate::rotation::RotationError),
    /// A signing-key rotation step failed.
    #[error(transparent)]
    SigningRotation(#[from] crate::signing_rotation::SigningRotationError),
    /// The EncryptionConfiguration would be invalid.
    #[error(transparent)]
    EncryptionConfig(#[from] crate::encryption_config::EncryptionConfigError),
    /// A token operation failed.
    #[error(transparent)]
    Tokens(#[from] crate::tokens::TokenError),
    /// A Transit call failed.
    #[error("Transit: {0}")]
    Transit(#[from] crate::backend::BackendError),
    /// The command refuses to act, and says why.
    #[error("{0}")]
    Refused(String),
    /// The command could not run: bad flags or settings, or a state it cannot start from.
    #[error("{0}")]
    CannotRun(String),
    /// The plugin's socket could not be reached.
    #[error("{0}")]
    PluginUnreachable(String),
    /// An output file could not be written.
    #[error("write {}: {source}", path.display())]
    WriteFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CommandError {
    /// Whether the command could not run at all (exit 2: bad flags or config, no kubeconfig,
    /// etcd, the API server, Vault or the plugin unreachable), rather than ran and failed or found
    /// problems (exit 1).
    pub fn could_not_run(&self) -> bool {
        use crate::backend::BackendError as B;
        let kube = |e: &crate::k8s::KubeError| {
            use crate::k8s::KubeError as K;
            // NB: an API answer means the command ran and the server refused a step; no answer
            // (connect, TLS, timeout) or no client at all means it never got going.
            match e {
                K::Config(_) | K::NotServed(_) => true,
                K::Call { source, .. } => !matches!(source, kube::Error::Api(_)),
                K::Unexpected(_) => false,
            }
        };
        let transit = |e: &B| matches!(e, B::Unavailable(_) | B::Deadline | B::Misconfigured(_));
        match self {
            Self::Audit(_)
            | Self::CannotRun(_)
            | Self::EncryptionConfig(_)
            | Self::PluginUnreachable(_)
            | Self::Vault(_)
            | Self::WrongBackend(_) => true,
            // NB: the keyring commands and the plugin ran and were refused (a keyring that
            // exists, a socket in use), as they always reported; the signer is a server like the plugin.
            Self::Keyring(_) | Self::Plugin(_) | Self::Signer(_) => false,
            Self::Kube(e) => kube(e),
            Self::Rotation(crate::rotation::RotationError::Kube(e)) => kube(e),
            Self::Rotation(crate::rotation::RotationError::Transit(e)) | Self::Transit(e) => transit(e),
            Self::SigningRotation(crate::signing_rotation::SigningRotationError::Kube(e)) => kube(e),
            Self::SigningRotation(crate::signing_rotation::SigningRotationError::Transit(e)) => transit(e),
            Self::Tokens(crate::tokens::TokenError::Kube(e)) => kube(e),
            Self::Tokens(crate::tokens::TokenError::Journal(_)) => false,
            Self::Tokens(_) => true,
            Self::Refused(_) | Self::Selftest | Self::WriteFile { .. } => false,
        }
    }
}

/// `kmsgate plugin`: serves KMS v2 until SIGTERM or SIGINT.
pub async fn plugin(config: Config) -> Result<(), CommandError> {
    let shutdown = shutdown_signal();
    let metrics = Metrics::new();
    match &config.backend {
        BackendConfig::Local { keyring, create } => {
            tracing::warn!(
                keyring = %keyring.display(),
                "backend is the LOCAL KEYRING: NOT FOR PRODUCTION. Keys sit on this node's disk, serve this node \
                 only, and the rotation controller cannot rotate them. Use backend.kind = \"vault\"."
            );
            let backend = Keyring::open(keyring, *create)?;
            kms::serve(&config, backend, metrics, shutdown).await?;
        }
        BackendConfig::Vault(v) => {
            if let VaultAuth::Jwt { jwt_file, .. } = &v.client.auth {
                tracing::warn!(
                    jwt_file = %jwt_file.display(),
                    "Vault auth is a JWT from a file: it must come from outside this cluster (a static pod has no \
                     service-account token, and this plugin starts before the API server it serves)"
                );
            }
            let client = vault_client(&v.client, metrics.vault.clone())?;
            let maintenance = tokio::spawn(client.clone().maintain());
            let backend = Transit::new(client, &v.identity, &v.client.namespace, &v.mount, &v.key);
            let result = kms::serve(&config, backend, metrics, shutdown).await;
            maintenance.abort();
            result?;
        }
    }
    Ok(())
}

/// `kmsgate signer`: serves ExternalJWTSigner until SIGTERM or SIGINT.
pub async fn signer(config: Config) -> Result<(), CommandError> {
    let verify_only = verify_only_keys(&config.signer.verify_keys)?;
    let metrics = Metrics::new();
    match (&config.signer.backend, &config.backend) {
        (SignerBackend::Local { keyring }, _) => {
            // NB: opening it logs the NOT FOR PRODUCTION warning.
            let backend = crate::keyring::SigningKeyring::open(keyring, true)?;
            serve_signer(&config, backend, verify_only, metrics).await
        }
        (SignerBackend::Vault { key, key_type }, BackendConfig::Vault(v)) => {
            let client = vault_client(&v.client, metrics.vault.clone())?;
            let maintenance = tokio::spawn(client.clone().maintain());
            let backend = crate::transit::SigningTransit::new(
                client,
                &v.identity,
                &v.client.namespace,
                &v.mount,
                key,
                *key_type,
            );
            let result = serve_signer(&config, backend, verify_only, metrics).await;
            maintenance.abort();
            result
        }
        (SignerBackend::Vault { .. }, BackendConfig::Local { .. }) => Err(CommandError::WrongBackend(
            "signer.backend = vault needs backend.kind = vault (the vault.* client settings)",
        )),
    }
}

/// The keys of `signer.verify_keys`, each file read with a size bound and every key in it
/// re-encoded to PKIX DER; a file that cannot be read or holds a key kube-apiserver cannot use
/// stops the start, since serving fewer keys than configured would fail every token one of them
/// signed.
fn verify_only_keys(
    files: &[crate::config::VerifyKeyFile],
) -> Result<Vec<(crate::backend::PublicKey, bool)>, CommandError> {
    let mut keys = Vec::new();
    for file in files {
        let named = |problem: String| {
            CommandError::CannotRun(format!("signer.verify_keys: {}: {problem}", file.path.display()))
        };
        let max = crate::jwt::keyfile::KEY_FILE_MAX_BYTES as u64;
        let text = crate::files::read_capped(&file.path, max).map_err(|e| named(e.to_string()))?;
        let found = crate::jwt::keyfile::public_keys(&text).map_err(|e| named(e.to_string()))?;
        if found.is_empty() {
            return Err(named("holds no public key".into()));
        }
        for key in found {
            tracing::info!(
                path = %file.path.display(),
                kid = %key.kid(),
                alg = %key.alg,
                exclude_from_oidc_discovery = file.exclude_from_oidc_discovery,
                "serving a verify-only key"
            );
            keys.push((key, file.exclude_from_oidc_discovery));
        }
    }
    Ok(keys)
}

/// Serves the signer over `backend` until SIGTERM or SIGINT: what [`signer`] runs once it has
/// built the configured key store.
pub async fn serve_signer(
    config: &Config,
    backend: impl crate::backend::SigningBackend,
    verify_only: Vec<(crate::backend::PublicKey, bool)>,
    metrics: Metrics,
) -> Result<(), CommandError> {
    crate::signer::serve(&config.signer, backend, verify_only, metrics, shutdown_signal()).await?;
    Ok(())
}

/// The Vault client of `settings`; a TLS file it cannot use is named by its setting.
pub(crate) fn vault_client(
    settings: &VaultClientConfig,
    metrics: crate::metrics::VaultMetrics,
) -> Result<std::sync::Arc<VaultClient>, CommandError> {
    VaultClient::new(settings, metrics).map_err(|e| match &e {
        ClientError::TlsFile { path, .. } => {
            let tls = &settings.tls;
            let setting = [
                ("vault.ca_cert", &tls.ca),
                ("vault.client_cert", &tls.client_cert),
                ("vault.client_key", &tls.client_key),
            ]
            .into_iter()
            .find(|(_, file)| file.as_deref().is_some_and(|f| path.starts_with(f)))
            .map_or("vault TLS", |(name, _)| name);
            CommandError::CannotRun(format!("{setting}: {e}"))
        }
        _ => CommandError::Vault(e),
    })
}

/// `kmsgate selftest`: prints the report; fails on any deviation.
pub async fn selftest(options: selftest::Options) -> Result<(), CommandError> {
    let report = selftest::run(&options).await;
    if let Some(cause) = report.unreachable() {
        return Err(CommandError::PluginUnreachable(cause.to_owned()));
    }
    println!("{report}");
    if report.passed() { Ok(()) } else { Err(CommandError::Selftest) }
}

/// `kmsgate keyring init`.
pub fn keyring_init(path: &Path, identity: Option<&str>, key: &str) -> Result<(), CommandError> {
    let identity = Keyring::init(path, identity, key)?;
    println!("created keyring {} (identity {identity}, key {key}, version 1, mode 0600)", path.display());
    println!("NOT FOR PRODUCTION: this keyring serves one node only and the controller cannot rotate it.");
    Ok(())
}

/// `kmsgate keyring rotate`.
pub fn keyring_rotate(path: &Path) -> Result<(), CommandError> {
    let version = Keyring::rotate(path)?;
    println!(
        "added version {} to {}; a running plugin promotes it after plugin.promote_after_polls polls",
        version.version,
        path.display()
    );
    Ok(())
}

/// `kmsgate keyring list`: versions and key_ids, never key material.
pub fn keyring_list(path: &Path) -> Result<(), CommandError> {
    let (scope, versions) = Keyring::list(path)?;
    println!("{:<8} {:<22} key_id", "version", "created");
    for v in versions {
        let created = std::time::UNIX_EPOCH + Duration::from_secs(v.created);
        println!(
            "{:<8} {:<22} {}",
            v.version,
            humantime::format_rfc3339_seconds(created).to_string(),
            scope.key_id(v.version, v.created)
        );
    }
    Ok(())
}

/// The keyring path of a local-backend config.
pub fn keyring_path(config: &Config) -> Result<&Path, CommandError> {
    match &config.backend {
        BackendConfig::Local { keyring, .. } => Ok(keyring),
        BackendConfig::Vault(_) => Err(CommandError::WrongBackend(
            "keyring commands need backend.kind = \"local\"; rotate a Transit key with Vault or `kmsgate rotate`",
        )),
    }
}

/// The signing keyring path of a `signer.backend = local` config.
pub fn signer_keyring_path(config: &Config) -> Result<&Path, CommandError> {
    match &config.signer.backend {
        SignerBackend::Local { keyring } => Ok(keyring),
        SignerBackend::Vault { .. } => Err(CommandError::WrongBackend(
            "signer keyring commands need signer.backend = \"local\"; rotate a Transit signing key with Vault",
        )),
    }
}

/// `kmsgate signer keyring init`.
pub fn signer_keyring_init(path: &Path, identity: Option<&str>, key: &str) -> Result<(), CommandError> {
    let identity = SigningKeyring::init(path, identity, key)?;
    println!(
        "created signing keyring {} (identity {identity}, key {key}, version 1, mode 0600)",
        path.display()
    );
    println!("NOT FOR PRODUCTION: this keyring signs on one node only.");
    Ok(())
}

/// `kmsgate signer keyring rotate`.
pub fn signer_keyring_rotate(path: &Path) -> Result<(), CommandError> {
    let version = SigningKeyring::rotate(path)?;
    println!(
        "added version {} to {}; a running signer publishes it at once and signs with it once it is \
         signer.publish_lead old",
        version.version,
        path.display()
    );
    Ok(())
}

/// `kmsgate signer keyring floors`.
pub fn signer_keyring_floors(path: &Path, floors: Floors) -> Result<(), CommandError> {
    let (min_decryption, min_encryption) = SigningKeyring::set_floors(path, floors)?;
    println!(
        "{}: min_decryption_version {min_decryption}, min_encryption_version {min_encryption}",
        path.display()
    );
    Ok(())
}

/// `kmsgate signer keyring list`: versions, kids and floors, never key material.
pub fn signer_keyring_list(path: &Path) -> Result<(), CommandError> {
    let summary = SigningKeyring::list(path)?;
    println!(
        "min_decryption_version {}, min_encryption_version {}",
        summary.min_decryption_version, summary.min_encryption_version
    );
    println!("{:<8} {:<22} kid", "version", "created");
    for v in summary.versions {
        let created = std::time::UNIX_EPOCH + Duration::from_secs(v.created);
        println!("{:<8} {:<22} {}", v.version, humantime::format_rfc3339_seconds(created).to_string(), v.kid);
    }
    Ok(())
}

/// `kmsgate encryption-config`: the EncryptionConfiguration that points an API server here.
pub fn encryption_config(
    config: &Config,
    name: &str,
    timeout: &str,
    resources: &[String],
) -> Result<String, CommandError> {
    let file = crate::encryption_config::EncryptionConfiguration::kms_first(
        name,
        &config.plugin.socket.spec.endpoint(),
        timeout,
        resources,
    );
    file.validate()?;
    Ok(format!(
        "# Generated by `kmsgate encryption-config`. Pass it to kube-apiserver with\n\
         # --encryption-provider-config=<this file>. Keep `identity: {{}}` last: it reads objects stored\n\
         # before encryption (or restored by hand) and writes nothing. On a cluster that already has\n\
         # Secrets, start from the identity-first file (docs/runbooks/first-encryption.md). The provider\n\
         # name is part of every stored value: never change it.\n{}",
        file.to_yaml()?
    ))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_means_it_ran_and_no_answer_means_it_could_not() {
        use crate::k8s::KubeError;
        let answered = || KubeError::Call {
            operation: "patch Secret".into(),
            source: kube::Error::Api(Box::new(
                kube::core::Status::failure("conflict", "Conflict").with_code(409),
            )),
        };
        let unanswered = || KubeError::Call {
            operation: "list Secrets".into(),
            source: kube::Error::Service("connection refused".into()),
        };
        assert!(!CommandError::Kube(answered()).could_not_run());
        assert!(CommandError::Kube(unanswered()).could_not_run());
        assert!(CommandError::Kube(KubeError::Config("no kubeconfig".into())).could_not_run());
        assert!(CommandError::Tokens(crate::tokens::TokenError::Kube(unanswered())).could_not_run());
        assert!(!CommandError::Tokens(crate::tokens::TokenError::Kube(answered())).could_not_run());
        assert!(!CommandError::Tokens(crate::tokens::TokenError::Journal("p".into())).could_not_run());
        assert!(CommandError::Rotation(crate::rotation::RotationError::Kube(unanswered())).could_not_run());
        let down = crate::backend::BackendError::Unavailable("refused".into());
        assert!(CommandError::Rotation(crate::rotation::RotationError::Transit(down)).could_not_run());
        let denied = crate::backend::BackendError::PermissionDenied("403".into());
        assert!(!CommandError::Transit(denied).could_not_run());
        assert!(CommandError::CannotRun("policy p: bad".into()).could_not_run());
        assert!(CommandError::PluginUnreachable("no socket".into()).could_not_run());
        assert!(!CommandError::Refused("values still need version 1".into()).could_not_run());
        assert!(!CommandError::Selftest.could_not_run());
    }

    #[test]
    fn encryption_config_points_at_the_socket() {
        let set = vec![("plugin.socket".to_owned(), "/var/run/kmsgate/kms.sock".to_owned())];
        let config = Config::load(None, &set, &std::collections::HashMap::new()).unwrap();
        let yaml = encryption_config(&config, "kmsgate", "3s", &["secrets".into()]).unwrap();
        let parsed = crate::encryption_config::EncryptionConfiguration::parse(&yaml).unwrap();
        let kms = parsed.resources[0].providers[0].kms.as_ref().unwrap();
        assert_eq!(kms.endpoint, "unix:///var/run/kmsgate/kms.sock");
        assert_eq!(kms.api_version, "v2");
        assert_eq!(parsed.resources[0].resources, ["secrets"]);
        assert!(parsed.resources[0].providers[1].identity.is_some());
        assert!(!yaml.contains("cachesize"), "cachesize is forbidden for v2");
        let refused = encryption_config(&config, "kms:gate", "3s", &["secrets".into()]).unwrap_err();
        assert!(refused.to_string().contains("kms.name"), "{refused}");
    }
}
