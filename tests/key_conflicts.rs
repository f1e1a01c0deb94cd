//! A Transit key deleted and recreated under a running plugin, against a real OpenBao: the
//! plugin notices at the first Vault answer that hints at it, fails Status closed, and never
//! refuses a ciphertext that Vault can still authenticate under its key_id.

use kmsgate_testkit as common;

use std::time::Duration;

use common::{Bao, Plugin, decrypt_request as decrypt, encrypt_request as encrypt, eventually};
use kmsgate::proto::v2::StatusRequest;
use serde_json::json;
use tonic::Code;

/// Probes that never run on their own after the first ones, so only a hint can trigger a poll.
fn quiet_probes(bao: &Bao, dir: &std::path::Path) -> Vec<(String, String)> {
    let mut settings = bao.plugin_settings(dir);
    settings.extend([
        ("plugin.poll_interval".to_owned(), "1h".to_owned()),
        ("plugin.round_trip_interval".to_owned(), "1h".to_owned()),
    ]);
    settings
}

async fn delete_and_recreate(bao: &Bao) {
    // NB: Transit reports creation times in whole seconds, so a key recreated within the second
    // it was made is indistinguishable by its metadata (README, "a deleted and recreated key").
    let key = bao.get("transit/keys/kmsgate").await;
    let newest = key["data"]["keys"].as_object().unwrap().values().filter_map(|v| v.as_u64()).max().unwrap();
    eventually(Duration::from_secs(5), "the wall clock leaves the key's creation second", async || {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() > newest
    })
    .await;
    bao.post("transit/keys/kmsgate/config", json!({"deletion_allowed": true})).await;
    bao.delete("transit/keys/kmsgate").await;
    bao.post("transit/keys/kmsgate", json!({"type": "aes256-gcm96"})).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vault_answer_that_hints_at_a_recreated_key_fails_status_closed_at_once() {
    let bao = Bao::start().await;
    bao.rotate().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(dir.path(), &quiet_probes(&bao, dir.path())).await;
    let v2 = plugin.wait_healthy().await;
    assert!(v2.contains(":2:"), "{v2}");
    let mut client = plugin.client().await;

    delete_and_recreate(&bao).await;
    // No poll is due for an hour, so Status still names version 2 of the deleted key...
    let before = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(before.key_id, v2);
    // ...until Vault refuses to encrypt with a version the new key lacks: that answer triggers a
    // metadata read, which finds version 1 with another creation time.
    let err = client.encrypt(encrypt(b"0123456789abcdef0123456789abcdef")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let status = eventually(Duration::from_secs(10), "Status fails closed", async || {
        match client.status(StatusRequest {}).await {
            Err(status) => Ok(status),
            Ok(answer) => Err(format!("{:?}", answer.into_inner())),
        }
    })
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("deleted and recreated"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn decrypt_asks_vault_about_a_key_id_whose_key_was_recreated() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut plugin = Plugin::start(dir.path(), &quiet_probes(&bao, dir.path())).await;
    let old_key_id = plugin.wait_healthy().await;
    let mut client = plugin.client().await;
    let lost = client.encrypt(encrypt(b"seed-under-the-deleted-key-0123")).await.unwrap().into_inner();

    delete_and_recreate(&bao).await;
    // The window that is left: before the next poll, version 1 of the new key wraps under the
    // old key_id (both keys have a version 1, so Vault has nothing to refuse).
    let window = client.encrypt(encrypt(b"seed-in-the-window-0123456789ab")).await.unwrap().into_inner();
    assert_eq!(window.key_id, old_key_id);

    // After a restart the plugin knows version 1's new creation time, yet Vault authenticates the
    // window's ciphertext under the old key_id, so Decrypt returns it...
    plugin.restart().await;
    let new_key_id = plugin.wait_healthy().await;
    assert_ne!(new_key_id, old_key_id);
    let mut client = plugin.client().await;
    let plain = client.decrypt(decrypt(&window.ciphertext, &window.key_id)).await.unwrap().into_inner();
    assert_eq!(plain.plaintext, b"seed-in-the-window-0123456789ab");
    // ...and refuses the deleted key's ciphertext, naming the recreation.
    let err = client.decrypt(decrypt(&lost.ciphertext, &lost.key_id)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("recreated"), "{}", err.message());
}
