//! # crsync-peer
//!
//! The storage and sync core of crsync: a [`Store`] over a SQLite database with
//! the cr-sqlite extension, per-origin version-vector [`Cursor`]s, and the pure
//! rules for building and accepting [`ChangeBatch`]es.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use crsync_peer::Store;
//! let store = Store::open("app.db").await?;
//! println!("site {} at {:?}", store.site_id(), store.cursor().await?);
//! store.close().await?;
//! # Ok(()) }
//! ```

mod change;
mod cursor;
mod extension;
mod ids;
mod peer;
mod pk;
pub mod proto;
mod store;
pub mod telemetry;
pub mod transport;
mod value;
pub mod wire;

pub use change::{Change, SENTINEL_CID};
pub use cursor::Cursor;
pub use extension::{
    CRSQLITE_PATH_ENV, EXTENSION_FILE, ExtensionError, PathSource, default_locations,
    load_extension, resolve_path, user_data_dir,
};
pub use ids::{DbVersion, InvalidSiteId, SITE_ID_LEN, SiteId};
pub use pk::{PackedPk, PkError};
pub use proto::batch::{
    BatchBuilder, BatchLimits, BatchRejection, ChangeBatch, DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_CHANGES, MergePlan, ReadHint, TxnPart, VersionRange, plan_merge,
};
pub use store::{
    BookkeepingStats, COMMAND_QUEUE_CAP, ChangeSource, ChangeStream, Conflict, ConflictKind,
    ConflictQuery, ConflictSide, CopiedFile, DEFAULT_ORIGIN_GC_SLACK, DEFAULT_POLL_INTERVAL,
    EVENT_CHANNEL_CAP, EnableError, ExportError, ForkError, ForkReport, InstallError,
    InstallReport, InvalidChange, MergeError, MergeReport, OpenError, READER_POOL_CAP,
    RemoteRecord, SNAPSHOT_PLACEHOLDER_SITE, STREAM_READ_AHEAD, SnapshotExport, Store,
    StoreBuilder, StoreError, StoreEvent,
};
pub use value::{Affinity, SqlValue, normalize_js};

pub use peer::{
    DEFAULT_WINDOW, DialFailure, DialerHandle, PEER_EVENT_CAP, Peer, PeerBuilder, PeerEvent,
    Pending, Progress, RemoteStatus, SyncPhase, SyncStatus, WaitError,
};
/// Re-exported so callers of [`Store::write`] use the same rusqlite.
pub use rusqlite;
pub use transport::{
    Backoff, BoxError, Connection, Dialer, LinkSettings, MessageSink, MessageStream, Received,
    ReconnectPolicy, Rejection, TransportError,
};
