//! The migration of a cluster from kubeadm's `sa.key` to `kmsgate signer`
//! (docs/runbooks/signer-migration.md), on real OpenBao and real `kmsgate signer` processes, with
//! two API servers: the key-file stand-in (tests/common/keyfile_apiserver.rs) for one not
//! flipped, and the ExternalJWTSigner stand-in (tests/common/externaljwt_apiserver.rs) for one
//! flipped. At every step each server issues a token, and every token issued so far is verified
//! on both servers. Also: what fails without step 0, and the optional import of `sa.key` into
//! Transit with the real `bao transit import`.

use kmsgate_testkit as common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{
    Bao, SignerProcess, eventually,
    externaljwt_apiserver::{ExternalJwtApiServer, Package},
    keyfile_apiserver::KeyFileApiServer,
};
use kmsgate::jwt::keyfile;
use serde_json::{Value, json};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(60);
/// The signer's Transit key, named as the shipped policies name it.
const KEY: &str = "kmsgate-signer";

/// Claims as kube-apiserver's `serviceaccount.Claims` builds them for a bound pod token.
fn claims(name: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    json!({
        "aud": [ISSUER],
        "exp": now + 3600,
        "iat": now,
        "iss": ISSUER,
        "jti": uuid::Uuid::new_v4().to_string(),
        "kubernetes.io": {
            "namespace": "default",
            "serviceaccount": { "name": name, "uid": uuid::Uuid::new_v4().to_string() }
        },
        "nbf": now,
        "sub": format!("system:serviceaccount:default:{name}")
    })
    .to_string()
}

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

/// An API server in one of the two states the migration moves it between.
enum Server {
    /// `--service-account-signing-key-file` and `--service-account-key-file`.
    Unflipped(KeyFileApiServer),
    /// `--service-account-signing-endpoint`.
    Flipped(ExternalJwtApiServer),
}

impl Server {
    async fn sign(&self, claims: &str) -> Result<String, String> {
        match self {
            Self::Unflipped(s) => s.sign(claims),
            Self::Flipped(s) => s.sign(claims).await,
        }
    }

    async fn verify(&self, token: &str) -> Result<Value, String> {
        match self {
            Self::Unflipped(s) => s.verify(token),
            Self::Flipped(s) => s.verify(token).await,
        }
    }

    fn state(&self) -> &'static str {
        match self {
            Self::Unflipped(_) => "unflipped",
            Self::Flipped(_) => "flipped",
        }
    }
}

/// The node's files: the old key pair as kubeadm writes it, and where the export goes.
struct Pki {
    dir: tempfile::TempDir,
    sa_kid: String,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/keyfile");
        // kubeadm's sa.key is a 2048-bit RSA key in PKCS#1 PEM; sa.pub its PKIX public key.
        let sa_key = std::fs::read(data.join("rsa-pkcs1.pem")).unwrap();
        std::fs::write(dir.path().join("sa.key"), &sa_key).unwrap();
        let public = keyfile::public_keys(&sa_key).unwrap();
        std::fs::write(dir.path().join("sa.pub"), keyfile::to_pem(&public)).unwrap();
        Self { sa_kid: public[0].kid(), dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An unflipped server reading `key_files` from here.
    fn unflipped(&self, key_files: &[&str]) -> Server {
        let files: Vec<PathBuf> = key_files.iter().map(|f| self.path(f)).collect();
        let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        Server::Unflipped(KeyFileApiServer::start(&self.path("sa.key"), &refs, ISSUER).unwrap())
    }
}

/// Two API servers and every token they issued, labelled by who issued it at which step.
struct Cluster {
    a: Server,
    b: Server,
    tokens: Vec<(String, String)>,
}

impl Cluster {
    /// Each server issues one token (a flipped server's first may wait for the signer's first
    /// poll), and returns the kids (A's, B's).
    async fn issue(&mut self, step: &str) -> (String, String) {
        let mut kids = Vec::new();
        for (name, server) in [("A", &self.a), ("B", &self.b)] {
            let label = format!("{step}: {name} ({})", server.state());
            let token =
                eventually(WAIT, &format!("a token from {label}"), async || server.sign(&claims(name)).await)
                    .await;
            kids.push(kid_of(&token));
            self.tokens.push((label, token));
        }
        (kids.remove(0), kids.remove(0))
    }

    /// Every token issued so far verifies on both servers.
    async fn verify_all(&self, step: &str) {
        for (name, server) in [("A", &self.a), ("B", &self.b)] {
            for (label, token) in &self.tokens {
                let claims = server.verify(token).await.unwrap_or_else(|e| {
                    panic!("{step}: the token of {label} fails on {name} ({}): {e}", server.state())
                });
                assert_eq!(claims["iss"], ISSUER);
            }
        }
    }
}

/// The signer's key of `key_type` (unless `create` is false: it exists), and a token file
/// holding only the shipped signer policy.
async fn signer_token(bao: &Bao, key_type: &str, create: bool, dir: &Path) -> PathBuf {
    if create {
        bao.post(&format!("transit/keys/{KEY}"), json!({ "type": key_type })).await;
    }
    let policy = std::fs::read_to_string("deploy/vault/signer-policy.hcl").unwrap();
    bao.post("sys/policies/acl/kmsgate-signer", json!({ "policy": policy })).await;
    let login = bao
        .post(
            "auth/token/create",
            json!({ "policies": ["kmsgate-signer"], "no_default_policy": true, "ttl": "1h" }),
        )
        .await;
    let file = dir.join("signer-token");
    std::fs::write(&file, format!("{}\n", login["auth"]["client_token"].as_str().unwrap())).unwrap();
    file
}

/// The `--set` settings of a signer (and of `export-public-keys`) on `bao`.
fn vault_settings(bao: &Bao, token_file: &Path, key_type: &str) -> Vec<(String, String)> {
    [
        ("signer.backend", "vault".to_owned()),
        ("backend.kind", "vault".to_owned()),
        ("backend.identity", "test-bao".to_owned()),
        ("vault.addresses", bao.addr.clone()),
        ("vault.token_file", token_file.display().to_string()),
        ("signer.key", KEY.to_owned()),
        ("signer.key_type", key_type.to_owned()),
        ("signer.poll_interval", "300ms".to_owned()),
        ("signer.refresh_hint_seconds", "1".to_owned()),
        ("signer.publish_lead", "2s".to_owned()),
        ("signer.backend_timeout", "5s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Runs the real `kmsgate signer export-public-keys --out out [extra]` and returns the kids the
/// written file holds, read as kube-apiserver reads a key file.
fn export(settings: &[(String, String)], out: &Path, extra: &[&str]) -> Vec<String> {
    let mut command = common::kmsgate_command();
    command.args(["signer", "export-public-keys", "--out"]).arg(out).args(extra);
    for (key, value) in settings {
        command.args(["--set", &format!("{key}={value}")]);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "export-public-keys failed: {stderr}");
    assert!(output.stdout.is_empty(), "with --out, stdout stays empty");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(out).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o644, "readable by kube-apiserver whatever its user");
    let text = std::fs::read_to_string(out).unwrap();
    assert!(!text.contains("PRIVATE"), "public keys only");
    let kids: Vec<String> = keyfile::public_keys(text.as_bytes()).unwrap().iter().map(|k| k.kid()).collect();
    for kid in &kids {
        assert!(stderr.contains(kid.as_str()), "the summary names {kid}: {stderr}");
    }
    kids
}

fn sorted(mut kids: Vec<String>) -> Vec<String> {
    kids.sort();
    kids
}

#[tokio::test(flavor = "multi_thread")]
async fn migration_keeps_every_token_valid_on_every_server_at_every_step() {
    let bao = Bao::start().await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let token_file = signer_token(&bao, "ecdsa-p256", true, work.path()).await;
    let settings = vault_settings(&bao, &token_file, "ecdsa-p256");

    // Before: both servers on kubeadm's flags.
    let mut cluster =
        Cluster { a: pki.unflipped(&["sa.pub"]), b: pki.unflipped(&["sa.pub"]), tokens: vec![] };
    let (a, b) = cluster.issue("before").await;
    assert_eq!((a.as_str(), b.as_str()), (pki.sa_kid.as_str(), pki.sa_kid.as_str()));
    cluster.verify_all("before").await;

    // Step 0: pin the version that will sign, export the Transit public keys beside sa.pub, and
    // restart both servers with both files.
    bao.post(&format!("transit/keys/{KEY}/config"), json!({ "min_encryption_version": 1 })).await;
    let exported = export(&settings, &pki.path("kmsgate-signer.pub"), &[]);
    assert_eq!(exported.len(), 1, "one version: {exported:?}");
    let transit_kid = exported[0].clone();
    cluster.a = pki.unflipped(&["sa.pub", "kmsgate-signer.pub"]);
    cluster.b = pki.unflipped(&["sa.pub", "kmsgate-signer.pub"]);
    cluster.issue("step 0").await;
    cluster.verify_all("step 0").await;

    // Step 1: the signer serves sa.pub as a verify-only key, not excluded from discovery.
    let mut signer_settings = settings.clone();
    signer_settings.push(("signer.verify_keys".to_owned(), pki.path("sa.pub").display().to_string()));
    let signer = SignerProcess::start(work.path(), &signer_settings).await;
    let probe = ExternalJwtApiServer::start(&signer.socket, Package::V1, ISSUER)
        .await
        .unwrap_or_else(|e| panic!("the stand-in starts: {e}\n{}", signer.log()));
    // NB: the signer reads the key store before it binds its socket, but a first read that
    // failed on a loaded machine would leave only sa.pub until the next poll.
    eventually(WAIT, "FetchKeys lists the Transit version", async || {
        probe.keys().iter().any(|k| k.kid == transit_kid)
    })
    .await;
    let served: Vec<String> = probe.keys().into_iter().map(|k| k.kid).collect();
    assert!(probe.keys().iter().all(|k| !k.exclude_from_oidc_discovery), "{:?}", probe.keys());
    assert_eq!(sorted(served.clone()), sorted(vec![transit_kid.clone(), pki.sa_kid.clone()]));
    // The export is exactly what FetchKeys serves: its key store's part, and all with the
    // verify-only keys.
    let with_verify = export(&signer_settings, &work.path().join("all.pub"), &["--include-verify-keys"]);
    assert_eq!(sorted(with_verify), sorted(served.clone()));
    let store_only: Vec<String> = served.iter().filter(|k| **k != pki.sa_kid).cloned().collect();
    assert_eq!(exported, store_only);
    drop(probe);

    // Step 2: flip A, then B, one at a time.
    cluster.a =
        Server::Flipped(ExternalJwtApiServer::start(&signer.socket, Package::V1, ISSUER).await.unwrap());
    let (a, b) = cluster.issue("step 2, A flipped").await;
    assert_eq!((a.as_str(), b.as_str()), (transit_kid.as_str(), pki.sa_kid.as_str()));
    cluster.verify_all("step 2, A flipped").await;
    cluster.b =
        Server::Flipped(ExternalJwtApiServer::start(&signer.socket, Package::V1, ISSUER).await.unwrap());
    let (a, b) = cluster.issue("step 2, both flipped").await;
    assert_eq!((a.as_str(), b.as_str()), (transit_kid.as_str(), transit_kid.as_str()));
    cluster.verify_all("step 2, both flipped").await;

    // Step 3: roll A back to its key files; step 0's export keeps the signer's tokens valid there.
    cluster.a = pki.unflipped(&["sa.pub", "kmsgate-signer.pub"]);
    let (a, _) = cluster.issue("step 3, A rolled back").await;
    assert_eq!(a, pki.sa_kid, "a rolled-back server signs with sa.key again");
    cluster.verify_all("step 3, A rolled back").await;
    assert_eq!(cluster.tokens.len(), 10);
    signer.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_step_0_a_flipped_servers_token_fails_on_an_unflipped_one() {
    let bao = Bao::start().await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let token_file = signer_token(&bao, "ecdsa-p256", true, work.path()).await;
    bao.post(&format!("transit/keys/{KEY}/config"), json!({ "min_encryption_version": 1 })).await;
    let mut settings = vault_settings(&bao, &token_file, "ecdsa-p256");
    settings.push(("signer.verify_keys".to_owned(), pki.path("sa.pub").display().to_string()));
    let signer = SignerProcess::start(work.path(), &settings).await;

    // A skipped step 0: it still reads sa.pub alone.
    let a = pki.unflipped(&["sa.pub"]);
    let b = Server::Flipped(ExternalJwtApiServer::start(&signer.socket, Package::V1, ISSUER).await.unwrap());
    let from_b = eventually(WAIT, "a token from B", async || b.sign(&claims("b")).await).await;
    let err = a.verify(&from_b).await.unwrap_err();
    assert_eq!(err, "invalid signature, no keys found", "jwt.go: no key of the token's kid");
    // The other way works: step 1 serves sa.pub to the flipped server.
    let from_a = a.sign(&claims("a")).await.unwrap();
    b.verify(&from_a).await.unwrap();

    // The same server after step 0 accepts it.
    let out = pki.path("kmsgate-signer.pub");
    let exported = export(&settings, &out, &[]);
    assert_eq!(exported, vec![kid_of(&from_b)]);
    pki.unflipped(&["sa.pub", "kmsgate-signer.pub"]).verify(&from_b).await.unwrap();

    // Without --out the same file goes to stdout, and the summary to stderr.
    let mut command = common::kmsgate_command();
    command.args(["signer", "export-public-keys"]);
    for (key, value) in &settings {
        command.args(["--set", &format!("{key}={value}")]);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.stdout, std::fs::read(&out).unwrap(), "stdout holds the key file alone");

    // A failing read leaves the file the servers read as it was.
    let before = std::fs::read(&out).unwrap();
    bao.pause();
    let mut command = common::kmsgate_command();
    command.args(["signer", "export-public-keys", "--out"]).arg(&out);
    for (key, value) in settings.iter().filter(|(k, _)| k != "signer.backend_timeout") {
        command.args(["--set", &format!("{key}={value}")]);
    }
    command.args(["--set", "signer.backend_timeout=1s"]);
    let output = command.output().unwrap();
    bao.resume();
    assert!(!output.status.success(), "a read from a frozen OpenBao fails");
    assert_eq!(std::fs::read(&out).unwrap(), before, "the old file is untouched");
    signer.stop().await;
}

/// The optional first step: `sa.key` imported into Transit with the real `bao transit import`,
/// under a token holding only the shipped import policy. Its version 1 has sa.pub's kid, so a
/// server flipped to the signer issues tokens an unflipped server verifies with sa.pub alone.
#[tokio::test(flavor = "multi_thread")]
async fn sa_key_imported_into_transit_signs_with_the_old_kid() {
    let bao = Bao::start().await;
    let pki = Pki::new();
    let work = tempfile::tempdir().unwrap();
    let policy = std::fs::read_to_string("deploy/vault/signer-import-policy.hcl").unwrap();
    bao.post("sys/policies/acl/kmsgate-signer-import", json!({ "policy": policy })).await;
    let login = bao
        .post(
            "auth/token/create",
            json!({ "policies": ["kmsgate-signer-import"], "no_default_policy": true, "ttl": "10m" }),
        )
        .await;
    let import_token = login["auth"]["client_token"].as_str().unwrap().to_owned();

    // The runbook's commands: sa.key to PKCS#8 DER, standard base64, then the import.
    let pkcs8 = std::process::Command::new("openssl")
        .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
        .arg(pki.path("sa.key"))
        .output()
        .unwrap();
    assert!(pkcs8.status.success(), "{}", String::from_utf8_lossy(&pkcs8.stderr));
    let b64 = work.path().join("sa.key.b64");
    std::fs::write(&b64, base64::engine::general_purpose::STANDARD.encode(&pkcs8.stdout)).unwrap();
    let import = std::process::Command::new(common::bao_binary())
        .args(["transit", "import", &format!("transit/keys/{KEY}")])
        .arg(format!("@{}", b64.display()))
        .args(["type=rsa-2048", "allow_rotation=true"])
        .env("BAO_ADDR", &bao.addr)
        .env("BAO_TOKEN", &import_token)
        .env("HOME", work.path())
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "bao transit import: {}{}",
        String::from_utf8_lossy(&import.stdout),
        String::from_utf8_lossy(&import.stderr)
    );

    let token_file = signer_token(&bao, "rsa-2048", false, work.path()).await;
    let settings = vault_settings(&bao, &token_file, "rsa-2048");
    let exported = export(&settings, &pki.path("kmsgate-signer.pub"), &[]);
    assert_eq!(exported, vec![pki.sa_kid.clone()], "the imported version has sa.pub's kid");

    bao.post(&format!("transit/keys/{KEY}/config"), json!({ "min_encryption_version": 1 })).await;
    let mut signer_settings = settings.clone();
    signer_settings.push(("signer.verify_keys".to_owned(), pki.path("sa.pub").display().to_string()));
    let signer = SignerProcess::start(work.path(), &signer_settings).await;
    let flipped = ExternalJwtApiServer::start(&signer.socket, Package::V1, ISSUER).await.unwrap();
    // sa.pub and version 1 are one key: FetchKeys and the export list it once.
    let kids: Vec<String> = flipped.keys().into_iter().map(|k| k.kid).collect();
    assert_eq!(kids, vec![pki.sa_kid.clone()]);
    let all = export(&signer_settings, &work.path().join("all.pub"), &["--include-verify-keys"]);
    assert_eq!(all, kids);
    let token =
        eventually(WAIT, "a token from the flipped server", async || flipped.sign(&claims("b")).await).await;
    assert_eq!(kid_of(&token), pki.sa_kid, "Transit signs with the old kid");
    let unflipped = pki.unflipped(&["sa.pub"]);
    unflipped.verify(&token).await.unwrap();
    flipped.verify(&unflipped.sign(&claims("a")).await.unwrap()).await.unwrap();

    // allow_rotation=true lets the loop rotate the imported key later; the new version gets a
    // kid of its own, which is why every later rotation needs a new export.
    bao.post(&format!("transit/keys/{KEY}/rotate"), json!({})).await;
    let after = export(&settings, &pki.path("kmsgate-signer.pub"), &[]);
    assert_eq!(after.len(), 2);
    assert_eq!(after[0], pki.sa_kid);
    assert_ne!(after[1], pki.sa_kid);
    signer.stop().await;
}
