#!/bin/sh
# Counts the instructions of one signer Sign with valgrind's callgrind (exact and unaffected by
# other load), next to its floor: the gRPC echo server and the direct Transit sign client, all
# at concurrency 1 (the Sign target's). Prints, per process, where the instructions go, grouped
# by crate. The recipe of scripts/profile-plugin.sh, applied to `cargo bench --bench signer`.
#
#   KMSGATE_TEST_BAO=~/.cache/kmsgate/tools/venv/bin/bao scripts/profile-signer.sh [out dir [kmsgate binary]]
#
# The binary defaults to target/release/kmsgate; name another (a copy of an earlier build) to
# profile it with the same bench. SIGNER_BENCH=<bench executable> skips building the bench.
set -eu
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-target/callgrind-signer}")
binary=$(realpath "${2:-target/release/kmsgate}")
rm -rf "$out" && mkdir -p "$out"
bench=${SIGNER_BENCH:-$(cargo bench --bench signer --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -1)}
[ -x "$bench" ] || { echo "cannot find the signer bench executable" >&2; exit 1; }
wrapper="$out/kmsgate-under-callgrind"
cat >"$wrapper" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --instr-atstart=no --quiet --callgrind-out-file=$out/signer.%p $binary "\$@"
WRAP
chmod +x "$wrapper"
CARGO_BIN_EXE_kmsgate="$wrapper" KMSGATE_BENCH_CALLGRIND="$out" "$bench" | tee "$out/bench.txt"
calls=$(sed -n 's/.*CPU per Sign at concurrency 1 (\([0-9]*\) calls.*/\1/p' "$out/bench.txt")
for what in signer echo direct; do
    files=$(grep -l "^desc: Trigger: dump sign\$" "$out/$what".* 2>/dev/null || true)
    [ -n "$files" ] || continue
    # NB: one dump per round (a warm-up round and a measured one), $calls calls each.
    dumps=$(echo $files | wc -w)
    echo
    echo "### $what, Sign ($calls calls x $dumps dumps)"
    echo
    scripts/callgrind_summary.py "$((calls * dumps))" $files
done
files=$(grep -l "^desc: Trigger: dump noop\$" "$out/direct".* 2>/dev/null || true)
if [ -n "$files" ]; then
    echo
    echo "### direct, its load generator alone (no call; subtract from direct's Sign)"
    echo
    scripts/callgrind_summary.py "$((calls * $(echo $files | wc -w)))" $files
fi
