//! The plugin's key_id state machine and health, kept apart from I/O so both can be tested with
//! injected observations and time.
//!
//! Rules (DESIGN.md, "key_id"): adopt the latest version at once at start; after that promote a
//! newer version only once it was seen in `needed` consecutive polls; never adopt a lower version
//! than the promoted one; never serve a key_id whose version the key store no longer has with the
//! same creation time (a deleted and recreated key).

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use crate::{backend::KeyMetadata, keyid::KeyScope};

/// The key version Encrypt uses and Status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    /// The key version.
    pub version: u64,
    /// Its creation time, Unix seconds.
    pub created: u64,
    /// Its key_id string.
    pub key_id: String,
}

/// What one metadata poll changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The first version was adopted at start.
    Adopted { version: u64 },
    /// The promoted version no longer exists as it was; Encrypt and Status refuse until resolved.
    Conflict { reason: String },
    /// A newer version was seen, but not yet often enough.
    Pending { version: u64, seen: u32, needed: u32 },
    /// A newer version was promoted.
    Promoted { from: u64, to: u64 },
    /// The key store reported an older latest version; it was refused.
    RollbackRefused { promoted: u64, seen: u64 },
    /// Nothing changed.
    Unchanged,
}

/// Which key version is promoted, and which one is waiting.
#[derive(Debug)]
pub struct KeyTracker {
    scope: KeyScope,
    needed: u32,
    promoted: Option<Arc<Promoted>>,
    candidate: Option<Candidate>,
    conflict: Option<String>,
}

/// A newer version seen in consecutive polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The version.
    pub version: u64,
    /// Its creation time.
    pub created: u64,
    /// How many consecutive polls saw it.
    pub seen: u32,
}

impl KeyTracker {
    /// A tracker that promotes after `needed` consecutive sightings (at least 1).
    pub fn new(scope: KeyScope, needed: u32) -> Self {
        Self { scope, needed: needed.max(1), promoted: None, candidate: None, conflict: None }
    }

    /// The promoted version, if any and if not in conflict.
    pub fn current(&self) -> Result<Arc<Promoted>, String> {
        if let Some(reason) = &self.conflict {
            return Err(reason.clone());
        }
        self.promoted.clone().ok_or_else(|| "no key version adopted yet".to_owned())
    }

    /// The promoted version, even while in conflict (for reports).
    pub fn promoted(&self) -> Option<&Promoted> {
        self.promoted.as_deref()
    }

    /// The version waiting for promotion.
    pub fn candidate(&self) -> Option<Candidate> {
        self.candidate
    }

    /// The key_id string of `version` created at `created`.
    pub fn key_id(&self, version: u64, created: u64) -> String {
        self.scope.key_id(version, created).to_string()
    }

    /// Applies one successful metadata poll.
    pub fn observe(&mut self, meta: &KeyMetadata) -> Observation {
        let latest = meta.latest;
        let Some(latest_created) = meta.latest_created() else {
            let reason = format!("key store lists latest version {latest} without a creation time");
            self.conflict = Some(reason.clone());
            return Observation::Conflict { reason };
        };
        let Some(promoted) = self.promoted.clone() else {
            self.promote(latest, latest_created);
            return Observation::Adopted { version: latest };
        };
        if latest < promoted.version {
            // NB: a node or replica that is behind; it may lack the promoted version entirely.
            self.candidate = None;
            return Observation::RollbackRefused { promoted: promoted.version, seen: latest };
        }
        if meta.versions.get(&promoted.version) != Some(&promoted.created) {
            let reason = format!(
                "key version {} (created {}) no longer exists as it was: the key was deleted, trimmed or recreated",
                promoted.version, promoted.created
            );
            self.candidate = None;
            self.conflict = Some(reason.clone());
            return Observation::Conflict { reason };
        }
        self.conflict = None;
        if latest == promoted.version {
            self.candidate = None;
            return Observation::Unchanged;
        }
        let seen = match self.candidate {
            Some(c) if c.version == latest && c.created == latest_created => c.seen + 1,
            _ => 1,
        };
        if seen >= self.needed {
            self.promote(latest, latest_created);
            return Observation::Promoted { from: promoted.version, to: latest };
        }
        self.candidate = Some(Candidate { version: latest, created: latest_created, seen });
        Observation::Pending { version: latest, seen, needed: self.needed }
    }

    fn promote(&mut self, version: u64, created: u64) {
        let key_id = self.key_id(version, created);
        self.promoted = Some(Arc::new(Promoted { version, created, key_id }));
        self.candidate = None;
        self.conflict = None;
    }
}

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
}

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
        }
    }

    /// Records a metadata poll.
    pub fn poll(&mut self, now: Instant, result: Result<(), Failure>) {
        self.last_poll = Some(ProbeRecord { at: now, ok: result.is_ok() });
        match result {
            Ok(()) => {
                self.poll_failures = 0;
                self.unreachable_since = None;
            }
            Err(e) => {
                self.poll_failures += 1;
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

    /// `Ok` when Status may say "ok"; otherwise a short reason with no secret in it.
    pub fn healthz(&self, tracker: &KeyTracker, now: Instant) -> Result<(), String> {
        tracker.current()?;
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
    use crate::keyid::BackendKind;

    fn scope() -> KeyScope {
        KeyScope {
            kind: BackendKind::Transit,
            identity: "v".into(),
            namespace: String::new(),
            mount: "transit".into(),
            key: "k".into(),
        }
    }

    fn meta(latest: u64) -> KeyMetadata {
        let versions: BTreeMap<u64, u64> = (1..=latest).map(|v| (v, 1000 + v)).collect();
        KeyMetadata { versions, latest, min_decryption_version: 1, min_encryption_version: 0 }
    }

    #[test]
    fn adopts_latest_at_once_at_start() {
        let mut t = KeyTracker::new(scope(), 2);
        assert!(t.current().is_err());
        assert_eq!(t.observe(&meta(3)), Observation::Adopted { version: 3 });
        let p = t.current().unwrap();
        assert_eq!(p.version, 3);
        assert_eq!(p.key_id, "kmsgate:1:transit:v::transit:k:3:1003");
    }

    #[test]
    fn promotes_only_after_consecutive_polls() {
        let mut t = KeyTracker::new(scope(), 2);
        t.observe(&meta(1));
        assert_eq!(t.observe(&meta(2)), Observation::Pending { version: 2, seen: 1, needed: 2 });
        assert_eq!(t.current().unwrap().version, 1);
        assert_eq!(t.observe(&meta(2)), Observation::Promoted { from: 1, to: 2 });
        assert_eq!(t.current().unwrap().version, 2);
        assert_eq!(t.candidate(), None);
    }

    #[test]
    fn flip_flop_never_promotes() {
        let mut t = KeyTracker::new(scope(), 2);
        t.observe(&meta(1));
        for _ in 0..5 {
            assert!(matches!(t.observe(&meta(2)), Observation::Pending { seen: 1, .. }));
            assert_eq!(t.observe(&meta(1)), Observation::Unchanged);
        }
        assert_eq!(t.current().unwrap().version, 1);
    }

    #[test]
    fn a_skipped_version_restarts_the_count() {
        let mut t = KeyTracker::new(scope(), 2);
        t.observe(&meta(1));
        t.observe(&meta(2));
        assert!(matches!(t.observe(&meta(3)), Observation::Pending { version: 3, seen: 1, .. }));
        assert_eq!(t.observe(&meta(3)), Observation::Promoted { from: 1, to: 3 });
    }

    #[test]
    fn rollback_is_refused_and_reported() {
        let mut t = KeyTracker::new(scope(), 1);
        t.observe(&meta(3));
        let mut old = meta(3);
        old.latest = 2;
        assert_eq!(t.observe(&old), Observation::RollbackRefused { promoted: 3, seen: 2 });
        assert_eq!(t.current().unwrap().version, 3);
        // A replica that is behind does not even have the promoted version: still a rollback.
        assert_eq!(t.observe(&meta(1)), Observation::RollbackRefused { promoted: 3, seen: 1 });
        assert_eq!(t.current().unwrap().version, 3);
    }

    #[test]
    fn recreated_key_is_a_conflict_not_a_reuse() {
        let mut t = KeyTracker::new(scope(), 1);
        t.observe(&meta(2));
        let before = t.current().unwrap().key_id.clone();
        let mut recreated = meta(2);
        recreated.versions.insert(2, 9999);
        assert!(matches!(t.observe(&recreated), Observation::Conflict { .. }));
        let err = t.current().unwrap_err();
        assert!(err.contains("recreated"), "{err}");
        // The same version number with another creation time never gets the old key_id.
        assert_ne!(t.key_id(2, 9999), before);
        // Back to the real key: the conflict clears.
        assert_eq!(t.observe(&meta(2)), Observation::Unchanged);
        assert!(t.current().is_ok());
    }

    fn down(reason: &str) -> Failure {
        Failure { reason: reason.into(), unreachable: true }
    }

    #[test]
    fn grace_keeps_ok_through_a_bounded_outage_and_fails_fast() {
        let start = Instant::now();
        let mut t = KeyTracker::new(scope(), 1);
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
        let mut t = KeyTracker::new(scope(), 1);
        let mut h = Health::new(2, Duration::from_secs(10), None);
        assert_eq!(h.healthz(&t, start).unwrap_err(), "no key version adopted yet");
        t.observe(&meta(1));
        h.poll(start, Ok(()));
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
