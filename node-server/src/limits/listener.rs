//! A TCP listener whose connections can be cut from a request handler: how a
//! stalled SSE stream is dropped even though hyper, waiting for the socket to
//! drain, no longer polls the response body.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::http::request::Parts;
use axum::serve::IncomingStream;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Accepts TCP connections (with `TCP_NODELAY`) that a [`ConnKill`] can cut.
///
/// Each socket's kernel send buffer is set to `send_buffer_bytes` (0: the
/// kernel's autotuning, up to a few MiB per socket): a client that stopped
/// reading then fills our queue, where the stall watchdog sees it, instead of
/// parking megabytes in the kernel.
///
/// With a TLS acceptor, each connection's handshake runs in a task of its
/// own (at most [`MAX_HANDSHAKES`] at once, each cut after
/// [`HANDSHAKE_TIMEOUT`]), so a client that stalls its handshake holds up
/// nobody else; the connection is handed to the server once it completed.
pub(crate) struct KillableListener {
    pub(crate) tcp: TcpListener,
    pub(crate) send_buffer_bytes: usize,
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

/// TLS handshakes in progress at most; more connections wait in the
/// kernel's backlog.
pub(crate) const MAX_HANDSHAKES: usize = 256;
/// How long a client may take for its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl KillableListener {
    fn configure(&self, tcp: &TcpStream) {
        // Nagle off: an SSE frame must not wait for a delayed ACK that the
        // client never piggybacks (its replies go over separate POSTs).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if self.send_buffer_bytes > 0 {
            if let Err(e) = socket2::SockRef::from(tcp).set_send_buffer_size(self.send_buffer_bytes)
            {
                tracing::debug!(error = %e, "cannot set SO_SNDBUF");
            }
        }
    }

    fn wrap(stream: Transport, addr: SocketAddr) -> (KillableIo, SocketAddr) {
        let kill = CancellationToken::new();
        let killed = Box::pin(kill.clone().cancelled_owned());
        let progress = Arc::new(IoProgress::new());
        (
            KillableIo {
                stream,
                kill,
                killed,
                progress,
                addr,
            },
            addr,
        )
    }
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (KillableIo, SocketAddr) {
        let Some(tls) = self.tls.clone() else {
            let (tcp, addr) = axum::serve::Listener::accept(&mut self.tcp).await;
            self.configure(&tcp);
            return Self::wrap(Transport::Plain(tcp), addr);
        };
        loop {
            let busy = self.handshakes.len() >= MAX_HANDSHAKES;
            tokio::select! {
                (tcp, addr) = axum::serve::Listener::accept(&mut self.tcp), if !busy => {
                    self.configure(&tcp);
                    let tls = tls.clone();
                    self.handshakes.spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                            Ok(Ok(stream)) => Some((stream, addr)),
                            Ok(Err(e)) => {
                                tracing::debug!(client = %addr, error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(client = %addr, "TLS handshake timed out");
                                None
                            }
                        }
                    });
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some((stream, addr))) = done {
                        return Self::wrap(Transport::Tls(Box::new(stream)), addr);
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// The socket under a [`KillableIo`]: plain TCP or TLS over it.
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Transport {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A TCP (or TLS) stream that fails every read and write once its token is
/// cancelled (waking the task that waits on it).
pub(crate) struct KillableIo {
    stream: Transport,
    kill: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    progress: Arc<IoProgress>,
    addr: SocketAddr,
}

/// When the socket last took bytes to send (a client that reads slowly still
/// makes progress here while one large message is on its way), and how many
/// it took in all.
#[derive(Debug)]
pub(crate) struct IoProgress {
    last: Mutex<tokio::time::Instant>,
    written: AtomicU64,
    wrote: Notify,
}

impl IoProgress {
    fn new() -> Self {
        IoProgress {
            last: Mutex::new(tokio::time::Instant::now()),
            written: AtomicU64::new(0),
            wrote: Notify::new(),
        }
    }

    fn took(&self, bytes: usize) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = tokio::time::Instant::now();
        self.written.fetch_add(bytes as u64, Ordering::Release);
        self.wrote.notify_waiters();
    }

    /// The last time the socket took bytes.
    pub(crate) fn last(&self) -> tokio::time::Instant {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes the socket took so far.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Waits until the socket has taken `bytes` in all.
    pub(crate) async fn written_at_least(&self, bytes: u64) {
        loop {
            let wrote = self.wrote.notified();
            tokio::pin!(wrote);
            wrote.as_mut().enable();
            if self.written() >= bytes {
                return;
            }
            wrote.await;
        }
    }
}

impl KillableIo {
    /// Notes the bytes a write took as progress.
    fn count(&self, written: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                self.progress.took(n);
            }
        }
        written
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.poll_unpin(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection dropped by the server",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        this.stream.poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        let written = this.stream.poll_write(cx, buf);
        this.count(written)
    }

    /// Vectored, so that hyper writes a chunk's header and body with one
    /// `writev` instead of copying the body into its own buffer first.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        let written = this.stream.poll_write_vectored(cx, bufs);
        this.count(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        this.stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream.poll_shutdown(cx)
    }
}

/// Cuts the connection a request came on (`None` when the app was not served
/// through a [`KillableListener`], e.g. a [`PeerRouter`](crate::PeerRouter)
/// mounted on the app's own listener).
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnKill(Option<(CancellationToken, Arc<IoProgress>, SocketAddr)>);

impl Connected<IncomingStream<'_, KillableListener>> for ConnKill {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        let io = stream.io();
        ConnKill(Some((io.kill.clone(), Arc::clone(&io.progress), io.addr)))
    }
}

impl ConnKill {
    /// The connection of the request with these parts.
    pub(crate) fn of(parts: &Parts) -> Self {
        parts
            .extensions
            .get::<ConnectInfo<ConnKill>>()
            .map(|info| info.0.clone())
            .unwrap_or_default()
    }

    /// The client's address, when known (for connection labels).
    pub(crate) fn remote_addr(&self) -> Option<SocketAddr> {
        self.peer_addr()
    }

    /// The connection's write progress, when known.
    pub(crate) fn progress(&self) -> Option<Arc<IoProgress>> {
        self.0.as_ref().map(|(_, p, _)| Arc::clone(p))
    }

    /// The client's address, when known.
    pub(crate) fn peer_addr(&self) -> Option<SocketAddr> {
        self.0.as_ref().map(|(_, _, a)| *a)
    }

    /// Cuts the connection; whether it could.
    pub(crate) fn kill(&self) -> bool {
        match &self.0 {
            Some((token, _, _)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}
