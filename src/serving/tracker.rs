//! The key-version tracker both servers share, kept apart from I/O so it can be tested with
//! injected observations and time. It knows nothing of Vault or the keyring: every key store feeds
//! it [`KeyMetadata`], and one set of rollback and recreated-key rules applies to both policies.
//!
//! The KMS plugin's policy (DESIGN.md, "key_id"):
//! - adopt the latest version at once at start;
//! - after that promote a newer version only once it was seen in `needed` consecutive polls,
//!   unless the promoted version became unusable (retired below a floor, trimmed, or removed from
//!   a keyring) and a usable newer one exists: then promote that one at once, so the API server
//!   moves to a new seed at its next Status instead of writing under a key that is going away;
//! - never adopt a lower version than the promoted one (a key store node that is behind);
//! - fail closed (a conflict, which Status reports as a gRPC error) only where writing would store
//!   data that can never be read back: no usable version exists, or the key was deleted or
//!   recreated (a version already seen now has another creation time). An outage or a refusal
//!   is not a conflict: the key_id stays, since the seeds wrapped under it can still be opened.
//!
//! The signer's policy ([`KeyTracker::signer`]), the same on every replica and after every restart
//! because it reads the key store alone:
//! - if `min_encryption_version` is set, sign with exactly that version;
//! - otherwise sign with the newest published version whose creation time is at least
//!   `publish_lead` old, so no replica signs with a key its peers (and their API servers) have not
//!   published yet; the latest is never adopted at start just because it is the latest;
//! - a key store reporting an older latest version than the signing one is a node that is behind
//!   (refused, as in the plugin); a recreated key fails closed.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use crate::{backend::KeyMetadata, keyid::KeyScope};

/// Most versions whose first-seen creation time is remembered; far above any real key's count,
/// and only bounds memory against a key store that invents versions.
const SEEN_MAX: usize = 100_000;

/// The key version Encrypt uses and Status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promoted {
    /// The key version.
    pub version: u64,
    /// Its creation time, Unix seconds.
    pub created: u64,
    /// Its key_id string.
    pub key_id: String,
}

/// What one metadata poll changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// The first version was adopted at start.
    Adopted { version: u64 },
    /// Writing with any version would store data that can never be read back; Status fails.
    Conflict { reason: String },
    /// A newer version was seen, but not yet often enough.
    Pending { version: u64, seen: u32, needed: u32 },
    /// A newer version was promoted.
    Promoted { from: u64, to: u64 },
    /// The promoted version became unusable, so a usable newer one was promoted at once.
    Replaced { from: u64, to: u64, why: String },
    /// The key store reported an older latest version; it was refused.
    RollbackRefused { promoted: u64, seen: u64 },
    /// Nothing changed.
    Unchanged,
}

/// How a tracker picks the version to promote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The KMS plugin's: the latest at start, then after `needed` consecutive sightings.
    Plugin {
        /// Consecutive polls that must see a new version.
        needed: u32,
    },
    /// The signer's: the pinned version, else the newest one at least `publish_lead` old.
    Signer {
        /// How old a version must be before it signs.
        publish_lead: Duration,
    },
}

/// Which key version is promoted, and which one is waiting.
#[derive(Debug)]
pub struct KeyTracker {
    scope: KeyScope,
    policy: Policy,
    needed: u32,
    promoted: Option<Arc<Promoted>>,
    candidate: Option<Candidate>,
    conflict: Option<String>,
    /// Each version's creation time when this process first saw it: a later poll that shows
    /// another one means the key was deleted and recreated under the same name.
    first_seen: BTreeMap<u64, u64>,
}

/// A newer version seen in consecutive polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The version.
    pub version: u64,
    /// Its creation time.
    pub created: u64,
    /// How many consecutive polls saw it.
    pub seen: u32,
}

impl KeyTracker {
    /// A tracker that promotes after `needed` consecutive sightings (at least 1).
    pub fn new(scope: KeyScope, needed: u32) -> Self {
        Self::with_policy(scope, Policy::Plugin { needed: needed.max(1) })
    }

    /// A tracker with the signer's policy (see the module doc).
    pub fn signer(scope: KeyScope, publish_lead: Duration) -> Self {
        Self::with_policy(scope, Policy::Signer { publish_lead })
    }

    fn with_policy(scope: KeyScope, policy: Policy) -> Self {
        let needed = match policy {
            Policy::Plugin { needed } => needed.max(1),
            Policy::Signer { .. } => 1,
        };
        Self {
            scope,
            policy,
            needed,
            promoted: None,
            candidate: None,
            conflict: None,
            first_seen: BTreeMap::new(),
        }
    }

    /// The promoted version, if any and if not in conflict.
    pub fn current(&self) -> Result<Arc<Promoted>, String> {
        if let Some(reason) = &self.conflict {
            return Err(reason.clone());
        }
        self.promoted.clone().ok_or_else(|| "no key version adopted yet".to_owned())
    }

    /// Why Status must answer an error rather than a key_id: writing would store data that can
    /// never be read back.
    pub fn conflict(&self) -> Option<&str> {
        self.conflict.as_deref()
    }

    /// The promoted version, even while in conflict (for reports).
    pub fn promoted(&self) -> Option<&Promoted> {
        self.promoted.as_deref()
    }

    /// The version waiting for promotion.
    pub fn candidate(&self) -> Option<Candidate> {
        self.candidate
    }

    /// The key_id string of `version` created at `created`.
    pub fn key_id(&self, version: u64, created: u64) -> String {
        self.scope.key_id(version, created).to_string()
    }

    /// Applies one successful metadata poll. With the signer's policy, time stands still at the
    /// Unix epoch here: use [`KeyTracker::observe_at`].
    pub fn observe(&mut self, meta: &KeyMetadata) -> Observation {
        self.observe_at(meta, 0)
    }

    /// Applies one successful metadata poll made at `now` (Unix seconds).
    pub fn observe_at(&mut self, meta: &KeyMetadata, now: u64) -> Observation {
        if let Policy::Signer { publish_lead } = self.policy {
            return self.observe_signer(meta, now, publish_lead);
        }
        let latest = meta.latest;
        let Some(latest_created) = meta.latest_created() else {
            let reason = format!("key store lists latest version {latest} without a creation time");
            return self.fail_closed(reason);
        };
        if let Some(reason) = self.recreated(meta) {
            return self.fail_closed(reason);
        }
        self.remember(meta);
        let Some(promoted) = self.promoted.clone() else {
            self.promote(latest, latest_created);
            return Observation::Adopted { version: latest };
        };
        let present = meta.versions.get(&promoted.version) == Some(&promoted.created);
        if !present && latest < promoted.version && self.scope.kind.has_lagging_replicas() {
            // NB: a node or replica that is behind; it may lack the promoted version entirely.
            self.candidate = None;
            return Observation::RollbackRefused { promoted: promoted.version, seen: latest };
        }
        if let Some(why) = unusable(meta, promoted.version, present) {
            return match usable_newer(meta, promoted.version) {
                Some((to, created)) => {
                    self.promote(to, created);
                    Observation::Replaced { from: promoted.version, to, why }
                }
                None => self.fail_closed(format!(
                    "key version {} {why}, and the key store has no newer usable version: writing would \
                     store data that can never be read back",
                    promoted.version
                )),
            };
        }
        self.conflict = None;
        if latest <= promoted.version {
            // NB: below the promoted version only for a key store that cannot lag and still
            // holds the promoted version: nothing newer to wait for.
            self.candidate = None;
            return if latest == promoted.version {
                Observation::Unchanged
            } else {
                Observation::RollbackRefused { promoted: promoted.version, seen: latest }
            };
        }
        let seen = match self.candidate {
            Some(c) if c.version == latest && c.created == latest_created => c.seen + 1,
            _ => 1,
        };
        if seen >= self.needed {
            self.promote(latest, latest_created);
            return Observation::Promoted { from: promoted.version, to: latest };
        }
        self.candidate = Some(Candidate { version: latest, created: latest_created, seen });
        Observation::Pending { version: latest, seen, needed: self.needed }
    }

    /// Applies a poll that found the key gone (not found, as opposed to unreachable or refused).
    /// Before adoption there is nothing to protect, so it stays an ordinary failed poll.
    pub fn observe_missing(&mut self, reason: &str) -> Option<Observation> {
        let promoted = self.promoted.as_ref()?;
        let reason = format!(
            "key version {} is gone: the key store no longer has the key ({reason}); writing would store \
             data that can never be read back",
            promoted.version
        );
        Some(self.fail_closed(reason))
    }

    fn observe_signer(&mut self, meta: &KeyMetadata, now: u64, lead: Duration) -> Observation {
        if let Some(reason) = self.recreated(meta) {
            return self.fail_closed(reason);
        }
        self.remember(meta);
        let promoted = self.promoted.clone();
        if let Some(p) = &promoted
            && meta.latest < p.version
            && self.scope.kind.has_lagging_replicas()
        {
            // NB: a node or replica that is behind; it may lack the signing version entirely.
            return Observation::RollbackRefused { promoted: p.version, seen: meta.latest };
        }
        let chosen = match signing_version(meta, now, lead) {
            Ok(chosen) => chosen,
            Err(reason) => return self.fail_closed(reason),
        };
        let Some((to, created)) = chosen else {
            return match promoted {
                // NB: before any version is old enough nothing signs; the latest is not adopted
                // just because it is the latest.
                None => {
                    self.conflict = None;
                    Observation::Unchanged
                }
                Some(p) => match unusable(meta, p.version, meta.versions.get(&p.version) == Some(&p.created))
                {
                    None => {
                        self.conflict = None;
                        Observation::Unchanged
                    }
                    Some(why) => self.fail_closed(format!(
                        "signing key version {} {why}, and no other version is old enough to sign",
                        p.version
                    )),
                },
            };
        };
        self.promote(to, created);
        match promoted {
            None => Observation::Adopted { version: to },
            Some(p) if p.version == to => Observation::Unchanged,
            Some(p) => Observation::Promoted { from: p.version, to },
        }
    }

    fn fail_closed(&mut self, reason: String) -> Observation {
        self.candidate = None;
        self.conflict = Some(reason.clone());
        Observation::Conflict { reason }
    }

    /// The first version this poll shows with another creation time than when first seen.
    fn recreated(&self, meta: &KeyMetadata) -> Option<String> {
        meta.versions.iter().find_map(|(version, created)| {
            let first = self.first_seen.get(version).filter(|first| *first != created)?;
            Some(format!(
                "key version {version} was created at {first} but the key store now says {created}: the key \
                 was deleted and recreated, so data wrapped under the old key can never be read back"
            ))
        })
    }

    fn remember(&mut self, meta: &KeyMetadata) {
        for (version, created) in &meta.versions {
            if self.first_seen.len() >= SEEN_MAX && !self.first_seen.contains_key(version) {
                // NB: keep the newest ones: those are the versions a recreation would collide with
                // next.
                self.first_seen.pop_first();
            }
            self.first_seen.entry(*version).or_insert(*created);
        }
    }

    fn promote(&mut self, version: u64, created: u64) {
        let key_id = self.key_id(version, created);
        self.promoted = Some(Arc::new(Promoted { version, created, key_id }));
        self.candidate = None;
        self.conflict = None;
    }
}

/// The signer's choice: the pinned version if `min_encryption_version` is set (an error if it is
/// not there to sign), else the newest version from `min_decryption_version` up whose creation
/// time is at least `lead` before `now`; `None` while no version is old enough.
pub fn signing_version(meta: &KeyMetadata, now: u64, lead: Duration) -> Result<Option<(u64, u64)>, String> {
    let pin = meta.min_encryption_version;
    if pin > 0 {
        return match meta.versions.get(&pin) {
            Some(created) if pin >= meta.min_decryption_version => Ok(Some((pin, *created))),
            Some(_) => Err(format!(
                "min_encryption_version {pin} is below min_decryption_version {}: it would sign tokens \
                 nobody can verify",
                meta.min_decryption_version
            )),
            None => {
                Err(format!("min_encryption_version pins version {pin}, which the key store does not list"))
            }
        };
    }
    Ok(meta
        .versions
        .range(meta.min_decryption_version..)
        .rev()
        .find(|(_, created)| created.saturating_add(lead.as_secs()) <= now)
        .map(|(version, created)| (*version, *created)))
}

/// Why `version` can no longer encrypt or decrypt, if it cannot.
fn unusable(meta: &KeyMetadata, version: u64, present: bool) -> Option<String> {
    if !present {
        return Some("no longer exists (trimmed, or removed from the keyring)".to_owned());
    }
    if version < meta.min_decryption_version {
        return Some(format!("is retired (min_decryption_version is {})", meta.min_decryption_version));
    }
    if version < meta.min_encryption_version {
        return Some(format!(
            "may no longer encrypt (min_encryption_version is {})",
            meta.min_encryption_version
        ));
    }
    None
}

/// The newest version above `promoted` that can encrypt and decrypt. Its creation time is
/// unchanged since first seen: [`KeyTracker::recreated`] already failed the poll otherwise.
fn usable_newer(meta: &KeyMetadata, promoted: u64) -> Option<(u64, u64)> {
    meta.versions
        .range(promoted.saturating_add(1)..)
        .rev()
        .find(|(version, _)| unusable(meta, **version, true).is_none())
        .map(|(version, created)| (*version, *created))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::keyid::BackendKind;

    fn scope() -> KeyScope {
        KeyScope {
            kind: BackendKind::Transit,
            identity: "v".into(),
            namespace: String::new(),
            mount: "transit".into(),
            key: "k".into(),
        }
    }

    fn meta(latest: u64) -> KeyMetadata {
        let versions: BTreeMap<u64, u64> = (1..=latest).map(|v| (v, 1000 + v)).collect();
        KeyMetadata { versions, latest, min_decryption_version: 1, min_encryption_version: 0 }
    }

    #[test]
    fn adopts_latest_at_once_at_start() {
        let mut t = KeyTracker::new(scope(), 2);
        assert!(t.current().is_err());
        assert_eq!(t.observe(&meta(3)), Observation::Adopted { version: 3 });
        let p = t.current().unwrap();
        assert_eq!(p.version, 3);
        assert_eq!(p.key_id, "kmsgate:1:transit:v::transit:k:3:1003");
    }

    #[test]
    fn promotes_only_after_consecutive_polls() {
        let mut t = KeyTracker::new(scope(), 2);
        t.observe(&meta(1));
        assert_eq!(t.observe(&meta(2)), Observation::Pending { version: 2, seen: 1, needed: 2 });
        assert_eq!(t.current().unwrap().version, 1);
        assert_eq!(t.observe(&meta(2)), Observation::Promoted { from: 1, to: 2 });
        assert_eq!(t.current().unwrap().version, 2);
        assert_eq!(t.candidate(), None);
    }

    #[test]
    fn flip_flop_never_promotes() {
        let mut t = KeyTracker::new(scope(), 2);
        t.observe(&meta(1));
        for _ in 0..5 {
            assert!(matches!(t.observe(&meta(2)), Observation::Pending { seen: 1, .. }));
            assert_eq!(t.observe(&meta(1)), Observation::Unchanged);
        }
        assert_eq!(t.current().unwrap().version, 1);
    }

    #[test]
    fn a_skipped_version_restarts_the_count() {
        let mut t = KeyTracker::new(scope(), 2);
        t.observe(&meta(1));
        t.observe(&meta(2));
        assert!(matches!(t.observe(&meta(3)), Observation::Pending { version: 3, seen: 1, .. }));
        assert_eq!(t.observe(&meta(3)), Observation::Promoted { from: 1, to: 3 });
    }

    #[test]
    fn rollback_is_refused_and_reported() {
        let mut t = KeyTracker::new(scope(), 1);
        t.observe(&meta(3));
        let mut old = meta(3);
        old.latest = 2;
        assert_eq!(t.observe(&old), Observation::RollbackRefused { promoted: 3, seen: 2 });
        assert_eq!(t.current().unwrap().version, 3);
        // A replica that is behind does not even have the promoted version: still a rollback.
        assert_eq!(t.observe(&meta(1)), Observation::RollbackRefused { promoted: 3, seen: 1 });
        assert_eq!(t.current().unwrap().version, 3);
    }

    #[test]
    fn recreated_key_is_a_conflict_not_a_reuse() {
        let mut t = KeyTracker::new(scope(), 1);
        t.observe(&meta(2));
        let before = t.current().unwrap().key_id.clone();
        let mut recreated = meta(2);
        recreated.versions.insert(2, 9999);
        assert!(matches!(t.observe(&recreated), Observation::Conflict { .. }));
        let err = t.current().unwrap_err();
        assert!(err.contains("recreated"), "{err}");
        // The same version number with another creation time never gets the old key_id.
        assert_ne!(t.key_id(2, 9999), before);
        // Back to the real key: the conflict clears.
        assert_eq!(t.observe(&meta(2)), Observation::Unchanged);
        assert!(t.current().is_ok());
    }

    fn local() -> KeyScope {
        KeyScope { kind: BackendKind::Local, mount: String::new(), ..scope() }
    }

    fn without(mut meta: KeyMetadata, version: u64) -> KeyMetadata {
        meta.versions.remove(&version);
        meta.latest = meta.versions.keys().next_back().copied().unwrap_or(0);
        meta
    }

    #[test]
    fn a_retired_promoted_version_is_replaced_at_once_by_a_usable_newer_one() {
        let mut t = KeyTracker::new(scope(), 3);
        t.observe(&meta(2));
        let mut retired = meta(3);
        retired.min_decryption_version = 3;
        let seen = t.observe(&retired);
        assert!(
            matches!(seen, Observation::Replaced { from: 2, to: 3, ref why } if why.contains("retired")),
            "{seen:?}"
        );
        assert_eq!(t.current().unwrap().version, 3);
        assert_eq!(t.conflict(), None);
    }

    #[test]
    fn a_retired_promoted_version_without_a_newer_one_fails_closed_until_one_exists() {
        let mut t = KeyTracker::new(scope(), 2);
        t.observe(&meta(2));
        let mut retired = meta(2);
        retired.min_decryption_version = 3;
        assert!(matches!(t.observe(&retired), Observation::Conflict { .. }));
        assert!(t.conflict().unwrap().contains("no newer usable version"), "{:?}", t.conflict());
        assert!(t.current().is_err());
        // The key_id is still known for reports, but Status must not serve it.
        assert_eq!(t.promoted().unwrap().version, 2);
        // A rotation resolves it at the next poll, without waiting for consecutive sightings.
        let mut rotated = meta(3);
        rotated.min_decryption_version = 3;
        assert!(matches!(t.observe(&rotated), Observation::Replaced { from: 2, to: 3, .. }));
        assert_eq!(t.conflict(), None);
    }

    #[test]
    fn lowering_the_floor_again_clears_the_conflict() {
        let mut t = KeyTracker::new(scope(), 2);
        t.observe(&meta(2));
        let mut retired = meta(2);
        retired.min_encryption_version = 3;
        assert!(matches!(t.observe(&retired), Observation::Conflict { .. }));
        assert_eq!(t.observe(&meta(2)), Observation::Unchanged);
        assert_eq!(t.current().unwrap().version, 2);
    }

    #[test]
    fn a_trimmed_promoted_version_is_replaced_at_once() {
        let mut t = KeyTracker::new(scope(), 2);
        t.observe(&meta(2));
        let mut trimmed = without(meta(4), 2);
        trimmed.versions.remove(&1);
        trimmed.min_decryption_version = 3;
        assert!(matches!(t.observe(&trimmed), Observation::Replaced { from: 2, to: 4, .. }));
    }

    #[test]
    fn a_newer_version_that_cannot_encrypt_is_not_a_replacement() {
        let mut t = KeyTracker::new(scope(), 2);
        t.observe(&meta(2));
        let mut floors = meta(3);
        floors.min_decryption_version = 4;
        assert!(matches!(t.observe(&floors), Observation::Conflict { .. }));
    }

    #[test]
    fn a_removed_keyring_version_is_replaced_or_fails_closed() {
        // Removed with a newer version present: promoted at once.
        let mut t = KeyTracker::new(local(), 2);
        t.observe(&meta(2));
        assert!(matches!(t.observe(&without(meta(3), 2)), Observation::Replaced { from: 2, to: 3, .. }));

        // Removed with nothing newer: a keyring file has no lagging replica, so this is not a
        // rollback but a conflict.
        let mut t = KeyTracker::new(local(), 2);
        t.observe(&meta(2));
        let seen = t.observe(&without(meta(2), 2));
        assert!(
            matches!(seen, Observation::Conflict { ref reason } if reason.contains("no longer exists")),
            "{seen:?}"
        );
        assert!(t.current().is_err());
    }

    #[test]
    fn a_recreated_key_with_fewer_versions_is_a_conflict_not_a_lagging_node() {
        let mut t = KeyTracker::new(scope(), 1);
        t.observe(&meta(3));
        let mut recreated = meta(1);
        recreated.versions.insert(1, 9999);
        let seen = t.observe(&recreated);
        assert!(
            matches!(seen, Observation::Conflict { ref reason } if reason.contains("deleted and recreated")),
            "{seen:?}"
        );
        // A later rotation of the new key does not hide it: version 1 still differs.
        let mut rotated = recreated.clone();
        rotated.versions.insert(4, 10_000);
        rotated.latest = 4;
        assert!(matches!(t.observe(&rotated), Observation::Conflict { .. }));
    }

    #[test]
    fn a_missing_key_fails_closed_only_once_adopted() {
        let mut t = KeyTracker::new(scope(), 1);
        assert_eq!(t.observe_missing("HTTP 404"), None);
        t.observe(&meta(1));
        assert!(matches!(t.observe_missing("HTTP 404"), Some(Observation::Conflict { .. })));
        assert!(t.conflict().unwrap().contains("HTTP 404"));
    }

    fn signer_meta(created: &[u64]) -> KeyMetadata {
        let versions: BTreeMap<u64, u64> =
            created.iter().enumerate().map(|(i, c)| (i as u64 + 1, *c)).collect();
        KeyMetadata {
            latest: versions.len() as u64,
            versions,
            min_decryption_version: 1,
            min_encryption_version: 0,
        }
    }

    const LEAD: Duration = Duration::from_secs(100);

    #[test]
    fn the_signer_never_adopts_a_young_latest_at_start() {
        let mut t = KeyTracker::signer(scope(), LEAD);
        // Version 2 was made 10 s ago: version 1 signs, though 2 is the latest.
        assert_eq!(t.observe_at(&signer_meta(&[1000, 1990]), 2000), Observation::Adopted { version: 1 });
        assert_eq!(t.current().unwrap().version, 1);
        // A key with only a young version: nothing signs yet, and that is not a conflict.
        let mut fresh = KeyTracker::signer(scope(), LEAD);
        assert_eq!(fresh.observe_at(&signer_meta(&[1990]), 2000), Observation::Unchanged);
        assert!(fresh.current().is_err());
        assert_eq!(fresh.conflict(), None);
        assert_eq!(fresh.observe_at(&signer_meta(&[1990]), 2090), Observation::Adopted { version: 1 });
    }

    #[test]
    fn the_signer_moves_to_a_new_version_once_it_is_publish_lead_old() {
        let mut t = KeyTracker::signer(scope(), LEAD);
        t.observe_at(&signer_meta(&[1000]), 2000);
        let rotated = signer_meta(&[1000, 2000]);
        assert_eq!(t.observe_at(&rotated, 2099), Observation::Unchanged);
        assert_eq!(t.current().unwrap().version, 1);
        assert_eq!(t.observe_at(&rotated, 2100), Observation::Promoted { from: 1, to: 2 });
        assert_eq!(t.current().unwrap().version, 2);
    }

    #[test]
    fn the_signer_signs_with_exactly_the_pinned_version() {
        let mut t = KeyTracker::signer(scope(), LEAD);
        let mut pinned = signer_meta(&[1000, 1500, 1999]);
        pinned.min_encryption_version = 3;
        // Pinned: version 3 signs at once, young or not.
        assert_eq!(t.observe_at(&pinned, 2000), Observation::Adopted { version: 3 });
        // Pinned lower while the latest stays: Vault alone decides, so every replica agrees.
        pinned.min_encryption_version = 2;
        assert_eq!(t.observe_at(&pinned, 2000), Observation::Promoted { from: 3, to: 2 });
        // A pin the key store does not list fails closed.
        pinned.min_encryption_version = 7;
        assert!(matches!(t.observe_at(&pinned, 2000), Observation::Conflict { .. }));
        assert!(t.current().is_err());
    }

    #[test]
    fn the_signer_refuses_a_lagging_node_and_a_recreated_key() {
        let mut t = KeyTracker::signer(scope(), LEAD);
        t.observe_at(&signer_meta(&[1000, 1100]), 5000);
        assert_eq!(t.current().unwrap().version, 2);
        assert_eq!(
            t.observe_at(&signer_meta(&[1000]), 5000),
            Observation::RollbackRefused { promoted: 2, seen: 1 }
        );
        assert_eq!(t.current().unwrap().version, 2);
        let seen = t.observe_at(&signer_meta(&[1000, 4000]), 5000);
        assert!(
            matches!(seen, Observation::Conflict { ref reason } if reason.contains("recreated")),
            "{seen:?}"
        );
        assert!(t.current().is_err());
    }

    #[test]
    fn the_signer_skips_retired_versions() {
        let mut t = KeyTracker::signer(scope(), LEAD);
        let mut retired = signer_meta(&[1000, 1100, 4990]);
        retired.min_decryption_version = 3;
        // Version 3 is young and 1, 2 are retired: nothing may sign.
        assert_eq!(t.observe_at(&retired, 5000), Observation::Unchanged);
        assert!(t.current().is_err());
        assert_eq!(signing_version(&retired, 5090, LEAD), Ok(Some((3, 4990))));
    }
}
