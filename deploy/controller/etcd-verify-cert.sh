#!/usr/bin/env bash
# Run as root on each control-plane node of a kubeadm cluster: makes the verify Job's own etcd
# client certificate in /etc/kmsgate/etcd-pki, readable only by uid 65532 (the Job's user), so
# the Job needs neither root nor kubeadm's root-only keys. Re-run to renew (valid 365 days).
#
# etcd without auth lets any client certificate its CA signed read and write everything; the
# Job only reads, but if you enable etcd auth (--client-cert-auth with users), give the user
# "kmsgate-verify" (the certificate's CN) a role that can only read the prefix:
#   etcdctl role add kmsgate-read && etcdctl role grant-permission kmsgate-read read /registry/ --prefix
#   etcdctl user add kmsgate-verify --no-password && etcdctl user grant-role kmsgate-verify kmsgate-read
set -euo pipefail

CA_DIR="${ETCD_PKI:-/etc/kubernetes/pki/etcd}"
OUT="${OUT_DIR:-/etc/kmsgate/etcd-pki}"
OWNER="${OWNER:-65532}"

# NB: ownership is set only as root (as intended); run unprivileged, files stay the caller's.
if [ "$(id -u)" -eq 0 ]; then
  dir_owner=(-o root -g "$OWNER"); ca_owner=(-o root -g root); key_owner=(-o "$OWNER" -g "$OWNER")
else
  dir_owner=(); ca_owner=(); key_owner=()
fi

umask 077
install -d -m 0750 "${dir_owner[@]}" "$OUT"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/key.pem"
openssl req -new -key "$work/key.pem" -subj "/CN=kmsgate-verify" -out "$work/req.csr"
printf 'extendedKeyUsage = clientAuth\nkeyUsage = digitalSignature\n' > "$work/ext.cnf"
openssl x509 -req -in "$work/req.csr" -CA "$CA_DIR/ca.crt" -CAkey "$CA_DIR/ca.key" \
  -CAcreateserial -CAserial "$work/ca.srl" -days 365 -sha256 -extfile "$work/ext.cnf" -out "$work/cert.pem"

install -m 0444 "${ca_owner[@]}" "$CA_DIR/ca.crt" "$OUT/ca.crt"
install -m 0400 "${key_owner[@]}" "$work/cert.pem" "$OUT/kmsgate-verify.crt"
install -m 0400 "${key_owner[@]}" "$work/key.pem" "$OUT/kmsgate-verify.key"
echo "wrote $OUT/kmsgate-verify.{crt,key} (owner $OWNER) and $OUT/ca.crt"
