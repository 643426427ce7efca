//! The in-memory pair: seeded faults, back-pressure, cuts and the dialer.
#![allow(clippy::unwrap_used)]

use std::future::poll_fn;
use std::time::Duration;

use crsync_peer::wire::{MessageKind, TransportMessage};
use crsync_peer::{Connection, Dialer, SiteId, TransportError};
use crsync_transports::memory::{self, FaultConfig};
use futures_util::{SinkExt, StreamExt};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn site() -> SiteId {
    SiteId::from_bytes([5; 16])
}

/// A ping numbered `i` (the number rides in `peerId`).
fn numbered(i: u32) -> TransportMessage {
    let mut message = TransportMessage::ping(site());
    message.peer_id = i.to_string();
    message
}

fn number(message: &TransportMessage) -> u32 {
    message.peer_id.parse().unwrap()
}

/// Sends `0..n` from `a` to `b` (then closes `a`'s sink) and returns what `b`
/// received, in order.
async fn transfer(config: FaultConfig, n: u32) -> Vec<u32> {
    let (mut a, mut b) = memory::pair(config);
    let sender = tokio::spawn(async move {
        for i in 0..n {
            a.sink.send(numbered(i)).await.unwrap();
        }
        a.sink.close().await.unwrap();
        a
    });
    let mut received = Vec::new();
    while let Some(item) = timeout(WAIT, b.stream.next()).await.unwrap() {
        received.push(number(&item.unwrap().message));
    }
    timeout(WAIT, sender).await.unwrap().unwrap();
    received
}

fn all_faults(seed: u64) -> FaultConfig {
    FaultConfig::seeded(seed)
        .with_drop(0.1)
        .with_duplicate(0.1)
        .with_reorder(0.1)
        .with_json(true)
}

#[tokio::test]
async fn same_seed_gives_the_same_delivered_sequence() {
    let first = transfer(all_faults(7), 2000).await;
    let again = transfer(all_faults(7), 2000).await;
    let other = transfer(all_faults(8), 2000).await;
    assert!(first == again, "same seed, different sequences");
    assert!(first != other, "different seeds, same sequence");
    // With delays the timing changes, the sequence does not.
    let delayed = transfer(
        all_faults(7).with_delay(Duration::ZERO, Duration::from_micros(200)),
        2000,
    )
    .await;
    assert!(first == delayed, "a delay changed the sequence");
}

#[tokio::test]
async fn no_faults_delivers_everything_in_order() {
    let received = transfer(FaultConfig::seeded(3).with_json(true), 1000).await;
    assert_eq!(received, (0..1000).collect::<Vec<_>>());
}

#[tokio::test]
async fn drops_happen_at_about_the_configured_rate() {
    let n = 5000;
    let received = transfer(FaultConfig::seeded(11).with_drop(0.2), n).await;
    let rate = 1.0 - received.len() as f64 / f64::from(n);
    assert!((0.17..0.23).contains(&rate), "drop rate {rate}");
    assert!(received.windows(2).all(|w| w[0] < w[1]), "drops only");
}

#[tokio::test]
async fn duplicates_happen_at_about_the_configured_rate() {
    let n = 5000;
    let received = transfer(FaultConfig::seeded(12).with_duplicate(0.2), n).await;
    let rate = received.len() as f64 / f64::from(n) - 1.0;
    assert!((0.17..0.23).contains(&rate), "duplicate rate {rate}");
    let mut unique = received.clone();
    unique.dedup();
    assert_eq!(unique, (0..n).collect::<Vec<_>>());
}

#[tokio::test]
async fn reorders_swap_neighbours_at_about_the_configured_rate() {
    let n = 5000;
    let received = transfer(FaultConfig::seeded(13).with_reorder(0.2), n).await;
    let mut sorted = received.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "nothing lost or added");
    let swaps = received.windows(2).filter(|w| w[0] > w[1]).count();
    // A message is held with probability 0.2 when none is held already, so
    // about n * 0.2 / 1.2 swaps.
    let rate = swaps as f64 / f64::from(n);
    assert!((0.14..0.20).contains(&rate), "swap rate {rate}");
    for (position, &i) in received.iter().enumerate() {
        assert!(
            position.abs_diff(i as usize) <= 1,
            "{i} moved to {position}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn delays_hold_messages_back_without_reordering() {
    let config =
        FaultConfig::seeded(1).with_delay(Duration::from_millis(10), Duration::from_millis(20));
    let (mut a, mut b) = memory::pair(config);
    let start = tokio::time::Instant::now();
    for i in 0..5 {
        a.sink.send(numbered(i)).await.unwrap();
    }
    for i in 0..5 {
        let got = timeout(WAIT, b.stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(number(&got.message), i);
        assert!(start.elapsed() >= Duration::from_millis(10));
    }
    assert!(start.elapsed() <= Duration::from_millis(20));
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_makes_the_sender_wait() {
    let (mut a, mut b) = memory::pair(FaultConfig::default().with_capacity(4));
    for i in 0..4 {
        timeout(WAIT, a.sink.send(numbered(i)))
            .await
            .unwrap()
            .unwrap();
    }
    {
        let mut blocked = a.sink.send(numbered(4));
        assert!(
            timeout(Duration::from_secs(5), &mut blocked).await.is_err(),
            "the fifth send must wait for the reader"
        );
        let first = b.stream.next().await.unwrap().unwrap();
        assert_eq!(number(&first.message), 0);
        timeout(WAIT, blocked).await.unwrap().unwrap();
    }
    // Now full again: the sink accepts one more item, then is not ready.
    a.sink.feed(numbered(5)).await.unwrap();
    let ready = timeout(
        Duration::from_secs(5),
        poll_fn(|cx| a.sink.as_mut().poll_ready(cx)),
    )
    .await;
    assert!(
        ready.is_err(),
        "poll_ready must pend while the queue is full"
    );
    for i in 1..5 {
        let got = timeout(WAIT, b.stream.next()).await.unwrap().unwrap();
        assert_eq!(number(&got.unwrap().message), i);
    }
    // The item accepted by `feed` moves on when the sink is flushed.
    timeout(WAIT, a.sink.flush()).await.unwrap().unwrap();
    let got = timeout(WAIT, b.stream.next()).await.unwrap().unwrap();
    assert_eq!(number(&got.unwrap().message), 5);
}

async fn expect_cut_end(conn: &mut Connection, delivered: &[u32]) {
    for &i in delivered {
        let got = timeout(WAIT, conn.stream.next()).await.unwrap().unwrap();
        assert_eq!(number(&got.unwrap().message), i);
    }
    let end = timeout(WAIT, conn.stream.next()).await.unwrap();
    assert!(matches!(end, Some(Err(TransportError::Closed))), "{end:?}");
    assert!(timeout(WAIT, conn.stream.next()).await.unwrap().is_none());
}

#[tokio::test]
async fn a_cut_closes_both_ends() {
    let (mut a, mut b, cut) = memory::pair_with_cut(FaultConfig::default());
    for i in 0..3 {
        a.sink.send(numbered(i)).await.unwrap();
    }
    assert!(!cut.is_cut());
    cut.cut();
    assert!(cut.is_cut());
    assert!(matches!(
        a.sink.send(numbered(3)).await,
        Err(TransportError::Closed)
    ));
    assert!(b.sink.send(numbered(0)).await.is_err());
    // What was queued before the cut still arrives, then the end.
    expect_cut_end(&mut b, &[0, 1, 2]).await;
    expect_cut_end(&mut a, &[]).await;
}

#[tokio::test]
async fn a_cut_wakes_a_blocked_sender_and_an_idle_reader() {
    let (mut a, mut b, cut) = memory::pair_with_cut(FaultConfig::default().with_capacity(1));
    a.sink.send(numbered(0)).await.unwrap();
    let blocked = tokio::spawn(async move {
        let result = a.sink.send(numbered(1)).await;
        (a, result)
    });
    let idle = tokio::spawn(async move {
        let (mut a, result) = blocked.await.unwrap();
        assert!(matches!(result, Err(TransportError::Closed)));
        expect_cut_end(&mut a, &[]).await;
    });
    tokio::task::yield_now().await;
    cut.cut();
    timeout(WAIT, idle).await.unwrap().unwrap();
    expect_cut_end(&mut b, &[0]).await;
}

#[tokio::test]
async fn cut_after_n_messages() {
    let (mut a, mut b) = memory::pair(FaultConfig::default().with_cut_after(5));
    for i in 0..5 {
        a.sink.send(numbered(i)).await.unwrap();
    }
    assert!(matches!(
        a.sink.send(numbered(5)).await,
        Err(TransportError::Closed)
    ));
    expect_cut_end(&mut b, &[0, 1, 2, 3, 4]).await;
}

#[tokio::test]
async fn closing_or_dropping_one_end_ends_the_other_cleanly() {
    let (mut a, mut b) = memory::pair(FaultConfig::default());
    a.sink.send(numbered(1)).await.unwrap();
    a.sink.close().await.unwrap();
    assert_eq!(number(&b.stream.next().await.unwrap().unwrap().message), 1);
    assert!(timeout(WAIT, b.stream.next()).await.unwrap().is_none());
    // b can still talk to a until a goes away.
    b.sink.send(numbered(2)).await.unwrap();
    assert_eq!(number(&a.stream.next().await.unwrap().unwrap().message), 2);
    drop(a);
    assert!(matches!(
        b.sink.send(numbered(3)).await,
        Err(TransportError::Closed)
    ));
}

#[tokio::test]
async fn a_held_back_message_is_flushed_on_close() {
    // Reorder everything: the single message is held, then released by close.
    let (mut a, mut b) = memory::pair(FaultConfig::seeded(1).with_reorder(1.0));
    a.sink.send(numbered(0)).await.unwrap();
    a.sink.send(numbered(1)).await.unwrap();
    a.sink.send(numbered(2)).await.unwrap();
    a.sink.close().await.unwrap();
    let mut got = Vec::new();
    while let Some(item) = timeout(WAIT, b.stream.next()).await.unwrap() {
        got.push(number(&item.unwrap().message));
    }
    assert_eq!(got, vec![1, 0, 2]);
}

#[tokio::test]
async fn dialer_goes_offline_and_back() {
    let (mut dialer, mut listener) = memory::dialer("hub", FaultConfig::seeded(4));
    let control = dialer.control();
    assert_eq!(dialer.label(), "memory:hub");

    control.set_online(false);
    let refused = dialer.dial(site()).await;
    assert!(
        matches!(refused, Err(TransportError::Connect { ref target, .. }) if target == "memory:hub")
    );
    assert_eq!(control.dial_count(), 0);

    control.set_online(true);
    let mut ours = dialer.dial(site()).await.unwrap();
    let mut theirs = timeout(WAIT, listener.accept()).await.unwrap().unwrap();
    assert_eq!(control.dial_count(), 1);
    ours.sink
        .send(TransportMessage::connect(site()))
        .await
        .unwrap();
    let got = theirs.stream.next().await.unwrap().unwrap();
    assert_eq!(got.message.kind, MessageKind::Connect);
    theirs.sink.send(numbered(9)).await.unwrap();
    assert_eq!(
        number(&ours.stream.next().await.unwrap().unwrap().message),
        9
    );

    // Cutting every connection ends both sides.
    control.cut_all();
    expect_cut_end(&mut ours, &[]).await;
    expect_cut_end(&mut theirs, &[]).await;

    // A second dial works and is a fresh connection.
    let mut again = dialer.dial(site()).await.unwrap();
    let mut accepted = listener.next().await.unwrap();
    assert_eq!(again.label, "memory:hub#2");
    again.sink.send(numbered(1)).await.unwrap();
    assert_eq!(
        number(&accepted.stream.next().await.unwrap().unwrap().message),
        1
    );

    drop(listener);
    assert!(matches!(
        dialer.dial(site()).await,
        Err(TransportError::Connect { .. })
    ));
}
