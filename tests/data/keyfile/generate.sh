#!/usr/bin/env bash
# Makes the key-file test vectors for src/jwt/keyfile.rs with openssl, and kids.txt: each key's
# kid as kube-apiserver derives it, base64url(SHA-256(PKIX DER)), from `openssl pkey -pubout`.
# The keys are throwaway test keys. Rerun only to replace them (the kids change with them).
set -euo pipefail
cd "$(dirname "$0")"
rm -f ./*.pem kids.txt

openssl genrsa -traditional -out rsa-pkcs1.pem 2048 2>/dev/null
openssl pkcs8 -topk8 -nocrypt -in rsa-pkcs1.pem -out rsa-pkcs8.pem
openssl pkey -in rsa-pkcs1.pem -pubout -out rsa-pkix.pem
openssl rsa -in rsa-pkcs1.pem -RSAPublicKey_out -out rsa-pkcs1-public.pem 2>/dev/null
openssl req -x509 -new -key rsa-pkcs1.pem -subj /CN=rsa -days 3650 -out rsa-cert.pem

# `openssl ecparam -genkey` writes an EC PARAMETERS block before the SEC1 key.
openssl ecparam -name prime256v1 -genkey -out p256-sec1.pem
openssl pkcs8 -topk8 -nocrypt -in p256-sec1.pem -out p256-pkcs8.pem
openssl pkey -in p256-sec1.pem -pubout -out p256-pkix.pem
openssl req -x509 -new -key p256-sec1.pem -subj /CN=p256 -days 3650 -out p256-cert.pem
openssl ec -in p256-sec1.pem -no_public -out p256-sec1-no-public.pem 2>/dev/null
openssl ecparam -name secp384r1 -genkey -noout -out p384-sec1.pem
openssl ecparam -name secp521r1 -genkey -noout -out p521-sec1.pem
openssl pkcs8 -topk8 -nocrypt -in p521-sec1.pem -out p521-pkcs8.pem

openssl genpkey -algorithm ed25519 -out ed25519-pkcs8.pem
openssl pkey -in ed25519-pkcs8.pem -pubout -out ed25519-pkix.pem
openssl ecparam -name secp256k1 -genkey -noout | openssl pkey -pubout -out secp256k1-pkix.pem
openssl ecparam -name secp224r1 -genkey -noout -out p224-sec1.pem

# Several blocks in one file: a certificate, a public key and a private key.
cat rsa-cert.pem p256-pkix.pem p384-sec1.pem > bundle.pem

for key in rsa-pkcs1 p256-sec1 p384-sec1 p521-sec1; do
  kid=$(openssl pkey -in "$key.pem" -pubout -outform DER | openssl dgst -sha256 -binary | basenc --base64url | tr -d '=')
  echo "${key%-*} $kid" >> kids.txt
done
