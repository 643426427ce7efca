//! A TCP proxy on 127.0.0.1 in front of a server (a relay), whose
//! connections can go silent without closing: after [`SilentProxy::silence`]
//! every connection it has forwards nothing more, either way, and its
//! sockets stay open, as a half-open TCP connection after the server's
//! machine crashed or a NAT dropped its mapping (no FIN, no RST, nothing).
//! Connections made afterwards are forwarded again (a new mapping).
//! With [`SilentProxy::stall_after_handshake`], new connections go silent
//! as soon as their WebSocket handshake went through: the client counts the
//! relay as up, and hears nothing from it (no stored events, no `EOSE`).
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// A running proxy; it and every connection it holds end on drop.
pub struct SilentProxy {
    port: u16,
    accepted: Arc<AtomicUsize>,
    /// Connections accepted before the value's increment go silent.
    silenced: watch::Sender<usize>,
    stall: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl SilentProxy {
    /// Forwards 127.0.0.1:<a free port> to 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16) -> SilentProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let port = listener.local_addr().expect("address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (silenced, watch) = watch::channel(0);
        let count = accepted.clone();
        let stall = Arc::new(AtomicBool::new(false));
        let stalling = stall.clone();
        let task = tokio::spawn(async move {
            // Dropped with the accept loop: every connection ends with it.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                // Numbered from 1: silenced once the value reaches it.
                let number = count.fetch_add(1, Ordering::SeqCst) + 1;
                let stall = stalling.load(Ordering::SeqCst);
                connections.spawn(forward(client, upstream, number, stall, watch.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        SilentProxy {
            port,
            accepted,
            silenced,
            stall,
            task,
        }
    }

    /// `ws://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Every connection accepted so far goes silent; later ones are forwarded.
    pub fn silence(&self) {
        let upto = self.accepted();
        self.silenced.send_replace(upto);
    }

    /// Connections accepted from now on pass the WebSocket handshake (the
    /// HTTP request and the server's answer), then go silent.
    pub fn stall_after_handshake(&self) {
        self.stall.store(true, Ordering::SeqCst);
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    mut client: TcpStream,
    upstream: u16,
    number: usize,
    stall: bool,
    mut silenced: watch::Receiver<usize>,
) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    if stall {
        if pass_headers(&mut client, &mut server).await.is_ok() {
            let _ = pass_headers(&mut server, &mut client).await;
        }
        // Hold both sockets, silent, until the proxy ends.
        std::future::pending::<()>().await;
    }
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = async { drop(silenced.wait_for(|upto| *upto >= number).await) } => {
            // Read nothing, write nothing, close nothing, until the proxy ends.
            std::future::pending::<()>().await;
        }
    }
}

/// Forwards what `from` sends up to the end of its HTTP headers, no more.
async fn pass_headers(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let before = head.len();
        head.extend_from_slice(&buf[..n]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            return to.write_all(&head[before..at + 4]).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}
