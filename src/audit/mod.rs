//! `kmsgate audit`: reads etcd (read-only) page by page at one revision and reports how every
//! stored value is encrypted, streaming each finding and keeping only counts in memory.

pub mod deep;

use std::{borrow::Cow, collections::BTreeMap, io::Write};

use serde::Serialize;
use serde_json::json;

use crate::{
    etcd::{Pages, ScanError, Scanner},
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
    /// Values in the first etcd request, and in every one when `page_bytes` is 0.
    pub page_size: usize,
    /// The response size later requests aim for (sized from the values already read); bounds
    /// memory. 0: every request asks for `page_size` values.
    pub page_bytes: usize,
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
    /// The key_id KMS v2 values were compared against; `None`: staleness was not checked.
    pub current_key_id: Option<String>,
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
    /// Names longer than [`MAX_NAME_BYTES`] are cut (and end in `…`); at most [`MAX_ENTRIES`]
    /// rows are kept, so memory stays bounded whatever etcd holds.
    pub classes: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>,
    /// Values counted by class alone, because `classes` already held [`MAX_ENTRIES`] rows.
    pub other: BTreeMap<String, u64>,
    /// The rows in `classes`.
    #[serde(skip)]
    rows: usize,
}

/// The longest provider, key or key_id name the summary keeps: the longest key_id the API server
/// accepts, so a real key_id is never cut.
pub const MAX_NAME_BYTES: usize = crate::storage::KEY_ID_MAX_BYTES;

/// The most (class, provider, key_id) rows the summary keeps; the rest count as "other".
pub const MAX_ENTRIES: usize = 256;

impl Summary {
    /// Counts one value, cutting its names and folding it into "other" once the table is full.
    fn count(&mut self, class: &str, provider: &str, key_id: &str) {
        let (provider, key_id) = (cut(provider), cut(key_id));
        let row = self
            .classes
            .get_mut(class)
            .and_then(|providers| providers.get_mut(provider.as_ref()))
            .and_then(|key_ids| key_ids.get_mut(key_id.as_ref()));
        if let Some(count) = row {
            *count += 1;
            return;
        }
        if self.rows >= MAX_ENTRIES {
            *self.other.entry(class.to_owned()).or_default() += 1;
            return;
        }
        self.rows += 1;
        self.classes
            .entry(class.to_owned())
            .or_default()
            .entry(provider.into_owned())
            .or_default()
            .insert(key_id.into_owned(), 1);
    }
}

/// `name` cut to at most [`MAX_NAME_BYTES`] bytes on a character boundary, marked with `…`.
fn cut(name: &str) -> Cow<'_, str> {
    if name.len() <= MAX_NAME_BYTES {
        return Cow::Borrowed(name);
    }
    let mut end = MAX_NAME_BYTES - '…'.len_utf8();
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &name[..end]))
}

/// `text` safe to print on a terminal: control characters, line and paragraph separators and
/// bidirectional overrides become `\n`, `\u{1b}` and the like, and `\` becomes `\\`, so an etcd
/// key or provider name can neither forge a report line nor reach the terminal as a command.
pub fn escape_text(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| {
        c == '\\'
            || c.is_control()
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.contains(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Scans etcd and streams findings to `out`; returns the summary.
/// With `deep`, every KMS v2 object is also decrypted end to end.
pub async fn run(
    client: &mut crate::etcd::Client,
    options: &Options,
    mut deep: Option<&mut deep::Deep>,
    out: &mut impl Write,
) -> Result<Summary, ScanError> {
    let mut summary = Summary { current_key_id: options.current_key_id.clone(), ..Summary::default() };
    let started = std::time::Instant::now();
    let mut shown = started;
    for prefix in &options.prefixes {
        let scanner =
            Scanner::prefix(prefix.as_bytes(), options.page_size).with_page_bytes(options.page_bytes);
        let mut pages = Pages::new(scanner, client.clone());
        while let Some(page) = pages.next_page().await? {
            summary.revision = pages.revision();
            for kv in &page {
                observe(&mut summary, options, deep.as_deref_mut(), &kv.key, &kv.value, out).await;
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
    // NB: borrowed, not cloned: this runs once per stored value.
    let (provider, key_id) = match class {
        Class::KmsV2 { provider, key_id, .. } => (provider.as_str(), key_id.as_str()),
        Class::KmsV1 { provider } | Class::KmsV2Invalid { provider, .. } => (provider.as_str(), ""),
        Class::Aescbc { key } | Class::Aesgcm { key } | Class::Secretbox { key } => (key.as_str(), ""),
        _ => ("", ""),
    };
    summary.objects += 1;
    summary.count(class.name(), provider, key_id);
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
        writeln!(out, "{:<14} {}  {}", finding.name(), escape_text(&key), escape_text(&detail))
    };
}

/// How the summary table names the rows that did not fit.
const OTHER: &str = "(other)";

/// Writes the summary: a table, or one JSON line `{"type": "summary", ...}`.
pub fn write_summary(summary: &Summary, json: bool, out: &mut impl Write) -> std::io::Result<()> {
    if json {
        let mut value = serde_json::to_value(summary).map_err(std::io::Error::other)?;
        value["type"] = json!("summary");
        return writeln!(out, "{value}");
    }
    writeln!(out, "\nsnapshot at etcd revision {}: {} objects", summary.revision, summary.objects)?;
    match &summary.current_key_id {
        Some(key_id) => {
            writeln!(out, "current key_id: {} (KMS v2 values on another are stale)", escape_text(key_id))?
        }
        None => writeln!(
            out,
            "staleness NOT checked: KMS v2 values on an old key_id are not flagged; pass --key-id or \
             --plugin-socket to check"
        )?,
    }
    if summary.skipped > 0 {
        writeln!(out, "{} values of other providers skipped", summary.skipped)?;
    }
    writeln!(out, "{:<20} {:<20} {:>8}  key_id", "class", "provider/key", "count")?;
    for (class, providers) in &summary.classes {
        for (provider, key_ids) in providers {
            for (key_id, count) in key_ids {
                let (provider, key_id) = (escape_text(provider), escape_text(key_id));
                writeln!(out, "{class:<20} {provider:<20} {count:>8}  {key_id}")?;
            }
        }
    }
    for (class, count) in &summary.other {
        writeln!(out, "{class:<20} {OTHER:<20} {count:>8}")?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{DekSourceType, EncryptedObject};

    fn options(json: bool) -> Options {
        Options {
            prefixes: vec!["/registry/".into()],
            provider: None,
            current_key_id: Some("kmsgate:1:local:k:::kmsgate:1:1".into()),
            page_size: 10,
            page_bytes: 0,
            json,
            progress: false,
        }
    }

    fn kms_v2(provider: &str, key_id: &str) -> Vec<u8> {
        EncryptedObject {
            encrypted_data: vec![1; 40],
            key_id: key_id.into(),
            encrypted_dek_source: b"local:v1:abc".to_vec(),
            annotations: Default::default(),
            dek_source_type: DekSourceType::HkdfSha256XnonceAesGcmSeed,
        }
        .to_value(provider)
    }

    /// Runs `observe` over `values` and returns the summary and the report.
    fn scan(options: &Options, values: &[(Vec<u8>, Vec<u8>)]) -> (Summary, String) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut summary = Summary { current_key_id: options.current_key_id.clone(), ..Summary::default() };
        let mut out = Vec::new();
        runtime.block_on(async {
            for (key, value) in values {
                observe(&mut summary, options, None, key, value, &mut out).await;
            }
        });
        write_summary(&summary, options.json, &mut out).unwrap();
        (summary, String::from_utf8(out).unwrap())
    }

    /// The bytes the summary keeps in names: what bounds its memory.
    fn kept_bytes(summary: &Summary) -> usize {
        summary
            .classes
            .iter()
            .flat_map(|(class, providers)| {
                providers.iter().flat_map(move |(provider, key_ids)| {
                    key_ids.keys().map(move |key_id| class.len() + provider.len() + key_id.len())
                })
            })
            .sum()
    }

    #[test]
    fn huge_provider_names_are_cut_in_the_summary() {
        let values: Vec<_> = (0..60)
            .map(|n| {
                let provider = format!("{n}{}", "p".repeat(1 << 20));
                (format!("/registry/secrets/ns/s{n}").into_bytes(), kms_v2(&provider, "kid"))
            })
            .collect();
        let (summary, _) = scan(&options(true), &values);
        assert_eq!(summary.objects, 60);
        assert!(kept_bytes(&summary) <= 60 * 2 * MAX_NAME_BYTES, "{} bytes kept", kept_bytes(&summary));
        let counted: u64 = summary.classes["kms_v2"].values().flat_map(|k| k.values()).sum();
        assert_eq!(counted, 60, "every value is still counted");
    }

    #[test]
    fn many_distinct_names_fold_into_other() {
        let values: Vec<_> = (0..MAX_ENTRIES * 3)
            .map(|n| (format!("/registry/secrets/ns/s{n}").into_bytes(), kms_v2(&format!("p{n}"), "kid")))
            .collect();
        let (summary, report) = scan(&options(false), &values);
        let entries: usize = summary.classes.values().flat_map(|p| p.values()).map(BTreeMap::len).sum();
        assert!(entries <= MAX_ENTRIES, "{entries} entries kept");
        let counted: u64 = summary.classes.values().flat_map(|p| p.values()).flat_map(|k| k.values()).sum();
        assert_eq!(counted + summary.other.values().sum::<u64>(), (MAX_ENTRIES * 3) as u64);
        assert_eq!(summary.other["kms_v2"], (MAX_ENTRIES * 2) as u64);
        let row = format!("{:<20} {:<20} {:>8}", "kms_v2", "(other)", MAX_ENTRIES * 2);
        assert!(report.contains(&row), "{report}");
    }

    #[test]
    fn text_output_escapes_control_bytes() {
        let forged = b"/registry/secrets/ns/a\nplaintext      /registry/secrets/ns/forged  \x1b[2J".to_vec();
        let provider = "p\nplaintext      /registry/x\x1b]0;owned\x07";
        let values = vec![
            (forged.clone(), b"k8s\x00x".to_vec()),
            (b"/registry/secrets/ns/b".to_vec(), kms_v2(provider, "kmsgate:1:local:k:::kmsgate:2:2")),
            (b"/registry/secrets/ns/c".to_vec(), b"k8s:enc:kms:v2:q\r\x1b[1A:\xff".to_vec()),
        ];
        let (summary, report) = scan(&options(false), &values);
        assert_eq!(summary.objects, 3);
        assert!(!report.contains('\x1b') && !report.contains('\r') && !report.contains('\x07'), "{report:?}");
        let findings: Vec<&str> = report.lines().filter(|l| l.starts_with("plaintext ")).collect();
        assert_eq!(findings.len(), 1, "one plaintext value, one line: {report}");
        assert!(findings[0].contains(r"/registry/secrets/ns/a\nplaintext"), "{report}");
        assert_eq!(report.lines().filter(|l| l.starts_with("findings: ")).count(), 3, "{report}");
        assert!(report.contains(r"p\nplaintext      /registry/x\u{1b}]0;owned\u{7}"), "{report}");

        // JSON keeps the exact bytes (as JSON escapes).
        let (_, json) = scan(&options(true), &values);
        let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
        assert_eq!(first["key"].as_str().unwrap().as_bytes(), forged);
    }

    #[test]
    fn escaping_is_unambiguous() {
        assert_eq!(escape_text("plain/name-1"), "plain/name-1");
        assert_eq!(escape_text("a\\nb"), r"a\\nb");
        assert_eq!(
            escape_text("a\nb\t\r\x00\x7f\u{85}\u{202e}\u{2028}"),
            r"a\nb\t\r\u{0}\u{7f}\u{85}\u{202e}\u{2028}"
        );
    }
}
