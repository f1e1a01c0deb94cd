//! What the two gRPC servers (the KMS plugin and the signer) share, written once: the unix
//! socket, the HTTP/2 limits of the gRPC server on it, the HTTP endpoint beside it, the audit log
//! writer, the key-version tracker with its two promotion policies, the pacing of the background
//! key poll, and the metrics of each key store call.

pub mod audit_log;
pub mod socket;
pub mod tracker;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{task::JoinHandle, time::Instant};

use crate::{
    backend::BackendError,
    http::{self, HttpView},
    metrics::Metrics,
};

/// Per-connection receive window: what all streams of one connection may have buffered at once.
const CONNECTION_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
/// Largest header list of one request.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// A gRPC server builder with `max_streams` concurrent streams per connection, advertised in the
/// HTTP/2 SETTINGS, and a receive window of `stream_window` bytes per stream. NB: the windows and
/// the header list bound what one connection may make the server buffer (unbounded, about 1 GiB).
pub fn grpc_server(max_streams: u32, stream_window: u32) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(max_streams)
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
}

/// Binds the read-only HTTP endpoint (/metrics /livez /readyz /status) at `addr` and serves
/// `view` on it in a task.
pub async fn http_endpoint(addr: SocketAddr, view: Arc<dyn HttpView>) -> std::io::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics /livez /readyz /status");
    Ok(tokio::spawn(http::serve(listener, view)))
}

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
