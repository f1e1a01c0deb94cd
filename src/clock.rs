//! Wall-clock time for the controller's loops, replaceable in tests: rotation and tokens read
//! "now" only through a [`Clock`], so paused tokio time drives their decisions.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

/// Wall-clock time.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that starts at a fixed time and moves with tokio's clock, so a test on paused time
/// moves it with `tokio::time::advance` or a sleep.
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Reads `base` now.
    pub fn starting_at(base: Timestamp) -> Self {
        Self { base, start: tokio::time::Instant::now() }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let elapsed = self.start.elapsed().as_secs() as i64;
        Timestamp::from_second(self.base.as_second().saturating_add(elapsed)).unwrap_or(self.base)
    }
}

/// `at` to the second, as the API server writes timestamps (RFC 3339).
pub fn rfc3339(at: Timestamp) -> String {
    Timestamp::from_second(at.as_second()).unwrap_or(at).to_string()
}

/// Unix seconds as RFC 3339; empty if out of range.
pub fn seconds_text(seconds: i64) -> String {
    Timestamp::from_second(seconds).map(|t| t.to_string()).unwrap_or_default()
}

/// Parses an RFC 3339 time.
pub fn parse_time(text: &str) -> Option<Timestamp> {
    text.trim().parse().ok()
}

/// How long ago `text` (RFC 3339) was at `now`; zero if it is unreadable or in the future.
pub fn elapsed_since(now: Timestamp, text: &str) -> Duration {
    parse_time(text)
        .map(|t| Duration::from_secs((now.as_second() - t.as_second()).max(0) as u64))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_to_the_second() {
        let at = Timestamp::from_second(1_795_723_200).unwrap();
        assert_eq!(rfc3339(at), "2026-11-26T20:00:00Z");
        assert_eq!(seconds_text(1_795_723_200), "2026-11-26T20:00:00Z");
        assert_eq!(parse_time("2026-11-26T20:00:00Z"), Some(at));
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(elapsed_since(at, "2026-11-26T19:59:00Z"), Duration::from_secs(60));
        assert_eq!(elapsed_since(at, "soon"), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_follows_paused_time() {
        let base = Timestamp::from_second(1_795_723_200).unwrap();
        let clock = TokioClock::starting_at(base);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now().as_second(), base.as_second() + 3600);
    }
}
