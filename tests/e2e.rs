//! End to end through a real server on 127.0.0.1: a peer that goes offline,
//! keeps writing, and comes back catches up both ways; also across a server restart.

// Test helpers: a failed setup step should panic with its error.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crsync::Store;
use crsync::transports::{sse::SseDialer, ws::WebSocketDialer};
use inprocess::{peer, start_server, store as client};

#[path = "support/inprocess.rs"]
mod inprocess;

const TOKEN: &str = "e2e-secret";
const WAIT: Duration = Duration::from_secs(20);

async fn rows(store: &Store) -> Vec<(i64, String, i64)> {
    store
        .read(|c| {
            let mut s = c.prepare("SELECT id, title, done FROM todo ORDER BY id")?;
            let r = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            r.collect()
        })
        .await
        .unwrap()
}

async fn wait_same(stores: &[&Store], count: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let first = rows(stores[0]).await;
        let mut same = first.len() == count;
        for s in &stores[1..] {
            same &= rows(s).await == first;
        }
        if same {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence: {:?}",
            first
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn insert(store: &Store, id: i64, title: &str) {
    let title = title.to_string();
    store
        .write(move |tx| tx.execute("INSERT INTO todo (id, title) VALUES (?1, ?2)", (id, title)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_peer_catches_up_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), "127.0.0.1:0".parse().unwrap(), TOKEN).await;
    let base = format!("http://{}/db/todo", server.addr);
    let a = peer(client(&dir.path().join("a.db")).await);
    a.add_dialer(SseDialer::new(&base).with_token(TOKEN));
    let b_path = dir.path().join("b.db");
    let b = peer(client(&b_path).await);
    b.add_dialer(
        WebSocketDialer::new(format!("ws://{}/db/todo/ws", server.addr)).with_token(TOKEN),
    );
    insert(a.store(), 1, "a online").await;
    insert(b.store(), 2, "b online").await;
    wait_same(&[a.store(), b.store()], 2).await;

    // b goes offline; both sides keep writing, including the same row
    b.shutdown().await;
    b.store().clone().close().await.unwrap();
    for i in 10..20 {
        insert(a.store(), i, "a while b offline").await;
    }
    a.store()
        .write(|tx| tx.execute("UPDATE todo SET done = 1 WHERE id = 2", []))
        .await
        .unwrap();
    let b = peer(client(&b_path).await);
    for i in 20..25 {
        insert(b.store(), i, "b offline").await;
    }
    b.store()
        .write(|tx| {
            tx.execute(
                "UPDATE todo SET title = 'b edited offline' WHERE id = 2",
                [],
            )
        })
        .await
        .unwrap();

    // b comes back (over SSE this time)
    b.add_dialer(SseDialer::new(&base).with_token(TOKEN));
    wait_same(&[a.store(), b.store()], 17).await;
    let merged = rows(a.store()).await;
    assert!(
        merged.contains(&(2, "b edited offline".to_string(), 1)),
        "both offline edits of row 2 survive: {merged:?}"
    );

    a.shutdown().await;
    b.shutdown().await;
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_reconnect_after_the_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), "127.0.0.1:0".parse().unwrap(), TOKEN).await;
    let addr = server.addr;
    let base = format!("http://{addr}/db/todo");
    let a = peer(client(&dir.path().join("a.db")).await);
    let b = peer(client(&dir.path().join("b.db")).await);
    a.add_dialer(SseDialer::new(&base).with_token(TOKEN));
    b.add_dialer(WebSocketDialer::new(format!("ws://{addr}/db/todo/ws")).with_token(TOKEN));
    insert(a.store(), 1, "before restart").await;
    wait_same(&[a.store(), b.store()], 1).await;

    server.kill().await;
    insert(a.store(), 2, "while the server is down").await;
    insert(b.store(), 3, "while the server is down").await;
    let server = start_server(dir.path(), addr, TOKEN).await;
    wait_same(&[a.store(), b.store()], 3).await;

    a.shutdown().await;
    b.shutdown().await;
    server.kill().await;
}
