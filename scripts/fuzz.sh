#!/usr/bin/env bash
# Runs each cargo-fuzz target in fuzz/ for a bounded time: the parsers of untrusted bytes (the
# key_id, the EncryptedObject decoder, the audit classifier, the keyring file, the TOML config,
# the ExternalJWTSigner claims and the verify-only key files).
# Not part of CI; the stable property tests in tests/parsers.rs cover the same parsers there.
#
#   scripts/fuzz.sh                  every target, FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh key_id classify  only these
#
# Needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz); without them it says so
# and exits 0. A crash leaves its input in fuzz/artifacts/<target>/; keep it as a regular test
# where the bug is fixed. Memory is bounded like the property tests: a run that allocates more
# than 64 MiB at once or grows past 1 GiB fails. The sanitizer build of kmsgate and its
# dependencies in fuzz/target takes well over 1 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
if ! command -v rustup >/dev/null || ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: skipped: no nightly toolchain (rustup toolchain install nightly)"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: skipped: cargo-fuzz is not installed (cargo install cargo-fuzz)"
  exit 0
fi

if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
for target in "${targets[@]}"; do
  echo "fuzz: $target for ${seconds}s"
  mkdir -p "fuzz/corpus/$target"
  # NB: the first corpus directory collects new inputs; the committed seeds are only read.
  cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -malloc_limit_mb=64 -rss_limit_mb=1024
done
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a finding"
