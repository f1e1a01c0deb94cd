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

pub use crate::{
    clock::{Clock, SystemClock, parse_time, rfc3339},
    crd::tokens::{
        AUDIENCES_ANNOTATION, ERROR_ANNOTATION, EXPIRES_ANNOTATION, INVALID_SINCE_LABEL, ISSUED_ANNOTATION,
        LAST_USED_LABEL, LEGACY_TYPE, LIFETIME_ANNOTATION, REQUEST_ANNOTATION, ROTATE_ANNOTATION,
        ROTATED_ANNOTATION, SA_NAME_ANNOTATION, SA_UID_ANNOTATION, SERVICE_ACCOUNT_ANNOTATION, TOKEN_KEY,
    },
    k8s::BearerToken,
};
use crate::{crd::tokens::Match, k8s::KubeError};

/// A token operation failed; each variant names what.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A Kubernetes call failed.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// The TokenPolicy is invalid.
    #[error(transparent)]
    InvalidPolicy(#[from] crate::crd::tokens::SpecError),
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

/// The first of `rules` that `map` matches.
pub fn matches_any<'a>(map: &BTreeMap<String, String>, rules: &'a [Match]) -> Option<&'a Match> {
    rules.iter().find(|rule| rule.matches(map))
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
    fn exclusion_rules_match_keys_and_values() {
        let map: BTreeMap<String, String> =
            [("team".to_owned(), "infra".to_owned()), ("keep".to_owned(), String::new())].into();
        let rules = |texts: &[&str]| texts.iter().map(|t| Match::parse(t).unwrap()).collect::<Vec<_>>();
        let first = |texts: &[&str]| matches_any(&map, &rules(texts)).map(Match::to_string);
        assert_eq!(first(&["keep"]).as_deref(), Some("keep"));
        assert_eq!(first(&["team=infra"]).as_deref(), Some("team=infra"));
        assert_eq!(first(&["team=apps", "other"]), None);
    }

    #[test]
    fn ages_read_in_the_largest_units() {
        assert_eq!(age(90_061), "1d1h");
    }
}
