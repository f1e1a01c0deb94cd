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
    backend::{Backend, BackendError, KeyMetadata},
    etcd::EtcdSettings,
    k8s::{EventKind, Kube, KubeError, MigrationState, ObjectKey, Target},
    keyid::{BackendKind, KeyScope},
    metrics::{ControllerMetrics, PhaseLabels},
    policy::{
        self, Condition, MigrateStrategy, Phase, REQUEST_ANNOTATION, ResourceProgress, ResourceRef,
        RotationPolicy, RotationStatus, Schedule, Totals, TransitKey, VerifyMode,
    },
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
    targets: Mutex<HashMap<ResourceRef, Target>>,
}

/// Unix seconds now.
pub fn now() -> i64 {
    Timestamp::now().as_second()
}

/// RFC 3339 (seconds) for now.
pub fn now_text() -> String {
    time_text(now())
}

fn time_text(seconds: i64) -> String {
    Timestamp::from_second(seconds).map(|t| t.to_string()).unwrap_or_default()
}

fn parse_time(text: &str) -> Option<i64> {
    text.parse::<Timestamp>().ok().map(|t| t.as_second())
}

fn elapsed_since(text: &str) -> Duration {
    parse_time(text).map(|t| Duration::from_secs((now() - t).max(0) as u64)).unwrap_or_default()
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
        Self { kube, keys, etcd, metrics, poll, http, targets: Mutex::new(HashMap::new()) }
    }

    /// Does one unit of work on policy `name` and records it in the status.
    pub async fn step(&self, name: &str) -> Result<Step, RotationError> {
        let policy = self.kube.policy(name).await?;
        let before = policy.status.clone().unwrap_or_default();
        let mut run = Run { ctx: self, policy: &policy, name, status: before.clone(), events: Vec::new() };
        let step = match policy::validate(&policy.spec) {
            Err(e) => {
                run.stall("InvalidSpec", &e.to_string());
                Ok(Step::Rest(self.poll))
            }
            Ok(()) => run.advance().await,
        };
        // NB: progress made before an error (a finished page) is still written.
        if run.status != before {
            self.kube.patch_status(name, &run.status).await?;
        }
        self.metrics.observe(&run.status);
        for (kind, reason, note) in run.events {
            self.kube.event(name, kind, reason, &note).await;
        }
        step
    }

    async fn target(&self, resource: &ResourceRef) -> Result<Target, KubeError> {
        if let Some(target) = self.lock_targets().get(resource) {
            return Ok(target.clone());
        }
        let target = self.kube.resolve(resource).await?;
        self.lock_targets().insert(resource.clone(), target.clone());
        Ok(target)
    }

    fn lock_targets(&self) -> std::sync::MutexGuard<'_, HashMap<ResourceRef, Target>> {
        // NB: the map is a cache; a panic elsewhere cannot leave it inconsistent.
        self.targets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key_id each plugin endpoint reports (or why it could not be read).
    pub async fn plugin_key_ids(
        &self,
        policy: &RotationPolicy,
    ) -> Result<Vec<(String, Result<String, String>)>, KubeError> {
        let endpoints = match (&policy.spec.converge.plugins, &policy.spec.converge.discovery) {
            (plugins, _) if !plugins.is_empty() => plugins.clone(),
            (_, Some(d)) => self.kube.node_endpoints(&d.node_selector, d.port).await?,
            (_, None) => Vec::new(),
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
    name: &'a str,
    status: RotationStatus,
    events: Vec<(EventKind, &'static str, String)>,
}

impl<K: KeyAdmin> Run<'_, K> {
    async fn advance(&mut self) -> Result<Step, RotationError> {
        match self.status.phase {
            Phase::Idle => self.idle().await,
            Phase::Failed => Ok(self.failed()),
            Phase::Rotating => self.rotating().await,
            Phase::Converging => self.converging().await,
            Phase::Migrating => self.migrating().await,
            Phase::Verifying => self.verifying().await,
            Phase::Retiring => self.retiring().await,
        }
    }

    fn spec(&self) -> &policy::RotationPolicySpec {
        &self.policy.spec
    }

    fn schedule(&self) -> Schedule {
        // NB: validate() parsed it already; Never is the safe reading if that ever changes.
        Schedule::parse(self.spec().schedule.as_deref()).unwrap_or(Schedule::Never)
    }

    fn spec_duration(&mut self, field: &'static str, text: &str) -> Duration {
        // NB: validate() checked every duration field before any phase runs.
        policy::duration(field, text).unwrap_or(Duration::from_secs(600))
    }

    fn new_request(&self) -> Option<String> {
        let value = self.policy.metadata.annotations.as_ref()?.get(REQUEST_ANNOTATION)?;
        (!value.is_empty() && *value != self.status.handled_request).then(|| value.clone())
    }

    fn due(&self) -> bool {
        parse_time(&self.status.next_run).is_some_and(|t| t <= now())
    }

    fn rest(&self) -> Step {
        let until_next = parse_time(&self.status.next_run)
            .map(|t| Duration::from_secs((t - now()).max(1) as u64))
            .unwrap_or(self.ctx.poll);
        Step::Rest(until_next.min(self.ctx.poll))
    }

    fn key_id(&self, meta: &KeyMetadata, version: u64) -> String {
        let created = meta.versions.get(&version).copied().unwrap_or(0);
        self.ctx.keys.scope(&self.spec().transit).key_id(version, created).to_string()
    }

    fn enter(&mut self, phase: Phase) {
        let left = self.status.phase;
        let spent = elapsed_since(&self.status.phase_started_at);
        self.ctx
            .metrics
            .phase_duration
            .get_or_create(&PhaseLabels { phase: left.as_str() })
            .observe(spent.as_secs_f64());
        self.status.phase = phase;
        self.status.phase_started_at = now_text();
        self.events.push((
            EventKind::Normal,
            phase.as_str(),
            format!("{} -> {}", left.as_str(), phase.as_str()),
        ));
        tracing::info!(policy = self.name, from = left.as_str(), to = phase.as_str(), "rotation phase");
    }

    fn condition(&mut self, kind: &str, status: bool, reason: &str, message: &str) {
        let value = if status { "True" } else { "False" };
        let conditions = &mut self.status.conditions;
        match conditions.iter_mut().find(|c| c.type_ == kind) {
            Some(c) if c.status == value && c.reason == reason && c.message == message => {}
            Some(c) => {
                if c.status != value {
                    c.last_transition_time = now_text();
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
                last_transition_time: now_text(),
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

    /// Stops the run at the current phase; a new request or the schedule resumes it there.
    fn fail(&mut self, reason: &'static str, message: &str) -> Step {
        tracing::warn!(policy = self.name, reason, message, "rotation stopped");
        self.status.failed_phase = Some(self.status.phase);
        self.enter(Phase::Failed);
        self.status.result = "Failed".into();
        self.stall(reason, message);
        self.status.next_run = self.schedule().next_after(now()).map(time_text).unwrap_or_default();
        self.rest()
    }

    fn finish(&mut self, result: &str, message: String) -> Step {
        self.enter(Phase::Idle);
        self.status.result = result.into();
        self.status.message = message.clone();
        self.status.last_success = now_text();
        self.status.known_version = self.status.to_version.or(self.status.known_version);
        self.status.failed_phase = None;
        self.status.next_run = self.schedule().next_after(now()).map(time_text).unwrap_or_default();
        if let Some(request) =
            self.policy.metadata.annotations.as_ref().and_then(|a| a.get(REQUEST_ANNOTATION))
        {
            // NB: a request that arrived during the run is satisfied by it.
            self.status.handled_request = request.clone();
        }
        self.ctx.metrics.last_success.set(now() as f64);
        self.condition("Ready", true, result, &message);
        self.condition("Stalled", false, result, "");
        self.events.push((EventKind::Normal, "RotationFinished", message));
        self.rest()
    }

    fn start(&mut self, trigger: &str, meta: &KeyMetadata, from: u64, to: Option<u64>) {
        if let Some(request) = self.new_request() {
            self.status.handled_request = request;
        }
        let keep = RotationStatus {
            known_version: self.status.known_version,
            handled_request: self.status.handled_request.clone(),
            last_success: self.status.last_success.clone(),
            retired_below: self.status.retired_below,
            conditions: self.status.conditions.clone(),
            phase: self.status.phase,
            phase_started_at: self.status.phase_started_at.clone(),
            ..RotationStatus::default()
        };
        self.status = keep;
        self.status.run_id = uuid::Uuid::new_v4().to_string();
        self.status.trigger = trigger.into();
        self.status.started_at = now_text();
        self.status.from_version = Some(from);
        self.status.from_key_id = self.key_id(meta, from);
        if let Some(to) = to {
            self.status.to_version = Some(to);
            self.status.to_key_id = self.key_id(meta, to);
        }
        self.status.message = format!("run started by {trigger}");
        self.condition("Ready", false, "Running", "a rotation is in progress");
        self.enter(if to.is_some() { Phase::Converging } else { Phase::Rotating });
    }

    async fn idle(&mut self) -> Result<Step, RotationError> {
        let meta = self.ctx.keys.metadata(&self.spec().transit).await?;
        let Some(known) = self.status.known_version else {
            // NB: the first sight of a key adopts it as it is; only later versions start runs.
            self.status.known_version = Some(meta.latest);
            self.status.next_run = self.schedule().next_after(now()).map(time_text).unwrap_or_default();
            self.status.message = format!("adopted key version {}", meta.latest);
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
        if self.status.next_run.is_empty() {
            self.status.next_run = self.schedule().next_after(now()).map(time_text).unwrap_or_default();
        }
        Ok(self.rest())
    }

    fn failed(&mut self) -> Step {
        let request = self.new_request();
        if request.is_none() && !self.due() {
            return self.rest();
        }
        if let Some(request) = request {
            self.status.handled_request = request;
        }
        let resume = self.status.failed_phase.take().unwrap_or(Phase::Idle);
        self.status.result.clear();
        self.condition("Stalled", false, "Resumed", "");
        self.enter(resume);
        self.status.message = format!("resumed at {}", resume.as_str());
        Step::Again
    }

    async fn rotating(&mut self) -> Result<Step, RotationError> {
        let from = self.status.from_version.unwrap_or(0);
        let key = self.spec().transit.clone();
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
        self.status.to_version = Some(meta.latest);
        self.status.to_key_id = self.key_id(&meta, meta.latest);
        self.events.push((
            EventKind::Normal,
            "Rotated",
            format!("Transit key version {} created", meta.latest),
        ));
        self.enter(Phase::Converging);
        Ok(Step::Again)
    }

    async fn converging(&mut self) -> Result<Step, RotationError> {
        let timeout = self.spec_duration("converge.timeout", &self.spec().converge.timeout.clone());
        let waited = elapsed_since(&self.status.phase_started_at);
        let wanted = self.status.to_key_id.clone();
        let reports = self.ctx.plugin_key_ids(self.policy).await?;
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
            self.status.message = message;
            return Ok(Step::Wait(self.ctx.poll));
        }
        if self.status.plugins_converged_at.is_empty() {
            self.status.plugins_converged_at = now_text();
            self.events.push((
                EventKind::Normal,
                "PluginsConverged",
                format!("{} plugins report {wanted}", reports.len()),
            ));
        }
        if self.spec().converge.api_server_metrics && self.api_servers_switched(&wanted).await {
            self.status.message = "every API server reported the new key_id".into();
            self.enter(Phase::Migrating);
            return Ok(Step::Again);
        }
        let settle = self.spec_duration("converge.settle", &self.spec().converge.settle.clone());
        let settled = elapsed_since(&self.status.plugins_converged_at);
        if settled >= settle {
            self.status.message = format!("plugins converged and API servers had {settle:?} to switch");
            self.enter(Phase::Migrating);
            return Ok(Step::Again);
        }
        if waited >= timeout {
            return Ok(
                self.fail("ConvergeTimeout", &format!("API servers did not switch within {timeout:?}"))
            );
        }
        self.status.message =
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
        let seen = crate::k8s::api_servers_on_key(&text, &self.spec().verify.provider, key_id);
        ids.iter().all(|id| seen.contains_key(&crate::k8s::sha256_label(id)))
    }

    async fn init_progress(&mut self) -> Result<(), RotationError> {
        let mut progress = Vec::new();
        for resource in &self.spec().resources {
            let target = self.ctx.target(resource).await?;
            let namespaces: Vec<String> = if target.namespaced && !self.spec().namespaces.is_empty() {
                self.spec().namespaces.clone()
            } else {
                vec![String::new()]
            };
            for namespace in namespaces {
                progress.push(ResourceProgress {
                    resource: resource.to_string(),
                    namespace,
                    ..ResourceProgress::default()
                });
            }
        }
        self.status.progress = progress;
        Ok(())
    }

    async fn migrating(&mut self) -> Result<Step, RotationError> {
        if self.status.progress.is_empty() {
            self.init_progress().await?;
            return Ok(Step::Again);
        }
        if self.spec().migrate.strategy == MigrateStrategy::StorageVersionMigration
            && !self.status.storage_migration_fallback
            && self.status.progress.iter().any(|p| !p.complete)
        {
            return self.storage_migrations().await;
        }
        let Some(index) = self.status.progress.iter().position(|p| !p.complete) else {
            self.status.verify_round += 1;
            let failed = self.status.totals.failed;
            if failed > 0 {
                self.events.push((
                    EventKind::Warning,
                    "RewriteFailed",
                    format!("{failed} objects could not be rewritten; verify will find them"),
                ));
            }
            self.enter(Phase::Verifying);
            return Ok(Step::Again);
        };
        let m = &self.spec().migrate;
        let settings = migrate::Settings {
            qps: m.qps,
            concurrency: m.concurrency as usize,
            page_size: m.page_size,
            max_attempts: m.max_attempts,
            selector: self.spec().label_selector.clone(),
            dry_run: false,
        };
        let resource =
            ResourceRef::parse(&self.status.progress[index].resource).map_err(KubeError::Unexpected)?;
        let target = self.ctx.target(&resource).await?;
        let pacer = migrate::Pacer::new(settings.qps);
        let mut progress = self.status.progress[index].clone();
        let failure = migrate::run_page(
            &self.ctx.kube,
            &target,
            &settings,
            &pacer,
            &mut progress,
            Some(&self.ctx.metrics),
        )
        .await?;
        self.status.progress[index] = progress;
        self.status.totals = totals(&self.status.progress);
        if let Some(failure) = failure {
            self.status.message = format!("some writes failed: {failure}");
        }
        Ok(Step::Again)
    }

    async fn storage_migrations(&mut self) -> Result<Step, RotationError> {
        let Some(version) = self.ctx.kube.migration_version().await? else {
            self.status.storage_migration_fallback = true;
            self.status.message = "storagemigration.k8s.io is not served; rewriting objects instead".into();
            return Ok(Step::Again);
        };
        if self.status.storage_migrations.is_empty() {
            let short: String = self.status.run_id.chars().take(8).collect();
            for resource in self.spec().resources.clone() {
                let name = format!("kmsgate-{short}-{}", resource.to_string().replace('.', "-"));
                self.ctx.kube.create_migration(version, &name, &resource.group, &resource.resource).await?;
                self.status.storage_migrations.push(name);
            }
            self.status.message = "StorageVersionMigrations created".into();
            return Ok(Step::Wait(self.ctx.poll));
        }
        let mut problem = None;
        let mut running = false;
        for name in self.status.storage_migrations.clone() {
            match self.ctx.kube.migration_state(version, &name).await? {
                MigrationState::Succeeded => {}
                MigrationState::Running => running = true,
                MigrationState::Failed(message) => problem = Some(format!("{name} failed: {message}")),
                MigrationState::Missing => problem = Some(format!("{name} disappeared")),
            }
        }
        let timeout = self.spec_duration("migrate.svmTimeout", &self.spec().migrate.svm_timeout.clone());
        if problem.is_none() && running && elapsed_since(&self.status.phase_started_at) >= timeout {
            // NB: served does not mean a migrator runs (the controller-manager gate may be off).
            problem = Some(format!("no result within {timeout:?}; is the StorageVersionMigrator gate on?"));
        }
        if let Some(problem) = problem {
            for name in self.status.storage_migrations.clone() {
                self.ctx.kube.delete_migration(version, &name).await?;
            }
            self.status.storage_migration_fallback = true;
            self.status.message = format!("StorageVersionMigration: {problem}; rewriting objects instead");
            self.events.push((EventKind::Warning, "StorageMigrationFallback", self.status.message.clone()));
            return Ok(Step::Again);
        }
        if running {
            return Ok(Step::Wait(self.ctx.poll));
        }
        for p in &mut self.status.progress {
            p.complete = true;
            p.continue_token.clear();
        }
        self.status.message = "StorageVersionMigrations succeeded".into();
        Ok(Step::Again)
    }

    async fn verifying(&mut self) -> Result<Step, RotationError> {
        let round = self.status.verify_round.max(1);
        let verification = match self
            .status
            .verification
            .clone()
            .filter(|v| v.run_id == self.status.run_id && v.round == round)
        {
            Some(v) => v,
            None => match self.spec().verify.mode {
                VerifyMode::None => {
                    let failed = self.status.totals.failed;
                    return Ok(self.finish(
                        "Unverified",
                        format!(
                            "migrated to {} ({failed} writes failed); verify.mode is None, so nothing proves the old \
                             key is unused and it is never retired",
                            self.status.to_key_id
                        ),
                    ));
                }
                VerifyMode::Etcd => match self.verify_here(round).await {
                    Ok(v) => v,
                    Err(message) => return Ok(self.fail("VerifyFailed", &message)),
                },
                VerifyMode::Job => match self.verify_job(round).await? {
                    Ok(Some(v)) => v,
                    Ok(None) => return Ok(Step::Wait(self.ctx.poll)),
                    Err(message) => return Ok(self.fail("VerifyFailed", &message)),
                },
            },
        };
        self.status.verification = Some(verification.clone());
        if !verification.error.is_empty() {
            return Ok(self.fail("VerifyFailed", &verification.error));
        }
        if verification.clean {
            self.events.push((
                EventKind::Normal,
                "Verified",
                format!("{} values, all on {}", verification.current, verification.key_id),
            ));
            if self.spec().retire.enabled {
                self.enter(Phase::Retiring);
                return Ok(Step::Again);
            }
            let to = self.status.to_key_id.clone();
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
        if round >= self.spec().verify.max_rounds {
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
            for p in &mut self.status.progress {
                if involved.keys().any(|r| r.to_string() == p.resource) {
                    p.complete = false;
                    p.continue_token.clear();
                }
            }
            self.status.storage_migration_fallback = true;
            self.enter(Phase::Migrating);
            return Ok(Step::Again);
        }
        self.rewrite_stragglers(&verification.stragglers).await?;
        self.status.verify_round = round + 1;
        Ok(Step::Again)
    }

    async fn rewrite_stragglers(&mut self, stragglers: &[String]) -> Result<(), RotationError> {
        let pacer = migrate::Pacer::new(self.spec().migrate.qps);
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
        self.status.message = format!("rewrote {rewritten} stragglers; verifying again");
        self.events.push((EventKind::Normal, "StragglersRewritten", self.status.message.clone()));
        Ok(())
    }

    fn verify_input(&self, round: u32) -> verify::Input {
        verify::Input {
            provider: self.spec().verify.provider.clone(),
            etcd_prefix: self.spec().verify.etcd_prefix.clone(),
            key_id: self.status.to_key_id.clone(),
            resources: self.spec().resources.clone(),
            run_id: self.status.run_id.clone(),
            round,
        }
    }

    async fn verify_here(&self, round: u32) -> Result<policy::Verification, String> {
        let Some(etcd) = &self.ctx.etcd else {
            return Err("verify.mode is Etcd but the controller has no etcd.* settings".into());
        };
        let mut client = crate::etcd::connect(etcd).await.map_err(|e| crate::error::chain(&e))?;
        verify::scan(&mut client, &self.verify_input(round), 5000).await.map_err(|e| crate::error::chain(&e))
    }

    /// `Ok(Ok(Some))` with the Job's report, `Ok(Ok(None))` while it runs.
    async fn verify_job(
        &self,
        round: u32,
    ) -> Result<Result<Option<policy::Verification>, String>, RotationError> {
        let Some(spec) = &self.spec().verify.job else {
            return Ok(Err("verify.job is missing".into()));
        };
        let name = verify::job_name(self.name, &self.status.run_id, round);
        let timeout = policy::duration("verify.timeout", &self.spec().verify.timeout)
            .unwrap_or(Duration::from_secs(1800));
        match self.ctx.kube.job_state(&spec.namespace, &name).await? {
            crate::k8s::JobState::Missing => {
                let job =
                    verify::job(self.policy, spec, &self.status.run_id, round, timeout.as_secs() as i64)
                        .map_err(|e| KubeError::Unexpected(format!("build verify job: {e}")))?;
                self.ctx.kube.create_job(&spec.namespace, &job).await?;
                Ok(Ok(None))
            }
            crate::k8s::JobState::Running => Ok(Ok(None)),
            // NB: a finished Job whose report has not arrived yet: the status may lag one read.
            crate::k8s::JobState::Succeeded if elapsed_since(&self.status.phase_started_at) < timeout => {
                Ok(Ok(None))
            }
            crate::k8s::JobState::Succeeded => {
                Ok(Err(format!("verify job {name} finished without a report")))
            }
            crate::k8s::JobState::Failed(why) => Ok(Err(format!("verify job {name} failed: {why}"))),
        }
    }

    async fn retiring(&mut self) -> Result<Step, RotationError> {
        let Some(v) = self.status.verification.clone().filter(|v| v.clean && v.run_id == self.status.run_id)
        else {
            // NB: Retire never runs without a clean verify of this run.
            return Ok(self.fail("NotVerified", "retire needs a clean verification of this run"));
        };
        let grace = self.spec_duration("retire.grace", &self.spec().retire.grace.clone());
        let since = elapsed_since(&v.finished_at);
        if since < grace {
            self.status.message =
                format!("retiring versions below {:?} in {:?}", self.status.to_version, grace - since);
            return Ok(Step::Wait(self.ctx.poll.min(grace - since)));
        }
        let Some(to) = self.status.to_version else {
            return Ok(self.fail("NotVerified", "the run has no target version"));
        };
        let key = self.spec().transit.clone();
        let meta = self.ctx.keys.metadata(&key).await?;
        if meta.min_decryption_version < to {
            self.ctx.keys.retire_below(&key, to).await?;
        }
        self.status.retired_below = Some(to);
        self.events.push((EventKind::Normal, "Retired", format!("min_decryption_version raised to {to}")));
        Ok(self.finish("Succeeded", format!("every value is on {}; versions below {to} retired", v.key_id)))
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
