//! A TCP proxy on 127.0.0.1 in front of a server (a relay), whose
//! connections can go silent without closing: after [`SilentProxy::silence`]
//! every connection it has forwards nothing more, either way, and its
//! sockets stay open, as a half-open TCP connection after the server's
//! machine crashed or a NAT dropped its mapping (no FIN, no RST, nothing).
//! Connections made afterwards are forwarded again (a new mapping).
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// A running proxy; it and every connection it holds end on drop.
pub struct SilentProxy {
    port: u16,
    accepted: Arc<AtomicUsize>,
    /// Connections accepted before the value's increment go silent.
    silenced: watch::Sender<usize>,
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
        let task = tokio::spawn(async move {
            // Dropped with the accept loop: every connection ends with it.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                // Numbered from 1: silenced once the value reaches it.
                let number = count.fetch_add(1, Ordering::SeqCst) + 1;
                connections.spawn(forward(client, upstream, number, watch.clone()));
                while connections.try_join_next().is_some() {}
            }
        });
        SilentProxy {
            port,
            accepted,
            silenced,
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
    mut silenced: watch::Receiver<usize>,
) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = async { drop(silenced.wait_for(|upto| *upto >= number).await) } => {
            // Read nothing, write nothing, close nothing, until the proxy ends.
            std::future::pending::<()>().await;
        }
    }
}
