#!/usr/bin/env bash
# The main job on the embedded default: builds kmsgate, starts the plugin on a fresh local keyring
# (NOT FOR PRODUCTION) on a unix socket, drives it end to end with `kmsgate selftest` exactly as
# kube-apiserver would, prints the plugin's /status, and stops it with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building kmsgate (the first build compiles every dependency and takes several minutes)"
# NB: a one-shot build gains nothing from incremental compilation, which only costs time and disk
# here; an explicit CARGO_INCREMENTAL still wins.
CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}" cargo build --locked
bin=target/debug/kmsgate
work=$(mktemp -d)
port=$(( 20000 + RANDOM % 20000 ))
plugin_pid=""
cleanup() {
  if [ -n "$plugin_pid" ] && kill -0 "$plugin_pid" 2>/dev/null; then kill -TERM "$plugin_pid"; wait "$plugin_pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== kmsgate plugin on a new local keyring in $work"
"$bin" plugin \
  --socket "$work/kms.sock" \
  --keyring "$work/keyring.json" \
  --set http.listen="127.0.0.1:$port" \
  --set plugin.audit_log="$work/audit.log" \
  2>"$work/plugin.log" &
plugin_pid=$!
for _ in $(seq 1 100); do
  [ -S "$work/kms.sock" ] && break
  kill -0 "$plugin_pid" 2>/dev/null || { cat "$work/plugin.log" >&2; exit 1; }
  sleep 0.1
done

echo "== kmsgate selftest (drives the plugin as kube-apiserver does)"
"$bin" selftest --socket "$work/kms.sock"

echo "== /status"
if command -v curl >/dev/null 2>&1; then curl -fsS "http://127.0.0.1:$port/status"; echo; fi

echo "== audit log (one JSON line per Encrypt/Decrypt)"
head -n 2 "$work/audit.log"

kill -TERM "$plugin_pid"
wait "$plugin_pid"
plugin_pid=""
echo "== plugin stopped cleanly; socket removed: $([ -e "$work/kms.sock" ] && echo no || echo yes)"
