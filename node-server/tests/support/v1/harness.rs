//! Helpers the interop scenarios share: where rows are read from, waits with deadlines,
//! and the POST bounds that tell a resend loop from a recovery.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, ensure};
use crsync_peer::{Peer, Store};

use super::super::TestServer;
use super::{Check, V1Client, V1Db};

/// A v1 database in `dir`.
pub fn v1_db(dir: &tempfile::TempDir, name: &str) -> Result<Arc<V1Db>> {
    Ok(Arc::new(V1Db::open(
        &dir.path().join(format!("{name}.db")),
        super::SCHEMA,
        super::TABLES,
    )?))
}

/// The distinct `db_version`s of a v1 peer's own rows.
pub fn own_versions(db: &V1Db) -> Result<Vec<i64>> {
    db.with(|c| {
        let mut stmt = c.prepare(
            "SELECT DISTINCT db_version FROM crsql_changes WHERE site_id = crsql_site_id() ORDER BY 1",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    })
}

/// Where a test reads rows of `t` from.
pub enum Replica<'a> {
    /// The crsync server's replica file.
    Server(&'a TestServer),
    /// A crsync Store.
    Store(&'a Store),
    /// A v1 peer's database.
    V1(&'a Arc<V1Db>),
}

impl Replica<'_> {
    async fn rows(&self) -> Result<Vec<String>> {
        match self {
            Replica::Server(server) => super::file_rows(&server.replica(super::DB)).await,
            Replica::Store(store) => super::store_rows(store).await,
            Replica::V1(db) => {
                let db = Arc::clone(db);
                super::blocking(move || db.rows()).await
            }
        }
    }
}

/// The ids of formatted rows.
pub fn ids(rows: &[String]) -> Vec<i64> {
    rows.iter()
        .filter_map(|r| r.split_once(' ').and_then(|(id, _)| id.parse().ok()))
        .collect()
}

/// Whether every id in `want` is among the rows.
pub fn has_ids(rows: &[String], want: &[i64]) -> bool {
    let have = ids(rows);
    want.iter().all(|id| have.contains(id))
}

/// Waits until `replica`'s rows satisfy `done`; the failure names `what`, the rows (or
/// their count, when many) and `context()`.
pub async fn wait_rows(
    what: &str,
    replica: Replica<'_>,
    done: impl Fn(&[String]) -> bool,
    context: impl Fn() -> String,
) -> Result<Vec<String>> {
    let (replica, done, context) = (&replica, &done, &context);
    super::poll_until(what, move || async move {
        let rows = replica.rows().await?;
        Ok(Check::when(done(&rows), || {
            let shown = if rows.len() <= 12 {
                format!("{rows:?}")
            } else {
                format!("{} rows", rows.len())
            };
            format!("rows: {shown}; {}", context())
        }))
    })
    .await?;
    replica.rows().await
}

/// Waits until every replica holds the same rows, `count` of them.
pub async fn wait_identical(
    what: &str,
    replicas: &[(&str, Replica<'_>)],
    count: usize,
    context: impl Fn() -> String,
) -> Result<Vec<String>> {
    let (context, replicas) = (&context, replicas);
    super::poll_until(what, move || async move {
        let mut all = Vec::new();
        for (name, replica) in replicas {
            all.push((*name, replica.rows().await?));
        }
        let first = &all[0].1;
        let same = first.len() == count && all.iter().all(|(_, rows)| rows == first);
        Ok(Check::when(same, || {
            let each: Vec<String> = all
                .iter()
                .map(|(name, rows)| {
                    if rows.len() <= 12 {
                        format!("{name}: {rows:?}")
                    } else {
                        format!("{name}: {} rows", rows.len())
                    }
                })
                .collect();
            format!("{}; {}", each.join("; "), context())
        }))
    })
    .await?;
    replicas[0].1.rows().await
}

/// A crsync Peer with default options.
pub fn crsync_peer(store: Store) -> Peer {
    Peer::builder(store).build()
}

/// The crsync server's base URL for [`super::DB`].
pub fn base(server: &TestServer) -> String {
    server.url(&format!("/db/{}", super::DB))
}

/// One local write on a v1 peer.
pub fn write_row(db: &V1Db, sql: &'static str) -> Result<()> {
    db.write(|tx| tx.execute(sql, [])).map(|_| ())
}

/// One local write on a crsync Store.
pub async fn store_write(store: &Store, sql: &'static str) -> Result<()> {
    store.write(move |tx| tx.execute(sql, [])).await?;
    Ok(())
}

/// Waits until the v1 client's `eose` of connection `round` was answered (it has sent
/// everything the server's cursor lacked in that round).
pub async fn wait_round_sent(client: &V1Client, round: usize) -> Result<()> {
    super::poll_until(&format!("round {round}'s eose to be answered"), || async {
        let log = client.log();
        let done = log
            .posts
            .iter()
            .any(|p| p.info.round == round && p.info.kind == "eose" && p.status.is_some());
        Ok(Check::when(done, || log.summary()))
    })
    .await
}

/// Waits until the v1 client stops POSTing, then checks it made at most `bound` POSTs.
pub async fn settles(client: &V1Client, bound: usize) -> Result<()> {
    client
        .wait_quiet(Duration::from_secs(1), super::LIMIT)
        .await?;
    let log = client.log();
    ensure!(
        log.posts_sent() <= bound,
        "the v1 client made more than {bound} POSTs: {}",
        log.summary()
    );
    Ok(())
}

/// `n` rows in one transaction (one `db_version`), ids from `first`.
pub fn write_bulk(db: &V1Db, first: i64, n: i64) -> Result<()> {
    db.write(|tx| {
        let mut insert =
            tx.prepare("INSERT INTO t (id, r, n, s) VALUES (?1, ?1 * 0.5, ?1, 'row ' || ?1)")?;
        for id in first..first + n {
            insert.execute([id])?;
        }
        Ok(())
    })
}

/// The one row with this id.
pub fn row(rows: &[String], id: i64) -> Option<&String> {
    rows.iter().find(|r| ids(std::slice::from_ref(r)) == [id])
}
