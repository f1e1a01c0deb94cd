# kmsgate-controller: what `kmsgate controller`, `rotate` and `retire` call, nothing more. It
# never encrypts or decrypts. setup.sh replaces the mount "transit" and key "kmsgate".

# Read the key's versions.
path "transit/keys/kmsgate" {
  capabilities = ["read"]
}

# Make a new version.
path "transit/keys/kmsgate/rotate" {
  capabilities = ["update"]
}

# Retire old versions, and nothing else: deletion_allowed, exportable, auto_rotate_period and the
# rest of the key's config stay out of reach.
path "transit/keys/kmsgate/config" {
  capabilities = ["update"]
  allowed_parameters = {
    "min_decryption_version" = []
  }
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
