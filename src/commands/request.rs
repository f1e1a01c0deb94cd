//! What `kmsgate rotate` and `kmsgate signer rotate` share: ask the controller holding the Lease
//! for a run through the policy's request annotation and follow it, or, when none holds the
//! Lease, take it and run the loop here until the run has finished.

use std::{sync::Arc, time::Duration};

use kube::core::object::HasStatus;

use super::CommandError;
use crate::{
    clock::{Clock, SystemClock},
    config::ControllerConfig,
    controller::{self, Leadership},
    k8s::Kube,
    metrics::ControllerMetrics,
    policy_loop::{self, LoopStatus, PolicyLoop},
};

/// When `--wait` gives up on a controller that does not take the request.
pub(super) struct Patience {
    /// How long the policy may rest without taking it.
    pub(super) wait: Duration,
    /// The setting that names the policy a controller follows, for the error.
    pub(super) setting: &'static str,
}

/// A request for a run of one policy, from the command line.
pub(super) struct Request<'a, L: PolicyLoop> {
    /// The controller's settings (the Lease).
    pub(super) config: &'a ControllerConfig,
    /// Kubernetes.
    pub(super) kube: &'a Kube,
    /// The policy.
    pub(super) name: &'a str,
    /// One progress line for a status.
    pub(super) describe: fn(&L::Status) -> String,
}

impl<L: PolicyLoop> Request<'_, L>
where
    CommandError: From<L::Error>,
{
    /// Asks the controller holding the Lease for a run and, with `wait`, follows it until it
    /// ends (giving up after `patience` when given); when none holds the Lease, takes it as
    /// `holder` and runs the loop built by `context` here until the run has finished.
    pub(super) async fn send(
        &self,
        wait: bool,
        patience: Option<Patience>,
        holder: String,
        context: impl AsyncFnOnce(Arc<ControllerMetrics>) -> Result<L, CommandError>,
    ) -> Result<(), CommandError> {
        let what = L::Status::WHAT;
        let request = format!(
            "{}-{}",
            crate::clock::rfc3339(SystemClock.now()),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let (kube, name) = (self.kube, self.name);
        if let Some(leader) = kube.lease_holder(&self.config.lease_namespace, &self.config.lease_name).await?
        {
            kube.annotate_policy::<L::Policy>(name, L::REQUEST_ANNOTATION, &request).await?;
            eprintln!("asked the running controller ({leader}) for a {what}; request {request}");
            if !wait {
                return Ok(());
            }
            return self.watch(&request, patience).await;
        }
        eprintln!("no controller holds the lease; running the {what} here until it finishes");
        let metrics = Arc::new(ControllerMetrics::new());
        let ctx = context(metrics.clone()).await?;
        let mut leadership = Leadership::start(ctx.parts().kube.clone(), self.config, holder, metrics);
        tokio::time::timeout(self.config.lease_duration, leadership.acquired()).await.map_err(|_| {
            CommandError::CannotRun("could not take the controller lease; is a controller starting?".into())
        })?;
        kube.annotate_policy::<L::Policy>(name, L::REQUEST_ANNOTATION, &request).await?;
        let mut lines = Lines::default();
        let report = |status: &L::Status| lines.print((self.describe)(status));
        let finished = tokio::select! {
            finished = policy_loop::drive(&ctx, name, &request, report) => finished?,
            () = leadership.lost() => return Err(CommandError::Refused("lost the controller lease; the run resumes wherever a controller runs".into())),
        };
        finish(finished)
    }

    /// Follows the run a running controller makes for `request` until it ends.
    async fn watch(&self, request: &str, patience: Option<Patience>) -> Result<(), CommandError> {
        let mut lines = Lines::default();
        let mut resting_since: Option<tokio::time::Instant> = None;
        loop {
            let policy: L::Policy = self.kube.get_policy(self.name).await?;
            let status = policy.status().cloned().unwrap_or_default();
            let resting = status.handled_request() != request && status.rests();
            let since = match resting {
                true => *resting_since.get_or_insert_with(tokio::time::Instant::now),
                false => {
                    resting_since = None;
                    tokio::time::Instant::now()
                }
            };
            if let Some(Patience { wait, setting }) = patience
                && unhandled(&status, request, since.elapsed(), wait)
            {
                let name = self.name;
                tracing::warn!(
                    policy = name,
                    request,
                    "the controller holding the lease did not take the request"
                );
                return Err(CommandError::Refused(format!(
                    "the controller holding the lease did not take request {request} within {wait:?}; does its {setting} name {name}? The annotation stays set, so a controller that follows {name} runs it"
                )));
            }
            lines.print((self.describe)(&status));
            if status.ended(request) {
                return finish(status);
            }
            tokio::time::sleep(controller::WATCH_INTERVAL).await;
        }
    }
}

/// Whether `--wait` should give up: the policy rests (Idle or Failed, where a running loop takes
/// a new request at its next step) without having taken `request` for `waited`, longer than
/// `patience`. A run in progress takes the request only when it ends, so it never counts.
pub(super) fn unhandled(
    status: &impl LoopStatus,
    request: &str,
    waited: Duration,
    patience: Duration,
) -> bool {
    status.handled_request() != request && status.rests() && waited > patience
}

/// Prints how the run ended; an error when it stopped.
fn finish<S: LoopStatus>(mut status: S) -> Result<(), CommandError> {
    let stopped = status.phase() == S::FAILED;
    let record = status.record();
    println!("{}: {}", record.result, record.message);
    match stopped {
        true => Err(CommandError::Refused(format!("{} stopped: {}", S::WHAT, record.message))),
        false => Ok(()),
    }
}

/// Progress lines on stderr, each printed once.
#[derive(Default)]
struct Lines {
    last: String,
}

impl Lines {
    fn print(&mut self, line: String) {
        if line != self.last {
            eprintln!("{line}");
            self.last = line;
        }
    }
}
