#!/usr/bin/env bash
# The release build, as the Dockerfile does it: `cargo auditable` embeds the dependency list in the
# binary (for Trivy, Grype, `cargo audit bin`), and the CycloneDX SBOM of Cargo.lock is written
# beside it. Out: target/release/kmsgate and target/release/kmsgate.cdx.json (under
# $CARGO_TARGET_DIR when set).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --auditable
export PATH="${KMSGATE_TOOLS_DIR:-$HOME/.cache/kmsgate/tools}/cargo/bin:$PATH"
KMSGATE_GIT_COMMIT="${KMSGATE_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
export KMSGATE_GIT_COMMIT
cargo auditable build --release --locked --bin kmsgate
out="${CARGO_TARGET_DIR:-target}/release"
scripts/sbom.py "$out/kmsgate.cdx.json"
scripts/sbom.py --check "$out/kmsgate.cdx.json"
"$out/kmsgate" version
