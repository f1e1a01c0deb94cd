//! Token flows against kube-rs's tower-test mock: the exact TokenRequest and Secret requests,
//! answered the way kube-apiserver would.

use kmsgate_testkit::mock_api;

use std::{sync::Arc, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::ObjectMeta, jiff::Timestamp};
use kmsgate::{
    crd::tokens::{MaxAge, parse},
    k8s::Kube,
    metrics::ControllerMetrics,
    tokens::{
        Clock,
        legacy::{Legacy, Outcome, Selection, classify},
        managed::{Guard, Managed, digest},
    },
};
use mock_api::{Expect, expect, verifier};
use serde_json::{Value, json};

/// 2026-11-26T20:00:00Z, always.
struct Fixed;

impl Clock for Fixed {
    fn now(&self) -> Timestamp {
        Timestamp::from_second(1_795_723_200).unwrap()
    }
}

fn merge_patch(request: &http::Request<()>) {
    assert_eq!(request.headers()["content-type"], "application/merge-patch+json");
}

fn metadata_only(request: &http::Request<()>) {
    let accept = request.headers()["accept"].to_str().unwrap();
    assert!(accept.contains("as=PartialObjectMetadata"), "Secret data must not come back: {accept}");
}

#[tokio::test]
async fn a_managed_token_is_requested_bound_to_its_secret_and_written_without_reading_it_back() {
    let (client, handle) = mock_api::client();
    let kube = Kube::new(client);
    let annotations = json!({
        "token.kmsgate.io/service-account": "builder",
        "token.kmsgate.io/audiences": "vault",
        "token.kmsgate.io/lifetime": "2h",
    });
    let meta: ObjectMeta = serde_json::from_value(json!({
        "name": "ci", "namespace": "apps", "uid": "u-1", "resourceVersion": "10", "annotations": annotations,
    }))
    .unwrap();
    let request_digest = digest(&meta);
    let scenario = vec![
        expect("GET", "/api/v1/secrets?&limit=500", (200, json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {},
            "items": [
                {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": meta},
                {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                 "metadata": {"name": "plain", "namespace": "apps", "uid": "u-2", "resourceVersion": "11"}},
            ],
        })))
        .check(|request, _| metadata_only(request)),
        expect("POST", "/api/v1/namespaces/apps/serviceaccounts/builder/token?", (201, json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {},
            // The server capped the two hours asked to one.
            "status": {"token": "header.payload.sig", "expirationTimestamp": "2026-11-26T21:00:00Z"},
        })))
        .check(|_, body| {
            assert_eq!(*body, json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {
                    "audiences": ["vault"],
                    "expirationSeconds": 7200,
                    "boundObjectRef": {"kind": "Secret", "apiVersion": "v1", "name": "ci", "uid": "u-1"},
                },
            }));
        }),
        expect("PATCH", "/api/v1/namespaces/apps/secrets/ci?&fieldManager=kmsgate", (200, json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": "ci", "namespace": "apps", "resourceVersion": "12"},
        })))
        .check(move |request, body| {
            merge_patch(request);
            metadata_only(request);
            assert_eq!(*body, json!({
                "metadata": {
                    "resourceVersion": "10",
                    "annotations": {
                        "token.kmsgate.io/error": null,
                        "token.kmsgate.io/expires-at": "2026-11-26T21:00:00Z",
                        "token.kmsgate.io/issued-at": "2026-11-26T20:00:00Z",
                        "token.kmsgate.io/request": request_digest,
                    },
                },
                "data": {"token": "aGVhZGVyLnBheWxvYWQuc2ln"},
            }));
        }),
    ];
    let verify = verifier(handle, scenario);
    let plan = parse(
        &serde_json::from_value(
            json!({"managed": {"enabled": true, "namespaces": ["apps"], "audiences": ["vault"]}}),
        )
        .unwrap(),
    )
    .unwrap()
    .managed;
    let guard = Guard::new(&plan, "kmsgate/kmsgate-controller");
    let metrics = Arc::new(ControllerMetrics::new());
    let mut managed = Managed::new(kube, Arc::new(Fixed), metrics);
    let pass = managed.pass(&plan, &guard, true).await.unwrap();
    verify.await.unwrap();
    assert_eq!((pass.tokens, pass.refreshed, pass.failing), (1, 1, 0));
    // 80% of the hour granted, not of the two hours asked.
    assert_eq!(pass.next, Some(Timestamp::from_second(1_795_723_200 + 2880).unwrap()));
}

fn policy(rv: &str, status: Value) -> Value {
    json!({
        "apiVersion": "kmsgate.io/v1alpha1", "kind": "TokenPolicy",
        "metadata": {"name": "kmsgate", "resourceVersion": rv}, "spec": {}, "status": status,
    })
}

const POLICY: &str = "/apis/kmsgate.io/v1alpha1/tokenpolicies/kmsgate";
const STATUS: &str = "/apis/kmsgate.io/v1alpha1/tokenpolicies/kmsgate/status?&fieldManager=kmsgate";

/// The legacy token Secret with metadata `meta`, selected under a 90-day max age, rotated against
/// an API server that expects exactly `scenario`.
async fn rotate_legacy(meta: Value, scenario: Vec<Expect>) -> Outcome {
    let (client, handle) = mock_api::client();
    let kube = Kube::new(client);
    let meta: ObjectMeta = serde_json::from_value(meta).unwrap();
    let selection =
        Selection { max_age: MaxAge::new(Duration::from_secs(90 * 86_400)).unwrap(), ..Selection::default() };
    let candidate = classify(meta, &selection, Fixed.now());
    let verify = verifier(handle, scenario);
    let metrics = ControllerMetrics::new();
    let legacy = Legacy::new(&kube, "kmsgate", &Fixed, &metrics, Duration::from_secs(60));
    let outcome = legacy.rotate(&candidate).await.unwrap();
    verify.await.unwrap();
    outcome
}

#[tokio::test]
async fn a_legacy_rotation_records_deletes_by_uid_recreates_without_data_and_annotates() {
    let meta = json!({
        "name": "t", "namespace": "apps", "uid": "old", "resourceVersion": "10",
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "labels": {"app": "ci", "kubernetes.io/legacy-token-last-used": "2026-11-20"},
        "annotations": {
            "kubernetes.io/service-account.name": "builder",
            "kubernetes.io/service-account.uid": "sa-1",
            "example.com/owner": "ci",
        },
    });
    let record = json!({
        "namespace": "apps", "name": "t", "uid": "old", "serviceAccount": "builder",
        "labels": {"app": "ci"},
        "annotations": {"example.com/owner": "ci", "kubernetes.io/service-account.name": "builder"},
        "since": "2026-11-26T20:00:00Z",
    });
    let recorded = record.clone();
    let scenario = vec![
        expect("GET", "/api/v1/namespaces/apps/serviceaccounts/builder", (200, json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "builder", "namespace": "apps", "uid": "sa-1", "resourceVersion": "3"},
        }))),
        expect("GET", POLICY, (200, policy("5", Value::Null))),
        expect("PATCH", STATUS, (200, policy("6", json!({"pending": [record.clone()]})))).check(move |request, body| {
            merge_patch(request);
            assert_eq!(body["metadata"], json!({"resourceVersion": "5"}), "the record is written at the version read");
            assert_eq!(body["status"]["pending"], json!([recorded]));
        }),
        expect("DELETE", "/api/v1/namespaces/apps/secrets/t?", (200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})))
            .check(|_, body| assert_eq!(body["preconditions"], json!({"uid": "old"}))),
        expect("POST", "/api/v1/namespaces/apps/secrets?&fieldManager=kmsgate", (201, json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
            "metadata": {"name": "t", "namespace": "apps", "uid": "new"},
        })))
        .check(|_, body| {
            assert_eq!(*body, json!({
                "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
                "metadata": {
                    "name": "t", "namespace": "apps",
                    "labels": {"app": "ci"},
                    "annotations": {"example.com/owner": "ci", "kubernetes.io/service-account.name": "builder"},
                },
            }));
        }),
        expect("GET", POLICY, (200, policy("6", json!({"pending": [record]})))),
        expect("PATCH", STATUS, (200, policy("7", json!({})))).check(|_, body| {
            assert_eq!(body["metadata"], json!({"resourceVersion": "6"}));
            assert_eq!(body["status"]["pending"], json!([]), "the record is dropped once the Secret exists");
        }),
        expect("GET", "/api/v1/namespaces/apps/secrets/t", (200, json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
            "metadata": {"name": "t", "namespace": "apps", "uid": "new"},
            "data": {"token": "ZXlKaGJHY2k=", "ca.crt": "Q0E=", "namespace": "YXBwcw=="},
        }))),
        expect("PATCH", "/api/v1/namespaces/apps/secrets/t?&fieldManager=kmsgate", (200, json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {"name": "t"},
        })))
        .check(|request, body| {
            merge_patch(request);
            assert_eq!(*body, json!({"metadata": {"annotations": {"token.kmsgate.io/rotated-at": "2026-11-26T20:00:00Z"}}}));
        }),
    ];
    assert_eq!(rotate_legacy(meta, scenario).await, Outcome::Rotated);
}

#[tokio::test]
async fn a_listed_secret_is_put_back_into_the_service_account_with_its_resource_version() {
    let meta = json!({
        "name": "t", "namespace": "apps", "uid": "old", "resourceVersion": "10",
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "annotations": {"kubernetes.io/service-account.name": "builder", "kubernetes.io/service-account.uid": "sa-1"},
    });
    let record = json!({
        "namespace": "apps", "name": "t", "uid": "old", "serviceAccount": "builder",
        "annotations": {"kubernetes.io/service-account.name": "builder"},
        "since": "2026-11-26T20:00:00Z", "referenced": true,
    });
    let mut marked = record.clone();
    marked["recreated"] = json!("new");
    let last = marked.clone();
    let (recorded, kept) = (record.clone(), marked.clone());
    let account = |rv: &str, secrets: Value| {
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "secrets": secrets,
               "metadata": {"name": "builder", "namespace": "apps", "uid": "sa-1", "resourceVersion": rv}})
    };
    let ok = json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
    let new_meta = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                          "metadata": {"name": "t", "namespace": "apps", "uid": "new"}});
    let scenario = vec![
        expect(
            "GET",
            "/api/v1/namespaces/apps/serviceaccounts/builder",
            (
                200,
                account(
                    "8",
                    json!([
                        {"name": "other", "namespace": "apps"}, {"name": "t"},
                    ]),
                ),
            ),
        ),
        expect("GET", POLICY, (200, policy("5", Value::Null))),
        expect("PATCH", STATUS, (200, policy("6", json!({"pending": [record]})))).check(move |_, body| {
            assert_eq!(body["status"]["pending"], json!([recorded]), "the record says sa.secrets listed it");
        }),
        expect("DELETE", "/api/v1/namespaces/apps/secrets/t?", (200, ok)),
        expect(
            "POST",
            "/api/v1/namespaces/apps/secrets?&fieldManager=kmsgate",
            (
                201,
                json!({
                    "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
                    "metadata": {"name": "t", "namespace": "apps", "uid": "new"},
                }),
            ),
        ),
        expect("GET", POLICY, (200, policy("6", json!({"pending": [marked.clone()]})))),
        expect("PATCH", STATUS, (200, policy("7", json!({"pending": [marked]})))).check(move |_, body| {
            assert_eq!(body["status"]["pending"], json!([kept]), "kept, marked with the new uid");
        }),
        expect(
            "GET",
            "/api/v1/namespaces/apps/secrets/t",
            (
                200,
                json!({
                    "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
                    "metadata": {"name": "t", "namespace": "apps", "uid": "new"},
                    "data": {"token": "ZXlKaGJHY2k="},
                }),
            ),
        ),
        expect("PATCH", "/api/v1/namespaces/apps/secrets/t?&fieldManager=kmsgate", (200, new_meta.clone())),
        expect("GET", "/api/v1/namespaces/apps/secrets/t", (200, new_meta)),
        // The token controller has removed "t" by name: now it can be added back.
        expect(
            "GET",
            "/api/v1/namespaces/apps/serviceaccounts/builder",
            (
                200,
                account(
                    "9",
                    json!([
                        {"name": "other", "namespace": "apps"},
                    ]),
                ),
            ),
        ),
        expect(
            "PATCH",
            "/api/v1/namespaces/apps/serviceaccounts/builder?&fieldManager=kmsgate",
            (
                200,
                account(
                    "10",
                    json!([
                        {"name": "other", "namespace": "apps"}, {"name": "t"},
                    ]),
                ),
            ),
        )
        .check(|request, body| {
            merge_patch(request);
            assert_eq!(
                *body,
                json!({
                    "metadata": {"resourceVersion": "9"},
                    "secrets": [{"name": "other", "namespace": "apps"}, {"name": "t"}],
                }),
                "the whole list as read plus the name, at the version read"
            );
        }),
        expect("GET", POLICY, (200, policy("7", json!({"pending": [last]})))),
        expect("PATCH", STATUS, (200, policy("8", json!({})))).check(|_, body| {
            assert_eq!(body["status"]["pending"], json!([]), "done once the reference is back");
        }),
    ];
    assert_eq!(rotate_legacy(meta, scenario).await, Outcome::Rotated);
}
