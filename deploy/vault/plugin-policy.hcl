# kmsgate-plugin: what `kmsgate plugin` calls, nothing more. setup.sh replaces the mount
# "transit" and key "kmsgate" when you use others.

# Wrap and unwrap the API server's data-key seeds (batch calls use the same paths).
path "transit/encrypt/kmsgate" {
  capabilities = ["update"]
}
path "transit/decrypt/kmsgate" {
  capabilities = ["update"]
}

# Key metadata: the latest version and min_decryption_version, for Status and promotion.
path "transit/keys/kmsgate" {
  capabilities = ["read"]
}

# Its own token: renew before expiry, and look it up to learn the TTL.
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
