//! The [`Store`]: the only code that talks SQL.
//!
//! One dedicated thread owns the writer connection; the cloneable [`Store`]
//! handle sends it typed commands over a bounded queue and awaits the reply.
//! Large reads ([`Store::changes_since`]) run on their own short-lived thread
//! and connection, in one read transaction, and stream batches through a
//! bounded channel, so memory stays flat however many changes there are.

mod conflicts;
mod error;
mod fork;
mod identity;
mod reader;
mod remotes;
mod schema;
mod snapshot;
mod staging;
mod tail;
mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{broadcast, oneshot};

pub use conflicts::{Conflict, ConflictKind, ConflictQuery, ConflictSide};
pub use error::{EnableError, InvalidChange, MergeError, OpenError, StoreError};
pub use fork::{ForkError, ForkReport};
pub use identity::CopiedFile;
pub use reader::{ChangeStream, READER_POOL_CAP};
pub use remotes::RemoteRecord;
pub use snapshot::{
    ExportError, InstallError, InstallReport, SNAPSHOT_PLACEHOLDER_SITE, SnapshotExport,
};
pub use tail::{TAIL_MAX_BYTES, TAIL_MAX_COMMIT_CHANGES, TAIL_MAX_COMMITS};

use crate::proto::batch::BatchLimits;
use crate::{ChangeBatch, Cursor, DbVersion, ReadHint, SiteId};
use writer::Command;

/// Capacity of the queue of commands to the writer thread.
pub const COMMAND_QUEUE_CAP: usize = 64;
/// Capacity of the broadcast channel of [`StoreEvent`]s.
pub const EVENT_CHANNEL_CAP: usize = 256;
/// Batches a change stream reads ahead of its consumer.
pub const STREAM_READ_AHEAD: usize = 2;
/// Default interval of the `PRAGMA data_version` check for other writers.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Default number of stale origin records tolerated before they are swept.
pub const DEFAULT_ORIGIN_GC_SLACK: u64 = 128;

/// Who made a change the Store noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeSource {
    /// A write through this Store ([`Store::write`]).
    Local,
    /// A write by another connection or process on the same file.
    External,
    /// A merge of remote changes ([`Store::merge`]).
    Merge,
}

/// Something the Store noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEvent {
    /// Committed changes to these CRR tables.
    Changed {
        /// The tables touched.
        tables: BTreeSet<String>,
        /// Who made them.
        source: ChangeSource,
    },
    /// A merge moved the cursor without changing any row: a remote vouched
    /// for versions whose rows we hold or that were overwritten. Sessions pass
    /// the claim on to the other remotes.
    CursorAdvanced,
}

/// What a merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// What this Store holds after the merge.
    pub cursor: Cursor,
    /// Invalid changes of a v1 (JavaScript) sender left out (logged).
    pub dropped: usize,
    /// The span of local versions the merged transactions were written under.
    pub local_versions: Option<(i64, i64)>,
    /// Changes handed to cr-sqlite (each may win or lose its conflict).
    pub applied: usize,
    /// Changes skipped because they were already held.
    pub skipped: usize,
    /// Origin transactions applied.
    pub transactions: usize,
    /// Tables the applied changes touched.
    pub tables: BTreeSet<String>,
    /// Changes of a transaction in parts staged by this merge (not yet applied).
    pub staged_changes: usize,
    /// What is staged after the merge: per transaction in parts (origin site
    /// and version), the highest `seq` staged.
    pub staged: BTreeMap<(SiteId, DbVersion), i64>,
}

/// Sizes of the Store's own bookkeeping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BookkeepingStats {
    /// Rows mapping a local version to its origin (one per live merged transaction, plus slack).
    pub origin_records: u64,
    /// Sites in the stored cursor.
    pub cursor_sites: u64,
}

/// Options for [`Store::open`]; start from [`Store::builder`].
#[derive(Debug, Clone)]
pub struct StoreBuilder {
    path: PathBuf,
    extension_path: Option<PathBuf>,
    limits: BatchLimits,
    poll_interval: Duration,
    origin_gc_slack: u64,
    stage_in_memory_below: usize,
    conflicts: conflicts::Retention,
    live_tail: bool,
    max_readers: usize,
}

impl StoreBuilder {
    /// Whether sessions that are caught up send new commits from the shared
    /// live tail (default `true`): each commit's rows are kept in memory
    /// once, for every session, instead of each session reading them from
    /// the file. Off, every stream reads the file (to compare, or to save
    /// the tail's memory, at most [`TAIL_MAX_BYTES`] of rows).
    pub fn live_tail(mut self, on: bool) -> Self {
        self.live_tail = on;
        self
    }

    /// How many change streams may read the file at once (default
    /// [`READER_POOL_CAP`]); each holds a thread and a read connection with
    /// a small page cache. More streams wait for one to finish.
    pub fn max_readers(mut self, n: usize) -> Self {
        self.max_readers = n.max(1);
        self
    }

    /// The cr-sqlite library to load (default: `CRSQLITE_PATH`, then the install dir).
    pub fn extension_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.extension_path = Some(path.into());
        self
    }

    /// Soft limit on changes per batch (default 1024).
    pub fn max_batch_changes(mut self, n: usize) -> Self {
        self.limits.max_changes = n.max(1);
        self
    }

    /// Soft limit on a batch's estimated wire size (default 4 MiB).
    pub fn max_batch_bytes(mut self, n: usize) -> Self {
        self.limits.max_bytes = n.max(1);
        self
    }

    /// How often to look for writes by other connections (default 100 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Stale origin records tolerated before a sweep (default 128).
    pub fn origin_gc_slack(mut self, slack: u64) -> Self {
        self.origin_gc_slack = slack;
        self
    }

    /// A transaction received in [parts](crate::TxnPart) whose estimated
    /// size stays under this is staged in memory (default 1 MiB): written once,
    /// when it completes. A crash loses it and its sender sends it again from
    /// the start. Larger ones are staged on disk, survive and resume. `0`
    /// stages every one on disk.
    pub fn stage_in_memory_below(mut self, bytes: usize) -> Self {
        self.stage_in_memory_below = bytes;
        self
    }

    /// How much [conflict history](Store::conflicts) to keep: at most
    /// `max_rows` records (default 10,000), none older than `max_age`
    /// (default 30 days); older ones are trimmed when a merge records new
    /// ones. `max_rows == 0` records nothing (what is recorded stays readable).
    pub fn conflict_retention(mut self, max_rows: usize, max_age: Duration) -> Self {
        self.conflicts = conflicts::Retention { max_rows, max_age };
        self
    }

    /// Opens the Store.
    pub async fn open(self) -> Result<Store, OpenError> {
        Store::open_with(self).await
    }
}

/// A cr-sqlite database with per-origin cursors. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use crsync_peer::{Cursor, Store};
/// let a = Store::builder("a.db").open().await?;
/// let b = Store::builder("b.db").open().await?;
/// for store in [&a, &b] {
///     store.write(|tx| tx.execute_batch("CREATE TABLE IF NOT EXISTS todo (id INTEGER PRIMARY KEY NOT NULL, title TEXT)")).await?;
///     store.enable_crr(&["todo"]).await?;
/// }
/// a.write(|tx| tx.execute("INSERT INTO todo VALUES (1, 'milk')", [])).await?;
/// let mut batches = a.changes_since(&b.cursor().await?).await?;
/// while let Some(batch) = batches.next_batch().await {
///     b.merge(batch?).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Store {
    commands: flume::Sender<Command>,
    /// Cancelled when the writer thread has ended.
    writer_gone: tokio_util::sync::CancellationToken,
    readers: std::sync::Arc<reader::ReaderPool>,
    tail: Option<std::sync::Arc<tail::LiveTail>>,
    events: broadcast::Sender<StoreEvent>,
    site_id: SiteId,
    path: PathBuf,
    limits: BatchLimits,
    copied: Option<std::sync::Arc<CopiedFile>>,
    /// The highest acknowledgement handed to the writer: a server's sessions
    /// all acknowledge each commit, and only the first needs saying.
    acknowledged: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Store {
    /// Options with defaults for the database file at `path` (created if missing).
    pub fn builder(path: impl AsRef<Path>) -> StoreBuilder {
        StoreBuilder {
            path: path.as_ref().to_path_buf(),
            extension_path: None,
            limits: BatchLimits::default(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            origin_gc_slack: DEFAULT_ORIGIN_GC_SLACK,
            stage_in_memory_below: staging::MEMORY_STAGE_BYTES,
            conflicts: conflicts::Retention::default(),
            live_tail: true,
            max_readers: READER_POOL_CAP,
        }
    }

    /// Opens `path` with default options.
    pub async fn open(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        Self::builder(path).open().await
    }

    async fn open_with(options: StoreBuilder) -> Result<Store, OpenError> {
        crate::load_extension(options.extension_path.as_deref())?;
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAP);
        let (commands, inbox) = flume::bounded(COMMAND_QUEUE_CAP);
        let (ready_tx, ready_rx) = oneshot::channel();
        let config = writer::WriterConfig {
            path: options.path.clone(),
            poll_interval: options.poll_interval,
            origin_gc_slack: options.origin_gc_slack,
            stage_in_memory_below: options.stage_in_memory_below,
            conflicts: options.conflicts,
            tail: options
                .live_tail
                .then(|| std::sync::Arc::new(tail::LiveTail::new())),
        };
        let tail = config.tail.clone();
        let thread_events = events.clone();
        let writer_gone = tokio_util::sync::CancellationToken::new();
        let gone = writer_gone.clone();
        std::thread::Builder::new()
            .name("crsync-store-writer".into())
            .spawn(move || {
                // Cancelled however the thread ends, so no caller waits for a
                // reply to a command still queued when the writer stopped.
                let _gone = gone.drop_guard();
                writer::run(config, inbox, thread_events, ready_tx)
            })
            .map_err(OpenError::Thread)?;
        let (site_id, copied) = ready_rx
            .await
            .map_err(|_| OpenError::Thread(std::io::Error::other("writer thread died")))??;
        Ok(Store {
            commands,
            writer_gone,
            readers: std::sync::Arc::new(reader::ReaderPool::new(
                options.path.clone(),
                options.max_readers,
            )),
            tail,
            events,
            site_id,
            path: options.path,
            limits: options.limits,
            copied: copied.map(std::sync::Arc::new),
            acknowledged: std::sync::Arc::default(),
        })
    }

    /// This database's site id.
    pub fn site_id(&self) -> SiteId {
        self.site_id
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the database file at `path` a new site id: the fix for a copied
    /// file ([`copied`](Self::copied), or a `SITE_ID_CONFLICT` from a remote).
    /// Its writes that predate the copy keep the old site id; its later
    /// writes become the new site's and sync as new; the original's writes
    /// under the old id come in from the other replicas. Nothing is lost.
    /// No Store may have the file open (close it first).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use crsync_peer::Store;
    /// let report = Store::fork("copy.db", None).await?;
    /// println!("{} is now {}", report.old_site, report.new_site);
    /// # Ok(()) }
    /// ```
    pub async fn fork(
        path: impl AsRef<Path>,
        extension_path: Option<&Path>,
    ) -> Result<ForkReport, ForkError> {
        let path = path.as_ref().to_path_buf();
        let extension = extension_path.map(Path::to_path_buf);
        tokio::task::spawn_blocking(move || fork::fork(&path, extension.as_deref()))
            .await
            .map_err(|e| ForkError::Store(StoreError::Thread(std::io::Error::other(e))))?
    }

    /// Writes a snapshot of this database to `dest` (replaced if present),
    /// prepared for [`install_snapshot`](Self::install_snapshot): a
    /// consistent copy (`VACUUM INTO`, one read transaction, while writes go
    /// on) whose own writes are re-attributed to this database's site id on
    /// an ordinal of their own, with ordinal 0 a placeholder, the file's
    /// identity and chunk staging cleared, and this database's own version in
    /// its cursor. Runs on a blocking thread with a connection of its own.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use crsync_peer::Store;
    /// let store = Store::open("server.db").await?;
    /// let snapshot = store.export_snapshot("server.snapshot.db").await?;
    /// println!("{} changes up to version {}", snapshot.changes, snapshot.version);
    /// # Ok(()) }
    /// ```
    pub async fn export_snapshot(
        &self,
        dest: impl AsRef<Path>,
    ) -> Result<SnapshotExport, ExportError> {
        let (source, site, dest) = (self.path.clone(), self.site_id, dest.as_ref().to_path_buf());
        tokio::task::spawn_blocking(move || snapshot::export(&source, site, &dest))
            .await
            .map_err(|e| ExportError::Store(StoreError::Thread(std::io::Error::other(e))))?
    }

    /// Changes (live cells, as `crsql_changes` lists them) at local versions
    /// above `version`: how far the database moved on since a snapshot at
    /// that version (`0`: all changes). Reads on a blocking thread with a
    /// connection of its own, through cr-sqlite's index on versions.
    pub async fn count_changes_after(&self, version: i64) -> Result<u64, StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || snapshot::count_changes_after(&path, version))
            .await
            .map_err(|e| StoreError::Thread(std::io::Error::other(e)))?
    }

    /// Installs a downloaded snapshot ([`export_snapshot`](Self::export_snapshot)
    /// on the other side, checksum-verified by the caller) as the database
    /// file `target`: checks it (`PRAGMA quick_check`, a prepared
    /// snapshot), gives it a new random site id, records its identity with
    /// nothing acknowledged, and moves it into place. `target` must not exist
    /// or be an empty database (no rows in any table but cr-sqlite's and
    /// crsync's bookkeeping); it is never overwritten otherwise, and no
    /// Store may have it open. The snapshot file is consumed. The new replica
    /// holds the exporter's rows and cursor at the snapshot and syncs only
    /// what came after; the exporter's writes keep its site id.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use crsync_peer::Store;
    /// let report = Store::install_snapshot("notes.db.crsync-snapshot", "notes.db", None).await?;
    /// println!("{} rows, new site id {}", report.rows, report.site_id);
    /// let store = Store::open("notes.db").await?; // then sync as usual
    /// # drop(store); Ok(()) }
    /// ```
    pub async fn install_snapshot(
        file: impl AsRef<Path>,
        target: impl AsRef<Path>,
        extension_path: Option<&Path>,
    ) -> Result<InstallReport, InstallError> {
        let file = file.as_ref().to_path_buf();
        let target = target.as_ref().to_path_buf();
        let extension = extension_path.map(Path::to_path_buf);
        tokio::task::spawn_blocking(move || snapshot::install(&file, &target, extension.as_deref()))
            .await
            .map_err(|e| InstallError::Store(StoreError::Thread(std::io::Error::other(e))))?
    }

    /// Checks, before a download, that a snapshot could be installed as
    /// `target`: `Ok(false)` if it does not exist, `Ok(true)` if it is an
    /// empty database nobody else has open, the refusal
    /// ([`InstallError::TargetNotEmpty`], ...) otherwise. Changes nothing but
    /// stale side files of an absent target.
    pub async fn check_snapshot_target(
        target: impl AsRef<Path>,
        extension_path: Option<&Path>,
    ) -> Result<bool, InstallError> {
        let target = target.as_ref().to_path_buf();
        let extension = extension_path.map(Path::to_path_buf);
        tokio::task::spawn_blocking(move || {
            snapshot::check_target_only(&target, extension.as_deref())
        })
        .await
        .map_err(|e| InstallError::Store(StoreError::Thread(std::io::Error::other(e))))?
    }

    /// Set when this file is a copy of another replica's (`cp`, a restored
    /// backup): it shares that replica's site id, so the Peer refuses to sync
    /// it until it is forked. Reading and writing locally still work.
    pub fn copied(&self) -> Option<&CopiedFile> {
        self.copied.as_deref()
    }

    /// A remote holds our own writes up to `version` (its acknowledgement).
    /// Writes up to there are known to predate any copy of this file, so
    /// [`fork`](Self::fork) keeps their site id. Never waits; may be dropped
    /// when the writer is busy (a later acknowledgement says as much).
    pub fn note_acknowledged(&self, version: DbVersion) {
        let before = self
            .acknowledged
            .fetch_max(version.0, std::sync::atomic::Ordering::Relaxed);
        if version.0 > before {
            let _ = self.commands.try_send(Command::Acknowledged(version.0));
        }
    }

    /// What a Peer saw of a remote, remembered across restarts (see
    /// [`remotes`](Self::remotes)). Never waits; may be dropped when the
    /// writer is busy (a later call says as much).
    pub fn note_remote(&self, record: RemoteRecord) {
        let _ = self.commands.try_send(Command::RemoteSeen(record));
    }

    /// The remotes this database synced with (by any Peer, in any earlier
    /// run), most recently synced first: how each was reached, the newest
    /// of our versions it acknowledged, when we were last in sync.
    pub async fn remotes(&self) -> Result<Vec<RemoteRecord>, StoreError> {
        self.call(Command::Remotes).await?
    }

    /// Notifications of committed changes. Slow receivers see `Lagged`.
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send_async(make(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        self.reply(rx).await
    }

    /// Waits for a command's reply, or until the writer thread has ended (a
    /// command queued behind `Close` is never answered).
    async fn reply<T>(&self, rx: oneshot::Receiver<T>) -> Result<T, StoreError> {
        tokio::select! {
            biased;
            reply = rx => reply.map_err(|_| StoreError::Closed),
            _ = self.writer_gone.cancelled() => Err(StoreError::Closed),
        }
    }

    /// The schema version (`PRAGMA user_version`).
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        self.call(Command::SchemaVersion).await?
    }

    /// What this database holds: its own version plus every origin it merged.
    pub async fn cursor(&self) -> Result<Cursor, StoreError> {
        self.call(Command::Cursor).await?
    }

    /// Turns existing tables into CRRs (idempotent). All or nothing.
    pub async fn enable_crr(&self, tables: &[&str]) -> Result<(), EnableError> {
        let tables = tables.iter().map(|t| t.to_string()).collect();
        self.call(|reply| Command::EnableCrr(tables, reply)).await?
    }

    /// Runs `f` in a write transaction on the writer connection and commits it
    /// if `f` returns `Ok`. Subscribers hear about the tables it changed.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: writer::WriteJob = Box::new(move |conn| {
            let result = (|| {
                let txn =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let value = f(&txn)?;
                txn.commit()?;
                Ok(value)
            })();
            Box::new(move || {
                let _ = tx.send(result.map_err(StoreError::Sqlite));
            })
        });
        self.commands
            .send_async(Command::Write(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        self.reply(rx).await?
    }

    /// Like [`write`](Self::write), and also returns the local version the
    /// transaction committed as (`None` if it changed no CRR): pass it to
    /// [`Peer::wait_acknowledged`](crate::Peer::wait_acknowledged) to learn
    /// when a remote holds the write.
    ///
    /// ```no_run
    /// # async fn demo(store: crsync_peer::Store) -> Result<(), crsync_peer::StoreError> {
    /// let (rows, version) = store
    ///     .write_versioned(|tx| tx.execute("UPDATE notes SET body = 'hi' WHERE id = 1", []))
    ///     .await?;
    /// assert!(rows == 0 || version.is_some());
    /// # Ok(()) }
    /// ```
    pub async fn write_versioned<T, F>(&self, f: F) -> Result<(T, Option<DbVersion>), StoreError>
    where
        F: FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.write(move |tx| {
            let before: i64 = tx.query_row("SELECT crsql_db_version()", [], |r| r.get(0))?;
            let value = f(tx)?;
            // cr-sqlite assigns the version at commit: the next one, if this
            // transaction wrote to a CRR (its pending changes are in the clock tables).
            let next: i64 = tx.query_row("SELECT crsql_next_db_version()", [], |r| r.get(0))?;
            let wrote: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM crsql_changes WHERE db_version > ?1)",
                [before],
                |r| r.get(0),
            )?;
            Ok((value, wrote.then_some(DbVersion(next))))
        })
        .await
    }

    /// How many of our own local versions lie above each of `after`, up to
    /// `own` (local versions that merges used are not ours): what a remote
    /// that holds ours up to `after[i]` still lacks.
    pub async fn own_versions_after(
        &self,
        after: &[DbVersion],
        own: DbVersion,
    ) -> Result<Vec<u64>, StoreError> {
        let after = after.to_vec();
        self.read(move |conn| {
            let mut merged = conn.prepare_cached(
                "SELECT count(*) FROM crsync_origin WHERE local_version > ?1 AND local_version <= ?2",
            )?;
            after
                .iter()
                .map(|a| {
                    if *a >= own {
                        return Ok(0);
                    }
                    let m: i64 = merged.query_row([a.0, own.0], |r| r.get(0))?;
                    Ok(((own.0 - a.0) - m).max(0) as u64)
                })
                .collect()
        })
        .await
    }

    /// Runs a read-only closure on the writer connection.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: writer::WriteJob = Box::new(move |conn| {
            let _ = tx.send(f(conn).map_err(StoreError::Sqlite));
            Box::new(|| ())
        });
        self.commands
            .send_async(Command::Write(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        self.reply(rx).await?
    }

    /// Streams every change `cursor` lacks, in batches of whole origin
    /// transactions (one larger than a batch goes in [parts](crate::TxnPart),
    /// which [`merge`](Self::merge) stages and applies whole), read from one
    /// consistent snapshot. The last batch raises
    /// the receiver to everything this Store held when the stream began.
    pub async fn changes_since(&self, cursor: &Cursor) -> Result<ChangeStream, StoreError> {
        self.changes_since_with_limits(cursor, self.limits).await
    }

    /// As [`changes_since`](Self::changes_since), with batch limits of its own.
    pub async fn changes_since_with_limits(
        &self,
        cursor: &Cursor,
        limits: BatchLimits,
    ) -> Result<ChangeStream, StoreError> {
        self.changes_since_hinted(cursor, &ReadHint::default(), limits)
            .await
    }

    /// Says that merges will be relayed (the caller serves several
    /// remotes): from the next merge on, each is read back into the live
    /// tail right after its commit, so that every session sends it from
    /// memory. Without this the first merge sessions need is read from the
    /// file by each of them. Unused, read-back turns itself off again.
    pub(crate) fn expect_relaying(&self) {
        if let Some(tail) = &self.tail {
            tail.expect_relaying();
        }
    }

    /// As [`changes_since_with_limits`](Self::changes_since_with_limits),
    /// leaving out the rows `hint` names by local version: those the caller
    /// already sent to this receiver (see [`ChangeStream::read_upto`]) and
    /// those merged from it. Ranges still start at `cursor`; the hint only
    /// saves reading and resending.
    pub async fn changes_since_hinted(
        &self,
        cursor: &Cursor,
        hint: &ReadHint,
        limits: BatchLimits,
    ) -> Result<ChangeStream, StoreError> {
        if let Some(stream) = self
            .tail
            .as_ref()
            .and_then(|t| t.stream(self.site_id, cursor, hint, limits))
        {
            return Ok(ChangeStream::from_tail(stream, hint.after_local));
        }
        reader::start(
            self.readers.clone(),
            self.site_id,
            cursor.clone(),
            hint.clone(),
            limits,
        )
        .await
    }

    /// The batch limits this Store was opened with.
    pub fn batch_limits(&self) -> BatchLimits {
        self.limits
    }

    /// Applies a batch atomically, together with the cursor update.
    ///
    /// Changes already held are skipped. A batch that starts past what this
    /// Store holds ([`BatchRejection::Gap`](crate::BatchRejection::Gap)) or
    /// contains an invalid change is refused whole, and nothing changes.
    ///
    /// A [part](crate::TxnPart) of a large transaction that is not its last
    /// is staged on disk (see [`staged`](Self::staged)) and nothing is
    /// visible yet; the last part, or a range that claims the transaction,
    /// applies it whole. A part that starts past what is staged is refused
    /// ([`BatchRejection::PartGap`](crate::BatchRejection::PartGap)).
    pub async fn merge(&self, batch: ChangeBatch) -> Result<MergeReport, MergeError> {
        self.call(|reply| Command::Merge(batch, reply)).await?
    }

    /// Sizes of the Store's bookkeeping tables.
    pub async fn bookkeeping_stats(&self) -> Result<BookkeepingStats, StoreError> {
        self.call(Command::Stats).await?
    }

    /// Transactions received in part and staged (not yet applied): per origin
    /// site and version, the highest `seq` staged. A sender resumes after it.
    pub async fn staged(&self) -> Result<BTreeMap<(SiteId, DbVersion), i64>, StoreError> {
        self.call(Command::Staged).await?
    }

    /// The conflict history, newest first: values merges replaced (another
    /// site's write won over the local value) or refused (the local value
    /// won over another site's write), with both sites and versions. Kept
    /// in this file only (it never syncs), bounded by
    /// [`StoreBuilder::conflict_retention`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use crsync_peer::{ConflictQuery, Store};
    /// let store = Store::open("notes.db").await?;
    /// for c in store.conflicts(ConflictQuery::new().limit(10)).await? {
    ///     println!("{} {}.{}: lost {:?} to {:?}", c.kind.as_str(), c.table, c.column, c.lost.value, c.won.value);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn conflicts(&self, query: ConflictQuery) -> Result<Vec<Conflict>, StoreError> {
        self.call(|reply| Command::Conflicts(query, reply)).await?
    }

    /// Finishes queued commands, finalizes cr-sqlite and closes the database.
    pub async fn close(self) -> Result<(), StoreError> {
        self.readers.close_all();
        match self.call(Command::Close).await {
            Ok(result) => result,
            Err(StoreError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
