#!/bin/sh
# Counts the instructions of one plugin Encrypt and Decrypt with valgrind's callgrind (exact and
# unaffected by other load), next to its floor: the gRPC echo server and the direct Transit client.
# Prints, per call and per process, where the instructions go, grouped by crate.
#
#   KMSGATE_TEST_BAO=~/.cache/kmsgate/tools/venv/bin/bao scripts/profile-plugin.sh [out dir]
set -eu
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-target/callgrind}")
rm -rf "$out" && mkdir -p "$out"
bench=$(cargo bench --bench plugin --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -1)
[ -x "$bench" ] || { echo "cannot find the plugin bench executable" >&2; exit 1; }
wrapper="$out/kmsgate-under-callgrind"
cat >"$wrapper" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --instr-atstart=no --quiet --callgrind-out-file=$out/plugin.%p $(realpath target/release/kmsgate) "\$@"
WRAP
chmod +x "$wrapper"
CARGO_BIN_EXE_kmsgate="$wrapper" KMSGATE_BENCH_CALLGRIND="$out" "$bench" | tee "$out/bench.txt"
calls=$(sed -n 's/.*CPU per call at concurrency 16 (\([0-9]*\) calls.*/\1/p' "$out/bench.txt")
for what in plugin echo direct; do
    for op in encrypt decrypt; do
        files=$(grep -l "^desc: Trigger: dump $op\$" "$out/$what".* 2>/dev/null || true)
        [ -n "$files" ] || continue
        echo
        echo "### $what, $op ($calls calls)"
        echo
        scripts/callgrind_summary.py "$calls" $files
    done
done
