//! A TCP listener whose connections can be cut from a request handler: how a
//! stalled SSE stream is dropped even though hyper, waiting for the socket to
//! drain, no longer polls the response body.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::http::request::Parts;
use axum::serve::IncomingStream;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Accepts TCP connections (with `TCP_NODELAY`) that a [`ConnKill`] can cut.
pub(crate) struct KillableListener(pub(crate) TcpListener);

impl axum::serve::Listener for KillableListener {
    type Io = KillableIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (KillableIo, SocketAddr) {
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.0).await;
        // Nagle off: an SSE frame must not wait for a delayed ACK that the
        // client never piggybacks (its replies go over separate POSTs).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let kill = CancellationToken::new();
        let killed = Box::pin(kill.clone().cancelled_owned());
        (KillableIo { tcp, kill, killed }, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// A TCP stream that fails every read and write once its token is cancelled
/// (waking the task that waits on it).
pub(crate) struct KillableIo {
    tcp: TcpStream,
    kill: CancellationToken,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
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
        Pin::new(&mut this.tcp).poll_write(cx, buf)
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
pub(crate) struct ConnKill(Option<CancellationToken>);

impl Connected<IncomingStream<'_, KillableListener>> for ConnKill {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        ConnKill(Some(stream.io().kill.clone()))
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

    /// Cuts the connection; whether it could.
    pub(crate) fn kill(&self) -> bool {
        match &self.0 {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}
