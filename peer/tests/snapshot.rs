//! Store-level snapshots: export, install, and what the new replica holds,
//! sends and attributes; the refusals that protect user data.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use crsync_peer::{Cursor, DbVersion, InstallError, SNAPSHOT_PLACEHOLDER_SITE, SiteId, Store};
use support::{batches_for, dump, open_store, sync};

async fn insert(store: &Store, id: i64, name: &str) {
    let name = name.to_owned();
    store
        .write(move |tx| {
            tx.execute(
                "INSERT OR REPLACE INTO items (id, name, v) VALUES (?1, ?2, ?1)",
                crsync_peer::rusqlite::params![id, name],
            )
        })
        .await
        .expect("write");
}

/// Site id of every live cell, by (table, pk hex, cid), from `crsql_changes`.
async fn attribution(store: &Store) -> BTreeMap<(String, String, String), SiteId> {
    store
        .read(|c| {
            let mut stmt = c.prepare("SELECT \"table\", pk, cid, site_id FROM crsql_changes")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    (
                        r.get::<_, String>(0)?,
                        hex::encode(r.get::<_, Vec<u8>>(1)?),
                        r.get::<_, String>(2)?,
                    ),
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (key, site) = row?;
                out.insert(key, SiteId::from_slice(&site).expect("16 bytes"));
            }
            Ok(out)
        })
        .await
        .expect("attribution")
}

/// The cursor without `site`'s own entry.
fn without(cursor: &Cursor, site: SiteId) -> Vec<(SiteId, DbVersion)> {
    cursor.iter().filter(|(s, _)| *s != site).collect()
}

/// A server `a` holding its own writes and writes merged from `c`.
async fn server_with_history(dir: &Path) -> (Store, Store) {
    let a = open_store(dir, "a.db").await;
    let c = open_store(dir, "c.db").await;
    for i in 0..20 {
        insert(&a, i, "from a").await;
    }
    for i in 100..110 {
        insert(&c, i, "from c").await;
    }
    insert(&c, 5, "c overwrote a").await;
    sync(&c, &a).await;
    insert(&a, 6, "a after the merge").await;
    (a, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_snapshot_holds_the_exporters_rows_cursor_and_attribution() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = server_with_history(dir.path()).await;
    let snap = dir.path().join("snap.db");
    let export = a.export_snapshot(&snap).await.expect("export");
    assert_eq!(export.site_id, a.site_id());
    assert_eq!(
        export.cursor,
        a.cursor().await.unwrap(),
        "the exporter's cursor"
    );
    assert_eq!(
        export.version,
        a.cursor().await.unwrap().get(&a.site_id()).0
    );
    assert!(export.changes >= 2 * 31, "{export:?}");
    assert_eq!(export.bytes, std::fs::metadata(&snap).unwrap().len());
    for suffix in ["-wal", "-shm", "-journal"] {
        assert!(!dir.path().join(format!("snap.db{suffix}")).exists());
    }
    assert_eq!(
        a.count_changes_after(0).await.unwrap(),
        export.changes,
        "nothing moved since"
    );
    assert_eq!(a.count_changes_after(export.version).await.unwrap(), 0);

    let target = dir.path().join("s.db");
    let report = Store::install_snapshot(&snap, &target, None)
        .await
        .expect("install");
    assert!(!snap.exists(), "the snapshot file is consumed");
    assert!(!report.replaced_empty);
    assert_eq!(report.rows, 30, "20 of a's, 10 of c's");
    assert_ne!(report.site_id, a.site_id());
    assert_ne!(report.site_id, SNAPSHOT_PLACEHOLDER_SITE);

    let s = Store::open(&target).await.expect("open the replica");
    assert!(s.copied().is_none(), "the installed file is no copy");
    assert_eq!(s.site_id(), report.site_id);
    assert_eq!(dump(&s).await, dump(&a).await);
    let ours = s.cursor().await.unwrap();
    assert_eq!(ours, report.cursor);
    assert_eq!(
        without(&ours, s.site_id()),
        a.cursor().await.unwrap().iter().collect::<Vec<_>>(),
        "the replica's cursor is the exporter's"
    );
    // Every cell keeps its writer: a's writes are a's, c's are c's.
    assert_eq!(attribution(&s).await, attribution(&a).await);
    let sites: std::collections::BTreeSet<SiteId> = attribution(&s).await.into_values().collect();
    assert_eq!(
        sites,
        [a.site_id(), c.site_id()].into_iter().collect(),
        "no cell is the new site's"
    );

    // Nothing to send either way while neither side wrote.
    let to_a: usize = batches_for(&s, &a.cursor().await.unwrap())
        .await
        .iter()
        .map(|b| b.changes.len())
        .sum();
    assert_eq!(to_a, 0, "the replica sends a nothing it already had");
    assert_eq!(sync(&a, &s).await.applied, 0);

    // Writes after the snapshot flow both ways; the replica's under its new id.
    insert(&a, 200, "a after the snapshot").await;
    insert(&s, 300, "s after the snapshot").await;
    insert(&c, 400, "c after the snapshot").await;
    sync(&c, &a).await;
    let from_a = sync(&a, &s).await;
    assert_eq!(from_a.applied, 2 * 3, "only what came after: {from_a:?}");
    let from_s = sync(&s, &a).await;
    assert_eq!(from_s.applied, 3, "only the replica's own row: {from_s:?}");
    assert_eq!(dump(&s).await, dump(&a).await);
    let at_a = attribution(&a).await;
    assert_eq!(
        at_a.iter()
            .filter(|(_, site)| **site == s.site_id())
            .count(),
        3,
        "the replica's row is its own at the exporter"
    );
    assert_eq!(attribution(&s).await, at_a);
    for store in [a, c, s] {
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_never_installed_over_data() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = server_with_history(dir.path()).await;
    let snap = dir.path().join("snap.db");
    a.export_snapshot(&snap).await.expect("export");

    // A replica with rows: refused, untouched.
    let full = open_store(dir.path(), "full.db").await;
    insert(&full, 1, "mine").await;
    let before = dump(&full).await;
    let site = full.site_id();
    full.close().await.unwrap();
    let err = Store::install_snapshot(&snap, dir.path().join("full.db"), None)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, InstallError::TargetNotEmpty { ref table, .. } if table == "items"),
        "{err}"
    );
    let full = Store::open(dir.path().join("full.db")).await.unwrap();
    assert_eq!((dump(&full).await, full.site_id()), (before, site));
    full.close().await.unwrap();

    // A plain table with a row, no CRR: user data too.
    let plain = dir.path().join("plain.db");
    {
        let conn = crsync_peer::rusqlite::Connection::open(&plain).unwrap();
        conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep')")
            .unwrap();
        conn.query_row("SELECT crsql_finalize()", [], |_| Ok(()))
            .unwrap();
    }
    let err = Store::install_snapshot(&snap, &plain, None)
        .await
        .expect_err("refused");
    assert!(matches!(err, InstallError::TargetNotEmpty { .. }), "{err}");

    // Not a database at all: not replaced.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"not a database, but somebody's file").unwrap();
    let err = Store::install_snapshot(&snap, &junk, None)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, InstallError::TargetUnreadable { .. }),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&junk).unwrap(),
        b"not a database, but somebody's file"
    );
    assert!(snap.exists(), "a refused snapshot is kept");

    // An empty database with the schema: replaced.
    let empty = open_store(dir.path(), "empty.db").await;
    empty.close().await.unwrap();
    let report = Store::install_snapshot(&snap, dir.path().join("empty.db"), None)
        .await
        .expect("installed over an empty database");
    assert!(report.replaced_empty);
    let s = Store::open(dir.path().join("empty.db")).await.unwrap();
    assert_eq!(dump(&s).await, dump(&a).await);
    for store in [a, c, s] {
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_files_and_plain_databases_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = server_with_history(dir.path()).await;
    let snap = dir.path().join("snap.db");
    a.export_snapshot(&snap).await.expect("export");
    let bytes = std::fs::read(&snap).unwrap();

    // Truncated: not a database SQLite can check.
    let cut = dir.path().join("cut.db");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Store::install_snapshot(&cut, dir.path().join("t1.db"), None)
        .await
        .expect_err("refused");
    assert!(matches!(err, InstallError::Corrupt { .. }), "{err}");
    assert!(!dir.path().join("t1.db").exists());

    // A database file that was not prepared as a snapshot (its own site id on ordinal 0).
    let err = Store::install_snapshot(dir.path().join("c.db"), dir.path().join("t2.db"), None)
        .await
        .expect_err("refused");
    assert!(matches!(err, InstallError::NotASnapshot { .. }), "{err}");
    assert!(!dir.path().join("t2.db").exists());

    let err = Store::install_snapshot(dir.path().join("none.db"), dir.path().join("t3.db"), None)
        .await
        .expect_err("refused");
    assert!(matches!(err, InstallError::Missing(_)), "{err}");
    for store in [a, c] {
        store.close().await.unwrap();
    }
}

/// Rows of `crsql_changes` above local version `version`.
async fn listed_after(store: &Store, version: i64) -> u64 {
    store
        .read(move |c| {
            c.query_row(
                "SELECT count(*) FROM crsql_changes WHERE db_version > ?1",
                [version],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .expect("count") as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_count_of_changes_after_a_version_is_what_crsql_changes_lists() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    insert(&a, 1, "one").await;
    let snap = a
        .export_snapshot(dir.path().join("snap.db"))
        .await
        .expect("export");
    assert_eq!(a.count_changes_after(snap.version).await.unwrap(), 0);
    assert_eq!(snap.changes, listed_after(&a, 0).await);
    insert(&a, 2, "two").await;
    a.write(|tx| tx.execute("UPDATE items SET name = 'one again' WHERE id = 1", []))
        .await
        .unwrap();
    a.write(|tx| tx.execute("INSERT INTO tags VALUES (2, 'x', 'n')", []))
        .await
        .unwrap();
    let moved = a.count_changes_after(snap.version).await.unwrap();
    assert!(moved >= 4, "{moved}");
    assert_eq!(moved, listed_after(&a, snap.version).await);
    assert_eq!(
        a.count_changes_after(0).await.unwrap(),
        listed_after(&a, 0).await
    );
    a.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_that_stopped_before_its_move_can_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = server_with_history(dir.path()).await;
    let snap = dir.path().join("snap.db");
    a.export_snapshot(&snap).await.expect("export");
    // The move fails (no such directory) after the new identity was committed.
    let err = Store::install_snapshot(&snap, dir.path().join("missing/dir/s.db"), None)
        .await
        .expect_err("no such directory");
    assert!(matches!(err, InstallError::Io { .. }), "{err}");
    assert!(snap.exists());
    // Run again: the file's unused id is replaced, and it installs.
    let target = dir.path().join("s.db");
    assert!(!Store::check_snapshot_target(&target, None).await.unwrap());
    let report = Store::install_snapshot(&snap, &target, None)
        .await
        .expect("installs on the second run");
    let s = Store::open(&target).await.unwrap();
    assert!(s.copied().is_none());
    assert_eq!(s.site_id(), report.site_id);
    assert_eq!(dump(&s).await, dump(&a).await);
    // Once it wrote, it is a replica, never a snapshot to install again.
    insert(&s, 500, "own write").await;
    s.close().await.unwrap();
    let err = Store::install_snapshot(&target, dir.path().join("again.db"), None)
        .await
        .expect_err("a replica with writes of its own");
    assert!(matches!(err, InstallError::NotASnapshot { .. }), "{err}");
    assert!(matches!(
        Store::check_snapshot_target(&target, None).await,
        Err(InstallError::TargetNotEmpty { .. })
    ));
    for store in [a, c] {
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookkeeping_that_must_not_travel_is_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let (a, c) = server_with_history(dir.path()).await;
    // Staging of chunked transactions, as the exporter would hold it mid-transfer.
    a.write(|tx| {
        tx.execute_batch(
            "INSERT INTO crsync_staged (site_id, origin_version, seq, \"table\", pk, cid, val, col_version, cl)
                 VALUES (x'0102030405060708090a0b0c0d0e0f10', 7, 0, 'items', x'010901', 'name', 'x', 1, 1);
             INSERT INTO crsync_staging (site_id, origin_version, upto_seq, started)
                 VALUES (x'0102030405060708090a0b0c0d0e0f10', 7, 0, 0);",
        )
    })
    .await
    .unwrap();
    let snap = dir.path().join("snap.db");
    let export = a.export_snapshot(&snap).await.expect("export");
    let conn = crsync_peer::rusqlite::Connection::open(&snap).unwrap();
    let count = |table: &str| -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(count("crsync_staged"), 0);
    assert_eq!(count("crsync_staging"), 0);
    assert_eq!(
        count("crsync_meta"),
        0,
        "the exporter's file identity stays behind"
    );
    assert!(count("crsync_origin") > 0, "origin records travel");
    let local: Vec<u8> = conn
        .query_row(
            "SELECT site_id FROM crsql_site_id WHERE ordinal = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(local, SNAPSHOT_PLACEHOLDER_SITE.as_bytes().to_vec());
    let own_rows: i64 = conn
        .query_row(
            "SELECT count(*) FROM items__crsql_clock WHERE site_id = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(own_rows, 0, "no clock row is left on ordinal 0");
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "delete", "a single self-contained file");
    let cursor: i64 = conn
        .query_row(
            "SELECT db_version FROM crsync_cursor WHERE site_id = ?1",
            [a.site_id().as_bytes().as_slice()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(cursor, export.version, "the exporter's own cursor entry");
    conn.query_row("SELECT crsql_finalize()", [], |_| Ok(()))
        .unwrap();
    for store in [a, c] {
        store.close().await.unwrap();
    }
}
