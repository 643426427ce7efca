//! The `crsync` binary under trouble, with real child processes: `sync
//! --watch` keeps going across server restarts and past `413` refusals,
//! `status` opens a file another connection keeps writing, and the server
//! refuses negative versions. Every wait has a timeout; nothing sleeps and
//! then asserts.

#[path = "support/process.rs"]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crsync::Store;
use support::{Fixture, Running, crsync, run};

const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY NOT NULL, body TEXT);";
const TOKEN: &str = "robust-token-0123456789";
/// Server restarts a `--watch` must live through.
const RESTARTS: i64 = 10;
/// Transactions written to the watched file during each restart.
const WRITES_PER_RESTART: i64 = 20;
/// `crsync status` runs while another connection writes.
const STATUS_RUNS: usize = 25;
/// The start of a `connect` event line of `sync --watch` (not `disconnect`).
const CONNECTED: &str = "] connect ";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs SQL on a database file through the Store, then closes it.
fn write(db: &Path, sql: String) {
    runtime().block_on(async {
        let store = Store::open(db).await.expect("open");
        store
            .write(move |tx| tx.execute_batch(&sql))
            .await
            .expect("write");
        store.close().await.expect("close");
    });
}

/// The ids in `notes`.
fn ids(db: &Path) -> Vec<i64> {
    runtime().block_on(async {
        let store = Store::open(db).await.expect("open");
        let ids = store
            .read(|c| {
                let mut stmt = c.prepare("SELECT id FROM notes ORDER BY id")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect()
            })
            .await
            .expect("read");
        store.close().await.expect("close");
        ids
    })
}

/// `sync --watch` of `db`, once it is connected and caught up.
fn watch(db: &Path, url: &str) -> Running {
    let mut cmd = crsync();
    cmd.arg("sync")
        .arg("--db")
        .arg(db)
        .args(["--url", url])
        .env("CRSYNC_TOKEN", TOKEN);
    let mut running = Running::start(cmd);
    running.wait_for_line(CONNECTED);
    running.wait_for_line("eose");
    running
}

#[test]
fn watch_lives_through_server_restarts() {
    let fx = Fixture::new(SCHEMA);
    let mut server = fx.server_on("127.0.0.1:0", Some(TOKEN), &[]);
    let addr = server.addr().to_owned();
    let url = server.db_url("notes");
    let a = fx.client_db("a.db");
    let b = fx.client_db("b.db");
    let mut watch_a = watch(&a, &url);
    let mut watch_b = watch(&b, &url);
    let mut expected = Vec::new();
    for i in 1..=RESTARTS {
        // Writes go out while the server goes down and comes back: their
        // POSTs may reach a server that holds no stream for a (NOT_CONNECTED).
        let writer = {
            let a = a.clone();
            std::thread::spawn(move || {
                for j in 1..=WRITES_PER_RESTART {
                    let id = 1000 * i + j;
                    write(
                        &a,
                        format!("INSERT INTO notes VALUES ({id}, 'restart {i}')"),
                    );
                }
            })
        };
        // Graceful (SIGTERM) and crash (SIGKILL) restarts, in turn.
        if i % 2 == 0 {
            let (status, _) = server.running.terminate();
            assert!(status.success(), "serve exited with {status:?}");
        } else {
            drop(server);
        }
        server = fx.server_on(&addr, Some(TOKEN), &[]);
        writer.join().expect("writer");
        expected.extend((1..=WRITES_PER_RESTART).map(|j| 1000 * i + j));
        // Both watchers are still there, and every row reaches b.
        wait_for_ids(&mut watch_b, &b, &expected);
    }
    // And the other way, after the last restart.
    write(&b, "INSERT INTO notes VALUES (1, 'from b')".into());
    watch_a.wait_for_line("change     notes (from remote)");
    for running in [watch_a, watch_b] {
        let (status, rest) = running.terminate();
        assert!(
            status.success(),
            "sync --watch exited with {status:?}: {rest:#?}"
        );
        assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
    }
    expected.insert(0, 1);
    assert_eq!(ids(&a), expected);
    assert_eq!(ids(&b), expected);
    let (status, _) = server.running.terminate();
    assert!(status.success());
}

/// Waits (each change line of `watching` is a new look) until `db` holds `expected`.
fn wait_for_ids(watching: &mut Running, db: &Path, expected: &[i64]) {
    while ids(db) != expected {
        watching.wait_for_line("change");
    }
}

#[test]
fn watch_keeps_going_past_413_and_delivers_once_the_limit_is_raised() {
    let fx = Fixture::new(SCHEMA);
    let small = fx.path("small.toml");
    std::fs::write(&small, "max_body_bytes = 4096\n").expect("write config");
    let small = small.to_str().expect("utf-8 path").to_owned();
    let mut server = fx.server_on("127.0.0.1:0", Some(TOKEN), &["--config", &small]);
    let addr = server.addr().to_owned();
    let url = server.db_url("notes");
    let a = fx.client_db("a.db");
    let mut watch_a = watch(&a, &url);
    // One transaction larger than the server takes.
    write(
        &a,
        format!("INSERT INTO notes VALUES (1, '{}')", "x".repeat(10_000)),
    );
    // Refused, retried (with backoff), refused again: still running.
    for _ in 0..2 {
        let line = watch_a.wait_for_line("disconnect");
        assert!(line.contains("413"), "{line}");
        watch_a.wait_for_line(CONNECTED);
    }
    // The operator raises the limit: the batch goes through, to b.
    let (status, _) = server.running.terminate();
    assert!(status.success());
    server = fx.server_on(&addr, Some(TOKEN), &[]);
    let b = fx.client_db("b.db");
    let mut watch_b = watch(&b, &url);
    wait_for_ids(&mut watch_b, &b, &[1]);
    let (status, _, stderr) = watch_a.terminate_with_stderr();
    assert!(
        status.success(),
        "sync --watch exited with {status:?}: {stderr}"
    );
    assert!(
        stderr.contains("max_body_bytes"),
        "no hint at the setting: {stderr}"
    );
    let (status, _) = watch_b.terminate();
    assert!(status.success());
    let (status, _) = server.running.terminate();
    assert!(status.success());
}

#[test]
fn status_opens_a_file_another_connection_keeps_writing() {
    let fx = Fixture::new(SCHEMA);
    let db = fx.client_db("busy.db");
    write(&db, "INSERT INTO notes VALUES (0, 'first')".into());
    // The other writer opens a fresh connection per write (as `sqlite3 FILE
    // .load ... INSERT` does): cr-sqlite initialises on it every time.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (db, stop, writes) = (db.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || -> Result<(), String> {
            runtime().block_on(async {
                // Loads cr-sqlite into this process.
                Store::open(&db)
                    .await
                    .map_err(|e| e.to_string())?
                    .close()
                    .await
                    .map_err(|e| e.to_string())
            })?;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let c = crsync::rusqlite::Connection::open(&db)
                    .map_err(|e| format!("open #{i}: {e}"))?;
                c.execute_batch(&format!(
                    "BEGIN IMMEDIATE; INSERT OR REPLACE INTO notes VALUES ({}, 'w{i}'); COMMIT;",
                    i % 20
                ))
                .map_err(|e| format!("write #{i}: {e}"))?;
                c.query_row("SELECT crsql_finalize()", [], |_| Ok(()))
                    .map_err(|e| e.to_string())?;
                drop(c);
                writes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let mut failures = Vec::new();
    for _ in 0..STATUS_RUNS {
        let mut status = crsync();
        status.args(["status", "--json", "--db"]).arg(&db);
        let out = run(status);
        if !out.status.success() {
            failures.push(out.stderr);
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert_eq!(writer.join().expect("writer thread"), Ok(()));
    assert!(
        writes.load(Ordering::Relaxed) > 0,
        "nothing was written meanwhile"
    );
    assert!(
        failures.is_empty(),
        "{} of {STATUS_RUNS} failed: {failures:#?}",
        failures.len()
    );
}

/// A raw HTTP/1.1 request on a fresh socket; the status and body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut socket = TcpStream::connect(addr).expect("connect");
    socket
        .set_read_timeout(Some(support::LINE_TIMEOUT))
        .expect("timeout");
    write!(
        socket,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut response = String::new();
    socket.read_to_string(&mut response).expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn the_server_refuses_negative_versions() {
    let fx = Fixture::new(SCHEMA);
    let server = fx.server_on("127.0.0.1:0", Some(TOKEN), &[]);
    let addr = server.addr().to_owned();
    let peer = "0f".repeat(16);
    // A v1 client's stream (bound by its token only), read up to its connect.
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(support::LINE_TIMEOUT))
        .expect("timeout");
    write!(
        stream,
        "GET /db/notes/stream?peerId={peer} HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("send");
    let mut lines = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    while !line.contains("\"type\":\"connect\"") {
        line.clear();
        assert!(
            lines.read_line(&mut line).expect("read") > 0,
            "stream ended"
        );
    }

    let sync = |cursor: &str| {
        format!(r#"{{"type":"sync","peerId":"{peer}","cursor":{{"peers":{{{cursor}}}}}}}"#)
    };
    for cursor in [
        format!(r#""{peer}":-1"#),
        format!(r#""{}":-5"#, "0e".repeat(16)),
    ] {
        let (status, body) = http(&addr, "POST", "/db/notes/sync", &sync(&cursor));
        assert_eq!(status, 400, "{body}");
        assert!(
            body.contains("MALFORMED") && body.contains("negative"),
            "{body}"
        );
    }
    let ranges = format!(
        r#"{{"type":"data","peerId":"{peer}","data":{{"type":"eose","data":[],"ranges":{{"{peer}":[5,2]}}}}}}"#
    );
    let (status, body) = http(&addr, "POST", "/db/notes/data", &ranges);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("reversed"), "{body}");
    // The session is untouched: a good sync is still taken.
    let (status, body) = http(
        &addr,
        "POST",
        "/db/notes/sync",
        &sync(&format!(r#""{peer}":0"#)),
    );
    assert_eq!(status, 200, "{body}");
    drop(lines);
    drop(stream);
    let (status, _) = server.running.terminate();
    assert!(status.success());
}
