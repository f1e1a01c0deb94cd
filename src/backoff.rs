//! Exponential backoff between retries, shared by the re-encrypt engine, the rotation loop, the
//! token loops and the accept loops of the plugin's socket and HTTP endpoint.

use std::time::Duration;

/// Waits that double per attempt from `base`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// Kubernetes and Transit calls: 400 ms after the first failure, doubling, capped at 10 s.
    pub const CALLS: Self = Self::new(Duration::from_millis(200), Duration::from_secs(10));

    /// Waits of `base` × 2^attempt, capped at `max`.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The wait before retry `attempt` (1-based; 0 gives `base`).
    pub fn delay(&self, attempt: u32) -> Duration {
        // NB: the shift is bounded, so the multiplication saturates instead of overflowing.
        self.base.saturating_mul(1 << attempt.min(16)).min(self.max)
    }
}

/// Backoff between failed accepts on a listener (e.g. at the descriptor limit, where retrying at
/// once would spin): 10 ms doubling to 1 s, reset by a successful accept, one warning per run of
/// failures.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    const DELAYS: Backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));

    /// Waits before the next accept; warns once per run of failures.
    pub async fn wait(&mut self, listener: &'static str, error: &std::io::Error) {
        if self.failures == 0 {
            tracing::warn!(listener, %error, "accept failed; backing off until it succeeds again");
        }
        self.failures = self.failures.saturating_add(1);
        tokio::time::sleep(Self::DELAYS.delay(self.failures)).await;
    }

    /// A connection was accepted.
    pub fn reset(&mut self) {
        if self.failures > 0 {
            tracing::info!("accepting connections again");
        }
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_back_off_doubling_and_capped() {
        assert_eq!(Backoff::CALLS.delay(1), Duration::from_millis(400));
        assert_eq!(Backoff::CALLS.delay(2), Duration::from_millis(800));
        assert_eq!(Backoff::CALLS.delay(30), Duration::from_secs(10));
    }

    #[test]
    fn accepts_back_off_from_ten_milliseconds_to_a_second() {
        let d = AcceptBackoff::DELAYS;
        assert_eq!(
            (d.delay(1), d.delay(2), d.delay(30)),
            (Duration::from_millis(10), Duration::from_millis(20), Duration::from_secs(1))
        );
    }
}
