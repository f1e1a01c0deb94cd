//! `kmsgate selftest`: drives a running plugin exactly as kube-apiserver does, checks every answer
//! against the rules the API server applies, and stores one object the way the API server stores
//! it, then reads it back.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Request};
use zeroize::Zeroizing;

use crate::{
    config::SocketSpec,
    error,
    kms::client::{KmsClient, connect},
    proto::v2::{DecryptRequest, EncryptRequest, StatusRequest},
    storage::{self, DekSourceType, EncryptedObject},
};

/// The name of the first check, which reaches the socket.
const CONNECT: &str = "connect";

/// How to run the selftest.
#[derive(Debug, Clone)]
pub struct Options {
    /// The plugin's socket.
    pub socket: SocketSpec,
    /// The provider name to write into the stored value's prefix.
    pub provider: String,
    /// The per-call deadline (the API server's `timeout`).
    pub timeout: Duration,
    /// How long to keep asking Status until it says ok, as the API server re-probes a new plugin.
    pub wait: Duration,
}

/// One check and its outcome.
#[derive(Debug, Clone)]
pub struct Check {
    /// Short name.
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// Every check run.
#[derive(Debug, Default)]
pub struct Report {
    /// Checks in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    /// Why the plugin could not be reached at all (no socket, nobody listening), if so.
    pub fn unreachable(&self) -> Option<&str> {
        match self.checks.as_slice() {
            [c] if c.name == CONNECT && !c.ok => Some(&c.detail),
            _ => None,
        }
    }

    fn record(&mut self, name: &'static str, result: Result<String, String>) -> bool {
        let ok = result.is_ok();
        let detail = result.unwrap_or_else(|e| e);
        self.checks.push(Check { name, ok, detail });
        ok
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.checks {
            writeln!(f, "{:<5} {:<22} {}", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail)?;
        }
        let failed = self.checks.iter().filter(|c| !c.ok).count();
        write!(f, "selftest: {} passed, {failed} failed", self.checks.len() - failed)
    }
}

/// Runs every check; stops early only where later checks depend on an earlier answer.
pub async fn run(options: &Options) -> Report {
    let mut report = Report::default();
    let mut client = match connect(&options.socket).await {
        Ok(client) => client,
        Err(e) => {
            // NB: the whole chain: tonic's own text is only "transport error"; the cause
            // (no such file, connection refused) is in its source.
            report.record(CONNECT, Err(error::chain(&e)));
            return report;
        }
    };
    let call = Deadline(options.timeout);

    // Status, as isKMSv2ProviderHealthyAndMaybeRotateDEK checks it; a plugin that just started
    // may need a moment for its first probes, so re-ask until `wait` runs out.
    let give_up = tokio::time::Instant::now() + options.wait;
    let status = loop {
        let status = client.status(call.on(StatusRequest {})).await.map(|r| r.into_inner());
        let healthy = status.as_ref().is_ok_and(|s| s.healthz == "ok");
        if healthy || tokio::time::Instant::now() >= give_up {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let Some(status) = (match status {
        Ok(s) => {
            let verdict = check_status(&s.version, &s.healthz, &s.key_id);
            report.record("status", verdict.map(|()| format!("version={} key_id={}", s.version, s.key_id)));
            Some(s)
        }
        Err(e) => {
            report.record("status", Err(format!("Status failed: {}", describe(&e))));
            None
        }
    }) else {
        return report;
    };
    if !report.passed() {
        return report;
    }

    // Encrypt a fresh 32-byte seed, as the API server does once per key_id.
    let seed = random_seed();
    let encrypted = client
        .encrypt(call.on(EncryptRequest { plaintext: seed.to_vec(), uid: uuid::Uuid::new_v4().to_string() }))
        .await
        .map(|r| r.into_inner());
    let encrypted = match encrypted {
        Ok(e) => e,
        Err(e) => {
            report.record("encrypt", Err(format!("Encrypt failed: {}", describe(&e))));
            return report;
        }
    };
    let verdict =
        check_encrypt(&encrypted.ciphertext, &encrypted.key_id, &encrypted.annotations, &status.key_id);
    if !report.record("encrypt", verdict.map(|()| format!("{} byte ciphertext", encrypted.ciphertext.len())))
    {
        return report;
    }

    let other =
        client
            .encrypt(call.on(EncryptRequest {
                plaintext: random_seed().to_vec(),
                uid: uuid::Uuid::new_v4().to_string(),
            }))
            .await;
    report.record(
        "distinct ciphertexts",
        match other {
            Ok(o) if o.get_ref().ciphertext != encrypted.ciphertext => {
                Ok("two seeds, two ciphertexts".into())
            }
            Ok(_) => Err("two different seeds gave the same ciphertext".into()),
            Err(e) => Err(format!("second Encrypt failed: {}", describe(&e))),
        },
    );

    let decrypt = |ciphertext: Vec<u8>, key_id: String, annotations| {
        call.on(DecryptRequest { ciphertext, uid: uuid::Uuid::new_v4().to_string(), key_id, annotations })
    };
    let plain = client
        .decrypt(decrypt(
            encrypted.ciphertext.clone(),
            encrypted.key_id.clone(),
            encrypted.annotations.clone(),
        ))
        .await
        .map(|r| Zeroizing::new(r.into_inner().plaintext));
    report.record(
        "decrypt",
        match plain {
            Ok(p) if p.as_slice() == seed.as_slice() => Ok("seed recovered".into()),
            Ok(_) => Err("Decrypt returned different bytes than were encrypted".into()),
            Err(e) => Err(format!("Decrypt failed: {}", describe(&e))),
        },
    );

    // Store one object as the API server does, then read it back through a cache-miss Decrypt.
    let etcd_key = "/registry/secrets/kmsgate-selftest/selftest";
    let object = br#"{"kind":"Secret","apiVersion":"v1","metadata":{"name":"selftest","namespace":"kmsgate-selftest"},"data":{"k":"c2VsZnRlc3Q="}}"#;
    let stored = storage::seal_with_seed(seed.as_slice(), object, etcd_key.as_bytes()).map(|data| {
        EncryptedObject {
            encrypted_data: data,
            key_id: encrypted.key_id.clone(),
            encrypted_dek_source: encrypted.ciphertext.clone(),
            annotations: encrypted.annotations.clone(),
            dek_source_type: DekSourceType::HkdfSha256XnonceAesGcmSeed,
        }
        .to_value(&options.provider)
    });
    let read_back = match stored {
        Ok(value) => read_back(&mut client, &value, &options.provider, etcd_key, call).await,
        Err(e) => Err(format!("sealing the object failed: {e}")),
    };
    report.record(
        "store and read back",
        read_back.and_then(|plain| {
            if plain.as_slice() == object.as_slice() {
                Ok(format!("{etcd_key} under k8s:enc:kms:v2:{}:", options.provider))
            } else {
                Err("object read back differs from what was stored".into())
            }
        }),
    );

    // A plugin that accepts tampered input is broken, whatever else it does.
    let mut tampered = encrypted.ciphertext.clone();
    if let Some(last) = tampered.last_mut() {
        *last = if *last == b'A' { b'B' } else { b'A' };
    }
    let result =
        client.decrypt(decrypt(tampered, encrypted.key_id.clone(), encrypted.annotations.clone())).await;
    report.record("tampered ciphertext", refused(result));
    let result = client
        .decrypt(decrypt(
            encrypted.ciphertext.clone(),
            "selftest-unknown-key".into(),
            encrypted.annotations.clone(),
        ))
        .await;
    report.record("unknown key_id", refused(result));
    report
}

async fn read_back(
    client: &mut KmsClient,
    value: &[u8],
    provider: &str,
    etcd_key: &str,
    call: Deadline,
) -> Result<Zeroizing<Vec<u8>>, String> {
    let object =
        EncryptedObject::from_value(value, provider).map_err(|e| format!("stored value is invalid: {e}"))?;
    let seed = client
        .decrypt(call.on(DecryptRequest {
            ciphertext: object.encrypted_dek_source.clone(),
            uid: uuid::Uuid::new_v4().to_string(),
            key_id: object.key_id.clone(),
            annotations: object.annotations.clone(),
        }))
        .await
        .map(|r| Zeroizing::new(r.into_inner().plaintext))
        .map_err(|e| format!("Decrypt of the stored DEK seed failed: {}", describe(&e)))?;
    storage::open_with_seed(&seed, &object.encrypted_data, etcd_key.as_bytes())
        .map_err(|e| format!("object does not decrypt: {e}"))
}

/// Requests carry the API server's per-call deadline as grpc-timeout.
#[derive(Clone, Copy)]
struct Deadline(Duration);

impl Deadline {
    fn on<T>(self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.0);
        request
    }
}

/// The API server's Status acceptance rules.
pub fn check_status(version: &str, healthz: &str, key_id: &str) -> Result<(), String> {
    if version != "v2" && version != "v2beta1" {
        return Err(format!("version {version:?} is not v2 or v2beta1"));
    }
    if healthz != "ok" {
        // NB: the plugin's text, shown as written so a cause can be searched for; only control
        // characters, which could forge lines on a terminal, are blanked.
        let shown: String = healthz.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        return Err(format!("healthz is not \"ok\": {shown}"));
    }
    storage::validate_key_id(key_id).map_err(|e| e.to_string())
}

/// The API server's EncryptResponse rules.
pub fn check_encrypt(
    ciphertext: &[u8],
    key_id: &str,
    annotations: &HashMap<String, Vec<u8>>,
    status_key_id: &str,
) -> Result<(), String> {
    storage::validate_ciphertext(ciphertext).map_err(|e| e.to_string())?;
    storage::validate_key_id(key_id).map_err(|e| e.to_string())?;
    storage::validate_annotations(annotations).map_err(|e| e.to_string())?;
    if key_id != status_key_id {
        return Err(format!("Encrypt key_id {key_id:?} differs from Status key_id {status_key_id:?}"));
    }
    Ok(())
}

fn refused<T>(result: Result<T, tonic::Status>) -> Result<String, String> {
    match result {
        Ok(_) => Err("plugin accepted it".into()),
        Err(e) if e.code() == Code::InvalidArgument => Ok("refused with INVALID_ARGUMENT".into()),
        Err(e) => Ok(format!("refused with {:?}", e.code())),
    }
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn random_seed() -> Zeroizing<[u8; 32]> {
    let mut seed = Zeroizing::new([0u8; 32]);
    // NB: a failed system random source leaves zeros; the distinct-ciphertext check still holds
    // because Encrypt adds its own nonce, and the selftest only needs a value to round-trip.
    let _ = getrandom::fill(seed.as_mut_slice());
    seed
}
