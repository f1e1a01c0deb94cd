//! The object type and the CustomResourceDefinition every policy kind shares: what kube-derive's
//! `#[derive(CustomResource)]` generates for a cluster-scoped kind with a status subresource
//! (kube-derive 5.0.0, `custom_resource::derive`), written once for the three kinds so the build
//! needs no proc-macro for them. Each kind states only its [`PolicySpec`] constants.

use std::{borrow::Cow, fmt::Debug};

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionNames,
        CustomResourceDefinitionSpec, CustomResourceDefinitionVersion, CustomResourceSubresourceStatus,
        CustomResourceSubresources, CustomResourceValidation,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::core::{ClusterResourceScope, dynamic::ApiResource};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize, de::DeserializeOwned, ser::SerializeStruct as _};

/// API group of kmsgate's resources.
pub const GROUP: &str = "kmsgate.io";
/// The version of every kind: the only one served and stored.
pub const VERSION: &str = "v1alpha1";
/// `GROUP/VERSION`.
const API_VERSION: &str = "kmsgate.io/v1alpha1";

/// The `spec` of a policy kind, and what its CRD says about the kind.
pub trait PolicySpec:
    Clone + Debug + DeserializeOwned + Serialize + JsonSchema + Send + Sync + 'static
{
    /// The kind's `status`.
    type Status: Clone + Debug + DeserializeOwned + Serialize + JsonSchema + Send + Sync + 'static;
    /// `kind:` of its objects.
    const KIND: &'static str;
    /// The resource name in its API paths.
    const PLURAL: &'static str;
    /// The CRD's name, `PLURAL.GROUP`.
    const CRD_NAME: &'static str;
    /// Short names for kubectl.
    const SHORT_NAMES: &'static [&'static str];
    /// kubectl's extra columns, in order: name, type and JSONPath of each.
    const COLUMNS: &'static [(&'static str, &'static str, &'static str)];
}

/// One object of a policy kind: `metadata`, `spec` and the controller's `status`.
#[derive(Clone, Debug, Deserialize)]
// NB: `PolicySpec` already asks both types to deserialize; serde's own bounds would be ambiguous.
#[serde(rename_all = "camelCase", bound(deserialize = ""))]
pub struct Policy<S: PolicySpec> {
    /// Name, annotations, resource version.
    pub metadata: ObjectMeta,
    /// What the policy asks for.
    pub spec: S,
    /// The controller's record; absent until it writes one.
    pub status: Option<S::Status>,
}

/// `apiVersion` and `kind` first, then `metadata`, `spec` and, when set, `status`.
impl<S: PolicySpec> Serialize for Policy<S> {
    fn serialize<Ser: serde::Serializer>(&self, serializer: Ser) -> Result<Ser::Ok, Ser::Error> {
        let mut object = serializer.serialize_struct(S::KIND, 4 + usize::from(self.status.is_some()))?;
        object.serialize_field("apiVersion", API_VERSION)?;
        object.serialize_field("kind", S::KIND)?;
        object.serialize_field("metadata", &self.metadata)?;
        object.serialize_field("spec", &self.spec)?;
        if let Some(status) = &self.status {
            object.serialize_field("status", status)?;
        }
        object.end()
    }
}

impl<S: PolicySpec> kube::Resource for Policy<S> {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        S::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        API_VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        S::PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// As kube-derive's `HasSpec`: generic code reads the spec through it.
impl<S: PolicySpec> kube::core::object::HasSpec for Policy<S> {
    type Spec = S;

    fn spec(&self) -> &S {
        &self.spec
    }

    fn spec_mut(&mut self) -> &mut S {
        &mut self.spec
    }
}

/// As kube-derive's `HasStatus`: the policy loops read and write the status through it.
impl<S: PolicySpec> kube::core::object::HasStatus for Policy<S> {
    type Status = S::Status;

    fn status(&self) -> Option<&S::Status> {
        self.status.as_ref()
    }

    fn status_mut(&mut self) -> &mut Option<S::Status> {
        &mut self.status
    }
}

/// The schema of the whole object: `spec` required, `status` optional, and `metadata` left out as
/// the API server checks it itself. The title is the kind, and the description the one
/// kube-derive's generated type carried, so the CRD in deploy/ stays as it was.
impl<S: PolicySpec> JsonSchema for Policy<S> {
    fn schema_name() -> Cow<'static, str> {
        S::KIND.into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "description": format!("Auto-generated derived type for {} via `CustomResource`", S::schema_name()),
            "properties": {
                "spec": generator.subschema_for::<S>(),
                "status": generator.subschema_for::<Option<S::Status>>(),
            },
            "required": ["spec"],
        })
    }
}

impl<S: PolicySpec> kube::CustomResourceExt for Policy<S> {
    fn crd() -> CustomResourceDefinition {
        // NB: the settings and transforms kube-derive's `crd()` uses: an OpenAPI v3 schema with
        // no `$ref`, `$schema` or `definitions` (which a CRD may not have), made structural.
        let generator = schemars::generate::SchemaSettings::openapi3()
            .with(|s| {
                s.inline_subschemas = true;
                s.meta_schema = None;
            })
            .with_transform(schemars::transform::AddNullable::default())
            .with_transform(kube_core::schema::StructuralSchemaRewriter)
            .with_transform(kube_core::schema::OptionalEnum)
            .with_transform(kube_core::schema::OptionalIntOrString)
            .into_generator();
        // The schemas are of fixed types, and `shipped_crd_matches_the_command` (tests/examples.rs)
        // renders all three kinds through here, so a schema that JSONSchemaProps cannot hold fails
        // that test, never a user's command.
        let schema = serde_json::to_value(generator.into_root_schema_for::<Self>())
            .and_then(serde_json::from_value)
            .expect("the kinds' schemas are JSONSchemaProps (shipped_crd_matches_the_command)");
        let columns = S::COLUMNS
            .iter()
            .map(|(name, type_, json_path)| CustomResourceColumnDefinition {
                name: (*name).into(),
                type_: (*type_).into(),
                json_path: (*json_path).into(),
                ..Default::default()
            })
            .collect();
        CustomResourceDefinition {
            metadata: ObjectMeta { name: Some(S::CRD_NAME.into()), ..Default::default() },
            spec: CustomResourceDefinitionSpec {
                group: GROUP.into(),
                names: CustomResourceDefinitionNames {
                    kind: S::KIND.into(),
                    plural: S::PLURAL.into(),
                    short_names: Some(S::SHORT_NAMES.iter().map(|n| (*n).into()).collect()),
                    singular: Some(S::KIND.to_ascii_lowercase()),
                    ..Default::default()
                },
                scope: "Cluster".into(),
                versions: vec![CustomResourceDefinitionVersion {
                    additional_printer_columns: Some(columns),
                    name: VERSION.into(),
                    schema: Some(CustomResourceValidation { open_api_v3_schema: Some(schema) }),
                    served: true,
                    storage: true,
                    subresources: Some(CustomResourceSubresources {
                        status: Some(CustomResourceSubresourceStatus(serde_json::json!({}))),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn crd_name() -> &'static str {
        S::CRD_NAME
    }

    fn api_resource() -> ApiResource {
        ApiResource::erase::<Self>(&())
    }

    fn shortnames() -> &'static [&'static str] {
        S::SHORT_NAMES
    }
}

/// The CRD of `S`'s kind as YAML, for `kmsgate crd` and deploy/.
pub fn crd_yaml<S: PolicySpec>() -> Result<String, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt as _;
    serde_saphyr::to_string(&Policy::<S>::crd())
}

#[cfg(test)]
mod tests {
    use kube::{CustomResourceExt as _, Resource as _};

    use super::*;
    use crate::crd::{rotation::RotationPolicySpec, signing::SigningKeyPolicySpec, tokens::TokenPolicySpec};

    fn names<S: PolicySpec>() -> (String, String, String) {
        (
            Policy::<S>::crd_name().to_owned(),
            format!("{}.{}", S::PLURAL, GROUP),
            Policy::<S>::api_version(&()).into(),
        )
    }

    #[test]
    fn each_kind_names_its_crd_plural_dot_group_under_one_api_version() {
        for (crd_name, plural_group, api_version) in
            [names::<RotationPolicySpec>(), names::<TokenPolicySpec>(), names::<SigningKeyPolicySpec>()]
        {
            assert_eq!(crd_name, plural_group);
            assert_eq!(api_version, format!("{GROUP}/{VERSION}"));
        }
    }

    #[test]
    fn an_object_round_trips_with_api_version_and_kind_and_no_null_status() {
        let mut policy: Policy<TokenPolicySpec> = serde_json::from_value(serde_json::json!({
            "apiVersion": "kmsgate.io/v1alpha1",
            "kind": "TokenPolicy",
            "metadata": {"name": "kmsgate"},
            "spec": {},
        }))
        .unwrap();
        assert_eq!(policy.status, None);
        let json = serde_json::to_value(&policy).unwrap();
        assert_eq!(json["apiVersion"], "kmsgate.io/v1alpha1");
        assert_eq!(json["kind"], "TokenPolicy");
        assert_eq!(json["metadata"]["name"], "kmsgate");
        assert!(json.get("status").is_none(), "{json}");
        policy.status = Some(Default::default());
        let json = serde_json::to_value(&policy).unwrap();
        assert!(json["status"].is_object(), "{json}");
        let missing = serde_json::from_value::<Policy<TokenPolicySpec>>(serde_json::json!({"metadata": {}}));
        assert!(missing.is_err(), "spec is required");
    }
}
