//! The `TokenPolicy` custom resource (`kmsgate.io/v1alpha1`, cluster-scoped): which legacy token
//! Secrets are rotated and which managed bound tokens may be issued, in `spec`; the crash record
//! of Secrets being recreated and the last results, in `status`.
//!
//! A kind of its own rather than a field of `RotationPolicy`: token work is continuous (a
//! reconcile loop) where key rotation is a run with phases, the two statuses share nothing, and
//! an operator can let someone manage token policy without the right to rotate keys.
//!
//! The spec is parsed once into a [`Plan`] (see [`parse`]); the token loops and `kmsgate tokens`
//! read only the plan.

mod plan;

use std::{collections::BTreeMap, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::policy::{Policy, PolicySpec};

pub use plan::{
    Deny, LegacyPlan, ManagedPlan, Match, MaxAge, Plan, Selection, SpecError, is_namespace, is_subdomain,
    parse,
};

/// The Secret type of legacy tokens.
pub const LEGACY_TYPE: &str = "kubernetes.io/service-account-token";
/// Names the ServiceAccount of a legacy token (kept across rotation).
pub const SA_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
/// The ServiceAccount's uid on a legacy token (dropped on rotation: the token controller sets it,
/// and a stale one makes it delete the Secret).
pub const SA_UID_ANNOTATION: &str = "kubernetes.io/service-account.uid";
/// The UTC date (`YYYY-MM-DD`) a legacy token last authenticated: the API server writes it on the
/// first use of a day it does not already show, so at most once a day, and it is a day, not a time.
pub const LAST_USED_LABEL: &str = "kubernetes.io/legacy-token-last-used";
/// Set by the legacy token cleaner: the token no longer authenticates.
pub const INVALID_SINCE_LABEL: &str = "kubernetes.io/legacy-token-invalid-since";

/// On a legacy token Secret: when kmsgate last rotated it (RFC 3339).
pub const ROTATED_ANNOTATION: &str = "token.kmsgate.io/rotated-at";
/// On a legacy token Secret: `"false"` keeps kmsgate from rotating it.
pub const ROTATE_ANNOTATION: &str = "token.kmsgate.io/rotate";

/// On a Secret: asks for a managed token of this ServiceAccount (in the Secret's namespace).
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "token.kmsgate.io/service-account";
/// On a managed Secret: comma-separated audiences (default: the API server's).
pub const AUDIENCES_ANNOTATION: &str = "token.kmsgate.io/audiences";
/// On a managed Secret: the lifetime to ask for, like `2h` (default: the policy's).
pub const LIFETIME_ANNOTATION: &str = "token.kmsgate.io/lifetime";
/// Written by kmsgate: when the token in the Secret was issued (RFC 3339).
pub const ISSUED_ANNOTATION: &str = "token.kmsgate.io/issued-at";
/// Written by kmsgate: the expiry the API server granted (RFC 3339).
pub const EXPIRES_ANNOTATION: &str = "token.kmsgate.io/expires-at";
/// Written by kmsgate: a digest of the request the token answers; a change means re-issue.
pub const REQUEST_ANNOTATION: &str = "token.kmsgate.io/request";
/// Written by kmsgate: why the last attempt failed or was refused (removed on success).
pub const ERROR_ANNOTATION: &str = "token.kmsgate.io/error";

/// The `token` data key of both kinds.
pub const TOKEN_KEY: &str = "token";

/// The name the controller and `kmsgate tokens` use unless told otherwise.
pub const DEFAULT_POLICY: &str = "kmsgate";

/// The TokenRequest API refuses lifetimes under ten minutes.
pub const MIN_LIFETIME: Duration = Duration::from_secs(600);

/// Rules for legacy token Secrets and managed bound tokens.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TokenPolicySpec {
    /// Rotation of legacy `kubernetes.io/service-account-token` Secrets.
    #[serde(default)]
    pub legacy: LegacySpec,
    /// Bound tokens issued into Secrets that ask for one.
    #[serde(default)]
    pub managed: ManagedSpec,
}

/// Which legacy token Secrets are rotated, and when.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LegacySpec {
    /// The controller rotates on `schedule`; `kmsgate tokens rotate` works either way.
    #[serde(default)]
    pub enabled: bool,
    /// How often the controller looks: an interval (`24h`) or a 5-field cron expression (UTC).
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// Rotate Secrets created longer ago than this.
    #[serde(default = "default_max_age")]
    pub max_age: String,
    /// Namespaces to look in; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Only Secrets matching this label selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,
    /// Skip Secrets with any of these labels (`key` or `key=value`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_labels: Vec<String>,
    /// Skip Secrets with any of these annotations (`key` or `key=value`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_annotations: Vec<String>,
    /// How long to wait for the token controller to fill a recreated Secret.
    #[serde(default = "default_token_timeout")]
    pub token_timeout: String,
}

impl Default for LegacySpec {
    fn default() -> Self {
        Self {
            enabled: false,
            schedule: default_schedule(),
            max_age: default_max_age(),
            namespaces: Vec::new(),
            label_selector: None,
            exclude_labels: Vec::new(),
            exclude_annotations: Vec::new(),
            token_timeout: default_token_timeout(),
        }
    }
}

/// Who may ask for a managed bound token, and what they may get.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManagedSpec {
    /// Issue and refresh managed tokens.
    #[serde(default)]
    pub enabled: bool,
    /// The only namespaces whose Secrets may ask (required when enabled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Audiences a Secret may ask for; empty allows only the API server's default audience.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Lifetime asked for when a Secret names none.
    #[serde(default = "default_lifetime")]
    pub default_lifetime: String,
    /// Longest lifetime a Secret may ask for.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime: String,
    /// Refresh when this fraction of the granted lifetime has passed.
    #[serde(default = "default_refresh_fraction")]
    pub refresh_fraction: f64,
    /// Service accounts never issued for, as `namespace/name` or `namespace/*`. kmsgate's own
    /// service account is always refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_service_accounts: Vec<String>,
    /// Full re-list interval; annotation changes are seen at once through a watch.
    #[serde(default = "default_resync")]
    pub resync: String,
}

impl Default for ManagedSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            namespaces: Vec::new(),
            audiences: Vec::new(),
            default_lifetime: default_lifetime(),
            max_lifetime: default_max_lifetime(),
            refresh_fraction: default_refresh_fraction(),
            deny_service_accounts: Vec::new(),
            resync: default_resync(),
        }
    }
}

/// A legacy token Secret between its delete and its re-create: enough to recreate it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PendingSecret {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The uid of the Secret being deleted (a Secret with another uid is the recreated one).
    pub uid: String,
    /// The ServiceAccount the token is for.
    pub service_account: String,
    /// The user's labels to keep.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The user's annotations to keep.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// When the rotation started (RFC 3339).
    pub since: String,
    /// `sa.secrets` listed the Secret when it was deleted, so the reference is put back once the
    /// token controller has removed the old one (it removes by name).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub referenced: bool,
    /// The uid of the Secret kmsgate recreated: only the reference is left to restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreated: Option<String>,
}

/// Results of the last legacy run.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LegacyStatus {
    /// When the last run finished (RFC 3339).
    #[serde(default)]
    pub last_run: String,
    /// When the controller runs next (RFC 3339).
    #[serde(default)]
    pub next_run: String,
    /// Secrets rotated by the last run.
    #[serde(default)]
    pub rotated: u64,
    /// Secrets that could not be rotated.
    #[serde(default)]
    pub failed: u64,
    /// Secrets the cleaner marked invalid (reported, not rotated).
    #[serde(default)]
    pub invalid: u64,
    /// The last run's problems, for people.
    #[serde(default)]
    pub message: String,
}

/// Managed tokens after the last pass.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ManagedStatus {
    /// Secrets holding a managed token.
    #[serde(default)]
    pub tokens: u64,
    /// Secrets whose last issue failed or was refused.
    #[serde(default)]
    pub failing: u64,
    /// The soonest expiry among managed tokens (RFC 3339).
    #[serde(default)]
    pub earliest_expiry: String,
}

/// The controller's record.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// Secrets deleted for rotation and not yet recreated: finished on restart.
    #[serde(default)]
    pub pending: Vec<PendingSecret>,
    /// Legacy rotation.
    #[serde(default)]
    pub legacy: LegacyStatus,
    /// Managed tokens.
    #[serde(default)]
    pub managed: ManagedStatus,
}

/// A TokenPolicy object.
pub type TokenPolicy = Policy<TokenPolicySpec>;

impl PolicySpec for TokenPolicySpec {
    type Status = TokenStatus;
    const KIND: &'static str = "TokenPolicy";
    const PLURAL: &'static str = "tokenpolicies";
    const CRD_NAME: &'static str = "tokenpolicies.kmsgate.io";
    const SHORT_NAMES: &'static [&'static str] = &["tokpol"];
    const COLUMNS: &'static [(&'static str, &'static str, &'static str)] = &[
        ("Rotated", "integer", ".status.legacy.rotated"),
        ("Invalid", "integer", ".status.legacy.invalid"),
        ("Managed", "integer", ".status.managed.tokens"),
        ("Failing", "integer", ".status.managed.failing"),
        ("Earliest-Expiry", "string", ".status.managed.earliestExpiry"),
    ];
}

fn default_schedule() -> String {
    "24h".into()
}
fn default_max_age() -> String {
    "2160h".into()
}
fn default_token_timeout() -> String {
    "2m".into()
}
fn default_lifetime() -> String {
    "1h".into()
}
fn default_max_lifetime() -> String {
    "24h".into()
}
fn default_refresh_fraction() -> f64 {
    0.8
}
fn default_resync() -> String {
    "5m".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_is_cluster_scoped_with_status() {
        let yaml = crate::crd::policy::crd_yaml::<TokenPolicySpec>().unwrap();
        assert!(yaml.contains("scope: Cluster") && yaml.contains("kind: TokenPolicy"), "{yaml}");
        assert!(yaml.contains("status: {}"));
    }
}
