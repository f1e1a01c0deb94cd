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
    /// First sight of an unpinned key, and the signers do not agree on a kid Transit holds:
    /// which version signs is unknown, so nothing is adopted.
    Unsettled,
    /// Transit's key is behind version `known`, the one this policy last saw sign: nothing is
    /// adopted and no run starts from it.
    Behind {
        /// The status's `knownVersion`.
        known: u64,
    },
}

/// The version that signs now: the pinned `min_encryption_version`, or the latest when none is
/// pinned (Transit's 0 means "latest").
pub fn signing_version(key: &SigningKeyState) -> u64 {
    match key.min_encryption_version {
        0 => key.latest,
        pinned => pinned,
    }
}

/// The kid every signer reports signing with; `None` when any cannot be read, signs with
/// nothing, or they disagree.
pub fn agreed_signing_kid(reports: &SignerReports) -> Option<String> {
    let mut kids =
        reports.iter().map(|(_, r)| r.as_ref().ok().and_then(|s| s.signing.as_ref()).map(|k| &k.kid));
    let first = kids.next()??;
    kids.all(|k| k == Some(first)).then(|| first.clone())
}

/// Decides from the version last handled, the key, the kid the signers agree they sign with,
/// whether a new request arrived and whether the schedule is due. A version made outside the
/// controller wins over both: it is published and switched to like one the controller made.
/// First sight of an unpinned key adopts the version whose kid the signers sign with, not the
/// latest: signers follow their own age rule, and a younger latest was never waited for.
/// A key behind the known version wins over everything (see [`key_behind`]).
pub fn decide_idle(
    known: Option<u64>,
    key: &SigningKeyState,
    signing_kid: Option<&str>,
    requested: bool,
    due: bool,
) -> Idle {
    let Some(known) = known else {
        if key.min_encryption_version != 0 {
            return Idle::Adopt(key.min_encryption_version);
        }
        let signing = key.kids.iter().find(|(_, kid)| Some(kid.as_str()) == signing_kid);
        return signing.map_or(Idle::Unsettled, |(version, _)| Idle::Adopt(*version));
    };
    if key_behind(known, key) {
        return Idle::Behind { known };
    }
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

/// Whether Transit's key is behind version `known`, which this policy last saw sign: its latest
/// version, or its pin, is older. Transit never lowers either by itself (a rotate only adds a
/// version, and this loop only pins forward), so something moved it back: most likely a Vault
/// restored from an older snapshot or the key deleted and recreated, else a pin set back by hand.
/// Adopting it would drop the loop's memory of what signed, and a run from it would pin a
/// version that Transit lacks or that signed before the last run.
pub fn key_behind(known: u64, key: &SigningKeyState) -> bool {
    key.latest < known || (key.min_encryption_version != 0 && key.min_encryption_version < known)
}

/// Why an idle policy holds on a key behind `known`, and what lets it go on.
pub fn behind_message(known: u64, key: &SigningKeyState) -> String {
    format!(
        "Transit's key shows latest version {} and min_encryption_version {}, behind version {known} that this policy knows signs: probably a Vault restored from an older snapshot or the key deleted and recreated, else a pin set back by hand; nothing is adopted and no run starts until the key is back at version {known} or later, or an operator removes status.knownVersion so that the version signing now is adopted",
        key.latest, key.min_encryption_version
    )
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

/// The versions a run moves between, as its status says, checked before any destructive call
/// (a pin or a retire): a status edited by hand or restored from a backup must never make the
/// loop pin version 0 (Transit's "latest", which unpins the key) or retire a version that signs.
/// Returns `to`, or the reason and message to stop the run with.
pub fn checked_versions(from: Option<u64>, to: Option<u64>) -> Result<u64, (&'static str, String)> {
    match (from, to) {
        (Some(from), Some(to)) if from >= 1 && to > from => Ok(to),
        _ => Err((
            "InvalidStatus",
            format!(
                "the status names fromVersion {} and toVersion {}: a run needs toVersion > fromVersion >= 1; start a new run",
                from.map_or("none".to_owned(), |v| v.to_string()),
                to.map_or("none".to_owned(), |v| v.to_string())
            ),
        )),
    }
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

    /// One line for the status: who lags and why, or that there was none of `what`.
    pub fn summary(&self, what: &str) -> String {
        match self.total {
            0 if self.lagging.is_empty() => format!("no {what} found"),
            _ => format!("waiting for {what}: {}", self.lagging.join("; ")),
        }
    }
}

/// Signers' reports by endpoint.
pub type SignerReports = [(String, Result<SignerStatus, String>)];

/// Longest text from a signer (a kid, an error) repeated in the status, conditions and Events.
pub const SIGNER_TEXT_MAX: usize = 200;
/// Longest kid a signer may report; a longer one makes the whole `/status` not valid.
pub const KID_MAX_BYTES: usize = 1024;
/// `max_token_expiration_seconds` a signer may report: kube-apiserver's 600 s minimum up to 2^32
/// s; outside it the value is a mistake or hostile, and would stall Drain for good.
pub const TOKEN_SECONDS_RANGE: std::ops::Range<i64> = MIN_TOKEN_SECONDS..(1 << 32);
/// `refresh_hint_seconds` a signer may report: a day at most, so Publish's wait stays bounded.
pub const REFRESH_HINT_RANGE: std::ops::RangeInclusive<i64> = 1..=86_400;

/// A text from a signer, cut to [`SIGNER_TEXT_MAX`] bytes for the status.
pub fn clip(text: &str) -> String {
    match text.len() > SIGNER_TEXT_MAX {
        true => format!("{}...", crate::error::clipped(text.to_owned(), SIGNER_TEXT_MAX)),
        false => text.to_owned(),
    }
}

/// One signer's `/status`, or why it is not valid: a token bound or refresh hint out of range,
/// or a kid over [`KID_MAX_BYTES`], makes the whole report an error naming the signer's value,
/// so no phase adopts it. Errors are clipped.
pub fn vet_report(report: Result<SignerStatus, String>) -> Result<SignerStatus, String> {
    let status = report.map_err(|e| clip(&e))?;
    if let Some(max) = status.max_token_expiration_seconds
        && !TOKEN_SECONDS_RANGE.contains(&max)
    {
        return Err(format!(
            "/status not valid: max_token_expiration_seconds {max} is outside {}..{}",
            TOKEN_SECONDS_RANGE.start, TOKEN_SECONDS_RANGE.end
        ));
    }
    if let Some(hint) = status.refresh_hint_seconds
        && !REFRESH_HINT_RANGE.contains(&hint)
    {
        return Err(format!(
            "/status not valid: refresh_hint_seconds {hint} is outside {}..={}",
            REFRESH_HINT_RANGE.start(),
            REFRESH_HINT_RANGE.end()
        ));
    }
    let kids = status.signing.iter().map(|k| &k.kid).chain(status.published.iter().map(|p| &p.kid));
    if let Some(long) = kids.map(String::len).find(|len| *len > KID_MAX_BYTES) {
        return Err(format!("/status not valid: a kid of {long} bytes, over {KID_MAX_BYTES}"));
    }
    Ok(status)
}

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
            members.lagging.push(format!("{endpoint} does not publish kid {}", clip(kid)));
        }
        match status.refresh_hint_seconds {
            Some(h) => hint = hint.max(Some(h)),
            None => members.lagging.push(format!("{endpoint} reports no refresh_hint_seconds")),
        }
    }
    (members, hint)
}

/// Whether every API server fetched keys after `published` (Unix seconds, the controller's
/// clock) plus `skew`: the fetch time is the API server's clock, which may run ahead. A server
/// without the fetch-keys series still verifies only against its key files: it has not flipped
/// to the signer, and is named.
pub fn judge_fetched(
    api_servers: &Result<Vec<ApiServerReport>, String>,
    published: i64,
    skew: Duration,
) -> Members {
    let after = published.saturating_add(skew.as_secs() as i64);
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
                Some(at) if at <= after as f64 => members.lagging.push(format!(
                    "{address} last fetched keys at {}, not after the new kid was published plus the {skew:?} clock-skew margin",
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
    // NB: the time wait counts against the timeout too, so no hint holds Publish past it.
    if evidence.waited >= timeout {
        return Decision::Fail(format!(
            "the new kid was published and fetched, but {left:?} of the {need:?} wait were left after {timeout:?}"
        ));
    }
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
                Some(key) => members.lagging.push(format!("{endpoint} signs with kid {}", clip(&key.kid))),
                None => members.lagging.push(format!("{endpoint} signs with no key")),
            },
        }
    }
    members
}

/// Why the switch to version `to` (kid `kid`) no longer holds, if it does not: Transit's pin is
/// another version (the runbook's step 0 rerun, a Vault restored from a snapshot taken during
/// Rotate, a lagging node), or a signer that answered signs with another kid. A signer that
/// could not be read proves nothing either way and does not count here.
pub fn switch_lost(pin: u64, to: u64, reports: &SignerReports, kid: &str) -> Option<String> {
    if pin != to {
        return Some(format!("Transit's min_encryption_version is {pin}, not {to}"));
    }
    let other: Vec<String> = reports
        .iter()
        .filter_map(|(endpoint, report)| {
            let signing = report.as_ref().ok()?.signing.as_ref()?;
            (signing.kid != kid).then(|| format!("{endpoint} signs with kid {}", signing.kid))
        })
        .collect();
    (!other.is_empty()).then(|| other.join("; "))
}

/// Whether the token each API server issued carries `kid`: `(address, kid or why not)`.
pub fn judge_token_kids(kids: &[(String, Result<String, String>)], kid: &str) -> Members {
    let mut members = Members { total: kids.len(), lagging: Vec::new() };
    for (address, answer) in kids {
        match answer {
            Ok(k) if k == kid => {}
            Ok(k) => members.lagging.push(format!("{address} issued a token with kid {}", clip(k))),
            Err(e) => members.lagging.push(format!("{address}: TokenRequest: {}", clip(e))),
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
    /// When the loop first saw a bound: an API server started earlier read its signer's
    /// Metadata before, possibly a higher bound than any seen since.
    pub observed_since: Option<i64>,
}

/// Follows the signers' largest reported `max_token_expiration_seconds`. kube-apiserver reads
/// the signer's Metadata once, at start (pkg/controlplane/apiserver/options/options.go,
/// `completeServiceAccountOptions`, its `ServiceAccountSigningEndpoint` case:
/// `plugin.GetServiceMetadata`, then `MaxExpiration` set from `MaxTokenExpirationSeconds`), so a higher value is in effect
/// at once where a server restarts, and a lower one only once every API server started after the
/// change: `starts` holds every server's `process_start_time_seconds`, `None` when any is
/// unknown. Lowering keeps the old bound's reach in `earlier_until`: now plus the old bound, now
/// being the first step that saw no process older than the change.
///
/// A lower value is taken only when `every_signer` answered it: a signer that could not be read
/// may still serve the higher one.
///
/// The first bound seen starts the observation (`observed_since`); a bound kept without one (a
/// status written before it was recorded) counts from its last change, later than the real
/// start, so no server that started before is missed.
pub fn track_expiration(
    prev: Expiration,
    reported: Option<i64>,
    every_signer: bool,
    starts: Option<&[f64]>,
    now: i64,
) -> Expiration {
    let observed_since = match prev.bound {
        Some(_) => prev.observed_since.or(Some(prev.changed_at.unwrap_or(now))),
        None => prev.observed_since,
    };
    let prev = Expiration { observed_since, ..prev };
    let Some(reported) = reported else { return prev };
    if !every_signer && prev.bound.is_some_and(|bound| reported < bound) {
        return prev;
    }
    let mut next = prev;
    match prev.bound {
        None => {
            next.bound = Some(reported);
            next.changed_at = Some(now);
            // NB: a start recorded without a bound was not an observation of one.
            next.observed_since = Some(now);
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
            let since = next.changed_at.unwrap_or(now) as f64;
            match starts {
                Some(s) if !s.is_empty() && s.iter().all(|start| *start > since) => {}
                _ => return next,
            }
            // NB: the listed servers' latest start is no bound: a server already gone from the
            // EndpointSlice may have issued old-bound tokens until it left. This step is the
            // first seen with no process older than the change, so it is the last old-bound
            // issue we can prove.
            let reach = now.saturating_add(bound);
            next.earlier_until = Some(prev.earlier_until.map_or(reach, |e| e.max(reach)));
            next.bound = Some(reported);
            next.lower = None;
        }
    }
    next
}

/// Whether the bound holds for every API server: each must have started after `observed_since`
/// plus `skew` (the start is on the server's clock, which may run ahead). kube-apiserver reads
/// its signer's Metadata once, at start (see [`track_expiration`]), so a server started before
/// the loop first saw a bound may have read a higher one, and may still issue tokens that
/// long; a restart makes it read the signers' value again. A server whose start is unknown
/// proves nothing, and neither does a status without an observation start.
pub fn judge_established(
    api_servers: &Result<Vec<ApiServerReport>, String>,
    observed_since: Option<i64>,
    skew: Duration,
) -> Members {
    let reports = match api_servers {
        Ok(reports) => reports,
        Err(e) => return Members { total: 0, lagging: vec![format!("API servers cannot be listed: {e}")] },
    };
    let Some(since) = observed_since else {
        return Members { total: 0, lagging: vec!["no observation start of the bound is recorded".into()] };
    };
    let after = since.saturating_add(skew.as_secs() as i64);
    let mut members = Members { total: reports.len(), lagging: Vec::new() };
    for report in reports {
        let address = &report.address;
        match report.metrics.as_ref().map(|m| m.process_start) {
            Err(e) => members.lagging.push(format!("{address}: {e}")),
            Ok(None) => members.lagging.push(format!("{address} exports no process_start_time_seconds")),
            Ok(Some(start)) if start <= after as f64 => members.lagging.push(format!(
                "{address} started at {}, before this policy first saw the signers' token lifetime at {} (plus the {skew:?} clock-skew margin): it may issue tokens as long as its signer allowed then; restart it",
                crate::clock::seconds_text(start as i64),
                crate::clock::seconds_text(since)
            )),
            Ok(Some(_)) => {}
        }
    }
    members
}

/// When Drain ends: the last old-key signature (`switched`, when the switch was proven) plus
/// the bound (never under kube-apiserver's 600 s minimum), no sooner than tokens issued under an
/// earlier bound expire, plus the skew margin. `None` while no signer has reported a bound.
pub fn drain_until(switched: i64, expiration: &Expiration, skew: Duration) -> Option<i64> {
    let bound = expiration.bound?.max(MIN_TOKEN_SECONDS);
    let end = switched.saturating_add(bound).max(expiration.earlier_until.unwrap_or(i64::MIN));
    Some(end.saturating_add(skew.as_secs() as i64))
}

/// Whether any signer still publishes a key-store version below `to`. Only versioned entries
/// count: a verify-only key from a file (`version: None`, as `sa.pub` after the runbook's
/// optional `sa.key` import, which shares an old version's kid) stays published on purpose,
/// until the tokens it signed have expired, and must not hold Retire.
pub fn judge_retired(reports: &SignerReports, to: u64) -> Members {
    let mut members = Members { total: reports.len(), lagging: Vec::new() };
    for (endpoint, report) in reports {
        match report {
            Err(e) => members.lagging.push(format!("{endpoint}: {e}")),
            Ok(status) => {
                for p in status.published.iter().filter(|p| p.version.is_some_and(|v| v < to)) {
                    members.lagging.push(format!("{endpoint} still publishes kid {}", clip(&p.kid)));
                }
            }
        }
    }
    members
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        signer_status::{PublishedKey, SigningKey},
        signing_rotation::FetchKeysMetrics,
    };

    fn key(latest: u64, min_enc: u64) -> SigningKeyState {
        SigningKeyState {
            latest,
            min_encryption_version: min_enc,
            min_decryption_version: 1,
            kids: (1..=latest).map(|v| (v, format!("kid-{v}"))).collect(),
        }
    }

    fn signer(signing: &str, published: &[&str]) -> SignerStatus {
        SignerStatus {
            signing: Some(SigningKey { version: 0, kid: signing.into(), alg: "ES256".into() }),
            published: published
                .iter()
                .map(|k| PublishedKey {
                    kid: (*k).into(),
                    version: None,
                    exclude_from_oidc_discovery: false,
                    vanished_at: None,
                })
                .collect(),
            refresh_hint_seconds: Some(60),
            max_token_expiration_seconds: Some(3600),
            ..SignerStatus::default()
        }
    }

    fn server(address: &str, fetched: Option<f64>) -> ApiServerReport {
        ApiServerReport {
            address: address.into(),
            metrics: Ok(FetchKeysMetrics { fetch_keys_success: fetched, process_start: Some(1.0) }),
        }
    }

    #[test]
    fn an_idle_policy_adopts_the_signing_version_then_starts_on_an_outside_version_a_request_or_the_schedule()
    {
        assert_eq!(decide_idle(None, &key(3, 2), None, true, true), Idle::Adopt(2));
        assert_eq!(decide_idle(None, &key(3, 0), Some("kid-3"), false, false), Idle::Adopt(3));
        assert_eq!(
            decide_idle(Some(2), &key(3, 2), None, true, true),
            Idle::Start { trigger: "external", from: 2 }
        );
        assert_eq!(
            decide_idle(Some(3), &key(3, 3), None, true, true),
            Idle::Start { trigger: "request", from: 3 }
        );
        assert_eq!(
            decide_idle(Some(3), &key(3, 3), None, false, true),
            Idle::Start { trigger: "schedule", from: 3 }
        );
        assert_eq!(decide_idle(Some(3), &key(3, 3), None, false, false), Idle::Rest);
    }

    #[test]
    fn first_sight_of_an_unpinned_key_adopts_the_version_the_signers_sign_with() {
        let reports = vec![
            ("http://a".to_owned(), Ok(signer("kid-2", &[]))),
            ("http://b".to_owned(), Ok(signer("kid-2", &[]))),
        ];
        let agreed = agreed_signing_kid(&reports);
        assert_eq!(agreed.as_deref(), Some("kid-2"));
        assert_eq!(decide_idle(None, &key(3, 0), agreed.as_deref(), false, false), Idle::Adopt(2));
        let split = vec![reports[0].clone(), ("http://b".to_owned(), Ok(signer("kid-3", &[])))];
        assert_eq!(agreed_signing_kid(&split), None);
        assert_eq!(decide_idle(None, &key(3, 0), None, false, false), Idle::Unsettled);
        assert_eq!(decide_idle(None, &key(3, 0), Some("kid-9"), false, false), Idle::Unsettled);
        let down = vec![reports[0].clone(), ("http://b".to_owned(), Err("down".to_owned()))];
        assert_eq!(agreed_signing_kid(&down), None);
        assert_eq!(agreed_signing_kid(&[]), None);
    }

    #[test]
    fn a_destructive_step_needs_to_above_from_above_zero() {
        assert_eq!(checked_versions(Some(1), Some(2)), Ok(2));
        for (from, to) in
            [(Some(1), None), (None, Some(2)), (Some(0), Some(1)), (Some(2), Some(2)), (Some(3), Some(2))]
        {
            let (reason, _) = checked_versions(from, to).unwrap_err();
            assert_eq!(reason, "InvalidStatus", "{from:?} -> {to:?}");
        }
    }

    #[test]
    fn the_switch_is_lost_when_the_pin_or_an_answering_signer_moves_back() {
        let signers = vec![
            ("http://a".to_owned(), Ok(signer("kid-2", &[]))),
            ("http://b".to_owned(), Err("connection refused".to_owned())),
        ];
        assert_eq!(switch_lost(2, 2, &signers, "kid-2"), None, "an unread signer proves nothing");
        assert_eq!(
            switch_lost(1, 2, &signers, "kid-2").as_deref(),
            Some("Transit's min_encryption_version is 1, not 2")
        );
        let back = vec![("http://a".to_owned(), Ok(signer("kid-1", &[])))];
        assert_eq!(switch_lost(2, 2, &back, "kid-2").as_deref(), Some("http://a signs with kid kid-1"));
    }

    #[test]
    fn rotate_pins_first_then_makes_a_version_only_while_none_is_above_from() {
        assert_eq!(decide_rotate(3, &key(3, 0)), Rotate::Pin(3), "unpinned: pin before anything");
        assert_eq!(decide_rotate(3, &key(4, 0)), Rotate::Pin(3), "a version made early is pinned away");
        assert_eq!(decide_rotate(3, &key(3, 3)), Rotate::Rotate);
        assert_eq!(
            decide_rotate(3, &key(4, 3)),
            Rotate::Done { to: 4 },
            "a rotate that landed is not repeated"
        );
        assert_eq!(decide_rotate(3, &key(5, 3)), Rotate::Done { to: 5 });
    }

    fn plan() -> PublishPlan {
        PublishPlan { margin: Duration::from_secs(300), timeout: Duration::from_secs(3600) }
    }

    #[test]
    fn publish_needs_every_signer_every_fetch_and_the_refresh_hint_plus_margin() {
        let signers = vec![
            ("http://a".to_owned(), Ok(signer("kid-1", &["kid-1", "kid-2"]))),
            ("http://b".to_owned(), Ok(signer("kid-1", &["kid-1"]))),
            ("http://c".to_owned(), Err("HTTP 503".to_owned())),
        ];
        let (members, hint) = judge_published(&signers, "kid-2");
        assert_eq!(hint, Some(60));
        assert_eq!(members.lagging, ["http://b does not publish kid kid-2", "http://c: HTTP 503"]);

        let servers = Ok(vec![
            server("10.0.0.1:6443", Some(1001.0)),
            server("10.0.0.2:6443", None),
            server("10.0.0.3:6443", Some(1000.0)),
        ]);
        let fetched = judge_fetched(&servers, 1000, Duration::ZERO);
        assert_eq!(fetched.total, 3);
        assert_eq!(fetched.lagging.len(), 2);
        assert!(
            fetched.lagging[0]
                .starts_with("10.0.0.2:6443 exports no apiserver_externaljwt_fetch_keys_success_timestamp")
        );
        assert!(fetched.lagging[1].starts_with("10.0.0.3:6443 last fetched keys at"));
        assert!(!judge_fetched(&Ok(vec![]), 1000, Duration::ZERO).done(), "no API server proves nothing");

        let done = Members { total: 2, lagging: vec![] };
        let evidence = |signers: Members, servers: Members, since: u64, waited: u64| PublishEvidence {
            waited: Duration::from_secs(waited),
            signers,
            refresh_hint: Some(60),
            api_servers: servers,
            since_published: Some(Duration::from_secs(since)),
        };
        assert_eq!(
            decide_publish(&plan(), evidence(done.clone(), done.clone(), 100, 100)),
            Decision::Wait {
                message: "published and fetched; waiting 260s more so verifiers caching the key set (refresh hint 60s plus margin) have it".into(),
                at_most: Some(Duration::from_secs(260)),
            }
        );
        assert!(matches!(
            decide_publish(&plan(), evidence(done.clone(), done.clone(), 360, 360)),
            Decision::Next(_)
        ));
        assert!(
            matches!(decide_publish(&plan(), evidence(done.clone(), fetched.clone(), 9999, 10)), Decision::Wait { message, .. } if message.contains("has not flipped"))
        );
        assert!(
            matches!(decide_publish(&plan(), evidence(members, done, 9999, 3600)), Decision::Fail(m) if m.contains("http://b does not publish"))
        );
    }

    #[test]
    fn a_fetch_counts_only_after_the_publication_plus_the_skew() {
        let servers = Ok(vec![server("10.0.0.1:6443", Some(1100.0)), server("10.0.0.2:6443", Some(1301.0))]);
        let fetched = judge_fetched(&servers, 1000, Duration::from_secs(300));
        assert_eq!(fetched.lagging.len(), 1);
        assert!(
            fetched.lagging[0].starts_with("10.0.0.1:6443 last fetched keys at"),
            "{:?}",
            fetched.lagging
        );
    }

    #[test]
    fn a_signer_without_a_refresh_hint_is_named() {
        let mut old = signer("kid-1", &["kid-1", "kid-2"]);
        old.refresh_hint_seconds = None;
        let (members, hint) = judge_published(&[("http://a".to_owned(), Ok(old))], "kid-2");
        assert_eq!(
            (members.lagging, hint),
            (vec!["http://a reports no refresh_hint_seconds".to_owned()], None)
        );
    }

    #[test]
    fn switch_needs_every_signer_and_every_api_servers_token_on_the_new_kid() {
        let signers = vec![
            ("http://a".to_owned(), Ok(signer("kid-2", &[]))),
            ("http://b".to_owned(), Ok(signer("kid-1", &[]))),
        ];
        let signing = judge_signing(&signers, "kid-2");
        assert_eq!(signing.lagging, ["http://b signs with kid kid-1"]);
        let tokens = judge_token_kids(
            &[("10.0.0.1:6443".into(), Ok("kid-2".into())), ("10.0.0.2:6443".into(), Ok("kid-1".into()))],
            "kid-2",
        );
        assert_eq!(tokens.lagging, ["10.0.0.2:6443 issued a token with kid kid-1"]);
        let all = Members { total: 2, lagging: vec![] };
        let t = Duration::from_secs(1800);
        assert!(
            matches!(decide_switch(t, Duration::ZERO, &all, &tokens), Decision::Wait { message, .. } if message.contains("issued a token with kid kid-1"))
        );
        assert!(
            matches!(decide_switch(t, t, &signing, &all), Decision::Fail(m) if m.contains("http://b signs with kid kid-1"))
        );
        assert!(matches!(decide_switch(t, Duration::ZERO, &all, &all), Decision::Next(_)));
        assert!(!judge_token_kids(&[], "kid-2").done());
    }

    #[test]
    fn the_bound_rises_at_once_and_lowers_only_once_every_api_server_restarted_after_the_change() {
        let e = track_expiration(Expiration::default(), Some(3600), true, None, 100);
        assert_eq!(
            e,
            Expiration {
                bound: Some(3600),
                changed_at: Some(100),
                lower: None,
                earlier_until: None,
                observed_since: Some(100)
            }
        );
        assert_eq!(track_expiration(e, None, true, None, 200), e, "no report changes nothing");
        let raised = track_expiration(e, Some(7200), true, None, 200);
        assert_eq!((raised.bound, raised.changed_at), (Some(7200), Some(200)));

        let lowered = track_expiration(raised, Some(600), true, Some(&[150.0, 250.0]), 300);
        assert_eq!((lowered.bound, lowered.lower, lowered.changed_at), (Some(7200), Some(600), Some(300)));
        let still = track_expiration(lowered, Some(600), true, Some(&[301.0, 250.0]), 400);
        assert_eq!(
            (still.bound, still.changed_at),
            (Some(7200), Some(300)),
            "one server started before the change"
        );
        assert_eq!(
            track_expiration(lowered, Some(600), true, None, 400).bound,
            Some(7200),
            "an unknown start keeps it"
        );
        let adopted = track_expiration(lowered, Some(600), true, Some(&[301.0, 350.0]), 400);
        assert_eq!(
            adopted,
            Expiration {
                bound: Some(600),
                changed_at: Some(300),
                lower: None,
                earlier_until: Some(400 + 7200),
                observed_since: Some(100)
            }
        );
        let back = track_expiration(lowered, Some(7200), true, None, 500);
        assert_eq!((back.bound, back.lower, back.changed_at), (Some(7200), None, Some(500)));
    }

    #[test]
    fn a_lowered_bound_reaches_from_the_step_that_saw_no_older_process_not_the_latest_start() {
        // 1y lowered to 1d; A and B restart at once, C (not listed any more) issued 1y tokens
        // for 30 days before it left.
        let year = 365 * 86_400;
        let e = track_expiration(Expiration::default(), Some(year), true, None, 0);
        let lowered = track_expiration(e, Some(86_400), true, Some(&[1.0, 2.0, -5.0]), 100);
        let day30 = 30 * 86_400;
        let adopted = track_expiration(lowered, Some(86_400), true, Some(&[3600.0, 3601.0]), day30);
        assert_eq!(adopted.bound, Some(86_400));
        assert_eq!(adopted.earlier_until, Some(day30 + year), "C's tokens live to 30d + 1y");
    }

    #[test]
    fn a_bound_is_lowered_only_when_every_signer_answered_the_lower_value() {
        let e = track_expiration(Expiration::default(), Some(7200), true, None, 100);
        let partial = track_expiration(e, Some(600), false, Some(&[301.0]), 300);
        assert_eq!(partial, e, "a signer that did not answer may still serve 7200");
        let raised = track_expiration(e, Some(9000), false, None, 300);
        assert_eq!(raised.bound, Some(9000), "a higher value is taken from any signer");
    }

    #[test]
    fn drain_ends_after_the_bound_the_earlier_tokens_and_the_skew() {
        let skew = Duration::from_secs(300);
        let e = |bound, earlier| Expiration { bound, earlier_until: earlier, ..Expiration::default() };
        assert_eq!(drain_until(1000, &e(None, None), skew), None);
        assert_eq!(drain_until(1000, &e(Some(3600), None), skew), Some(1000 + 3600 + 300));
        assert_eq!(drain_until(1000, &e(Some(60), None), skew), Some(1000 + 600 + 300), "never under 600 s");
        assert_eq!(drain_until(1000, &e(Some(600), Some(9000)), skew), Some(9000 + 300));
    }

    #[test]
    fn a_status_out_of_range_is_not_valid_and_signer_texts_are_clipped() {
        let ok = signer("kid-1", &["kid-1"]);
        assert_eq!(vet_report(Ok(ok.clone())), Ok(ok.clone()));
        let mut huge = ok.clone();
        huge.max_token_expiration_seconds = Some(i64::MAX);
        assert!(
            vet_report(Ok(huge))
                .is_err_and(|e| e.contains("max_token_expiration_seconds 9223372036854775807"))
        );
        let mut short = ok.clone();
        short.max_token_expiration_seconds = Some(599);
        assert!(vet_report(Ok(short)).is_err());
        let mut hint = ok.clone();
        hint.refresh_hint_seconds = Some(86_401);
        assert!(vet_report(Ok(hint)).is_err_and(|e| e.contains("refresh_hint_seconds 86401")));
        let mut zero = ok.clone();
        zero.refresh_hint_seconds = Some(0);
        assert!(vet_report(Ok(zero)).is_err());
        let long = "k".repeat(KID_MAX_BYTES + 1);
        assert!(vet_report(Ok(signer(&long, &[]))).is_err_and(|e| e.len() < SIGNER_TEXT_MAX));
        assert!(vet_report(Ok(signer("kid-1", &[&long]))).is_err());
        assert!(vet_report(Err("x".repeat(250_000))).is_err_and(|e| e.len() <= SIGNER_TEXT_MAX + 3));

        let kid = "k".repeat(KID_MAX_BYTES);
        let mut status = signer(&kid, &[&kid]);
        status.published[0].version = Some(1);
        let reports = [("http://a".to_owned(), Ok(status))];
        let signing = judge_signing(&reports, "kid-2");
        assert!(signing.lagging[0].len() < SIGNER_TEXT_MAX + 40, "{}", signing.lagging[0]);
        assert!(judge_retired(&reports, 2).lagging[0].len() < SIGNER_TEXT_MAX + 40);
    }

    #[test]
    fn publish_time_wait_fails_at_the_timeout() {
        let done = Members { total: 1, lagging: vec![] };
        let evidence = PublishEvidence {
            waited: Duration::from_secs(3600),
            signers: done.clone(),
            refresh_hint: Some(86_400),
            api_servers: done,
            since_published: Some(Duration::from_secs(3000)),
        };
        assert!(matches!(decide_publish(&plan(), evidence), Decision::Fail(m) if m.contains("left after")));
    }

    #[test]
    fn retire_waits_until_no_signer_publishes_an_old_kid() {
        let versioned = |status: SignerStatus| SignerStatus {
            published: status
                .published
                .into_iter()
                .map(|p| PublishedKey {
                    version: p.kid.strip_prefix("kid-").and_then(|v| v.parse().ok()),
                    ..p
                })
                .collect(),
            ..status
        };
        let signers = vec![
            ("http://a".to_owned(), Ok(versioned(signer("kid-2", &["kid-2"])))),
            ("http://b".to_owned(), Ok(versioned(signer("kid-2", &["kid-1", "kid-2"])))),
        ];
        assert_eq!(judge_retired(&signers, 2).lagging, ["http://b still publishes kid kid-1"]);
        assert!(judge_retired(&signers[..1], 2).done());
    }

    #[test]
    fn a_verify_only_key_sharing_an_old_kid_does_not_hold_retire() {
        // After the runbook's `sa.key` import, Transit v1 and `sa.pub` share a kid; once v1 is
        // retired the signer keeps it as a verify-only entry from the file.
        let signers = vec![("http://a".to_owned(), Ok(signer("kid-2", &["kid-1", "kid-2"])))];
        assert!(judge_retired(&signers, 2).done(), "{:?}", judge_retired(&signers, 2));
    }

    #[test]
    fn the_first_bound_seen_starts_the_observation_and_a_kept_bound_counts_from_its_last_change() {
        let first = track_expiration(Expiration::default(), Some(3600), true, None, 100);
        assert_eq!(first.observed_since, Some(100));
        let later = track_expiration(first, Some(7200), true, None, 900);
        assert_eq!(later.observed_since, Some(100), "a raise does not move the start");
        let unseen = Expiration { observed_since: Some(5), ..Expiration::default() };
        assert_eq!(
            track_expiration(unseen, Some(3600), true, None, 100).observed_since,
            Some(100),
            "a start without a bound was no observation of one"
        );
        assert_eq!(track_expiration(unseen, None, true, None, 100), unseen, "nothing reported, nothing seen");

        // A status kept before the start was recorded: from the bound's last change, or now.
        let old = Expiration { bound: Some(3600), changed_at: Some(40), ..Expiration::default() };
        assert_eq!(track_expiration(old, None, true, None, 100).observed_since, Some(40));
        assert_eq!(track_expiration(old, Some(3600), true, None, 100).observed_since, Some(40));
        let bare = Expiration { bound: Some(3600), ..Expiration::default() };
        assert_eq!(track_expiration(bare, Some(3600), true, None, 100).observed_since, Some(100));
    }

    fn started(address: &str, start: Option<f64>) -> ApiServerReport {
        ApiServerReport {
            address: address.into(),
            metrics: Ok(FetchKeysMetrics { fetch_keys_success: Some(1.0), process_start: start }),
        }
    }

    #[test]
    fn the_bound_is_established_only_by_servers_started_after_the_observation_plus_the_skew() {
        let skew = Duration::from_secs(300);
        let servers = Ok(vec![
            started("10.0.0.1:6443", Some(1301.0)),
            started("10.0.0.2:6443", Some(1300.0)),
            started("10.0.0.3:6443", None),
            ApiServerReport { address: "10.0.0.4:6443".into(), metrics: Err("HTTP 403".into()) },
        ]);
        let judged = judge_established(&servers, Some(1000), skew);
        assert_eq!(judged.total, 4);
        assert_eq!(judged.lagging.len(), 3, "{:?}", judged.lagging);
        assert!(judged.lagging[0].starts_with("10.0.0.2:6443 started at"), "{}", judged.lagging[0]);
        assert!(judged.lagging[0].ends_with("restart it"), "{}", judged.lagging[0]);
        assert_eq!(judged.lagging[1], "10.0.0.3:6443 exports no process_start_time_seconds");
        assert_eq!(judged.lagging[2], "10.0.0.4:6443: HTTP 403");

        let restarted = Ok(vec![started("10.0.0.1:6443", Some(1301.0))]);
        assert!(judge_established(&restarted, Some(1000), skew).done());
        assert!(!judge_established(&restarted, None, skew).done(), "no start recorded proves nothing");
        assert!(!judge_established(&Ok(vec![]), Some(1000), skew).done(), "no API server proves nothing");
        assert!(!judge_established(&Err("forbidden".into()), Some(1000), skew).done());
    }

    #[test]
    fn an_idle_policy_holds_on_a_key_behind_the_known_version() {
        let behind = Idle::Behind { known: 3 };
        assert_eq!(decide_idle(Some(3), &key(2, 2), None, true, true), behind, "latest below known");
        assert_eq!(decide_idle(Some(3), &key(2, 0), None, false, false), behind, "unpinned, latest below");
        assert_eq!(decide_idle(Some(3), &key(3, 2), None, true, true), behind, "pinned below known");
        assert_eq!(
            decide_idle(Some(3), &key(4, 2), None, false, false),
            behind,
            "a newer version does not start a run from a pin set back"
        );
        assert_eq!(decide_idle(Some(3), &key(3, 0), None, false, false), Idle::Rest, "unpinned at known");
        assert_eq!(decide_idle(Some(3), &key(3, 3), None, false, false), Idle::Rest);
        assert_eq!(decide_idle(None, &key(2, 2), None, false, false), Idle::Adopt(2), "nothing known yet");
        let message = behind_message(3, &key(2, 2));
        assert!(message.contains("Vault restored"), "{message}");
        assert!(message.contains("status.knownVersion"), "{message}");
    }
}
