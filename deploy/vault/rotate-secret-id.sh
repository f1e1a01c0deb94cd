#!/usr/bin/env bash
# Rotates one node's AppRole secret_id without a gap:
#
#   deploy/vault/rotate-secret-id.sh NODE [OUT]           # 1. issue a new secret_id
#   # 2. copy OUT/NODE/secret_id to /etc/kmsgate/secret_id on NODE (write a temp file, then mv);
#   #    the plugin notices the change and logs in with it (watch its log or /status)
#   deploy/vault/rotate-secret-id.sh --finish NODE [OUT]  # 3. destroy every other secret_id
#
# With --signer (before NODE) it rotates the node's signer identity instead: role
# kmsgate-signer-NODE, credentials in OUT/NODE/signer/, installed in /etc/kmsgate/signer/.
# OUT defaults to ./kmsgate-credentials, as in setup.sh. Needs VAULT_ADDR and an admin VAULT_TOKEN.
set -euo pipefail

finish=""
identity=plugin
while [ $# -gt 0 ]; do
  case "$1" in
    --finish) finish=1; shift ;;
    --signer) identity=signer; shift ;;
    *) break ;;
  esac
done
node="${1:?usage: rotate-secret-id.sh [--finish] [--signer] NODE [OUT]}"
OUT="${2:-./kmsgate-credentials}"
case "$node" in *[!a-z0-9.-]*) echo "rotate-secret-id.sh: bad node name $node" >&2; exit 2 ;; esac
BAO="${BAO:-$(command -v bao || command -v vault || true)}"
[ -n "$BAO" ] || { echo "rotate-secret-id.sh: neither bao nor vault is on PATH (or set BAO)" >&2; exit 2; }
: "${VAULT_ADDR:?set VAULT_ADDR}" "${VAULT_TOKEN:?set VAULT_TOKEN}"
export BAO_ADDR="$VAULT_ADDR" BAO_TOKEN="$VAULT_TOKEN"
role="kmsgate-$identity-$node"
dir="$OUT/$node"
again="$node"
if [ "$identity" = signer ]; then dir="$OUT/$node/signer"; again="--signer $node"; fi
umask 077

if [ -z "$finish" ]; then
  mkdir -p "$dir"
  "$BAO" write -f -format=json "auth/approle/role/$role/secret-id" > "$dir/secret_id.json"
  rm -f "$dir/secret_id"
  sed -n 's/.*"secret_id": "\([^"]*\)".*/\1/p' "$dir/secret_id.json" > "$dir/secret_id"
  sed -n 's/.*"secret_id_accessor": "\([^"]*\)".*/\1/p' "$dir/secret_id.json" > "$dir/secret_id_accessor"
  rm -f "$dir/secret_id.json"
  chmod 0400 "$dir/secret_id"
  echo "new secret_id for $node in $dir/secret_id; install it, then run: $0 --finish $again $OUT"
  exit 0
fi

keep="$(cat "$dir/secret_id_accessor")"
[ -n "$keep" ] || { echo "rotate-secret-id.sh: no accessor recorded in $dir" >&2; exit 2; }
destroyed=0
for accessor in $("$BAO" list -format=json "auth/approle/role/$role/secret-id" | tr -d '[]", ' | tr '\n' ' '); do
  [ -z "$accessor" ] || [ "$accessor" = "$keep" ] && continue
  "$BAO" write "auth/approle/role/$role/secret-id-accessor/destroy" secret_id_accessor="$accessor" >/dev/null
  destroyed=$((destroyed + 1))
done
echo "destroyed $destroyed old secret_id(s) of $node; kept $keep"
