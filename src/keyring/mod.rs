//! The embedded `local` backend: a keyring file of versioned AES-256-GCM keys; and beside it the
//! signer's keyring of ES256 keys, [`SigningKeyring`].
//!
//! NOT FOR PRODUCTION. The keys sit on the node's disk beside the data they protect, the file
//! serves one node only, and the rotation controller cannot rotate it. It exists for first runs,
//! demos and fast tests, and follows the same key_id rules as Transit.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use aes_gcm::{Aes256Gcm, KeyInit, aead::AeadInOut, aead::Nonce};
use arc_swap::ArcSwap;
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

mod signing;

pub use signing::{
    DEFAULT_KEY as DEFAULT_SIGNING_KEY, Floors, SigningKeyring, SigningKeyringSummary, SigningVersionInfo,
};

use crate::{
    backend::{Backend, BackendError, KeyMetadata},
    ciphertext::{self, LOCAL_TAG},
    files,
    keyid::{BackendKind, KeyScope},
};

const FORMAT: u32 = 1;
const WARNING: &str = "kmsgate local keyring: NOT FOR PRODUCTION. Keys live on this disk next to the data.";

/// A keyring file could not be created, read, or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// The keyring's directory could not be created.
    #[error(
        "keyring directory {dir}: cannot create it: {source}; create it (mode 0700), run as a user who \
         may, or put the keyring elsewhere with --keyring PATH (local.keyring)"
    )]
    Directory {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The keyring already exists (init never overwrites one).
    #[error("keyring {0} already exists")]
    Exists(PathBuf),
    /// A keyring field is invalid.
    #[error("keyring {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    /// Reading or writing the file failed.
    #[error("keyring {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a keyring. The problem names where, never the value found there.
    #[error("keyring {path} is not valid keyring JSON: {problem}")]
    Parse { path: PathBuf, problem: String },
    /// Group or others can read or write the file.
    #[error("keyring {path} has mode {mode:04o}; it must not be accessible by group or others (chmod 600)")]
    Permissions { path: PathBuf, mode: u32 },
    /// The system random source failed.
    #[error("random source failed")]
    Random,
}

/// One key version's public facts (never the key material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// The version number.
    pub version: u64,
    /// Creation time, Unix seconds.
    pub created: u64,
}

/// A loaded keyring file, serving as a [`Backend`].
pub struct Keyring {
    path: PathBuf,
    scope: KeyScope,
    loaded: ArcSwap<Loaded>,
}

struct Loaded {
    keys: BTreeMap<u64, Version>,
}

struct Version {
    created: u64,
    material: Zeroizing<[u8; 32]>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileV1 {
    format: u32,
    warning: String,
    identity: String,
    key: String,
    versions: Vec<FileVersion>,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct FileVersion {
    version: u64,
    created: u64,
    material: String,
}

impl Keyring {
    /// Creates a new keyring file (mode 0600) with one version; never replaces an existing file.
    /// Without an identity it gets `local-<8 random hex digits>`. Returns the identity.
    pub fn init(path: &Path, identity: Option<&str>, key: &str) -> Result<String, KeyringError> {
        let identity = new_identity(path, identity, key)?;
        let file = FileV1 {
            format: FORMAT,
            warning: WARNING.to_owned(),
            identity,
            key: key.to_owned(),
            versions: vec![new_version(1)?],
        };
        let io = |source| KeyringError::Io { path: path.to_owned(), source };
        create_dir(path)?;
        let mut out = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(KeyringError::Exists(path.to_owned()));
            }
            Err(e) => return Err(io(e)),
        };
        write_json(&mut out, &file).map_err(io)?;
        Ok(file.identity.clone())
    }

    /// Adds a new version; the running plugin adopts it through its normal promotion rules.
    pub fn rotate(path: &Path) -> Result<VersionInfo, KeyringError> {
        let lock = lock_file(path)?;
        let mut file = read_file(path)?;
        let next = next_version(path, file.versions.iter().map(|v| v.version))?;
        file.versions.push(new_version(next)?);
        replace_file(path, &file)?;
        drop(lock);
        Ok(VersionInfo { version: next, created: file.versions[file.versions.len() - 1].created })
    }

    /// The versions in a keyring file, oldest first.
    pub fn list(path: &Path) -> Result<(KeyScope, Vec<VersionInfo>), KeyringError> {
        let file = read_file(path)?;
        Ok((scope_of(&file), infos(&file)))
    }

    /// Opens a keyring file, creating it first if `create` is set and it does not exist.
    pub fn open(path: &Path, create: bool) -> Result<Self, KeyringError> {
        if create && !path.exists() {
            create_missing(Self::init(path, None, "kmsgate"))?;
        }
        let file = read_file(path)?;
        Ok(Self {
            path: path.to_owned(),
            scope: scope_of(&file),
            loaded: ArcSwap::from_pointee(load(&file, path)?),
        })
    }

    /// Re-reads the file so a `kmsgate keyring rotate` reaches a running plugin.
    fn reload(&self) -> Result<Arc<Loaded>, BackendError> {
        let file = read_file(&self.path).map_err(|e| BackendError::Unavailable(e.to_string()))?;
        if scope_of(&file) != self.scope {
            return Err(BackendError::Misconfigured(format!(
                "keyring {} changed identity or key name while running",
                self.path.display()
            )));
        }
        let loaded = Arc::new(load(&file, &self.path).map_err(|e| BackendError::Unavailable(e.to_string()))?);
        self.loaded.store(loaded.clone());
        Ok(loaded)
    }

    fn key(&self, version: u64) -> Result<Arc<Loaded>, BackendError> {
        let loaded = self.loaded.load_full();
        if loaded.keys.contains_key(&version) {
            return Ok(loaded);
        }
        let loaded = self.reload()?;
        if loaded.keys.contains_key(&version) {
            return Ok(loaded);
        }
        Err(BackendError::Rejected(format!("key version {version} is not in the keyring")))
    }
}

impl Backend for Keyring {
    fn scope(&self) -> &KeyScope {
        &self.scope
    }

    fn max_ciphertext_len(&self, plaintext_len: usize) -> usize {
        ciphertext::versioned_len(LOCAL_TAG, plaintext_len)
    }

    async fn metadata(&self, _deadline: Instant) -> Result<KeyMetadata, BackendError> {
        let loaded = self.reload()?;
        let versions: BTreeMap<u64, u64> = loaded.keys.iter().map(|(v, k)| (*v, k.created)).collect();
        let latest = versions.keys().next_back().copied().ok_or_else(|| {
            BackendError::Misconfigured(format!("keyring {} has no key versions", self.path.display()))
        })?;
        let min_decryption_version = versions.keys().next().copied().unwrap_or(1);
        Ok(KeyMetadata { versions, latest, min_decryption_version, min_encryption_version: 0 })
    }

    async fn encrypt(
        &self,
        version: u64,
        plaintext: &[u8],
        aad: &[u8],
        _deadline: Instant,
    ) -> Result<Vec<u8>, BackendError> {
        let loaded = self.key(version)?;
        let key = &loaded.keys[&version];
        let cipher = Aes256Gcm::new_from_slice(key.material.as_slice())
            .map_err(|_| BackendError::Misconfigured("key material is not 32 bytes".into()))?;
        let mut nonce = Nonce::<Aes256Gcm>::default();
        getrandom::fill(&mut nonce).map_err(|_| BackendError::Unavailable("random source failed".into()))?;
        let mut sealed = Zeroizing::new(plaintext.to_vec());
        cipher
            .encrypt_in_place(&nonce, aad, &mut *sealed)
            .map_err(|_| BackendError::Protocol("AES-GCM refused the input".into()))?;
        let mut body = nonce.to_vec();
        body.extend_from_slice(&sealed);
        Ok(format!("{LOCAL_TAG}:v{version}:{}", B64.encode(body)).into_bytes())
    }

    async fn decrypt(
        &self,
        version: u64,
        ciphertext: &[u8],
        aad: &[u8],
        _deadline: Instant,
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let (made_by, body) = ciphertext::version(LOCAL_TAG, ciphertext)
            .ok_or_else(|| BackendError::Rejected("ciphertext is not a local keyring ciphertext".into()))?;
        if made_by != version {
            return Err(BackendError::Rejected(format!(
                "ciphertext was made by key version {made_by}, but key_id names version {version}"
            )));
        }
        let body = B64.decode(body).map_err(|_| BackendError::Rejected("ciphertext is not base64".into()))?;
        if body.len() < 12 + 16 {
            return Err(BackendError::Rejected("ciphertext is too short".into()));
        }
        let loaded = self.key(version)?;
        let cipher = Aes256Gcm::new_from_slice(loaded.keys[&version].material.as_slice())
            .map_err(|_| BackendError::Misconfigured("key material is not 32 bytes".into()))?;
        let (nonce, sealed) = body.split_at(12);
        let mut nonce_array = Nonce::<Aes256Gcm>::default();
        nonce_array.copy_from_slice(nonce);
        let mut plain = Zeroizing::new(sealed.to_vec());
        cipher.decrypt_in_place(&nonce_array, aad, &mut *plain).map_err(|_| {
            BackendError::Rejected("ciphertext failed authentication (tampered, or wrong key_id)".into())
        })?;
        Ok(plain)
    }
}

fn scope_of(file: &FileV1) -> KeyScope {
    KeyScope {
        kind: BackendKind::Local,
        identity: file.identity.clone(),
        namespace: String::new(),
        mount: String::new(),
        key: file.key.clone(),
    }
}

fn infos(file: &FileV1) -> Vec<VersionInfo> {
    let mut out: Vec<VersionInfo> =
        file.versions.iter().map(|v| VersionInfo { version: v.version, created: v.created }).collect();
    out.sort_by_key(|v| v.version);
    out
}

fn load(file: &FileV1, path: &Path) -> Result<Loaded, KeyringError> {
    let invalid = |problem: String| KeyringError::Invalid { path: path.to_owned(), problem };
    let mut keys = BTreeMap::new();
    for v in &file.versions {
        let bytes = Zeroizing::new(
            B64.decode(v.material.as_bytes())
                .map_err(|_| invalid(format!("version {} key material is not base64", v.version)))?,
        );
        let mut material = Zeroizing::new([0u8; 32]);
        if bytes.len() != 32 {
            return Err(invalid(format!(
                "version {} key material is {} bytes, not 32",
                v.version,
                bytes.len()
            )));
        }
        material.copy_from_slice(&bytes);
        if v.version == 0 || keys.insert(v.version, Version { created: v.created, material }).is_some() {
            return Err(invalid(format!("version {} is zero or repeated", v.version)));
        }
    }
    if keys.is_empty() {
        return Err(invalid("it has no key versions".into()));
    }
    Ok(Loaded { keys })
}

fn read_file(path: &Path) -> Result<FileV1, KeyringError> {
    let file: FileV1 = read_json(path)?;
    if file.format != FORMAT {
        return Err(KeyringError::Invalid {
            path: path.to_owned(),
            problem: format!("format {} is not supported (this kmsgate reads format {FORMAT})", file.format),
        });
    }
    validate_name(path, "identity", &file.identity)?;
    validate_name(path, "key", &file.key)?;
    Ok(file)
}

/// Creates the keyring's missing directories, mode 0700: a fresh host has no /var/lib/kmsgate.
fn create_dir(path: &Path) -> Result<(), KeyringError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) else {
        return Ok(());
    };
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyringError::Directory { dir: dir.to_owned(), source })
}

/// Reads a keyring file of either kind: private to its owner, bounded in size, JSON.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, KeyringError> {
    let io = |source| KeyringError::Io { path: path.to_owned(), source };
    let meta = fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyringError::Permissions { path: path.to_owned(), mode });
    }
    let text = files::read_capped(path, files::DOCUMENT_MAX_BYTES).map_err(io)?;
    serde_json::from_slice(&text)
        .map_err(|e| KeyringError::Parse { path: path.to_owned(), problem: json_problem(&e) })
}

/// What a JSON error says, less any value it quotes: serde names the value it rejects
/// (`invalid type: string "..."`), and a keyring's values include its keys.
fn json_problem(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    let what = message.strip_suffix(&position).unwrap_or(&message);
    let what = match error.classify() {
        serde_json::error::Category::Data => what.split(':').next().unwrap_or(what),
        _ => what,
    };
    format!("{what}{position}")
}

fn replace_file(path: &Path, file: &impl Serialize) -> Result<(), KeyringError> {
    let io = |source| KeyringError::Io { path: path.to_owned(), source };
    let tmp = path.with_extension(format!("tmp-{}", random_hex(4)?));
    let result = (|| {
        let mut out = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        write_json(&mut out, file)?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}

fn lock_file(path: &Path) -> Result<File, KeyringError> {
    let lock_path = path.with_extension("lock");
    let io = |source| KeyringError::Io { path: lock_path.clone(), source };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io)?;
    file.lock().map_err(io)?;
    Ok(file)
}

fn write_json(out: &mut File, file: &impl Serialize) -> std::io::Result<()> {
    let mut text = Zeroizing::new(serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?);
    text.push(b'\n');
    out.write_all(&text)?;
    out.sync_all()
}

fn new_version(version: u64) -> Result<FileVersion, KeyringError> {
    let mut material = Zeroizing::new([0u8; 32]);
    getrandom::fill(material.as_mut_slice()).map_err(|_| KeyringError::Random)?;
    Ok(FileVersion { version, created: unix_now(), material: B64.encode(material.as_slice()) })
}

/// The identity and key name a new keyring file of either kind gets: `identity`, or
/// `local-<8 random hex digits>` without one; both checked.
fn new_identity(path: &Path, identity: Option<&str>, key: &str) -> Result<String, KeyringError> {
    let identity = match identity {
        Some(identity) => identity.to_owned(),
        None => format!("local-{}", random_hex(4)?),
    };
    validate_name(path, "identity", &identity)?;
    validate_name(path, "key", key)?;
    Ok(identity)
}

/// The version after the newest of `versions`. NB: refused before anything is written: a wrapped
/// version 0 makes a keyring that cannot be loaded.
fn next_version(path: &Path, versions: impl Iterator<Item = u64>) -> Result<u64, KeyringError> {
    let last = versions.max().unwrap_or(0);
    last.checked_add(1).ok_or_else(|| KeyringError::Invalid {
        path: path.to_owned(),
        problem: format!("version {last} is the last one a keyring can hold; it cannot be rotated"),
    })
}

/// The outcome of creating a keyring on first use: one that exists already (made meanwhile by
/// another process) is as good as one made here.
fn create_missing(init: Result<String, KeyringError>) -> Result<(), KeyringError> {
    match init {
        Ok(_) | Err(KeyringError::Exists(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn random_hex(bytes: usize) -> Result<String, KeyringError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|_| KeyringError::Random)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn validate_name(path: &Path, field: &str, value: &str) -> Result<(), KeyringError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        return Ok(());
    }
    Err(KeyringError::Invalid {
        path: path.to_owned(),
        problem: format!("{field} {value:?} must be 1-63 characters of a-z, 0-9, '-' and '.'"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Instant {
        Instant::now() + std::time::Duration::from_secs(5)
    }

    /// Every source of an error, joined, as a log line would show them.
    pub(super) fn sources(error: &dyn std::error::Error) -> String {
        let mut out = String::new();
        let mut next = error.source();
        while let Some(source) = next {
            out.push_str(&format!(": {source}"));
            next = source.source();
        }
        out
    }

    #[tokio::test]
    async fn init_rotate_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        Keyring::init(&path, Some("demo"), "kmsgate").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(Keyring::init(&path, Some("demo"), "kmsgate"), Err(KeyringError::Exists(_))));

        let ring = Keyring::open(&path, false).unwrap();
        let ct = ring.encrypt(1, b"seed", b"kid-1", far()).await.unwrap();
        assert!(ct.starts_with(b"local:v1:"));
        assert_eq!(ring.decrypt(1, &ct, b"kid-1", far()).await.unwrap().as_slice(), b"seed");
        assert!(matches!(ring.decrypt(1, &ct, b"kid-2", far()).await, Err(BackendError::Rejected(_))));
        assert!(matches!(ring.decrypt(2, &ct, b"kid-1", far()).await, Err(BackendError::Rejected(_))));

        assert_eq!(Keyring::rotate(&path).unwrap().version, 2);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let meta = ring.metadata(far()).await.unwrap();
        assert_eq!(meta.latest, 2);
        assert_eq!(meta.versions.len(), 2);
        let ct2 = ring.encrypt(2, b"seed2", b"kid", far()).await.unwrap();
        assert!(ct2.starts_with(b"local:v2:"));
        assert_eq!(ring.decrypt(1, &ct, b"kid-1", far()).await.unwrap().as_slice(), b"seed");
    }

    #[test]
    fn rotate_past_the_last_version_refuses_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let text = format!(
            r#"{{"format":1,"warning":"","identity":"a","key":"k","versions":[{{"version":{},"created":1,"material":"{}"}}]}}"#,
            u64::MAX,
            B64.encode([7u8; 32])
        );
        fs::write(&path, &text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        Keyring::open(&path, false).unwrap();
        let err = Keyring::rotate(&path).unwrap_err();
        assert!(err.to_string().contains("cannot be rotated"), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
        Keyring::open(&path, false).unwrap();
    }

    #[test]
    fn refuses_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        Keyring::init(&path, Some("demo"), "kmsgate").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = Keyring::open(&path, false).err().unwrap();
        assert!(matches!(err, KeyringError::Permissions { mode: 0o640, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn init_creates_missing_directories_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("var/lib/kmsgate/keyring.json");
        Keyring::open(&path, true).unwrap();
        let mode = fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // A directory that may not be made is named, with the way out.
        let locked = dir.path().join("locked");
        fs::create_dir(&locked).unwrap();
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o500)).unwrap();
        let blocked = locked.join("sub/keyring.json");
        if fs::create_dir(locked.join("probe")).is_ok() {
            return; // NB: root ignores directory modes; the message is checked where they apply.
        }
        let err = Keyring::open(&blocked, true).err().unwrap().to_string();
        assert!(
            err.contains(&locked.join("sub").display().to_string()) && err.contains("--keyring"),
            "{err}"
        );
    }

    #[test]
    fn open_creates_on_first_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let ring = Keyring::open(&path, true).unwrap();
        assert!(ring.scope().identity.starts_with("local-"));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let write = |text: &str| {
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        };
        write("not json");
        assert!(matches!(Keyring::open(&path, false), Err(KeyringError::Parse { .. })));
        write(r#"{"format":2,"warning":"","identity":"a","key":"k","versions":[]}"#);
        assert!(Keyring::open(&path, false).err().unwrap().to_string().contains("format 2"));
        write(
            r#"{"format":1,"warning":"","identity":"a","key":"k","versions":[{"version":1,"created":1,"material":"AAAA"}]}"#,
        );
        assert!(Keyring::open(&path, false).err().unwrap().to_string().contains("3 bytes, not 32"));
    }

    #[test]
    fn a_key_in_the_wrong_field_never_reaches_the_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        let material = B64.encode([7u8; 32]);
        let text = format!(
            r#"{{"format":1,"warning":"","identity":"a","key":"k","versions":[{{"version":1,"created":"{material}","material":"{material}"}}]}}"#
        );
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = Keyring::open(&path, false).err().unwrap();
        let message = format!("{err} {err:?} {}", sources(&err));
        assert!(matches!(err, KeyringError::Parse { .. }), "{message}");
        assert!(!message.contains(&material[..16]), "{message}");
        assert!(message.contains("invalid type") && message.contains("line 1"), "{message}");
    }
}
