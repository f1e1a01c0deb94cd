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
/// unknown. Lowering keeps the old bound's reach in `earlier_until`: the latest start plus the
/// old bound, since every process that read the old bound had been replaced by then.
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
            let since = next.changed_at.unwrap_or(now) as f64;
            let latest_start = match starts {
                Some(s) if !s.is_empty() && s.iter().all(|start| *start > since) => {
                    s.iter().copied().fold(f64::MIN, f64::max)
                }
                _ => return next,
            };
            // NB: a process that read the higher bound was replaced by the latest start at the
            // latest, so its tokens live until then plus that bound at most.
            let reach = (latest_start.ceil() as i64).min(now).saturating_add(bound);
            next.earlier_until = Some(prev.earlier_until.map_or(reach, |e| e.max(reach)));
            next.bound = Some(reported);
            next.lower = None;
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
                    members.lagging.push(format!("{endpoint} still publishes kid {}", p.kid));
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
        assert_eq!(decide_idle(None, &key(3, 2), true, true), Idle::Adopt(2));
        assert_eq!(decide_idle(None, &key(3, 0), false, false), Idle::Adopt(3));
        assert_eq!(
            decide_idle(Some(2), &key(3, 2), true, true),
            Idle::Start { trigger: "external", from: 2 }
        );
        assert_eq!(decide_idle(Some(3), &key(3, 3), true, true), Idle::Start { trigger: "request", from: 3 });
        assert_eq!(
            decide_idle(Some(3), &key(3, 3), false, true),
            Idle::Start { trigger: "schedule", from: 3 }
        );
        assert_eq!(decide_idle(Some(3), &key(3, 3), false, false), Idle::Rest);
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
        let fetched = judge_fetched(&servers, 1000);
        assert_eq!(fetched.total, 3);
        assert_eq!(fetched.lagging.len(), 2);
        assert!(
            fetched.lagging[0]
                .starts_with("10.0.0.2:6443 exports no apiserver_externaljwt_fetch_keys_success_timestamp")
        );
        assert!(fetched.lagging[1].starts_with("10.0.0.3:6443 last fetched keys at"));
        assert!(!judge_fetched(&Ok(vec![]), 1000).done(), "no API server proves nothing");

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
        let e = track_expiration(Expiration::default(), Some(3600), None, 100);
        assert_eq!(
            e,
            Expiration { bound: Some(3600), changed_at: Some(100), lower: None, earlier_until: None }
        );
        assert_eq!(track_expiration(e, None, None, 200), e, "no report changes nothing");
        let raised = track_expiration(e, Some(7200), None, 200);
        assert_eq!((raised.bound, raised.changed_at), (Some(7200), Some(200)));

        let lowered = track_expiration(raised, Some(600), Some(&[150.0, 250.0]), 300);
        assert_eq!((lowered.bound, lowered.lower, lowered.changed_at), (Some(7200), Some(600), Some(300)));
        let still = track_expiration(lowered, Some(600), Some(&[301.0, 250.0]), 400);
        assert_eq!(
            (still.bound, still.changed_at),
            (Some(7200), Some(300)),
            "one server started before the change"
        );
        assert_eq!(
            track_expiration(lowered, Some(600), None, 400).bound,
            Some(7200),
            "an unknown start keeps it"
        );
        let adopted = track_expiration(lowered, Some(600), Some(&[301.0, 350.0]), 400);
        assert_eq!(
            adopted,
            Expiration {
                bound: Some(600),
                changed_at: Some(300),
                lower: None,
                earlier_until: Some(350 + 7200)
            }
        );
        let back = track_expiration(lowered, Some(7200), None, 500);
        assert_eq!((back.bound, back.lower, back.changed_at), (Some(7200), None, Some(500)));
    }

    #[test]
    fn drain_ends_after_the_bound_the_earlier_tokens_and_the_skew() {
        let skew = Duration::from_secs(300);
        let e = |bound, earlier| Expiration { bound, changed_at: None, lower: None, earlier_until: earlier };
        assert_eq!(drain_until(1000, &e(None, None), skew), None);
        assert_eq!(drain_until(1000, &e(Some(3600), None), skew), Some(1000 + 3600 + 300));
        assert_eq!(drain_until(1000, &e(Some(60), None), skew), Some(1000 + 600 + 300), "never under 600 s");
        assert_eq!(drain_until(1000, &e(Some(600), Some(9000)), skew), Some(9000 + 300));
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
}
