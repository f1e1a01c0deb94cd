//! A read-only etcd v3 client over tonic: one lazily connected channel per endpoint, a range read
//! that moves on to the next endpoint when one is unavailable, and user/password authentication
//! with the token etcd expects in the `token` metadata of each request.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use tonic::{
    Code, Status,
    metadata::AsciiMetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{ScanError, describe};
use crate::{
    config::EtcdConfig,
    files,
    proto::etcd::etcdserverpb::{
        AuthenticateRequest, AuthenticateResponse, RangeRequest, RangeResponse, auth_client::AuthClient,
        kv_client::KvClient,
    },
};

/// How long connecting to one endpoint (TCP and TLS) may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one request may take once connected, its whole answer included. A page of the default
/// size arrives in well under a second; a member that accepts connections but never answers, or
/// stops sending halfway through a page, must fail the read with an error instead of holding the
/// scan (and the controller's step) forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How often an HTTP/2 ping checks a connection with a request in flight, and how long its answer
/// may take: a path that died silently (a dropped NAT entry, a partitioned member) is found in
/// seconds instead of at [`REQUEST_TIMEOUT`]. The interval stays above the 5 s minimum etcd
/// enforces by default (its `--grpc-keepalive-min-time`).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The metadata key etcd reads the auth token from (etcd-io/etcd v3.4.23
/// etcdserver/api/v3rpc/rpctypes/metadatafields.go, `TokenFieldNameGRPC`).
const TOKEN: &str = "token";

/// A read-only etcd client; clones share the channels, the endpoint in use and the token.
#[derive(Clone)]
pub struct Client {
    members: Arc<[Member]>,
    /// The endpoint that answered last: calls start there.
    current: Arc<AtomicUsize>,
    auth: Option<Arc<Auth>>,
    /// How long one Range or Authenticate may take, answer included.
    request_timeout: Duration,
}

/// One endpoint and its channel, which connects on first use and reconnects after a failure.
struct Member {
    endpoint: String,
    channel: Channel,
}

/// The credentials and the token they last bought.
struct Auth {
    user: String,
    password: SecretString,
    token: ArcSwapOption<AsciiMetadataValue>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints())
            .field("user", &self.auth.as_ref().map(|a| &a.user))
            .finish_non_exhaustive()
    }
}

/// Connects to etcd with the given TLS and authentication. Without a user nothing is sent yet (the
/// first read connects); with one, the password is exchanged for a token now, so a refused
/// password fails here.
pub async fn connect(settings: &EtcdConfig) -> Result<Client, ScanError> {
    let refused = |reason: String| ScanError::Connect { endpoints: settings.endpoints.clone(), reason };
    if settings.endpoints.is_empty() {
        return Err(refused("no endpoint given".into()));
    }
    let tls = tls(settings)?;
    let members = settings
        .endpoints
        .iter()
        .map(|endpoint| {
            Ok(Member {
                endpoint: endpoint.clone(),
                channel: channel(endpoint, tls.as_ref(), REQUEST_TIMEOUT)?,
            })
        })
        .collect::<Result<Arc<[Member]>, String>>()
        .map_err(refused)?;
    let auth = match (&settings.user, &settings.password_file) {
        (Some(user), Some(file)) => {
            let password = files::read_text_capped(file, files::CREDENTIAL_MAX_BYTES)
                .map_err(|source| ScanError::File { path: file.clone(), source })?;
            let password = SecretString::from(password.trim().to_owned());
            Some(Arc::new(Auth { user: user.clone(), password, token: ArcSwapOption::empty() }))
        }
        _ => None,
    };
    let client =
        Client { members, current: Arc::new(AtomicUsize::new(0)), auth, request_timeout: REQUEST_TIMEOUT };
    if client.auth.is_some() {
        client.failover(|at| Box::pin(client.authenticate(at))).await.map_err(|e| refused(describe(&e)))?;
    }
    Ok(client)
}

impl Client {
    /// The endpoints, as configured.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.endpoint.clone()).collect()
    }

    /// The same client with another limit on how long one request may take, answer included.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// One range read, accepting answers of up to `max_bytes`.
    pub(super) async fn range(
        &self,
        request: &RangeRequest,
        max_bytes: usize,
    ) -> Result<RangeResponse, Status> {
        self.failover(|at| Box::pin(self.range_at(at, request, max_bytes))).await
    }

    /// One range read at endpoint `at`; a token etcd refuses is renewed, once.
    async fn range_at(
        &self,
        at: usize,
        request: &RangeRequest,
        max_bytes: usize,
    ) -> Result<RangeResponse, Status> {
        let mut kv = KvClient::new(self.members[at].channel.clone()).max_decoding_message_size(max_bytes);
        let mut renewed = false;
        loop {
            let mut call = tonic::Request::new(request.clone());
            if let Some(auth) = &self.auth
                && let Some(token) = auth.token.load_full()
            {
                call.metadata_mut().insert(TOKEN, (*token).clone());
            }
            match self.in_time(kv.range(call)).await {
                Ok(answer) => return Ok(answer.into_inner()),
                Err(e) if self.auth.is_some() && !renewed && token_refused(&e) => {
                    tracing::debug!(endpoint = %self.members[at].endpoint, "etcd refused the auth token; renewing it");
                    self.authenticate(at).await?;
                    renewed = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `call` against the endpoint in use, then each next one while the answer says the
    /// endpoint, not the request, failed ([`try_elsewhere`]), and keeps the one that answered for
    /// later calls. Only reads and Authenticate go through here, which are safe to repeat.
    async fn failover<'a, T>(
        &self,
        mut call: impl FnMut(usize) -> BoxFuture<'a, Result<T, Status>>,
    ) -> Result<T, Status> {
        let count = self.members.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = Status::unavailable("no etcd endpoint");
        for step in 0..count {
            let at = (start + step) % count;
            match call(at).await {
                Ok(answer) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(e) if try_elsewhere(&e) => {
                    tracing::debug!(endpoint = %self.members[at].endpoint, error = %describe(&e), "etcd endpoint failed; trying the next");
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Exchanges the password for a token at endpoint `at`, for every later request.
    async fn authenticate(&self, at: usize) -> Result<(), Status> {
        let Some(auth) = &self.auth else { return Ok(()) };
        let request = AuthenticateRequest {
            name: auth.user.clone(),
            password: auth.password.expose_secret().to_owned(),
        };
        let mut client = AuthClient::new(self.members[at].channel.clone());
        let answer = self.in_time(client.authenticate(request)).await?.into_inner();
        auth.token.store(Some(Arc::new(token_value(&answer)?)));
        Ok(())
    }

    /// `call`, failed with DeadlineExceeded when it takes longer than the request timeout. tonic's
    /// own timeout only covers the wait for the response headers, not the body after them.
    async fn in_time<T>(&self, call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(answer) => answer,
            Err(elapsed) => {
                let mut status = Status::deadline_exceeded(format!(
                    "etcd did not answer within {}",
                    humantime::format_duration(self.request_timeout)
                ));
                status.set_source(Arc::new(elapsed));
                Err(status)
            }
        }
    }
}

/// The token of an Authenticate answer as request metadata, marked sensitive so that its Debug
/// output hides it and HTTP/2 header compression never indexes it.
fn token_value(answer: &AuthenticateResponse) -> Result<AsciiMetadataValue, Status> {
    let mut token = AsciiMetadataValue::try_from(answer.token.as_str())
        .map_err(|_| Status::internal("etcd answered Authenticate with a token that is not ASCII"))?;
    token.set_sensitive(true);
    Ok(token)
}

// The password and token copies in the protobuf messages are wiped when the messages are dropped:
// tonic takes the request by value, so there is no later point at which we could wipe it. The
// metadata value's own copy of the token lives in `Bytes`, which cannot be wiped; it is kept for
// the client's lifetime anyway.
impl Drop for AuthenticateRequest {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.password);
    }
}

impl Drop for AuthenticateResponse {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.token);
    }
}

/// Whether a failed Range or Authenticate should be tried at the next endpoint: Unavailable, the
/// one answer on which etcd's own client moves on (etcd-io/etcd v3.4.23 clientv3/retry.go,
/// `isSafeRetryImmutableRPC`; an unreachable endpoint's connect error is Unavailable too), and
/// also any failure of the way to this endpoint rather than an answer from etcd: our timeout,
/// tonic's (Cancelled) and a broken connection. Those are the statuses with a source error; a
/// status etcd sent arrives in the trailers and has none. Without those, a hung member would
/// stay the one every call starts at, and fail each of them.
fn try_elsewhere(error: &Status) -> bool {
    error.code() == Code::Unavailable || std::error::Error::source(error).is_some()
}

/// Whether etcd refused the token itself (expired, or issued before an auth change), so a new one
/// may succeed: the answers on which etcd's own client authenticates again (etcd-io/etcd v3.4.23
/// clientv3/retry_interceptor.go, `shouldRefreshToken`; the messages from
/// etcdserver/api/v3rpc/rpctypes/error.go).
fn token_refused(error: &Status) -> bool {
    match error.code() {
        Code::Unauthenticated => error.message().contains("invalid auth token"),
        Code::InvalidArgument => {
            error.message().contains("revision of auth store is old")
                || error.message().contains("user name is empty")
        }
        _ => false,
    }
}

/// The TLS settings: `None` when neither a CA nor a client certificate is configured.
fn tls(settings: &EtcdConfig) -> Result<Option<ClientTlsConfig>, ScanError> {
    let read = |path: &PathBuf| {
        files::read_capped(path, files::DOCUMENT_MAX_BYTES)
            .map_err(|source| ScanError::File { path: path.clone(), source })
    };
    if settings.ca.is_none() && settings.cert.is_none() {
        return Ok(None);
    }
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &settings.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&settings.cert, &settings.key) {
        let key = read(key)?;
        tls = tls.identity(Identity::from_pem(read(cert)?, key));
    }
    Ok(Some(tls))
}

/// A lazily connected channel to one endpoint. An endpoint without a scheme is https when TLS is
/// configured and http otherwise; an http:// endpoint with TLS configured is a mistake, not a
/// silent downgrade.
fn channel(endpoint: &str, tls: Option<&ClientTlsConfig>, timeout: Duration) -> Result<Channel, String> {
    let url = if endpoint.starts_with("https://") {
        endpoint.to_owned()
    } else if endpoint.starts_with("http://") {
        if tls.is_some() {
            return Err(format!("{endpoint}: TLS options are only supported with HTTPS URLs"));
        }
        endpoint.to_owned()
    } else if tls.is_some() {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    };
    let https = url.starts_with("https://");
    let invalid = |e: tonic::transport::Error| format!("{endpoint}: {}", crate::error::chain(&e));
    // NB: no pings while idle: a gRPC server enforcing grpc-go's default keepalive policy
    // (`keepalive.EnforcementPolicy`, PermitWithoutStream false) closes a connection pinged while
    // it has no stream; the pings matter only while a request waits anyway.
    let mut builder = Endpoint::from_shared(url)
        .map_err(invalid)?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(false);
    if https {
        builder = builder.tls_config(tls.cloned().unwrap_or_default()).map_err(invalid)?;
    }
    Ok(builder.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_member_that_never_answers_fails_the_read_instead_of_holding_it() {
        // A listener that accepts and then says nothing: TCP connects, HTTP/2 never starts.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let _held = std::thread::spawn(move || {
            let open: Vec<_> = listener.incoming().take(4).collect();
            std::thread::sleep(Duration::from_secs(30));
            drop(open);
        });
        let channel = channel(&endpoint, None, Duration::from_millis(300)).unwrap();
        let client = Client {
            members: Arc::from(vec![Member { endpoint: endpoint.clone(), channel }]),
            current: Arc::new(AtomicUsize::new(0)),
            auth: None,
            request_timeout: REQUEST_TIMEOUT,
        };
        let request = RangeRequest::default();
        let read = client.range(&request, 1024);
        let answer = tokio::time::timeout(Duration::from_secs(10), read).await;
        let error = answer.expect("the read must end on its own timeout").unwrap_err();
        // NB: tonic's own timeout (the wait for response headers) fires first, as Cancelled.
        assert_eq!((error.code(), error.message()), (Code::Cancelled, "Timeout expired"), "{error:?}");
        assert!(try_elsewhere(&error), "a hung member is passed over");
    }

    #[test]
    fn only_failures_of_the_endpoint_move_to_the_next() {
        assert!(try_elsewhere(&Status::unavailable("etcdserver: leader changed")));
        let broken = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert!(try_elsewhere(&broken), "{broken:?}");
        // etcd's own answers about the request are the same at every member.
        assert!(!try_elsewhere(&Status::permission_denied("etcdserver: permission denied")));
        assert!(!try_elsewhere(&Status::out_of_range(
            "etcdserver: mvcc: required revision has been compacted"
        )));
        assert!(!try_elsewhere(&Status::out_of_range("Error, decoded message length too large")));
    }

    #[test]
    fn the_token_is_sent_as_sensitive_metadata_and_never_shown() {
        let answer = AuthenticateResponse { header: None, token: "tok.en-7310".into() };
        let token = token_value(&answer).unwrap();
        assert!(token.is_sensitive());
        assert_eq!(token.to_str().unwrap(), "tok.en-7310", "the value itself is sent unchanged");
        assert!(!format!("{token:?}").contains("7310"), "{token:?}");
        let refused = AuthenticateResponse { header: None, token: "two\nlines".into() };
        assert_eq!(token_value(&refused).unwrap_err().code(), Code::Internal);
    }

    #[test]
    fn only_a_refused_token_is_renewed() {
        assert!(token_refused(&Status::unauthenticated("etcdserver: invalid auth token")));
        assert!(token_refused(&Status::invalid_argument("etcdserver: revision of auth store is old")));
        assert!(token_refused(&Status::invalid_argument("etcdserver: user name is empty")));
        let wrong_password = "etcdserver: authentication failed, invalid user ID or password";
        assert!(!token_refused(&Status::invalid_argument(wrong_password)));
        assert!(!token_refused(&Status::permission_denied("etcdserver: permission denied")));
    }

    #[tokio::test]
    async fn endpoints_are_checked_against_the_tls_settings() {
        let tls = ClientTlsConfig::new();
        let err = channel("http://127.0.0.1:2379", Some(&tls), REQUEST_TIMEOUT).unwrap_err();
        assert!(err.contains("http://127.0.0.1:2379") && err.contains("HTTPS"), "{err}");
        assert!(channel("127.0.0.1:2379", None, REQUEST_TIMEOUT).is_ok());
        assert!(channel("https://127.0.0.1:2379", None, REQUEST_TIMEOUT).is_ok());
        let err = channel("http://bad host:1", None, REQUEST_TIMEOUT).unwrap_err();
        assert!(err.contains("bad host"), "{err}");
    }

    #[tokio::test]
    async fn no_endpoint_is_refused_by_name() {
        let err = connect(&EtcdConfig::default()).await.unwrap_err();
        assert_eq!(err.to_string(), "cannot connect to etcd []: no endpoint given");
    }
}
