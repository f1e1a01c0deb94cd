//! What the two gRPC servers (the KMS plugin and the signer) share, written once: the unix
//! socket, the audit log writer, the key-version tracker with its two promotion policies, the
//! pacing of the background key poll, and the metrics of each key store call.

pub mod audit_log;
pub mod socket;
pub mod tracker;

use std::{future::Future, time::Duration};

use tokio::time::Instant;

use crate::{backend::BackendError, metrics::Metrics};

/// Runs a key store call named `operation`, recording its outcome and latency in `metrics`.
pub async fn timed<T>(
    metrics: &Metrics,
    operation: &'static str,
    call: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    let started = Instant::now();
    let result = call.await;
    let outcome = result.as_ref().map_or_else(BackendError::outcome, |_| "ok");
    metrics.record_backend(operation, outcome, started.elapsed().as_secs_f64());
    result
}

/// Waits `pause` before the next key poll, or less when `wake` fires (a call's answer hinted
/// that the key changed), but never less than `min_gap` after `polled`, so callers cannot turn
/// every request into a key store read.
pub async fn pause_before_poll(
    pause: Duration,
    min_gap: Duration,
    polled: Instant,
    wake: &tokio::sync::Notify,
) {
    tokio::select! {
        () = tokio::time::sleep_until(polled + pause) => {}
        () = wake.notified() => {
            tokio::time::sleep_until(polled + min_gap.min(pause)).await;
            tracing::debug!("a call's answer hints at a changed key; reading key metadata now");
        }
    }
}
