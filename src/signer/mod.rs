//! `kmsgate signer`: the ExternalJWTSigner kube-apiserver calls to sign service-account tokens
//! (KEP-740; facts/externaljwt.md). Which keys are published and which version signs are decided
//! apart from I/O ([`keyset`], and the tracker's signer policy in `serving`); a background poll
//! reads the key store and keeps the cache FetchKeys answers from; Sign calls the key store with
//! an explicit version. Both API packages (`v1`, `v1alpha1`) are served on one socket by one
//! implementation ([`service`]).

pub mod keyset;
pub mod service;

use std::{
    future::Future,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use serde::Serialize;
use tokio::time::Instant;

use crate::{
    backend::{BackendError, PublicKey, SigningBackend},
    clock::Clock,
    config::SignerConfig,
    http::HttpView,
    metrics::Metrics,
    serving::{
        self,
        audit_log::{self, AuditLog},
        pause_before_poll, socket,
        tracker::{KeyTracker, Observation},
    },
    signer_status::{PollReport, PublishedKey, SignerStatus, SigningKey},
};
use keyset::KeySet;

/// Kept beyond `max_token_expiration` before a kid that vanished without being retired leaves
/// FetchKeys: kube-apiserver allows clock skew on `exp`, and a token may be issued the moment the
/// key vanished.
pub const VANISHED_MARGIN: Duration = Duration::from_secs(10 * 60);

/// Consecutive polls that found the key store unreachable before Sign fails fast with UNAVAILABLE
/// instead of waiting for its own call to time out.
pub const OUTAGE_AFTER_POLLS: u32 = 2;

/// How soon to poll again after a failed poll, or while no version may sign yet, at most.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Least time between two polls that Sign answers asked for.
const HINTED_POLL_GAP: Duration = Duration::from_secs(1);

/// The signer could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignerError {
    /// The audit log could not be opened.
    #[error(transparent)]
    AuditLog(#[from] audit_log::AuditLogError),
    /// The HTTP endpoint could not bind.
    #[error("signer.http_listen {addr}: {source}")]
    HttpBind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The persisted key set is unusable.
    #[error(transparent)]
    KeySet(#[from] keyset::KeySetError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// The socket could not be set up.
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
}

/// State shared by the gRPC service, the poll and the HTTP endpoint.
pub struct Shared<B> {
    backend: B,
    config: SignerConfig,
    verify_only: Vec<(PublicKey, bool)>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    audit: AuditLog,
    node: String,
    state: Mutex<State>,
    /// Wakes the poll early when a Sign answer hints that the key changed.
    repoll: tokio::sync::Notify,
    /// Held by a Sign that reads the key again after a refusal, so Signs refused together share
    /// one read.
    refusal_read: tokio::sync::Mutex<()>,
}

/// What the poll learned.
struct State {
    tracker: KeyTracker,
    /// What FetchKeys serves; `None` until a poll succeeded or a persisted set was loaded.
    keys: Option<Arc<KeySet>>,
    /// The set came from disk and no poll has succeeded since start.
    from_disk: bool,
    last_poll: Option<(u64, Option<String>)>,
    unreachable_polls: u32,
    persist_error: Option<String>,
    rollback_refused: Option<(u64, u64)>,
    /// Why the persisted key set was not served at start, if it was refused.
    state_file_refused: Option<String>,
}

impl<B: SigningBackend> Shared<B> {
    /// Shared state for a signer over `backend`, serving `persisted` (the last good key set) until
    /// the first poll succeeds. `verify_only` are the keys read from `signer.verify_keys`, each with
    /// its exclude flag.
    pub fn new(
        backend: B,
        config: SignerConfig,
        verify_only: Vec<(PublicKey, bool)>,
        persisted: Option<KeySet>,
        clock: Arc<dyn Clock>,
        audit: AuditLog,
        metrics: Metrics,
    ) -> Self {
        let tracker = KeyTracker::signer(backend.scope().clone(), config.publish_lead);
        let from_disk = persisted.is_some();
        Self {
            backend,
            config,
            verify_only,
            clock,
            metrics,
            audit,
            node: crate::config::hostname(),
            state: Mutex::new(State {
                tracker,
                keys: persisted.map(Arc::new),
                from_disk,
                last_poll: None,
                unreachable_polls: 0,
                persist_error: None,
                rollback_refused: None,
                state_file_refused: None,
            }),
            repoll: tokio::sync::Notify::new(),
            refusal_read: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // NB: no code panics while holding this lock; if one did, the state is still consistent
        // field by field, so keep serving rather than poison every later call.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.clock.now().as_second()).unwrap_or(0)
    }

    /// The key set FetchKeys serves now.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.lock().keys.clone()
    }

    /// The version, kid and algorithm Sign uses now, or why nothing may sign (UNAVAILABLE).
    pub fn signing(&self) -> Result<(u64, String, crate::jwt::Alg), String> {
        let state = self.lock();
        let last = || state.last_poll.as_ref().and_then(|(_, e)| e.clone()).unwrap_or_default();
        if state.tracker.promoted().is_none() && (state.from_disk || state.keys.is_none()) {
            let refused = state
                .state_file_refused
                .as_ref()
                .map(|problem| format!("; the persisted key set was refused: {problem}"))
                .unwrap_or_default();
            return Err(format!(
                "the key store has not been read successfully since start (FetchKeys serves the persisted key \
                 set, if any); last: {}{refused}",
                last()
            ));
        }
        if state.unreachable_polls >= OUTAGE_AFTER_POLLS {
            return Err(format!(
                "key store unreachable for {} consecutive polls; failing fast (FetchKeys still serves the cached \
                 keys); last: {}",
                state.unreachable_polls,
                last()
            ));
        }
        let current = state.tracker.current().map_err(|reason| {
            if state.tracker.promoted().is_none() && state.tracker.conflict().is_none() {
                format!(
                    "no key version may sign yet: none is pinned and none is signer.publish_lead ({}) old",
                    humantime::format_duration(self.config.publish_lead)
                )
            } else {
                reason
            }
        })?;
        let keys = state.keys.as_ref().ok_or("no key set read yet")?;
        let (kid, alg) = keys.signing_key(current.version)?;
        Ok((current.version, kid.to_owned(), alg))
    }

    /// Reads the key once, applies the signing rule and republishes the key set.
    pub async fn poll(&self) {
        let deadline = Instant::now() + self.config.backend_timeout;
        let result = self.timed("metadata", self.backend.metadata(deadline)).await;
        let now = self.now();
        let meta = match result {
            Ok(meta) => meta,
            Err(e) => {
                tracing::warn!(error = %e, "signing key poll failed");
                let mut state = self.lock();
                state.last_poll = Some((now, Some(e.to_string())));
                if matches!(e, BackendError::Unavailable(_) | BackendError::Deadline) {
                    state.unreachable_polls = state.unreachable_polls.saturating_add(1);
                } else {
                    state.unreachable_polls = 0;
                }
                if let BackendError::KeyNotFound(reason) = &e
                    && let Some(Observation::Conflict { reason }) = state.tracker.observe_missing(reason)
                {
                    drop(state);
                    tracing::error!(reason, "refusing to sign: key conflict");
                }
                return;
            }
        };
        let keep = self.config.max_token_expiration + VANISHED_MARGIN;
        let (observation, set, changed) = {
            let mut state = self.lock();
            let observation = state.tracker.observe_at(&meta.key, now);
            if let Observation::RollbackRefused { promoted, seen } = observation {
                state.rollback_refused = Some((promoted, seen));
            }
            // NB: a set read from disk is the previous one too: a kid it holds that the key store
            // no longer lists is a vanished kid, not a new start.
            let set = Arc::new(keyset::publish(state.keys.as_deref(), &meta, &self.verify_only, now, keep));
            let changed = state.keys.as_ref().is_none_or(|old| old.keys != set.keys);
            state.keys = Some(set.clone());
            state.from_disk = false;
            state.last_poll = Some((now, None));
            state.unreachable_polls = 0;
            if let Some(p) = state.tracker.promoted() {
                self.metrics.key_version.set(i64::try_from(p.version).unwrap_or(i64::MAX));
            }
            (observation, set, changed)
        };
        let persisted = set.save(&self.config.state_file).map_err(|e| e.to_string());
        if let Err(e) = &persisted {
            tracing::error!(error = %e, "could not persist the key set; a restart during an outage would serve an older one");
        }
        self.lock().persist_error = persisted.err();
        if changed {
            tracing::info!(kids = ?keyset::kids(&set), "published key set changed");
        }
        for vanished in set.vanished() {
            tracing::warn!(
                kid = vanished.kid,
                version = vanished.version,
                "a published key vanished from the key store without being retired; still serving it until its \
                 tokens expire"
            );
        }
        match observation {
            Observation::Adopted { version } => tracing::info!(version, "signing with key version"),
            Observation::Conflict { reason } => tracing::error!(reason, "refusing to sign: key conflict"),
            Observation::Promoted { from, to } | Observation::Replaced { from, to, .. } => {
                self.metrics.promotions.inc();
                tracing::info!(from, to, "signing with a new key version");
            }
            Observation::RollbackRefused { promoted, seen } => {
                self.metrics.rollbacks_refused.inc();
                tracing::warn!(promoted, seen, "key store reported an older latest version; refused");
            }
            Observation::Pending { .. } | Observation::Unchanged => {}
        }
    }

    /// Polls forever: every `signer.poll_interval`, sooner while failing or when Sign hints at a
    /// changed key.
    pub async fn run_poll(self: Arc<Self>) {
        loop {
            let polled = Instant::now();
            self.poll().await;
            let settled = {
                let state = self.lock();
                // NB: while nothing signs (a version still younger than publish_lead, or none read
                // yet), poll at retry speed so signing starts soon after the version is old enough.
                state.unreachable_polls == 0
                    && state.last_poll.as_ref().is_some_and(|(_, e)| e.is_none())
                    && state.tracker.promoted().is_some()
            };
            let pause =
                if settled { self.config.poll_interval } else { self.config.poll_interval.min(RETRY_MAX) };
            pause_before_poll(pause, HINTED_POLL_GAP, polled, &self.repoll).await;
        }
    }

    /// Runs a key store call, recording its outcome and latency.
    async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        crate::serving::timed(&self.metrics, operation, call).await
    }

    /// The /status document.
    pub fn status_doc(&self) -> SignerStatus {
        let state = self.lock();
        let rfc = |secs: u64| crate::clock::seconds_text(i64::try_from(secs).unwrap_or(i64::MAX));
        let signing = state.tracker.current().ok().and_then(|p| {
            let (kid, alg) = state.keys.as_ref()?.signing_key(p.version).ok()?;
            Some(SigningKey { version: p.version, kid: kid.to_owned(), alg: alg.to_string() })
        });
        let published = state
            .keys
            .as_ref()
            .map(|set| {
                set.keys
                    .iter()
                    .map(|k| PublishedKey {
                        kid: k.kid.clone(),
                        version: k.version,
                        exclude_from_oidc_discovery: k.exclude_from_oidc_discovery,
                        vanished_at: k.vanished_at.map(rfc),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let vanished: Vec<String> = state
            .keys
            .as_ref()
            .map(|set| {
                set.vanished().iter().map(|k| format!("{} (version {:?})", k.kid, k.version)).collect()
            })
            .unwrap_or_default();
        let conflict = match (state.tracker.conflict(), vanished.is_empty()) {
            (Some(reason), _) => Some(reason.to_owned()),
            (None, false) => Some(format!(
                "kids vanished from the key store without min_decryption_version rising above them (a recreated \
                 key, or a restore from an old snapshot); still served from the persisted set until their tokens \
                 expire: {}",
                vanished.join(", ")
            )),
            (None, true) => None,
        };
        SignerStatus {
            signing,
            published,
            data_timestamp: state.keys.as_ref().map(|s| rfc(s.data_timestamp)),
            last_poll: state.last_poll.as_ref().map(|(at, error)| PollReport {
                at: rfc(*at),
                ok: error.is_none(),
                error: error.clone(),
            }),
            conflict,
            max_token_expiration_seconds: Some(self.config.max_token_expiration_seconds()),
            refresh_hint_seconds: Some(self.config.refresh_hint_seconds()),
        }
    }
}

/// The /status document: the shared type plus what people read.
#[derive(Serialize)]
struct StatusPage<'a> {
    node: &'a str,
    #[serde(flatten)]
    status: SignerStatus,
    backend: serde_json::Value,
    served_from_disk: bool,
    unreachable_polls: u32,
    persist_error: Option<String>,
    state_file_refused: Option<String>,
    rollback_refused: Option<serde_json::Value>,
    publish_lead_seconds: u64,
    build: &'static crate::build_info::BuildInfo,
}

impl<B: SigningBackend> HttpView for Shared<B> {
    fn ready(&self) -> Result<(), String> {
        self.signing().map(|_| ())
    }

    fn status(&self) -> serde_json::Value {
        let status = self.status_doc();
        let state = self.lock();
        let scope = self.backend.scope();
        let page = StatusPage {
            node: &self.node,
            status,
            backend: serde_json::json!({
                "kind": scope.kind.as_str(),
                "identity": scope.identity,
                "namespace": scope.namespace,
                "mount": scope.mount,
                "key": scope.key,
            }),
            served_from_disk: state.from_disk,
            unreachable_polls: state.unreachable_polls,
            persist_error: state.persist_error.clone(),
            state_file_refused: state.state_file_refused.clone(),
            rollback_refused: state
                .rollback_refused
                .map(|(signing, seen)| serde_json::json!({"signing": signing, "seen_latest": seen})),
            publish_lead_seconds: self.config.publish_lead.as_secs(),
            build: crate::build_info::BuildInfo::current(),
        };
        serde_json::to_value(page).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        // NB: the signer's round trip is its key poll: the age of the data FetchKeys serves.
        let age = self.keys().map_or(-1.0, |set| self.now().saturating_sub(set.data_timestamp) as f64);
        self.metrics.seconds_since_round_trip.set(age);
        self.metrics.healthy.set(i64::from(self.ready().is_ok()));
        self.metrics.encode()
    }
}

/// Largest request message. Claims are capped at 64 KiB (`jwt::CLAIMS_MAX_BYTES`) by the claims
/// check, which names the limit in an INVALID_ARGUMENT; this cap, four times higher, only stops a
/// request too large to be worth decoding (tonic answers it with OUT_OF_RANGE).
pub const MAX_REQUEST_BYTES: usize = 4 * crate::jwt::CLAIMS_MAX_BYTES;
/// Concurrent streams per connection: kube-apiserver signs one token per TokenRequest.
const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Per-stream receive window: one request.
const STREAM_WINDOW_BYTES: u32 = 128 * 1024;
/// How long SIGTERM waits for Sign calls in flight.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the signer on `listener` until `shutdown` resolves. The caller binds the socket (so
/// tests can serve an in-process signer) and keeps its guard.
pub async fn serve_on<B: SigningBackend>(
    shared: Arc<Shared<B>>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SignerError> {
    use crate::proto::externaljwt::{v1, v1alpha1};
    let poll_task = tokio::spawn(shared.clone().run_poll());
    let spoken = Arc::new(tokio::sync::watch::Sender::new(0usize));
    let service = service::SignerService::new(shared.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = serving::grpc_server(MAX_CONCURRENT_STREAMS, STREAM_WINDOW_BYTES)
        .add_service(
            v1::external_jwt_signer_server::ExternalJwtSignerServer::new(service.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            v1alpha1::external_jwt_signer_server::ExternalJwtSignerServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .serve_with_incoming_shutdown(
            socket::incoming(listener, spoken, socket::ConnectionLimits::DEFAULT),
            async {
                let _ = stop_rx.await;
            },
        );
    let mut server = std::pin::pin!(server);
    let result = tokio::select! {
        result = &mut server => result.map_err(SignerError::Serve),
        () = shutdown => {
            let _ = stop_tx.send(());
            tokio::select! {
                result = &mut server => result.map_err(SignerError::Serve),
                () = tokio::time::sleep(SHUTDOWN_TIMEOUT) => Ok(()),
            }
        }
    };
    poll_task.abort();
    result
}

/// `kmsgate signer`: loads the persisted key set, binds the socket and the HTTP endpoint, and
/// serves until `shutdown` resolves.
pub async fn serve<B: SigningBackend>(
    config: &SignerConfig,
    backend: B,
    verify_only: Vec<(PublicKey, bool)>,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SignerError> {
    let audit = AuditLog::open(&config.audit_log)?;
    let clock: Arc<dyn Clock> = Arc::new(crate::clock::SystemClock);
    let now = u64::try_from(clock.now().as_second()).unwrap_or(0);
    // NB: the file only bridges a key store outage at start; one that cannot be trusted or read
    // must not keep a signer with a healthy key store from starting.
    let (persisted, refused) = match KeySet::load(&config.state_file, now) {
        Ok(set) => (set, None),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the persisted key set; starting from the key store alone");
            (None, Some(e.to_string()))
        }
    };
    if let Some(set) = &persisted {
        tracing::info!(
            kids = ?keyset::kids(set),
            data_timestamp = set.data_timestamp,
            "serving the persisted key set until the key store answers"
        );
    }
    let shared =
        Arc::new(Shared::new(backend, config.clone(), verify_only, persisted, clock, audit, metrics));
    if let Some(problem) = refused {
        shared.lock().state_file_refused = Some(problem);
    }
    // NB: read the key store once before accepting calls, so a healthy start answers FetchKeys
    // with fresh keys; if it is down, the persisted set (if any) answers instead.
    shared.poll().await;
    let http_task = match config.http_listen {
        Some(addr) => Some(
            serving::http_endpoint(addr, shared.clone())
                .await
                .map_err(|source| SignerError::HttpBind { addr, source })?,
        ),
        None => None,
    };
    let (listener, guard) = socket::bind(&config.socket)?;
    tracing::info!(endpoint = %config.socket.spec.plain(), "serving ExternalJWTSigner v1 and v1alpha1");
    let result = serve_on(shared, listener, async move {
        shutdown.await;
        // NB: unlink first, so a successor can bind the path at once while this one drains.
        drop(guard);
        tracing::info!("stopping: socket removed; draining in-flight calls");
    })
    .await;
    if let Some(task) = http_task {
        task.abort();
    }
    result
}
