//! What this binary is: its version, git commit, compiler, and the crypto and TLS crates compiled
//! in. `kmsgate version`, the plugin's /status and `kmsgate_build_info` all show this one value, so
//! an operator can find every node that runs an affected build with one query.

use std::{collections::BTreeMap, fmt, sync::LazyLock};

use serde::{Deserialize, Serialize};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/build_info.rs"));
}

/// The build's identity, as /status serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    /// The crate version, from Cargo.toml.
    pub version: String,
    /// The git commit, or `unknown` when built without `KMSGATE_GIT_COMMIT` (scripts/release.sh
    /// and the Dockerfile set it).
    pub git_commit: String,
    /// `rustc -V` of the compiler.
    pub rustc: String,
    /// Crypto and TLS crates by name, with their versions from Cargo.lock.
    pub crates: BTreeMap<String, String>,
}

static CURRENT: LazyLock<BuildInfo> = LazyLock::new(|| BuildInfo {
    version: env!("CARGO_PKG_VERSION").to_owned(),
    git_commit: generated::GIT_COMMIT.to_owned(),
    rustc: generated::RUSTC.to_owned(),
    crates: generated::CRATES.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect(),
});

static LONG_VERSION: LazyLock<String> = LazyLock::new(|| CURRENT.to_string());

impl BuildInfo {
    /// This binary's build.
    pub fn current() -> &'static Self {
        &CURRENT
    }

    /// The text after `kmsgate ` in `kmsgate version` and `kmsgate --version`.
    pub fn long_version() -> &'static str {
        &LONG_VERSION
    }

    /// Metric labels: `version`, `git_commit`, `rustc`, then one per crate (`-` becomes `_`).
    pub fn labels(&self) -> Vec<(String, String)> {
        let mut labels = vec![
            ("version".to_owned(), self.version.clone()),
            ("git_commit".to_owned(), self.git_commit.clone()),
            ("rustc".to_owned(), self.rustc.clone()),
        ];
        labels.extend(self.crates.iter().map(|(name, version)| (name.replace('-', "_"), version.clone())));
        labels
    }
}

impl fmt::Display for BuildInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.version)?;
        writeln!(f, "git commit: {}", self.git_commit)?;
        write!(f, "rustc: {}", self.rustc)?;
        for (name, version) in &self.crates {
            write!(f, "\n{name}: {version}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_crypto_and_tls_crates_from_the_lock_file() {
        let info = BuildInfo::current();
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert!(info.rustc.starts_with("rustc "), "{}", info.rustc);
        assert!(!info.git_commit.is_empty());
        let lock = std::fs::read_to_string("Cargo.lock").unwrap();
        for name in ["ring", "rustls", "rustls-webpki", "aes-gcm", "hkdf", "sha2"] {
            let version = &info.crates[name];
            let entry = format!("name = \"{name}\"\nversion = \"{version}\"\n");
            assert!(lock.contains(&entry), "{name} {version} is not in Cargo.lock");
        }
    }

    #[test]
    fn the_long_version_shows_every_field() {
        let text = BuildInfo::long_version();
        let info = BuildInfo::current();
        assert!(text.starts_with(&format!("{}\n", info.version)));
        assert!(text.contains(&format!("git commit: {}", info.git_commit)));
        assert!(text.contains(&format!("rustls: {}", info.crates["rustls"])));
        let round_trip: BuildInfo = serde_json::from_value(serde_json::to_value(info).unwrap()).unwrap();
        assert_eq!(&round_trip, info);
    }
}
