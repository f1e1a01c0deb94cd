//! Closed-loop key rotation: `Idle → Rotating → Converging → Migrating → Verifying → Retiring →
//! Idle`, with the state in the RotationPolicy status. [`Context::step`] does one bounded unit of
//! work from whatever the status says and writes the result back, so a restarted controller (or
//! `kmsgate rotate`) resumes exactly where the last one stopped, and any step may be cut short.

pub mod access;
pub mod converge;
pub mod keys;
pub mod migrate;
mod status;
pub mod verify;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

pub use keys::{KeyAdmin, VaultKeys};
use status::{Book, observe};

use crate::{
    backend::{BackendError, KeyMetadata},
    clock::{self, Clock, SystemClock, parse_time},
    config::EtcdConfig,
    crd::rotation::{self, Phase, Plan, REQUEST_ANNOTATION, ResourceId, RotationPolicy, RotationStatus},
    k8s::{EventKind, Kube, KubeError, Target},
    metrics::ControllerMetrics,
};

/// A step could not run; the status is unchanged and the step can be retried.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// A Kubernetes call failed.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// A Transit call failed.
    #[error("Transit: {0}")]
    Transit(#[from] BackendError),
}

/// What the caller should do after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More work is ready: step again now.
    Again,
    /// Waiting on something outside: step again after this long.
    Wait(Duration),
    /// No run in progress (Idle or Failed); the next check is due after this long.
    Rest(Duration),
}

/// Everything a step needs.
pub struct Context<K> {
    /// Kubernetes.
    pub kube: Kube,
    /// Transit.
    pub keys: K,
    /// A read-only etcd user, for `verify.mode: Etcd`.
    pub etcd: Option<EtcdConfig>,
    /// Metrics.
    pub metrics: Arc<ControllerMetrics>,
    /// Longest wait between checks while waiting on something.
    pub poll: Duration,
    http: reqwest::Client,
    targets: Mutex<HashMap<ResourceId, Target>>,
    clock: Arc<dyn Clock>,
}

impl<K: KeyAdmin> Context<K> {
    /// A context polling at most every `poll` while waiting.
    pub fn new(
        kube: Kube,
        keys: K,
        etcd: Option<EtcdConfig>,
        metrics: Arc<ControllerMetrics>,
        poll: Duration,
    ) -> Self {
        // NB: plugin status endpoints are plain HTTP on the node network; a short timeout keeps a
        // dead node from stalling the loop, and a plugin never redirects, so an answer that does
        // is not followed elsewhere.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let clock = Arc::new(SystemClock);
        Self { kube, keys, etcd, metrics, poll, http, targets: Mutex::new(HashMap::new()), clock }
    }

    /// Reads the time from `clock` instead of the system clock (tests run on paused time).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Does one unit of work on policy `name` and records it in the status.
    pub async fn step(&self, name: &str) -> Result<Step, RotationError> {
        let policy = self.kube.policy(name).await?;
        let before = policy.status.clone().unwrap_or_default();
        let parsed = rotation::parse(&policy.spec);
        let mut book = Book {
            name,
            status: before.clone(),
            events: Vec::new(),
            metrics: &self.metrics,
            clock: &*self.clock,
        };
        let step = match &parsed {
            Err(e) => {
                book.stall("InvalidSpec", &e.to_string());
                Ok(Step::Rest(self.poll))
            }
            Ok(plan) => {
                let mut run = Run { ctx: self, policy: &policy, plan, book };
                let step = run.advance().await;
                book = run.book;
                step
            }
        };
        // NB: progress made before an error (a finished page) is still written.
        if book.status != before {
            self.kube.patch_status(name, &before, &book.status).await?;
        }
        observe(&self.metrics, &book.status);
        for (kind, reason, note) in book.events {
            self.kube.event(name, kind, reason, &note).await;
        }
        step
    }

    async fn target(&self, resource: &ResourceId) -> Result<Target, KubeError> {
        if let Some(target) = self.lock_targets().get(resource) {
            return Ok(target.clone());
        }
        let target = self.kube.resolve(resource).await?;
        self.lock_targets().insert(resource.clone(), target.clone());
        Ok(target)
    }

    fn lock_targets(&self) -> std::sync::MutexGuard<'_, HashMap<ResourceId, Target>> {
        // NB: the map is a cache; a panic elsewhere cannot leave it inconsistent.
        self.targets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct Run<'a, K> {
    ctx: &'a Context<K>,
    policy: &'a RotationPolicy,
    plan: &'a Plan,
    book: Book<'a>,
}

impl<K: KeyAdmin> Run<'_, K> {
    async fn advance(&mut self) -> Result<Step, RotationError> {
        match self.book.status.phase {
            Phase::Idle => self.idle().await,
            Phase::Failed => self.failed().await,
            Phase::Rotating => self.rotating().await,
            Phase::Converging => self.converging().await,
            Phase::Migrating => self.migrating().await,
            Phase::Verifying => self.verifying().await,
            Phase::Retiring => self.retiring().await,
        }
    }

    /// When the schedule next starts a run, from now (RFC 3339; empty for never).
    fn next_run(&self) -> String {
        self.plan
            .schedule
            .next_after(self.book.now().as_second())
            .map(clock::seconds_text)
            .unwrap_or_default()
    }

    fn new_request(&self) -> Option<String> {
        let value = self.policy.metadata.annotations.as_ref()?.get(REQUEST_ANNOTATION)?;
        (!value.is_empty() && *value != self.book.status.handled_request).then(|| value.clone())
    }

    fn due(&self) -> bool {
        parse_time(&self.book.status.next_run).is_some_and(|t| t <= self.book.now())
    }

    fn rest(&self) -> Step {
        let until_next = parse_time(&self.book.status.next_run)
            .map(|t| Duration::from_secs((t.as_second() - self.book.now().as_second()).max(1) as u64))
            .unwrap_or(self.ctx.poll);
        Step::Rest(until_next.min(self.ctx.poll))
    }

    fn key_id(&self, meta: &KeyMetadata, version: u64) -> String {
        let created = meta.versions.get(&version).copied().unwrap_or(0);
        self.ctx.keys.scope(&self.plan.transit).key_id(version, created).to_string()
    }

    /// Stops the run at the current phase; a new request or the schedule resumes it there.
    fn fail(&mut self, reason: &'static str, message: &str) -> Step {
        tracing::warn!(policy = self.book.name, reason, message, "rotation stopped");
        self.book.status.failed_phase = Some(self.book.status.phase);
        self.book.enter(Phase::Failed);
        self.book.status.result = "Failed".into();
        self.book.stall(reason, message);
        self.book.status.next_run = self.next_run();
        self.rest()
    }

    fn finish(&mut self, result: &str, message: String) -> Step {
        self.book.enter(Phase::Idle);
        self.book.status.result = result.into();
        self.book.status.message = message.clone();
        self.book.status.last_success = self.book.now_text();
        self.book.status.known_version = self.book.status.to_version.or(self.book.status.known_version);
        self.book.status.failed_phase = None;
        self.book.status.next_run = self.next_run();
        if let Some(request) =
            self.policy.metadata.annotations.as_ref().and_then(|a| a.get(REQUEST_ANNOTATION))
        {
            // NB: a request that arrived during the run is satisfied by it.
            self.book.status.handled_request = request.clone();
        }
        self.ctx.metrics.last_success.set(self.book.now().as_second() as f64);
        self.book.condition("Ready", true, result, &message);
        self.book.condition("Stalled", false, result, "");
        self.book.events.push((EventKind::Normal, "RotationFinished", message));
        self.rest()
    }

    fn start(&mut self, trigger: &str, meta: &KeyMetadata, from: u64, to: Option<u64>) {
        if let Some(request) = self.new_request() {
            self.book.status.handled_request = request;
        }
        let keep = RotationStatus {
            known_version: self.book.status.known_version,
            handled_request: self.book.status.handled_request.clone(),
            last_success: self.book.status.last_success.clone(),
            retired_below: self.book.status.retired_below,
            conditions: self.book.status.conditions.clone(),
            phase: self.book.status.phase,
            phase_started_at: self.book.status.phase_started_at.clone(),
            ..RotationStatus::default()
        };
        self.book.status = keep;
        self.book.status.run_id = uuid::Uuid::new_v4().to_string();
        self.book.status.trigger = trigger.into();
        self.book.status.started_at = self.book.now_text();
        self.book.status.from_version = Some(from);
        self.book.status.from_key_id = self.key_id(meta, from);
        if let Some(to) = to {
            self.book.status.to_version = Some(to);
            self.book.status.to_key_id = self.key_id(meta, to);
        }
        self.book.status.message = format!("run started by {trigger}");
        self.book.condition("Ready", false, "Running", "a rotation is in progress");
        self.book.enter(if to.is_some() { Phase::Converging } else { Phase::Rotating });
    }

    async fn idle(&mut self) -> Result<Step, RotationError> {
        let meta = self.ctx.keys.metadata(&self.plan.transit).await?;
        let known = self.book.status.known_version;
        match decide_idle(known, meta.latest, self.new_request().is_some(), self.due()) {
            Idle::Adopt => {
                // NB: the first sight of a key adopts it as it is; only later versions start runs.
                self.book.status.known_version = Some(meta.latest);
                self.book.status.next_run = self.next_run();
                self.book.status.message = format!("adopted key version {}", meta.latest);
                Ok(self.rest())
            }
            Idle::Start { trigger, from, to } => {
                if let Some(message) = self.missing_access().await? {
                    // NB: the request is answered (by the failure), so it does not start again
                    // at once; a new request or the schedule retries.
                    if let Some(request) = self.new_request() {
                        self.book.status.handled_request = request;
                    }
                    return Ok(self.fail("Forbidden", &message));
                }
                self.start(trigger, &meta, from, to);
                Ok(Step::Again)
            }
            Idle::Rest => {
                if self.book.status.next_run.is_empty() {
                    self.book.status.next_run = self.next_run();
                }
                Ok(self.rest())
            }
        }
    }

    async fn failed(&mut self) -> Result<Step, RotationError> {
        let request = self.new_request();
        if request.is_none() && !self.due() {
            return Ok(self.rest());
        }
        if let Some(request) = request {
            self.book.status.handled_request = request;
        }
        let resume = self.book.status.failed_phase.unwrap_or(Phase::Idle);
        // NB: Idle checks access when it starts a run; a run resumed past that point must not
        // go on into writes it may not make (the policy or the RBAC may have changed).
        if !matches!(resume, Phase::Idle | Phase::Retiring)
            && let Some(message) = self.missing_access().await?
        {
            self.book.stall("Forbidden", &message);
            self.book.status.next_run = self.next_run();
            return Ok(self.rest());
        }
        self.book.status.failed_phase = None;
        self.book.status.result.clear();
        self.book.condition("Stalled", false, "Resumed", "");
        self.book.enter(resume);
        self.book.status.message = format!("resumed at {}", resume.as_str());
        Ok(Step::Again)
    }

    async fn rotating(&mut self) -> Result<Step, RotationError> {
        let from = self.book.status.from_version.unwrap_or(0);
        let key = self.plan.transit.clone();
        let mut meta = self.ctx.keys.metadata(&key).await?;
        // NB: "ensure latest > from", not "rotate once": a rotate that timed out but landed, or
        // a crash after rotating, must not make a second version.
        if meta.latest <= from {
            self.ctx.keys.rotate(&key).await?;
            meta = self.ctx.keys.metadata(&key).await?;
        }
        if meta.latest <= from {
            return Ok(self.fail(
                "RotateFailed",
                &format!("Transit still reports version {} after rotate", meta.latest),
            ));
        }
        self.book.status.to_version = Some(meta.latest);
        self.book.status.to_key_id = self.key_id(&meta, meta.latest);
        self.book.events.push((
            EventKind::Normal,
            "Rotated",
            format!("Transit key version {} created", meta.latest),
        ));
        self.book.enter(Phase::Converging);
        Ok(Step::Again)
    }
}

/// What an idle policy does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// First sight of the key: take its latest version as the starting point.
    Adopt,
    /// Start a run from version `from`; `to` is known when someone else already rotated.
    Start {
        /// `external`, `request` or `schedule`.
        trigger: &'static str,
        /// The version before the run.
        from: u64,
        /// The version the run moves to, if it exists already.
        to: Option<u64>,
    },
    /// Nothing to do yet.
    Rest,
}

/// Decides from the version last handled, Transit's latest, whether a new request arrived and
/// whether the schedule is due. A version made outside the controller wins over both.
pub fn decide_idle(known: Option<u64>, latest: u64, requested: bool, due: bool) -> Idle {
    let Some(known) = known else { return Idle::Adopt };
    if latest > known {
        return Idle::Start { trigger: "external", from: known, to: Some(latest) };
    }
    if requested {
        return Idle::Start { trigger: "request", from: latest, to: None };
    }
    if due {
        return Idle::Start { trigger: "schedule", from: latest, to: None };
    }
    Idle::Rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_policy_starts_on_an_outside_version_a_request_or_the_schedule() {
        assert_eq!(decide_idle(None, 3, true, true), Idle::Adopt);
        assert_eq!(
            decide_idle(Some(2), 3, true, true),
            Idle::Start { trigger: "external", from: 2, to: Some(3) }
        );
        assert_eq!(
            decide_idle(Some(3), 3, true, true),
            Idle::Start { trigger: "request", from: 3, to: None }
        );
        assert_eq!(
            decide_idle(Some(3), 3, false, true),
            Idle::Start { trigger: "schedule", from: 3, to: None }
        );
        assert_eq!(decide_idle(Some(3), 3, false, false), Idle::Rest);
    }
}
