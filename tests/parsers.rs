//! Property tests for every parser of untrusted bytes: the key_id, the `EncryptedObject` decoder and
//! validator, the audit classifier, the keyring file, the TOML config, the ExternalJWTSigner claims
//! check and the verify-only key files. Each must never panic,
//! must keep its peak memory within [`bound`] of its input (measured by the counting allocator
//! below), and must round-trip where a round trip exists.
//!
//! `PROPTEST_CASES` raises the number of cases (e.g. 10000 for a long local run); the defaults keep
//! this binary to a few seconds in CI. The same parsers have `cargo fuzz` targets in fuzz/.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    collections::HashMap,
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD},
};
use kmsgate::{
    config::Config,
    jwt::{self, JwtError, keyfile},
    keyid::{BackendKind, KeyId, KeyScope},
    keyring::Keyring,
    storage::{Class, Current, DekSourceType, EncryptedObject, Judge, classify},
};
use proptest::prelude::*;

/// Counts the live heap bytes of each thread, and their high-water mark.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn grew(bytes: isize) {
    // NB: try_with, because the allocator also runs while a thread's locals are torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + bytes;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added,
// and they live in const-initialised thread-locals that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which System shares.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from System, with this layout.
        unsafe { System.dealloc(ptr, layout) };
        grew(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            grew(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most heap a parser may hold at once for `input` bytes: four times the input plus 64 KiB.
fn bound(input: usize) -> usize {
    4 * input + 64 * 1024
}

/// Runs `parse` and fails the case if its peak heap (including what it returns) exceeds
/// [`bound`] of `input` bytes.
fn bounded<T>(what: &str, input: usize, parse: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    bounded_by(what, bound(input), input, parse)
}

/// [`bounded`] with an explicit `limit` in bytes.
fn bounded_by<T>(
    what: &str,
    limit: usize,
    input: usize,
    parse: impl FnOnce() -> T,
) -> Result<T, TestCaseError> {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let out = parse();
    let used = usize::try_from(PEAK.with(Cell::get) - start).unwrap_or(0);
    prop_assert!(used <= limit, "{what} held {used} bytes for {input} bytes of input");
    Ok(out)
}

fn config(cases: u32) -> ProptestConfig {
    // NB: failing cases are printed minimised; they become ordinary tests where the bug is fixed.
    ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(cases) }
}

// ---------------------------------------------------------------------------------------------
// key_id

fn scope() -> impl Strategy<Value = KeyScope> {
    let name = || prop_oneof![".{0,12}", "[a-z0-9/.%:-]{0,12}", Just(String::new())];
    (any::<bool>(), name(), name(), name(), name()).prop_map(|(transit, identity, namespace, mount, key)| {
        KeyScope {
            kind: if transit { BackendKind::Transit } else { BackendKind::Local },
            identity,
            namespace,
            mount,
            key,
        }
    })
}

fn key_id() -> impl Strategy<Value = KeyId> {
    (scope(), any::<u64>(), any::<u64>()).prop_map(|(scope, version, created)| scope.key_id(version, created))
}

/// Text shaped like a key_id, so most cases get past the first checks.
fn key_id_like() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*",
        // Long inputs: what a parser holds must stay in proportion to them.
        "[:%0-9a-z]{0,1000}",
        (1usize..8000, "[:%0-9a-z]{1,3}").prop_map(|(n, unit)| unit.repeat(n)),
        "kmsgate:[0-9]{0,2}:(local|transit|x)?(:[a-zA-Z0-9%./~_-]{0,6}){0,8}",
        key_id().prop_map(|id| id.to_string()),
        (key_id(), any::<prop::sample::Index>(), any::<char>()).prop_map(|(id, at, c)| {
            let mut text: Vec<char> = id.to_string().chars().collect();
            let at = at.index(text.len());
            text[at] = c;
            text.into_iter().collect()
        }),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn key_id_parse_is_total_bounded_and_canonical(text in key_id_like()) {
        let parsed = bounded("KeyId::parse", text.len(), || KeyId::parse(&text))?;
        if let Ok(id) = parsed {
            prop_assert_eq!(id.to_string(), text, "only the canonical spelling parses");
        }
    }

    #[test]
    fn key_id_round_trips(id in key_id()) {
        let text = id.to_string();
        prop_assert_eq!(KeyId::parse(&text), Ok(id));
    }
}

// ---------------------------------------------------------------------------------------------
// EncryptedObject and the classifier

fn object() -> impl Strategy<Value = EncryptedObject> {
    let annotation_key = prop_oneof!["[a-z0-9]{1,8}\\.[a-z]{2,4}", "[a-zA-Z0-9./_-]{0,12}"];
    (
        prop::collection::vec(any::<u8>(), 0..64),
        prop_oneof![key_id().prop_map(|id| id.to_string()), ".{0,40}"],
        prop::collection::vec(any::<u8>(), 0..48),
        prop::collection::hash_map(annotation_key, prop::collection::vec(any::<u8>(), 0..16), 0..3),
        any::<bool>(),
    )
        .prop_map(|(encrypted_data, key_id, encrypted_dek_source, annotations, hkdf)| EncryptedObject {
            encrypted_data,
            key_id,
            encrypted_dek_source,
            annotations,
            dek_source_type: if hkdf {
                DekSourceType::HkdfSha256XnonceAesGcmSeed
            } else {
                DekSourceType::AesGcmKey
            },
        })
}

/// Objects the API server accepts.
fn valid_object() -> impl Strategy<Value = EncryptedObject> {
    (
        object(),
        prop::collection::vec(any::<u8>(), 1..64),
        prop_oneof![key_id().prop_map(|id| id.to_string()), ".{1,40}"],
        prop::collection::vec(any::<u8>(), 1..48),
        prop::collection::hash_map(
            "[a-z0-9]{1,8}\\.[a-z]{2,4}",
            prop::collection::vec(any::<u8>(), 0..16),
            0..3,
        ),
    )
        .prop_map(|(object, encrypted_data, key_id, encrypted_dek_source, annotations)| {
            EncryptedObject { encrypted_data, key_id, encrypted_dek_source, annotations, ..object }
        })
}

/// Protobuf bytes: random, a valid encoding, or a valid encoding cut or with bytes changed.
fn object_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        object().prop_map(|o| o.encode()),
        (object(), any::<prop::sample::Index>()).prop_map(|(o, cut)| {
            let mut bytes = o.encode();
            bytes.truncate(cut.index(bytes.len() + 1));
            bytes
        }),
        (object(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)).prop_map(
            |(o, changes)| {
                let mut bytes = o.encode();
                if !bytes.is_empty() {
                    for (at, byte) in changes {
                        let at = at.index(bytes.len());
                        bytes[at] = byte;
                    }
                }
                bytes
            }
        ),
        // Many small annotations: each costs a map entry.
        prop::collection::vec(any::<u16>(), 0..3000)
            .prop_map(|keys| keys.into_iter().flat_map(annotation).collect()),
        // Huge declared lengths and deep nesting in few bytes.
        prop::collection::vec(
            prop_oneof![Just(0x0a_u8), Just(0x22), Just(0xff), Just(0x80), any::<u8>()],
            0..64
        ),
    ]
}

/// One wire annotation (field 4) whose key is three ASCII characters picked by `k`, with an empty
/// value: nine bytes for a map entry.
fn annotation(k: u16) -> [u8; 9] {
    let char = |shift: u16| b'0' + (k >> shift & 63) as u8;
    [0x22, 0x07, 0x0a, 0x03, char(12), char(6), char(0), 0x12, 0x00]
}

/// The decoder builds the annotation map before it validates it (as the API server does), and a
/// map entry costs about 60 bytes however short its key: up to about 19 times a value made only
/// of nine-byte annotations. etcd bounds a value (1.5 MiB by default), so this is at most about
/// 30 MiB for one value, once; the codec is kept as it is, so its bound is this factor.
const OBJECT_FACTOR: usize = 24;

/// Stored values: a known prefix (with a provider or key name) followed by object bytes.
fn stored_value() -> impl Strategy<Value = Vec<u8>> {
    let prefix = prop_oneof![
        Just(""),
        Just("k8s:enc:kms:v2:"),
        Just("k8s:enc:kms:v1:"),
        Just("k8s:enc:aescbc:v1:"),
        Just("k8s:enc:aesgcm:v1:"),
        Just("k8s:enc:secretbox:v1:"),
        Just("k8s:enc:"),
        Just("k8s\0"),
        Just(" {"),
        Just("apiVersion:"),
    ];
    (prefix, prop::collection::vec(any::<u8>(), 0..24), any::<bool>(), object_bytes()).prop_map(
        |(prefix, name, colon, body)| {
            let mut value = prefix.as_bytes().to_vec();
            value.extend_from_slice(&name);
            if colon {
                value.push(b':');
            }
            value.extend_from_slice(&body);
            value
        },
    )
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn object_decode_is_total_bounded_and_validated(bytes in object_bytes()) {
        let limit = OBJECT_FACTOR * bytes.len() + 64 * 1024;
        let decoded = bounded_by("EncryptedObject::decode", limit, bytes.len(), || EncryptedObject::decode(&bytes))?;
        if let Ok(object) = decoded {
            prop_assert!(object.validate().is_ok(), "decode returned an object that fails validation");
            let again = EncryptedObject::decode(&object.encode()).expect("a valid object re-decodes");
            prop_assert_eq!(again, object);
        }
    }

    #[test]
    fn object_round_trips_when_valid(object in object(), provider in "[a-z0-9-]{1,12}") {
        let value = object.to_value(&provider);
        let decoded = EncryptedObject::from_value(&value, &provider);
        match object.validate() {
            Ok(()) => prop_assert_eq!(decoded.expect("a valid object decodes"), object),
            Err(_) => prop_assert!(decoded.is_err(), "an invalid object must not decode"),
        }
    }

    #[test]
    fn classify_is_total_and_bounded(value in stored_value(), provider in ".{0,8}") {
        let limit = OBJECT_FACTOR * value.len() + 64 * 1024;
        let (class, object) = bounded_by("classify", limit, value.len(), || classify(&value))?;
        prop_assert_eq!(matches!(class, Class::KmsV2 { .. }), object.is_some());
        let judge = Judge { provider: Some(&provider), current: Current::Any };
        let judgement = bounded_by("Judge::judge", limit, value.len(), || judge.judge(&value))?;
        prop_assert_eq!(judgement.class, class);
    }

    #[test]
    fn classify_finds_every_valid_kms_v2_value(object in valid_object(), provider in "[a-zA-Z0-9_-]{1,12}") {
        prop_assert!(object.validate().is_ok());
        let (class, decoded) = classify(&object.to_value(&provider));
        prop_assert_eq!(
            class,
            Class::KmsV2 {
                provider,
                key_id: object.key_id.clone(),
                dek_source_type: match object.dek_source_type {
                    DekSourceType::AesGcmKey => "AES_GCM_KEY",
                    DekSourceType::HkdfSha256XnonceAesGcmSeed => "HKDF_SHA256_XNONCE_AES_GCM_SEED",
                },
            }
        );
        prop_assert_eq!(decoded, Some(object));
    }
}

// ---------------------------------------------------------------------------------------------
// The keyring file, through its public load API

/// Writes `bytes` as a 0600 file at `path`, replacing what was there.
fn write_private(path: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    std::io::Write::write_all(&mut file, bytes).unwrap();
}

/// Keyring JSON: random text, or the real layout with random field values and damage.
fn keyring_text() -> impl Strategy<Value = String> {
    let material = prop_oneof![
        Just("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned()),
        "[A-Za-z0-9+/=]{0,60}",
        ".{0,8}",
    ];
    let version = (
        prop_oneof![Just("1".to_owned()), Just("18446744073709551615".to_owned()), "-?[0-9]{0,22}"],
        prop_oneof![Just("0".to_owned()), "[0-9]{0,22}"],
        material,
    )
        .prop_map(|(v, c, m)| format!(r#"{{"version": {v}, "created": {c}, "material": "{m}"}}"#));
    let file = (
        prop_oneof![Just("1".to_owned()), "[0-9]{1,3}"],
        prop_oneof![Just("demo".to_owned()), "[a-z0-9.\\\\\"-]{0,70}"],
        prop::collection::vec(version, 0..4),
        prop_oneof![Just(String::new()), Just(r#", "extra": 1"#.to_owned())],
    )
        .prop_map(|(format, identity, versions, extra)| {
            format!(
                r#"{{"format": {format}, "warning": "w", "identity": "{identity}", "key": "kmsgate", "versions": [{}]{extra}}}"#,
                versions.join(",")
            )
        });
    prop_oneof![
        ".{0,64}",
        file.clone(),
        (file, any::<prop::sample::Index>()).prop_map(|(text, cut)| {
            let chars: Vec<char> = text.chars().collect();
            chars[..cut.index(chars.len() + 1)].iter().collect()
        }),
        "\\[{0,200}",
    ]
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn keyring_load_is_total_and_bounded(text in keyring_text()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        write_private(&path, text.as_bytes());
        let listed = bounded("Keyring::list", text.len(), || Keyring::list(&path))?;
        let opened = bounded("Keyring::open", text.len(), || Keyring::open(&path, false))?;
        // Opening checks more than listing (the key material), never less.
        prop_assert!(listed.is_ok() || opened.is_err());
    }
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn keyring_round_trips_through_its_file(identity in "[a-z0-9][a-z0-9.-]{0,20}", rotations in 0u64..4) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.json");
        prop_assert_eq!(Keyring::init(&path, Some(&identity), "kmsgate").unwrap(), identity.clone());
        for _ in 0..rotations {
            Keyring::rotate(&path).unwrap();
        }
        let (scope, versions) = Keyring::list(&path).unwrap();
        prop_assert_eq!(scope.identity, identity);
        prop_assert_eq!(scope.key, "kmsgate");
        let numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
        prop_assert_eq!(numbers, (1..=rotations + 1).collect::<Vec<_>>());
        prop_assert!(Keyring::open(&path, false).is_ok());
    }
}

// ---------------------------------------------------------------------------------------------
// The TOML config file, through Config::load

/// TOML text: random, or settings of the real table with values of any type.
fn config_text() -> impl Strategy<Value = String> {
    let names: Vec<&'static str> = kmsgate::config::SETTINGS.iter().map(|s| s.name).collect();
    let value = prop_oneof![
        "-?[0-9]{1,22}".prop_map(|n| n),
        "[a-z0-9/:._ -]{0,16}".prop_map(|s| format!("{s:?}")),
        Just("true".to_owned()),
        Just("[]".to_owned()),
        Just(r#"["a", "b"]"#.to_owned()),
        Just("{}".to_owned()),
        Just("1979-05-27T07:32:00Z".to_owned()),
        Just("\"\\uD800\"".to_owned()),
        "\\[{1,64}",
    ];
    let line = (prop::sample::select(names), value).prop_map(|(name, value)| format!("{name} = {value}"));
    let file = (
        prop_oneof![Just("format = 1".to_owned()), "format = -?[0-9]{1,3}", Just(String::new())],
        prop::collection::vec(line, 0..6),
    )
        .prop_map(|(format, lines)| format!("{format}\n{}\n", lines.join("\n")));
    let many = (1usize..3000).prop_map(|n| format!("format = 1\na = [{}]\n", "[],".repeat(n)));
    let tables = (1usize..2000).prop_map(|n| (0..n).map(|i| format!("[t{i}]\n")).collect::<String>());
    prop_oneof![
        ".{0,64}",
        file.clone(),
        file.prop_map(|t| t.replace('=', "")),
        "\\[{1,128}",
        "a=\\[{1,128}",
        many,
        tables,
    ]
}

/// The TOML parser builds a document tree first: an empty array (`[],`, three bytes) costs about
/// 270 bytes, so the config gets a larger factor than [`bound`]'s 4. The file is the operator's,
/// not an attacker's; what bounds it absolutely is the size of the file read.
const CONFIG_FACTOR: usize = 128;

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn config_load_is_total_and_bounded(text in config_text()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsgate.toml");
        write_private(&path, text.as_bytes());
        let env: HashMap<String, String> = HashMap::new();
        let limit = CONFIG_FACTOR * text.len() + 64 * 1024;
        let _ = bounded_by("Config::load", limit, text.len(), || Config::load(Some(&path), &[], &env))?;
    }
}

/// Found by `key_id_parse_is_total_bounded_and_canonical`: a string of colons made the parser hold
/// 16 bytes per colon before it refused the string.
#[test]
fn a_key_id_of_colons_costs_no_more_than_its_length() {
    for text in [":".repeat(20_000), format!("kmsgate{}", ":".repeat(20_000))] {
        let parsed = bounded("KeyId::parse", text.len(), || KeyId::parse(&text)).unwrap();
        assert!(parsed.is_err());
    }
    assert_eq!(
        KeyId::parse(&format!("kmsgate{}", ":".repeat(20))),
        Err(kmsgate::keyid::KeyIdError::FieldCount { found: 21 })
    );
}

/// The largest value etcd stores by default, made only of annotations, stays within
/// [`OBJECT_FACTOR`] and is refused.
#[test]
fn an_etcd_value_of_annotations_stays_within_the_object_bound() {
    let bytes: Vec<u8> = (0..=u16::MAX).cycle().take(170_000).flat_map(annotation).collect();
    let value = [b"k8s:enc:kms:v2:kmsgate:".as_slice(), &bytes].concat();
    let limit = OBJECT_FACTOR * value.len() + 64 * 1024;
    let (class, object) = bounded_by("classify", limit, value.len(), || classify(&value)).unwrap();
    assert!(matches!(class, Class::KmsV2Invalid { .. }) && object.is_none(), "{class:?}");
}

// ---------------------------------------------------------------------------------------------
// The ExternalJWTSigner claims check

/// Any JSON value, small and nested a few levels.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
        ".{0,16}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Any JSON object, with `sub` and `aud` of any shape now and then.
fn json_object() -> impl Strategy<Value = serde_json::Map<String, serde_json::Value>> {
    (prop::collection::btree_map(".{0,8}", json(), 0..8), prop::option::of(json()), prop::option::of(json()))
        .prop_map(|(fields, sub, aud)| {
            let mut object: serde_json::Map<String, serde_json::Value> = fields.into_iter().collect();
            if let Some(sub) = sub {
                object.insert("sub".to_owned(), sub);
            }
            if let Some(aud) = aud {
                object.insert("aud".to_owned(), aud);
            }
            object
        })
}

/// Text shaped like a claims segment, so many cases get past the base64 check.
fn claims_like() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*",
        "[A-Za-z0-9_=+/-]{0,400}",
        json().prop_map(|v| URL_SAFE_NO_PAD.encode(v.to_string())),
        ".{0,200}".prop_map(|text| URL_SAFE_NO_PAD.encode(text)),
        (1usize..20_000, "[\\[0,\\]{}\"]{1,3}").prop_map(|(n, unit)| URL_SAFE_NO_PAD.encode(unit.repeat(n))),
        (1usize..70_000).prop_map(|n| "e".repeat(n)),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn claims_check_is_total_and_bounded(claims in claims_like()) {
        let checked =
            bounded("check_claims", claims.len(), || jwt::check_claims(&claims))?;
        if checked.is_ok() {
            prop_assert!(!claims.contains('=') && !claims.contains('+') && !claims.contains('/'));
            prop_assert!(claims.len() <= jwt::CLAIMS_MAX_BYTES);
        }
    }

    #[test]
    fn any_json_object_in_unpadded_base64url_passes_and_is_summarised(object in json_object()) {
        let claims = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&object).unwrap());
        prop_assume!(claims.len() <= jwt::CLAIMS_MAX_BYTES);
        let summary = jwt::check_claims(&claims).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(summary.sub.as_deref(), object.get("sub").and_then(|s| s.as_str()));
        let aud: Vec<&str> = match object.get("aud") {
            Some(serde_json::Value::String(one)) => vec![one.as_str()],
            Some(serde_json::Value::Array(list)) => list.iter().filter_map(|a| a.as_str()).collect(),
            _ => Vec::new(),
        };
        prop_assert_eq!(summary.aud, aud);
    }

    #[test]
    fn any_json_that_is_not_an_object_is_refused(value in json()) {
        prop_assume!(!value.is_object());
        let claims = URL_SAFE_NO_PAD.encode(value.to_string());
        prop_assert!(matches!(jwt::check_claims(&claims), Err(JwtError::ClaimsJson(_))));
    }

    #[test]
    fn padded_or_standard_base64_always_fails(object in json_object(), extra_pad in 0usize..3) {
        let payload = serde_json::to_vec(&object).unwrap();
        // Padded base64url, with padding even where none is due: never the unpadded form.
        let mut padded = URL_SAFE.encode(&payload);
        padded.push_str(&"=".repeat(extra_pad));
        if padded.contains('=') {
            prop_assert_eq!(jwt::check_claims(&padded), Err(JwtError::ClaimsEncoding));
        }
        let standard = STANDARD.encode(&payload);
        if standard.contains(['=', '+', '/']) {
            prop_assert_eq!(jwt::check_claims(&standard), Err(JwtError::ClaimsEncoding));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verify-only key files

/// A real key file of each form, from tests/data/keyfile.
fn key_vector() -> impl Strategy<Value = Vec<u8>> {
    const NAMES: &[&str] = &[
        "rsa-pkcs1",
        "rsa-pkcs8",
        "rsa-pkix",
        "rsa-pkcs1-public",
        "rsa-cert",
        "p256-sec1",
        "p256-pkcs8",
        "p256-pkix",
        "p256-cert",
        "p384-sec1",
        "p521-pkcs8",
        "ed25519-pkix",
        "p256-sec1-no-public",
        "bundle",
    ];
    prop::sample::select(NAMES).prop_map(|name| {
        std::fs::read(format!("{}/tests/data/keyfile/{name}.pem", env!("CARGO_MANIFEST_DIR"))).unwrap()
    })
}

/// A PEM block around `der`.
fn pem_block(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// Key files: real ones with a byte changed inside their DER, random DER under every label, and
/// broken framing.
fn key_file_like() -> impl Strategy<Value = Vec<u8>> {
    let label = prop::sample::select(
        [
            "PUBLIC KEY",
            "RSA PUBLIC KEY",
            "CERTIFICATE",
            "RSA PRIVATE KEY",
            "EC PRIVATE KEY",
            "PRIVATE KEY",
            "EC PARAMETERS",
            "X",
        ]
        .as_slice(),
    );
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        (key_vector(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(file, at, byte)| {
            let text = String::from_utf8(file).unwrap();
            // Change one byte of the first block's DER and frame it again.
            let label =
                text.lines().next().unwrap().trim_start_matches("-----BEGIN ").trim_end_matches("-----");
            let body: String = text.lines().skip(1).take_while(|l| !l.starts_with("-----")).collect();
            let mut der = STANDARD.decode(body).unwrap();
            let at = at.index(der.len());
            der[at] = byte;
            pem_block(label, &der).into_bytes()
        }),
        (label, prop::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(label, der)| pem_block(label, &der).into_bytes()),
        (key_vector(), any::<prop::sample::Index>()).prop_map(|(file, at)| {
            let cut = at.index(file.len());
            file[..cut].to_vec()
        }),
        (1usize..5000).prop_map(|n| "-----BEGIN PUBLIC KEY-----\n".repeat(n).into_bytes()),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn key_file_read_is_total_bounded_and_each_key_reads_back_as_itself(file in key_file_like()) {
        let keys = bounded("keyfile::public_keys", file.len(), || keyfile::public_keys(&file))?;
        for key in keys.into_iter().flatten() {
            // What we serve is PKIX DER that reads back, as a PUBLIC KEY, to the same key and kid.
            let again = keyfile::public_keys(pem_block("PUBLIC KEY", &key.der).as_bytes())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(again, vec![key]);
        }
    }
}

/// Found by `claims_check_is_total_and_bounded`: the claims were parsed into a whole JSON tree,
/// 32 bytes per value, so 64 KiB of `[0,0,…]` held over 1 MiB, 17 times its size.
#[test]
fn claims_of_many_small_values_cost_no_more_than_the_parser_bound() {
    let array = format!("[{}0]", "0,".repeat(23_000));
    for json in [format!("{{\"a\":{array}}}"), array] {
        let claims = URL_SAFE_NO_PAD.encode(&json);
        assert!(claims.len() <= jwt::CLAIMS_MAX_BYTES);
        bounded("check_claims", claims.len(), || jwt::check_claims(&claims)).unwrap().ok();
    }
}
