//! Opening a database file that another connection is writing: cr-sqlite
//! initialises inside `open`, and must wait for the other writer's locks
//! instead of failing (`automatic extension loading failed`); a file that is
//! already set up opens without taking the write lock at all.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crsync_peer::Store;

/// Opens of the Store while the other connection writes.
const OPENS: usize = 60;
/// Limit on one open (the busy timeout is 5 s).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates `a.db` in `dir` through the Store (set up, then closed); its path.
async fn set_up_file(dir: &Path) -> PathBuf {
    support::open_store(dir, "a.db")
        .await
        .close()
        .await
        .expect("close");
    dir.join("a.db")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_succeed_while_another_connection_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = set_up_file(dir.path()).await;

    // The other writer behaves like a separate `sqlite3` process per write: a
    // new connection (cr-sqlite initialises on it too), one transaction, close.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (path, stop, writes) = (path.clone(), stop.clone(), writes.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let c = crsync_peer::rusqlite::Connection::open(&path)
                    .map_err(|e| format!("writer open #{i}: {e}"))?;
                c.execute_batch(&format!(
                    "BEGIN IMMEDIATE; INSERT OR REPLACE INTO items (id, name) VALUES ({}, 'w{i}'); COMMIT;",
                    i % 50
                ))
                .map_err(|e| format!("writer write #{i}: {e}"))?;
                support::close_side(c);
                writes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };

    let mut failures = Vec::new();
    for i in 0..OPENS {
        match tokio::time::timeout(OPEN_TIMEOUT, Store::open(&path)).await {
            Ok(Ok(store)) => {
                store.cursor().await.unwrap();
                store.close().await.unwrap();
            }
            Ok(Err(e)) => failures.push(format!("open #{i}: {e}")),
            Err(_) => failures.push(format!("open #{i}: no answer within {OPEN_TIMEOUT:?}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writer = writer.join().unwrap();
    assert!(
        writes.load(Ordering::Relaxed) > 0,
        "the other connection never wrote"
    );
    assert_eq!(writer, Ok(()));
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
}

#[tokio::test]
async fn a_set_up_file_opens_while_another_connection_holds_the_write_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = set_up_file(dir.path()).await;
    let (held_tx, held_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = {
        let path = path.clone();
        std::thread::spawn(move || {
            let c = support::side_connection(&path);
            c.execute_batch("BEGIN IMMEDIATE; INSERT INTO items (id, name) VALUES (1, 'held')")
                .unwrap();
            held_tx.send(()).unwrap();
            // Held until the open below is done, however long it takes.
            let _ = release_rx.recv();
            c.execute_batch("COMMIT").unwrap();
            support::close_side(c);
        })
    };
    held_rx.recv_timeout(OPEN_TIMEOUT).unwrap();
    let opened = tokio::time::timeout(OPEN_TIMEOUT, Store::open(&path)).await;
    let result = match opened {
        Ok(Ok(store)) => {
            let cursor = store.cursor().await.map(|_| ());
            store.close().await.unwrap();
            cursor.map_err(|e| e.to_string())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    };
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(result, Ok(()), "opening while the write lock is held");
}
