//! The policies the controller's loops follow (RotationPolicy, SigningKeyPolicy): read one, write
//! its status, annotate it, and record Events about it. One set of calls for every cluster-scoped
//! policy kind, so the kinds cannot drift apart in how their status is written.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
    core::ClusterResourceScope,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use super::{EventKind, Kube, KubeError, MANAGER, call, with_removals};
use crate::crd::{rotation::RotationPolicy, signing::SigningKeyPolicy};

/// A cluster-scoped custom resource kind the controller follows.
pub trait Policy:
    Resource<DynamicType = (), Scope = ClusterResourceScope> + Clone + Debug + DeserializeOwned + Send + Sync
{
}

impl<T> Policy for T where
    T: Resource<DynamicType = (), Scope = ClusterResourceScope>
        + Clone
        + Debug
        + DeserializeOwned
        + Send
        + Sync
{
}

impl Kube {
    fn all<P: Policy>(&self) -> Api<P> {
        Api::all(self.client.clone())
    }

    /// Reads policy `name` of kind `P`.
    pub async fn get_policy<P: Policy>(&self, name: &str) -> Result<P, KubeError> {
        self.all::<P>().get(name).await.map_err(call(format!("get {} {name}", P::kind(&()))))
    }

    /// Reads a RotationPolicy.
    pub async fn policy(&self, name: &str) -> Result<RotationPolicy, KubeError> {
        self.get_policy(name).await
    }

    /// Reads a SigningKeyPolicy.
    pub async fn signing_policy(&self, name: &str) -> Result<SigningKeyPolicy, KubeError> {
        self.get_policy(name).await
    }

    /// Replaces the status of policy `name`, read as `before`: a merge patch of the whole new
    /// status in which every member `before` had and the new status lacks is set to null.
    pub async fn patch_policy_status<P: Policy>(
        &self,
        name: &str,
        before: &impl Serialize,
        status: &impl Serialize,
    ) -> Result<P, KubeError> {
        let patch = json!({ "status": with_removals(&json!(before), &json!(status)) });
        self.all::<P>()
            .patch_status(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
            .map_err(call(format!("patch {} {name} status", P::kind(&()))))
    }

    /// Sets an annotation on policy `name`.
    pub async fn annotate_policy<P: Policy>(
        &self,
        name: &str,
        key: &str,
        value: &str,
    ) -> Result<(), KubeError> {
        let patch = json!({ "metadata": { "annotations": { key: value } } });
        self.all::<P>()
            .patch_metadata(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(call(format!("annotate {} {name}", P::kind(&()))))
    }

    /// Records an Event about policy `name` (best effort: a failure is logged, never fatal).
    pub async fn policy_event<P: Policy>(&self, name: &str, kind: EventKind, reason: &str, note: &str) {
        let regarding = ObjectReference {
            api_version: Some(P::api_version(&()).into_owned()),
            kind: Some(P::kind(&()).into_owned()),
            name: Some(name.to_owned()),
            ..ObjectReference::default()
        };
        self.record(Some("default"), regarding, kind, reason, note).await;
    }
}
