//! Reading "everything a cursor lacks" on a thread and connection of its own.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::{mpsc, oneshot};

use super::STREAM_READ_AHEAD;
use super::error::StoreError;
use super::schema::load_remote_cursor;
use super::writer::{close_connection, db_version};
use crate::{BatchBuilder, BatchLimits, Change, ChangeBatch, Cursor, DbVersion, PackedPk, SiteId};

/// The batches that bring a cursor up to date, read from one snapshot.
///
/// Reading runs ahead by at most [`STREAM_READ_AHEAD`] batches; dropping the
/// stream stops it.
#[derive(Debug)]
pub struct ChangeStream {
    batches: mpsc::Receiver<Result<ChangeBatch, StoreError>>,
    snapshot: Cursor,
}

impl ChangeStream {
    /// The next batch, or `None` when the stream is complete.
    pub async fn next_batch(&mut self) -> Option<Result<ChangeBatch, StoreError>> {
        self.batches.recv().await
    }

    /// The sender's cursor at the snapshot the stream reads from.
    pub fn snapshot(&self) -> &Cursor {
        &self.snapshot
    }
}

impl futures_core::Stream for ChangeStream {
    type Item = Result<ChangeBatch, StoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.batches.poll_recv(cx)
    }
}

/// Idle read connections kept for reuse (opening one costs about a millisecond).
pub const READER_POOL_CAP: usize = 4;

/// Read connections to the database file, reused across change streams.
#[derive(Debug)]
pub(super) struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    pub(super) fn new(path: PathBuf) -> Self {
        ReaderPool {
            path,
            idle: Mutex::new(Vec::new()),
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
        conn.execute_batch("PRAGMA query_only = 1")?;
        Ok(conn)
    }

    fn give(&self, conn: Connection) {
        let mut idle = self.lock();
        if idle.len() < READER_POOL_CAP {
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
    scan_from: Cursor,
    limits: BatchLimits,
) -> Result<ChangeStream, StoreError> {
    let (tx, rx) = mpsc::channel(STREAM_READ_AHEAD);
    let (ready_tx, ready_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("crsync-store-reader".into())
        .spawn(move || {
            let mut ready = Some(ready_tx);
            let result = read(
                &pool, own_site, receiver, &scan_from, limits, &tx, &mut ready,
            );
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
    let snapshot = ready_rx.await.map_err(|_| StoreError::Closed)??;
    Ok(ChangeStream {
        batches: rx,
        snapshot,
    })
}

type Ready = Option<oneshot::Sender<Result<Cursor, StoreError>>>;

fn read(
    pool: &ReaderPool,
    own_site: SiteId,
    receiver: Cursor,
    scan_from: &Cursor,
    limits: BatchLimits,
    tx: &mpsc::Sender<Result<ChangeBatch, StoreError>>,
    ready: &mut Ready,
) -> Result<(), StoreError> {
    let conn = pool.take()?;
    let result = read_snapshot(&conn, own_site, receiver, scan_from, limits, tx, ready);
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
    scan_from: &Cursor,
    limits: BatchLimits,
    tx: &mpsc::Sender<Result<ChangeBatch, StoreError>>,
    ready: &mut Ready,
) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN")?;
    let snapshot = sender_cursor(conn, own_site)?;
    let mut floor = receiver.clone();
    floor.join(scan_from);
    let from = lowest_local_version(conn, own_site, &floor, &snapshot)?;
    if let Some(r) = ready.take() {
        let _ = r.send(Ok(snapshot.clone()));
    }
    let mut builder =
        BatchBuilder::new(receiver, limits.max_changes).with_max_bytes(limits.max_bytes);
    let mut stmt = conn.prepare(
        "SELECT c.\"table\", c.pk, c.cid, c.val, c.col_version, c.db_version, c.site_id, c.cl, c.seq, o.origin_version \
         FROM crsql_changes AS c LEFT JOIN crsync_origin AS o ON o.local_version = c.db_version \
         WHERE c.db_version > ?1 ORDER BY c.db_version, c.seq",
    )?;
    let mut rows = stmt.query(params![from])?;
    while let Some(row) = rows.next()? {
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
        let change = Change {
            table: row.get(0)?,
            pk: PackedPk(row.get(1)?),
            cid: row.get(2)?,
            val: row.get(3)?,
            col_version: row.get(4)?,
            db_version: DbVersion(origin_version),
            site_id: site,
            cl: row.get(7)?,
            seq: row.get(8)?,
        };
        if let Some(batch) = builder.push(change) {
            if tx.blocking_send(Ok(batch)).is_err() {
                return Ok(()); // the consumer went away
            }
        }
    }
    if let Some(batch) = builder.finish(&snapshot) {
        let _ = tx.blocking_send(Ok(batch));
    }
    Ok(())
}

/// What the sender holds: its own version and its stored remote cursor.
fn sender_cursor(conn: &Connection, own_site: SiteId) -> rusqlite::Result<Cursor> {
    let mut cursor = load_remote_cursor(conn)?;
    cursor.advance(own_site, DbVersion(db_version(conn)?));
    Ok(cursor)
}

/// The local version to scan from: below it, every row is already held by the receiver.
fn lowest_local_version(
    conn: &Connection,
    own_site: SiteId,
    receiver: &Cursor,
    sender: &Cursor,
) -> rusqlite::Result<i64> {
    let mut from = receiver.get(&own_site).0;
    let mut stmt = conn.prepare_cached(
        "SELECT min(local_version) FROM crsync_origin WHERE site_id = ?1 AND origin_version > ?2",
    )?;
    for (site, held) in sender.iter() {
        if site == own_site || receiver.holds(&site, held) {
            continue;
        }
        let first: Option<i64> = stmt.query_row(
            params![site.as_bytes().as_slice(), receiver.get(&site).0],
            |r| r.get(0),
        )?;
        if let Some(first) = first {
            from = from.min(first - 1);
        }
    }
    Ok(from.max(0))
}
