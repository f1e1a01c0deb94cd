//! The objects a policy re-encrypts: resolve a resource, list it metadata-only a page at a time,
//! and write each object back with a no-op patch.

use kube::{
    Api,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
};
use serde_json::json;

use super::{Kube, KubeError, MANAGER, call};
use crate::crd::rotation::ResourceId;

/// A resource to rewrite, resolved to a group/version.
#[derive(Debug, Clone)]
pub struct Target {
    /// For the dynamic API.
    pub api: ApiResource,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
}

/// One object from a metadata-only list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectKey {
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The resourceVersion listed.
    pub resource_version: String,
}

/// One page of a metadata-only list.
#[derive(Debug, Clone)]
pub struct Page {
    /// The objects.
    pub items: Vec<ObjectKey>,
    /// The next page's token; `None` at the end.
    pub next: Option<String>,
}

/// What a no-op write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// The API server stored the object again (new resourceVersion): it was stale.
    Rewritten,
    /// The object was current; the API server skipped the write.
    Unchanged,
}

impl Kube {
    /// Resolves `secrets` or `deployments.apps` to its preferred version.
    pub async fn resolve(&self, resource: &ResourceId) -> Result<Target, KubeError> {
        if resource.group.is_empty() && resource.resource == "secrets" {
            // NB: the default target needs no discovery round trips (and no discovery RBAC).
            let api = ApiResource {
                group: String::new(),
                version: "v1".into(),
                api_version: "v1".into(),
                kind: "Secret".into(),
                plural: "secrets".into(),
            };
            return Ok(Target { api, namespaced: true });
        }
        let group = kube::discovery::group(&self.client, &resource.group)
            .await
            .map_err(call(format!("discover API group {:?}", resource.group)))?;
        group
            .recommended_resources()
            .into_iter()
            .find(|(api, _)| api.plural == resource.resource)
            .map(|(api, caps)| Target { api, namespaced: caps.scope == kube::discovery::Scope::Namespaced })
            .ok_or_else(|| KubeError::NotServed(resource.to_string()))
    }

    fn dynamic(&self, target: &Target, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) if target.namespaced => Api::namespaced_with(self.client.clone(), ns, &target.api),
            _ => Api::all_with(self.client.clone(), &target.api),
        }
    }

    /// One page of names and resourceVersions (metadata only).
    pub async fn list_page(
        &self,
        target: &Target,
        namespace: Option<&str>,
        selector: Option<&str>,
        limit: u32,
        continue_token: Option<&str>,
    ) -> Result<Page, KubeError> {
        let mut params = ListParams::default().limit(limit);
        if let Some(selector) = selector {
            params = params.labels(selector);
        }
        if let Some(token) = continue_token.filter(|t| !t.is_empty()) {
            params = params.continue_token(token);
        }
        let list = self
            .dynamic(target, namespace)
            .list_metadata(&params)
            .await
            .map_err(call(format!("list {}", target.api.plural)))?;
        let items = list
            .items
            .into_iter()
            .map(|m| ObjectKey {
                namespace: m.metadata.namespace.unwrap_or_default(),
                name: m.metadata.name.unwrap_or_default(),
                resource_version: m.metadata.resource_version.unwrap_or_default(),
            })
            .collect();
        Ok(Page { items, next: list.metadata.continue_.filter(|c| !c.is_empty()) })
    }

    /// The current resourceVersion of one object, `None` when it is gone.
    pub async fn resource_version(
        &self,
        target: &Target,
        namespace: &str,
        name: &str,
    ) -> Result<Option<String>, KubeError> {
        let api = self.dynamic(target, Some(namespace).filter(|n| !n.is_empty()));
        let meta = api
            .get_metadata_opt(name)
            .await
            .map_err(call(format!("get {} {namespace}/{name}", target.api.plural)))?;
        Ok(meta.and_then(|m| m.metadata.resource_version))
    }

    /// The no-op write that re-encrypts a stale object: a merge patch carrying only the listed
    /// resourceVersion, so a concurrent write makes it fail with 409 instead of being undone.
    pub async fn touch(&self, target: &Target, key: &ObjectKey) -> Result<Touch, KubeError> {
        let api = self.dynamic(target, Some(key.namespace.as_str()).filter(|n| !n.is_empty()));
        let patch = json!({ "metadata": { "resourceVersion": key.resource_version } });
        let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
        let meta = api
            .patch_metadata(&key.name, &params, &Patch::Merge(&patch))
            .await
            .map_err(call(format!("patch {} {}/{}", target.api.plural, key.namespace, key.name)))?;
        let now = meta.metadata.resource_version.unwrap_or_default();
        Ok(if now == key.resource_version { Touch::Unchanged } else { Touch::Rewritten })
    }
}
