//! Transit key administration for rotation: read a key's versions, rotate it, raise its
//! `min_decryption_version`, with an identity allowed to do so.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{
    backend::{Backend, BackendError, KeyMetadata},
    crd::rotation::TransitKey,
    keyid::{BackendKind, KeyScope},
    transit::{Transit, VaultClient},
};

/// Deadline of each Transit call the controller makes.
const TRANSIT_DEADLINE: Duration = Duration::from_secs(10);

/// The Transit operations rotation needs, with an identity allowed to rotate.
pub trait KeyAdmin: Send + Sync {
    /// The key_id scope of a key (identity and namespace come from the configuration).
    fn scope(&self, key: &TransitKey) -> KeyScope;
    /// Reads the key's versions.
    fn metadata(&self, key: &TransitKey) -> impl Future<Output = Result<KeyMetadata, BackendError>> + Send;
    /// Creates a new version.
    fn rotate(&self, key: &TransitKey) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Raises `min_decryption_version` to `version`.
    fn retire_below(
        &self,
        key: &TransitKey,
        version: u64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// [`KeyAdmin`] over Vault/OpenBao Transit.
pub struct VaultKeys {
    client: Arc<VaultClient>,
    identity: String,
    namespace: String,
}

impl VaultKeys {
    /// Uses `client` (the controller's identity) for keys of Vault cluster `identity`.
    pub fn new(client: Arc<VaultClient>, identity: &str, namespace: &str) -> Self {
        Self { client, identity: identity.to_owned(), namespace: namespace.to_owned() }
    }

    fn transit(&self, key: &TransitKey) -> Transit {
        Transit::new(self.client.clone(), &self.identity, &self.namespace, &key.mount, &key.key)
    }
}

impl KeyAdmin for VaultKeys {
    fn scope(&self, key: &TransitKey) -> KeyScope {
        KeyScope {
            kind: BackendKind::Transit,
            identity: self.identity.clone(),
            namespace: self.namespace.clone(),
            mount: key.mount.clone(),
            key: key.key.clone(),
        }
    }

    async fn metadata(&self, key: &TransitKey) -> Result<KeyMetadata, BackendError> {
        self.transit(key).metadata(Instant::now() + TRANSIT_DEADLINE).await
    }

    async fn rotate(&self, key: &TransitKey) -> Result<(), BackendError> {
        self.transit(key).rotate(Instant::now() + TRANSIT_DEADLINE).await
    }

    async fn retire_below(&self, key: &TransitKey, version: u64) -> Result<(), BackendError> {
        self.transit(key).set_min_decryption_version(version, Instant::now() + TRANSIT_DEADLINE).await
    }
}
