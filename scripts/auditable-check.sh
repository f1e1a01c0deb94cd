#!/usr/bin/env bash
# Checks that `cargo auditable` embeds kmsgate's dependency list, as the release build does, on a
# debug build (CI builds no release binary): the list in the binary's .dep-v0 section must name
# exactly the crates `cargo tree` says the binary is built from (normal and build dependencies).
# Image scanners (Trivy, Grype, `cargo audit bin`) read this list from the binary alone.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh --auditable
export PATH="${KMSGATE_TOOLS_DIR:-$HOME/.cache/kmsgate/tools}/cargo/bin:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo auditable build --locked --quiet --bin kmsgate
objcopy --dump-section .dep-v0="$work/dep-v0" "${CARGO_TARGET_DIR:-target}/debug/kmsgate" "$work/copy" \
  || { echo "auditable-check: the debug kmsgate binary has no .dep-v0 section" >&2; exit 1; }
cargo tree --locked --edges normal,build --prefix none --format '{p}' --package kmsgate >"$work/tree"
# NB: cargo auditable reads features from `cargo metadata`, which unifies them over the whole
# workspace, dev-dependencies included, so a feature only the tests turn on (p521's `ecdsa`;
# getrandom's `rand_core`, through proptest's rand) adds its crates to the list although the
# binary does not link them. Such extras are allowed only if the workspace's graph has them.
cargo tree --locked --edges normal,build,dev --prefix none --format '{p}' --workspace >"$work/workspace"
python3 - "$work/dep-v0" "$work/tree" "$work/workspace" <<'PY'
import json, sys, zlib
# The section is zlib-compressed JSON: {"packages": [{"name", "version", "source", ...}]}
# (rust-secure-code/cargo-auditable, PARSING.md).
packages = json.loads(zlib.decompress(open(sys.argv[1], "rb").read()))["packages"]
embedded = {(p["name"], p["version"]) for p in packages}
tree = set()
for line in open(sys.argv[2]):
    name, version = line.split()[:2]
    tree.add((name, version.lstrip("v")))
roots = [p["name"] for p in packages if p.get("root")]
workspace = set()
for line in open(sys.argv[3]):
    if not line.strip():
        continue
    name, version = line.split()[:2]
    workspace.add((name, version.lstrip("v")))
problems = [f"in the binary, not in cargo tree: {n} {v}" for n, v in sorted(embedded - tree - workspace)]
problems += [f"in cargo tree, not in the binary: {n} {v}" for n, v in sorted(tree - embedded)]
if roots != ["kmsgate"]:
    problems.append(f"root package is {roots}, not kmsgate")
for crate in ("ring", "rustls"):
    if not any(n == crate for n, _ in embedded):
        problems.append(f"{crate} is missing")
if problems:
    sys.exit("auditable-check failed:\n  " + "\n  ".join(problems))
print(f"auditable-check: the binary lists its {len(embedded)} crates", file=sys.stderr)
PY
