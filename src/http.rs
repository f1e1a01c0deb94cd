//! The read-only HTTP endpoint: /metrics, /livez, /readyz and /status. It accepts no writes.
//! Also the bounded body reader every HTTP client of ours uses.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

/// A response body could not be read within its size limit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The transport failed mid-body.
    #[error("reading the body failed: {0}")]
    Read(#[source] reqwest::Error),
    /// The body is larger than the call allows.
    #[error("the body is larger than the {limit}-byte limit for this call")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
}

/// Reads a response body of at most `limit` bytes, into memory wiped on drop. A larger body is
/// refused as soon as it passes the limit, so an endless answer costs at most `limit` bytes.
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, BodyError> {
    let announced = response.content_length().unwrap_or(0);
    if announced > limit as u64 {
        return Err(BodyError::TooLarge { limit });
    }
    // NB: reserve the announced size up front so a truthful body is never reallocated, which
    // would leave an unwiped copy behind.
    let mut body = zeroize::Zeroizing::new(Vec::with_capacity(announced as usize));
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Read)? {
        if chunk.len() > limit - body.len() {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What the endpoint shows; the plugin implements it.
pub trait HttpView: Send + Sync + 'static {
    /// `Ok` when ready (Status would say "ok"), else the reason.
    fn ready(&self) -> Result<(), String>;
    /// The /status document.
    fn status(&self) -> serde_json::Value;
    /// The OpenMetrics exposition.
    fn metrics(&self) -> String;
}

/// The router, exposed for tests.
pub fn router(view: Arc<dyn HttpView>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(view)
}

/// Serves until the task is aborted: HTTP/1.1 only, at most [`MAX_CONNECTIONS`] connections
/// (the rest wait in the kernel's backlog, costing us no descriptor), each closed when its
/// request head is not complete within [`HEADER_READ_TIMEOUT`] (also between keep-alive
/// requests) or when it has been open for [`CONNECTION_MAX_AGE`].
pub async fn serve(listener: tokio::net::TcpListener, view: Arc<dyn HttpView>) {
    let router = router(view);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::backoff::AcceptBackoff::default();
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                backoff.wait("HTTP endpoint", &e).await;
                continue;
            }
        };
        backoff.reset();
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD_BYTES)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // NB: a scraper that reads its answer slowly, or keeps one connection for ever, is
            // cut off here; it reconnects, and the slot goes to the next in line meanwhile.
            let _ = tokio::time::timeout(CONNECTION_MAX_AGE, connection).await;
        });
    }
}

/// Most HTTP connections open at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send a complete request head, from connecting or from the last answer.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest life of one connection.
pub const CONNECTION_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest request head read (requests have no body here).
const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;

async fn readyz(State(view): State<Arc<dyn HttpView>>) -> impl IntoResponse {
    match view.ready() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn status(State(view): State<Arc<dyn HttpView>>) -> impl IntoResponse {
    Json(view.status())
}

async fn metrics(State(view): State<Arc<dyn HttpView>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], view.metrics())
}
