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
    /// Whether another address, or a later attempt, may succeed: transport errors, 5xx,
    /// sealed or standby answers (429, 472, 473), redirects not followed, and 412.
    pub(super) fn retryable(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Api { status, .. } => *status >= 500 || matches!(status, 300..=399 | 412 | 429 | 472 | 473),
            _ => false,
        }
    }
}
