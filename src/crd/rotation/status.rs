//! The `status` half of a RotationPolicy: the controller's record of the current and last run,
//! written after every step so a restarted controller resumes where the last one stopped.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resource::ResourceId;
use crate::crd::status::Condition;

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
    /// Every phase, in the order a run goes through them.
    pub const ALL: [Self; 7] = [
        Self::Idle,
        Self::Rotating,
        Self::Converging,
        Self::Migrating,
        Self::Verifying,
        Self::Retiring,
        Self::Failed,
    ];

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
    #[schemars(with = "String")]
    pub resource: ResourceId,
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
    #[schemars(with = "Vec<String>")]
    pub stragglers: Vec<Straggler>,
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

/// An object verify found on an old key (or unencrypted), to rewrite by name; written as
/// `resource/namespace/name`, with an empty namespace for cluster-scoped objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Straggler {
    /// Its resource.
    pub resource: ResourceId,
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for Straggler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.resource, self.namespace, self.name)
    }
}

impl std::str::FromStr for Straggler {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let not_one = || format!("{text:?} is not a straggler like secrets/namespace/name");
        let (resource, rest) = text.split_once('/').ok_or_else(not_one)?;
        let (namespace, name) = rest.split_once('/').ok_or_else(not_one)?;
        if name.is_empty() {
            return Err(not_one());
        }
        Ok(Self { resource: resource.parse()?, namespace: namespace.to_owned(), name: name.to_owned() })
    }
}

impl Serialize for Straggler {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Straggler {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stragglers_round_trip_through_their_text_form() {
        let s: Straggler = "deployments.apps/default/web".parse().unwrap();
        assert_eq!(
            (s.resource.to_string().as_str(), s.namespace.as_str(), s.name.as_str()),
            ("deployments.apps", "default", "web")
        );
        assert_eq!(s.to_string(), "deployments.apps/default/web");
        let s: Straggler = "clusterroles.rbac.authorization.k8s.io//admin".parse().unwrap();
        assert_eq!(
            (s.resource.resource.as_str(), s.namespace.as_str(), s.name.as_str()),
            ("clusterroles", "", "admin")
        );
        assert_eq!(serde_json::to_value(&s).unwrap(), "clusterroles.rbac.authorization.k8s.io//admin");
        assert!("secrets".parse::<Straggler>().is_err());
        assert!(serde_json::from_value::<Straggler>(serde_json::json!("Secrets/a/b")).is_err());
    }
}
