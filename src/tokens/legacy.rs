//! Rotation of legacy token Secrets: record, delete, recreate without the old token, wait for the
//! token controller to fill the new one, annotate.
//!
//! The record goes into the TokenPolicy status before the delete, so a crash between delete and
//! create is finished by [`Legacy::resume`] on the next start instead of losing the Secret.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::ObjectMeta, jiff::Timestamp};

use super::{
    Clock, INVALID_SINCE_LABEL, LAST_USED_LABEL, ROTATE_ANNOTATION, ROTATED_ANNOTATION, SA_NAME_ANNOTATION,
    SA_UID_ANNOTATION, TokenError, matches_any, rfc3339,
};
pub use crate::crd::tokens::Selection;
use crate::{
    crd::tokens::{PendingSecret, TokenStatus},
    k8s::{Created, Deleted, EventKind, Kube, Referenced},
    metrics::ControllerMetrics,
};

/// How long after a rotation starts the token controller's removal of the old reference may
/// still arrive. It removes by name when it sees the delete
/// (pkg/controller/serviceaccount/tokens_controller.go, `syncSecret`), within seconds; one that
/// missed the delete (restarted, or re-listed after the Secret was recreated) never removes it.
/// A name still listed after this is the reference itself.
pub const REFERENCE_WAIT: Duration = Duration::from_secs(600);

/// What a run does with one Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Due: older than the maximum age.
    Rotate,
    /// Younger than the maximum age.
    Young,
    /// Excluded by a rule (named).
    Excluded(String),
    /// The cleaner marked it invalid on this date: reported, not rotated.
    Invalid(String),
    /// It names no ServiceAccount, so the token controller could not fill a new one.
    NoServiceAccount,
}

impl Verdict {
    /// A short word for tables.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Rotate => "rotate",
            Self::Young => "keep",
            Self::Excluded(_) => "excluded",
            Self::Invalid(_) => "invalid",
            Self::NoServiceAccount => "no-sa",
        }
    }
}

/// A legacy token Secret and what a run would do with it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// uid.
    pub uid: String,
    /// The ServiceAccount named by the Secret.
    pub service_account: String,
    /// Seconds since creation.
    pub age: i64,
    /// The API server's last-used label, if any: the UTC day the token last authenticated.
    pub last_used: Option<String>,
    /// The verdict.
    pub verdict: Verdict,
    /// Why, for people.
    pub reason: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

impl Candidate {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Decides what to do with one Secret, from its metadata.
pub fn classify(meta: ObjectMeta, selection: &Selection, now: Timestamp) -> Candidate {
    let labels = meta.labels.unwrap_or_default();
    let annotations = meta.annotations.unwrap_or_default();
    let created = meta.creation_timestamp.map(|t| t.0.as_second()).unwrap_or(now.as_second());
    let age = now.as_second() - created;
    let service_account = annotations.get(SA_NAME_ANNOTATION).cloned().unwrap_or_default();
    let max_age = selection.max_age.duration().as_secs() as i64;
    let (verdict, reason) = if let Some(since) = labels.get(INVALID_SINCE_LABEL) {
        (Verdict::Invalid(since.clone()), format!("marked invalid since {since}; remove it or re-enable it"))
    } else if annotations.get(ROTATE_ANNOTATION).is_some_and(|v| v == "false") {
        (Verdict::Excluded(ROTATE_ANNOTATION.into()), format!("{ROTATE_ANNOTATION}=false"))
    } else if let Some(rule) = matches_any(&labels, &selection.exclude_labels) {
        (Verdict::Excluded(rule.to_string()), format!("excluded by label {rule}"))
    } else if let Some(rule) = matches_any(&annotations, &selection.exclude_annotations) {
        (Verdict::Excluded(rule.to_string()), format!("excluded by annotation {rule}"))
    } else if service_account.is_empty() {
        (Verdict::NoServiceAccount, format!("no {SA_NAME_ANNOTATION} annotation"))
    } else if age > max_age {
        (Verdict::Rotate, format!("age {} > {}", super::age(age), super::age(max_age)))
    } else {
        (Verdict::Young, format!("age {} <= {}", super::age(age), super::age(max_age)))
    };
    Candidate {
        namespace: meta.namespace.unwrap_or_default(),
        name: meta.name.unwrap_or_default(),
        uid: meta.uid.unwrap_or_default(),
        service_account,
        age,
        last_used: labels.get(LAST_USED_LABEL).cloned(),
        verdict,
        reason,
        labels,
        annotations,
    }
}

/// What became of one Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A fresh token is in the recreated Secret.
    Rotated,
    /// Left alone, with the reason (someone else deleted or recreated it).
    Skipped(String),
    /// Could not be rotated, with the reason.
    Failed(String),
}

/// Totals of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Rotated.
    pub rotated: u64,
    /// Left alone by a race.
    pub skipped: u64,
    /// Failed.
    pub failed: u64,
    /// Marked invalid by the cleaner.
    pub invalid: u64,
    /// Due for rotation (the dry run's count).
    pub due: u64,
}

/// The legacy rotation of one TokenPolicy.
pub struct Legacy<'a> {
    kube: &'a Kube,
    policy: &'a str,
    clock: &'a dyn Clock,
    metrics: &'a ControllerMetrics,
    /// How long to wait for the token controller.
    pub token_timeout: Duration,
    /// How often to look while waiting.
    pub poll: Duration,
}

impl<'a> Legacy<'a> {
    /// Rotation recorded in the TokenPolicy `policy`.
    pub fn new(
        kube: &'a Kube,
        policy: &'a str,
        clock: &'a dyn Clock,
        metrics: &'a ControllerMetrics,
        token_timeout: Duration,
    ) -> Self {
        Self { kube, policy, clock, metrics, token_timeout, poll: Duration::from_secs(1) }
    }

    /// The legacy token Secrets the selection covers, each with its verdict, sorted by name.
    pub async fn plan(&self, selection: &Selection) -> Result<Vec<Candidate>, TokenError> {
        let mut metas = Vec::new();
        if selection.namespaces.is_empty() {
            metas = self.kube.list_legacy_token_secrets(None, selection.label_selector.as_deref()).await?;
        } else {
            for ns in &selection.namespaces {
                metas.extend(
                    self.kube
                        .list_legacy_token_secrets(Some(ns), selection.label_selector.as_deref())
                        .await?,
                );
            }
        }
        let now = self.clock.now();
        let mut candidates: Vec<Candidate> = metas.into_iter().map(|m| classify(m, selection, now)).collect();
        candidates.sort_by_key(Candidate::id);
        Ok(candidates)
    }

    /// Applies `change` to the TokenPolicy status (see [`super::update_status`]).
    pub async fn update_status(&self, change: impl Fn(&mut TokenStatus)) -> Result<TokenStatus, TokenError> {
        super::update_status(self.kube, self.policy, change).await
    }

    async fn forget(&self, namespace: &str, name: &str) -> Result<(), TokenError> {
        self.update_status(|s| s.pending.retain(|p| !(p.namespace == namespace && p.name == name))).await?;
        Ok(())
    }

    async fn pending(&self) -> Result<Vec<PendingSecret>, TokenError> {
        Ok(self
            .kube
            .token_policy(self.policy)
            .await?
            .and_then(|p| p.status)
            .map(|s| s.pending)
            .unwrap_or_default())
    }

    /// Finishes every rotation a crash interrupted, from the records in the status, and
    /// re-checks the ServiceAccount references still to restore.
    pub async fn resume(&self) -> Result<Vec<(String, Outcome)>, TokenError> {
        let mut done = Vec::new();
        for record in self.pending().await? {
            let id = format!("{}/{}", record.namespace, record.name);
            if let Some(uid) = &record.recreated {
                self.restore_reference(&record, uid).await?;
                continue;
            }
            let outcome = match self.kube.secret_meta(&record.namespace, &record.name).await? {
                Some(meta) if meta.uid.as_deref() == Some(record.uid.as_str()) => {
                    self.forget(&record.namespace, &record.name).await?;
                    Outcome::Skipped("it was not deleted before the restart; the next run rotates it".into())
                }
                Some(meta) => {
                    let record = self.created(&record, meta.uid).await?;
                    self.finish(&record).await?
                }
                None => {
                    tracing::info!(secret = %id, "recreating a token Secret deleted before a restart");
                    self.recreate(&record).await?
                }
            };
            self.count(&outcome);
            done.push((id, outcome));
        }
        Ok(done)
    }

    /// Re-checks every rotated Secret whose ServiceAccount reference is still to be restored;
    /// returns how many still wait.
    pub async fn restore_references(&self) -> Result<usize, TokenError> {
        let mut waiting = 0;
        for record in self.pending().await? {
            if let Some(uid) = &record.recreated
                && !self.restore_reference(&record, uid).await?
            {
                waiting += 1;
            }
        }
        Ok(waiting)
    }

    /// Puts the recreated Secret back into `sa.secrets`, once the token controller has removed
    /// the old reference: it removes by name and late, so a reference added earlier would be
    /// removed with the old one. `Ok(true)` when nothing is left to do.
    async fn restore_reference(&self, record: &PendingSecret, uid: &str) -> Result<bool, TokenError> {
        let (ns, name) = (record.namespace.as_str(), record.name.as_str());
        let id = format!("{ns}/{name}");
        let ours = self.kube.secret_meta(ns, name).await?.is_some_and(|m| m.uid.as_deref() == Some(uid));
        let account = match ours {
            true => self.kube.service_account(ns, &record.service_account).await?,
            false => None,
        };
        let Some(account) = account else {
            tracing::info!(secret = %id, "the recreated Secret or its serviceaccount is gone; no reference to restore");
            self.forget(ns, name).await?;
            return Ok(true);
        };
        if account.lists(name) {
            let now = self.clock.now();
            let waited = super::parse_time(&record.since).map(|since| now.as_second() - since.as_second());
            if waited.is_none_or(|w| w >= REFERENCE_WAIT.as_secs() as i64) {
                tracing::info!(secret = %id, "the token controller never removed the reference; it stands");
                self.forget(ns, name).await?;
                return Ok(true);
            }
            tracing::debug!(secret = %id, "the old reference is not removed yet; the reference is restored later");
            return Ok(false);
        }
        match self.kube.add_secret_reference(ns, &account, name).await? {
            Referenced::Done => {
                tracing::info!(secret = %id, serviceaccount = %record.service_account, "restored the serviceaccount's reference");
                self.forget(ns, name).await?;
                Ok(true)
            }
            Referenced::Conflict => Ok(false),
            Referenced::Gone => {
                self.forget(ns, name).await?;
                Ok(true)
            }
        }
    }

    /// Rotates one Secret the plan found due.
    pub async fn rotate(&self, candidate: &Candidate) -> Result<Outcome, TokenError> {
        let outcome = self.rotate_inner(candidate).await?;
        self.count(&outcome);
        if let Outcome::Failed(why) = &outcome {
            let meta = ObjectMeta {
                name: Some(candidate.name.clone()),
                namespace: Some(candidate.namespace.clone()),
                uid: Some(candidate.uid.clone()),
                ..ObjectMeta::default()
            };
            self.kube.secret_event(&meta, EventKind::Warning, "TokenRotationFailed", why).await;
        }
        Ok(outcome)
    }

    fn count(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Rotated => self.metrics.tokens_rotated.inc(),
            Outcome::Failed(_) => self.metrics.token_failures("legacy"),
            Outcome::Skipped(_) => 0,
        };
    }

    /// Why a due Secret cannot be rotated (`Err`), or whether its ServiceAccount lists it in
    /// `secrets` (`Ok`).
    async fn preflight(&self, c: &Candidate) -> Result<Result<bool, String>, TokenError> {
        // NB: without its ServiceAccount the token controller deletes a recreated Secret, so
        // deleting this one would lose it for nothing (its token is already dead).
        let account = self.kube.service_account(&c.namespace, &c.service_account).await?;
        Ok(match (account, c.annotations.get(SA_UID_ANNOTATION)) {
            (None, _) => Err(format!(
                "serviceaccount {}/{} does not exist; not rotated",
                c.namespace, c.service_account
            )),
            (Some(now), Some(then)) if now.metadata.uid.as_deref() != Some(then.as_str()) => Err(format!(
                "the token belongs to an earlier serviceaccount {}/{} (uid changed); not rotated",
                c.namespace, c.service_account
            )),
            (Some(account), _) => Ok(account.lists(&c.name)),
        })
    }

    async fn rotate_inner(&self, c: &Candidate) -> Result<Outcome, TokenError> {
        if c.verdict != Verdict::Rotate {
            return Ok(Outcome::Skipped(c.reason.clone()));
        }
        let referenced = match self.preflight(c).await? {
            Ok(referenced) => referenced,
            Err(why) => return Ok(Outcome::Failed(why)),
        };
        let record = PendingSecret {
            namespace: c.namespace.clone(),
            name: c.name.clone(),
            uid: c.uid.clone(),
            service_account: c.service_account.clone(),
            labels: c
                .labels
                .iter()
                .filter(|(k, _)| *k != LAST_USED_LABEL && *k != INVALID_SINCE_LABEL)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            annotations: c
                .annotations
                .iter()
                .filter(|(k, _)| *k != SA_UID_ANNOTATION && *k != ROTATED_ANNOTATION)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            since: rfc3339(self.clock.now()),
            referenced,
            recreated: None,
        };
        self.update_status(|s| {
            s.pending.retain(|p| !(p.namespace == record.namespace && p.name == record.name));
            s.pending.push(record.clone());
        })
        .await?;
        match self.kube.delete_secret(&c.namespace, &c.name, &c.uid).await {
            Ok(Deleted::Done) => {}
            Ok(Deleted::Gone) => {
                self.forget(&c.namespace, &c.name).await?;
                return Ok(Outcome::Skipped("deleted by someone else first".into()));
            }
            Ok(Deleted::Replaced) => {
                self.forget(&c.namespace, &c.name).await?;
                return Ok(Outcome::Skipped("recreated by someone else first".into()));
            }
            Err(e) => {
                // NB: the delete may or may not have happened; the record stays, and resume()
                // tells the two apart by uid.
                return Err(e.into());
            }
        }
        self.recreate(&record).await
    }

    /// Creates the Secret from its record, updates the record, and waits for the token.
    async fn recreate(&self, record: &PendingSecret) -> Result<Outcome, TokenError> {
        let mut annotations = record.annotations.clone();
        annotations.insert(SA_NAME_ANNOTATION.into(), record.service_account.clone());
        let created = self
            .kube
            .create_legacy_token_secret(&record.namespace, &record.name, &record.labels, &annotations)
            .await?;
        let uid = match created {
            Created::Done(uid) => Some(uid),
            Created::Exists => {
                tracing::info!(secret = %format!("{}/{}", record.namespace, record.name), "recreated by someone else");
                None
            }
        };
        let record = self.created(record, uid).await?;
        self.finish(&record).await
    }

    /// The Secret exists again (with `uid` when kmsgate made it): drops the record, so a slow
    /// token controller never leads to a second create, or, when the ServiceAccount listed the
    /// Secret, keeps it as the reminder to restore that reference.
    async fn created(
        &self,
        record: &PendingSecret,
        uid: Option<String>,
    ) -> Result<PendingSecret, TokenError> {
        let mut record = record.clone();
        match uid.filter(|_| record.referenced) {
            Some(uid) => {
                record.recreated = Some(uid);
                let kept = record.clone();
                self.update_status(|s| {
                    s.pending.retain(|p| !(p.namespace == kept.namespace && p.name == kept.name));
                    s.pending.push(kept.clone());
                })
                .await?;
            }
            None => self.forget(&record.namespace, &record.name).await?,
        }
        Ok(record)
    }

    /// Waits for the token controller to fill the recreated Secret, then annotates it.
    async fn finish(&self, record: &PendingSecret) -> Result<Outcome, TokenError> {
        let (ns, name) = (record.namespace.as_str(), record.name.as_str());
        let deadline = tokio::time::Instant::now() + self.token_timeout;
        loop {
            match self.kube.token_secret(ns, name).await? {
                None => {
                    return Ok(Outcome::Failed(format!(
                        "the token controller deleted the recreated secret {ns}/{name} (serviceaccount {} gone?)",
                        record.service_account
                    )));
                }
                Some(secret) if secret.filled => break,
                Some(_) if tokio::time::Instant::now() >= deadline => {
                    return Ok(Outcome::Failed(format!(
                        "secret {ns}/{name} was recreated but no token arrived within {}; is \
                         kube-controller-manager running?",
                        humantime::format_duration(self.token_timeout)
                    )));
                }
                Some(_) => tokio::time::sleep(self.poll).await,
            }
        }
        let annotation = BTreeMap::from([(ROTATED_ANNOTATION.to_owned(), Some(rfc3339(self.clock.now())))]);
        self.kube.annotate_secret(ns, name, &annotation).await?;
        tracing::info!(secret = %format!("{ns}/{name}"), "rotated a legacy service-account token");
        if let Some(uid) = &record.recreated {
            self.restore_reference(record, uid).await?;
        }
        Ok(Outcome::Rotated)
    }

    /// A whole run: finish interrupted rotations, then rotate every due Secret (or, with
    /// `dry_run`, only plan). `progress` sees each Secret as it is done.
    pub async fn run(
        &self,
        selection: &Selection,
        dry_run: bool,
        mut progress: impl FnMut(&Candidate, Option<&Outcome>, &Totals),
    ) -> Result<(Vec<(Candidate, Option<Outcome>)>, Totals), TokenError> {
        let mut totals = Totals::default();
        if !dry_run {
            for (id, outcome) in self.resume().await? {
                tracing::info!(secret = %id, ?outcome, "finished an interrupted token rotation");
            }
        }
        let plan = self.plan(selection).await?;
        let mut results = Vec::with_capacity(plan.len());
        for candidate in plan {
            let outcome = match candidate.verdict {
                Verdict::Invalid(_) => {
                    totals.invalid += 1;
                    None
                }
                Verdict::Rotate => {
                    totals.due += 1;
                    if dry_run {
                        self.preflight(&candidate).await?.err().map(Outcome::Failed)
                    } else {
                        Some(self.rotate(&candidate).await?)
                    }
                }
                _ => None,
            };
            match &outcome {
                Some(Outcome::Rotated) => totals.rotated += 1,
                Some(Outcome::Skipped(_)) => totals.skipped += 1,
                Some(Outcome::Failed(_)) => totals.failed += 1,
                None => {}
            }
            progress(&candidate, outcome.as_ref(), &totals);
            results.push((candidate, outcome));
        }
        Ok((results, totals))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn meta(age_days: i64, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ObjectMeta {
        let map =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ObjectMeta {
            name: Some("t".into()),
            namespace: Some("apps".into()),
            uid: Some("u1".into()),
            creation_timestamp: Some(Time(
                Timestamp::from_second(1_000_000_000 - age_days * 86_400).unwrap(),
            )),
            labels: Some(map(labels)),
            annotations: Some(map(annotations)),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn verdicts_follow_age_exclusions_and_the_cleaner() {
        let now = Timestamp::from_second(1_000_000_000).unwrap();
        let rule = |text| crate::crd::tokens::Match::parse(text).unwrap();
        let selection = Selection {
            max_age: crate::crd::tokens::MaxAge::new(Duration::from_secs(90 * 86_400)).unwrap(),
            exclude_labels: vec![rule("team=infra")],
            exclude_annotations: vec![rule("keep")],
            ..Selection::default()
        };
        let sa = [(SA_NAME_ANNOTATION, "builder")];
        let v = |m| classify(m, &selection, now).verdict;
        assert_eq!(v(meta(100, &[], &sa)), Verdict::Rotate);
        assert_eq!(v(meta(10, &[], &sa)), Verdict::Young);
        assert_eq!(v(meta(100, &[("team", "infra")], &sa)), Verdict::Excluded("team=infra".into()));
        assert_eq!(v(meta(100, &[], &[sa[0], ("keep", "")])), Verdict::Excluded("keep".into()));
        assert_eq!(
            v(meta(100, &[], &[sa[0], (ROTATE_ANNOTATION, "false")])),
            Verdict::Excluded(ROTATE_ANNOTATION.into())
        );
        assert_eq!(
            v(meta(100, &[(INVALID_SINCE_LABEL, "2026-01-02")], &sa)),
            Verdict::Invalid("2026-01-02".into())
        );
        assert_eq!(v(meta(100, &[], &[])), Verdict::NoServiceAccount);
        let c = classify(meta(100, &[(LAST_USED_LABEL, "2026-11-20")], &sa), &selection, now);
        assert_eq!(c.last_used.as_deref(), Some("2026-11-20"));
        assert_eq!(c.reason, "age 100d0h > 90d0h");
    }
}
