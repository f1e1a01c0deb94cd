//! The audit classifier: never panics, a parsed object comes with the KMS v2 class, and the
//! judge agrees with the classifier.
#![no_main]

use kmsgate::storage::{Class, Current, Judge, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (class, object) = classify(data);
    assert_eq!(matches!(class, Class::KmsV2 { .. }), object.is_some());
    let judge = Judge { provider: Some("kmsgate"), current: Current::KeyId("kmsgate:1:local:k:::kmsgate:1:1") };
    assert_eq!(judge.judge(data).class, class);
});
