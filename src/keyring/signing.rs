//! The `local` signing store: a keyring file of ES256 (ECDSA P-256) keys for the signer.
//!
//! NOT FOR PRODUCTION. The private keys sit on the node's disk in the clear, the file serves one
//! node only, and nothing rotates it by itself. It exists for first runs, demos and fast tests.
//! It keeps what a Transit signing key keeps (versions with creation times, the two floors), and
//! follows Transit's rules for them, so the signer behaves the same on both stores.
//!
//! The curve is ring's (`EcdsaKeyPair`, PKCS#8 documents); the PKIX DER of each public key is
//! written with the `spki` crate.

use std::{
    collections::BTreeMap,
    fs::{self, DirBuilder},
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
};
use serde::{Deserialize, Serialize};
use spki::{
    AlgorithmIdentifierRef, ObjectIdentifier, SubjectPublicKeyInfoRef,
    der::{
        Encode as _,
        asn1::{AnyRef, BitStringRef},
    },
};
use tokio::time::Instant;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::{
    KeyringError, VersionInfo, create_missing, lock_file, new_identity, next_version, random_hex, read_json,
    replace_file, unix_now, validate_name,
};
use crate::{
    backend::{BackendError, KeyMetadata, PublicKey, SigningBackend, SigningKeyMetadata},
    jwt::{self, Alg},
    keyid::{BackendKind, KeyScope},
};

/// The key name a keyring created on first use gets.
pub const DEFAULT_KEY: &str = "kmsgate-signer";

const FORMAT: u32 = 1;
/// The one key type this store holds, named as Transit names it.
const KEY_TYPE: &str = "ecdsa-p256";
const WARNING: &str =
    "kmsgate local signing keyring: NOT FOR PRODUCTION. The private signing keys live on this disk.";

/// `id-ecPublicKey` (RFC 5480 2.1.1).
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `secp256r1` (RFC 5480 2.1.1.1).
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// A loaded signing keyring file, serving as a [`SigningBackend`].
pub struct SigningKeyring {
    path: PathBuf,
    scope: KeyScope,
    loaded: ArcSwap<Loaded>,
    random: SystemRandom,
}

/// A change of the floors, as `kmsgate signer keyring` asks for it; `None` keeps a floor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Floors {
    /// The oldest version still published (Transit's `min_decryption_version`; 0 means 1).
    pub min_decryption_version: Option<u64>,
    /// The version pinned to sign (Transit's `min_encryption_version`; 0 unpins).
    pub min_encryption_version: Option<u64>,
}

/// What a signing keyring file holds, without its private keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyringSummary {
    /// The key it serves.
    pub scope: KeyScope,
    /// Every version, oldest first, with its kid.
    pub versions: Vec<SigningVersionInfo>,
    /// The oldest version still published.
    pub min_decryption_version: u64,
    /// The version pinned to sign, 0 when none.
    pub min_encryption_version: u64,
}

/// One version's public facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningVersionInfo {
    /// The version number.
    pub version: u64,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// The kid of its public key.
    pub kid: String,
}

/// The file as it was read, and when.
struct Loaded {
    stamp: Stamp,
    keys: BTreeMap<u64, Version>,
    min_decryption_version: u64,
    min_encryption_version: u64,
}

/// Identifies one state of the file: a replacement (a new inode) or a write changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    modified: (i64, i64),
    len: u64,
}

/// One loaded version.
struct Version {
    created: u64,
    // NB: ring keeps the private scalar inside the key pair and does not zeroize it on drop; the
    // PKCS#8 bytes it came from are zeroized (see `load`).
    pair: EcdsaKeyPair,
    public: PublicKey,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigningFileV1 {
    format: u32,
    warning: String,
    #[serde(rename = "type")]
    kind: String,
    identity: String,
    key: String,
    min_decryption_version: u64,
    min_encryption_version: u64,
    versions: Vec<SigningFileVersion>,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct SigningFileVersion {
    version: u64,
    created: u64,
    /// The private key: a PKCS#8 document (RFC 5208/5958), standard base64.
    pkcs8: String,
}

impl SigningKeyring {
    /// Creates a new signing keyring file (mode 0600, its missing parent directories 0700) with
    /// one version; never replaces an existing file. Without an identity it gets
    /// `local-<8 random hex digits>`. Returns the identity.
    pub fn init(path: &Path, identity: Option<&str>, key: &str) -> Result<String, KeyringError> {
        let identity = new_identity(path, identity, key)?;
        let file = SigningFileV1 {
            format: FORMAT,
            warning: WARNING.to_owned(),
            kind: KEY_TYPE.to_owned(),
            identity: identity.clone(),
            key: key.to_owned(),
            min_decryption_version: 1,
            min_encryption_version: 0,
            versions: vec![new_version(1)?],
        };
        let io = |source| KeyringError::Io { path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        }
        if path.exists() {
            return Err(KeyringError::Exists(path.to_owned()));
        }
        // NB: written whole under another name, then linked into place, which fails if the file
        // appeared meanwhile: a crash never leaves half a keyring, and a racing init never
        // replaces one.
        let tmp = path.with_extension(format!("init-{}", random_hex(4)?));
        replace_file(&tmp, &file)?;
        let linked = fs::hard_link(&tmp, path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(identity),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(KeyringError::Exists(path.to_owned()))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Opens a signing keyring file, creating it first (key [`DEFAULT_KEY`]) if `create` is set
    /// and it does not exist.
    pub fn open(path: &Path, create: bool) -> Result<Self, KeyringError> {
        if create && !path.exists() {
            create_missing(Self::init(path, None, DEFAULT_KEY))?;
        }
        tracing::warn!(path = %path.display(), "{WARNING}");
        let (file, stamp) = read_signing_file(path)?;
        Ok(Self {
            path: path.to_owned(),
            scope: scope_of(&file),
            loaded: ArcSwap::from_pointee(load(&file, stamp, path)?),
            random: SystemRandom::new(),
        })
    }

    /// Adds a new version. A running signer publishes it at its next metadata read, and signs
    /// with it only by its own promotion rules.
    pub fn rotate(path: &Path) -> Result<VersionInfo, KeyringError> {
        let lock = lock_file(path)?;
        let (mut file, _) = read_signing_file(path)?;
        let next = next_version(path, file.versions.iter().map(|v| v.version))?;
        let version = new_version(next)?;
        let created = version.created;
        file.versions.push(version);
        replace_file(path, &file)?;
        drop(lock);
        Ok(VersionInfo { version: next, created })
    }

    /// Changes the floors by Transit's rules (openbao builtin/logical/transit/path_keys_config.go,
    /// pathKeysConfigWrite): neither above the latest version, `min_decryption_version` 0 means 1,
    /// and a pinned `min_encryption_version` at or above `min_decryption_version`. Nothing is
    /// written when the change is refused. Returns the floors now in force.
    pub fn set_floors(path: &Path, floors: Floors) -> Result<(u64, u64), KeyringError> {
        let lock = lock_file(path)?;
        let (mut file, _) = read_signing_file(path)?;
        let latest = file.versions.iter().map(|v| v.version).max().unwrap_or(0);
        let invalid = |problem: String| KeyringError::Invalid { path: path.to_owned(), problem };
        if let Some(min) = floors.min_decryption_version {
            let min = min.max(1);
            if min > latest {
                return Err(invalid(format!(
                    "cannot set min_decryption_version to {min}; the latest version is {latest}"
                )));
            }
            file.min_decryption_version = min;
        }
        if let Some(min) = floors.min_encryption_version {
            if min > latest {
                return Err(invalid(format!(
                    "cannot set min_encryption_version to {min}; the latest version is {latest}"
                )));
            }
            file.min_encryption_version = min;
        }
        check_floors(&file).map_err(invalid)?;
        replace_file(path, &file)?;
        drop(lock);
        Ok((file.min_decryption_version, file.min_encryption_version))
    }

    /// What a signing keyring file holds, without its private keys.
    pub fn list(path: &Path) -> Result<SigningKeyringSummary, KeyringError> {
        let (file, stamp) = read_signing_file(path)?;
        let loaded = load(&file, stamp, path)?;
        Ok(SigningKeyringSummary {
            scope: scope_of(&file),
            versions: loaded
                .keys
                .iter()
                .map(|(version, v)| SigningVersionInfo {
                    version: *version,
                    created: v.created,
                    kid: v.public.kid(),
                })
                .collect(),
            min_decryption_version: loaded.min_decryption_version,
            min_encryption_version: loaded.min_encryption_version,
        })
    }

    /// The file as loaded, read again if it changed since, so a `kmsgate signer keyring` change
    /// reaches a running signer at its next call.
    fn current(&self) -> Result<Arc<Loaded>, BackendError> {
        let loaded = self.loaded.load_full();
        let unavailable = |e: KeyringError| BackendError::Unavailable(e.to_string());
        let stamp = stamp(&self.path).map_err(unavailable)?;
        if stamp == loaded.stamp {
            return Ok(loaded);
        }
        let (file, stamp) = read_signing_file(&self.path).map_err(unavailable)?;
        if scope_of(&file) != self.scope {
            return Err(BackendError::Misconfigured(format!(
                "signing keyring {} changed identity or key name while running",
                self.path.display()
            )));
        }
        let loaded = Arc::new(load(&file, stamp, &self.path).map_err(unavailable)?);
        self.loaded.store(loaded.clone());
        Ok(loaded)
    }
}

impl std::fmt::Debug for SigningKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: public facts only; the private keys never reach Debug output.
        let loaded = self.loaded.load();
        let versions: Vec<(u64, String)> = loaded.keys.iter().map(|(v, k)| (*v, k.public.kid())).collect();
        f.debug_struct("SigningKeyring")
            .field("path", &self.path)
            .field("scope", &self.scope)
            .field("versions", &versions)
            .field("min_decryption_version", &loaded.min_decryption_version)
            .field("min_encryption_version", &loaded.min_encryption_version)
            .finish_non_exhaustive()
    }
}

impl SigningBackend for SigningKeyring {
    fn scope(&self) -> &KeyScope {
        &self.scope
    }

    async fn metadata(&self, _deadline: Instant) -> Result<SigningKeyMetadata, BackendError> {
        let loaded = self.current()?;
        let latest = loaded.keys.keys().next_back().copied().ok_or_else(|| {
            BackendError::Misconfigured(format!("signing keyring {} has no versions", self.path.display()))
        })?;
        // NB: like Transit, which lists only the versions from min_decryption_version up.
        let published = loaded.keys.range(loaded.min_decryption_version..);
        Ok(SigningKeyMetadata {
            key: KeyMetadata {
                versions: published.clone().map(|(v, k)| (*v, k.created)).collect(),
                latest,
                min_decryption_version: loaded.min_decryption_version,
                min_encryption_version: loaded.min_encryption_version,
            },
            public_keys: published.map(|(v, k)| (*v, k.public.clone())).collect(),
        })
    }

    async fn sign(
        &self,
        version: u64,
        alg: Alg,
        input: &[u8],
        _deadline: Instant,
    ) -> Result<Vec<u8>, BackendError> {
        if alg != Alg::Es256 {
            return Err(BackendError::Misconfigured(format!(
                "asked to sign {alg} with the local signing keyring, which signs ES256 only"
            )));
        }
        let loaded = self.current()?;
        let Some(key) = loaded.keys.get(&version) else {
            return Err(BackendError::KeyNotFound(format!("the signing keyring has no version {version}")));
        };
        // NB: Transit's rule (keysutil policy.go SignWithOptions), and one of ours: a version no
        // longer published makes tokens that cannot verify.
        if loaded.min_encryption_version > 0 && version < loaded.min_encryption_version {
            return Err(BackendError::Retired(format!(
                "version {version} is below the pinned min_encryption_version {}",
                loaded.min_encryption_version
            )));
        }
        if version < loaded.min_decryption_version {
            return Err(BackendError::Retired(format!(
                "version {version} is below min_decryption_version {}, so it is no longer published",
                loaded.min_decryption_version
            )));
        }
        let signature = key
            .pair
            .sign(&self.random, input)
            .map_err(|_| BackendError::Unavailable("ECDSA signing failed (random source)".into()))?;
        Ok(signature.as_ref().to_vec())
    }
}

/// Reads and checks a signing keyring file, and the state of the file it was read from.
fn read_signing_file(path: &Path) -> Result<(SigningFileV1, Stamp), KeyringError> {
    // NB: the stamp is taken first, so a change racing the read makes the next call read again.
    let stamp = stamp(path)?;
    let file: SigningFileV1 = read_json(path)?;
    let invalid = |problem: String| KeyringError::Invalid { path: path.to_owned(), problem };
    if file.format != FORMAT {
        return Err(invalid(format!(
            "format {} is not supported (this kmsgate reads format {FORMAT})",
            file.format
        )));
    }
    if file.kind != KEY_TYPE {
        return Err(invalid(format!(
            "type {:?} is not supported; a signing keyring holds {KEY_TYPE:?}",
            file.kind
        )));
    }
    validate_name(path, "identity", &file.identity)?;
    validate_name(path, "key", &file.key)?;
    Ok((file, stamp))
}

fn stamp(path: &Path) -> Result<Stamp, KeyringError> {
    let meta = fs::metadata(path).map_err(|source| KeyringError::Io { path: path.to_owned(), source })?;
    Ok(Stamp {
        dev: meta.dev(),
        ino: meta.ino(),
        modified: (meta.mtime(), meta.mtime_nsec()),
        len: meta.len(),
    })
}

/// Parses every version's private key and derives its public key and kid.
fn load(file: &SigningFileV1, stamp: Stamp, path: &Path) -> Result<Loaded, KeyringError> {
    let invalid = |problem: String| KeyringError::Invalid { path: path.to_owned(), problem };
    let random = SystemRandom::new();
    let mut keys = BTreeMap::new();
    for v in &file.versions {
        // NB: no message below names the key's bytes or its base64.
        let pkcs8 = Zeroizing::new(
            B64.decode(v.pkcs8.as_bytes())
                .map_err(|_| invalid(format!("version {} private key is not base64", v.version)))?,
        );
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &random).map_err(|_| {
                invalid(format!("version {} private key is not a PKCS#8 ECDSA P-256 key", v.version))
            })?;
        let der = spki_der(pair.public_key().as_ref())
            .map_err(|e| invalid(format!("version {} public key cannot be encoded: {e}", v.version)))?;
        // NB: the one judge of a published key, so no key store can publish what kube-apiserver
        // refuses.
        jwt::check_public_key(&der).map_err(|e| invalid(format!("version {} public key: {e}", v.version)))?;
        let public = PublicKey { alg: Alg::Es256, der };
        jwt::check_kid(&public.kid()).map_err(|e| invalid(e.to_string()))?;
        let version = Version { created: v.created, pair, public };
        if v.version == 0 || keys.insert(v.version, version).is_some() {
            return Err(invalid(format!("version {} is zero or repeated", v.version)));
        }
    }
    if keys.is_empty() {
        return Err(invalid("it has no key versions".into()));
    }
    check_floors(file).map_err(invalid)?;
    Ok(Loaded {
        stamp,
        keys,
        min_decryption_version: file.min_decryption_version,
        min_encryption_version: file.min_encryption_version,
    })
}

/// Transit's invariants of the floors (path_keys_config.go, pathKeysConfigWrite).
fn check_floors(file: &SigningFileV1) -> Result<(), String> {
    let latest = file.versions.iter().map(|v| v.version).max().unwrap_or(0);
    let (decryption, encryption) = (file.min_decryption_version, file.min_encryption_version);
    if decryption == 0 || decryption > latest {
        return Err(format!("min_decryption_version {decryption} must be 1 to the latest version {latest}"));
    }
    if encryption > latest {
        return Err(format!("min_encryption_version {encryption} lies above the latest version {latest}"));
    }
    if encryption > 0 && encryption < decryption {
        return Err(format!(
            "min_encryption_version {encryption} must be 0 or at least min_decryption_version {decryption}"
        ));
    }
    Ok(())
}

/// The PKIX DER (SubjectPublicKeyInfo, RFC 5480) of an uncompressed P-256 point.
fn spki_der(point: &[u8]) -> Result<Vec<u8>, spki::der::Error> {
    let spki = SubjectPublicKeyInfoRef {
        algorithm: AlgorithmIdentifierRef { oid: EC_PUBLIC_KEY, parameters: Some(AnyRef::from(&SECP256R1)) },
        subject_public_key: BitStringRef::from_bytes(point)?,
    };
    spki.to_der()
}

fn new_version(version: u64) -> Result<SigningFileVersion, KeyringError> {
    let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map_err(|_| KeyringError::Random)?;
    // NB: ring's document is not zeroized on drop; the copies made here are.
    let pkcs8 = Zeroizing::new(document.as_ref().to_vec());
    Ok(SigningFileVersion { version, created: unix_now(), pkcs8: B64.encode(pkcs8.as_slice()) })
}

fn scope_of(file: &SigningFileV1) -> KeyScope {
    KeyScope {
        kind: BackendKind::Local,
        identity: file.identity.clone(),
        namespace: String::new(),
        mount: String::new(),
        key: file.key.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    use spki::der::Decode as _;

    use super::*;
    use crate::keyring::tests::sources;

    fn far() -> Instant {
        Instant::now() + std::time::Duration::from_secs(5)
    }

    fn verifies(public: &PublicKey, input: &[u8], signature: &[u8]) -> bool {
        let spki = SubjectPublicKeyInfoRef::from_der(&public.der).unwrap();
        let point = spki.subject_public_key.as_bytes().unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(input, signature).is_ok()
    }

    fn pkcs8_of(path: &Path, version: u64) -> String {
        let file: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
        let versions = file["versions"].as_array().unwrap();
        let entry = versions.iter().find(|v| v["version"] == version).unwrap();
        entry["pkcs8"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn first_use_creates_a_private_keyring_that_signs_and_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/dir/signing.json");
        let ring = SigningKeyring::open(&path, true).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        for created in [dir.path().join("new"), dir.path().join("new/dir")] {
            assert_eq!(fs::metadata(created).unwrap().permissions().mode() & 0o777, 0o700);
        }
        assert!(ring.scope().identity.starts_with("local-"));
        assert_eq!(ring.scope().key, DEFAULT_KEY);
        assert!(fs::read_to_string(&path).unwrap().contains("NOT FOR PRODUCTION"));
        let names: Vec<_> =
            fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");

        let metadata = ring.metadata(far()).await.unwrap();
        assert_eq!(
            (metadata.key.latest, metadata.key.min_decryption_version, metadata.key.min_encryption_version),
            (1, 1, 0)
        );
        let public = &metadata.public_keys[&1];
        assert_eq!(public.alg, Alg::Es256);
        let header = jwt::header(Alg::Es256, &public.kid()).unwrap();
        let input = jwt::signing_input(&header, "e30");
        let signature = ring.sign(1, Alg::Es256, &input, far()).await.unwrap();
        assert_eq!(signature.len(), 64);
        assert!(verifies(public, &input, &signature));
        assert!(!verifies(public, b"other", &signature));
        assert!(matches!(ring.sign(1, Alg::Es384, &input, far()).await, Err(BackendError::Misconfigured(_))));
        assert!(matches!(ring.sign(2, Alg::Es256, &input, far()).await, Err(BackendError::KeyNotFound(_))));
        assert!(matches!(SigningKeyring::init(&path, None, "k"), Err(KeyringError::Exists(_))));
    }

    #[test]
    fn the_public_key_der_is_what_an_independent_encoder_makes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.json");
        SigningKeyring::init(&path, Some("demo"), "k").unwrap();
        let ring = SigningKeyring::open(&path, false).unwrap();
        let pkcs8 = B64.decode(pkcs8_of(&path, 1)).unwrap();
        let independent = rcgen::KeyPair::try_from(pkcs8.as_slice()).unwrap();
        let ours = &ring.loaded.load().keys[&1].public;
        assert_eq!(ours.der, rcgen::PublicKeyData::subject_public_key_info(&independent));
        assert_eq!(ours.der.len(), 91);
    }

    #[tokio::test]
    async fn rotation_and_floors_follow_transit_rules_and_reach_a_running_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.json");
        SigningKeyring::init(&path, Some("demo"), "k").unwrap();
        let ring = SigningKeyring::open(&path, false).unwrap();
        assert_eq!(SigningKeyring::rotate(&path).unwrap().version, 2);
        assert_eq!(SigningKeyring::rotate(&path).unwrap().version, 3);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let metadata = ring.metadata(far()).await.unwrap();
        assert_eq!(metadata.key.latest, 3);
        assert_eq!(metadata.public_keys.len(), 3);
        let kids: std::collections::BTreeSet<_> = metadata.public_keys.values().map(PublicKey::kid).collect();
        assert_eq!(kids.len(), 3, "every version has its own key");

        // Pin version 2: version 1 stays published but cannot sign.
        let pinned = Floors { min_encryption_version: Some(2), ..Floors::default() };
        assert_eq!(SigningKeyring::set_floors(&path, pinned).unwrap(), (1, 2));
        assert!(matches!(ring.sign(1, Alg::Es256, b"x", far()).await, Err(BackendError::Retired(_))));
        let signature = ring.sign(2, Alg::Es256, b"x", far()).await.unwrap();
        assert!(verifies(&metadata.public_keys[&2], b"x", &signature));
        assert_eq!(ring.metadata(far()).await.unwrap().key.min_encryption_version, 2);

        // Retire version 1: no longer published, never signed with.
        let retired = Floors { min_decryption_version: Some(2), ..Floors::default() };
        assert_eq!(SigningKeyring::set_floors(&path, retired).unwrap(), (2, 2));
        let metadata = ring.metadata(far()).await.unwrap();
        assert_eq!(metadata.public_keys.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(metadata.key.versions.keys().copied().collect::<Vec<_>>(), vec![2, 3]);

        // Refused as Transit refuses them, and nothing is written.
        let before = fs::read(&path).unwrap();
        for (floors, named) in [
            (Floors { min_decryption_version: Some(4), ..Floors::default() }, "latest version is 3"),
            (Floors { min_encryption_version: Some(4), ..Floors::default() }, "latest version is 3"),
            (
                Floors { min_decryption_version: Some(3), ..Floors::default() },
                "at least min_decryption_version 3",
            ),
        ] {
            let err = SigningKeyring::set_floors(&path, floors).unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
        }
        assert_eq!(fs::read(&path).unwrap(), before);
        let unpinned = Floors { min_decryption_version: Some(0), min_encryption_version: Some(0) };
        assert_eq!(SigningKeyring::set_floors(&path, unpinned).unwrap(), (1, 0));
        ring.sign(1, Alg::Es256, b"x", far()).await.unwrap();

        let summary = SigningKeyring::list(&path).unwrap();
        assert_eq!(summary.versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(summary.versions[0].kid, metadata_kid(&ring, 1).await);
    }

    async fn metadata_kid(ring: &SigningKeyring, version: u64) -> String {
        ring.metadata(far()).await.unwrap().public_keys[&version].kid()
    }

    #[test]
    fn no_private_key_reaches_debug_or_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.json");
        SigningKeyring::init(&path, Some("demo"), "k").unwrap();
        let ring = SigningKeyring::open(&path, false).unwrap();
        let pkcs8 = pkcs8_of(&path, 1);
        let raw = B64.decode(&pkcs8).unwrap();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let debug = format!("{ring:?}");
        assert!(
            debug.contains("demo") && debug.contains(&ring.loaded.load().keys[&1].public.kid()),
            "{debug}"
        );

        let text = fs::read_to_string(&path).unwrap();
        let write = |text: &str| {
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        };
        // The key in a numeric field, a damaged key, and a key of the wrong curve.
        write(&text.replacen("\"created\": ", &format!("\"created\": \"{pkcs8}\", \"x\": "), 1));
        let misplaced = SigningKeyring::open(&path, false).unwrap_err();
        let mut damaged = raw.clone();
        damaged[40] ^= 0xff;
        write(&text.replace(&pkcs8, &B64.encode(&damaged)));
        let damaged_err = SigningKeyring::open(&path, false).unwrap_err();
        let p384 = EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap();
        let p384 = B64.encode(p384.as_ref());
        write(&text.replace(&pkcs8, &p384));
        let curve = SigningKeyring::open(&path, false).unwrap_err();
        assert!(curve.to_string().contains("not a PKCS#8 ECDSA P-256 key"), "{curve}");
        for err in [misplaced, damaged_err, curve] {
            let message = format!("{err} {err:?} {}", sources(&err));
            for secret in [&pkcs8[..24], &pkcs8[40..64], &p384[40..64], &hex[..32]] {
                assert!(!message.contains(secret) && !debug.contains(secret), "{message}");
            }
        }
    }

    #[test]
    fn a_keyring_of_the_other_kind_or_with_loose_permissions_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("plugin.json");
        super::super::Keyring::init(&plugin, Some("demo"), "k").unwrap();
        assert!(matches!(SigningKeyring::open(&plugin, false), Err(KeyringError::Parse { .. })));
        let signing = dir.path().join("signing.json");
        SigningKeyring::init(&signing, Some("demo"), "k").unwrap();
        assert!(matches!(super::super::Keyring::open(&signing, false), Err(KeyringError::Parse { .. })));
        fs::set_permissions(&signing, fs::Permissions::from_mode(0o644)).unwrap();
        let err = SigningKeyring::open(&signing, false).unwrap_err();
        assert!(matches!(err, KeyringError::Permissions { mode: 0o644, .. }), "{err}");
    }

    #[tokio::test]
    async fn a_changed_identity_is_refused_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.json");
        SigningKeyring::init(&path, Some("demo"), "k").unwrap();
        let ring = SigningKeyring::open(&path, false).unwrap();
        fs::remove_file(&path).unwrap();
        SigningKeyring::init(&path, Some("other"), "k").unwrap();
        assert!(matches!(ring.metadata(far()).await, Err(BackendError::Misconfigured(_))));
        fs::remove_file(&path).unwrap();
        assert!(matches!(ring.metadata(far()).await, Err(BackendError::Unavailable(_))));
    }
}
