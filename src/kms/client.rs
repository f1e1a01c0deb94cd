//! A KMS v2 client over a plugin's unix socket, dialled as kube-apiserver dials it; selftest,
//! `audit --deep` and the tests drive plugins through it.

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::{config::SocketSpec, proto::v2::key_management_service_client::KeyManagementServiceClient};

/// A KMS v2 client over the plugin's socket.
pub type KmsClient = KeyManagementServiceClient<Channel>;

/// The socket could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {endpoint}: {source}")]
pub struct ConnectError {
    endpoint: String,
    #[source]
    source: tonic::transport::Error,
}

/// Connects to a plugin socket (a path or an abstract `@name`), as the API server does.
pub async fn connect(socket: &SocketSpec) -> Result<KmsClient, ConnectError> {
    let target = socket.clone();
    // NB: the URI is a placeholder; the connector below dials the socket. The API server sends
    // :authority localhost too.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let target = target.clone();
            async move { dial(&target).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ConnectError { endpoint: socket.endpoint(), source })?;
    Ok(KeyManagementServiceClient::new(channel))
}

async fn dial(socket: &SocketSpec) -> std::io::Result<tokio::net::UnixStream> {
    match socket {
        SocketSpec::Path(path) => tokio::net::UnixStream::connect(path).await,
        SocketSpec::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            let stream = std::os::unix::net::UnixStream::connect_addr(&addr)?;
            stream.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(stream)
        }
    }
}
