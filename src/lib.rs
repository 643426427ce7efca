//! # crsync
//!
//! CRDT peer-to-peer replication of SQLite databases, built on cr-sqlite.
//! This facade re-exports the public API of the crsync crates: the Store,
//! cursors and [`Peer`] from `crsync-peer`, the transports as [`transports`],
//! and the server as [`server`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use crsync::{Peer, Store, transports::sse::SseDialer};
//! let store = Store::open("notes.db").await?;
//! let peer = Peer::builder(store).build();
//! peer.add_dialer(SseDialer::new("http://127.0.0.1:8080/db/notes").with_token("secret"));
//! # Ok(()) }
//! ```

pub use crsync_peer::*;

/// Transports: HTTP+SSE, WebSocket, in-memory (crate `crsync-transports`).
pub use crsync_transports as transports;

/// The sync server (crate `crsync-node-server`).
pub use crsync_node_server as server;
