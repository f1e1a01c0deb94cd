# kmsgate-controller-signer: what the controller's signing-key rotation calls on the signer's
# key, nothing more; written by setup.sh --signer and given to the controller beside
# kmsgate-controller. It never signs. setup.sh replaces the mount "transit" and key
# "kmsgate-signer" when you use others.

# Read the key's versions, floors and public keys.
path "transit/keys/kmsgate-signer" {
  capabilities = ["read"]
}

# Make a new version.
path "transit/keys/kmsgate-signer/rotate" {
  capabilities = ["update"]
}

# Pin, switch and retire: min_encryption_version chooses the version that signs,
# min_decryption_version stops publishing older ones. deletion_allowed, exportable,
# auto_rotate_period and the rest of the key's config stay out of reach.
path "transit/keys/kmsgate-signer/config" {
  capabilities = ["update"]
  allowed_parameters = {
    "min_encryption_version" = []
    "min_decryption_version" = []
  }
}
