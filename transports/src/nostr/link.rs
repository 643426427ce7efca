//! One paired device as a [`Connection`]: messages out as gift wraps on
//! every relay, gift wraps in as messages, in order.
//!
//! Both devices run sessions that start and end independently (each run of
//! `crsync sync` is one), and relays hand back stored events in any order.
//! Every message carries its session ("epoch") and number; this side:
//! - puts the stored events it gets when it subscribes in order (by epoch,
//!   then number) before it hands any on, and later ones in number order,
//!   waiting a little for a missing one before it goes on without it (the
//!   sync protocol asks again for what never arrives);
//! - follows the device's newest session: `data` from any session is handed
//!   on (changes are changes), renumbered so that each remote session is a
//!   new run for the Peer's count of what arrived; a `sync` request is taken
//!   when it answers our session or comes from a session newer than any we
//!   knew; acknowledgements and errors only when they answer our session
//!   (their numbers count our messages) and come from the session followed
//!   (an older session's error is stale); a request that does not answer
//!   our session may have been written before it began, and is marked so
//!   (`Received::from_before_session`: the Peer does not take its cursor as
//!   proof that the device is a copy);
//! - stands in for the device when it is away: if no request of it came
//!   with the stored events, the device's last known cursor becomes one, so
//!   the Peer publishes what the device lacks for it to pick up later
//!   (marked as from before the session too);
//! - never publishes pings (the relays are watched instead: the stream ends
//!   when none has been reachable for a while, and the Peer dials again);
//! - settles an event (its id counts as seen, the device's record moves
//!   past it) only when the Peer took its message from the stream, or when
//!   it was discarded on purpose (old, foreign, tampered, a late copy, not
//!   for this session): what the link had received but not handed on when
//!   it ended (stored events waiting for their order, messages queued for
//!   the Peer) is taken again by the next dial, not dropped as seen.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crsync_peer::wire::{MessageKind, TransportMessage};
use crsync_peer::{Connection, Cursor, Received, SiteId, TransportError};
use nostr::{EventId, Keys, PublicKey};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::envelope::{self, Epoch, Reassembly, Whole};
use super::relay::{FromRelay, RelayPool};
use super::state::DeviceFile;

/// Messages handed to the Peer's session, queued at most.
const DELIVER_CAP: usize = 64;
/// How long a missing message is waited for before the next ones go on.
const HOLE_WAIT: Duration = Duration::from_secs(3);
/// How long the stored events may take to arrive on subscribing.
const REPLAY_WAIT: Duration = Duration::from_secs(10);
/// Stored messages put in order at most (more are handed on as they come).
const REPLAY_CAP: usize = 20_000;
/// Without any reachable relay for this long, the connection ends.
const DOWN_GRACE: Duration = Duration::from_secs(30);
/// How often the device's record (what was processed) is saved at most.
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// How long one publication may take across all relays (rate limits included).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(120);
/// Incomplete fragmented messages kept, and their bytes.
const REASSEMBLY_MESSAGES: usize = 64;
const REASSEMBLY_BYTES: usize = 32 << 20;

/// What the sink needs of the stream's state.
#[derive(Debug, Default)]
struct Following {
    /// The remote session we follow, and the offset of its numbers.
    epoch: Option<(Epoch, u64)>,
}

/// What is saved of the paired device: the reader keeps it up to date as it
/// hands messages on; it is written every [`SAVE_EVERY`] and when the link
/// ends, also when the Peer drops the stream (which aborts the reader).
#[derive(Debug, Default)]
struct Progress {
    epoch: Option<Epoch>,
    seen_until: u64,
    cursor: Option<Cursor>,
    site: Option<SiteId>,
    dirty: bool,
}

/// How far the device's record moves once a message is settled.
#[derive(Debug, Clone, Default)]
struct Mark {
    epoch: Option<Epoch>,
    seen_until: u64,
    cursor: Option<Cursor>,
    site: Option<SiteId>,
}

/// What one message settles when the stream reaches it: its gift wraps
/// count as seen, and the record moves to its mark.
#[derive(Debug, Default)]
struct Settled {
    events: Vec<EventId>,
    mark: Option<Mark>,
}

/// What the reader hands to the stream, in order.
enum Out {
    /// A message for the Peer, settled when the Peer takes it.
    Message(Box<Received>, Settled),
    /// A message the Peer does not get, settled when the stream passes it
    /// (after every message before it).
    Skipped(Settled),
    /// The link ended.
    Failed(TransportError),
}

struct Record {
    file: DeviceFile,
    remote: String,
    pool: Arc<RelayPool>,
    progress: Mutex<Progress>,
}

impl Record {
    /// The stream reached a message: it counts as processed.
    fn settle(&self, settled: Settled) {
        self.pool.settle(&settled.events);
        let Some(mark) = settled.mark else { return };
        if let Ok(mut p) = self.progress.lock() {
            p.epoch = mark.epoch;
            p.seen_until = p.seen_until.max(mark.seen_until);
            p.cursor = mark.cursor;
            p.site = mark.site;
            p.dirty = true;
        }
    }

    /// Writes what changed since the last save, if anything did.
    fn save(&self) {
        let Ok(mut p) = self.progress.lock() else {
            return;
        };
        if !std::mem::replace(&mut p.dirty, false) {
            return;
        }
        let epoch = p.epoch.map(|e| (e.id_hex(), e.started));
        let (seen, cursor) = (p.seen_until, p.cursor.clone());
        let site = p.site.map(|s| s.to_hex());
        drop(p);
        let result = self.file.update(&self.remote, |d| {
            d.seen_until = d.seen_until.max(seen);
            if epoch.is_some() {
                d.remote_epoch = epoch;
            }
            if cursor.is_some() {
                d.remote_cursor = cursor;
            }
            if d.remote_site.is_none() {
                d.remote_site = site;
            }
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot save the paired device's record");
        }
        self.pool.set_since(seen.saturating_sub(super::JITTER_SECS));
    }
}

/// Everything a link needs; built by the dialer.
pub(crate) struct LinkParts {
    pub(crate) keys: Keys,
    pub(crate) remote: PublicKey,
    pub(crate) remote_site: Option<SiteId>,
    pub(crate) pool: Arc<RelayPool>,
    pub(crate) incoming: mpsc::Receiver<FromRelay>,
    pub(crate) expiry: Duration,
    pub(crate) file: DeviceFile,
    pub(crate) label: String,
    /// The device's newest session known before this link.
    pub(crate) known_epoch: Option<Epoch>,
    pub(crate) remote_cursor: Option<Cursor>,
    /// Stored messages older than this (Unix s) were processed before.
    pub(crate) seen_until: u64,
}

/// Builds the connection and starts its reading task.
pub(crate) fn connection(parts: LinkParts) -> Connection {
    let local_epoch = Epoch::new();
    let following = Arc::new(Mutex::new(Following::default()));
    let (tx, rx) = mpsc::channel(DELIVER_CAP);
    let record = Arc::new(Record {
        file: parts.file,
        remote: parts.remote.to_hex(),
        pool: parts.pool.clone(),
        progress: Mutex::new(Progress {
            seen_until: parts.seen_until,
            ..Progress::default()
        }),
    });
    let reader = Reader {
        local_epoch,
        keys: parts.keys.clone(),
        remote: parts.remote,
        remote_site: parts.remote_site,
        pool: parts.pool.clone(),
        record: record.clone(),
        following: following.clone(),
        out: tx,
        reassembly: Reassembly::new(REASSEMBLY_MESSAGES, REASSEMBLY_BYTES),
        epochs: BTreeMap::new(),
        current: None,
        high_water: 0,
        known_epoch: parts.known_epoch,
        remote_cursor: parts.remote_cursor,
        skip_before: parts.seen_until,
        seen_until: parts.seen_until,
        request_delivered: false,
    };
    let task = tokio::spawn(reader.run(parts.incoming));
    let guard = EndOnDrop { task, record };
    let stream = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        loop {
            match rx.recv().await? {
                Out::Skipped(settled) => guard.record.settle(settled),
                Out::Message(message, settled) => {
                    // The Peer has it: settled in the same step, so that a
                    // message is either taken or comes again next dial.
                    guard.record.settle(settled);
                    return Some((Ok(*message), (rx, guard)));
                }
                Out::Failed(e) => return Some((Err(e), (rx, guard))),
            }
        }
    });
    let writer = Writer {
        keys: parts.keys,
        remote: parts.remote,
        pool: parts.pool,
        epoch: local_epoch,
        seq: 0,
        following,
        expiry: parts.expiry,
    };
    let sink = futures_util::sink::unfold(writer, |mut w, message: TransportMessage| async move {
        w.publish(message).await?;
        Ok::<_, TransportError>(w)
    });
    Connection {
        sink: Box::pin(sink),
        stream: Box::pin(stream),
        label: parts.label,
    }
}

/// Ends the reader with the stream, and saves what it processed before the
/// Peer goes on (a next session, even in this process, must find it).
struct EndOnDrop {
    task: tokio::task::JoinHandle<()>,
    record: Arc<Record>,
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.task.abort();
        self.record.save();
    }
}

struct Writer {
    keys: Keys,
    remote: PublicKey,
    pool: Arc<RelayPool>,
    epoch: Epoch,
    seq: u64,
    following: Arc<Mutex<Following>>,
    expiry: Duration,
}

impl Writer {
    async fn publish(&mut self, mut message: TransportMessage) -> Result<(), TransportError> {
        if message.kind == MessageKind::Ping {
            return Ok(());
        }
        let followed = self.following.lock().map(|f| f.epoch).unwrap_or_default();
        if message.ack == Some(true) {
            // Our count of what arrived is in our numbering of the remote's runs.
            if let Some(hello) = message.crsync.as_mut() {
                hello.received = match (hello.received, followed) {
                    (Some(n), Some((_, offset))) if n > offset => Some(n - offset),
                    _ => None,
                };
            }
        }
        let json = message.to_json();
        let events = envelope::wrap_message(
            &self.keys,
            &self.remote,
            self.epoch,
            self.seq,
            followed.map(|(e, _)| e.id),
            &json,
            self.expiry,
        )
        .await
        .map_err(|e| TransportError::Io(e.into()))?;
        self.seq += 1;
        for event in &events {
            self.pool.publish(event, PUBLISH_TIMEOUT).await?;
        }
        Ok(())
    }
}

/// One remote session's messages waiting for their turn.
#[derive(Debug, Default)]
struct EpochIn {
    next: Option<u64>,
    waiting: BTreeMap<u64, Whole>,
    hole_since: Option<Instant>,
    offset: u64,
    connected: bool,
}

struct Reader {
    local_epoch: Epoch,
    keys: Keys,
    remote: PublicKey,
    remote_site: Option<SiteId>,
    pool: Arc<RelayPool>,
    record: Arc<Record>,
    following: Arc<Mutex<Following>>,
    out: mpsc::Sender<Out>,
    reassembly: Reassembly,
    epochs: BTreeMap<Epoch, EpochIn>,
    current: Option<Epoch>,
    high_water: u64,
    known_epoch: Option<Epoch>,
    remote_cursor: Option<Cursor>,
    skip_before: u64,
    seen_until: u64,
    request_delivered: bool,
}

/// The reader stops: the Peer dropped the stream.
struct Gone;

impl Reader {
    async fn run(mut self, mut incoming: mpsc::Receiver<FromRelay>) {
        let started = Instant::now();
        let mut replay: Vec<Whole> = Vec::new();
        let mut stored_from = std::collections::BTreeSet::new();
        let mut replaying = true;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut down_since: Option<Instant> = None;
        let mut last_save = Instant::now();
        let end = loop {
            let item = tokio::select! {
                item = incoming.recv() => item,
                _ = tick.tick() => {
                    if replaying && started.elapsed() >= REPLAY_WAIT {
                        replaying = false;
                        if self.end_replay(std::mem::take(&mut replay)).await.is_err() { break None }
                    }
                    if !replaying && self.drain_all(false).await.is_err() { break None }
                    if self.pool.up() == 0 {
                        let since = *down_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= DOWN_GRACE {
                            break Some(TransportError::Io("no relay reachable".into()));
                        }
                    } else {
                        down_since = None;
                    }
                    if last_save.elapsed() >= SAVE_EVERY {
                        self.record.save();
                        last_save = Instant::now();
                    }
                    continue;
                }
            };
            match item {
                None => break Some(TransportError::Closed),
                Some(FromRelay::Stored(index)) => {
                    stored_from.insert(index);
                    if replaying && stored_from.len() >= self.pool.up().max(1) {
                        replaying = false;
                        if self.end_replay(std::mem::take(&mut replay)).await.is_err() {
                            break None;
                        }
                    }
                }
                Some(FromRelay::Event(event)) => {
                    let opened = match envelope::open(&self.keys, &self.remote, &event).await {
                        Ok(o) => o,
                        Err(e) => {
                            tracing::debug!(error = %e, "ignoring an event");
                            self.pool.settle(&[event.id]);
                            continue;
                        }
                    };
                    let Some(whole) = self.reassembly.add(opened) else {
                        continue;
                    };
                    if whole.created_at < self.skip_before {
                        // Processed in an earlier run.
                        self.pool.settle(&whole.events);
                        continue;
                    }
                    if replaying && replay.len() < REPLAY_CAP {
                        replay.push(whole);
                    } else {
                        self.take(whole);
                        if self.drain_all(false).await.is_err() {
                            break None;
                        }
                    }
                }
            }
        };
        self.record.save();
        if let Some(e) = end {
            let _ = self.out.send(Out::Failed(e)).await;
        }
    }

    /// Puts the stored messages in order and hands them on; stands in for
    /// the device's request if none came.
    async fn end_replay(&mut self, mut replay: Vec<Whole>) -> Result<(), Gone> {
        replay.sort_by_key(|w| (w.epoch, w.seq));
        tracing::debug!(messages = replay.len(), "stored messages in order");
        for whole in replay {
            let epoch = self.epochs.entry(whole.epoch).or_default();
            if epoch.next.is_none_or(|n| whole.seq < n) {
                epoch.next = Some(whole.seq);
            }
            epoch.waiting.insert(whole.seq, whole);
        }
        self.drain_all(true).await?;
        if !self.request_delivered {
            if let (Some(site), Some(cursor)) = (self.remote_site, self.remote_cursor.clone()) {
                tracing::debug!("the device is away: answering its last known cursor");
                // Our record of the device, not the device speaking now.
                let none = Settled::default;
                let connect = Received::from_before_session(TransportMessage::connect(site));
                self.deliver(connect, none()).await?;
                let sync = Received::from_before_session(TransportMessage::sync(site, cursor));
                self.deliver(sync, none()).await?;
                self.request_delivered = true;
            }
        }
        Ok(())
    }

    /// Takes a message that arrived live.
    fn take(&mut self, whole: Whole) {
        let epoch = self.epochs.entry(whole.epoch).or_default();
        if epoch.next.is_some_and(|n| whole.seq < n) {
            // A late copy of one handed on or skipped.
            self.pool.settle(&whole.events);
            return;
        }
        if epoch.next.is_none() && whole.seq == 0 {
            epoch.next = Some(0);
        }
        epoch.waiting.insert(whole.seq, whole);
    }

    /// Hands on what is in order; past a hole older than [`HOLE_WAIT`] (or
    /// at once with `all`), goes on after it.
    async fn drain_all(&mut self, all: bool) -> Result<(), Gone> {
        let keys: Vec<Epoch> = self.epochs.keys().copied().collect();
        for key in keys {
            while let Some(epoch) = self.epochs.get_mut(&key) {
                let Some((&first, _)) = epoch.waiting.first_key_value() else {
                    epoch.hole_since = None;
                    break;
                };
                let next = epoch.next.unwrap_or(first);
                let whole = if first <= next {
                    epoch.waiting.remove(&first)
                } else {
                    let since = *epoch.hole_since.get_or_insert_with(Instant::now);
                    if all || since.elapsed() >= HOLE_WAIT {
                        tracing::debug!(missing = next, "going on past a missing message");
                        epoch.waiting.remove(&first)
                    } else {
                        break;
                    }
                };
                let Some(whole) = whole else { break };
                epoch.next = Some(whole.seq + 1);
                epoch.hole_since = None;
                self.handle(whole).await?;
            }
        }
        // Forget sessions older than the one followed once they are drained.
        if let Some(current) = self.current {
            self.epochs
                .retain(|e, s| *e >= current || !s.waiting.is_empty());
        }
        Ok(())
    }

    async fn deliver(&mut self, message: Received, settled: Settled) -> Result<(), Gone> {
        self.out
            .send(Out::Message(Box::new(message), settled))
            .await
            .map_err(|_| Gone)
    }

    /// Applies the rules of the module docs to one message in order.
    async fn handle(&mut self, whole: Whole) -> Result<(), Gone> {
        let mut message = match TransportMessage::from_json(&whole.json) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable message from the paired device");
                self.pool.settle(&whole.events);
                return Ok(());
            }
        };
        let sender = message.sender().ok();
        match (self.remote_site, sender) {
            (_, None) => {
                self.pool.settle(&whole.events);
                return Ok(());
            }
            (Some(site), Some(s)) if site != s => {
                tracing::warn!(%s, "message names another site than the paired device's");
                self.pool.settle(&whole.events);
                return Ok(());
            }
            (None, Some(s)) => self.remote_site = Some(s),
            _ => {}
        }
        self.seen_until = self.seen_until.max(whole.created_at);
        if self.current.is_none_or(|c| whole.epoch > c) {
            self.current = Some(whole.epoch);
            let offset = self.high_water;
            if let Some(e) = self.epochs.get_mut(&whole.epoch) {
                e.offset = offset;
            }
            if let Ok(mut f) = self.following.lock() {
                f.epoch = Some((whole.epoch, offset));
            }
        }
        let current = self.current == Some(whole.epoch);
        let to_us = whole.to == Some(self.local_epoch.id);
        let fresh = self.known_epoch.is_none_or(|k| whole.epoch > k);
        let offset = self.epochs.get(&whole.epoch).map_or(0, |e| e.offset);
        if let Some(cursor) = &message.cursor {
            if message.kind == MessageKind::Sync {
                self.remote_cursor
                    .get_or_insert_with(Cursor::new)
                    .join(cursor);
            }
        }
        let settled = Settled {
            events: whole.events,
            mark: Some(Mark {
                epoch: self.current,
                seen_until: self.seen_until,
                cursor: self.remote_cursor.clone(),
                site: self.remote_site,
            }),
        };
        let take = match message.kind {
            MessageKind::Connect => {
                let e = self.epochs.entry(whole.epoch).or_default();
                current && !std::mem::replace(&mut e.connected, true)
            }
            MessageKind::Sync if message.ack == Some(true) => current && to_us,
            MessageKind::Sync => {
                let take = current && (to_us || fresh);
                self.request_delivered |= take;
                take
            }
            // From the session followed: an older session's error is stale
            // (a pausing one would pause what its successor asked for).
            MessageKind::Error => current && to_us,
            MessageKind::Data => {
                if let Some((first, n)) = message.n {
                    message.n = Some((first + offset, n + offset));
                    self.high_water = self.high_water.max(n + offset);
                }
                true
            }
            MessageKind::Ping => false,
        };
        if take {
            // A request from a session that had not heard of ours may be
            // older than our session (stored on the relays), and than what
            // reached the Peer of the device by another path meanwhile.
            let earlier = message.kind == MessageKind::Sync && !to_us;
            let message = if earlier {
                Received::from_before_session(message)
            } else {
                Received::new(message)
            };
            self.deliver(message, settled).await
        } else {
            self.out.send(Out::Skipped(settled)).await.map_err(|_| Gone)
        }
    }
}
