//! How the Vault client gets a token: a token file, or a login (AppRole, TLS certificate, JWT,
//! Kubernetes). Credentials are read from files at login time and live only in zeroizing buffers.

use std::path::Path;

use serde_json::json;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::error::ClientError;
use crate::{config::VaultAuth, files};

/// A login call: the path below `/v1/` and the JSON body holding the credentials.
pub type LoginRequest = (String, Zeroizing<Vec<u8>>);

/// SHA-256 over the credential files, to notice a change without keeping their contents.
pub fn fingerprint(auth: &VaultAuth) -> [u8; 32] {
    let mut hash = Sha256::new();
    for path in auth.files() {
        match files::read_capped(path, files::CREDENTIAL_MAX_BYTES) {
            Ok(bytes) => hash.update(Sha256::digest(bytes.as_slice())),
            Err(_) => hash.update(b"<unreadable>"),
        }
    }
    hash.finalize().into()
}

/// The login path and JSON body, or `None` for a token file.
pub fn login_request(auth: &VaultAuth) -> Result<Option<LoginRequest>, ClientError> {
    let (mount, body) = match auth {
        VaultAuth::Token { .. } => return Ok(None),
        VaultAuth::AppRole { mount, role_id_file, secret_id_file } => {
            let role_id = read_secret(role_id_file)?;
            let secret_id = read_secret(secret_id_file)?;
            (mount, json!({ "role_id": role_id.as_str(), "secret_id": secret_id.as_str() }))
        }
        VaultAuth::Cert { mount, role } if role.is_empty() => (mount, json!({})),
        VaultAuth::Cert { mount, role } => (mount, json!({ "name": role })),
        VaultAuth::Jwt { mount, role, jwt_file } | VaultAuth::Kubernetes { mount, role, jwt_file } => {
            let jwt = read_secret(jwt_file)?;
            (mount, json!({ "role": role, "jwt": jwt.as_str() }))
        }
    };
    let body = Zeroizing::new(serde_json::to_vec(&body).map_err(|e| ClientError::Setup(e.to_string()))?);
    Ok(Some((format!("auth/{mount}/login"), body)))
}

/// Reads a one-line credential file; the value never appears in errors.
pub fn read_secret(path: &Path) -> Result<Zeroizing<String>, ClientError> {
    let problem = |problem: String| ClientError::CredentialFile { path: path.to_owned(), problem };
    let text =
        files::read_text_capped(path, files::CREDENTIAL_MAX_BYTES).map_err(|e| problem(e.to_string()))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(problem("it is empty".into()));
    }
    Ok(Zeroizing::new(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_bodies_carry_credentials_that_errors_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let role = dir.path().join("role_id");
        let secret = dir.path().join("secret_id");
        std::fs::write(&role, "role-123\n").unwrap();
        std::fs::write(&secret, "secret-456\n").unwrap();
        let method = VaultAuth::AppRole {
            mount: "approle".into(),
            role_id_file: role,
            secret_id_file: secret.clone(),
        };
        let (path, body) = login_request(&method).unwrap().unwrap();
        assert_eq!(path, "auth/approle/login");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body, json!({"role_id": "role-123", "secret_id": "secret-456"}));
        let before = fingerprint(&method);
        std::fs::write(&secret, "").unwrap();
        assert_ne!(fingerprint(&method), before);
        let err = login_request(&method).unwrap_err().to_string();
        assert!(err.contains("empty") && !err.contains("secret-456"), "{err}");
        assert!(!format!("{method:?}").contains("secret-456"));
    }
}
