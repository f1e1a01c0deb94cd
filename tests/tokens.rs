//! Service-account token flows end to end against the in-memory API server, which plays the token
//! controller (tests/common/fake_api/). Time is paused, so lifetimes of hours run in
//! milliseconds and refresh times are asserted to the second.

use std::{sync::Arc, time::Duration};

use kmsgate::{
    commands,
    crd::tokens::{Match, MaxAge},
    k8s::Kube,
    metrics::ControllerMetrics,
    tokens::{
        AUDIENCES_ANNOTATION, ERROR_ANNOTATION, EXPIRES_ANNOTATION, INVALID_SINCE_LABEL, LAST_USED_LABEL,
        LIFETIME_ANNOTATION, ROTATED_ANNOTATION, SA_NAME_ANNOTATION, SA_UID_ANNOTATION,
        SERVICE_ACCOUNT_ANNOTATION,
        legacy::{Legacy, Outcome, Selection},
        managed::Managed,
        reconcile::TokenLoop,
    },
};
use kmsgate_testkit::{eventually, fake_api::FakeApi, rbac};
use serde_json::{Value, json};
use tokio::sync::watch;

const DAY: u64 = 86_400;

fn kube(fake: &FakeApi) -> Kube {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Kube::new(fake.client())
}

fn selection() -> Selection {
    Selection {
        max_age: MaxAge::new(Duration::from_secs(90 * DAY)).unwrap(),
        exclude_annotations: vec![Match::parse("example.com/keep").unwrap()],
        ..Selection::default()
    }
}

/// A cluster with one due legacy token Secret carrying the user's metadata, and one of each
/// kind a run must leave alone.
async fn legacy_cluster() -> (FakeApi, String) {
    let fake = FakeApi::with_token_policy(
        json!({"legacy": {"enabled": true, "excludeAnnotations": ["example.com/keep"]}}),
    );
    fake.add_service_account("apps", "builder").await;
    let old = fake.add_legacy("apps", "builder-token", "builder", 120).await;
    fake.label("apps", "builder-token", "app", "ci").await;
    fake.label("apps", "builder-token", LAST_USED_LABEL, "2026-11-20").await;
    fake.annotate("apps", "builder-token", &[("example.com/owner", Some("ci-team"))]).await;
    fake.add_legacy("apps", "fresh-token", "builder", 10).await;
    fake.add_legacy("apps", "dead-token", "builder", 400).await;
    fake.label("apps", "dead-token", INVALID_SINCE_LABEL, "2026-10-01").await;
    fake.add_legacy("apps", "pinned-token", "builder", 200).await;
    fake.annotate("apps", "pinned-token", &[("example.com/keep", Some("yes"))]).await;
    fake.add_legacy("apps", "orphan-token", "gone", 200).await;
    (fake, old)
}

#[tokio::test(start_paused = true)]
async fn legacy_rotation_replaces_the_token_and_keeps_the_users_metadata() {
    let (fake, old_uid) = legacy_cluster().await;
    let kube = kube(&fake);
    let metrics = ControllerMetrics::new();
    let legacy = Legacy::new(&kube, "kmsgate", &*fake.clock, &metrics, Duration::from_secs(120));
    fake.state.lock().await.log.clear();
    let (results, totals) = legacy.run(&selection(), false, |_, _, _| {}).await.unwrap();
    assert_eq!((totals.rotated, totals.failed, totals.invalid, totals.due), (1, 1, 1, 2), "{results:#?}");

    let new = fake.secret("apps", "builder-token").await.unwrap();
    assert_ne!(new.uid, old_uid);
    assert_eq!(new.type_, kmsgate::tokens::LEGACY_TYPE);
    assert!(
        new.data["token"].starts_with("legacy-builder-token-")
            && new.data["token"] != "legacy-builder-token-0"
    );
    assert_eq!(new.labels, [("app".to_owned(), "ci".to_owned())].into(), "last-used is dropped");
    assert_eq!(new.annotations["example.com/owner"], "ci-team");
    assert_eq!(new.annotations[SA_NAME_ANNOTATION], "builder");
    assert!(new.annotations[SA_UID_ANNOTATION].starts_with("sa-uid-"), "set by the token controller");
    assert_eq!(new.annotations[ROTATED_ANNOTATION], "2026-11-26T20:00:01Z", "after one 1 s poll");

    for (name, token) in [("fresh-token", "legacy-fresh-token-0"), ("dead-token", "legacy-dead-token-0")] {
        assert_eq!(fake.secret("apps", name).await.unwrap().data["token"], token, "{name} untouched");
    }
    assert!(fake.secret("apps", "pinned-token").await.is_some());
    let orphan = results.iter().find(|(c, _)| c.name == "orphan-token").unwrap();
    assert!(
        matches!(&orphan.1, Some(Outcome::Failed(why)) if why.contains("serviceaccount apps/gone does not exist"))
    );
    assert_eq!(fake.secret("apps", "orphan-token").await.unwrap().data["token"], "legacy-orphan-token-0");

    let state = fake.state.lock().await;
    let ours: Vec<&str> = state
        .log
        .iter()
        .map(String::as_str)
        .filter(|l| l.contains("builder-token") || l.ends_with("/secrets") || l.contains("tokenpolicies"))
        .filter(|l| !l.starts_with("GET /apis"))
        .collect();
    assert_eq!(
        ours,
        [
            "GET /api/v1/secrets",
            "PATCH /apis/kmsgate.io/v1alpha1/tokenpolicies/kmsgate/status",
            "DELETE /api/v1/namespaces/apps/secrets/builder-token",
            "POST /api/v1/namespaces/apps/secrets",
            "PATCH /apis/kmsgate.io/v1alpha1/tokenpolicies/kmsgate/status",
            "GET /api/v1/namespaces/apps/secrets/builder-token",
            "GET /api/v1/namespaces/apps/secrets/builder-token",
            "PATCH /api/v1/namespaces/apps/secrets/builder-token",
        ],
        "record, delete, create, forget, wait for the token, annotate"
    );
    assert_eq!(state.policy["status"]["pending"], json!([]));
    let warnings: Vec<&Value> = state.events.iter().filter(|e| e["type"] == "Warning").collect();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0]["regarding"]["name"], "orphan-token");
    assert_eq!(warnings[0]["reason"], "TokenRotationFailed");
    drop(state);
    let log = fake.state.lock().await.log.clone();
    rbac::assert_allowed(&log, kmsgate::k8s::RBAC, kmsgate::k8s::RBAC_NON_RESOURCE);
    let text = metrics.encode();
    assert!(text.contains("kmsgate_tokens_rotated_total 1"), "{text}");
    assert!(text.contains("kmsgate_tokens_failed_total{flow=\"legacy\"} 1"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_crash_between_delete_and_create_is_finished_on_restart() {
    let (fake, old_uid) = legacy_cluster().await;
    let kube = kube(&fake);
    let metrics = ControllerMetrics::new();
    fake.state.lock().await.crash_after = Some("DELETE /api/v1/namespaces/apps/secrets/builder-token".into());
    let legacy = Legacy::new(&kube, "kmsgate", &*fake.clock, &metrics, Duration::from_secs(120));
    let error = legacy.run(&selection(), false, |_, _, _| {}).await.unwrap_err();
    assert!(error.to_string().contains("create secret apps/builder-token"), "{error}");
    assert!(fake.secret("apps", "builder-token").await.is_none(), "the crash hit after the delete");
    let pending = fake.status().await["pending"].clone();
    assert_eq!(pending.as_array().unwrap().len(), 1, "{pending}");
    assert_eq!(pending[0]["uid"], old_uid.as_str());
    assert_eq!(pending[0]["labels"], json!({"app": "ci"}));
    assert!(pending[0]["annotations"].get(SA_UID_ANNOTATION).is_none());

    fake.recover().await;
    let restarted = Legacy::new(&kube, "kmsgate", &*fake.clock, &metrics, Duration::from_secs(120));
    let resumed = restarted.resume().await.unwrap();
    assert_eq!(resumed, vec![("apps/builder-token".to_owned(), Outcome::Rotated)]);
    let new = fake.secret("apps", "builder-token").await.unwrap();
    assert!(new.data.contains_key("token") && new.uid != old_uid);
    assert_eq!(new.labels, [("app".to_owned(), "ci".to_owned())].into());
    assert_eq!(new.annotations["example.com/owner"], "ci-team");
    assert!(new.annotations.contains_key(ROTATED_ANNOTATION));
    assert_eq!(fake.status().await["pending"], json!([]));

    // The next run finds the rotated Secret young and the record gone: nothing rotates twice.
    let (_, totals) = restarted.run(&selection(), false, |_, _, _| {}).await.unwrap();
    assert_eq!(totals.rotated, 0);
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_says_what_would_rotate_and_why_and_changes_nothing() {
    let (fake, old_uid) = legacy_cluster().await;
    let kube = kube(&fake);
    let options = commands::tokens::Options {
        policy: "kmsgate".into(),
        older_than: Some(commands::tokens::older_than("90d").unwrap()),
        namespaces: vec!["apps".into()],
        dry_run: true,
        service_account: "kmsgate/kmsgate-controller".into(),
        ..Default::default()
    };
    let mut out = Vec::new();
    let clean = commands::tokens::rotate(&kube, &options, fake.clock.clone(), &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(!clean, "the orphan would fail: {text}");
    let row = |name: &str| text.lines().find(|l| l.starts_with(&format!("apps/{name} "))).unwrap().to_owned();
    assert!(
        row("builder-token").contains("rotate") && row("builder-token").contains("age 120d0h > 90d0h"),
        "{text}"
    );
    assert!(row("builder-token").contains("2026-11-20"), "the last-used label is shown: {text}");
    assert!(row("dead-token").contains("invalid") && row("dead-token").contains("2026-10-01"), "{text}");
    assert!(row("pinned-token").contains("excluded"), "{text}");
    assert!(row("fresh-token").contains("keep"), "{text}");
    assert!(text.contains("would rotate 2"), "{text}");
    assert!(
        row("orphan-token").contains("would-fail")
            && row("orphan-token").contains("apps/gone does not exist")
    );

    assert!(!fake.state.lock().await.log.iter().any(|l| !l.starts_with("GET ")), "a dry run only reads");
    assert_eq!(fake.secret("apps", "builder-token").await.unwrap().uid, old_uid);
}

/// The legacy cluster, with `builder-token` listed in its ServiceAccount's `secrets` after
/// another reference that must survive, and the token controller removing a deleted Secret's
/// reference `unref_delay` after the delete.
async fn referenced_cluster(unref_delay: Duration) -> FakeApi {
    let (fake, _) = legacy_cluster().await;
    fake.reference("apps", "builder", "ci-token").await;
    fake.reference("apps", "builder", "builder-token").await;
    fake.state.lock().await.unref_delay = unref_delay;
    fake
}

#[tokio::test(start_paused = true)]
async fn a_rotated_secret_the_service_account_listed_is_listed_again() {
    let fake = referenced_cluster(Duration::from_millis(100)).await;
    assert_eq!(fake.use_legacy_token("apps", "builder-token").await, Some("autogenerated"));
    let kube = kube(&fake);
    let metrics = ControllerMetrics::new();
    let legacy = Legacy::new(&kube, "kmsgate", &*fake.clock, &metrics, Duration::from_secs(120));
    let (results, totals) = legacy.run(&selection(), false, |_, _, _| {}).await.unwrap();
    assert_eq!(totals.rotated, 1, "{results:#?}");

    // The token controller removed the old reference by name before the token arrived; kmsgate
    // put the name back after it, keeping the other entry.
    assert_eq!(fake.referenced("apps", "builder").await, ["ci-token", "builder-token"]);
    assert_eq!(fake.status().await["pending"], json!([]), "nothing is left to restore");
    assert_eq!(
        fake.use_legacy_token("apps", "builder-token").await,
        Some("autogenerated"),
        "the legacy token tracking still sees a generated token, not a hand-made one"
    );
    let log = fake.state.lock().await.log.clone();
    let patches =
        log.iter().filter(|l| l.starts_with("PATCH /api/v1/namespaces/apps/serviceaccounts/")).count();
    assert_eq!(patches, 1, "{log:#?}");
    rbac::assert_allowed(&log, kmsgate::k8s::RBAC, kmsgate::k8s::RBAC_NON_RESOURCE);
}

#[tokio::test(start_paused = true)]
async fn a_late_removal_of_the_old_reference_is_waited_for_then_the_reference_is_restored() {
    let fake = referenced_cluster(Duration::from_secs(30)).await;
    let kube = kube(&fake);
    let metrics = Arc::new(ControllerMetrics::new());
    let legacy = Legacy::new(&kube, "kmsgate", &*fake.clock, &metrics, Duration::from_secs(120));
    let (_, totals) = legacy.run(&selection(), false, |_, _, _| {}).await.unwrap();
    assert_eq!(totals.rotated, 1);
    // Token filled and annotated, but the token controller has not removed the old reference
    // yet: adding the name now would be undone by that removal, so kmsgate waits.
    assert_eq!(fake.referenced("apps", "builder").await, ["ci-token", "builder-token"]);
    let pending = fake.status().await["pending"].clone();
    assert_eq!(pending.as_array().map(Vec::len), Some(1), "{pending}");
    assert_eq!(pending[0]["referenced"], true);
    assert_eq!(pending[0]["recreated"], fake.secret("apps", "builder-token").await.unwrap().uid.as_str());
    let tokens = token_loop(&fake, metrics.clone());
    let wait = tokens.legacy_round().await.unwrap();
    assert!(wait <= Duration::from_secs(15), "the controller looks again soon: {wait:?}");

    // The removal arrives after the recreate and takes the name away.
    eventually(Duration::from_secs(60), "the token controller removes the reference", async || {
        fake.referenced("apps", "builder").await == ["ci-token"]
    })
    .await;
    assert_eq!(fake.use_legacy_token("apps", "builder-token").await, Some("manual"));

    // The next look puts it back, with the account's resourceVersion.
    tokens.legacy_round().await.unwrap();
    assert_eq!(fake.referenced("apps", "builder").await, ["ci-token", "builder-token"]);
    assert_eq!(fake.status().await["pending"], json!([]));
    assert_eq!(fake.use_legacy_token("apps", "builder-token").await, Some("autogenerated"));
}

#[tokio::test(start_paused = true)]
async fn a_reference_the_token_controller_never_removes_stands_and_the_record_is_dropped() {
    // A token controller that missed the delete (restarted, or re-listed after the recreate)
    // never removes the old entry.
    let fake = referenced_cluster(Duration::MAX).await;
    let kube = kube(&fake);
    let metrics = ControllerMetrics::new();
    let legacy = Legacy::new(&kube, "kmsgate", &*fake.clock, &metrics, Duration::from_secs(120));
    legacy.run(&selection(), false, |_, _, _| {}).await.unwrap();
    assert_eq!(legacy.restore_references().await.unwrap(), 1, "the removal may still come");
    tokio::time::sleep(kmsgate::tokens::legacy::REFERENCE_WAIT).await;
    assert_eq!(legacy.restore_references().await.unwrap(), 0);
    assert_eq!(fake.referenced("apps", "builder").await, ["ci-token", "builder-token"], "listed once");
    assert_eq!(fake.status().await["pending"], json!([]));
}

#[tokio::test(start_paused = true)]
async fn a_crash_after_the_delete_of_a_listed_secret_still_restores_its_reference() {
    let fake = referenced_cluster(Duration::from_millis(100)).await;
    let kube = kube(&fake);
    let metrics = ControllerMetrics::new();
    fake.state.lock().await.crash_after = Some("DELETE /api/v1/namespaces/apps/secrets/builder-token".into());
    let legacy = Legacy::new(&kube, "kmsgate", &*fake.clock, &metrics, Duration::from_secs(120));
    legacy.run(&selection(), false, |_, _, _| {}).await.unwrap_err();
    assert_eq!(fake.status().await["pending"][0]["referenced"], true, "recorded before the delete");
    fake.recover().await;
    let restarted = Legacy::new(&kube, "kmsgate", &*fake.clock, &metrics, Duration::from_secs(120));
    let resumed = restarted.resume().await.unwrap();
    assert_eq!(resumed, vec![("apps/builder-token".to_owned(), Outcome::Rotated)]);
    assert_eq!(fake.referenced("apps", "builder").await, ["ci-token", "builder-token"]);
    assert_eq!(fake.status().await["pending"], json!([]));
}

#[tokio::test(start_paused = true)]
async fn a_conflicting_service_account_write_is_read_again_and_retried() {
    let fake = referenced_cluster(Duration::from_millis(100)).await;
    fake.state.lock().await.account_races = 1;
    let kube = kube(&fake);
    let metrics = ControllerMetrics::new();
    let legacy = Legacy::new(&kube, "kmsgate", &*fake.clock, &metrics, Duration::from_secs(120));
    legacy.run(&selection(), false, |_, _, _| {}).await.unwrap();
    assert_eq!(fake.referenced("apps", "builder").await, ["ci-token"], "the first patch met a 409");
    assert_eq!(legacy.restore_references().await.unwrap(), 0);
    assert_eq!(fake.referenced("apps", "builder").await, ["ci-token", "builder-token"]);
    assert_eq!(fake.status().await["pending"], json!([]));
}

#[tokio::test(start_paused = true)]
async fn a_secret_the_service_account_never_listed_is_not_added() {
    let (fake, _) = legacy_cluster().await;
    fake.reference("apps", "builder", "ci-token").await;
    assert_eq!(fake.use_legacy_token("apps", "builder-token").await, Some("manual"));
    let kube = kube(&fake);
    let metrics = ControllerMetrics::new();
    let legacy = Legacy::new(&kube, "kmsgate", &*fake.clock, &metrics, Duration::from_secs(120));
    let (_, totals) = legacy.run(&selection(), false, |_, _, _| {}).await.unwrap();
    assert_eq!(totals.rotated, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.referenced("apps", "builder").await, ["ci-token"], "a hand-made token stays hand-made");
    assert_eq!(fake.use_legacy_token("apps", "builder-token").await, Some("manual"));
    assert_eq!(fake.status().await["pending"], json!([]));
    let log = fake.state.lock().await.log.clone();
    assert!(!log.iter().any(|l| l.starts_with("PATCH /api/v1/namespaces/apps/serviceaccounts/")), "{log:#?}");
}

#[tokio::test(start_paused = true)]
async fn the_last_used_label_is_a_utc_day_written_at_most_once_a_day_and_listed_as_one() {
    let (fake, _) = legacy_cluster().await;
    let version = async || fake.secret("apps", "builder-token").await.unwrap().resource_version;
    let before = version().await;
    fake.use_legacy_token("apps", "builder-token").await;
    let written = version().await;
    assert_ne!(written, before, "the first use of the day writes the label");
    fake.use_legacy_token("apps", "builder-token").await;
    fake.use_legacy_token("apps", "builder-token").await;
    let today = fake.secret("apps", "builder-token").await.unwrap();
    assert_eq!(today.labels[LAST_USED_LABEL], "2026-11-26", "the clock reads 20:00 UTC");
    assert_eq!(today.resource_version, written, "later uses that day write nothing");
    // 00:30 UTC the next day: a new day, one more write.
    tokio::time::sleep(Duration::from_secs(4 * 3600 + 1800)).await;
    fake.use_legacy_token("apps", "builder-token").await;
    fake.use_legacy_token("apps", "builder-token").await;
    let next = fake.secret("apps", "builder-token").await.unwrap();
    assert_eq!(next.labels[LAST_USED_LABEL], "2026-11-27");
    assert_eq!(next.resource_version, version().await);
    assert!(next.resource_version > today.resource_version);

    let options = commands::tokens::Options {
        policy: "kmsgate".into(),
        service_account: "kmsgate/kmsgate-controller".into(),
        ..Default::default()
    };
    let mut out = Vec::new();
    commands::tokens::list(&kube(&fake), &options, fake.clock.clone(), &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let header = text.lines().find(|l| l.starts_with("SECRET ")).unwrap();
    assert!(header.contains(" LAST-USED(UTC) "), "the column says it is a UTC day: {text}");
    let row = text.lines().find(|l| l.starts_with("apps/builder-token ")).unwrap();
    assert!(row.contains(" 2026-11-27 ") && !row.contains("T00:"), "a day, never a time: {text}");
}

fn token_loop(fake: &FakeApi, metrics: Arc<ControllerMetrics>) -> TokenLoop {
    TokenLoop {
        kube: kube(fake),
        clock: fake.clock.clone(),
        metrics,
        policy: "kmsgate".into(),
        own: "apps/kmsgate".into(),
    }
}

async fn managed_cluster() -> FakeApi {
    let fake = FakeApi::with_token_policy(json!({"managed": {
        "enabled": true, "namespaces": ["apps"], "audiences": ["vault"], "denyServiceAccounts": ["apps/root"],
    }}));
    fake.add_service_account("apps", "builder").await;
    fake.add_secret("apps", "ci", "Opaque", &[(SERVICE_ACCOUNT_ANNOTATION, "builder")], &[], Duration::ZERO)
        .await;
    fake
}

/// Runs the controller's managed loop (as leader) in the background.
fn spawn_managed(fake: &FakeApi, metrics: Arc<ControllerMetrics>) -> watch::Sender<bool> {
    let tokens = token_loop(fake, metrics);
    let (leader, follower) = watch::channel(true);
    tokio::spawn(async move { tokens.run_managed(follower).await });
    leader
}

#[tokio::test(start_paused = true)]
async fn managed_tokens_refresh_at_80_percent_of_every_lifetime_and_never_expire() {
    let fake = managed_cluster().await;
    let metrics = Arc::new(ControllerMetrics::new());
    let _leader = spawn_managed(&fake, metrics.clone());
    tokio::time::sleep(Duration::from_secs(5 * 3600)).await;

    let state = fake.state.lock().await;
    let at: Vec<u64> = state.issued.iter().map(|i| i.at).collect();
    assert_eq!(at, [0, 2880, 5760, 8640, 11520, 14400, 17280], "every 48 minutes of a 1h lifetime");
    assert!(state.log.iter().any(|l| l.starts_with("WATCH ")), "the loop watches Secrets");
    rbac::assert_allowed(&state.log, kmsgate::k8s::RBAC, kmsgate::k8s::RBAC_NON_RESOURCE);
    for pair in state.issued.windows(2) {
        assert!(pair[1].at < pair[0].expires, "refreshed before the previous token expired");
    }
    let first = &state.issued[0].body;
    assert_eq!(first["spec"]["expirationSeconds"], 3600);
    assert_eq!(
        first["spec"]["boundObjectRef"],
        json!({"kind": "Secret", "apiVersion": "v1", "name": "ci", "uid": "uid-2"})
    );
    assert!(first["spec"].get("audiences").is_none(), "no audience asked: the API server's default");
    let secret = state.secrets[&("apps".to_owned(), "ci".to_owned())].clone();
    assert_eq!(secret.data["token"], state.issued.last().unwrap().token);
    assert_eq!(
        secret.annotations[EXPIRES_ANNOTATION], "2026-11-27T01:48:00Z",
        "17280 s + 3600 s after 20:00"
    );
    assert!(!secret.annotations.contains_key(ERROR_ANNOTATION));
    assert_eq!(state.policy["status"]["managed"]["tokens"], 1);
    drop(state);
    let text = metrics.encode();
    assert!(text.contains("kmsgate_tokens_refreshed_total 7"), "{text}");
    assert!(text.contains("kmsgate_tokens_earliest_expiry_timestamp_seconds 1795744080"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_capped_lifetime_is_read_from_the_answer_and_refreshed_by_it() {
    let fake = managed_cluster().await;
    fake.state.lock().await.max_expiration = Some(1800);
    let _leader = spawn_managed(&fake, Arc::new(ControllerMetrics::new()));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let state = fake.state.lock().await;
    let at: Vec<u64> = state.issued.iter().map(|i| i.at).collect();
    assert_eq!(at, [0, 1440, 2880], "80% of the 30 minutes granted, not of the hour asked");
    let secret = &state.secrets[&("apps".to_owned(), "ci".to_owned())];
    assert_eq!(secret.annotations[EXPIRES_ANNOTATION], "2026-11-26T21:18:00Z");
}

#[tokio::test(start_paused = true)]
async fn an_annotation_change_reissues_at_once_through_the_watch() {
    let fake = managed_cluster().await;
    let _leader = spawn_managed(&fake, Arc::new(ControllerMetrics::new()));
    // 450 s: between two 300 s resyncs, so only the watch can explain a prompt re-issue.
    tokio::time::sleep(Duration::from_secs(450)).await;
    fake.annotate("apps", "ci", &[(LIFETIME_ANNOTATION, Some("2h")), (AUDIENCES_ANNOTATION, Some("vault"))])
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = fake.state.lock().await;
    assert_eq!(state.issued.len(), 2, "{:?}", state.issued);
    assert_eq!(state.issued[1].at, 450, "not at the next resync or refresh");
    assert_eq!(state.issued[1].body["spec"]["expirationSeconds"], 7200);
    assert_eq!(state.issued[1].body["spec"]["audiences"], json!(["vault"]));
}

/// Namespace, name, annotations, and what the refusal must say.
type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str);

#[tokio::test(start_paused = true)]
async fn guards_refuse_with_an_event_and_an_annotation_and_issue_nothing() {
    let fake = managed_cluster().await;
    fake.add_service_account("other", "builder").await;
    fake.add_service_account("apps", "root").await;
    fake.add_service_account("apps", "kmsgate").await;
    let sa = SERVICE_ACCOUNT_ANNOTATION;
    let cases: [Case<'_>; 7] = [
        ("other", "x", vec![(sa, "builder")], "namespace other may not ask"),
        ("apps", "foreign", vec![(sa, "kube-system/admin")], "own namespace apps"),
        ("apps", "foreign2", vec![(sa, "system:serviceaccount:other:builder")], "names namespace \"other\""),
        ("apps", "own", vec![(sa, "kmsgate")], "kmsgate's own"),
        ("apps", "root", vec![(sa, "root")], "denyServiceAccounts"),
        (
            "apps",
            "aud",
            vec![(sa, "builder"), (AUDIENCES_ANNOTATION, "vault,https://evil")],
            "audience \"https://evil\"",
        ),
        ("apps", "short", vec![(sa, "builder"), (LIFETIME_ANNOTATION, "5m")], "10m minimum"),
    ];
    for (ns, name, annotations, _) in &cases {
        fake.add_secret(ns, name, "Opaque", annotations, &[], Duration::ZERO).await;
    }
    fake.add_secret(
        "apps",
        "long",
        "Opaque",
        &[(sa, "builder"), (LIFETIME_ANNOTATION, "48h")],
        &[],
        Duration::ZERO,
    )
    .await;
    let tokens = token_loop(&fake, Arc::new(ControllerMetrics::new()));
    let mut managed = Managed::new(tokens.kube.clone(), fake.clock.clone(), tokens.metrics.clone());
    tokens.managed_once(&mut managed).await.unwrap();
    tokens.managed_once(&mut managed).await.unwrap();

    let state = fake.state.lock().await;
    assert_eq!(state.issued.len(), 1, "only apps/ci: {:?}", state.issued);
    for (ns, name, _, why) in &cases {
        let secret = &state.secrets[&(ns.to_string(), name.to_string())];
        assert!(secret.annotations[ERROR_ANNOTATION].contains(why), "{ns}/{name}: {:?}", secret.annotations);
        assert!(!secret.data.contains_key("token"));
        let events: Vec<&Value> = state.events.iter().filter(|e| e["regarding"]["name"] == *name).collect();
        assert_eq!(events.len(), 1, "one event per distinct problem, not one per pass: {name}");
        assert_eq!(events[0]["reason"], "TokenRequestRefused");
        assert_eq!(events[0]["regarding"]["kind"], "Secret");
        assert!(events[0]["note"].as_str().unwrap().contains(why));
    }
    assert!(
        state.secrets[&("apps".to_owned(), "long".to_owned())].annotations[ERROR_ANNOTATION]
            .contains("maxLifetime")
    );
    assert_eq!(state.policy["status"]["managed"]["failing"], 8);
    assert!(!state.events.iter().any(|e| e.to_string().contains("bound-")), "no token in any event");
}

#[tokio::test(start_paused = true)]
async fn a_service_account_deleted_while_managed_is_reported_and_retried_with_backoff() {
    let fake = managed_cluster().await;
    let metrics = Arc::new(ControllerMetrics::new());
    let _leader = spawn_managed(&fake, metrics.clone());
    tokio::time::sleep(Duration::from_secs(1000)).await;
    fake.delete_service_account("apps", "builder").await;
    tokio::time::sleep(Duration::from_secs(3000)).await; // to 4000 s, past the 3600 s expiry

    {
        let state = fake.state.lock().await;
        let refused: Vec<u64> = state.refused.iter().map(|(at, _)| *at).collect();
        assert_eq!(refused.first(), Some(&2880), "the first refresh finds it gone");
        assert!(refused.windows(2).all(|w| w[1] - w[0] >= 5), "never a hot loop: {refused:?}");
        assert!((8..=20).contains(&refused.len()), "backoff keeps trying before expiry: {refused:?}");
        assert!(refused.iter().filter(|at| **at < 3600).count() >= 8, "{refused:?}");
        let secret = &state.secrets[&("apps".to_owned(), "ci".to_owned())];
        assert_eq!(secret.annotations[ERROR_ANNOTATION], "serviceaccount apps/builder not found");
        let warnings: Vec<&Value> =
            state.events.iter().filter(|e| e["reason"] == "TokenRequestFailed").collect();
        assert_eq!(warnings.len(), 1, "one event per distinct message");
        assert_eq!(state.policy["status"]["managed"]["failing"], 1);
    }
    assert!(metrics.encode().contains("kmsgate_tokens_failed_total{flow=\"managed\"}"));

    fake.add_service_account("apps", "builder").await;
    tokio::time::sleep(Duration::from_secs(301)).await;
    let state = fake.state.lock().await;
    assert_eq!(state.issued.len(), 2, "issued again once the account is back");
    assert!(state.issued[1].at <= 4301);
    let secret = &state.secrets[&("apps".to_owned(), "ci".to_owned())];
    assert!(!secret.annotations.contains_key(ERROR_ANNOTATION), "the error annotation is cleared");
}

#[tokio::test(start_paused = true)]
async fn a_forbidden_token_request_is_reported_on_the_secret() {
    let fake = managed_cluster().await;
    fake.state.lock().await.forbidden.insert("apps/builder".into());
    let tokens = token_loop(&fake, Arc::new(ControllerMetrics::new()));
    let mut managed = Managed::new(tokens.kube.clone(), fake.clock.clone(), tokens.metrics.clone());
    let (wait, _) = tokens.managed_once(&mut managed).await.unwrap();
    assert_eq!(wait, Duration::from_secs(10), "first retry after 10 s");
    let state = fake.state.lock().await;
    let secret = &state.secrets[&("apps".to_owned(), "ci".to_owned())];
    assert!(secret.annotations[ERROR_ANNOTATION].starts_with("forbidden:"), "{:?}", secret.annotations);
    assert!(state.events.iter().any(|e| e["reason"] == "TokenRequestFailed" && e["type"] == "Warning"));
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_does_not_lead_issues_nothing() {
    let fake = managed_cluster().await;
    let tokens = token_loop(&fake, Arc::new(ControllerMetrics::new()));
    let (leader, follower) = watch::channel(false);
    tokio::spawn(async move { tokens.run_managed(follower).await });
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(fake.state.lock().await.issued.is_empty());
    leader.send(true).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.state.lock().await.issued.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_token_granted_already_expired_is_refused_not_stored() {
    let fake = managed_cluster().await;
    fake.state.lock().await.max_expiration = Some(0);
    let tokens = token_loop(&fake, Arc::new(ControllerMetrics::new()));
    let mut managed = Managed::new(tokens.kube.clone(), fake.clock.clone(), tokens.metrics.clone());
    let (wait, _) = tokens.managed_once(&mut managed).await.unwrap();
    assert_eq!(wait, Duration::from_secs(10), "retried with backoff, not at once");
    let state = fake.state.lock().await;
    let secret = &state.secrets[&("apps".to_owned(), "ci".to_owned())];
    assert!(!secret.data.contains_key("token"));
    assert!(secret.annotations[ERROR_ANNOTATION].contains("not after now"), "{:?}", secret.annotations);
}

#[tokio::test(start_paused = true)]
async fn tokens_list_shows_both_kinds_and_changes_nothing() {
    let (fake, _) = legacy_cluster().await;
    fake.state.lock().await.policy["spec"]["managed"] = json!({"enabled": true, "namespaces": ["apps"]});
    fake.add_secret("apps", "ci", "Opaque", &[(SERVICE_ACCOUNT_ANNOTATION, "builder")], &[], Duration::ZERO)
        .await;
    fake.add_secret(
        "apps",
        "stolen",
        "Opaque",
        &[(SERVICE_ACCOUNT_ANNOTATION, "kube-system/admin")],
        &[],
        Duration::ZERO,
    )
    .await;
    let options = commands::tokens::Options {
        policy: "kmsgate".into(),
        service_account: "kmsgate/kmsgate-controller".into(),
        ..Default::default()
    };
    let mut out = Vec::new();
    commands::tokens::list(&kube(&fake), &options, fake.clock.clone(), &mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    let row = |name: &str| text.lines().find(|l| l.starts_with(&format!("apps/{name} "))).unwrap().to_owned();
    assert!(row("builder-token").contains("rotate"), "{text}");
    assert!(row("dead-token").contains("invalid"), "{text}");
    assert!(row("ci").contains("due"), "{text}");
    assert!(
        row("stolen").contains("refused: the serviceaccount must be in the secret's own namespace"),
        "{text}"
    );
    let state = fake.state.lock().await;
    assert!(state.issued.is_empty() && state.events.is_empty(), "list only reads");
    assert!(state.log.iter().all(|l| l.starts_with("GET ")), "{:?}", state.log);
}

#[tokio::test(start_paused = true)]
async fn tokens_refuse_a_namespace_flag_that_would_match_nothing() {
    let (fake, _) = legacy_cluster().await;
    fake.state.lock().await.log.clear();
    let options = commands::tokens::Options {
        policy: "kmsgate".into(),
        namespaces: vec!["*".into()],
        service_account: "kmsgate/kmsgate-controller".into(),
        ..Default::default()
    };
    let mut out = Vec::new();
    let error =
        commands::tokens::list(&kube(&fake), &options, fake.clock.clone(), &mut out).await.unwrap_err();
    assert!(error.to_string().starts_with("--namespace \"*\": not a namespace name"), "{error}");
    assert!(fake.state.lock().await.log.is_empty(), "refused before any call");
}
