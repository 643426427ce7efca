//! Resource limits against a real server over real sockets: connection caps
//! (per token, in total, read-only and anonymous clients too), stalled
//! streams dropped while reading clients go on, rate limits with 429 and
//! Retry-After, and our SSE client waiting a 429 out without losing anything.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use crsync_node_server::{Access, Auth};
use crsync_peer::{Peer, PeerEvent, Store};
use crsync_transports::SseDialer;
use futures_util::StreamExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Opens a raw SSE stream; returns the HTTP status and, on 200, the socket
/// (its response head read, nothing else).
async fn raw_stream(
    addr: SocketAddr,
    db: &str,
    peer: &str,
    token: Option<&str>,
) -> Result<(u16, String, TcpStream)> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    raw_request(
        addr,
        format!(
            "GET /db/{db}/stream?peerId={peer} HTTP/1.1\r\nHost: {addr}\r\n{auth}Accept: text/event-stream\r\n\r\n"
        ),
    )
    .await
}

/// A raw WebSocket upgrade; returns the status and the socket (head read).
async fn raw_ws(addr: SocketAddr, db: &str, token: &str) -> Result<(u16, String, TcpStream)> {
    raw_request(
        addr,
        format!(
            "GET /db/{db}/ws HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
    )
    .await
}

/// Sends `request` on a new connection and reads the response head; returns
/// the HTTP status, the head and the socket.
async fn raw_request(addr: SocketAddr, request: String) -> Result<(u16, String, TcpStream)> {
    let socket = TcpSocket::new_v4()?;
    // A small receive buffer, so a client that does not read is soon full.
    socket.set_recv_buffer_size(4096)?;
    let mut s = socket.connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let head = read_head(&mut s).await?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    Ok((status, head, s))
}

async fn read_head(s: &mut TcpStream) -> Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut byte)).await??;
        ensure!(
            n == 1,
            "closed in the response head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// One masked client text frame.
fn ws_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0x81];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

fn sync_everything(peer: &str) -> String {
    format!(r#"{{"type":"sync","peerId":"{peer}","cursor":{{"peers":{{}}}}}}"#)
}

/// Reads until the server closes the socket (EOF or reset), within the timeout.
async fn read_to_end(s: &mut TcpStream) -> Result<usize> {
    let mut total = 0;
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => bail!("the server did not close the connection ({total} bytes read)"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(total),
            Ok(Ok(n)) => total += n,
        }
    }
}

fn peer_id(n: u8) -> String {
    hex::encode([n; 16])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_token_and_in_total_before_any_stream_starts() -> Result<()> {
    let server = TestServer::start_with(|c| {
        c.limits.max_connections_per_token = 2;
        c.limits.max_connections = 3;
    })
    .await?;
    let addr = server.addr;
    let (s1, _, _a) = raw_stream(addr, "notes", &peer_id(1), Some(RW)).await?;
    let (s2, _, _b) = raw_stream(addr, "notes", &peer_id(2), Some(RW)).await?;
    assert_eq!((s1, s2), (200, 200));

    // A third stream of the same token: refused with 429 before it starts.
    let response = server
        .client
        .get(server.url(&format!("/db/notes/stream?peerId={}", peer_id(3))))
        .bearer_auth(RW)
        .send()
        .await?;
    assert_eq!(response.status(), 429);
    assert!(response.headers().get("retry-after").is_some());
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["code"], "TOO_MANY_CONNECTIONS");
    assert_eq!(body["type"], "error");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("token"),
        "{body}"
    );
    // Also a WebSocket of that token, refused before the upgrade.
    let (ws_status, ws_head, _) = raw_ws(addr, "notes", RW).await?;
    assert_eq!(ws_status, 429, "{ws_head}");

    // A read-only token counts too: it takes the last slot of the server...
    let (s3, _, ro) = raw_stream(addr, "notes", &peer_id(4), Some(RO)).await?;
    assert_eq!(s3, 200);
    // ...and then the server is full for every token.
    let (s4, head, _) = raw_stream(addr, "notes", &peer_id(5), Some(ENV)).await?;
    assert_eq!(s4, 429, "{head}");

    // A closed stream gives its slot back.
    drop(ro);
    wait_for_slot(addr, Some(ENV), 6).await?;
    Ok(())
}

/// Waits (with the test timeout) until a stream with `token` is accepted again.
async fn wait_for_slot(addr: SocketAddr, token: Option<&str>, peer: u8) -> Result<TcpStream> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (status, head, socket) = raw_stream(addr, "notes", &peer_id(peer), token).await?;
        match status {
            200 => return Ok(socket),
            429 if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => bail!("no slot came free: {head}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_share_one_cap() -> Result<()> {
    let server = TestServer::start_with_auth(
        |c| c.limits.max_connections_per_token = 1,
        Auth::anonymous().with_token(RW, ["*"], Access::ReadWrite),
    )
    .await?;
    let (first, _, _keep) = raw_stream(server.addr, "notes", &peer_id(1), None).await?;
    let (second, _, _) = raw_stream(server.addr, "notes", &peer_id(2), None).await?;
    let (token, _, _) = raw_stream(server.addr, "notes", &peer_id(3), Some(RW)).await?;
    assert_eq!((first, second, token), (200, 429, 200));
    Ok(())
}

/// Writes `rows` rows of about 1 KB each into the server's `notes` through a
/// real client Peer, and returns once the server holds them.
async fn fill_notes(server: &TestServer, rows: i64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = client_store(&dir.path().join("filler.db")).await?;
    // In transactions of 100 rows: batches of whole transactions.
    for start in (0..rows).step_by(100) {
        store
            .write(move |tx| {
                for id in start..(start + 100).min(rows) {
                    tx.execute("INSERT INTO todo VALUES (?1, ?2)", (id, "x".repeat(1000)))?;
                }
                Ok(())
            })
            .await?;
    }
    let peer = Peer::builder(store).build();
    peer.add_dialer(SseDialer::new(server.url("/db/notes")).with_token(RW));
    let replica = server.replica("notes");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    // (Opening a replica that does not exist yet would create an empty file.)
    while !replica.exists() || replica_counts(&replica).map(|(n, _)| n).unwrap_or(0) < rows {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the server never held the rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peer.shutdown().await;
    Ok(())
}

fn stall_config(c: &mut crsync_node_server::ServerConfig) {
    c.limits.stall_timeout = Duration::from_secs(1);
    c.limits.outbound_queue_bytes = 16 << 10;
    // One slot per token: a freed slot shows the stalled connection is gone.
    c.limits.max_connections_per_token = 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_stream_is_dropped_while_reading_clients_keep_syncing() -> Result<()> {
    let server = TestServer::start_with_auth(stall_config, auth_with_third()).await?;
    fill_notes(&server, 2000).await?;

    // A reading client (its own token) stays connected throughout.
    let dir = tempfile::tempdir()?;
    let reader = Peer::builder(client_store(&dir.path().join("reader.db")).await?)
        .ping_interval(Duration::from_millis(300))
        .build();
    let mut reader_events = reader.events();
    reader.add_dialer(SseDialer::new(server.url("/db/notes")).with_token(RO));

    // The attacker: a stream, a request for everything, then no reading.
    let stalled_peer = peer_id(0xee);
    let (status, _, mut stalled) =
        raw_stream(server.addr, "notes", &stalled_peer, Some(ENV)).await?;
    assert_eq!(status, 200);
    let (code, body) = server
        .post("notes", "sync", ENV, sync_everything(&stalled_peer))
        .await?;
    assert_eq!(code, 200, "{body}");

    // A slow but reading client (a third token) is not dropped: it reads a
    // little every 200 ms for well past the stall timeout.
    let slow_peer = peer_id(0x51);
    let (status, _, mut slow) =
        raw_stream(server.addr, "notes", &slow_peer, Some(OTHER_ALL)).await?;
    assert_eq!(status, 200);
    let (code, _) = server
        .post("notes", "sync", OTHER_ALL, sync_everything(&slow_peer))
        .await?;
    assert_eq!(code, 200);
    let slow_reader = tokio::spawn(async move {
        let mut read = 0;
        let mut buf = vec![0u8; 4096];
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let n = tokio::time::timeout(TIMEOUT, slow.read(&mut buf)).await??;
            ensure!(n > 0, "the slow reader was dropped after {read} bytes");
            read += n;
        }
        Ok::<_, anyhow::Error>(read)
    });

    // The stalled stream's slot comes free: the server dropped it.
    let _replacement = wait_for_slot(server.addr, Some(ENV), 0xef).await?;
    // And its socket ends once what the kernel holds is read.
    read_to_end(&mut stalled).await?;

    // Reading slowly for 4 s, 4 times the stall timeout, it was never dropped.
    let slow_read = slow_reader.await??;
    assert!(slow_read > 0);

    // The reading client got everything and is still connected.
    let store = reader.store().clone();
    wait_until(&reader, "all rows on the reader", || {
        let store = store.clone();
        async move { Ok(contents(&store).await?.len() == 2000) }
    })
    .await?;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, reader_events.next()).await {
        ensure!(
            !matches!(event, PeerEvent::Disconnected { .. }),
            "reader dropped: {event:?}"
        );
    }
    reader.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_websocket_is_dropped() -> Result<()> {
    let server = TestServer::start_with(stall_config).await?;
    fill_notes(&server, 2000).await?;
    let peer = peer_id(0xdd);
    let (status, head, mut stalled) = raw_ws(server.addr, "notes", ENV).await?;
    assert_eq!(status, 101, "{head}");
    stalled
        .write_all(&ws_frame(&format!(
            r#"{{"type":"connect","peerId":"{peer}"}}"#
        )))
        .await?;
    stalled
        .write_all(&ws_frame(&sync_everything(&peer)))
        .await?;
    // Its slot comes free, and the socket ends.
    let _next = wait_for_slot(server.addr, Some(ENV), 0xde).await?;
    read_to_end(&mut stalled).await?;
    Ok(())
}

/// A token serving every database (a third identity for the rate and cap tests).
const OTHER_ALL: &str = "third-token";

fn auth_with_third() -> Auth {
    auth().with_token(OTHER_ALL, ["*"], Access::ReadWrite)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after_and_spare_others() -> Result<()> {
    // Per token: 1 request/s, bursts of 2.
    let server = TestServer::start_with_auth(
        |c| {
            c.limits.rate_per_token = 1;
            c.limits.burst_per_token = 2;
            c.limits.rate_per_database = 0;
        },
        auth_with_third(),
    )
    .await?;
    server.create("notes").await?;
    let sync = || sync_everything(&peer_id(9));
    for _ in 0..2 {
        let (code, body) = server.post("notes", "sync", RW, sync()).await?;
        assert_eq!(body["code"], "NOT_CONNECTED", "{code} {body}");
    }
    let response = server
        .client
        .post(server.url("/db/notes/sync"))
        .bearer_auth(RW)
        .header("content-type", "application/json")
        .body(sync())
        .send()
        .await?;
    assert_eq!(response.status(), 429);
    let retry: u64 = response
        .headers()
        .get("retry-after")
        .context("no Retry-After")?
        .to_str()?
        .parse()?;
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["code"], "RATE_LIMITED");
    let ms = body["retry_after_ms"]
        .as_u64()
        .context("no retry_after_ms")?;
    assert!(ms > 0 && ms <= 1000, "retry_after_ms {ms}");
    // Another token is not affected.
    let (_, body) = server.post("notes", "sync", ENV, sync()).await?;
    assert_eq!(body["code"], "NOT_CONNECTED");

    // Per database: 1 request/s, bursts of 2, whoever asks.
    let server = TestServer::start_with(|c| {
        c.limits.rate_per_token = 0;
        c.limits.rate_per_database = 1;
        // One for the stream that creates the database, two for the POSTs.
        c.limits.burst_per_database = 3;
    })
    .await?;
    server.create("notes").await?;
    server.create("todo").await?;
    for token in [RW, ENV] {
        let (_, body) = server.post("notes", "sync", token, sync()).await?;
        assert_eq!(body["code"], "NOT_CONNECTED");
    }
    let (code, body) = server.post("notes", "sync", ENV, sync()).await?;
    assert_eq!(
        (code, body["code"].as_str()),
        (429, Some("RATE_LIMITED")),
        "{body}"
    );
    // Another database is not affected.
    let (_, body) = server.post("todo", "sync", RW, sync()).await?;
    assert_eq!(body["code"], "NOT_CONNECTED");
    Ok(())
}

async fn write_rows(store: &Store, from: i64, n: i64) -> Result<()> {
    for id in from..from + n {
        store
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO todo VALUES (?1, ?2)",
                    (id, format!("row {id}")),
                )
            })
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_sse_client_waits_out_429s_and_loses_nothing() -> Result<()> {
    let server = TestServer::start_with(|c| {
        c.limits.rate_per_token = 2;
        c.limits.burst_per_token = 2;
        c.limits.rate_per_database = 0;
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let store = client_store(&dir.path().join("a.db")).await?;
    write_rows(&store, 0, 5).await?;
    let peer = Peer::builder(store.clone())
        .ping_interval(Duration::from_millis(300))
        .build();
    let mut events = peer.events();

    // The token's burst is used up: the stream open itself gets a 429, and
    // the dialer waits it out.
    for _ in 0..2 {
        server
            .post("notes", "sync", RW, sync_everything(&peer_id(7)))
            .await?;
    }
    peer.add_dialer(SseDialer::new(server.url("/db/notes")).with_token(RW));
    let mut refused_dial = false;
    loop {
        let event = tokio::time::timeout(TIMEOUT, events.next())
            .await?
            .context("events ended")?;
        match event {
            PeerEvent::DialFailed { reason, .. } => {
                ensure!(
                    reason.contains("RATE_LIMITED"),
                    "unexpected dial failure: {reason}"
                );
                refused_dial = true;
            }
            PeerEvent::Connected { .. } => break,
            _ => {}
        }
    }
    assert!(
        refused_dial,
        "the first dial should have met the rate limit"
    );

    // Connected; burn the burst again so its next POSTs meet 429s, and write more.
    for _ in 0..2 {
        server
            .post("notes", "sync", RW, sync_everything(&peer_id(7)))
            .await?;
    }
    write_rows(&store, 5, 5).await?;
    let replica = server.replica("notes");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if replica.exists() && replica_counts(&replica).map(|(n, _)| n).unwrap_or(0) == 10 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the server never got all 10 rows"
        );
        // Any disconnect would mean a 429 ended the session.
        if let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(50), events.next()).await
        {
            ensure!(
                !matches!(
                    event,
                    PeerEvent::Disconnected { .. } | PeerEvent::DialFailed { .. }
                ),
                "the client gave up on a 429: {event:?}"
            );
        }
    }
    peer.shutdown().await;
    Ok(())
}
