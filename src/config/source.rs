//! Where values come from (a TOML file, `KMSGATE_*` and `VAULT_*` environment variables, `--set`
//! flags) and the merged, typed view the sections read. Each value is converted once, by its
//! setting's [`Kind`], from whatever form its source gave it.

use std::{collections::HashMap, path::Path, time::Duration};

use super::{
    ConfigError, FORMAT, field,
    settings::{Fallback, Kind, OTHER_ENV, SETTINGS, Setting, VAULT_ENV, env_name},
};

/// Where environment variables come from: the process, or a map in tests.
pub trait Env {
    /// The variable's value, if set.
    fn var(&self, name: &str) -> Option<String>;
    /// The names of every variable set (values are not needed, and may be secrets).
    fn names(&self) -> Vec<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn names(&self) -> Vec<String> {
        std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()).collect()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

/// Parses a `KEY=VALUE` flag argument.
pub fn parse_set_flag(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    Ok((key.trim().to_owned(), value.to_owned()))
}

/// A typed setting value.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Bool(bool),
    Int(i64),
    List(Vec<String>),
    Str(String),
}

impl Value {
    /// Converts an env, flag or default string by kind; `Err` says what it should have been.
    fn parse(kind: Kind, text: &str) -> Result<Self, &'static str> {
        Ok(match kind {
            Kind::Bool => Self::Bool(text.parse().map_err(|_| kind.describe())?),
            Kind::Int => Self::Int(text.trim().parse().map_err(|_| kind.describe())?),
            Kind::List => Self::List(
                text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect(),
            ),
            Kind::Str => Self::Str(text.to_owned()),
        })
    }

    /// Converts a TOML file value by kind.
    fn from_toml(kind: Kind, value: toml::Value) -> Result<Self, toml::Value> {
        Ok(match (kind, value) {
            (Kind::Bool, toml::Value::Boolean(b)) => Self::Bool(b),
            (Kind::Int, toml::Value::Integer(i)) => Self::Int(i),
            (Kind::Str, toml::Value::String(s)) => Self::Str(s),
            (Kind::List, toml::Value::Array(items)) => {
                let strings = items
                    .iter()
                    .map(|item| item.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| toml::Value::Array(items.clone()))?;
                Self::List(strings)
            }
            (_, other) => return Err(other),
        })
    }
}

/// Every value given, merged by precedence (flags > env > file); defaults come from [`SETTINGS`].
#[derive(Debug, Default)]
pub(super) struct Values {
    given: HashMap<&'static str, Value>,
    /// Where each given value came from: `file PATH`, `env NAME`, `flag --set NAME`.
    origins: HashMap<&'static str, String>,
    /// Things worth a warning at start: an environment variable that beat the file, an unknown
    /// `KMSGATE_*` variable.
    pub(super) warnings: Vec<String>,
}

impl Values {
    /// Reads the file (if any), then `VAULT_*`, then `KMSGATE_*`, then the flags, each overriding
    /// the one before.
    pub(super) fn gather(
        file: Option<&Path>,
        flags: &[(String, String)],
        env: &impl Env,
    ) -> Result<Self, ConfigError> {
        let mut values = Self::default();
        if let Some(path) = file {
            values.read_file(path)?;
        }
        for (var, name) in VAULT_ENV {
            if let Some(text) = env.var(var) {
                values.set_env(name, &text, var)?;
            }
        }
        for setting in SETTINGS {
            let var = env_name(setting.name);
            if let Some(text) = env.var(&var) {
                values.set_env(setting.name, &text, &var)?;
            }
        }
        let mut unknown: Vec<String> = env
            .names()
            .into_iter()
            .filter(|n| n.starts_with("KMSGATE_") && !OTHER_ENV.contains(&n.as_str()))
            .filter(|n| !SETTINGS.iter().any(|s| env_name(s.name) == *n))
            .collect();
        unknown.sort();
        for name in unknown {
            values.warnings.push(format!(
                "environment variable {name} names no kmsgate setting and is ignored (see README, Configuration)"
            ));
        }
        for (name, text) in flags {
            values.set_text(name, text, &format!("flag --set {name}"))?;
        }
        Ok(values)
    }

    fn read_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = crate::files::read_text_capped(path, crate::files::DOCUMENT_MAX_BYTES)
            .map_err(|source| ConfigError::File { path: path.to_owned(), source })?;
        let origin = path.display().to_string();
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { origin: origin.clone(), message: e.to_string() })?;
        match table.get("format") {
            Some(toml::Value::Integer(FORMAT)) => {}
            Some(other) => {
                return Err(ConfigError::Parse {
                    origin,
                    message: format!(
                        "format = {other} is not supported; this kmsgate reads format = {FORMAT}"
                    ),
                });
            }
            None => {
                return Err(ConfigError::Parse {
                    origin,
                    message: format!("missing `format = {FORMAT}` at the top"),
                });
            }
        }
        for (section, entries) in table {
            if section == "format" {
                continue;
            }
            let toml::Value::Table(entries) = entries else {
                let is_section =
                    SETTINGS.iter().any(|s| s.name.split_once('.').is_some_and(|(sec, _)| sec == section));
                if is_section {
                    return Err(field(&section, "must be a table"));
                }
                return Err(ConfigError::UnknownSetting { origin, name: section });
            };
            for (key, value) in entries {
                let setting = known(&format!("{section}.{key}"), &origin)?;
                let value = Value::from_toml(setting.kind, value).map_err(|value| {
                    field(setting.name, format!("{origin}: {value} is not {}", setting.kind.describe()))
                })?;
                self.given.insert(setting.name, value);
                self.origins.insert(setting.name, format!("file {origin}"));
            }
        }
        Ok(())
    }

    /// [`Values::set_text`] from an environment variable, warning when it beats the file.
    fn set_env(&mut self, name: &str, text: &str, var: &str) -> Result<(), ConfigError> {
        if let Some(setting) = Setting::find(name)
            && let Some(file) = self.origins.get(setting.name).filter(|o| o.starts_with("file "))
        {
            self.warnings.push(format!(
                "environment variable {var} overrides {name} from the config {file}; unset it to use the file"
            ));
        }
        self.set_text(name, text, &format!("env {var}"))
    }

    /// Where a given value came from (`file PATH`, `env NAME`, `flag --set NAME`); `None` for a
    /// default.
    pub(super) fn origin(&self, name: &str) -> Option<&str> {
        self.origins.get(name).map(String::as_str)
    }

    fn set_text(&mut self, name: &str, text: &str, origin: &str) -> Result<(), ConfigError> {
        let setting = known(name, origin)?;
        let value = Value::parse(setting.kind, text)
            .map_err(|what| field(name, format!("{origin}: {text:?} is not {what}")))?;
        self.given.insert(setting.name, value);
        self.origins.insert(setting.name, origin.to_owned());
        Ok(())
    }

    /// The value given, else the table's default; `None` when neither is there.
    fn value(&self, name: &str) -> Result<Option<Value>, ConfigError> {
        let setting = Setting::find(name).ok_or_else(|| wrong_kind(name))?;
        if let Some(value) = self.given.get(setting.name) {
            return Ok(Some(value.clone()));
        }
        match setting.default {
            Fallback::Value(text) => Value::parse(setting.kind, text)
                .map(Some)
                .map_err(|what| field(name, format!("default {text:?} is not {what}"))),
            Fallback::Derived(_) | Fallback::Unset => Ok(None),
        }
    }

    /// A string setting; `None` when unset with no default.
    pub(super) fn text(&self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.value(name)? {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(_) => Err(wrong_kind(name)),
        }
    }

    /// A string setting that is off when empty, as paths are.
    pub(super) fn nonempty(&self, name: &str) -> Result<Option<String>, ConfigError> {
        Ok(self.text(name)?.filter(|s| !s.is_empty()))
    }

    /// A boolean setting (every one has a default).
    pub(super) fn flag(&self, name: &str) -> Result<bool, ConfigError> {
        match self.value(name)? {
            Some(Value::Bool(b)) => Ok(b),
            _ => Err(wrong_kind(name)),
        }
    }

    /// A list setting; empty when unset.
    pub(super) fn list(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        match self.value(name)? {
            None => Ok(Vec::new()),
            Some(Value::List(items)) => Ok(items),
            Some(_) => Err(wrong_kind(name)),
        }
    }

    /// A whole-number setting between `min` and `u32::MAX`.
    pub(super) fn int(&self, name: &str, min: i64) -> Result<i64, ConfigError> {
        let Some(Value::Int(value)) = self.value(name)? else {
            return Err(wrong_kind(name));
        };
        if value < min || value > i64::from(u32::MAX) {
            return Err(field(name, format!("{value} must be between {min} and {}", u32::MAX)));
        }
        Ok(value)
    }

    /// A duration setting above zero; `None` when unset with no default.
    pub(super) fn duration(&self, name: &str) -> Result<Option<Duration>, ConfigError> {
        let Some(text) = self.text(name)? else {
            return Ok(None);
        };
        let parsed = humantime::parse_duration(&text)
            .map_err(|e| field(name, format!("{text:?} is not a duration like 30s or 250ms: {e}")))?;
        if parsed.is_zero() {
            return Err(field(name, "must be greater than zero"));
        }
        Ok(Some(parsed))
    }

    /// A duration setting with a default in the table.
    pub(super) fn required_duration(&self, name: &str) -> Result<Duration, ConfigError> {
        self.duration(name)?.ok_or_else(|| wrong_kind(name))
    }
}

fn known(name: &str, origin: &str) -> Result<&'static Setting, ConfigError> {
    Setting::find(name)
        .ok_or_else(|| ConfigError::UnknownSetting { origin: origin.to_owned(), name: name.to_owned() })
}

/// A section read a setting the table lacks, as the wrong kind, or without the default the table
/// should give it: a bug here, caught by the tests that load every setting.
fn wrong_kind(name: &str) -> ConfigError {
    field(name, "is read in a way the settings table does not describe (a kmsgate bug)")
}

/// Checks that `value` is 1 to `max` bytes, all accepted by `ok`.
pub(super) fn name_chars(
    name: &str,
    value: &str,
    max: usize,
    ok: impl Fn(u8) -> bool,
) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > max || !value.bytes().all(ok) {
        return Err(field(
            name,
            format!("{value:?} must be 1-{max} characters of the allowed set (see README)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_converts_by_its_kind_and_bools_and_ints_have_one() {
        for s in SETTINGS {
            match s.default {
                Fallback::Value(text) => {
                    assert!(Value::parse(s.kind, text).is_ok(), "{}: default {text:?}", s.name)
                }
                Fallback::Derived(how) => assert!(how.starts_with('('), "{}: {how}", s.name),
                Fallback::Unset => {
                    assert!(!matches!(s.kind, Kind::Bool | Kind::Int), "{} needs a default", s.name)
                }
            }
        }
    }

    #[test]
    fn file_values_of_the_wrong_type_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "format = 1\n[plugin]\nmax_plaintext_bytes = \"x\"\n").unwrap();
        let err = Values::gather(Some(&path), &[], &HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("plugin.max_plaintext_bytes") && err.contains("whole number"), "{err}");
        std::fs::write(&path, "format = 1\nplugin = 3\n").unwrap();
        let err = Values::gather(Some(&path), &[], &HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("must be a table"), "{err}");
        std::fs::write(&path, "format = 1\nplugn = 3\n").unwrap();
        let err = Values::gather(Some(&path), &[], &HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("unknown setting \"plugn\""), "{err}");
        std::fs::write(&path, "format = 1\n[vault]\naddresses = [\"https://a\", 3]\n").unwrap();
        let err = Values::gather(Some(&path), &[], &HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("vault.addresses") && err.contains("list of strings"), "{err}");
    }
}
