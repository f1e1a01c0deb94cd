//! The decisions of each phase, from its evidence and the time alone: no I/O, unit-tested
//! without any API. The driver (`phases`) gathers the evidence and acts on the answer.

use std::time::Duration;

use super::{ApiServerReport, SigningKeyState};
use crate::{
    crd::signing::{MIN_TOKEN_SECONDS, PublishPlan},
    signer_status::SignerStatus,
};

/// What an idle policy does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// First sight of the key: this version signs now and is the starting point.
    Adopt(u64),
    /// Start a run moving signing off version `from`.
    Start {
        /// `external`, `request` or `schedule`.
        trigger: &'static str,
        /// The version that signs now.
        from: u64,
    },
    /// Nothing to do yet.
    Rest,
}

/// The version that signs now: the pinned `min_encryption_version`, or the latest when none is
/// pinned (Transit's 0 means "latest").
pub fn signing_version(key: &SigningKeyState) -> u64 {
    match key.min_encryption_version {
        0 => key.latest,
        pinned => pinned,
    }
}

/// Decides from the version last handled, the key, whether a new request arrived and whether
/// the schedule is due. A version made outside the controller wins over both: it is published
/// and switched to like one the controller made.
pub fn decide_idle(known: Option<u64>, key: &SigningKeyState, requested: bool, due: bool) -> Idle {
    let Some(known) = known else { return Idle::Adopt(signing_version(key)) };
    if key.latest > known {
        return Idle::Start { trigger: "external", from: known };
    }
    if requested {
        return Idle::Start { trigger: "request", from: known };
    }
    if due {
        return Idle::Start { trigger: "schedule", from: known };
    }
    Idle::Rest
}

/// The Rotate phase's next move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotate {
    /// Pin `min_encryption_version` to `from` first, so no signer moves to a new version early
    /// on its own time rule.
    Pin(u64),
    /// Pinned, and no version after `from` exists: make one.
    Rotate,
    /// Pinned, and the new version exists.
    Done {
        /// The version the run moves signing to.
        to: u64,
    },
}

/// "Pin first, then ensure latest > from": a rotate that timed out but landed, or a crash after
/// rotating, finds the new version and never makes a second one.
pub fn decide_rotate(from: u64, key: &SigningKeyState) -> Rotate {
    if key.min_encryption_version != from {
        return Rotate::Pin(from);
    }
    if key.latest <= from {
        return Rotate::Rotate;
    }
    Rotate::Done { to: key.latest }
}

/// Members of the fleet judged against what a phase needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    /// How many were judged.
    pub total: usize,
    /// The ones not there yet, one line each naming the member and why.
    pub lagging: Vec<String>,
}

impl Members {
    /// At least one member, and all there.
    pub fn done(&self) -> bool {
        self.total > 0 && self.lagging.is_empty()
    }

    fn summary(&self, what: &str) -> String {
        match self.total {
            0 if self.lagging.is_empty() => format!("no {what} found"),
            _ => format!("waiting for {what}: {}", self.lagging.join("; ")),
        }
    }
}

/// Signers' reports by endpoint.
pub type SignerReports = [(String, Result<SignerStatus, String>)];

/// Whether every signer publishes `kid` in its OIDC key set, and the largest
/// `refresh_hint_seconds` among them. A signer that reports no refresh hint predates this loop
/// and cannot prove when its verifiers have the key, so it is named.
pub fn judge_published(reports: &SignerReports, kid: &str) -> (Members, Option<i64>) {
    let mut members = Members { total: reports.len(), lagging: Vec::new() };
    let mut hint = None;
    for (endpoint, report) in reports {
        let status = match report {
            Ok(status) => status,
            Err(e) => {
                members.lagging.push(format!("{endpoint}: {e}"));
                continue;
            }
        };
        if !status.published.iter().any(|p| p.kid == kid && !p.exclude_from_oidc_discovery) {
            members.lagging.push(format!("{endpoint} does not publish kid {kid}"));
        }
        match status.refresh_hint_seconds {
            Some(h) => hint = hint.max(Some(h)),
            None => members.lagging.push(format!("{endpoint} reports no refresh_hint_seconds")),
        }
    }
    (members, hint)
}

/// Whether every API server fetched keys after `published` (Unix seconds). A server without the
/// fetch-keys series still verifies only against its key files: it has not flipped to the
/// signer, and is named.
pub fn judge_fetched(api_servers: &Result<Vec<ApiServerReport>, String>, published: i64) -> Members {
    let reports = match api_servers {
        Ok(reports) => reports,
        Err(e) => return Members { total: 0, lagging: vec![format!("API servers cannot be listed: {e}")] },
    };
    let mut members = Members { total: reports.len(), lagging: Vec::new() };
    for report in reports {
        let address = &report.address;
        match &report.metrics {
            Err(e) => members.lagging.push(format!("{address}: {e}")),
            Ok(m) => match m.fetch_keys_success {
                None => members.lagging.push(format!(
                    "{address} exports no apiserver_externaljwt_fetch_keys_success_timestamp: it has not flipped to the signer"
                )),
                Some(at) if at <= published as f64 => members.lagging.push(format!(
                    "{address} last fetched keys at {}, before the new kid was published",
                    crate::clock::seconds_text(at as i64)
                )),
                Some(_) => {}
            },
        }
    }
    members
}

/// A phase's next move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go on to the next phase, with this message.
    Next(String),
    /// Look again, no later than `at_most` (the poll interval when `None`).
    Wait {
        /// For the status.
        message: String,
        /// Longest useful wait.
        at_most: Option<Duration>,
    },
    /// Stop the run with this message.
    Fail(String),
}

/// What the Publish phase knows at one step.
#[derive(Debug, Clone)]
pub struct PublishEvidence {
    /// Time in the phase.
    pub waited: Duration,
    /// Signers publishing the new kid.
    pub signers: Members,
    /// The largest `refresh_hint_seconds` the signers report.
    pub refresh_hint: Option<i64>,
    /// API servers that fetched keys since.
    pub api_servers: Members,
    /// Time since the last signer came to publish the new kid; `None` before.
    pub since_published: Option<Duration>,
}

/// All three rules: every signer publishes the kid, every API server fetched since, and the
/// refresh hint plus the margin have passed. The time rule is kube-apiserver's own:
/// pkg/serviceaccount/jwt.go, `PublicKeysGetter.GetCacheAgeMaxSeconds`, "a new key must be
/// included in the results for at least this long before it is used to sign new tokens", which
/// for the external signer is the time to its next refresh
/// (pkg/serviceaccount/externaljwt/plugin/keycache.go, `keyCache.GetCacheAgeMaxSeconds`), at
/// most `refresh_hint_seconds`; it is also the OIDC documents' max-age.
pub fn decide_publish(plan: &PublishPlan, evidence: PublishEvidence) -> Decision {
    let timeout = plan.timeout;
    let lagging = match (evidence.signers.done(), evidence.api_servers.done()) {
        (false, _) => Some(evidence.signers.summary("signers")),
        (true, false) => Some(evidence.api_servers.summary("API servers")),
        (true, true) => None,
    };
    if let Some(message) = lagging {
        if evidence.waited >= timeout {
            return Decision::Fail(format!("the new kid was not published within {timeout:?}: {message}"));
        }
        return Decision::Wait { message, at_most: None };
    }
    let hint = Duration::from_secs(evidence.refresh_hint.unwrap_or(0).max(0) as u64);
    let need = hint + plan.margin;
    let since = evidence.since_published.unwrap_or_default();
    if since >= need {
        return Decision::Next(format!(
            "every signer publishes the new kid, every API server fetched it, and {need:?} passed"
        ));
    }
    let left = need - since;
    Decision::Wait {
        message: format!(
            "published and fetched; waiting {left:?} more so verifiers caching the key set (refresh hint {hint:?} plus margin) have it"
        ),
        at_most: Some(left),
    }
}

/// Whether every signer signs with `kid`.
pub fn judge_signing(reports: &SignerReports, kid: &str) -> Members {
    let mut members = Members { total: reports.len(), lagging: Vec::new() };
    for (endpoint, report) in reports {
        match report {
            Err(e) => members.lagging.push(format!("{endpoint}: {e}")),
            Ok(status) => match &status.signing {
                Some(key) if key.kid == kid => {}
                Some(key) => members.lagging.push(format!("{endpoint} signs with kid {}", key.kid)),
                None => members.lagging.push(format!("{endpoint} signs with no key")),
            },
        }
    }
    members
}

/// Whether the token each API server issued carries `kid`: `(address, kid or why not)`.
pub fn judge_token_kids(kids: &[(String, Result<String, String>)], kid: &str) -> Members {
    let mut members = Members { total: kids.len(), lagging: Vec::new() };
    for (address, answer) in kids {
        match answer {
            Ok(k) if k == kid => {}
            Ok(k) => members.lagging.push(format!("{address} issued a token with kid {k}")),
            Err(e) => members.lagging.push(format!("{address}: TokenRequest: {e}")),
        }
    }
    members
}

/// The Switch phase's proof: every signer's `/status` shows the new signing kid, and a token
/// from each API server carries it.
pub fn decide_switch(timeout: Duration, waited: Duration, signers: &Members, tokens: &Members) -> Decision {
    let lagging = match (signers.done(), tokens.done()) {
        (false, _) => signers.summary("signers"),
        (true, false) => tokens.summary("API servers"),
        (true, true) => {
            return Decision::Next("every signer and every API server signs with the new kid".into());
        }
    };
    if waited >= timeout {
        return Decision::Fail(format!("signing did not switch within {timeout:?}: {lagging}"));
    }
    Decision::Wait { message: lagging, at_most: None }
}

/// The token-lifetime bound Drain uses, as kept in the status (Unix seconds for times).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expiration {
    /// The largest `max_token_expiration_seconds` in effect.
    pub bound: Option<i64>,
    /// When the signers' reported maximum last changed.
    pub changed_at: Option<i64>,
    /// A lower maximum reported since `changed_at`, not yet in effect everywhere.
    pub lower: Option<i64>,
    /// Tokens issued under an earlier, higher bound may live until then.
    pub earlier_until: Option<i64>,
}

/// Follows the signers' largest reported `max_token_expiration_seconds`. kube-apiserver reads
/// the signer's Metadata once, at start (pkg/controlplane/apiserver/options/options.go, the
/// external-signer case of completing the service-account options: `plugin.GetServiceMetadata`,
/// then `MaxExpiration` set from `MaxTokenExpirationSeconds`), so a higher value is in effect
/// at once where a server restarts, and a lower one only once every API server started after the
/// change: `starts` holds every server's `process_start_time_seconds`, `None` when any is
/// unknown. Lowering keeps the old bound's reach in `earlier_until`.
pub fn track_expiration(
    prev: Expiration,
    reported: Option<i64>,
    starts: Option<&[f64]>,
    now: i64,
) -> Expiration {
    let Some(reported) = reported else { return prev };
    let mut next = prev;
    match prev.bound {
        None => {
            next.bound = Some(reported);
            next.changed_at = Some(now);
        }
        Some(bound) if reported > bound => {
            next = Expiration { bound: Some(reported), changed_at: Some(now), lower: None, ..prev };
        }
        Some(bound) if reported == bound => {
            if prev.lower.is_some() {
                next.lower = None;
                next.changed_at = Some(now);
            }
        }
        Some(bound) => {
            if prev.lower != Some(reported) {
                next.lower = Some(reported);
                next.changed_at = Some(now);
            }
            let since = next.changed_at.unwrap_or(now);
            let all_restarted =
                starts.is_some_and(|s| !s.is_empty() && s.iter().all(|start| *start > since as f64));
            if all_restarted {
                // NB: a token issued just before the change may live `bound` from now at most.
                let reach = now.saturating_add(bound);
                next.earlier_until = Some(prev.earlier_until.map_or(reach, |e| e.max(reach)));
                next.bound = Some(reported);
                next.lower = None;
            }
        }
    }
    next
}

/// When Drain ends: the last old-key signature (`switched`, when the switch was proven) plus
/// the bound (never under kube-apiserver's 600 s minimum), no sooner than tokens issued under an
/// earlier bound expire, plus the skew margin. `None` while no signer has reported a bound.
pub fn drain_until(switched: i64, expiration: &Expiration, skew: Duration) -> Option<i64> {
    let bound = expiration.bound?.max(MIN_TOKEN_SECONDS);
    let end = switched.saturating_add(bound).max(expiration.earlier_until.unwrap_or(i64::MIN));
    Some(end.saturating_add(skew.as_secs() as i64))
}

/// Whether any signer still publishes one of `old` kids.
pub fn judge_retired(reports: &SignerReports, old: &[String]) -> Members {
    let mut members = Members { total: reports.len(), lagging: Vec::new() };
    for (endpoint, report) in reports {
        match report {
            Err(e) => members.lagging.push(format!("{endpoint}: {e}")),
            Ok(status) => {
                for kid in status.published.iter().filter(|p| old.contains(&p.kid)).map(|p| &p.kid) {
                    members.lagging.push(format!("{endpoint} still publishes kid {kid}"));
                }
            }
        }
    }
    members
}
