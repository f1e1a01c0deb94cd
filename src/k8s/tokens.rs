//! The calls of service-account token rotation: Secrets (metadata, delete, create, the token
//! write), ServiceAccounts, TokenRequest and the TokenPolicy.

use std::collections::BTreeMap;

use futures::stream::BoxStream;
use k8s_openapi::{
    api::core::v1::{ObjectReference, Secret, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use zeroize::Zeroizing;

use super::{EventKind, Kube, KubeError, MANAGER, call};
use crate::crd::tokens::{LEGACY_TYPE, TOKEN_KEY, TokenPolicy, TokenStatus};

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// The Secret with that uid is gone now.
    Done,
    /// There was no Secret of that name.
    Gone,
    /// A Secret of that name exists with another uid (someone recreated it); it was kept.
    Replaced,
}

/// What a create did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// Created, with this uid.
    Done(String),
    /// A Secret of that name exists already.
    Exists,
}

/// What adding a reference to a ServiceAccount did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Referenced {
    /// The Secret is listed in `secrets` now.
    Done,
    /// The ServiceAccount changed since it was read (409): read it again later.
    Conflict,
    /// The ServiceAccount is gone.
    Gone,
}

/// A ServiceAccount as legacy rotation sees it: metadata and the Secrets it lists.
#[derive(Debug, Clone)]
pub struct ServiceAccountRefs {
    /// The account's metadata (uid, resourceVersion).
    pub metadata: ObjectMeta,
    /// `secrets`, as listed.
    pub secrets: Vec<ObjectReference>,
}

impl ServiceAccountRefs {
    /// Whether `secrets` names the Secret `name` (references are matched by name upstream).
    pub fn lists(&self, name: &str) -> bool {
        self.secrets.iter().any(|s| s.name.as_deref() == Some(name))
    }
}

/// A Secret as the token checks see it: metadata, and whether `token` holds a value.
#[derive(Debug, Clone)]
pub struct TokenSecret {
    /// The Secret's metadata.
    pub metadata: ObjectMeta,
    /// `data.token` is present and not empty.
    pub filled: bool,
}

/// A token the TokenRequest API issued.
#[derive(Debug)]
pub struct IssuedToken {
    /// The token.
    pub token: BearerToken,
    /// The expiry the API server granted (may be shorter than asked).
    pub expires: Timestamp,
}

/// The TokenRequest answer, read straight into a zeroizing string.
#[derive(Deserialize)]
struct TokenRequestAnswer {
    status: TokenRequestStatus,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRequestStatus {
    token: Zeroizing<String>,
    expiration_timestamp: String,
}

/// A Secret read for presence only: `data` values are checked for emptiness, never kept.
#[derive(Deserialize)]
struct PresenceOnly {
    metadata: ObjectMeta,
    #[serde(default)]
    data: Option<BTreeMap<String, Filled>>,
}

/// Whether a base64 data value is non-empty; the value itself is dropped unread.
struct Filled(bool);

impl<'de> Deserialize<'de> for Filled {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Filled;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a base64 string or null")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Filled, E> {
                Ok(Filled(!v.is_empty()))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Filled, E> {
                Ok(Filled(false))
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Filled, E> {
                Ok(Filled(false))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The merge patch that stores a managed token: the data key, kmsgate's annotations, and the
/// resourceVersion read, so a concurrent edit of the request fails the write (409).
#[derive(Serialize)]
struct TokenPatch<'a> {
    metadata: TokenPatchMeta<'a>,
    data: TokenData<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TokenPatchMeta<'a> {
    resource_version: &'a str,
    annotations: &'a BTreeMap<String, Option<String>>,
}

struct TokenData<'a>(&'a BearerToken);

impl Serialize for TokenData<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        use serde::ser::SerializeMap;
        let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.expose()));
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry(TOKEN_KEY, encoded.as_str())?;
        map.end()
    }
}

impl std::fmt::Debug for TokenPatch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPatch")
            .field("resource_version", &self.metadata.resource_version)
            .field("annotations", self.metadata.annotations)
            .field("token", &"<redacted>")
            .finish()
    }
}

fn is_code(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(s) if s.code == code)
}

impl Kube {
    fn secrets(&self, namespace: Option<&str>) -> Api<Secret> {
        match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Reads a TokenPolicy, `None` when there is none.
    pub async fn token_policy(&self, name: &str) -> Result<Option<TokenPolicy>, KubeError> {
        let api: Api<TokenPolicy> = Api::all(self.client.clone());
        api.get_opt(name).await.map_err(call(format!("get TokenPolicy {name}")))
    }

    /// Writes the whole status of a TokenPolicy. With `resource_version`, fails with 409 when the
    /// policy changed since it was read (the crash record must never lose an entry).
    pub async fn patch_token_status(
        &self,
        name: &str,
        status: &TokenStatus,
        resource_version: Option<&str>,
    ) -> Result<TokenPolicy, KubeError> {
        let api: Api<TokenPolicy> = Api::all(self.client.clone());
        let mut patch = json!({ "status": status });
        if let Some(rv) = resource_version {
            patch["metadata"] = json!({ "resourceVersion": rv });
        }
        api.patch_status(name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
            .await
            .map_err(call(format!("patch TokenPolicy {name} status")))
    }

    /// Every Secret's metadata in `namespace` (all when `None`), by label and field selector.
    pub async fn list_secrets(
        &self,
        namespace: Option<&str>,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Vec<ObjectMeta>, KubeError> {
        let api = self.secrets(namespace);
        let mut params = ListParams::default().limit(500);
        if let Some(labels) = labels.filter(|l| !l.is_empty()) {
            params = params.labels(labels);
        }
        if let Some(fields) = fields {
            params = params.fields(fields);
        }
        let mut out = Vec::new();
        loop {
            let page = api
                .list_metadata(&params)
                .await
                .map_err(call(format!("list secrets in {}", namespace.unwrap_or("all namespaces"))))?;
            out.extend(page.items.into_iter().map(|m| m.metadata));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(next) => params = params.continue_token(&next),
                None => return Ok(out),
            }
        }
    }

    /// Legacy token Secrets' metadata (field selector on the type, so no other Secret is listed).
    pub async fn list_legacy_token_secrets(
        &self,
        namespace: Option<&str>,
        labels: Option<&str>,
    ) -> Result<Vec<ObjectMeta>, KubeError> {
        self.list_secrets(namespace, labels, Some(&format!("type={LEGACY_TYPE}"))).await
    }

    /// One Secret's metadata, `None` when it does not exist.
    pub async fn secret_meta(&self, namespace: &str, name: &str) -> Result<Option<ObjectMeta>, KubeError> {
        let meta = self
            .secrets(Some(namespace))
            .get_metadata_opt(name)
            .await
            .map_err(call(format!("get secret {namespace}/{name}")))?;
        Ok(meta.map(|m| m.metadata))
    }

    /// A Secret's metadata and whether its `token` key is filled; the value itself is not kept.
    pub async fn token_secret(&self, namespace: &str, name: &str) -> Result<Option<TokenSecret>, KubeError> {
        let request = kube::core::Request::new(format!("/api/v1/namespaces/{namespace}/secrets"))
            .get(name, &Default::default())
            .map_err(|e| KubeError::Unexpected(format!("build a secret request: {e}")))?;
        match self.client.request::<PresenceOnly>(request).await {
            Ok(secret) => {
                let filled = secret.data.and_then(|d| d.get(TOKEN_KEY).map(|f| f.0)).unwrap_or(false);
                Ok(Some(TokenSecret { metadata: secret.metadata, filled }))
            }
            Err(e) if is_code(&e, 404) => Ok(None),
            Err(e) => Err(call(format!("get secret {namespace}/{name}"))(e)),
        }
    }

    /// A ServiceAccount's uid, resourceVersion and `secrets` list, `None` when it does not exist.
    pub async fn service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<ServiceAccountRefs>, KubeError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let account =
            api.get_opt(name).await.map_err(call(format!("get serviceaccount {namespace}/{name}")))?;
        Ok(account
            .map(|a| ServiceAccountRefs { metadata: a.metadata, secrets: a.secrets.unwrap_or_default() }))
    }

    /// Appends `secret` to a ServiceAccount's `secrets`, if the account is still at the
    /// resourceVersion `account` was read at: the merge patch replaces the whole list, so the
    /// precondition is what keeps a concurrent edit from being overwritten.
    pub async fn add_secret_reference(
        &self,
        namespace: &str,
        account: &ServiceAccountRefs,
        secret: &str,
    ) -> Result<Referenced, KubeError> {
        let name = account.metadata.name.as_deref().unwrap_or_default();
        let mut secrets = account.secrets.clone();
        secrets.push(ObjectReference { name: Some(secret.to_owned()), ..ObjectReference::default() });
        let patch = json!({
            "metadata": { "resourceVersion": account.metadata.resource_version },
            "secrets": secrets,
        });
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
        match api.patch(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => Ok(Referenced::Done),
            Err(e) if is_code(&e, 409) => Ok(Referenced::Conflict),
            Err(e) if is_code(&e, 404) => Ok(Referenced::Gone),
            Err(e) => Err(call(format!("add secret {secret} to serviceaccount {namespace}/{name}"))(e)),
        }
    }

    /// Deletes the Secret `name` only if its uid is still `uid`.
    pub async fn delete_secret(&self, namespace: &str, name: &str, uid: &str) -> Result<Deleted, KubeError> {
        let params = DeleteParams {
            preconditions: Some(Preconditions { uid: Some(uid.to_owned()), resource_version: None }),
            ..DeleteParams::default()
        };
        match self.secrets(Some(namespace)).delete(name, &params).await {
            Ok(_) => Ok(Deleted::Done),
            Err(e) if is_code(&e, 404) => Ok(Deleted::Gone),
            Err(e) if is_code(&e, 409) => Ok(Deleted::Replaced),
            Err(e) => Err(call(format!("delete secret {namespace}/{name}"))(e)),
        }
    }

    /// Creates an empty legacy token Secret for the token controller to fill.
    pub async fn create_legacy_token_secret(
        &self,
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Created, KubeError> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(labels.clone()).filter(|l| !l.is_empty()),
                annotations: Some(annotations.clone()),
                ..ObjectMeta::default()
            },
            type_: Some(LEGACY_TYPE.to_owned()),
            ..Secret::default()
        };
        let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
        match self.secrets(Some(namespace)).create(&params, &secret).await {
            Ok(created) => Ok(Created::Done(created.metadata.uid.unwrap_or_default())),
            Err(e) if is_code(&e, 409) => Ok(Created::Exists),
            Err(e) => Err(call(format!("create secret {namespace}/{name}"))(e)),
        }
    }

    /// Sets (`Some`) or removes (`None`) annotations on a Secret.
    pub async fn annotate_secret(
        &self,
        namespace: &str,
        name: &str,
        annotations: &BTreeMap<String, Option<String>>,
    ) -> Result<(), KubeError> {
        let patch = json!({ "metadata": { "annotations": annotations } });
        let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
        self.secrets(Some(namespace))
            .patch_metadata(name, &params, &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(call(format!("annotate secret {namespace}/{name}")))
    }

    /// Asks the TokenRequest API for a token of `service_account`, bound to the Secret
    /// `secret`/`uid` (deleting the Secret invalidates the token).
    pub async fn request_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[String],
        seconds: u64,
        secret: &str,
        uid: &str,
    ) -> Result<IssuedToken, KubeError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let mut spec = json!({
            "expirationSeconds": seconds,
            "boundObjectRef": { "kind": "Secret", "apiVersion": "v1", "name": secret, "uid": uid },
        });
        if !audiences.is_empty() {
            spec["audiences"] = json!(audiences);
        }
        let body = json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec });
        let answer: TokenRequestAnswer = api
            .create_subresource("token", service_account, &PostParams::default(), &body)
            .await
            .map_err(call(format!("request a token for serviceaccount {namespace}/{service_account}")))?;
        let expires = crate::clock::parse_time(&answer.status.expiration_timestamp).ok_or_else(|| {
            KubeError::Unexpected(format!(
                "TokenRequest for {namespace}/{service_account}: expirationTimestamp {:?} is not a time",
                answer.status.expiration_timestamp
            ))
        })?;
        if answer.status.token.is_empty() {
            return Err(KubeError::Unexpected(format!(
                "TokenRequest for {namespace}/{service_account} returned an empty token"
            )));
        }
        Ok(IssuedToken { token: BearerToken::new(answer.status.token), expires })
    }

    /// Writes a managed token and kmsgate's annotations into a Secret, if it is still at
    /// `resource_version`. The answer is metadata only, so the token is never read back.
    pub async fn store_token(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
        token: &BearerToken,
        annotations: &BTreeMap<String, Option<String>>,
    ) -> Result<(), KubeError> {
        let patch =
            TokenPatch { metadata: TokenPatchMeta { resource_version, annotations }, data: TokenData(token) };
        let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
        self.secrets(Some(namespace))
            .patch_metadata(name, &params, &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(call(format!("store the token in secret {namespace}/{name}")))
    }

    /// Records an Event about a Secret, in its namespace (best effort).
    pub async fn secret_event(&self, secret: &ObjectMeta, kind: EventKind, reason: &str, note: &str) {
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            name: secret.name.clone(),
            namespace: secret.namespace.clone(),
            uid: secret.uid.clone(),
            ..ObjectReference::default()
        };
        self.record(secret.namespace.as_deref(), regarding, kind, reason, note).await;
    }

    /// Metadata of Secrets as they change (a metadata-only watch that re-lists on expiry).
    pub fn secret_changes(&self) -> BoxStream<'static, Result<ObjectMeta, KubeError>> {
        super::watch::secret_changes(self.secrets(None))
    }
}

/// A bearer token: zeroed on drop, never printed.
pub struct BearerToken(Zeroizing<String>);

impl BearerToken {
    /// Wraps a token.
    pub fn new(token: Zeroizing<String>) -> Self {
        Self(token)
    }

    /// The token, for writing into a Secret.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let token = BearerToken::new(Zeroizing::new("eyJhbGciOiJSUzI1NiJ9.secret".into()));
        assert_eq!(format!("{token:?}"), "BearerToken(<redacted>)");
        assert_eq!(token.expose(), "eyJhbGciOiJSUzI1NiJ9.secret");
    }

    #[test]
    fn presence_is_read_without_keeping_the_value() {
        let secret: PresenceOnly = serde_json::from_str(
            r#"{"metadata":{"name":"t"},"data":{"token":"ZXlKaGJHY2k=","ca.crt":"","namespace":null}}"#,
        )
        .unwrap();
        let data = secret.data.unwrap();
        assert!(data["token"].0);
        assert!(!data["ca.crt"].0);
        assert!(!data["namespace"].0);
        let empty: PresenceOnly = serde_json::from_str(r#"{"metadata":{"name":"t"}}"#).unwrap();
        assert!(empty.data.is_none());
    }

    #[test]
    fn the_token_patch_carries_the_token_but_never_prints_it() {
        let token = BearerToken::new(Zeroizing::new("header.payload.signature".into()));
        let annotations: BTreeMap<String, Option<String>> =
            [("token.kmsgate.io/error".to_owned(), None)].into();
        let patch = TokenPatch {
            metadata: TokenPatchMeta { resource_version: "7", annotations: &annotations },
            data: TokenData(&token),
        };
        let json = serde_json::to_value(&patch).unwrap();
        assert_eq!(json["data"]["token"], "aGVhZGVyLnBheWxvYWQuc2lnbmF0dXJl");
        assert_eq!(json["metadata"]["resourceVersion"], "7");
        assert!(json["metadata"]["annotations"]["token.kmsgate.io/error"].is_null());
        let debug = format!("{patch:?}");
        assert!(!debug.contains("header.payload") && !debug.contains("aGVhZGVy"), "{debug}");
    }
}
