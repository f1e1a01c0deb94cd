//! One Transit key in memory, served as the plugin's [`Backend`]: versions with creation times,
//! retirement floors, deletion and recreation, outages and refusals. For tests that run the plugin
//! in-process on paused time, where a real OpenBao cannot follow the clock.
//!
//! Each behaviour models openbao (`sdk/helper/keysutil/policy.go`, `builtin/logical/transit/`) as
//! cited beside it, and answers with the [`BackendError`] that the real `vault` backend maps that
//! HTTP answer to (`kmsgate::transit`, `map_error` and `Transit::metadata`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use kmsgate::{
    backend::{Backend, BackendError, KeyMetadata},
    keyid::{BackendKind, KeyScope},
};
use tokio::time::Instant;
use zeroize::Zeroizing;

/// Creation times start here and grow by one per version made, so a recreated key's versions
/// never repeat an old creation time.
const EPOCH: u64 = 1_800_000_000;

/// A fault every call meets until it is cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Vault does not answer (network, sealed, 5xx): `BackendError::Unavailable`.
    Unreachable,
    /// Vault refuses the token (HTTP 403): `BackendError::PermissionDenied`.
    Forbidden,
}

/// One Transit key in memory; clones share it.
#[derive(Clone)]
pub struct FakeTransit {
    scope: KeyScope,
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    /// Which incarnation of the key exists; a ciphertext opens only under the one that made it.
    incarnation: u64,
    deleted: bool,
    versions: BTreeMap<u64, u64>,
    min_decryption_version: u64,
    min_encryption_version: u64,
    fault: Option<Fault>,
    /// A node that is behind: it knows only the versions up to this one.
    behind: Option<u64>,
    clock: u64,
    sealed: HashMap<Vec<u8>, Sealed>,
    next_ciphertext: u64,
}

struct Sealed {
    incarnation: u64,
    version: u64,
    aad: Vec<u8>,
    plaintext: Zeroizing<Vec<u8>>,
}

impl Default for FakeTransit {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeTransit {
    /// A key with version 1.
    pub fn new() -> Self {
        let scope = KeyScope {
            kind: BackendKind::Transit,
            identity: "fake-vault".into(),
            namespace: String::new(),
            mount: "transit".into(),
            key: "kmsgate".into(),
        };
        let mut inner = Inner {
            incarnation: 1,
            deleted: false,
            versions: BTreeMap::new(),
            min_decryption_version: 1,
            min_encryption_version: 0,
            fault: None,
            behind: None,
            clock: EPOCH,
            sealed: HashMap::new(),
            next_ciphertext: 0,
        };
        inner.add_version();
        Self { scope, inner: Arc::new(Mutex::new(inner)) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Adds a version (`POST transit/keys/:name/rotate`); returns it.
    pub fn rotate(&self) -> u64 {
        self.lock().add_version()
    }

    /// Sets `min_decryption_version` (`POST transit/keys/:name/config`).
    pub fn set_min_decryption_version(&self, version: u64) {
        self.lock().min_decryption_version = version;
    }

    /// Deletes the key (`DELETE transit/keys/:name`, with `deletion_allowed`).
    pub fn delete(&self) {
        let mut inner = self.lock();
        inner.deleted = true;
        inner.versions.clear();
    }

    /// Deletes the key and creates a new one of the same name: new material, version 1 again.
    pub fn recreate(&self) {
        self.delete();
        let mut inner = self.lock();
        inner.deleted = false;
        inner.incarnation += 1;
        inner.min_decryption_version = 1;
        inner.min_encryption_version = 0;
        inner.add_version();
    }

    /// Makes every call fail this way until `None`.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    /// Answers as a node that is behind would (a standby or replica that has not caught up):
    /// only the versions up to `latest`, until `None`. Its Encrypt of a newer version then meets
    /// the `ver > p.LatestVersion` check of openbao's `Policy.EncryptWithFactory`.
    pub fn set_behind(&self, latest: Option<u64>) {
        self.lock().behind = latest;
    }

    /// The key_id the plugin gives `version` as it exists now.
    pub fn key_id(&self, version: u64) -> String {
        self.scope.key_id(version, self.lock().versions[&version]).to_string()
    }
}

impl Inner {
    fn add_version(&mut self) -> u64 {
        let version = self.versions.keys().next_back().copied().unwrap_or(0) + 1;
        self.clock += 1;
        self.versions.insert(version, self.clock);
        version
    }

    fn fault(&self) -> Result<(), BackendError> {
        match self.fault {
            None => Ok(()),
            Some(Fault::Unreachable) => Err(BackendError::Unavailable("connection refused".into())),
            Some(Fault::Forbidden) => Err(BackendError::PermissionDenied("permission denied".into())),
        }
    }

    fn latest(&self) -> u64 {
        let latest = self.versions.keys().next_back().copied().unwrap_or(0);
        self.behind.map_or(latest, |behind| behind.min(latest))
    }
}

impl Backend for FakeTransit {
    fn scope(&self) -> &KeyScope {
        &self.scope
    }

    fn max_ciphertext_len(&self, plaintext_len: usize) -> usize {
        64 + plaintext_len
    }

    async fn metadata(&self, _deadline: Instant) -> Result<KeyMetadata, BackendError> {
        let inner = self.lock();
        inner.fault()?;
        if inner.deleted {
            // openbao builtin/logical/transit/path_keys.go, pathPolicyRead: no policy, no
            // response, which the router answers with 404.
            return Err(BackendError::KeyNotFound("Transit key \"kmsgate\" not found (HTTP 404)".into()));
        }
        let latest = inner.latest();
        Ok(KeyMetadata {
            versions: inner.versions.range(..=latest).map(|(v, c)| (*v, *c)).collect(),
            latest,
            min_decryption_version: inner.min_decryption_version.max(1),
            min_encryption_version: inner.min_encryption_version,
        })
    }

    async fn encrypt(
        &self,
        version: u64,
        plaintext: &[u8],
        aad: &[u8],
        _deadline: Instant,
    ) -> Result<Vec<u8>, BackendError> {
        let mut inner = self.lock();
        inner.fault()?;
        if inner.deleted {
            // openbao builtin/logical/transit/path_encrypt.go, pathEncryptExistenceCheck: a
            // missing key makes the call a create (upsert), which the plugin's policy
            // (deploy/vault/plugin-policy.hcl: update only) denies with 403.
            return Err(BackendError::PermissionDenied("permission denied".into()));
        }
        // openbao sdk/helper/keysutil/policy.go, Policy.EncryptWithFactory: the version checks.
        if version > inner.latest() {
            return Err(BackendError::Rejected(
                "requested version for encryption is higher than the latest key version".into(),
            ));
        }
        if version < inner.min_encryption_version {
            return Err(BackendError::Retired(
                "requested version for encryption is less than the minimum encryption key version".into(),
            ));
        }
        inner.next_ciphertext += 1;
        let ciphertext = format!("vault:v{version}:fake{}", inner.next_ciphertext).into_bytes();
        let sealed = Sealed {
            incarnation: inner.incarnation,
            version,
            aad: aad.to_vec(),
            plaintext: Zeroizing::new(plaintext.to_vec()),
        };
        inner.sealed.insert(ciphertext.clone(), sealed);
        Ok(ciphertext)
    }

    async fn decrypt(
        &self,
        version: u64,
        ciphertext: &[u8],
        aad: &[u8],
        _deadline: Instant,
    ) -> Result<Zeroizing<Vec<u8>>, BackendError> {
        let inner = self.lock();
        inner.fault()?;
        if inner.deleted {
            // openbao builtin/logical/transit/path_decrypt.go, pathDecryptWrite: 400.
            return Err(BackendError::Rejected("encryption key not found".into()));
        }
        // openbao sdk/helper/keysutil/policy.go, Policy.DecryptWithFactory: the floor first,
        // then AES-GCM, which fails unless key material and associated data both match.
        if version < inner.min_decryption_version {
            return Err(BackendError::Retired(
                "ciphertext or signature version is disallowed by policy (too old)".into(),
            ));
        }
        let opens = inner.sealed.get(ciphertext).filter(|s| {
            s.incarnation == inner.incarnation
                && s.version == version
                && s.aad == aad
                && inner.versions.contains_key(&version)
        });
        match opens {
            Some(sealed) => Ok(sealed.plaintext.clone()),
            None => Err(BackendError::Rejected("cipher: message authentication failed".into())),
        }
    }
}
