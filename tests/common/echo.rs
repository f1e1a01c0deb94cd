//! The gRPC floor the benchmarks measure kmsgate's servers against: a KMS v2 service and an
//! ExternalJWTSigner service (v1) that do no work, on one unix socket, with the plugin's and the
//! signer's HTTP/2 limits. Run in a child process of its own, so its CPU per call is a bare gRPC
//! server's.

use std::path::Path;

use kmsgate::proto::{
    externaljwt::v1::{
        self, FetchKeysRequest, FetchKeysResponse, MetadataRequest, MetadataResponse, SignJwtRequest,
        SignJwtResponse,
        external_jwt_signer_server::{ExternalJwtSigner, ExternalJwtSignerServer},
    },
    v2::{
        DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
        key_management_service_server::{KeyManagementService, KeyManagementServiceServer},
    },
};

/// A service that answers every call at once: KMS v2 echoes its input, the signer answers with
/// fixed messages of the real ones' shape and size.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

#[tonic::async_trait]
impl KeyManagementService for Echo {
    async fn status(
        &self,
        _: tonic::Request<StatusRequest>,
    ) -> Result<tonic::Response<StatusResponse>, tonic::Status> {
        Ok(tonic::Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: "echo".into(),
        }))
    }

    async fn encrypt(
        &self,
        request: tonic::Request<EncryptRequest>,
    ) -> Result<tonic::Response<EncryptResponse>, tonic::Status> {
        let request = request.into_inner();
        Ok(tonic::Response::new(EncryptResponse {
            ciphertext: request.plaintext,
            key_id: "echo".into(),
            annotations: Default::default(),
        }))
    }

    async fn decrypt(
        &self,
        request: tonic::Request<DecryptRequest>,
    ) -> Result<tonic::Response<DecryptResponse>, tonic::Status> {
        Ok(tonic::Response::new(DecryptResponse { plaintext: request.into_inner().ciphertext }))
    }
}

/// Bytes of a P-256 PKIX public key (DER SubjectPublicKeyInfo), the signer's ES256 key.
const P256_PKIX_LEN: usize = 91;

#[tonic::async_trait]
impl ExternalJwtSigner for Echo {
    async fn sign(
        &self,
        request: tonic::Request<SignJwtRequest>,
    ) -> Result<tonic::Response<SignJwtResponse>, tonic::Status> {
        Ok(tonic::Response::new(SignJwtResponse {
            header: request.into_inner().claims,
            signature: "s".repeat(86),
        }))
    }

    async fn fetch_keys(
        &self,
        _: tonic::Request<FetchKeysRequest>,
    ) -> Result<tonic::Response<FetchKeysResponse>, tonic::Status> {
        // One key with a kid and key of the sizes the signer publishes for one ES256 version.
        Ok(tonic::Response::new(FetchKeysResponse {
            keys: vec![v1::Key {
                key_id: "k".repeat(43),
                key: vec![4; P256_PKIX_LEN],
                exclude_from_oidc_discovery: false,
            }],
            data_timestamp: Some(prost_types::Timestamp { seconds: 1_800_000_000, nanos: 0 }),
            refresh_hint_seconds: 60,
        }))
    }

    async fn metadata(
        &self,
        _: tonic::Request<MetadataRequest>,
    ) -> Result<tonic::Response<MetadataResponse>, tonic::Status> {
        Ok(tonic::Response::new(MetadataResponse { max_token_expiration_seconds: 24 * 3600 }))
    }
}

/// Serves [`Echo`] on `socket` until the process is killed, printing `ready` once it listens,
/// with the plugin's server settings (the same HTTP/2 limits).
pub async fn serve(socket: &Path) {
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    println!("ready");
    tonic::transport::Server::builder()
        .max_concurrent_streams(1024)
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024)
        .http2_max_header_list_size(16 * 1024)
        .add_service(KeyManagementServiceServer::new(Echo).max_decoding_message_size(64 * 1024))
        .add_service(ExternalJwtSignerServer::new(Echo).max_decoding_message_size(64 * 1024))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .unwrap();
}
