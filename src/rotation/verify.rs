//! Verify: read every value under the API server's etcd prefix at one revision and prove that
//! every value of this KMS provider is on the new key_id, and that the configured resources hold
//! nothing unencrypted. Runs in the controller (read-only etcd user) or in the verify Job.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;

use super::{KeyAdmin, RotationError, Run, Step};
use crate::{
    clock::Clock,
    crd::rotation::{
        Phase, Plan, ResourceId, ResourceRef, RotationPolicy, Straggler, Verification, Verifier, VerifyJob,
    },
    etcd::{DEFAULT_PAGE_BYTES, Pages, ScanError, Scanner},
    k8s::{EventKind, JobState, KubeError, ObjectKey},
    storage::{Current, Judge, Standing},
};

/// Most stragglers listed by name in the status; more means a full migrate pass instead.
pub const MAX_STRAGGLERS: usize = 1000;

/// What one verification checks.
#[derive(Debug, Clone)]
pub struct Input {
    /// The KMS provider name.
    pub provider: String,
    /// The API server's `--etcd-prefix`.
    pub etcd_prefix: String,
    /// Every value of the provider must carry this key_id.
    pub key_id: String,
    /// Resources whose unencrypted values count as stragglers.
    pub resources: Vec<ResourceRef>,
    /// The run and round, copied into the result.
    pub run_id: String,
    /// Round.
    pub round: u32,
}

impl Input {
    /// Round `round` of run `run_id`, which moves every value to `key_id`.
    pub fn new(plan: &Plan, key_id: &str, run_id: &str, round: u32) -> Self {
        Self {
            provider: plan.verify.provider.clone(),
            etcd_prefix: plan.verify.etcd_prefix.clone(),
            key_id: key_id.to_owned(),
            resources: plan.resources.clone(),
            run_id: run_id.to_owned(),
            round,
        }
    }
}

/// Scans etcd and judges every value.
pub async fn scan(
    client: &mut crate::etcd::Client,
    input: &Input,
    page_size: usize,
    clock: &dyn Clock,
) -> Result<Verification, ScanError> {
    let base = format!("{}/", input.etcd_prefix.trim_end_matches('/'));
    // NB: longest prefix first, so `apps/deployments` wins over a resource named `apps`.
    let mut mapped: Vec<(String, &ResourceRef)> =
        input.resources.iter().map(|r| (format!("{base}{}/", r.etcd_path()), r)).collect();
    mapped.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    let mut result = Verification {
        run_id: input.run_id.clone(),
        round: input.round,
        key_id: input.key_id.clone(),
        ..Verification::default()
    };
    let judge = Judge { provider: Some(&input.provider), current: Current::KeyId(&input.key_id) };
    // NB: pages sized by bytes, as `kmsgate audit` sizes them: fewer etcd requests, same memory.
    let scanner = Scanner::prefix(base.as_bytes(), page_size).with_page_bytes(DEFAULT_PAGE_BYTES);
    let mut pages = Pages::new(scanner, client.clone());
    while let Some(page) = pages.next_page().await? {
        result.revision = pages.revision();
        for kv in &page {
            result.objects += 1;
            let key = String::from_utf8_lossy(&kv.key);
            let owner = mapped
                .iter()
                .find_map(|(prefix, r)| key.strip_prefix(prefix.as_str()).map(|rest| (*r, rest)));
            let straggler = match judge.judge(&kv.value).standing {
                Standing::Current => {
                    result.current += 1;
                    false
                }
                Standing::Stale => {
                    result.old_key += 1;
                    if owner.is_none() {
                        result.unmapped += 1;
                    }
                    true
                }
                Standing::Invalid => {
                    result.invalid += 1;
                    false
                }
                Standing::Other if owner.is_some() => {
                    result.unencrypted += 1;
                    true
                }
                Standing::Other => false,
            };
            if let (true, Some((resource, rest))) = (straggler, owner) {
                if result.stragglers.len() < MAX_STRAGGLERS {
                    // NB: `<ns>/<name>` for namespaced objects, `<name>` for cluster-scoped ones.
                    let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
                    result.stragglers.push(Straggler {
                        resource: resource.id(),
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                    });
                } else {
                    result.truncated = true;
                }
            }
        }
    }
    result.clean = result.old_key == 0 && result.invalid == 0 && result.unencrypted == 0;
    result.finished_at = crate::clock::rfc3339(clock.now());
    Ok(result)
}

/// Groups stragglers by resource, as (namespace, name).
pub fn stragglers_by_resource(list: &[Straggler]) -> BTreeMap<ResourceId, Vec<(String, String)>> {
    let mut out: BTreeMap<ResourceId, Vec<(String, String)>> = BTreeMap::new();
    for s in list {
        out.entry(s.resource.clone()).or_default().push((s.namespace.clone(), s.name.clone()));
    }
    out
}

/// The name of the verify Job of a run and round.
pub fn job_name(policy: &str, run_id: &str, round: u32) -> String {
    let short: String = run_id.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    let mut name = format!("{policy}-verify-{short}-{round}");
    name.truncate(63);
    name.trim_end_matches('-').to_owned()
}

/// The user the verify Job runs as: the image's non-root user (distroless `nonroot`).
pub const RUN_AS: i64 = 65532;

/// The verify Job: pinned to a control-plane node, the etcd client certificate mounted
/// read-only, reporting into the policy status. The controller never holds etcd credentials.
pub fn job(
    policy: &RotationPolicy,
    spec: &VerifyJob,
    run_id: &str,
    round: u32,
    timeout_secs: i64,
) -> Result<Job, serde_json::Error> {
    let name = policy.metadata.name.clone().unwrap_or_default();
    let pki = "/etc/kmsgate/etcd-pki";
    let args = vec![
        "verify".to_owned(),
        "--policy".into(),
        name.clone(),
        "--run-id".into(),
        run_id.into(),
        "--round".into(),
        round.to_string(),
        "--endpoints".into(),
        spec.etcd_endpoints.join(","),
        "--cacert".into(),
        format!("{pki}/{}", spec.ca_file),
        "--cert".into(),
        format!("{pki}/{}", spec.cert_file),
        "--key".into(),
        format!("{pki}/{}", spec.key_file),
    ];
    serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(&name, run_id, round),
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/name": "kmsgate", "app.kubernetes.io/component": "verify"},
        },
        "spec": {
            "backoffLimit": 1,
            "activeDeadlineSeconds": timeout_secs,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "kmsgate", "app.kubernetes.io/component": "verify"}},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": spec.service_account_name,
                    "hostNetwork": true,
                    "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
                    "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
                    "automountServiceAccountToken": true,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": RUN_AS,
                        "runAsGroup": RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [{
                        "name": "verify",
                        "image": spec.image,
                        "args": args,
                        // NB: the certificate is a dedicated one owned by this uid
                        // (deploy/controller/etcd-verify-cert.sh), never kubeadm's root-only
                        // keys, so nothing here needs root or a capability.
                        "securityContext": {
                            "runAsNonRoot": true,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "64Mi"},
                            "limits": {"cpu": "1", "memory": "512Mi"},
                        },
                        "volumeMounts": [{"name": "etcd-pki", "mountPath": pki, "readOnly": true}],
                    }],
                    "volumes": [{"name": "etcd-pki", "hostPath": {"path": spec.pki_host_path, "type": "Directory"}}],
                },
            },
        },
    }))
}

impl<K: KeyAdmin> Run<'_, K> {
    pub(super) async fn verifying(&mut self) -> Result<Step, RotationError> {
        let round = self.book.status.verify_round.max(1);
        let verification = match self
            .book
            .status
            .verification
            .clone()
            .filter(|v| v.run_id == self.book.status.run_id && v.round == round)
        {
            Some(v) => v,
            None => match &self.plan.verify.verifier {
                Verifier::None => {
                    let failed = self.book.status.totals.failed;
                    return Ok(self.finish(
                        "Unverified",
                        format!(
                            "migrated to {} ({failed} writes failed); verify.mode is None, so nothing proves the old \
                             key is unused and it is never retired",
                            self.book.status.to_key_id
                        ),
                    ));
                }
                Verifier::Etcd => match self.verify_here(round).await {
                    Ok(v) => v,
                    Err(message) => return Ok(self.fail("VerifyFailed", &message)),
                },
                Verifier::Job(job) => match self.verify_job(job, round).await? {
                    Ok(Some(v)) => v,
                    Ok(None) => return Ok(Step::Wait(self.ctx.poll)),
                    Err(message) => return Ok(self.fail("VerifyFailed", &message)),
                },
            },
        };
        self.book.status.verification = Some(verification.clone());
        match judge(&verification, &self.book.status.to_key_id, round, self.plan.verify.max_rounds) {
            Round::Failed { reason, message } => return Ok(self.fail(reason, &message)),
            Round::Clean => {
                self.book.events.push((
                    EventKind::Normal,
                    "Verified",
                    format!("{} values, all on {}", verification.current, verification.key_id),
                ));
                if self.plan.retire.enabled {
                    self.book.enter(Phase::Retiring);
                    return Ok(Step::Again);
                }
                let to = self.book.status.to_key_id.clone();
                return Ok(self.finish("Succeeded", format!("every value is on {to}; retire is off")));
            }
            Round::Stragglers => {}
        }
        if verification.truncated {
            // NB: too many to name: run the whole migrate pass again for the resources involved.
            let involved = stragglers_by_resource(&verification.stragglers);
            for p in &mut self.book.status.progress {
                if involved.contains_key(&p.resource) {
                    p.complete = false;
                    p.continue_token.clear();
                }
            }
            self.book.status.storage_migration_fallback = true;
            self.book.enter(Phase::Migrating);
            return Ok(Step::Again);
        }
        self.rewrite_stragglers(&verification.stragglers).await?;
        self.book.status.verify_round = round + 1;
        Ok(Step::Again)
    }

    async fn rewrite_stragglers(&mut self, stragglers: &[Straggler]) -> Result<(), RotationError> {
        let pacer = super::migrate::Pacer::new(self.plan.migrate.settings.qps());
        let mut rewritten = 0;
        for (resource, objects) in stragglers_by_resource(stragglers) {
            let target = self.ctx.target(&resource).await?;
            for (namespace, name) in objects {
                pacer.wait().await;
                let Some(resource_version) =
                    self.ctx.kube.resource_version(&target, &namespace, &name).await?
                else {
                    continue;
                };
                let key = ObjectKey { namespace, name, resource_version };
                match self.ctx.kube.touch(&target, &key).await {
                    Ok(_) => rewritten += 1,
                    Err(e) if matches!(e.code(), Some(404 | 409)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.book.status.message = format!("rewrote {rewritten} stragglers; verifying again");
        self.book.events.push((EventKind::Normal, "StragglersRewritten", self.book.status.message.clone()));
        Ok(())
    }

    fn verify_input(&self, round: u32) -> Input {
        Input::new(self.plan, &self.book.status.to_key_id, &self.book.status.run_id, round)
    }

    async fn verify_here(&self, round: u32) -> Result<Verification, String> {
        let Some(etcd) = &self.ctx.etcd else {
            return Err("verify.mode is Etcd but the controller has no etcd.* settings".into());
        };
        let mut client = crate::etcd::connect(etcd).await.map_err(|e| crate::error::chain(&e))?;
        scan(&mut client, &self.verify_input(round), 5000, &*self.ctx.clock)
            .await
            .map_err(|e| crate::error::chain(&e))
    }

    /// `Ok(Ok(Some))` with the Job's report, `Ok(Ok(None))` while it runs.
    async fn verify_job(
        &self,
        spec: &VerifyJob,
        round: u32,
    ) -> Result<Result<Option<Verification>, String>, RotationError> {
        let name = job_name(self.book.name, &self.book.status.run_id, round);
        let timeout = self.plan.verify.timeout;
        match self.ctx.kube.job_state(&spec.namespace, &name).await? {
            JobState::Missing => {
                let job = job(self.policy, spec, &self.book.status.run_id, round, timeout.as_secs() as i64)
                    .map_err(|e| KubeError::Unexpected(format!("build verify job: {e}")))?;
                self.ctx.kube.create_job(&spec.namespace, &job).await?;
                Ok(Ok(None))
            }
            JobState::Running => Ok(Ok(None)),
            // NB: a finished Job whose report has not arrived yet: the status may lag one read.
            JobState::Succeeded if self.book.elapsed_since(&self.book.status.phase_started_at) < timeout => {
                Ok(Ok(None))
            }
            JobState::Succeeded => Ok(Err(format!("verify job {name} finished without a report"))),
            JobState::Failed(why) => Ok(Err(format!("verify job {name} failed: {why}"))),
        }
    }

    pub(super) async fn retiring(&mut self) -> Result<Step, RotationError> {
        let Some(v) =
            self.book.status.verification.clone().filter(|v| v.clean && v.run_id == self.book.status.run_id)
        else {
            // NB: Retire never runs without a clean verify of this run.
            return Ok(self.fail("NotVerified", "retire needs a clean verification of this run"));
        };
        let grace = self.plan.retire.grace;
        let since = self.book.elapsed_since(&v.finished_at);
        if since < grace {
            self.book.status.message =
                format!("retiring versions below {:?} in {:?}", self.book.status.to_version, grace - since);
            return Ok(Step::Wait(self.ctx.poll.min(grace - since)));
        }
        let Some(to) = self.book.status.to_version else {
            return Ok(self.fail("NotVerified", "the run has no target version"));
        };
        let key = self.plan.transit.clone();
        let meta = self.ctx.keys.metadata(&key).await?;
        if meta.min_decryption_version < to {
            self.ctx.keys.retire_below(&key, to).await?;
        }
        self.book.status.retired_below = Some(to);
        self.book.events.push((
            EventKind::Normal,
            "Retired",
            format!("min_decryption_version raised to {to}"),
        ));
        Ok(self.finish("Succeeded", format!("every value is on {}; versions below {to} retired", v.key_id)))
    }
}

/// What one verification round means for the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// Nothing is left on an old key.
    Clean,
    /// The run stops: a condition reason and a message.
    Failed {
        /// CamelCase reason.
        reason: &'static str,
        /// For people.
        message: String,
    },
    /// Old-key or unencrypted values remain that another rewrite can fix.
    Stragglers,
}

/// Judges round `round` of at most `max_rounds` from its verification alone, for a run moving to
/// `key_id`.
pub fn judge(v: &Verification, key_id: &str, round: u32, max_rounds: u32) -> Round {
    let failed = |reason, message| Round::Failed { reason, message };
    if !v.error.is_empty() {
        return failed("VerifyFailed", v.error.clone());
    }
    if v.key_id != key_id {
        return failed(
            "VerifyMismatch",
            format!("the verification checked key_id {} but this run moves to {key_id}", v.key_id),
        );
    }
    // NB: the verify Job writes this report, and Retire cannot be undone: a clean claim holds only
    // if the counts the same report carries agree with it.
    if v.clean && v.old_key == 0 && v.invalid == 0 && v.unencrypted == 0 {
        return Round::Clean;
    }
    if v.invalid > 0 {
        return failed(
            "UndecryptableValues",
            format!("{} values of this provider are invalid; the API server cannot read them", v.invalid),
        );
    }
    if v.unmapped > 0 {
        return failed(
            "UnlistedResources",
            format!(
                "{} old-key values are in resources spec.resources does not list; add them (with etcdPrefix) and resume",
                v.unmapped
            ),
        );
    }
    if round >= max_rounds {
        return failed(
            "StragglersRemain",
            format!(
                "{} old-key and {} unencrypted values remain after {round} rounds",
                v.old_key, v.unencrypted
            ),
        );
    }
    Round::Stragglers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_is_judged_from_its_verification() {
        let v = |f: fn(&mut Verification)| {
            let mut v = Verification { old_key: 2, key_id: "k2".into(), ..Verification::default() };
            f(&mut v);
            v
        };
        let clean = |v: &mut Verification| {
            v.clean = true;
            v.old_key = 0;
        };
        assert_eq!(judge(&v(clean), "k2", 1, 3), Round::Clean);
        assert_eq!(judge(&v(|_| {}), "k2", 1, 3), Round::Stragglers);
        let reason = |r: Round| match r {
            Round::Failed { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(judge(&v(|v| v.error = "etcd: down".into()), "k2", 1, 3)), "VerifyFailed");
        assert_eq!(reason(judge(&v(|v| v.invalid = 1), "k2", 1, 3)), "UndecryptableValues");
        assert_eq!(reason(judge(&v(|v| v.unmapped = 1), "k2", 1, 3)), "UnlistedResources");
        assert_eq!(reason(judge(&v(|_| {}), "k2", 3, 3)), "StragglersRemain");
    }

    #[test]
    fn a_report_whose_counts_or_key_id_disagree_with_its_clean_claim_is_not_clean() {
        let report = Verification { clean: true, old_key: 2, key_id: "k2".into(), ..Verification::default() };
        assert_eq!(judge(&report, "k2", 1, 3), Round::Stragglers);
        let elsewhere = Verification { clean: true, key_id: "k1".into(), ..Verification::default() };
        assert!(matches!(judge(&elsewhere, "k2", 1, 3), Round::Failed { reason: "VerifyMismatch", .. }));
    }

    #[test]
    fn job_names_fit_a_label() {
        let name = job_name(&"p".repeat(80), "0f1e2d3c-aaaa", 2);
        assert!(name.len() <= 63 && !name.ends_with('-'));
        assert_eq!(job_name("prod", "0f1e2d3c-aaaa", 2), "prod-verify-0f1e2d3c-2");
    }
}
