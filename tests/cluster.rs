//! Against a real cluster (see deploy/controller/README.md); never in CI.

use kmsgate_testkit as common;

#[test]
#[ignore = "needs cluster (KUBECONFIG, the RotationPolicy CRD and a policy named kmsgate)"]
fn reencrypt_dry_run_lists_every_secret() {
    let out = common::kmsgate_command().args(["reencrypt", "--dry-run"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("WOULD-WRITE"), "{stdout}");
}

#[test]
#[ignore = "needs cluster (KUBECONFIG, KMSGATE_CONFIG with a Vault identity that may read the key)"]
fn rotate_dry_run_shows_the_plan() {
    let mut command = common::kmsgate_command();
    if let Some(config) = std::env::var_os("KMSGATE_CONFIG") {
        command.arg("--config").arg(config);
    }
    let out = command.args(["rotate", "--dry-run"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("would rotate version"), "{stdout}");
}
