//! The controller's two token loops. They run side by side, so a slow legacy run (waiting for the
//! token controller) never delays a managed refresh. Both act only while this replica leads.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::ObjectMeta, jiff::Timestamp};
use tokio::sync::watch;

use super::{
    Clock, TokenError,
    legacy::Legacy,
    managed::{Guard, Managed},
    rfc3339, update_status,
};
use crate::{
    backoff::Backoff,
    crd::tokens::{LegacyStatus, ManagedStatus, TokenPolicy, parse},
    k8s::{Kube, KubeError},
    metrics::ControllerMetrics,
};

/// How long to wait before looking again for a TokenPolicy that does not exist or is invalid.
const ABSENT_WAIT: Duration = Duration::from_secs(60);

/// How soon to look again while a rotated Secret's ServiceAccount reference waits for the token
/// controller to remove the old one.
const REFERENCE_RECHECK: Duration = Duration::from_secs(15);

/// What the token loops need.
#[derive(Clone)]
pub struct TokenLoop {
    /// Kubernetes.
    pub kube: Kube,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Where counts go.
    pub metrics: Arc<ControllerMetrics>,
    /// The TokenPolicy to follow.
    pub policy: String,
    /// kmsgate's own ServiceAccount (`namespace/name`), never issued.
    pub own: String,
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::from_secs((at.as_second() - now.as_second()).max(0) as u64)
}

async fn lost(leader: &watch::Receiver<bool>) {
    let mut leader = leader.clone();
    let _ = leader.wait_for(|held| !*held).await;
}

impl TokenLoop {
    async fn policy(&self) -> Result<Option<TokenPolicy>, TokenError> {
        let policy = self.kube.token_policy(&self.policy).await?;
        if policy.is_none() {
            tracing::debug!(policy = %self.policy, "no TokenPolicy; token rotation is idle");
        }
        Ok(policy)
    }

    /// Runs the legacy and the managed loop until `leader` is dropped.
    pub async fn run(self, leader: watch::Receiver<bool>) {
        tokio::join!(self.run_legacy(leader.clone()), self.run_managed(leader));
    }

    /// Legacy rotation on the policy's schedule.
    pub async fn run_legacy(&self, leader: watch::Receiver<bool>) {
        self.follow(leader, |me| async move { me.legacy_round().await }).await;
    }

    /// A legacy round, then a re-check of the ServiceAccount references still to restore: those
    /// cannot wait for the next scheduled run.
    pub async fn legacy_round(&self) -> Result<Duration, TokenError> {
        let wait = self.legacy_once().await?;
        // NB: restoring a reference never waits for a token, so no token timeout applies.
        let legacy = Legacy::new(&self.kube, &self.policy, &*self.clock, &self.metrics, Duration::ZERO);
        Ok(match legacy.restore_references().await? {
            0 => wait,
            _ => wait.min(REFERENCE_RECHECK),
        })
    }

    /// Managed tokens: a pass whenever one is due, a watched Secret's request changed, or the
    /// resync interval passed.
    pub async fn run_managed(&self, leader: watch::Receiver<bool>) {
        let mut managed = Managed::new(self.kube.clone(), self.clock.clone(), self.metrics.clone());
        let mut changes: Option<BoxStream<'static, Result<ObjectMeta, KubeError>>> = None;
        let mut errors = 0u32;
        let mut waiting = leader.clone();
        loop {
            if waiting.wait_for(|held| *held).await.is_err() {
                return;
            }
            let outcome = tokio::select! {
                outcome = self.managed_once(&mut managed) => outcome,
                () = lost(&leader) => continue,
            };
            let wait = match outcome {
                Ok((wait, watch)) => {
                    errors = 0;
                    if watch && changes.is_none() {
                        changes = Some(self.kube.secret_changes());
                    } else if !watch {
                        changes = None;
                    }
                    wait
                }
                Err(e) => {
                    errors += 1;
                    tracing::warn!(error = %crate::error::chain(&e), "managed token pass failed; retrying");
                    Backoff::CALLS.delay(errors).min(ABSENT_WAIT)
                }
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let change = async {
                    match changes.as_mut() {
                        Some(stream) => stream.next().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    () = lost(&leader) => break,
                    change = change => match change {
                        Some(Ok(secret)) if managed.wants(&secret) => break,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => tracing::debug!(error = %e, "secret watch interrupted"),
                        None => changes = None,
                    },
                }
            }
        }
    }

    async fn follow<'a, F, Fut>(&'a self, leader: watch::Receiver<bool>, once: F)
    where
        F: Fn(&'a Self) -> Fut,
        Fut: std::future::Future<Output = Result<Duration, TokenError>> + 'a,
    {
        let mut waiting = leader.clone();
        let mut errors = 0u32;
        loop {
            if waiting.wait_for(|held| *held).await.is_err() {
                return;
            }
            let wait = tokio::select! {
                outcome = once(self) => match outcome {
                    Ok(wait) => {
                        errors = 0;
                        wait
                    }
                    Err(e) => {
                        errors += 1;
                        tracing::warn!(error = %crate::error::chain(&e), "legacy token run failed; retrying");
                        Backoff::CALLS.delay(errors).min(ABSENT_WAIT)
                    }
                },
                () = lost(&leader) => continue,
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = lost(&leader) => {}
            }
        }
    }

    /// One legacy round: a run when due; returns how long until the next.
    pub async fn legacy_once(&self) -> Result<Duration, TokenError> {
        let Some(policy) = self.policy().await? else { return Ok(ABSENT_WAIT) };
        let plan = parse(&policy.spec)?.legacy;
        if !plan.enabled {
            return Ok(ABSENT_WAIT);
        }
        let now = self.clock.now();
        let status = policy.status.unwrap_or_default();
        let due = super::parse_time(&status.legacy.next_run).is_none_or(|next| next <= now);
        if !due {
            let next = super::parse_time(&status.legacy.next_run).unwrap_or(now);
            return Ok(until(now, next).min(ABSENT_WAIT * 10));
        }
        let legacy = Legacy::new(&self.kube, &self.policy, &*self.clock, &self.metrics, plan.token_timeout);
        let (results, totals) = legacy.run(&plan.selection, false, |_, _, _| {}).await?;
        let problems: Vec<String> = results
            .iter()
            .filter_map(|(c, o)| match o {
                Some(super::legacy::Outcome::Failed(why)) => Some(format!("{}: {why}", c.id())),
                _ => None,
            })
            .take(3)
            .collect();
        let finished = self.clock.now();
        let next =
            plan.schedule.next_after(finished.as_second()).and_then(|s| Timestamp::from_second(s).ok());
        let legacy_status = LegacyStatus {
            last_run: rfc3339(finished),
            next_run: next.map(rfc3339).unwrap_or_default(),
            rotated: totals.rotated,
            failed: totals.failed,
            invalid: totals.invalid,
            message: problems.join("; "),
        };
        tracing::info!(
            rotated = totals.rotated,
            failed = totals.failed,
            invalid = totals.invalid,
            "legacy token run finished"
        );
        update_status(&self.kube, &self.policy, |s| s.legacy = legacy_status.clone()).await?;
        Ok(next.map_or(ABSENT_WAIT * 10, |n| until(finished, n)))
    }

    /// One managed pass; returns how long until the next and whether to watch Secrets.
    pub async fn managed_once(&self, managed: &mut Managed) -> Result<(Duration, bool), TokenError> {
        let Some(policy) = self.policy().await? else { return Ok((ABSENT_WAIT, false)) };
        let plan = parse(&policy.spec)?.managed;
        if !plan.enabled {
            return Ok((ABSENT_WAIT, false));
        }
        let guard = Guard::new(&plan, &self.own);
        let pass = managed.pass(&plan, &guard, true).await?;
        let now = self.clock.now();
        let summary = ManagedStatus {
            tokens: pass.tokens,
            failing: pass.failing,
            earliest_expiry: pass.earliest_expiry.map(rfc3339).unwrap_or_default(),
        };
        if policy.status.as_ref().map(|s| &s.managed) != Some(&summary) {
            update_status(&self.kube, &self.policy, |s| s.managed = summary.clone()).await?;
        }
        let wait = pass.next.map_or(plan.resync, |next| until(now, next).min(plan.resync));
        // NB: whatever the answers said, never spin.
        Ok((wait.max(Duration::from_secs(1)), true))
    }
}
