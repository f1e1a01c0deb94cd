//! `kmsgate signer keyring ...`: the shipped commands that create, rotate, list and set the floors
//! of the signer's local signing keyring.

use std::{path::Path, process::Output};

fn kmsgate(keyring: &Path, args: &[&str]) -> Output {
    let mut command = kmsgate_testkit::kmsgate_command();
    command.args(["signer", "keyring"]).args(args).arg("--keyring").arg(keyring);
    command.output().unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn init_rotate_floors_and_list_manage_the_signing_keyring() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("signer-keyring.json");

    let created = stdout(&kmsgate(&keyring, &["init", "--identity", "node-a"]));
    assert!(created.contains("identity node-a"), "{created}");
    let again = kmsgate(&keyring, &["init"]);
    assert!(!again.status.success(), "init never overwrites");

    let rotated = stdout(&kmsgate(&keyring, &["rotate"]));
    assert!(rotated.contains("added version 2"), "{rotated}");

    let pinned = stdout(&kmsgate(&keyring, &["floors", "--min-encryption-version", "2"]));
    assert!(pinned.contains("min_encryption_version 2"), "{pinned}");
    let above = kmsgate(&keyring, &["floors", "--min-decryption-version", "3"]);
    assert!(!above.status.success());
    assert!(String::from_utf8_lossy(&above.stderr).contains("the latest version is 2"));

    let list = stdout(&kmsgate(&keyring, &["list"]));
    assert!(list.contains("min_decryption_version 1, min_encryption_version 2"), "{list}");
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&keyring).unwrap()).unwrap();
    let versions = file["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    let rows: Vec<&str> = list.lines().filter(|l| l.starts_with("1 ") || l.starts_with("2 ")).collect();
    assert_eq!(rows.len(), 2, "{list}");
    for version in versions {
        let pkcs8 = version["pkcs8"].as_str().unwrap();
        assert!(!list.contains(pkcs8) && !created.contains(pkcs8) && !rotated.contains(pkcs8));
    }
}

#[test]
fn signer_keyring_commands_refuse_the_vault_backend_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = kmsgate_testkit::kmsgate_command()
        .args(["signer", "keyring", "list", "--set", "backend.kind=vault", "--set", "signer.backend=vault"])
        .args(["--set", "vault.addresses=https://vault.example:8200", "--set", "signer.key=k"])
        .args(["--set", "backend.identity=prod", "--set", "vault.token_file=/nonexistent/token"])
        .args(["--set", &format!("signer.state_file={}", dir.path().join("keys.json").display())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("signer.backend = \"local\""));
}
