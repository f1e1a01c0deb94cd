//! End to end with real OpenBao and real etcd: a fake API server stores each Secret the way
//! kube-apiserver does (DEK seed wrapped by the real plugin, HKDF + AES-GCM with the etcd key as
//! AAD, written to etcd), polls Status and switches key_id; the controller rotates, converges,
//! migrates, verifies from etcd and retires.

use kmsgate_testkit::{self as common, fake_api};

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{Bao, Etcd, Plugin, storage_standin::ApiServerStorage};
use fake_api::{FakeApi, Store};
use kmsgate::{
    k8s::Kube,
    metrics::{ControllerMetrics, VaultMetrics},
    proto::v2::DecryptRequest,
    rotation::{Context, Step, VaultKeys},
    storage::EncryptedObject,
    transit::VaultClient,
};
use serde_json::json;

#[tokio::test]
async fn rotate_converge_migrate_verify_retire_with_real_openbao_and_etcd() {
    let bao = Bao::start().await;
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = bao.plugin_settings(dir.path());
    settings.extend(common::fast_probes());
    let plugin = Plugin::start(dir.path(), &settings).await;
    let v1 = plugin.wait_healthy().await;

    let storage = ApiServerStorage::new(plugin.client().await, etcd.writer().await);
    let fake = FakeApi::new(&v1).with_store(Arc::new(storage.clone()));
    for i in 0..120 {
        fake.insert(["a", "b", "c"][i % 3], &format!("s{i:03}"), "", format!("{{\"value\":{i}}}").as_bytes())
            .await;
    }
    let saved = etcd.writer().await.get("/registry/secrets/a/s000").await.unwrap();
    let saved = EncryptedObject::from_value(&saved, "kmsgate").unwrap();
    assert_eq!(saved.key_id, v1);

    fake.set_policy(json!({
        "apiVersion": "kmsgate.io/v1alpha1",
        "kind": "RotationPolicy",
        "metadata": {"name": "p", "annotations": {"kmsgate.io/rotate-requested": "now"}},
        "spec": {
            "transit": {"key": "kmsgate"},
            "converge": {"plugins": [plugin.http], "settle": "0s", "apiServerMetrics": false, "timeout": "60s"},
            "migrate": {"qps": 1000.0, "concurrency": 8, "pageSize": 50},
            "verify": {"mode": "Etcd", "provider": "kmsgate"},
            "retire": {"enabled": true, "grace": "0s"},
        },
        "status": {"knownVersion": 1},
    }))
    .await;
    let client = VaultClient::new(&bao.vault_settings(dir.path()), VaultMetrics::default()).unwrap();
    let keys = VaultKeys::new(client, "test-bao", "");
    let etcd_settings =
        kmsgate::config::EtcdConfig { endpoints: vec![etcd.endpoint.clone()], ..Default::default() };
    let ctx = Context::new(
        Kube::new(fake.client()),
        keys,
        Some(etcd_settings),
        Arc::new(ControllerMetrics::new()),
        Duration::from_millis(50),
    );

    // The controller rotates, then waits for the plugin.
    while fake.status().await["phase"] != "Converging" {
        ctx.step("p").await.unwrap();
    }
    let v2 = fake.status().await["toKeyId"].as_str().unwrap().to_owned();
    assert_ne!(v2, v1);
    // 1. the plugin promotes the new version.
    let (_, promoted) = plugin.wait_status(|_, key_id| key_id == v2).await;
    assert_eq!(promoted, v2);
    // 2. the fake API server switches at its next Status poll.
    assert_eq!(storage.current_key_id().await, v2);
    // 3. the controller migrates, 4. verifies from etcd, 5. retires.
    let status = loop {
        match ctx.step("p").await.unwrap() {
            Step::Again => {}
            Step::Wait(d) => tokio::time::sleep(d).await,
            Step::Rest(_) => break fake.status().await,
        }
    };
    assert_eq!(status["result"], "Succeeded", "{status:#}");
    assert_eq!(status["totals"]["rewritten"], 120);
    let verification = &status["verification"];
    assert_eq!(verification["clean"], true);
    assert_eq!(verification["oldKey"], 0);
    assert_eq!(verification["current"], 120);
    assert_eq!(status["retiredBelow"], 2);
    let key = bao.get("transit/keys/kmsgate").await;
    assert_eq!(key["data"]["min_decryption_version"], 2);

    // 4 (again, by the CLI): the audit finds nothing on the old key, and --deep decrypts every object.
    let out = common::kmsgate_command()
        .args(["audit", "--endpoints", &etcd.endpoint, "--provider", "kmsgate", "--deep", "--output", "json"])
        .arg("--plugin-socket")
        .arg(&plugin.socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["deep_verified"], 120, "{summary:#}");

    // 6. a value saved from before no longer decrypts.
    let mut kms = plugin.client().await;
    let refused = kms
        .decrypt(DecryptRequest {
            ciphertext: saved.encrypted_dek_source.clone(),
            key_id: saved.key_id.clone(),
            uid: "old".into(),
            annotations: HashMap::new(),
        })
        .await;
    assert!(refused.is_err(), "a seed wrapped by the retired version must not decrypt");
}
