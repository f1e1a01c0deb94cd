//! Which keys FetchKeys serves, and which one signs: decisions from the key store's answer, the
//! verify-only keys, the previous set and the time, with no I/O. Also the persisted form of the
//! last good set, which the signer serves at start while the key store is unreachable (kube-apiserver
//! will not start without a FetchKeys answer).

use std::{collections::BTreeMap, path::Path, time::Duration};

use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::{
    backend::SigningKeyMetadata,
    jwt::{Alg, PublicKey},
};

/// The persisted file's format.
const FORMAT: u32 = 1;

/// Largest persisted key set read back: thousands of RSA-4096 keys fit.
pub const STATE_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Most vanished kids kept: each is a key store version that disappeared without being retired,
/// so more than a handful means something rewrites the key store; past this the oldest leave.
pub const VANISHED_MAX: usize = 64;

/// Latest time a `google.protobuf.Timestamp` may hold (9999-12-31T23:59:59Z; timestamp.proto,
/// checked by Go's `timestamppb` `CheckValid`, which kube-apiserver applies to `data_timestamp`).
pub const TIMESTAMP_MAX_SECONDS: u64 = 253_402_300_799;

/// The persisted key set could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeySetError {
    /// The file is not a key set this code wrote.
    #[error("key set file {path}: {problem}")]
    Invalid { path: String, problem: String },
    /// Reading or writing failed.
    #[error("key set file {path}: {action}: {source}")]
    Io {
        path: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One key FetchKeys serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedKey {
    /// base64url(SHA-256(der)).
    pub kid: String,
    /// The algorithm the key verifies.
    #[serde(with = "alg_name")]
    pub alg: Alg,
    /// PKIX DER.
    #[serde(with = "der_base64")]
    pub der: Vec<u8>,
    /// Left out of OIDC discovery (and never signed with).
    pub exclude_from_oidc_discovery: bool,
    /// The key store's version; `None` for a verify-only key.
    pub version: Option<u64>,
    /// When (Unix seconds) it vanished from the key store without being retired.
    #[serde(default)]
    pub vanished_at: Option<u64>,
}

/// The set FetchKeys serves, and when the key store was last read for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySet {
    /// Always [`FORMAT`].
    pub format: u32,
    /// Unix seconds of the successful key store read this set comes from.
    pub data_timestamp: u64,
    /// Sorted by kid, so the order kube-apiserver compares is stable.
    pub keys: Vec<ServedKey>,
}

impl KeySet {
    /// The kids that vanished without being retired, for /status.
    pub fn vanished(&self) -> Vec<&ServedKey> {
        self.keys.iter().filter(|k| k.vanished_at.is_some()).collect()
    }

    /// The kid and algorithm to sign with for `version`. Never a vanished key, and never one
    /// served as excluded from OIDC discovery: kube-apiserver rejects a token whose kid has any
    /// excluded entry (`plugin.go` `signAndAssembleJWT`, facts/externaljwt.md 2.5).
    pub fn signing_key(&self, version: u64) -> Result<(&str, Alg), String> {
        let key = self
            .keys
            .iter()
            .find(|k| k.version == Some(version) && k.vanished_at.is_none())
            .ok_or_else(|| format!("key version {version} is not in the published key set"))?;
        if key.exclude_from_oidc_discovery {
            return Err(format!(
                "key version {version} (kid {}) is served as excluded from OIDC discovery; refusing to sign with it",
                key.kid
            ));
        }
        Ok((&key.kid, key.alg))
    }

    /// Reads a persisted set, bounded in size, at `now` (Unix seconds). The file is a key source,
    /// so it must be this uid's with no access for others, and every key must be one kube-apiserver
    /// accepts under its own kid; times past `now` are brought back to `now`.
    pub fn load(path: &Path, now: u64) -> Result<Option<Self>, KeySetError> {
        use std::os::unix::fs::MetadataExt as _;
        let shown = || path.display().to_string();
        let invalid = |problem: String| KeySetError::Invalid { path: shown(), problem };
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(KeySetError::Io { path: shown(), action: "read", source }),
        };
        let uid = rustix::process::geteuid().as_raw();
        let mode = meta.mode() & 0o777;
        if meta.uid() != uid || mode & 0o077 != 0 {
            return Err(invalid(format!(
                "owned by uid {} with mode {mode:04o}; a key set file must be owned by uid {uid} (this \
                 process) with mode 0600, since any key in it is published",
                meta.uid()
            )));
        }
        let text = crate::files::read_text_capped(path, STATE_MAX_BYTES)
            .map_err(|source| KeySetError::Io { path: shown(), action: "read", source })?;
        let mut set: Self = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if set.format != FORMAT {
            return Err(invalid(format!("format {} is not {FORMAT}", set.format)));
        }
        for key in &mut set.keys {
            if crate::jwt::kid(&key.der) != key.kid {
                return Err(invalid(format!("kid {} does not match its key", key.kid)));
            }
            let info = crate::jwt::check_public_key(&key.der)
                .map_err(|e| invalid(format!("kid {}: {e}", key.kid)))?;
            if info.alg != key.alg {
                return Err(invalid(format!("kid {} is a {} key, not {}", key.kid, info.alg, key.alg)));
            }
            // NB: a time in the future would keep a vanished kid forever.
            key.vanished_at = key.vanished_at.map(|at| at.min(now));
        }
        set.data_timestamp = set.data_timestamp.min(now).min(TIMESTAMP_MAX_SECONDS);
        Ok(Some(set))
    }

    /// Writes the set atomically, mode 0600: a crash leaves the old file or the new one.
    pub fn save(&self, path: &Path) -> Result<(), KeySetError> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let io = |action, source| KeySetError::Io { path: path.display().to_string(), action, source };
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| KeySetError::Invalid { path: path.display().to_string(), problem: e.to_string() })?;
        // NB: never write what `load` would refuse to read back.
        if json.len() as u64 > STATE_MAX_BYTES {
            return Err(KeySetError::Invalid {
                path: path.display().to_string(),
                problem: format!(
                    "the key set is {} bytes, over the limit of {STATE_MAX_BYTES}; not written",
                    json.len()
                ),
            });
        }
        let tmp = path.with_file_name(format!(
            ".{}.{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("signer-keys"),
            std::process::id()
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io("create", e))?;
        let written = file.write_all(&json).and_then(|()| file.sync_all());
        drop(file);
        if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("write", e));
        }
        Ok(())
    }
}

/// What changed between two sets, for logs.
pub fn kids(set: &KeySet) -> Vec<&str> {
    set.keys.iter().map(|k| k.kid.as_str()).collect()
}

/// The set to serve after a successful key store read at `now` (Unix seconds):
/// - every version from `min_decryption_version` to the latest, never excluded;
/// - the verify-only keys, each with its own exclude flag;
/// - one entry per kid, excluded only if every copy says so (kube-apiserver rejects a token whose
///   kid has any excluded entry, so a signing key must never be shadowed by an excluded copy);
/// - a key of the previous set that the key store no longer lists although its version is not
///   below `min_decryption_version` (a recreated key, a Vault restored from an old snapshot) stays
///   for `keep_vanished` after it vanished, so the tokens it signed keep verifying: no silent drop.
///   A version below `min_decryption_version` leaves at once: that is how a key is retired.
pub fn publish(
    previous: Option<&KeySet>,
    meta: &SigningKeyMetadata,
    verify_only: &[(PublicKey, bool)],
    now: u64,
    keep_vanished: Duration,
) -> KeySet {
    let floor = meta.key.min_decryption_version;
    let mut keys: BTreeMap<String, ServedKey> = BTreeMap::new();
    let mut add = |key: ServedKey| match keys.get_mut(&key.kid) {
        Some(existing) => {
            existing.exclude_from_oidc_discovery &= key.exclude_from_oidc_discovery;
            if existing.version.is_none() {
                existing.version = key.version;
            }
        }
        None => {
            keys.insert(key.kid.clone(), key);
        }
    };
    for (version, public) in meta.public_keys.range(floor..) {
        if *version > meta.key.latest {
            continue;
        }
        add(served(public, false, Some(*version)));
    }
    for (public, exclude) in verify_only {
        add(served(public, *exclude, None));
    }
    if let Some(previous) = previous {
        for old in &previous.keys {
            if keys.contains_key(&old.kid) {
                continue;
            }
            let Some(version) = old.version else {
                // NB: a verify-only key the operator removed from the config leaves with it.
                continue;
            };
            if version < floor {
                continue;
            }
            let since = old.vanished_at.unwrap_or(now);
            if now.saturating_sub(since) > keep_vanished.as_secs() {
                continue;
            }
            keys.insert(old.kid.clone(), ServedKey { vanished_at: Some(since), ..old.clone() });
        }
    }
    let mut vanished: Vec<(u64, String)> =
        keys.values().filter_map(|k| Some((k.vanished_at?, k.kid.clone()))).collect();
    if vanished.len() > VANISHED_MAX {
        vanished.sort();
        for (at, kid) in &vanished[..vanished.len() - VANISHED_MAX] {
            tracing::warn!(
                kid,
                vanished_at = at,
                max = VANISHED_MAX,
                "too many vanished kids; no longer serving the oldest, whose tokens stop verifying"
            );
            keys.remove(kid);
        }
    }
    KeySet { format: FORMAT, data_timestamp: now, keys: keys.into_values().collect() }
}

fn served(public: &PublicKey, exclude: bool, version: Option<u64>) -> ServedKey {
    ServedKey {
        kid: public.kid(),
        alg: public.alg,
        der: public.der.clone(),
        exclude_from_oidc_discovery: exclude,
        version,
        vanished_at: None,
    }
}

mod alg_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::jwt::Alg;

    pub fn serialize<S: Serializer>(alg: &Alg, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(alg.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Alg, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

mod der_base64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::STANDARD;

    pub fn serialize<S: Serializer>(der: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(der))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        STANDARD.decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::backend::KeyMetadata;

    /// A real P-256 public key per `n`, the same for the same `n`, since `load` judges keys.
    fn key(n: u8) -> PublicKey {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        use spki::der::{
            Encode as _,
            asn1::{AnyRef, BitStringRef, ObjectIdentifier},
        };
        static KEYS: std::sync::Mutex<BTreeMap<u8, PublicKey>> = std::sync::Mutex::new(BTreeMap::new());
        let mut keys = KEYS.lock().unwrap();
        keys.entry(n)
            .or_insert_with(|| {
                let random = ring::rand::SystemRandom::new();
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random).unwrap();
                let pair =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &random)
                        .unwrap();
                let curve = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
                let der = spki::SubjectPublicKeyInfoRef {
                    algorithm: spki::AlgorithmIdentifierRef {
                        oid: ObjectIdentifier::new_unwrap("1.2.840.10045.2.1"),
                        parameters: Some(AnyRef::from(&curve)),
                    },
                    subject_public_key: BitStringRef::from_bytes(pair.public_key().as_ref()).unwrap(),
                }
                .to_der()
                .unwrap();
                PublicKey { alg: Alg::Es256, der }
            })
            .clone()
    }

    fn meta(versions: &[u64], floor: u64) -> SigningKeyMetadata {
        let latest = versions.iter().copied().max().unwrap_or(0);
        SigningKeyMetadata {
            key: KeyMetadata {
                versions: versions.iter().map(|v| (*v, 1000 + v)).collect(),
                latest,
                min_decryption_version: floor,
                min_encryption_version: 0,
            },
            public_keys: versions.iter().map(|v| (*v, key(*v as u8))).collect(),
        }
    }

    const KEEP: Duration = Duration::from_secs(1000);
    const NOW: u64 = 1_000_000;

    #[test]
    fn publishes_every_version_from_the_floor_to_the_latest() {
        let set = publish(None, &meta(&[1, 2, 3], 2), &[], 50, KEEP);
        let versions: Vec<_> = set.keys.iter().map(|k| k.version).collect();
        assert_eq!(set.keys.len(), 2);
        assert!(versions.contains(&Some(2)) && versions.contains(&Some(3)));
        assert!(set.keys.iter().all(|k| !k.exclude_from_oidc_discovery));
        assert_eq!(set.data_timestamp, 50);
    }

    #[test]
    fn a_duplicate_kid_is_served_once_and_excluded_only_if_every_copy_says_so() {
        let legacy = key(9);
        // The same verify-only key twice, once excluded and once not: served once, not excluded.
        let set = publish(None, &meta(&[1], 1), &[(legacy.clone(), true), (legacy.clone(), false)], 5, KEEP);
        let copies: Vec<_> = set.keys.iter().filter(|k| k.kid == legacy.kid()).collect();
        assert_eq!(copies.len(), 1);
        assert!(!copies[0].exclude_from_oidc_discovery);
        // The signing key listed again as an excluded verify-only key: still not excluded, so
        // Sign may use it.
        let set = publish(None, &meta(&[1], 1), &[(key(1), true)], 5, KEEP);
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.signing_key(1).unwrap().0, key(1).kid());
        // Only excluded copies: excluded.
        let set = publish(None, &meta(&[1], 1), &[(legacy.clone(), true), (legacy.clone(), true)], 5, KEEP);
        assert!(set.keys.iter().find(|k| k.kid == legacy.kid()).unwrap().exclude_from_oidc_discovery);
    }

    #[test]
    fn never_signs_with_an_excluded_or_vanished_kid() {
        let mut set = publish(None, &meta(&[1], 1), &[], 5, KEEP);
        set.keys[0].exclude_from_oidc_discovery = true;
        assert!(set.signing_key(1).unwrap_err().contains("excluded"));
        set.keys[0].exclude_from_oidc_discovery = false;
        set.keys[0].vanished_at = Some(5);
        assert!(set.signing_key(1).is_err());
    }

    #[test]
    fn a_kid_leaves_at_once_only_when_the_floor_rises_above_it() {
        let first = publish(None, &meta(&[1, 2], 1), &[], 10, KEEP);
        let retired = publish(Some(&first), &meta(&[2], 2), &[], 20, KEEP);
        assert_eq!(kids(&retired), vec![key(2).kid().as_str()]);
        assert!(retired.vanished().is_empty());
    }

    #[test]
    fn a_vanished_kid_stays_for_the_token_lifetime_then_leaves() {
        let first = publish(None, &meta(&[1, 2], 1), &[], 10, KEEP);
        // Restored from an old snapshot: version 2 is gone though the floor is still 1.
        let restored = publish(Some(&first), &meta(&[1], 1), &[], 20, KEEP);
        assert_eq!(restored.keys.len(), 2);
        let vanished = restored.vanished();
        assert_eq!(vanished.len(), 1);
        assert_eq!((vanished[0].kid.as_str(), vanished[0].vanished_at), (key(2).kid().as_str(), Some(20)));
        // Kept, with the first time it vanished, until KEEP has passed since then.
        let later = publish(Some(&restored), &meta(&[1], 1), &[], 20 + KEEP.as_secs(), KEEP);
        assert_eq!(later.vanished()[0].vanished_at, Some(20));
        let gone = publish(Some(&later), &meta(&[1], 1), &[], 21 + KEEP.as_secs(), KEEP);
        assert_eq!(gone.keys.len(), 1);
        // A recreated key: version 2 comes back with another public key; both kids are served.
        let mut recreated = meta(&[1, 2], 1);
        recreated.public_keys.insert(2, key(77));
        let both = publish(Some(&first), &recreated, &[], 30, KEEP);
        assert_eq!(both.keys.len(), 3);
        assert_eq!(both.signing_key(2).unwrap().0, key(77).kid());
    }

    #[test]
    fn persists_atomically_with_mode_0600_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        assert_eq!(KeySet::load(&path, NOW).unwrap(), None);
        let set = publish(None, &meta(&[1, 2], 1), &[(key(9), true)], 42, KEEP);
        set.save(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(KeySet::load(&path, NOW).unwrap(), Some(set));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        // A tampered kid is refused, naming the problem.
        let text = std::fs::read_to_string(&path).unwrap().replacen(&key(1).kid(), "forged", 1);
        std::fs::write(&path, text).unwrap();
        assert!(KeySet::load(&path, NOW).unwrap_err().to_string().contains("does not match"));
        // An oversized file is refused, never read whole.
        std::fs::write(&path, vec![b' '; STATE_MAX_BYTES as usize + 1]).unwrap();
        assert!(KeySet::load(&path, NOW).is_err());
    }

    #[test]
    fn a_tampered_or_foreign_file_is_refused_and_times_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let mut set = publish(None, &meta(&[1, 2], 1), &[], 42, KEEP);
        // A vanished_at in the future would keep the kid forever; a data_timestamp past year 9999
        // fails kube-apiserver's CheckValid.
        set.keys[0].vanished_at = Some(u64::MAX);
        set.data_timestamp = u64::MAX;
        set.save(&path).unwrap();
        let loaded = KeySet::load(&path, NOW).unwrap().unwrap();
        assert_eq!(loaded.keys[0].vanished_at, Some(NOW));
        assert_eq!(loaded.data_timestamp, NOW);
        // Readable by others: refused, naming the mode.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = KeySet::load(&path, NOW).unwrap_err().to_string();
        assert!(err.contains("0644") && err.contains("0600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A key kube-apiserver would refuse, under its own kid: refused.
        let mut bad = set.clone();
        let last = bad.keys[0].der.len() - 1;
        bad.keys[0].der[last] ^= 1;
        bad.keys[0].kid = crate::jwt::kid(&bad.keys[0].der);
        bad.save(&path).unwrap();
        let err = KeySet::load(&path, NOW).unwrap_err().to_string();
        assert!(err.contains("P-256"), "{err}");
    }

    #[test]
    fn vanished_kids_are_capped_and_save_never_writes_past_the_read_cap() {
        let versions: Vec<u64> = (1..=(VANISHED_MAX as u64 + 2)).collect();
        let first = publish(None, &meta(&versions, 1), &[], 10, KEEP);
        // All but the last vanish, at different times: only the newest VANISHED_MAX stay.
        let last = *versions.last().unwrap();
        let mut set = first.clone();
        // NB: the keys are ordered by kid, which is random, so the one that stays is skipped by
        // version; marking it too made it the oldest "vanished" kid in one run of ~66.
        for (i, k) in set.keys.iter_mut().filter(|k| k.version != Some(last)).enumerate() {
            k.vanished_at = Some(10 + i as u64);
        }
        let mut only_last = meta(&[last], 1);
        only_last.public_keys.insert(last, key(last as u8));
        let kept = publish(Some(&set), &only_last, &[], 20, KEEP);
        assert_eq!(kept.vanished().len(), VANISHED_MAX);
        let oldest =
            set.keys.iter().filter(|k| k.vanished_at.is_some()).min_by_key(|k| k.vanished_at).unwrap();
        assert!(!kept.keys.iter().any(|k| k.kid == oldest.kid));
        // A set too large to read back is not written.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let mut huge = first;
        huge.keys[0].kid = "k".repeat(STATE_MAX_BYTES as usize);
        assert!(huge.save(&path).unwrap_err().to_string().contains("not written"));
        assert!(!path.exists());
    }
}
