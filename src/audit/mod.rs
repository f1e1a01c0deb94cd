//! `kmsgate audit`: reads etcd (read-only) page by page at one revision and reports how every
//! stored value is encrypted, streaming each finding and keeping only counts in memory.

pub mod deep;

use std::{collections::BTreeMap, io::Write};

use serde::Serialize;
use serde_json::json;

use crate::{
    etcd::{ScanError, Scanner},
    storage::{Class, Current, Judge, Standing},
};

/// The kinds of finding that can fail the audit (`--fail-on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finding {
    /// Stored unencrypted.
    Plaintext,
    /// Encrypted, but not by KMS v2 under the current key_id.
    Stale,
    /// A KMS v2 value the API server would refuse or could not decrypt.
    Undecryptable,
    /// Not a value the API server writes.
    Unknown,
}

impl Finding {
    /// Parses a `--fail-on` name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "plaintext" => Self::Plaintext,
            "stale" => Self::Stale,
            "undecryptable" => Self::Undecryptable,
            "unknown" => Self::Unknown,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Stale => "stale",
            Self::Undecryptable => "undecryptable",
            Self::Unknown => "unknown",
        }
    }
}

/// What to scan and how to judge it.
#[derive(Debug, Clone)]
pub struct Options {
    /// Key prefixes to scan, e.g. `/registry/secrets/`.
    pub prefixes: Vec<String>,
    /// Only values written by this KMS v2 provider (any resource).
    pub provider: Option<String>,
    /// The key_id values should be on; `None` disables stale detection for KMS v2.
    pub current_key_id: Option<String>,
    /// Values per etcd request; bounds memory.
    pub page_size: usize,
    /// JSON lines instead of text.
    pub json: bool,
    /// A progress line with the rate on stderr (the CLI sets it when stderr is a terminal).
    pub progress: bool,
}

/// Counts, by class, provider and key_id; no object lists are kept.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// The pinned etcd revision of the snapshot.
    pub revision: i64,
    /// Values read.
    pub objects: u64,
    /// Values of other providers skipped under `--provider`.
    pub skipped: u64,
    /// Findings by kind.
    pub findings: BTreeMap<Finding, u64>,
    /// KMS v2 objects decrypted end to end by `--deep`.
    pub deep_verified: u64,
    /// Plugin Decrypt calls `--deep` made (one per distinct DEK source).
    pub deep_decrypt_calls: u64,
    /// Counts by `class`, then provider (or key name), then key_id.
    pub classes: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>,
}

/// Scans etcd and streams findings to `out`; returns the summary.
/// With `deep`, every KMS v2 object is also decrypted end to end.
pub async fn run(
    client: &mut etcd_client::Client,
    options: &Options,
    mut deep: Option<&mut deep::Deep>,
    out: &mut impl Write,
) -> Result<Summary, ScanError> {
    let mut summary = Summary::default();
    let started = std::time::Instant::now();
    let mut shown = started;
    for prefix in &options.prefixes {
        let mut scanner = Scanner::prefix(prefix.as_bytes(), options.page_size);
        while let Some(page) = scanner.next_page(client).await? {
            summary.revision = scanner.revision();
            for kv in &page {
                observe(&mut summary, options, deep.as_deref_mut(), kv.key(), kv.value(), out).await;
            }
            if options.progress && shown.elapsed() >= std::time::Duration::from_millis(250) {
                shown = std::time::Instant::now();
                let seen = summary.objects + summary.skipped;
                let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-3);
                eprint!("\rscanned {seen} values ({rate:.0}/s) at revision {}   ", summary.revision);
            }
        }
    }
    if options.progress {
        eprintln!(
            "\rscanned {} values in {:.1}s            ",
            summary.objects + summary.skipped,
            started.elapsed().as_secs_f64()
        );
    }
    if let Some(deep) = deep {
        summary.deep_decrypt_calls = deep.decrypt_calls() as u64;
    }
    Ok(summary)
}

async fn observe(
    summary: &mut Summary,
    options: &Options,
    deep: Option<&mut deep::Deep>,
    key: &[u8],
    value: &[u8],
    out: &mut impl Write,
) {
    let judge = Judge {
        provider: options.provider.as_deref(),
        current: options.current_key_id.as_deref().map_or(Current::Any, Current::KeyId),
    };
    let judgement = judge.judge(value);
    let class = &judgement.class;
    if options.provider.is_some() && judgement.standing == Standing::Other {
        summary.skipped += 1;
        return;
    }
    let provider = match class {
        Class::KmsV1 { provider } | Class::KmsV2 { provider, .. } | Class::KmsV2Invalid { provider, .. } => {
            provider.clone()
        }
        Class::Aescbc { key } | Class::Aesgcm { key } | Class::Secretbox { key } => key.clone(),
        _ => String::new(),
    };
    summary.objects += 1;
    let key_id = match class {
        Class::KmsV2 { key_id, .. } => key_id.clone(),
        _ => String::new(),
    };
    *summary
        .classes
        .entry(class.name().to_owned())
        .or_default()
        .entry(provider)
        .or_default()
        .entry(key_id.clone())
        .or_default() += 1;
    let verified = match (deep, &judgement.object) {
        (Some(deep), Some(object)) => Some(deep.check(key, object).await),
        _ => None,
    };
    if let Some(Ok(())) = verified {
        summary.deep_verified += 1;
    }
    let finding = match (judgement.standing, class) {
        _ if matches!(verified, Some(Err(_))) => Some((
            Finding::Undecryptable,
            verified.and_then(Result::err).map(|e| e.to_string()).unwrap_or_default(),
        )),
        (Standing::Current, _) => None,
        (Standing::Stale, _) => Some((Finding::Stale, format!("key_id {key_id}"))),
        (Standing::Invalid, Class::KmsV2Invalid { reason, .. }) => {
            Some((Finding::Undecryptable, reason.clone()))
        }
        (_, c) if c.is_plaintext() => Some((Finding::Plaintext, String::new())),
        (_, Class::Unknown { reason }) => Some((Finding::Unknown, reason.clone())),
        (_, other) => Some((Finding::Stale, format!("encrypted with {}", other.name()))),
    };
    let Some((finding, detail)) = finding else { return };
    *summary.findings.entry(finding).or_default() += 1;
    let key = String::from_utf8_lossy(key);
    // NB: a broken pipe on the report is the reader's choice; the counts still decide the exit.
    let _ = if options.json {
        writeln!(
            out,
            "{}",
            json!({"type": "finding", "finding": finding, "key": key, "class": class, "detail": detail})
        )
    } else {
        writeln!(out, "{:<14} {key}  {detail}", finding.name())
    };
}

/// Writes the summary: a table, or one JSON line `{"type": "summary", ...}`.
pub fn write_summary(summary: &Summary, json: bool, out: &mut impl Write) -> std::io::Result<()> {
    if json {
        let mut value = serde_json::to_value(summary).map_err(std::io::Error::other)?;
        value["type"] = json!("summary");
        return writeln!(out, "{value}");
    }
    writeln!(out, "\nsnapshot at etcd revision {}: {} objects", summary.revision, summary.objects)?;
    if summary.skipped > 0 {
        writeln!(out, "{} values of other providers skipped", summary.skipped)?;
    }
    writeln!(out, "{:<20} {:<20} {:>8}  key_id", "class", "provider/key", "count")?;
    for (class, providers) in &summary.classes {
        for (provider, key_ids) in providers {
            for (key_id, count) in key_ids {
                writeln!(out, "{class:<20} {provider:<20} {count:>8}  {key_id}")?;
            }
        }
    }
    if summary.deep_verified > 0 || summary.deep_decrypt_calls > 0 {
        writeln!(
            out,
            "deep: {} KMS v2 objects decrypted end to end ({} plugin Decrypt calls)",
            summary.deep_verified, summary.deep_decrypt_calls
        )?;
    }
    for (finding, count) in &summary.findings {
        writeln!(out, "findings: {count} {}", finding.name())?;
    }
    Ok(())
}
