//! Closed-loop key rotation: `Idle → Rotating → Converging → Migrating → Verifying → Retiring →
//! Idle`, with the state in the RotationPolicy status. [`Context::step`] does one bounded unit of
//! work from whatever the status says and writes the result back, so a restarted controller (or
//! `kmsgate rotate`) resumes exactly where the last one stopped, and any step may be cut short.

pub mod migrate;
pub mod verify;

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use crate::{
    audit::EtcdSettings,
    backend::{Backend, BackendError, KeyMetadata},
    clock::{self, Clock, SystemClock, parse_time},
    crd::rotation::{
        self, Condition, ConvergePlan, MigrateStrategy, Phase, Plan, PluginSource, REQUEST_ANNOTATION,
        ResourceId, ResourceProgress, RotationPolicy, RotationStatus, Straggler, Totals, TransitKey,
        Verification, Verifier, VerifyJob,
    },
    k8s::{EventKind, Kube, KubeError, MigrationState, ObjectKey, Target},
    keyid::{BackendKind, KeyScope},
    metrics::{ClassLabels, ControllerMetrics, PhaseLabels},
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
    pub etcd: Option<EtcdSettings>,
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
        etcd: Option<EtcdSettings>,
        metrics: Arc<ControllerMetrics>,
        poll: Duration,
    ) -> Self {
        // NB: plugin status endpoints are plain HTTP on the node network; a short timeout keeps a
        // dead node from stalling the loop.
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap_or_default();
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
            self.kube.patch_status(name, &book.status).await?;
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

    /// The key_id each plugin endpoint reports (or why it could not be read).
    pub async fn plugin_key_ids(
        &self,
        converge: &ConvergePlan,
    ) -> Result<Vec<(String, Result<String, String>)>, KubeError> {
        let endpoints = match &converge.plugins {
            PluginSource::Endpoints(plugins) => plugins.clone(),
            PluginSource::Discovery(d) => self.kube.node_endpoints(&d.node_selector, d.port).await?,
        };
        let mut out = Vec::new();
        for endpoint in endpoints {
            let url = format!("{}/status", endpoint.trim_end_matches('/'));
            let answer = async {
                let response = self.http.get(&url).send().await.map_err(|e| crate::error::chain(&e))?;
                if !response.status().is_success() {
                    return Err(format!("HTTP {}", response.status()));
                }
                let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
                body["promoted"]["key_id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| "no promoted key_id".to_owned())
            }
            .await;
            out.push((endpoint, answer));
        }
        Ok(out)
    }
}

struct Run<'a, K> {
    ctx: &'a Context<K>,
    policy: &'a RotationPolicy,
    plan: &'a Plan,
    book: Book<'a>,
}

/// The status being written by one step, and the events it will emit.
struct Book<'a> {
    name: &'a str,
    status: RotationStatus,
    events: Vec<(EventKind, &'static str, String)>,
    metrics: &'a ControllerMetrics,
    clock: &'a dyn Clock,
}

impl<K: KeyAdmin> Run<'_, K> {
    async fn advance(&mut self) -> Result<Step, RotationError> {
        match self.book.status.phase {
            Phase::Idle => self.idle().await,
            Phase::Failed => Ok(self.failed()),
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
        let Some(known) = self.book.status.known_version else {
            // NB: the first sight of a key adopts it as it is; only later versions start runs.
            self.book.status.known_version = Some(meta.latest);
            self.book.status.next_run = self.next_run();
            self.book.status.message = format!("adopted key version {}", meta.latest);
            return Ok(self.rest());
        };
        if meta.latest > known {
            self.start("external", &meta, known, Some(meta.latest));
            return Ok(Step::Again);
        }
        if self.new_request().is_some() {
            self.start("request", &meta, meta.latest, None);
            return Ok(Step::Again);
        }
        if self.due() {
            self.start("schedule", &meta, meta.latest, None);
            return Ok(Step::Again);
        }
        if self.book.status.next_run.is_empty() {
            self.book.status.next_run = self.next_run();
        }
        Ok(self.rest())
    }

    fn failed(&mut self) -> Step {
        let request = self.new_request();
        if request.is_none() && !self.due() {
            return self.rest();
        }
        if let Some(request) = request {
            self.book.status.handled_request = request;
        }
        let resume = self.book.status.failed_phase.take().unwrap_or(Phase::Idle);
        self.book.status.result.clear();
        self.book.condition("Stalled", false, "Resumed", "");
        self.book.enter(resume);
        self.book.status.message = format!("resumed at {}", resume.as_str());
        Step::Again
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

    async fn converging(&mut self) -> Result<Step, RotationError> {
        let timeout = self.plan.converge.timeout;
        let waited = self.book.elapsed_since(&self.book.status.phase_started_at);
        let wanted = self.book.status.to_key_id.clone();
        let reports = self.ctx.plugin_key_ids(&self.plan.converge).await?;
        let lagging: Vec<String> = reports
            .iter()
            .filter(|(_, r)| r.as_deref() != Ok(wanted.as_str()))
            .map(|(endpoint, r)| match r {
                Ok(key_id) => format!("{endpoint} reports {key_id}"),
                Err(e) => format!("{endpoint}: {e}"),
            })
            .collect();
        if reports.is_empty() || !lagging.is_empty() {
            let message = if reports.is_empty() {
                "no plugin endpoints found".to_owned()
            } else {
                format!("waiting for plugins: {}", lagging.join("; "))
            };
            if waited >= timeout {
                return Ok(self.fail(
                    "ConvergeTimeout",
                    &format!("plugins did not converge in {timeout:?}: {message}"),
                ));
            }
            self.book.status.message = message;
            return Ok(Step::Wait(self.ctx.poll));
        }
        if self.book.status.plugins_converged_at.is_empty() {
            self.book.status.plugins_converged_at = self.book.now_text();
            self.book.events.push((
                EventKind::Normal,
                "PluginsConverged",
                format!("{} plugins report {wanted}", reports.len()),
            ));
        }
        if self.plan.converge.api_server_metrics && self.api_servers_switched(&wanted).await {
            self.book.status.message = "every API server reported the new key_id".into();
            self.book.enter(Phase::Migrating);
            return Ok(Step::Again);
        }
        let settle = self.plan.converge.settle;
        let settled = self.book.elapsed_since(&self.book.status.plugins_converged_at);
        if settled >= settle {
            self.book.status.message = format!("plugins converged and API servers had {settle:?} to switch");
            self.book.enter(Phase::Migrating);
            return Ok(Step::Again);
        }
        if waited >= timeout {
            return Ok(
                self.fail("ConvergeTimeout", &format!("API servers did not switch within {timeout:?}"))
            );
        }
        self.book.status.message =
            format!("plugins converged; waiting {:?} more for API servers", settle - settled);
        Ok(Step::Wait(self.ctx.poll.min(settle - settled)))
    }

    /// Whether every API server (by identity lease) reported the new key_id from Status.
    async fn api_servers_switched(&self, key_id: &str) -> bool {
        let ids = match self.ctx.kube.api_server_ids().await {
            Ok(ids) if !ids.is_empty() => ids,
            Ok(_) => return false,
            Err(e) => {
                tracing::debug!(error = %e, "API server identities unreadable; waiting the settle time");
                return false;
            }
        };
        let text = match self.ctx.kube.api_server_metrics().await {
            Ok(text) => text,
            Err(e) => {
                tracing::debug!(error = %e, "API server metrics unreadable; waiting the settle time");
                return false;
            }
        };
        let seen = crate::k8s::api_servers_on_key(&text, &self.plan.verify.provider, key_id);
        ids.iter().all(|id| seen.contains_key(&crate::k8s::sha256_label(id)))
    }

    async fn init_progress(&mut self) -> Result<(), RotationError> {
        let mut progress = Vec::new();
        for resource in &self.plan.resources {
            let target = self.ctx.target(&resource.id()).await?;
            let namespaces: Vec<String> = if target.namespaced && !self.plan.namespaces.is_empty() {
                self.plan.namespaces.clone()
            } else {
                vec![String::new()]
            };
            for namespace in namespaces {
                progress.push(ResourceProgress {
                    resource: resource.id(),
                    namespace,
                    ..ResourceProgress::default()
                });
            }
        }
        self.book.status.progress = progress;
        Ok(())
    }

    async fn migrating(&mut self) -> Result<Step, RotationError> {
        if self.book.status.progress.is_empty() {
            self.init_progress().await?;
            return Ok(Step::Again);
        }
        if self.plan.migrate.strategy == MigrateStrategy::StorageVersionMigration
            && !self.book.status.storage_migration_fallback
            && self.book.status.progress.iter().any(|p| !p.complete)
        {
            return self.storage_migrations().await;
        }
        let Some(index) = self.book.status.progress.iter().position(|p| !p.complete) else {
            self.book.status.verify_round += 1;
            let failed = self.book.status.totals.failed;
            if failed > 0 {
                self.book.events.push((
                    EventKind::Warning,
                    "RewriteFailed",
                    format!("{failed} objects could not be rewritten; verify will find them"),
                ));
            }
            self.book.enter(Phase::Verifying);
            return Ok(Step::Again);
        };
        let settings = &self.plan.migrate.settings;
        let target = self.ctx.target(&self.book.status.progress[index].resource).await?;
        let pacer = migrate::Pacer::new(settings.qps());
        let mut progress = self.book.status.progress[index].clone();
        let failure = migrate::run_page(
            &self.ctx.kube,
            &target,
            settings,
            &pacer,
            &mut progress,
            Some(&self.ctx.metrics),
        )
        .await?;
        self.book.status.progress[index] = progress;
        self.book.status.totals = totals(&self.book.status.progress);
        if let Some(failure) = failure {
            self.book.status.message = format!("some writes failed: {failure}");
        }
        Ok(Step::Again)
    }

    async fn storage_migrations(&mut self) -> Result<Step, RotationError> {
        let Some(version) = self.ctx.kube.migration_version().await? else {
            self.book.status.storage_migration_fallback = true;
            self.book.status.message =
                "storagemigration.k8s.io is not served; rewriting objects instead".into();
            return Ok(Step::Again);
        };
        if self.book.status.storage_migrations.is_empty() {
            let short: String = self.book.status.run_id.chars().take(8).collect();
            for resource in &self.plan.resources {
                let name = format!("kmsgate-{short}-{}", resource.to_string().replace('.', "-"));
                self.ctx.kube.create_migration(version, &name, &resource.group, &resource.resource).await?;
                self.book.status.storage_migrations.push(name);
            }
            self.book.status.message = "StorageVersionMigrations created".into();
            return Ok(Step::Wait(self.ctx.poll));
        }
        let mut problem = None;
        let mut running = false;
        for name in self.book.status.storage_migrations.clone() {
            match self.ctx.kube.migration_state(version, &name).await? {
                MigrationState::Succeeded => {}
                MigrationState::Running => running = true,
                MigrationState::Failed(message) => problem = Some(format!("{name} failed: {message}")),
                MigrationState::Missing => problem = Some(format!("{name} disappeared")),
            }
        }
        let timeout = self.plan.migrate.svm_timeout;
        if problem.is_none()
            && running
            && self.book.elapsed_since(&self.book.status.phase_started_at) >= timeout
        {
            // NB: served does not mean a migrator runs (the controller-manager gate may be off).
            problem = Some(format!("no result within {timeout:?}; is the StorageVersionMigrator gate on?"));
        }
        if let Some(problem) = problem {
            for name in self.book.status.storage_migrations.clone() {
                self.ctx.kube.delete_migration(version, &name).await?;
            }
            self.book.status.storage_migration_fallback = true;
            self.book.status.message =
                format!("StorageVersionMigration: {problem}; rewriting objects instead");
            self.book.events.push((
                EventKind::Warning,
                "StorageMigrationFallback",
                self.book.status.message.clone(),
            ));
            return Ok(Step::Again);
        }
        if running {
            return Ok(Step::Wait(self.ctx.poll));
        }
        for p in &mut self.book.status.progress {
            p.complete = true;
            p.continue_token.clear();
        }
        self.book.status.message = "StorageVersionMigrations succeeded".into();
        Ok(Step::Again)
    }

    async fn verifying(&mut self) -> Result<Step, RotationError> {
        let round = self.book.status.verify_round.max(1);
        let verification = match self
            .book
            .status
            .verification
            .clone()
            .filter(|v| v.run_id == self.book.status.run_id && v.round == round)
        {
            Some(v) => v,
            None => match &self.plan.verify.verifier {
                Verifier::None => {
                    let failed = self.book.status.totals.failed;
                    return Ok(self.finish(
                        "Unverified",
                        format!(
                            "migrated to {} ({failed} writes failed); verify.mode is None, so nothing proves the old \
                             key is unused and it is never retired",
                            self.book.status.to_key_id
                        ),
                    ));
                }
                Verifier::Etcd => match self.verify_here(round).await {
                    Ok(v) => v,
                    Err(message) => return Ok(self.fail("VerifyFailed", &message)),
                },
                Verifier::Job(job) => match self.verify_job(job, round).await? {
                    Ok(Some(v)) => v,
                    Ok(None) => return Ok(Step::Wait(self.ctx.poll)),
                    Err(message) => return Ok(self.fail("VerifyFailed", &message)),
                },
            },
        };
        self.book.status.verification = Some(verification.clone());
        if !verification.error.is_empty() {
            return Ok(self.fail("VerifyFailed", &verification.error));
        }
        if verification.clean {
            self.book.events.push((
                EventKind::Normal,
                "Verified",
                format!("{} values, all on {}", verification.current, verification.key_id),
            ));
            if self.plan.retire.enabled {
                self.book.enter(Phase::Retiring);
                return Ok(Step::Again);
            }
            let to = self.book.status.to_key_id.clone();
            return Ok(self.finish("Succeeded", format!("every value is on {to}; retire is off")));
        }
        if verification.invalid > 0 {
            return Ok(self.fail(
                "UndecryptableValues",
                &format!(
                    "{} values of this provider are invalid; the API server cannot read them",
                    verification.invalid
                ),
            ));
        }
        if verification.unmapped > 0 {
            return Ok(self.fail(
                "UnlistedResources",
                &format!(
                    "{} old-key values are in resources spec.resources does not list; add them (with etcdPrefix) and resume",
                    verification.unmapped
                ),
            ));
        }
        if round >= self.plan.verify.max_rounds {
            return Ok(self.fail(
                "StragglersRemain",
                &format!(
                    "{} old-key and {} unencrypted values remain after {round} rounds",
                    verification.old_key, verification.unencrypted
                ),
            ));
        }
        if verification.truncated {
            // NB: too many to name: run the whole migrate pass again for the resources involved.
            let involved = verify::stragglers_by_resource(&verification.stragglers);
            for p in &mut self.book.status.progress {
                if involved.contains_key(&p.resource) {
                    p.complete = false;
                    p.continue_token.clear();
                }
            }
            self.book.status.storage_migration_fallback = true;
            self.book.enter(Phase::Migrating);
            return Ok(Step::Again);
        }
        self.rewrite_stragglers(&verification.stragglers).await?;
        self.book.status.verify_round = round + 1;
        Ok(Step::Again)
    }

    async fn rewrite_stragglers(&mut self, stragglers: &[Straggler]) -> Result<(), RotationError> {
        let pacer = migrate::Pacer::new(self.plan.migrate.settings.qps());
        let mut rewritten = 0;
        for (resource, objects) in verify::stragglers_by_resource(stragglers) {
            let target = self.ctx.target(&resource).await?;
            for (namespace, name) in objects {
                pacer.wait().await;
                let Some(resource_version) =
                    self.ctx.kube.resource_version(&target, &namespace, &name).await?
                else {
                    continue;
                };
                let key = ObjectKey { namespace, name, resource_version };
                match self.ctx.kube.touch(&target, &key).await {
                    Ok(_) => rewritten += 1,
                    Err(e) if matches!(e.code(), Some(404 | 409)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.book.status.message = format!("rewrote {rewritten} stragglers; verifying again");
        self.book.events.push((EventKind::Normal, "StragglersRewritten", self.book.status.message.clone()));
        Ok(())
    }

    fn verify_input(&self, round: u32) -> verify::Input {
        verify::Input::new(self.plan, &self.book.status.to_key_id, &self.book.status.run_id, round)
    }

    async fn verify_here(&self, round: u32) -> Result<Verification, String> {
        let Some(etcd) = &self.ctx.etcd else {
            return Err("verify.mode is Etcd but the controller has no etcd.* settings".into());
        };
        let mut client = crate::audit::scan::connect(etcd).await.map_err(|e| crate::error::chain(&e))?;
        verify::scan(&mut client, &self.verify_input(round), 5000, &*self.ctx.clock)
            .await
            .map_err(|e| crate::error::chain(&e))
    }

    /// `Ok(Ok(Some))` with the Job's report, `Ok(Ok(None))` while it runs.
    async fn verify_job(
        &self,
        spec: &VerifyJob,
        round: u32,
    ) -> Result<Result<Option<Verification>, String>, RotationError> {
        let name = verify::job_name(self.book.name, &self.book.status.run_id, round);
        let timeout = self.plan.verify.timeout;
        match self.ctx.kube.job_state(&spec.namespace, &name).await? {
            crate::k8s::JobState::Missing => {
                let job =
                    verify::job(self.policy, spec, &self.book.status.run_id, round, timeout.as_secs() as i64)
                        .map_err(|e| KubeError::Unexpected(format!("build verify job: {e}")))?;
                self.ctx.kube.create_job(&spec.namespace, &job).await?;
                Ok(Ok(None))
            }
            crate::k8s::JobState::Running => Ok(Ok(None)),
            // NB: a finished Job whose report has not arrived yet: the status may lag one read.
            crate::k8s::JobState::Succeeded
                if self.book.elapsed_since(&self.book.status.phase_started_at) < timeout =>
            {
                Ok(Ok(None))
            }
            crate::k8s::JobState::Succeeded => {
                Ok(Err(format!("verify job {name} finished without a report")))
            }
            crate::k8s::JobState::Failed(why) => Ok(Err(format!("verify job {name} failed: {why}"))),
        }
    }

    async fn retiring(&mut self) -> Result<Step, RotationError> {
        let Some(v) =
            self.book.status.verification.clone().filter(|v| v.clean && v.run_id == self.book.status.run_id)
        else {
            // NB: Retire never runs without a clean verify of this run.
            return Ok(self.fail("NotVerified", "retire needs a clean verification of this run"));
        };
        let grace = self.plan.retire.grace;
        let since = self.book.elapsed_since(&v.finished_at);
        if since < grace {
            self.book.status.message =
                format!("retiring versions below {:?} in {:?}", self.book.status.to_version, grace - since);
            return Ok(Step::Wait(self.ctx.poll.min(grace - since)));
        }
        let Some(to) = self.book.status.to_version else {
            return Ok(self.fail("NotVerified", "the run has no target version"));
        };
        let key = self.plan.transit.clone();
        let meta = self.ctx.keys.metadata(&key).await?;
        if meta.min_decryption_version < to {
            self.ctx.keys.retire_below(&key, to).await?;
        }
        self.book.status.retired_below = Some(to);
        self.book.events.push((
            EventKind::Normal,
            "Retired",
            format!("min_decryption_version raised to {to}"),
        ));
        Ok(self.finish("Succeeded", format!("every value is on {}; versions below {to} retired", v.key_id)))
    }
}

impl Book<'_> {
    fn now(&self) -> Timestamp {
        self.clock.now()
    }

    fn now_text(&self) -> String {
        clock::rfc3339(self.now())
    }

    fn elapsed_since(&self, text: &str) -> Duration {
        clock::elapsed_since(self.now(), text)
    }

    fn enter(&mut self, phase: Phase) {
        let left = self.status.phase;
        let spent = self.elapsed_since(&self.status.phase_started_at);
        self.metrics
            .phase_duration
            .get_or_create(&PhaseLabels { phase: left.as_str() })
            .observe(spent.as_secs_f64());
        self.status.phase = phase;
        self.status.phase_started_at = self.now_text();
        self.events.push((
            EventKind::Normal,
            phase.as_str(),
            format!("{} -> {}", left.as_str(), phase.as_str()),
        ));
        tracing::info!(policy = self.name, from = left.as_str(), to = phase.as_str(), "rotation phase");
    }

    fn condition(&mut self, kind: &str, status: bool, reason: &str, message: &str) {
        let value = if status { "True" } else { "False" };
        let now = self.now_text();
        let conditions = &mut self.status.conditions;
        match conditions.iter_mut().find(|c| c.type_ == kind) {
            Some(c) if c.status == value && c.reason == reason && c.message == message => {}
            Some(c) => {
                if c.status != value {
                    c.last_transition_time = now;
                }
                c.status = value.into();
                c.reason = reason.into();
                c.message = message.into();
            }
            None => conditions.push(Condition {
                type_: kind.into(),
                status: value.into(),
                reason: reason.into(),
                message: message.into(),
                last_transition_time: now,
            }),
        }
    }

    /// Records a problem that stops nothing by itself (the spec is bad, for example).
    fn stall(&mut self, reason: &'static str, message: &str) {
        if self.status.message != message {
            self.events.push((EventKind::Warning, reason, message.to_owned()));
        }
        self.status.message = message.to_owned();
        self.condition("Stalled", true, reason, message);
    }
}

/// Mirrors a status into the gauges: phase, last success, next run, latest verification.
/// Called after every step, so a restarted controller exports the truth at once.
fn observe(metrics: &ControllerMetrics, status: &RotationStatus) {
    let seconds = |text: &str| parse_time(text).map_or(0.0, |t| t.as_second() as f64);
    metrics.set_phase(status.phase.as_str());
    if !status.last_success.is_empty() {
        metrics.last_success.set(seconds(&status.last_success));
    }
    metrics.next_run.set(seconds(&status.next_run));
    if let Some(v) = &status.verification {
        for (class, count) in [
            ("current", v.current),
            ("old_key", v.old_key),
            ("invalid", v.invalid),
            ("unencrypted", v.unencrypted),
            ("unmapped", v.unmapped),
        ] {
            metrics.verification.get_or_create(&ClassLabels { class }).set(count as i64);
        }
    }
}

fn totals(progress: &[ResourceProgress]) -> Totals {
    progress.iter().fold(Totals::default(), |mut t, p| {
        t.rewritten += p.rewritten;
        t.conflicts += p.conflicts;
        t.skipped += p.skipped;
        t.failed += p.failed;
        t
    })
}
