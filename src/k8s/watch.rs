//! A metadata-only list-then-watch of every Secret that lists again when the watch expires: the
//! one watch kmsgate runs. It follows the states of kube-runtime's `watcher`
//! (kube-runtime/src/watcher.rs, `step_trampolined`, with its default `Config` and
//! `DefaultBackoff`), which it replaces so that the build needs no kube-runtime for one loop.

use std::{collections::VecDeque, pin::Pin, time::Duration};

use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api,
    api::{ListParams, PartialObjectMeta, WatchEvent, WatchParams},
};
use tokio::time::Instant;

use super::{KubeError, call};
use crate::backoff::Backoff;

/// Secrets per list page: client-go's pager default, as the watcher's `Config::default()`.
const PAGE: u32 = 500;
/// `timeoutSeconds` of each watch: kube-client's default, which the watcher keeps.
const WATCH_SECONDS: u32 = 290;
/// A watch that says nothing for this long is dead and opened again (the watcher's
/// `next_with_idle_timeout`: the server timeout plus a 5 s margin).
const IDLE: Duration = Duration::from_secs(WATCH_SECONDS as u64 + 5);
/// Waits after failures: the watcher's `DefaultBackoff` without jitter (800 ms doubling to 30 s).
const DELAYS: Backoff = Backoff::new(Duration::from_millis(800), Duration::from_secs(30));
/// A run of failures ends after this long without one: the `DefaultBackoff`'s `ResetTimerBackoff`
/// (120 s), as client-go's reflector (tools/cache/reflector.go, `NewReflectorWithOptions`: "If we
/// don't backoff for 2min, assume API server is healthy and we reset the backoff"). NB: not the
/// next request that succeeds: a watch that opens and then fails, or a list followed by a watch
/// expired again, would otherwise retry every 800 ms for as long as the API server answers so.
const CALM: Duration = Duration::from_secs(120);

type Events = Pin<Box<dyn Stream<Item = kube::Result<WatchEvent<PartialObjectMeta<Secret>>>> + Send>>;

/// Where the watch stands.
enum State {
    /// Listing from scratch; `next` is the continue token of the page to fetch.
    Listing { next: Option<String> },
    /// Listed (or watched) up to this resourceVersion; no watch open.
    Listed { resource_version: String },
    /// A watch open from the last resourceVersion seen.
    Watching { resource_version: String, events: Events },
}

struct SecretWatch {
    api: Api<Secret>,
    state: State,
    /// Metadata listed but not handed out yet.
    pending: VecDeque<ObjectMeta>,
    /// Failures in the current run, and when the last one came.
    failures: u32,
    last_failure: Option<Instant>,
    /// The wait a failure left for the next request.
    wait: Option<Duration>,
}

/// Every Secret's metadata as it is listed, then as it changes: created and modified Secrets, each
/// as often as the API server reports it; deletions are not reported. Each failure comes out as
/// an error, and the watch goes on after a backoff that grows while failures keep coming: from the
/// last resourceVersion, or from a new list when the API server has expired it (410 Gone).
pub(super) fn secret_changes(api: Api<Secret>) -> BoxStream<'static, Result<ObjectMeta, KubeError>> {
    let watch = SecretWatch {
        api,
        state: State::Listing { next: None },
        pending: VecDeque::new(),
        failures: 0,
        last_failure: None,
        wait: None,
    };
    futures::stream::unfold(watch, |mut watch| async move {
        let item = watch.next().await;
        Some((item, watch))
    })
    .boxed()
}

impl SecretWatch {
    async fn next(&mut self) -> Result<ObjectMeta, KubeError> {
        loop {
            if let Some(meta) = self.pending.pop_front() {
                return Ok(meta);
            }
            if let Some(wait) = self.wait.take() {
                tokio::time::sleep(wait).await;
            }
            match self.step().await {
                Ok(Some(meta)) => return Ok(meta),
                Ok(None) => {}
                Err(e) => {
                    self.failed();
                    return Err(e);
                }
            }
        }
    }

    /// Counts a failure into its run (a new run after [`CALM`]) and sets the wait before the next
    /// request.
    fn failed(&mut self) {
        let now = Instant::now();
        if self.last_failure.is_some_and(|last| now - last > CALM) {
            self.failures = 0;
        }
        self.last_failure = Some(now);
        self.wait = Some(DELAYS.delay(self.failures));
        self.failures = self.failures.saturating_add(1);
    }

    /// One request or one event: the metadata it yields, if any.
    async fn step(&mut self) -> Result<Option<ObjectMeta>, KubeError> {
        match std::mem::replace(&mut self.state, State::Listing { next: None }) {
            State::Listing { next } => {
                let mut params = ListParams::default().limit(PAGE);
                if let Some(next) = &next {
                    params = params.continue_token(next);
                }
                // NB: on an error the state stays `Listing { next: None }`: the list starts over.
                let page = self.api.list_metadata(&params).await.map_err(call("list secrets to watch"))?;
                self.pending.extend(page.items.into_iter().map(|m| m.metadata));
                let next = page.metadata.continue_.filter(|c| !c.is_empty());
                let resource_version = page.metadata.resource_version.filter(|v| !v.is_empty());
                self.state = match (next, resource_version) {
                    (Some(next), _) => State::Listing { next: Some(next) },
                    (None, Some(resource_version)) => State::Listed { resource_version },
                    (None, None) => {
                        self.pending.clear();
                        return Err(KubeError::Unexpected("the secret list has no resourceVersion".into()));
                    }
                };
                Ok(None)
            }
            State::Listed { resource_version } => {
                let params = WatchParams::default().timeout(WATCH_SECONDS);
                match self.api.watch_metadata(&params, &resource_version).await {
                    Ok(events) => {
                        self.state = State::Watching { resource_version, events: events.boxed() };
                        Ok(None)
                    }
                    Err(e) => {
                        self.state = State::Listed { resource_version };
                        Err(call("watch secrets")(e))
                    }
                }
            }
            State::Watching { resource_version, mut events } => {
                let event = tokio::time::timeout(IDLE, events.next()).await.ok().flatten();
                let (resource_version, out) = match event {
                    Some(Ok(WatchEvent::Added(object) | WatchEvent::Modified(object))) => {
                        match object.metadata.resource_version.clone().filter(|v| !v.is_empty()) {
                            Some(version) => (version, Ok(Some(object.metadata))),
                            None => {
                                return Err(KubeError::Unexpected(
                                    "a watched secret has no resourceVersion".into(),
                                ));
                            }
                        }
                    }
                    Some(Ok(WatchEvent::Deleted(object))) => {
                        match object.metadata.resource_version.filter(|v| !v.is_empty()) {
                            Some(version) => (version, Ok(None)),
                            None => {
                                return Err(KubeError::Unexpected(
                                    "a watched secret has no resourceVersion".into(),
                                ));
                            }
                        }
                    }
                    Some(Ok(WatchEvent::Bookmark(mark))) => (mark.metadata.resource_version, Ok(None)),
                    // 410 Gone: the resourceVersion has expired, so only a new list catches up.
                    Some(Ok(WatchEvent::Error(status))) if status.code == 410 => {
                        return Err(KubeError::Unexpected(format!("watch secrets: {status}")));
                    }
                    Some(Ok(WatchEvent::Error(status))) => {
                        (resource_version, Err(KubeError::Unexpected(format!("watch secrets: {status}"))))
                    }
                    Some(Err(e)) => (resource_version, Err(call("watch secrets")(e))),
                    // Ended by the server's timeout, or idle too long: watch again from here.
                    None => {
                        self.state = State::Listed { resource_version };
                        return Ok(None);
                    }
                };
                self.state = State::Watching { resource_version, events };
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The loop against kube's tower-test mock, answered as kube-apiserver answers. Each watch body
    //! is a stream the test controls, so a watch can end, stay open or break where a scenario
    //! needs it; time is paused, so waits are exact.

    use std::io;

    use http::{Request, Response};
    use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
    use hyper::body::{Bytes, Frame};
    use serde_json::{Value, json};
    use tokio::{task::JoinHandle, time::Instant};

    use super::*;

    type Body = UnsyncBoxBody<Bytes, io::Error>;
    type Handle = tower_test::mock::Handle<Request<kube::client::Body>, Response<Body>>;
    type Changes = BoxStream<'static, Result<ObjectMeta, KubeError>>;

    const LIST: &str = "/api/v1/secrets?&limit=500";

    /// How a watch's body ends.
    enum End {
        /// The server ends it: its `timeoutSeconds` passed, its watcher's results ended, or it is
        /// shutting down (staging/src/k8s.io/apiserver/pkg/endpoints/handlers/watch.go,
        /// `WatchServer.HandleHTTP`, which returns from its loop on each).
        Close,
        /// It stays open and says nothing more.
        Open,
        /// The connection breaks with this error (the network, not the API server).
        Break(io::ErrorKind),
    }

    /// What the API server answers to one request.
    enum Answer {
        /// A JSON document with this HTTP status.
        Json(u16, Value),
        /// 200, then these events, one JSON document a line (`WatchServer.HandleHTTP` writes the
        /// status before the first event, so every error after it comes as an `ERROR` event).
        Watch(Vec<Value>, End),
    }

    fn watch_from(version: &str) -> String {
        format!(
            "/api/v1/secrets?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion={version}"
        )
    }

    fn meta(name: &str, version: &str) -> Value {
        json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": name, "namespace": "apps", "resourceVersion": version},
        })
    }

    /// One page of a metadata-only list (handlers/response.go, `asPartialObjectMetadataList`).
    /// With a `limit`, every page carries the list's resourceVersion and, while more remain, a
    /// continue token (staging/src/k8s.io/apiserver/pkg/storage/etcd3/store.go, `GetList`, which
    /// ends in `versioner.UpdateList(listObj, withRev, continueValue, ...)`).
    fn page(items: &[(&str, &str)], version: &str, next: Option<&str>) -> Answer {
        let items: Vec<Value> = items.iter().map(|(name, rv)| meta(name, rv)).collect();
        let mut metadata = json!({"resourceVersion": version});
        if let Some(next) = next {
            metadata["continue"] = json!(next);
        }
        Answer::Json(
            200,
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                   "metadata": metadata, "items": items}),
        )
    }

    fn event(type_: &str, object: Value) -> Value {
        json!({"type": type_, "object": object})
    }

    /// What the watch cache sends a watch whose resourceVersion has left its history window:
    /// `getAllEventsSinceLocked` (staging/src/k8s.io/apiserver/pkg/storage/cacher/watch_cache.go)
    /// fails with `errors.NewResourceExpired("too old resource version: %d (%d)")`, a Status of
    /// code 410, reason Expired (staging/src/k8s.io/apimachinery/pkg/api/errors/errors.go), and
    /// `Cacher.Watch` (cacher.go) turns it into `newErrWatcher(err)`: one ERROR event carrying that
    /// Status, then the end of the results.
    fn expired(asked: u64, oldest: u64) -> Vec<Value> {
        vec![event(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": format!("too old resource version: {asked} ({oldest})"),
                   "reason": "Expired", "code": 410}),
        )]
    }

    /// What a watch cache that is behind the asked resourceVersion sends after waiting
    /// `blockTimeout` (3 s): `waitUntilFreshAndBlock` (watch_cache.go) fails with
    /// `storage.NewTooLargeResourceVersionError` (staging/src/k8s.io/apiserver/pkg/storage/
    /// errors.go), a `NewTimeoutError` Status of code 504 with a ResourceVersionTooLarge cause, and
    /// `Cacher.Watch` sends it through `newErrWatcher` as above. NB: the fake does not wait the 3 s.
    fn behind(asked: u64, current: u64) -> Vec<Value> {
        vec![event(
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": format!("Timeout: Too large resource version: {asked}, current: {current}"),
                   "reason": "Timeout", "code": 504,
                   "details": {"causes": [{"reason": "ResourceVersionTooLarge",
                                           "message": "Too large resource version"}],
                               "retryAfterSeconds": 1}}),
        )]
    }

    /// A list refused with an internal error, shaped as `errors.NewInternalError` (errors.go)
    /// shapes it.
    fn internal_error() -> Answer {
        Answer::Json(
            500,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "Internal error occurred: etcdserver: request timed out",
                   "reason": "InternalError", "code": 500,
                   "details": {"causes": [{"message": "etcdserver: request timed out"}]}}),
        )
    }

    /// The loop over a mock API server that answers `script` (expected path and query, answer) in
    /// order, panicking on anything else. The server returns when each request arrived; watch
    /// bodies left open stay open until it returns.
    fn start(script: Vec<(String, Answer)>) -> (Changes, JoinHandle<Vec<Instant>>) {
        let (service, handle) = tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
        let changes = secret_changes(Api::all(kube::Client::new(service, "default")));
        (changes, tokio::spawn(serve(handle, script)))
    }

    async fn serve(mut handle: Handle, script: Vec<(String, Answer)>) -> Vec<Instant> {
        let mut arrivals = Vec::new();
        let mut open = Vec::new();
        for (expected, answer) in script {
            let next = tokio::time::timeout(Duration::from_secs(3600), handle.next_request()).await;
            let (request, reply) = next.ok().flatten().unwrap_or_else(|| panic!("no request for {expected}"));
            arrivals.push(Instant::now());
            assert_eq!(request.method(), "GET");
            assert_eq!(request.uri().path_and_query().map(|p| p.as_str()), Some(expected.as_str()));
            let (code, body) = match answer {
                Answer::Json(code, value) => {
                    let bytes = Bytes::from(serde_json::to_vec(&value).unwrap());
                    (code, Full::new(bytes).map_err(|never| -> io::Error { match never {} }).boxed_unsync())
                }
                Answer::Watch(events, end) => {
                    let (tx, rx) = futures::channel::mpsc::unbounded();
                    for event in events {
                        let mut line = serde_json::to_vec(&event).unwrap();
                        line.push(b'\n');
                        tx.unbounded_send(Ok(Frame::data(Bytes::from(line)))).unwrap();
                    }
                    match end {
                        End::Close => {}
                        End::Open => open.push(tx),
                        End::Break(kind) => {
                            tx.unbounded_send(Err(io::Error::new(kind, "connection lost"))).unwrap()
                        }
                    }
                    (200, StreamBody::new(rx).boxed_unsync())
                }
            };
            let response = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
            reply.send_response(response);
        }
        arrivals
    }

    /// The next `n` items, as names or error messages.
    async fn take(changes: &mut Changes, n: usize) -> Vec<String> {
        let mut seen = Vec::new();
        for _ in 0..n {
            let item = changes.next().await.expect("the watch never ends");
            seen.push(match item {
                Ok(meta) => meta.name.unwrap_or_default(),
                Err(e) => format!("error: {e}"),
            });
        }
        seen
    }

    /// Drives the loop until the server has answered its whole script; nothing more may come out.
    async fn until_served(changes: &mut Changes, server: JoinHandle<Vec<Instant>>) -> Vec<Instant> {
        tokio::select! {
            item = changes.next() => panic!("unexpected {item:?} before the script ended"),
            arrivals = server => arrivals.unwrap(),
        }
    }

    fn gaps(arrivals: &[Instant]) -> Vec<Duration> {
        arrivals.windows(2).map(|w| w[1] - w[0]).collect()
    }

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn lists_page_by_page_then_watches_from_the_list_version() {
        let (mut changes, server) = start(vec![
            (LIST.into(), page(&[("a", "7"), ("b", "8")], "10", Some("page-2"))),
            (format!("{LIST}&continue=page-2"), page(&[("c", "9")], "10", None)),
            (watch_from("10"), Answer::Watch(vec![], End::Open)),
        ]);
        assert_eq!(take(&mut changes, 3).await, ["a", "b", "c"]);
        let arrivals = until_served(&mut changes, server).await;
        assert_eq!(gaps(&arrivals), ms(&[0, 0]), "no failure, so no wait");
    }

    #[tokio::test(start_paused = true)]
    async fn hands_out_watched_changes_and_watches_again_from_the_last_version() {
        // A bookmark is the watch cache's `dispatchEvents` telling an idle watcher how far it has
        // come: an empty object with only the resourceVersion set (cacher.go).
        let bookmark = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                              "metadata": {"resourceVersion": "15"}});
        let (mut changes, server) = start(vec![
            (LIST.into(), page(&[("a", "7")], "10", None)),
            (
                watch_from("10"),
                Answer::Watch(
                    vec![
                        event("ADDED", meta("b", "11")),
                        event("MODIFIED", meta("a", "12")),
                        event("DELETED", meta("b", "13")),
                        event("BOOKMARK", bookmark),
                    ],
                    End::Close,
                ),
            ),
            (watch_from("15"), Answer::Watch(vec![event("MODIFIED", meta("c", "16"))], End::Close)),
            (watch_from("16"), Answer::Watch(vec![], End::Open)),
        ]);
        assert_eq!(take(&mut changes, 4).await, ["a", "b", "a", "c"], "a deletion is not handed out");
        let arrivals = until_served(&mut changes, server).await;
        assert_eq!(gaps(&arrivals), ms(&[0, 0, 0]), "a watch the server ends is opened again at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_stays_silent_past_its_timeout_is_opened_again() {
        let (mut changes, server) = start(vec![
            (LIST.into(), page(&[], "10", None)),
            (watch_from("10"), Answer::Watch(vec![], End::Open)),
            (watch_from("10"), Answer::Watch(vec![], End::Open)),
        ]);
        let arrivals = until_served(&mut changes, server).await;
        assert_eq!(gaps(&arrivals)[1], IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_expired_with_410_lists_again_and_watches_from_the_new_list() {
        let (mut changes, server) = start(vec![
            (LIST.into(), page(&[("a", "7")], "10", None)),
            (watch_from("10"), Answer::Watch(expired(10, 14), End::Close)),
            (LIST.into(), page(&[("a", "7"), ("b", "12")], "20", None)),
            (watch_from("20"), Answer::Watch(vec![], End::Open)),
        ]);
        let seen = take(&mut changes, 4).await;
        assert_eq!(seen[0], "a");
        assert!(
            seen[1].starts_with("error: watch secrets")
                && seen[1].contains("too old resource version: 10 (14)"),
            "{}",
            seen[1]
        );
        assert_eq!(seen[2..], ["a", "b"], "the new list hands out every Secret again");
        let arrivals = until_served(&mut changes, server).await;
        assert_eq!(gaps(&arrivals), ms(&[0, 800, 0]), "the list after the failure waits the first backoff");
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_watch_resumes_from_the_last_version_without_listing() {
        let (mut changes, server) = start(vec![
            (LIST.into(), page(&[("a", "7")], "10", None)),
            (
                watch_from("10"),
                Answer::Watch(
                    vec![event("MODIFIED", meta("b", "11"))],
                    End::Break(io::ErrorKind::ConnectionReset),
                ),
            ),
            (
                watch_from("11"),
                Answer::Watch(
                    vec![event("MODIFIED", meta("c", "12"))],
                    End::Break(io::ErrorKind::UnexpectedEof),
                ),
            ),
            (watch_from("12"), Answer::Watch(vec![], End::Open)),
        ]);
        let seen = take(&mut changes, 4).await;
        assert_eq!(seen[..2], ["a", "b"]);
        assert!(seen[2].starts_with("error: watch secrets"), "{}", seen[2]);
        assert_eq!(seen[3], "c");
        let arrivals = until_served(&mut changes, server).await;
        // NB: kube reads a body cut short (an unexpected EOF) as the end of the watch, not an error.
        assert_eq!(gaps(&arrivals), ms(&[0, 800, 0]));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_lists_back_off_doubling_and_start_over_from_the_first_page() {
        let (mut changes, server) = start(vec![
            (LIST.into(), internal_error()),
            (LIST.into(), internal_error()),
            (LIST.into(), page(&[("a", "7")], "10", Some("page-2"))),
            (format!("{LIST}&continue=page-2"), internal_error()),
            (LIST.into(), page(&[("a", "7")], "10", None)),
            (watch_from("10"), Answer::Watch(vec![], End::Open)),
        ]);
        let seen = take(&mut changes, 5).await;
        assert!(seen[0].starts_with("error: list secrets to watch") && seen[0].contains("Internal error"));
        assert!(seen[1].starts_with("error:") && seen[3].starts_with("error:"), "{seen:?}");
        assert_eq!((seen[2].as_str(), seen[4].as_str()), ("a", "a"), "{seen:?}");
        let arrivals = until_served(&mut changes, server).await;
        // NB: the page that failed continues the run of failures, so it waits 3.2 s.
        assert_eq!(gaps(&arrivals), ms(&[800, 1600, 0, 3200, 0]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_that_fails_as_soon_as_it_opens_backs_off_doubling() {
        let (mut changes, server) = start(vec![
            (LIST.into(), page(&[], "10", None)),
            (watch_from("10"), Answer::Watch(behind(10, 9), End::Close)),
            (watch_from("10"), Answer::Watch(behind(10, 9), End::Close)),
            (watch_from("10"), Answer::Watch(behind(10, 9), End::Close)),
            (watch_from("10"), Answer::Watch(vec![], End::Open)),
        ]);
        let seen = take(&mut changes, 3).await;
        assert!(seen.iter().all(|s| s.contains("Too large resource version: 10, current: 9")), "{seen:?}");
        let arrivals = until_served(&mut changes, server).await;
        assert_eq!(gaps(&arrivals), ms(&[0, 800, 1600, 3200]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_expired_again_and_again_lists_less_and_less_often() {
        let (mut changes, server) = start(vec![
            (LIST.into(), page(&[], "10", None)),
            (watch_from("10"), Answer::Watch(expired(10, 14), End::Close)),
            (LIST.into(), page(&[], "20", None)),
            (watch_from("20"), Answer::Watch(expired(20, 24), End::Close)),
            (LIST.into(), page(&[], "30", None)),
            (watch_from("30"), Answer::Watch(vec![], End::Open)),
        ]);
        assert!(take(&mut changes, 2).await.iter().all(|s| s.contains("too old resource version")));
        let arrivals = until_served(&mut changes, server).await;
        assert_eq!(gaps(&arrivals), ms(&[0, 800, 0, 1600, 0]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_after_two_calm_minutes_waits_the_first_backoff_again() {
        let (mut changes, server) = start(vec![
            (LIST.into(), page(&[], "10", None)),
            (watch_from("10"), Answer::Watch(behind(10, 9), End::Close)),
            (watch_from("10"), Answer::Watch(behind(10, 9), End::Close)),
            // Healthy and silent until the idle timeout: more than two minutes without a failure.
            (watch_from("10"), Answer::Watch(vec![event("MODIFIED", meta("a", "11"))], End::Open)),
            (watch_from("11"), Answer::Watch(behind(11, 10), End::Close)),
            (watch_from("11"), Answer::Watch(vec![], End::Open)),
        ]);
        assert_eq!(take(&mut changes, 4).await[2], "a");
        let arrivals = until_served(&mut changes, server).await;
        assert_eq!(gaps(&arrivals), [ms(&[0, 800, 1600]), vec![IDLE], ms(&[800])].concat());
    }
}
