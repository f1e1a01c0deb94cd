//! `kmsgate signer export-public-keys`: the signer's public keys as a `--service-account-key-file`,
//! so an API server that has not flipped to the signer (or has rolled back from it) verifies the
//! tokens the signer issued. docs/runbooks/signer-migration.md says when to run it.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use tokio::time::Instant;

use super::{CommandError, vault_client, verify_only_keys};
use crate::{
    backend::{PublicKey, SigningBackend},
    config::{BackendConfig, Config, SignerBackend},
    jwt::keyfile,
    metrics::Metrics,
};

/// Mode of the written file: public keys, read by kube-apiserver whatever user it runs as.
const MODE: u32 = 0o644;

/// What was exported, for the summary line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// Each key's version in the key store (`None` for a verify-only key) and kid, in file order.
    pub keys: Vec<(Option<u64>, String)>,
}

/// Reads the public keys of every version the configured key store holds from
/// `min_decryption_version` to the latest, in version order, then (with `include_verify_keys`) the
/// keys of `signer.verify_keys` not already listed; writes them as PEM to `out` (atomically, mode
/// 0644) or, without `out`, to stdout. Any read that fails leaves `out` as it was.
pub async fn export_public_keys(
    config: &Config,
    out: Option<&Path>,
    include_verify_keys: bool,
) -> Result<Exported, CommandError> {
    let deadline = Instant::now() + config.signer.backend_timeout;
    let metadata = match (&config.signer.backend, &config.backend) {
        (SignerBackend::Local { keyring }, _) => {
            // NB: never create: an export from a keyring that does not exist would invent a key
            // no signer signs with.
            crate::keyring::SigningKeyring::open(keyring, false)?.metadata(deadline).await?
        }
        (SignerBackend::Vault { key, key_type }, BackendConfig::Vault(v)) => {
            let client = vault_client(&v.client, Metrics::new().vault)?;
            let store = crate::transit::SigningTransit::new(
                client,
                &v.identity,
                &v.client.namespace,
                &v.mount,
                key,
                *key_type,
            );
            store.metadata(deadline).await?
        }
        (SignerBackend::Vault { .. }, BackendConfig::Local { .. }) => {
            return Err(CommandError::WrongBackend(
                "signer.backend = vault needs backend.kind = vault (the vault.* client settings)",
            ));
        }
    };
    let key = &metadata.key;
    let wanted = key.min_decryption_version.max(1)..=key.latest;
    let missing: Vec<u64> = wanted.clone().filter(|v| !metadata.public_keys.contains_key(v)).collect();
    if !missing.is_empty() {
        // NB: a file short of a version would fail every token that version signs on the
        // servers reading it, silently; refuse instead.
        return Err(CommandError::Refused(format!(
            "the key store lists no public key for version(s) {missing:?} of {}..={}; nothing written",
            wanted.start(),
            wanted.end()
        )));
    }
    let mut keys: Vec<(Option<u64>, PublicKey)> = metadata
        .public_keys
        .into_iter()
        .filter(|(v, _)| wanted.contains(v))
        .map(|(v, k)| (Some(v), k))
        .collect();
    if keys.is_empty() {
        return Err(CommandError::Refused(
            "the key store holds no version to export; nothing written".into(),
        ));
    }
    if include_verify_keys {
        for (key, _excluded) in verify_only_keys(&config.signer.verify_keys)? {
            if !keys.iter().any(|(_, k)| k.der == key.der) {
                keys.push((None, key));
            }
        }
    }
    let public: Vec<PublicKey> = keys.iter().map(|(_, k)| k.clone()).collect();
    let pem = keyfile::to_pem(&public);
    // NB: read back as kube-apiserver would before anything is written: a file it could not
    // parse to exactly these kids must never replace a good one.
    let back = keyfile::public_keys(pem.as_bytes())
        .map_err(|e| CommandError::Refused(format!("the exported file does not read back: {e}")))?;
    if back != public {
        return Err(CommandError::Refused(
            "the exported file reads back to other keys; nothing written".into(),
        ));
    }
    match out {
        Some(path) => write_atomically(path, pem.as_bytes())
            .map_err(|source| CommandError::WriteFile { path: path.to_owned(), source })?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(pem.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|source| CommandError::WriteFile { path: PathBuf::from("(stdout)"), source })?;
        }
    }
    Ok(Exported { keys: keys.into_iter().map(|(v, k)| (v, k.kid())).collect() })
}

/// Writes `bytes` to a new file beside `path`, syncs it, gives it [`MODE`] whatever the umask,
/// and renames it over `path`: a reader sees the old file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(MODE).open(&tmp)?;
        file.set_permissions(std::fs::Permissions::from_mode(MODE))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_config(keyring: &Path, verify_keys: &str) -> Config {
        let mut set = vec![
            ("signer.backend".to_owned(), "local".to_owned()),
            ("signer.keyring".to_owned(), keyring.display().to_string()),
        ];
        if !verify_keys.is_empty() {
            set.push(("signer.verify_keys".to_owned(), verify_keys.to_owned()));
        }
        Config::load(None, &set, &std::collections::HashMap::new()).unwrap()
    }

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/keyfile").join(name)
    }

    #[tokio::test]
    async fn exports_every_published_version_in_order_then_the_verify_keys_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("keyring.json");
        crate::keyring::SigningKeyring::init(&keyring, None, "k").unwrap();
        crate::keyring::SigningKeyring::rotate(&keyring).unwrap();
        crate::keyring::SigningKeyring::rotate(&keyring).unwrap();
        let floors = crate::keyring::Floors { min_decryption_version: Some(2), min_encryption_version: None };
        crate::keyring::SigningKeyring::set_floors(&keyring, floors).unwrap();
        let listed = crate::keyring::SigningKeyring::list(&keyring).unwrap();
        let kid = |v: u64| listed.versions.iter().find(|i| i.version == v).unwrap().kid.clone();
        let sa = data("rsa-pkcs1.pem");
        let verify = format!("{},excluded:{}", sa.display(), data("p256-pkix.pem").display());
        let config = local_config(&keyring, &verify);
        let out = dir.path().join("signer.pub");

        let exported = export_public_keys(&config, Some(&out), false).await.unwrap();
        assert_eq!(exported.keys, vec![(Some(2), kid(2)), (Some(3), kid(3))], "retired version 1 left out");
        let text = std::fs::read_to_string(&out).unwrap();
        let kids: Vec<String> =
            keyfile::public_keys(text.as_bytes()).unwrap().iter().map(|k| k.kid()).collect();
        assert_eq!(kids, vec![kid(2), kid(3)]);
        assert!(!text.contains("PRIVATE"), "public keys only");
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);

        let with = export_public_keys(&config, Some(&out), true).await.unwrap();
        let sa_kid = keyfile::public_keys(&std::fs::read(&sa).unwrap()).unwrap()[0].kid();
        assert_eq!(with.keys.len(), 4);
        assert_eq!(with.keys[2], (None, sa_kid));
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(keyfile::public_keys(text.as_bytes()).unwrap().len(), 4);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "no temporary file left behind");
    }

    #[tokio::test]
    async fn a_failing_read_leaves_the_existing_file_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("signer.pub");
        std::fs::write(&out, "the good file\n").unwrap();
        // No keyring: the read fails, and the export must not create one.
        let keyring = dir.path().join("missing.json");
        let err = export_public_keys(&local_config(&keyring, ""), Some(&out), false).await.unwrap_err();
        assert!(matches!(err, CommandError::Keyring(_)), "{err}");
        assert!(!keyring.exists(), "no keyring invented");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "the good file\n");

        // A verify-only key file that cannot be read fails the export too, before any write.
        crate::keyring::SigningKeyring::init(&keyring, None, "k").unwrap();
        let config = local_config(&keyring, &dir.path().join("gone.pem").display().to_string());
        let err = export_public_keys(&config, Some(&out), true).await.unwrap_err();
        assert!(err.to_string().contains("gone.pem"), "{err}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "the good file\n");
    }

    #[tokio::test]
    async fn a_write_that_fails_names_the_file_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("keyring.json");
        crate::keyring::SigningKeyring::init(&keyring, None, "k").unwrap();
        let out = dir.path().join("no-such-dir").join("signer.pub");
        let err = export_public_keys(&local_config(&keyring, ""), Some(&out), false).await.unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
    }
}
