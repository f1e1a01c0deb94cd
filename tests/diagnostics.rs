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
