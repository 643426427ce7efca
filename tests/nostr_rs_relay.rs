//! The test relay ([`support::NostrRsRelay`], a real nostr-rs-relay process)
//! relays: an event published over a WebSocket is stored and read back, and
//! sent live to a subscriber; it survives a restart that keeps the database
//! and is gone after one that loses it; an event over the size limit and an
//! expired one (NIP-40) are refused. Plain `tokio-tungstenite` and the `nostr`
//! crate's event and message types, no relay client library.

#![allow(clippy::unwrap_used)]

#[path = "support/nostr_relay.rs"]
mod support;

use nostr::{
    ClientMessage, Event, EventBuilder, Filter, Keys, Kind, RelayMessage, SubscriptionId, Tag,
    Timestamp,
};
use support::client::{Published, RelayClient as Conn};
use support::{NostrRsRelay, RelayConfig};

fn note(keys: &Keys, content: &str) -> Event {
    EventBuilder::text_note(content)
        .sign_with_keys(keys)
        .unwrap()
}

#[tokio::test]
async fn an_event_is_stored_read_back_and_sent_live() {
    let relay = NostrRsRelay::start();
    let keys = Keys::generate();
    let mut publisher = Conn::open(&relay.url()).await;
    let mut subscriber = Conn::open(&relay.url()).await;

    // Stored, then read back whole and signed.
    let first = note(&keys, "stored");
    match publisher.publish(&first).await {
        Published::Ok(true, _) => {}
        other => panic!("event refused: {other:?}"),
    }
    let back = subscriber
        .fetch(Filter::new().author(keys.public_key()))
        .await;
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].id, first.id);
    assert_eq!(back[0].content, "stored");
    back[0].verify().expect("signature holds");

    // Live: a subscription open before the event gets it after its EOSE.
    let live = SubscriptionId::generate();
    subscriber
        .send(ClientMessage::req(
            live.clone(),
            vec![
                Filter::new()
                    .author(keys.public_key())
                    .since(Timestamp::now()),
            ],
        ))
        .await;
    loop {
        if let Some(RelayMessage::EndOfStoredEvents(sid)) = subscriber.next().await {
            if *sid == live {
                break;
            }
        }
    }
    let second = note(&keys, "live");
    assert!(matches!(
        publisher.publish(&second).await,
        Published::Ok(true, _)
    ));
    let got = loop {
        match subscriber.next().await.expect("relay open") {
            RelayMessage::Event {
                subscription_id,
                event,
            } if *subscription_id == live => break event.into_owned(),
            _ => {}
        }
    };
    assert_eq!(got.id, second.id);
    assert_eq!(got.content, "live");
}

#[tokio::test]
async fn a_restart_keeps_events_unless_the_database_is_lost() {
    let mut relay = NostrRsRelay::start();
    let keys = Keys::generate();
    let event = note(&keys, "kept?");
    let mut conn = Conn::open(&relay.url()).await;
    assert!(matches!(conn.publish(&event).await, Published::Ok(true, _)));
    drop(conn);
    let mine = || Filter::new().author(keys.public_key());

    relay.restart(true);
    let mut conn = Conn::open(&relay.url()).await;
    let back = conn.fetch(mine()).await;
    assert_eq!(
        back.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![event.id]
    );
    drop(conn);

    relay.restart(false);
    let mut conn = Conn::open(&relay.url()).await;
    assert!(
        conn.fetch(mine()).await.is_empty(),
        "events survived a lost database"
    );
}

#[tokio::test]
async fn oversized_and_expired_events_are_refused() {
    let relay = NostrRsRelay::with_config(RelayConfig {
        max_event_bytes: 16 * 1024,
        ..RelayConfig::default()
    });
    let keys = Keys::generate();
    let mut conn = Conn::open(&relay.url()).await;

    let big = note(&keys, &"x".repeat(20 * 1024));
    let answer = conn.publish(&big).await;
    assert!(
        !matches!(answer, Published::Ok(true, _)),
        "an event over the limit was taken: {answer:?}"
    );
    // Under the limit still goes (on a new connection: the relay may close
    // the one that sent too much).
    let mut conn = Conn::open(&relay.url()).await;
    let fits = note(&keys, &"y".repeat(12 * 1024));
    assert!(matches!(conn.publish(&fits).await, Published::Ok(true, _)));

    // NIP-40: an event that expired already is not stored.
    let expired = EventBuilder::new(Kind::TextNote, "gone")
        .tag(Tag::expiration(Timestamp::from(
            Timestamp::now().as_secs() - 60,
        )))
        .sign_with_keys(&keys)
        .unwrap();
    let answer = conn.publish(&expired).await;
    let stored = conn.fetch(Filter::new().author(keys.public_key())).await;
    let ids: Vec<_> = stored.iter().map(|e| e.id).collect();
    assert!(ids.contains(&fits.id), "{ids:?}");
    assert!(
        !ids.contains(&expired.id) && !ids.contains(&big.id),
        "an expired or oversized event is stored ({answer:?}): {ids:?}"
    );
}

// ---- two crsync devices through the nostr-rs-relay process

#[path = "support/nostr_devices.rs"]
mod shared_devices;
#[path = "support/silent_proxy.rs"]
mod silent_proxy;

mod devices {
    use std::time::Duration;

    use crsync::{Peer, Store};
    use nostr::{Filter, Kind, PublicKey};

    use super::Conn;

    pub(super) use super::shared_devices::{Device, WAIT, device, pair};

    /// A Peer on `d` dialing the paired device `remote` through its relays.
    pub(super) fn peer(d: &Device, remote: &str) -> Peer {
        super::shared_devices::peer(d, &[remote], None)
    }

    pub(super) async fn write_rows(d: &Device, ids: impl IntoIterator<Item = i64>) {
        for id in ids {
            d.store
                .write(move |tx| {
                    tx.execute(
                        "INSERT OR REPLACE INTO items (id, body) VALUES (?1, ?2)",
                        (id, format!("row {id}")),
                    )
                })
                .await
                .expect("write");
        }
    }

    /// The rows in one transaction: one batch, one message.
    pub(super) async fn write_txn(d: &Device, ids: std::ops::RangeInclusive<i64>) {
        d.store
            .write(move |tx| {
                for id in ids {
                    tx.execute(
                        "INSERT OR REPLACE INTO items (id, body) VALUES (?1, ?2)",
                        (id, format!("row {id}")),
                    )?;
                }
                Ok(())
            })
            .await
            .expect("write");
    }

    pub(super) fn rows(ids: impl IntoIterator<Item = i64>) -> Vec<(i64, String)> {
        ids.into_iter().map(|i| (i, format!("row {i}"))).collect()
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
    pub(super) async fn converge(stores: &[&Store], expected: &[(i64, String)]) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut all = true;
            for s in stores {
                all &= dump(s).await == expected;
            }
            if all {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let mut seen = Vec::new();
                for s in stores {
                    seen.push(dump(s).await);
                }
                panic!("no convergence within {WAIT:?}: {seen:?}, expected {expected:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Gift wraps (NIP-59, kind 1059) the relay stores for the pairing key `to`.
    pub(super) async fn wraps_for(url: &str, to: &str) -> u64 {
        let key = PublicKey::from_hex(to).expect("pairing key");
        let mut conn = Conn::open(url).await;
        conn.count(Filter::new().kind(Kind::GiftWrap).pubkey(key))
            .await
            .0
    }

    /// How long the gift wraps stored for a device must stay the same to
    /// count as all published (a publication takes milliseconds).
    const QUIET: Duration = Duration::from_secs(1);

    /// Waits until the relay stores more than `before` gift wraps for `to`,
    /// and no more came for [`QUIET`]: what was being published is there
    /// (the last of it may come after an acknowledgement that was still on
    /// its way when `before` was counted).
    pub(super) async fn more_wraps_for(url: &str, to: &str, before: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut last = (before, tokio::time::Instant::now());
        loop {
            let now = wraps_for(url, to).await;
            let at = tokio::time::Instant::now();
            if now != last.0 {
                last = (now, at);
            } else if now > before && at.duration_since(last.1) >= QUIET {
                return;
            }
            assert!(at < deadline, "nothing published for {to} within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Two devices pair and sync through a real nostr-rs-relay process; then A
/// writes while B is away and goes away before B is back (the relay
/// restarted meanwhile, its database kept): B converges through the events
/// it stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_sync_through_nostr_rs_relay_one_away() {
    use devices::*;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = NostrRsRelay::start();
    let url = relay.url();
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (b_on_a, a_on_b) = pair(&a, &b, std::slice::from_ref(&url)).await;

    write_rows(&a, 1..=3).await;
    write_rows(&b, 10..=11).await;
    let (pa, pb) = (peer(&a, &b_on_a), peer(&b, &a_on_b));
    let mut expected = rows((1..=3).chain(10..=11));
    converge(&[&a.store, &b.store], &expected).await;

    // B is away while A writes; A goes away once the relay holds it for B.
    pb.shutdown().await;
    let before = wraps_for(&url, &b_on_a).await;
    write_txn(&a, 20..=24).await;
    more_wraps_for(&url, &b_on_a, before).await;
    pa.shutdown().await;
    relay.restart(true);
    assert_eq!(relay.url(), url, "the relay came back on its port");
    let pb = peer(&b, &a_on_b);
    expected.extend(rows(20..=24));
    converge(&[&b.store], &expected).await;

    pb.shutdown().await;
}

/// After the exchange above, B writes while A is away, and A comes back
/// (B still running): A gets B's rows. Each session here lasts less than
/// the link's save interval: what it processed must still be recorded when
/// it ends, or the next session takes the other's old requests as new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_back_gets_what_the_other_wrote_meanwhile() {
    use devices::*;
    let dir = tempfile::tempdir().unwrap();
    let relay = NostrRsRelay::start();
    let url = relay.url();
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (b_on_a, a_on_b) = pair(&a, &b, std::slice::from_ref(&url)).await;
    write_rows(&a, 1..=3).await;
    write_rows(&b, 10..=11).await;
    let (pa, pb) = (peer(&a, &b_on_a), peer(&b, &a_on_b));
    let mut expected = rows((1..=3).chain(10..=11));
    converge(&[&a.store, &b.store], &expected).await;
    pb.shutdown().await;
    let before = wraps_for(&url, &b_on_a).await;
    write_txn(&a, 20..=24).await;
    more_wraps_for(&url, &b_on_a, before).await;
    pa.shutdown().await;
    let pb = peer(&b, &a_on_b);
    expected.extend(rows(20..=24));
    converge(&[&b.store], &expected).await;

    let before = wraps_for(&url, &a_on_b).await;
    write_txn(&b, 30..=31).await;
    more_wraps_for(&url, &a_on_b, before).await;
    let pa = peer(&a, &b_on_a);
    expected.extend(rows(30..=31));
    converge(&[&a.store, &b.store], &expected).await;
    pa.shutdown().await;
    pb.shutdown().await;
}

/// The relay is killed and restarted empty while A runs, before B starts:
/// A's stream (its `sync`) is gone, and A's link never heard of B; B's
/// `sync` on the new relay gets a fresh stream from A. The in-process test
/// of `tests/nostr.rs` on a real relay process, whose sockets end with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarted_empty_gets_a_fresh_stream_from_the_device_that_stayed() {
    use devices::*;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = NostrRsRelay::start();
    let url = relay.url();
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (b_on_a, a_on_b) = pair(&a, &b, std::slice::from_ref(&url)).await;
    let pa = peer(&a, &b_on_a);
    write_rows(&a, 1..=4).await;
    more_wraps_for(&url, &b_on_a, 0).await;
    relay.restart(false);
    assert_eq!(relay.url(), url, "the relay came back on its port");
    let pb = peer(&b, &a_on_b);
    converge(&[&a.store, &b.store], &rows(1..=4)).await;
    pa.shutdown().await;
    pb.shutdown().await;
}

/// B reaches the relay process through a proxy, pinging it every 250 ms:
/// while idle its connection is kept (nostr-rs-relay answers WebSocket
/// pings), and when the connection goes silent without closing (a
/// half-open TCP connection) B replaces it within the silence limit and
/// gets what A wrote meanwhile, long before the 15 s a publication would
/// wait for its `OK`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_to_the_relay_is_replaced_and_a_live_one_kept() {
    use crsync::transports::nostr::RelaySettings;
    use devices::*;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let relay = NostrRsRelay::start();
    let url = relay.url();
    let proxy = silent_proxy::SilentProxy::start(relay.port()).await;
    let (a, b) = (device(dir.path(), "a").await, device(dir.path(), "b").await);
    let (b_on_a, a_on_b) = pair(&a, &b, std::slice::from_ref(&url)).await;
    write_rows(&a, [1]).await;
    let pa = peer(&a, &b_on_a);
    let watched = RelaySettings::default()
        .with_ping_interval(Duration::from_millis(250))
        .with_dead_after(4);
    let through_proxy = vec![proxy.url()];
    let pb = shared_devices::peer_with(&b, &[&a_on_b], |d| {
        d.with_relays(through_proxy.clone())
            .with_relay_settings(watched)
    });
    converge(&[&a.store, &b.store], &rows([1])).await;
    let before = proxy.accepted();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(proxy.accepted(), before, "a live connection is kept");
    proxy.silence();
    write_rows(&a, [2]).await;
    let limit = Duration::from_secs(8);
    let caught_up = tokio::time::timeout(limit, converge(&[&b.store], &rows(1..=2))).await;
    assert!(caught_up.is_ok(), "B did not get A's row within {limit:?}");
    assert!(proxy.accepted() > before, "B dialed the relay again");
    pa.shutdown().await;
    pb.shutdown().await;
}
