//! The re-encrypt engine: a metadata-only paged list and a no-op merge patch per object, paced
//! to a QPS limit with bounded concurrency. The API server rewrites a stale object on any write,
//! so the no-op write re-encrypts it; a resourceVersion that does not change means the object
//! was already current. Shared by the controller's Migrate phase and `kmsgate reencrypt`.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

use futures::StreamExt;

use super::{KeyAdmin, RotationError, Run, Step, status::totals};
use crate::{
    backoff::Backoff,
    crd::rotation::{MigrateSettings as Settings, MigrateStrategy, Phase, ResourceProgress},
    k8s::{EventKind, KubeError, MigrationState, ObjectKey, Target, Touch},
    metrics::{ControllerMetrics, ObjectLabels},
};

/// The resolution of tokio's timer.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Spaces calls evenly at a rate: each caller reserves the next free slot.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    /// At most `qps` slots per second.
    pub fn new(qps: f64) -> Self {
        let interval = Duration::from_secs_f64(1.0 / qps.max(1e-3));
        Self { interval, next: Mutex::new(Instant::now()) }
    }

    /// Waits for this caller's slot.
    pub async fn wait(&self) {
        let slot = {
            // NB: a poisoned lock only means another caller panicked while holding an Instant;
            // the value is still a valid slot.
            let mut next = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        // NB: tokio's timer rounds every sleep up to the next millisecond, so sleeping for a slot
        // less than a tick away would cap each caller near 1 000 calls per second. Such a slot is
        // taken at once; the schedule still advances one interval per call, so the rate holds.
        if slot > Instant::now() + TIMER_TICK {
            tokio::time::sleep_until(slot).await;
        }
    }
}

/// What happened to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Rewritten,
    Unchanged,
    Conflict,
    Skipped,
    Failed,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Self::Rewritten => "rewritten",
            Self::Unchanged => "unchanged",
            Self::Conflict => "conflict",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
        }
    }
}

async fn touch_one(
    kube: &crate::k8s::Kube,
    target: &Target,
    key: &ObjectKey,
    settings: &Settings,
    pacer: &Pacer,
) -> (Outcome, Option<String>) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        pacer.wait().await;
        match kube.touch(target, key).await {
            Ok(Touch::Rewritten) => return (Outcome::Rewritten, None),
            Ok(Touch::Unchanged) => return (Outcome::Unchanged, None),
            // NB: 409 means someone wrote the object after our list, and that write re-encrypted it.
            Err(e) if e.code() == Some(409) => return (Outcome::Conflict, None),
            Err(e) if e.code() == Some(404) => return (Outcome::Skipped, None),
            Err(e) if e.retryable() && attempt < settings.max_attempts() => {
                tracing::debug!(error = %e, attempt, "retrying a write");
                tokio::time::sleep(Backoff::CALLS.delay(attempt)).await;
            }
            Err(e) => return (Outcome::Failed, Some(crate::error::chain(&e))),
        }
    }
}

/// Lists one page from `progress.continue_token` and writes every object on it, updating
/// `progress` (counts, the next token, `complete`). Returns the first failure message, if any
/// object failed; an error means the page could not be listed and nothing was counted.
pub async fn run_page(
    kube: &crate::k8s::Kube,
    target: &Target,
    settings: &Settings,
    pacer: &Pacer,
    progress: &mut ResourceProgress,
    metrics: Option<&ControllerMetrics>,
) -> Result<Option<String>, KubeError> {
    let namespace = Some(progress.namespace.as_str()).filter(|n| !n.is_empty());
    let mut attempt = 0;
    let page = loop {
        attempt += 1;
        let token = Some(progress.continue_token.as_str()).filter(|t| !t.is_empty());
        match kube
            .list_page(target, namespace, settings.selector.as_deref(), settings.page_size(), token)
            .await
        {
            Ok(page) => break page,
            Err(e) if e.code() == Some(410) && token.is_some() => {
                // NB: the token expired (etcd compaction). Starting over is safe: objects already
                // rewritten are current now, so their writes are no-ops and count as unchanged.
                tracing::warn!(resource = %progress.resource, "list continue token expired; starting the list over");
                progress.continue_token.clear();
            }
            Err(e) if e.retryable() && attempt < settings.max_attempts() => {
                tokio::time::sleep(Backoff::CALLS.delay(attempt)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let mut first_failure = None;
    if settings.dry_run {
        progress.rewritten += page.items.len() as u64;
    } else {
        let mut results = futures::stream::iter(page.items.iter())
            .map(|key| touch_one(kube, target, key, settings, pacer))
            .buffer_unordered(settings.concurrency());
        while let Some((outcome, failure)) = results.next().await {
            match outcome {
                Outcome::Rewritten => progress.rewritten += 1,
                Outcome::Unchanged => progress.unchanged += 1,
                Outcome::Conflict => progress.conflicts += 1,
                Outcome::Skipped => progress.skipped += 1,
                Outcome::Failed => progress.failed += 1,
            }
            if let Some(metrics) = metrics {
                let labels =
                    ObjectLabels { resource: progress.resource.to_string(), outcome: outcome.name() };
                metrics.objects.get_or_create(&labels).inc();
            }
            if first_failure.is_none() {
                first_failure = failure;
            }
        }
    }
    match page.next {
        Some(next) => progress.continue_token = next,
        None => {
            progress.continue_token.clear();
            progress.complete = true;
        }
    }
    Ok(first_failure)
}

impl<K: KeyAdmin> Run<'_, K> {
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

    pub(super) async fn migrating(&mut self) -> Result<Step, RotationError> {
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
        let pacer = Pacer::new(settings.qps());
        let mut progress = self.book.status.progress[index].clone();
        let failure =
            run_page(&self.ctx.kube, &target, settings, &pacer, &mut progress, Some(&self.ctx.metrics))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_calls_at_the_rate() {
        let pacer = Pacer::new(10.0);
        let start = tokio::time::Instant::now();
        for _ in 0..21 {
            pacer.wait().await;
        }
        // 21 slots at 10/s: the first is immediate, the last 2 s later.
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_high_rate_does_not_round_every_wait_up_to_a_millisecond() {
        // 100 slots at 100 000/s are due within 1 ms: none may wait for a timer tick.
        let pacer = Pacer::new(100_000.0);
        let start = tokio::time::Instant::now();
        for _ in 0..100 {
            pacer.wait().await;
        }
        assert!(start.elapsed() < Duration::from_millis(2), "{:?}", start.elapsed());
    }
}
