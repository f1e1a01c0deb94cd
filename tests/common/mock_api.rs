//! kube-rs's tower-test mock, scripted in controller-rs's `ApiServerVerifier` style: each expected
//! request (method, path and query, plus any header and body checks) is answered the way
//! kube-apiserver would; anything else fails. Requests are read and authorized with the same
//! machinery as the in-memory [`FakeApi`](crate::fake_api::FakeApi), so a scripted test also
//! fails on a call `kmsgate::k8s::RBAC` does not grant.

use std::time::Duration;

use http::{Request, Response};
use serde_json::Value;
use tower_test::mock::{self, Handle};

use crate::{fake_api::Incoming, rbac};

/// The test's end of the mock.
pub type ApiHandle = Handle<Request<kube::client::Body>, Response<kube::client::Body>>;

/// A kube client over the mock, and the handle that answers it.
pub fn client() -> (kube::Client, ApiHandle) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (service, handle) = mock::pair::<Request<kube::client::Body>, Response<kube::client::Body>>();
    (kube::Client::new(service, "default"), handle)
}

/// Asserts more about a request (headers, body).
pub type Check = Box<dyn Fn(&Request<()>, &Value) + Send>;

/// One expected request and the answer to give.
pub struct Expect {
    method: &'static str,
    path_and_query: String,
    check: Check,
    reply: (u16, Value),
}

/// Expects `method path_and_query` and answers `reply`.
pub fn expect(method: &'static str, path_and_query: &str, reply: (u16, Value)) -> Expect {
    Expect { method, path_and_query: path_and_query.into(), check: Box::new(|_, _| {}), reply }
}

impl Expect {
    /// Adds assertions on the request's headers and body.
    pub fn check(mut self, f: impl Fn(&Request<()>, &Value) + Send + 'static) -> Self {
        self.check = Box::new(f);
        self
    }
}

/// Serves the expected requests in order; panics on anything else, on a request RBAC would
/// refuse, and on a missing request. Returns the request bodies.
pub fn verifier(mut handle: ApiHandle, scenario: Vec<Expect>) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut bodies = Vec::new();
        for expected in scenario {
            let (request, send) = tokio::time::timeout(Duration::from_secs(2), handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("missing request {} {}", expected.method, expected.path_and_query))
                .expect("service dropped");
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let incoming = Incoming::read(&parts, &bytes);
            assert!(
                bytes.is_empty() || !incoming.body.is_null(),
                "{} sent a body that is not JSON",
                incoming.line()
            );
            if let Err(needs) = rbac::authorize(&incoming.line()) {
                panic!("{} needs {needs:?}, which kmsgate::k8s::RBAC does not grant", incoming.line());
            }
            assert_eq!(parts.method.as_str(), expected.method, "{}", parts.uri);
            assert_eq!(parts.uri.path_and_query().unwrap().as_str(), expected.path_and_query);
            (expected.check)(&Request::from_parts(parts, ()), &incoming.body);
            bodies.push(incoming.body);
            let (code, reply) = expected.reply;
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
        bodies
    })
}
