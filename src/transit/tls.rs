//! TLS for the Vault client: rustls with the ring provider (TLS 1.2 and 1.3 only), a CA bundle
//! file or directory, an optional client certificate, and a fingerprint of those files so a
//! change can be noticed and the client rebuilt without a restart.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use sha2::{Digest, Sha256};

use super::error::ClientError;
use crate::{config::VaultTls, files};

/// SHA-256 over every file's path and contents; changes when any of them changes.
pub fn fingerprint(tls: &VaultTls) -> [u8; 32] {
    let mut hash = Sha256::new();
    for path in files(tls) {
        hash.update(path.as_os_str().as_encoded_bytes());
        match files::read_capped(&path, files::DOCUMENT_MAX_BYTES) {
            Ok(bytes) => hash.update(Sha256::digest(bytes.as_slice())),
            Err(_) => hash.update(b"<unreadable>"),
        }
    }
    hash.finalize().into()
}

fn files(tls: &VaultTls) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(ca) = &tls.ca {
        match ca_dir_files(ca) {
            Some(entries) => files.extend(entries),
            None => files.push(ca.clone()),
        }
    }
    files.extend(tls.client_cert.iter().cloned());
    files.extend(tls.client_key.iter().cloned());
    files
}

/// Builds an HTTP client that trusts exactly the configured roots. Redirects (a standby
/// pointing at the active node) are followed only to `addresses`, at most three hops, since
/// the token header goes along.
pub fn http_client(tls_files: &VaultTls, addresses: &[String]) -> Result<reqwest::Client, ClientError> {
    let roots = roots(tls_files)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Setup(e.to_string()))?
        .with_root_certificates(roots);
    let tls = match (&tls_files.client_cert, &tls_files.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert)?;
            if chain.is_empty() {
                return Err(tls_error(cert, "holds no PEM certificate"));
            }
            let key_pem = read_pem(key)?;
            let private = rustls_pemfile::private_key(&mut key_pem.as_slice())
                .map_err(|e| tls_error(key, &e.to_string()))?
                .ok_or_else(|| tls_error(key, "holds no PEM private key"))?;
            builder.with_client_auth_cert(chain, private).map_err(|e| tls_error(cert, &e.to_string()))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(ClientError::Setup("vault.client_cert and vault.client_key go together".into())),
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(redirect_policy(addresses))
        .no_proxy()
        .build()
        .map_err(|e| ClientError::Setup(e.to_string()))
}

fn roots(tls: &VaultTls) -> Result<rustls::RootCertStore, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let Some(ca) = &tls.ca else {
        for cert in rustls_native_certs::load_native_certs().certs {
            // NB: one unreadable system certificate must not stop the others from loading.
            let _ = roots.add(cert);
        }
        return Ok(roots);
    };
    let files = ca_dir_files(ca).unwrap_or_else(|| vec![ca.clone()]);
    for file in &files {
        for cert in read_certs(file)? {
            roots.add(cert).map_err(|e| tls_error(file, &e.to_string()))?;
        }
    }
    if roots.is_empty() {
        return Err(tls_error(ca, "holds no PEM certificates"));
    }
    Ok(roots)
}

fn redirect_policy(addresses: &[String]) -> reqwest::redirect::Policy {
    let origin = |url: &reqwest::Url| url.origin().ascii_serialization();
    let allowed: Vec<String> =
        addresses.iter().filter_map(|a| reqwest::Url::parse(a).ok()).map(|u| origin(&u)).collect();
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() < 3 && allowed.contains(&origin(attempt.url())) {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// The regular files of a CA directory, sorted; `None` when `path` is not a directory.
fn ca_dir_files(path: &Path) -> Option<Vec<PathBuf>> {
    let entries = std::fs::read_dir(path).ok()?;
    let mut files: Vec<PathBuf> =
        entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    Some(files)
}

fn read_pem(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, ClientError> {
    files::read_capped(path, files::DOCUMENT_MAX_BYTES).map_err(|e| tls_error(path, &e.to_string()))
}

fn read_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ClientError> {
    rustls_pemfile::certs(&mut read_pem(path)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(path, &e.to_string()))
}

fn tls_error(path: &Path, problem: &str) -> ClientError {
    ClientError::TlsFile { path: path.to_owned(), problem: problem.to_owned() }
}
