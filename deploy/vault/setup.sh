#!/usr/bin/env bash
# Sets up Vault/OpenBao for kmsgate. Run with an admin token; safe to run again.
#
#   VAULT_ADDR=https://vault:8200 VAULT_TOKEN=... deploy/vault/setup.sh [options] NODE=IP ...
#
# For each NODE=IP (a control-plane node and its address) it makes an AppRole
# kmsgate-plugin-NODE whose secret_id and tokens only work from IP/32, and writes that node's
# role_id and secret_id to OUT/NODE/ (mode 0400) to copy to /etc/kmsgate/ on the node.
#
# Options:
#   --mount PATH            Transit mount (default transit)
#   --key NAME              Transit key (default kmsgate)
#   --out DIR               where node credentials go (default ./kmsgate-credentials)
#   --secret-id-ttl DUR     lifetime of each secret_id (default 720h; rotate with rotate-secret-id.sh)
#   --kubernetes-host URL   also configure Kubernetes auth for the controller (role kmsgate-controller,
#   --kubernetes-ca FILE    ServiceAccount kmsgate/kmsgate-controller); both or neither
#
# Uses `bao` (OpenBao) or `vault`, whichever is on PATH, or $BAO.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
MOUNT=transit
KEY=kmsgate
OUT=./kmsgate-credentials
SECRET_ID_TTL=720h
K8S_HOST=""
K8S_CA=""
NODES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mount) MOUNT="$2"; shift 2 ;;
    --key) KEY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --secret-id-ttl) SECRET_ID_TTL="$2"; shift 2 ;;
    --kubernetes-host) K8S_HOST="$2"; shift 2 ;;
    --kubernetes-ca) K8S_CA="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *=*) NODES+=("$1"); shift ;;
    *) echo "setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if { [ -n "$K8S_HOST" ] && [ -z "$K8S_CA" ]; } || { [ -z "$K8S_HOST" ] && [ -n "$K8S_CA" ]; }; then
  echo "setup.sh: --kubernetes-host and --kubernetes-ca go together" >&2
  exit 2
fi
BAO="${BAO:-$(command -v bao || command -v vault || true)}"
if [ -z "$BAO" ]; then
  echo "setup.sh: neither bao nor vault is on PATH (or set BAO)" >&2
  exit 2
fi
: "${VAULT_ADDR:?set VAULT_ADDR}" "${VAULT_TOKEN:?set VAULT_TOKEN (an admin token)}"
export BAO_ADDR="$VAULT_ADDR" BAO_TOKEN="$VAULT_TOKEN"

# Reads a whole listing before grep looks at it: grep -q quits at the first match, and under
# pipefail the lister's SIGPIPE would read as "not there".
mounted() {
  local listing
  listing="$("$BAO" "$1" list -format=json)" || { echo "setup.sh: cannot list $1 mounts (see above)" >&2; exit 1; }
  grep -q "\"$2/\"" <<<"$listing"
}
policy() { sed -e "s#\"transit/#\"$MOUNT/#g" -e "s#/kmsgate\"#/$KEY\"#g" -e "s#/kmsgate/#/$KEY/#g" "$here/$1"; }

# Transit and the key (an existing key is kept as it is).
if ! mounted secrets "$MOUNT"; then
  "$BAO" secrets enable -path="$MOUNT" transit >/dev/null
fi
if ! "$BAO" read -format=json "$MOUNT/keys/$KEY" >/dev/null 2>&1; then
  "$BAO" write -f "$MOUNT/keys/$KEY" type=aes256-gcm96 >/dev/null
fi

policy plugin-policy.hcl | "$BAO" policy write kmsgate-plugin - >/dev/null
policy controller-policy.hcl | "$BAO" policy write kmsgate-controller - >/dev/null

if [ ${#NODES[@]} -gt 0 ]; then
  if ! mounted auth approle; then
    "$BAO" auth enable approle >/dev/null
  fi
fi
umask 077
for entry in "${NODES[@]}"; do
  node="${entry%%=*}"
  ip="${entry#*=}"
  case "$node" in ''|*[!a-z0-9.-]*) echo "setup.sh: bad node name in $entry" >&2; exit 2 ;; esac
  role="kmsgate-plugin-$node"
  "$BAO" write "auth/approle/role/$role" \
    token_policies=kmsgate-plugin token_no_default_policy=true token_ttl=1h token_max_ttl=24h \
    secret_id_ttl="$SECRET_ID_TTL" secret_id_num_uses=0 \
    secret_id_bound_cidrs="$ip/32" token_bound_cidrs="$ip/32" >/dev/null
  mkdir -p "$OUT/$node"
  rm -f "$OUT/$node/role_id" "$OUT/$node/secret_id"
  "$BAO" read -field=role_id "auth/approle/role/$role/role-id" > "$OUT/$node/role_id"
  "$BAO" write -f -format=json "auth/approle/role/$role/secret-id" > "$OUT/$node/secret_id.json"
  sed -n 's/.*"secret_id": "\([^"]*\)".*/\1/p' "$OUT/$node/secret_id.json" > "$OUT/$node/secret_id"
  sed -n 's/.*"secret_id_accessor": "\([^"]*\)".*/\1/p' "$OUT/$node/secret_id.json" > "$OUT/$node/secret_id_accessor"
  rm -f "$OUT/$node/secret_id.json"
  chmod 0400 "$OUT/$node/role_id" "$OUT/$node/secret_id"
  echo "node $node: $OUT/$node/{role_id,secret_id} -> /etc/kmsgate/ on $node (owner 65532, mode 0400)"
done

if [ -n "$K8S_HOST" ]; then
  if ! mounted auth kubernetes; then
    "$BAO" auth enable kubernetes >/dev/null
  fi
  "$BAO" write auth/kubernetes/config kubernetes_host="$K8S_HOST" kubernetes_ca_cert=@"$K8S_CA" >/dev/null
  "$BAO" write auth/kubernetes/role/kmsgate-controller \
    bound_service_account_names=kmsgate-controller bound_service_account_namespaces=kmsgate \
    token_policies=kmsgate-controller token_no_default_policy=true token_ttl=1h token_max_ttl=4h >/dev/null
  echo "kubernetes auth: role kmsgate-controller for kmsgate/kmsgate-controller"
fi
echo "done: mount $MOUNT, key $KEY, policies kmsgate-plugin and kmsgate-controller"
