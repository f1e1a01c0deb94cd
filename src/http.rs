//! The read-only HTTP endpoint: /metrics, /livez, /readyz and /status. It accepts no writes.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};

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
