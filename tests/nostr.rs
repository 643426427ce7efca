//! The Nostr relay transport end to end: real Stores, real Peers, real
//! relays (nostr-relay-builder, in process, on 127.0.0.1 port 0, each on its
//! own runtime so that killing it ends its connections), pairing through the
//! relays, devices that are offline, a relay killed or restarted empty,
//! unrelated pairs on one relay, foreign and replayed events.

use std::time::Duration;

use crsync::advanced::ChangeBatch;
use crsync::transports::nostr::{self, Invitation, NostrDialer, PairingOutcome, RelaySettings};
use crsync::wire::{Encoding, MessageKind, TransportMessage};
use crsync::{Dialer, SqlValue, Store};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[path = "support/nostr_devices.rs"]
mod devices;
use devices::{Device, WAIT, device, pair, peer, peer_with};
#[path = "support/local_relay.rs"]
mod local_relay;
use local_relay::TestRelay;
#[path = "support/silent_proxy.rs"]
mod silent_proxy;
use silent_proxy::SilentProxy;

async fn relay() -> (TestRelay, String) {
    let relay = TestRelay::start().await;
    let url = relay.url();
    (relay, url)
}

async fn write(d: &Device, id: i64, body: &str) {
    let body = body.to_owned();
    d.store
        .write(move |tx| {
            tx.execute(
                "INSERT OR REPLACE INTO items (id, body) VALUES (?1, ?2)",
                (id, body),
            )
        })
        .await
        .expect("write");
}

async fn dump(store: &Store) -> Vec<(i64, String)> {
    store
        .read(|c| {
            let mut stmt = c.prepare("SELECT id, body FROM items ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<crsync::rusqlite::Result<Vec<_>>>()
        })
        .await
        .expect("read")
}

/// Waits until every store holds exactly `expected`.
async fn converge(stores: &[&Store], expected: &[(i64, String)]) {
    converge_within(stores, expected, WAIT).await;
}

/// Waits up to `limit` until every store holds exactly `expected`.
async fn converge_within(stores: &[&Store], expected: &[(i64, String)], limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut all = true;
        for s in stores {
            if dump(s).await != expected {
                all = false;
            }
        }
        if all {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            for s in stores {
                eprintln!("{:?}", dump(s).await);
            }
            panic!("no convergence within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rows(ids: impl IntoIterator<Item = i64>) -> Vec<(i64, String)> {
    ids.into_iter().map(|i| (i, format!("row {i}"))).collect()
}

async fn write_rows(d: &Device, ids: impl IntoIterator<Item = i64>) {
    for i in ids {
        write(d, i, &format!("row {i}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_devices_sync_through_one_relay() {
    let dir = tempfile::tempdir().expect("dir");
    let (_relay, url) = relay().await;
    let relays = vec![url];
    let (a, b, c) = (
        device(dir.path(), "a").await,
        device(dir.path(), "b").await,
        device(dir.path(), "c").await,
    );
    let (b_on_a, a_on_b) = pair(&a, &b, &relays).await;
    let (c_on_a, a_on_c) = pair(&a, &c, &relays).await;
    assert_eq!(a.file.devices().len(), 2);
    write_rows(&a, 1..=3).await;
    write_rows(&b, 10..=12).await;
    let pa = peer(&a, &[&b_on_a, &c_on_a], None);
    let pb = peer(&b, &[&a_on_b], None);
    let pc = peer(&c, &[&a_on_c], None);
    write_rows(&c, 20..=21).await;
    let expected = rows((1..=3).chain(10..=12).chain(20..=21));
    converge(&[&a.store, &b.store, &c.store], &expected).await;
    // Live writes after the initial sync, and a large transaction (more
    // than one event's worth) in one go.
    let big = "x".repeat(200_000);
    let body = big.clone();
    b.store
        .write(move |tx| {
            for i in 100..110 {
                tx.execute(
                    "INSERT INTO items (id, body) VALUES (?1, ?2)",
                    (i, body.as_str()),
                )?;
            }
            Ok(())
        })
        .await
        .expect("big write");
    let mut expected = expected;
    expected.extend((100..110).map(|i| (i, big.clone())));
    converge(&[&a.store, &b.store, &c.store], &expected).await;
    for p in [pa, pb, pc] {
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_never_online_together_converge_through_stored_events() {
    let dir = tempfile::tempdir().expect("dir");
    let (_relay, url) = relay().await;
    let relays = vec![url];
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (b_on_a, a_on_b) = pair(&a, &b, &relays).await;
    // Once together, so that each knows the other's cursor.
    write_rows(&a, [1]).await;
    let (pa, pb) = (peer(&a, &[&b_on_a], None), peer(&b, &[&a_on_b], None));
    converge(&[&a.store, &b.store], &rows([1])).await;
    pb.shutdown().await;
    // B is away while A writes; A goes away before B is back.
    write_rows(&a, 2..=5).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    pa.shutdown().await;
    let pb = peer(&b, &[&a_on_b], None);
    converge(&[&b.store], &rows(1..=5)).await;
    // And the other way round.
    write_rows(&b, 6..=7).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    pb.shutdown().await;
    let pa = peer(&a, &[&b_on_a], None);
    converge(&[&a.store], &rows(1..=7)).await;
    pa.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_one_killed_mid_way() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut r1, u1) = relay().await;
    let (_r2, u2) = relay().await;
    let relays = vec![u1, u2];
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (b_on_a, a_on_b) = pair(&a, &b, &relays).await;
    let (pa, pb) = (peer(&a, &[&b_on_a], None), peer(&b, &[&a_on_b], None));
    write_rows(&a, 1..=3).await;
    converge(&[&a.store, &b.store], &rows(1..=3)).await;
    r1.kill().await;
    write_rows(&b, 4..=6).await;
    write_rows(&a, 7..=8).await;
    converge(&[&a.store, &b.store], &rows(1..=8)).await;
    pa.shutdown().await;
    pb.shutdown().await;
}

/// The relay is killed and comes back empty on its port while A runs, before
/// B starts: A's stream (its `sync`, resent every 2 s here) is lost, and A's
/// link never heard of B; B's first `sync`, on the new relay, gets a fresh
/// stream from A. (Flaky while the relay was stopped with
/// `LocalRelay::shutdown`, which left A on the old relay: see the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_restarts_empty_still_converges_by_a_fresh_stream() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut r, url) = relay().await;
    let relays = vec![url];
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (b_on_a, a_on_b) = pair(&a, &b, &relays).await;
    let pa = peer(&a, &[&b_on_a], None);
    write_rows(&a, 1..=4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Everything A published is lost with the relay.
    r.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _r = TestRelay::start_on(r.port()).await;
    let pb = peer(&b, &[&a_on_b], None);
    converge(&[&a.store, &b.store], &rows(1..=4)).await;
    pa.shutdown().await;
    pb.shutdown().await;
}

/// The test relay's kill ends every connection at once, also one that is
/// busy with a message at that instant. (`LocalRelay::shutdown` does not:
/// such a connection lived on, served by the old relay, and the test above
/// then ran with A on the old relay and B on the new one. It outlived the
/// relay in 5 of 6 runs of one round here, so a few rounds.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_closes_a_connection_busy_publishing() {
    for round in 0..5 {
        let mut relay = TestRelay::start().await;
        let (socket, _) = tokio_tungstenite::connect_async(relay.url())
            .await
            .expect("connects");
        let (mut tx, mut rx) = socket.split();
        let keys = ::nostr::Keys::generate();
        let flood = tokio::spawn(async move {
            for i in 0u64.. {
                let event = ::nostr::EventBuilder::text_note(i.to_string())
                    .sign_with_keys(&keys)
                    .expect("signs");
                let json = ::nostr::JsonUtil::as_json(&::nostr::ClientMessage::event(event));
                if tx.send(Message::text(json)).await.is_err() {
                    break;
                }
            }
        });
        // The relay is answering our events when it is killed.
        for _ in 0..100 {
            match rx.next().await {
                Some(Ok(Message::Text(_))) => {}
                other => panic!("relay answer expected, got {other:?}"),
            }
        }
        relay.kill().await;
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(Message::Text(_))) = rx.next().await {}
        })
        .await;
        flood.abort();
        assert!(
            closed.is_ok(),
            "round {round}: the connection outlived its relay"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_pairs_on_one_relay_do_not_mix_and_codes_work_once() {
    let dir = tempfile::tempdir().expect("dir");
    let (_relay, url) = relay().await;
    let relays = vec![url];
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (c, d) = (device(dir.path(), "c").await, device(dir.path(), "d").await);
    // A's invitation: B pairs; D replays the same code and is refused.
    let mut invite = Invitation::new(
        &a.file,
        a.store.site_id(),
        "a",
        relays.clone(),
        Duration::from_secs(600),
    )
    .expect("invitation");
    let code = invite.code().clone();
    let first = tokio::spawn(async move {
        let outcome = invite.next(WAIT).await;
        (invite, outcome)
    });
    let a_on_b = nostr::join(&b.file, &code, b.store.site_id(), "b", WAIT)
        .await
        .expect("joins")
        .remote_key;
    let (mut invite, outcome) = first.await.expect("task");
    let PairingOutcome::Paired(on_a) = outcome.expect("answers") else {
        panic!("refused")
    };
    let b_on_a = on_a.remote_key;
    let second = tokio::spawn(async move { invite.next(WAIT).await });
    let replay = nostr::join(&d.file, &code, d.store.site_id(), "d", WAIT).await;
    assert!(
        matches!(replay, Err(nostr::PairingError::Refused(_))),
        "{replay:?}"
    );
    assert!(matches!(
        second.await.expect("task"),
        Ok(PairingOutcome::Refused(_))
    ));
    assert!(d.file.devices().is_empty());
    // An expired code is refused before anything is sent.
    let mut expired = code.clone();
    expired.expires = 1;
    assert!(matches!(
        nostr::join(&d.file, &expired, d.store.site_id(), "d", WAIT).await,
        Err(nostr::PairingError::Refused(_))
    ));
    let (d_on_c, c_on_d) = pair(&c, &d, &relays).await;
    write_rows(&a, 1..=2).await;
    write_rows(&c, 50..=51).await;
    let peers = [
        peer(&a, &[&b_on_a], None),
        peer(&b, &[&a_on_b], None),
        peer(&c, &[&d_on_c], None),
        peer(&d, &[&c_on_d], None),
    ];
    converge(&[&a.store, &b.store], &rows(1..=2)).await;
    converge(&[&c.store, &d.store], &rows(50..=51)).await;
    // A device of the other pair cannot speak for B: its key is not B's.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(dump(&a.store).await, rows(1..=2));
    assert_eq!(dump(&c.store).await, rows(50..=51));
    for p in peers {
        p.shutdown().await;
    }
    // Unpairing: gone from the file, and the dialer refuses to dial it.
    a.file.remove(&b_on_a).expect("unpairs");
    assert!(NostrDialer::new(a.file.clone(), &b_on_a).is_err());
    let _ = SqlValue::Null;
}

/// A relay connection that goes silent without closing (a half-open TCP
/// connection: the relay's machine crashed, a NAT dropped the mapping) is
/// noticed by its pings and replaced, and the device gets what was
/// published meanwhile; an idle one that answers the pings is kept. B is idle (it publishes nothing that could time
/// out), so without the pings it would sit on the dead socket; with them it
/// dials again within a few intervals, well before the 15 s a publication
/// would wait for its `OK`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_connection_that_goes_silent_is_replaced_and_misses_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let (relay, url) = relay().await;
    let proxy = SilentProxy::start(relay.port()).await;
    let relays = vec![url.clone()];
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (b_on_a, a_on_b) = pair(&a, &b, &relays).await;
    write_rows(&a, [1]).await;
    let pa = peer(&a, &[&b_on_a], None);
    // B reaches the relay only through the proxy, pinging every 500 ms.
    let watched = RelaySettings::default()
        .with_ping_interval(Duration::from_millis(500))
        .with_dead_after(2);
    let through_proxy = vec![proxy.url()];
    let pb = peer_with(&b, &[&a_on_b], |d| {
        d.with_relays(through_proxy.clone())
            .with_relay_settings(watched)
    });
    converge(&[&a.store, &b.store], &rows([1])).await;
    // Idle for five intervals, B in the live phase: the relay answers the
    // pings, and the connection is kept.
    let before = proxy.accepted();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(proxy.accepted(), before, "a live connection is kept");
    proxy.silence();
    write_rows(&a, [2]).await;
    converge_within(&[&b.store], &rows(1..=2), Duration::from_secs(8)).await;
    assert!(
        proxy.accepted() > before,
        "B got the row through a new connection"
    );
    pa.shutdown().await;
    pb.shutdown().await;
}

/// Messages a link received but never handed to the Peer (its session
/// ended while they were queued for it) are taken again by the next dial of
/// the same dialer instead of being dropped as already seen: the dialer's
/// seen event ids count only what a stream handed on (or discarded on
/// purpose). Before, every event counted as seen as it came off the socket,
/// and such messages came again only when the other side resent them
/// (after its acknowledgement timeout, an hour by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_link_never_handed_on_come_again_on_the_next_dial() {
    let dir = tempfile::tempdir().expect("dir");
    let (_relay, url) = relay().await;
    let relays = vec![url];
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (b_on_a, a_on_b) = pair(&a, &b, &relays).await;
    // A's link publishes `connect` and six numbered batches (empty ones:
    // the link hands on any batch) for B, who is away; the last three a
    // second later (the link's record of how far it read is in seconds).
    let site = a.store.site_id();
    let mut from_a = NostrDialer::new(a.file.clone(), &b_on_a)
        .expect("paired")
        .dial(site)
        .await
        .expect("A dials");
    from_a
        .sink
        .send(TransportMessage::connect(site))
        .await
        .expect("publishes");
    for i in 0..6 {
        if i == 3 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let batch = TransportMessage::data(site, &ChangeBatch::default(), i == 5, 0, Encoding::V1);
        from_a.sink.send(batch).await.expect("publishes");
    }
    // B's dialer, as the Peer keeps it across sessions. The first session
    // takes A's `connect` and ends: the batches were received and queued.
    let mut dialer = NostrDialer::new(b.file.clone(), &a_on_b).expect("paired");
    let b_site = b.store.site_id();
    let mut first = dialer.dial(b_site).await.expect("B dials");
    let next = tokio::time::timeout(WAIT, first.stream.next()).await;
    let Ok(Some(Ok(received))) = next else {
        panic!("A's connect expected, got {next:?}")
    };
    assert_eq!(received.message.kind, MessageKind::Connect);
    // The link has every stored event by then (it hands the first on only
    // after the relay's end of stored events); a moment more lets it queue
    // all six batches for the Peer, which never takes them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(first);
    // The next session gets the six batches (and not the connect again).
    let mut second = dialer.dial(b_site).await.expect("B dials again");
    for i in 0..6 {
        let next = tokio::time::timeout(Duration::from_secs(20), second.stream.next()).await;
        let Ok(Some(Ok(received))) = next else {
            panic!("batch {i} of 6 expected again, got {next:?}")
        };
        assert_eq!(received.message.kind, MessageKind::Data, "message {i}");
    }
    drop(second);
    // What was handed on is not handed on again.
    let mut third = dialer.dial(b_site).await.expect("B dials a third time");
    let again = tokio::time::timeout(Duration::from_secs(3), third.stream.next()).await;
    assert!(again.is_err(), "nothing more expected, got {again:?}");
}

/// The same through a Peer: B's session ends while the stored events it
/// fetched wait for their order (a second relay, the same one behind a
/// proxy, is up but sends nothing, so the replay waits its 10 s), and the
/// Peer dials again with the same dialer. A is gone by then and cannot send
/// anything again: B converges only if the next dial takes those events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_ends_while_stored_events_wait_for_their_order_loses_none() {
    let dir = tempfile::tempdir().expect("dir");
    let (relay, url) = relay().await;
    let proxy = SilentProxy::start(relay.port()).await;
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (b_on_a, a_on_b) = pair(&a, &b, std::slice::from_ref(&url)).await;
    write_rows(&a, [1]).await;
    let (pa, pb) = (peer(&a, &[&b_on_a], None), peer(&b, &[&a_on_b], None));
    converge(&[&a.store, &b.store], &rows([1])).await;
    pb.shutdown().await;
    // A writes for B, who is away, and is gone too once it published.
    write_rows(&a, 2..=4).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    pa.shutdown().await;
    proxy.stall_after_handshake();
    let pb = crsync::Peer::builder(b.store.clone())
        .reconnect(crsync::ReconnectPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            multiplier: 2.0,
        })
        .build();
    let mut events = pb.events();
    let dialer = NostrDialer::new(b.file.clone(), &a_on_b)
        .expect("paired")
        .with_relays(vec![url.clone(), proxy.url()])
        .with_ack_timeout(Duration::from_secs(2));
    let handle = pb.add_dialer(dialer);
    // The relay sent its stored events at once; the proxied one, nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(dump(&b.store).await, rows([1]), "the replay still waits");
    handle.pause();
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            if matches!(event, crsync::PeerEvent::Disconnected { .. }) {
                return;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the session ends on pause");
    handle.resume();
    converge(&[&b.store], &rows(1..=4)).await;
    pb.shutdown().await;
}

/// Three devices, each paired with the other two. B's record of A's cursor
/// is old when B's session with A begins: A wrote more since, and that
/// reached B through C. A is away, so B's link stands in for A with that
/// old cursor (to publish what A lacks): it is not A speaking now, and must
/// not be taken as proof that A is a copy (its own version below what B
/// holds of it). Before, B refused A as a copied replica (`SITE_ID_CONFLICT`)
/// and stopped dialing it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_record_of_an_away_device_is_not_taken_for_a_copy() {
    let dir = tempfile::tempdir().expect("dir");
    let (_relay, url) = relay().await;
    let relays = vec![url];
    let (a, b, c) = (
        device(dir.path(), "a").await,
        device(dir.path(), "b").await,
        device(dir.path(), "c").await,
    );
    let (b_on_a, a_on_b) = pair(&a, &b, &relays).await;
    let (c_on_a, a_on_c) = pair(&a, &c, &relays).await;
    let (c_on_b, b_on_c) = pair(&b, &c, &relays).await;
    write_rows(&a, [1]).await;
    // A sends its request once per session (no resend within the test), so
    // that B's record of A's cursor stays the one from before A wrote more.
    let once = |d: NostrDialer| d.with_ack_timeout(nostr::DEFAULT_ACK_TIMEOUT);
    let peers = [
        peer_with(&a, &[&b_on_a, &c_on_a], once),
        peer(&b, &[&a_on_b, &c_on_b], None),
        peer(&c, &[&a_on_c, &b_on_c], None),
    ];
    converge(&[&a.store, &b.store, &c.store], &rows([1])).await;
    let [pa, pb, pc] = peers;
    pb.shutdown().await;
    // A writes while B is away; C gets it; A goes away.
    write_rows(&a, 2..=4).await;
    converge(&[&c.store], &rows(1..=4)).await;
    pa.shutdown().await;
    // B gets A's rows from C only.
    let pb = peer(&b, &[&c_on_b], None);
    converge(&[&b.store], &rows(1..=4)).await;
    pb.shutdown().await;
    pc.shutdown().await;
    // B's session with A begins holding A's newer versions; A is away.
    let pb = peer(&b, &[&a_on_b], None);
    let a_site = a.store.site_id();
    let mut events = pb.events();
    let first = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            match event {
                crsync::PeerEvent::Sync { peer } if peer == a_site => return Ok(()),
                crsync::PeerEvent::SiteIdConflict { message, .. } => return Err(message),
                _ => {}
            }
        }
        Err("no more events".into())
    })
    .await
    .expect("B takes a request for A within the wait");
    assert_eq!(first, Ok(()), "B answers its record of A's request");
    // A is back and writes: B gets it straight from A.
    let pa = peer_with(&a, &[&b_on_a], once);
    write_rows(&a, [5]).await;
    converge(&[&a.store, &b.store], &rows(1..=5)).await;
    pa.shutdown().await;
    pb.shutdown().await;
}
