# kmsgate-signer: what `kmsgate signer` calls, nothing more. It signs service-account tokens with
# one Transit key and reads that key's public keys; it cannot rotate or configure the key, nor
# use any other. setup.sh replaces the mount "transit" and key "kmsgate-signer" when you use
# others.

# Sign a token's header and claims with an explicit key version (hash, JWS marshaling and
# PKCS#1 v1.5 go in the body, so the `sign/<key>/<hash>` form is not needed).
path "transit/sign/kmsgate-signer" {
  capabilities = ["update"]
}

# Key metadata: each version's public key and creation time, and the floors, for FetchKeys and
# for choosing the signing version.
path "transit/keys/kmsgate-signer" {
  capabilities = ["read"]
}

# Its own token: renew before expiry, and look it up to learn the TTL.
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
