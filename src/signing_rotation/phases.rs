//! The driver of each phase after Idle: gather the evidence through the two seams, ask
//! [`super::decide`], act on the answer, and record proofs and stragglers in the status.

use std::time::Duration;

use super::{
    ApiServerReport, Fleet, Run, SigningKeyAdmin, SigningKeyState, SigningRotationError, Step,
    decide::{
        Decision, Expiration, Members, PublishEvidence, Rotate, SignerReports, checked_versions,
        decide_publish, decide_rotate, decide_switch, drain_until, judge_established, judge_fetched,
        judge_published, judge_retired, judge_signing, judge_token_kids, switch_lost, track_expiration,
    },
};
use crate::{
    clock::{self, parse_time},
    crd::signing::SigningPhase,
    k8s::EventKind,
};

/// Most stragglers of each kind listed in the status; the count is in the metrics.
const MAX_LISTED: usize = 32;

impl<K: SigningKeyAdmin, F: Fleet> Run<'_, K, F> {
    fn waited(&self) -> Duration {
        self.book.elapsed_since(&self.book.status.phase_started_at)
    }

    fn seconds(text: &str) -> Option<i64> {
        parse_time(text).map(|t| t.as_second())
    }

    fn stragglers(&mut self, signers: &Members, api_servers: &Members) {
        let listed = |m: &Members| m.lagging.iter().take(MAX_LISTED).cloned().collect();
        self.book.status.signer_stragglers = listed(signers);
        self.book.status.api_server_stragglers = listed(api_servers);
    }

    /// Acts on a decision: `next` is the phase a [`Decision::Next`] enters.
    fn act(&mut self, decision: Decision, reason: &'static str, next: SigningPhase) -> Step {
        match decision {
            Decision::Next(message) => {
                self.book.status.message = message;
                self.book.enter(next);
                Step::Again
            }
            Decision::Wait { message, at_most } => self.wait(message, at_most),
            Decision::Fail(message) => self.fail(reason, &message),
        }
    }

    /// Folds what the signers report now into the kept token-lifetime bound.
    pub(super) fn track(
        &mut self,
        signers: &SignerReports,
        api_servers: &Result<Vec<ApiServerReport>, String>,
    ) {
        let reported = signers
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok().and_then(|s| s.max_token_expiration_seconds))
            .max();
        let every_signer = !signers.is_empty()
            && signers
                .iter()
                .all(|(_, r)| r.as_ref().is_ok_and(|s| s.max_token_expiration_seconds.is_some()));
        let starts: Option<Vec<f64>> = api_servers.as_ref().ok().and_then(|list| {
            list.iter().map(|a| a.metrics.as_ref().ok().and_then(|m| m.process_start)).collect()
        });
        let status = &self.book.status;
        let prev = Expiration {
            bound: status.max_token_expiration_seconds,
            changed_at: Self::seconds(&status.max_token_expiration_changed_at),
            lower: status.lower_token_expiration_seconds,
            earlier_until: Self::seconds(&status.earlier_tokens_expire_at),
            observed_since: Self::seconds(&status.max_token_expiration_observed_since),
        };
        let next =
            track_expiration(prev, reported, every_signer, starts.as_deref(), self.book.now().as_second());
        if next == prev {
            return;
        }
        if next.bound != prev.bound {
            self.book.events.push((
                EventKind::Normal,
                "TokenLifetimeBound",
                format!("Drain now waits for tokens of up to {}s", next.bound.unwrap_or(0)),
            ));
        }
        let text = |t: Option<i64>| t.map(clock::seconds_text).unwrap_or_default();
        let status = &mut self.book.status;
        status.max_token_expiration_seconds = next.bound;
        status.max_token_expiration_changed_at = text(next.changed_at);
        status.lower_token_expiration_seconds = next.lower;
        status.earlier_tokens_expire_at = text(next.earlier_until);
        status.max_token_expiration_observed_since = text(next.observed_since);
    }

    /// Clears the `Stalled` condition when `reason` set it (what it waited for holds now), with
    /// reason `cleared`; says whether it did.
    pub(super) fn unstall(&mut self, reason: &str, cleared: &str) -> bool {
        let stalled = self.book.status.conditions.iter().any(|c| c.type_ == "Stalled" && c.reason == reason);
        if stalled {
            self.book.condition("Stalled", false, cleared, "");
        }
        stalled
    }

    pub(super) async fn rotating(&mut self) -> Result<Step, SigningRotationError> {
        let from = self.book.status.from_version.unwrap_or(0);
        let key = &self.plan.transit;
        let mut meta = self.ctx.key.metadata(key).await?;
        if from > meta.latest {
            // NB: pinning a version Transit does not hold fails on every step; say why instead.
            let message = format!(
                "Transit's latest version is {}, below version {from} that signed when the run began: probably a Vault restored from an older snapshot; check the key before a new run",
                meta.latest
            );
            return Ok(self.fail("KeyBehindStatus", &message));
        }
        // NB: at most one pin and one rotate per step, each followed by a fresh read, so a call
        // that timed out but landed is seen before anything is repeated.
        if let Rotate::Pin(version) = decide_rotate(from, &meta) {
            self.ctx.key.pin_signing(key, version).await?;
            meta = self.ctx.key.metadata(key).await?;
        }
        if decide_rotate(from, &meta) == Rotate::Rotate {
            self.ctx.key.rotate(key).await?;
            meta = self.ctx.key.metadata(key).await?;
        }
        let Rotate::Done { to } = decide_rotate(from, &meta) else {
            if self.waited() >= self.plan.rotate.timeout {
                let message = format!(
                    "Transit reports latest {} and min_encryption_version {} after pinning {from} and rotating",
                    meta.latest, meta.min_encryption_version
                );
                return Ok(self.fail("RotateFailed", &message));
            }
            return Ok(self.wait("waiting for Transit to show the pin and the new version".into(), None));
        };
        let (Some(from_kid), Some(to_kid)) = (meta.kids.get(&from), meta.kids.get(&to)) else {
            return Ok(self.fail("NoKid", &format!("Transit holds no public key for version {from} or {to}")));
        };
        self.book.status.from_kid = from_kid.clone();
        self.book.status.to_kid = to_kid.clone();
        self.book.status.to_version = Some(to);
        self.book.events.push((
            EventKind::Normal,
            "Rotated",
            format!("signing pinned to version {from}; version {to} created"),
        ));
        self.book.status.message = format!("version {to} made; publishing it");
        self.book.enter(SigningPhase::Publishing);
        Ok(Step::Again)
    }

    pub(super) async fn publishing(&mut self) -> Result<Step, SigningRotationError> {
        let kid = self.book.status.to_kid.clone();
        let signers = self.ctx.signer_reports(self.plan).await?;
        let (published, hint) = judge_published(&signers, &kid);
        if !published.done() {
            // NB: a signer that stopped publishing (a new node, a restart) restarts the clock.
            self.book.status.published_at.clear();
        } else if self.book.status.published_at.is_empty() {
            self.book.status.published_at = self.book.now_text();
            self.book.events.push((
                EventKind::Normal,
                "Published",
                format!("{} signers publish the new kid", published.total),
            ));
        }
        let api_servers = self.ctx.fleet.api_servers().await;
        self.track(&signers, &api_servers);
        let (fetched, since) = match Self::seconds(&self.book.status.published_at) {
            Some(at) => (
                judge_fetched(&api_servers, at, self.plan.drain.skew),
                Some(self.book.elapsed_since(&self.book.status.published_at)),
            ),
            None => (Members::default(), None),
        };
        if fetched.done() {
            if self.book.status.fetched_at.is_empty() {
                self.book.status.fetched_at = self.book.now_text();
            }
        } else {
            self.book.status.fetched_at.clear();
        }
        self.stragglers(&published, &fetched);
        let evidence = PublishEvidence {
            waited: self.waited(),
            signers: published,
            refresh_hint: hint,
            api_servers: fetched,
            since_published: since,
        };
        let decision = decide_publish(&self.plan.publish, evidence);
        Ok(self.act(decision, "PublishTimeout", SigningPhase::Switching))
    }

    /// `to` from the status, checked before a pin or a retire, or the step that stops the run.
    fn checked_to(&mut self) -> Result<u64, Step> {
        let status = &self.book.status;
        checked_versions(status.from_version, status.to_version)
            .map_err(|(reason, message)| self.fail(reason, &message))
    }

    /// Stops the run (reason `KeyChanged`) unless Transit's kid for `to` is still the one the
    /// run published: a key deleted and recreated, or a Vault restored from another snapshot,
    /// can hold a different key under the same version number.
    fn same_key(&mut self, meta: &SigningKeyState, to: u64) -> Result<(), Step> {
        let kid = &self.book.status.to_kid;
        match meta.kids.get(&to) {
            Some(now) if !kid.is_empty() && now == kid => Ok(()),
            now => {
                let message = format!(
                    "Transit's version {to} has kid {}, not {kid:?} that this run published; start a new run",
                    now.map_or("none".to_owned(), |k| format!("{k:?}"))
                );
                Err(self.fail("KeyChanged", &message))
            }
        }
    }

    pub(super) async fn switching(&mut self) -> Result<Step, SigningRotationError> {
        let to = match self.checked_to() {
            Ok(to) => to,
            Err(step) => return Ok(step),
        };
        let kid = self.book.status.to_kid.clone();
        let key = &self.plan.transit;
        let meta = self.ctx.key.metadata(key).await?;
        if let Err(step) = self.same_key(&meta, to) {
            return Ok(step);
        }
        let mut signers = self.ctx.signer_reports(self.plan).await?;
        let api_servers = self.ctx.fleet.api_servers().await;
        if meta.min_encryption_version != to {
            // NB: Publish's proof is checked again right before the pin, from fresh evidence: a
            // signer added or restarted since, or a status that skipped Publish, must not let
            // signing move to a kid some verifier does not hold.
            let (published, _) = judge_published(&signers, &kid);
            let fetched = match Self::seconds(&self.book.status.published_at) {
                Some(at) => judge_fetched(&api_servers, at, self.plan.drain.skew),
                None => Members { total: 0, lagging: vec!["publishedAt is not recorded".into()] },
            };
            if !published.done() || !fetched.done() {
                let lagging: Vec<String> = published.lagging.into_iter().chain(fetched.lagging).collect();
                let message = format!(
                    "the new kid's publication no longer holds before the pin ({}); proving it again",
                    lagging.join("; ")
                );
                self.book.events.push((EventKind::Warning, "PublicationLost", message.clone()));
                self.book.status.message = message;
                self.book.enter(SigningPhase::Publishing);
                return Ok(Step::Again);
            }
            self.ctx.key.pin_signing(key, to).await?;
            self.book.events.push((EventKind::Normal, "Pinned", format!("signing pinned to version {to}")));
            signers = self.ctx.signer_reports(self.plan).await?;
        }
        let signing = judge_signing(&signers, &kid);
        self.track(&signers, &api_servers);
        // NB: tokens are asked for only once every signer signs with the new kid: each one is a
        // real token, and the signers' own word is the cheaper check.
        let mut tokens = Members::default();
        if signing.done() {
            let kids = match &api_servers {
                Ok(list) => {
                    let mut kids = Vec::new();
                    for server in list {
                        let answer =
                            self.ctx.fleet.token_kid(&server.address, &self.plan.switch.audience).await;
                        kids.push((server.address.clone(), answer));
                    }
                    kids
                }
                Err(e) => vec![("API servers".to_owned(), Err(format!("cannot be listed: {e}")))],
            };
            tokens = judge_token_kids(&kids, &kid);
        }
        self.stragglers(&signing, &tokens);
        let decision = decide_switch(self.plan.switch.timeout, self.waited(), &signing, &tokens);
        if let Decision::Next(message) = &decision {
            self.book.status.switched_at = self.book.now_text();
            self.book.events.push((EventKind::Normal, "Switched", message.clone()));
        }
        Ok(self.act(decision, "SwitchTimeout", SigningPhase::Draining))
    }

    /// Sends the run back to Switching: what Drain counted from no longer holds.
    fn switch_again(&mut self, why: &str) -> Step {
        let message = format!("the switch to the new kid no longer holds ({why}); switching again");
        self.book.events.push((EventKind::Warning, "SwitchLost", message.clone()));
        self.book.status.switched_at.clear();
        self.book.status.drain_until.clear();
        self.book.status.message = message;
        self.book.enter(SigningPhase::Switching);
        Step::Again
    }

    pub(super) async fn draining(&mut self) -> Result<Step, SigningRotationError> {
        let to = match self.checked_to() {
            Ok(to) => to,
            Err(step) => return Ok(step),
        };
        let meta = self.ctx.key.metadata(&self.plan.transit).await?;
        if let Err(step) = self.same_key(&meta, to) {
            return Ok(step);
        }
        let signers = self.ctx.signer_reports(self.plan).await?;
        // NB: every step proves the switch again: if the pin went back (or a signer signs with
        // another kid), tokens are being signed with the old key, and Drain must start over from
        // a new switch rather than end at the old switchedAt plus the bound.
        if let Some(why) = switch_lost(meta.min_encryption_version, to, &signers, &self.book.status.to_kid) {
            return Ok(self.switch_again(&why));
        }
        let api_servers = self.ctx.fleet.api_servers().await;
        self.track(&signers, &api_servers);
        // NB: the switch cannot predate the phase it was proven in (Draining starts in the same
        // step); a status that says otherwise would cut Drain short, so the later time counts.
        let Some(switched) = Self::seconds(&self.book.status.switched_at) else {
            return Ok(self.switch_again("switchedAt is not recorded"));
        };
        let switched = switched.max(Self::seconds(&self.book.status.phase_started_at).unwrap_or(switched));
        let status = &self.book.status;
        let expiration = Expiration {
            bound: status.max_token_expiration_seconds,
            earlier_until: Self::seconds(&status.earlier_tokens_expire_at),
            ..Expiration::default()
        };
        let Some(until) = drain_until(switched, &expiration, self.plan.drain.skew) else {
            let message = "no signer has reported max_token_expiration_seconds, so how long old tokens live is unknown; upgrade the signers";
            self.book.stall("NoTokenLifetime", message);
            return Ok(Step::Wait(self.ctx.poll));
        };
        self.unstall("NoTokenLifetime", "TokenLifetimeKnown");
        self.book.status.drain_until = clock::seconds_text(until);
        // NB: named from the start of Drain, so the servers can be restarted before its time is
        // up; only its end waits for them.
        let established = judge_established(
            &api_servers,
            Self::seconds(&self.book.status.max_token_expiration_observed_since),
            self.plan.drain.skew,
        );
        self.stragglers(&Members::default(), &established);
        let now = self.book.now().as_second();
        if now >= until {
            if !established.done() {
                let message = format!(
                    "the old key's tokens have expired by the bound of {}s, but an API server may have read a longer one: {}",
                    self.book.status.max_token_expiration_seconds.unwrap_or(0),
                    established.summary("API servers")
                );
                self.book.stall("TokenLifetimeNotEstablished", &message);
                return Ok(Step::Wait(self.ctx.poll));
            }
            self.unstall("TokenLifetimeNotEstablished", "TokenLifetimeEstablished");
            self.book.status.message = "every token signed with the old key has expired".into();
            self.book.enter(SigningPhase::Retiring);
            return Ok(Step::Again);
        }
        let left = Duration::from_secs((until - now) as u64);
        let mut message = format!("waiting {left:?} until tokens signed with the old key have expired");
        if !established.done() {
            message.push_str(
                "; the bound is not established for every API server (see apiServerStragglers), and Drain holds at its end until it is",
            );
        }
        if self.due() {
            message.push_str(
                "; the schedule came due, and its run starts once this one has retired the old key",
            );
        }
        Ok(self.wait(message, Some(left)))
    }

    pub(super) async fn retiring(&mut self) -> Result<Step, SigningRotationError> {
        let to = match self.checked_to() {
            Ok(to) => to,
            Err(step) => return Ok(step),
        };
        let key = &self.plan.transit;
        let meta = self.ctx.key.metadata(key).await?;
        if let Err(step) = self.same_key(&meta, to) {
            return Ok(step);
        }
        let signers = self.ctx.signer_reports(self.plan).await?;
        if meta.min_decryption_version < to {
            // NB: the old version is retired only while the switch holds: the pin is `to` and
            // every signer signs with the new kid.
            if let Some(why) =
                switch_lost(meta.min_encryption_version, to, &signers, &self.book.status.to_kid)
            {
                return Ok(self.switch_again(&why));
            }
            let signing = judge_signing(&signers, &self.book.status.to_kid);
            if !signing.done() {
                let message = format!(
                    "not retiring until every signer is seen signing with the new kid: {}",
                    signing.lagging.join("; ")
                );
                self.stragglers(&signing, &Members::default());
                if self.waited() >= self.plan.retire.timeout {
                    return Ok(self.fail("RetireTimeout", &message));
                }
                return Ok(self.wait(message, None));
            }
            self.ctx.key.retire_below(key, to).await?;
            self.book.status.retired_below = Some(to);
            self.book.events.push((
                EventKind::Normal,
                "Retired",
                format!("min_decryption_version raised to {to}"),
            ));
        }
        let retired = judge_retired(&signers, to);
        self.stragglers(&retired, &Members::default());
        if retired.done() {
            return Ok(self.finish());
        }
        let message = match retired.total {
            0 => "no signer endpoints found".to_owned(),
            _ => format!("waiting for signers to drop the old kid: {}", retired.lagging.join("; ")),
        };
        if self.waited() >= self.plan.retire.timeout {
            return Ok(self.fail("RetireTimeout", &message));
        }
        Ok(self.wait(message, None))
    }
}
