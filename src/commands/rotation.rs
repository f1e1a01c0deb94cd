//! The rotation commands: `controller` (with the signing-key loop when configured), `rotate`, `reencrypt`, `retire`, `verify` and `crd`.

use std::{io::Write, sync::Arc};

use crate::{
    clock::{Clock, SystemClock},
    config::{BackendConfig, Config, EtcdConfig},
    controller::{self, View},
    crd::rotation::{self as policy, MigrateSettings, Phase, ResourceProgress, ResourceRef, RotationStatus},
    etcd::Scanner,
    k8s::Kube,
    metrics::ControllerMetrics,
    rotation::{Context, KeyAdmin, VaultKeys, migrate, verify},
    storage::{Current, Judge, Standing},
};

use super::{CommandError, request::Request};

pub(super) fn vault(config: &Config) -> Result<&crate::config::VaultConfig, CommandError> {
    match &config.backend {
        BackendConfig::Vault(v) => Ok(v),
        BackendConfig::Local { .. } => Err(CommandError::WrongBackend(
            "rotation works on Vault/OpenBao Transit keys: set backend.kind = \"vault\" (the local keyring rotates \
             with `kmsgate keyring rotate`)",
        )),
    }
}

/// A context with the controller's Vault identity and the inferred Kubernetes client.
async fn context(
    config: &Config,
    metrics: Arc<ControllerMetrics>,
) -> Result<Context<VaultKeys>, CommandError> {
    let v = vault(config)?;
    let client = super::vault_client(&v.client, metrics.vault.clone())?;
    tokio::spawn(client.clone().maintain());
    let keys = VaultKeys::new(client, &v.identity, &v.client.namespace);
    let kube = Kube::infer().await?;
    Ok(Context::new(kube, keys, config.etcd.clone(), metrics, config.controller.poll_interval))
}

fn holder(role: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{role}-{}-{}", crate::config::hostname(), &id[..8])
}

/// `kmsgate controller`: leader-elected rotation loop until SIGTERM.
pub async fn controller(config: Config) -> Result<(), CommandError> {
    let metrics = Arc::new(ControllerMetrics::new());
    let ctx = Arc::new(context(&config, metrics.clone()).await?);
    let view = Arc::new(View::new(metrics.clone()));
    if let Some(addr) = config.http_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CommandError::CannotRun(format!("http.listen {addr}: {e}")))?;
        tokio::spawn(crate::http::serve(listener, view.clone()));
    }
    let Some(signing_policy) = config.controller.signing_policy.clone() else {
        controller::run(ctx, &config.controller, holder("controller"), view, super::shutdown_signal()).await;
        return Ok(());
    };
    let signing = Arc::new(super::signing::context(&config, metrics).await?);
    let follow =
        move |leader| async move { controller::follow_signing(&signing, &signing_policy, leader).await };
    controller::run_with_signing(
        ctx,
        &config.controller,
        holder("controller"),
        view,
        follow,
        super::shutdown_signal(),
    )
    .await;
    Ok(())
}

/// One progress line for a status.
pub fn describe(status: &RotationStatus) -> String {
    let mut line = format!("{:<10}", status.phase.as_str());
    if let (Some(from), Some(to)) = (status.from_version, status.to_version) {
        line.push_str(&format!(" v{from} -> v{to}"));
    }
    let t = &status.totals;
    if status.phase == Phase::Migrating || t.rewritten + t.conflicts + t.failed > 0 {
        line.push_str(&format!(
            "  rewritten {} conflicts {} skipped {} failed {}",
            t.rewritten, t.conflicts, t.skipped, t.failed
        ));
    }
    if !status.message.is_empty() {
        line.push_str(&format!("  ({})", status.message));
    }
    line
}

/// `kmsgate rotate`: asks a running controller, or runs the loop here when none holds the Lease.
pub async fn rotate(config: Config, wait: bool, dry_run: bool) -> Result<(), CommandError> {
    let name = config.controller.policy.clone();
    let kube = Kube::infer().await?;
    let policy = kube.policy(&name).await?;
    let plan =
        policy::parse(&policy.spec).map_err(|e| CommandError::CannotRun(format!("policy {}: {e}", name)))?;
    let status = policy.status.clone().unwrap_or_default();
    if dry_run {
        let metrics = Arc::new(ControllerMetrics::new());
        let ctx = context(&config, metrics).await?;
        let meta = ctx.keys.metadata(&plan.transit).await?;
        println!(
            "policy {name}: phase {}, key {}/{}",
            status.phase.as_str(),
            plan.transit.mount,
            plan.transit.key
        );
        println!("would rotate version {} -> {}", meta.latest, meta.latest + 1);
        for (endpoint, report) in ctx.plugin_key_ids(&plan.converge).await? {
            match report {
                Ok(key_id) => println!("plugin {endpoint}: {key_id}"),
                Err(e) => println!("plugin {endpoint}: unreachable ({e})"),
            }
        }
        println!(
            "then rewrite {} ({} qps, {} in flight), verify: {:?}, retire: {}",
            plan.resources.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            plan.migrate.settings.qps(),
            plan.migrate.settings.concurrency(),
            policy.spec.verify.mode,
            if plan.retire.enabled {
                // NB: the spec's own text, so `24h` reads as written.
                format!("after {}", policy.spec.retire.grace)
            } else {
                "off".into()
            }
        );
        return Ok(());
    }
    let request = Request { config: &config.controller, kube: &kube, name: &name, describe };
    request.send(wait, None, holder("rotate"), async |metrics| context(&config, metrics).await).await
}

/// `kmsgate reencrypt` settings.
#[derive(Debug, Clone)]
pub struct Reencrypt {
    /// Resources.
    pub resources: Vec<ResourceRef>,
    /// Namespaces (empty: all).
    pub namespaces: Vec<String>,
    /// Engine settings.
    pub settings: MigrateSettings,
    /// A progress line on stderr.
    pub progress: bool,
}

/// `kmsgate reencrypt`: rewrites every object; `Ok(false)` when some writes failed.
pub async fn reencrypt(kube: &Kube, options: &Reencrypt, out: &mut impl Write) -> Result<bool, CommandError> {
    let pacer = migrate::Pacer::new(options.settings.qps());
    let started = std::time::Instant::now();
    let mut rows = Vec::new();
    for resource in &options.resources {
        let target = kube.resolve(&resource.id()).await?;
        let namespaces = if target.namespaced && !options.namespaces.is_empty() {
            options.namespaces.clone()
        } else {
            vec![String::new()]
        };
        for namespace in namespaces {
            let mut progress = ResourceProgress { resource: resource.id(), namespace, ..Default::default() };
            while !progress.complete {
                let failure =
                    migrate::run_page(kube, &target, &options.settings, &pacer, &mut progress, None).await?;
                if let Some(failure) = failure {
                    tracing::warn!(resource = %progress.resource, "{failure}");
                }
                if options.progress {
                    let done = progress.rewritten
                        + progress.unchanged
                        + progress.conflicts
                        + progress.skipped
                        + progress.failed;
                    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
                    eprint!(
                        "\r{} {}: {done} objects ({rate:.0}/s), {} failed   ",
                        progress.resource, progress.namespace, progress.failed
                    );
                }
            }
            rows.push(progress);
        }
    }
    if options.progress {
        eprintln!();
    }
    let verb = if options.settings.dry_run { "WOULD-WRITE" } else { "REWRITTEN" };
    let _ = writeln!(
        out,
        "{:<28} {:<20} {verb:>11} {:>9} {:>9} {:>7} {:>6}",
        "RESOURCE", "NAMESPACE", "UNCHANGED", "CONFLICTS", "SKIPPED", "FAILED"
    );
    let mut failed = 0;
    for p in &rows {
        failed += p.failed;
        let ns = if p.namespace.is_empty() { "(all)" } else { p.namespace.as_str() };
        let _ = writeln!(
            out,
            "{:<28} {ns:<20} {:>11} {:>9} {:>9} {:>7} {:>6}",
            p.resource, p.rewritten, p.unchanged, p.conflicts, p.skipped, p.failed
        );
    }
    Ok(failed == 0)
}

/// `kmsgate verify` (the verify Job's command): scans etcd and reports into the policy status.
pub async fn verify(
    policy_name: &str,
    run_id: &str,
    round: u32,
    etcd: &EtcdConfig,
) -> Result<bool, CommandError> {
    let kube = Kube::infer().await?;
    let policy = kube.policy(policy_name).await?;
    let status = policy.status.clone().unwrap_or_default();
    if status.run_id != run_id || status.phase != Phase::Verifying {
        return Err(CommandError::CannotRun(format!(
            "policy {policy_name} is not verifying run {run_id} (phase {}, run {}); this Job is stale",
            status.phase.as_str(),
            status.run_id
        )));
    }
    let plan = policy::parse(&policy.spec)
        .map_err(|e| CommandError::CannotRun(format!("policy {}: {e}", policy_name)))?;
    let input = verify::Input::new(&plan, &status.to_key_id, run_id, round);
    let result = match crate::etcd::connect(etcd).await {
        Ok(mut client) => {
            verify::scan(&mut client, &input, 5000, &SystemClock).await.map_err(|e| crate::error::chain(&e))
        }
        Err(e) => Err(crate::error::chain(&e)),
    };
    let verification = match result {
        Ok(v) => v,
        Err(error) => policy::Verification {
            run_id: run_id.to_owned(),
            round,
            key_id: input.key_id.clone(),
            error: format!("etcd: {error}"),
            finished_at: crate::clock::rfc3339(SystemClock.now()),
            ..Default::default()
        },
    };
    kube.report_verification(policy_name, &verification).await?;
    println!(
        "{} values: {} current, {} old key, {} invalid, {} unencrypted, clean: {}",
        verification.objects,
        verification.current,
        verification.old_key,
        verification.invalid,
        verification.unencrypted,
        verification.clean
    );
    Ok(verification.error.is_empty() && verification.clean)
}

/// Why `kmsgate retire` refuses: values that still need a version below the new floor.
#[derive(Debug, Default)]
pub struct RetireCheck {
    /// Values of the provider read.
    pub values: u64,
    /// Values on versions below the floor (or on key_ids that are not this key's).
    pub blockers: u64,
    /// A few examples, as etcd keys.
    pub examples: Vec<String>,
}

/// Scans every value of `provider` and counts those a floor of `to_version` would break.
pub async fn retire_check(
    client: &mut crate::etcd::Client,
    etcd_prefix: &str,
    provider: &str,
    scope: &crate::keyid::KeyScope,
    to_version: u64,
) -> Result<RetireCheck, CommandError> {
    let base = format!("{}/", etcd_prefix.trim_end_matches('/'));
    let mut check = RetireCheck::default();
    let judge = Judge { provider: Some(provider), current: Current::AtLeast { scope, version: to_version } };
    let mut pages = crate::etcd::Pages::new(Scanner::prefix(base.as_bytes(), 5000), client.clone());
    while let Some(page) = pages.next_page().await.map_err(|e| CommandError::Audit(e.to_string()))? {
        for kv in &page {
            let blocker = match judge.judge(&kv.value).standing {
                Standing::Current => false,
                Standing::Stale | Standing::Invalid => true,
                Standing::Other => continue,
            };
            check.values += 1;
            if blocker {
                check.blockers += 1;
                if check.examples.len() < 10 {
                    check.examples.push(String::from_utf8_lossy(&kv.key).into_owned());
                }
            }
        }
    }
    Ok(check)
}

/// `kmsgate retire`: raises `min_decryption_version` after a clean whole-provider audit, or with
/// `--force` and a logged reason.
pub async fn retire(
    config: &Config,
    to_version: u64,
    provider: &str,
    etcd_prefix: &str,
    force: Option<&str>,
) -> Result<(), CommandError> {
    let v = vault(config)?;
    let metrics = Arc::new(ControllerMetrics::new());
    let client = super::vault_client(&v.client, metrics.vault.clone())?;
    tokio::spawn(client.clone().maintain());
    let keys = VaultKeys::new(client, &v.identity, &v.client.namespace);
    let key = policy::TransitKey { mount: v.mount.clone(), key: v.key.clone() };
    let meta = keys.metadata(&key).await?;
    if to_version == 0 || to_version > meta.latest {
        return Err(CommandError::CannotRun(format!(
            "--to-version {to_version} must be between 1 and the latest version {}",
            meta.latest
        )));
    }
    if to_version <= meta.min_decryption_version {
        println!("min_decryption_version is already {}; nothing to do", meta.min_decryption_version);
        return Ok(());
    }
    match force {
        Some(reason) => tracing::warn!(to_version, reason, "retire forced without an audit"),
        None => {
            let etcd = config.etcd.as_ref().ok_or_else(|| {
                CommandError::CannotRun(
                    "retire needs a clean audit of every value: set etcd.* (or give --force with a reason)"
                        .into(),
                )
            })?;
            let mut client =
                crate::etcd::connect(etcd).await.map_err(|e| CommandError::Audit(e.to_string()))?;
            let check =
                retire_check(&mut client, etcd_prefix, provider, &keys.scope(&key), to_version).await?;
            if check.blockers > 0 {
                return Err(CommandError::Refused(format!(
                    "{} of {} values of provider {provider} need a version below {to_version} (e.g. {}); re-encrypt \
                     them first",
                    check.blockers,
                    check.values,
                    check.examples.join(", ")
                )));
            }
            println!(
                "audit: all {} values of provider {provider} are on version {to_version} or later",
                check.values
            );
        }
    }
    keys.retire_below(&key, to_version).await?;
    println!("min_decryption_version of {}/{} raised to {to_version}", key.mount, key.key);
    Ok(())
}
