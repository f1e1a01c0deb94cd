//! Exponential backoff between retries, shared by the re-encrypt engine, the rotation loop and
//! the token loops.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_back_off_doubling_and_capped() {
        assert_eq!(Backoff::CALLS.delay(1), Duration::from_millis(400));
        assert_eq!(Backoff::CALLS.delay(2), Duration::from_millis(800));
        assert_eq!(Backoff::CALLS.delay(30), Duration::from_secs(10));
    }
}
