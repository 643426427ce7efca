//! The attack suite for claims (issue 7, DESIGN.md §5), against a real
//! server on 127.0.0.1 port 0 over real sockets. Each attack is made with an
//! ordinary read-write token, by a raw client that writes the wire protocol
//! by hand (SSE + POST, or a raw WebSocket), next to honest `Peer`s. Each test
//! asserts the refusal (or that the claim is not believed), that the
//! replicas are unchanged by it, and that the victim still converges with
//! the others afterwards.
//!
//! - Forged ranges: a range about another site (with no changes, or with a
//!   forged change under the victim's site id and a huge version) must not
//!   move the server's cursor for that site, nor anyone's.
//! - Cursor bloat: a cursor or ranges naming 100,000 sites are refused with
//!   `LIMIT_EXCEEDED` (HTTP 413 on a POST); ranges about sites nobody has
//!   written for are not believed.
//! - Copied replicas over the protocol: a peer whose own version is below what
//!   the server already holds for its site id is refused with
//!   `SITE_ID_CONFLICT`, and the original keeps syncing. (The CLI side, `cp`
//!   and a restored backup, is in the root crate's `tests/attack_cli.rs`.)
//!
//! The server's cursor is read the way any client sees it: the `sync`
//! message the server sends first on a new stream.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use crsync_peer::wire::{self, Encoding, MessageKind, TransportMessage};
use crsync_peer::{Cursor, DbVersion, Peer, SiteId, Store};
use crsync_transports::{SseDialer, WebSocketDialer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The forged version of the issue: 10^15.
const HUGE: i64 = 1_000_000_000_000_000;
/// Sites in a bloated cursor or range map (the attack; the limit is
/// about 10,000 by default).
const BLOAT_SITES: usize = 100_000;
/// Never-seen sites in ranges below the size limit: none may be believed.
const STRANGER_SITES: usize = 500;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A fresh peer id for each observer stream.
fn observer_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    format!(
        "0e0e0e0e0e0e0e0e0e0e0e0e{:08x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The server's site id and its cursor for `notes`, as a new client sees
/// them: the `connect` and the `sync` the server sends first on a new stream.
async fn server_view(server: &TestServer) -> Result<(SiteId, Cursor)> {
    let mut reader = server.open_stream("notes", &observer_id(), RW).await?;
    let mut site = None;
    loop {
        match reader.next_non_ping().await? {
            Some(m) if m.kind == MessageKind::Connect => site = Some(m.peer_id.parse()?),
            Some(m) if m.kind == MessageKind::Sync => {
                let site = site.context("the server's sync came before its connect")?;
                return Ok((site, m.cursor.unwrap_or_default()));
            }
            Some(m) if m.kind == MessageKind::Error => bail!("observer refused: {m:?}"),
            Some(_) => continue,
            None => bail!("the observer stream ended before the server's sync"),
        }
    }
}

/// The server's cursor for `notes` (see [`server_view`]).
async fn server_cursor(server: &TestServer) -> Result<Cursor> {
    Ok(server_view(server).await?.1)
}

/// Every entry of `cursor` (held by `whose`) names the server or one of the
/// honest peers, and claims no more of a peer than that peer holds itself.
async fn assert_sound(
    whose: &str,
    cursor: &Cursor,
    server: SiteId,
    honest: &[&Peer],
) -> Result<()> {
    for (site, version) in cursor.iter() {
        if site == server {
            continue;
        }
        let Some(p) = honest.iter().find(|p| p.site_id() == site) else {
            panic!(
                "{whose}'s cursor names {site} (up to {version}), a site that never wrote; {} sites in all",
                cursor.len()
            );
        };
        let own = own_version(p).await?;
        assert!(
            version <= own,
            "{whose}'s cursor claims {site} up to {version}, but that peer holds its own rows only up to {own}"
        );
    }
    Ok(())
}

/// [`assert_sound`] for the server's cursor and each honest peer's.
async fn assert_all_sound(server: &TestServer, honest: &[&Peer]) -> Result<()> {
    let (server_site, at_server) = server_view(server).await?;
    assert_sound("the server", &at_server, server_site, honest).await?;
    for p in honest {
        let whose = format!("peer {}", p.site_id());
        assert_sound(&whose, &p.store().cursor().await?, server_site, honest).await?;
    }
    Ok(())
}

/// Rows of the server's replica file.
async fn server_rows(server: &TestServer) -> Result<Vec<String>> {
    let replica = Store::open(server.replica("notes")).await?;
    let rows = contents(&replica).await?;
    replica.close().await?;
    Ok(rows)
}

/// A raw client's SSE stream as `peer_id` (a crsync client: `crsync=lossless`),
/// once the server's `connect` arrived. Retries while the server still holds
/// an earlier stream for the same id (it notices a dropped stream
/// asynchronously), up to the timeout.
async fn raw_stream(server: &TestServer, peer_id: &str) -> Result<SseReader> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let mut reader = server.open_stream("notes", peer_id, RW).await?;
        let first = reader.next().await?.context("stream ended at once")?;
        match first.kind {
            MessageKind::Connect => return Ok(reader),
            MessageKind::Error if first.code.as_deref() == Some("ALREADY_CONNECTED") => {
                if tokio::time::Instant::now() > deadline {
                    bail!("the server kept an earlier stream for {peer_id}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => bail!("unexpected first frame {other:?}: {first:?}"),
        }
    }
}

/// A `data` POST body from `peer_id`.
fn data_body(peer_id: &str, kind: &str, changes: Vec<Value>, ranges: Value) -> String {
    json!({"type": "data", "peerId": peer_id,
           "data": {"type": kind, "data": changes, "schemaVersion": 1, "ranges": ranges}})
    .to_string()
}

/// `n` site ids that nobody ever wrote for.
fn stranger_sites(n: usize, tag: u32) -> impl Iterator<Item = String> {
    (0..n).map(move |i| format!("{tag:08x}00000000{:016x}", i as u64 + 1))
}

/// Waits until every peer's rows equal `want`.
async fn wait_rows(peers: &[&Peer], want: &[String], what: &str) -> Result<()> {
    for p in peers {
        let store = p.store().clone();
        wait_until(p, what, || {
            let store = store.clone();
            async move { Ok(contents(&store).await? == want) }
        })
        .await
        .with_context(|| format!("{what}: {:?}", want))?;
    }
    Ok(())
}

/// Our own cursor entry: the highest version of our own the victim holds.
async fn own_version(p: &Peer) -> Result<DbVersion> {
    Ok(p.store().cursor().await?.get(&p.site_id()))
}

/// A temp dir with two new client replicas named `names`, a Peer on each.
async fn two_peers(names: [&str; 2]) -> Result<(tempfile::TempDir, Peer, Peer)> {
    let dir = tempfile::tempdir()?;
    let first = peer(client_store(&dir.path().join(names[0])).await?);
    let second = peer(client_store(&dir.path().join(names[1])).await?);
    Ok((dir, first, second))
}

/// [`two_peers`], both syncing with the server over SSE; the first writes
/// rows 1..=3 titled `title` (three transactions), and this returns once the
/// second holds them (`what` names that wait).
async fn sse_pair_with_rows(
    server: &TestServer,
    names: [&str; 2],
    title: &str,
    what: &str,
) -> Result<(tempfile::TempDir, Peer, Peer)> {
    let (dir, first, second) = two_peers(names).await?;
    let base = server.url("/db/notes");
    first.add_dialer(SseDialer::new(&base).with_token(RW));
    second.add_dialer(SseDialer::new(&base).with_token(RW));
    for id in 1..=3 {
        insert(first.store(), id, title).await?;
    }
    let want = contents(first.store()).await?;
    wait_rows(&[&second], &want, what).await?;
    Ok((dir, first, second))
}

/// An honest victim and an honest third client, both over SSE, with the
/// victim's rows 1..=3 (three transactions) on both and on the server.
struct Honest {
    _dir: tempfile::TempDir,
    victim: Peer,
    third: Peer,
}

impl Honest {
    async fn start(server: &TestServer) -> Result<Honest> {
        let (dir, victim, third) = sse_pair_with_rows(
            server,
            ["victim.db", "third.db"],
            "by the victim",
            "the victim's first rows at the third client",
        )
        .await?;
        Ok(Honest {
            _dir: dir,
            victim,
            third,
        })
    }

    /// The victim writes rows 10, 11: they reach the third client and the
    /// server, and every replica ends identical.
    async fn victim_still_converges(&self, server: &TestServer) -> Result<Vec<String>> {
        insert(self.victim.store(), 10, "after the attack").await?;
        insert(self.victim.store(), 11, "after the attack").await?;
        let third = self.third.store().clone();
        wait_until(
            &self.third,
            "the victim's next writes at the third client",
            || {
                let third = third.clone();
                async move {
                    let rows = contents(&third).await?;
                    Ok(rows.iter().any(|r| r.starts_with("todo 10 "))
                        && rows.iter().any(|r| r.starts_with("todo 11 ")))
                }
            },
        )
        .await
        .context(
            "the victim was silenced: its writes after the attack never reached the third client",
        )?;
        let want = contents(self.victim.store()).await?;
        wait_rows(&[&self.third], &want, "victim and third client identical")
            .await
            .context("the victim and the third client do not converge")?;
        assert_eq!(server_rows(server).await?, want, "the server's replica");
        Ok(want)
    }

    /// The server's cursor, asserting that it holds all of the victim's rows.
    async fn server_cursor_at_start(&self, server: &TestServer) -> Result<Cursor> {
        let cursor = server_cursor(server).await?;
        assert_eq!(
            cursor.get(&self.victim.site_id()),
            own_version(&self.victim).await?,
            "set-up: the server holds the victim's rows"
        );
        Ok(cursor)
    }

    /// Nobody believes more of anyone than they hold, nor names strangers.
    async fn assert_claims_sound(&self, server: &TestServer) -> Result<()> {
        let at_server = server_cursor(server).await?.get(&self.victim.site_id());
        assert_ne!(at_server, DbVersion(HUGE), "the forged range was believed");
        assert_all_sound(server, &[&self.victim, &self.third]).await
    }

    async fn shutdown(self) {
        self.victim.shutdown().await;
        self.third.shutdown().await;
    }
}

/// Fails the test on a server error; a refusal (4xx) or an accepted POST are
/// both fine for a claim that must simply not be believed.
fn assert_not_server_error(what: &str, (status, body): &(u16, Value)) {
    assert!(
        *status == 200 || (400..500).contains(status),
        "{what}: HTTP {status} {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_ranges_about_another_site_are_not_believed() -> Result<()> {
    let server = TestServer::start().await?;
    let honest = Honest::start(&server).await?;
    let victim = honest.victim.site_id().to_hex();
    let before = honest.server_cursor_at_start(&server).await?;
    let rows_before = server_rows(&server).await?;

    // The attacker: a read-write client with a stream of its own.
    let _attacker = raw_stream(&server, PEER_A).await?;
    for kind in ["changes", "eose"] {
        let body = data_body(PEER_A, kind, vec![], json!({ &victim: [0, HUGE] }));
        let answer = server.post("notes", "data", RW, body).await?;
        assert_not_server_error(&format!("forged ranges in {kind}"), &answer);
    }

    let after = server_cursor(&server).await?;
    assert_eq!(
        after.get(&honest.victim.site_id()),
        before.get(&honest.victim.site_id()),
        "the server's cursor for the victim moved on a forged range: {after:?}"
    );
    assert_all_sound(&server, &[&honest.victim, &honest.third]).await?;
    assert_eq!(
        server_rows(&server).await?,
        rows_before,
        "the server's rows"
    );

    honest.victim_still_converges(&server).await?;
    honest.assert_claims_sound(&server).await?;
    honest.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_change_under_the_victims_site_id_does_not_silence_it() -> Result<()> {
    let server = TestServer::start().await?;
    let honest = Honest::start(&server).await?;
    let victim_site = honest.victim.site_id();
    let victim = victim_site.to_hex();

    // A well-formed change of a new row, relabelled as the victim's, at 10^15.
    let scratch = tempfile::tempdir()?;
    let forger = client_store(&scratch.path().join("forger.db")).await?;
    insert(&forger, 999, "forged").await?;
    let mut batches = forger.changes_since(&Cursor::new()).await?;
    let batch = batches.next_batch().await.context("one batch")??;
    drop(batches);
    forger.close().await?;
    let forged: Vec<Value> = batch
        .changes
        .into_iter()
        .map(|mut c| {
            c.site_id = victim_site;
            c.db_version = DbVersion(HUGE);
            serde_json::to_value(wire::encode_change(&c, Encoding::Lossless))
        })
        .collect::<Result<_, _>>()?;
    assert!(!forged.is_empty());

    let _attacker = raw_stream(&server, PEER_A).await?;
    let body = data_body(PEER_A, "changes", forged, json!({ &victim: [0, HUGE] }));
    let answer = server.post("notes", "data", RW, body).await?;
    assert_not_server_error("a forged change with a forged range", &answer);
    let at_server = server_cursor(&server).await?.get(&victim_site);
    assert!(
        at_server < DbVersion(HUGE),
        "the server believes the victim's site up to {at_server}: every later write of the victim would be skipped"
    );

    // The victim is neither silenced nor refused (it did not copy anything),
    // and it ends identical with the others.
    honest.victim_still_converges(&server).await?;
    honest.assert_claims_sound(&server).await?;
    honest.shutdown().await;
    Ok(())
}

/// A raw WebSocket client that said `connect` as `peer_id` (a crsync peer).
async fn raw_ws(server: &TestServer, peer_id: &str) -> Result<Socket> {
    let mut request = format!("ws://{}/db/notes/ws", server.addr).into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {RW}").parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    let connect = TransportMessage::connect(peer_id.parse::<SiteId>()?);
    socket.send(Message::text(connect.to_json())).await?;
    Ok(socket)
}

/// Reads the socket until the server answers a message of ours: an
/// acknowledgement (`sync` with `ack`) or an `error`. Returns the error code,
/// if it was one. `None` when the socket closed first.
async fn ws_answer(socket: &mut Socket) -> Result<Option<Option<String>>> {
    loop {
        let frame = tokio::time::timeout(TIMEOUT, socket.next())
            .await
            .context("no answer on the WebSocket within the timeout")?;
        let text = match frame {
            None | Some(Ok(Message::Close(_))) | Some(Err(_)) => return Ok(None),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
        };
        let message = TransportMessage::from_json(text.as_str())?;
        match message.kind {
            MessageKind::Error => return Ok(Some(message.code)),
            MessageKind::Sync if message.ack == Some(true) => return Ok(Some(None)),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_ranges_over_websocket_are_not_believed() -> Result<()> {
    let server = TestServer::start().await?;
    let honest = Honest::start(&server).await?;
    let victim = honest.victim.site_id().to_hex();
    let before = honest.server_cursor_at_start(&server).await?;

    let mut socket = raw_ws(&server, PEER_B).await?;
    let forged = data_body(PEER_B, "changes", vec![], json!({ &victim: [0, HUGE] }));
    socket.send(Message::text(forged)).await?;
    // Whatever the server answers (an ack, a refusal, or closing the
    // socket), it has processed the message by then.
    let _ = ws_answer(&mut socket).await?;
    let after = server_cursor(&server).await?;
    assert_eq!(
        after.get(&honest.victim.site_id()),
        before.get(&honest.victim.site_id()),
        "a forged range over WebSocket moved the server's cursor for the victim: {after:?}"
    );

    honest.victim_still_converges(&server).await?;
    honest.assert_claims_sound(&server).await?;
    drop(socket);
    honest.shutdown().await;
    Ok(())
}

/// Two honest clients (one over WebSocket) with a few rows, and the sites
/// any cursor may name: theirs and the server's.
struct Pair {
    _dir: tempfile::TempDir,
    a: Peer,
    b: Peer,
}

impl Pair {
    async fn start(server: &TestServer) -> Result<Pair> {
        let (dir, a, b) = two_peers(["a.db", "b.db"]).await?;
        a.add_dialer(SseDialer::new(server.url("/db/notes")).with_token(RW));
        b.add_dialer(
            WebSocketDialer::new(format!("ws://{}/db/notes/ws", server.addr)).with_token(RW),
        );
        insert(a.store(), 1, "a").await?;
        insert(b.store(), 2, "b").await?;
        let pair = Pair { _dir: dir, a, b };
        pair.converge("set-up").await?;
        Ok(pair)
    }

    async fn converge(&self, what: &str) -> Result<Vec<String>> {
        let want_len = contents(self.a.store())
            .await?
            .len()
            .max(contents(self.b.store()).await?.len());
        for p in [&self.a, &self.b] {
            let store = p.store().clone();
            let other = if p.site_id() == self.a.site_id() {
                &self.b
            } else {
                &self.a
            };
            let other = other.store().clone();
            wait_until(p, what, || {
                let (store, other) = (store.clone(), other.clone());
                async move {
                    let mine = contents(&store).await?;
                    Ok(mine.len() >= want_len && mine == contents(&other).await?)
                }
            })
            .await?;
        }
        contents(self.a.store()).await
    }

    /// Every cursor (the server's, a's, b's) names only sites that wrote,
    /// none past what it holds: nothing the attack sent joined a cursor.
    async fn assert_cursors_sound(&self, server: &TestServer) -> Result<()> {
        assert_all_sound(server, &[&self.a, &self.b]).await
    }

    /// a writes 50 rows; b receives them all.
    async fn fifty_rows(&self) -> Result<()> {
        self.a
            .store()
            .write(|tx| {
                for id in 100..150 {
                    tx.execute("INSERT INTO todo VALUES (?1, 'one of fifty')", [id])?;
                }
                Ok(())
            })
            .await?;
        let rows = self.converge("50 rows after the attack").await?;
        assert_eq!(
            rows.iter().filter(|r| r.contains("one of fifty")).count(),
            50
        );
        Ok(())
    }

    async fn shutdown(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_of_100000_sites_is_refused() -> Result<()> {
    let server = TestServer::start().await?;
    let pair = Pair::start(&server).await?;

    // Over POST: 413 LIMIT_EXCEEDED.
    let _attacker = raw_stream(&server, PEER_A).await?;
    let peers: serde_json::Map<String, Value> = stranger_sites(BLOAT_SITES, 0x5eed0001)
        .map(|s| (s, json!(HUGE)))
        .collect();
    let body = json!({"type": "sync", "peerId": PEER_A, "cursor": {"peers": peers}}).to_string();
    assert!(
        body.len() < 16 * 1024 * 1024,
        "under the body limit: {}",
        body.len()
    );
    let (status, answer) = server.post("notes", "sync", RW, body.clone()).await?;
    assert_eq!(
        (status, answer["code"].as_str()),
        (413, Some("LIMIT_EXCEEDED")),
        "a 100,000-site cursor: {answer}"
    );
    assert_eq!(answer["type"], "error");

    // Over WebSocket: an `error` LIMIT_EXCEEDED (or the socket closed on it).
    let mut socket = raw_ws(&server, PEER_B).await?;
    let ws_body = body.replace(PEER_A, PEER_B);
    socket.send(Message::text(ws_body)).await?;
    match ws_answer(&mut socket).await? {
        Some(Some(code)) => assert_eq!(code, "LIMIT_EXCEEDED"),
        Some(None) => panic!("the server acknowledged a 100,000-site cursor over WebSocket"),
        None => panic!("the socket closed without a LIMIT_EXCEEDED error"),
    }
    drop(socket);

    pair.fifty_rows().await?;
    pair.assert_cursors_sound(&server).await?;
    pair.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_for_100000_sites_are_refused_and_strangers_are_not_believed() -> Result<()> {
    let server = TestServer::start().await?;
    let pair = Pair::start(&server).await?;
    let rows_before = server_rows(&server).await?;

    let _attacker = raw_stream(&server, PEER_A).await?;
    let bloat: serde_json::Map<String, Value> = stranger_sites(BLOAT_SITES, 0x5eed0002)
        .map(|s| (s, json!([0, 1])))
        .collect();
    let body = data_body(PEER_A, "changes", vec![], Value::Object(bloat));
    assert!(
        body.len() < 16 * 1024 * 1024,
        "under the body limit: {}",
        body.len()
    );
    let (status, answer) = server.post("notes", "data", RW, body).await?;
    assert_eq!(
        (status, answer["code"].as_str()),
        (413, Some("LIMIT_EXCEEDED")),
        "ranges for 100,000 sites: {answer}"
    );
    pair.assert_cursors_sound(&server).await?;

    // Below the size limit, ranges about sites nobody wrote for are not
    // believed either (the issue: "refuse sites nobody has written for").
    let strangers: serde_json::Map<String, Value> = stranger_sites(STRANGER_SITES, 0x5eed0003)
        .map(|s| (s, json!([0, 7])))
        .collect();
    let body = data_body(PEER_A, "eose", vec![], Value::Object(strangers));
    let answer = server.post("notes", "data", RW, body).await?;
    assert_not_server_error("ranges for 500 strangers", &answer);
    pair.assert_cursors_sound(&server).await?;
    assert_eq!(
        server_rows(&server).await?,
        rows_before,
        "the server's rows"
    );

    pair.fifty_rows().await?;
    pair.assert_cursors_sound(&server).await?;
    pair.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_of_a_site_is_refused_and_the_original_keeps_syncing() -> Result<()> {
    let server = TestServer::start().await?;
    let (dir, original, third) = sse_pair_with_rows(
        &server,
        ["original.db", "third.db"],
        "original",
        "the original's rows at the third client",
    )
    .await?;
    let path = dir.path().join("original.db");
    let site = original.site_id();
    let own = own_version(&original).await?;
    assert!(own >= DbVersion(3), "three transactions: {own}");
    assert_eq!(server_cursor(&server).await?.get(&site), own, "set-up");
    original.shutdown().await;
    let store = original.store().clone();
    drop(original);
    store.close().await?;
    let rows_before = server_rows(&server).await?;

    // A stale copy of the same site (a restored backup) says it holds its
    // own site only up to version 1: the server already holds more.
    let stale = site.to_hex();
    let reader = raw_stream(&server, &stale).await?;
    let cursor = json!({"peers": { &stale: 1 }});
    let body = json!({"type": "sync", "peerId": &stale, "cursor": cursor,
                      "crsync": {"version": 1, "encoding": "lossless"}})
    .to_string();
    let (status, answer) = server.post("notes", "sync", RW, body).await?;
    assert_eq!(
        (status, answer["code"].as_str()),
        (409, Some("SITE_ID_CONFLICT")),
        "a peer whose own version is below what the server holds for its site: {answer}"
    );
    assert_eq!(
        server_rows(&server).await?,
        rows_before,
        "the server's rows"
    );
    drop(reader);

    // The refusal is no verdict on the site: the original reconnects and syncs.
    let original = peer(Store::open(&path).await?);
    original.add_dialer(SseDialer::new(server.url("/db/notes")).with_token(RW));
    insert(original.store(), 4, "original, later").await?;
    let want = contents(original.store()).await?;
    wait_rows(
        &[&third],
        &want,
        "the original's later row at the third client",
    )
    .await
    .context("the original was locked out after a stale copy was refused")?;
    assert_eq!(server_rows(&server).await?, want);
    assert!(server_cursor(&server).await?.get(&site) <= own_version(&original).await?);
    original.shutdown().await;
    third.shutdown().await;
    Ok(())
}
