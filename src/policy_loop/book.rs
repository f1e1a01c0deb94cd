//! The status one step writes, and the Events it will record: phase changes, conditions, stalls,
//! the request annotation and the schedule, and the moves every loop makes alike (stop a run,
//! start one, resume one, finish one).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::{Event, LoopStatus, Step};
use crate::{
    clock::{self, Clock, parse_time},
    crd::{Schedule, status::set_condition},
    k8s::EventKind,
    metrics::{ControllerMetrics, LoopSeries, PhaseLabels},
};

/// The status being written by one step, and the Events it will record.
pub struct Book<'a, S> {
    /// The policy.
    pub name: &'a str,
    /// Its status as the step leaves it.
    pub status: S,
    /// The Events to record once the status is written.
    pub events: Vec<Event>,
    request: Option<String>,
    schedule: Option<&'a Schedule>,
    series: LoopSeries<'a>,
    clock: &'a dyn Clock,
    poll: Duration,
}

impl<'a, S: LoopStatus> Book<'a, S> {
    /// A book for policy `name` with `status`, the value of its request annotation and the
    /// schedule of its plan (none when its spec is invalid).
    pub fn new(
        name: &'a str,
        status: S,
        request: Option<String>,
        schedule: Option<&'a Schedule>,
        metrics: &'a ControllerMetrics,
        clock: &'a dyn Clock,
        poll: Duration,
    ) -> Self {
        let series = S::series(metrics);
        Self { name, status, events: Vec::new(), request, schedule, series, clock, poll }
    }

    /// Now.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Now, in RFC 3339.
    pub fn now_text(&self) -> String {
        clock::rfc3339(self.now())
    }

    /// How long ago `text` (RFC 3339) was.
    pub fn elapsed_since(&self, text: &str) -> Duration {
        clock::elapsed_since(self.now(), text)
    }

    /// Moves the run to `phase`, timing the phase it leaves.
    pub fn enter(&mut self, phase: S::Phase) {
        let (from, to) = (S::phase_name(self.status.phase()), S::phase_name(phase));
        let started = self.status.record().phase_started_at.clone();
        let spent = self.elapsed_since(&started);
        self.series.phase_duration.get_or_create(&PhaseLabels { phase: from }).observe(spent.as_secs_f64());
        let now = self.now_text();
        let record = self.status.record();
        *record.phase = phase;
        *record.phase_started_at = now;
        self.status.entered(phase);
        self.events.push((EventKind::Normal, to, format!("{from} -> {to}")));
        tracing::info!(policy = self.name, from, to, "{} phase", S::WHAT);
    }

    /// Sets condition `kind`.
    pub fn condition(&mut self, kind: &str, status: bool, reason: &str, message: &str) {
        let now = self.now_text();
        set_condition(self.status.record().conditions, kind, status, reason, message, now);
    }

    /// Records a problem that stops nothing by itself (the spec is bad, for example).
    pub fn stall(&mut self, reason: &'static str, message: &str) {
        let current = self.status.record().message;
        if *current != message {
            self.events.push((EventKind::Warning, reason, message.to_owned()));
            *current = message.to_owned();
        }
        self.condition("Stalled", true, reason, message);
    }

    /// When the schedule next starts a run, from now (RFC 3339; empty for never).
    pub fn next_run(&self) -> String {
        let next = self.schedule.and_then(|s| s.next_after(self.now().as_second()));
        next.map(clock::seconds_text).unwrap_or_default()
    }

    /// A value of the request annotation not acted on yet.
    pub fn new_request(&self) -> Option<String> {
        let value = self.request.as_ref()?;
        (!value.is_empty() && value != self.status.handled_request()).then(|| value.clone())
    }

    /// Marks a new request as acted on.
    pub fn take_request(&mut self) {
        if let Some(request) = self.new_request() {
            *self.status.record().handled_request = request;
        }
    }

    /// Whether the schedule is due.
    pub fn due(&self) -> bool {
        parse_time(self.status.next_run()).is_some_and(|t| t <= self.now())
    }

    /// Rests until the schedule is due, checking at least every poll.
    pub fn rest(&self) -> Step {
        let until_next = parse_time(self.status.next_run())
            .map(|t| Duration::from_secs((t.as_second() - self.now().as_second()).max(1) as u64))
            .unwrap_or(self.poll);
        Step::Rest(until_next.min(self.poll))
    }

    /// Rests at Idle, first noting when the schedule next starts a run if nothing says so yet.
    pub fn rest_idle(&mut self) -> Step {
        if self.status.next_run().is_empty() {
            *self.status.record().next_run = self.next_run();
        }
        self.rest()
    }

    /// Stops the run at the current phase; a new request or the schedule resumes it there.
    pub fn fail(&mut self, reason: &'static str, message: &str) -> Step {
        tracing::warn!(policy = self.name, reason, message, "{} stopped", S::WHAT);
        let record = self.status.record();
        *record.failed_phase = Some(*record.phase);
        self.enter(S::FAILED);
        *self.status.record().result = "Failed".into();
        self.stall(reason, message);
        *self.status.record().next_run = self.next_run();
        self.rest()
    }

    /// Starts a run by `trigger` from version `from`; the caller has reset what a run does not
    /// keep, and enters the run's first phase.
    pub fn begin(&mut self, trigger: &str, from: u64) {
        let now = self.now_text();
        let record = self.status.record();
        *record.run_id = uuid::Uuid::new_v4().to_string();
        *record.trigger = trigger.into();
        *record.started_at = now;
        *record.from_version = Some(from);
        *record.message = format!("run started by {trigger}");
        self.condition("Ready", false, "Running", &format!("a {} is in progress", S::WHAT));
    }

    /// Whether a failed run resumes now: a new request (taken here) or the schedule says so.
    pub fn resume_due(&mut self) -> bool {
        let request = self.new_request();
        if request.is_none() && !self.due() {
            return false;
        }
        self.take_request();
        true
    }

    /// Resumes a failed run in the phase it stopped in.
    pub fn resume(&mut self) -> Step {
        let record = self.status.record();
        let resume = record.failed_phase.take().unwrap_or(S::IDLE);
        record.result.clear();
        self.condition("Stalled", false, "Resumed", "");
        self.enter(resume);
        *self.status.record().message = format!("resumed at {}", S::phase_name(resume));
        Step::Again
    }

    /// Ends the run at Idle with `result`: the version it moved to becomes the known one, and a
    /// request that arrived during the run is satisfied by it. The caller writes the message.
    pub fn finish(&mut self, result: &str, message: &str) {
        self.enter(S::IDLE);
        let now = self.now_text();
        let request = self.request.clone();
        let record = self.status.record();
        *record.result = result.into();
        *record.last_success = now;
        *record.known_version = record.to_version.or(*record.known_version);
        *record.failed_phase = None;
        if let Some(request) = request {
            // NB: a request that arrived during the run is satisfied by it.
            *record.handled_request = request;
        }
        self.series.last_success.set(self.now().as_second() as f64);
        self.condition("Ready", true, result, message);
        self.condition("Stalled", false, result, "");
        self.events.push((EventKind::Normal, "RotationFinished", message.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::rotation::{Phase, RotationStatus};

    struct At(i64);

    impl Clock for At {
        fn now(&self) -> Timestamp {
            Timestamp::from_second(self.0).unwrap()
        }
    }

    fn book<'a>(
        status: RotationStatus,
        request: Option<&str>,
        schedule: &'a Schedule,
        metrics: &'a ControllerMetrics,
        clock: &'a At,
    ) -> Book<'a, RotationStatus> {
        let poll = Duration::from_secs(30);
        Book::new("p", status, request.map(str::to_owned), Some(schedule), metrics, clock, poll)
    }

    #[test]
    fn a_request_counts_once_and_an_empty_one_never() {
        let (metrics, clock, schedule) = (ControllerMetrics::new(), At(1_000_000), Schedule::Never);
        let handled = RotationStatus { handled_request: "r1".into(), ..RotationStatus::default() };
        assert_eq!(book(handled.clone(), Some("r1"), &schedule, &metrics, &clock).new_request(), None);
        assert_eq!(book(handled.clone(), Some(""), &schedule, &metrics, &clock).new_request(), None);
        let mut fresh = book(handled, Some("r2"), &schedule, &metrics, &clock);
        assert_eq!(fresh.new_request().as_deref(), Some("r2"));
        fresh.take_request();
        assert_eq!((fresh.new_request(), fresh.status.handled_request.as_str()), (None, "r2"));
    }

    #[test]
    fn a_resting_loop_wakes_for_the_schedule_but_checks_every_poll() {
        let (metrics, clock) = (ControllerMetrics::new(), At(1_000_000));
        let hourly = Schedule::parse(Some("1h")).unwrap();
        let mut idle = book(RotationStatus::default(), None, &hourly, &metrics, &clock);
        assert_eq!(idle.rest_idle(), Step::Rest(Duration::from_secs(30)));
        assert_eq!(idle.status.next_run, clock::seconds_text(1_003_600));
        assert!(!idle.due());
        let soon = RotationStatus { next_run: clock::seconds_text(1_000_010), ..RotationStatus::default() };
        assert_eq!(book(soon, None, &hourly, &metrics, &clock).rest(), Step::Rest(Duration::from_secs(10)));
        let past = RotationStatus { next_run: clock::seconds_text(999_000), ..RotationStatus::default() };
        let past = book(past, None, &hourly, &metrics, &clock);
        assert!(past.due());
        assert_eq!(past.rest(), Step::Rest(Duration::from_secs(1)));
    }

    #[test]
    fn a_failed_run_resumes_where_it_stopped_and_a_finished_one_takes_the_request() {
        let (metrics, clock, schedule) = (ControllerMetrics::new(), At(1_000_000), Schedule::Never);
        let running = RotationStatus {
            phase: Phase::Migrating,
            to_version: Some(3),
            known_version: Some(2),
            ..RotationStatus::default()
        };
        let mut run = book(running, Some("r1"), &schedule, &metrics, &clock);
        run.fail("Broken", "it broke");
        assert_eq!((run.status.phase, run.status.failed_phase), (Phase::Failed, Some(Phase::Migrating)));
        assert!(run.resume_due(), "a new request resumes it");
        assert_eq!(run.resume(), Step::Again);
        assert_eq!((run.status.phase, run.status.failed_phase), (Phase::Migrating, None));
        assert_eq!(run.status.message, "resumed at Migrating");
        run.finish("Succeeded", "done");
        let status = &run.status;
        assert_eq!(
            (status.phase, status.known_version, status.result.as_str()),
            (Phase::Idle, Some(3), "Succeeded")
        );
        assert_eq!(status.handled_request, "r1");
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.message.as_str()), ("True", "done"));
        let reasons: Vec<&str> = run.events.iter().map(|(_, reason, _)| *reason).collect();
        assert_eq!(reasons, ["Failed", "Broken", "Migrating", "Idle", "RotationFinished"]);
    }
}
