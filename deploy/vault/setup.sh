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
#   --signer                also set up `kmsgate signer`: its signing key, policy kmsgate-signer, and
#                           per NODE an AppRole kmsgate-signer-NODE whose credentials go to OUT/NODE/signer/;
#                           and policy kmsgate-controller-signer (the controller's rotation of that key),
#                           added to the controller's Kubernetes auth role
#   --signer-key NAME       its Transit key (default kmsgate-signer; implies --signer)
#   --signer-type TYPE      the key's type when setup.sh creates it: ecdsa-p256 (default), ecdsa-p384,
#                           ecdsa-p521, rsa-2048, rsa-3072 or rsa-4096 (implies --signer)
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
SIGNER=""
SIGNER_KEY=kmsgate-signer
SIGNER_TYPE=ecdsa-p256
NODES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mount) MOUNT="$2"; shift 2 ;;
    --key) KEY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --secret-id-ttl) SECRET_ID_TTL="$2"; shift 2 ;;
    --kubernetes-host) K8S_HOST="$2"; shift 2 ;;
    --kubernetes-ca) K8S_CA="$2"; shift 2 ;;
    --signer) SIGNER=1; shift ;;
    --signer-key) SIGNER=1; SIGNER_KEY="$2"; shift 2 ;;
    --signer-type) SIGNER=1; SIGNER_TYPE="$2"; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *=*) NODES+=("$1"); shift ;;
    *) echo "setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if { [ -n "$K8S_HOST" ] && [ -z "$K8S_CA" ]; } || { [ -z "$K8S_HOST" ] && [ -n "$K8S_CA" ]; }; then
  echo "setup.sh: --kubernetes-host and --kubernetes-ca go together" >&2
  exit 2
fi
# The types whose signatures kube-apiserver verifies (RS256, ES256/384/512); ed25519 is not one.
case "$SIGNER_TYPE" in
  ecdsa-p256|ecdsa-p384|ecdsa-p521|rsa-2048|rsa-3072|rsa-4096) ;;
  *) echo "setup.sh: --signer-type $SIGNER_TYPE cannot sign tokens kube-apiserver verifies; use ecdsa-p256, ecdsa-p384, ecdsa-p521, rsa-2048, rsa-3072 or rsa-4096" >&2; exit 2 ;;
esac
case "$SIGNER_KEY" in ''|*[!A-Za-z0-9._-]*) echo "setup.sh: bad --signer-key $SIGNER_KEY" >&2; exit 2 ;; esac
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
signer_policy() { sed -e "s#\"transit/#\"$MOUNT/#g" -e "s#/kmsgate-signer\"#/$SIGNER_KEY\"#g" -e "s#/kmsgate-signer/#/$SIGNER_KEY/#g" "$here/$1"; }

# Transit and the key (an existing key is kept as it is).
if ! mounted secrets "$MOUNT"; then
  "$BAO" secrets enable -path="$MOUNT" transit >/dev/null
fi
if ! "$BAO" read -format=json "$MOUNT/keys/$KEY" >/dev/null 2>&1; then
  "$BAO" write -f "$MOUNT/keys/$KEY" type=aes256-gcm96 >/dev/null
fi

policy plugin-policy.hcl | "$BAO" policy write kmsgate-plugin - >/dev/null
policy controller-policy.hcl | "$BAO" policy write kmsgate-controller - >/dev/null

# The signer's key: made with the asked type, or kept if it exists with that type. A key of
# another type is refused here rather than by the signer at start.
if [ -n "$SIGNER" ]; then
  if existing="$("$BAO" read -field=type "$MOUNT/keys/$SIGNER_KEY" 2>/dev/null)"; then
    if [ "$existing" != "$SIGNER_TYPE" ]; then
      echo "setup.sh: $MOUNT/keys/$SIGNER_KEY exists with type $existing, not $SIGNER_TYPE (use --signer-type $existing, or another --signer-key)" >&2
      exit 1
    fi
  else
    "$BAO" write "$MOUNT/keys/$SIGNER_KEY" type="$SIGNER_TYPE" >/dev/null
  fi
  signer_policy signer-policy.hcl | "$BAO" policy write kmsgate-signer - >/dev/null
  signer_policy controller-signer-policy.hcl | "$BAO" policy write kmsgate-controller-signer - >/dev/null
fi

if [ ${#NODES[@]} -gt 0 ]; then
  if ! mounted auth approle; then
    "$BAO" auth enable approle >/dev/null
  fi
fi
# approle ROLE POLICY IP DIR: a role whose secret_id and tokens work only from IP, carrying only
# POLICY, and its role_id and a new secret_id in DIR.
approle() {
  local role="$1" policy="$2" ip="$3" dir="$4"
  "$BAO" write "auth/approle/role/$role" \
    token_policies="$policy" token_no_default_policy=true token_ttl=1h token_max_ttl=24h \
    secret_id_ttl="$SECRET_ID_TTL" secret_id_num_uses=0 \
    secret_id_bound_cidrs="$ip/32" token_bound_cidrs="$ip/32" >/dev/null
  mkdir -p "$dir"
  rm -f "$dir/role_id" "$dir/secret_id"
  "$BAO" read -field=role_id "auth/approle/role/$role/role-id" > "$dir/role_id"
  "$BAO" write -f -format=json "auth/approle/role/$role/secret-id" > "$dir/secret_id.json"
  sed -n 's/.*"secret_id": "\([^"]*\)".*/\1/p' "$dir/secret_id.json" > "$dir/secret_id"
  sed -n 's/.*"secret_id_accessor": "\([^"]*\)".*/\1/p' "$dir/secret_id.json" > "$dir/secret_id_accessor"
  rm -f "$dir/secret_id.json"
  chmod 0400 "$dir/role_id" "$dir/secret_id"
}

umask 077
for entry in "${NODES[@]}"; do
  node="${entry%%=*}"
  ip="${entry#*=}"
  case "$node" in ''|*[!a-z0-9.-]*) echo "setup.sh: bad node name in $entry" >&2; exit 2 ;; esac
  approle "kmsgate-plugin-$node" kmsgate-plugin "$ip" "$OUT/$node"
  echo "node $node: $OUT/$node/{role_id,secret_id} -> /etc/kmsgate/ on $node (owner 65532, mode 0400)"
  if [ -n "$SIGNER" ]; then
    approle "kmsgate-signer-$node" kmsgate-signer "$ip" "$OUT/$node/signer"
    echo "node $node: $OUT/$node/signer/{role_id,secret_id} -> /etc/kmsgate/signer/ on $node (owner 65532, mode 0400)"
  fi
done

if [ -n "$K8S_HOST" ]; then
  if ! mounted auth kubernetes; then
    "$BAO" auth enable kubernetes >/dev/null
  fi
  "$BAO" write auth/kubernetes/config kubernetes_host="$K8S_HOST" kubernetes_ca_cert=@"$K8S_CA" >/dev/null
  controller_policies=kmsgate-controller
  if [ -n "$SIGNER" ]; then controller_policies="$controller_policies,kmsgate-controller-signer"; fi
  "$BAO" write auth/kubernetes/role/kmsgate-controller \
    bound_service_account_names=kmsgate-controller bound_service_account_namespaces=kmsgate \
    token_policies="$controller_policies" token_no_default_policy=true token_ttl=1h token_max_ttl=4h >/dev/null
  echo "kubernetes auth: role kmsgate-controller for kmsgate/kmsgate-controller (policies $controller_policies)"
fi
if [ -n "$SIGNER" ]; then
  echo "done: mount $MOUNT, key $KEY, signing key $SIGNER_KEY ($SIGNER_TYPE), policies kmsgate-plugin, kmsgate-controller, kmsgate-signer and kmsgate-controller-signer"
else
  echo "done: mount $MOUNT, key $KEY, policies kmsgate-plugin and kmsgate-controller"
fi
