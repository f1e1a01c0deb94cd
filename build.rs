//! Records what `kmsgate version` reports: the git commit, the compiler and the crypto and TLS
//! crate versions. The protobuf code is checked in (src/proto/, `scripts/gen-proto.sh`), so
//! nothing is generated here and a build needs no protoc.
use std::{env, fmt::Write as _, fs, path::Path, process::Command};

/// The crates whose versions say whether a build carries an affected crypto or TLS stack.
const CRYPTO_CRATES: &[&str] = &["ring", "rustls", "rustls-webpki", "aes-gcm", "hkdf", "sha2"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-env-changed=KMSGATE_GIT_COMMIT");
    // NB: the commit is embedded only when KMSGATE_GIT_COMMIT says it (scripts/release.sh and the
    // Dockerfile set it). Reading HEAD here made every commit, checkout or rebase rerun this script
    // and rebuild the library and everything above it, debug and release (`cargo bench` rebuilt on
    // nearly every run); a build without the variable says `unknown`, which is true of a working
    // tree, rather than a commit it may not match.
    let commit = env::var("KMSGATE_GIT_COMMIT").ok().map(|c| c.trim().to_owned()).filter(|c| !c.is_empty());
    let commit = commit.unwrap_or_else(|| "unknown".into());
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc = output(Command::new(rustc).arg("-V")).unwrap_or_else(|| "unknown".into());
    let lock = fs::read_to_string("Cargo.lock").unwrap_or_default();
    let mut crates = String::new();
    for name in CRYPTO_CRATES {
        let versions = locked_versions(&lock, name);
        let version = if versions.is_empty() { "none".to_owned() } else { versions.join(",") };
        writeln!(crates, "    ({name:?}, {version:?}),")?;
    }
    let code = format!(
        "/// The git commit this binary was built from, or `unknown`.\n\
         pub const GIT_COMMIT: &str = {commit:?};\n\
         /// `rustc -V` of the compiler that built this binary.\n\
         pub const RUSTC: &str = {rustc:?};\n\
         /// The crypto and TLS crates compiled in, as `(name, version)` from Cargo.lock.\n\
         pub const CRATES: &[(&str, &str)] = &[\n{crates}];\n"
    );
    let out = Path::new(&env::var("OUT_DIR")?).join("build_info.rs");
    fs::write(out, code)?;
    Ok(())
}

fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok().filter(|o| o.status.success())?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// Every version of `name` in a Cargo.lock, in file order.
fn locked_versions(lock: &str, name: &str) -> Vec<String> {
    let wanted = format!("name = {name:?}");
    let mut lines = lock.lines();
    let mut versions = Vec::new();
    while let Some(line) = lines.next() {
        if line == wanted
            && let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = "))
        {
            versions.push(v.trim_matches('"').to_owned());
        }
    }
    versions
}
