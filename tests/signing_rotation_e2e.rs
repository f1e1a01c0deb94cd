//! The signing-key rotation end to end: real OpenBao holding an `ecdsa-p256` signing key, two real
//! `kmsgate signer` processes on it (each with its `/status` over HTTP), the kube-apiserver
//! ExternalJWT stand-in against each signer (Sign, FetchKeys, verify), and the fake's API servers
//! at their own addresses, whose `/metrics` and TokenRequest answers are fed from what the
//! stand-ins really fetched and signed. The loop runs with its real seams: the Transit key logged
//! in with the shipped controller policy (deploy/vault/controller-signer-policy.hcl), and the
//! cluster fleet over HTTP and the API servers' TLS. Its clock is the fake's, moved ahead by each
//! wait the loop asks for, while the signers and the stand-ins run on real time with a 1 s poll
//! and refresh hint.

use kmsgate_testkit::{
    self as common, Bao, SignerProcess, eventually,
    externaljwt_apiserver::{ExternalJwtApiServer, Package},
    fake_api::FakeApi,
    fake_signing::signer_channel,
};

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kmsgate::{
    clock::parse_time,
    config::{VaultAuth, VaultClientConfig, VaultTls},
    k8s::Kube,
    metrics::{ControllerMetrics, VaultMetrics},
    proto::externaljwt::v1::{self, external_jwt_signer_client::ExternalJwtSignerClient},
    signing_rotation::{ClusterFleet, Context, Fleet, Step, VaultSigningKey},
    transit::VaultClient,
};
use serde_json::{Value, json};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The key name the shipped policies are written for.
const KEY: &str = "kmsgate-signer";
const POLICY: &str = "p";
/// The shortest `max_token_expiration_seconds` kube-apiserver starts with, so Drain is 600 s plus
/// the skew on the loop's clock.
const MAX_TOKEN: &str = "10m";
const SKEW_SECONDS: i64 = 30;
const WAIT: Duration = Duration::from_secs(60);
/// The controller's own account, the one its RBAC lets it ask tokens for.
const CONTROLLER_ACCOUNT: &str = "kmsgate/kmsgate-controller";

/// A token file in `dir` holding a new token with only the shipped policy `file` (key name as
/// shipped), under the policy name `name`.
async fn token_with_policy(bao: &Bao, name: &str, file: &str, dir: &Path) -> PathBuf {
    let policy = std::fs::read_to_string(file).unwrap();
    bao.post(&format!("sys/policies/acl/{name}"), json!({ "policy": policy })).await;
    let login = bao
        .post("auth/token/create", json!({ "policies": [name], "no_default_policy": true, "ttl": "1h" }))
        .await;
    assert_eq!(login["auth"]["policies"], json!([name]), "the shipped policy alone");
    let token = login["auth"]["client_token"].as_str().unwrap();
    let path = dir.join(format!("{name}.token"));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

/// One control-plane node: its signer, its `/status` URL, and the API server stand-in on its
/// socket.
struct Node {
    signer: SignerProcess,
    status_url: String,
    api: ExternalJwtApiServer,
    _dir: tempfile::TempDir,
}

async fn node(bao: &Bao, token_file: &Path) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let settings: Vec<(String, String)> = [
        ("signer.backend", "vault".to_owned()),
        ("backend.kind", "vault".to_owned()),
        ("backend.identity", "test-bao".to_owned()),
        ("vault.addresses", bao.addr.clone()),
        ("vault.token_file", token_file.display().to_string()),
        ("signer.key", KEY.to_owned()),
        ("signer.key_type", "ecdsa-p256".to_owned()),
        ("signer.poll_interval", "1s".to_owned()),
        ("signer.refresh_hint_seconds", "1".to_owned()),
        // NB: far longer than the test: a new version may sign only because the loop pins it.
        ("signer.publish_lead", "1h".to_owned()),
        ("signer.max_token_expiration", MAX_TOKEN.to_owned()),
        ("signer.backend_timeout", "5s".to_owned()),
        ("signer.http_listen", listen.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let signer = SignerProcess::start(dir.path(), &settings).await;
    let api = ExternalJwtApiServer::start(&signer.socket, Package::V1, ISSUER)
        .await
        .unwrap_or_else(|e| panic!("the stand-in starts: {e}\n{}", signer.log()));
    Node { signer, status_url: format!("http://{listen}"), api, _dir: dir }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Claims as kube-apiserver builds them for a bound token of `name`.
fn claims(name: &str) -> String {
    let now = unix_now();
    json!({
        "aud": [ISSUER], "exp": now + 600, "iat": now, "iss": ISSUER, "nbf": now,
        "jti": uuid::Uuid::new_v4().to_string(),
        "sub": format!("system:serviceaccount:default:{name}"),
    })
    .to_string()
}

fn seconds(text: &Value) -> i64 {
    parse_time(text.as_str().unwrap_or_default()).unwrap_or_else(|| panic!("not a time: {text}")).as_second()
}

struct Rig {
    bao: Bao,
    nodes: Vec<Node>,
    fake: FakeApi,
    ctx: Context<VaultSigningKey, ClusterFleet>,
}

impl Rig {
    /// Waits until stand-in `index` has started a FetchKeys since this call and holds exactly the
    /// kids its signer's `/status` publishes now, signs one token through it (which must not
    /// fail) and feeds the fake's API server `index` with both: a FetchKeys success now, and the
    /// kid its TokenRequests carry from now on. Returns the token and its kid.
    async fn feed(&self, index: usize, what: &str) -> (String, String) {
        let node = &self.nodes[index];
        let fleet = &self.ctx.fleet;
        // NB: the call counts at a fetch's start, so two more mean one began after this call.
        let fetches = node.api.fetch_calls() + 2;
        eventually(WAIT, &format!("stand-in {index} holds what its signer publishes"), async || {
            if node.api.fetch_calls() < fetches {
                return Err("no new FetchKeys yet".to_owned());
            }
            let status = fleet.signer_status(&node.status_url).await?;
            let published: BTreeSet<String> = status.published.iter().map(|k| k.kid.clone()).collect();
            let cached: BTreeSet<String> = node.api.keys().iter().map(|k| k.kid.clone()).collect();
            match published == cached {
                true => Ok(()),
                false => Err(format!("signer publishes {published:?}, stand-in holds {cached:?}")),
            }
        })
        .await;
        let token = node.api.sign(&claims(what)).await.unwrap_or_else(|e| {
            panic!("Sign failed on stand-in {index} ({what}): {e}\n{}", node.signer.log())
        });
        let kid = kmsgate::jwt::header_kid(&token).unwrap();
        self.fake.keys_fetched(index, &kid).await;
        (token, kid)
    }

    /// [`Self::feed`] on every node at once; `(token, kid)` by node.
    async fn feed_all(&self, what: &str) -> Vec<(String, String)> {
        let feeds = (0..self.nodes.len()).map(|i| async move { self.feed(i, &format!("{what}-{i}")).await });
        futures::future::join_all(feeds).await
    }

    /// Every stand-in verifies `token`.
    async fn verified_everywhere(&self, token: &str, what: &str) {
        for (i, node) in self.nodes.iter().enumerate() {
            if let Err(e) = node.api.verify(token).await {
                panic!("stand-in {i} refused {what}: {e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_signed_before_the_rotation_verify_everywhere_until_drain_ends_and_no_step_fails() {
    common::init_crypto();
    let bao = Bao::start().await;
    bao.post(&format!("transit/keys/{KEY}"), json!({ "type": "ecdsa-p256" })).await;
    // The migration's step 0: version 1 is pinned before any signer signs.
    bao.post(&format!("transit/keys/{KEY}/config"), json!({ "min_encryption_version": 1 })).await;
    let creds = tempfile::tempdir().unwrap();
    let signer_token =
        token_with_policy(&bao, "kmsgate-signer", "deploy/vault/signer-policy.hcl", creds.path()).await;
    let controller_token = token_with_policy(
        &bao,
        "kmsgate-controller-signer",
        "deploy/vault/controller-signer-policy.hcl",
        creds.path(),
    )
    .await;
    let nodes = vec![node(&bao, &signer_token).await, node(&bao, &signer_token).await];

    let fake = FakeApi::new("");
    fake.start_api_servers(&["cp-a", "cp-b"]).await;
    let endpoints: Vec<&str> = nodes.iter().map(|n| n.status_url.as_str()).collect();
    fake.set_policy(json!({
        "apiVersion": "kmsgate.io/v1alpha1",
        "kind": "SigningKeyPolicy",
        "metadata": {"name": POLICY, "resourceVersion": "1",
                     "annotations": {"kmsgate.io/signer-rotate-requested": "e2e"}},
        "spec": {
            "transit": {"key": KEY},
            "signers": {"endpoints": endpoints},
            "publish": {"margin": "2s"},
            "drain": {"skew": format!("{SKEW_SECONDS}s")},
        },
    }))
    .await;
    let vault = VaultClientConfig {
        addresses: vec![bao.addr.clone()],
        namespace: String::new(),
        tls: VaultTls::default(),
        auth: VaultAuth::Token { file: controller_token },
        renew_fraction: 0.67,
        max_concurrent_calls: 8,
        check_interval: Duration::from_millis(200),
    };
    let client = VaultClient::new(&vault, VaultMetrics::default()).unwrap();
    let kube = Kube::new(fake.client()).with_api_server_access(fake.api_server_access());
    let ctx = Context::new(
        kube.clone(),
        VaultSigningKey::new(client, "test-bao", ""),
        ClusterFleet::new(kube, CONTROLLER_ACCOUNT).with_clock(fake.clock.clone()),
        Arc::new(ControllerMetrics::new()),
        Duration::from_secs(60),
    )
    .with_clock(fake.clock.clone());
    let rig = Rig { bao, nodes, fake, ctx };

    // Before the rotation: each stand-in signs with version 1, and both verify both tokens.
    let before = rig.feed_all("before").await;
    let old_kid = before[0].1.clone();
    assert!(before.iter().all(|(_, kid)| *kid == old_kid), "{before:?}");
    for (token, _) in &before {
        rig.verified_everywhere(token, "a token signed before the rotation").await;
    }

    let mut phases: Vec<String> = Vec::new();
    let mut old_verified_in = BTreeSet::new();
    let mut status = Value::Null;
    let mut token_kids_checked = false;
    let mut restarted = false;
    for _ in 0..1000 {
        let step = rig.ctx.step(POLICY).await.unwrap_or_else(|e| panic!("a step failed: {e}"));
        status = rig.fake.status().await;
        let phase = status["phase"].as_str().unwrap_or("Idle").to_owned();
        assert_ne!(phase, "Failed", "{status:#}");
        // The fake's API servers started before the loop first saw the signers' token lifetime,
        // so Drain's end waits until they restart: the operator's rolling restart, which moves
        // each one's process_start_time_seconds.
        let stall = status["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Stalled" && c["status"] == "True").cloned());
        if stall.is_some_and(|c| c["reason"] == "TokenLifetimeNotEstablished") {
            assert_eq!(phase, "Draining", "{status:#}");
            let now = kmsgate::clock::Clock::now(&*rig.fake.clock).as_second();
            for server in &mut rig.fake.state.lock().await.api_servers {
                server.started_unix = now;
            }
            restarted = true;
        }
        if phases.last() != Some(&phase) {
            phases.push(phase.clone());
        }
        let finished = status["result"] == "Succeeded";
        // NB: Drain waits on time alone, so the loop's clock jumps its whole wait. Every other
        // wait is on the signers and the stand-ins, which run on real time: there the clock moves
        // one second per round in which each stand-in fetched anew, so it never outruns them and
        // the loop's timeouts are not reached on a loaded machine.
        match step {
            Step::Again => {}
            Step::Wait(d) if phase == "Draining" => rig.fake.clock.advance(d),
            Step::Wait(_) | Step::Rest(_) => rig.fake.clock.advance(Duration::from_secs(1)),
        }
        // The world catches up with the step: each stand-in fetches what its signer now
        // publishes and signs; no Sign fails (in `feed`) and no fresh token fails to verify.
        let switched = status["switchedAt"].is_string();
        let (from_kid, to_kid) = (status["fromKid"].as_str(), status["toKid"].as_str());
        for (token, kid) in rig.feed_all(&phase).await {
            match (switched, phase.as_str()) {
                (true, _) => assert_eq!(Some(kid.as_str()), to_kid, "after Switch, at {phase}"),
                (false, "Idle" | "Rotating" | "Publishing") => assert_eq!(kid, old_kid, "before Switch"),
                (false, _) => assert!(Some(kid.as_str()) == from_kid || Some(kid.as_str()) == to_kid),
            }
            rig.verified_everywhere(&token, &format!("a token signed at {phase}")).await;
        }
        // Until Retire has raised the floor, every token signed before the run still verifies.
        if status["retiredBelow"].is_null() {
            for (token, _) in &before {
                rig.verified_everywhere(token, &format!("a token signed before the rotation, at {phase}"))
                    .await;
            }
            old_verified_in.insert(phase.clone());
        }
        if switched && !token_kids_checked {
            // Right after the switch, each API server's own TokenRequest carries the new kid, and
            // each signer's /status signs with it.
            for address in rig.ctx.fleet.api_servers().await.unwrap().iter().map(|a| a.address.clone()) {
                let kid = rig.ctx.fleet.token_kid(&address, "kmsgate.io/signing-key-check").await.unwrap();
                assert_eq!(Some(kid.as_str()), to_kid, "{address}");
            }
            for node in &rig.nodes {
                let signing = rig.ctx.fleet.signer_status(&node.status_url).await.unwrap().signing.unwrap();
                assert_eq!(Some(signing.kid.as_str()), to_kid, "{}'s /status", node.status_url);
            }
            token_kids_checked = true;
        }
        if finished {
            break;
        }
    }
    assert_eq!(status["result"], "Succeeded", "{status:#}");
    assert_eq!(phases, ["Idle", "Rotating", "Publishing", "Switching", "Draining", "Retiring", "Idle"]);
    assert!(token_kids_checked, "the TokenRequests were checked after the switch");
    assert!(restarted, "Drain's end waited for the API servers started before the bound was seen");
    for phase in ["Rotating", "Publishing", "Switching", "Draining", "Retiring"] {
        assert!(old_verified_in.contains(phase), "old tokens were checked at {phase}: {old_verified_in:?}");
    }
    let new_kid = status["toKid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    assert_eq!(status["fromKid"], old_kid.as_str());
    assert_eq!(status["maxTokenExpirationSeconds"], 600, "{status:#}");
    let drained = seconds(&status["lastSuccess"]) - seconds(&status["switchedAt"]);
    assert!(drained >= 600 + SKEW_SECONDS, "Drain lasted {drained}s of the loop's clock");
    let key = rig.bao.get(&format!("transit/keys/{KEY}")).await;
    let versions =
        ["latest_version", "min_encryption_version", "min_decryption_version"].map(|f| &key["data"][f]);
    assert_eq!(versions, [&json!(2), &json!(2), &json!(2)], "one new version, signing and alone published");

    // After Retire: FetchKeys no longer serves the old kid, and an old token then fails.
    for (i, node) in rig.nodes.iter().enumerate() {
        let (_, kid) = rig.feed(i, "after").await;
        assert_eq!(kid, new_kid);
        let kids: Vec<String> = node.api.keys().iter().map(|k| k.kid.clone()).collect();
        assert_eq!(kids, std::slice::from_ref(&new_kid), "stand-in {i} fetched only the new kid");
        let mut raw = ExternalJwtSignerClient::new(signer_channel(&node.signer.socket).await);
        let served = raw.fetch_keys(v1::FetchKeysRequest {}).await.unwrap().into_inner().keys;
        let served: Vec<String> = served.into_iter().map(|k| k.key_id).collect();
        assert_eq!(served, std::slice::from_ref(&new_kid), "signer {i}'s FetchKeys");
        for (token, _) in &before {
            let error = node.api.verify(token).await.unwrap_err();
            assert!(error.contains("no keys found"), "stand-in {i}: {error}");
        }
    }
}
