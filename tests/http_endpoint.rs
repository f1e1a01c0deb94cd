//! The read-only HTTP endpoint on the wire, as probes and scrapers see it: the status, type,
//! length and body of each path, HEAD, the 405 (with `Allow`) for writes, and the 404 elsewhere.

use std::sync::{Arc, Mutex};

use kmsgate::http::HttpView;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A view whose readiness the test sets.
struct View {
    not_ready: Mutex<Option<String>>,
}

impl HttpView for View {
    fn ready(&self) -> Result<(), String> {
        self.not_ready.lock().unwrap().clone().map_or(Ok(()), Err)
    }

    fn status(&self) -> serde_json::Value {
        json!({"healthz": "ok", "key": {"version": 3}})
    }

    fn metrics(&self) -> String {
        "# TYPE kmsgate_healthy gauge\nkmsgate_healthy 1\n# EOF\n".into()
    }
}

/// One answer: the status code, the headers (names lower-cased, `date` left out) and the body.
#[derive(Debug, PartialEq)]
struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Sends `method target` on a fresh connection and reads the answer to the end.
async fn send(addr: std::net::SocketAddr, method: &str, target: &str) -> Answer {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let code = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers: Vec<(String, String)> = lines
        .map(|l| l.split_once(':').unwrap())
        .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().to_owned()))
        .filter(|(n, _)| n != "date" && n != "connection")
        .collect();
    headers.sort();
    Answer { code, headers, body: body.to_owned() }
}

async fn endpoint() -> (std::net::SocketAddr, Arc<View>) {
    let view = Arc::new(View { not_ready: Mutex::new(None) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(kmsgate::http::serve(listener, view.clone()));
    (addr, view)
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut headers: Vec<_> = pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    headers.sort();
    headers
}

#[tokio::test]
async fn each_path_answers_get_with_its_type_and_length() {
    let (addr, view) = endpoint().await;
    let text = "text/plain; charset=utf-8";
    assert_eq!(
        send(addr, "GET", "/livez").await,
        Answer {
            code: 200,
            headers: headers(&[("content-type", text), ("content-length", "3")]),
            body: "ok\n".into()
        }
    );
    assert_eq!(send(addr, "GET", "/readyz").await, send(addr, "GET", "/livez").await);
    *view.not_ready.lock().unwrap() = Some("vault unreachable".into());
    assert_eq!(
        send(addr, "GET", "/readyz").await,
        Answer {
            code: 503,
            headers: headers(&[("content-type", text), ("content-length", "18")]),
            body: "vault unreachable\n".into()
        }
    );
    assert_eq!(send(addr, "GET", "/livez").await.code, 200, "liveness never follows readiness");

    let status = send(addr, "GET", "/status").await;
    let compact = r#"{"healthz":"ok","key":{"version":3}}"#;
    assert_eq!(
        status,
        Answer {
            code: 200,
            headers: headers(&[("content-type", "application/json"), ("content-length", "36")]),
            body: compact.into()
        }
    );
    let metrics = send(addr, "GET", "/metrics").await;
    assert_eq!(metrics.code, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert_eq!(metrics.body, view.metrics());
    assert_eq!(metrics.header("content-length"), Some(view.metrics().len().to_string().as_str()));
    // A query string does not change the path.
    assert_eq!(send(addr, "GET", "/status?verbose=1").await, status);
}

#[tokio::test]
async fn head_answers_the_get_head_with_its_length_and_no_body() {
    let (addr, _view) = endpoint().await;
    for path in ["/livez", "/readyz", "/status", "/metrics"] {
        let get = send(addr, "GET", path).await;
        let head = send(addr, "HEAD", path).await;
        assert_eq!(head, Answer { body: String::new(), ..get }, "{path}");
    }
}

#[tokio::test]
async fn writes_are_refused_with_405_naming_get_and_head() {
    let (addr, _view) = endpoint().await;
    let refused = Answer {
        code: 405,
        headers: headers(&[("allow", "GET,HEAD"), ("content-length", "0")]),
        body: "".into(),
    };
    for method in ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        for path in ["/livez", "/readyz", "/status", "/metrics"] {
            assert_eq!(send(addr, method, path).await, refused, "{method} {path}");
        }
    }
}

#[tokio::test]
async fn other_paths_are_404_whatever_the_method() {
    let (addr, _view) = endpoint().await;
    for path in ["/", "/nope", "/livez/", "/status/", "/LIVEZ", "/status/x", "//status", "/stat%75s"] {
        for method in ["GET", "HEAD", "POST"] {
            // NB: an empty answer to HEAD names no length: it would be the length of a GET's.
            let length: &[_] = if method == "HEAD" { &[] } else { &[("content-length", "0")] };
            let missing = Answer { code: 404, headers: headers(length), body: "".into() };
            assert_eq!(send(addr, method, path).await, missing, "{method} {path}");
        }
    }
}

#[tokio::test]
async fn every_connection_carries_one_request_so_idle_keep_alives_cannot_hold_the_slots() {
    // NB: with keep-alive, 32 clients each asking every few seconds held every slot for good, and
    // the kubelet's probe waited in the backlog past its 3 s timeout.
    let (addr, _view) = endpoint().await;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = "GET /livez HTTP/1.1\r\nHost: x\r\n\r\n";
    conn.write_all(format!("{request}{request}").as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(3), conn.read_to_end(&mut raw)).await;
    read.expect("the server closes the connection after its answer").unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert_eq!(raw.matches("HTTP/1.1 200").count(), 1, "{raw}");
    assert!(raw.to_ascii_lowercase().contains("connection: close"), "{raw}");
}
