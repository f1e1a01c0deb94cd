#!/usr/bin/env bash
# Runs the whole test suite: installs OpenBao, etcd, promtool and openssl first (scripts/setup.sh), then
# `cargo test` over every test binary, and ends with one total over all of them. Each OpenBao- or etcd-backed
# test starts its own server on free loopback ports. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --openbao --etcd --deploy
export KMSGATE_TEST_BAO="${KMSGATE_TOOLS_DIR:-$HOME/.cache/kmsgate/tools}/venv/bin/bao"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "== building the tests (the first build takes several minutes)" >&2
# NB: no doctests exist. --no-fail-fast runs every binary, so the total covers them all.
set +e
# NB: a one-shot build gains nothing from incremental compilation, which only costs time and disk
# here; an explicit CARGO_INCREMENTAL still wins.
CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}" cargo test --locked --no-fail-fast --lib --bins --tests "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# NB: one "test result:" line per binary: "ok. 5 passed; 0 failed; 2 ignored; 0 measured; ...".
awk '/^test result:/ {
       binaries++
       for (i = 2; i <= NF; i++) {
         if ($i ~ /^passed;?$/) passed += $(i - 1)
         if ($i ~ /^failed;?$/) failed += $(i - 1)
         if ($i ~ /^ignored;?$/) ignored += $(i - 1)
       }
     }
     END { printf "== total over %d test binaries: %d passed, %d failed, %d ignored\n", binaries, passed, failed, ignored }' "$log"
exit "$status"
