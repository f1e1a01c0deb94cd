//! Transit in memory for controller tests: versions with creation times, rotate and retire.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use kmsgate::{
    backend::{BackendError, KeyMetadata},
    crd::rotation::TransitKey,
    keyid::{BackendKind, KeyScope},
    rotation::KeyAdmin,
};

/// Transit in memory: versions with creation times, rotate and retire.
#[derive(Clone)]
pub struct FakeKeys(pub Arc<Mutex<KeyMetadata>>);

impl FakeKeys {
    /// Versions 1..=`latest`, none retired.
    pub fn new(latest: u64) -> Self {
        let versions: BTreeMap<u64, u64> = (1..=latest).map(|v| (v, 1_700_000_000 + v)).collect();
        Self(Arc::new(Mutex::new(KeyMetadata {
            versions,
            latest,
            min_decryption_version: 1,
            min_encryption_version: 0,
        })))
    }

    /// The key_id of `version` under [`scope`].
    pub fn key_id(version: u64) -> String {
        scope().key_id(version, 1_700_000_000 + version).to_string()
    }
}

/// The Transit key every fake version belongs to.
pub fn scope() -> KeyScope {
    KeyScope {
        kind: BackendKind::Transit,
        identity: "test".into(),
        namespace: String::new(),
        mount: "transit".into(),
        key: "k".into(),
    }
}

impl KeyAdmin for FakeKeys {
    fn scope(&self, _key: &TransitKey) -> KeyScope {
        scope()
    }

    async fn metadata(&self, _key: &TransitKey) -> Result<KeyMetadata, BackendError> {
        Ok(self.0.lock().unwrap().clone())
    }

    async fn rotate(&self, _key: &TransitKey) -> Result<(), BackendError> {
        let mut meta = self.0.lock().unwrap();
        meta.latest += 1;
        let latest = meta.latest;
        meta.versions.insert(latest, 1_700_000_000 + latest);
        Ok(())
    }

    async fn retire_below(&self, _key: &TransitKey, version: u64) -> Result<(), BackendError> {
        self.0.lock().unwrap().min_decryption_version = version;
        Ok(())
    }
}
