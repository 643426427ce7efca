//! Real Peers syncing through the server (SSE, WebSocket, mixed) and device
//! to device through a `PeerRouter`.

mod support;

use std::time::Duration;

use anyhow::Result;
use crsync_node_server::{Access, Auth, PeerRouter};
use crsync_peer::rusqlite::types::Value as SqlValue;
use crsync_peer::{Peer, Store};
use crsync_transports::{SseDialer, WebSocketDialer};
use support::*;

/// Waits until every peer holds `expected_rows` rows and all hold the same
/// contents at once; returns them. A row count alone is reached before a
/// conflict is settled (both writers hold their own row 10), so the contents
/// are compared afresh each time, never against an early snapshot.
async fn converge(peers: &[&Peer], expected_rows: usize) -> Result<Vec<String>> {
    let stores: Vec<Store> = peers.iter().map(|p| p.store().clone()).collect();
    let all_contents = || {
        let stores = stores.clone();
        async move {
            let mut all = Vec::with_capacity(stores.len());
            for store in &stores {
                all.push(contents(store).await?);
            }
            Ok::<_, anyhow::Error>(all)
        }
    };
    wait_until(peers[0], "identical contents", || async move {
        let all = all_contents().await?;
        Ok(all[0].len() == expected_rows && all.iter().all(|c| *c == all[0]))
    })
    .await?;
    Ok(all_contents().await?.swap_remove(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_converge_through_the_server_sse_ws_mixed() -> Result<()> {
    let server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let base = server.url("/db/notes");
    let ws_base = format!("ws://{}/db/notes/ws", server.addr);

    let a = peer(client_store(&dir.path().join("a.db")).await?);
    let b = peer(client_store(&dir.path().join("b.db")).await?);
    let c = peer(client_store(&dir.path().join("c.db")).await?);
    // Offline writes before connecting.
    insert(a.store(), 1, "from a").await?;
    insert(b.store(), 2, "from b").await?;
    a.add_dialer(SseDialer::new(&base).with_token(RW));
    b.add_dialer(WebSocketDialer::new(&ws_base).with_token(RW));
    c.add_dialer(SseDialer::new(&base).with_token(ENV));

    // Concurrent writes, including a conflict on row 10.
    for i in 0..20 {
        insert(a.store(), 100 + i, "a").await?;
        insert(b.store(), 200 + i, "b").await?;
        insert(c.store(), 300 + i, "c").await?;
    }
    insert(a.store(), 10, "a wins?").await?;
    insert(b.store(), 10, "b wins?").await?;
    let blob = vec![0u8, 159, 146, 150, 255];
    let big = i64::MAX - 1;
    let blob2 = blob.clone();
    a.store()
        .write(move |tx| {
            tx.execute("INSERT INTO kv VALUES ('blob', ?1)", [blob2])?;
            tx.execute("INSERT INTO kv VALUES ('big', ?1)", [big])
        })
        .await?;

    let rows = converge(&[&a, &b, &c], 2 + 60 + 1 + 2).await?;
    // Lossless values crossed the server intact, over SSE and WebSocket.
    assert!(
        rows.contains(&format!("kv blob {:?}", SqlValue::Blob(blob))),
        "{rows:?}"
    );
    assert!(
        rows.contains(&format!("kv big {:?}", SqlValue::Integer(big))),
        "{rows:?}"
    );

    // The server's replica holds the same.
    let replica = Store::open(server.replica("notes")).await?;
    assert_eq!(contents(&replica).await?, rows);
    replica.close().await?;

    // A peer that was offline catches up.
    let d = peer(client_store(&dir.path().join("d.db")).await?);
    d.add_dialer(SseDialer::new(&base).with_token(RW));
    converge(&[&a, &d], rows.len()).await?;

    for p in [&a, &b, &c, &d] {
        p.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_to_device_through_a_peer_router() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let host = peer(client_store(&dir.path().join("desktop.db")).await?);
    let app = axum::Router::new().nest(
        "/sync",
        PeerRouter::new(host.clone())
            .name("notes")
            .auth(Auth::new().with_token("pair", ["notes"], Access::ReadWrite))
            .build(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // Auth applies to the mounted router too.
    let response = reqwest::get(format!("http://{addr}/sync/stream?peerId={PEER_A}")).await?;
    assert_eq!(response.status(), 401);

    let laptop = peer(client_store(&dir.path().join("laptop.db")).await?);
    let phone = peer(client_store(&dir.path().join("phone.db")).await?);
    laptop.add_dialer(SseDialer::new(format!("http://{addr}/sync")).with_token("pair"));
    phone.add_dialer(WebSocketDialer::new(format!("ws://{addr}/sync/ws")).with_token("pair"));
    insert(host.store(), 1, "desktop").await?;
    insert(laptop.store(), 2, "laptop").await?;
    insert(phone.store(), 3, "phone").await?;
    converge(&[&host, &laptop, &phone], 3).await?;

    laptop.shutdown().await;
    phone.shutdown().await;
    host.shutdown().await;
    server.abort();
    Ok(())
}

/// A server's replica copied to another server (a moved data directory, a
/// cloned server) is forked when it opens: it serves under a new site id and
/// nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_server_replica_is_forked_and_keeps_serving() -> Result<()> {
    let mut first = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let a = peer(client_store(&dir.path().join("a.db")).await?);
    a.add_dialer(SseDialer::new(first.url("/db/todo")).with_token(RW));
    insert(a.store(), 1, "before the move").await?;
    let first_site = wait_for_server_site(&a).await?;
    wait_until(&a, "the server holds our row", || {
        let path = first.replica("todo");
        async move {
            Ok(replica_counts(&path)
                .map(|(rows, _)| rows == 1)
                .unwrap_or(false))
        }
    })
    .await?;
    a.shutdown().await;
    first.shutdown().await?;

    let second = TestServer::start().await?;
    std::fs::copy(first.replica("todo"), second.replica("todo"))?;
    let b = peer(client_store(&dir.path().join("b.db")).await?);
    b.add_dialer(SseDialer::new(second.url("/db/todo")).with_token(RW));
    let second_site = wait_for_server_site(&b).await?;
    assert_ne!(second_site, first_site, "the copy was forked");
    let rows = converge(&[&b], 1).await?;
    assert_eq!(rows.len(), 1);
    b.shutdown().await;
    Ok(())
}

/// The site id of the first remote the peer connects to.
async fn wait_for_server_site(p: &Peer) -> Result<crsync_peer::SiteId> {
    use futures_util::StreamExt;
    let mut events = p.events();
    if let Some(site) = p.connected_peers().first() {
        return Ok(*site);
    }
    let connected = async {
        while let Some(event) = events.next().await {
            if let crsync_peer::PeerEvent::Connected { peer, .. } = event {
                return Some(peer);
            }
        }
        None
    };
    tokio::time::timeout(Duration::from_secs(10), connected)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no connection"))
}
