//! `kmsgate signer rotate`, and the signing-key loop's context for `kmsgate controller`.

use std::sync::Arc;

use crate::{
    config::Config,
    crd::signing::{self, SignerSource, SigningPhase, SigningStatus},
    k8s::Kube,
    metrics::ControllerMetrics,
    signing_rotation::{
        ClusterFleet, Context, Fleet, Idle, SigningKeyAdmin, SigningKeyState, SigningRotationError,
        VaultSigningKey,
        decide::{self, Rotate},
    },
};

#[cfg(test)]
use super::request::unhandled;
use super::{
    CommandError,
    request::{Patience, Request},
    rotation::vault,
};

/// The signing-key loop's context: the controller's Vault identity on the signing key, and the
/// cluster (signers, API servers) through the inferred Kubernetes client.
pub async fn context(
    config: &Config,
    metrics: Arc<ControllerMetrics>,
) -> Result<Context<VaultSigningKey, ClusterFleet>, CommandError> {
    let v = vault(config)?;
    let client = super::vault_client(&v.client, metrics.vault.clone())?;
    tokio::spawn(client.clone().maintain());
    let key = VaultSigningKey::new(client, &v.identity, &v.client.namespace);
    let kube = Kube::infer().await?;
    let fleet = ClusterFleet::new(kube.clone(), &config.controller.service_account);
    Ok(Context::new(kube, key, fleet, metrics, config.controller.poll_interval))
}

/// One line on where a signing-key run stands.
pub fn describe(status: &SigningStatus) -> String {
    let mut line = format!("{:<10}", status.phase.as_str());
    if let (Some(from), Some(to)) = (status.from_version, status.to_version) {
        line.push_str(&format!(" v{from} -> v{to}"));
    }
    if status.phase == SigningPhase::Draining && !status.drain_until.is_empty() {
        line.push_str(&format!("  until {}", status.drain_until));
    }
    if !status.message.is_empty() {
        line.push_str(&format!("  ({})", status.message));
    }
    line
}

/// `kmsgate signer rotate`: asks a running controller, or runs the loop here when none holds the
/// Lease. A run lasts at least as long as the longest token, so without a controller `--wait`
/// is implied and this process must stay up until Retire.
pub async fn rotate(config: Config, wait: bool, dry_run: bool) -> Result<(), CommandError> {
    let Some(name) = config.controller.signing_policy.clone() else {
        return Err(CommandError::CannotRun(
            "controller.signing_policy names no SigningKeyPolicy; set it (or KMSGATE_CONTROLLER_SIGNING_POLICY)"
                .into(),
        ));
    };
    let kube = Kube::infer().await?;
    let policy = kube.signing_policy(&name).await?;
    let plan =
        signing::parse(&policy.spec).map_err(|e| CommandError::CannotRun(format!("policy {name}: {e}")))?;
    let status = policy.status.clone().unwrap_or_default();
    if dry_run {
        let ctx = context(&config, Arc::new(ControllerMetrics::new())).await?;
        return dry_run_report(&ctx, &name, &plan, &status).await;
    }
    if plan.suspend {
        return Err(CommandError::Refused(format!(
            "SigningKeyPolicy {name} is suspended (spec.suspend); no run starts until it is resumed"
        )));
    }
    // NB: a holder without controller.signing_policy never handles the annotation.
    let patience = Patience {
        wait: config.controller.poll_interval * UNHANDLED_POLLS,
        setting: "controller.signing_policy",
    };
    let holder = format!("signer-rotate-{}", crate::config::hostname());
    let request = Request { config: &config.controller, kube: &kube, name: &name, describe };
    request.send(wait, Some(patience), holder, async |metrics| context(&config, metrics).await).await
}

async fn dry_run_report<K: SigningKeyAdmin, F: Fleet>(
    ctx: &Context<K, F>,
    name: &str,
    plan: &signing::Plan,
    status: &SigningStatus,
) -> Result<(), CommandError> {
    let meta = ctx.key.metadata(&plan.transit).await.map_err(SigningRotationError::from)?;
    let signing = crate::signing_rotation::decide::signing_version(&meta);
    println!(
        "policy {name}: phase {}, key {}/{}, signing version {signing}, latest {}{}",
        status.phase.as_str(),
        plan.transit.mount,
        plan.transit.key,
        meta.latest,
        if plan.suspend { " (suspended)" } else { "" }
    );
    let endpoints = match &plan.signers {
        SignerSource::Endpoints(endpoints) => endpoints.clone(),
        SignerSource::Discovery(d) => ctx.kube.node_endpoints(&d.node_selector, d.port).await?,
    };
    let mut reports = Vec::new();
    for endpoint in endpoints {
        let report = decide::vet_report(ctx.fleet.signer_status(&endpoint).await);
        match report.clone() {
            Ok(s) => println!(
                "signer {endpoint}: signs with {}, publishes {}, max token {}s, refresh hint {}s",
                s.signing.map_or("nothing".into(), |k| k.kid),
                s.published.len(),
                s.max_token_expiration_seconds.map_or("?".into(), |v| v.to_string()),
                s.refresh_hint_seconds.map_or("?".into(), |v| v.to_string()),
            ),
            Err(e) => println!("signer {endpoint}: unreachable ({e})"),
        }
        reports.push((endpoint, report));
    }
    println!("{}", planned(status, &meta, decide::agreed_signing_kid(&reports).as_deref()));
    match ctx.fleet.api_servers().await {
        Ok(servers) => {
            for server in servers {
                match server.metrics {
                    Ok(m) if m.fetch_keys_success.is_some() => {
                        println!("API server {}: verifies through the signer", server.address)
                    }
                    Ok(_) => println!(
                        "API server {}: not flipped to the signer (the run would wait)",
                        server.address
                    ),
                    Err(e) => println!("API server {}: unreadable ({e})", server.address),
                }
            }
        }
        Err(e) => println!("API servers: cannot be listed ({e})"),
    }
    let bound = status
        .max_token_expiration_seconds
        .map_or("the longest token the signers report".into(), |b| format!("{b}s"));
    println!(
        "then publish (refresh hint + {:?}), switch, drain for {bound} + {:?}, and raise min_decryption_version",
        plan.publish.margin, plan.drain.skew
    );
    Ok(())
}

/// What a requested run would do first, decided as the loop decides it from the stored status:
/// [`decide::decide_idle`], then [`decide::decide_rotate`].
fn planned(status: &SigningStatus, meta: &SigningKeyState, signing_kid: Option<&str>) -> String {
    if status.phase != SigningPhase::Idle {
        return format!(
            "a run is in progress ({}, from version {}); the request resumes or is satisfied by it",
            status.phase.as_str(),
            status.from_version.map_or("?".into(), |v| v.to_string())
        );
    }
    let (from, adopt) = match decide::decide_idle(status.known_version, meta, signing_kid, true, false) {
        Idle::Start { trigger, from } => (from, format!("would start a run ({trigger}) from version {from}")),
        Idle::Adopt(version) => (version, format!("would adopt version {version}, then start a run from it")),
        Idle::Behind { known } => return format!("would wait: {}", decide::behind_message(known, meta)),
        Idle::Unsettled | Idle::Rest => {
            return "would wait: the key is not pinned and the signers do not agree on a signing kid Transit holds".into();
        }
    };
    let pin = match decide::decide_rotate(from, meta) {
        Rotate::Pin(v) => format!("pin min_encryption_version to {v}, then "),
        _ => String::new(),
    };
    match meta.latest > from {
        true => format!("{adopt}: {pin}switch to version {}, which exists (no rotate)", meta.latest),
        false => format!("{adopt}: {pin}rotate to version {}", meta.latest + 1),
    }
}

/// Poll intervals `--wait` gives an idle controller to take the request before giving up.
const UNHANDLED_POLLS: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(latest: u64, min_enc: u64) -> SigningKeyState {
        SigningKeyState {
            latest,
            min_encryption_version: min_enc,
            min_decryption_version: 1,
            kids: (1..=latest).map(|v| (v, format!("kid-{v}"))).collect(),
        }
    }

    #[test]
    fn the_dry_run_plan_is_the_one_the_loop_runs() {
        let known = |v| SigningStatus { known_version: Some(v), ..SigningStatus::default() };
        assert_eq!(
            planned(&known(2), &key(3, 2), None),
            "would start a run (external) from version 2: switch to version 3, which exists (no rotate)"
        );
        assert_eq!(
            planned(&known(3), &key(3, 0), None),
            "would start a run (request) from version 3: pin min_encryption_version to 3, then rotate to version 4"
        );
        assert_eq!(
            planned(&SigningStatus::default(), &key(3, 0), Some("kid-2")),
            "would adopt version 2, then start a run from it: pin min_encryption_version to 2, then switch to version 3, which exists (no rotate)"
        );
        assert!(
            planned(&known(3), &key(2, 2), None)
                .starts_with("would wait: Transit's key shows latest version 2 and min_encryption_version 2, behind version 3"),
            "a restored key is neither adopted nor rotated from"
        );
        let running = SigningStatus { phase: SigningPhase::Draining, from_version: Some(1), ..known(1) };
        assert!(planned(&running, &key(2, 2), None).starts_with("a run is in progress (Draining"));
    }

    #[test]
    fn wait_gives_up_only_on_a_resting_policy_that_never_took_the_request() {
        let patience = std::time::Duration::from_secs(120);
        let long = std::time::Duration::from_secs(121);
        let idle = SigningStatus { handled_request: "old".into(), ..SigningStatus::default() };
        assert!(unhandled(&idle, "new", long, patience));
        assert!(!unhandled(&idle, "new", patience, patience), "a few polls first");
        let taken = SigningStatus { handled_request: "new".into(), ..SigningStatus::default() };
        assert!(!unhandled(&taken, "new", long, patience));
        let draining = SigningStatus { phase: SigningPhase::Draining, ..idle.clone() };
        assert!(!unhandled(&draining, "new", long, patience), "a run in progress takes it at its end");
    }
}
