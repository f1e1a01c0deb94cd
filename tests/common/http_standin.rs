//! A plain HTTP/1.1 server answering one route, for the endpoints kmsgate reads over HTTP: a
//! plugin's or a signer's `/status`, kube-apiserver's TokenReview API as Vault calls it. What a
//! route answers is the test's model, cited there.

use std::convert::Infallible;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;

/// The body of an answer: whole, or streamed.
pub type Body = BoxBody<Bytes, std::io::Error>;

/// Serves `method path` on a free loopback port until the test ends, answering each request with
/// `answer` (given the request with its whole body); another method on the path gets 405, another
/// path 404. Returns the base URL (`http://127.0.0.1:port`).
pub async fn serve(
    method: Method,
    path: &'static str,
    answer: impl Fn(Request<Bytes>) -> Response<Body> + Clone + Send + Sync + 'static,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (method, answer) = (method.clone(), answer.clone());
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (method, answer) = (method.clone(), answer.clone());
                async move {
                    let response = if request.uri().path() != path {
                        empty(StatusCode::NOT_FOUND)
                    } else if request.method() != method {
                        empty(StatusCode::METHOD_NOT_ALLOWED)
                    } else {
                        let (head, body) = request.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        answer(Request::from_parts(head, body))
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    format!("http://{addr}")
}

/// A 200 answer with `value` as its JSON body.
pub fn json(value: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(whole(Bytes::from(value.to_string())));
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

/// A body of `bytes`, sent whole.
pub fn whole(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(whole(Bytes::new()));
    *response.status_mut() = status;
    response
}
