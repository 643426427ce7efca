//! # crsync-transports
//!
//! Transports move crsync's wire-protocol messages
//! ([`TransportMessage`](crsync_peer::wire::TransportMessage)) between two
//! peers. Each one produces [`Connection`](crsync_peer::Connection)s (a sink
//! and a stream of messages) that a `Peer` runs the sync protocol over; the
//! outgoing side is a [`Dialer`](crsync_peer::Dialer), which makes one attempt
//! per call (the Peer redials with backoff and enforces liveness timeouts).
//! Transports know nothing about SQL or sync: they only carry messages.
//!
//! - [`memory`]: an in-memory pair for tests, with seeded fault injection
//!   (drop, duplicate, reorder, delay, cut) and bounded queues; plus a
//!   [`MemoryDialer`] that can be switched offline.
//! - [`ws`]: a WebSocket client ([`WebSocketDialer`],
//!   one JSON text frame per message) and an adapter from any WebSocket to a
//!   `Connection`, for servers.
//! - [`sse`]: the HTTP + Server-Sent Events client
//!   ([`SseDialer`]) speaking wire protocol v1, so it talks
//!   to servers written for the TypeScript `@app/sync` package as well as to
//!   crsync's node-server. POSTs are sent in order, one at a time, and a send
//!   completes when the server answered.
//!
//! - `nostr` (feature `nostr`): sync through Nostr relays, end-to-end
//!   encrypted and store-and-forward, with pairing codes.
//! - [`snapshot`]: snapshot bootstrap: a new replica of a large database
//!   downloads the server's snapshot (streamed, resumable, checked) and
//!   installs it instead of replaying every change
//!   ([`clone_database`](snapshot::clone_database)).
//!
//! Both network clients take an optional bearer token. TLS (`https://`,
//! `wss://`) needs the `rustls` feature.
//!
//! Features: `sse` (the HTTP+SSE client; implies `http`), `http` (the
//! snapshot download client), `websocket` (the WebSocket client and
//! adapter), `rustls` (TLS for those); `sse` and `websocket` are on by
//! default. The in-memory pair is always there.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use crsync_peer::{SiteId, wire::TransportMessage};
//! use crsync_transports::memory::{self, FaultConfig};
//! use futures_util::{SinkExt, StreamExt};
//!
//! // Messages go through JSON text and may be duplicated (seeded: reproducible).
//! let faults = FaultConfig::seeded(1).with_duplicate(0.5).with_json(true);
//! let (mut a, mut b) = memory::pair(faults);
//! let me = SiteId::from_bytes([9; 16]);
//! a.sink.send(TransportMessage::ping(me)).await?;
//! a.sink.close().await?;
//! let mut received = 0;
//! while let Some(item) = b.stream.next().await {
//!     assert_eq!(item?.message, TransportMessage::ping(me));
//!     received += 1;
//! }
//! assert!(received == 1 || received == 2);
//! # Ok(()) }
//! ```

use std::time::Duration;

/// Default limit on one dial: connecting, and for SSE also receiving the
/// server's first message.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Response header by which a crsync server says that this connection's
/// request created the database (`1`).
pub const CREATED_HEADER: &str = "x-crsync-created";

/// Raised when a dial reached a database that the server created for it on
/// first use (its token has `create`): the client can say so, since a
/// mistyped name would otherwise sync into a new, empty database unnoticed.
/// Clones of a dialer share it.
#[derive(Debug, Clone, Default)]
pub struct CreationNotice(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl CreationNotice {
    /// Whether a dial created the database since the last `take` (and clears it).
    pub fn take(&self) -> bool {
        self.0.swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    #[cfg(any(feature = "sse", feature = "websocket"))]
    pub(crate) fn raise_if(&self, created: Option<&str>) {
        if created.is_some_and(|v| v.trim() == "1") {
            self.0.store(true, std::sync::atomic::Ordering::Release);
        }
    }
}

#[cfg(any(feature = "http", feature = "websocket"))]
mod http_status;
pub mod memory;
#[cfg(feature = "nostr")]
pub mod nostr;
mod serial_sink;
#[cfg(feature = "http")]
pub mod snapshot;
#[cfg(feature = "sse")]
pub mod sse;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "websocket")]
pub mod ws;

pub use memory::{CutHandle, FaultConfig, MemoryControl, MemoryDialer, MemoryListener};
#[cfg(feature = "sse")]
pub use sse::SseDialer;
#[cfg(feature = "websocket")]
pub use ws::{WebSocketDialer, connection_from_ws};
