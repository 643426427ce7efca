//! Snapshot bootstrap end to end, over a real server on 127.0.0.1: a
//! replica made from the snapshot and one made by replay converge with the
//! server and with each other (rows, cursors, who wrote each cell),
//! including writes after the snapshot on every side; a damaged download is
//! refused and touches nothing; refused tokens are typed errors.

// Test helpers: a failed setup step should panic with its error.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crsync::advanced::SNAPSHOT_PLACEHOLDER_SITE;
use crsync::rusqlite::Connection;
use crsync::server::{Access, Auth, SNAPSHOT_DIR, Server, ServerConfig};
use crsync::transports::snapshot::{
    CloneError, DownloadError, SNAPSHOT_SUFFIX, SnapshotClient, clone_database,
};
use crsync::transports::sse::SseDialer;
use crsync::{Cursor, DbVersion, Peer, SiteId, Store};

const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS todo (id INTEGER PRIMARY KEY NOT NULL, title TEXT, n INTEGER);";
const RW: &str = "rw-secret";
const RO: &str = "ro-secret";
const OTHER: &str = "other-db-secret";
const WAIT: Duration = Duration::from_secs(30);

struct Running {
    dir: PathBuf,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn replica(&self) -> PathBuf {
        self.dir.join("data").join("notes.db")
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        }
    }
}

async fn start_server(dir: &Path, threshold: u64) -> Running {
    std::fs::write(dir.join("schema.sql"), SCHEMA).unwrap();
    let mut config = ServerConfig::default();
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.data_dir = dir.join("data");
    config.schema = Some(dir.join("schema.sql"));
    config.allow_create = true;
    config.snapshot_threshold = threshold;
    config.shutdown_timeout = Duration::from_secs(2);
    let auth = Auth::new()
        .with_creating_token(RW, ["notes"])
        .with_token(RO, ["notes"], Access::ReadOnly)
        .with_token(OTHER, ["elsewhere"], Access::ReadWrite);
    let server = Server::bind_with_auth(config, auth).await.unwrap();
    let url = format!("http://{}/db/notes", server.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .serve(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Running {
        dir: dir.to_path_buf(),
        url,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Writes rows `ids` into the file with a connection of its own (as another
/// process would: the writes of the file's own site).
fn write_rows(path: &Path, ids: std::ops::Range<i64>, title: &str) {
    let conn = Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    for id in ids {
        tx.execute(
            "INSERT OR REPLACE INTO todo VALUES (?1, ?2, ?1)",
            (id, format!("{title} {id}")),
        )
        .unwrap();
    }
    tx.commit().unwrap();
    conn.query_row("SELECT crsql_finalize()", [], |_| Ok(()))
        .unwrap();
}

/// The server's replica, made before the server starts: its own writes.
async fn server_file(path: &Path, rows: i64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let store = Store::open(path).await.unwrap();
    store.write(|tx| tx.execute_batch(SCHEMA)).await.unwrap();
    store.enable_crr(&["todo"]).await.unwrap();
    store.close().await.unwrap();
    for chunk in (0..rows).step_by(100) {
        write_rows(path, chunk..(chunk + 100).min(rows), "server");
    }
}

async fn client_store(path: &Path) -> Store {
    let store = Store::builder(path)
        .poll_interval(Duration::from_millis(20))
        .open()
        .await
        .unwrap();
    store.write(|tx| tx.execute_batch(SCHEMA)).await.unwrap();
    store.enable_crr(&["todo"]).await.unwrap();
    store
}

fn peer(store: Store, url: &str) -> Peer {
    let peer = Peer::builder(store)
        .ack_timeout(Duration::from_secs(2))
        .build();
    peer.add_dialer(SseDialer::new(url).with_token(RW));
    peer
}

/// `(id, title, n)`; a replay may show a row whose title was overwritten
/// elsewhere without its title for a moment (the overwritten cell left its
/// first transaction), so both may be NULL until converged.
type Rows = Vec<(i64, Option<String>, Option<i64>)>;

fn rows_of(c: &Connection) -> crsync::rusqlite::Result<Rows> {
    let mut s = c.prepare("SELECT id, title, n FROM todo ORDER BY id")?;
    let r = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    r.collect()
}

/// Who wrote each cell: (pk, column) -> site id, from `crsql_changes`.
type Attribution = BTreeMap<(Vec<u8>, String), SiteId>;

fn attribution_of(c: &Connection) -> crsync::rusqlite::Result<Attribution> {
    let mut s = c.prepare("SELECT pk, cid, site_id FROM crsql_changes WHERE \"table\" = 'todo'")?;
    let r = s.query_map([], |r| {
        let site: Vec<u8> = r.get(2)?;
        Ok(((r.get(0)?, r.get(1)?), SiteId::from_slice(&site).unwrap()))
    })?;
    r.collect()
}

/// Rows, attribution and cursor of a replica file, read with a connection
/// of its own (the server's replica while it serves, too).
struct Seen {
    site: SiteId,
    rows: Rows,
    attribution: Attribution,
    cursor: Cursor,
}

fn look(path: &Path) -> Seen {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let seen = (|| {
        c.execute_batch("BEGIN")?;
        let site: Vec<u8> = c.query_row("SELECT crsql_site_id()", [], |r| r.get(0))?;
        let site = SiteId::from_slice(&site).unwrap();
        let mut cursor = Cursor::new();
        let mut s = c.prepare("SELECT site_id, db_version FROM crsync_cursor")?;
        for row in s.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))? {
            let (peer, version) = row?;
            cursor.advance(SiteId::from_slice(&peer).unwrap(), DbVersion(version));
        }
        let own: Option<i64> =
            c.query_row("SELECT max(db_version) FROM crsql_changes", [], |r| {
                r.get(0)
            })?;
        cursor.advance(site, DbVersion(own.unwrap_or(0)));
        let seen = Seen {
            site,
            rows: rows_of(&c)?,
            attribution: attribution_of(&c)?,
            cursor,
        };
        c.execute_batch("COMMIT")?;
        Ok::<_, crsync::rusqlite::Error>(seen)
    })()
    .unwrap();
    c.query_row("SELECT crsql_finalize()", [], |_| Ok(()))
        .unwrap();
    seen
}

/// The cursors agree on every site but the two replicas' own.
fn same_cursors(a: &Seen, b: &Seen) -> bool {
    let others = |s: &Seen| -> Vec<(SiteId, DbVersion)> {
        s.cursor
            .iter()
            .filter(|(site, _)| *site != a.site && *site != b.site)
            .collect()
    };
    others(a) == others(b)
}

/// Waits (bounded) until every replica has the rows `expected` of them and
/// they all agree: rows, attribution, cursors.
async fn converged(paths: &[&Path], expected: usize) -> Vec<Seen> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen: Vec<Seen> = paths.iter().map(|p| look(p)).collect();
        let agree = seen.iter().all(|s| {
            s.rows.len() == expected
                && s.rows == seen[0].rows
                && s.attribution == seen[0].attribution
                && same_cursors(s, &seen[0])
        }) && seen.iter().all(|a| seen.iter().all(|b| same_cursors(a, b)));
        if agree {
            return seen;
        }
        if tokio::time::Instant::now() > deadline {
            let summary: Vec<_> = seen
                .iter()
                .map(|s| (s.site, s.rows.len(), s.cursor.clone()))
                .collect();
            panic!("no convergence within {WAIT:?}: {summary:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_replayed_replicas_converge_with_the_server_and_each_other() {
    let dir = tempfile::tempdir().unwrap();
    server_file(&dir.path().join("data").join("notes.db"), 400).await;
    let mut server = start_server(dir.path(), 300).await;

    // A client's writes reach the server before the snapshot (merged there:
    // the snapshot carries their origin versions).
    let a = peer(client_store(&dir.path().join("a.db")).await, &server.url);
    a.store()
        .write(|tx| {
            for id in 1000..1050 {
                tx.execute("INSERT INTO todo VALUES (?1, 'from a', ?1)", [id])?;
            }
            Ok(())
        })
        .await
        .unwrap();
    converged(&[&server.replica(), a.store().path()], 450).await;
    let server_site = look(&server.replica()).site;

    // The snapshot replica.
    let s_path = dir.path().join("s.db");
    let report = clone_database(&server.url, Some(RO), &s_path)
        .await
        .unwrap();
    let download = report.download.clone().unwrap();
    assert_eq!(download.resumed_from, 0);
    assert_eq!(download.site_id, Some(server_site));
    assert_eq!(report.install.rows, 450);
    assert!(!dir.path().join(format!("s.db{SNAPSHOT_SUFFIX}")).exists());
    let at_clone = look(&s_path);
    assert_eq!(at_clone.site, report.install.site_id);
    assert_ne!(at_clone.site, server_site);
    assert_ne!(at_clone.site, SNAPSHOT_PLACEHOLDER_SITE);
    assert!(same_cursors(&at_clone, &look(&server.replica())));
    let sites: std::collections::BTreeSet<SiteId> =
        at_clone.attribution.values().copied().collect();
    assert_eq!(
        sites,
        [server_site, a.site_id()].into_iter().collect(),
        "the server's writes are the server's, a's are a's; none is the new site's"
    );

    // After the snapshot: the server writes (its own site), a writes.
    write_rows(&server.replica(), 2000..2020, "server after");
    a.store()
        .write(|tx| tx.execute("UPDATE todo SET title = 'a after' WHERE id < 10", []))
        .await
        .unwrap();

    // The replayed replica, and the snapshot replica online; both write.
    let r = peer(client_store(&dir.path().join("r.db")).await, &server.url);
    let s = peer(Store::open(&s_path).await.unwrap(), &server.url);
    assert!(s.store().copied().is_none());
    assert_eq!(s.site_id(), report.install.site_id);
    for (p, base) in [(&s, 3000), (&r, 4000)] {
        p.store()
            .write(move |tx| {
                for id in base..base + 5 {
                    tx.execute("INSERT INTO todo VALUES (?1, 'new replica', ?1)", [id])?;
                }
                Ok(())
            })
            .await
            .unwrap();
    }
    let paths = [
        server.replica(),
        a.store().path().to_path_buf(),
        r.store().path().to_path_buf(),
        s_path.clone(),
    ];
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let seen = converged(&refs, 450 + 20 + 10).await;
    // Each cell is its writer's everywhere (checked equal above): the new
    // replica's rows are its own site's at the server, the server's rows the
    // server's.
    let at_server = &seen[0].attribution;
    let by = |site: SiteId| at_server.values().filter(|s| **s == site).count();
    assert_eq!(by(s.site_id()), 5 * 2, "s's 5 rows, 2 columns each");
    assert_eq!(by(r.site_id()), 5 * 2);
    assert_eq!(
        by(server_site),
        (400 + 20) * 2 - 10,
        "the server's rows but a's updated titles"
    );
    assert_eq!(by(a.site_id()), 50 * 2 + 10);
    // Every writer's last write is held at its version by the others.
    for site in [server_site, a.site_id(), s.site_id(), r.site_id()] {
        let versions: std::collections::BTreeSet<i64> = seen
            .iter()
            .filter(|x| x.site != site)
            .map(|x| x.cursor.get(&site).0)
            .collect();
        assert_eq!(versions.len(), 1, "{site}: {versions:?}");
        assert!(versions.into_iter().all(|v| v > 0));
    }
    for p in [a, r, s] {
        p.shutdown().await;
        p.store().clone().close().await.unwrap();
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_download_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    server_file(&dir.path().join("data").join("notes.db"), 200).await;
    let mut server = start_server(dir.path(), 100).await;
    let client = SnapshotClient::new(&server.url).with_token(RW);
    let info = client
        .info()
        .await
        .unwrap()
        .expect("a snapshot past the threshold");
    // Damage the server's cached copy: one byte in its last page.
    let cache = dir.path().join("data").join(SNAPSHOT_DIR);
    let file = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().ends_with(".db"))
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    // Into a new file: refused, nothing left behind.
    let target = dir.path().join("new.db");
    let err = client.clone_into(&target).await.expect_err("damaged");
    let CloneError::Download(DownloadError::ChecksumMismatch {
        expected, actual, ..
    }) = &err
    else {
        panic!("{err}");
    };
    assert_eq!(expected, &info.sha256);
    assert_ne!(actual, &info.sha256);
    assert!(err.to_string().contains("damaged"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("new.db"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Over an empty database: refused, the file unchanged.
    let empty = dir.path().join("empty.db");
    client_store(&empty).await.close().await.unwrap();
    let before = std::fs::read(&empty).unwrap();
    let err = client.clone_into(&empty).await.expect_err("damaged");
    assert!(
        matches!(
            err,
            CloneError::Download(DownloadError::ChecksumMismatch { .. })
        ),
        "{err}"
    );
    assert_eq!(std::fs::read(&empty).unwrap(), before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_read_access_are_refused_typed() {
    let dir = tempfile::tempdir().unwrap();
    server_file(&dir.path().join("data").join("notes.db"), 200).await;
    let mut server = start_server(dir.path(), 100).await;
    let target = dir.path().join("t.db");
    for (token, status) in [(None, 401), (Some("wrong"), 401), (Some(OTHER), 403)] {
        let err = clone_database(&server.url, token, &target)
            .await
            .expect_err("refused");
        assert!(
            matches!(err, CloneError::Download(DownloadError::Refused { status: s, .. }) if s == status),
            "{token:?}: {err}"
        );
        let mut client = SnapshotClient::new(&server.url);
        if let Some(token) = token {
            client = client.with_token(token);
        }
        let err = client.info().await.expect_err("refused");
        assert!(err.to_string().contains(&status.to_string()), "{err}");
        assert!(!target.exists());
    }
    // Below the threshold there is no snapshot: a typed answer, not an error.
    let small_dir = tempfile::tempdir().unwrap();
    let mut small = start_server(small_dir.path(), 1_000_000).await;
    // Only a stream creates the database (RW may create it).
    let created = crsync::Dialer::dial(
        &mut SseDialer::new(&small.url).with_token(RW),
        SiteId::from_bytes([9; 16]),
    )
    .await
    .unwrap();
    drop(created);
    let client = SnapshotClient::new(&small.url).with_token(RW);
    assert_eq!(client.info().await.unwrap(), None);
    let err = client.clone_into(&target).await.expect_err("no snapshot");
    assert!(
        matches!(err, CloneError::Download(DownloadError::Unavailable { .. })),
        "{err}"
    );
    small.stop().await;
    server.stop().await;
}
