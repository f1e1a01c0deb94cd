//! The etcd client side: how to connect (read-only use), and a range read page by page at one
//! pinned revision, so a scan is one consistent snapshot and memory is bounded by the page size.

mod client;

use std::path::PathBuf;

use tonic::{Code, Status};

pub use self::client::{Client, connect};
use crate::proto::etcd::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
/// One stored key and value, as a range read returns it.
pub use crate::proto::etcd::mvccpb::KeyValue;

/// The scan could not run or could not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// etcd compacted the pinned revision during the scan: the snapshot is gone.
    #[error("etcd compacted revision {revision} during the scan; the report would be partial")]
    Compacted { revision: i64 },
    /// No endpoint could be reached, or etcd refused the credentials.
    #[error("cannot connect to etcd {endpoints:?}: {reason}")]
    Connect { endpoints: Vec<String>, reason: String },
    /// A TLS or password file could not be read.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One value alone is larger than the largest page response accepted.
    #[error("an etcd value after {after:?} is larger than the {limit}-byte response limit")]
    ValueTooLarge { after: String, limit: usize },
    /// The task reading the next page ended without an answer (the runtime is shutting down).
    #[error("etcd page read was interrupted: {0}")]
    Interrupted(String),
    /// etcd answered a page no correct etcd sends; going on could loop forever or end the scan
    /// early, looking complete.
    #[error("etcd answered an impossible page: {0}")]
    BadPage(String),
    /// A range read failed.
    #[error("etcd range read failed: {}", describe(.0))]
    Read(Status),
}

/// A gRPC status in one line. NB: a status prints its transport source with Debug (a dump of
/// nested structs), so it is told as its code, its message and the chain of causes instead; the
/// status is not kept as a `source` for the same reason.
fn describe(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(cause) = std::error::Error::source(status) {
        let cause = crate::error::chain(cause);
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// The largest page response accepted.
const MAX_PAGE_BYTES: usize = 256 * 1024 * 1024;

/// The page size `kmsgate audit` aims for by default: about the memory of the former default
/// page of 5000 values at 6.5 KiB each, and under a quarter of [`MAX_PAGE_BYTES`].
pub const DEFAULT_PAGE_BYTES: usize = 32 * 1024 * 1024;

/// How much a byte-sized page may grow over the one before it: one page of unusually small values
/// cannot make the next request ask etcd for more than this many times as many values.
const PAGE_GROWTH: i64 = 8;

/// What a key-value costs in a response beyond its key and value: revisions, version, lease and
/// field tags, about 24 bytes with the revisions of a large cluster.
const KV_OVERHEAD_BYTES: usize = 24;

/// A paged read of `[start, end)` at one revision.
pub struct Scanner {
    start: Vec<u8>,
    end: Vec<u8>,
    page_size: i64,
    revision: i64,
    done: bool,
    max_page_bytes: usize,
    /// The response size later pages aim for; 0: every page asks for `page_size` values.
    page_bytes: usize,
}

impl Scanner {
    /// Everything under `prefix`.
    pub fn prefix(prefix: &[u8], page_size: usize) -> Self {
        Self {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
            page_size: i64::try_from(page_size.max(1)).unwrap_or(i64::MAX),
            revision: 0,
            done: false,
            max_page_bytes: MAX_PAGE_BYTES,
            page_bytes: 0,
        }
    }

    /// Sizes pages by bytes instead of by count: the first page asks for `page_size` values, each
    /// later one for as many as fit `bytes` at the average size of the page just read (at most
    /// [`PAGE_GROWTH`] times its count, and at most half the response limit). Fewer, larger pages
    /// matter because etcd 3.4 walks its index over the whole rest of the range on every paged
    /// request (`mvcc/index.go` `treeIndex.Revisions`, called by `mvcc/kvstore_txn.go`
    /// `rangeKeys` before the limit applies), so a scan's cost grows with its number of pages.
    pub fn with_page_bytes(mut self, bytes: usize) -> Self {
        self.page_bytes = bytes;
        self
    }

    /// The largest page response accepted (256 MiB unless set).
    pub fn with_max_page_bytes(mut self, bytes: usize) -> Self {
        self.max_page_bytes = bytes;
        self
    }

    /// The values asked for per page now.
    pub fn page_size(&self) -> usize {
        usize::try_from(self.page_size).unwrap_or(usize::MAX)
    }

    /// The pinned revision (0 before the first page).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The next page of at most `page_size` key-values, or `None` at the end. A page too large for
    /// the client's message limit is asked for again at half the size, at the same revision; the
    /// smaller size is kept for the rest of the scan, or, with a byte budget, until the next page
    /// is sized from the values read.
    pub async fn next_page(&mut self, client: &Client) -> Result<Option<Vec<KeyValue>>, ScanError> {
        if self.done {
            return Ok(None);
        }
        let RangeResponse { header, kvs, more } = loop {
            let request = RangeRequest {
                key: self.start.clone(),
                range_end: self.end.clone(),
                limit: self.page_size,
                revision: self.revision,
            };
            // NB: a page holds page_size values of up to etcd's 1.5 MiB each; allow more than
            // tonic's 4 MiB default so a page of large objects does not fail, while page_size
            // keeps the bound.
            match client.range(&request, self.max_page_bytes).await {
                Ok(response) => break response,
                Err(e) if too_large(&e) && self.page_size > 1 => {
                    self.page_size /= 2;
                    tracing::debug!(page_size = self.page_size, "etcd page too large; halving it");
                }
                Err(e) if too_large(&e) => {
                    let after = String::from_utf8_lossy(&self.start).chars().take(256).collect();
                    return Err(ScanError::ValueTooLarge { after, limit: self.max_page_bytes });
                }
                // NB: etcd answers OUT_OF_RANGE "etcdserver: mvcc: required revision has been
                // compacted" (etcd-io/etcd v3.4.23 etcdserver/api/v3rpc/rpctypes/error.go,
                // `ErrGRPCCompacted`).
                Err(e) if e.code() == Code::OutOfRange && e.message().contains("compacted") => {
                    return Err(ScanError::Compacted { revision: self.revision });
                }
                // NB: the client tried every endpoint before answering Unavailable.
                Err(e) if e.code() == Code::Unavailable => {
                    return Err(ScanError::Connect { endpoints: client.endpoints(), reason: describe(&e) });
                }
                Err(e) => return Err(ScanError::Read(e)),
            }
        };
        let first = self.revision == 0;
        self.revision = check_page(header.as_ref(), &kvs, more, &self.start, &self.end, self.revision)
            .map_err(ScanError::BadPage)?;
        if first {
            tracing::debug!(revision = self.revision, "etcd scan pinned");
        }
        self.resize(&kvs);
        match kvs.last() {
            Some(last) if more => {
                // NB: the smallest key after `last` is `last` followed by a zero byte.
                self.start = last.key.clone();
                self.start.push(0);
            }
            _ => self.done = true,
        }
        Ok(if kvs.is_empty() { None } else { Some(kvs) })
    }

    /// Sizes the next request from the page just read, when pages are sized by bytes.
    fn resize(&mut self, page: &[KeyValue]) {
        if self.page_bytes == 0 || page.is_empty() {
            return;
        }
        let bytes: usize = page.iter().map(|kv| kv.key.len() + kv.value.len() + KV_OVERHEAD_BYTES).sum();
        let budget = self.page_bytes.min(self.max_page_bytes / 2);
        // NB: `bytes` > 0: the page is not empty and every value costs KV_OVERHEAD_BYTES.
        let fits = i64::try_from(budget.saturating_mul(page.len()) / bytes).unwrap_or(i64::MAX);
        let grown = i64::try_from(page.len()).unwrap_or(i64::MAX).saturating_mul(PAGE_GROWTH);
        self.page_size = fits.min(grown).max(1);
    }
}

/// A scan that reads one page ahead: while the caller judges one page, the next is already on its
/// way from etcd at the same pinned revision, so etcd's work (and the decoding) overlaps ours
/// instead of alternating with it. At most two pages are held: the one returned and the one in
/// flight, so memory stays bounded by the page size.
pub struct Pages {
    next: Option<tokio::task::JoinHandle<Fetched>>,
    revision: i64,
}

/// A page read, with the scanner and client handed back for the next one.
struct Fetched {
    scanner: Scanner,
    client: Client,
    page: Result<Option<Vec<KeyValue>>, ScanError>,
}

impl Pages {
    /// Starts reading the first page of `scanner` at once.
    pub fn new(scanner: Scanner, client: Client) -> Self {
        Self { next: Some(fetch(scanner, client)), revision: 0 }
    }

    /// The pinned revision (0 before the first page).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// The next page, or `None` at the end; the page after it is requested before this returns.
    pub async fn next_page(&mut self) -> Result<Option<Vec<KeyValue>>, ScanError> {
        let Some(task) = self.next.take() else { return Ok(None) };
        let Fetched { scanner, client, page } =
            task.await.map_err(|e| ScanError::Interrupted(e.to_string()))?;
        let page = page?;
        self.revision = scanner.revision();
        // NB: the next request starts only after this one answered, so it carries the revision
        // the first page pinned.
        if page.is_some() && !scanner.done {
            self.next = Some(fetch(scanner, client));
        }
        Ok(page)
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // NB: a caller that stops early (an error, a cancelled run) must not leave a read running.
        if let Some(task) = &self.next {
            task.abort();
        }
    }
}

fn fetch(mut scanner: Scanner, client: Client) -> tokio::task::JoinHandle<Fetched> {
    tokio::spawn(async move {
        let page = scanner.next_page(&client).await;
        Fetched { scanner, client, page }
    })
}

/// Checks one page of a read of `[start, end)` and answers the revision the scan is pinned at:
/// `pinned`, or the first page's own. Every key must lie in the range and follow the one before,
/// since the next page starts after the last key; a page promising more must hold a key to start
/// after; the first page must name the revision the rest are read at.
fn check_page(
    header: Option<&ResponseHeader>,
    kvs: &[KeyValue],
    more: bool,
    start: &[u8],
    end: &[u8],
    pinned: i64,
) -> Result<i64, String> {
    let shown = |key: &[u8]| String::from_utf8_lossy(key).chars().take(256).collect::<String>();
    if more && kvs.is_empty() {
        return Err(format!("it says more keys follow {:?} but sent none", shown(start)));
    }
    // NB: an `end` of "\0" is "to the end of the keyspace" (see `prefix_end`).
    let unbounded = end == [0];
    let mut floor = start;
    for (n, kv) in kvs.iter().enumerate() {
        let ordered = if n == 0 { kv.key.as_slice() >= floor } else { kv.key.as_slice() > floor };
        if !ordered {
            return Err(format!("key {:?} does not follow {:?}", shown(&kv.key), shown(floor)));
        }
        if !unbounded && kv.key.as_slice() >= end {
            return Err(format!("key {:?} lies past the end of the range, {:?}", shown(&kv.key), shown(end)));
        }
        floor = &kv.key;
    }
    if pinned > 0 {
        return Ok(pinned);
    }
    match header.map(|h| h.revision) {
        Some(revision) if revision > 0 => Ok(revision),
        Some(revision) => Err(format!("its first page names revision {revision}")),
        None => Err("its first page has no header, so no revision to read the rest at".into()),
    }
}

/// Whether a read failed only because its response was larger than a gRPC message limit: the
/// client's (tonic's decoder answers OUT_OF_RANGE "decoded message length too large") or the
/// server's (grpc-go answers RESOURCE_EXHAUSTED "larger than max").
fn too_large(status: &Status) -> bool {
    match status.code() {
        Code::OutOfRange => status.message().contains("message length too large"),
        Code::ResourceExhausted => status.message().contains("larger than max"),
        _ => false,
    }
}

/// The end of the range of keys starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // NB: an all-0xff (or empty) prefix means "to the end of the keyspace", spelled "\0".
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str) -> KeyValue {
        KeyValue { key: key.as_bytes().to_vec(), ..Default::default() }
    }

    fn at(revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader { revision })
    }

    /// A page read of `[/r/, /r0)` at no pinned revision yet.
    fn first(header: Option<ResponseHeader>, keys: &[&str], more: bool) -> Result<i64, String> {
        let kvs: Vec<KeyValue> = keys.iter().map(|k| kv(k)).collect();
        check_page(header.as_ref(), &kvs, more, b"/r/", b"/r0", 0)
    }

    #[test]
    fn a_sound_page_pins_its_revision() {
        assert_eq!(first(at(7), &["/r/a", "/r/b"], true), Ok(7));
        assert_eq!(first(at(7), &[], false), Ok(7));
        let later = check_page(None, &[kv("/r/c")], false, b"/r/b\0", b"/r0", 7);
        assert_eq!(later, Ok(7), "later pages keep the pinned revision");
        let unbounded = check_page(at(3).as_ref(), &[kv("\u{7f}")], false, b"", &[0], 0);
        assert_eq!(unbounded, Ok(3), "an end of \\0 bounds nothing");
    }

    #[test]
    fn more_with_no_keys_is_refused_instead_of_looping() {
        let err = first(at(7), &[], true).unwrap_err();
        assert!(err.contains("more keys follow") && err.contains("/r/"), "{err}");
    }

    #[test]
    fn keys_out_of_order_or_range_are_refused() {
        let err = first(at(7), &["/r/b", "/r/a"], true).unwrap_err();
        assert!(err.contains("\"/r/a\" does not follow \"/r/b\""), "{err}");
        let err = first(at(7), &["/r/a", "/r/a"], true).unwrap_err();
        assert!(err.contains("does not follow"), "a repeated key: {err}");
        let err = check_page(None, &[kv("/r/b")], true, b"/r/b\0", b"/r0", 7).unwrap_err();
        assert!(err.contains("\"/r/b\" does not follow"), "a key before the page's start: {err}");
        let err = first(at(7), &["/r/a", "/r0"], false).unwrap_err();
        assert!(err.contains("past the end") && err.contains("/r0"), "{err}");
        let err = first(at(7), &["/q"], false).unwrap_err();
        assert!(err.contains("does not follow"), "{err}");
    }

    #[test]
    fn a_first_page_without_a_revision_is_refused() {
        let err = first(None, &["/r/a"], true).unwrap_err();
        assert!(err.contains("no header"), "{err}");
        for revision in [0, -1] {
            let err = first(at(revision), &["/r/a"], true).unwrap_err();
            assert!(err.contains(&format!("revision {revision}")), "{err}");
        }
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/registry/"), b"/registry0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
