//! A bound on every answer the API server sends: a misbehaving or hostile server (or anything
//! between) must not be able to fill the controller's memory with one endless body.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{Request, Response};
use http_body_util::Limited;
use tower::Service;

/// The most bytes one answer may carry. The largest the controller reads is a page of
/// metadata-only list items (at most `migrate.pageSize` = 10000 of a few hundred bytes each) or a
/// TokenRequest, far below this.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Caps each answer's body at [`MAX_BODY_BYTES`], except watches: a watch is one long body
/// that streams events for as long as it runs, so its total size is not bounded by design.
#[derive(Debug, Clone)]
pub struct Bounded<S> {
    inner: S,
}

impl<S> Bounded<S> {
    /// Wraps a client service.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> Service<Request<kube::client::Body>> for Bounded<S>
where
    S: Service<Request<kube::client::Body>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<Limited<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let watch = request.uri().query().is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
        let limit = if watch { usize::MAX } else { MAX_BODY_BYTES };
        let answer = self.inner.call(request);
        Box::pin(async move { Ok(answer.await?.map(|body| Limited::new(body, limit))) })
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    async fn answer(uri: &str, size: usize) -> Result<usize, String> {
        let (mock, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<kube::client::Body>>();
        let mut service = Bounded::new(mock);
        let request = Request::get(uri).body(kube::client::Body::empty()).unwrap();
        let call = service.ready().await.unwrap().call(request);
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_response(Response::new(kube::client::Body::from(vec![b' '; size])));
        let body = call.await.map_err(|e| e.to_string())?.into_body();
        body.collect().await.map(|b| b.to_bytes().len()).map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn an_answer_past_the_bound_fails_and_a_watch_is_not_cut() {
        assert_eq!(answer("/api/v1/secrets", MAX_BODY_BYTES).await, Ok(MAX_BODY_BYTES));
        let err = answer("/api/v1/secrets?limit=500", MAX_BODY_BYTES + 1).await.unwrap_err();
        assert!(err.contains("length limit"), "{err}");
        let watch = answer("/api/v1/secrets?watch=true&resourceVersion=1", MAX_BODY_BYTES + 1).await;
        assert_eq!(watch, Ok(MAX_BODY_BYTES + 1));
    }
}
