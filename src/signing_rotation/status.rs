//! Status bookkeeping for one step: phase changes, conditions, stalls, the events to emit, and
//! the gauges that mirror the status.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::{
    clock::{self, Clock, parse_time},
    crd::{
        rotation::Condition,
        signing::{SigningPhase, SigningStatus},
    },
    k8s::EventKind,
    metrics::{ControllerMetrics, MemberLabels, PhaseLabels},
};

/// The status being written by one step, and the events it will emit.
pub(super) struct Book<'a> {
    pub(super) name: &'a str,
    pub(super) status: SigningStatus,
    pub(super) events: Vec<(EventKind, &'static str, String)>,
    pub(super) metrics: &'a ControllerMetrics,
    pub(super) clock: &'a dyn Clock,
}

impl Book<'_> {
    pub(super) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub(super) fn now_text(&self) -> String {
        clock::rfc3339(self.now())
    }

    pub(super) fn elapsed_since(&self, text: &str) -> Duration {
        clock::elapsed_since(self.now(), text)
    }

    pub(super) fn enter(&mut self, phase: SigningPhase) {
        let left = self.status.phase;
        let spent = self.elapsed_since(&self.status.phase_started_at);
        self.metrics
            .signing
            .phase_duration
            .get_or_create(&PhaseLabels { phase: left.as_str() })
            .observe(spent.as_secs_f64());
        self.status.phase = phase;
        self.status.phase_started_at = self.now_text();
        self.status.signer_stragglers.clear();
        self.status.api_server_stragglers.clear();
        if phase == SigningPhase::Publishing {
            // NB: a run resumed into Publishing (after a failure) proves publication afresh.
            self.status.published_at.clear();
            self.status.fetched_at.clear();
        }
        self.events.push((
            EventKind::Normal,
            phase.as_str(),
            format!("{} -> {}", left.as_str(), phase.as_str()),
        ));
        tracing::info!(policy = self.name, from = left.as_str(), to = phase.as_str(), "signing-key phase");
    }

    pub(super) fn condition(&mut self, kind: &str, status: bool, reason: &str, message: &str) {
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
    pub(super) fn stall(&mut self, reason: &'static str, message: &str) {
        if self.status.message != message {
            self.events.push((EventKind::Warning, reason, message.to_owned()));
        }
        self.status.message = message.to_owned();
        self.condition("Stalled", true, reason, message);
    }
}

/// Mirrors a status into the gauges. Called after every step, so a restarted controller
/// exports the truth at once.
pub(super) fn observe(metrics: &ControllerMetrics, status: &SigningStatus) {
    let seconds = |text: &str| parse_time(text).map_or(0.0, |t| t.as_second() as f64);
    let signing = &metrics.signing;
    signing.set_phase(SigningPhase::ALL.map(SigningPhase::as_str), status.phase.as_str());
    if !status.last_success.is_empty() {
        signing.last_success.set(seconds(&status.last_success));
    }
    signing.next_run.set(seconds(&status.next_run));
    let draining = status.phase == SigningPhase::Draining;
    signing.drain_until.set(if draining { seconds(&status.drain_until) } else { 0.0 });
    signing.token_lifetime_bound.set(status.max_token_expiration_seconds.unwrap_or(0));
    for (member, list) in
        [("signer", &status.signer_stragglers), ("api_server", &status.api_server_stragglers)]
    {
        signing.stragglers.get_or_create(&MemberLabels { member }).set(list.len() as i64);
    }
}
