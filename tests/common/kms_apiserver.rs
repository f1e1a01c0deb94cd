//! kube-apiserver's side of one KMS v2 provider, as a stand-in that drives the plugin's gRPC
//! service in-process on tokio time (so a test can pause the clock and step through minutes).
//!
//! Every behaviour models kubernetes/kubernetes as cited beside it:
//! - `staging/src/k8s.io/apiserver/pkg/server/options/encryptionconfig/config.go`:
//!   `primeAndProbeKMSv2` (the Status loop), `kmsv2PluginProbe.check` (the result cache),
//!   `isKMSv2ProviderHealthyAndMaybeRotateDEK` and `rotateDEKOnKeyIDChange` (what a Status
//!   answer does to the write seed);
//! - `staging/src/k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/envelope.go`:
//!   `GenerateTransformer` (a new seed through Encrypt), `State.ValidateEncryptCapability` (the
//!   write expiry), `envelopeTransformer.TransformFromStorage` (Decrypt on a cache miss).

use std::{collections::HashSet, sync::Arc, time::Duration};

use kmsgate::proto::v2::{
    DecryptRequest, EncryptRequest, StatusRequest, key_management_service_server::KeyManagementService,
};
use tokio::time::Instant;
use tonic::Request;

/// config.go: `kmsv2PluginHealthzPositiveInterval`, the Status poll while healthy.
pub const POLL_HEALTHY: Duration = Duration::from_secs(60);
/// config.go: `kmsv2PluginHealthzNegativeInterval`, the Status poll while failing.
pub const POLL_FAILING: Duration = Duration::from_secs(10);
/// config.go: `kmsv2PluginWriteDEKSourceMaxTTL`, how long writes coast without a good Status.
pub const WRITE_SEED_TTL: Duration = Duration::from_secs(180);
/// config.go: `kmsPluginHealthzPositiveTTL`, how long a good check result is reused.
const CHECK_TTL_OK: Duration = Duration::from_secs(20);
/// config.go: `kmsPluginHealthzNegativeTTL`, how long a failed check result is reused.
const CHECK_TTL_FAILED: Duration = Duration::from_secs(3);

/// What one write stores beside the object: the wrapped seed and its key_id (an
/// `EncryptedObject` without the data).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoredSeed {
    /// The plugin's Encrypt ciphertext.
    pub ciphertext: Vec<u8>,
    /// The key_id Encrypt returned.
    pub key_id: String,
}

/// envelope.go `State`: the current write seed and when writes on it stop.
#[derive(Debug, Clone)]
struct WriteState {
    seed: StoredSeed,
    expires: Instant,
}

/// One API server's KMS v2 provider.
pub struct ApiServer<S> {
    service: Arc<S>,
    state: Option<WriteState>,
    /// The Status `version` of the first answer; a later change is an error.
    version: Option<String>,
    /// `kmsv2PluginProbe.lastResponse` and its ttl.
    last_check: Option<(Instant, Duration, Result<(), String>)>,
    /// The DEK cache: seeds this server can use without Decrypt.
    cached: HashSet<StoredSeed>,
    next_poll: Instant,
    /// Every Status key_id this server adopted a seed for, in order.
    pub seeds_made: Vec<String>,
    /// When a Status last extended or replaced the write seed.
    pub last_seed_renewal: Option<Instant>,
}

impl<S: KeyManagementService> ApiServer<S> {
    /// Starts as config.go `primeAndProbeKMSv2` does: one check inline, then the poll loop.
    pub async fn start(service: Arc<S>) -> Self {
        let mut server = Self {
            service,
            state: None,
            version: None,
            last_check: None,
            cached: HashSet::new(),
            next_poll: Instant::now(),
            seeds_made: Vec::new(),
            last_seed_renewal: None,
        };
        let primed = server.check().await;
        server.schedule(&primed);
        server
    }

    /// Runs the Status poll loop until `until` (tokio time). primeAndProbeKMSv2 polls every
    /// minute; after a failed check it blocks that loop and re-checks every 10 s until one
    /// succeeds (`blockAndProbeFastUntilSuccess`, whose `wait.PollUntilWithContext` waits one
    /// interval before each try). One loop with the next wait chosen by the last result is the
    /// same schedule.
    pub async fn run_until(&mut self, until: Instant) {
        while self.next_poll <= until {
            tokio::time::sleep_until(self.next_poll).await;
            let result = self.check().await;
            self.schedule(&result);
        }
        tokio::time::sleep_until(until).await;
    }

    /// Runs the loop for `span` from now.
    pub async fn run_for(&mut self, span: Duration) {
        self.run_until(Instant::now() + span).await;
    }

    fn schedule(&mut self, result: &Result<(), String>) {
        let wait = if result.is_ok() { POLL_HEALTHY } else { POLL_FAILING };
        self.next_poll = Instant::now() + wait;
    }

    /// `/readyz` (and `/healthz`): the same check, through its result cache.
    pub async fn readyz(&mut self) -> Result<(), String> {
        self.check().await
    }

    /// A write of one object: envelope.go `TransformToStorage` takes the current state
    /// (`getCurrentState`: none before the first good Status + Encrypt) and refuses it once
    /// expired (`State.ValidateEncryptCapability`). Returns the seed the object is stored with.
    pub fn write(&mut self) -> Result<StoredSeed, String> {
        let state = self.state.as_ref().ok_or("got unexpected nil transformer")?;
        let now = Instant::now();
        if now > state.expires {
            return Err(format!(
                "encryptedDEKSource with keyID {:?} expired {:?} ago",
                state.seed.key_id,
                now - state.expires
            ));
        }
        // NB: envelope.go re-inserts the write seed into the cache on every write.
        self.cached.insert(state.seed.clone());
        Ok(state.seed.clone())
    }

    /// A read of an object stored with `seed`: envelope.go `TransformFromStorage` uses the cached
    /// seed, and calls Decrypt only on a miss (then caches it).
    pub async fn read(&mut self, seed: &StoredSeed) -> Result<(), String> {
        if self.cached.contains(seed) {
            return Ok(());
        }
        let request = DecryptRequest {
            ciphertext: seed.ciphertext.clone(),
            uid: uuid::Uuid::new_v4().to_string(),
            key_id: seed.key_id.clone(),
            annotations: Default::default(),
        };
        self.service
            .decrypt(Request::new(request))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        self.cached.insert(seed.clone());
        Ok(())
    }

    /// The key_id of the current write seed.
    pub fn seed_key_id(&self) -> Option<&str> {
        self.state.as_ref().map(|s| s.seed.key_id.as_str())
    }

    /// config.go `kmsv2PluginProbe.check`: reuse a recent result, else ask Status.
    async fn check(&mut self) -> Result<(), String> {
        let now = Instant::now();
        if let Some((at, ttl, result)) = &self.last_check
            && now.saturating_duration_since(*at) < *ttl
        {
            return result.clone();
        }
        let result = self.status_and_maybe_rotate().await;
        let ttl = if result.is_ok() { CHECK_TTL_OK } else { CHECK_TTL_FAILED };
        self.last_check = Some((Instant::now(), ttl, result.clone()));
        result
    }

    /// config.go `isKMSv2ProviderHealthyAndMaybeRotateDEK`, after a Status call that succeeded
    /// at the gRPC level (a gRPC error returns before any of this).
    async fn status_and_maybe_rotate(&mut self) -> Result<(), String> {
        let status = self
            .service
            .status(Request::new(StatusRequest {}))
            .await
            .map_err(|s| format!("Status failed: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let mut errors = Vec::new();
        if status.healthz != "ok" {
            errors.push(format!("got unexpected healthz status: {}", status.healthz));
        }
        if status.version != "v2" && status.version != "v2beta1" {
            errors.push(format!("unexpected KMSv2 API version {}", status.version));
        } else if self.version.get_or_insert_with(|| status.version.clone()) != &status.version {
            errors.push("KMSv2 API version changed".to_owned());
        }
        // envelope.go `ValidateKeyID`, then the rotation check runs whatever healthz said.
        if status.key_id.is_empty() || status.key_id.len() > 1024 {
            errors.push("got invalid KMSv2 KeyID".to_owned());
        } else if let Err(e) = self.rotate_on_key_id_change(&status.key_id).await {
            errors.push(e);
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }

    /// config.go `rotateDEKOnKeyIDChange`: an unchanged key_id extends the seed's expiry; a new
    /// one gets a new seed through Encrypt, kept only if Encrypt answers with that same key_id.
    async fn rotate_on_key_id_change(&mut self, status_key_id: &str) -> Result<(), String> {
        // NB: upstream starts the clock before the network call.
        let expires = Instant::now() + WRITE_SEED_TTL;
        if let Some(state) = &mut self.state
            && state.seed.key_id == status_key_id
        {
            state.expires = expires;
            self.last_seed_renewal = Some(expires - WRITE_SEED_TTL);
            return Ok(());
        }
        let mut plaintext = vec![0u8; 32];
        getrandom(&mut plaintext);
        let request = EncryptRequest { plaintext, uid: uuid::Uuid::new_v4().to_string() };
        let response = self
            .service
            .encrypt(Request::new(request))
            .await
            .map_err(|s| format!("failed to rotate DEK: Encrypt: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        // envelope.go `GenerateTransformer` validates the answer like a stored object.
        if response.ciphertext.is_empty() || response.ciphertext.len() > 1024 {
            return Err("failed to rotate DEK: bad ciphertext length".to_owned());
        }
        if response.key_id != status_key_id {
            return Err(format!(
                "failed to rotate DEK: Encrypt answered key_id {:?}, Status {:?}",
                response.key_id, status_key_id
            ));
        }
        let seed = StoredSeed { ciphertext: response.ciphertext, key_id: response.key_id };
        self.cached.insert(seed.clone());
        self.seeds_made.push(seed.key_id.clone());
        self.state = Some(WriteState { seed, expires });
        self.last_seed_renewal = Some(expires - WRITE_SEED_TTL);
        Ok(())
    }
}

/// Random seed bytes: the stand-in needs only distinct seeds, not secret ones.
fn getrandom(out: &mut [u8]) {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    for (i, b) in out.iter_mut().enumerate() {
        *b = bytes[i % bytes.len()] ^ (i as u8);
    }
}
