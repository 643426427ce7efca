//! The test relay ([`support::NostrRsRelay`], a real nostr-rs-relay process)
//! relays: an event published over a WebSocket is stored and read back, and
//! sent live to a subscriber; it survives a restart that keeps the database
//! and is gone after one that loses it; an event over the size limit and an
//! expired one (NIP-40) are refused. Plain `tokio-tungstenite` and the `nostr`
//! crate's event and message types, no relay client library.

#![allow(clippy::unwrap_used)]

#[path = "support/nostr_relay.rs"]
mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nostr::{
    ClientMessage, Event, EventBuilder, Filter, JsonUtil, Keys, Kind, RelayMessage, SubscriptionId,
    Tag, Timestamp,
};
use support::{NostrRsRelay, RelayConfig};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

/// Limit on waiting for one message from the relay.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// One WebSocket connection to a relay.
struct Conn {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the relay said about a published event (the texts are shown in
/// failure messages).
#[derive(Debug)]
#[allow(dead_code)]
enum Published {
    Ok(bool, String),
    /// A NOTICE instead, or the connection closed.
    Refused(String),
}

impl Conn {
    async fn open(url: &str) -> Conn {
        let (ws, _) = tokio::time::timeout(REPLY_TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("connect");
        Conn { ws }
    }

    async fn send(&mut self, msg: ClientMessage<'_>) {
        self.ws
            .send(Message::text(msg.as_json()))
            .await
            .expect("send");
    }

    /// The next relay message; `None` when the connection closed.
    async fn next(&mut self) -> Option<RelayMessage<'static>> {
        loop {
            let frame = tokio::time::timeout(REPLY_TIMEOUT, self.ws.next())
                .await
                .expect("an answer from the relay in time");
            match frame {
                Some(Ok(Message::Text(text))) => {
                    return Some(RelayMessage::from_json(text.as_str()).expect("relay message"));
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    async fn publish(&mut self, event: &Event) -> Published {
        self.send(ClientMessage::event(event.clone())).await;
        loop {
            match self.next().await {
                Some(RelayMessage::Ok {
                    event_id,
                    status,
                    message,
                }) if event_id == event.id => return Published::Ok(status, message.into_owned()),
                Some(RelayMessage::Notice(n)) => return Published::Refused(n.into_owned()),
                None => return Published::Refused("connection closed".into()),
                Some(_) => {}
            }
        }
    }

    /// Stored events matching `filter`, up to the relay's EOSE.
    async fn fetch(&mut self, filter: Filter) -> Vec<Event> {
        let id = SubscriptionId::generate();
        self.send(ClientMessage::req(id.clone(), vec![filter]))
            .await;
        let mut events = Vec::new();
        loop {
            match self.next().await.expect("relay open") {
                RelayMessage::Event {
                    subscription_id,
                    event,
                } if *subscription_id == id => events.push(event.into_owned()),
                RelayMessage::EndOfStoredEvents(sid) if *sid == id => break,
                RelayMessage::Closed { message, .. } => panic!("subscription closed: {message}"),
                _ => {}
            }
        }
        self.send(ClientMessage::close(id)).await;
        events
    }
}

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
