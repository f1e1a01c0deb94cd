//! Background probes that keep Status true without Status doing I/O: a key-metadata poll every
//! `poll_interval`, and an encrypt+decrypt round trip every `round_trip_interval`, right after any
//! failed poll, and at poll speed while round trips fail.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use zeroize::Zeroizing;

use super::{Shared, health::Failure, state::Observation};
use crate::{
    backend::{Backend, BackendError},
    telemetry::{REPEAT_WINDOW, Repeats, Say},
};

/// Failed polls repeat every 2 s while nothing is adopted: say each cause once, then a count.
static POLL_WARNINGS: Repeats = Repeats::new(REPEAT_WINDOW);
/// The same for failed round trips.
static ROUND_TRIP_WARNINGS: Repeats = Repeats::new(REPEAT_WINDOW);

/// How soon to retry while no key version is adopted: the API server can read nothing until then.
const ADOPTION_RETRY_MAX: Duration = Duration::from_secs(2);

/// Least time between two polls that key store answers asked for, so a caller that sends
/// ciphertexts Vault refuses cannot turn every Decrypt into a metadata read.
const HINTED_POLL_GAP: Duration = Duration::from_secs(1);

/// Runs the probes forever.
pub async fn run<B: Backend>(shared: Arc<Shared<B>>) {
    let mut next_round_trip = Instant::now();
    loop {
        poll(&shared).await;
        let wanted = shared.lock().health.round_trip_wanted();
        if wanted || Instant::now() >= next_round_trip {
            round_trip(&shared).await;
            next_round_trip = Instant::now() + shared.config.round_trip_interval;
        }
        let adopted = shared.lock().tracker.promoted().is_some();
        let pause = if adopted {
            shared.config.poll_interval
        } else {
            shared.config.poll_interval.min(ADOPTION_RETRY_MAX)
        };
        crate::serving::pause_before_poll(pause, HINTED_POLL_GAP, Instant::now(), &shared.repoll).await;
    }
}

/// Reads key metadata once and applies the promotion rules.
pub async fn poll<B: Backend>(shared: &Shared<B>) {
    let deadline = Instant::now() + shared.config.probe_timeout;
    let result = shared.timed("metadata", shared.backend.metadata(deadline)).await;
    let mut state = shared.lock();
    let meta = match result {
        Ok(meta) => meta,
        Err(e) => {
            let error = e.to_string();
            let say = POLL_WARNINGS.check(Instant::now(), &error);
            if say != Say::Nothing {
                tracing::warn!(error, "key metadata poll failed{}", say.suffix());
            }
            state.health.poll(Instant::now(), Err(failure("metadata", &e)));
            if let BackendError::KeyNotFound(reason) = &e
                && let Some(Observation::Conflict { reason }) = state.tracker.observe_missing(reason)
            {
                drop(state);
                tracing::error!(reason, "refusing to encrypt: key conflict");
            }
            return;
        }
    };
    POLL_WARNINGS.clear();
    let observation = state.tracker.observe(&meta);
    if let Observation::RollbackRefused { promoted, seen } = observation {
        state.rollback_refused = Some(super::RollbackRefused { promoted, seen, at: Instant::now() });
    }
    let conflict = matches!(observation, Observation::Conflict { .. });
    state.metadata = Some(meta);
    state.health.poll(Instant::now(), if conflict { Err(Failure::refused("key conflict")) } else { Ok(()) });
    if let Some(p) = state.tracker.promoted() {
        shared.metrics.key_version.set(i64::try_from(p.version).unwrap_or(i64::MAX));
    }
    let key_id = state.tracker.promoted().map(|p| p.key_id.clone()).unwrap_or_default();
    drop(state);
    match observation {
        Observation::Adopted { version } => tracing::info!(version, key_id, "adopted key version"),
        Observation::Conflict { reason } => tracing::error!(reason, "refusing to encrypt: key conflict"),
        Observation::Pending { version, seen, needed } => {
            tracing::info!(version, seen, needed, "new key version seen; waiting for consecutive polls")
        }
        Observation::Promoted { from, to } => {
            shared.metrics.promotions.inc();
            tracing::info!(from, to, key_id, "promoted key version");
        }
        Observation::Replaced { from, to, why } => {
            shared.metrics.promotions.inc();
            tracing::warn!(
                from,
                to,
                key_id,
                why,
                "promoted key version at once: the promoted one became unusable"
            );
        }
        Observation::RollbackRefused { promoted, seen } => {
            shared.metrics.rollbacks_refused.inc();
            tracing::warn!(promoted, seen, "key store reported an older latest version; refused");
        }
        Observation::Unchanged => tracing::debug!("key metadata unchanged"),
    }
}

/// Encrypts and decrypts a random seed with the promoted version, as the API server would.
pub async fn round_trip<B: Backend>(shared: &Shared<B>) {
    let result = round_trip_once(shared).await;
    match &result {
        Err(e) => {
            let say = ROUND_TRIP_WARNINGS.check(Instant::now(), &e.reason);
            if say != Say::Nothing {
                tracing::warn!(error = %e.reason, "encrypt/decrypt round trip failed{}", say.suffix());
            }
        }
        Ok(()) => ROUND_TRIP_WARNINGS.clear(),
    }
    shared.lock().health.round_trip(Instant::now(), result);
}

async fn round_trip_once<B: Backend>(shared: &Shared<B>) -> Result<(), Failure> {
    let current = shared.current().map_err(Failure::refused)?;
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut_slice()).map_err(|_| Failure::refused("random source failed"))?;
    let deadline = Instant::now() + shared.config.probe_timeout;
    let aad = current.key_id.as_bytes();
    let ciphertext = shared
        .timed("encrypt", shared.backend.encrypt(current.version, seed.as_slice(), aad, deadline))
        .await
        .map_err(|e| failure("encrypt", &e))?;
    let plain = shared
        .timed("decrypt", shared.backend.decrypt(current.version, &ciphertext, aad, deadline))
        .await
        .map_err(|e| failure("decrypt", &e))?;
    if plain.as_slice() != seed.as_slice() {
        return Err(Failure::refused("decrypt returned different bytes than were encrypted"));
    }
    Ok(())
}

fn failure(operation: &str, error: &BackendError) -> Failure {
    Failure {
        reason: format!("{operation}: {error}"),
        unreachable: matches!(error, BackendError::Unavailable(_) | BackendError::Deadline),
    }
}
