//! The shipped examples stay valid, and the shipped EncryptionConfiguration is what the command prints.

use std::{collections::HashMap, path::Path, process::Command};

use kmsgate::config::{BackendConfig, Config, Role};

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
fn shipped_encryption_configuration_matches_the_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_kmsgate"))
        .args(["encryption-config", "--config", "examples/vault.toml"])
        .env_remove("KMSGATE_PLUGIN_SOCKET")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shipped = std::fs::read_to_string("deploy/apiserver/encryption-configuration.yaml").unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        shipped,
        "regenerate with: kmsgate encryption-config --config examples/vault.toml"
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
    let out = Command::new(env!("CARGO_BIN_EXE_kmsgate")).arg("crd").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shipped = std::fs::read_to_string("deploy/controller/crd.yaml").unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        shipped,
        "regenerate with: kmsgate crd > deploy/controller/crd.yaml"
    );
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
fn shipped_rotation_policy_is_valid() {
    let text = std::fs::read_to_string("deploy/controller/rotationpolicy.yaml").unwrap();
    let policy: kmsgate::crd::rotation::RotationPolicy = serde_saphyr::from_str(&text).unwrap();
    kmsgate::crd::rotation::parse(&policy.spec).unwrap();
}
