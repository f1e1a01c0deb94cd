//! The RotationStatus as the loop core keeps it: what entering a phase clears, and the gauges
//! that mirror it.

use crate::{
    clock::parse_time,
    crd::rotation::{Phase, ResourceProgress, RotationStatus, Totals},
    metrics::{ClassLabels, ControllerMetrics, LoopSeries},
    policy_loop::{LoopStatus, shared_fields},
};

impl LoopStatus for RotationStatus {
    type Phase = Phase;

    const WHAT: &'static str = "rotation";

    shared_fields!(Phase);

    fn series(metrics: &ControllerMetrics) -> LoopSeries<'_> {
        metrics.rotation()
    }

    fn entered(&mut self, phase: Phase) {
        if phase == Phase::Converging {
            // NB: a run resumed into Converging (after a failure) proves convergence afresh.
            self.plugins_converged_at.clear();
        }
    }

    /// Mirrors a status into the gauges: phase, last success, next run, latest verification.
    fn observe(&self, metrics: &ControllerMetrics) {
        let seconds = |text: &str| parse_time(text).map_or(0.0, |t| t.as_second() as f64);
        metrics.set_phase(Phase::ALL.map(Phase::as_str), self.phase.as_str());
        if !self.last_success.is_empty() {
            metrics.last_success.set(seconds(&self.last_success));
        }
        metrics.next_run.set(seconds(&self.next_run));
        if let Some(v) = &self.verification {
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
}

pub(super) fn totals(progress: &[ResourceProgress]) -> Totals {
    progress.iter().fold(Totals::default(), |mut t, p| {
        t.rewritten += p.rewritten;
        t.conflicts += p.conflicts;
        t.skipped += p.skipped;
        t.failed += p.failed;
        t
    })
}
