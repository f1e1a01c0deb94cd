//! The KMS v2 plugin: shared state, background probes, the gRPC service and its socket.

pub mod client;
pub mod health;
pub mod probe;
pub mod service;

pub use crate::serving::{audit_log, socket, tracker as state};

use std::{
    future::Future,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::SystemTime,
};

use serde_json::json;
use tokio::time::Instant;

use crate::{
    backend::{Backend, BackendError, KeyMetadata},
    config::{Config, PluginConfig},
    http::HttpView,
    metrics::{Metrics, code_name},
    proto::v2::key_management_service_server::KeyManagementServiceServer,
    serving,
};
use health::{Health, ProbeRecord};
use state::{KeyTracker, Promoted};

/// Concurrent gRPC streams per connection, advertised in the HTTP/2 SETTINGS.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Per-stream receive window: a KMS request is at most a few KiB.
const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
/// Largest request message: the API server's own limits (1 KiB ciphertext and key_id, 32 KiB of
/// annotations) fit twice over; tonic's default of 4 MiB per stream, times the stream limit,
/// would let one connection pin gigabytes.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The plugin could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The audit log could not be opened.
    #[error(transparent)]
    AuditLog(#[from] audit_log::AuditLogError),
    /// The HTTP endpoint could not bind.
    #[error("http.listen {addr}: {source}")]
    HttpBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// The socket could not be set up.
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
}

/// State shared by the gRPC service, the probes and the HTTP endpoint.
pub struct Shared<B> {
    backend: B,
    config: PluginConfig,
    metrics: Metrics,
    audit: audit_log::AuditLog,
    started: Instant,
    state: Mutex<PluginState>,
    /// Wakes the metadata poll early when a key store answer hints that the key changed.
    repoll: tokio::sync::Notify,
    /// Encrypt and Decrypt calls running now, for the shutdown drain's report.
    in_flight: std::sync::atomic::AtomicUsize,
}

/// What the probes learned.
pub struct PluginState {
    /// Which key version is promoted.
    pub tracker: KeyTracker,
    /// Probe history.
    pub health: Health,
    /// The last key metadata read.
    pub metadata: Option<KeyMetadata>,
    /// The last time the key store reported an older latest version than the promoted one.
    pub rollback_refused: Option<RollbackRefused>,
}

/// A refused rollback, kept for /status.
#[derive(Debug, Clone, Copy)]
pub struct RollbackRefused {
    /// The promoted version, kept.
    pub promoted: u64,
    /// The older latest version the key store reported.
    pub seen: u64,
    /// When.
    pub at: Instant,
}

impl<B: Backend> Shared<B> {
    /// Shared state for a plugin over `backend`.
    pub fn new(backend: B, config: PluginConfig, audit: audit_log::AuditLog, metrics: Metrics) -> Self {
        let tracker = KeyTracker::new(backend.scope().clone(), config.promote_after_polls);
        let health =
            Health::new(config.unhealthy_after_failures, config.staleness_window, config.outage_grace);
        Self {
            backend,
            config,
            metrics,
            audit,
            started: Instant::now(),
            state: Mutex::new(PluginState { tracker, health, metadata: None, rollback_refused: None }),
            repoll: tokio::sync::Notify::new(),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PluginState> {
        // NB: no code panics while holding this lock; if one did, the state is still consistent
        // field by field, so keep serving rather than poison every later call.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The version Encrypt uses now.
    pub fn current(&self) -> Result<Arc<Promoted>, String> {
        self.lock().tracker.current()
    }

    /// In grace mode during an outage, the reason to answer UNAVAILABLE without calling Vault.
    pub fn failing_fast(&self) -> Option<String> {
        self.lock().health.failing_fast(Instant::now())
    }

    /// Status's healthz and key_id, from cached state only.
    pub fn status_now(&self) -> (String, String) {
        let state = self.lock();
        let healthz = match state.health.healthz(&state.tracker, Instant::now()) {
            Ok(()) => "ok".to_owned(),
            Err(reason) => reason,
        };
        let key_id = state.tracker.promoted().map(|p| p.key_id.clone()).unwrap_or_default();
        (healthz, key_id)
    }

    /// Runs a backend call, recording its outcome and latency.
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        crate::serving::timed(&self.metrics, operation, call).await
    }
}

impl<B> Shared<B> {
    /// Starts an audited call; it is recorded exactly once, as CANCELLED if dropped unfinished
    /// (the client reset the stream or closed the connection, so tonic dropped the handler).
    pub(crate) fn begin(
        &self,
        method: &'static str,
        uid: &str,
        key_id: &str,
        peer: audit_log::Peer,
    ) -> Call<'_> {
        self.in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Call {
            in_flight: &self.in_flight,
            metrics: &self.metrics,
            audit: &self.audit,
            method,
            uid: uid.to_owned(),
            key_id: key_id.to_owned(),
            peer,
            started: Instant::now(),
            recorded: false,
        }
    }
}

/// One Encrypt or Decrypt in flight: counted, then recorded in metrics and the audit log, and
/// logged only when it failed or was cancelled (the audit log already has every success).
pub(crate) struct Call<'a> {
    in_flight: &'a std::sync::atomic::AtomicUsize,
    metrics: &'a Metrics,
    audit: &'a audit_log::AuditLog,
    method: &'static str,
    uid: String,
    key_id: String,
    peer: audit_log::Peer,
    started: Instant,
    recorded: bool,
}

impl Call<'_> {
    /// Records the call's result; `key_id` replaces the one given at the start when not empty.
    pub(crate) fn finish<T>(mut self, result: &Result<T, tonic::Status>, key_id: &str) {
        if !key_id.is_empty() {
            key_id.clone_into(&mut self.key_id);
        }
        match result {
            Ok(_) => self.record(tonic::Code::Ok, ""),
            Err(status) => self.record(status.code(), status.message()),
        }
    }

    fn record(&mut self, code: tonic::Code, error: &str) {
        self.recorded = true;
        let (method, uid, key_id) = (self.method, self.uid.as_str(), self.key_id.as_str());
        let elapsed = self.started.elapsed();
        self.metrics.record_grpc(method, code, elapsed.as_secs_f64());
        let latency_ms = audit_log::millis(elapsed);
        match code {
            tonic::Code::Ok => {}
            tonic::Code::Cancelled => {
                tracing::warn!(method, uid, key_id, latency_ms, "KMS call cancelled by the client")
            }
            code => tracing::warn!(
                method,
                uid,
                key_id,
                latency_ms,
                code = code_name(code),
                error,
                "KMS call failed"
            ),
        }
        self.audit.write(&audit_log::Record {
            time: audit_log::now_rfc3339(),
            method,
            uid,
            key_id,
            outcome: code_name(code),
            latency_ms,
            peer: self.peer,
        });
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(tonic::Code::Cancelled, "");
        }
        self.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<B: Backend> HttpView for Shared<B> {
    fn ready(&self) -> Result<(), String> {
        let state = self.lock();
        state.health.healthz(&state.tracker, Instant::now())
    }

    fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let wall = SystemTime::now();
        let at = |t: Instant| {
            humantime::format_rfc3339_millis(wall - now.saturating_duration_since(t)).to_string()
        };
        let probe = |r: Option<ProbeRecord>| r.map(|r| json!({ "at": at(r.at), "ok": r.ok }));
        let state = self.lock();
        let healthz = match state.health.healthz(&state.tracker, now) {
            Ok(()) => "ok".to_owned(),
            Err(reason) => reason,
        };
        let scope = self.backend.scope();
        // NB: the controller reads this field through the same type (rotation/converge.rs).
        let promoted = state
            .tracker
            .promoted()
            .map(|p| crate::plugin_status::PromotedKey { key_id: p.key_id.clone(), version: p.version });
        let candidate = state.tracker.candidate().map(|c| {
            json!({
                "key_id": state.tracker.key_id(c.version, c.created),
                "version": c.version,
                "seen": c.seen,
                "needed": self.config.promote_after_polls,
            })
        });
        json!({
            "node": self.config.node_name,
            "backend": {
                "kind": scope.kind.as_str(),
                "identity": scope.identity,
                "namespace": scope.namespace,
                "mount": scope.mount,
                "key": scope.key,
            },
            "status_version": self.config.status_version.as_str(),
            "healthz": healthz,
            "promoted": promoted,
            "candidate": candidate,
            "latest_version": state.metadata.as_ref().map(|m| m.latest),
            "min_decryption_version": state.metadata.as_ref().map(|m| m.min_decryption_version),
            "last_poll": state.health.last_poll.map(|r| crate::plugin_status::LastPoll {
                at: at(r.at),
                ok: r.ok,
                error: state.health.last_poll_error().map(str::to_owned),
            }),
            "last_round_trip": probe(state.health.last_round_trip),
            "last_good_round_trip": state.health.last_round_trip_ok.map(at),
            "outage_mode": if self.config.outage_grace.is_some() { "grace" } else { "honest" },
            "unreachable_since": state.health.unreachable_since.map(at),
            "failing_fast": state.health.failing_fast(now).is_some(),
            "rollback_refused": state.rollback_refused.map(|r| json!({
                "promoted": r.promoted,
                "seen_latest": r.seen,
                "at": at(r.at),
                "reason": "the key store reported an older latest version than the one promoted; it was not adopted",
            })),
            "started": at(self.started),
            "build": crate::build_info::BuildInfo::current(),
        })
    }

    fn metrics(&self) -> String {
        let since = self.lock().health.last_round_trip_ok.map(|t| t.elapsed().as_secs_f64()).unwrap_or(-1.0);
        self.metrics.seconds_since_round_trip.set(since);
        self.metrics.healthy.set(i64::from(self.ready().is_ok()));
        self.metrics.encode()
    }
}

/// Serves the plugin until `shutdown` resolves, then removes the socket and drains in-flight calls
/// (bounded by `plugin.shutdown_timeout`).
pub async fn serve<B: Backend>(
    config: &Config,
    backend: B,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PluginError> {
    let audit = audit_log::AuditLog::open(&config.plugin.audit_log)?;
    let shared = Arc::new(Shared::new(backend, config.plugin.clone(), audit, metrics));
    let http_task = match config.http_listen {
        Some(addr) => Some(
            serving::http_endpoint(addr, shared.clone())
                .await
                .map_err(|source| PluginError::HttpBind { addr, source })?,
        ),
        None => None,
    };
    let (listener, guard) = socket::bind(&config.plugin.socket)?;
    tracing::info!(endpoint = %config.plugin.socket.spec.endpoint(), "serving KMS v2");
    let probe_task = tokio::spawn(probe::run(shared.clone()));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let spoken = Arc::new(tokio::sync::watch::Sender::new(0usize));
    let mut speaking = spoken.subscribe();
    // NB: the API server multiplexes every call, thousands of Decrypts at start among them, over
    // one connection, so the stream limit must be generous.
    let server = serving::grpc_server(MAX_CONCURRENT_STREAMS, STREAM_WINDOW_BYTES)
        .add_service(
            KeyManagementServiceServer::new(service::KmsService::new(shared.clone()))
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(
            socket::incoming(listener, spoken.clone(), socket::ConnectionLimits::DEFAULT),
            async {
                let _ = stop_rx.await;
            },
        );
    let mut server = std::pin::pin!(server);
    let result = tokio::select! {
        result = &mut server => result.map_err(PluginError::Serve),
        () = shutdown => {
            // NB: unlink first, so the next plugin can bind the path at once while this one drains
            // the connections it already has (an upgrade's gap is the successor's start, not our drain).
            drop(guard);
            // NB: and free http.listen, which the successor binds with the same address.
            if let Some(task) = &http_task {
                task.abort();
            }
            tracing::info!(timeout = ?config.plugin.shutdown_timeout, "stopping: socket removed; draining in-flight calls");
            let _ = stop_tx.send(());
            // NB: the server waits for every connection, also one that never sent the HTTP/2
            // preface and so can hold no call; once only such connections remain, stop.
            let only_silent = async {
                let _ = speaking.wait_for(|n| *n == 0).await;
            };
            tokio::select! {
                result = &mut server => result.map_err(PluginError::Serve),
                () = only_silent => Ok(()),
                () = tokio::time::sleep(config.plugin.shutdown_timeout) => {
                    match shared.in_flight.load(std::sync::atomic::Ordering::Relaxed) {
                        0 => tracing::warn!(
                            "connections stayed open past plugin.shutdown_timeout with no call in flight; closing them"
                        ),
                        calls => tracing::warn!(
                            calls,
                            "in-flight calls did not finish within plugin.shutdown_timeout; exiting anyway"
                        ),
                    }
                    Ok(())
                }
            }
        }
    };
    probe_task.abort();
    if let Some(task) = http_task {
        task.abort();
    }
    tracing::info!("stopped");
    result
}
