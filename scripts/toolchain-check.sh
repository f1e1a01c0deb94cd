#!/usr/bin/env bash
# Keeps the toolchain honest: rust-version in Cargo.toml must be the rustc this CI builds with,
# and the Rust image the Dockerfile builds the release with, so the promised minimum is the one
# actually tested.
set -euo pipefail
cd "$(dirname "$0")/.."

declared=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$declared" ] || { echo "toolchain-check: no rust-version in Cargo.toml" >&2; exit 1; }
actual=$(rustc -V | awk '{print $2}')
image=$(sed -n 's/^FROM rust:\([0-9.]*\)[-@ ].*/\1/p' Dockerfile | head -n 1)
# NB: rust-version may omit the patch ("1.95"); compare only the parts it names.
matches() { [ "$1" = "$2" ] || [ "${1#"$2".}" != "$1" ]; }
status=0
if ! matches "$actual" "$declared"; then
  echo "toolchain-check: Cargo.toml says rust-version $declared, CI builds with rustc $actual" >&2
  status=1
fi
# NB: the image tag may name only the minor release (rust:1.95 follows its patches).
if ! matches "$image" "$declared" && ! matches "$declared" "$image"; then
  echo "toolchain-check: Cargo.toml says rust-version $declared, the Dockerfile builds with rust:$image" >&2
  status=1
fi
[ "$status" -eq 0 ] && echo "toolchain-check: rust-version $declared = rustc $actual = rust:$image image" >&2
exit "$status"
