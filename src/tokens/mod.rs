//! Service-account token rotation, shared by the controller and `kmsgate tokens`.
//!
//! - [`legacy`]: `kubernetes.io/service-account-token` Secrets are deleted and recreated, so the
//!   token controller signs a fresh token and the old one stops working.
//! - [`managed`]: Secrets that ask for one get a bound token from the TokenRequest API, bound to
//!   the Secret itself, refreshed well before it expires.
//!
//! Every Kubernetes call goes through [`crate::k8s`]. Token values live in [`BearerToken`] and
//! are never logged, put into errors, or read back from the API server.

pub mod legacy;
pub mod managed;
pub mod reconcile;

use std::collections::BTreeMap;

use zeroize::Zeroizing;

pub use crate::clock::{Clock, SystemClock, parse_time, rfc3339};
use crate::k8s::KubeError;

/// The Secret type of legacy tokens.
pub const LEGACY_TYPE: &str = "kubernetes.io/service-account-token";
/// Names the ServiceAccount of a legacy token (kept across rotation).
pub const SA_NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
/// The ServiceAccount's uid on a legacy token (dropped on rotation: the token controller sets it,
/// and a stale one makes it delete the Secret).
pub const SA_UID_ANNOTATION: &str = "kubernetes.io/service-account.uid";
/// Set by the API server on each use of a legacy token.
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

/// A token operation failed; each variant names what.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A Kubernetes call failed.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// The TokenPolicy is invalid.
    #[error(transparent)]
    Spec(#[from] crate::crd::tokens::SpecError),
    /// The TokenPolicy does not exist.
    #[error(
        "TokenPolicy {0:?} not found: create one (deploy/controller/tokenpolicy.yaml) so rotations can be \
         recorded"
    )]
    NoPolicy(String),
    /// The crash record could not be written, so nothing was deleted.
    #[error("cannot record {0} in the TokenPolicy status after several conflicts; nothing was deleted")]
    Journal(String),
    /// A flag or selector is invalid.
    #[error("{0}")]
    Invalid(String),
}

/// A bearer token: zeroed on drop, never printed.
pub struct BearerToken(Zeroizing<String>);

impl BearerToken {
    /// Wraps a token.
    pub fn new(token: Zeroizing<String>) -> Self {
        Self(token)
    }

    /// The token, for writing into a Secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Applies `change` to a TokenPolicy's status, read-modify-write with the resourceVersion as a
/// precondition, retrying when someone else wrote first, so no crash record is ever lost.
pub async fn update_status(
    kube: &crate::k8s::Kube,
    name: &str,
    change: impl Fn(&mut crate::crd::tokens::TokenStatus),
) -> Result<crate::crd::tokens::TokenStatus, TokenError> {
    for _ in 0..8 {
        let policy = kube.token_policy(name).await?.ok_or_else(|| TokenError::NoPolicy(name.into()))?;
        let mut status = policy.status.unwrap_or_default();
        change(&mut status);
        let rv = policy.metadata.resource_version.as_deref();
        match kube.patch_token_status(name, &status, rv).await {
            Ok(_) => return Ok(status),
            Err(e) if e.code() == Some(409) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(TokenError::Journal(format!("TokenPolicy {name}")))
}

/// Whether `map` has any of `rules` (`key` or `key=value`).
pub fn matches_any(map: &BTreeMap<String, String>, rules: &[String]) -> Option<String> {
    rules
        .iter()
        .find(|rule| match rule.split_once('=') {
            Some((key, value)) => map.get(key).is_some_and(|v| v == value),
            None => map.contains_key(rule.as_str()),
        })
        .cloned()
}

/// `3d4h`-style age for tables.
pub fn age(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let token = BearerToken::new(Zeroizing::new("eyJhbGciOiJSUzI1NiJ9.secret".into()));
        assert_eq!(format!("{token:?}"), "BearerToken(<redacted>)");
        assert_eq!(token.expose(), "eyJhbGciOiJSUzI1NiJ9.secret");
    }

    #[test]
    fn exclusion_rules_match_keys_and_values() {
        let map: BTreeMap<String, String> =
            [("team".to_owned(), "infra".to_owned()), ("keep".to_owned(), String::new())].into();
        assert_eq!(matches_any(&map, &["keep".into()]).as_deref(), Some("keep"));
        assert_eq!(matches_any(&map, &["team=infra".into()]).as_deref(), Some("team=infra"));
        assert_eq!(matches_any(&map, &["team=apps".into(), "other".into()]), None);
    }

    #[test]
    fn ages_read_in_the_largest_units() {
        assert_eq!(age(90_061), "1d1h");
    }
}
