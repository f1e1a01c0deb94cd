//! The SigningKeyPolicy: read it, write its status, annotate it, and record Events about it.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;

use super::{EventKind, Kube, KubeError, MANAGER, call, with_removals};
use crate::crd::signing::{SigningKeyPolicy, SigningStatus};

impl Kube {
    fn signing_policies(&self) -> Api<SigningKeyPolicy> {
        Api::all(self.client.clone())
    }

    /// Reads a SigningKeyPolicy.
    pub async fn signing_policy(&self, name: &str) -> Result<SigningKeyPolicy, KubeError> {
        self.signing_policies().get(name).await.map_err(call(format!("get SigningKeyPolicy {name}")))
    }

    /// Replaces the status of a SigningKeyPolicy, read as `before`: a merge patch of the whole new
    /// status in which every member `before` had and the new status lacks is set to null.
    pub async fn patch_signing_status(
        &self,
        name: &str,
        before: &SigningStatus,
        status: &SigningStatus,
    ) -> Result<SigningKeyPolicy, KubeError> {
        let patch = json!({ "status": with_removals(&json!(before), &json!(status)) });
        self.signing_policies()
            .patch_status(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
            .map_err(call(format!("patch SigningKeyPolicy {name} status")))
    }

    /// Sets an annotation on a SigningKeyPolicy.
    pub async fn annotate_signing_policy(&self, name: &str, key: &str, value: &str) -> Result<(), KubeError> {
        let patch = json!({ "metadata": { "annotations": { key: value } } });
        self.signing_policies()
            .patch_metadata(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(call(format!("annotate SigningKeyPolicy {name}")))
    }

    /// Records an Event about a SigningKeyPolicy (best effort: a failure is logged, never fatal).
    pub async fn signing_event(&self, policy: &str, kind: EventKind, reason: &str, note: &str) {
        let regarding = ObjectReference {
            api_version: Some("kmsgate.io/v1alpha1".into()),
            kind: Some("SigningKeyPolicy".into()),
            name: Some(policy.to_owned()),
            ..ObjectReference::default()
        };
        self.record(Some("default"), regarding, kind, reason, note).await;
    }
}
