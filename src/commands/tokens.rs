//! `kmsgate tokens list|rotate`: the controller's token flows, once, with tables.

use std::{io::Write, sync::Arc};

use super::CommandError;
use crate::{
    crd::tokens::{self as policy, LegacyPlan, ManagedPlan, MaxAge},
    k8s::Kube,
    metrics::ControllerMetrics,
    tokens::{
        Clock, TokenError, age,
        legacy::{Candidate, Legacy, Outcome, Totals},
        managed::{Entry, Guard, Managed},
        rfc3339,
    },
};

/// What to look at.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The TokenPolicy (its rules, and where crash records go).
    pub policy: String,
    /// Overrides the policy's `legacy.maxAge` (see [`older_than`]).
    pub older_than: Option<MaxAge>,
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

/// Parses `--older-than`: a duration like 720h, and no shorter than a policy's `legacy.maxAge`
/// may be.
pub fn older_than(text: &str) -> Result<MaxAge, TokenError> {
    let age = humantime::parse_duration(text)
        .map_err(|e| TokenError::Invalid(format!("--older-than: {e} (use a duration like 720h)")))?;
    MaxAge::new(age).map_err(|e| {
        TokenError::Invalid(format!("--older-than: {} (as a TokenPolicy's legacy.maxAge)", e.problem))
    })
}

/// The policy's plan with the flags applied.
struct Run {
    legacy: LegacyPlan,
    managed: ManagedPlan,
    guard: Option<Guard>,
}

async fn plan(kube: &Kube, options: &Options, need_policy: bool) -> Result<Run, CommandError> {
    if let Some(bad) = options.namespaces.iter().find(|n| !policy::is_namespace(n)) {
        let problem =
            format!("--namespace {bad:?}: not a namespace name (as a TokenPolicy's legacy.namespaces)");
        return Err(TokenError::Invalid(problem).into());
    }
    let plan = match kube.token_policy(&options.policy).await? {
        Some(policy) => policy::parse(&policy.spec),
        None if need_policy => return Err(TokenError::NoPolicy(options.policy.clone()).into()),
        None => {
            eprintln!("note: no TokenPolicy {:?}; showing the default rules", options.policy);
            policy::parse(&Default::default())
        }
    }
    .map_err(TokenError::from)?;
    let (mut legacy, managed) = (plan.legacy, plan.managed);
    let selection = &mut legacy.selection;
    if let Some(older_than) = options.older_than {
        selection.max_age = older_than;
    }
    if !options.namespaces.is_empty() {
        selection.namespaces = options.namespaces.clone();
    }
    if let Some(selector) = &options.selector {
        selection.label_selector = Some(selector.clone());
    }
    let guard = managed.enabled.then(|| Guard::new(&managed, &options.service_account));
    Ok(Run { legacy, managed, guard })
}

fn legacy_header(out: &mut impl Write) {
    let _ = writeln!(
        out,
        "{:<44} {:<24} {:>8} {:<14} {:<9} DETAIL",
        "SECRET", "SERVICEACCOUNT", "AGE", "LAST-USED(UTC)", "RESULT"
    );
}

fn legacy_row(out: &mut impl Write, c: &Candidate, result: &str, detail: &str) {
    let _ = writeln!(
        out,
        "{:<44} {:<24} {:>8} {:<14} {:<9} {detail}",
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
    let legacy = Legacy::new(kube, &options.policy, &*clock, &metrics, plan.legacy.token_timeout);
    let selection = &plan.legacy.selection;
    let _ = writeln!(
        out,
        "Legacy token Secrets (rotate when older than {}):",
        age(selection.max_age.duration().as_secs() as i64)
    );
    legacy_header(out);
    for c in legacy.plan(selection).await? {
        legacy_row(out, &c, c.verdict.as_str(), &c.reason);
    }
    let _ = writeln!(out);
    match &plan.guard {
        Some(guard) => {
            let mut managed = Managed::new(kube.clone(), clock, metrics);
            let pass = managed.pass(&plan.managed, guard, false).await?;
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
    let legacy = Legacy::new(kube, &options.policy, &*clock, &metrics, plan.legacy.token_timeout);
    let show = options.progress;
    let (results, totals) = legacy
        .run(&plan.legacy.selection, options.dry_run, |c, outcome, t: &Totals| {
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
        let pass = managed.pass(&plan.managed, guard, !options.dry_run).await?;
        failed += pass.failing;
        let _ = writeln!(out);
        let _ = writeln!(out, "Managed tokens ({} issued or refreshed):", pass.refreshed);
        managed_table(out, &pass.entries);
    }
    Ok(failed == 0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn older_than_has_the_policys_minimum() {
        assert_eq!(older_than("720h").unwrap().duration(), Duration::from_secs(720 * 3600));
        assert_eq!(older_than("1h").unwrap().duration(), MaxAge::MIN);
        let short = older_than("30m").unwrap_err().to_string();
        assert_eq!(short, "--older-than: must be at least 1h (as a TokenPolicy's legacy.maxAge)");
        assert!(older_than("soon").unwrap_err().to_string().starts_with("--older-than: "));
    }
}
