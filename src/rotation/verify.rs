//! Verify: read every value under the API server's etcd prefix at one revision and prove that
//! every value of this KMS provider is on the new key_id, and that the configured resources hold
//! nothing unencrypted. Runs in the controller (read-only etcd user) or in the verify Job.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;

use crate::{
    etcd::{ScanError, Scanner},
    policy::{ResourceRef, RotationPolicy, Verification, VerifyJob},
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

/// Scans etcd and judges every value.
pub async fn scan(
    client: &mut etcd_client::Client,
    input: &Input,
    page_size: usize,
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
    let mut scanner = Scanner::prefix(base.as_bytes(), page_size);
    while let Some(page) = scanner.next_page(client).await? {
        result.revision = scanner.revision();
        for kv in &page {
            result.objects += 1;
            let key = String::from_utf8_lossy(kv.key());
            let owner = mapped
                .iter()
                .find_map(|(prefix, r)| key.strip_prefix(prefix.as_str()).map(|rest| (*r, rest)));
            let straggler = match judge.judge(kv.value()).standing {
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
                    result.stragglers.push(format!("{resource}/{namespace}/{name}"));
                } else {
                    result.truncated = true;
                }
            }
        }
    }
    result.clean = result.old_key == 0 && result.invalid == 0 && result.unencrypted == 0;
    result.finished_at = super::now_text();
    Ok(result)
}

/// Splits a straggler `resource/namespace/name` back into its parts.
pub fn parse_straggler(text: &str) -> Option<(ResourceRef, String, String)> {
    let (resource, rest) = text.split_once('/')?;
    let (namespace, name) = rest.split_once('/')?;
    Some((ResourceRef::parse(resource).ok()?, namespace.to_owned(), name.to_owned()))
}

/// Groups stragglers by resource.
pub fn stragglers_by_resource(list: &[String]) -> BTreeMap<ResourceRef, Vec<(String, String)>> {
    let mut out: BTreeMap<ResourceRef, Vec<(String, String)>> = BTreeMap::new();
    for (resource, namespace, name) in list.iter().filter_map(|s| parse_straggler(s)) {
        out.entry(resource).or_default().push((namespace, name));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stragglers_round_trip_through_their_text_form() {
        let (r, ns, name) = parse_straggler("deployments.apps/default/web").unwrap();
        assert_eq!(
            (r.to_string().as_str(), ns.as_str(), name.as_str()),
            ("deployments.apps", "default", "web")
        );
        let (r, ns, name) = parse_straggler("clusterroles.rbac.authorization.k8s.io//admin").unwrap();
        assert_eq!((r.resource.as_str(), ns.as_str(), name.as_str()), ("clusterroles", "", "admin"));
        assert!(parse_straggler("secrets").is_none());
    }

    #[test]
    fn job_names_fit_a_label() {
        let name = job_name(&"p".repeat(80), "0f1e2d3c-aaaa", 2);
        assert!(name.len() <= 63 && !name.ends_with('-'));
        assert_eq!(job_name("prod", "0f1e2d3c-aaaa", 2), "prod-verify-0f1e2d3c-2");
    }
}
