//! The SigningStatus as the loop core keeps it: what entering a phase clears, and the gauges
//! that mirror it.

use crate::{
    clock::parse_time,
    crd::signing::{SigningPhase, SigningStatus},
    metrics::{ControllerMetrics, LoopSeries, MemberLabels},
    policy_loop::{LoopStatus, shared_fields},
};

impl LoopStatus for SigningStatus {
    type Phase = SigningPhase;

    const WHAT: &'static str = "signing-key rotation";

    shared_fields!(SigningPhase);

    fn series(metrics: &ControllerMetrics) -> LoopSeries<'_> {
        metrics.signing.series()
    }

    fn entered(&mut self, phase: SigningPhase) {
        self.signer_stragglers.clear();
        self.api_server_stragglers.clear();
        if phase == SigningPhase::Publishing {
            // NB: a run resumed into Publishing (after a failure) proves publication afresh.
            self.published_at.clear();
            self.fetched_at.clear();
        }
    }

    fn observe(&self, metrics: &ControllerMetrics) {
        let seconds = |text: &str| parse_time(text).map_or(0.0, |t| t.as_second() as f64);
        let signing = &metrics.signing;
        signing.series().set_phase(SigningPhase::ALL.map(SigningPhase::as_str), self.phase.as_str());
        if !self.last_success.is_empty() {
            signing.last_success.set(seconds(&self.last_success));
        }
        signing.next_run.set(seconds(&self.next_run));
        let draining = self.phase == SigningPhase::Draining;
        signing.drain_until.set(if draining { seconds(&self.drain_until) } else { 0.0 });
        signing.token_lifetime_bound.set(self.max_token_expiration_seconds.unwrap_or(0));
        for (member, list) in
            [("signer", &self.signer_stragglers), ("api_server", &self.api_server_stragglers)]
        {
            signing.stragglers.get_or_create(&MemberLabels { member }).set(list.len() as i64);
        }
    }
}
