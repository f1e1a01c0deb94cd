//! What the closed-loop policies (the data-key rotation and the signing-key rotation) share: a
//! step that reads the policy, works from whatever its status says and writes the status back
//! ([`step`]); the book that step writes in ([`Book`]: phases, conditions, stalls, Events, the
//! request annotation and the schedule); and the drivers that step a policy until a request is
//! handled ([`drive`]) or while this process leads ([`follow`]). The phases, and what each status
//! keeps beyond the fields all of them share, stay in each loop.

mod book;
mod drive;
mod status;

use std::{future::Future, time::Duration};

use kube::{Resource, core::object::HasStatus};

use crate::{
    clock::Clock,
    crd::{Schedule, field::SpecError},
    k8s::{EventKind, Kube, KubeError, Policy},
    metrics::ControllerMetrics,
};

pub use book::Book;
pub use drive::{Progress, drive, follow};
pub(crate) use status::shared_fields;
pub use status::{LoopStatus, Record};

/// What the caller should do after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// More work is ready: step again now.
    Again,
    /// Waiting on something outside: step again after this long.
    Wait(Duration),
    /// No run in progress (Idle, Failed or suspended); the next check is due after this long.
    Rest(Duration),
}

/// What a loop's step needs from its context, whichever loop it is.
pub struct Parts<'a> {
    /// Kubernetes.
    pub kube: &'a Kube,
    /// Metrics.
    pub metrics: &'a ControllerMetrics,
    /// "Now".
    pub clock: &'a dyn Clock,
    /// Longest wait between checks while waiting on something.
    pub poll: Duration,
}

/// One closed loop over one kind of policy: what it reads, and the phases that are its own.
pub trait PolicyLoop: Sync {
    /// The policy resource.
    type Policy: Policy + HasStatus<Status = Self::Status>;
    /// Its status.
    type Status: LoopStatus;
    /// Its spec, parsed.
    type Plan: Sync;
    /// Why a step could not run.
    type Error: From<KubeError> + std::error::Error + Send;
    /// The annotation that asks for a run now; any new value counts.
    const REQUEST_ANNOTATION: &'static str;

    /// What a step needs from the context.
    fn parts(&self) -> Parts<'_>;

    /// Parses the policy's spec once.
    fn plan(policy: &Self::Policy) -> Result<Self::Plan, SpecError>;

    /// When the plan starts runs.
    fn schedule(plan: &Self::Plan) -> &Schedule;

    /// Does the loop's own part of one step on a policy whose spec is valid, in `book`, and
    /// hands the book back with what the caller should do next.
    fn advance<'a>(
        &'a self,
        policy: &'a Self::Policy,
        plan: &'a Self::Plan,
        book: Book<'a, Self::Status>,
    ) -> impl Future<Output = (Book<'a, Self::Status>, Result<Step, Self::Error>)>;
}

/// Does one unit of work on policy `name` and records it: reads the policy, stalls it when its
/// spec is invalid or lets the loop advance it, then writes the status back when it changed, sets
/// the gauges from it and records the step's Events.
pub async fn step<L: PolicyLoop>(ctx: &L, name: &str) -> Result<Step, L::Error> {
    let parts = ctx.parts();
    let policy: L::Policy = parts.kube.get_policy(name).await?;
    let before = policy.status().cloned().unwrap_or_default();
    let plan = L::plan(&policy);
    let request = policy.meta().annotations.as_ref().and_then(|a| a.get(L::REQUEST_ANNOTATION));
    let schedule = plan.as_ref().ok().map(L::schedule);
    let book =
        Book::new(name, before.clone(), request.cloned(), schedule, parts.metrics, parts.clock, parts.poll);
    let (book, step) = match &plan {
        Err(e) => {
            let mut book = book;
            book.stall("InvalidSpec", &e.to_string());
            (book, Ok(Step::Rest(parts.poll)))
        }
        Ok(plan) => ctx.advance(&policy, plan, book).await,
    };
    // NB: progress made before an error (a finished page, a proof recorded) is still written.
    if book.status != before {
        parts.kube.patch_policy_status::<L::Policy>(name, &before, &book.status).await?;
    }
    book.status.observe(parts.metrics);
    for (kind, reason, note) in book.events {
        parts.kube.policy_event::<L::Policy>(name, kind, reason, &note).await;
    }
    step
}

/// An Event a step records about its policy: its kind, reason and note.
pub type Event = (EventKind, &'static str, String);
