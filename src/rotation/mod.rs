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

pub use crate::policy_loop::Step;
use crate::{
    backend::{BackendError, KeyMetadata},
    clock::{Clock, SystemClock},
    config::EtcdConfig,
    crd::{
        Schedule,
        field::SpecError,
        rotation::{self, Phase, Plan, REQUEST_ANNOTATION, ResourceId, RotationPolicy, RotationStatus},
    },
    k8s::{Kube, KubeError, Target},
    metrics::ControllerMetrics,
    policy_loop::{self, Parts, PolicyLoop},
};

/// The status being written by one step.
type Book<'a> = policy_loop::Book<'a, RotationStatus>;

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
        policy_loop::step(self, name).await
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

impl<K: KeyAdmin> PolicyLoop for Context<K> {
    type Policy = RotationPolicy;
    type Status = RotationStatus;
    type Plan = Plan;
    type Error = RotationError;
    const REQUEST_ANNOTATION: &'static str = REQUEST_ANNOTATION;

    fn parts(&self) -> Parts<'_> {
        Parts { kube: &self.kube, metrics: &self.metrics, clock: &*self.clock, poll: self.poll }
    }

    fn plan(policy: &RotationPolicy) -> Result<Plan, SpecError> {
        rotation::parse(&policy.spec)
    }

    fn schedule(plan: &Plan) -> &Schedule {
        &plan.schedule
    }

    async fn advance<'a>(
        &'a self,
        policy: &'a RotationPolicy,
        plan: &'a Plan,
        book: Book<'a>,
    ) -> (Book<'a>, Result<Step, RotationError>) {
        let mut run = Run { ctx: self, policy, plan, book };
        let step = run.advance().await;
        (run.book, step)
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

    fn key_id(&self, meta: &KeyMetadata, version: u64) -> String {
        let created = meta.versions.get(&version).copied().unwrap_or(0);
        self.ctx.keys.scope(&self.plan.transit).key_id(version, created).to_string()
    }

    /// Stops the run at the current phase; a new request or the schedule resumes it there.
    fn fail(&mut self, reason: &'static str, message: &str) -> Step {
        self.book.fail(reason, message)
    }

    fn finish(&mut self, result: &str, message: String) -> Step {
        self.book.finish(result, &message);
        self.book.status.message = message;
        self.book.status.next_run = self.book.next_run();
        self.book.rest()
    }

    fn start(&mut self, trigger: &str, meta: &KeyMetadata, from: u64, to: Option<u64>) {
        self.book.take_request();
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
        self.book.begin(trigger, from);
        self.book.status.from_key_id = self.key_id(meta, from);
        if let Some(to) = to {
            self.book.status.to_version = Some(to);
            self.book.status.to_key_id = self.key_id(meta, to);
        }
        self.book.enter(if to.is_some() { Phase::Converging } else { Phase::Rotating });
    }

    async fn idle(&mut self) -> Result<Step, RotationError> {
        let meta = self.ctx.keys.metadata(&self.plan.transit).await?;
        let known = self.book.status.known_version;
        match decide_idle(known, meta.latest, self.book.new_request().is_some(), self.book.due()) {
            Idle::Adopt => {
                // NB: the first sight of a key adopts it as it is; only later versions start runs.
                self.book.status.known_version = Some(meta.latest);
                self.book.status.next_run = self.book.next_run();
                self.book.status.message = format!("adopted key version {}", meta.latest);
                Ok(self.book.rest())
            }
            Idle::Start { trigger, from, to } => {
                if let Some(message) = self.missing_access().await? {
                    // NB: the request is answered (by the failure), so it does not start again
                    // at once; a new request or the schedule retries.
                    self.book.take_request();
                    return Ok(self.fail("Forbidden", &message));
                }
                self.start(trigger, &meta, from, to);
                Ok(Step::Again)
            }
            Idle::Rest => Ok(self.book.rest_idle()),
        }
    }

    async fn failed(&mut self) -> Result<Step, RotationError> {
        if !self.book.resume_due() {
            return Ok(self.book.rest());
        }
        let resume = self.book.status.failed_phase.unwrap_or(Phase::Idle);
        // NB: Idle checks access when it starts a run; a run resumed past that point must not
        // go on into writes it may not make (the policy or the RBAC may have changed).
        if !matches!(resume, Phase::Idle | Phase::Retiring)
            && let Some(message) = self.missing_access().await?
        {
            self.book.stall("Forbidden", &message);
            self.book.status.next_run = self.book.next_run();
            return Ok(self.book.rest());
        }
        Ok(self.book.resume())
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
            crate::k8s::EventKind::Normal,
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
