//! Peer-level sync over a plain in-memory connection.

mod support;

use std::time::Duration;

use crsync_peer::{Peer, PeerEvent};
use futures_util::StreamExt;
use support::{dump, memory_pair, open_store, wait_converged};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_sync_initial_and_live_changes() {
    let dir = tempfile::tempdir().unwrap();
    let a = Peer::builder(open_store(dir.path(), "a.db").await).build();
    let b = Peer::builder(open_store(dir.path(), "b.db").await).build();
    a.store()
        .write(|tx| tx.execute_batch("INSERT INTO items VALUES (1, 'before', 1, x'01')"))
        .await
        .unwrap();
    let mut events = b.events();
    let (ca, cb) = memory_pair();
    a.accept(ca);
    b.accept(cb);
    b.wait_caught_up(a.site_id(), WAIT).await.unwrap();
    a.wait_caught_up(b.site_id(), WAIT).await.unwrap();
    assert_eq!(dump(a.store()).await, dump(b.store()).await);
    // live: a write on either side reaches the other
    a.store()
        .write(|tx| tx.execute_batch("INSERT INTO items VALUES (2, 'live-a', 2, NULL)"))
        .await
        .unwrap();
    b.store()
        .write(|tx| tx.execute_batch("INSERT INTO items VALUES (3, 'live-b', 3, NULL)"))
        .await
        .unwrap();
    wait_converged(&[a.store(), b.store()], WAIT).await;
    assert_eq!(dump(a.store()).await[0].len(), 4);
    // b saw connect, sync, eose and a merged change
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), events.next()).await {
        seen.push(e);
    }
    assert!(
        seen.iter()
            .any(|e| matches!(e, PeerEvent::Connected { peer, .. } if *peer == a.site_id())),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(e, PeerEvent::Eose { .. })),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(e, PeerEvent::Change { .. })),
        "{seen:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_in_the_middle_relays() {
    let dir = tempfile::tempdir().unwrap();
    let a = Peer::builder(open_store(dir.path(), "a.db").await).build();
    let hub = Peer::builder(open_store(dir.path(), "hub.db").await).build();
    let c = Peer::builder(open_store(dir.path(), "c.db").await).build();
    for (x, y) in [(&a, &hub), (&c, &hub)] {
        let (cx, cy) = memory_pair();
        x.accept(cx);
        y.accept(cy);
    }
    a.store()
        .write(|tx| tx.execute_batch("INSERT INTO items VALUES (10, 'from a', 1, NULL)"))
        .await
        .unwrap();
    c.store()
        .write(|tx| tx.execute_batch("INSERT INTO items VALUES (20, 'from c', 1, NULL)"))
        .await
        .unwrap();
    wait_converged(&[a.store(), hub.store(), c.store()], WAIT).await;
    for p in [a, hub, c] {
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_waits_for_the_upgrade_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fast = |s| Peer::builder(s).schema_poll(Duration::from_millis(50));
    let a = fast(open_store(dir.path(), "a.db").await).build();
    let b = fast(open_store(dir.path(), "b.db").await).build();
    a.store()
        .write(|tx| {
            tx.execute_batch(
                "PRAGMA user_version = 2; INSERT INTO items VALUES (1, 'v2 row', 1, NULL)",
            )
        })
        .await
        .unwrap();
    b.store()
        .write(|tx| tx.execute_batch("PRAGMA user_version = 1"))
        .await
        .unwrap();
    let mut events = b.events();
    let (ca, cb) = memory_pair();
    a.accept(ca);
    b.accept(cb);
    let outdated = tokio::time::timeout(WAIT, async {
        while let Some(e) = events.next().await {
            if let PeerEvent::Outdated {
                peer,
                remote_version,
                local_version,
            } = e
            {
                return (peer, remote_version, local_version);
            }
        }
        panic!("event stream ended");
    })
    .await
    .unwrap();
    assert_eq!(outdated, (a.site_id(), 2, 1));
    let rows = |s: &crsync_peer::Store| {
        let s = s.clone();
        async move {
            s.read(|c| c.query_row("SELECT count(*) FROM items", [], |r| r.get::<_, i64>(0)))
                .await
                .unwrap()
        }
    };
    assert_eq!(
        rows(b.store()).await,
        0,
        "changes from a newer schema were applied"
    );
    // b upgrades: the changes arrive without reconnecting
    b.store()
        .write(|tx| tx.execute_batch("PRAGMA user_version = 2"))
        .await
        .unwrap();
    wait_converged(&[a.store(), b.store()], WAIT).await;
    assert_eq!(rows(b.store()).await, 1);
    a.shutdown().await;
    b.shutdown().await;
}

/// A remote's saved record goes to the Store at most every few seconds, so
/// acknowledgements in quick succession wait; the newest must still be saved
/// when the session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remotes_saved_record_holds_its_newest_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = connected(dir.path()).await;
    b.wait_caught_up(a.site_id(), WAIT).await.unwrap();
    let mut newest = None;
    for id in 1..=3 {
        newest = Some(write_acknowledged(&a, &b, id).await);
    }
    a.shutdown().await;
    let records = a.store().remotes().await.unwrap();
    let record = records
        .iter()
        .find(|r| r.site == b.site_id())
        .expect("a record of b");
    assert_eq!(Some(record.acknowledged), newest, "{records:?}");
    assert!(record.synced_at.is_some(), "{records:?}");
    b.shutdown().await;
}

/// While a remote stays in sync, the time last in sync is the present, even
/// when nothing happens on the connection (a session reports its status only
/// when it changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_last_in_sync_keeps_up_while_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = connected(dir.path()).await;
    write_acknowledged(&a, &b, 1).await;
    let synced = std::time::SystemTime::now();
    // Nothing moves for a while: no write, no ping (the default interval is longer).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let status = a.status().await;
    let at = status.last_synced_at().expect("in sync");
    assert!(
        at.duration_since(synced).unwrap_or_default() >= Duration::from_secs(1),
        "last in sync {at:?}, {synced:?} before the wait"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Two Peers on files of their own in `dir`, connected by an in-memory pair.
async fn connected(dir: &std::path::Path) -> (Peer, Peer) {
    let a = Peer::builder(open_store(dir, "a.db").await).build();
    let b = Peer::builder(open_store(dir, "b.db").await).build();
    let (ca, cb) = memory_pair();
    a.accept(ca);
    b.accept(cb);
    (a, b)
}

/// Writes row `id` on `a` and waits until `b` acknowledged it; its version.
async fn write_acknowledged(a: &Peer, b: &Peer, id: i64) -> crsync_peer::DbVersion {
    let (_, version) = a
        .store()
        .write_versioned(move |tx| tx.execute("INSERT INTO items VALUES (?1, 'x', ?1, NULL)", [id]))
        .await
        .expect("write a row");
    let version = version.expect("a write");
    a.wait_acknowledged(version, Some(b.site_id()), WAIT)
        .await
        .expect("acknowledged");
    version
}

/// A link that sends one message per round trip (an HTTP transport: each
/// `POST` waits for its answer) under a steady stream of small commits:
/// each commit must wait for at most about one round trip, not for a queue
/// of small messages formed while earlier ones were still on their way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_wait_at_most_about_a_round_trip_on_a_link_that_sends_one_message_at_a_time() {
    use futures_util::SinkExt;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    const ROUND_TRIP: Duration = Duration::from_millis(50);
    const COMMITS: i64 = 200;
    const EVERY: Duration = Duration::from_millis(5);

    let dir = tempfile::tempdir().unwrap();
    let a = Peer::builder(open_store(dir.path(), "a.db").await).build();
    let b = Peer::builder(open_store(dir.path(), "b.db").await).build();
    let (mut ca, cb) = memory_pair();
    // Every message A sends takes a round trip, one after another.
    ca.sink = Box::pin(ca.sink.with(|m| async move {
        tokio::time::sleep(ROUND_TRIP).await;
        Ok::<_, crsync_peer::TransportError>(m)
    }));
    a.accept(ca);
    b.accept(cb);
    b.wait_caught_up(a.site_id(), WAIT).await.unwrap();

    // When B first holds each id, polled every millisecond.
    let seen: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let watcher = {
        let (store, seen) = (b.store().clone(), Arc::clone(&seen));
        tokio::spawn(async move {
            let mut held = 0;
            while held < COMMITS {
                let max: i64 = store
                    .read(|c| {
                        c.query_row("SELECT coalesce(max(id), 0) FROM items", [], |r| r.get(0))
                    })
                    .await
                    .unwrap();
                if max > held {
                    let now = Instant::now();
                    seen.lock()
                        .unwrap()
                        .extend((held + 1..=max).map(|id| (id, now)));
                    held = max;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let mut written = Vec::new();
    let mut tick = tokio::time::interval(EVERY);
    for id in 1..=COMMITS {
        tick.tick().await;
        a.store()
            .write(move |tx| tx.execute("INSERT INTO items VALUES (?1, 'x', 1, NULL)", [id]))
            .await
            .unwrap();
        written.push(Instant::now());
    }
    tokio::time::timeout(WAIT, watcher).await.unwrap().unwrap();
    let worst = (seen.lock().unwrap().iter())
        .map(|&(id, at)| at.saturating_duration_since(written[id as usize - 1]))
        .max()
        .unwrap();
    eprintln!("worst lag {worst:?} with a {ROUND_TRIP:?} round trip");
    // A commit waits for the message on its way, then goes in the next: two
    // round trips or three (A's changes go in batches of 64 here), about
    // 160 ms. Queued behind one small message per coalescing window, as
    // before, commits waited 900 ms and more.
    assert!(worst < ROUND_TRIP * 10, "a commit waited {worst:?}");
    a.shutdown().await;
    b.shutdown().await;
}
