//! Resources by group and plural name: as a policy lists them ([`ResourceRef`], with where etcd
//! keeps them) and as the status names them ([`ResourceId`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A resource by API group and plural name, like `secrets` or `deployments.apps`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRef {
    /// API group; empty for the core group.
    #[serde(default)]
    pub group: String,
    /// Plural resource name.
    pub resource: String,
    /// Its key prefix in etcd below the API server's prefix; default `<resource>` for the core
    /// group and `<group>/<resource>` otherwise (the custom-resource layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_prefix: Option<String>,
}

impl ResourceRef {
    /// Parses `secrets` or `deployments.apps` (`resource.group`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let id: ResourceId = text.parse()?;
        Ok(Self { group: id.group, resource: id.resource, etcd_prefix: None })
    }

    /// Which resource this is, without where it is stored.
    pub fn id(&self) -> ResourceId {
        ResourceId { group: self.group.clone(), resource: self.resource.clone() }
    }

    /// The etcd path below the API server's prefix, without slashes at either end.
    pub fn etcd_path(&self) -> String {
        match (&self.etcd_prefix, self.group.as_str()) {
            (Some(prefix), _) => prefix.trim_matches('/').to_owned(),
            (None, "") => self.resource.clone(),
            (None, group) => format!("{group}/{}", self.resource),
        }
    }
}

impl std::fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.id().fmt(f)
    }
}

/// A resource by group and plural name; written as `secrets` or `deployments.apps` wherever the
/// status names one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    /// API group; empty for the core group.
    pub group: String,
    /// Plural resource name.
    pub resource: String,
}

impl std::fmt::Display for ResourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: pad, so table columns (`{:<28}`) line up.
        match self.group.as_str() {
            "" => f.pad(&self.resource),
            group => f.pad(&format!("{}.{group}", self.resource)),
        }
    }
}

impl std::str::FromStr for ResourceId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (resource, group) = text.split_once('.').unwrap_or((text, ""));
        let valid =
            |s: &str| s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if resource.is_empty() || !valid(resource) || !valid(group) {
            return Err(format!("{text:?} is not a resource like secrets or deployments.apps"));
        }
        Ok(Self { group: group.to_owned(), resource: resource.to_owned() })
    }
}

impl Serialize for ResourceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ResourceId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_refs_parse_and_map_to_etcd() {
        let r = ResourceRef::parse("deployments.apps").unwrap();
        assert_eq!((r.group.as_str(), r.resource.as_str()), ("apps", "deployments"));
        assert_eq!(r.etcd_path(), "apps/deployments");
        assert_eq!(ResourceRef::parse("secrets").unwrap().etcd_path(), "secrets");
        assert!(ResourceRef::parse("Secrets").is_err());
        assert!(ResourceRef::parse("").is_err());
    }
}
