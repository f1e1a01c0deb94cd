//! `kmsgate audit` against a real etcd: every format, corruptions, scale, compaction.

use kmsgate_testkit as common;

use std::collections::HashMap;

use common::{Etcd, Plugin};
use kmsgate::{
    audit,
    etcd::{Client, KeyValue, Scanner},
    proto::v2::{EncryptRequest, StatusRequest},
    storage::{self, DekSourceType, EncryptedObject},
};
use serde_json::Value;

/// Writes one value of every kind under /registry/secrets/ns/<name>; KMS v2 values are sealed by
/// the storage transformer with a DEK seed wrapped by a real plugin.
async fn plant(etcd: &Etcd, plugin: &Plugin) -> (String, HashMap<&'static str, &'static str>) {
    let mut kms = plugin.client().await;
    let key_id = kms.status(StatusRequest {}).await.unwrap().into_inner().key_id;
    let seed = [42u8; 32];
    let wrapped =
        kms.encrypt(EncryptRequest { plaintext: seed.to_vec(), uid: "u".into() }).await.unwrap().into_inner();
    let sealed = |key: &str, key_id: &str| {
        EncryptedObject {
            encrypted_data: storage::seal_with_seed(&seed, br#"{"kind":"Secret"}"#, key.as_bytes()).unwrap(),
            key_id: key_id.to_owned(),
            encrypted_dek_source: wrapped.ciphertext.clone(),
            annotations: HashMap::new(),
            dek_source_type: DekSourceType::HkdfSha256XnonceAesGcmSeed,
        }
        .to_value("kmsgate")
    };
    let mut truncated = sealed("/registry/secrets/ns/truncated", &key_id);
    truncated.truncate(truncated.len() - 7);
    let old_key_id = key_id.replace(":1:", ":0:");
    let values: Vec<(&str, Vec<u8>, &str)> = vec![
        ("current", sealed("/registry/secrets/ns/current", &key_id), "ok"),
        ("old-key", sealed("/registry/secrets/ns/old-key", &old_key_id), "stale"),
        ("protobuf", b"k8s\x00\x0a\x0c\x0a\x02v1\x12\x06Secret".to_vec(), "plaintext"),
        ("json", br#"{"kind":"Secret","metadata":{"name":"json"}}"#.to_vec(), "plaintext"),
        ("aescbc", b"k8s:enc:aescbc:v1:key1:0123456789abcdef0123456789abcdef".to_vec(), "stale"),
        ("secretbox", b"k8s:enc:secretbox:v1:key1:0123456789abcdef0123456789abcdef".to_vec(), "stale"),
        ("kms-v1", b"k8s:enc:kms:v1:old:\x00\x20abcdefabcdefabcdefabcdefabcdefab".to_vec(), "stale"),
        ("truncated", truncated, "undecryptable"),
        ("wrong-prefix", b"k8s:enc:kms:v3:kmsgate:whatever".to_vec(), "unknown"),
    ];
    let writer = etcd.writer().await;
    let mut expected = HashMap::new();
    for (name, value, finding) in values {
        writer.put(format!("/registry/secrets/ns/{name}"), value).await;
        expected.insert(name, finding);
    }
    // Another provider's value on another resource: only --provider/--all scans see it.
    let other = sealed("/registry/configmaps/ns/cm", &key_id);
    writer.put("/registry/configmaps/ns/cm", other).await;
    (key_id, expected)
}

/// A key as text, for messages and comparisons.
fn key(kv: &KeyValue) -> String {
    String::from_utf8_lossy(&kv.key).into_owned()
}

/// A healthy plugin on a fresh local keyring in `dir`.
async fn local_plugin(dir: &std::path::Path) -> Plugin {
    let plugin =
        Plugin::start(dir, &[("local.keyring".into(), dir.join("k.json").display().to_string())]).await;
    plugin.wait_healthy().await;
    plugin
}

fn run_audit(args: &[&str]) -> (Option<i32>, String, String) {
    let out = common::kmsgate_command().arg("audit").args(args).output().unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_format_is_reported_with_its_finding_and_exit_code() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = local_plugin(dir.path()).await;
    let (key_id, expected) = plant(&etcd, &plugin).await;
    let socket = plugin.socket.display().to_string();

    let (code, stdout, stderr) =
        run_audit(&["--endpoints", &etcd.endpoint, "--plugin-socket", &socket, "--output", "json"]);
    assert_eq!(code, Some(1), "findings exit 1: {stderr}");
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut seen = HashMap::new();
    for line in &lines {
        if line["type"] == "finding" {
            let key = line["key"].as_str().unwrap().trim_start_matches("/registry/secrets/ns/").to_owned();
            seen.insert(key, line["finding"].as_str().unwrap().to_owned());
        }
    }
    for (name, finding) in &expected {
        match *finding {
            "ok" => assert!(!seen.contains_key(*name), "{name} is fine but was reported"),
            want => assert_eq!(seen.get(*name).map(String::as_str), Some(want), "{name}"),
        }
    }
    let summary = lines.last().unwrap();
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["objects"], 9);
    assert_eq!(summary["classes"]["kms_v2"]["kmsgate"][&key_id], 1);
    assert_eq!(summary["findings"]["plaintext"], 2);
    assert_eq!(summary["findings"]["stale"], 4);
    assert!(!stdout.contains("Secret\""), "plaintext must never be printed");

    // Only the current key and no plaintext: --fail-on decides.
    let (code, _, _) =
        run_audit(&["--endpoints", &etcd.endpoint, "--key-id", &key_id, "--fail-on", "undecryptable"]);
    assert_eq!(code, Some(1));
    let (code, stdout, _) =
        run_audit(&["--endpoints", &etcd.endpoint, "--key-id", &key_id, "--resources", "configmaps"]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("1 objects"), "{stdout}");

    // --provider sees every resource, and only that provider's values.
    let (_, stdout, _) = run_audit(&[
        "--endpoints",
        &etcd.endpoint,
        "--key-id",
        &key_id,
        "--provider",
        "kmsgate",
        "--output",
        "json",
    ]);
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["objects"], 4, "current, old-key, truncated and the configmap: {summary}");

    // Could not run: exit 2 with a reason.
    let (code, _, stderr) = run_audit(&["--endpoints", "http://127.0.0.1:1", "--key-id", "x"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("etcd"), "{stderr}");
    let (code, _, stderr) = run_audit(&["--endpoints", &etcd.endpoint, "--fail-on", "everything"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--fail-on"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_objects_in_bounded_pages() {
    let etcd = Etcd::start().await;
    let writer = etcd.writer().await;
    // NB: batched puts in transactions keep fixture setup to a few seconds.
    for chunk in 0..200 {
        writer
            .put_all((0..100).map(|i| {
                let n = chunk * 100 + i;
                let value =
                    if n % 1000 == 0 { b"k8s\x00plain".to_vec() } else { b"k8s:enc:aescbc:v1:k:xx".to_vec() };
                (format!("/registry/secrets/ns{}/s{n}", n % 50), value)
            }))
            .await;
    }
    let mut client = etcd.client().await.unwrap();
    let mut scanner = Scanner::prefix(b"/registry/secrets/", 500);
    let (mut total, mut pages) = (0, 0);
    while let Some(page) = scanner.next_page(&client).await.unwrap() {
        assert!(page.len() <= 500, "a page held {} values", page.len());
        total += page.len();
        pages += 1;
    }
    assert_eq!((total, pages), (20_000, 40));

    let options = audit::Options {
        prefixes: vec!["/registry/secrets/".into()],
        provider: None,
        current_key_id: Some("kmsgate:1:transit:v::transit:k:1:1".into()),
        page_size: 500,
        page_bytes: 0,
        json: true,
        progress: false,
    };
    let mut out = Vec::new();
    let summary = audit::run(&mut client, &options, None, &mut out).await.unwrap();
    assert_eq!(summary.objects, 20_000);
    assert_eq!(summary.findings[&audit::Finding::Plaintext], 20);
    assert_eq!(summary.findings[&audit::Finding::Stale], 19_980);
}

/// The read-ahead scan returns every value once, in key order, at the revision its first page
/// pinned, however the API server writes while the caller works on a page.
#[tokio::test(flavor = "multi_thread")]
async fn a_scan_that_reads_ahead_stays_on_its_snapshot() {
    let etcd = Etcd::start().await;
    let (writer, client) = (etcd.writer().await, etcd.client().await.unwrap());
    for n in 0..35 {
        writer.put(format!("/registry/secrets/ns/s{n:02}"), b"k8s\x00x".to_vec()).await;
    }
    let mut pages = kmsgate::etcd::Pages::new(Scanner::prefix(b"/registry/secrets/", 10), client.clone());
    let mut keys = Vec::new();
    let mut pinned = 0;
    while let Some(page) = pages.next_page().await.unwrap() {
        assert!(page.len() <= 10, "a page held {} values", page.len());
        if pinned == 0 {
            pinned = pages.revision();
            // Writes into every later page, and a deletion, while the first page is being judged.
            for n in [15, 25, 34] {
                writer.put(format!("/registry/secrets/ns/s{n:02}a"), b"new".to_vec()).await;
            }
            writer.delete("/registry/secrets/ns/s30").await;
        }
        assert_eq!(pages.revision(), pinned);
        for kv in &page {
            assert!(kv.mod_revision <= pinned, "{} is newer than the snapshot", key(kv));
            keys.push(key(kv));
        }
    }
    let expected: Vec<String> = (0..35).map(|n| format!("/registry/secrets/ns/s{n:02}")).collect();
    assert_eq!(keys, expected);
    assert!(pages.next_page().await.unwrap().is_none(), "a finished scan stays finished");
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_during_a_scan_is_detected() {
    let etcd = Etcd::start().await;
    let (writer, client) = (etcd.writer().await, etcd.client().await.unwrap());
    for n in 0..30 {
        writer.put(format!("/registry/secrets/ns/s{n:02}"), b"k8s\x00x".to_vec()).await;
    }
    let mut scanner = Scanner::prefix(b"/registry/secrets/", 10);
    assert_eq!(scanner.next_page(&client).await.unwrap().unwrap().len(), 10);
    // The API server writes and compacts while the audit runs.
    let latest = writer.put("/registry/secrets/ns/new", b"k8s\x00y".to_vec()).await;
    writer.compact(latest).await;
    let err = scanner.next_page(&client).await.unwrap_err();
    assert!(matches!(err, kmsgate::etcd::ScanError::Compacted { .. }), "{err}");
    assert!(err.to_string().contains("partial"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_decrypts_each_object_and_names_each_failure() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = local_plugin(dir.path()).await;
    let mut kms = plugin.client().await;
    let key_id = kms.status(StatusRequest {}).await.unwrap().into_inner().key_id;
    let seed = [7u8; 32];
    let wrapped =
        kms.encrypt(EncryptRequest { plaintext: seed.to_vec(), uid: "u".into() }).await.unwrap().into_inner();
    let object =
        |name: &str| format!(r#"{{"kind":"Secret","metadata":{{"name":"{name}","namespace":"ns"}}}}"#);
    let value = |data: Vec<u8>, kind: DekSourceType, key_id: &str| {
        EncryptedObject {
            encrypted_data: data,
            key_id: key_id.to_owned(),
            encrypted_dek_source: wrapped.ciphertext.clone(),
            annotations: HashMap::new(),
            dek_source_type: kind,
        }
        .to_value("kmsgate")
    };
    let key = |name: &str| format!("/registry/secrets/ns/{name}");
    let seal = |name: &str, body: &[u8]| storage::seal_with_seed(&seed, body, key(name).as_bytes()).unwrap();
    let hkdf = DekSourceType::HkdfSha256XnonceAesGcmSeed;
    let good = value(seal("good", object("good").as_bytes()), hkdf, &key_id);
    let mut flipped_data = seal("flipped", object("flipped").as_bytes());
    *flipped_data.last_mut().unwrap() ^= 1;
    let type0 = storage::seal_with_dek(&seed, object("type0").as_bytes(), key("type0").as_bytes()).unwrap();
    let foreign = key_id.replace("kmsgate:1:local:", "kmsgate:1:transit:");
    let planted: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("good", good.clone(), None),
        ("type0", value(type0, DekSourceType::AesGcmKey, &key_id), None),
        ("moved", good, Some("tag mismatch")),
        ("flipped", value(flipped_data, hkdf, &key_id), Some("tag mismatch")),
        (
            "refused",
            value(seal("refused", object("refused").as_bytes()), hkdf, &foreign),
            Some("plugin refused"),
        ),
        ("garbage", value(seal("garbage", b"\x01\x02not an object"), hkdf, &key_id), Some("not an object")),
        (
            "renamed",
            value(seal("renamed", object("someone-else").as_bytes()), hkdf, &key_id),
            Some("not an object"),
        ),
    ];
    let writer = etcd.writer().await;
    for (name, value, _) in &planted {
        writer.put(key(name), value.clone()).await;
    }

    let socket = plugin.socket.display().to_string();
    let (code, stdout, stderr) =
        run_audit(&["--endpoints", &etcd.endpoint, "--plugin-socket", &socket, "--deep", "--output", "json"]);
    assert_eq!(code, Some(1), "{stderr}");
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (name, _, want) in &planted {
        let found = lines.iter().find(|l| l["key"] == key(name).as_str());
        match want {
            None => assert!(found.is_none(), "{name} decrypts and must not be reported: {found:?}"),
            Some(reason) => {
                let found = found.unwrap_or_else(|| panic!("{name} not reported"));
                assert_eq!(found["finding"], "undecryptable", "{name}");
                assert!(found["detail"].as_str().unwrap().contains(reason), "{name}: {found}");
            }
        }
    }
    let summary = lines.last().unwrap();
    assert_eq!(summary["deep_verified"], 2, "{summary}");
    assert_eq!(
        summary["deep_decrypt_calls"], 3,
        "one Decrypt per distinct (type, source, key_id): {summary}"
    );
    assert!(
        !stdout.contains("someone-else") && !stdout.contains("not an object\\u0001"),
        "no plaintext in the report"
    );

    let (code, _, stderr) = run_audit(&["--endpoints", &etcd.endpoint, "--deep"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--plugin-socket"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_with_tls_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let issue = |name: &str, usage: rcgen::ExtendedKeyUsagePurpose| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    };
    issue("server", rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    issue("client", rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let path = |f: &str| dir.path().join(f).display().to_string();
    let tls = [
        format!("--cert-file={}", path("server.pem")),
        format!("--key-file={}", path("server-key.pem")),
        format!("--trusted-ca-file={}", path("ca.pem")),
        "--client-cert-auth".to_owned(),
    ];
    let etcd = Etcd::start_with(&tls).await;
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client-key.pem"));
    let args =
        ["--endpoints", &etcd.endpoint, "--cacert", &ca, "--cert", &cert, "--key", &key, "--key-id", "k"];
    let (code, stdout, stderr) = run_audit(&args);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("0 objects"), "{stdout}");
    // Without the client certificate etcd refuses: the audit says it could not run.
    let (code, _, stderr) = run_audit(&["--endpoints", &etcd.endpoint, "--cacert", &ca, "--key-id", "k"]);
    assert_eq!(code, Some(2), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_user_and_password() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    etcd.etcdctl(&["put", "/registry/secrets/ns/a", "k8s:enc:aescbc:v1:k:xx"]);
    etcd.enable_auth("auditor", "audit-pw");
    let password = dir.path().join("password");
    std::fs::write(&password, "audit-pw\n").unwrap();
    let pw = password.display().to_string();
    let args = ["--endpoints", &etcd.endpoint, "--user", "auditor", "--password-file", &pw, "--key-id", "k"];
    let (code, stdout, stderr) = run_audit(&args);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.contains("stale") && stdout.contains("1 objects"), "{stdout}");
    std::fs::write(&password, "wrong").unwrap();
    let (code, _, stderr) = run_audit(&args);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!stderr.contains("wrong") && !stderr.contains("audit-pw"), "no password in errors: {stderr}");
}

/// Audit, the rotation's verify and retire's check read the same values through one judge, so they
/// must agree on which values of the provider are current, stale or invalid.
#[tokio::test(flavor = "multi_thread")]
async fn audit_verify_and_retire_judge_the_same_values_alike() {
    use kmsgate::{
        commands::rotation::retire_check,
        crd::rotation::ResourceRef,
        keyid::{BackendKind, KeyScope},
        rotation::verify,
    };

    let etcd = Etcd::start().await;
    let mut client = etcd.client().await.unwrap();
    let scope = KeyScope {
        kind: BackendKind::Transit,
        identity: "vault-a".into(),
        namespace: String::new(),
        mount: "transit".into(),
        key: "kmsgate".into(),
    };
    let other_key = KeyScope { key: "other".into(), ..scope.clone() };
    let current = scope.key_id(2, 200).to_string();
    let object = |key_id: String, provider: &str| {
        EncryptedObject {
            encrypted_data: vec![7; 40],
            key_id,
            encrypted_dek_source: b"vault:v1:abc".to_vec(),
            annotations: HashMap::new(),
            dek_source_type: DekSourceType::HkdfSha256XnonceAesGcmSeed,
        }
        .to_value(provider)
    };
    let mut truncated = object(current.clone(), "kmsgate");
    truncated.truncate(truncated.len() - 5);
    let values: Vec<(&str, Vec<u8>)> = vec![
        ("/registry/secrets/ns/current", object(current.clone(), "kmsgate")),
        ("/registry/secrets/ns/old-version", object(scope.key_id(1, 100).to_string(), "kmsgate")),
        ("/registry/secrets/ns/other-key", object(other_key.key_id(5, 500).to_string(), "kmsgate")),
        ("/registry/secrets/ns/truncated", truncated),
        ("/registry/secrets/ns/plain", br#"{"kind":"Secret"}"#.to_vec()),
        ("/registry/secrets/ns/aescbc", b"k8s:enc:aescbc:v1:key1:0123456789abcdef".to_vec()),
        ("/registry/configmaps/ns/other-provider", object(scope.key_id(1, 100).to_string(), "legacy")),
        ("/registry/configmaps/ns/cm-current", object(current.clone(), "kmsgate")),
    ];
    let writer = etcd.writer().await;
    for (key, value) in values {
        writer.put(key, value).await;
    }

    let options = audit::Options {
        prefixes: vec!["/registry/".into()],
        provider: Some("kmsgate".into()),
        current_key_id: Some(current.clone()),
        page_size: 3,
        page_bytes: 0,
        json: true,
        progress: false,
    };
    let audited = audit::run(&mut client, &options, None, &mut Vec::new()).await.unwrap();
    let input = verify::Input {
        provider: "kmsgate".into(),
        etcd_prefix: "/registry".into(),
        key_id: current.clone(),
        resources: vec![ResourceRef::parse("secrets").unwrap()],
        run_id: "r".into(),
        round: 1,
    };
    let verified = verify::scan(&mut client, &input, 3, &kmsgate::clock::SystemClock).await.unwrap();
    let retire = retire_check(&mut client, "/registry", "kmsgate", &scope, 2).await.unwrap();

    let finding = |f| audited.findings.get(&f).copied().unwrap_or(0);
    // The provider's values: current (2), old version, other key, truncated.
    assert_eq!((audited.objects, audited.skipped), (5, 3));
    assert_eq!((verified.current, verified.old_key, verified.invalid), (2, 2, 1));
    assert_eq!((retire.values, retire.blockers), (5, 3));
    // The three agree.
    assert_eq!(audited.objects, verified.current + verified.old_key + verified.invalid);
    assert_eq!(audited.objects, retire.values);
    assert_eq!(finding(audit::Finding::Stale), verified.old_key);
    assert_eq!(finding(audit::Finding::Undecryptable), verified.invalid);
    assert_eq!(retire.blockers, verified.old_key + verified.invalid);
    // Verify alone also judges the listed resources' values of no provider.
    assert_eq!(verified.unencrypted, 2);
    assert!(!verified.clean);
}

/// A page whose values exceed the client's message limit is halved until it fits, and the scan goes
/// on at the revision it pinned.
#[tokio::test(flavor = "multi_thread")]
async fn a_page_too_large_for_the_client_is_halved_at_the_same_revision() {
    let etcd = Etcd::start().await;
    let (writer, client) = (etcd.writer().await, etcd.client().await.unwrap());
    // NB: 24 values of 20 KiB against a 100 KiB limit stand for 190 values of 1.45 MiB against
    // 256 MiB: a page of 16 (320 KiB) and of 8 (160 KiB) are too large, a page of 4 fits.
    let value = |n: u8| [b"k8s:enc:aescbc:v1:k:".as_slice(), &[n; 20 * 1024]].concat();
    let keys: Vec<String> = (0..24).map(|n| format!("/registry/secrets/ns/s{n:02}")).collect();
    for (n, key) in keys.iter().enumerate() {
        writer.put(key.as_str(), value(n as u8)).await;
    }
    let mut scanner = Scanner::prefix(b"/registry/secrets/", 16).with_max_page_bytes(100 * 1024);
    let first = scanner.next_page(&client).await.unwrap().unwrap();
    assert_eq!((first.len(), scanner.page_size()), (4, 4));
    let pinned = scanner.revision();
    // The API server writes while the audit runs: none of it belongs in this snapshot.
    writer.put("/registry/secrets/ns/s05a", value(99)).await;
    writer.put(keys[20].as_str(), b"k8s\x00rewritten".to_vec()).await;
    let mut seen: Vec<String> = first.iter().map(key).collect();
    while let Some(page) = scanner.next_page(&client).await.unwrap() {
        assert!(page.len() <= 4, "a page held {} values", page.len());
        for kv in &page {
            assert!(kv.mod_revision <= pinned, "{} is newer than the snapshot", key(kv));
            assert_eq!(kv.value.len(), value(0).len());
            seen.push(key(kv));
        }
    }
    assert_eq!(scanner.revision(), pinned);
    assert_eq!(seen, keys);

    // A single value above the limit cannot be halved away: the scan says so.
    writer.put("/registry/configmaps/ns/huge", vec![b'x'; 200 * 1024]).await;
    let mut scanner = Scanner::prefix(b"/registry/configmaps/", 16).with_max_page_bytes(100 * 1024);
    let err = scanner.next_page(&client).await.unwrap_err();
    assert!(matches!(err, kmsgate::etcd::ScanError::ValueTooLarge { .. }), "{err}");
}

/// The sizes of the pages a byte-sized scan reads, checking each page's keys follow the last.
async fn page_sizes(scanner: &mut Scanner, client: &Client, keys: &[String]) -> Vec<usize> {
    let (mut sizes, mut seen) = (Vec::new(), Vec::new());
    while let Some(page) = scanner.next_page(client).await.unwrap() {
        sizes.push(page.len());
        seen.extend(page.iter().map(key));
    }
    assert_eq!(seen, keys, "every value once, in key order");
    sizes
}

/// With a byte budget, the first page asks for `page_size` values and each later one for as many
/// as fit the budget at the size seen, growing at most eightfold a page; etcd is asked for few
/// pages of small values and many of large ones, and memory follows bytes, not counts.
#[tokio::test(flavor = "multi_thread")]
async fn pages_sized_by_bytes_follow_the_values_read() {
    let etcd = Etcd::start().await;
    let (writer, client) = (etcd.writer().await, etcd.client().await.unwrap());
    let put_all = async |resource: &str, count: usize, size: usize| {
        let keys: Vec<String> = (0..count).map(|n| format!("/registry/{resource}/ns/s{n:04}")).collect();
        for chunk in keys.chunks(100) {
            writer.put_all(chunk.iter().map(|k| (k.as_str(), vec![b'x'; size]))).await;
        }
        keys
    };

    // Small values: 2, then eightfold growth, until the rest fits in one page.
    let small = put_all("secrets", 1000, 10).await;
    let mut scanner = Scanner::prefix(b"/registry/secrets/", 2).with_page_bytes(1 << 20);
    assert_eq!(page_sizes(&mut scanner, &client, &small).await, [2, 16, 128, 854]);

    // 4 KiB values against a 64 KiB budget: 15 values a page (65 536 / (4096 + 29 + 24) bytes).
    let large = put_all("configmaps", 100, 4096).await;
    let mut scanner = Scanner::prefix(b"/registry/configmaps/", 2).with_page_bytes(64 * 1024);
    let sizes = page_sizes(&mut scanner, &client, &large).await;
    assert_eq!(sizes[..3], [2, 15, 15], "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 100);

    // The budget never reaches past half the response limit.
    let mut scanner =
        Scanner::prefix(b"/registry/configmaps/", 2).with_page_bytes(1 << 30).with_max_page_bytes(32 * 1024);
    let sizes = page_sizes(&mut scanner, &client, &large).await;
    assert_eq!(sizes[..3], [2, 3, 3], "{sizes:?}");

    // Without a budget, every page holds page_size values, as before.
    let mut scanner = Scanner::prefix(b"/registry/secrets/", 300);
    assert_eq!(page_sizes(&mut scanner, &client, &small).await, [300, 300, 300, 100]);
}
