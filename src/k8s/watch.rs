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

use super::{KubeError, call};
use crate::backoff::Backoff;

/// Secrets per list page: client-go's pager default, as the watcher's `Config::default()`.
const PAGE: u32 = 500;
/// `timeoutSeconds` of each watch: kube-client's default, which the watcher keeps.
const WATCH_SECONDS: u32 = 290;
/// A watch that says nothing for this long is dead and opened again (the watcher's
/// `next_with_idle_timeout`: the server timeout plus a 5 s margin).
const IDLE: Duration = Duration::from_secs(WATCH_SECONDS as u64 + 5);
/// Waits after failures: the watcher's `DefaultBackoff` without jitter (800 ms doubling to 30 s),
/// reset by the next success.
const DELAYS: Backoff = Backoff::new(Duration::from_millis(800), Duration::from_secs(30));

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
    /// Failures since the last success; the next step waits first while non-zero.
    failures: u32,
}

/// Every Secret's metadata as it is listed, then as it changes: created and modified Secrets, each
/// as often as the API server reports it; deletions are not reported. Each failure comes out as
/// an error, and the watch goes on after a backoff: from the last resourceVersion, or from a
/// new list when the API server has expired it (410 Gone).
pub(super) fn secret_changes(api: Api<Secret>) -> BoxStream<'static, Result<ObjectMeta, KubeError>> {
    let watch =
        SecretWatch { api, state: State::Listing { next: None }, pending: VecDeque::new(), failures: 0 };
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
            if self.failures > 0 {
                tokio::time::sleep(DELAYS.delay(self.failures - 1)).await;
            }
            match self.step().await {
                Ok(Some(meta)) => {
                    self.failures = 0;
                    return Ok(meta);
                }
                Ok(None) => self.failures = 0,
                Err(e) => {
                    self.failures = self.failures.saturating_add(1);
                    return Err(e);
                }
            }
        }
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
