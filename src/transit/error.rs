//! How a Vault client call or its setup fails; shared by the client, its login and its TLS files.

/// Setting up or calling Vault failed. No variant carries a token or credential.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Vault answered with an error status.
    #[error("{address} answered HTTP {status}: {message}")]
    Api { address: String, status: u16, message: String },
    /// A credential file (token, role_id, secret_id, JWT) could not be used.
    #[error("credential file {path}: {problem}")]
    CredentialFile { path: std::path::PathBuf, problem: String },
    /// The caller's deadline passed.
    #[error("Vault did not answer before the deadline")]
    Deadline,
    /// Vault's answer is not the JSON expected.
    #[error("{address} answered with a body that does not parse: {problem}")]
    Decode { address: String, problem: String },
    /// A login answered without a token.
    #[error("login with {method} returned no token")]
    NoToken { method: &'static str },
    /// The HTTP client could not be built.
    #[error("HTTP client setup failed: {0}")]
    Setup(String),
    /// A TLS file (CA bundle, client certificate or key) could not be used.
    #[error("TLS file {path}: {problem}")]
    TlsFile { path: std::path::PathBuf, problem: String },
    /// The address could not be reached, or did not answer in its share of the deadline.
    #[error("{address} is unreachable: {problem}")]
    Transport { address: String, problem: String },
}

impl ClientError {
    /// Whether another address, or a later attempt, may succeed: transport errors, 5xx (except
    /// Transit's refusals of a request), sealed or standby answers (429, 472, 473), redirects not
    /// followed, and 412.
    pub(super) fn retryable(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Api { status, message, .. } => {
                (*status >= 500 && !refused_request(message))
                    || matches!(status, 300..=399 | 412 | 429 | 472 | 473)
            }
            _ => false,
        }
    }
}

/// Whether a 5xx answer is Transit refusing the request itself, which every node refuses alike:
/// a signing version that is retired or does not exist. openbao
/// builtin/logical/transit/path_sign_verify.go, pathSignWrite, returns the user error of
/// sdk/helper/keysutil/policy.go SignWithOptions ("requested version for signing is ...")
/// without an error response, so it arrives as HTTP 500.
fn refused_request(message: &str) -> bool {
    message.contains("requested version for signing is")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_signing_version_is_not_retried_although_it_arrives_as_500() {
        // Recorded from OpenBao 2.7.2: retrying it on every address until the deadline marked
        // healthy nodes failed and turned a retired version into an outage.
        for message in [
            "1 error occurred:\n\t* requested version for signing is less than the minimum encryption key version\n\n",
            "1 error occurred:\n\t* requested version for signing is higher than the latest key version\n\n",
        ] {
            let error = ClientError::Api { address: "http://v".into(), status: 500, message: message.into() };
            assert!(!error.retryable(), "{message}");
        }
        let outage =
            ClientError::Api { address: "http://v".into(), status: 500, message: "internal error".into() };
        assert!(outage.retryable());
    }
}
