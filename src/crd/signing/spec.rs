//! The `spec` half of a SigningKeyPolicy: which Transit key, where the signers are, and the
//! margins and timeouts of each phase, as written.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::SigningStatus;
use crate::crd::{
    policy::{Policy, PolicySpec},
    rotation::TransitKey,
};

/// How the controller rotates the service-account signing key: Rotate, Publish, Switch, Drain,
/// Retire, each proven before the next.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SigningKeyPolicySpec {
    /// When to rotate: an interval (`2160h`) or a 5-field cron expression in UTC. Empty: only on
    /// request or when a new key version appears. A time that comes due during a run starts the
    /// next run as soon as this one retires its old version (see docs/signer-rotation.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Pause: no run starts, and a run in progress holds where it is (the `sa.key` migration
    /// runbook pauses the policy while some API servers verify only against their key files).
    #[serde(default)]
    pub suspend: bool,
    /// The Transit key the signers sign with.
    pub transit: TransitKey,
    /// Where the signers' `/status` endpoints are.
    #[serde(default)]
    pub signers: SignersSpec,
    /// Rotate phase rules.
    #[serde(default)]
    pub rotate: RotateSpec,
    /// Publish phase rules.
    #[serde(default)]
    pub publish: PublishSpec,
    /// Switch phase rules.
    #[serde(default)]
    pub switch: SwitchSpec,
    /// Drain phase rules.
    #[serde(default)]
    pub drain: DrainSpec,
    /// Retire phase rules.
    #[serde(default)]
    pub retire: RetireSpec,
}

/// The signers' status endpoints.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SignersSpec {
    /// Signer status endpoints (`http://10.0.0.1:8789`); each must show every step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Find signer endpoints from Nodes instead (used when `endpoints` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<SignerDiscovery>,
}

/// Signer endpoints from Nodes: `http://<InternalIP>:<port>` for every matching node.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SignerDiscovery {
    /// Label selector of control-plane Nodes.
    #[serde(default = "default_node_selector")]
    pub node_selector: String,
    /// The signer's `signer.http_listen` port.
    #[serde(default = "default_signer_port")]
    pub port: u16,
}

/// Rotate phase rules.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RotateSpec {
    /// Give up (failed condition) after this long.
    #[serde(default = "default_rotate_timeout")]
    pub timeout: String,
}

impl Default for RotateSpec {
    fn default() -> Self {
        Self { timeout: default_rotate_timeout() }
    }
}

/// Publish phase rules.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PublishSpec {
    /// Wait this long beyond the signers' `refresh_hint_seconds` after the last signer listed
    /// the new kid, so verifiers outside the cluster caching the OIDC key set have it too.
    #[serde(default = "default_publish_margin")]
    pub margin: String,
    /// Give up after this long.
    #[serde(default = "default_publish_timeout")]
    pub timeout: String,
}

impl Default for PublishSpec {
    fn default() -> Self {
        Self { margin: default_publish_margin(), timeout: default_publish_timeout() }
    }
}

/// Switch phase rules.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SwitchSpec {
    /// The throwaway audience of the TokenRequest sent to each API server (with the
    /// controller's own account, `controller.service_account`) to read the kid it signs with.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Give up after this long.
    #[serde(default = "default_switch_timeout")]
    pub timeout: String,
}

impl Default for SwitchSpec {
    fn default() -> Self {
        Self { audience: default_audience(), timeout: default_switch_timeout() }
    }
}

/// Drain phase rules.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Added to the longest token lifetime, for clock skew between the API servers, the
    /// controller and the token's verifiers.
    #[serde(default = "default_skew")]
    pub skew: String,
}

impl Default for DrainSpec {
    fn default() -> Self {
        Self { skew: default_skew() }
    }
}

/// Retire phase rules.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetireSpec {
    /// Give up if the signers still publish the old kid this long after `min_decryption_version`
    /// was raised.
    #[serde(default = "default_retire_timeout")]
    pub timeout: String,
}

impl Default for RetireSpec {
    fn default() -> Self {
        Self { timeout: default_retire_timeout() }
    }
}

/// A SigningKeyPolicy object.
pub type SigningKeyPolicy = Policy<SigningKeyPolicySpec>;

impl PolicySpec for SigningKeyPolicySpec {
    type Status = SigningStatus;
    const KIND: &'static str = "SigningKeyPolicy";
    const PLURAL: &'static str = "signingkeypolicies";
    const CRD_NAME: &'static str = "signingkeypolicies.kmsgate.io";
    const SHORT_NAMES: &'static [&'static str] = &["signpol"];
    const COLUMNS: &'static [(&'static str, &'static str, &'static str)] = &[
        ("Phase", "string", ".status.phase"),
        ("Version", "integer", ".status.toVersion"),
        ("Suspended", "boolean", ".spec.suspend"),
        ("Drain-Until", "string", ".status.drainUntil"),
        ("Result", "string", ".status.result"),
        ("Next", "string", ".status.nextRun"),
    ];
}

fn default_node_selector() -> String {
    "node-role.kubernetes.io/control-plane".into()
}
fn default_signer_port() -> u16 {
    8789
}
fn default_rotate_timeout() -> String {
    "10m".into()
}
fn default_publish_margin() -> String {
    "5m".into()
}
fn default_publish_timeout() -> String {
    "2h".into()
}
fn default_audience() -> String {
    "kmsgate.io/signing-key-check".into()
}
fn default_switch_timeout() -> String {
    "30m".into()
}
fn default_skew() -> String {
    "5m".into()
}
fn default_retire_timeout() -> String {
    "30m".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_is_cluster_scoped_with_status_and_columns() {
        let yaml = crate::crd::policy::crd_yaml::<SigningKeyPolicySpec>().unwrap();
        assert!(yaml.contains("scope: Cluster") && yaml.contains("kind: SigningKeyPolicy"), "{yaml}");
        assert!(yaml.contains("status: {}"));
        assert!(yaml.contains("jsonPath: .status.phase"));
        assert!(yaml.contains("jsonPath: .status.drainUntil"));
    }
}
