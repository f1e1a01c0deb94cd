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

/// Serves until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, view: Arc<dyn HttpView>) {
    if let Err(e) = axum::serve(listener, router(view)).await {
        tracing::error!(error = %e, "HTTP endpoint stopped");
    }
}

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
