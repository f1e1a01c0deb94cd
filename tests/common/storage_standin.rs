//! kube-apiserver's KMS v2 write path into a real etcd, for the end-to-end rotation test and the
//! rotation benchmark (one stand-in, shared): every Secret the fake API server writes is sealed
//! the way the API server seals it and put into etcd, so the controller's Verify and `kmsgate
//! audit` read what a cluster would hold.
//!
//! Modelled on kubernetes/kubernetes
//! `staging/src/k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/envelope.go`:
//! `envelopeTransformer.TransformToStorage` (the object sealed with a key derived from the write
//! seed, the etcd key as associated data, the wrapped seed and key_id stored beside it) and
//! `GenerateTransformer` (a new seed through Encrypt when the key_id changes). One simplification,
//! kept on purpose: it asks Status before every write instead of every 60 s (`primeAndProbeKMSv2`
//! in `.../server/options/encryptionconfig/config.go`), so a test sees the switch at once rather
//! than a minute later; `kms_apiserver` models the real poll where the timing matters.

use std::{collections::HashMap, sync::Arc};

use futures::{FutureExt, future::BoxFuture};
use kmsgate::{
    kms::client::KmsClient,
    proto::v2::{EncryptRequest, StatusRequest},
    storage::{self, DekSourceType, EncryptedObject},
};
use tokio::sync::Mutex;

use crate::{EtcdWriter, fake_api::Store};

/// key_id, DEK seed, and the seed as the plugin wrapped it.
type WriteState = (String, [u8; 32], Vec<u8>);

/// The write path of one API server: a DEK seed per key_id, wrapped by the plugin, and each
/// Secret sealed into etcd under `/registry/secrets/<namespace>/<name>` for provider `kmsgate`.
#[derive(Clone)]
pub struct ApiServerStorage(Arc<Inner>);

struct Inner {
    kms: KmsClient,
    etcd: EtcdWriter,
    state: Mutex<Option<WriteState>>,
}

impl ApiServerStorage {
    /// Writes through the plugin behind `kms` into `etcd`.
    pub fn new(kms: KmsClient, etcd: EtcdWriter) -> Self {
        Self(Arc::new(Inner { kms, etcd, state: Mutex::new(None) }))
    }
}

impl Inner {
    /// Asks Status; on a new key_id, makes a new seed and calls Encrypt (envelope.go
    /// `GenerateTransformer`).
    async fn refresh(&self) -> WriteState {
        let mut kms = self.kms.clone();
        let key_id = kms.status(StatusRequest {}).await.unwrap().into_inner().key_id;
        let mut state = self.state.lock().await;
        if state.as_ref().is_none_or(|(current, _, _)| *current != key_id) {
            let mut seed = [0u8; 32];
            seed.copy_from_slice(&uuid::Uuid::new_v4().as_bytes().repeat(2));
            let response = kms
                .encrypt(EncryptRequest { plaintext: seed.to_vec(), uid: uuid::Uuid::new_v4().to_string() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(response.key_id, key_id, "Encrypt must answer with the key_id Status reported");
            *state = Some((key_id, seed, response.ciphertext));
        }
        state.clone().unwrap()
    }
}

impl Store for ApiServerStorage {
    fn write(&self, namespace: &str, name: &str, data: &[u8]) -> BoxFuture<'static, String> {
        let key = format!("/registry/secrets/{namespace}/{name}");
        let data = data.to_vec();
        let this = self.0.clone();
        async move {
            let (key_id, seed, wrapped) = this.refresh().await;
            let value = EncryptedObject {
                encrypted_data: storage::seal_with_seed(&seed, &data, key.as_bytes()).unwrap(),
                key_id: key_id.clone(),
                encrypted_dek_source: wrapped,
                annotations: HashMap::new(),
                dek_source_type: DekSourceType::HkdfSha256XnonceAesGcmSeed,
            }
            .to_value("kmsgate");
            this.etcd.put(key, value).await;
            key_id
        }
        .boxed()
    }

    fn current_key_id(&self) -> BoxFuture<'static, String> {
        let this = self.0.clone();
        async move { this.refresh().await.0 }.boxed()
    }
}
