//! Snapshot bootstrap through the `crsync` binary: `crsync clone`, the
//! automatic bootstrap of `crsync sync`, `kill -9` of `crsync clone` at
//! random points of its download (and of its install), and a server killed
//! mid-download. After every kill the target is absent or a complete
//! replica, and a later run resumes and sync completes. Every wait has a
//! timeout; nothing sleeps and then asserts.

#[path = "support/process.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crsync::advanced::SNAPSHOT_PLACEHOLDER_SITE;
use crsync::rusqlite::Connection;
use crsync::{SiteId, Store};
use support::{Fixture, Running, TestServer, crsync, run};

const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY NOT NULL, body TEXT);";
const TOKEN: &str = "snapshot-token-0123456789";
/// Limit on waiting for a download to reach a point.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The server's replica of `notes` with `rows` rows of its own (written
/// before the server starts), in transactions of 1000.
fn server_db(fixture: &Fixture, rows: i64) -> PathBuf {
    crsync::advanced::load_extension(None).expect("cr-sqlite");
    let dir = fixture.path("server");
    std::fs::create_dir_all(&dir).expect("data dir");
    let path = dir.join("notes.db");
    let conn = Connection::open(&path).expect("open");
    conn.execute_batch(SCHEMA).expect("schema");
    conn.query_row("SELECT crsql_as_crr('notes')", [], |_| Ok(()))
        .expect("crr");
    let filler = "x".repeat(120);
    for chunk in (0..rows).step_by(1000) {
        let tx = conn.unchecked_transaction().expect("begin");
        for id in chunk..(chunk + 1000).min(rows) {
            tx.execute(
                "INSERT INTO notes VALUES (?1, ?2)",
                (id, format!("note {id} {filler}")),
            )
            .expect("insert");
        }
        tx.commit().expect("commit");
    }
    conn.query_row("SELECT crsql_finalize()", [], |_| Ok(()))
        .expect("finalize");
    drop(conn);
    path
}

/// Rows, site id and who wrote each `body` (id -> site), of a database file.
struct Replica {
    site: SiteId,
    rows: Vec<(i64, String)>,
    writers: Vec<(i64, SiteId)>,
}

fn replica(db: &Path) -> Replica {
    runtime().block_on(async {
        let store = Store::open(db).await.expect("open");
        let site = store.site_id();
        let (rows, writers) = store
            .read(|c| {
                let mut stmt = c.prepare("SELECT id, body FROM notes ORDER BY id")?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                let mut stmt = c.prepare(
                    "SELECT pk, site_id FROM crsql_changes WHERE cid = 'body' ORDER BY pk",
                )?;
                let writers = stmt
                    .query_map([], |r| {
                        let pk: Vec<u8> = r.get(0)?;
                        let site: Vec<u8> = r.get(1)?;
                        Ok((pk, site))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((rows, writers))
            })
            .await
            .expect("read");
        store.close().await.expect("close");
        let mut writers: Vec<(i64, SiteId)> = writers
            .into_iter()
            .map(|(pk, site)| {
                let id = crsync::advanced::PackedPk(pk).unpack().expect("pk")[0].clone();
                let crsync::SqlValue::Integer(id) = id else {
                    panic!("integer key")
                };
                (id, SiteId::from_slice(&site).expect("site"))
            })
            .collect();
        writers.sort();
        Replica {
            site,
            rows,
            writers,
        }
    })
}

fn clone_cmd(server: &TestServer, db: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = crsync();
    cmd.arg("clone")
        .arg("--db")
        .arg(db)
        .args(["--url", &server.db_url("notes"), "--token", TOKEN])
        .args(extra);
    cmd
}

fn sync_once(server: &TestServer, db: &Path) -> support::Output {
    let mut cmd = crsync();
    cmd.arg("sync").arg("--db").arg(db).args([
        "--url",
        &server.db_url("notes"),
        "--token",
        TOKEN,
        "--once",
    ]);
    run(cmd)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Waits until `ready` holds or the child exits; `true` if `ready` held.
fn wait_for(child: &mut Running, what: &str, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PROGRESS_TIMEOUT;
    loop {
        if ready() {
            return true;
        }
        if child.exited().is_some() {
            return false;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A small seeded generator (xorshift), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("CRSYNC_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        eprintln!("crash test seed: CRSYNC_CRASH_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Checks the clone of the server's `server_rows` rows is complete and its own.
fn assert_complete(db: &Path, server: &Replica) {
    let r = replica(db);
    assert_eq!(r.rows, server.rows, "the clone holds the server's rows");
    assert_ne!(r.site, server.site);
    assert_ne!(r.site, SNAPSHOT_PLACEHOLDER_SITE);
    assert!(
        r.writers.iter().all(|(_, site)| *site == server.site),
        "every row is still the server's"
    );
}

#[test]
fn clone_makes_a_replica_that_syncs_only_what_came_after() {
    let fixture = Fixture::new(SCHEMA);
    let server_file = server_db(&fixture, 3000);
    let before = replica(&server_file);
    let server = fixture.server(Some(TOKEN), &["--snapshot-threshold", "1000"]);
    let db = fixture.path("clone.db");
    let out = run(clone_cmd(&server, &db, &[]));
    out.assert_success();
    assert!(out.stdout.contains("cloned "), "{}", out.stdout);
    assert!(out.stdout.contains("rows:     3000"), "{}", out.stdout);
    assert!(
        out.stdout.contains(&before.site.to_hex()),
        "the cursor names the server: {}",
        out.stdout
    );
    let cloned = replica(&db);
    assert!(
        out.stdout
            .contains(&format!("site id:  {} (new)", cloned.site)),
        "{}",
        out.stdout
    );
    assert_complete(&db, &before);

    // A second clone into the same file is refused: it holds data now.
    run(clone_cmd(&server, &db, &[])).assert_failure(1, "already holds data");

    // Sync: nothing to receive or send, then a write each way.
    let out = sync_once(&server, &db);
    out.assert_success();
    assert!(out.stdout.contains("received 0 changes"), "{}", out.stdout);
    assert!(out.stdout.contains("sent     0 changes"), "{}", out.stdout);
    runtime().block_on(async {
        let store = Store::open(&db).await.expect("open");
        store
            .write(|tx| tx.execute("INSERT INTO notes VALUES (5000, 'from the clone')", []))
            .await
            .expect("write");
        store.close().await.expect("close");
    });
    let other = fixture.path("other.db");
    let out = sync_once(&server, &other);
    out.assert_success();
    assert!(
        out.stdout.contains("bootstrapping"),
        "a new file starts from the snapshot: {}",
        out.stdout
    );
    let out = sync_once(&server, &db);
    out.assert_success();
    assert!(out.stdout.contains("sent     1 change"), "{}", out.stdout);
    let out = sync_once(&server, &other);
    out.assert_success();
    assert!(
        out.stdout.contains("received 1 change"),
        "only what came after: {}",
        out.stdout
    );
    let (a, b) = (replica(&db), replica(&other));
    assert_eq!(a.rows, b.rows);
    assert_eq!(a.writers, b.writers);
    assert_eq!(
        a.writers.iter().filter(|(_, s)| *s == a.site).count(),
        1,
        "the clone's write is its own"
    );
    assert_eq!(
        a.writers.iter().filter(|(_, s)| *s == before.site).count(),
        3000
    );
}

#[test]
fn sync_of_a_new_file_replays_below_the_threshold() {
    let fixture = Fixture::new(SCHEMA);
    server_db(&fixture, 50);
    let server = fixture.server(Some(TOKEN), &["--snapshot-threshold", "1000"]);
    let db = fixture.path("new.db");
    sync_once(&server, &db).assert_failure(1, "offers no snapshot");
    assert!(!db.exists());
    run(clone_cmd(&server, &db, &[])).assert_failure(1, "below the snapshot threshold");
    // An empty file with the schema replays.
    let db = fixture.client_db("empty.db");
    let out = sync_once(&server, &db);
    out.assert_success();
    assert!(!out.stdout.contains("bootstrapping"), "{}", out.stdout);
    assert!(out.stdout.contains("received 50 changes"), "{}", out.stdout);
}

#[test]
fn clone_killed_at_random_points_leaves_nothing_or_a_complete_replica() {
    let mut rng = Rng::seeded();
    let fixture = Fixture::new(SCHEMA);
    let server_file = server_db(&fixture, 20_000);
    let server_before = replica(&server_file);
    let server = fixture.server(Some(TOKEN), &["--snapshot-threshold", "1000"]);
    let db = fixture.path("crash.db");
    let partial = with_suffix(&db, ".crsync-download");
    let verified = with_suffix(&db, ".crsync-snapshot");
    // The size the download will reach: make the snapshot once.
    let info = runtime().block_on(async {
        crsync::transports::snapshot::SnapshotClient::new(&server.db_url("notes"))
            .with_token(TOKEN)
            .info()
            .await
            .expect("info")
            .expect("a snapshot")
    });
    assert!(
        info.bytes > 1 << 20,
        "a snapshot of {} bytes is too small to kill in",
        info.bytes
    );
    let rate = (info.bytes / 2).to_string(); // about two seconds per whole download
    let mut kills = 0;
    let report = |round: usize| {
        eprintln!(
            "round {round}: killed with {} of {} bytes on disk, snapshot verified: {}, target: {}",
            file_len(&partial),
            info.bytes,
            verified.exists(),
            db.exists()
        )
    };
    // The download: five kills at a random byte of what is left (the first
    // four short of the last 256 KiB, the fifth anywhere up to the end, even
    // after the last byte but before the check).
    for round in 0..5 {
        let done = file_len(&partial);
        let end = if round < 4 {
            info.bytes - (256 << 10)
        } else {
            info.bytes
        };
        if done + 1 >= end {
            break;
        }
        // Within the first half of what is left: every round has room.
        let at = done + 1 + rng.below((end - 1 - done) / 2);
        let mut child = Running::start(clone_cmd(&server, &db, &["--limit-rate", &rate]));
        assert!(
            wait_for(&mut child, "the download", || file_len(&partial) >= at),
            "round {round}: the clone ended before its download did"
        );
        let (status, _) = child.kill_9();
        assert!(!status.success(), "round {round}: killed");
        kills += 1;
        report(round);
        assert!(
            !db.exists(),
            "round {round}: no target before the download is complete"
        );
        assert!(
            !with_suffix(&db, "-wal").exists() && !with_suffix(&db, "-journal").exists(),
            "round {round}: no side files of a target that does not exist"
        );
    }
    // The install: kills at a random moment (up to 400 ms) after the
    // download verified, until a run finishes or a kill finds the target.
    for round in 5..25 {
        let mut child = Running::start(clone_cmd(&server, &db, &[]));
        let until = Instant::now() + Duration::from_micros(rng.below(400_000));
        let reached = wait_for(&mut child, "the verified download", || {
            verified.exists() || db.exists()
        }) && wait_for(&mut child, "a random moment", || Instant::now() >= until);
        if !reached {
            child.wait_exit().assert_success();
            break;
        }
        let (status, _) = child.kill_9();
        if status.success() {
            // It finished between the random moment and the kill: a run
            // that was not interrupted, as when the moment comes too late.
            assert_complete(&db, &server_before);
            break;
        }
        kills += 1;
        report(round);
        if db.exists() {
            // Absent, or complete.
            assert_complete(&db, &server_before);
            break;
        }
    }
    assert!(kills >= 4, "killed {kills} times");
    if !db.exists() {
        let had_part = file_len(&partial) > 0;
        let out = run(clone_cmd(&server, &db, &[]));
        out.assert_success();
        if had_part {
            assert!(
                out.stdout.contains("resumed after"),
                "resumed: {}",
                out.stdout
            );
        }
    }
    assert_complete(&db, &server_before);
    for leftover in [
        &partial,
        &verified,
        &with_suffix(&db, ".crsync-download.etag"),
    ] {
        assert!(!leftover.exists(), "{} left behind", leftover.display());
    }
    // And sync completes.
    let out = sync_once(&server, &db);
    out.assert_success();
    assert!(out.stdout.contains("received 0 changes"), "{}", out.stdout);
}

#[test]
fn a_server_killed_mid_download_leaves_a_part_that_resumes() {
    let fixture = Fixture::new(SCHEMA);
    // Several times what the kernel's socket buffers can hold (a few MiB at
    // most), or the whole file could already be on its way when the server dies.
    let server_file = server_db(&fixture, 100_000);
    let server_before = replica(&server_file);
    let server = fixture.server(Some(TOKEN), &["--snapshot-threshold", "1000"]);
    let db = fixture.path("cut.db");
    let partial = with_suffix(&db, ".crsync-download");
    let bytes = runtime().block_on(async {
        crsync::transports::snapshot::SnapshotClient::new(&server.db_url("notes"))
            .with_token(TOKEN)
            .info()
            .await
            .expect("info")
            .expect("a snapshot")
            .bytes
    });
    let rate = (bytes / 4).to_string();
    let mut child = Running::start(clone_cmd(&server, &db, &["--limit-rate", &rate]));
    assert!(
        wait_for(&mut child, "a third of the download", || file_len(&partial)
            >= bytes / 3),
        "the clone ended early"
    );
    let addr = server.addr().to_owned();
    let (_, _) = server.running.kill_9();
    let out = child.wait_exit();
    out.assert_failure(1, "run the command again to resume");
    assert!(!db.exists(), "the target is untouched");
    let kept = file_len(&partial);
    assert!(
        kept >= bytes / 3 && kept < bytes,
        "the part is kept: {kept} of {bytes}"
    );

    // The server comes back (its cached snapshot with it): the clone resumes.
    let server = fixture.server_on(&addr, Some(TOKEN), &["--snapshot-threshold", "1000"]);
    let out = run(clone_cmd(&server, &db, &[]));
    out.assert_success();
    assert!(
        out.stdout.contains(&format!("resumed after {kept} bytes")),
        "{}",
        out.stdout
    );
    assert_complete(&db, &server_before);
    sync_once(&server, &db).assert_success();
}
