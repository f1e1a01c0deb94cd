//! The `spec` half of a RotationPolicy: what the controller does and how fast, as written.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{resource::ResourceRef, status::RotationStatus};
use crate::crd::policy::{Policy, PolicySpec};

/// What the controller does and how fast: the Transit key, the resources to re-encrypt, and the
/// converge, verify and retire rules.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
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
/// A RotationPolicy object.
pub type RotationPolicy = Policy<RotationPolicySpec>;

impl PolicySpec for RotationPolicySpec {
    type Status = RotationStatus;
    const KIND: &'static str = "RotationPolicy";
    const PLURAL: &'static str = "rotationpolicies";
    const CRD_NAME: &'static str = "rotationpolicies.kmsgate.io";
    const SHORT_NAMES: &'static [&'static str] = &["rotpol"];
    const COLUMNS: &'static [(&'static str, &'static str, &'static str)] = &[
        ("Phase", "string", ".status.phase"),
        ("Version", "integer", ".status.toVersion"),
        ("Rewritten", "integer", ".status.totals.rewritten"),
        ("Conflicts", "integer", ".status.totals.conflicts"),
        ("Failed", "integer", ".status.totals.failed"),
        ("Result", "string", ".status.result"),
        ("Next", "string", ".status.nextRun"),
    ];
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

    #[test]
    fn crd_is_cluster_scoped_with_status_and_columns() {
        let yaml = crate::crd::policy::crd_yaml::<RotationPolicySpec>().unwrap();
        assert!(yaml.contains("scope: Cluster"), "{yaml}");
        assert!(yaml.contains("name: v1alpha1"));
        assert!(yaml.contains("status: {}"));
        assert!(yaml.contains("jsonPath: .status.phase"));
    }
}
