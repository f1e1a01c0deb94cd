//! A server's unix socket (the KMS plugin's and the signer's): created with its final mode and group before anyone can connect,
//! never replacing anything but a stale socket, and removed on exit.

use std::{
    fs,
    io::ErrorKind,
    os::unix::{
        fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
        net::{UnixListener as StdListener, UnixStream as StdStream},
    },
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};

use crate::{
    backoff::AcceptBackoff,
    config::{DirCheck, SocketConfig, SocketSpec},
};

/// The socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// The parent directory does not exist and may not be created.
    #[error(
        "socket directory {0} does not exist (create it, set {1}.create_socket_dir = true, or put the \
         socket elsewhere with --socket PATH)"
    )]
    DirectoryMissing(PathBuf, &'static str),
    /// The socket's directory, or one above it, lets another user replace the socket.
    #[error(
        "socket directory {dir} is {why}, so another local user could rename the socket and bind \
         their own to read what the API server sends; fix its mode, or set \
         {section}.socket_dir_check = warn for a pod volume shared with the API server"
    )]
    DirectoryWritable { dir: PathBuf, why: String, section: &'static str },
    /// Another process serves the socket.
    #[error("socket {0} is in use by a running process")]
    InUse(PathBuf),
    /// A system call failed.
    #[error("socket {path}: {action}: {source}")]
    Io {
        path: String,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Something other than a socket is at the path.
    #[error("refusing to replace {0}: it exists and is not a socket")]
    NotASocket(PathBuf),
}

/// Removes the socket file on drop, if it is still the one this process made.
#[derive(Debug)]
pub struct SocketGuard {
    path: Option<(PathBuf, u64, u64)>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let Some((path, dev, ino)) = &self.path else { return };
        // NB: only unlink our own inode; a successor may already have bound the same path.
        if fs::symlink_metadata(path).is_ok_and(|m| m.dev() == *dev && m.ino() == *ino) {
            let _ = fs::remove_file(path);
        }
    }
}

/// Binds the configured socket.
pub fn bind(config: &SocketConfig) -> Result<(UnixListener, SocketGuard), SocketError> {
    let (std_listener, guard) = match &config.spec {
        SocketSpec::Abstract(name) => (bind_abstract(name)?, SocketGuard { path: None }),
        SocketSpec::Path(path) => bind_path(path, config)?,
    };
    let io = |action, source| SocketError::Io { path: config.spec.endpoint(), action, source };
    std_listener.set_nonblocking(true).map_err(|e| io("set non-blocking", e))?;
    let listener = UnixListener::from_std(std_listener).map_err(|e| io("register with the runtime", e))?;
    Ok((listener, guard))
}

fn bind_abstract(name: &str) -> Result<StdListener, SocketError> {
    use std::os::linux::net::SocketAddrExt;
    let io = |action, source| SocketError::Io { path: format!("@{name}"), action, source };
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(|e| io("name", e))?;
    StdListener::bind_addr(&addr).map_err(|e| io("bind", e))
}

fn bind_path(path: &Path, config: &SocketConfig) -> Result<(StdListener, SocketGuard), SocketError> {
    let io = |action, source| SocketError::Io { path: path.display().to_string(), action, source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("/"));
    if !dir.exists() {
        if !config.create_dir {
            return Err(SocketError::DirectoryMissing(dir.to_owned(), config.section));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| io("create directory (or put the socket elsewhere with --socket PATH)", e))?;
    }
    // NB: resolve first (`/var/run` is a symlink), check, then bind under the resolved path, so a
    // symlink swapped in after the check cannot redirect the bind.
    let dir = fs::canonicalize(dir).map_err(|e| io("resolve directory", e))?;
    let path = &dir.join(path.file_name().unwrap_or(path.as_os_str()));
    if let Some((writable, why)) =
        writable_by_others(&dir, config.gid, config.section).map_err(|e| io("stat", e))?
    {
        match config.dir_check {
            DirCheck::Refuse => {
                return Err(SocketError::DirectoryWritable { dir: writable, why, section: config.section });
            }
            DirCheck::Warn => tracing::warn!(
                dir = %writable.display(),
                why,
                section = config.section,
                "socket directory is writable by others; starting because socket_dir_check = warn"
            ),
        }
    }
    reclaim_stale(path)?;
    // Bind under a temporary name, set mode and group, then rename into place: the final path
    // never exists with looser permissions than configured.
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("kmsgate"),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let listener = StdListener::bind(&tmp).map_err(|e| io("bind", e))?;
    let finish = || -> Result<(), SocketError> {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(config.mode)).map_err(|e| io("chmod", e))?;
        if let Some(gid) = config.gid {
            std::os::unix::fs::chown(&tmp, None, Some(gid)).map_err(|e| io("chown to socket_group", e))?;
        }
        reclaim_stale(path)?;
        fs::rename(&tmp, path).map_err(|e| io("rename into place", e))
    };
    if let Err(e) = finish() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let meta = fs::symlink_metadata(path).map_err(|e| io("stat", e))?;
    Ok((listener, SocketGuard { path: Some((path.to_owned(), meta.dev(), meta.ino())) }))
}

/// How many connections a socket holds, and how long one may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// The most connections open at once; one more waits in the listen backlog until another
    /// closes. kube-apiserver keeps one gRPC connection per configured KMS provider (or signer
    /// endpoint), so a node needs a handful.
    pub max_connections: usize,
    /// How long an accepted connection may send nothing before it is closed: a connection that
    /// never speaks holds a slot and no call.
    pub first_byte_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits both servers use.
    pub const DEFAULT: Self = Self { max_connections: 64, first_byte_timeout: Duration::from_secs(10) };
}

/// Accepted connections, at most `limits.max_connections` open at once. Accept errors (EMFILE at
/// the descriptor limit, ENOBUFS) are waited out with backoff instead of retried at once, which
/// spun a core while Status starved. `spoken` counts the open connections that have sent at
/// least one byte.
pub fn incoming(
    listener: UnixListener,
    spoken: Arc<watch::Sender<usize>>,
    limits: ConnectionLimits,
) -> impl futures::Stream<Item = std::io::Result<Conn>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures::stream::unfold(
        (listener, spoken, AcceptBackoff::default(), slots),
        move |(l, spoken, mut backoff, slots)| async move {
            if slots.available_permits() == 0 {
                tracing::warn!(
                    max = limits.max_connections,
                    "gRPC socket: every connection slot is taken; new connections wait until one closes"
                );
            }
            // NB: the semaphore is never closed, so acquiring fails only if it were; then stop
            // accepting rather than accept without a bound.
            let slot = slots.clone().acquire_owned().await.ok()?;
            loop {
                match l.accept().await {
                    Ok((io, _)) => {
                        backoff.reset();
                        let conn = Conn {
                            io,
                            spoken: spoken.clone(),
                            spoke: false,
                            silent_until: Some(Box::pin(tokio::time::sleep(limits.first_byte_timeout))),
                            _slot: slot,
                        };
                        return Some((Ok(conn), (l, spoken, backoff, slots)));
                    }
                    Err(e) => backoff.wait("gRPC socket", &e).await,
                }
            }
        },
    )
}

/// An accepted connection, counted in `spoken` from its first byte until it closes, so shutdown
/// need not wait for connections that never sent the HTTP/2 preface (and so hold no call).
#[derive(Debug)]
pub struct Conn {
    io: UnixStream,
    spoken: Arc<watch::Sender<usize>>,
    spoke: bool,
    /// Until the first byte: when the connection is closed for saying nothing.
    silent_until: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Its connection slot, given back when the connection closes.
    _slot: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.spoke {
            self.spoken.send_modify(|n| *n -= 1);
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if !self.spoke && buf.filled().len() > before {
            self.spoke = true;
            self.silent_until = None;
            self.spoken.send_modify(|n| *n += 1);
        }
        if result.is_pending()
            && let Some(silent_until) = self.silent_until.as_mut()
            && silent_until.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(std::io::Error::new(
                ErrorKind::TimedOut,
                "the connection sent nothing within the first-byte timeout",
            )));
        }
        result
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The first directory from `dir` up to `/` that a user other than root or us could write into,
/// and why. A sticky world-writable directory (`/tmp`) is fine: others cannot rename what it holds.
fn writable_by_others(
    dir: &Path,
    socket_gid: Option<u32>,
    section: &str,
) -> std::io::Result<Option<(PathBuf, String)>> {
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    for dir in dir.ancestors() {
        let meta = fs::metadata(dir)?;
        let mode = meta.mode();
        let why = if meta.uid() != 0 && meta.uid() != uid {
            Some(format!("owned by uid {}", meta.uid()))
        } else if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            Some(format!("world-writable without the sticky bit (mode {:04o})", mode & 0o7777))
        } else if mode & 0o020 != 0 && ![0, gid].contains(&meta.gid()) && socket_gid != Some(meta.gid()) {
            Some(format!(
                "writable by group {} (mode {:04o}), which is not root's, ours or {section}.socket_group",
                meta.gid(),
                mode & 0o7777
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Ok(Some((dir.to_owned(), why)));
        }
    }
    Ok(None)
}

/// Removes a leftover socket only when nothing answers on it; refuses anything else.
fn reclaim_stale(path: &Path) -> Result<(), SocketError> {
    let io = |action, source| SocketError::Io { path: path.display().to_string(), action, source };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("stat", e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_owned()));
    }
    match StdStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_owned())),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing stale socket (nothing answers on it)");
            fs::remove_file(path).map_err(|e| io("remove stale socket", e))
        }
        Err(e) => Err(io("probe existing socket", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(path: &Path) -> SocketConfig {
        let set = vec![("plugin.socket".to_owned(), path.display().to_string())];
        Config::load(None, &set, &std::collections::HashMap::new()).unwrap().plugin.socket
    }

    /// Accepts from `path` under `limits`, handing each connection to the returned channel.
    fn accept_into_channel(
        path: &Path,
        limits: ConnectionLimits,
    ) -> tokio::sync::mpsc::UnboundedReceiver<std::io::Result<Conn>> {
        use futures::StreamExt;
        let (listener, guard) = bind(&config(path)).unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _guard = guard;
            let mut conns = std::pin::pin!(incoming(listener, Arc::new(watch::Sender::new(0)), limits));
            while let Some(conn) = conns.next().await {
                if tx.send(conn).is_err() {
                    break;
                }
            }
        });
        rx
    }

    #[tokio::test]
    async fn a_connection_that_says_nothing_is_closed_after_the_first_byte_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        let limits = ConnectionLimits { max_connections: 4, first_byte_timeout: Duration::from_millis(200) };
        let mut accepted = accept_into_channel(&path, limits);

        let _silent = UnixStream::connect(&path).await.unwrap();
        let mut conn = accepted.recv().await.unwrap().unwrap();
        // NB: the outer timeout only turns a missing first-byte timeout into a failure, not a hang.
        let read = tokio::time::timeout(Duration::from_secs(60), conn.read(&mut [0u8; 16])).await;
        let err = read.expect("the silent connection was never closed").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut);

        // NB: one that speaks keeps its connection past the timeout.
        let mut talker = UnixStream::connect(&path).await.unwrap();
        let mut conn = accepted.recv().await.unwrap().unwrap();
        talker.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        conn.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        talker.write_all(b"y").await.unwrap();
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"y");
    }

    #[tokio::test]
    async fn a_connection_past_the_cap_waits_until_another_closes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        let limits = ConnectionLimits { max_connections: 1, first_byte_timeout: Duration::from_secs(3600) };
        let mut accepted = accept_into_channel(&path, limits);

        let _first = UnixStream::connect(&path).await.unwrap();
        let held = accepted.recv().await.unwrap().unwrap();
        let mut second = UnixStream::connect(&path).await.unwrap();
        second.write_all(b"x").await.unwrap();
        // NB: a wrong answer here (accepted at once) fails at any speed; a slow machine can only
        // make this check pass later, never fail.
        let early = tokio::time::timeout(Duration::from_millis(300), accepted.recv()).await;
        assert!(early.is_err(), "the second connection was accepted while the only slot was held");
        drop(held);
        let mut conn = accepted.recv().await.unwrap().unwrap();
        let mut buf = [0u8; 1];
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"x");
    }

    #[tokio::test]
    async fn mode_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        let (listener, guard) = bind(&config(&path)).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(matches!(bind(&config(&path)), Err(SocketError::InUse(_))));
        drop(listener);
        drop(guard);
        assert!(!path.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "no temporary file left behind");
    }

    #[tokio::test]
    async fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        fs::write(&path, b"important").unwrap();
        assert!(matches!(bind(&config(&path)), Err(SocketError::NotASocket(_))));
        assert_eq!(fs::read(&path).unwrap(), b"important");
    }

    #[tokio::test]
    async fn reclaims_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        drop(StdListener::bind(&path).unwrap());
        assert!(path.exists());
        let (_listener, _guard) = bind(&config(&path)).unwrap();
        assert!(StdStream::connect(&path).is_ok());
    }

    /// A directory under a fresh private tempdir, with `mode` and group `gid`.
    fn shared_dir(mode: u32, gid: Option<u32>) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("shared");
        fs::create_dir(&dir).unwrap();
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&dir, None, Some(gid)).unwrap();
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
        (root, dir)
    }

    /// A gid that is neither root's nor this process's.
    fn stranger_gid() -> u32 {
        let own = rustix::process::getegid().as_raw();
        (54_321..).find(|g| *g != own).unwrap()
    }

    #[tokio::test]
    async fn refuses_a_world_writable_directory_and_names_it() {
        let (_root, dir) = shared_dir(0o777, None);
        let path = dir.join("kms.sock");
        let err = bind(&config(&path)).unwrap_err();
        let SocketError::DirectoryWritable { dir: named, .. } = &err else { panic!("{err}") };
        assert_eq!(named, &fs::canonicalize(&dir).unwrap());
        assert!(err.to_string().contains("world-writable without the sticky bit"), "{err}");
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn refuses_a_writable_directory_above_and_through_a_symlink() {
        let (root, dir) = shared_dir(0o777, None);
        let inner = dir.join("inner");
        fs::DirBuilder::new().mode(0o755).create(&inner).unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&inner, &link).unwrap();
        let err = bind(&config(&link.join("kms.sock"))).unwrap_err();
        assert!(
            matches!(&err, SocketError::DirectoryWritable { dir: named, .. } if *named == fs::canonicalize(&dir).unwrap()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn group_writable_needs_a_known_group() {
        let stranger = stranger_gid();
        let (_root, dir) = shared_dir(0o770, Some(stranger));
        let path = dir.join("kms.sock");
        let err = bind(&config(&path)).unwrap_err();
        assert!(err.to_string().contains(&format!("writable by group {stranger}")), "{err}");
        let mut cfg = config(&path);
        cfg.gid = Some(stranger);
        let (_l, _g) = bind(&cfg).unwrap();
    }

    #[tokio::test]
    async fn sticky_directories_and_warn_mode_start() {
        let (_root, sticky) = shared_dir(0o1777, None);
        let (_l, _g) = bind(&config(&sticky.join("kms.sock"))).unwrap();
        let (_root2, open) = shared_dir(0o777, None);
        let mut cfg = config(&open.join("kms.sock"));
        cfg.dir_check = DirCheck::Warn;
        let (_l2, _g2) = bind(&cfg).unwrap();
        assert!(open.join("kms.sock").exists());
    }

    #[tokio::test]
    async fn errors_name_the_section_of_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&dir.path().join("sub/signer.sock"));
        cfg.section = "signer";
        let err = bind(&cfg).unwrap_err().to_string();
        assert!(err.contains("signer.create_socket_dir"), "{err}");
        let (_root, open) = shared_dir(0o777, None);
        let mut cfg = config(&open.join("signer.sock"));
        cfg.section = "signer";
        let err = bind(&cfg).unwrap_err().to_string();
        assert!(err.contains("signer.socket_dir_check"), "{err}");
    }

    #[tokio::test]
    async fn missing_directory_needs_the_option() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/kms.sock");
        assert!(matches!(bind(&config(&path)), Err(SocketError::DirectoryMissing(..))));
        let mut cfg = config(&path);
        cfg.create_dir = true;
        let (_l, _g) = bind(&cfg).unwrap();
        assert_eq!(fs::metadata(dir.path().join("sub")).unwrap().permissions().mode() & 0o777, 0o750);
    }
}
