//! deploy/vault against a real OpenBao: setup.sh makes what it says, and each identity is
//! refused what it must not do. The plugin and the signer's store run on the credentials
//! setup.sh wrote, so their policies are proven sufficient as well as narrow.

use kmsgate_testkit as common;

use std::{path::Path, process::Command, time::Duration};

use common::{Bao, Plugin, bao_binary};
use kmsgate::{
    backend::SigningBackend,
    config::{VaultAuth, VaultClientConfig},
    jwt::{self, KeyType},
    metrics::VaultMetrics,
    transit::{SigningTransit, VaultClient},
};
use serde_json::{Value, json};
use tokio::time::Instant;

fn script(bao: &Bao, name: &str, args: &[&str], home: &Path) -> String {
    let out = Command::new("bash")
        .arg(format!("deploy/vault/{name}"))
        .args(args)
        .env("VAULT_ADDR", &bao.addr)
        .env("VAULT_TOKEN", &bao.token)
        .env("BAO", bao_binary())
        .env("HOME", home)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} {args:?}: {text}");
    text
}

/// A raw call as `token`: the HTTP status and the body.
async fn call(bao: &Bao, token: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let client = reqwest::Client::new();
    let url = format!("{}/v1/{path}", bao.addr);
    let request = match method {
        "GET" => client.get(url),
        "LIST" => client.request(reqwest::Method::from_bytes(b"LIST").unwrap(), url),
        "DELETE" => client.delete(url),
        _ => client.post(url).json(&body),
    };
    let response = request.header("X-Vault-Token", token).send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn login(bao: &Bao, dir: &Path) -> (u16, Value) {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap().trim().to_owned();
    call(
        bao,
        "",
        "POST",
        "auth/approle/login",
        json!({"role_id": read("role_id"), "secret_id": read("secret_id")}),
    )
    .await
}

fn ok(status: u16) -> bool {
    (200..300).contains(&status)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_plugin_identity_wraps_and_unwraps_and_nothing_else() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("creds");
    let out_arg = out.display().to_string();
    let args = ["--out", out_arg.as_str(), "cp-1=127.0.0.1", "cp-2=192.0.2.10"];
    script(&bao, "setup.sh", &args, dir.path());
    // Safe to run again (mount, key, roles exist).
    script(&bao, "setup.sh", &args, dir.path());

    let (status, answer) = login(&bao, &out.join("cp-1")).await;
    assert!(ok(status), "{answer}");
    assert_eq!(answer["auth"]["policies"], json!(["kmsgate-plugin"]), "no default policy");
    let token = answer["auth"]["client_token"].as_str().unwrap().to_owned();
    let t = token.as_str();
    let (status, sealed) =
        call(&bao, t, "POST", "transit/encrypt/kmsgate", json!({"plaintext": "aGVsbG8="})).await;
    assert!(ok(status), "{sealed}");
    let ciphertext = sealed["data"]["ciphertext"].clone();
    let (status, opened) =
        call(&bao, t, "POST", "transit/decrypt/kmsgate", json!({"ciphertext": ciphertext})).await;
    assert_eq!((status, opened["data"]["plaintext"].clone()), (200, json!("aGVsbG8=")));
    assert!(ok(call(&bao, t, "GET", "transit/keys/kmsgate", Value::Null).await.0));
    assert!(ok(call(&bao, t, "POST", "auth/token/renew-self", json!({})).await.0));
    assert!(ok(call(&bao, t, "GET", "auth/token/lookup-self", Value::Null).await.0));
    for (method, path, body) in [
        ("POST", "transit/keys/kmsgate/rotate", json!({})),
        ("POST", "transit/keys/kmsgate/config", json!({"min_decryption_version": 1})),
        ("POST", "transit/keys/kmsgate/config", json!({"deletion_allowed": true})),
        ("DELETE", "transit/keys/kmsgate", Value::Null),
        ("GET", "transit/export/encryption-key/kmsgate", Value::Null),
        ("LIST", "transit/keys", Value::Null),
        ("POST", "transit/keys/other", json!({})),
        ("POST", "transit/encrypt/other", json!({"plaintext": "aGVsbG8="})),
        ("GET", "sys/policies/acl/kmsgate-plugin", Value::Null),
        ("POST", "auth/token/create", json!({})),
    ] {
        let (status, answer) = call(&bao, t, method, path, body).await;
        assert_eq!(status, 403, "the plugin must not {method} {path}: {answer}");
    }

    // cp-2's credentials only work from cp-2's address.
    let (status, answer) = login(&bao, &out.join("cp-2")).await;
    assert!(!ok(status) && answer.to_string().contains("CIDR"), "{status} {answer}");

    // The real plugin runs on exactly these credentials and this policy.
    let plugin_dir = tempfile::tempdir().unwrap();
    let settings: Vec<(String, String)> = [
        ("backend.kind", "vault".to_owned()),
        ("backend.identity", "deploy-test".to_owned()),
        ("vault.addresses", bao.addr.clone()),
        ("vault.auth", "approle".to_owned()),
        ("vault.role_id_file", out.join("cp-1/role_id").display().to_string()),
        ("vault.secret_id_file", out.join("cp-1/secret_id").display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .chain(common::fast_probes())
    .collect();
    let plugin = Plugin::start(plugin_dir.path(), &settings).await;
    let key_id = plugin.wait_healthy().await;
    assert!(key_id.contains(":deploy-test:"), "{key_id}");
    let selftest =
        common::kmsgate_command().args(["selftest", "--socket"]).arg(&plugin.socket).output().unwrap();
    assert!(selftest.status.success(), "{}", String::from_utf8_lossy(&selftest.stdout));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_identity_rotates_and_retires_and_nothing_else() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    script(&bao, "setup.sh", &[], dir.path());
    let created = bao
        .post(
            "auth/token/create",
            json!({"policies": ["kmsgate-controller"], "no_default_policy": true, "ttl": "1h"}),
        )
        .await;
    let token = created["auth"]["client_token"].as_str().unwrap().to_owned();
    let t = token.as_str();
    assert!(ok(call(&bao, t, "GET", "transit/keys/kmsgate", Value::Null).await.0));
    assert!(ok(call(&bao, t, "POST", "transit/keys/kmsgate/rotate", json!({})).await.0));
    let (status, answer) =
        call(&bao, t, "POST", "transit/keys/kmsgate/config", json!({"min_decryption_version": 2})).await;
    assert!(ok(status), "{answer}");
    assert_eq!(bao.get("transit/keys/kmsgate").await["data"]["min_decryption_version"], 2);
    assert!(ok(call(&bao, t, "POST", "auth/token/renew-self", json!({})).await.0));
    for (method, path, body) in [
        ("POST", "transit/keys/kmsgate/config", json!({"deletion_allowed": true})),
        ("POST", "transit/keys/kmsgate/config", json!({"exportable": true})),
        (
            "POST",
            "transit/keys/kmsgate/config",
            json!({"min_decryption_version": 2, "allow_plaintext_backup": true}),
        ),
        ("POST", "transit/keys/kmsgate/config", json!({"auto_rotate_period": "1h"})),
        ("POST", "transit/encrypt/kmsgate", json!({"plaintext": "aGVsbG8="})),
        ("POST", "transit/decrypt/kmsgate", json!({"ciphertext": "vault:v1:AAAA"})),
        ("DELETE", "transit/keys/kmsgate", Value::Null),
        ("GET", "transit/backup/kmsgate", Value::Null),
        ("POST", "transit/keys/kmsgate/trim", json!({"min_available_version": 2})),
    ] {
        let (status, answer) = call(&bao, t, method, path, body).await;
        assert_eq!(status, 403, "the controller must not {method} {path} {answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_secret_id_rotates_without_a_gap_and_a_custom_key_gets_its_own_policy() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("creds");
    let out_arg = out.display().to_string();
    script(
        &bao,
        "setup.sh",
        &["--out", &out_arg, "--mount", "kms", "--key", "k8s", "cp-1=127.0.0.1"],
        dir.path(),
    );
    let node = out.join("cp-1");
    let old = std::fs::read_to_string(node.join("secret_id")).unwrap();

    script(&bao, "rotate-secret-id.sh", &["cp-1", &out_arg], dir.path());
    let new = std::fs::read_to_string(node.join("secret_id")).unwrap();
    assert_ne!(old, new);
    let (status, answer) = login(&bao, &node).await;
    assert!(ok(status), "the new secret_id works: {answer}");
    std::fs::write(dir.path().join("old_secret_id"), &old).unwrap();
    std::fs::copy(node.join("role_id"), dir.path().join("role_id")).unwrap();
    std::fs::rename(dir.path().join("old_secret_id"), dir.path().join("secret_id")).unwrap();
    assert!(ok(login(&bao, dir.path()).await.0), "the old one still works until --finish");

    let finished = script(&bao, "rotate-secret-id.sh", &["--finish", "cp-1", &out_arg], dir.path());
    assert!(finished.contains("destroyed 1 old"), "{finished}");
    assert!(!ok(login(&bao, dir.path()).await.0), "the old secret_id is gone");
    let (status, answer) = login(&bao, &node).await;
    assert!(ok(status), "{answer}");

    // The policy follows --mount and --key.
    let token = answer["auth"]["client_token"].as_str().unwrap().to_owned();
    let (status, sealed) =
        call(&bao, &token, "POST", "kms/encrypt/k8s", json!({"plaintext": "aGVsbG8="})).await;
    assert!(ok(status), "{sealed}");
    assert_eq!(
        call(&bao, &token, "POST", "transit/encrypt/kmsgate", json!({"plaintext": "aGVsbG8="})).await.0,
        403
    );
}

/// `bao … list` keeps writing after the line grep wants; under `pipefail` the writer's SIGPIPE
/// once made setup.sh believe Transit was missing and enable it a second time, which Vault
/// refuses. A fake `bao` with a long listing makes that race certain.
#[test]
fn setup_sees_existing_mounts_however_long_the_listing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls");
    let fake = dir.path().join("bao");
    std::fs::write(
        &fake,
        r#"#!/usr/bin/env bash
echo "$*" >> "$LOG"
listing() { printf '{"%s/": {},\n' "$1"; head -c 4000000 /dev/zero | tr '\0' ' '; echo '}'; }
case "$1 $2" in
  "secrets list") listing transit ;;
  "auth list") listing approle; echo '"kubernetes/"' ;;
  "secrets enable"|"auth enable") echo "path is already in use" >&2; exit 2 ;;
  "policy write") cat >/dev/null ;;
  *) echo '{"secret_id": "s", "secret_id_accessor": "a"}' ;;
esac
"#,
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, "").unwrap();
    let out = Command::new("bash")
        .arg("deploy/vault/setup.sh")
        .args(["--out", &dir.path().join("creds").display().to_string(), "cp-1=127.0.0.1"])
        .args(["--kubernetes-host", "https://127.0.0.1:6443", "--kubernetes-ca"])
        .arg(&ca)
        .env("VAULT_ADDR", "http://127.0.0.1:1")
        .env("VAULT_TOKEN", "admin")
        .env("BAO", &fake)
        .env("LOG", &log)
        .output()
        .unwrap();
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(out.status.success(), "{}{calls}", String::from_utf8_lossy(&out.stderr));
    assert!(!calls.contains("enable"), "{calls}");
}

/// A sign request as the signer makes it (facts/externaljwt.md 3.2).
fn sign_body() -> Value {
    json!({
        "input": "aGVhZGVyLmNsYWltcw==",
        "key_version": 1,
        "hash_algorithm": "sha2-256",
        "marshaling_algorithm": "jws",
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn the_signer_identity_signs_and_reads_its_key_and_nothing_else() {
    let bao = Bao::start().await;
    bao.post("transit/keys/other-signer", json!({"type": "ecdsa-p256"})).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("creds");
    let out_arg = out.display().to_string();
    let args = ["--out", out_arg.as_str(), "--signer", "cp-1=127.0.0.1"];
    let said = script(&bao, "setup.sh", &args, dir.path());
    assert!(said.contains("signing key kmsgate-signer (ecdsa-p256)"), "{said}");
    // Safe to run again (the key, the policy and the roles exist).
    script(&bao, "setup.sh", &args, dir.path());
    assert_eq!(bao.get("transit/keys/kmsgate-signer").await["data"]["type"], "ecdsa-p256");

    let (status, answer) = login(&bao, &out.join("cp-1/signer")).await;
    assert!(ok(status), "{answer}");
    assert_eq!(answer["auth"]["policies"], json!(["kmsgate-signer"]), "no default policy");
    let token = answer["auth"]["client_token"].as_str().unwrap().to_owned();
    let t = token.as_str();
    let (status, signed) = call(&bao, t, "POST", "transit/sign/kmsgate-signer", sign_body()).await;
    assert!(ok(status), "{signed}");
    assert!(signed["data"]["signature"].as_str().unwrap().starts_with("vault:v1:"));
    let (status, read) = call(&bao, t, "GET", "transit/keys/kmsgate-signer", Value::Null).await;
    assert!(ok(status) && read["data"]["keys"]["1"]["public_key"].is_string(), "{read}");
    assert!(ok(call(&bao, t, "POST", "auth/token/renew-self", json!({})).await.0));
    assert!(ok(call(&bao, t, "GET", "auth/token/lookup-self", Value::Null).await.0));
    let other_sign = sign_body();
    for (method, path, body) in [
        ("POST", "transit/keys/kmsgate-signer/rotate", json!({})),
        ("POST", "transit/keys/kmsgate-signer/config", json!({"min_encryption_version": 1})),
        ("POST", "transit/keys/kmsgate-signer/config", json!({"deletion_allowed": true})),
        ("POST", "transit/keys/kmsgate-signer/trim", json!({"min_available_version": 1})),
        ("DELETE", "transit/keys/kmsgate-signer", Value::Null),
        ("GET", "transit/export/public-key/kmsgate-signer", Value::Null),
        ("GET", "transit/backup/kmsgate-signer", Value::Null),
        ("POST", "transit/sign/kmsgate-signer/sha2-256", other_sign.clone()),
        ("POST", "transit/verify/kmsgate-signer", json!({"input": "eA==", "signature": "vault:v1:AA"})),
        ("POST", "transit/hmac/kmsgate-signer", json!({"input": "eA=="})),
        ("POST", "transit/sign/other-signer", other_sign),
        ("GET", "transit/keys/other-signer", Value::Null),
        ("GET", "transit/keys/kmsgate", Value::Null),
        ("POST", "transit/encrypt/kmsgate", json!({"plaintext": "aGVsbG8="})),
        ("POST", "transit/decrypt/kmsgate", json!({"ciphertext": "vault:v1:AAAA"})),
        ("POST", "transit/keys/new-key", json!({"type": "ecdsa-p256"})),
        ("LIST", "transit/keys", Value::Null),
        ("GET", "sys/policies/acl/kmsgate-signer", Value::Null),
        ("POST", "auth/token/create", json!({})),
    ] {
        let (status, answer) = call(&bao, t, method, path, body).await;
        assert_eq!(status, 403, "the signer must not {method} {path}: {answer}");
    }

    // The plugin's identity on the same node cannot sign tokens.
    let (status, answer) = login(&bao, &out.join("cp-1")).await;
    assert!(ok(status), "{answer}");
    let plugin = answer["auth"]["client_token"].as_str().unwrap().to_owned();
    assert_eq!(call(&bao, &plugin, "POST", "transit/sign/kmsgate-signer", sign_body()).await.0, 403);

    // The real signing store runs on exactly these credentials and this policy.
    let settings = VaultClientConfig {
        auth: VaultAuth::AppRole {
            mount: "approle".into(),
            role_id_file: out.join("cp-1/signer/role_id"),
            secret_id_file: out.join("cp-1/signer/secret_id"),
        },
        ..bao.vault_settings(dir.path())
    };
    let client = VaultClient::new(&settings, VaultMetrics::default()).unwrap();
    let store =
        SigningTransit::new(client, "deploy-test", "", "transit", "kmsgate-signer", KeyType::EcdsaP256);
    let deadline = Instant::now() + Duration::from_secs(10);
    let metadata = store.metadata(deadline).await.unwrap();
    let kid = metadata.public_keys[&1].kid();
    let input = jwt::signing_input(&jwt::header(jwt::Alg::Es256, &kid).unwrap(), "e30");
    assert_eq!(store.sign(1, jwt::Alg::Es256, &input, deadline).await.unwrap().len(), 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_controller_rotates_pins_and_retires_the_signing_key_and_nothing_else() {
    let bao = Bao::start().await;
    bao.post("transit/keys/other-signer", json!({"type": "ecdsa-p256"})).await;
    let dir = tempfile::tempdir().unwrap();
    let said = script(&bao, "setup.sh", &["--signer-key", "sa", "--signer-type", "rsa-2048"], dir.path());
    assert!(said.contains("kmsgate-controller-signer"), "{said}");
    let created = bao
        .post(
            "auth/token/create",
            json!({"policies": ["kmsgate-controller-signer"], "no_default_policy": true, "ttl": "1h"}),
        )
        .await;
    let token = created["auth"]["client_token"].as_str().unwrap().to_owned();
    let t = token.as_str();
    // The rotation's own calls, in its order: read, pin, rotate, switch, retire, unpin.
    for (method, path, body) in [
        ("GET", "transit/keys/sa", Value::Null),
        ("POST", "transit/keys/sa/config", json!({"min_encryption_version": 1})),
        ("POST", "transit/keys/sa/rotate", json!({})),
        ("POST", "transit/keys/sa/config", json!({"min_encryption_version": 2})),
        ("POST", "transit/keys/sa/config", json!({"min_decryption_version": 2})),
        ("POST", "transit/keys/sa/config", json!({"min_encryption_version": 0})),
    ] {
        let (status, answer) = call(&bao, t, method, path, body).await;
        assert!(ok(status), "the controller must {method} {path}: {answer}");
    }
    let key = bao.get("transit/keys/sa").await;
    assert_eq!(
        (&key["data"]["latest_version"], &key["data"]["min_decryption_version"]),
        (&json!(2), &json!(2))
    );
    let mut sign = sign_body();
    sign["key_version"] = 2.into();
    for (method, path, body) in [
        ("POST", "transit/keys/sa/config", json!({"deletion_allowed": true})),
        ("POST", "transit/keys/sa/config", json!({"exportable": true})),
        ("POST", "transit/keys/sa/config", json!({"min_encryption_version": 2, "auto_rotate_period": "1h"})),
        ("POST", "transit/keys/sa/trim", json!({"min_available_version": 2})),
        ("DELETE", "transit/keys/sa", Value::Null),
        ("GET", "transit/backup/sa", Value::Null),
        ("GET", "transit/export/public-key/sa", Value::Null),
        ("POST", "transit/sign/sa", sign.clone()),
        ("POST", "transit/keys/other-signer/rotate", json!({})),
        ("GET", "transit/keys/other-signer", Value::Null),
        ("POST", "transit/keys/kmsgate-signer/rotate", json!({})),
        ("POST", "transit/keys/kmsgate/rotate", json!({})),
        ("POST", "transit/encrypt/kmsgate", json!({"plaintext": "aGVsbG8="})),
        ("POST", "transit/keys/new-key", json!({"type": "ecdsa-p256"})),
        ("LIST", "transit/keys", Value::Null),
        ("GET", "sys/policies/acl/kmsgate-controller-signer", Value::Null),
    ] {
        let (status, answer) = call(&bao, t, method, path, body).await;
        assert_eq!(status, 403, "the controller must not {method} {path}: {answer}");
    }
    // Without --signer there is no such policy: the controller gets no right on a signing key.
    let bare = Bao::start().await;
    script(&bare, "setup.sh", &[], dir.path());
    let (status, _) =
        call(&bare, &bare.token, "GET", "sys/policies/acl/kmsgate-controller-signer", Value::Null).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_makes_the_signer_key_of_the_asked_type_and_refuses_another_by_name() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("creds");
    let out_arg = out.display().to_string();
    let args = [
        "--out",
        &out_arg,
        "--mount",
        "kms",
        "--signer-key",
        "sa",
        "--signer-type",
        "rsa-2048",
        "cp-1=127.0.0.1",
    ];
    script(&bao, "setup.sh", &args, dir.path());
    assert_eq!(bao.get("kms/keys/sa").await["data"]["type"], "rsa-2048");
    let (status, answer) = login(&bao, &out.join("cp-1/signer")).await;
    assert!(ok(status), "{answer}");
    let token = answer["auth"]["client_token"].as_str().unwrap().to_owned();
    let mut body = sign_body();
    body["signature_algorithm"] = "pkcs1v15".into();
    let (status, signed) = call(&bao, &token, "POST", "kms/sign/sa", body.clone()).await;
    assert!(ok(status), "the policy follows --mount and --signer-key: {signed}");
    assert_eq!(call(&bao, &token, "POST", "transit/sign/kmsgate-signer", body).await.0, 403);

    // The signer's own secret_id rotates like the plugin's, in its own directory.
    let node = out.join("cp-1/signer");
    let old = std::fs::read_to_string(node.join("secret_id")).unwrap();
    script(&bao, "rotate-secret-id.sh", &["--signer", "cp-1", &out_arg], dir.path());
    assert_ne!(std::fs::read_to_string(node.join("secret_id")).unwrap(), old);
    let finished =
        script(&bao, "rotate-secret-id.sh", &["--finish", "--signer", "cp-1", &out_arg], dir.path());
    assert!(finished.contains("destroyed 1 old"), "{finished}");
    assert!(ok(login(&bao, &node).await.0));
    assert!(ok(login(&bao, &out.join("cp-1")).await.0), "the plugin's secret_id is untouched");

    // An existing key of another type, and a type kube-apiserver cannot verify, are refused.
    for (extra, named) in
        [(["--signer-type", "ecdsa-p256"], "type rsa-2048"), (["--signer-type", "ed25519"], "ed25519")]
    {
        let mut args = vec!["--out", &out_arg, "--mount", "kms", "--signer-key", "sa"];
        args.extend(extra);
        let out = Command::new("bash")
            .arg("deploy/vault/setup.sh")
            .args(&args)
            .env("VAULT_ADDR", &bao.addr)
            .env("VAULT_TOKEN", &bao.token)
            .env("BAO", bao_binary())
            .env("HOME", dir.path())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains(named), "{said}");
    }
}
