//! Every failure names its cause, once: an unhealthy plugin says why on Status, /status and in the
//! selftest, and each command exits by one rule (0 clean, 1 ran and found problems, 2 could not run).

use kmsgate_testkit as common;

use std::time::Duration;

use common::{Bao, Plugin, eventually, fast_probes, kmsgate_command};

fn settings(base: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut all = base;
    all.extend(fast_probes());
    all.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    all
}

/// Waits until /status shows a failed poll with an error, and returns that error.
async fn last_poll_error(plugin: &Plugin) -> String {
    eventually(Duration::from_secs(10), "/status shows the last poll error", async || {
        let status = plugin.status_json().await;
        match status["last_poll"]["error"].as_str() {
            Some(error) => Ok(error.to_owned()),
            None => Err(status.to_string()),
        }
    })
    .await
}

/// Runs `kmsgate selftest` against the plugin and returns (exit code, stdout + stderr).
fn selftest(plugin: &Plugin) -> (Option<i32>, String) {
    let out = kmsgate_command()
        .args(["selftest", "--wait", "1s", "--socket"])
        .arg(&plugin.socket)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unhealthy_plugin_names_the_cause_on_status_and_in_the_selftest() {
    let bao = Bao::start().await;
    let dir = tempfile::tempdir().unwrap();

    // A token Vault refuses.
    let bad_token = dir.path().join("bad-token");
    std::fs::write(&bad_token, "not-a-token\n").unwrap();
    let base = bao.plugin_settings(dir.path());
    let plugin = Plugin::start(
        dir.path(),
        &settings(base.clone(), &[("vault.token_file", bad_token.to_str().unwrap())]),
    )
    .await;
    let error = last_poll_error(&plugin).await;
    assert!(error.contains("permission denied"), "{error}");
    let (healthz, _) = plugin.wait_status(|healthz, _| healthz.contains("permission denied")).await;
    assert!(healthz.starts_with("no key version adopted yet"), "{healthz}");
    let (code, text) = selftest(&plugin);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("permission denied"), "the selftest names the cause: {text}");
    assert!(!text.contains("not-a-token"), "the token never appears: {text}");
    assert!(!plugin.log_text().contains("not-a-token"), "the token never appears in the log");
    drop(plugin);

    // A key that does not exist.
    let plugin = Plugin::start(dir.path(), &settings(base, &[("vault.key", "missing")])).await;
    let error = last_poll_error(&plugin).await;
    assert!(error.contains("missing"), "{error}");
    let (code, text) = selftest(&plugin);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&error), "the selftest carries the poll error {error:?}: {text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_vault_is_warned_once_then_counted() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t\n").unwrap();
    let port = common::free_port();
    let address = format!("http://127.0.0.1:{port}");
    let plugin = Plugin::start(
        dir.path(),
        &settings(
            vec![
                ("backend.kind".into(), "vault".into()),
                ("backend.identity".into(), "down".into()),
                ("vault.addresses".into(), address),
                ("vault.token_file".into(), token.display().to_string()),
            ],
            &[],
        ),
    )
    .await;
    let error = last_poll_error(&plugin).await;
    assert!(error.contains("refused") || error.contains("unreachable"), "{error}");
    // Many polls fail (each retried several times); the log says each cause once.
    eventually(Duration::from_secs(10), "several polls fail", async || {
        let failed = plugin.get("/metrics").await.1.lines().any(|l| {
            l.starts_with("kmsgate_backend_calls_total{operation=\"metadata\",outcome=\"unavailable\"}")
                && l.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()).is_some_and(|n| n >= 5.0)
        });
        if failed { Ok(()) } else { Err("fewer than 5 failed polls".to_owned()) }
    })
    .await;
    let log = plugin.log_text();
    // NB: a slow machine may pass a whole window and log a count; that line is allowed.
    let first = |what: &str| log.lines().filter(|l| l.contains(what) && !l.contains("(repeated ")).count();
    assert_eq!(first("key metadata poll failed"), 1, "{log}");
    assert_eq!(first("Vault address failed"), 1, "{log}");
}

/// Runs kmsgate with `args` and no kubeconfig at all; returns (exit code, stdout, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let home = tempfile::tempdir().unwrap();
    let mut command = kmsgate_command();
    command
        .args(args)
        .env("HOME", home.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBECONFIG");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Puts one KMS v2 value under `key_id` at /registry/secrets/ns/<name>.
async fn plant(etcd: &common::Etcd, name: &str, key_id: &str) {
    use kmsgate::storage::{self, DekSourceType, EncryptedObject};
    let key = format!("/registry/secrets/ns/{name}");
    let value = EncryptedObject {
        encrypted_data: storage::seal_with_seed(&[7u8; 32], br#"{"kind":"Secret"}"#, key.as_bytes()).unwrap(),
        key_id: key_id.to_owned(),
        encrypted_dek_source: b"vault:v1:c2VlZA==".to_vec(),
        annotations: std::collections::HashMap::new(),
        dek_source_type: DekSourceType::HkdfSha256XnonceAesGcmSeed,
    }
    .to_value("kmsgate");
    etcd.writer().await.put(key, value).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_says_what_it_compared_against_and_exits_by_the_rule() {
    let etcd = common::Etcd::start().await;
    let (old, new) = ("kmsgate:1:local:k:::kmsgate:1:1", "kmsgate:1:local:k:::kmsgate:2:2");
    plant(&etcd, "old", old).await;
    let endpoint = etcd.endpoint.as_str();

    // Without a key_id an old-key value passes, and the report says staleness was not checked.
    let (code, stdout, stderr) = run(&["audit", "--endpoints", endpoint], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("staleness NOT checked") && stdout.contains("--key-id"), "{stdout}");

    // With one it is stale (exit 1), and the report names the key_id it compared against.
    let (code, stdout, stderr) = run(&["audit", "--endpoints", endpoint, "--key-id", new], &[]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("current key_id: {new}")) && stdout.contains("findings: 1 stale"),
        "{stdout}"
    );

    // --fail-on none: the same report, exit 0.
    let (code, stdout, _) =
        run(&["audit", "--endpoints", endpoint, "--key-id", new, "--fail-on", "none"], &[]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("findings: 1 stale"), "{stdout}");

    // Could not run: exit 2, one line naming the problem.
    for (args, want) in [
        (vec!["--key-id", "kmsgate:1 :x"], "--key-id"),
        (vec!["--key-id", ""], "--key-id"),
        (vec!["--fail-on", "none,stale"], "--fail-on"),
        (vec!["--output", "yaml"], "--output"),
    ] {
        let (code, _, stderr) = run(&[&["audit", "--endpoints", endpoint][..], &args].concat(), &[]);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want) && stderr.lines().count() == 1, "{args:?}: {stderr}");
    }
    let refused = format!("http://127.0.0.1:{}", common::free_port());
    let (code, _, stderr) = run(&["audit", "--endpoints", &refused], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains("ConnectError(") && !stderr.contains("Os {"), "no Debug dump: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

#[test]
fn every_command_exits_2_when_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing_socket = dir.path().join("nobody/kms.sock");
    let missing_socket = missing_socket.to_str().unwrap();
    let ca_config = dir.path().join("vault.toml");
    std::fs::write(
        &ca_config,
        "format = 1\n[backend]\nkind = \"vault\"\nidentity = \"v\"\n[vault]\naddresses = [\"https://127.0.0.1:1\"]\n\
         token_file = \"/nonexistent/token\"\nca_cert = \"/nonexistent/vault-ca.pem\"\n",
    )
    .unwrap();
    let ca = ca_config.to_str().unwrap();
    // An API server nobody serves: the kubeconfig loads, every call fails to connect.
    let kubeconfig = dir.path().join("kubeconfig");
    let port = common::free_port();
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{port}\n\
             users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
             current-context: x\n"
        ),
    )
    .unwrap();
    let unreachable = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    type Case<'a> = (Vec<&'a str>, &'a [(&'a str, &'a str)], &'a str);
    let cases: Vec<Case<'_>> = vec![
        // Bad flags or config.
        (vec!["plugin", "--set", "plugin.poll_interval=soon"], &[], "plugin.poll_interval"),
        (vec!["plugin", "--config", ca], &[], "vault.ca_cert"),
        (vec!["selftest", "--socket", "relative.sock"], &[], "--socket"),
        (vec!["encryption-config", "--name", "a:b"], &[], "--name"),
        (vec!["keyring", "list", "--set", "backend.kind=aws"], &[], "backend.kind"),
        (vec!["controller", "--set", "vault.auth=ldap"], &[], "backend"),
        (vec!["reencrypt", "--qps", "0"], &[], "qps"),
        (vec!["tokens", "list", "--service-account", "nobody"], &[], "--service-account"),
        (vec!["retire", "--to-version", "2", "--force"], &[], "--reason"),
        // The plugin, etcd or the API server out of reach, or no kubeconfig.
        (vec!["selftest", "--socket", missing_socket], &[], "No such file or directory"),
        (vec!["verify", "--policy", "p", "--run-id", "r"], &[], "Kubernetes"),
        (vec!["reencrypt"], &[], "Kubernetes"),
        (vec!["tokens", "list"], &[], "Kubernetes"),
        (vec!["tokens", "rotate", "--dry-run"], &unreachable, "Connection refused"),
        (vec!["reencrypt", "--dry-run"], &unreachable, "Connection refused"),
        (vec!["verify", "--policy", "p", "--run-id", "r"], &unreachable, "Connection refused"),
    ];
    for (args, env, want) in cases {
        let (code, stdout, stderr) = run(&args, env);
        assert_eq!(code, Some(2), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(want), "{args:?} should name {want:?}: {stderr}");
        // NB: clap reports its own flag errors as `error: ...`.
        let fatal = stderr.lines().filter(|l| l.starts_with("kmsgate: ") || l.starts_with("error: ")).count();
        assert_eq!(fatal, 1, "{args:?}: the error once: {stderr}");
        assert!(!stderr.contains("\u{1b}["), "{args:?}: no colour codes in a pipe: {stderr}");
        assert!(!stderr.contains("ERROR"), "{args:?}: not logged as well: {stderr}");
    }
}

#[test]
fn commands_that_ran_exit_0_or_1() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.json");
    let k = keyring.to_str().unwrap();
    let (code, _, stderr) = run(&["keyring", "init", "--keyring", k], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    // Ran and refused: the keyring exists.
    let (code, _, stderr) = run(&["keyring", "init", "--keyring", k], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("kmsgate: ")).count(), 1, "{stderr}");
    let (code, _, stderr) = run(&["version"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_user_who_may_not_create_the_directories_is_told_which_and_how_to_move_them() {
    // NB: needs root to drop to an unprivileged user; as that user there is nothing to drop.
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    if !setpriv.exists() || !is_root() {
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let root_owned = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root_owned.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let keyring = root_owned.path().join("lib/kmsgate/keyring.json");
    let socket = root_owned.path().join("run/kmsgate/kms.sock");
    let as_nobody = |args: &[&str]| {
        let out = std::process::Command::new(setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(kmsgate_command().get_program())
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) =
        as_nobody(&["plugin", "--keyring", keyring.to_str().unwrap(), "--set", "http.listen=off"]);
    assert_eq!(code, Some(1), "{stderr}");
    let dir = keyring.parent().unwrap().parent().unwrap().display().to_string();
    assert!(
        stderr.contains(&dir) || stderr.contains(&keyring.parent().unwrap().display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("Permission denied") && stderr.contains("--keyring"), "{stderr}");

    // The keyring in a place the user owns; the socket's directory still not allowed.
    let own = tempfile::tempdir().unwrap();
    std::fs::set_permissions(own.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let keyring = own.path().join("keyring.json");
    let (code, stderr) = as_nobody(&[
        "plugin",
        "--keyring",
        keyring.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "--set",
        "plugin.create_socket_dir=true",
        "--set",
        "http.listen=off",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("Permission denied") && stderr.contains("--socket"), "{stderr}");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
}
