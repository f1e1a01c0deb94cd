//! The plugin on the embedded local keyring, its socket handling, and the command line.

use kmsgate_testkit as common;

use std::{os::unix::fs::PermissionsExt, time::Duration};

use common::Plugin;
use kmsgate::{
    config::SocketSpec,
    keyid::KeyId,
    proto::v2::{DecryptRequest, EncryptRequest},
    selftest,
};

fn kmsgate(args: &[&str]) -> std::process::Output {
    common::kmsgate_command().args(args).output().unwrap()
}

fn local(dir: &std::path::Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut settings = vec![
        ("local.keyring".to_owned(), dir.join("keyring.json").display().to_string()),
        ("plugin.poll_interval".to_owned(), "100ms".to_owned()),
    ];
    settings.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    settings
}

async fn run_selftest(socket: SocketSpec) -> selftest::Report {
    selftest::run(&selftest::Options {
        socket,
        provider: "kmsgate".into(),
        timeout: Duration::from_secs(3),
        wait: Duration::from_secs(5),
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn local_keyring_round_trip_rotation_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut plugin = Plugin::start(dir.path(), &local(dir.path(), &[])).await;
    let v1 = plugin.wait_healthy().await;
    let keyring = dir.path().join("keyring.json");
    assert_eq!(std::fs::metadata(&keyring).unwrap().permissions().mode() & 0o777, 0o600, "created 0600");
    assert!(plugin.log_text().contains("NOT FOR PRODUCTION"));
    let report = run_selftest(SocketSpec::Path(plugin.socket.clone())).await;
    assert!(report.passed(), "{report}");

    let mut client = plugin.client().await;
    let request = |p: &[u8]| EncryptRequest { plaintext: p.to_vec(), uid: "u".into() };
    let old = client.encrypt(request(b"old-seed")).await.unwrap().into_inner();

    let out = kmsgate(&["keyring", "rotate", "--keyring", keyring.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, v2) = plugin.wait_status(|_, key_id| key_id != v1).await;
    assert_eq!(KeyId::parse(&v2).unwrap().version, 2);
    let new = client.encrypt(request(b"new-seed")).await.unwrap().into_inner();
    assert_eq!(new.key_id, v2);

    plugin.restart().await;
    let mut client = plugin.client().await;
    assert_eq!(plugin.wait_healthy().await, v2);
    for (sealed, want) in [(&old, &b"old-seed"[..]), (&new, &b"new-seed"[..])] {
        let plain = client
            .decrypt(DecryptRequest {
                ciphertext: sealed.ciphertext.clone(),
                uid: "u".into(),
                key_id: sealed.key_id.clone(),
                annotations: Default::default(),
            })
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(plain, want);
    }

    let list = kmsgate(&["keyring", "list", "--keyring", keyring.to_str().unwrap()]);
    let text = String::from_utf8(list.stdout).unwrap();
    assert!(text.contains(&v1) && text.contains(&v2), "{text}");
    assert!(!text.contains("material"));
    assert_eq!(plugin.stop(), Some(0));
    assert!(!plugin.socket.exists(), "socket removed on exit");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_version_v2beta1_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(dir.path(), &local(dir.path(), &[("plugin.status_version", "v2beta1")])).await;
    plugin.wait_healthy().await;
    let mut client = plugin.client().await;
    let status = client.status(kmsgate::proto::v2::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.version, "v2beta1");
}

#[tokio::test(flavor = "multi_thread")]
async fn abstract_socket_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("@kmsgate-test-{}", uuid::Uuid::new_v4().simple());
    let keyring = dir.path().join("keyring.json");
    let refused = kmsgate(&["plugin", "--socket", &name, "--keyring", keyring.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("allow_abstract_socket"));

    let mut command = common::kmsgate_command();
    command
        .args(["plugin", "--socket", &name, "--keyring", keyring.to_str().unwrap()])
        .args(["--set", "plugin.allow_abstract_socket=true", "--set", "http.listen=off"])
        .stderr(std::process::Stdio::null());
    // NB: killed on drop, so a selftest that never passes cannot leave the plugin running.
    let mut child = tokio::process::Command::from(command).kill_on_drop(true).spawn().unwrap();
    let socket = SocketSpec::parse(&name).unwrap();
    let report = common::eventually(Duration::from_secs(5), "the selftest passes", async || {
        let report = run_selftest(socket.clone()).await;
        if report.passed() { Ok(report) } else { Err(report.to_string()) }
    })
    .await;
    common::signal(child.id().unwrap(), "-TERM");
    assert_eq!(child.wait().await.unwrap().code(), Some(0));
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_mode_group_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let gid = std::fs::metadata(dir.path()).map(|m| std::os::unix::fs::MetadataExt::gid(&m)).unwrap();
    let gid_text = gid.to_string();
    let plugin = Plugin::start(
        dir.path(),
        &local(dir.path(), &[("plugin.socket_mode", "0660"), ("plugin.socket_group", &gid_text)]),
    )
    .await;
    let meta = std::fs::metadata(&plugin.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);

    // A second plugin on the same socket refuses to take it over.
    let keyring = dir.path().join("keyring.json");
    let socket = plugin.socket.to_str().unwrap();
    let second = kmsgate(&[
        "plugin",
        "--socket",
        socket,
        "--keyring",
        keyring.to_str().unwrap(),
        "--set",
        "http.listen=off",
    ]);
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use by a running process"));

    // A regular file is never replaced.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let refused = kmsgate(&[
        "plugin",
        "--socket",
        file.to_str().unwrap(),
        "--keyring",
        keyring.to_str().unwrap(),
        "--set",
        "http.listen=off",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_is_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a stale socket file is left behind");
    let plugin = Plugin::start(dir.path(), &local(dir.path(), &[])).await;
    plugin.wait_healthy().await;
    assert!(plugin.log_text().contains("removing stale socket"));
}

#[test]
fn command_line_errors_name_the_problem() {
    let out = kmsgate(&["plugin", "--set", "plugin.poll_interval=soon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugin.poll_interval"));
    let out = kmsgate(&["plugin", "--set", "nonsense"]);
    assert_eq!(out.status.code(), Some(2));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kmsgate.toml");
    std::fs::write(&config, "format = 1\n[plugin]\nsocket_mode = 0600\n").unwrap();
    let out = kmsgate(&["plugin", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("socket_mode"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let keyring = dir.path().join("keyring.json");
    let k = keyring.to_str().unwrap();
    assert!(kmsgate(&["keyring", "init", "--keyring", k, "--identity", "demo"]).status.success());
    let again = kmsgate(&["keyring", "init", "--keyring", k]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o644)).unwrap();
    let loose = kmsgate(&["keyring", "list", "--keyring", k]);
    assert!(String::from_utf8_lossy(&loose.stderr).contains("chmod 600"));

    let yaml =
        kmsgate(&["encryption-config", "--socket", "/var/run/kmsgate/kms.sock", "--name", "vault-kms"]);
    let text = String::from_utf8(yaml.stdout).unwrap();
    assert!(
        text.contains("endpoint: unix:///var/run/kmsgate/kms.sock") && text.contains("name: vault-kms"),
        "{text}"
    );
    let bad = kmsgate(&["encryption-config", "--name", "a:b"]);
    assert_eq!(bad.status.code(), Some(2));
}
