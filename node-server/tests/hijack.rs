//! Session hijack by peer id, over real sockets: a victim syncs with a
//! read-write token through a real server; an attacker who knows its peer id
//! (every change carries it) tries to act in its session with a read-only
//! token, with the same token, and over WebSocket. Every attempt is refused
//! with its code, and the victim still converges both ways.

mod support;

use anyhow::{Context, Result, bail};
use crsync_node_server::{Access, Auth, PeerRouter};
use crsync_peer::proto::ErrorCode;
use crsync_peer::wire::{MessageKind, TransportMessage};
use crsync_peer::{Cursor, DbVersion, Dialer, Peer, PeerEvent, SiteId, Store, TransportError};
use crsync_transports::SseDialer;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;

/// A version far past anything written: an acknowledgement claiming it
/// would make the server believe the victim holds everything.
const HUGE: i64 = 1_000_000_000_000_000;

/// Waits until every peer has `rows` rows and all hold the same.
async fn converge(peers: &[&Peer], rows: usize) -> Result<Vec<String>> {
    for p in peers {
        let store = p.store().clone();
        wait_until(p, &format!("{rows} rows"), || {
            let store = store.clone();
            async move { Ok(contents(&store).await?.len() == rows) }
        })
        .await?;
    }
    let want = contents(peers[0].store()).await?;
    for p in peers {
        assert_eq!(contents(p.store()).await?, want);
    }
    Ok(want)
}

/// Waits until `p` is connected to its server.
async fn connected(p: &Peer) -> Result<SiteId> {
    wait_until(p, "connected", || async {
        Ok(!p.connected_peers().is_empty())
    })
    .await?;
    p.connected_peers()
        .first()
        .copied()
        .context("no connected peer")
}

/// An acknowledgement "holding" everything of `sites`, as sent by `victim`.
fn forged_ack(victim: SiteId, sites: &[SiteId]) -> String {
    let cursor: Cursor = sites.iter().map(|s| (*s, DbVersion(HUGE))).collect();
    TransportMessage::ack(victim, cursor).to_json()
}

/// Opens `GET stream` for `peer` with exactly these credentials.
async fn raw_stream(
    base: &str,
    peer: SiteId,
    token: &str,
    crsync: bool,
    session: Option<&str>,
) -> Result<SseReader> {
    let param = if crsync { "&crsync=lossless" } else { "" };
    let mut request = reqwest::Client::new()
        .get(format!("{base}/stream?peerId={peer}{param}"))
        .bearer_auth(token);
    if let Some(session) = session {
        request = request.header(crsync_peer::wire::SESSION_HEADER, session);
    }
    let response = request.send().await?;
    if response.status() != 200 {
        bail!("stream: HTTP {}", response.status());
    }
    Ok(SseReader::new(response))
}

/// POSTs to `{base}/{route}`; returns the status and the body's code.
async fn raw_post(
    base: &str,
    route: &str,
    token: &str,
    session: Option<&str>,
    body: String,
) -> Result<(u16, Option<String>)> {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/{route}"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body);
    if let Some(session) = session {
        request = request.header(crsync_peer::wire::SESSION_HEADER, session);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let body: Value = serde_json::from_str(&response.text().await?)?;
    Ok((status, body["code"].as_str().map(str::to_owned)))
}

fn refused_with(code: ErrorCode) -> (u16, Option<String>) {
    (code.http_status(), Some(code.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_acknowledgement_for_the_victim_is_refused() -> Result<()> {
    let server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let base = server.url("/db/notes");
    let victim = peer(client_store(&dir.path().join("victim.db")).await?);
    let other = peer(client_store(&dir.path().join("other.db")).await?);
    victim.add_dialer(SseDialer::new(&base).with_token(RW));
    other.add_dialer(SseDialer::new(&base).with_token(ENV));
    let server_site = connected(&victim).await?;
    connected(&other).await?;
    let v = victim.site_id();
    let ack = forged_ack(v, &[server_site, other.site_id(), v]);

    // A read-only token; the victim's own token without its session secret;
    // and with a wrong one: none acts in the victim's session.
    let mismatch = refused_with(ErrorCode::SessionMismatch);
    assert_eq!(
        raw_post(&base, "sync", RO, None, ack.clone()).await?,
        mismatch
    );
    assert_eq!(
        raw_post(&base, "sync", RW, None, ack.clone()).await?,
        mismatch
    );
    let wrong = Some("00112233445566778899aabbccddeeff");
    assert_eq!(
        raw_post(&base, "sync", RW, wrong, ack.clone()).await?,
        mismatch
    );
    assert_eq!(
        raw_post(&base, "sync", ENV, None, ack.clone()).await?,
        mismatch
    );
    // Nor may a data message (here without changes, which a read-only
    // token may send, its ranges stripped) act in it.
    let eose = json!({"type": "data", "peerId": v.to_hex(),
        "data": {"type": "eose", "data": [], "ranges": {server_site.to_hex(): [0, HUGE]}}});
    for token in [RO, RW] {
        assert_eq!(
            raw_post(&base, "data", token, None, eose.to_string()).await?,
            mismatch
        );
    }

    // Writes made after the attempts still reach the victim, and its own
    // writes still go out.
    insert(other.store(), 1, "from other").await?;
    insert(victim.store(), 2, "from victim").await?;
    let rows = converge(&[&victim, &other], 2).await?;
    let replica = Store::open(server.replica("notes")).await?;
    assert_eq!(contents(&replica).await?, rows);
    replica.close().await?;
    victim.shutdown().await;
    other.shutdown().await;
    Ok(())
}

/// A server for one Peer we can look into (its sessions), with a read-write
/// and a read-only token.
async fn router_server(host: Peer) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let auth = Auth::new()
        .with_token(RW, ["notes"], Access::ReadWrite)
        .with_token(RO, ["notes"], Access::ReadOnly);
    let app = axum::Router::new().nest(
        "/sync",
        PeerRouter::new(host).name("notes").auth(auth).build(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/sync"), task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_first_under_another_token_locks_nobody_out() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let host = peer(client_store(&dir.path().join("host.db")).await?);
    let (base, task) = router_server(host.clone()).await?;
    let victim = peer(client_store(&dir.path().join("victim.db")).await?);
    let v = victim.site_id();

    // The attacker opens streams under the victim's peer id first: a crsync
    // one and a v1 one, with the read-only token.
    let mut squatter = raw_stream(&base, v, RO, true, None).await?;
    let first = squatter.next().await?.context("connect")?;
    assert_eq!(first.kind, MessageKind::Connect);
    let squatter_secret = squatter.session().context("a secret")?.to_owned();
    // In its own session it may acknowledge whatever it likes.
    let ack = forged_ack(v, &[host.site_id(), v]);
    assert_eq!(
        raw_post(&base, "sync", RO, Some(&squatter_secret), ack).await?,
        (200, None)
    );
    // A second stream of the same token is refused as in v1.
    let mut again = raw_stream(&base, v, RO, false, None).await?;
    let refusal = again.next().await?.context("refusal")?;
    assert_eq!(refusal.code.as_deref(), Some("ALREADY_CONNECTED"));

    // The victim connects all the same, and syncs both ways.
    let mut events = victim.events();
    victim.add_dialer(SseDialer::new(&base).with_token(RW));
    let connected_to = tokio::time::timeout(TIMEOUT, async {
        while let Some(event) = events.next().await {
            match event {
                PeerEvent::Connected { peer, .. } => return Ok(peer),
                PeerEvent::DialFailed { reason, .. } => bail!("victim locked out: {reason}"),
                _ => {}
            }
        }
        bail!("events ended")
    })
    .await
    .context("the victim never connected")??;
    assert_eq!(connected_to, host.site_id());
    insert(host.store(), 1, "from host").await?;
    insert(victim.store(), 2, "from victim").await?;
    converge(&[&host, &victim], 2).await?;

    // The host's Peer runs both sessions for the one remote site id, and
    // counts that remote once.
    let with_victim = host
        .sessions()
        .iter()
        .filter(|s| s.remote == Some(v))
        .count();
    assert_eq!(with_victim, 2, "{:#?}", host.sessions());
    assert_eq!(host.connected_peers(), vec![v]);
    assert!(host.wait_caught_up(v, TIMEOUT).await.is_ok());

    // The squatter leaves; the victim's session goes on.
    drop(squatter);
    wait_until(&host, "the squatter's session ended", || async {
        Ok(host
            .sessions()
            .iter()
            .filter(|s| s.remote == Some(v))
            .count()
            == 1)
    })
    .await?;
    insert(host.store(), 3, "later").await?;
    converge(&[&host, &victim], 3).await?;

    victim.shutdown().await;
    host.shutdown().await;
    task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_same_token_only_the_session_secret_acts_or_replaces() -> Result<()> {
    let server = TestServer::start().await?;
    let base = server.url("/db/notes");
    let me = SiteId::from_bytes([0x5a; 16]);

    let mut first = raw_stream(&base, me, RW, true, None).await?;
    assert_eq!(
        first.next().await?.map(|m| m.kind),
        Some(MessageKind::Connect)
    );
    let s1 = first.session().context("a secret")?.to_owned();
    // Same token, no secret or another one: refused, as a second stream in v1.
    for session in [None, Some("0123456789abcdef0123456789abcdef")] {
        let mut second = raw_stream(&base, me, RW, true, session).await?;
        let refusal = second.next().await?.context("refusal")?;
        assert_eq!(refusal.code.as_deref(), Some("ALREADY_CONNECTED"));
    }
    let sync = TransportMessage::sync(me, Cursor::new()).to_json();
    assert_eq!(
        raw_post(&base, "sync", RW, None, sync.clone()).await?,
        refused_with(ErrorCode::SessionMismatch)
    );
    assert_eq!(
        raw_post(&base, "sync", RW, Some(&s1), sync.clone()).await?,
        (200, None)
    );

    // Presenting the secret replaces the stream: the old one ends, its
    // secret is void, the new one works.
    let mut second = raw_stream(&base, me, RW, true, Some(&s1)).await?;
    assert_eq!(
        second.next().await?.map(|m| m.kind),
        Some(MessageKind::Connect)
    );
    let s2 = second.session().context("a new secret")?.to_owned();
    assert_ne!(s1, s2);
    while first.next().await?.is_some() {}
    assert_eq!(
        raw_post(&base, "sync", RW, Some(&s1), sync.clone()).await?,
        refused_with(ErrorCode::SessionMismatch)
    );
    assert_eq!(
        raw_post(&base, "sync", RW, Some(&s2), sync).await?,
        (200, None)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sse_client_presents_its_secret_and_reclaims_a_half_open_stream() -> Result<()> {
    let server = TestServer::start().await?;
    let base = server.url("/db/notes");
    let me = SiteId::from_bytes([0x6b; 16]);
    let mut dialer = SseDialer::new(&base).with_token(RW);
    let mut old = dialer.dial(me).await?;
    old.sink
        .send(TransportMessage::sync(me, Cursor::new()))
        .await
        .context("a POST with the secret")?;

    // The old connection is still open (as a half-open stream would be, for
    // the server): another client of the same token is refused...
    let refused = SseDialer::new(&base).with_token(RW).dial(me).await;
    assert!(
        matches!(&refused, Err(TransportError::Remote { code, .. }) if *code == ErrorCode::AlreadyConnected),
        "{refused:?}"
    );
    // ...but the dialer that holds it reconnects, replacing it.
    let mut new = dialer.dial(me).await?;
    new.sink
        .send(TransportMessage::sync(me, Cursor::new()))
        .await
        .context("a POST on the new stream")?;
    tokio::time::timeout(TIMEOUT, async {
        while let Some(Ok(_)) = old.stream.next().await {}
    })
    .await
    .context("the replaced stream did not end")?;
    let stale = old
        .sink
        .send(TransportMessage::sync(me, Cursor::new()))
        .await;
    assert!(
        matches!(&stale, Err(TransportError::Remote { code, .. }) if *code == ErrorCode::SessionMismatch),
        "{stale:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_streams_are_bound_to_their_token() -> Result<()> {
    let server = TestServer::start().await?;
    let base = server.url("/db/notes");
    let me = SiteId::from_bytes([0x7c; 16]);
    // A v1 client: no crsync parameter, no secret, POSTs without one.
    let mut stream = raw_stream(&base, me, RW, false, None).await?;
    let connect = stream.next().await?.context("connect")?;
    assert_eq!(connect.kind, MessageKind::Connect);
    assert_eq!(stream.session(), None);
    let sync = json!({"type": "sync", "peerId": me.to_hex(), "cursor": {"peers": {}}}).to_string();
    assert_eq!(
        raw_post(&base, "sync", RW, None, sync.clone()).await?,
        (200, None)
    );
    let ack = forged_ack(me, &[connect.sender()?]);
    assert_eq!(
        raw_post(&base, "sync", RO, None, ack.clone()).await?,
        refused_with(ErrorCode::SessionMismatch)
    );
    assert_eq!(
        raw_post(&base, "sync", RW, Some("00"), ack).await?,
        refused_with(ErrorCode::SessionMismatch)
    );
    // No stream at all is still NOT_CONNECTED.
    let nobody = SiteId::from_bytes([0x7d; 16]);
    let sync = json!({"type": "sync", "peerId": nobody.to_hex(), "cursor": {"peers": {}}});
    assert_eq!(
        raw_post(&base, "sync", RW, None, sync.to_string()).await?,
        refused_with(ErrorCode::NotConnected)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_message_for_another_peer_is_refused() -> Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let base = server.url("/db/notes");
    let victim = peer(client_store(&dir.path().join("victim.db")).await?);
    victim.add_dialer(SseDialer::new(&base).with_token(RW));
    let server_site = connected(&victim).await?;
    let v = victim.site_id();

    // The attacker's socket says who it is, then speaks for the victim.
    let mut request = format!("ws://{}/db/notes/ws", server.addr).into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {RW}").parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    let me = SiteId::from_bytes([0x8d; 16]);
    let send = |m: TransportMessage| Message::Text(m.to_json().into());
    socket.send(send(TransportMessage::connect(me))).await?;
    let ack: TransportMessage = serde_json::from_str(&forged_ack(v, &[server_site, v]))?;
    socket.send(send(ack)).await?;
    let scratch = client_store(&dir.path().join("scratch.db")).await?;
    insert(&scratch, 99, "forged").await?;
    let mut batches = scratch.changes_since(&Cursor::new()).await?;
    let batch = batches.next_batch().await.context("a batch")??;
    let forged = TransportMessage::data(v, &batch, false, 1, crsync_peer::wire::Encoding::Lossless);
    socket.send(send(forged)).await?;
    let mut codes = Vec::new();
    tokio::time::timeout(TIMEOUT, async {
        while codes.len() < 2 {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let m = TransportMessage::from_json(text.as_str())?;
                    if m.kind == MessageKind::Error {
                        codes.extend(m.code);
                    }
                }
                Some(Ok(_)) => {}
                other => bail!("socket ended: {other:?}"),
            }
        }
        Ok(())
    })
    .await
    .context("no refusals")??;
    assert_eq!(codes, ["PEER_MISMATCH", "PEER_MISMATCH"]);

    // Nothing of it was applied, and the victim still converges.
    let server_store = Store::open(server.replica("notes")).await?;
    assert!(contents(&server_store).await?.is_empty());
    server_store.close().await?;
    let other = peer(client_store(&dir.path().join("other.db")).await?);
    other.add_dialer(SseDialer::new(&base).with_token(ENV));
    insert(other.store(), 1, "from other").await?;
    insert(victim.store(), 2, "from victim").await?;
    let rows = converge(&[&victim, &other], 2).await?;
    assert!(!rows.iter().any(|r| r.contains("forged")), "{rows:?}");
    drop(socket);
    scratch.close().await?;
    victim.shutdown().await;
    other.shutdown().await;
    Ok(())
}
