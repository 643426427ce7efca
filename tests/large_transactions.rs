//! One origin transaction larger than any message, end to end through real
//! processes: a plain table enabled in one go (cr-sqlite records every
//! existing row as one transaction) syncs through `crsync serve` under its
//! default limits, over HTTP+SSE and WebSocket, in both directions; and a
//! receiver killed with SIGKILL at random points of the transaction holds
//! either none of it or all of it, then completes (resuming what it staged).

#[path = "support/process.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crsync::Store;
use rand::{Rng, SeedableRng};
use support::{Fixture, Running, crsync, run};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS big (
    id INTEGER PRIMARY KEY NOT NULL, a TEXT, b INTEGER, c REAL);";
const TOKEN: &str = "test-token-0123456789";
/// Rows of the table enabled in one go: three changes each.
const ROWS: i64 = 20_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A plain (not yet replicated) table of `ROWS` rows, then `crsync enable`.
fn enabled_in_one_go(fx: &Fixture, name: &str) -> std::path::PathBuf {
    let db = fx.path(name);
    runtime().block_on(async {
        let store = Store::open(&db).await.expect("open");
        store
            .write(|tx| {
                tx.execute_batch(SCHEMA)?;
                let mut insert = tx.prepare("INSERT INTO big VALUES (?1, ?2, ?3, ?4)")?;
                for i in 0..ROWS {
                    insert.execute(crsync::rusqlite::params![
                        i,
                        format!("row {i} of a table that existed before crsync"),
                        i * 3,
                        i as f64 / 7.0
                    ])?;
                }
                Ok(())
            })
            .await
            .expect("write");
        store.close().await.expect("close");
    });
    let mut cmd = crsync();
    cmd.args(["enable", "--db"]).arg(&db).arg("big");
    run(cmd).assert_success();
    db
}

/// An empty replica with the table enabled.
fn empty_replica(fx: &Fixture, name: &str) -> std::path::PathBuf {
    let db = fx.path(name);
    let mut cmd = crsync();
    cmd.args(["enable", "--db"])
        .arg(&db)
        .arg("--schema")
        .arg(fx.path("client.sql"))
        .arg("big");
    run(cmd).assert_success();
    db
}

/// `(rows, sum of b, staged changes)` of a database file, read with the
/// process that wrote it gone.
fn state(db: &Path) -> (i64, i64, i64) {
    runtime().block_on(async {
        let store = Store::open(db).await.expect("open");
        let state = store
            .read(|c| {
                let (rows, sum) =
                    c.query_row("SELECT count(*), coalesce(sum(b), 0) FROM big", [], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?;
                let staged = c.query_row("SELECT count(*) FROM crsync_staged", [], |r| r.get(0))?;
                Ok((rows, sum, staged))
            })
            .await
            .expect("read");
        store.close().await.expect("close");
        state
    })
}

fn sync_cmd(db: &Path, url: &str, extra: &[&str]) -> Command {
    let mut cmd = crsync();
    cmd.args(["sync", "--once", "--timeout", "120", "--db"])
        .arg(db)
        .args(["--url", url])
        .args(extra)
        .env("CRSYNC_TOKEN", TOKEN);
    cmd
}

fn sync_once(db: &Path, url: &str, extra: &[&str]) -> support::Output {
    let out = run(sync_cmd(db, url, extra));
    out.assert_success();
    // A refused body says so in words ("413" alone also matches a progress
    // line's rate, such as "10413 changes/s").
    let stderr = out.stderr.to_lowercase();
    assert!(
        !stderr.contains("payload too large") && !stderr.contains("payload_too_large"),
        "{out:#?}"
    );
    out
}

/// The number after `what` in a `sync --once` report (`received`: what the
/// store gained; `downloaded`: what came over the wire).
fn reported(out: &support::Output, what: &str) -> u64 {
    out.stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(what)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {what} line: {out:#?}"))
}

const FULL_SUM: i64 = 3 * ROWS * (ROWS - 1) / 2;

#[test]
fn a_table_enabled_in_one_go_syncs_through_default_limits_both_ways() {
    let fx = Fixture::new(SCHEMA);
    let server = fx.server(Some(TOKEN), &[]);
    let url = server.db_url("big");
    let a = enabled_in_one_go(&fx, "a.db");
    let b = empty_replica(&fx, "b.db");

    // Up over HTTP+SSE (the server's default body limit), down over WebSocket.
    let out = sync_once(&a, &url, &[]);
    assert!(out.stdout.contains("sent     60000 changes"), "{out:#?}");
    assert_eq!(state(&fx.path("server/big.db")).0, ROWS);
    let out = sync_once(&b, &url, &["--ws"]);
    assert_eq!(reported(&out, "received"), 3 * ROWS as u64, "{out:#?}");
    assert_eq!(state(&b), (ROWS, FULL_SUM, 0));

    // A second transaction of the same size, the other way: up over
    // WebSocket, down over HTTP+SSE.
    runtime().block_on(async {
        let store = Store::open(&b).await.expect("open");
        store
            .write(|tx| tx.execute_batch("UPDATE big SET b = b + 1, a = 'changed by b'"))
            .await
            .expect("update");
        store.close().await.expect("close");
    });
    sync_once(&b, &url, &["--ws"]);
    sync_once(&a, &url, &[]);
    assert_eq!(state(&a), (ROWS, FULL_SUM + ROWS, 0));
    assert_eq!(state(&fx.path("server/big.db")).1, FULL_SUM + ROWS);
    let (status, _) = server.running.terminate();
    assert!(status.success());
}

/// Starts `cmd`, kills it with SIGKILL after `delay` (if it is still running).
/// Returns whether it was killed before it finished.
fn kill_after(cmd: Command, delay: Duration) -> bool {
    let mut running = Running::start(cmd);
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if running.has_exited() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    running.kill()
}

#[test]
fn a_receiver_killed_mid_transaction_holds_all_or_nothing_and_resumes() {
    let fx = Fixture::new(SCHEMA);
    let mut server = fx.server(Some(TOKEN), &[]);
    let mut url = server.db_url("big");
    let a = enabled_in_one_go(&fx, "a.db");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);

    // The server receives: SIGKILL it at random points of a's upload, then
    // restart it on the same data directory.
    let mut server_kills = 0;
    for _ in 0..4 {
        let delay = Duration::from_millis(rng.random_range(100..2_500));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
        });
        let mut client = Running::start(sync_cmd(&a, &url, &[]));
        killer.join().expect("timer");
        let killed = server.running.kill();
        server_kills += usize::from(killed);
        client.kill();
        let (rows, sum, _) = state(&fx.path("server/big.db"));
        assert!(
            (rows, sum) == (0, 0) || (rows, sum) == (ROWS, FULL_SUM),
            "after a kill at {delay:?} the server holds {rows} rows (sum {sum})"
        );
        server = fx.server(Some(TOKEN), &[]);
        url = server.db_url("big");
        if rows == ROWS {
            break;
        }
    }
    assert!(
        server_kills > 0,
        "no kill landed while the server was running"
    );
    sync_once(&a, &url, &[]);
    assert_eq!(state(&fx.path("server/big.db")), (ROWS, FULL_SUM, 0));

    // The client receives: SIGKILL `crsync sync` at random points of its
    // download; each time the file holds none of the rows or all of them.
    let b = empty_replica(&fx, "b.db");
    let mut staged_before_last = 0;
    for _ in 0..5 {
        let delay = Duration::from_millis(rng.random_range(200..3_000));
        let killed = kill_after(sync_cmd(&b, &url, &["--ws"]), delay);
        let (rows, sum, staged) = state(&b);
        assert!(
            (rows, sum) == (0, 0) || (rows, sum) == (ROWS, FULL_SUM),
            "after a kill at {delay:?} the replica holds {rows} rows (sum {sum})"
        );
        if !killed || rows == ROWS {
            break;
        }
        staged_before_last = staged;
    }
    assert!(
        staged_before_last > 0,
        "no kill landed while the replica was staging the transaction"
    );
    let out = sync_once(&b, &url, &["--ws"]);
    assert_eq!(state(&b), (ROWS, FULL_SUM, 0));
    {
        // What was staged before the kill was not sent again.
        let downloaded = reported(&out, "downloaded");
        assert!(
            downloaded <= (3 * ROWS - staged_before_last) as u64,
            "staged {staged_before_last}, then downloaded {downloaded}"
        );
    }
    let (status, _) = server.running.terminate();
    assert!(status.success());
}
