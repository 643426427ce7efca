//! `Peer::status`, pause and resume, write acknowledgements and typed dial
//! failures, against a real server on 127.0.0.1 (real sockets): connect,
//! initial sync, live, server killed, reconnect, token revoked, new token.

// Test helpers: a failed setup step should panic with its error.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crsync::transports::memory;
use crsync::transports::sse::SseDialer;
use crsync::{DialFailure, Peer, PeerEvent, Store, SyncPhase, SyncStatus, WaitError};
use futures_util::StreamExt;
use inprocess::{peer, start_server, store};

#[path = "support/inprocess.rs"]
mod inprocess;

const TOKEN: &str = "status-secret";
const OTHER_TOKEN: &str = "status-other";
const WAIT: Duration = Duration::from_secs(20);

async fn insert(store: &Store, id: i64) -> crsync::DbVersion {
    let (_, version) = store
        .write_versioned(move |tx| {
            tx.execute(
                "INSERT INTO todo (id, title) VALUES (?1, 'x') ON CONFLICT (id) DO UPDATE SET title = title || 'x'",
                [id],
            )
        })
        .await
        .unwrap();
    version.expect("a write to a CRR has a version")
}

/// Waits until the status satisfies `ok`; returns it.
async fn status_until(peer: &Peer, what: &str, ok: impl Fn(&SyncStatus) -> bool) -> SyncStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = peer.status().await;
        if ok(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited for {what}; status: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn phase(status: &SyncStatus) -> SyncPhase {
    status
        .remotes
        .first()
        .map_or(SyncPhase::Disconnected, |r| r.phase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_a_client_through_connect_pause_kill_and_revoked_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), "127.0.0.1:0".parse().unwrap(), TOKEN).await;
    let addr = server.addr;
    let base = format!("http://{addr}/db/todo");
    let client = store(&dir.path().join("client.db")).await;
    for id in 0..300 {
        insert(&client, id).await;
    }
    let peer = peer(client.clone());
    let before = peer.status().await;
    assert_eq!(before.pending.transactions, 300, "{before:#?}");
    assert!(before.pending.oldest.is_some());
    assert!(!before.connected() && !before.has_synced());
    let mut events = peer.events();
    let handle = peer.add_dialer(SseDialer::new(&base).with_token(TOKEN));

    // Connect, initial upload, live: everything acknowledged, progress at 100%.
    let live = status_until(&peer, "live and in sync", |s| {
        phase(s) == SyncPhase::Live && s.pending.transactions == 0 && s.has_synced()
    })
    .await;
    let remote = &live.remotes[0];
    assert!(remote.connected() && remote.dialed && remote.peer.is_some());
    assert_eq!(remote.acknowledged, live.own_version);
    assert_eq!(remote.upload.total, Some(remote.upload.done), "{remote:#?}");
    assert!(remote.upload.done >= 300, "{remote:#?}");
    assert_eq!(remote.upload.fraction(), Some(1.0));
    let server_site = remote.peer.unwrap();

    // A write's acknowledgement, by that remote and by any.
    let version = insert(&client, 1000).await;
    peer.wait_acknowledged(version, Some(server_site), WAIT)
        .await
        .unwrap();
    peer.wait_acknowledged(version, None, WAIT).await.unwrap();

    // Pause the dialer: the connection closes, writes wait, status says so.
    handle.pause();
    status_until(&peer, "paused", |s| {
        phase(s) == SyncPhase::Paused && !s.connected()
    })
    .await;
    assert!(peer.connected_peers().is_empty());
    let paused_version = insert(&client, 1001).await;
    let waiting = status_until(&peer, "one pending write", |s| s.pending.transactions == 1).await;
    assert!(waiting.pending.oldest_age().is_some());
    assert!(matches!(
        peer.wait_acknowledged(paused_version, None, Duration::from_millis(300))
            .await,
        Err(WaitError::Timeout(_))
    ));
    // The whole Peer paused: waits fail at once.
    peer.pause();
    assert_eq!(
        peer.wait_acknowledged(paused_version, None, WAIT).await,
        Err(WaitError::Paused)
    );
    assert_eq!(
        peer.wait_caught_up(server_site, WAIT).await,
        Err(WaitError::Paused)
    );
    peer.resume();
    handle.resume();
    peer.wait_acknowledged(paused_version, Some(server_site), WAIT)
        .await
        .unwrap();
    status_until(&peer, "live again", |s| {
        phase(s) == SyncPhase::Live && s.pending.transactions == 0
    })
    .await;

    // The server goes away: disconnected, redialing.
    server.kill().await;
    status_until(&peer, "disconnected", |s| {
        phase(s) == SyncPhase::Disconnected && !s.connected()
    })
    .await;
    // It comes back on the same port, and our token is no longer valid:
    // refused once, typed, and not redialed.
    let server = start_server(dir.path(), addr, OTHER_TOKEN).await;
    let refused = status_until(&peer, "refused", |s| phase(s) == SyncPhase::Refused).await;
    assert!(refused.remotes[0].last_error.is_some());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut refusals = 0;
    let mut disconnects_paused = 0;
    while let Some(Some(event)) = events.next().now_or_never() {
        match event {
            PeerEvent::DialFailed { failure, .. } if failure.is_credential_refusal() => {
                assert_eq!(failure, DialFailure::Unauthorized);
                refusals += 1;
            }
            PeerEvent::Disconnected { reason, .. } if reason.contains("paused") => {
                disconnects_paused += 1;
            }
            _ => {}
        }
    }
    assert_eq!(
        refusals, 1,
        "a refused token is reported once, not redialed"
    );
    assert!(
        disconnects_paused >= 1,
        "pausing closes the connection with a Disconnected event"
    );
    // A new token: connected and live again.
    handle.set_token(OTHER_TOKEN).await;
    status_until(&peer, "live with the new token", |s| {
        phase(s) == SyncPhase::Live
    })
    .await;

    // Removing the dialer ends its connection and its status entry.
    handle.remove().await;
    status_until(&peer, "no remotes", |s| s.remotes.is_empty()).await;
    peer.shutdown().await;
    client.close().await.unwrap();
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_download_reports_its_total_and_ends_at_100_percent() {
    let dir = tempfile::tempdir().unwrap();
    let source = store(&dir.path().join("source.db")).await;
    source
        .write(|tx| {
            let mut stmt = tx.prepare("INSERT INTO todo (id, title) VALUES (?1, 'row')")?;
            for id in 0..20_000 {
                stmt.execute([id])?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let sink = store(&dir.path().join("sink.db")).await;
    let (a, b) = (peer(source.clone()), peer(sink.clone()));
    let (dialer, mut listener) = memory::dialer("sink->source", memory::FaultConfig::default());
    let accepting = a.clone();
    tokio::spawn(async move {
        while let Some(conn) = listener.next().await {
            accepting.accept(conn);
        }
    });
    b.add_dialer(dialer);
    let mut statuses = b.watch_status(Duration::from_millis(5));
    let mut partial = None;
    let done = loop {
        let status = tokio::time::timeout(WAIT, statuses.next())
            .await
            .expect("a status in time")
            .expect("statuses go on");
        let Some(remote) = status.remotes.first() else {
            continue;
        };
        if let Some(f) = remote.download.fraction().filter(|f| *f < 1.0) {
            partial = Some((f, remote.download));
        }
        if remote.phase == SyncPhase::Live {
            break remote.clone();
        }
    };
    let (fraction, progress) = partial.expect("a status during the download, with its total");
    assert!(progress.total.unwrap() > progress.done, "{progress:?}");
    assert!(fraction < 1.0);
    // Complete: the total is what came (a loaded machine may have redialed
    // mid-way, and a new session downloads only the rest).
    assert_eq!(done.download.total, Some(done.download.done), "{done:#?}");
    assert_eq!(done.download.fraction(), Some(1.0));
    let rows: i64 = sink
        .read(|c| c.query_row("SELECT count(*) FROM todo", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(rows, 20_000);
    a.shutdown().await;
    b.shutdown().await;
    source.close().await.unwrap();
    sink.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_acknowledged_by_the_relay_and_reaches_the_far_end() {
    // a -> relay <- c: a's write, acknowledged by the relay, reaches c.
    let dir = tempfile::tempdir().unwrap();
    let (sa, sr, sc) = (
        store(&dir.path().join("a.db")).await,
        store(&dir.path().join("relay.db")).await,
        store(&dir.path().join("c.db")).await,
    );
    let (a, relay, c) = (peer(sa.clone()), peer(sr.clone()), peer(sc.clone()));
    for (from, name) in [(&a, "a->relay"), (&c, "c->relay")] {
        let (dialer, mut listener) = memory::dialer(name, memory::FaultConfig::default());
        let accepting = relay.clone();
        tokio::spawn(async move {
            while let Some(conn) = listener.next().await {
                accepting.accept(conn);
            }
        });
        from.add_dialer(dialer);
    }
    let version = insert(&sa, 7).await;
    a.wait_acknowledged(version, Some(relay.site_id()), WAIT)
        .await
        .unwrap();
    // Nobody with c's site id talks to a: that wait times out.
    assert_eq!(
        a.wait_acknowledged(version, Some(c.site_id()), Duration::from_millis(200))
            .await,
        Err(WaitError::Timeout(c.site_id()))
    );
    // The relay holds it, so it reaches c: c's status shows the relay in sync.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let n: i64 = sc
            .read(|conn| conn.query_row("SELECT count(*) FROM todo WHERE id = 7", [], |r| r.get(0)))
            .await
            .unwrap();
        if n == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the write never reached c"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relay_status = relay.status().await;
    assert_eq!(relay_status.remotes.len(), 2, "{relay_status:#?}");
    assert!(relay_status.remotes.iter().all(|r| !r.dialed));
    for p in [&a, &relay, &c] {
        p.shutdown().await;
    }
    for s in [sa, sr, sc] {
        s.close().await.unwrap();
    }
}

use futures_util::FutureExt as _;
