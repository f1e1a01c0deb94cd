//! A TokenPolicy spec parsed once into typed values. The token loops and `kmsgate tokens` read
//! only the [`Plan`], so an entry that does not parse stops the policy here, with its field's
//! name, instead of being split again (or silently never matching) wherever it is used.

use std::{collections::BTreeMap, fmt, time::Duration};

use super::{MIN_LIFETIME, TokenPolicySpec};
use crate::crd::schedule::Schedule;

/// A spec value is invalid.
#[derive(Debug, thiserror::Error)]
#[error("TokenPolicy spec.{field}: {problem}")]
pub struct SpecError {
    /// The field, e.g. `managed.maxLifetime`.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

/// Everything the token loops do for one policy, parsed and checked.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Rotation of legacy token Secrets.
    pub legacy: LegacyPlan,
    /// Managed bound tokens.
    pub managed: ManagedPlan,
}

/// The legacy loop's settings.
#[derive(Debug, Clone)]
pub struct LegacyPlan {
    /// Whether the controller rotates on `schedule` (`kmsgate tokens rotate` works either way).
    pub enabled: bool,
    /// When the legacy run is due.
    pub schedule: Schedule,
    /// Which Secrets a run looks at, and when they are due.
    pub selection: Selection,
    /// Wait this long for the token controller to fill a recreated Secret.
    pub token_timeout: Duration,
}

/// Which legacy token Secrets a run looks at.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Namespaces; empty means all.
    pub namespaces: Vec<String>,
    /// Label selector (server side).
    pub label_selector: Option<String>,
    /// Skip Secrets with any of these labels.
    pub exclude_labels: Vec<Match>,
    /// Skip Secrets with any of these annotations.
    pub exclude_annotations: Vec<Match>,
    /// Rotate Secrets older than this.
    pub max_age: MaxAge,
}

/// How old a legacy token Secret may get. Only [`MaxAge::new`] makes one, so the policy's
/// `legacy.maxAge` and `kmsgate tokens --older-than` share the minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxAge(Duration);

impl MaxAge {
    /// The shortest age allowed: rotating younger tokens would churn every workload's token.
    pub const MIN: Duration = Duration::from_secs(3600);

    /// Checks the minimum; the error names the policy field.
    pub fn new(age: Duration) -> Result<Self, SpecError> {
        if age < Self::MIN {
            return Err(SpecError { field: "legacy.maxAge", problem: "must be at least 1h".into() });
        }
        Ok(Self(age))
    }

    /// The age as a duration.
    pub fn duration(self) -> Duration {
        self.0
    }
}

impl Default for MaxAge {
    /// The policy's default, 90 days.
    fn default() -> Self {
        Self(Duration::from_secs(2160 * 3600))
    }
}

/// An exclusion rule: a label or annotation `key`, or `key=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    key: String,
    value: Option<String>,
}

impl Match {
    /// Parses `key` or `key=value` (the value is everything after the first `=`); `None` when
    /// the key is empty.
    pub fn parse(text: &str) -> Option<Self> {
        let (key, value) = match text.split_once('=') {
            Some((key, value)) => (key, Some(value.to_owned())),
            None => (text, None),
        };
        (!key.is_empty()).then(|| Self { key: key.to_owned(), value })
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value it must have; `None` matches any value.
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }

    /// Whether `map` has the key (with the value, if the rule names one).
    pub fn matches(&self, map: &BTreeMap<String, String>) -> bool {
        match (map.get(&self.key), &self.value) {
            (Some(found), Some(wanted)) => found == wanted,
            (found, None) => found.is_some(),
            (None, Some(_)) => false,
        }
    }
}

impl fmt::Display for Match {
    /// As written in the policy.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(value) => write!(f, "{}={value}", self.key),
            None => f.write_str(&self.key),
        }
    }
}

/// A `managed.denyServiceAccounts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deny {
    /// `namespace/name`: one ServiceAccount.
    Account {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// `namespace/*`: every ServiceAccount in the namespace.
    Namespace(String),
}

impl Deny {
    /// Parses `namespace/name` or `namespace/*`; `None` unless both parts are valid names, so a
    /// typo cannot make an entry that silently denies nothing.
    pub fn parse(text: &str) -> Option<Self> {
        let (namespace, name) = text.split_once('/')?;
        if !is_namespace(namespace) {
            return None;
        }
        match name {
            "*" => Some(Self::Namespace(namespace.to_owned())),
            name if is_subdomain(name) => {
                Some(Self::Account { namespace: namespace.to_owned(), name: name.to_owned() })
            }
            _ => None,
        }
    }

    /// Whether the rule denies ServiceAccount `name` in `namespace`.
    pub fn denies(&self, namespace: &str, name: &str) -> bool {
        match self {
            Self::Account { namespace: ns, name: sa } => ns == namespace && sa == name,
            Self::Namespace(ns) => ns == namespace,
        }
    }
}

/// The managed loop's settings.
#[derive(Debug, Clone)]
pub struct ManagedPlan {
    /// Issue and refresh managed tokens.
    pub enabled: bool,
    /// The only namespaces whose Secrets may ask.
    pub namespaces: Vec<String>,
    /// Audiences a Secret may ask for; empty allows only the API server's default.
    pub audiences: Vec<String>,
    /// Lifetime asked for by default.
    pub default_lifetime: Duration,
    /// Longest lifetime allowed.
    pub max_lifetime: Duration,
    /// Refresh when this fraction (0.1 to 0.95) of the granted lifetime has passed.
    pub refresh_fraction: f64,
    /// ServiceAccounts never issued for.
    pub deny: Vec<Deny>,
    /// Managed re-list interval.
    pub resync: Duration,
}

/// A DNS-1123 subdomain, as ServiceAccount (and most object) names are.
pub fn is_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A DNS-1123 label, as namespace names are.
pub fn is_namespace(name: &str) -> bool {
    name.len() <= 63 && !name.contains('.') && is_subdomain(name)
}

fn duration(field: &'static str, text: &str) -> Result<Duration, SpecError> {
    humantime::parse_duration(text)
        .map_err(|e| SpecError { field, problem: format!("{text:?} is not a duration like 24h: {e}") })
}

fn matches(field: &'static str, entries: &[String]) -> Result<Vec<Match>, SpecError> {
    entries
        .iter()
        .map(|entry| {
            Match::parse(entry)
                .ok_or_else(|| SpecError { field, problem: "entries are `key` or `key=value`".into() })
        })
        .collect()
}

/// Parses and checks every field, so a bad policy fails once with a message naming the field.
pub fn parse(spec: &TokenPolicySpec) -> Result<Plan, SpecError> {
    let bad = |field, problem: &str| Err(SpecError { field, problem: problem.to_owned() });
    let l = &spec.legacy;
    let schedule = Schedule::parse(Some(&l.schedule))
        .map_err(|e| SpecError { field: "legacy.schedule", problem: e.to_string() })?;
    let max_age = MaxAge::new(duration("legacy.maxAge", &l.max_age)?)?;
    let token_timeout = duration("legacy.tokenTimeout", &l.token_timeout)?;
    if token_timeout.is_zero() {
        return bad("legacy.tokenTimeout", "must be above 0");
    }
    // NB: `*` or a typo here would list an empty namespace and rotate nothing, silently.
    if l.namespaces.iter().any(|n| !is_namespace(n)) {
        return bad("legacy.namespaces", "entries are namespace names (no wildcards)");
    }
    let selection = Selection {
        namespaces: l.namespaces.clone(),
        label_selector: l.label_selector.clone(),
        exclude_labels: matches("legacy.excludeLabels", &l.exclude_labels)?,
        exclude_annotations: matches("legacy.excludeAnnotations", &l.exclude_annotations)?,
        max_age,
    };
    let m = &spec.managed;
    let default_lifetime = duration("managed.defaultLifetime", &m.default_lifetime)?;
    let max_lifetime = duration("managed.maxLifetime", &m.max_lifetime)?;
    if max_lifetime < MIN_LIFETIME || max_lifetime > Duration::from_secs(1 << 32) {
        return bad("managed.maxLifetime", "must be 10m to 2^32 seconds (the TokenRequest API's range)");
    }
    if default_lifetime < MIN_LIFETIME || default_lifetime > max_lifetime {
        return bad("managed.defaultLifetime", "must be at least 10m and at most maxLifetime");
    }
    // NB: written so that NaN fails too.
    if !(m.refresh_fraction >= 0.1 && m.refresh_fraction <= 0.95) {
        return bad("managed.refreshFraction", "must be 0.1 to 0.95");
    }
    let resync = duration("managed.resync", &m.resync)?;
    if resync < Duration::from_secs(10) {
        return bad("managed.resync", "must be at least 10s");
    }
    if m.enabled && m.namespaces.is_empty() {
        return bad("managed.namespaces", "list the namespaces allowed to ask for tokens");
    }
    if m.namespaces.iter().any(|n| n.is_empty() || n.contains('*')) {
        return bad("managed.namespaces", "entries are namespace names (no wildcards)");
    }
    let deny = m
        .deny_service_accounts
        .iter()
        .map(|entry| {
            Deny::parse(entry).ok_or_else(|| SpecError {
                field: "managed.denyServiceAccounts",
                problem: "entries are `namespace/name` or `namespace/*`".into(),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Plan {
        legacy: LegacyPlan { enabled: l.enabled, schedule, selection, token_timeout },
        managed: ManagedPlan {
            enabled: m.enabled,
            namespaces: m.namespaces.clone(),
            audiences: m.audiences.clone(),
            default_lifetime,
            max_lifetime,
            refresh_fraction: m.refresh_fraction,
            deny,
            resync,
        },
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(json: serde_json::Value) -> TokenPolicySpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn an_empty_spec_is_valid_and_does_nothing() {
        let spec = spec(serde_json::json!({}));
        let plan = parse(&spec).unwrap();
        assert!(!plan.legacy.enabled && !plan.managed.enabled);
        assert_eq!(plan.legacy.selection.max_age.duration(), Duration::from_secs(90 * 24 * 3600));
        assert_eq!(plan.legacy.selection.max_age, MaxAge::default());
        assert_eq!(plan.managed.default_lifetime, Duration::from_secs(3600));
        assert_eq!(plan.managed.refresh_fraction, 0.8);
        assert_eq!(plan.legacy.token_timeout, Duration::from_secs(120));
    }

    #[test]
    fn validation_names_the_field() {
        let check = |json: serde_json::Value, field: &str| {
            let error = parse(&spec(json)).unwrap_err().to_string();
            assert!(error.starts_with(&format!("TokenPolicy spec.{field}:")), "{error}");
        };
        check(serde_json::json!({"managed": {"enabled": true}}), "managed.namespaces");
        check(serde_json::json!({"managed": {"maxLifetime": "5m"}}), "managed.maxLifetime");
        check(serde_json::json!({"managed": {"defaultLifetime": "48h"}}), "managed.defaultLifetime");
        check(serde_json::json!({"managed": {"refreshFraction": 1.0}}), "managed.refreshFraction");
        check(
            serde_json::json!({"managed": {"denyServiceAccounts": ["kmsgate"]}}),
            "managed.denyServiceAccounts",
        );
        check(serde_json::json!({"legacy": {"maxAge": "soon"}}), "legacy.maxAge");
        check(serde_json::json!({"legacy": {"schedule": "5m"}}), "legacy.schedule");
        check(serde_json::json!({"legacy": {"excludeLabels": ["=x"]}}), "legacy.excludeLabels");
    }

    #[test]
    fn a_bad_exclusion_or_deny_entry_names_its_field() {
        let check = |json: serde_json::Value, field: &str, problem: &str| {
            let error = parse(&spec(json)).unwrap_err().to_string();
            assert_eq!(error, format!("TokenPolicy spec.{field}: {problem}"));
        };
        let keys = "entries are `key` or `key=value`";
        check(serde_json::json!({"legacy": {"excludeLabels": ["ok", ""]}}), "legacy.excludeLabels", keys);
        check(
            serde_json::json!({"legacy": {"excludeAnnotations": ["=v"]}}),
            "legacy.excludeAnnotations",
            keys,
        );
        let accounts = "entries are `namespace/name` or `namespace/*`";
        let deny = |entry: &str| serde_json::json!({"managed": {"denyServiceAccounts": [entry]}});
        // NB: each of these used to pass and then never match anything: a deny rule that denies
        // nothing is refused instead.
        for entry in
            ["apps/", "/root", "apps/root/x", "apps/ root", " apps/root", "Apps/root", "apps/Root", "a.b/c"]
        {
            check(deny(entry), "managed.denyServiceAccounts", accounts);
        }
        check(serde_json::json!({"legacy": {"maxAge": "59m"}}), "legacy.maxAge", "must be at least 1h");
        let names = "entries are namespace names (no wildcards)";
        for namespaces in [json!(["*"]), json!(["apps", ""]), json!(["Apps"]), json!(["apps/x"])] {
            check(json!({"legacy": {"namespaces": namespaces}}), "legacy.namespaces", names);
        }
    }

    #[test]
    fn good_entries_parse_to_typed_rules() {
        let plan = parse(&spec(serde_json::json!({
            "legacy": {
                "excludeLabels": ["team=infra", "keep", "empty=", "a=b=c"],
                "excludeAnnotations": ["example.com/keep"],
                "namespaces": ["apps"],
                "labelSelector": "app=ci",
                "maxAge": "720h",
            },
            "managed": {"denyServiceAccounts": ["apps/root", "ops/*", "apps/ci.bot"]},
        })))
        .unwrap();
        let labels: Vec<(&str, Option<&str>)> =
            plan.legacy.selection.exclude_labels.iter().map(|m| (m.key(), m.value())).collect();
        assert_eq!(
            labels,
            [("team", Some("infra")), ("keep", None), ("empty", Some("")), ("a", Some("b=c"))]
        );
        let shown: Vec<String> = plan.legacy.selection.exclude_labels.iter().map(Match::to_string).collect();
        assert_eq!(shown, ["team=infra", "keep", "empty=", "a=b=c"], "shown as written");
        assert_eq!(plan.legacy.selection.exclude_annotations[0].key(), "example.com/keep");
        assert_eq!(plan.legacy.selection.namespaces, ["apps"]);
        assert_eq!(plan.legacy.selection.label_selector.as_deref(), Some("app=ci"));
        assert_eq!(plan.legacy.selection.max_age.duration(), Duration::from_secs(720 * 3600));
        assert_eq!(
            plan.managed.deny,
            [
                Deny::Account { namespace: "apps".into(), name: "root".into() },
                Deny::Namespace("ops".into()),
                Deny::Account { namespace: "apps".into(), name: "ci.bot".into() },
            ]
        );
    }

    #[test]
    fn rules_match_what_they_name() {
        let map: BTreeMap<String, String> =
            [("team".to_owned(), "infra".to_owned()), ("empty".to_owned(), String::new())].into();
        let rule = |text| Match::parse(text).unwrap();
        assert!(
            rule("team").matches(&map) && rule("team=infra").matches(&map) && rule("empty=").matches(&map)
        );
        assert!(
            !rule("team=apps").matches(&map) && !rule("other").matches(&map) && !rule("other=").matches(&map)
        );
        let root = Deny::parse("apps/root").unwrap();
        assert!(root.denies("apps", "root") && !root.denies("apps", "ci") && !root.denies("ops", "root"));
        let ops = Deny::parse("ops/*").unwrap();
        assert!(ops.denies("ops", "anything") && !ops.denies("apps", "anything"));
    }

    #[test]
    fn the_age_minimum_is_the_policys() {
        assert!(MaxAge::new(Duration::from_secs(3599)).is_err());
        assert_eq!(MaxAge::new(MaxAge::MIN).unwrap().duration(), MaxAge::MIN);
    }
}
