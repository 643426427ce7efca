//! # crsync
//!
//! CRDT peer-to-peer replication of SQLite databases, built on cr-sqlite.
//!
//! An app opens a [`Store`] (its SQLite file, with cr-sqlite loaded), starts a
//! [`Peer`] over it and adds a dialer per remote; the Peer keeps the file in
//! sync and tells the app how sync stands ([`Peer::status`], [`PeerEvent`]s).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use crsync::{Peer, Store, transports::sse::SseDialer};
//! let store = Store::open("notes.db").await?;
//! let peer = Peer::builder(store).build();
//! let server = peer.add_dialer(SseDialer::new("http://127.0.0.1:8080/db/notes").with_token("secret"));
//! let (_, version) = peer
//!     .store()
//!     .write_versioned(|tx| tx.execute("INSERT INTO notes (id, body) VALUES (1, 'hi')", []))
//!     .await?;
//! if let Some(version) = version {
//!     peer.wait_acknowledged(version, None, std::time::Duration::from_secs(10)).await?;
//! }
//! println!("{:?}", peer.status().await.phase());
//! server.pause(); // on a metered network
//! # Ok(()) }
//! ```
//!
//! Features: `sse` and `websocket` (client transports), `tls` (https and
//! wss), `server` (the sync server, [`server`]), `cli` (the `crsync` tool;
//! implies the others but `tls`; the default). A desktop app that only
//! syncs with a server takes `default-features = false, features = ["sse"]`.
//! Everything else of the core (changes, batches, the wire format, the
//! protocol state machine) is in [`advanced`], [`proto`] and [`wire`].

// What an app needs, first.
pub use crsync_peer::{
    ChangeSource, Connection, Cursor, DbVersion, DialFailure, Dialer, DialerHandle, OpenError,
    Peer, PeerBuilder, PeerEvent, Pending, Progress, ReconnectPolicy, RemoteRecord, RemoteStatus,
    SiteId, SqlValue, Store, StoreBuilder, StoreError, StoreEvent, SyncPhase, SyncStatus,
    TransportError, WaitError, rusqlite,
};
pub use crsync_peer::{Conflict, ConflictKind, ConflictQuery, ConflictSide};
pub use crsync_peer::{EnableError, ForkError, ForkReport, MergeError};

/// The protocol state machine, error codes and session status (crate `crsync-peer`).
pub use crsync_peer::proto;
/// The wire format: messages as on the wire (crate `crsync-peer`).
pub use crsync_peer::wire;

/// Everything else of `crsync-peer`: changes and batches, change streams,
/// the extension loader, transport plumbing and limits, for tools, tests and
/// transports of your own.
pub mod advanced {
    pub use crsync_peer::*;
}

/// Transports: in-memory always; HTTP+SSE (`sse`), WebSocket (`websocket`)
/// and snapshot downloads by feature (crate `crsync-transports`).
pub use crsync_transports as transports;

/// The sync server (crate `crsync-node-server`, feature `server`).
#[cfg(feature = "server")]
pub use crsync_node_server as server;
