//! Before a run starts: may the controller do to every listed resource what the run will do?
//! Asked with SelfSubjectAccessReviews, so a missing grant stops the run before it rotates
//! anything, never in the middle of Migrating.

use super::{KeyAdmin, RotationError, Run};
use crate::{crd::rotation::Plan, k8s::Review};

/// What the re-encryption does to each listed resource: metadata-only lists, a no-op patch per
/// object, and a get of each straggler verify finds.
const VERBS: [&str; 3] = ["get", "list", "patch"];

/// The reviews a run must pass: each verb on each listed resource, in each listed namespace
/// (all namespaces when the plan lists none).
pub fn needed(plan: &Plan) -> Vec<Review> {
    let namespaces: Vec<String> =
        if plan.namespaces.is_empty() { vec![String::new()] } else { plan.namespaces.clone() };
    let mut reviews = Vec::new();
    for resource in &plan.resources {
        for namespace in &namespaces {
            for verb in VERBS {
                reviews.push(Review {
                    group: resource.group.clone(),
                    resource: resource.resource.clone(),
                    verb: verb.into(),
                    namespace: namespace.clone(),
                });
            }
        }
    }
    reviews
}

impl<K: KeyAdmin> Run<'_, K> {
    /// The reviews the API server's authorizer does not allow, as one sentence; `None` when all
    /// are allowed.
    pub(super) async fn missing_access(&self) -> Result<Option<String>, RotationError> {
        let mut missing = Vec::new();
        for review in needed(self.plan) {
            if !self.ctx.kube.allowed(&review).await? {
                missing.push(review.to_string());
            }
        }
        Ok((!missing.is_empty()).then(|| {
            format!(
                "the controller's RBAC does not allow it to {}; grant that, then request a run",
                missing.join(", ")
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::rotation::{RotationPolicySpec, parse};

    fn plan(spec: serde_json::Value) -> Plan {
        let mut base = serde_json::json!({
            "transit": {"key": "k"},
            "converge": {"plugins": ["http://a"]},
            "resources": [{"resource": "secrets"}, {"group": "apps", "resource": "deployments"}],
        });
        if let (Some(base), Some(extra)) = (base.as_object_mut(), spec.as_object()) {
            base.extend(extra.clone());
        }
        let spec: RotationPolicySpec = serde_json::from_value(base).unwrap();
        parse(&spec).unwrap()
    }

    #[test]
    fn every_verb_the_run_uses_is_asked_for_each_resource_and_namespace() {
        let asked: Vec<String> =
            needed(&plan(serde_json::json!({}))).iter().map(ToString::to_string).collect();
        assert_eq!(
            asked,
            [
                "get secrets in all namespaces",
                "list secrets in all namespaces",
                "patch secrets in all namespaces",
                "get deployments.apps in all namespaces",
                "list deployments.apps in all namespaces",
                "patch deployments.apps in all namespaces",
            ]
        );
        let scoped = needed(&plan(serde_json::json!({"namespaces": ["a", "b"]})));
        assert_eq!(scoped.len(), 12);
        assert_eq!(scoped[3].to_string(), "get secrets in namespace b");
    }
}
