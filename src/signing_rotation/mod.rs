//! Closed-loop rotation of the service-account signing key: `Idle → Rotating → Publishing →
//! Switching → Draining → Retiring → Idle`, with the state in the SigningKeyPolicy status.
//! [`Context::step`] does one bounded unit of work from whatever the status says and writes the
//! result back, so a restarted controller (or `kmsgate signer rotate`) resumes exactly where the
//! last one stopped. The phases decide with the pure functions of [`decide`]; the driver here
//! gathers their evidence through two seams, [`SigningKeyAdmin`] (the Transit key) and [`Fleet`]
//! (the signers' `/status` and the API servers).
//!
//! A schedule that comes due during a run (most often during Drain, which lasts as long as the
//! longest token) does not start a second run: a run never overlaps another, so the key never
//! has two versions in flight. Every run restarts the schedule's clock at its start, and a time
//! that passed meanwhile starts the next run as soon as this one has retired its old version.

mod cluster;
pub mod decide;
mod phases;
mod status;

use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

pub use crate::policy_loop::Step;
use crate::{
    backend::BackendError,
    clock::{Clock, SystemClock},
    crd::{
        Schedule,
        field::SpecError,
        rotation::TransitKey,
        signing::{self, Plan, REQUEST_ANNOTATION, SigningKeyPolicy, SigningPhase, SigningStatus},
    },
    k8s::{Kube, KubeError},
    metrics::ControllerMetrics,
    policy_loop::{self, Parts, PolicyLoop},
    signer_status::SignerStatus,
};

/// The status being written by one step.
type Book<'a> = policy_loop::Book<'a, SigningStatus>;

pub use cluster::{CHECK_TOKEN_SECONDS, ClusterFleet, SIGNER_STATUS_MAX_BYTES, VaultSigningKey};
pub use decide::{Idle, decide_idle};

/// A step could not run; the status is unchanged and the step can be retried.
#[derive(Debug, thiserror::Error)]
pub enum SigningRotationError {
    /// A Kubernetes call failed.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// A Transit call failed.
    #[error("Transit: {0}")]
    Transit(#[from] BackendError),
}

/// Longest error text kept in the status, its conditions and Events.
const MAX_ERROR_BYTES: usize = 1024;

/// A signing key's versions as the loop needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SigningKeyState {
    /// The newest version.
    pub latest: u64,
    /// The oldest version allowed to sign; 0 means "latest" (Transit's own meaning).
    pub min_encryption_version: u64,
    /// The oldest version still published.
    pub min_decryption_version: u64,
    /// The kid of each version still held, as the signers publish it.
    pub kids: BTreeMap<u64, String>,
}

/// The Transit calls the loop makes on the signing key, with an identity allowed to make them.
pub trait SigningKeyAdmin: Send + Sync {
    /// Reads the key's versions and each version's kid.
    fn metadata(
        &self,
        key: &TransitKey,
    ) -> impl Future<Output = Result<SigningKeyState, BackendError>> + Send;
    /// Creates a new version.
    fn rotate(&self, key: &TransitKey) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Sets `min_encryption_version` to `version`: the signers sign with it and nothing older.
    fn pin_signing(
        &self,
        key: &TransitKey,
        version: u64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Raises `min_decryption_version` to `version`: FetchKeys stops offering older versions.
    fn retire_below(
        &self,
        key: &TransitKey,
        version: u64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// What one API server's own `/metrics` says about the signer's keys.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FetchKeysMetrics {
    /// `apiserver_externaljwt_fetch_keys_success_timestamp` (Unix seconds); `None` when the
    /// series is absent: the server has not flipped to the signer.
    pub fetch_keys_success: Option<f64>,
    /// `process_start_time_seconds` (Unix seconds), when exported.
    pub process_start: Option<f64>,
}

/// One API server, at its own address.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiServerReport {
    /// `host:port` it was read at.
    pub address: String,
    /// Its metrics, or why they could not be read.
    pub metrics: Result<FetchKeysMetrics, String>,
}

/// The fleet the loop proves each step on: the signers and the API servers.
pub trait Fleet: Send + Sync {
    /// The `/status` of the signer at `endpoint` (`http://host:port`), or why it could not be read.
    fn signer_status(&self, endpoint: &str) -> impl Future<Output = Result<SignerStatus, String>> + Send;
    /// Every live API server, each read at its own address; `Err` when they cannot be listed.
    fn api_servers(&self) -> impl Future<Output = Result<Vec<ApiServerReport>, String>> + Send;
    /// The kid in the header of a token a TokenRequest sent to the API server at `address`
    /// returns (the controller's own account, `audience`, a 600 s lifetime); the token itself
    /// never leaves the implementation.
    fn token_kid(&self, address: &str, audience: &str)
    -> impl Future<Output = Result<String, String>> + Send;
}

/// Everything a step needs.
pub struct Context<K, F> {
    /// Kubernetes.
    pub kube: Kube,
    /// The Transit key.
    pub key: K,
    /// The signers and the API servers.
    pub fleet: F,
    /// Metrics.
    pub metrics: Arc<ControllerMetrics>,
    /// Longest wait between checks while waiting on something.
    pub poll: Duration,
    clock: Arc<dyn Clock>,
}

impl<K: SigningKeyAdmin, F: Fleet> Context<K, F> {
    /// A context polling at most every `poll` while waiting.
    pub fn new(kube: Kube, key: K, fleet: F, metrics: Arc<ControllerMetrics>, poll: Duration) -> Self {
        Self { kube, key, fleet, metrics, poll, clock: Arc::new(SystemClock) }
    }

    /// Reads the time from `clock` instead of the system clock (tests run on paused time).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Does one unit of work on policy `name` and records it in the status.
    pub async fn step(&self, name: &str) -> Result<Step, SigningRotationError> {
        policy_loop::step(self, name).await
    }

    /// The signer status endpoints of the plan.
    async fn signer_endpoints(&self, plan: &Plan) -> Result<Vec<String>, KubeError> {
        match &plan.signers {
            signing::SignerSource::Endpoints(endpoints) => Ok(endpoints.clone()),
            signing::SignerSource::Discovery(d) => self.kube.node_endpoints(&d.node_selector, d.port).await,
        }
    }

    /// Every signer's `/status`, by endpoint.
    async fn signer_reports(
        &self,
        plan: &Plan,
    ) -> Result<Vec<(String, Result<SignerStatus, String>)>, KubeError> {
        let mut reports = Vec::new();
        for endpoint in self.signer_endpoints(plan).await? {
            let report = decide::vet_report(self.fleet.signer_status(&endpoint).await);
            reports.push((endpoint, report));
        }
        Ok(reports)
    }
}

impl<K: SigningKeyAdmin, F: Fleet> PolicyLoop for Context<K, F> {
    type Policy = SigningKeyPolicy;
    type Status = SigningStatus;
    type Plan = Plan;
    type Error = SigningRotationError;
    const REQUEST_ANNOTATION: &'static str = REQUEST_ANNOTATION;

    fn parts(&self) -> Parts<'_> {
        Parts { kube: &self.kube, metrics: &self.metrics, clock: &*self.clock, poll: self.poll }
    }

    fn plan(policy: &SigningKeyPolicy) -> Result<Plan, SpecError> {
        signing::parse(&policy.spec)
    }

    fn schedule(plan: &Plan) -> &Schedule {
        &plan.schedule
    }

    /// A suspended policy holds wherever it is; otherwise the run advances, and a failed call is
    /// recorded in the status (see [`Run::errored`]).
    async fn advance<'a>(
        &'a self,
        _policy: &'a SigningKeyPolicy,
        plan: &'a Plan,
        mut book: Book<'a>,
    ) -> (Book<'a>, Result<Step, SigningRotationError>) {
        if plan.suspend {
            let message = format!("suspended by spec.suspend in {}", book.status.phase.as_str());
            book.condition("Suspended", true, "Suspended", &message);
            book.status.message = message;
            return (book, Ok(Step::Rest(self.poll)));
        }
        book.condition("Suspended", false, "Running", "");
        let mut run = Run { ctx: self, plan, book };
        let step = match run.advance().await {
            Ok(step) => {
                run.recovered();
                Ok(step)
            }
            Err(e) => run.errored(e),
        };
        (run.book, step)
    }
}

struct Run<'a, K, F> {
    ctx: &'a Context<K, F>,
    plan: &'a Plan,
    book: Book<'a>,
}

impl<K: SigningKeyAdmin, F: Fleet> Run<'_, K, F> {
    async fn advance(&mut self) -> Result<Step, SigningRotationError> {
        match self.book.status.phase {
            SigningPhase::Idle => self.idle().await,
            SigningPhase::Failed => self.failed().await,
            SigningPhase::Rotating => self.rotating().await,
            SigningPhase::Publishing => self.publishing().await,
            SigningPhase::Switching => self.switching().await,
            SigningPhase::Draining => self.draining().await,
            SigningPhase::Retiring => self.retiring().await,
        }
    }

    fn due(&self) -> bool {
        self.book.due()
    }

    /// Waits at most `at_most` (the poll interval when `None`), with `message` in the status.
    fn wait(&mut self, message: String, at_most: Option<Duration>) -> Step {
        self.book.status.message = message;
        Step::Wait(at_most.map_or(self.ctx.poll, |d| self.ctx.poll.min(d.max(Duration::from_secs(1)))))
    }

    /// Stops the run at the current phase; a new request or the schedule resumes it there.
    fn fail(&mut self, reason: &'static str, message: &str) -> Step {
        self.book.fail(reason, message)
    }

    /// Records a failed call in the status (a `Stalled` condition, an Event, the message) and
    /// counts it against the phase's timeout: a call that keeps failing (a 403, a pin Transit
    /// rejects) stops the run like any other wait that lasts too long. Returns the error while
    /// the timeout has not passed, so the caller retries with its backoff.
    fn errored(&mut self, error: SigningRotationError) -> Result<Step, SigningRotationError> {
        let reason = match error {
            SigningRotationError::Kube(_) => "KubeError",
            SigningRotationError::Transit(_) => "TransitError",
        };
        let message = crate::error::clipped(crate::error::chain(&error), MAX_ERROR_BYTES);
        let plan = self.plan;
        let timeout = match self.book.status.phase {
            SigningPhase::Rotating => Some((plan.rotate.timeout, "RotateFailed")),
            SigningPhase::Publishing => Some((plan.publish.timeout, "PublishTimeout")),
            SigningPhase::Switching => Some((plan.switch.timeout, "SwitchTimeout")),
            SigningPhase::Retiring => Some((plan.retire.timeout, "RetireTimeout")),
            SigningPhase::Idle | SigningPhase::Failed | SigningPhase::Draining => None,
        };
        if let Some((timeout, timed_out)) = timeout
            && self.book.elapsed_since(&self.book.status.phase_started_at) >= timeout
        {
            let message = format!("{reason} for longer than {timeout:?}: {message}");
            return Ok(self.fail(timed_out, &message));
        }
        self.book.stall(reason, &message);
        Err(error)
    }

    /// Clears a `Stalled` condition an error set, once a step runs through again.
    fn recovered(&mut self) {
        let stalled_by_error = self.book.status.conditions.iter().any(|c| {
            c.type_ == "Stalled"
                && c.status == "True"
                && matches!(c.reason.as_str(), "KubeError" | "TransitError")
        });
        if stalled_by_error {
            self.book.condition("Stalled", false, "Recovered", "");
        }
    }

    fn finish(&mut self) -> Step {
        let to = self.book.status.to_version;
        let message = format!(
            "signing moved from version {} to {}; tokens of the old key have expired and it is retired",
            self.book.status.from_version.unwrap_or(0),
            to.unwrap_or(0)
        );
        self.book.finish("Succeeded", &message);
        self.book.status.drain_until.clear();
        // NB: the schedule's clock restarted when the run began; a time that passed since is
        // kept, so Idle starts the next run at once (see the module documentation).
        self.book.status.message = match self.due() {
            true => format!("{message}; the schedule came due during the run, so the next run starts now"),
            false => message,
        };
        match self.due() {
            true => Step::Again,
            false => self.book.rest(),
        }
    }

    fn start(&mut self, trigger: &str, from: u64) {
        self.book.take_request();
        let old = &self.book.status;
        let keep = SigningStatus {
            known_version: old.known_version,
            handled_request: old.handled_request.clone(),
            last_success: old.last_success.clone(),
            retired_below: old.retired_below,
            max_token_expiration_seconds: old.max_token_expiration_seconds,
            max_token_expiration_changed_at: old.max_token_expiration_changed_at.clone(),
            max_token_expiration_observed_since: old.max_token_expiration_observed_since.clone(),
            lower_token_expiration_seconds: old.lower_token_expiration_seconds,
            earlier_tokens_expire_at: old.earlier_tokens_expire_at.clone(),
            conditions: old.conditions.clone(),
            phase: old.phase,
            phase_started_at: old.phase_started_at.clone(),
            ..SigningStatus::default()
        };
        self.book.status = keep;
        self.book.begin(trigger, from);
        // NB: every run restarts the schedule's clock.
        self.book.status.next_run = self.book.next_run();
        self.book.enter(SigningPhase::Rotating);
    }

    async fn idle(&mut self) -> Result<Step, SigningRotationError> {
        let meta = self.ctx.key.metadata(&self.plan.transit).await?;
        // NB: the bound is followed at rest too, so a change between runs is seen when it
        // happens, not at the next run's Publish; signers that cannot be listed wait a poll.
        let mut signing_kid = None;
        if let Ok(signers) = self.ctx.signer_reports(self.plan).await {
            let api_servers = self.ctx.fleet.api_servers().await;
            self.track(&signers, &api_servers);
            signing_kid = decide::agreed_signing_kid(&signers);
        }
        let known = self.book.status.known_version;
        let idle =
            decide_idle(known, &meta, signing_kid.as_deref(), self.book.new_request().is_some(), self.due());
        if !matches!(idle, Idle::Behind { .. }) && self.unstall("KeyBehindStatus", "KeyNotBehind") {
            self.book.status.message = "Transit's key is no longer behind the known version".into();
        }
        match idle {
            Idle::Behind { known } => {
                // NB: a request stays pending (not handled), so it starts its run once an
                // operator has dealt with the key.
                self.book.stall("KeyBehindStatus", &decide::behind_message(known, &meta));
                Ok(self.book.rest())
            }
            Idle::Unsettled => {
                let message = "the key is not pinned (min_encryption_version 0) and the signers do not agree on a signing kid Transit holds; waiting for them to agree, or pin the key";
                self.book.stall("SigningVersionUnknown", message);
                Ok(self.book.rest())
            }
            Idle::Adopt(version) => {
                // NB: the first sight of a key adopts the version that signs now; only later
                // versions start runs.
                self.unstall("SigningVersionUnknown", "SigningVersionKnown");
                self.book.status.known_version = Some(version);
                self.book.status.next_run = self.book.next_run();
                self.book.status.message = format!("adopted signing key version {version}");
                Ok(self.book.rest())
            }
            Idle::Start { trigger, from } => {
                self.start(trigger, from);
                Ok(Step::Again)
            }
            Idle::Rest => Ok(self.book.rest_idle()),
        }
    }

    async fn failed(&mut self) -> Result<Step, SigningRotationError> {
        if !self.book.resume_due() {
            return Ok(self.book.rest());
        }
        self.book.status.next_run = self.book.next_run();
        Ok(self.book.resume())
    }
}
