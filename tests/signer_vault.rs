//! The signer's Transit store against a real OpenBao: every key type publishes its versions,
//! signs with an explicit version, and the signature verifies with the public key it publishes
//! (checked by openssl, as kube-apiserver would check it: from the PKIX DER alone); keys of other
//! types are refused by name; the floors are honoured; a recreated key is never signed with under
//! the kid of the old one.

use kmsgate_testkit as common;

use std::{path::Path, process::Command, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use common::Bao;
use kmsgate::{
    backend::{BackendError, SigningBackend},
    jwt::{self, KeyType},
    metrics::{AddressLabels, VaultMetrics},
    transit::{SigningTransit, Transit, VaultClient, read_signing_key},
};
use serde_json::json;
use tokio::time::Instant;

fn store(bao: &Bao, dir: &Path, key: &str, key_type: KeyType) -> (SigningTransit, VaultMetrics) {
    let metrics = VaultMetrics::default();
    let client = VaultClient::new(&bao.vault_settings(dir), metrics.clone()).unwrap();
    (SigningTransit::new(client, "test-bao", "", "transit", key, key_type), metrics)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

/// The JWS signing input of a token whose header names `kid`.
fn signing_input(key_type: KeyType, kid: &str) -> Vec<u8> {
    let header = jwt::header(key_type.alg(), kid).unwrap();
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(r#"{"aud":["https://kubernetes.default.svc"],"sub":"system:serviceaccount:a:b"}"#);
    jwt::signing_input(&header, &claims)
}

/// A DER INTEGER of a big-endian unsigned value.
fn der_integer(value: &[u8]) -> Vec<u8> {
    let value: Vec<u8> = value.iter().copied().skip_while(|b| *b == 0).collect();
    let mut out = vec![0x02];
    let pad = value.first().is_none_or(|b| b & 0x80 != 0);
    push_len(&mut out, value.len() + usize::from(pad));
    if pad {
        out.push(0);
    }
    out.extend(value);
    out
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        out.extend([0x81, len as u8]);
    }
}

/// Whether openssl verifies `signature` (JWS form) of `input` with the PKIX DER `public_key`.
fn openssl_verifies(key_type: KeyType, public_key: &[u8], input: &[u8], signature: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("key.der"), public_key).unwrap();
    std::fs::write(path("input"), input).unwrap();
    // NB: openssl takes ECDSA signatures as DER (r, s), JWS carries them as r‖s.
    let signature = match key_type.alg().ecdsa_signature_len() {
        Some(len) => {
            assert_eq!(signature.len(), len);
            let (r, s) = signature.split_at(len / 2);
            let mut body = der_integer(r);
            body.extend(der_integer(s));
            let mut out = vec![0x30];
            push_len(&mut out, body.len());
            out.extend(body);
            out
        }
        None => signature.to_vec(),
    };
    std::fs::write(path("sig"), signature).unwrap();
    let digest = match key_type.alg() {
        jwt::Alg::Es384 => "-sha384",
        jwt::Alg::Es512 => "-sha512",
        _ => "-sha256",
    };
    let out = Command::new("openssl")
        .args(["dgst", digest, "-keyform", "DER", "-verify"])
        .arg(path("key.der"))
        .arg("-signature")
        .arg(path("sig"))
        .arg(path("input"))
        .output()
        .expect("openssl runs");
    out.status.success()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_key_type_publishes_signs_and_verifies_with_its_published_key() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    for key_type in KeyType::ALL {
        let name = format!("signer-{key_type}");
        bao.post(&format!("transit/keys/{name}"), json!({ "type": key_type.as_str() })).await;
        bao.post(&format!("transit/keys/{name}/rotate"), json!({})).await;
        let (store, _) = store(&bao, dir.path(), &name, key_type);

        let metadata = store.metadata(soon()).await.unwrap();
        assert_eq!(metadata.key.latest, 2, "{key_type}");
        assert_eq!(metadata.key.versions.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!((metadata.key.min_decryption_version, metadata.key.min_encryption_version), (1, 0));
        let read = bao.get(&format!("transit/keys/{name}")).await;
        for version in [1u64, 2] {
            let public = &metadata.public_keys[&version];
            assert_eq!(public.alg, key_type.alg());
            let pem = read["data"]["keys"][version.to_string()]["public_key"].as_str().unwrap();
            let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            assert_eq!(public.der, B64.decode(body).unwrap(), "{key_type} v{version}: DER of the PEM");
        }

        for version in [1u64, 2] {
            let public = &metadata.public_keys[&version];
            let input = signing_input(key_type, &public.kid());
            let signature = store.sign(version, key_type.alg(), &input, soon()).await.unwrap();
            assert!(
                openssl_verifies(key_type, &public.der, &input, &signature),
                "{key_type} v{version}: the signature verifies with the published key"
            );
            let other = &metadata.public_keys[&(3 - version)];
            assert!(
                !openssl_verifies(key_type, &other.der, &input, &signature),
                "{key_type}: not with the other"
            );
        }
        let wrong = if key_type.alg() == jwt::Alg::Es256 { jwt::Alg::Rs256 } else { jwt::Alg::Es256 };
        let input = signing_input(key_type, &metadata.public_keys[&1].kid());
        assert!(matches!(store.sign(1, wrong, &input, soon()).await, Err(BackendError::Misconfigured(_))));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_of_other_types_are_refused_by_name() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    bao.post("transit/keys/ed", json!({ "type": "ed25519" })).await;
    bao.post("transit/keys/p384", json!({ "type": "ecdsa-p384" })).await;
    // The fixture's `kmsgate` key is the plugin's aes256-gcm96 key.
    for (key, named) in
        [("ed", "type \"ed25519\""), ("kmsgate", "type \"aes256-gcm96\""), ("p384", "\"ecdsa-p384\"")]
    {
        let (store, _) = store(&bao, dir.path(), key, KeyType::EcdsaP256);
        let err = store.metadata(soon()).await.unwrap_err();
        assert!(matches!(&err, BackendError::Misconfigured(m) if m.contains(named)), "{key}: {err}");
        let input = signing_input(KeyType::EcdsaP256, "kid");
        let err = store.sign(1, jwt::Alg::Es256, &input, soon()).await.unwrap_err();
        assert!(matches!(&err, BackendError::Misconfigured(m) if m.contains(named)), "{key}: {err}");
    }
    let (store, _) = store(&bao, dir.path(), "missing", KeyType::EcdsaP256);
    assert!(matches!(store.metadata(soon()).await, Err(BackendError::KeyNotFound(_))));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rotation_reads_any_signing_key_and_pins_unpins_and_raises_its_floors() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let client = VaultClient::new(&bao.vault_settings(dir.path()), VaultMetrics::default()).unwrap();
    bao.post("transit/keys/rsa", json!({ "type": "rsa-3072" })).await;
    bao.post("transit/keys/ed", json!({ "type": "ed25519" })).await;
    let (found, metadata) = read_signing_key(&client, "transit", "rsa", soon()).await.unwrap();
    assert_eq!(found, KeyType::Rsa3072, "the type comes from the key");
    assert_eq!(metadata.public_keys[&1].alg, jwt::Alg::Rs256);
    for (key, named) in [("ed", "type \"ed25519\""), ("kmsgate", "type \"aes256-gcm96\"")] {
        let err = read_signing_key(&client, "transit", key, soon()).await.unwrap_err();
        assert!(matches!(&err, BackendError::Misconfigured(m) if m.contains(named)), "{key}: {err}");
    }
    let err = read_signing_key(&client, "transit", "missing", soon()).await.unwrap_err();
    assert!(matches!(err, BackendError::KeyNotFound(_)), "{err}");

    bao.post("transit/keys/sa", json!({ "type": "ecdsa-p256" })).await;
    bao.post("transit/keys/sa/rotate", json!({})).await;
    bao.post("transit/keys/sa/rotate", json!({})).await;
    let key = Transit::new(client.clone(), "test-bao", "", "transit", "sa");
    let floors = || async {
        let (_, m) = read_signing_key(&client, "transit", "sa", soon()).await.unwrap();
        (m.key.min_encryption_version, m.key.min_decryption_version)
    };
    key.set_min_encryption_version(2, soon()).await.unwrap();
    assert_eq!(floors().await, (2, 1), "pinned");
    key.set_min_encryption_version(0, soon()).await.unwrap();
    assert_eq!(floors().await, (0, 1), "unpinned");
    key.set_min_encryption_version(3, soon()).await.unwrap();
    key.set_min_decryption_version(3, soon()).await.unwrap();
    assert_eq!(floors().await, (3, 3), "the floor raised after the switch");

    // A pin below the floor, or above the latest version, is refused and says which rule.
    for version in [2, 4] {
        let err = key.set_min_encryption_version(version, soon()).await.unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, BackendError::Rejected(_)), "{message}");
        assert!(
            message.contains(&format!("min_encryption_version {version}"))
                && message.contains("min_decryption_version"),
            "{message}"
        );
    }
    let err = key.set_min_encryption_version(2, soon()).await.unwrap_err().to_string();
    assert!(err.contains("must be greater than or equal to min decryption version of 3"), "{err}");
    assert_eq!(floors().await, (3, 3), "a refused pin changes nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pinned_and_retired_floors_refuse_older_versions_without_blaming_vault() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    bao.post("transit/keys/pinned", json!({ "type": "ecdsa-p256" })).await;
    bao.post("transit/keys/pinned/rotate", json!({})).await;
    bao.post("transit/keys/pinned/rotate", json!({})).await;
    bao.post("transit/keys/pinned/config", json!({ "min_encryption_version": 2 })).await;
    let (store, metrics) = store(&bao, dir.path(), "pinned", KeyType::EcdsaP256);
    let metadata = store.metadata(soon()).await.unwrap();
    assert_eq!((metadata.key.min_encryption_version, metadata.key.latest), (2, 3));
    assert_eq!(metadata.public_keys.len(), 3, "a pinned version publishes the older ones still");

    let kid = |v: u64| metadata.public_keys[&v].kid();
    let err = store.sign(1, jwt::Alg::Es256, &signing_input(KeyType::EcdsaP256, &kid(1)), soon()).await;
    assert!(matches!(err, Err(BackendError::Retired(_))), "{err:?}");
    // Transit answered that with HTTP 500; the address must not count as failed for it.
    let errors = metrics.address_errors.get_or_create(&AddressLabels { address: bao.addr.clone() }).get();
    assert_eq!(errors, 0, "a refused version is not an outage");
    for version in [2, 3] {
        store
            .sign(version, jwt::Alg::Es256, &signing_input(KeyType::EcdsaP256, &kid(version)), soon())
            .await
            .unwrap();
    }
    let err = store.sign(9, jwt::Alg::Es256, &signing_input(KeyType::EcdsaP256, "kid"), soon()).await;
    assert!(matches!(err, Err(BackendError::KeyNotFound(_))), "{err:?}");

    // Retired versions are no longer published, and never signed with.
    bao.post("transit/keys/pinned/config", json!({ "min_decryption_version": 2 })).await;
    let metadata = store.metadata(soon()).await.unwrap();
    assert_eq!(metadata.key.min_decryption_version, 2);
    assert_eq!(metadata.public_keys.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    // NB: Transit lists only the versions from min_decryption_version up (keysutil keeps the
    // older ones in its archive), as for the plugin's key.
    assert_eq!(metadata.key.versions.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    let err = store.sign(1, jwt::Alg::Es256, &signing_input(KeyType::EcdsaP256, &kid(1)), soon()).await;
    assert!(matches!(err, Err(BackendError::Retired(_))), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_key_is_never_signed_with_under_the_old_kid() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    bao.post("transit/keys/again", json!({ "type": "ecdsa-p256" })).await;
    let (store, _) = store(&bao, dir.path(), "again", KeyType::EcdsaP256);
    let old = store.metadata(soon()).await.unwrap().public_keys[&1].kid();
    let input = signing_input(KeyType::EcdsaP256, &old);
    store.sign(1, jwt::Alg::Es256, &input, soon()).await.unwrap();

    bao.post("transit/keys/again/config", json!({ "deletion_allowed": true })).await;
    bao.delete("transit/keys/again").await;
    bao.post("transit/keys/again", json!({ "type": "ecdsa-p256" })).await;
    // Before a metadata read sees the new key: Transit's signature fails the check against the
    // published key.
    let err = store.sign(1, jwt::Alg::Es256, &input, soon()).await;
    assert!(matches!(err, Err(BackendError::Protocol(ref m)) if m.contains("does not verify")), "{err:?}");
    // After: the header's kid no longer names version 1's key.
    let new = store.metadata(soon()).await.unwrap().public_keys[&1].kid();
    assert_ne!(new, old);
    let err = store.sign(1, jwt::Alg::Es256, &input, soon()).await;
    assert!(matches!(err, Err(BackendError::KeyNotFound(ref m)) if m.contains(&old)), "{err:?}");
    store.sign(1, jwt::Alg::Es256, &signing_input(KeyType::EcdsaP256, &new), soon()).await.unwrap();
}
