//! An in-process relay (nostr-relay-builder) on 127.0.0.1 that can be
//! killed like a process: it runs on its own runtime and thread, and
//! [`TestRelay::kill`] drops that runtime, so every connection it had ends
//! at once, as the kernel ends a killed relay's sockets.
//!
//! `LocalRelay::shutdown` is no such kill: it wakes the relay's tasks with
//! `Notify::notify_waiters`, which reaches only a task waiting at that
//! instant. A connection busy with a message then (a client publishing)
//! misses it and lives on, served from the old relay's events while a new
//! relay answers on the same port.
#![allow(dead_code, unreachable_pub)]

use std::net::{IpAddr, Ipv4Addr};

use nostr_relay_builder::prelude::{LocalRelay, RateLimit, RelayBuilder};
use tokio::sync::oneshot;

/// A running relay; killed on drop.
pub struct TestRelay {
    url: String,
    port: u16,
    kill: Option<oneshot::Sender<()>>,
    dead: Option<oneshot::Receiver<()>>,
}

impl TestRelay {
    /// Starts a relay on a free port.
    pub async fn start() -> TestRelay {
        TestRelay::start_on(0).await
    }

    /// Starts a relay on `port` (0: a free one), its limits raised far
    /// above what a test sends.
    pub async fn start_on(port: u16) -> TestRelay {
        let (started_tx, started) = oneshot::channel();
        let (kill, killed) = oneshot::channel::<()>();
        let (dead_tx, dead) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("test-relay-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("relay runtime");
                runtime.block_on(async move {
                    let mut builder = RelayBuilder::default()
                        .addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
                        .rate_limit(RateLimit {
                            max_reqs: 500,
                            notes_per_minute: 1_000_000,
                        });
                    if port != 0 {
                        builder = builder.port(port);
                    }
                    let relay = LocalRelay::new(builder);
                    let started = match relay.run().await {
                        Ok(()) => Ok(relay.url().await.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = started_tx.send(started);
                    // Until killed, or until the handle is gone.
                    let _ = killed.await;
                });
                // Every task of the relay (listener, connections) ends here.
                drop(runtime);
                let _ = dead_tx.send(());
            })
            .expect("relay thread");
        let url = started
            .await
            .expect("relay thread answers")
            .expect("relay starts");
        let url = url.trim_end_matches('/').to_owned();
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in the relay's URL");
        TestRelay {
            url,
            port,
            kill: Some(kill),
            dead: Some(dead),
        }
    }

    /// `ws://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the relay: its events are gone, every connection is closed and
    /// the port is free once this returns.
    pub async fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        if let Some(dead) = self.dead.take() {
            let _ = dead.await;
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
    }
}
