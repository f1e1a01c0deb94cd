//! The TOML config file, through `Config::load` with no environment: never panics.
#![no_main]

use std::{collections::HashMap, path::PathBuf, sync::OnceLock};

use kmsgate::config::Config;
use libfuzzer_sys::fuzz_target;

fn path() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("kmsgate.toml");
        (dir, path)
    });
    path
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    std::fs::write(path, data).expect("written");
    let env: HashMap<String, String> = HashMap::new();
    let _ = Config::load(Some(path), &[], &env);
});
