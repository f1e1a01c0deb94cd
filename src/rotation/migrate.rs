//! The re-encrypt engine: a metadata-only paged list and a no-op merge patch per object, paced
//! to a QPS limit with bounded concurrency. The API server rewrites a stale object on any write,
//! so the no-op write re-encrypts it; a resourceVersion that does not change means the object
//! was already current. Shared by the controller's Migrate phase and `kmsgate reencrypt`.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

use futures::StreamExt;

use crate::{
    backoff::Backoff,
    crd::rotation::{MigrateSettings as Settings, ResourceProgress},
    k8s::{KubeError, ObjectKey, Target, Touch},
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
