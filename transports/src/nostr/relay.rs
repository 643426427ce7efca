//! A small Nostr relay client (NIP-01 over tokio-tungstenite): one socket per
//! relay, one subscription per socket, publishing with `OK` handling.
//!
//! - Each relay has its own task: it connects, subscribes to the gift wraps
//!   for one key (`since` the pool's current value), forwards events whose
//!   signature checks out, and reconnects with backoff when the socket ends.
//! - [`RelayPool::publish`] hands an event to every relay that is up and
//!   succeeds at the first `OK true` (or `duplicate:`); a relay that answers
//!   `rate-limited:` (or sends a `NOTICE` about rate limits) gets the event
//!   again after a growing pause, without holding up the others.
//! - Each socket is watched ([`RelaySettings`]): a WebSocket ping goes out
//!   every `ping_interval`, and a socket from which no frame at all (pong,
//!   event, anything) came for `dead_after` intervals is taken for dead (a
//!   half-open TCP connection after a relay crash or a NAT drop never
//!   closes) and replaced: reconnect with backoff, subscribe again `since`
//!   the pool's value, so stored events missed meanwhile come again. Sends
//!   and the handshake are bounded by the same limit.
//! - Duplicates from several relays are dropped by event id (bounded
//!   memory). An event counts as seen (and is dropped when it comes again,
//!   also on a later dial of the same dialer) only once the link settled it
//!   ([`RelayPool::settle`]: handed to the Peer, or discarded on purpose);
//!   one a pool forwarded but never settled comes again on the next dial.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crsync_peer::TransportError;
use futures_util::{SinkExt, StreamExt};
use nostr::{
    Alphabet, ClientMessage, Event, EventId, Filter, JsonUtil, Kind, PublicKey, RelayMessage,
    SingleLetterTag, SubscriptionId, Timestamp,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// Events received from all relays, waiting for the link, at most.
const INCOMING_CAP: usize = 256;
/// Publications queued per relay at most; a relay further behind misses events.
const OUTGOING_CAP: usize = 64;
/// How long one relay may take to answer `OK`.
const OK_TIMEOUT: Duration = Duration::from_secs(15);
/// Retries of one event a relay refused as rate-limited.
const RATE_LIMIT_RETRIES: u32 = 8;
/// First pause after a rate limit; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// Events remembered for dropping duplicates.
const SEEN_CAP: usize = 16_384;
/// Events forwarded by one pool and not settled yet, remembered at most
/// (past it the oldest is forgotten: a copy of it may then come twice).
const PENDING_CAP: usize = 4 * SEEN_CAP;
/// Shortest ping interval taken.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(10);
/// Stored events asked for per subscription.
const STORED_LIMIT: usize = 5_000;

/// Something from the relays.
#[derive(Debug)]
pub(crate) enum FromRelay {
    /// A new (not yet seen) event, signature checked.
    Event(Box<Event>),
    /// Relay `index` sent all its stored events (`EOSE`).
    Stored(usize),
}

/// How the sockets to the relays are watched for a connection that went
/// dead without closing (a half-open TCP connection after a relay machine
/// crashed, a NAT mapping dropped): a WebSocket ping every
/// [`ping_interval`](Self::ping_interval), and a socket from which nothing
/// at all came for [`dead_after`](Self::dead_after) intervals is closed and
/// dialed again (with backoff), subscribing again for what was stored
/// meanwhile. The pings are also the traffic that keeps idle connections
/// open through proxies and NATs.
///
/// ```
/// use crsync_transports::nostr::RelaySettings;
/// use std::time::Duration;
/// let quick = RelaySettings::default()
///     .with_ping_interval(Duration::from_secs(10))
///     .with_dead_after(3);
/// assert_eq!(quick.silence_limit(), Duration::from_secs(30));
/// assert_eq!(RelaySettings::default().silence_limit(), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelaySettings {
    /// How often a WebSocket ping goes to each relay (default 30 s).
    pub ping_interval: Duration,
    /// After how many ping intervals without any frame from a relay its
    /// socket counts as dead (default 2; at least 1).
    pub dead_after: u32,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            ping_interval: Duration::from_secs(30),
            dead_after: 2,
        }
    }
}

impl RelaySettings {
    /// Pings each relay at this interval (at least 10 ms).
    pub fn with_ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// Takes a socket for dead after this many intervals without a frame (at least 1).
    pub fn with_dead_after(mut self, intervals: u32) -> Self {
        self.dead_after = intervals;
        self
    }

    fn interval(&self) -> Duration {
        self.ping_interval.max(MIN_PING_INTERVAL)
    }

    /// How long a relay may send nothing before its socket is replaced;
    /// also the limit on connecting and on sending one message.
    pub fn silence_limit(&self) -> Duration {
        self.interval().saturating_mul(self.dead_after.max(1))
    }
}

/// Event ids (bounded, oldest forgotten first).
#[derive(Debug)]
pub(crate) struct Seen {
    set: HashSet<EventId>,
    order: VecDeque<EventId>,
    cap: usize,
}

impl Default for Seen {
    fn default() -> Self {
        Seen::with_cap(SEEN_CAP)
    }
}

impl Seen {
    fn with_cap(cap: usize) -> Self {
        Seen {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Whether `id` is new (and remembers it).
    pub(crate) fn insert(&mut self, id: EventId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        // `order` may hold ids already removed; it bounds the set either way.
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    fn contains(&self, id: &EventId) -> bool {
        self.set.contains(id)
    }

    fn remove(&mut self, id: &EventId) {
        self.set.remove(id);
    }
}

/// Which events a pool forwards: none that its dialer settled before (on
/// any connection: handed to the Peer, or discarded on purpose), and each
/// at most once while it is on its way in this pool. What a pool forwarded
/// and never settled (its link ended first) is forwarded again by the next.
#[derive(Debug)]
pub(crate) struct Dedupe {
    /// Settled, shared by every pool of one dialer.
    seen: Arc<Mutex<Seen>>,
    /// Forwarded by this pool, not settled yet.
    pending: Mutex<Seen>,
}

impl Dedupe {
    pub(crate) fn new(seen: Arc<Mutex<Seen>>) -> Self {
        Dedupe {
            seen,
            pending: Mutex::new(Seen::with_cap(PENDING_CAP)),
        }
    }

    /// Whether `id` goes on (and then it is on its way).
    pub(crate) fn admit(&self, id: EventId) -> bool {
        // Both locks, always in this order, so that a settle cannot slip in
        // between the two checks.
        let Ok(seen) = self.seen.lock() else {
            return true;
        };
        if seen.contains(&id) {
            return false;
        }
        self.pending
            .lock()
            .map(|mut p| p.insert(id))
            .unwrap_or(true)
    }

    /// These events were handed on or discarded: never again.
    pub(crate) fn settle(&self, ids: &[EventId]) {
        if ids.is_empty() {
            return;
        }
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let mut pending = self.pending.lock().ok();
        for id in ids {
            seen.insert(*id);
            if let Some(p) = pending.as_mut() {
                p.remove(id);
            }
        }
    }
}

struct Publish {
    event: Event,
    reply: oneshot::Sender<Result<(), String>>,
}

struct Relay {
    url: String,
    up: watch::Receiver<bool>,
    publish: mpsc::Sender<Publish>,
    task: JoinHandle<()>,
}

/// Sockets to a set of relays, subscribed to the gift wraps for one key.
/// Dropping it closes every socket.
pub(crate) struct RelayPool {
    relays: Vec<Relay>,
    /// `since` of every (re)subscription, Unix seconds.
    since: Arc<AtomicU64>,
    dedupe: Arc<Dedupe>,
}

impl Drop for RelayPool {
    fn drop(&mut self) {
        for r in &self.relays {
            r.task.abort();
        }
    }
}

/// Settings shared by the relay tasks of a pool.
#[derive(Clone)]
struct Shared {
    to: PublicKey,
    since: Arc<AtomicU64>,
    dedupe: Arc<Dedupe>,
    incoming: mpsc::Sender<FromRelay>,
    reconnect: crsync_peer::ReconnectPolicy,
    settings: RelaySettings,
}

impl RelayPool {
    /// Connects to `urls` and subscribes to gift wraps for `to` created
    /// since `since`, forwarding no event `seen` holds (see [`Dedupe`]).
    /// Waits up to `timeout` for at least one relay to be up.
    pub(crate) async fn connect(
        urls: &[String],
        to: PublicKey,
        since: u64,
        seen: Arc<Mutex<Seen>>,
        settings: RelaySettings,
        timeout: Duration,
    ) -> Result<(Self, mpsc::Receiver<FromRelay>), TransportError> {
        let (tx, incoming) = mpsc::channel(INCOMING_CAP);
        let since = Arc::new(AtomicU64::new(since));
        let dedupe = Arc::new(Dedupe::new(seen));
        let shared = Shared {
            to,
            since: since.clone(),
            dedupe: dedupe.clone(),
            settings,
            incoming: tx,
            reconnect: crsync_peer::ReconnectPolicy {
                initial: Duration::from_millis(250),
                max: Duration::from_secs(30),
                multiplier: 2.0,
            },
        };
        let mut relays = Vec::with_capacity(urls.len());
        for (index, url) in urls.iter().enumerate() {
            let (up_tx, up) = watch::channel(false);
            let (publish, rx) = mpsc::channel(OUTGOING_CAP);
            let task = tokio::spawn(run_relay(index, url.clone(), shared.clone(), up_tx, rx));
            relays.push(Relay {
                url: url.clone(),
                up,
                publish,
                task,
            });
        }
        let pool = RelayPool {
            relays,
            since,
            dedupe,
        };
        let mut ups: Vec<_> = pool.relays.iter().map(|r| r.up.clone()).collect();
        let any_up = async {
            let waits = ups
                .iter_mut()
                .map(|u| Box::pin(async move { u.wait_for(|v| *v).await.is_ok() }));
            let _ = futures_util::future::select_all(waits).await;
        };
        if urls.is_empty() || tokio::time::timeout(timeout, any_up).await.is_err() {
            return Err(TransportError::Connect {
                target: urls.join(" "),
                source: "no relay reachable".into(),
            });
        }
        Ok((pool, incoming))
    }

    /// How many relays are connected now.
    pub(crate) fn up(&self) -> usize {
        self.relays.iter().filter(|r| *r.up.borrow()).count()
    }

    /// These events (forwarded by this pool) were handed on or discarded on
    /// purpose: no pool of the same dialer forwards them again.
    pub(crate) fn settle(&self, ids: &[EventId]) {
        self.dedupe.settle(ids);
    }

    /// Later (re)subscriptions ask only for events since this time.
    pub(crate) fn set_since(&self, since: u64) {
        self.since.fetch_max(since, Ordering::Relaxed);
    }

    /// Publishes `event` to every relay that is up; done at the first that
    /// accepts it. Fails when none accepted within `timeout`.
    pub(crate) async fn publish(
        &self,
        event: &Event,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let mut replies = Vec::new();
        for r in &self.relays {
            if !*r.up.borrow() {
                continue;
            }
            let (reply, rx) = oneshot::channel();
            match r.publish.try_send(Publish {
                event: event.clone(),
                reply,
            }) {
                Ok(()) => replies.push(rx),
                Err(_) => tracing::debug!(relay = %r.url, "relay is behind: it misses an event"),
            }
        }
        let mut errors = Vec::new();
        let wait = async {
            let mut pending: Vec<_> = replies.into_iter().map(Box::pin).collect();
            while !pending.is_empty() {
                let (result, _, rest) = futures_util::future::select_all(pending).await;
                match result {
                    Ok(Ok(())) => return true,
                    Ok(Err(e)) => errors.push(e),
                    Err(_) => errors.push("relay connection lost".into()),
                }
                pending = rest;
            }
            false
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(true) => Ok(()),
            Ok(false) if errors.is_empty() => {
                Err(TransportError::Io("no relay is connected".into()))
            }
            Ok(false) => Err(TransportError::Io(
                format!("no relay accepted the event: {}", errors.join("; ")).into(),
            )),
            Err(_) => Err(TransportError::Timeout(timeout)),
        }
    }
}

fn filter(to: PublicKey, since: u64) -> Filter {
    Filter::new()
        .kind(Kind::GiftWrap)
        .custom_tag(SingleLetterTag::lowercase(Alphabet::P), to.to_hex())
        .since(Timestamp::from(since))
        .limit(STORED_LIMIT)
}

/// One relay's loop: connect, subscribe, serve, reconnect with backoff.
async fn run_relay(
    index: usize,
    url: String,
    shared: Shared,
    up: watch::Sender<bool>,
    mut publish: mpsc::Receiver<Publish>,
) {
    let mut backoff = shared.reconnect.backoff();
    loop {
        // Nagle off: a small event must not wait for the relay's delayed ACK.
        // A handshake that hangs (a black-holed address) is given up like
        // a silent socket.
        let limit = shared.settings.silence_limit();
        let dial = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true);
        match tokio::time::timeout(limit, dial).await {
            Err(_) => tracing::debug!(relay = %url, ?limit, "no answer from the relay"),
            Ok(Ok((socket, _))) => {
                tracing::debug!(relay = %url, "relay connected");
                backoff.reset();
                up.send_replace(true);
                let why = serve(index, &url, socket, &shared, &mut publish).await;
                up.send_replace(false);
                tracing::debug!(relay = %url, reason = %why, "relay connection ended");
                if shared.incoming.is_closed() {
                    return;
                }
            }
            Ok(Err(e)) => tracing::debug!(relay = %url, error = %e, "cannot reach relay"),
        }
        // Refuse what is queued meanwhile: the others may take it.
        let pause = backoff.next_delay(rand::random::<f64>());
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                p = publish.recv() => match p {
                    Some(p) => { let _ = p.reply.send(Err(format!("{url}: not connected"))); }
                    None => return,
                },
            }
        }
    }
}

/// What one relay's `OK` said.
enum Ack {
    Accepted,
    RateLimited(String),
    Refused(String),
}

/// Sends one message, given up after `limit` (a socket whose buffers stay
/// full is as dead as a silent one).
async fn send_within<T>(tx: &mut T, message: Message, limit: Duration) -> Result<(), String>
where
    T: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    match tokio::time::timeout(limit, tx.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("a send took longer than {limit:?}")),
    }
}

async fn serve<S>(
    index: usize,
    url: &str,
    socket: S,
    shared: &Shared,
    publish: &mut mpsc::Receiver<Publish>,
) -> String
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error>
        + Unpin,
{
    let (mut tx, mut rx) = socket.split();
    let ping_every = shared.settings.interval();
    let silence = shared.settings.silence_limit();
    let sub = SubscriptionId::new("crsync");
    let since = shared.since.load(Ordering::Relaxed);
    let req = ClientMessage::req(sub.clone(), vec![filter(shared.to, since)]);
    if let Err(e) = send_within(&mut tx, Message::text(req.as_json()), silence).await {
        return format!("cannot subscribe: {e}");
    }
    // The event being published, waiting for its OK, and its retries.
    let mut in_flight: Option<(Publish, tokio::time::Instant, u32)> = None;
    let mut pause = FIRST_PAUSE;
    let mut paused_until: Option<tokio::time::Instant> = None;
    let mut resubscribe_at: Option<tokio::time::Instant> = None;
    // When the last frame of any kind was handled, and the next ping is due.
    let mut heard = tokio::time::Instant::now();
    let mut ping_at = heard + ping_every;
    loop {
        let ok_deadline = in_flight.as_ref().map(|(_, at, _)| *at + OK_TIMEOUT);
        let can_send = in_flight.is_none() && paused_until.is_none();
        let wake = [
            ok_deadline,
            paused_until,
            resubscribe_at,
            Some(ping_at),
            Some(heard + silence),
        ]
        .into_iter()
        .flatten()
        .min();
        let sleep = futures_util::future::OptionFuture::from(wake.map(tokio::time::sleep_until));
        tokio::select! {
            // Timers last: a frame that is waiting is read before the
            // socket can be taken for silent. A publication cannot hold
            // frames up: the next one waits for this one's OK.
            biased;
            p = publish.recv(), if can_send => {
                let Some(p) = p else { return "pool closed".into() };
                let msg = ClientMessage::event(p.event.clone()).as_json();
                if let Err(e) = send_within(&mut tx, Message::text(msg), silence).await {
                    let _ = p.reply.send(Err(format!("{url}: {e}")));
                    return e;
                }
                in_flight = Some((p, tokio::time::Instant::now(), 0));
            }
            frame = rx.next() => {
                let text = match frame {
                    None => return "closed by the relay".into(),
                    Some(Err(e)) => return e.to_string(),
                    Some(Ok(Message::Text(t))) => t.as_str().to_owned(),
                    Some(Ok(Message::Binary(b))) => String::from_utf8_lossy(&b).into_owned(),
                    Some(Ok(Message::Close(_))) => return "closed by the relay".into(),
                    Some(Ok(_)) => {
                        // A pong (or a ping, which tungstenite answers).
                        heard = tokio::time::Instant::now();
                        continue;
                    }
                };
                let handled: Result<(), String> = async {
                    let Ok(message) = RelayMessage::from_json(&text) else {
                        tracing::debug!(relay = %url, "undecodable relay message");
                        return Ok(());
                    };
                    match message {
                        RelayMessage::Event { subscription_id, event } if *subscription_id == sub => {
                            let event = event.into_owned();
                            if event.verify().is_err() {
                                tracing::debug!(relay = %url, "event with a bad id or signature dropped");
                                return Ok(());
                            }
                            if shared.dedupe.admit(event.id)
                                && shared.incoming.send(FromRelay::Event(Box::new(event))).await.is_err()
                            {
                                return Err("pool closed".into());
                            }
                        }
                        RelayMessage::EndOfStoredEvents(id)
                            if *id == sub
                                && shared.incoming.send(FromRelay::Stored(index)).await.is_err() =>
                        {
                            return Err("pool closed".into());
                        }
                        RelayMessage::Ok { event_id, status, message } => {
                            let ack = if status || message.starts_with("duplicate:") {
                                Ack::Accepted
                            } else if message.starts_with("rate-limited:") {
                                Ack::RateLimited(message.into_owned())
                            } else {
                                Ack::Refused(message.into_owned())
                            };
                            let ours = in_flight.as_ref().is_some_and(|(p, _, _)| p.event.id == event_id);
                            if !ours {
                                return Ok(());
                            }
                            let Some((p, at, tries)) = in_flight.take() else { return Ok(()) };
                            match ack {
                                Ack::Accepted => {
                                    pause = FIRST_PAUSE;
                                    let _ = p.reply.send(Ok(()));
                                }
                                Ack::RateLimited(m) if tries < RATE_LIMIT_RETRIES => {
                                    tracing::debug!(relay = %url, message = %m, ?pause, "rate-limited: pausing");
                                    paused_until = Some(tokio::time::Instant::now() + pause);
                                    pause = (pause * 2).min(MAX_PAUSE);
                                    in_flight = Some((p, at, tries + 1));
                                }
                                Ack::RateLimited(m) | Ack::Refused(m) => {
                                    let _ = p.reply.send(Err(format!("{url}: {m}")));
                                }
                            }
                        }
                        RelayMessage::Notice(m) => {
                            tracing::debug!(relay = %url, notice = %m, "relay notice");
                            if m.to_ascii_lowercase().contains("rate") && paused_until.is_none() {
                                paused_until = Some(tokio::time::Instant::now() + pause);
                                pause = (pause * 2).min(MAX_PAUSE);
                            }
                        }
                        RelayMessage::Closed { subscription_id, message } if *subscription_id == sub => {
                            tracing::debug!(relay = %url, reason = %message, "subscription closed by the relay; asking again later");
                            resubscribe_at = Some(tokio::time::Instant::now() + pause);
                            pause = (pause * 2).min(MAX_PAUSE);
                        }
                        _ => {}
                    }
                    Ok(())
                }
                .await;
                // After handling: a link that was slow to take an event is
                // not the relay's silence.
                heard = tokio::time::Instant::now();
                if let Err(why) = handled {
                    return why;
                }
            }
            Some(()) = sleep => {
                let now = tokio::time::Instant::now();
                if now >= heard + silence {
                    if let Some((p, _, _)) = in_flight.take() {
                        let _ = p.reply.send(Err(format!("{url}: the relay went silent")));
                    }
                    return format!("nothing from the relay for {silence:?}");
                }
                if now >= ping_at {
                    ping_at = now + ping_every;
                    if let Err(e) = send_within(&mut tx, Message::Ping(Default::default()), silence).await {
                        return format!("cannot ping: {e}");
                    }
                }
                if paused_until.is_some_and(|at| at <= now) {
                    paused_until = None;
                    if let Some((p, _, tries)) = in_flight.take() {
                        // Send the rate-limited event again.
                        let msg = ClientMessage::event(p.event.clone()).as_json();
                        if let Err(e) = send_within(&mut tx, Message::text(msg), silence).await {
                            let _ = p.reply.send(Err(format!("{url}: {e}")));
                            return e;
                        }
                        in_flight = Some((p, now, tries));
                    }
                }
                if resubscribe_at.is_some_and(|at| at <= now) {
                    resubscribe_at = None;
                    let since = shared.since.load(Ordering::Relaxed);
                    let req = ClientMessage::req(sub.clone(), vec![filter(shared.to, since)]);
                    if let Err(e) = send_within(&mut tx, Message::text(req.as_json()), silence).await {
                        return e;
                    }
                }
                let overdue = in_flight.as_ref().is_some_and(|(_, at, _)| *at + OK_TIMEOUT <= now);
                if paused_until.is_none() && overdue {
                    if let Some((p, _, _)) = in_flight.take() {
                        let _ = p.reply.send(Err(format!("{url}: no OK within {OK_TIMEOUT:?}")));
                    }
                    return "no OK from the relay".into();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> EventId {
        EventId::from_byte_array([n; 32])
    }

    #[test]
    fn an_event_counts_as_seen_only_once_settled() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let first = Dedupe::new(seen.clone());
        assert!(first.admit(id(1)));
        assert!(first.admit(id(2)));
        // A copy from another relay while the first is on its way: dropped.
        assert!(!first.admit(id(1)));
        // 1 reached the Peer; 2 was still queued when the link ended.
        first.settle(&[id(1)]);
        assert!(!first.admit(id(1)));
        drop(first);
        // The next dial of the same dialer takes 2 again, and 1 never.
        let second = Dedupe::new(seen.clone());
        assert!(!second.admit(id(1)));
        assert!(second.admit(id(2)));
        assert!(!second.admit(id(2)));
        // Discarded on purpose (foreign, old, tampered): settled too.
        assert!(second.admit(id(3)));
        second.settle(&[id(2), id(3)]);
        let third = Dedupe::new(seen);
        assert!(!third.admit(id(2)));
        assert!(!third.admit(id(3)));
        assert!(third.admit(id(4)));
    }

    #[test]
    fn remembered_ids_are_bounded() {
        let mut seen = Seen::with_cap(3);
        for n in 0..10 {
            assert!(seen.insert(id(n)));
            assert!(seen.set.len() <= 3 && seen.order.len() <= 3);
        }
        assert!(seen.contains(&id(9)) && !seen.contains(&id(0)));
        // Removed ids still count against the bound until they leave it.
        seen.remove(&id(9));
        assert!(seen.insert(id(9)));
        assert!(seen.order.len() <= 3);
    }

    #[test]
    fn the_silence_limit_is_a_whole_number_of_intervals() {
        let s = RelaySettings::default()
            .with_ping_interval(Duration::ZERO)
            .with_dead_after(0);
        assert_eq!(s.silence_limit(), MIN_PING_INTERVAL);
        let s = RelaySettings::default().with_ping_interval(Duration::from_secs(5));
        assert_eq!(s.silence_limit(), Duration::from_secs(10));
    }
}
