//! Waiting for something another task or process does, instead of a sleep loop in every test.

use std::{fmt::Display, time::Duration};

/// How long to wait between checks at most: a test sees a change within about this long, and the
/// checks are cheap local calls. The first waits are shorter (from 1 ms, doubling), so a test
/// that measures how soon something happens gets millisecond resolution.
const POLL: Duration = Duration::from_millis(10);

/// What a check passed to [`eventually`] answers: done (with a value), or not yet (with what it
/// saw, for the failure message).
pub trait Settled {
    /// What [`eventually`] returns once the check is done.
    type Value;
    /// `Ok` when done, else what the check saw.
    fn settled(self) -> Result<Self::Value, String>;
}

impl Settled for bool {
    type Value = ();
    fn settled(self) -> Result<(), String> {
        if self { Ok(()) } else { Err(String::new()) }
    }
}

impl<T> Settled for Option<T> {
    type Value = T;
    fn settled(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T, E: Display> Settled for Result<T, E> {
    type Value = T;
    fn settled(self) -> Result<T, String> {
        self.map_err(|seen| seen.to_string())
    }
}

/// Runs `check` until it is done and returns its value; panics naming `what` (and the last thing
/// the check saw) once `timeout` has passed. Time is tokio's, so paused-clock tests work too.
pub async fn eventually<S: Settled>(
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> S,
) -> S::Value {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match check().await.settled() {
            Ok(value) => return value,
            Err(seen) if tokio::time::Instant::now() >= deadline => {
                panic!(
                    "{what}: not within {timeout:?}{}{seen}",
                    if seen.is_empty() { "" } else { "; last seen: " }
                )
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(POLL);
            }
        }
    }
}
