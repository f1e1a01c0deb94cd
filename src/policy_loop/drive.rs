//! The drivers that step a policy: until the run that handles a request has finished (`kmsgate
//! rotate` with no controller running), or for as long as this process holds the Lease (the
//! controller). A failed step is retried with backoff, never longer apart than the poll.

use kube::core::object::HasStatus;
use tokio::sync::watch;

use super::{LoopStatus, PolicyLoop, Step, step};
use crate::backoff::Backoff;

/// Failed steps in a row [`drive`] retries before it gives up.
const DRIVE_RETRIES: u32 = 5;

/// Steps policy `name` until the run that handles `request` has finished (Idle or Failed),
/// calling `report` with the status after every step.
pub async fn drive<L: PolicyLoop>(
    ctx: &L,
    name: &str,
    request: &str,
    mut report: impl FnMut(&L::Status),
) -> Result<L::Status, L::Error> {
    let mut errors = 0u32;
    loop {
        let outcome = step(ctx, name).await;
        let policy: L::Policy = ctx.parts().kube.get_policy(name).await?;
        let status = policy.status().cloned().unwrap_or_default();
        report(&status);
        if status.ended(request) {
            return Ok(status);
        }
        match outcome {
            Ok(Step::Again) => errors = 0,
            Ok(Step::Wait(wait) | Step::Rest(wait)) => {
                errors = 0;
                tokio::time::sleep(wait).await;
            }
            Err(e) if errors < DRIVE_RETRIES => {
                errors += 1;
                tracing::warn!(error = %crate::error::chain(&e), "step failed; retrying");
                tokio::time::sleep(Backoff::CALLS.delay(errors)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What [`follow`] has just done, for a status page.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// Not leading: waiting for the Lease.
    Waiting,
    /// A step ran through and the loop waits for the next.
    Stepped,
    /// A step failed with this error; it is retried.
    Failed(&'a str),
}

/// Steps policy `name` while `leader` says this process holds the Lease, calling `report` as it
/// goes; returns once the Lease campaign has ended. Losing the Lease cuts the current step short,
/// which is safe because every step resumes from the status.
pub async fn follow<L: PolicyLoop>(
    ctx: &L,
    name: &str,
    leader: watch::Receiver<bool>,
    mut report: impl FnMut(Progress<'_>),
) {
    let what = <L::Status as LoopStatus>::WHAT;
    let lost = || {
        let mut leader = leader.clone();
        async move {
            let _ = leader.wait_for(|held| !*held).await;
        }
    };
    let mut errors = 0u32;
    loop {
        report(Progress::Waiting);
        if leader.clone().wait_for(|held| *held).await.is_err() {
            return;
        }
        tracing::info!(policy = name, "leading: following the {what} policy");
        loop {
            let outcome = tokio::select! {
                outcome = step(ctx, name) => outcome,
                () = lost() => break,
            };
            let wait = match outcome {
                Ok(Step::Again) => {
                    errors = 0;
                    continue;
                }
                Ok(Step::Wait(wait) | Step::Rest(wait)) => {
                    errors = 0;
                    report(Progress::Stepped);
                    wait
                }
                Err(e) => {
                    errors += 1;
                    let message = crate::error::chain(&e);
                    tracing::warn!(policy = name, error = %message, "{what} step failed; retrying");
                    report(Progress::Failed(&message));
                    Backoff::CALLS.delay(errors).min(ctx.parts().poll)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = lost() => break,
            }
        }
        tracing::warn!(policy = name, "lost the leader lease; the {what} loop stopped acting");
        if leader.has_changed().is_err() {
            return;
        }
    }
}
