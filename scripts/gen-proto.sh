#!/usr/bin/env bash
# Regenerates the checked-in Rust code of proto/ into src/proto/, with protoc (Debian
# protobuf-compiler; `scripts/setup.sh --protoc` installs it) and the small generator in
# tools/protogen/ (its own workspace, so kmsgate's build never compiles the code generator).
#   scripts/gen-proto.sh           rewrite src/proto/*.rs after a .proto change
#   scripts/gen-proto.sh --check   fail when src/proto/ differs from what proto/ generates
set -euo pipefail
cd "$(dirname "$0")/.."

check=""
case "${1:-}" in
  "") ;;
  --check) check=1 ;;
  *) echo "usage: scripts/gen-proto.sh [--check]" >&2; exit 2 ;;
esac

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
cargo run --quiet --locked --manifest-path tools/protogen/Cargo.toml -- proto "$out"

if [ -n "$check" ]; then
  if ! diff -ru src/proto "$out" >&2; then
    echo "gen-proto: src/proto/ differs from what proto/ generates; run scripts/gen-proto.sh" >&2
    exit 1
  fi
  echo "gen-proto: src/proto/ is up to date" >&2
else
  mkdir -p src/proto
  rm -f src/proto/*.rs
  cp "$out"/*.rs src/proto/
fi
