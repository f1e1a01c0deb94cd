//! The two seams over the real systems: [`VaultSigningKey`] over Vault/OpenBao Transit, and
//! [`ClusterFleet`] over the signers' `/status` endpoints and each API server at its own address.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{ApiServerReport, FetchKeysMetrics, Fleet, SigningKeyAdmin, SigningKeyState};
use crate::{
    backend::BackendError,
    clock::{Clock, SystemClock},
    crd::rotation::TransitKey,
    k8s::{FETCH_KEYS_SUCCESS_METRIC, Kube, MAX_API_SERVERS, PROCESS_START_METRIC, gauge, live_leases},
    signer_status::SignerStatus,
    transit::{Transit, VaultClient, read_signing_key},
};

/// Deadline of each Transit call the loop makes.
const TRANSIT_DEADLINE: Duration = Duration::from_secs(10);

/// The most a signer's `/status` may send: one entry per published kid, a few KiB in practice,
/// so a larger answer is not a signer and must not fill the controller's memory.
pub const SIGNER_STATUS_MAX_BYTES: usize = 256 * 1024;

/// The lifetime of the TokenRequest that reads an API server's signing kid: the shortest the
/// TokenRequest API grants: `expirationSeconds` under `MinTokenAgeSec` (10 minutes) is refused
/// (pkg/apis/authentication/validation/validation.go, `ValidateTokenRequest`).
pub const CHECK_TOKEN_SECONDS: i64 = 600;

/// [`SigningKeyAdmin`] over Vault/OpenBao Transit, with the controller's identity.
pub struct VaultSigningKey {
    client: Arc<VaultClient>,
    identity: String,
    namespace: String,
}

impl VaultSigningKey {
    /// Uses `client` (the controller's identity) in Vault namespace `namespace` of cluster
    /// `identity`.
    pub fn new(client: Arc<VaultClient>, identity: &str, namespace: &str) -> Self {
        Self { client, identity: identity.to_owned(), namespace: namespace.to_owned() }
    }

    fn transit(&self, key: &TransitKey) -> Transit {
        Transit::new(self.client.clone(), &self.identity, &self.namespace, &key.mount, &key.key)
    }
}

impl SigningKeyAdmin for VaultSigningKey {
    async fn metadata(&self, key: &TransitKey) -> Result<SigningKeyState, BackendError> {
        let deadline = Instant::now() + TRANSIT_DEADLINE;
        let (_, meta) = read_signing_key(&self.client, &key.mount, &key.key, deadline).await?;
        Ok(SigningKeyState {
            latest: meta.key.latest,
            min_encryption_version: meta.key.min_encryption_version,
            min_decryption_version: meta.key.min_decryption_version,
            kids: meta.public_keys.iter().map(|(version, public)| (*version, public.kid())).collect(),
        })
    }

    async fn rotate(&self, key: &TransitKey) -> Result<(), BackendError> {
        self.transit(key).rotate(Instant::now() + TRANSIT_DEADLINE).await
    }

    async fn pin_signing(&self, key: &TransitKey, version: u64) -> Result<(), BackendError> {
        self.transit(key).set_min_encryption_version(version, Instant::now() + TRANSIT_DEADLINE).await
    }

    async fn retire_below(&self, key: &TransitKey, version: u64) -> Result<(), BackendError> {
        self.transit(key).set_min_decryption_version(version, Instant::now() + TRANSIT_DEADLINE).await
    }
}

/// [`Fleet`] over the cluster: each signer's `/status` over plain HTTP on the node network, and
/// each API server at its own address (the `default/kubernetes` EndpointSlice) with the cluster
/// CA and the controller's token, as the data-key loop's convergence reads them.
pub struct ClusterFleet {
    kube: Kube,
    http: reqwest::Client,
    namespace: String,
    service_account: String,
    clock: Arc<dyn Clock>,
}

impl ClusterFleet {
    /// Reads through `kube`; TokenRequests are for `service_account` (`namespace/name`, the
    /// controller's own, the one account its RBAC lets it ask tokens for).
    pub fn new(kube: Kube, service_account: &str) -> Self {
        let (namespace, name) = service_account.split_once('/').unwrap_or(("", service_account));
        // NB: a short timeout keeps a dead node from stalling the loop, and a signer never
        // redirects, so an answer that does is not followed elsewhere.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self {
            kube,
            http,
            namespace: namespace.to_owned(),
            service_account: name.to_owned(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Judges the identity Leases' freshness by `clock` (the loop's), not the system clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    async fn addresses(&self) -> Result<Vec<SocketAddr>, String> {
        let slice = self.kube.api_server_addresses().await.map_err(|e| crate::error::chain(&e))?;
        let Some(port) = slice.port else {
            return Err("EndpointSlice default/kubernetes names no port".into());
        };
        // NB: the data-key loop's rule (rotation::converge): the identity Leases say which API
        // servers run, the EndpointSlice where they are. A running server missing from the slice
        // (not ready, or its endpoint reconciler behind) would otherwise go unchecked and could
        // still verify only against keys it never fetched.
        let leases = self.kube.identity_leases().await.map_err(|e| crate::error::chain(&e))?;
        let live = live_leases(&leases, self.clock.now());
        if slice.addresses.len() != live.len() {
            return Err(format!(
                "the EndpointSlice default/kubernetes lists {} API server addresses but {} identity \
                 Leases are live; waiting until they agree, so that no running API server goes unchecked",
                slice.addresses.len(),
                live.len()
            ));
        }
        if slice.addresses.len() > MAX_API_SERVERS {
            return Err(format!(
                "{} API server addresses; at most {MAX_API_SERVERS} are read",
                slice.addresses.len()
            ));
        }
        Ok(slice.addresses.into_iter().map(|ip| SocketAddr::new(ip, port)).collect())
    }
}

impl Fleet for ClusterFleet {
    async fn signer_status(&self, endpoint: &str) -> Result<SignerStatus, String> {
        let url = format!("{}/status", endpoint.trim_end_matches('/'));
        let response = self.http.get(&url).send().await.map_err(|e| crate::error::chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let body = crate::http::read_capped(response, SIGNER_STATUS_MAX_BYTES)
            .await
            .map_err(|e| crate::error::chain(&e))?;
        serde_json::from_slice(&body).map_err(|e| format!("not a signer /status: {e}"))
    }

    async fn api_servers(&self) -> Result<Vec<ApiServerReport>, String> {
        let access = self
            .kube
            .api_server_access()
            .map_err(|why| format!("API servers cannot be read directly: {why}"))?;
        let mut reports = Vec::new();
        for address in self.addresses().await? {
            let metrics = access
                .metric_lines(address, &[FETCH_KEYS_SUCCESS_METRIC, PROCESS_START_METRIC])
                .await
                .map(|lines| FetchKeysMetrics {
                    fetch_keys_success: gauge(&lines, FETCH_KEYS_SUCCESS_METRIC),
                    process_start: gauge(&lines, PROCESS_START_METRIC),
                });
            reports.push(ApiServerReport { address: address.to_string(), metrics });
        }
        Ok(reports)
    }

    async fn token_kid(&self, address: &str, audience: &str) -> Result<String, String> {
        let access = self
            .kube
            .api_server_access()
            .map_err(|why| format!("API servers cannot be read directly: {why}"))?;
        let address: SocketAddr = address.parse().map_err(|_| format!("{address:?} is not host:port"))?;
        access
            .token_kid_at(address, &self.namespace, &self.service_account, audience, CHECK_TOKEN_SECONDS)
            .await
    }
}
