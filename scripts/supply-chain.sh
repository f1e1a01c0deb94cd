#!/usr/bin/env bash
# The supply-chain checks CI runs (no network beyond crates.io and PyPI, no release build):
# dependency policy, toolchain version, the SBOM against Cargo.lock, and the dependency list
# cargo auditable embeds, on a debug build.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deny.sh
scripts/toolchain-check.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
scripts/sbom.py "$work/kmsgate.cdx.json"
scripts/sbom.py --check "$work/kmsgate.cdx.json"
scripts/auditable-check.sh
