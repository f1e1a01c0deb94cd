//! The plugin's health: probe history that decides healthz and, in `grace` outage mode, how long
//! an outage may keep it "ok". Kept apart from I/O, like the key tracker, so it is tested with
//! injected time.

use std::time::Duration;

use tokio::time::Instant;

use super::state::KeyTracker;

/// The outcome of the last probe of one kind.
#[derive(Debug, Clone, Copy)]
pub struct ProbeRecord {
    /// When it finished.
    pub at: Instant,
    /// Whether it succeeded.
    pub ok: bool,
}

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// A short reason with no secret in it.
    pub reason: String,
    /// The key store could not be reached or did not answer (an outage, not a refusal).
    pub unreachable: bool,
}

impl Failure {
    /// A failure that is not an outage (refusal, misconfiguration, conflict).
    pub fn refused(reason: impl Into<String>) -> Self {
        Self { reason: reason.into(), unreachable: false }
    }
}

/// Probe history that decides healthz.
#[derive(Debug)]
pub struct Health {
    threshold: u32,
    staleness: Duration,
    /// `Some` in `grace` outage mode: how long an outage may keep healthz "ok".
    grace: Option<Duration>,
    /// When the current outage began (first unreachable failure since the last success).
    pub unreachable_since: Option<Instant>,
    last_failure_unreachable: bool,
    poll_failures: u32,
    round_trip_failures: u32,
    /// The last metadata poll.
    pub last_poll: Option<ProbeRecord>,
    /// The last encrypt+decrypt round trip.
    pub last_round_trip: Option<ProbeRecord>,
    /// The last round trip that succeeded.
    pub last_round_trip_ok: Option<Instant>,
    last_error: Option<String>,
    last_poll_error: Option<String>,
}

/// Longest cause healthz carries: the API server logs healthz on every failed Status, and the
/// whole cause is on `/status` anyway.
const HEALTHZ_CAUSE_MAX_CHARS: usize = 200;

impl Health {
    /// Unhealthy after `threshold` consecutive failed probes or `staleness` without a round trip;
    /// with `grace`, an outage that follows a good round trip stays "ok" for that long.
    pub fn new(threshold: u32, staleness: Duration, grace: Option<Duration>) -> Self {
        Self {
            threshold: threshold.max(1),
            staleness,
            grace,
            unreachable_since: None,
            last_failure_unreachable: false,
            poll_failures: 0,
            round_trip_failures: 0,
            last_poll: None,
            last_round_trip: None,
            last_round_trip_ok: None,
            last_error: None,
            last_poll_error: None,
        }
    }

    /// Records a metadata poll.
    pub fn poll(&mut self, now: Instant, result: Result<(), Failure>) {
        self.last_poll = Some(ProbeRecord { at: now, ok: result.is_ok() });
        match result {
            Ok(()) => {
                self.poll_failures = 0;
                self.unreachable_since = None;
                self.last_poll_error = None;
            }
            Err(e) => {
                self.poll_failures += 1;
                self.last_poll_error = Some(e.reason.clone());
                self.failed(now, e);
            }
        }
    }

    /// Records a round trip.
    pub fn round_trip(&mut self, now: Instant, result: Result<(), Failure>) {
        self.last_round_trip = Some(ProbeRecord { at: now, ok: result.is_ok() });
        match result {
            Ok(()) => {
                self.round_trip_failures = 0;
                self.last_round_trip_ok = Some(now);
                self.unreachable_since = None;
            }
            Err(e) => {
                self.round_trip_failures += 1;
                self.failed(now, e);
            }
        }
    }

    fn failed(&mut self, now: Instant, failure: Failure) {
        self.last_failure_unreachable = failure.unreachable;
        if failure.unreachable {
            self.unreachable_since.get_or_insert(now);
        } else {
            self.unreachable_since = None;
        }
        self.last_error = Some(failure.reason);
    }

    /// In `grace` mode during an established outage (as many consecutive unreachable probes as
    /// make honest mode unhealthy): why calls that need the key store should fail at once.
    pub fn failing_fast(&self, now: Instant) -> Option<String> {
        self.grace?;
        if self.poll_failures + self.round_trip_failures < self.threshold {
            return None;
        }
        let since = self.unreachable_since.filter(|_| self.last_failure_unreachable)?;
        Some(format!(
            "key store unreachable for {}s; failing fast (plugin.outage_mode = grace); last: {}",
            now.saturating_duration_since(since).as_secs(),
            self.last_error.as_deref().unwrap_or("unknown error")
        ))
    }

    /// Whether a round trip should run now, beyond its schedule: after a failed poll, or while
    /// the last round trip failed (so recovery is noticed at poll speed).
    pub fn round_trip_wanted(&self) -> bool {
        self.poll_failures > 0 || self.round_trip_failures > 0 || self.last_round_trip_ok.is_none()
    }

    /// Why the last metadata poll failed; `None` when it succeeded or none ran yet.
    pub fn last_poll_error(&self) -> Option<&str> {
        self.last_poll_error.as_deref()
    }

    /// `Ok` when Status may say "ok"; otherwise a short reason with no secret in it.
    pub fn healthz(&self, tracker: &KeyTracker, now: Instant) -> Result<(), String> {
        if let Err(reason) = tracker.current() {
            // NB: with nothing adopted, the poll's own error is the cause; without it the
            // reason would hide a refused token, a missing key or a wrong key type.
            return Err(match &self.last_poll_error {
                Some(cause) => {
                    let short: String = cause.chars().take(HEALTHZ_CAUSE_MAX_CHARS).collect();
                    format!("{reason}; last key metadata poll failed: {short}")
                }
                None => reason,
            });
        }
        let Err(reason) = self.probes_healthy(now) else { return Ok(()) };
        // NB: grace covers only an outage (unreachable, not refused) of a plugin that had worked.
        let outage = self
            .unreachable_since
            .filter(|_| self.last_failure_unreachable && self.last_round_trip_ok.is_some());
        match (self.grace, outage) {
            (Some(grace), Some(since)) => {
                let down = now.saturating_duration_since(since);
                if down <= grace {
                    return Ok(());
                }
                Err(format!(
                    "key store unreachable for {}s, past plugin.outage_grace ({}s); {reason}",
                    down.as_secs(),
                    grace.as_secs()
                ))
            }
            _ => Err(reason),
        }
    }

    fn probes_healthy(&self, now: Instant) -> Result<(), String> {
        let failures = self.poll_failures + self.round_trip_failures;
        if failures >= self.threshold {
            let last = self.last_error.as_deref().unwrap_or("unknown error");
            return Err(format!("{failures} consecutive probes failed; last: {last}"));
        }
        match self.last_round_trip_ok {
            None => Err("no encrypt/decrypt round trip has succeeded yet".to_owned()),
            Some(at) if now.saturating_duration_since(at) > self.staleness => Err(format!(
                "no successful round trip for {}s (staleness window {}s)",
                now.saturating_duration_since(at).as_secs(),
                self.staleness.as_secs()
            )),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        backend::KeyMetadata,
        keyid::{BackendKind, KeyScope},
    };

    fn tracker() -> KeyTracker {
        let scope = KeyScope {
            kind: BackendKind::Transit,
            identity: "v".into(),
            namespace: String::new(),
            mount: "transit".into(),
            key: "k".into(),
        };
        KeyTracker::new(scope, 1)
    }

    fn meta(latest: u64) -> KeyMetadata {
        let versions: BTreeMap<u64, u64> = (1..=latest).map(|v| (v, 1000 + v)).collect();
        KeyMetadata { versions, latest, min_decryption_version: 1, min_encryption_version: 0 }
    }

    fn down(reason: &str) -> Failure {
        Failure { reason: reason.into(), unreachable: true }
    }

    #[test]
    fn grace_keeps_ok_through_a_bounded_outage_and_fails_fast() {
        let start = Instant::now();
        let mut t = tracker();
        t.observe(&meta(1));
        let mut h = Health::new(2, Duration::from_secs(10), Some(Duration::from_secs(60)));
        // No grace before the plugin ever worked.
        h.poll(start, Err(down("connection refused")));
        h.round_trip(start, Err(down("connection refused")));
        assert!(h.healthz(&t, start).is_err());
        h.poll(start, Ok(()));
        h.round_trip(start, Ok(()));
        assert!(h.failing_fast(start).is_none());

        let outage = start + Duration::from_secs(1);
        h.poll(outage, Err(down("connection refused")));
        assert!(h.failing_fast(outage).is_none(), "one failed probe is not an outage yet");
        h.round_trip(outage, Err(down("connection refused")));
        assert!(h.healthz(&t, outage + Duration::from_secs(30)).is_ok(), "within grace");
        assert!(h.failing_fast(outage).unwrap().contains("failing fast"));
        let err = h.healthz(&t, outage + Duration::from_secs(61)).unwrap_err();
        assert!(err.contains("past plugin.outage_grace"), "{err}");

        // A refusal is not an outage: no grace.
        h.round_trip(outage, Err(Failure::refused("permission denied")));
        assert!(h.healthz(&t, outage).is_err());
        assert!(h.failing_fast(outage).is_none());

        // Recovery clears the outage.
        h.poll(outage, Ok(()));
        h.round_trip(outage, Ok(()));
        assert!(h.healthz(&t, outage).is_ok());
        assert_eq!(h.unreachable_since, None);
    }

    #[test]
    fn healthz_follows_probes_and_staleness() {
        let start = Instant::now();
        let mut t = tracker();
        let mut h = Health::new(2, Duration::from_secs(10), None);
        assert_eq!(h.healthz(&t, start).unwrap_err(), "no key version adopted yet");
        h.poll(start, Err(Failure::refused("metadata: permission denied")));
        assert_eq!(h.last_poll_error(), Some("metadata: permission denied"));
        let err = h.healthz(&t, start).unwrap_err();
        assert!(err.starts_with("no key version adopted yet") && err.ends_with("permission denied"), "{err}");
        h.poll(start, Err(Failure::refused("x".repeat(1000))));
        assert!(h.healthz(&t, start).unwrap_err().len() < 300, "healthz carries a short cause");
        t.observe(&meta(1));
        h.poll(start, Ok(()));
        assert_eq!(h.last_poll_error(), None);
        assert!(h.healthz(&t, start).unwrap_err().contains("no encrypt/decrypt round trip"));
        h.round_trip(start, Ok(()));
        assert!(h.healthz(&t, start).is_ok());

        // One failure is tolerated, two consecutive are not.
        h.poll(start, Err(down("connection refused")));
        assert!(h.healthz(&t, start).is_ok());
        assert!(h.round_trip_wanted());
        h.round_trip(start, Err(down("connection refused")));
        let err = h.healthz(&t, start).unwrap_err();
        assert!(err.contains("2 consecutive probes failed") && err.contains("connection refused"), "{err}");

        // Recovery needs both kinds of probe to succeed again.
        h.poll(start, Ok(()));
        assert!(h.round_trip_wanted());
        h.round_trip(start, Ok(()));
        assert!(h.healthz(&t, start).is_ok());
        assert!(!h.round_trip_wanted());

        // A successful poll does not hide repeated round-trip failures.
        h.round_trip(start, Err(Failure::refused("permission denied")));
        h.poll(start, Ok(()));
        h.round_trip(start, Err(Failure::refused("permission denied")));
        assert!(h.healthz(&t, start).is_err());
        h.round_trip(start, Ok(()));

        // Staleness.
        let later = start + Duration::from_secs(11);
        assert!(h.healthz(&t, later).unwrap_err().contains("no successful round trip for 11s"));
    }
}
