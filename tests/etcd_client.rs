//! kmsgate's own etcd client against a real etcd: endpoints that do not answer, refused
//! passwords, expired tokens.

use kmsgate_testkit as common;

use std::{path::Path, time::Duration};

use common::Etcd;
use kmsgate::{
    config::EtcdConfig,
    etcd::{self, ScanError, Scanner},
};

fn settings(endpoints: &[&str]) -> EtcdConfig {
    EtcdConfig { endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(), ..Default::default() }
}

/// The same, as `auditor` with the password in `file`.
fn as_auditor(endpoints: &[&str], file: &Path) -> EtcdConfig {
    EtcdConfig {
        user: Some("auditor".into()),
        password_file: Some(file.to_path_buf()),
        ..settings(endpoints)
    }
}

/// A loopback URL nothing listens on.
fn dead_endpoint() -> String {
    format!("http://127.0.0.1:{}", common::free_port())
}

/// A gRPC server that answers every request with response headers and then nothing, holding the
/// stream open: a member whose answer stalls after it began, as a hung etcd or a dead path does.
/// Its HTTP/2 connections stay served (pings answered), so only a time limit ends the read.
async fn stalled_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else { return };
                let mut open = Vec::new();
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    let headers = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    open.push(respond.send_response(headers, false).unwrap());
                }
            });
        }
    });
    endpoint
}

/// Five values under /registry/secrets/; answers the revision they were written at.
async fn plant(etcd: &Etcd) -> i64 {
    let writer = etcd.writer().await;
    writer.put_all((0..5).map(|n| (format!("/registry/secrets/ns/s{n}"), b"k8s\x00x".to_vec()))).await
}

/// Every key under /registry/, two to a page, so a scan is several requests.
async fn scan(client: &etcd::Client) -> Result<usize, ScanError> {
    let mut scanner = Scanner::prefix(b"/registry/", 2);
    let mut count = 0;
    while let Some(page) = scanner.next_page(client).await? {
        count += page.len();
    }
    Ok(count)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_endpoint_in_the_list_does_not_fail_a_scan() {
    let etcd = Etcd::start().await;
    plant(&etcd).await;
    let dead = dead_endpoint();
    for endpoints in [[dead.as_str(), etcd.endpoint.as_str()], [etcd.endpoint.as_str(), dead.as_str()]] {
        let client = etcd::connect(&settings(&endpoints)).await.unwrap();
        assert_eq!(scan(&client).await.unwrap(), 5, "{endpoints:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_whose_answer_stalls_fails_on_the_request_timeout() {
    let stalled = stalled_endpoint().await;
    let client = etcd::connect(&settings(&[&stalled])).await.unwrap();
    let client = client.with_request_timeout(Duration::from_millis(300));
    let read = tokio::time::timeout(Duration::from_secs(10), scan(&client)).await;
    let err = read.expect("the read must end on its own timeout").unwrap_err();
    let ScanError::Read(status) = &err else { panic!("{err}") };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{err}");
    assert!(err.to_string().contains("etcd did not answer within 300ms"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_member_is_passed_over_for_a_live_one() {
    let etcd = Etcd::start().await;
    plant(&etcd).await;
    let stalled = stalled_endpoint().await;
    let client = etcd::connect(&settings(&[&stalled, &etcd.endpoint])).await.unwrap();
    // NB: long enough that a loaded machine's three local reads never take it, so the second
    // scan's time tells whether it waited on the hung member.
    let limit = Duration::from_secs(2);
    let client = client.with_request_timeout(limit);
    let read = tokio::time::timeout(Duration::from_secs(20), scan(&client)).await;
    assert_eq!(read.expect("the scan must not wait on the hung member").unwrap(), 5);
    // The live member is kept: a second scan does not wait out the hung one again.
    let started = std::time::Instant::now();
    assert_eq!(scan(&client).await.unwrap(), 5);
    assert!(started.elapsed() < limit, "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_endpoint_answering_is_a_connect_error_naming_each() {
    let (a, b) = (dead_endpoint(), dead_endpoint());
    // NB: without a user nothing is sent at connect; the first read finds no endpoint.
    let client = etcd::connect(&settings(&[&a, &b])).await.unwrap();
    let err = scan(&client).await.unwrap_err();
    assert!(matches!(err, ScanError::Connect { .. }), "{err}");
    let text = err.to_string();
    assert!(text.starts_with("cannot connect to etcd"), "{text}");
    assert!(text.contains(&a) && text.contains(&b) && text.contains("Unavailable"), "{text}");

    // With a user, connect itself authenticates, so it is connect that says so.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "audit-pw").unwrap();
    let err = etcd::connect(&as_auditor(&[&a, &b], &file)).await.unwrap_err();
    assert!(matches!(err, ScanError::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&a) && err.to_string().contains(&b), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_password_fails_connect_and_is_never_shown() {
    let etcd = Etcd::start().await;
    etcd.enable_auth("auditor", "audit-pw");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "wrong-pw\n").unwrap();
    let err = etcd::connect(&as_auditor(&[&etcd.endpoint], &file)).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ScanError::Connect { .. }), "{text}");
    assert!(text.contains(&etcd.endpoint) && text.contains("authentication failed"), "{text}");
    assert!(!text.contains("wrong-pw") && !text.contains("audit-pw"), "no password in errors: {text}");

    // The right password, behind a dead endpoint: connect moves on to the live one.
    std::fs::write(&file, "audit-pw\n").unwrap();
    let dead = dead_endpoint();
    let client = etcd::connect(&as_auditor(&[&dead, &etcd.endpoint], &file)).await.unwrap();
    assert_eq!(scan(&client).await.unwrap(), 0);
    assert!(!format!("{client:?}").contains("audit-pw"), "{client:?}");
}

/// etcd forgets a simple token after `--auth-token-ttl` seconds unused and answers "invalid auth
/// token"; the client then authenticates again, once, and the scan goes on at its revision.
#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_is_renewed_and_the_scan_goes_on() {
    let etcd = Etcd::start_with(&["--auth-token-ttl=1".to_owned()]).await;
    let written = plant(&etcd).await;
    etcd.enable_auth("auditor", "audit-pw");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "audit-pw").unwrap();
    let client = etcd::connect(&as_auditor(&[&etcd.endpoint], &file)).await.unwrap();
    let mut scanner = Scanner::prefix(b"/registry/", 2);
    let mut count = scanner.next_page(&client).await.unwrap().unwrap().len();
    let pinned = scanner.revision();
    // Enabling auth changes no key, so the scan is pinned where the values were written.
    assert_eq!(pinned, written);
    tokio::time::sleep(Duration::from_secs(3)).await;
    while let Some(page) = scanner.next_page(&client).await.unwrap() {
        count += page.len();
    }
    assert_eq!((count, scanner.revision()), (5, pinned));
}
