//! Coalesces Decrypts that wait for a Vault slot into Transit batch calls.
//!
//! A Decrypt joins a queue, then waits for either its answer or a slot: one of [`FLUSHERS`]
//! decrypt calls in flight, then one of the client's `vault.max_concurrent_calls`. Whoever gets a
//! slot takes everything queued (up to [`MAX_BATCH`]) and sends it as one call: alone when it is
//! alone, as `batch_input` when others are waiting. So a quiet plugin makes exactly the calls it made before, and an API server's
//! cold-start storm costs a few batch calls instead of thousands of single ones.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use reqwest::Method;
use serde::Deserialize;
use serde_json::json;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
    time::Instant,
};
use zeroize::Zeroizing;

use super::{VaultClient, map_error};
use crate::backend::BackendError;

/// Most Decrypts one batch call carries. OpenBao spends about 435 µs of CPU on a single decrypt
/// call and about 17 µs per item in a 64-item batch (BENCHMARKS.md), so larger batches gain
/// little more, and OpenBao refuses a body with more than `max_request_json_strings` JSON
/// strings, 1000 by default (openbao internalshared/configutil/listener.go, `Listener`; the
/// limit came with HCSEC-2025-24): four per item, so 64 items stay far below it.
pub const MAX_BATCH: usize = 64;
/// Decrypt calls (single or batch) in flight at once: a backlog waits for one of these rather
/// than one of the client's `vault.max_concurrent_calls`, so it leaves in a few large batches.
/// Two, so that one call's round trip never idles the path while others are queued.
const FLUSHERS: usize = 2;

type Reply = Result<Zeroizing<Vec<u8>>, BackendError>;

/// Decrypts waiting for a slot.
pub struct DecryptQueue {
    waiting: Mutex<VecDeque<Pending>>,
    next_id: AtomicU64,
    /// Slots for decrypt calls in flight; fewer than the client's cap, so a backlog waits here
    /// and leaves in a few large batches rather than many small ones.
    flushers: Arc<Semaphore>,
}

impl Default for DecryptQueue {
    fn default() -> Self {
        Self {
            waiting: Mutex::default(),
            next_id: AtomicU64::default(),
            flushers: Arc::new(Semaphore::new(FLUSHERS)),
        }
    }
}

struct Pending {
    id: u64,
    ciphertext: String,
    aad: String,
    deadline: Instant,
    reply: oneshot::Sender<Reply>,
}

#[derive(Deserialize)]
struct Decrypted {
    #[serde(default)]
    plaintext: Zeroizing<String>,
    #[serde(default)]
    error: String,
}

impl std::fmt::Debug for DecryptQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecryptQueue")
            .field("waiting", &self.lock().len())
            .field("in_flight", &(FLUSHERS - self.flushers.available_permits()))
            .finish()
    }
}

impl DecryptQueue {
    /// Decrypts one Transit ciphertext bound to `aad`, alone or in a batch.
    pub async fn decrypt(
        &self,
        client: &Arc<VaultClient>,
        path: &str,
        ciphertext: &str,
        aad: &[u8],
        deadline: Instant,
    ) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, mut answer) = oneshot::channel();
        self.lock().push_back(Pending {
            id,
            ciphertext: ciphertext.to_owned(),
            aad: B64.encode(aad),
            deadline,
            reply,
        });
        tokio::select! {
            biased;
            result = &mut answer => return result.unwrap_or_else(|_| Err(dropped())),
            slot = self.slot(client, deadline) => match slot {
                Ok(slot) => {
                    let batch = self.take(MAX_BATCH);
                    if let [only] = batch.as_slice() && only.id == id {
                        // NB: nobody else waits on this call, so it may die with its caller.
                        flush(client.clone(), path.to_owned(), batch, slot).await;
                    } else if !batch.is_empty() {
                        // NB: a task of its own, so the batch is answered even if this caller's
                        // request is cancelled meanwhile.
                        tokio::spawn(flush(client.clone(), path.to_owned(), batch, slot));
                    }
                }
                // NB: still queued means nobody will answer it: leave. Otherwise a flusher holds
                // it under a deadline no later than ours, so its answer comes in time.
                Err(_) if self.remove(id) => return Err(BackendError::Deadline),
                Err(_) => {}
            },
        }
        answer.await.unwrap_or_else(|_| Err(dropped()))
    }

    /// Waits, within the deadline, for a flusher slot and then one of the client's call slots.
    async fn slot(&self, client: &VaultClient, deadline: Instant) -> Result<Slot, BackendError> {
        let flusher = tokio::time::timeout_at(deadline, self.flushers.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(BackendError::Deadline)?;
        let call = client.permit(deadline).await.map_err(map_error)?;
        Ok(Slot { call, _flusher: flusher })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self, max: usize) -> Vec<Pending> {
        let mut waiting = self.lock();
        let n = waiting.len().min(max);
        waiting.drain(..n).collect()
    }

    fn remove(&self, id: u64) -> bool {
        let mut waiting = self.lock();
        let before = waiting.len();
        waiting.retain(|p| p.id != id);
        waiting.len() != before
    }
}

/// A flusher slot and a client call slot, held together while a decrypt call runs.
struct Slot {
    call: OwnedSemaphorePermit,
    _flusher: OwnedSemaphorePermit,
}

async fn flush(client: Arc<VaultClient>, path: String, batch: Vec<Pending>, slot: Slot) {
    let now = Instant::now();
    let (live, expired): (Vec<Pending>, Vec<Pending>) = batch.into_iter().partition(|p| p.deadline > now);
    for pending in expired {
        let _ = pending.reply.send(Err(BackendError::Deadline));
    }
    let Some(deadline) = live.iter().map(|p| p.deadline).min() else { return };
    let body = if let [one] = live.as_slice() {
        json!({ "ciphertext": one.ciphertext, "associated_data": one.aad })
    } else {
        let items: Vec<_> =
            live.iter().map(|p| json!({ "ciphertext": p.ciphertext, "associated_data": p.aad })).collect();
        json!({ "batch_input": items })
    };
    let answer = client
        .call_permitted(&slot.call, Method::POST, &path, Some(body.to_string().as_bytes()), deadline)
        .await;
    drop(slot);
    if live.len() > 1 {
        client.metrics().batch_calls.inc();
        client.metrics().batched_items.inc_by(live.len() as u64);
    }
    let data = match answer {
        Ok(data) => data,
        Err(e) => {
            let error = map_error(e);
            for pending in live {
                let _ = pending.reply.send(Err(error.clone()));
            }
            return;
        }
    };
    let results: Vec<Decrypted> = if live.len() == 1 {
        serde_json::from_value(data).map(|one| vec![one])
    } else {
        serde_json::from_value(data.get("batch_results").cloned().unwrap_or_default())
    }
    .unwrap_or_default();
    if results.len() != live.len() {
        for pending in live {
            let _ = pending.reply.send(Err(BackendError::Protocol("decrypt answer does not parse".into())));
        }
        return;
    }
    for (pending, result) in live.into_iter().zip(results) {
        let _ = pending.reply.send(item(result));
    }
}

fn item(result: Decrypted) -> Reply {
    if !result.error.is_empty() {
        let lower = result.error.to_ascii_lowercase();
        let message = crate::error::clipped(result.error, 300);
        if lower.contains("too old") || lower.contains("less than the minimum") {
            return Err(BackendError::Retired(message));
        }
        return Err(BackendError::Rejected(message));
    }
    B64.decode(result.plaintext.as_bytes())
        .map(Zeroizing::new)
        .map_err(|_| BackendError::Protocol("decrypt answer is not base64".into()))
}

fn dropped() -> BackendError {
    BackendError::Protocol("a batch flusher stopped before answering".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_multi_byte_vault_error_is_clipped_without_a_panic() {
        // NB: byte 300 falls inside a two-byte character; a plain truncate panicked here.
        let error = format!("a{}", "é".repeat(400));
        let reply = item(Decrypted { plaintext: Zeroizing::new(String::new()), error });
        let message = format!("{:?}", reply.unwrap_err());
        assert!(message.contains("éé") && message.len() < 700, "{message}");
    }
}
