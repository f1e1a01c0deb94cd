//! `kmsgate tokens list|rotate`: the controller's token flows, once, with tables.

use std::{io::Write, sync::Arc, time::Duration};

use super::CommandError;
use crate::{
    crd::tokens::{self as policy, TokenPolicySpec},
    k8s::Kube,
    metrics::ControllerMetrics,
    tokens::{
        Clock, TokenError, age,
        legacy::{Candidate, Legacy, Outcome, Selection, Totals},
        managed::{Entry, Guard, Managed},
        rfc3339,
    },
};

/// What to look at.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The TokenPolicy (its rules, and where crash records go).
    pub policy: String,
    /// Overrides the policy's `legacy.maxAge`.
    pub older_than: Option<Duration>,
    /// Overrides the policy's `legacy.namespaces`.
    pub namespaces: Vec<String>,
    /// Overrides the policy's `legacy.labelSelector`.
    pub selector: Option<String>,
    /// kmsgate's own ServiceAccount (`namespace/name`), never issued.
    pub service_account: String,
    /// Only report.
    pub dry_run: bool,
    /// Show a progress line on stderr.
    pub progress: bool,
}

struct Plan {
    spec: TokenPolicySpec,
    selection: Selection,
    token_timeout: Duration,
    guard: Option<Guard>,
}

async fn plan(kube: &Kube, options: &Options, need_policy: bool) -> Result<Plan, CommandError> {
    let spec = match kube.token_policy(&options.policy).await? {
        Some(policy) => policy.spec,
        None if need_policy => return Err(TokenError::NoPolicy(options.policy.clone()).into()),
        None => {
            eprintln!("note: no TokenPolicy {:?}; showing the default rules", options.policy);
            TokenPolicySpec::default()
        }
    };
    let rules = policy::parse(&spec).map_err(TokenError::from)?;
    let mut selection = Selection::from_spec(&spec.legacy, rules.max_age);
    if let Some(older_than) = options.older_than {
        selection.max_age = older_than;
    }
    if !options.namespaces.is_empty() {
        selection.namespaces = options.namespaces.clone();
    }
    if let Some(selector) = &options.selector {
        selection.label_selector = Some(selector.clone());
    }
    let guard = spec.managed.enabled.then(|| Guard::new(&spec.managed, &rules, &options.service_account));
    Ok(Plan { spec, selection, token_timeout: rules.token_timeout, guard })
}

fn legacy_header(out: &mut impl Write) {
    let _ = writeln!(
        out,
        "{:<44} {:<24} {:>8} {:<11} {:<9} DETAIL",
        "SECRET", "SERVICEACCOUNT", "AGE", "LAST-USED", "RESULT"
    );
}

fn legacy_row(out: &mut impl Write, c: &Candidate, result: &str, detail: &str) {
    let _ = writeln!(
        out,
        "{:<44} {:<24} {:>8} {:<11} {:<9} {detail}",
        c.id(),
        c.service_account,
        age(c.age),
        c.last_used.as_deref().unwrap_or("-"),
        result
    );
}

fn managed_table(out: &mut impl Write, entries: &[Entry]) {
    let _ =
        writeln!(out, "{:<44} {:<24} {:<21} {:<21} STATE", "SECRET", "SERVICEACCOUNT", "EXPIRES", "REFRESH");
    for e in entries {
        let time = |t: Option<k8s_openapi::jiff::Timestamp>| t.map(rfc3339).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<44} {:<24} {:<21} {:<21} {}",
            e.id,
            e.service_account,
            time(e.expires),
            time(e.refresh),
            e.state
        );
    }
}

/// `kmsgate tokens list`: every legacy token Secret with its verdict, and every managed token.
pub async fn list(
    kube: &Kube,
    options: &Options,
    clock: Arc<dyn Clock>,
    out: &mut impl Write,
) -> Result<(), CommandError> {
    let plan = plan(kube, options, false).await?;
    let metrics = Arc::new(ControllerMetrics::new());
    let legacy = Legacy::new(kube, &options.policy, &*clock, &metrics, plan.token_timeout);
    let _ = writeln!(
        out,
        "Legacy token Secrets (rotate when older than {}):",
        age(plan.selection.max_age.as_secs() as i64)
    );
    legacy_header(out);
    for c in legacy.plan(&plan.selection).await? {
        legacy_row(out, &c, c.verdict.as_str(), &c.reason);
    }
    let _ = writeln!(out);
    match &plan.guard {
        Some(guard) => {
            let mut managed = Managed::new(kube.clone(), clock, metrics);
            let pass = managed.pass(&plan.spec.managed, guard, false).await?;
            let _ = writeln!(out, "Managed tokens:");
            managed_table(out, &pass.entries);
        }
        None => {
            let _ = writeln!(out, "Managed tokens: disabled (TokenPolicy spec.managed.enabled is false)");
        }
    }
    Ok(())
}

/// `kmsgate tokens rotate`: rotates due legacy Secrets and issues due managed tokens; with
/// `dry_run`, says what would be done and why. `Ok(false)` when something failed.
pub async fn rotate(
    kube: &Kube,
    options: &Options,
    clock: Arc<dyn Clock>,
    out: &mut impl Write,
) -> Result<bool, CommandError> {
    let plan = plan(kube, options, true).await?;
    let metrics = Arc::new(ControllerMetrics::new());
    let legacy = Legacy::new(kube, &options.policy, &*clock, &metrics, plan.token_timeout);
    let show = options.progress;
    let (results, totals) = legacy
        .run(&plan.selection, options.dry_run, |c, outcome, t: &Totals| {
            if show && outcome.is_some() {
                eprint!(
                    "\r{} due, {} rotated, {} failed, {} skipped  {:<50}",
                    t.due,
                    t.rotated,
                    t.failed,
                    t.skipped,
                    c.id()
                );
            }
        })
        .await?;
    if show {
        eprintln!();
    }
    let verb = if options.dry_run { "would rotate" } else { "rotated" };
    let _ = writeln!(
        out,
        "Legacy token Secrets ({verb} {}):",
        if options.dry_run { totals.due } else { totals.rotated }
    );
    legacy_header(out);
    for (c, outcome) in &results {
        let (result, detail) = match outcome {
            Some(Outcome::Rotated) => ("rotated", String::new()),
            Some(Outcome::Skipped(why)) => ("skipped", why.clone()),
            Some(Outcome::Failed(why)) if options.dry_run => ("would-fail", why.clone()),
            Some(Outcome::Failed(why)) => ("FAILED", why.clone()),
            None if options.dry_run && c.verdict == crate::tokens::legacy::Verdict::Rotate => {
                ("rotate", c.reason.clone())
            }
            None => (c.verdict.as_str(), c.reason.clone()),
        };
        legacy_row(out, c, result, &detail);
    }
    let mut failed = totals.failed;
    if let Some(guard) = &plan.guard {
        let mut managed = Managed::new(kube.clone(), clock, metrics);
        let pass = managed.pass(&plan.spec.managed, guard, !options.dry_run).await?;
        failed += pass.failing;
        let _ = writeln!(out);
        let _ = writeln!(out, "Managed tokens ({} issued or refreshed):", pass.refreshed);
        managed_table(out, &pass.entries);
    }
    Ok(failed == 0)
}
