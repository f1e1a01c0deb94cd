//! The shipped examples stay valid, and the shipped EncryptionConfiguration is what the command prints.

use kmsgate_testkit as common;

use std::{collections::HashMap, path::Path, process::Command, time::Duration};

use common::{Bao, eventually, kmsgate_command};
use kmsgate::config::{BackendConfig, Config, Role, VaultAuth};

#[test]
fn example_configs_load() {
    let env = HashMap::new();
    let local = Config::load(Some(Path::new("examples/local.toml")), &[], &env).unwrap();
    assert!(matches!(local.backend, BackendConfig::Local { .. }));
    let vault = Config::load(Some(Path::new("examples/vault.toml")), &[], &env).unwrap();
    let BackendConfig::Vault(v) = vault.backend else { panic!("vault example must use the vault backend") };
    assert_eq!(v.identity, "prod-vault");
    assert_eq!(v.client.addresses.len(), 2);
    let controller =
        Config::load_as(Role::Controller, Some(Path::new("examples/controller.toml")), &[], &env).unwrap();
    assert_eq!(controller.controller.policy, "kmsgate");
    let refused = Config::load(Some(Path::new("examples/controller.toml")), &[], &env);
    assert!(refused.is_err(), "the plugin must refuse the controller's kubernetes auth");
}

#[test]
fn the_production_template_is_https_approle_and_a_ca() {
    let vault = Config::load(Some(Path::new("examples/vault.toml")), &[], &HashMap::new()).unwrap();
    let BackendConfig::Vault(v) = vault.backend else { panic!("vault example must use the vault backend") };
    assert!(v.client.addresses.iter().all(|a| a.starts_with("https://")), "{:?}", v.client.addresses);
    assert!(matches!(v.client.auth, VaultAuth::AppRole { .. }), "{:?}", v.client.auth);
    assert!(v.client.tls.ca.is_some());
}

/// `examples/local.toml` as shipped, on a host where neither its keyring's nor its socket's
/// directory exists yet (the paths move under a temporary root, so the test needs no root).
#[tokio::test(flavor = "multi_thread")]
async fn the_local_example_starts_on_a_fresh_host() {
    let root = tempfile::tempdir().unwrap();
    let keyring = root.path().join("var/lib/kmsgate/keyring.json");
    let socket = root.path().join("run/kmsgate/kms.sock");
    let paths = [
        "--keyring".to_owned(),
        keyring.display().to_string(),
        "--socket".to_owned(),
        socket.display().to_string(),
    ];
    let log = root.path().join("plugin.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut plugin = kmsgate_command()
        .args(["plugin", "--config", "examples/local.toml", "--set", "http.listen=off"])
        .args(&paths)
        .stderr(log_file.try_clone().unwrap())
        .stdout(log_file)
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), "the plugin socket appears", async || {
        if let Some(status) = plugin.try_wait().unwrap() {
            panic!("plugin exited with {status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })
    .await;
    let out = kmsgate_command()
        .args(["selftest", "--config", "examples/local.toml"])
        .args(&paths[2..])
        .output()
        .unwrap();
    let _ = plugin.kill();
    let _ = plugin.wait();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777
    };
    assert_eq!(mode(keyring.parent().unwrap()), 0o700);
    assert_eq!(mode(&keyring), 0o600);
}

/// The README's dev OpenBao path with the example as shipped: only the Vault address and the
/// token file change (and where it listens, so parallel test runs do not collide on one port).
#[tokio::test(flavor = "multi_thread")]
async fn the_dev_openbao_example_passes_the_selftest() {
    let bao = Bao::start().await;
    // As the README: the shipped policy, and a token with only that policy.
    let policy = std::fs::read_to_string("deploy/vault/plugin-policy.hcl").unwrap();
    bao.post("sys/policies/acl/kmsgate-plugin", serde_json::json!({ "policy": policy })).await;
    let created = bao.post("auth/token/create", serde_json::json!({"policies": ["kmsgate-plugin"]})).await;
    let token = created["auth"]["client_token"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    // NB: a directory that does not exist yet, as /tmp/kmsgate-dev on a fresh host.
    let socket = dir.path().join("kmsgate-dev/kms.sock");
    let port = common::free_port();
    let set = [
        format!("vault.addresses={}", bao.addr),
        format!("vault.token_file={}", token_file.display()),
        format!("plugin.socket={}", socket.display()),
        format!("http.listen=127.0.0.1:{port}"),
    ];
    let log = dir.path().join("plugin.log");
    let mut command = kmsgate_command();
    command.args(["plugin", "--config", "examples/dev-openbao.toml"]);
    for s in &set {
        command.args(["--set", s]);
    }
    let log_file = std::fs::File::create(&log).unwrap();
    let mut plugin = command.stderr(log_file.try_clone().unwrap()).stdout(log_file).spawn().unwrap();
    eventually(Duration::from_secs(10), "the plugin socket appears", async || {
        if let Some(status) = plugin.try_wait().unwrap() {
            panic!("plugin exited with {status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })
    .await;
    // `kmsgate selftest --config` finds the socket in the same file.
    let out = kmsgate_command()
        .args(["selftest", "--config", "examples/dev-openbao.toml", "--set"])
        .arg(format!("plugin.socket={}", socket.display()))
        .output()
        .unwrap();
    let _ = plugin.kill();
    let _ = plugin.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}\nplugin log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(stdout.contains("selftest: 7 passed, 0 failed"), "{stdout}");
    assert!(!std::fs::read_to_string(&log).unwrap().contains(&token), "the token never reaches the log");
}

/// `kmsgate <args>` succeeds and prints exactly the file `shipped`.
fn assert_prints_shipped(args: &[&str], shipped: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_kmsgate"))
        .args(args)
        .env_remove("KMSGATE_PLUGIN_SOCKET")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        std::fs::read_to_string(shipped).unwrap(),
        "regenerate with: kmsgate {} > {shipped}",
        args.join(" ")
    );
}

#[test]
fn shipped_encryption_configuration_matches_the_command() {
    assert_prints_shipped(
        &["encryption-config", "--config", "examples/vault.toml"],
        "deploy/apiserver/encryption-configuration.yaml",
    );
}

#[test]
fn readme_documents_every_setting() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    for setting in kmsgate::config::SETTINGS {
        let name = setting.name;
        assert!(readme.contains(&format!("`{name}`")), "README.md does not document `{name}`");
    }
}

#[test]
fn shipped_crd_matches_the_command() {
    assert_prints_shipped(&["crd"], "deploy/controller/crd.yaml");
}

#[test]
fn shipped_token_policy_is_valid() {
    let text = std::fs::read_to_string("deploy/controller/tokenpolicy.yaml").unwrap();
    let policy: kmsgate::crd::tokens::TokenPolicy = serde_saphyr::from_str(&text).unwrap();
    kmsgate::crd::tokens::parse(&policy.spec).unwrap();
    assert!(policy.spec.legacy.enabled && !policy.spec.managed.enabled);
    assert!(policy.spec.managed.deny_service_accounts.contains(&"kmsgate/*".to_owned()));
}

#[test]
fn shipped_signing_key_policy_is_valid() {
    let text = std::fs::read_to_string("deploy/controller/signingkeypolicy.yaml").unwrap();
    let policy: kmsgate::crd::signing::SigningKeyPolicy = serde_saphyr::from_str(&text).unwrap();
    let plan = kmsgate::crd::signing::parse(&policy.spec).unwrap();
    assert!(matches!(plan.signers, kmsgate::crd::signing::SignerSource::Discovery(ref d) if d.port == 8789));
}

#[test]
fn shipped_rotation_policy_is_valid() {
    let text = std::fs::read_to_string("deploy/controller/rotationpolicy.yaml").unwrap();
    let policy: kmsgate::crd::rotation::RotationPolicy = serde_saphyr::from_str(&text).unwrap();
    kmsgate::crd::rotation::parse(&policy.spec).unwrap();
}
