//! Rotation steps against kube-rs's tower-test mock: every request the controller sends is
//! asserted (method, path, query, headers, body) and answered the way kube-apiserver would.

use kmsgate_testkit::{fake_keys, mock_api};

use std::{sync::Arc, time::Duration};

use fake_keys::FakeKeys;
use http::Request;
use kmsgate::{
    k8s::Kube,
    metrics::ControllerMetrics,
    rotation::{Context, Step},
};
use mock_api::{ApiHandle, Expect, expect, verifier};
use serde_json::{Value, json};

fn context(keys: FakeKeys) -> (Context<FakeKeys>, ApiHandle) {
    let (client, handle) = mock_api::client();
    let kube = Kube::new(client);
    (Context::new(kube, keys, None, Arc::new(ControllerMetrics::new()), Duration::from_millis(10)), handle)
}

/// One step of policy `p` against an API server that expects exactly `scenario`.
async fn step(ctx: &Context<FakeKeys>, handle: ApiHandle, scenario: Vec<Expect>) -> Step {
    let verify = verifier(handle, scenario);
    let step = ctx.step("p").await.unwrap();
    verify.await.unwrap();
    step
}

fn policy(status: Value) -> Value {
    json!({
        "apiVersion": "kmsgate.io/v1alpha1", "kind": "RotationPolicy",
        "metadata": {"name": "p", "resourceVersion": "7"},
        "spec": {"transit": {"key": "k"}, "converge": {"plugins": ["http://127.0.0.1:9"]}, "migrate": {"pageSize": 2}},
        "status": status,
    })
}

/// A policy in Retiring (1 to 2) after a clean verification that finished at `finished_at`,
/// retiring with a grace of one hour.
fn retiring(finished_at: &str) -> Value {
    let mut p = policy(json!({
        "phase": "Retiring", "runId": "r1", "fromVersion": 1, "toVersion": 2, "toKeyId": FakeKeys::key_id(2),
        "verifyRound": 1,
        "verification": {"runId": "r1", "round": 1, "keyId": FakeKeys::key_id(2), "revision": 9, "objects": 4,
            "current": 4, "oldKey": 0, "invalid": 0, "unencrypted": 0, "unmapped": 0, "clean": true,
            "finishedAt": finished_at},
    }));
    p["spec"]["retire"] = json!({"enabled": true, "grace": "1h"});
    p
}

const POLICY: &str = "/apis/kmsgate.io/v1alpha1/rotationpolicies/p";
const STATUS: &str = "/apis/kmsgate.io/v1alpha1/rotationpolicies/p/status?&fieldManager=kmsgate";

fn event(reason: &'static str, kind: &'static str) -> Expect {
    expect("POST", "/apis/events.k8s.io/v1/namespaces/default/events?", (201, json!({}))).check(
        move |_, body| {
            assert_eq!(body["reason"], reason);
            assert_eq!(body["type"], kind);
            assert_eq!(body["regarding"]["kind"], "RotationPolicy");
            assert_eq!(body["regarding"]["name"], "p");
            assert_eq!(body["reportingController"], "kmsgate.io/controller");
        },
    )
}

/// A SelfSubjectAccessReview for `verb` on a core resource in all namespaces, answered `allowed`.
fn access_review(verb: &'static str, resource: &'static str, allowed: bool) -> Expect {
    let path = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews?";
    let answer = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {}, "status": {"allowed": allowed}});
    expect("POST", path, (201, answer)).check(move |_, body| {
        let attributes = &body["spec"]["resourceAttributes"];
        assert_eq!(attributes["verb"], verb);
        assert_eq!(attributes["resource"], resource);
        assert_eq!(attributes["group"], "");
        assert!(attributes.get("namespace").is_none(), "all namespaces: {body}");
    })
}

fn merge_patch(request: &Request<()>) {
    assert_eq!(request.headers()["content-type"], "application/merge-patch+json");
}

#[tokio::test]
async fn first_sight_adopts_the_latest_version_and_writes_only_the_status() {
    let (ctx, handle) = context(FakeKeys::new(3));
    let scenario = vec![
        expect("GET", POLICY, (200, policy(Value::Null))),
        expect("PATCH", STATUS, (200, policy(json!({"knownVersion": 3})))).check(|request, body| {
            merge_patch(request);
            assert_eq!(body["status"]["knownVersion"], 3);
            assert_eq!(body["status"]["phase"], "Idle");
            assert_eq!(body["status"]["message"], "adopted key version 3");
            assert!(body["status"].get("runId").is_none(), "no run starts on first sight");
        }),
    ];
    step(&ctx, handle, scenario).await;
}

#[tokio::test]
async fn a_migrate_page_lists_metadata_only_and_patches_only_the_resource_version() {
    let (ctx, handle) = context(FakeKeys::new(2));
    let status = json!({
        "phase": "Migrating", "runId": "r1", "fromVersion": 1, "toVersion": 2, "toKeyId": FakeKeys::key_id(2),
        "progress": [{"resource": "secrets"}],
    });
    let item = |name: &str, rv: &str| {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
               "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}})
    };
    let patched = |name: &str, rv: &str| item(name, rv);
    let scenario = vec![
        expect("GET", POLICY, (200, policy(status.clone()))),
        expect("GET", "/api/v1/secrets?&limit=2", (200, json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": "50", "continue": "token-2"},
            "items": [item("a", "10"), item("b", "11")],
        })))
        .check(|request, _| {
            let accept = request.headers()["accept"].to_str().unwrap();
            assert!(accept.contains("as=PartialObjectMetadataList"), "Secret data must never be listed: {accept}");
        }),
        // Concurrency 4: both patches are in flight; answer in arrival order.
        expect("PATCH", "/api/v1/namespaces/ns/secrets/a?&fieldManager=kmsgate", (200, patched("a", "51"))).check(|request, body| {
            merge_patch(request);
            assert_eq!(*body, json!({"metadata": {"resourceVersion": "10"}}));
            assert!(request.headers()["accept"].to_str().unwrap().contains("as=PartialObjectMetadata"));
        }),
        expect("PATCH", "/api/v1/namespaces/ns/secrets/b?&fieldManager=kmsgate", (409, json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
            "message": "Operation cannot be fulfilled on secrets \"b\": the object has been modified"
        })))
        .check(|_, body| assert_eq!(*body, json!({"metadata": {"resourceVersion": "11"}}))),
        expect("PATCH", STATUS, (200, policy(Value::Null))).check(|_, body| {
            let progress = &body["status"]["progress"][0];
            assert_eq!(progress["rewritten"], 1);
            assert_eq!(progress["conflicts"], 1);
            assert_eq!(progress["continueToken"], "token-2", "the next page resumes here after a crash");
            assert_eq!(progress["complete"], false);
            assert_eq!(body["status"]["totals"]["rewritten"], 1);
        }),
    ];
    step(&ctx, handle, scenario).await;
}

#[tokio::test]
async fn retire_raises_the_floor_after_a_clean_verification_and_records_events() {
    let keys = FakeKeys::new(2);
    let (ctx, handle) = context(keys.clone());
    let p = retiring("2026-01-01T00:00:00Z");
    let scenario = vec![
        expect("GET", POLICY, (200, p)),
        expect("PATCH", STATUS, (200, policy(Value::Null))).check(|_, body| {
            assert_eq!(body["status"]["phase"], "Idle");
            assert_eq!(body["status"]["result"], "Succeeded");
            assert_eq!(body["status"]["retiredBelow"], 2);
            assert_eq!(body["status"]["knownVersion"], 2);
        }),
        event("Retired", "Normal"),
        event("Idle", "Normal"),
        event("RotationFinished", "Normal"),
    ];
    step(&ctx, handle, scenario).await;
    assert_eq!(keys.0.lock().unwrap().min_decryption_version, 2);
}

#[tokio::test]
async fn retire_refuses_a_verification_of_another_run() {
    let keys = FakeKeys::new(2);
    let (ctx, handle) = context(keys.clone());
    let status = json!({
        "phase": "Retiring", "runId": "r2", "toVersion": 2, "toKeyId": FakeKeys::key_id(2),
        "verification": {"runId": "r1", "round": 1, "keyId": FakeKeys::key_id(2), "revision": 9, "objects": 4,
            "current": 4, "oldKey": 0, "invalid": 0, "unencrypted": 0, "unmapped": 0, "clean": true,
            "finishedAt": "2026-01-01T00:00:00Z"},
    });
    let scenario = vec![
        expect("GET", POLICY, (200, policy(status))),
        expect("PATCH", STATUS, (200, policy(Value::Null))).check(|_, body| {
            assert_eq!(body["status"]["phase"], "Failed");
            assert_eq!(body["status"]["failedPhase"], "Retiring");
            assert_eq!(body["status"]["conditions"][0]["reason"], "NotVerified");
        }),
        event("Failed", "Normal"),
        event("NotVerified", "Warning"),
    ];
    step(&ctx, handle, scenario).await;
    assert_eq!(keys.0.lock().unwrap().min_decryption_version, 1, "the floor is untouched");
}

#[tokio::test]
async fn verify_mode_job_creates_a_pinned_read_only_job() {
    let (ctx, handle) = context(FakeKeys::new(2));
    let mut p = policy(json!({
        "phase": "Verifying", "runId": "abcd1234-run", "toVersion": 2, "toKeyId": FakeKeys::key_id(2), "verifyRound": 1,
    }));
    p["spec"]["verify"] = json!({"mode": "Job", "job": {"image": "kmsgate:test"}});
    let job = "/apis/batch/v1/namespaces/kmsgate/jobs";
    let not_found =
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
    let scenario = vec![
        expect("GET", POLICY, (200, p)),
        expect("GET", &format!("{job}/p-verify-abcd1234-1"), (404, not_found)),
        expect("POST", &format!("{job}?"), (201, json!({}))).check(|_, body| {
            let pod = &body["spec"]["template"]["spec"];
            assert_eq!(body["metadata"]["name"], "p-verify-abcd1234-1");
            assert_eq!(pod["hostNetwork"], true);
            assert_eq!(pod["nodeSelector"]["node-role.kubernetes.io/control-plane"], "");
            assert_eq!(pod["serviceAccountName"], "kmsgate-verify");
            let container = &pod["containers"][0];
            assert_eq!(container["volumeMounts"][0]["readOnly"], true);
            assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
            assert_eq!(container["securityContext"]["capabilities"]["drop"][0], "ALL");
            let args: Vec<&str> =
                container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
            assert_eq!(&args[..7], ["verify", "--policy", "p", "--run-id", "abcd1234-run", "--round", "1"]);
            assert!(args.contains(&"/etc/kmsgate/etcd-pki/kmsgate-verify.key"));
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            assert_eq!(container["securityContext"]["runAsNonRoot"], true);
            assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/etc/kmsgate/etcd-pki");
        }),
    ];
    assert!(matches!(step(&ctx, handle, scenario).await, Step::Wait(_)));
}

#[tokio::test]
async fn storage_version_migrations_are_created_where_served() {
    let (ctx, handle) = context(FakeKeys::new(2));
    let mut p = policy(json!({
        "phase": "Migrating", "runId": "abcd1234-run", "toVersion": 2, "toKeyId": FakeKeys::key_id(2),
        "progress": [{"resource": "secrets"}],
    }));
    p["spec"]["migrate"]["strategy"] = json!("StorageVersionMigration");
    let scenario = vec![
        expect("GET", POLICY, (200, p)),
        expect(
            "GET",
            "/apis/storagemigration.k8s.io",
            (
                200,
                json!({
                    "kind": "APIGroup", "name": "storagemigration.k8s.io",
                    "versions": [{"groupVersion": "storagemigration.k8s.io/v1beta1", "version": "v1beta1"}],
                }),
            ),
        ),
        expect("POST", "/apis/storagemigration.k8s.io/v1beta1/storageversionmigrations?", (201, json!({})))
            .check(|_, body| {
                assert_eq!(body["metadata"]["name"], "kmsgate-abcd1234-secrets");
                assert_eq!(body["spec"], json!({"resource": {"group": "", "resource": "secrets"}}));
            }),
        expect("PATCH", STATUS, (200, policy(Value::Null))).check(|_, body| {
            assert_eq!(body["status"]["storageMigrations"], json!(["kmsgate-abcd1234-secrets"]));
            assert_eq!(body["status"]["storageMigrationFallback"], false);
        }),
    ];
    step(&ctx, handle, scenario).await;
}

/// A clock at 2030-01-01T00:00:00Z that moves with tokio's paused time; the system clock never
/// reaches it, so these tests fail if any decision reads the global clock.
fn paused_clock() -> Arc<kmsgate::clock::TokioClock> {
    let base = k8s_openapi::jiff::Timestamp::from_second(1_893_456_000).unwrap();
    Arc::new(kmsgate::clock::TokioClock::starting_at(base))
}

#[tokio::test(start_paused = true)]
async fn retire_waits_out_the_grace_period_on_the_injected_clock() {
    let keys = FakeKeys::new(2);
    let clock = paused_clock();
    let p = retiring("2030-01-01T00:00:00Z");

    let (ctx, handle) = context(keys.clone());
    let ctx = ctx.with_clock(clock.clone());
    let scenario = vec![
        expect("GET", POLICY, (200, p.clone())),
        expect("PATCH", STATUS, (200, policy(Value::Null))).check(|_, body| {
            assert_eq!(body["status"]["phase"], "Retiring");
            assert_eq!(body["status"]["message"], "retiring versions below Some(2) in 3600s");
        }),
    ];
    assert!(matches!(step(&ctx, handle, scenario).await, Step::Wait(_)));
    assert_eq!(keys.0.lock().unwrap().min_decryption_version, 1, "nothing retires inside the grace period");

    tokio::time::advance(Duration::from_secs(3600)).await;
    let (ctx, handle) = context(keys.clone());
    let ctx = ctx.with_clock(clock);
    let scenario = vec![
        expect("GET", POLICY, (200, p)),
        expect("PATCH", STATUS, (200, policy(Value::Null))).check(|_, body| {
            assert_eq!(body["status"]["phase"], "Idle");
            assert_eq!(body["status"]["retiredBelow"], 2);
            assert_eq!(body["status"]["lastSuccess"], "2030-01-01T01:00:00Z");
        }),
        event("Retired", "Normal"),
        event("Idle", "Normal"),
        event("RotationFinished", "Normal"),
    ];
    step(&ctx, handle, scenario).await;
    assert_eq!(keys.0.lock().unwrap().min_decryption_version, 2);
}

#[tokio::test(start_paused = true)]
async fn the_schedule_starts_a_run_when_the_injected_clock_reaches_it() {
    let keys = FakeKeys::new(2);
    let clock = paused_clock();
    let mut p = policy(json!({"phase": "Idle", "knownVersion": 2, "nextRun": "2030-01-01T01:00:00Z"}));
    p["spec"]["schedule"] = json!("720h");

    let (ctx, handle) = context(keys.clone());
    let ctx = ctx.with_clock(clock.clone());
    let scenario = vec![expect("GET", POLICY, (200, p.clone()))];
    assert_eq!(step(&ctx, handle, scenario).await, Step::Rest(Duration::from_millis(10)));

    tokio::time::advance(Duration::from_secs(3600)).await;
    let (ctx, handle) = context(keys);
    let ctx = ctx.with_clock(clock);
    let mut scenario = vec![expect("GET", POLICY, (200, p))];
    // Before the run starts, the controller asks whether it may do what the run will do.
    for verb in ["get", "list", "patch"] {
        scenario.push(access_review(verb, "secrets", true));
    }
    scenario.extend([
        expect("PATCH", STATUS, (200, policy(Value::Null))).check(|_, body| {
            assert_eq!(body["status"]["phase"], "Rotating");
            assert_eq!(body["status"]["trigger"], "schedule");
            assert_eq!(body["status"]["startedAt"], "2030-01-01T01:00:00Z");
        }),
        event("Rotating", "Normal"),
    ]);
    assert_eq!(step(&ctx, handle, scenario).await, Step::Again);
}
