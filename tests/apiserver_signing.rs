//! The controller's reads of each API server for the signing-key rotation, against the in-process
//! API-server stand-in (one TLS listener per server at its own address): the FetchKeys and
//! process-start gauges of one server's `/metrics`, and the kid of a token that one server issues.

use kmsgate_testkit as common;

use common::fake_api::FakeApi;
use kmsgate::k8s::{FETCH_KEYS_SUCCESS_METRIC, PROCESS_START_METRIC, gauge};

#[tokio::test]
async fn each_api_server_is_read_at_its_own_address_for_its_key_fetch_and_its_signing_kid() {
    common::init_crypto();
    let fake = FakeApi::new("k");
    fake.start_api_servers(&["cp-a", "cp-b"]).await;
    fake.keys_fetched(0, "kid-new").await;
    let access = fake.api_server_access();
    let (a, b) = {
        let state = fake.state.lock().await;
        (state.api_servers[0].address, state.api_servers[1].address)
    };
    let names = [FETCH_KEYS_SUCCESS_METRIC, PROCESS_START_METRIC];

    let lines = access.metric_lines(a, &names).await.unwrap();
    let fetched = gauge(&lines, FETCH_KEYS_SUCCESS_METRIC).unwrap();
    let started = gauge(&lines, PROCESS_START_METRIC).unwrap();
    assert!(fetched >= started && started > 1.6e9, "{lines}");
    assert!(!lines.contains("apiserver_request_total"), "only the named metrics are kept: {lines}");
    // cp-b has not flipped to the signer: no such series, and its tokens carry its old kid.
    let lines = access.metric_lines(b, &names).await.unwrap();
    assert_eq!(gauge(&lines, FETCH_KEYS_SUCCESS_METRIC), None, "{lines}");
    assert!(gauge(&lines, PROCESS_START_METRIC).is_some());

    let kid = |address| access.token_kid_at(address, "kmsgate", "kmsgate-controller", "kmsgate-probe", 600);
    assert_eq!(kid(a).await.unwrap(), "kid-new");
    assert_eq!(kid(b).await.unwrap(), "legacy-sa-key");
    let log = fake.state.lock().await.log.clone();
    assert!(
        log.contains(&"POST /api/v1/namespaces/kmsgate/serviceaccounts/kmsgate-controller/token".to_owned()),
        "{log:?}"
    );

    // A refusal names the status and the server's message, never a token.
    let err = access.token_kid_at(a, "kmsgate", "kmsgate-controller", "kmsgate-probe", 60).await.unwrap_err();
    assert!(err.contains("422") && err.contains("10 minutes"), "{err}");
    let err = access.token_kid_at(a, "kmsgate", "../x", "kmsgate-probe", 600).await.unwrap_err();
    assert!(err.contains("not a valid object name"), "{err}");
}
