//! What the two gRPC servers (the KMS plugin and the signer) share, written once: the unix
//! socket, the audit log writer, the key-version tracker with its two promotion policies, and the pacing of the
//! background key poll.

pub mod audit_log;
pub mod socket;
pub mod tracker;

use std::time::Duration;

use tokio::time::Instant;

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
