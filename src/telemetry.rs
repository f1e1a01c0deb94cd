//! Logging setup: text or JSON lines on stderr, filtered by `log.level`; and [`Repeats`], which
//! keeps a warning that fires on every retry from flooding the log.

use std::{
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;
use tracing_subscriber::EnvFilter;

/// How long a repeated warning stays quiet before its count is logged.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(30);

/// Installs the global subscriber; a second call is a no-op.
pub fn init(level: &str, json: bool) {
    // NB: an invalid filter falls back to info rather than losing all logs.
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // NB: colour codes only on a terminal: in a file or a pipe they are noise that breaks grep.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// What to log for one occurrence of a warning that may repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    /// Log it: it is new, or differs from the one before.
    First,
    /// Stay quiet: the same warning was logged less than a window ago.
    Nothing,
    /// Log it with a count: it repeated this many times since it was last logged.
    Repeated {
        /// Occurrences since it was last logged, this one included.
        times: u32,
        /// How long ago it was last logged.
        over: Duration,
    },
}

impl Say {
    /// The suffix for the log line: empty for [`Say::First`], the count for [`Say::Repeated`].
    pub fn suffix(self) -> String {
        match self {
            Self::Repeated { times, over } => {
                format!(" (repeated {times} times in the last {}s)", over.as_secs())
            }
            Self::First | Self::Nothing => String::new(),
        }
    }
}

/// Most distinct messages one site remembers; beyond it the oldest is forgotten (and, if it comes
/// back, logged again), so memory stays bounded whatever the messages say.
const REMEMBERED_MESSAGES: usize = 16;

/// One warning site's memory: the first occurrence of a message is logged, then the same message
/// only once per window, with how many times it happened. Each distinct message (one per Vault
/// address, say) has its own window.
#[derive(Debug)]
pub struct Repeats {
    window: Duration,
    seen: Mutex<Vec<Seen>>,
}

#[derive(Debug)]
struct Seen {
    message: String,
    logged: Instant,
    since: u32,
}

impl Repeats {
    /// A site that logs a repeated message at most once per `window`.
    pub const fn new(window: Duration) -> Self {
        Self { window, seen: Mutex::new(Vec::new()) }
    }

    /// Whether and how to log `message` now.
    pub fn check(&self, now: Instant, message: &str) -> Say {
        // NB: nothing panics while this lock is held, and the state is plain counters anyway.
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(s) = seen.iter_mut().find(|s| s.message == message) else {
            if seen.len() >= REMEMBERED_MESSAGES {
                seen.remove(0);
            }
            seen.push(Seen { message: message.to_owned(), logged: now, since: 0 });
            return Say::First;
        };
        s.since += 1;
        let over = now.saturating_duration_since(s.logged);
        if over < self.window {
            return Say::Nothing;
        }
        let times = s.since;
        s.logged = now;
        s.since = 0;
        Say::Repeated { times, over }
    }

    /// Forgets every message (the condition cleared), so the next occurrence is logged at once.
    pub fn clear(&self) {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_said_once_then_counted_per_window() {
        let repeats = Repeats::new(Duration::from_secs(30));
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(repeats.check(at(0), "refused"), Say::First);
        for s in 1..30 {
            assert_eq!(repeats.check(at(s), "refused"), Say::Nothing, "second {s}");
        }
        let say = repeats.check(at(30), "refused");
        assert_eq!(say, Say::Repeated { times: 30, over: Duration::from_secs(30) });
        assert_eq!(say.suffix(), " (repeated 30 times in the last 30s)");
        assert_eq!(repeats.check(at(31), "refused"), Say::Nothing);
        // A different message is news; each message keeps its own count.
        assert_eq!(repeats.check(at(32), "permission denied"), Say::First);
        assert_eq!(repeats.check(at(33), "refused"), Say::Nothing);
        repeats.clear();
        assert_eq!(repeats.check(at(34), "refused"), Say::First);
        // Memory is bounded: the oldest message is forgotten, and said again when it returns.
        for i in 0..REMEMBERED_MESSAGES {
            assert_eq!(repeats.check(at(35), &format!("address {i}")), Say::First);
        }
        assert_eq!(repeats.check(at(35), "refused"), Say::First);
    }
}
