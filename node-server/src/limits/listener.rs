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
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Accepts TCP connections (with `TCP_NODELAY`) that a [`ConnKill`] can cut.
///
/// Each socket's kernel send buffer is set to `send_buffer_bytes` (0: the
/// kernel's autotuning, up to a few MiB per socket): a client that stopped
/// reading then fills our queue, where the stall watchdog sees it, instead of
/// parking megabytes in the kernel.
pub(crate) struct KillableListener {
    pub(crate) tcp: TcpListener,
    pub(crate) send_buffer_bytes: usize,
}

impl axum::serve::Listener for KillableListener {
    type Io = KillableIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (KillableIo, SocketAddr) {
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.tcp).await;
        // Nagle off: an SSE frame must not wait for a delayed ACK that the
        // client never piggybacks (its replies go over separate POSTs).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if self.send_buffer_bytes > 0 {
            if let Err(e) =
                socket2::SockRef::from(&tcp).set_send_buffer_size(self.send_buffer_bytes)
            {
                tracing::debug!(error = %e, "cannot set SO_SNDBUF");
            }
        }
        let kill = CancellationToken::new();
        let killed = Box::pin(kill.clone().cancelled_owned());
        let progress = Arc::new(IoProgress::new());
        (
            KillableIo {
                tcp,
                kill,
                killed,
                progress,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// A TCP stream that fails every read and write once its token is cancelled
/// (waking the task that waits on it).
pub(crate) struct KillableIo {
    tcp: TcpStream,
    kill: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    progress: Arc<IoProgress>,
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
        Pin::new(&mut this.tcp).poll_read(cx, buf)
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
        let written = Pin::new(&mut this.tcp).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                this.progress.took(n);
            }
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Cuts the connection a request came on (`None` when the app was not served
/// through a [`KillableListener`], e.g. a [`PeerRouter`](crate::PeerRouter)
/// mounted on the app's own listener).
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnKill(
    Option<(CancellationToken, Arc<IoProgress>)>,
    /// The client's address, when known.
    Option<SocketAddr>,
);

impl Connected<IncomingStream<'_, KillableListener>> for ConnKill {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        let io = stream.io();
        ConnKill(
            Some((io.kill.clone(), Arc::clone(&io.progress))),
            Some(*stream.remote_addr()),
        )
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
        self.1
    }

    /// The connection's write progress, when known.
    pub(crate) fn progress(&self) -> Option<Arc<IoProgress>> {
        self.0.as_ref().map(|(_, p)| Arc::clone(p))
    }

    /// Cuts the connection; whether it could.
    pub(crate) fn kill(&self) -> bool {
        match &self.0 {
            Some((token, _)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}
