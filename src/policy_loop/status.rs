//! The fields every policy status shares, as the loop core reads and writes them.

use serde::Serialize;

use crate::{crd::status::Condition, metrics::ControllerMetrics, metrics::LoopSeries};

/// A policy status the loop core keeps: the fields every loop shares (through [`Record`] and the
/// getters, which [`shared_fields`] writes), and what is the loop's own.
pub trait LoopStatus: Clone + Default + PartialEq + Serialize + Send + Sync {
    /// Where a run stands.
    type Phase: Copy + PartialEq + Send + Sync;
    /// No run in progress.
    const IDLE: Self::Phase;
    /// A run stopped; a new request or the schedule resumes it.
    const FAILED: Self::Phase;
    /// What the loop's runs are called in logs and messages: `rotation`, `signing-key rotation`.
    const WHAT: &'static str;

    /// A phase's name.
    fn phase_name(phase: Self::Phase) -> &'static str;
    /// The current phase.
    fn phase(&self) -> Self::Phase;
    /// The request annotation value last acted on.
    fn handled_request(&self) -> &str;
    /// When the schedule next starts a run (RFC 3339).
    fn next_run(&self) -> &str;
    /// The shared fields, to write.
    fn record(&mut self) -> Record<'_, Self::Phase>;

    /// The loop's own series.
    fn series(metrics: &ControllerMetrics) -> LoopSeries<'_>;
    /// Clears what the loop proves afresh in `phase`, as the run enters it.
    fn entered(&mut self, phase: Self::Phase);
    /// Mirrors the status into the gauges; called after every step, so a restarted controller
    /// exports the truth at once.
    fn observe(&self, metrics: &ControllerMetrics);

    /// Whether no run is in progress (Idle or Failed).
    fn rests(&self) -> bool {
        let phase = self.phase();
        phase == Self::IDLE || phase == Self::FAILED
    }

    /// Whether the run that took `request` has ended.
    fn ended(&self, request: &str) -> bool {
        self.handled_request() == request && self.rests()
    }
}

/// The fields every policy status shares, borrowed to write.
pub struct Record<'a, P> {
    /// Current phase.
    pub phase: &'a mut P,
    /// The phase a failed run stopped in.
    pub failed_phase: &'a mut Option<P>,
    /// When the current phase started.
    pub phase_started_at: &'a mut String,
    /// Identifies the current run.
    pub run_id: &'a mut String,
    /// What started the current run.
    pub trigger: &'a mut String,
    /// When the current run started.
    pub started_at: &'a mut String,
    /// The version before the run.
    pub from_version: &'a mut Option<u64>,
    /// The version the run moves to.
    pub to_version: &'a mut Option<u64>,
    /// The version the loop last handled.
    pub known_version: &'a mut Option<u64>,
    /// The last finished run's result.
    pub result: &'a mut String,
    /// The last run's outcome or the current problem, for people.
    pub message: &'a mut String,
    /// The request annotation value last acted on.
    pub handled_request: &'a mut String,
    /// When the last run succeeded.
    pub last_success: &'a mut String,
    /// When the schedule next starts a run.
    pub next_run: &'a mut String,
    /// Conditions.
    pub conditions: &'a mut Vec<Condition>,
}

/// Writes the [`LoopStatus`] items that only read or borrow the shared fields, for a status whose
/// shared fields carry the shared names and whose phase enum `$phase` has `Idle`, `Failed` and
/// `as_str`.
macro_rules! shared_fields {
    ($phase:ident) => {
        const IDLE: $phase = $phase::Idle;
        const FAILED: $phase = $phase::Failed;

        fn phase_name(phase: $phase) -> &'static str {
            phase.as_str()
        }

        fn phase(&self) -> $phase {
            self.phase
        }

        fn handled_request(&self) -> &str {
            &self.handled_request
        }

        fn next_run(&self) -> &str {
            &self.next_run
        }

        fn record(&mut self) -> $crate::policy_loop::Record<'_, $phase> {
            $crate::policy_loop::Record {
                phase: &mut self.phase,
                failed_phase: &mut self.failed_phase,
                phase_started_at: &mut self.phase_started_at,
                run_id: &mut self.run_id,
                trigger: &mut self.trigger,
                started_at: &mut self.started_at,
                from_version: &mut self.from_version,
                to_version: &mut self.to_version,
                known_version: &mut self.known_version,
                result: &mut self.result,
                message: &mut self.message,
                handled_request: &mut self.handled_request,
                last_success: &mut self.last_success,
                next_run: &mut self.next_run,
                conditions: &mut self.conditions,
            }
        }
    };
}

pub(crate) use shared_fields;
