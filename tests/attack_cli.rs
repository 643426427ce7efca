//! Copied replicas through the `crsync` binary (issue 7): `crsync serve` on
//! 127.0.0.1 port 0 and `crsync sync` as child processes.
//!
//! - `cp a.db b.db` gives two files with one site id. Both write; `a` syncs;
//!   `b` is refused (exit code non-zero, a message naming `crsync fork`),
//!   over HTTP+SSE and WebSocket, `--once` and `--watch`; `a`'s rows are on
//!   the server, `b`'s rows are still in `b.db`, and `a` keeps syncing.
//! - A backup restored over the original file (same path, same inode, so
//!   the file looks like the original): its own version is below what the
//!   server already holds for its site id, and it is refused the same way,
//!   with nothing lost on either side.
//!
//! The replica files are written and read the way another program would
//! (a plain SQLite connection with cr-sqlite loaded), not through the Store,
//! so the test observes only what `crsync` itself does with them.

#[path = "support/process.rs"]
mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crsync::rusqlite::Connection;
use support::{Fixture, Output, crsync, run};

/// The server's schema for new databases.
const SERVER_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY NOT NULL, body TEXT);";
const TOKEN: &str = "attack-test-token-0123456789";
/// What the refusal of a copied file must name: the fix.
const FIX: &str = "crsync fork";

type Rows = Vec<(i64, String)>;

/// A SQLite connection with cr-sqlite loaded (registered for every
/// connection of this process), as any other program on the file would use.
fn connect(db: &Path) -> Connection {
    crsync::advanced::load_extension(None).expect("cr-sqlite (scripts/setup.sh)");
    let conn = Connection::open(db).expect("open");
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .expect("busy timeout");
    conn
}

fn close(conn: Connection) {
    conn.execute_batch("SELECT crsql_finalize()")
        .expect("crsql_finalize");
    conn.close().expect("close");
}

/// Writes with a plain connection, as an app would.
fn write(db: &Path, sql: &str) {
    let conn = connect(db);
    conn.execute_batch(sql).expect("write");
    close(conn);
}

/// The rows of `notes`.
fn rows(db: &Path) -> Rows {
    let conn = connect(db);
    let rows = {
        let mut stmt = conn
            .prepare("SELECT id, body FROM notes ORDER BY id")
            .expect("prepare");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<Rows, _>>()
            .expect("rows")
    };
    close(conn);
    rows
}

fn site_id(db: &Path) -> String {
    let conn = connect(db);
    let site: String = conn
        .query_row("SELECT hex(crsql_site_id())", [], |r| r.get(0))
        .expect("site id");
    close(conn);
    site.to_lowercase()
}

/// Copies a closed database file the way `cp` does (onto an existing
/// destination `cp` truncates and rewrites it: the inode stays). A leftover
/// WAL of the destination would belong to another state: removed first.
fn cp(from: &Path, to: &Path) {
    for ext in ["-wal", "-shm"] {
        let mut from_side = from.as_os_str().to_owned();
        from_side.push(ext);
        assert!(
            !Path::new(&from_side).exists(),
            "{from:?} is not closed cleanly ({ext} exists)"
        );
        let mut to_side = to.as_os_str().to_owned();
        to_side.push(ext);
        let _ = std::fs::remove_file(&to_side);
    }
    std::fs::copy(from, to).expect("copy");
}

/// The rows of `notes` on the server.
fn server_rows(fx: &Fixture) -> Rows {
    rows(&fx.path("server/notes.db"))
}

/// `crsync sync --once` (`extra`: `--ws`).
fn sync_once(db: &Path, url: &str, extra: &[&str]) -> Output {
    let mut cmd = crsync();
    cmd.args(["sync", "--once", "--timeout", "30", "--db"])
        .arg(db)
        .args(["--url", url])
        .args(extra)
        .env("CRSYNC_TOKEN", TOKEN);
    run(cmd)
}

/// `crsync sync --watch` until it exits by itself (a refusal it cannot
/// retry); the run helper kills it and fails the test past its time limit.
fn sync_watch(db: &Path, url: &str) -> Output {
    let mut cmd = crsync();
    cmd.args(["sync", "--watch", "--db"])
        .arg(db)
        .args(["--url", url])
        .env("CRSYNC_TOKEN", TOKEN);
    run(cmd)
}

/// The refusal of a copied file: a failure exit, and a message naming the fix.
fn assert_refused_as_copy(out: &Output, db: &Path, how: &str) {
    assert!(
        !out.status.success() && out.code().is_some(),
        "{how}: a copied replica was synced (or killed) instead of refused: {out:#?}"
    );
    assert!(
        out.stderr.contains(FIX),
        "{how}: the error does not name `{FIX}`: {out:#?}"
    );
    let name = db.file_name().and_then(|n| n.to_str()).expect("file name");
    assert!(
        out.stderr.contains(name),
        "{how}: the error does not name the file {name}: {out:#?}"
    );
}

#[test]
fn a_copied_file_is_refused_and_loses_nothing() {
    let fx = Fixture::new(SERVER_SCHEMA);
    let server = fx.server(Some(TOKEN), &[]);
    let url = server.db_url("notes");
    let a = fx.client_db("a.db");
    write(&a, "INSERT INTO notes VALUES (1, 'before the copy')");
    sync_once(&a, &url, &[]).assert_success();

    let b = fx.path("b.db");
    cp(&a, &b);
    assert_eq!(site_id(&a), site_id(&b), "set-up: one site id, two files");
    // Each file writes its own row: the same site id and the same next
    // version, with different content.
    write(&a, "INSERT INTO notes VALUES (2, 'only in a')");
    write(&b, "INSERT INTO notes VALUES (3, 'only in b')");

    sync_once(&a, &url, &[]).assert_success();
    let on_server = server_rows(&fx);
    assert_eq!(
        on_server,
        vec![(1, "before the copy".into()), (2, "only in a".into())],
        "a's rows are on the server"
    );

    let attempts: [(&str, &dyn Fn() -> Output); 3] = [
        ("sync --once", &|| sync_once(&b, &url, &[])),
        ("sync --once --ws", &|| sync_once(&b, &url, &["--ws"])),
        ("sync --watch", &|| sync_watch(&b, &url)),
    ];
    for (how, attempt) in attempts {
        let out = attempt();
        assert_refused_as_copy(&out, &b, how);
        assert_eq!(server_rows(&fx), on_server, "{how}: b changed the server");
        assert_eq!(
            rows(&b),
            vec![(1, "before the copy".into()), (3, "only in b".into())],
            "{how}: b.db keeps its rows"
        );
    }

    // The original keeps syncing, both ways.
    write(&a, "INSERT INTO notes VALUES (4, 'a, later')");
    sync_once(&a, &url, &["--ws"]).assert_success();
    let c = fx.client_db("c.db");
    sync_once(&c, &url, &[]).assert_success();
    let want: Rows = vec![
        (1, "before the copy".into()),
        (2, "only in a".into()),
        (4, "a, later".into()),
    ];
    assert_eq!(server_rows(&fx), want);
    assert_eq!(rows(&c), want);
    assert_eq!(rows(&a), want);
}

#[test]
fn a_backup_restored_over_the_original_is_refused() {
    let fx = Fixture::new(SERVER_SCHEMA);
    let server = fx.server(Some(TOKEN), &[]);
    let url = server.db_url("notes");
    let a = fx.client_db("a.db");
    write(&a, "INSERT INTO notes VALUES (1, 'one')");
    sync_once(&a, &url, &[]).assert_success();
    let backup = fx.path("backup.db");
    cp(&a, &backup);

    // The original writes and syncs more after the backup.
    write(&a, "INSERT INTO notes VALUES (2, 'two')");
    sync_once(&a, &url, &[]).assert_success();
    write(&a, "INSERT INTO notes VALUES (3, 'three')");
    sync_once(&a, &url, &["--ws"]).assert_success();
    let on_server = server_rows(&fx);
    assert_eq!(on_server.len(), 3, "{on_server:?}");

    // Restored in place: same path, same inode; to the file system it is the
    // original. Its own version (1) is below what the server holds (3).
    let inode = std::fs::metadata(&a).expect("stat").ino();
    cp(&backup, &a);
    assert_eq!(
        std::fs::metadata(&a).expect("stat").ino(),
        inode,
        "set-up: the restore keeps the inode"
    );
    assert_eq!(rows(&a), vec![(1, "one".into())]);
    // A write after the restore reuses version 2, which the server holds
    // with other content.
    write(&a, "INSERT INTO notes VALUES (4, 'after the restore')");

    let attempts: [(&str, &dyn Fn() -> Output); 2] = [
        ("sync --once", &|| sync_once(&a, &url, &[])),
        ("sync --once --ws", &|| sync_once(&a, &url, &["--ws"])),
    ];
    for (how, attempt) in attempts {
        let out = attempt();
        assert_refused_as_copy(&out, &a, how);
        assert_eq!(server_rows(&fx), on_server, "{how}: the server's rows");
        assert_eq!(
            rows(&a),
            vec![(1, "one".into()), (4, "after the restore".into())],
            "{how}: the restored file keeps its rows"
        );
    }

    // Another replica still gets everything the server holds.
    let c = fx.client_db("c.db");
    sync_once(&c, &url, &[]).assert_success();
    assert_eq!(rows(&c), on_server);
}
