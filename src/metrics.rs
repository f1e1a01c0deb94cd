//! The Prometheus registry for the plugin. Labels carry only method names, codes and outcomes:
//! never a key_id, uid, token or any data.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::build_info::BuildInfo;

/// gRPC method and result code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// `Status`, `Encrypt` or `Decrypt`.
    pub method: &'static str,
    /// The gRPC code name, e.g. `OK`, `INVALID_ARGUMENT`.
    pub code: &'static str,
}

/// gRPC method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `Status`, `Encrypt` or `Decrypt`.
    pub method: &'static str,
}

/// Key store operation and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `metadata`, `encrypt` or `decrypt`.
    pub operation: &'static str,
    /// `ok` or the error kind.
    pub outcome: &'static str,
}

/// Key store operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `metadata`, `encrypt` or `decrypt`.
    pub operation: &'static str,
}

/// Outcome of a token renewal or login.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// A configured Vault address (configuration, never a secret).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddressLabels {
    /// The address as configured.
    pub address: String,
}

/// The Vault client's metrics, prefixed `kmsgate_vault_`.
#[derive(Clone, Default)]
pub struct VaultMetrics {
    /// Seconds until the token expires (-1 when unknown or never).
    pub token_ttl_seconds: Gauge<f64, AtomicU64>,
    /// Token renewals by outcome.
    pub renewals: Family<OutcomeLabels, Counter>,
    /// Logins (and token file reloads) by outcome.
    pub logins: Family<OutcomeLabels, Counter>,
    /// 1 for the address calls go to now, 0 for the others.
    pub current_address: Family<AddressLabels, Gauge>,
    /// Moves from one address to another.
    pub failovers: Counter,
    /// Failed attempts per address.
    pub address_errors: Family<AddressLabels, Counter>,
    /// Calls waiting for a slot under `vault.max_concurrent_calls`.
    pub calls_waiting: Gauge,
    /// Transit batch Decrypt calls (each carrying two or more waiting Decrypts).
    pub batch_calls: Counter,
    /// Decrypts served through batch calls.
    pub batched_items: Counter,
}

/// Registers `kmsgate_build_info`: always 1, its labels name this build (see [`BuildInfo::labels`]).
fn register_build_info(registry: &mut Registry) {
    let info = Family::<Vec<(String, String)>, Gauge>::default();
    info.get_or_create(&BuildInfo::current().labels()).set(1);
    registry.register("build_info", "This build: version, git commit, rustc, crypto and TLS crates", info);
}

impl VaultMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        let vault = registry.sub_registry_with_prefix("vault");
        vault.register(
            "token_ttl_seconds",
            "Seconds until the Vault token expires (-1 unknown)",
            self.token_ttl_seconds.clone(),
        );
        vault.register("token_renewals", "Vault token renewals by outcome", self.renewals.clone());
        vault.register("logins", "Vault logins and token reloads by outcome", self.logins.clone());
        vault.register("current_address", "1 for the Vault address in use", self.current_address.clone());
        vault.register("failovers", "Moves to another Vault address", self.failovers.clone());
        vault.register("address_errors", "Failed Vault attempts per address", self.address_errors.clone());
        vault.register(
            "calls_waiting",
            "Vault calls waiting for a concurrency slot",
            self.calls_waiting.clone(),
        );
        vault.register("batch_calls", "Transit batch Decrypt calls", self.batch_calls.clone());
        vault.register(
            "batched_items",
            "Decrypts served through Transit batch calls",
            self.batched_items.clone(),
        );
    }
}

/// The success counter and latency histogram of one gRPC method or key store operation, looked
/// up in their families once at start, so a call updates them without hashing its labels.
#[derive(Clone)]
pub struct Handles {
    /// Calls that succeeded (`code="OK"`, `outcome="ok"`).
    pub ok: Counter,
    /// Latency of every call, whatever its result.
    pub duration: Histogram,
}

/// The gRPC methods whose handles are resolved at start.
const METHODS: [&str; 3] = ["Status", "Encrypt", "Decrypt"];
/// The key store operations whose handles are resolved at start.
const OPERATIONS: [&str; 3] = ["metadata", "encrypt", "decrypt"];

/// Every metric the plugin exports, prefixed `kmsgate_`.
pub struct Metrics {
    registry: Registry,
    /// The Vault client's metrics (registered even when the backend is the keyring).
    pub vault: VaultMetrics,
    /// gRPC requests by method and code.
    pub grpc_requests: Family<GrpcLabels, Counter>,
    /// gRPC latency by method.
    pub grpc_duration: Family<MethodLabels, Histogram>,
    /// Key store (Transit or keyring) calls by operation and outcome.
    pub backend_calls: Family<BackendLabels, Counter>,
    /// Key store latency by operation.
    pub backend_duration: Family<OperationLabels, Histogram>,
    /// The promoted key version.
    pub key_version: Gauge,
    /// Seconds since the last successful encrypt+decrypt round trip (-1 before the first).
    pub seconds_since_round_trip: Gauge<f64, AtomicU64>,
    /// 1 when Status answers "ok" (Encrypt and Decrypt would work), 0 otherwise.
    pub healthy: Gauge,
    /// Key version promotions.
    pub promotions: Counter,
    /// Lower key versions seen and refused.
    pub rollbacks_refused: Counter,
    /// Handles of each of [`METHODS`], in that order.
    methods: [Handles; 3],
    /// Handles of each of [`OPERATIONS`], in that order.
    operations: [Handles; 3],
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kmsgate");
        let buckets = || Histogram::new(exponential_buckets(0.0001, 2.0, 17));
        let grpc_requests = Family::default();
        let grpc_duration =
            Family::<MethodLabels, Histogram>::new_with_constructor(buckets as fn() -> Histogram);
        let backend_calls = Family::default();
        let backend_duration =
            Family::<OperationLabels, Histogram>::new_with_constructor(buckets as fn() -> Histogram);
        let key_version = Gauge::default();
        let seconds_since_round_trip = Gauge::default();
        let healthy = Gauge::default();
        let promotions = Counter::default();
        let rollbacks_refused = Counter::default();
        registry.register("grpc_requests", "gRPC requests by method and code", grpc_requests.clone());
        registry.register("grpc_request_duration_seconds", "gRPC latency by method", grpc_duration.clone());
        registry.register(
            "backend_calls",
            "Key store (Transit) calls by operation and outcome",
            backend_calls.clone(),
        );
        registry.register(
            "backend_call_duration_seconds",
            "Key store (Transit) call latency",
            backend_duration.clone(),
        );
        registry.register("key_version", "Promoted key version", key_version.clone());
        registry.register(
            "seconds_since_last_round_trip",
            "Seconds since the last successful encrypt+decrypt probe (-1 before the first)",
            seconds_since_round_trip.clone(),
        );
        registry.register("healthy", "1 when Status answers ok, 0 otherwise", healthy.clone());
        registry.register("key_promotions", "Key version promotions", promotions.clone());
        registry.register(
            "key_rollbacks_refused",
            "Lower key versions seen and refused",
            rollbacks_refused.clone(),
        );
        let vault = VaultMetrics::default();
        vault.register(&mut registry);
        register_build_info(&mut registry);
        let methods = METHODS.map(|method| Handles {
            ok: grpc_requests.get_or_create_owned(&GrpcLabels { method, code: "OK" }),
            duration: grpc_duration.get_or_create_owned(&MethodLabels { method }),
        });
        let operations = OPERATIONS.map(|operation| Handles {
            ok: backend_calls.get_or_create_owned(&BackendLabels { operation, outcome: "ok" }),
            duration: backend_duration.get_or_create_owned(&OperationLabels { operation }),
        });
        Self {
            registry,
            methods,
            operations,
            vault,
            grpc_requests,
            grpc_duration,
            backend_calls,
            backend_duration,
            key_version,
            seconds_since_round_trip,
            healthy,
            promotions,
            rollbacks_refused,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // NB: encoding into a String only fails if a metric's encoder fails, which none here do.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Counts one gRPC call of `method` with result `code` and observes its latency.
    pub fn record_grpc(&self, method: &'static str, code: tonic::Code, seconds: f64) {
        match METHODS.iter().position(|m| *m == method).map(|i| &self.methods[i]) {
            Some(handles) => {
                if code == tonic::Code::Ok {
                    handles.ok.inc();
                } else {
                    self.grpc_requests.get_or_create(&GrpcLabels { method, code: code_name(code) }).inc();
                }
                handles.duration.observe(seconds);
            }
            None => {
                self.grpc_requests.get_or_create(&GrpcLabels { method, code: code_name(code) }).inc();
                self.grpc_duration.get_or_create(&MethodLabels { method }).observe(seconds);
            }
        }
    }

    /// Counts one key store call of `operation` with `outcome` and observes its latency.
    pub fn record_backend(&self, operation: &'static str, outcome: &'static str, seconds: f64) {
        match OPERATIONS.iter().position(|o| *o == operation).map(|i| &self.operations[i]) {
            Some(handles) => {
                if outcome == "ok" {
                    handles.ok.inc();
                } else {
                    self.backend_calls.get_or_create(&BackendLabels { operation, outcome }).inc();
                }
                handles.duration.observe(seconds);
            }
            None => {
                self.backend_calls.get_or_create(&BackendLabels { operation, outcome }).inc();
                self.backend_duration.get_or_create(&OperationLabels { operation }).observe(seconds);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The canonical gRPC code name, as metrics and audit records show it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A rotation phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `Idle`, `Rotating`, ... `Failed`.
    pub phase: &'static str,
}

/// A resource and what a write did.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    /// `secrets`, `deployments.apps`.
    pub resource: String,
    /// `rewritten`, `unchanged`, `conflict`, `skipped` or `failed`.
    pub outcome: &'static str,
}

/// The controller's metrics: phase, objects, phase durations, last success.
pub struct ControllerMetrics {
    registry: Registry,
    /// 1 for the current phase, 0 for the others.
    pub phase: Family<PhaseLabels, Gauge>,
    /// Objects handled by outcome.
    pub objects: Family<ObjectLabels, Counter>,
    /// Time spent in each phase of finished phases.
    pub phase_duration: Family<PhaseLabels, Histogram>,
    /// Unix time of the last successful rotation.
    pub last_success: Gauge<f64, AtomicU64>,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// The controller's Vault client.
    pub vault: VaultMetrics,
    /// Legacy token Secrets rotated.
    pub tokens_rotated: Counter,
    /// Managed tokens issued or refreshed.
    pub tokens_refreshed: Counter,
    /// Token rotations or issues that failed, by flow (`legacy`, `managed`).
    pub tokens_failed: Family<FlowLabels, Counter>,
    /// Unix time of the soonest expiry among managed tokens (0 when there are none).
    pub tokens_earliest_expiry: Gauge<f64, AtomicU64>,
    /// Unix time the schedule next starts a rotation (0: none scheduled).
    pub next_run: Gauge<f64, AtomicU64>,
    /// The latest verification's counts, by class.
    pub verification: Family<ClassLabels, Gauge>,
    /// The signing-key loop's metrics.
    pub signing: SigningMetrics,
}

/// The signing-key rotation loop's metrics, prefixed `kmsgate_signing_rotation_`. Like the
/// data-key loop's, they carry phases and member kinds only: never a kid, endpoint or address.
#[derive(Clone)]
pub struct SigningMetrics {
    /// 1 for the current phase, 0 for the others.
    pub phase: Family<PhaseLabels, Gauge>,
    /// Time spent in each finished phase.
    pub phase_duration: Family<PhaseLabels, Histogram>,
    /// Unix time of the last successful run.
    pub last_success: Gauge<f64, AtomicU64>,
    /// Unix time the schedule next starts a run (0: none scheduled).
    pub next_run: Gauge<f64, AtomicU64>,
    /// Unix time the current Drain ends (0: not draining).
    pub drain_until: Gauge<f64, AtomicU64>,
    /// The token-lifetime bound Drain uses, in seconds (0: none reported yet).
    pub token_lifetime_bound: Gauge,
    /// Signers or API servers not there yet in the current phase, by kind.
    pub stragglers: Family<MemberLabels, Gauge>,
}

/// What kind of fleet member a count is about.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    /// `signer` or `api_server`.
    pub member: &'static str,
}

impl SigningMetrics {
    fn register(&self, registry: &mut Registry) {
        let signing = registry.sub_registry_with_prefix("signing_rotation");
        signing.register("phase", "Current signing-key rotation phase (1 = current)", self.phase.clone());
        signing.register(
            "phase_duration_seconds",
            "Time spent in each finished signing-key rotation phase",
            self.phase_duration.clone(),
        );
        signing.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful signing-key rotation",
            self.last_success.clone(),
        );
        signing.register(
            "next_run_timestamp_seconds",
            "Unix time the schedule next starts a signing-key rotation (0: none scheduled)",
            self.next_run.clone(),
        );
        signing.register(
            "drain_until_timestamp_seconds",
            "Unix time the current Drain ends (0: not draining)",
            self.drain_until.clone(),
        );
        signing.register(
            "token_lifetime_bound_seconds",
            "The largest token lifetime Drain waits for (0: no signer reported one)",
            self.token_lifetime_bound.clone(),
        );
        signing.register(
            "stragglers",
            "Signers or API servers not there yet in the current phase",
            self.stragglers.clone(),
        );
    }

    /// The series every policy loop keeps, this loop's.
    pub fn series(&self) -> LoopSeries<'_> {
        LoopSeries {
            phase: &self.phase,
            phase_duration: &self.phase_duration,
            last_success: &self.last_success,
            next_run: &self.next_run,
        }
    }
}

/// The series every policy loop keeps, whichever loop's they are.
#[derive(Clone, Copy)]
pub struct LoopSeries<'a> {
    /// 1 for the current phase, 0 for the others.
    pub phase: &'a Family<PhaseLabels, Gauge>,
    /// Time spent in each finished phase.
    pub phase_duration: &'a Family<PhaseLabels, Histogram>,
    /// Unix time of the last successful run.
    pub last_success: &'a Gauge<f64, AtomicU64>,
    /// Unix time the schedule next starts a run (0: none scheduled).
    pub next_run: &'a Gauge<f64, AtomicU64>,
}

impl LoopSeries<'_> {
    /// Marks `current` as the phase, and every other of `phases` as not.
    pub fn set_phase(&self, phases: impl IntoIterator<Item = &'static str>, current: &'static str) {
        for name in phases {
            self.phase.get_or_create(&PhaseLabels { phase: name }).set(i64::from(name == current));
        }
    }
}

/// A class of stored values in a verification.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// `current`, `old_key`, `invalid`, `unencrypted` or `unmapped`.
    pub class: &'static str,
}

/// A token flow.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    /// `legacy` or `managed`.
    pub flow: &'static str,
}

impl ControllerMetrics {
    /// An empty registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kmsgate");
        let phase = Family::<PhaseLabels, Gauge>::default();
        let objects = Family::<ObjectLabels, Counter>::default();
        let phase_duration = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1.0, 4.0, 10))
        });
        let last_success = Gauge::<f64, AtomicU64>::default();
        let leader = Gauge::default();
        registry.register("rotation_phase", "Current rotation phase (1 = current)", phase.clone());
        registry.register(
            "rotation_objects",
            "Objects handled by the migrate phase, by outcome",
            objects.clone(),
        );
        registry.register(
            "rotation_phase_duration_seconds",
            "Time spent in each finished rotation phase",
            phase_duration.clone(),
        );
        registry.register(
            "rotation_last_success_timestamp_seconds",
            "Unix time of the last successful rotation",
            last_success.clone(),
        );
        registry.register("controller_leader", "1 while this replica holds the leader lease", leader.clone());
        let vault = VaultMetrics::default();
        vault.register(&mut registry);
        register_build_info(&mut registry);
        let tokens_rotated = Counter::default();
        let tokens_refreshed = Counter::default();
        let tokens_failed = Family::<FlowLabels, Counter>::default();
        let tokens_earliest_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "tokens_rotated",
            "Legacy service-account token Secrets rotated",
            tokens_rotated.clone(),
        );
        registry.register(
            "tokens_refreshed",
            "Managed bound tokens issued or refreshed",
            tokens_refreshed.clone(),
        );
        registry.register(
            "tokens_failed",
            "Token rotations or issues that failed, by flow",
            tokens_failed.clone(),
        );
        registry.register(
            "tokens_earliest_expiry_timestamp_seconds",
            "Unix time of the soonest expiry among managed tokens (0: none)",
            tokens_earliest_expiry.clone(),
        );
        let next_run = Gauge::<f64, AtomicU64>::default();
        let verification = Family::<ClassLabels, Gauge>::default();
        registry.register(
            "rotation_next_run_timestamp_seconds",
            "Unix time the schedule next starts a rotation (0: none scheduled)",
            next_run.clone(),
        );
        registry.register(
            "rotation_verification_objects",
            "Stored values by class in the latest verification (old_key, unencrypted: not done)",
            verification.clone(),
        );
        let signing = SigningMetrics {
            phase: Family::default(),
            // NB: up to 4^11 s (about 48 days) in the last finite bucket: a Drain can last a year.
            phase_duration: Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 4.0, 12))
            }),
            last_success: Gauge::default(),
            next_run: Gauge::default(),
            drain_until: Gauge::default(),
            token_lifetime_bound: Gauge::default(),
            stragglers: Family::default(),
        };
        signing.register(&mut registry);
        Self {
            registry,
            signing,
            phase,
            objects,
            phase_duration,
            last_success,
            leader,
            vault,
            tokens_rotated,
            tokens_refreshed,
            tokens_failed,
            tokens_earliest_expiry,
            next_run,
            verification,
        }
    }

    /// Counts a failed token operation of `flow`.
    pub fn token_failures(&self, flow: &'static str) -> u64 {
        self.tokens_failed.get_or_create(&FlowLabels { flow }).inc()
    }

    /// Marks `current` as the rotation phase, and every other of `phases` as not.
    pub fn set_phase(&self, phases: impl IntoIterator<Item = &'static str>, current: &'static str) {
        self.rotation().set_phase(phases, current);
    }

    /// The series every policy loop keeps, the data-key rotation's.
    pub fn rotation(&self) -> LoopSeries<'_> {
        LoopSeries {
            phase: &self.phase,
            phase_duration: &self.phase_duration,
            last_success: &self.last_success,
            next_run: &self.next_run,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // NB: encoding into a String only fails if a metric's encoder fails, which none here do.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, series: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(series))
    }

    #[test]
    fn resolved_handles_count_the_same_series_as_the_families() {
        let metrics = Metrics::new();
        metrics.record_grpc("Encrypt", tonic::Code::Ok, 0.001);
        metrics.record_grpc("Encrypt", tonic::Code::Ok, 0.001);
        metrics.record_grpc("Encrypt", tonic::Code::Unavailable, 0.001);
        metrics.record_grpc("Sign", tonic::Code::Ok, 0.001);
        metrics.record_backend("encrypt", "ok", 0.001);
        metrics.record_backend("encrypt", "deadline", 0.001);
        let text = metrics.encode();
        let at = |series: &str| line(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
        assert_eq!(
            at("kmsgate_grpc_requests_total{method=\"Encrypt\",code=\"OK\"}").split(' ').nth(1),
            Some("2")
        );
        assert_eq!(
            at("kmsgate_grpc_requests_total{method=\"Encrypt\",code=\"UNAVAILABLE\"}").split(' ').nth(1),
            Some("1")
        );
        assert_eq!(
            at("kmsgate_grpc_requests_total{method=\"Sign\",code=\"OK\"}").split(' ').nth(1),
            Some("1")
        );
        assert_eq!(
            at("kmsgate_grpc_request_duration_seconds_count{method=\"Encrypt\"}").split(' ').nth(1),
            Some("3")
        );
        assert_eq!(
            at("kmsgate_backend_calls_total{operation=\"encrypt\",outcome=\"ok\"}").split(' ').nth(1),
            Some("1")
        );
        assert_eq!(
            at("kmsgate_backend_calls_total{operation=\"encrypt\",outcome=\"deadline\"}").split(' ').nth(1),
            Some("1")
        );
        assert_eq!(
            at("kmsgate_backend_call_duration_seconds_count{operation=\"encrypt\"}").split(' ').nth(1),
            Some("2")
        );
    }
}
