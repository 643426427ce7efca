//! Helpers shared by the peer crate's integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::Path;

use crsync_peer::rusqlite::{self, Connection};
use crsync_peer::{ChangeBatch, Cursor, MergeReport, SqlValue, Store, StoreBuilder};

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY NOT NULL, name TEXT, v INTEGER, w BLOB);
    CREATE TABLE IF NOT EXISTS tags (
    item INTEGER NOT NULL, tag TEXT NOT NULL, note TEXT, PRIMARY KEY (item, tag));";

/// Opens (or creates) `name` in `dir` with the test schema as CRRs.
pub async fn open_store(dir: &Path, name: &str) -> Store {
    open_store_with(dir, name, |b| b).await
}

/// As [`open_store`], with more options on the builder.
pub async fn open_store_with(
    dir: &Path,
    name: &str,
    options: impl FnOnce(StoreBuilder) -> StoreBuilder,
) -> Store {
    let builder = Store::builder(dir.join(name))
        .poll_interval(std::time::Duration::from_millis(20))
        .max_batch_changes(64);
    let store = options(builder).open().await.expect("open store");
    store
        .write(|tx| tx.execute_batch(SCHEMA))
        .await
        .expect("schema");
    store
        .enable_crr(&["items", "tags"])
        .await
        .expect("enable crr");
    store
}

/// Every row of every test table, values exact.
pub async fn dump(store: &Store) -> Vec<Vec<SqlValue>> {
    store
        .read(|conn| {
            let mut out = Vec::new();
            for sql in [
                "SELECT id, name, v, w FROM items ORDER BY id",
                "SELECT item, tag, note, NULL FROM tags ORDER BY item, tag",
            ] {
                let mut stmt = conn.prepare(sql)?;
                let rows = stmt.query_map([], |r| {
                    (0..4)
                        .map(|i| r.get::<_, SqlValue>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()
                })?;
                for row in rows {
                    out.push(row?);
                }
                out.push(vec![SqlValue::text("--")]);
            }
            Ok(out)
        })
        .await
        .expect("dump")
}

/// Collects every batch `from` would send to a receiver at `cursor`.
pub async fn batches_for(from: &Store, cursor: &Cursor) -> Vec<ChangeBatch> {
    let mut stream = from.changes_since(cursor).await.expect("changes_since");
    let mut out = Vec::new();
    while let Some(batch) = stream.next_batch().await {
        out.push(batch.expect("batch"));
    }
    out
}

/// One full one-way exchange: everything `to` lacks, merged in order.
pub async fn sync(from: &Store, to: &Store) -> MergeReport {
    let cursor = to.cursor().await.expect("cursor");
    let mut total = MergeReport::default();
    for batch in batches_for(from, &cursor).await {
        let r = to.merge(batch).await.expect("merge");
        total.applied += r.applied;
        total.skipped += r.skipped;
        total.transactions += r.transactions;
    }
    total
}

/// A plain connection to the same file (another writer, as another process would be).
pub fn side_connection(path: &Path) -> Connection {
    let c = Connection::open(path).expect("open side connection");
    c.busy_timeout(std::time::Duration::from_secs(5))
        .expect("busy timeout");
    c
}

pub fn close_side(c: Connection) {
    c.query_row("SELECT crsql_finalize()", [], |_| Ok(()))
        .expect("finalize");
    c.close().map_err(|(_, e)| e).expect("close");
}

/// A plain in-memory connection pair (no faults), for peer-crate tests.
pub fn memory_pair() -> (crsync_peer::Connection, crsync_peer::Connection) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_stream::wrappers::ReceiverStream;
    use tokio_util::sync::PollSender;
    fn end(
        tx: tokio::sync::mpsc::Sender<crsync_peer::wire::TransportMessage>,
        rx: tokio::sync::mpsc::Receiver<crsync_peer::wire::TransportMessage>,
        label: &str,
    ) -> crsync_peer::Connection {
        crsync_peer::Connection {
            sink: Box::pin(
                PollSender::new(tx).sink_map_err(|_| crsync_peer::TransportError::Closed),
            ),
            stream: Box::pin(ReceiverStream::new(rx).map(|m| Ok(crsync_peer::Received::new(m)))),
            label: label.into(),
        }
    }
    let (a_tx, b_rx) = tokio::sync::mpsc::channel(64);
    let (b_tx, a_rx) = tokio::sync::mpsc::channel(64);
    (end(a_tx, a_rx, "memory:a"), end(b_tx, b_rx, "memory:b"))
}

/// Waits (bounded) until every store has the same rows as the first.
pub async fn wait_converged(stores: &[&Store], timeout: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let first = dump(stores[0]).await;
        let mut same = true;
        for s in &stores[1..] {
            if dump(s).await != first {
                same = false;
                break;
            }
        }
        if same {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stores did not converge within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A temporary directory on tmpfs where there is one (many small databases, no fsync cost).
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("crsync-test")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::tempdir().expect("tempdir")
}
