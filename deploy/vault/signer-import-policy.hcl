# kmsgate-signer-import: a one-time operator policy for the optional first step of a migration
# from kubeadm's sa.key (docs/runbooks/signer-migration.md): import sa.key into Transit as the
# signer's key, so the first version signs with the old kid. `bao transit import` reads the
# mount's wrapping key and writes the wrapped key to the import endpoint; nothing else. Revoke
# the token once the key is imported. Replace the mount "transit" and key "kmsgate-signer" when
# you use others.

# The RSA-4096 public key that wraps the ephemeral AES key (read by the CLI before it wraps).
path "transit/wrapping_key" {
  capabilities = ["read"]
}

# Create the key from the wrapped sa.key (fails if the key already exists).
path "transit/keys/kmsgate-signer/import" {
  capabilities = ["update"]
}
