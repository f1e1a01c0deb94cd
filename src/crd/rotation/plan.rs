//! A RotationPolicy spec parsed once into typed values. The phases read only the [`Plan`], so a
//! field that does not parse stops the policy here, with its name, instead of falling back to a
//! default somewhere later.

use std::time::Duration;

use super::{
    MigrateStrategy, PluginDiscovery, ResourceRef, RotationPolicySpec, TransitKey, VerifyJob, VerifyMode,
};
use crate::crd::{
    field::{self, SpecError},
    schedule::Schedule,
};

/// The kind its errors name.
const KIND: &str = "RotationPolicy";

/// Everything the controller does for one policy, parsed and checked.
#[derive(Debug, Clone)]
pub struct Plan {
    /// When a run is due.
    pub schedule: Schedule,
    /// The Transit key the plugins use.
    pub transit: TransitKey,
    /// Resources to re-encrypt, in order (at least one).
    pub resources: Vec<ResourceRef>,
    /// Namespaces to re-encrypt; empty means all.
    pub namespaces: Vec<String>,
    /// How objects are rewritten.
    pub migrate: MigratePlan,
    /// How convergence is decided.
    pub converge: ConvergePlan,
    /// How the run is proven.
    pub verify: VerifyPlan,
    /// Whether and when old versions are retired.
    pub retire: RetirePlan,
}

/// The retire phase's settings.
#[derive(Debug, Clone, Copy)]
pub struct RetirePlan {
    /// Retire after a clean verify.
    pub enabled: bool,
    /// Wait this long after the clean verify.
    pub grace: Duration,
}

/// The migrate phase's settings.
#[derive(Debug, Clone)]
pub struct MigratePlan {
    /// The engine's limits and selector.
    pub settings: MigrateSettings,
    /// Rewrite, or try StorageVersionMigrations first.
    pub strategy: MigrateStrategy,
    /// How long StorageVersionMigrations may take before the controller rewrites instead.
    pub svm_timeout: Duration,
}

/// Where the plugin status endpoints come from.
#[derive(Debug, Clone)]
pub enum PluginSource {
    /// Listed `http(s)://host:port` URLs.
    Endpoints(Vec<String>),
    /// `http://<InternalIP>:<port>` of every matching Node.
    Discovery(PluginDiscovery),
}

/// The converge phase's settings.
#[derive(Debug, Clone)]
pub struct ConvergePlan {
    /// The plugins that must report the new key_id.
    pub plugins: PluginSource,
    /// How long API servers get after every plugin converged.
    pub settle: Duration,
    /// Whether the API servers' key_id metric may cut the settle time short.
    pub api_server_metrics: bool,
    /// When the run fails.
    pub timeout: Duration,
}

/// Where verification reads etcd.
#[derive(Debug, Clone)]
pub enum Verifier {
    /// Nowhere: runs end unverified.
    None,
    /// The controller's own read-only etcd user.
    Etcd,
    /// A Job on a control-plane node.
    Job(VerifyJob),
}

/// The verify phase's settings.
#[derive(Debug, Clone)]
pub struct VerifyPlan {
    /// Where it reads etcd.
    pub verifier: Verifier,
    /// The KMS provider name (no `:`).
    pub provider: String,
    /// The API server's `--etcd-prefix`.
    pub etcd_prefix: String,
    /// Straggler rounds before the run fails (at least 1).
    pub max_rounds: u32,
    /// How long one verification may take.
    pub timeout: Duration,
}

/// A re-encrypt engine limit, named for both the CRD field and the CLI flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateKnob {
    /// Writes in flight.
    Concurrency,
    /// Attempts per object.
    MaxAttempts,
    /// Objects per list page.
    PageSize,
    /// Writes per second.
    Qps,
}

impl MigrateKnob {
    /// The RotationPolicy field.
    pub fn spec_field(self) -> &'static str {
        match self {
            Self::Concurrency => "migrate.concurrency",
            Self::MaxAttempts => "migrate.maxAttempts",
            Self::PageSize => "migrate.pageSize",
            Self::Qps => "migrate.qps",
        }
    }

    /// The `kmsgate reencrypt` flag.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Concurrency => "--concurrency",
            Self::MaxAttempts => "--max-attempts",
            Self::PageSize => "--page-size",
            Self::Qps => "--qps",
        }
    }
}

/// A re-encrypt engine limit is out of range.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", knob.flag())]
pub struct SettingsError {
    /// The limit.
    pub knob: MigrateKnob,
    /// Its range.
    pub problem: &'static str,
}

/// How the re-encrypt engine writes; only [`MigrateSettings::new`] makes one, so the CRD and the
/// CLI share the limits.
#[derive(Debug, Clone)]
pub struct MigrateSettings {
    qps: f64,
    concurrency: usize,
    page_size: u32,
    max_attempts: u32,
    /// Label selector.
    pub selector: Option<String>,
    /// List only; write nothing (counts land in `rewritten` as "would write").
    pub dry_run: bool,
}

impl MigrateSettings {
    /// Most writes per second.
    pub const MAX_QPS: f64 = 10_000.0;
    /// Most writes in flight.
    pub const MAX_CONCURRENCY: usize = 256;
    /// Most objects per list page.
    pub const MAX_PAGE_SIZE: u32 = 10_000;

    /// Checks every limit; the selector is unset and `dry_run` off.
    pub fn new(
        qps: f64,
        concurrency: usize,
        page_size: u32,
        max_attempts: u32,
    ) -> Result<Self, SettingsError> {
        let bad = |knob, problem| Err(SettingsError { knob, problem });
        // NB: written so that NaN fails too.
        if !(qps > 0.0 && qps <= Self::MAX_QPS) {
            return bad(MigrateKnob::Qps, "must be above 0 and at most 10000");
        }
        if !(1..=Self::MAX_CONCURRENCY).contains(&concurrency) {
            return bad(MigrateKnob::Concurrency, "must be 1 to 256");
        }
        if !(1..=Self::MAX_PAGE_SIZE).contains(&page_size) {
            return bad(MigrateKnob::PageSize, "must be 1 to 10000");
        }
        if max_attempts == 0 {
            return bad(MigrateKnob::MaxAttempts, "must be at least 1");
        }
        Ok(Self { qps, concurrency, page_size, max_attempts, selector: None, dry_run: false })
    }

    /// Lifts the rate limit. No policy field or flag reaches this: it lets benchmarks measure the
    /// engine alone.
    pub fn unpaced(mut self) -> Self {
        self.qps = 1e9;
        self
    }

    /// Most writes per second.
    pub fn qps(&self) -> f64 {
        self.qps
    }

    /// Writes in flight.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Objects per list page.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Attempts per object on retryable errors.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }
}

/// Parses and checks every field, so a bad policy fails once with a message naming the field.
pub fn parse(spec: &RotationPolicySpec) -> Result<Plan, SpecError> {
    let bad = |field, problem: &str| Err(SpecError { kind: KIND, field, problem: problem.to_owned() });
    let schedule = field::schedule(KIND, spec.schedule.as_deref())?;
    if spec.transit.key.is_empty() {
        return bad("transit.key", "required");
    }
    if spec.resources.is_empty() {
        return bad("resources", "list at least one resource");
    }
    let m = &spec.migrate;
    let mut settings = MigrateSettings::new(m.qps, m.concurrency as usize, m.page_size, m.max_attempts)
        .map_err(|e| SpecError { kind: KIND, field: e.knob.spec_field(), problem: e.problem.to_owned() })?;
    settings.selector = spec.label_selector.clone();
    let migrate = MigratePlan {
        settings,
        strategy: m.strategy,
        svm_timeout: duration("migrate.svmTimeout", &m.svm_timeout)?,
    };
    let c = &spec.converge;
    let settle = duration("converge.settle", &c.settle)?;
    let converge_timeout = duration("converge.timeout", &c.timeout)?;
    let verify_timeout = duration("verify.timeout", &spec.verify.timeout)?;
    let grace = duration("retire.grace", &spec.retire.grace)?;
    if !field::http_urls(&c.plugins) {
        return bad("converge.plugins", "entries must be http(s)://host:port URLs");
    }
    let plugins = match (&c.plugins, &c.discovery) {
        (plugins, _) if !plugins.is_empty() => PluginSource::Endpoints(plugins.clone()),
        (_, Some(discovery)) => PluginSource::Discovery(discovery.clone()),
        (_, None) => return bad("converge", "list plugins or set discovery, so convergence can be checked"),
    };
    let v = &spec.verify;
    let verifier = match (v.mode, &v.job) {
        (VerifyMode::None, _) => Verifier::None,
        (VerifyMode::Etcd, _) => Verifier::Etcd,
        (VerifyMode::Job, Some(job)) => Verifier::Job(job.clone()),
        (VerifyMode::Job, None) => return bad("verify.job", "required for mode Job"),
    };
    if v.provider.is_empty() || v.provider.contains(':') {
        return bad("verify.provider", "must be the EncryptionConfiguration provider name (no ':')");
    }
    if v.max_rounds == 0 {
        return bad("verify.maxRounds", "must be at least 1");
    }
    Ok(Plan {
        schedule,
        transit: spec.transit.clone(),
        resources: spec.resources.clone(),
        namespaces: spec.namespaces.clone(),
        migrate,
        converge: ConvergePlan {
            plugins,
            settle,
            api_server_metrics: c.api_server_metrics,
            timeout: converge_timeout,
        },
        verify: VerifyPlan {
            verifier,
            provider: v.provider.clone(),
            etcd_prefix: v.etcd_prefix.clone(),
            max_rounds: v.max_rounds,
            timeout: verify_timeout,
        },
        retire: RetirePlan { enabled: spec.retire.enabled, grace },
    })
}

/// Parses a duration field like `8m`.
fn duration(field: &'static str, text: &str) -> Result<Duration, SpecError> {
    field::duration(KIND, field, text, "8m")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RotationPolicySpec {
        serde_json::from_value(serde_json::json!({
            "transit": {"key": "kmsgate"},
            "converge": {"plugins": ["http://10.0.0.1:8787"]}
        }))
        .unwrap()
    }

    #[test]
    fn defaults_fill_a_minimal_policy() {
        let s = spec();
        assert_eq!(s.transit.mount, "transit");
        assert_eq!(s.resources[0].to_string(), "secrets");
        assert_eq!(s.migrate.qps, 20.0);
        assert_eq!(s.converge.settle, "8m");
        assert_eq!(s.verify.mode, VerifyMode::None);
        assert!(!s.retire.enabled);
        let plan = parse(&s).unwrap();
        assert_eq!(plan.converge.settle, Duration::from_secs(480));
        assert_eq!(plan.verify.timeout, Duration::from_secs(1800));
        assert!(!plan.retire.enabled);
        assert!(matches!(plan.verify.verifier, Verifier::None));
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = spec();
        s.converge.settle = "soon".into();
        assert!(parse(&s).unwrap_err().to_string().starts_with("RotationPolicy spec.converge.settle:"));
        let mut s = spec();
        s.schedule = Some("every tuesday".into());
        assert!(parse(&s).unwrap_err().to_string().contains("spec.schedule"));
        let mut s = spec();
        s.converge.plugins.clear();
        assert!(parse(&s).is_err());
        let mut s = spec();
        s.verify.mode = VerifyMode::Job;
        assert!(parse(&s).unwrap_err().to_string().contains("verify.job"));
        let mut s = spec();
        s.migrate.concurrency = 300;
        assert!(parse(&s).unwrap_err().to_string().starts_with("RotationPolicy spec.migrate.concurrency:"));
    }

    #[test]
    fn the_cli_and_the_crd_share_the_engine_limits() {
        assert!(MigrateSettings::new(20.0, 256, 10_000, 1).is_ok());
        let knob = |r: Result<MigrateSettings, SettingsError>| r.unwrap_err().knob;
        assert_eq!(knob(MigrateSettings::new(20.0, 257, 500, 5)), MigrateKnob::Concurrency);
        assert_eq!(knob(MigrateSettings::new(f64::NAN, 4, 500, 5)), MigrateKnob::Qps);
        assert_eq!(knob(MigrateSettings::new(10_001.0, 4, 500, 5)), MigrateKnob::Qps);
        assert_eq!(knob(MigrateSettings::new(20.0, 4, 10_001, 5)), MigrateKnob::PageSize);
        assert_eq!(knob(MigrateSettings::new(20.0, 4, 500, 0)), MigrateKnob::MaxAttempts);
        let error = MigrateSettings::new(20.0, 0, 500, 5).unwrap_err().to_string();
        assert_eq!(error, "--concurrency: must be 1 to 256");
    }
}
