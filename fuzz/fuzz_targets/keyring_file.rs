//! The keyring file, through its public load API: never panics, and opening never accepts what
//! listing refuses.
#![no_main]

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::PathBuf, sync::OnceLock};

use kmsgate::keyring::Keyring;
use libfuzzer_sys::fuzz_target;

fn path() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("keyring.json");
        (dir, path)
    });
    path
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    let _ = std::fs::remove_file(path);
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).expect("a private file");
    file.write_all(data).expect("written");
    drop(file);
    let listed = Keyring::list(path);
    let opened = Keyring::open(path, false);
    assert!(listed.is_ok() || opened.is_err(), "open accepted a keyring that list refused");
});
