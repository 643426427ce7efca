//! Reading "everything a cursor lacks" on a thread and connection of its own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::{mpsc, oneshot};

use super::STREAM_READ_AHEAD;
use super::error::StoreError;
use super::schema::load_remote_cursor;
use super::tail::TailStream;
use super::writer::{close_connection, db_version};
use crate::proto::batch::ClaimLimits;
use crate::{
    BatchBuilder, BatchLimits, Change, ChangeBatch, Cursor, DbVersion, PackedPk, ReadHint, SiteId,
};

/// The batches that bring a cursor up to date, read from one snapshot.
///
/// Reading runs ahead by at most [`STREAM_READ_AHEAD`] batches; dropping the
/// stream stops it. A stream whose changes are all in the Store's live tail
/// is built from memory instead, with no thread or read connection.
#[derive(Debug)]
pub struct ChangeStream {
    source: Source,
    snapshot: Cursor,
    read_upto: i64,
    total: Option<u64>,
}

#[derive(Debug)]
enum Source {
    File(mpsc::Receiver<Result<(ChangeBatch, i64), StoreError>>),
    Tail(Box<TailStream>),
}

impl ChangeStream {
    pub(super) fn from_tail(tail: TailStream, after_local: i64) -> Self {
        ChangeStream {
            snapshot: tail.snapshot().clone(),
            source: Source::Tail(Box::new(tail)),
            read_upto: after_local,
            total: None,
        }
    }

    /// The next batch, or `None` when the stream is complete.
    pub async fn next_batch(&mut self) -> Option<Result<ChangeBatch, StoreError>> {
        self.next(false).await
    }

    /// The next batch for a sender that only encodes it: from the live
    /// tail, its changes are stand-ins holding only their origin (site,
    /// version, `seq`) and clocks, and [`TransportMessage::data`] writes
    /// their JSON from what the tail keeps, shared by every session. Read
    /// anything else of them through [`next_batch`](Self::next_batch).
    ///
    /// [`TransportMessage::data`]: crate::wire::TransportMessage::data
    #[doc(hidden)]
    pub async fn next_batch_to_send(&mut self) -> Option<Result<ChangeBatch, StoreError>> {
        self.next(true).await
    }

    async fn next(&mut self, to_send: bool) -> Option<Result<ChangeBatch, StoreError>> {
        let item = match &mut self.source {
            Source::File(batches) => batches.recv().await?,
            Source::Tail(tail) => Ok(tail.next_batch(to_send)?),
        };
        Some(item.map(|(batch, upto)| {
            self.read_upto = upto;
            batch
        }))
    }

    /// Whether the stream comes from the live tail (memory) rather than the file.
    pub fn from_memory(&self) -> bool {
        matches!(self.source, Source::Tail(_))
    }

    /// The sender's cursor at the snapshot the stream reads from.
    pub fn snapshot(&self) -> &Cursor {
        &self.snapshot
    }

    /// How many changes the stream holds at most (rows the receiver already
    /// has are counted too), if the read was asked to count them
    /// ([`ReadHint::count`]).
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// The local version the batches returned so far cover: every row at or
    /// below it was either in one of them or already held by the receiver.
    pub fn read_upto(&self) -> i64 {
        self.read_upto
    }
}

impl futures_core::Stream for ChangeStream {
    type Item = Result<ChangeBatch, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = match &mut self.source {
            Source::File(batches) => match batches.poll_recv(cx) {
                Poll::Ready(item) => item,
                Poll::Pending => return Poll::Pending,
            },
            Source::Tail(tail) => tail.next_batch(false).map(Ok),
        };
        Poll::Ready(item.map(|item| {
            item.map(|(batch, upto)| {
                self.read_upto = upto;
                batch
            })
        }))
    }
}

/// Default number of change streams read from the file at once
/// ([`StoreBuilder::max_readers`](super::StoreBuilder::max_readers)): each
/// holds a thread and a read connection; more wait for one to finish.
/// Idle connections are kept for reuse, as many (opening one costs about a millisecond).
pub const READER_POOL_CAP: usize = 8;

/// Page cache of each read connection, in KiB.
const READER_CACHE_KIB: u32 = 256;

/// Read connections to the database file, reused across change streams.
#[derive(Debug)]
pub(super) struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// One permit per stream reading: the bound on threads and connections.
    permits: Arc<tokio::sync::Semaphore>,
    cap: usize,
}

impl ReaderPool {
    pub(super) fn new(path: PathBuf, cap: usize) -> Self {
        let cap = cap.max(1);
        ReaderPool {
            path,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(cap)),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self) -> rusqlite::Result<Connection> {
        if let Some(conn) = self.lock().pop() {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Streams scan forward once: a small page cache each (SQLite's
        // default is 2 MiB), so a server with many open streams, stalled
        // ones included, stays small; the OS page cache does the rest.
        conn.execute_batch(&format!(
            "PRAGMA query_only = 1; PRAGMA cache_size = -{READER_CACHE_KIB}"
        ))?;
        Ok(conn)
    }

    fn give(&self, conn: Connection) {
        let mut idle = self.lock();
        if idle.len() < self.cap {
            idle.push(conn);
        } else {
            drop(idle);
            if let Err(e) = close_connection(conn) {
                tracing::warn!(error = %e, "closing a read connection failed");
            }
        }
    }

    /// Finalizes and closes every idle connection.
    pub(super) fn close_all(&self) {
        let idle = std::mem::take(&mut *self.lock());
        for conn in idle {
            if let Err(e) = close_connection(conn) {
                tracing::warn!(error = %e, "closing a read connection failed");
            }
        }
    }
}

impl Drop for ReaderPool {
    fn drop(&mut self) {
        self.close_all();
    }
}

pub(super) async fn start(
    pool: Arc<ReaderPool>,
    own_site: SiteId,
    receiver: Cursor,
    hint: ReadHint,
    limits: BatchLimits,
) -> Result<ChangeStream, StoreError> {
    let after_local = hint.after_local;
    // Wait for a reader rather than open one more.
    let permit = pool
        .permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| StoreError::Closed)?;
    let (tx, rx) = mpsc::channel(STREAM_READ_AHEAD);
    let (ready_tx, ready_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("crsync-store-reader".into())
        .spawn(move || {
            let _permit = permit;
            let mut ready = Some(ready_tx);
            let result = read(&pool, own_site, receiver, &hint, limits, &tx, &mut ready);
            if let Err(e) = result {
                match ready.take() {
                    Some(r) => {
                        let _ = r.send(Err(e));
                    }
                    None => {
                        let _ = tx.blocking_send(Err(e));
                    }
                }
            }
        })
        .map_err(StoreError::Thread)?;
    let (snapshot, total) = ready_rx.await.map_err(|_| StoreError::Closed)??;
    Ok(ChangeStream {
        source: Source::File(rx),
        snapshot,
        read_upto: after_local,
        total,
    })
}

type Ready = Option<oneshot::Sender<Result<(Cursor, Option<u64>), StoreError>>>;
type BatchSender = mpsc::Sender<Result<(ChangeBatch, i64), StoreError>>;

fn read(
    pool: &ReaderPool,
    own_site: SiteId,
    receiver: Cursor,
    hint: &ReadHint,
    limits: BatchLimits,
    tx: &BatchSender,
    ready: &mut Ready,
) -> Result<(), StoreError> {
    let conn = pool.take()?;
    let result = read_snapshot(&conn, own_site, receiver, hint, limits, tx, ready);
    // End the read transaction; a connection in a clean state goes back to the pool.
    match conn.execute_batch("ROLLBACK") {
        Ok(()) if result.is_ok() => pool.give(conn),
        _ => close_connection(conn)?,
    }
    result
}

fn read_snapshot(
    conn: &Connection,
    own_site: SiteId,
    receiver: Cursor,
    hint: &ReadHint,
    limits: BatchLimits,
    tx: &BatchSender,
    ready: &mut Ready,
) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN")?;
    let snapshot = sender_cursor(conn, own_site)?;
    let schema_version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let end = db_version(conn)?;
    let from = lowest_local_version(conn, own_site, &receiver)?.max(hint.after_local);
    let claim_limits = claim_limits_after(conn, &receiver, from, hint)?;
    let total = hint.count.then(|| count_changes(conn, from)).transpose()?;
    if let Some(r) = ready.take() {
        let _ = r.send(Ok((snapshot.clone(), total)));
    }
    let mut builder = BatchBuilder::new(receiver, snapshot, limits.max_changes)
        .with_max_bytes(limits.max_bytes)
        .with_claim_limits(claim_limits)
        .with_staged(hint.staged.clone());
    let mut stmt = conn.prepare(CHANGES_AFTER_SQL)?;
    let mut rows = stmt.query(params![from])?;
    // The local version of the last row pushed: a batch returned by `push`
    // holds rows up to the one before the current.
    let mut last_local = from;
    let stamp = |mut batch: ChangeBatch| {
        batch.schema_version = Some(schema_version);
        batch
    };
    while let Some(row) = rows.next()? {
        let local: i64 = row.get(5)?;
        if hint.skips(local) {
            continue;
        }
        let change = change_of_row(row, own_site)?;
        let upto = covered_before(last_local, local);
        last_local = local;
        if let Some(batch) = builder.push(change) {
            if tx.blocking_send(Ok((stamp(batch), upto))).is_err() {
                return Ok(()); // the consumer went away
            }
        }
    }
    if let Some(batch) = builder.finish() {
        let _ = tx.blocking_send(Ok((stamp(batch), end.max(last_local))));
    }
    Ok(())
}

/// Every row of `crsql_changes` above a local version (`?1`), in `(local
/// version, seq)` order, with its origin version where crsync merged it:
/// read by [`change_of_row`].
pub(super) const CHANGES_AFTER_SQL: &str = "SELECT c.\"table\", c.pk, c.cid, c.val, c.col_version, c.db_version, c.site_id, c.cl, c.seq, o.origin_version \
     FROM crsql_changes AS c LEFT JOIN crsync_origin AS o ON o.local_version = c.db_version \
     WHERE c.db_version > ?1 ORDER BY c.db_version, c.seq";

/// The change a row of [`CHANGES_AFTER_SQL`] holds, as it is sent: with its
/// origin's version (its local one, `row.get(5)`, for our own rows).
pub(super) fn change_of_row(row: &rusqlite::Row<'_>, own_site: SiteId) -> rusqlite::Result<Change> {
    let site_bytes: Vec<u8> = row.get(6)?;
    let site = SiteId::from_slice(&site_bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Blob, Box::new(e))
    })?;
    let local: i64 = row.get(5)?;
    let origin_version = if site == own_site {
        local
    } else {
        // Rows merged by something other than crsync have no origin record:
        // their local version is the best we know.
        row.get::<_, Option<i64>>(9)?.unwrap_or(local)
    };
    Ok(Change {
        table: row.get(0)?,
        pk: PackedPk(row.get(1)?),
        cid: row.get(2)?,
        val: row.get(3)?,
        col_version: row.get(4)?,
        db_version: DbVersion(origin_version),
        site_id: site,
        cl: row.get(7)?,
        seq: row.get(8)?,
    })
}

/// The local version a batch covers when it ends before a row at `local`,
/// the previous row being at `read_before`: rows of `read_before`'s version
/// continue into the next batch only if they belong to the same transaction
/// (a part holds some of its rows, never all), so the batch covers versions
/// below `local`.
pub(super) fn covered_before(read_before: i64, local: i64) -> i64 {
    if read_before < local {
        read_before
    } else {
        local - 1
    }
}

/// Per site, what batches before the last may claim of a stream reading
/// rows above local version `from` ([`ClaimLimits`]): merged rows of one site
/// are not always in their origin order (a change relayed by a v1 peer comes
/// unranged ahead of older ones; a v1 peer's transaction comes in parts).
/// Rows the hint leaves out are not in the stream (the receiver sent them).
fn claim_limits_after(
    conn: &Connection,
    receiver: &Cursor,
    from: i64,
    hint: &ReadHint,
) -> rusqlite::Result<BTreeMap<SiteId, DbVersion>> {
    let mut stmt = conn.prepare_cached(
        "SELECT local_version, site_id, origin_version FROM crsync_origin \
         WHERE local_version > ?1 ORDER BY local_version",
    )?;
    let mut rows = stmt.query([from])?;
    let mut limits = ClaimLimits::new(receiver.clone());
    while let Some(row) = rows.next()? {
        let local: i64 = row.get(0)?;
        let site: Vec<u8> = row.get(1)?;
        if let (false, Ok(site)) = (hint.skips(local), SiteId::from_slice(&site)) {
            limits.note(local, site, DbVersion(row.get(2)?));
        }
    }
    Ok(limits.finish())
}

/// How many changes lie above local version `from`, counted in the clock
/// tables (by their `db_version` index: no row is read), so an upper bound
/// of what a stream from there sends.
fn count_changes(conn: &Connection, from: i64) -> rusqlite::Result<u64> {
    let mut tables = conn.prepare_cached(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%\\_\\_crsql\\_clock' ESCAPE '\\'",
    )?;
    let tables: Vec<String> = tables
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut total = 0u64;
    for table in tables {
        let quoted = table.replace('"', "\"\"");
        let sql = format!("SELECT count(*) FROM \"{quoted}\" WHERE db_version > ?1");
        let n: i64 = conn.query_row(&sql, [from], |r| r.get(0))?;
        total += n.max(0) as u64;
    }
    Ok(total)
}

/// What the sender holds: its own version and its stored remote cursor.
fn sender_cursor(conn: &Connection, own_site: SiteId) -> rusqlite::Result<Cursor> {
    let mut cursor = load_remote_cursor(conn)?;
    cursor.advance(own_site, DbVersion(db_version(conn)?));
    Ok(cursor)
}

/// The local version to scan from: below it, every row is already held by the receiver.
///
/// Every site with merged rows counts, not only those of the sender's cursor:
/// rows the sender holds beyond its cursor (unranged, from v1 peers) are sent too.
fn lowest_local_version(
    conn: &Connection,
    own_site: SiteId,
    receiver: &Cursor,
) -> rusqlite::Result<i64> {
    let mut from = receiver.get(&own_site).0;
    if let Some((version, held)) = super::snapshot::snapshot_floor(conn)? {
        // Installed from a snapshot: its rows (none of them ours) are held
        // by a receiver that holds what the snapshot did.
        if receiver.covers(&held) {
            from = from.max(version);
        }
    }
    let mut sites = conn.prepare_cached("SELECT DISTINCT site_id FROM crsync_origin")?;
    let sites: Vec<Vec<u8>> = sites
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT min(local_version) FROM crsync_origin WHERE site_id = ?1 AND origin_version > ?2",
    )?;
    for bytes in sites {
        let Ok(site) = SiteId::from_slice(&bytes) else {
            continue;
        };
        if site == own_site {
            continue;
        }
        let first: Option<i64> =
            stmt.query_row(params![bytes, receiver.get(&site).0], |r| r.get(0))?;
        if let Some(first) = first {
            from = from.min(first - 1);
        }
    }
    Ok(from.max(0))
}
