//! The `status` half of a SigningKeyPolicy: the controller's record of the current and last run,
//! written after every step so a restarted controller resumes where the last one stopped.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::status::Condition;

/// Where the signing-key rotation stands.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum SigningPhase {
    /// Nothing in progress.
    #[default]
    Idle,
    /// Pinning the signing version, then making a new one.
    Rotating,
    /// Waiting until every signer lists the new kid, every API server fetched it, and outside
    /// verifiers had time to.
    Publishing,
    /// Moving signing to the new version and proving every signer and API server signs with it.
    Switching,
    /// Waiting until every token signed with the old version has expired.
    Draining,
    /// Raising `min_decryption_version` and waiting until no signer publishes the old kid.
    Retiring,
    /// Stopped at `failedPhase`; a new request or the schedule resumes there.
    Failed,
}

impl SigningPhase {
    /// Every phase, in the order a run goes through them.
    pub const ALL: [Self; 7] = [
        Self::Idle,
        Self::Rotating,
        Self::Publishing,
        Self::Switching,
        Self::Draining,
        Self::Retiring,
        Self::Failed,
    ];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "Idle",
            Self::Rotating => "Rotating",
            Self::Publishing => "Publishing",
            Self::Switching => "Switching",
            Self::Draining => "Draining",
            Self::Retiring => "Retiring",
            Self::Failed => "Failed",
        }
    }
}

/// The controller's record of the current and last signing-key rotation.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SigningStatus {
    /// Current phase.
    #[serde(default)]
    pub phase: SigningPhase,
    /// The phase a failed run stopped in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_phase: Option<SigningPhase>,
    /// Identifies the current run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run_id: String,
    /// `schedule`, `request` or `external` (a version made outside the controller).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trigger: String,
    /// The version that signed before the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<u64>,
    /// The version the run moves signing to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_version: Option<u64>,
    /// The kid of `fromVersion`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from_kid: String,
    /// The kid of `toVersion`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub to_kid: String,
    /// The version that signs when no run is in progress; a higher one appearing starts a run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known_version: Option<u64>,
    /// When the run started (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_at: String,
    /// When the current phase started.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub phase_started_at: String,
    /// When the last signer came to list the new kid (cleared when one stops listing it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub published_at: String,
    /// When every API server had fetched keys since `publishedAt`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fetched_at: String,
    /// When every signer and every API server was proven to sign with the new kid.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub switched_at: String,
    /// When Drain ends: `switchedAt` plus the token-lifetime bound plus the skew margin.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub drain_until: String,
    /// The token-lifetime bound Drain uses: the largest `max_token_expiration_seconds` any signer
    /// reported, kept across runs (an API server reads it only once, at its start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_expiration_seconds: Option<i64>,
    /// When the signers' reported maximum last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub max_token_expiration_changed_at: String,
    /// When this policy first saw a signer report `max_token_expiration_seconds` (RFC 3339). An
    /// API server started earlier read its signer's Metadata before, possibly a higher bound, so
    /// Drain does not end on the bound while one still runs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub max_token_expiration_observed_since: String,
    /// A lower maximum the signers report now: it becomes the bound once every API server has
    /// started after `maxTokenExpirationChangedAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower_token_expiration_seconds: Option<i64>,
    /// Tokens issued while a higher bound was in effect may live until this time (RFC 3339):
    /// set when the bound is lowered; no Drain ends before it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub earlier_tokens_expire_at: String,
    /// Signers not there yet, one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signer_stragglers: Vec<String>,
    /// API servers not there yet, one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_server_stragglers: Vec<String>,
    /// The key's `min_decryption_version` set by the last retire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_below: Option<u64>,
    /// `Succeeded` or `Failed`, for the last finished run.
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
    /// When the schedule next starts a run (RFC 3339); a time that passes during a run starts
    /// the next run once this one has retired its old version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub next_run: String,
    /// Conditions: `Ready`, `Stalled`, `Suspended`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
