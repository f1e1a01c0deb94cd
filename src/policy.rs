//! The `RotationPolicy` custom resource (`kmsgate.io/v1alpha1`, cluster-scoped): the policy the
//! controller follows in `spec` and the state of the current rotation in `status`, so a restarted
//! controller resumes where the last one stopped.

use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of kmsgate's resources.
pub const GROUP: &str = "kmsgate.io";

/// Annotation a person (or `kmsgate rotate`) sets to ask for a rotation now; any new value counts.
pub const REQUEST_ANNOTATION: &str = "kmsgate.io/rotate-requested";

/// What the controller does and how fast: the Transit key, the resources to re-encrypt, and the
/// converge, verify and retire rules.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "kmsgate.io",
    version = "v1alpha1",
    kind = "RotationPolicy",
    plural = "rotationpolicies",
    shortname = "rotpol",
    status = "RotationStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.toVersion"}"#,
    printcolumn = r#"{"name":"Rewritten","type":"integer","jsonPath":".status.totals.rewritten"}"#,
    printcolumn = r#"{"name":"Conflicts","type":"integer","jsonPath":".status.totals.conflicts"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.totals.failed"}"#,
    printcolumn = r#"{"name":"Result","type":"string","jsonPath":".status.result"}"#,
    printcolumn = r#"{"name":"Next","type":"string","jsonPath":".status.nextRun"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RotationPolicySpec {
    /// When to rotate: an interval (`720h`) or a 5-field cron expression in UTC (`0 3 * * 0`).
    /// Empty: only on request or when a new key version appears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The Transit key the plugins use.
    pub transit: TransitKey,
    /// Resources to re-encrypt, in order. Default: secrets.
    #[serde(default = "default_resources")]
    pub resources: Vec<ResourceRef>,
    /// Namespaces to re-encrypt; empty means all (cluster-scoped resources ignore it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Label selector for the objects to re-encrypt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,
    /// How objects are rewritten.
    #[serde(default)]
    pub migrate: MigrateSpec,
    /// How the controller decides every plugin and API server uses the new key.
    #[serde(default)]
    pub converge: ConvergeSpec,
    /// How the controller proves nothing is left on an old key.
    #[serde(default)]
    pub verify: VerifySpec,
    /// Whether and when old key versions are retired.
    #[serde(default)]
    pub retire: RetireSpec,
}

/// A Transit key.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TransitKey {
    /// Transit mount path.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// Key name.
    pub key: String,
}

/// A resource by API group and plural name, like `secrets` or `deployments.apps`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRef {
    /// API group; empty for the core group.
    #[serde(default)]
    pub group: String,
    /// Plural resource name.
    pub resource: String,
    /// Its key prefix in etcd below the API server's prefix; default `<resource>` for the core
    /// group and `<group>/<resource>` otherwise (the custom-resource layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_prefix: Option<String>,
}

impl ResourceRef {
    /// Parses `secrets` or `deployments.apps` (`resource.group`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (resource, group) = text.split_once('.').unwrap_or((text, ""));
        let valid =
            |s: &str| s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if resource.is_empty() || !valid(resource) || !valid(group) {
            return Err(format!("{text:?} is not a resource like secrets or deployments.apps"));
        }
        Ok(Self { group: group.to_owned(), resource: resource.to_owned(), etcd_prefix: None })
    }

    /// The etcd path below the API server's prefix, without slashes at either end.
    pub fn etcd_path(&self) -> String {
        match (&self.etcd_prefix, self.group.as_str()) {
            (Some(prefix), _) => prefix.trim_matches('/').to_owned(),
            (None, "") => self.resource.clone(),
            (None, group) => format!("{group}/{}", self.resource),
        }
    }
}

impl std::fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.group.as_str() {
            "" => f.write_str(&self.resource),
            group => write!(f, "{}.{group}", self.resource),
        }
    }
}

/// How to rewrite objects.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrateSpec {
    /// Most writes per second across all workers.
    #[serde(default = "default_qps")]
    pub qps: f64,
    /// Writes in flight.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Objects per list page.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Attempts per object on retryable errors (5xx, 429, timeouts).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// `Rewrite` (no-op patches) or `StorageVersionMigration` (falls back to rewriting).
    #[serde(default)]
    pub strategy: MigrateStrategy,
    /// How long a StorageVersionMigration may take before the controller rewrites instead.
    #[serde(default = "default_svm_timeout")]
    pub svm_timeout: String,
}

impl Default for MigrateSpec {
    fn default() -> Self {
        Self {
            qps: default_qps(),
            concurrency: default_concurrency(),
            page_size: default_page_size(),
            max_attempts: default_attempts(),
            strategy: MigrateStrategy::default(),
            svm_timeout: default_svm_timeout(),
        }
    }
}

/// How objects are rewritten.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum MigrateStrategy {
    /// A metadata-only list and a no-op merge patch per object.
    #[default]
    Rewrite,
    /// Create StorageVersionMigrations where served; rewrite when none completes in time.
    StorageVersionMigration,
}

/// Convergence rules.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConvergeSpec {
    /// Plugin status endpoints (`http://10.0.0.1:8787`), each must report the new key_id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<String>,
    /// Find plugin endpoints from Nodes instead (used when `plugins` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<PluginDiscovery>,
    /// Wait after every plugin reports the new key_id, so every API server polled Status and
    /// switched (facts: writes coast up to 3 min on the old seed; plus a 5 min buffer).
    #[serde(default = "default_settle")]
    pub settle: String,
    /// Read the API servers' key_id status metric and stop waiting once every API server is
    /// seen on the new key_id.
    #[serde(default = "default_true")]
    pub api_server_metrics: bool,
    /// Give up (failed condition, no migration) after this long.
    #[serde(default = "default_converge_timeout")]
    pub timeout: String,
}

impl Default for ConvergeSpec {
    fn default() -> Self {
        Self {
            plugins: Vec::new(),
            discovery: None,
            settle: default_settle(),
            api_server_metrics: true,
            timeout: default_converge_timeout(),
        }
    }
}

/// Plugin endpoints from Nodes: `http://<InternalIP>:<port>` for every matching node.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PluginDiscovery {
    /// Label selector of control-plane Nodes.
    #[serde(default = "default_node_selector")]
    pub node_selector: String,
    /// The plugin's `http.listen` port.
    #[serde(default = "default_plugin_port")]
    pub port: u16,
}

/// Verification rules.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    /// `Job` (a short-lived Job on a control-plane node reads etcd), `Etcd` (the controller's own
    /// read-only etcd user), or `None` (runs end unverified and never retire).
    #[serde(default)]
    pub mode: VerifyMode,
    /// The KMS provider `name` in the EncryptionConfiguration.
    #[serde(default = "default_provider")]
    pub provider: String,
    /// The API server's `--etcd-prefix`.
    #[serde(default = "default_etcd_prefix")]
    pub etcd_prefix: String,
    /// The Job, for mode `Job`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<VerifyJob>,
    /// Straggler rewrite-and-verify rounds before the run fails.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// How long one verification may take.
    #[serde(default = "default_verify_timeout")]
    pub timeout: String,
}

impl Default for VerifySpec {
    fn default() -> Self {
        Self {
            mode: VerifyMode::default(),
            provider: default_provider(),
            etcd_prefix: default_etcd_prefix(),
            job: None,
            max_rounds: default_rounds(),
            timeout: default_verify_timeout(),
        }
    }
}

/// Where verification reads etcd.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum VerifyMode {
    /// No etcd access: runs end "Unverified".
    #[default]
    None,
    /// A Job pinned to a control-plane node with the etcd client certificate.
    Job,
    /// The controller's `etcd.*` settings (a user whose role can only read).
    Etcd,
}

/// The verify Job's pod.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VerifyJob {
    /// The kmsgate image.
    pub image: String,
    /// Namespace of the Job (the controller's).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// ServiceAccount allowed to patch this policy's status.
    #[serde(default = "default_verify_sa")]
    pub service_account_name: String,
    /// etcd client URLs as seen from the node (hostNetwork).
    #[serde(default = "default_etcd_endpoints")]
    pub etcd_endpoints: Vec<String>,
    /// Host directory with the etcd CA and a client certificate readable by uid 65532 (see
    /// deploy/controller/etcd-verify-cert.sh), mounted read-only.
    #[serde(default = "default_pki_dir")]
    pub pki_host_path: String,
    /// CA file name inside that directory.
    #[serde(default = "default_ca_file")]
    pub ca_file: String,
    /// Client certificate file name.
    #[serde(default = "default_cert_file")]
    pub cert_file: String,
    /// Client key file name.
    #[serde(default = "default_key_file")]
    pub key_file: String,
}

/// Retirement rules.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetireSpec {
    /// Raise the key's `min_decryption_version` after a clean verify. Backups taken before can no
    /// longer be read; never enable it for a key another cluster shares.
    #[serde(default)]
    pub enabled: bool,
    /// Wait this long after the clean verify (time to notice problems and restore backups).
    #[serde(default = "default_grace")]
    pub grace: String,
}

impl Default for RetireSpec {
    fn default() -> Self {
        Self { enabled: false, grace: default_grace() }
    }
}

/// Where the rotation stands.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Phase {
    /// Nothing in progress.
    #[default]
    Idle,
    /// Asking Transit for a new version.
    Rotating,
    /// Waiting for every plugin and API server to use it.
    Converging,
    /// Rewriting objects.
    Migrating,
    /// Proving nothing is left on an old key.
    Verifying,
    /// Waiting out the grace period, then raising `min_decryption_version`.
    Retiring,
    /// Stopped at `failedPhase`; a new request or the schedule resumes there.
    Failed,
}

impl Phase {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "Idle",
            Self::Rotating => "Rotating",
            Self::Converging => "Converging",
            Self::Migrating => "Migrating",
            Self::Verifying => "Verifying",
            Self::Retiring => "Retiring",
            Self::Failed => "Failed",
        }
    }
}

/// Progress of one resource in the migrate phase.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceProgress {
    /// `secrets`, `deployments.apps`.
    pub resource: String,
    /// The namespace, when the policy lists namespaces.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// Objects the API server rewrote.
    #[serde(default)]
    pub rewritten: u64,
    /// Objects already current (the write was a no-op).
    #[serde(default)]
    pub unchanged: u64,
    /// Objects someone else wrote first (so they are re-encrypted).
    #[serde(default)]
    pub conflicts: u64,
    /// Objects deleted before their write.
    #[serde(default)]
    pub skipped: u64,
    /// Objects that still failed after every attempt.
    #[serde(default)]
    pub failed: u64,
    /// Where the next page starts; empty at the beginning.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub continue_token: String,
    /// Every page is done.
    #[serde(default)]
    pub complete: bool,
}

/// Sums over all resources.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    /// Objects rewritten.
    pub rewritten: u64,
    /// Conflicts.
    pub conflicts: u64,
    /// Deleted before their write.
    pub skipped: u64,
    /// Failed.
    pub failed: u64,
}

/// The result of one verification (from the controller or the verify Job).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// The run it belongs to.
    pub run_id: String,
    /// Round within the run, from 1.
    pub round: u32,
    /// The key_id every value must be on.
    pub key_id: String,
    /// The etcd revision scanned.
    pub revision: i64,
    /// Values read.
    pub objects: u64,
    /// This provider's values on the new key_id.
    pub current: u64,
    /// This provider's values on any other key_id.
    pub old_key: u64,
    /// This provider's values the API server could not read.
    pub invalid: u64,
    /// Plaintext, static-key or other-provider values of the configured resources.
    pub unencrypted: u64,
    /// Old-key values in resources the policy does not list (cannot be rewritten by name).
    pub unmapped: u64,
    /// Objects to rewrite by name, as `resource/namespace/name` (at most a bounded number).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stragglers: Vec<String>,
    /// More stragglers existed than are listed.
    #[serde(default)]
    pub truncated: bool,
    /// Nothing is left on an old key and nothing is unencrypted.
    pub clean: bool,
    /// When it finished (RFC 3339).
    pub finished_at: String,
    /// Why it could not finish, if it could not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// A standard condition.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready` (the last run succeeded) or `Stalled` (the current run cannot go on).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
}

/// The controller's record of the current and last rotation.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RotationStatus {
    /// Current phase.
    #[serde(default)]
    pub phase: Phase,
    /// The phase a failed run stopped in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_phase: Option<Phase>,
    /// Identifies the current run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run_id: String,
    /// `schedule`, `request` or `external` (a version made outside the controller).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trigger: String,
    /// Key version before the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<u64>,
    /// Key version the run moves to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_version: Option<u64>,
    /// key_id before the run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from_key_id: String,
    /// key_id the run moves to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub to_key_id: String,
    /// The highest version the controller has handled; a higher one appearing starts a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_version: Option<u64>,
    /// When the run started (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
    /// When the current phase started.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase_started_at: String,
    /// When every plugin first reported the new key_id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plugins_converged_at: String,
    /// Per-resource migrate progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub progress: Vec<ResourceProgress>,
    /// Sums of `progress`.
    #[serde(default)]
    pub totals: Totals,
    /// StorageVersionMigrations this run created (strategy StorageVersionMigration).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage_migrations: Vec<String>,
    /// The StorageVersionMigrations failed or timed out, so objects are rewritten instead.
    #[serde(default)]
    pub storage_migration_fallback: bool,
    /// Verify round in progress, from 1.
    #[serde(default)]
    pub verify_round: u32,
    /// The latest verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    /// The Transit key's `min_decryption_version` set by the last retire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_below: Option<u64>,
    /// `Succeeded`, `Unverified` or `Failed`, for the last finished run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub result: String,
    /// The last run's outcome or the current problem, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The request annotation value last acted on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub handled_request: String,
    /// When the last run succeeded (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_success: String,
    /// When the schedule next starts a run (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub next_run: String,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A spec value is invalid.
#[derive(Debug, thiserror::Error)]
#[error("RotationPolicy spec.{field}: {problem}")]
pub struct SpecError {
    /// The field, e.g. `converge.settle`.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

/// Parses a duration field like `8m`.
pub fn duration(field: &'static str, text: &str) -> Result<Duration, SpecError> {
    humantime::parse_duration(text)
        .map_err(|e| SpecError { field, problem: format!("{text:?} is not a duration like 8m: {e}") })
}

/// When a run is due.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Only on request or a new key version.
    Never,
    /// Every so long after the last run.
    Every(Duration),
    /// A cron expression, UTC.
    Cron(Box<croner::Cron>),
}

impl Schedule {
    /// Parses `spec.schedule`.
    pub fn parse(text: Option<&str>) -> Result<Self, SpecError> {
        let text = text.map(str::trim).unwrap_or("");
        if text.is_empty() {
            return Ok(Self::Never);
        }
        if let Ok(every) = humantime::parse_duration(text) {
            if every < Duration::from_secs(3600) {
                return Err(SpecError {
                    field: "schedule",
                    problem: "an interval must be at least 1h".into(),
                });
            }
            return Ok(Self::Every(every));
        }
        text.parse::<croner::Cron>().map(|c| Self::Cron(Box::new(c))).map_err(|e| SpecError {
            field: "schedule",
            problem: format!("{text:?} is neither an interval like 720h nor a cron expression: {e}"),
        })
    }

    /// The next start after `after` (Unix seconds), if any.
    pub fn next_after(&self, after: i64) -> Option<i64> {
        match self {
            Self::Never => None,
            Self::Every(every) => Some(after + every.as_secs() as i64),
            Self::Cron(cron) => {
                let start = chrono::DateTime::from_timestamp(after, 0)?;
                cron.find_next_occurrence(&start, false).ok().map(|t| t.timestamp())
            }
        }
    }
}

/// Checks every field the controller parses, so a bad policy fails once with a clear message.
pub fn validate(spec: &RotationPolicySpec) -> Result<(), SpecError> {
    let bad = |field, problem: &str| Err(SpecError { field, problem: problem.to_owned() });
    Schedule::parse(spec.schedule.as_deref())?;
    if spec.transit.key.is_empty() {
        return bad("transit.key", "required");
    }
    if spec.resources.is_empty() {
        return bad("resources", "list at least one resource");
    }
    if !(spec.migrate.qps > 0.0 && spec.migrate.qps <= 10_000.0) {
        return bad("migrate.qps", "must be above 0 and at most 10000");
    }
    if !(1..=256).contains(&spec.migrate.concurrency) {
        return bad("migrate.concurrency", "must be 1 to 256");
    }
    if !(1..=10_000).contains(&spec.migrate.page_size) {
        return bad("migrate.pageSize", "must be 1 to 10000");
    }
    if spec.migrate.max_attempts == 0 {
        return bad("migrate.maxAttempts", "must be at least 1");
    }
    duration("migrate.svmTimeout", &spec.migrate.svm_timeout)?;
    duration("converge.settle", &spec.converge.settle)?;
    duration("converge.timeout", &spec.converge.timeout)?;
    duration("verify.timeout", &spec.verify.timeout)?;
    duration("retire.grace", &spec.retire.grace)?;
    for url in &spec.converge.plugins {
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => return bad("converge.plugins", "entries must be http(s)://host:port URLs"),
        }
    }
    if spec.converge.plugins.is_empty() && spec.converge.discovery.is_none() {
        return bad("converge", "list plugins or set discovery, so convergence can be checked");
    }
    if spec.verify.mode == VerifyMode::Job && spec.verify.job.is_none() {
        return bad("verify.job", "required for mode Job");
    }
    if spec.verify.provider.is_empty() || spec.verify.provider.contains(':') {
        return bad("verify.provider", "must be the EncryptionConfiguration provider name (no ':')");
    }
    if spec.verify.max_rounds == 0 {
        return bad("verify.maxRounds", "must be at least 1");
    }
    Ok(())
}

/// The CRD as YAML, for `kmsgate crd` and deploy/.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;
    serde_saphyr::to_string(&RotationPolicy::crd())
}

fn default_resources() -> Vec<ResourceRef> {
    vec![ResourceRef { group: String::new(), resource: "secrets".into(), etcd_prefix: None }]
}
fn default_mount() -> String {
    "transit".into()
}
fn default_qps() -> f64 {
    20.0
}
fn default_concurrency() -> u32 {
    4
}
fn default_page_size() -> u32 {
    500
}
fn default_attempts() -> u32 {
    5
}
fn default_svm_timeout() -> String {
    "30m".into()
}
fn default_settle() -> String {
    "8m".into()
}
fn default_true() -> bool {
    true
}
fn default_converge_timeout() -> String {
    "1h".into()
}
fn default_node_selector() -> String {
    "node-role.kubernetes.io/control-plane".into()
}
fn default_plugin_port() -> u16 {
    8787
}
fn default_provider() -> String {
    "kmsgate".into()
}
fn default_etcd_prefix() -> String {
    "/registry".into()
}
fn default_rounds() -> u32 {
    3
}
fn default_verify_timeout() -> String {
    "30m".into()
}
fn default_grace() -> String {
    "24h".into()
}
fn default_namespace() -> String {
    "kmsgate".into()
}
fn default_verify_sa() -> String {
    "kmsgate-verify".into()
}
fn default_etcd_endpoints() -> Vec<String> {
    vec!["https://127.0.0.1:2379".into()]
}
fn default_pki_dir() -> String {
    "/etc/kmsgate/etcd-pki".into()
}
fn default_ca_file() -> String {
    "ca.crt".into()
}
fn default_cert_file() -> String {
    "kmsgate-verify.crt".into()
}
fn default_key_file() -> String {
    "kmsgate-verify.key".into()
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
        validate(&s).unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = spec();
        s.converge.settle = "soon".into();
        assert!(validate(&s).unwrap_err().to_string().starts_with("RotationPolicy spec.converge.settle:"));
        let mut s = spec();
        s.schedule = Some("every tuesday".into());
        assert!(validate(&s).unwrap_err().to_string().contains("spec.schedule"));
        let mut s = spec();
        s.converge.plugins.clear();
        assert!(validate(&s).is_err());
        let mut s = spec();
        s.verify.mode = VerifyMode::Job;
        assert!(validate(&s).unwrap_err().to_string().contains("verify.job"));
    }

    #[test]
    fn schedules_compute_the_next_run() {
        assert!(matches!(Schedule::parse(None).unwrap(), Schedule::Never));
        assert_eq!(Schedule::parse(Some("720h")).unwrap().next_after(1000), Some(1000 + 720 * 3600));
        assert!(Schedule::parse(Some("5m")).is_err());
        // 2026-11-26T20:00:00Z is a Thursday; the next Sunday 03:00 UTC is 2026-11-29T03:00:00Z.
        let cron = Schedule::parse(Some("0 3 * * 0")).unwrap();
        assert_eq!(cron.next_after(1_795_723_200), Some(1_795_921_200));
    }

    #[test]
    fn resource_refs_parse_and_map_to_etcd() {
        let r = ResourceRef::parse("deployments.apps").unwrap();
        assert_eq!((r.group.as_str(), r.resource.as_str()), ("apps", "deployments"));
        assert_eq!(r.etcd_path(), "apps/deployments");
        assert_eq!(ResourceRef::parse("secrets").unwrap().etcd_path(), "secrets");
        assert!(ResourceRef::parse("Secrets").is_err());
        assert!(ResourceRef::parse("").is_err());
    }

    #[test]
    fn crd_is_cluster_scoped_with_status_and_columns() {
        let yaml = crd_yaml().unwrap();
        assert!(yaml.contains("scope: Cluster"), "{yaml}");
        assert!(yaml.contains("name: v1alpha1"));
        assert!(yaml.contains("status: {}"));
        assert!(yaml.contains("jsonPath: .status.phase"));
    }
}
