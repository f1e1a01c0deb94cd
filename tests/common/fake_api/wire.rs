//! How requests reach the fake and answers leave it: a kube client over a tower service, the
//! request read into an [`Incoming`], and the JSON shapes kube-apiserver answers with.

use std::{collections::HashMap, convert::Infallible};

use http::{Request, Response, StatusCode};
use serde_json::{Value, json};

/// A request as the fakes route it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// Decoded query parameters.
    pub query: HashMap<String, String>,
    /// The Accept header.
    pub accept: String,
    /// The Content-Type header.
    pub content_type: String,
    /// The JSON body (`Null` when empty or not JSON).
    pub body: Value,
}

impl Incoming {
    /// Reads a request's parts and body bytes.
    pub fn read(parts: &http::request::Parts, bytes: &[u8]) -> Self {
        let header =
            |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        Self {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts
                .uri
                .query()
                .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                .unwrap_or_default(),
            accept: header("accept"),
            content_type: header("content-type"),
            body: serde_json::from_slice(bytes).unwrap_or(Value::Null),
        }
    }

    /// Whether this is a watch (`?watch=true`), which RBAC checks as verb `watch`.
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").is_some_and(|w| w == "true" || w == "1")
    }

    /// The request as the fakes log it: `METHOD path`, or `WATCH path` for a watch.
    pub fn line(&self) -> String {
        if self.is_watch() {
            format!("WATCH {}", self.path)
        } else {
            format!("{} {}", self.method, self.path)
        }
    }
}

/// A kube client whose every request is read into an [`Incoming`] and answered by `handle`.
pub fn client_for<H, F>(handle: H) -> kube::Client
where
    H: Fn(Incoming) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Response<kube::client::Body>> + Send + 'static,
{
    let service = tower::service_fn(move |request: Request<kube::client::Body>| {
        let handle = handle.clone();
        async move {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            Ok::<_, Infallible>(handle(Incoming::read(&parts, &bytes)).await)
        }
    });
    kube::Client::new(service, "default")
}

/// RFC 7386 JSON merge patch, as kube-apiserver applies `application/merge-patch+json`
/// (staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go, `jsonPatcher.applyJSPatch`,
/// which calls `jsonpatch.MergePatch`).
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().unwrap();
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The answer to a list. kmsgate's lists must ask for metadata only, so any other Accept fails
/// the test. kube-apiserver turns a list into a `PartialObjectMetadataList` when the Accept header
/// asks `as=PartialObjectMetadataList` (staging/src/k8s.io/apiserver/pkg/endpoints/handlers/
/// response.go, `asPartialObjectMetadataList`).
pub fn metadata_list(
    accept: &str,
    resource_version: u64,
    continue_token: &str,
    items: Vec<Value>,
) -> Response<kube::client::Body> {
    assert!(
        accept.contains("as=PartialObjectMetadataList"),
        "lists must be metadata-only, got Accept {accept:?}"
    );
    json_response(
        200,
        json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": resource_version.to_string(), "continue": continue_token},
            "items": items,
        }),
    )
}

/// A JSON answer with this status code.
pub fn json_response(code: u16, body: Value) -> Response<kube::client::Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

/// A plain-text answer (the API server's /metrics).
pub fn text_response(text: String) -> Response<kube::client::Body> {
    Response::builder()
        .status(200)
        .header("content-type", "text/plain")
        .body(kube::client::Body::from(text.into_bytes()))
        .unwrap()
}

/// A Status error like the API server's (staging/src/k8s.io/apimachinery/pkg/api/errors/
/// errors.go, the `New*` constructors, e.g. `NewConflict`).
pub fn status_response(code: u16, reason: &str, message: &str) -> Response<kube::client::Body> {
    json_response(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code,
        }),
    )
}

/// The 409 an update at an old resourceVersion gets (staging/src/k8s.io/apiserver/pkg/registry/
/// generic/registry/store.go, `Store.Update`: `kubeerr.NewConflict(..., OptimisticLockErrorMsg)`).
pub fn conflict(resource: &str, name: &str) -> Response<kube::client::Body> {
    status_response(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again"
        ),
    )
}

/// A 404 for a named object.
pub fn not_found(resource: &str, name: &str) -> Response<kube::client::Body> {
    status_response(404, "NotFound", &format!("{resource} \"{name}\" not found"))
}
