//! What the controller's own credentials may do, asked of the API server with a
//! SelfSubjectAccessReview, so a run can refuse to start instead of failing halfway.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::{Api, api::PostParams};

use super::{Kube, KubeError, call};

/// One access question: may we `verb` `resource` in `group` (in `namespace`, or everywhere)?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    /// API group, empty for the core group.
    pub group: String,
    /// Plural resource name.
    pub resource: String,
    /// The verb.
    pub verb: String,
    /// A namespace; empty for all namespaces.
    pub namespace: String,
}

impl std::fmt::Display for Review {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let resource = match self.group.as_str() {
            "" => self.resource.clone(),
            group => format!("{}.{group}", self.resource),
        };
        match self.namespace.as_str() {
            "" => write!(f, "{} {resource} in all namespaces", self.verb),
            namespace => write!(f, "{} {resource} in namespace {namespace}", self.verb),
        }
    }
}

impl Kube {
    /// Whether the API server's authorizer allows `review` for this client's user.
    pub async fn allowed(&self, review: &Review) -> Result<bool, KubeError> {
        let reviews: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        let request = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(review.group.clone()),
                    resource: Some(review.resource.clone()),
                    verb: Some(review.verb.clone()),
                    namespace: Some(review.namespace.clone()).filter(|n| !n.is_empty()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let answer = reviews
            .create(&PostParams::default(), &request)
            .await
            .map_err(call(format!("review whether the controller may {review}")))?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }
}
