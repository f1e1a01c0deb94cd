//! The read-only HTTP endpoint: /metrics, /livez, /readyz and /status. It accepts no writes.
//! Also the bounded body reader every HTTP client of ours uses.

use std::{convert::Infallible, sync::Arc};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Bytes;

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

/// The answer to one request: GET of the four paths, or HEAD (the GET answer's head, its length
/// included, without the body); 405 with `Allow: GET,HEAD` for any other method on them; an empty
/// 404 for any other path. A query is ignored, and a path matches only as sent (no trailing slash,
/// no decoding). These are the answers of the axum router this replaced, so probes and scrapers
/// see no change.
pub fn answer<B>(view: &dyn HttpView, request: &Request<B>) -> Response<Full<Bytes>> {
    let route: fn(&dyn HttpView) -> (StatusCode, &'static str, String) = match request.uri().path() {
        "/livez" => |_| (StatusCode::OK, TEXT, "ok\n".to_owned()),
        "/readyz" => readyz,
        "/status" => |view| (StatusCode::OK, JSON, view.status().to_string()),
        "/metrics" => |view| (StatusCode::OK, OPENMETRICS, view.metrics()),
        _ => return empty(StatusCode::NOT_FOUND),
    };
    let head = request.method() == Method::HEAD;
    if request.method() != Method::GET && !head {
        let mut response = empty(StatusCode::METHOD_NOT_ALLOWED);
        response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET,HEAD"));
        return response;
    }
    let (status, content_type, body) = route(view);
    // NB: set here, as hyper writes no length on a HEAD answer.
    let length = body.len();
    let mut response = Response::new(if head { Full::default() } else { Full::new(Bytes::from(body)) });
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// Serves until the task is aborted: HTTP/1.1 only, one request per connection, at most
/// [`MAX_CONNECTIONS`] connections (the rest wait in the kernel's backlog, costing us no
/// descriptor), each closed when its request head is not complete within [`HEADER_READ_TIMEOUT`]
/// or when it has been open for [`CONNECTION_MAX_AGE`].
pub async fn serve(listener: tokio::net::TcpListener, view: Arc<dyn HttpView>) {
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
        let view = view.clone();
        let service = hyper::service::service_fn(move |request| {
            std::future::ready(Ok::<_, Infallible>(answer(view.as_ref(), &request)))
        });
        tokio::spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD_BYTES)
                // NB: one request per connection: a client that kept its connections alive with a
                // request every few seconds could hold every slot and starve the kubelet's probes.
                .keep_alive(false)
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

/// /livez and /readyz.
const TEXT: &str = "text/plain; charset=utf-8";
/// /status.
const JSON: &str = "application/json";
/// The OpenMetrics text format that prometheus-client writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn readyz(view: &dyn HttpView) -> (StatusCode, &'static str, String) {
    match view.ready() {
        Ok(()) => (StatusCode::OK, TEXT, "ok\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{reason}\n")),
    }
}

/// An answer with no body. Hyper gives it a zero length, except on HEAD, where a length would
/// be a GET's.
fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::default());
    *response.status_mut() = status;
    response
}
