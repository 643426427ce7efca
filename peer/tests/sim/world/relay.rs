//! A Nostr relay link between two crsync peers ([`LinkKind::Relay`]).
//!
//! What the relays do:
//! - **Store and forward**: every event is stored and sent on to the
//!   receiver when it is subscribed; a receiver that was away (asleep: a
//!   pause; or switched off: a restart) gets what was stored when it is
//!   back, the two ends need not be online together.
//! - **Expiry** (NIP-40): an event older than the link's TTL is gone, stored
//!   or on its way.
//! - **Size limit**: a message larger than the relays take goes as numbered
//!   parts, each its own event; the receiver takes it once every part came
//!   (from either relay), and never if one is lost or expired.
//! - **Order and copies**: one or two relays, each delivering with its own
//!   latency; faults drop events and hold some back (reorder); a second copy
//!   now and then passes the receiver's bounded duplicate filter. A relay
//!   connection that drops (a `Cut`) resubscribes and gets everything stored
//!   again.
//!
//! What the transport adds (the model's assumption about it): each end's
//! connection stays up while its peer runs, whatever the remote does, with
//! long timings ([`SESSION_TIMINGS`]). A Peer's session numbers its data
//! messages from 1, so the two sessions of a pair must start and end
//! together: every event carries its sender's **conversation number**, kept
//! by each device. A new session (the device started again, or its session
//! closed) proposes the next number; a receiver drops events of a lower
//! number (from sessions that are gone), and on a higher one replaces its own
//! session by a new one of that number. Each session restart is so caused by
//! a device's own, and no two sessions of a device share a number.
//! Events also carry a sequence number within their conversation: the
//! receiving transport hands them on in that order (copies dropped), holding
//! early ones back until the missing one comes or [`HOLD`] passes (then it
//! skips the hole: the session's own acknowledgements recover a lost
//! message). `CRSYNC_SIM_RELAY_ORDER=raw` models a transport without that:
//! events go to the session as they come, copies too. An event published
//! before the receiving session began goes in as `Input::ReceivedEarlier`
//! (as the Nostr link marks a request that does not answer its session):
//! its cursor is not checked against what the session held at its start.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crsync_peer::proto::Side;
use crsync_peer::wire::TransportMessage;
use rand::Rng;

use super::super::scenario::{LinkKind, RelaySpec};
use super::super::trace::Entry;
use super::{Conn, End, Event, World};

/// Acknowledgement timeout, ping interval and liveness timeout of a session
/// on a relay link: the remote may be away for hours, so the connection
/// never times out, and resends are few.
pub(super) const SESSION_TIMINGS: (Duration, Duration, Option<Duration>) =
    (Duration::from_secs(120), Duration::from_secs(300), None);
/// Events stored per direction at most (a relay's storage limit): the
/// oldest go first.
const MAX_STORED: usize = 4096;
/// How long a relay may hold an event back when it reorders.
const REORDER_MS: u64 = 5_000;
/// How long the receiving transport waits for a missing event before it
/// hands on the ones after it.
const HOLD: Duration = Duration::from_secs(8);
/// Early events a receiving transport holds at most; more are dropped.
const MAX_HELD: usize = 256;

/// What a relay event carries besides the message.
#[derive(Debug, Clone, Copy)]
pub(super) struct Envelope {
    /// The sender's conversation number.
    conv: u64,
    /// Its place among the sender's events of that conversation, from 1.
    seq: u64,
    /// When the relays drop it.
    expires: Duration,
}

struct Stored {
    msg: TransportMessage,
    envelope: Envelope,
    published: Duration,
}

/// The relays of one link and what they store.
pub(super) struct Relays {
    spec: RelaySpec,
    /// Per end: the device's conversation number.
    conv: [u64; 2],
    /// Per end: the sequence number of its last event in that conversation.
    sent: [u64; 2],
    /// Per end, its transport's reorder buffer for the remote's events of
    /// the conversation: the next one to hand on, and those that came early.
    expect: [u64; 2],
    held: [BTreeMap<u64, (TransportMessage, Duration)>; 2],
    /// Per direction (from end d), the stored events, oldest first.
    stored: [VecDeque<Stored>; 2],
    /// Paired once already: a new pairing starts a new conversation.
    paired: bool,
    /// Per end, at the heal: its conversation and last sequence number (a
    /// hole up to there, found after the heal, is a fault from before it).
    at_heal: [Option<(u64, u64)>; 2],
}

impl Relays {
    pub(super) fn new(spec: RelaySpec) -> Relays {
        Relays {
            spec,
            conv: [1; 2],
            sent: [0; 2],
            expect: [1; 2],
            held: [BTreeMap::new(), BTreeMap::new()],
            stored: [VecDeque::new(), VecDeque::new()],
            paired: false,
            at_heal: [None; 2],
        }
    }
}

fn side(end: usize) -> Side {
    if end == 0 {
        Side::Dialed
    } else {
        Side::Accepted
    }
}

impl World {
    pub(super) fn is_relay(&self, conn: u64) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| self.links[c.link].kind == LinkKind::Relay)
    }

    fn relays(&mut self, conn: u64) -> Option<&mut Relays> {
        let link = self.conns.get(&conn)?.link;
        self.links[link].relay.as_mut()
    }

    fn relay_end(&mut self, peer: usize, end: usize) -> End {
        if !self.peers[peer].up {
            return End::Down;
        }
        match self.crsync_session(peer, side(end), true) {
            Some(e) => End::Crsync(Box::new(e)),
            None => End::Down,
        }
    }

    /// Connects a relay link: each end whose peer runs gets a session; an
    /// end whose peer is down gets one when it is up.
    pub(super) fn relay_dial(&mut self, link: usize) {
        let (dialer, acceptor) = (self.links[link].dialer, self.links[link].acceptor);
        if let Some(relays) = self.links[link].relay.as_mut() {
            if std::mem::replace(&mut relays.paired, true) {
                // Paired again (after a refusal): both devices start afresh.
                let conv = relays.conv[0].max(relays.conv[1]) + 1;
                relays.conv = [conv; 2];
                relays.sent = [0; 2];
                relays.expect = [1; 2];
                relays.held = [BTreeMap::new(), BTreeMap::new()];
            }
        }
        let a = self.relay_end(dialer, 0);
        let b = self.relay_end(acceptor, 1);
        let id = self.next_conn;
        self.next_conn += 1;
        self.last_activity = self.now;
        self.conns.insert(
            id,
            Conn {
                link,
                ends: [a, b],
                last: [self.now; 2],
                broken: [false; 2],
            },
        );
        self.links[link].conn = Some(id);
        self.links[link].attempts = 0;
        self.note(|| {
            Entry::Note(format!(
                "link {link}: p{dialer} and p{acceptor} paired through relays as conn {id}"
            ))
        });
        for end in 0..2 {
            self.pump(id, end);
        }
    }

    /// `peer` went down: its sessions on relay link `conn` are gone; the
    /// relays keep what comes for it.
    pub(super) fn relay_end_down(&mut self, conn: u64, peer: usize) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let ends: Vec<usize> = (0..2).filter(|e| self.peer_of(c, *e) == peer).collect();
        if let Some(c) = self.conns.get_mut(&conn) {
            for e in ends {
                c.ends[e] = End::Down;
            }
        }
    }

    /// `peer` is up again: each of its relay ends gets a new session (the
    /// next conversation) and fetches what the relays stored for it.
    pub(super) fn relay_peer_up(&mut self, peer: usize) {
        let ends: Vec<(u64, usize)> = self
            .conns
            .iter()
            .filter(|(_, c)| self.links[c.link].kind == LinkKind::Relay)
            .flat_map(|(id, c)| {
                (0..2)
                    .filter(|e| self.peer_of(c, *e) == peer && matches!(c.ends[*e], End::Down))
                    .map(move |e| (*id, e))
            })
            .collect();
        for (conn, end) in ends {
            self.relay_new_session(conn, end, None);
            self.relay_fetch(conn, end);
        }
    }

    /// Replaces the session at a relay end: of conversation `adopt`, or
    /// (`None`) of the next one, which it proposes.
    pub(super) fn relay_new_session(&mut self, conn: u64, end: usize, adopt: Option<u64>) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let peer = self.peer_of(c, end);
        let Some(relays) = self.relays(conn) else {
            return;
        };
        let conv = adopt.unwrap_or(relays.conv[end] + 1);
        relays.conv[end] = conv;
        relays.sent[end] = 0;
        relays.expect[end] = 1;
        relays.held[end].clear();
        let new = self.relay_end(peer, end);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.ends[end] = new;
        }
        self.note(|| {
            Entry::Note(format!(
                "p{peer} conn {conn}: relay session of conversation {conv}"
            ))
        });
        self.pump(conn, end);
    }

    /// The relays send `to` again what they store for it (a subscription
    /// since its last event, minus the NIP-59 timestamp jitter: everything),
    /// in their own order.
    fn relay_fetch(&mut self, conn: u64, to: usize) {
        let from = 1 - to;
        let now = self.now;
        let Some(relays) = self.relays(conn) else {
            return;
        };
        relays.stored[from].retain(|s| s.envelope.expires >= now);
        let events: Vec<(TransportMessage, Envelope, Duration)> = relays.stored[from]
            .iter()
            .map(|s| (s.msg.clone(), s.envelope, s.published))
            .collect();
        let n = events.len();
        self.note(|| {
            Entry::Note(format!(
                "conn {conn} end {to}: relays send {n} stored events"
            ))
        });
        for (msg, envelope, published) in events {
            let delay = self.latency(conn) + self.jitter(REORDER_MS);
            self.schedule_in(
                delay,
                Event::Deliver {
                    conn,
                    to,
                    msg: Box::new(msg),
                    post: false,
                    sent_at: published,
                    relay: Some(envelope),
                },
            );
        }
    }

    /// A relay connection dropped and came back: both ends get what is
    /// stored again.
    pub(super) fn relay_resubscribe(&mut self, conn: u64) {
        self.note(|| Entry::Note(format!("conn {conn}: relay connection drops, resubscribes")));
        for to in 0..2 {
            if self
                .conns
                .get(&conn)
                .is_some_and(|c| matches!(c.ends[to], End::Crsync(_)))
            {
                self.relay_fetch(conn, to);
            }
        }
    }

    /// At the heal: what each end had sent until then.
    pub(super) fn relay_heal(&mut self) {
        for link in &mut self.links {
            if let Some(r) = link.relay.as_mut() {
                r.at_heal = [Some((r.conv[0], r.sent[0])), Some((r.conv[1], r.sent[1]))];
            }
        }
    }

    /// Publishes a message from end `from` to the relays.
    pub(super) fn relay_publish(&mut self, conn: u64, from: usize, msg: TransportMessage) {
        let now = self.now;
        // Only messages with changes can outgrow an event (the others are
        // a few hundred bytes): measured as JSON, as they go.
        let size = match &msg.data {
            Some(data) if !data.data.is_empty() => msg.to_json().len(),
            _ => 0,
        };
        let Some(relays) = self.relays(conn) else {
            return;
        };
        let spec = relays.spec;
        relays.sent[from] += 1;
        let envelope = Envelope {
            conv: relays.conv[from],
            seq: relays.sent[from],
            expires: now + spec.ttl,
        };
        let stored = &mut relays.stored[from];
        stored.retain(|s| s.envelope.expires >= now);
        if stored.len() >= MAX_STORED {
            stored.pop_front();
        }
        stored.push_back(Stored {
            msg: msg.clone(),
            envelope,
            published: now,
        });
        let parts = size.div_ceil(spec.max_bytes).max(1);
        let faults = self.faults(conn);
        // The message is whole once each part came through the first relay
        // that has it.
        let mut whole = Some(Duration::ZERO);
        for _ in 0..parts {
            let mut first: Option<Duration> = None;
            for _ in 0..spec.relays {
                if self.rng.random_bool(faults.drop) {
                    continue;
                }
                let held = if self.rng.random_bool(faults.reorder) {
                    self.jitter(REORDER_MS)
                } else {
                    Duration::ZERO
                };
                let at = self.latency(conn) + held;
                first = Some(first.map_or(at, |f| f.min(at)));
            }
            whole = match (whole, first) {
                (Some(w), Some(f)) => Some(w.max(f)),
                _ => None,
            };
        }
        let Some(at) = whole else {
            self.note(|| {
                Entry::Note(format!(
                    "conn {conn}: a relay event from end {from} is lost"
                ))
            });
            return;
        };
        let copies = if self.rng.random_bool(faults.dup) {
            2
        } else {
            1
        };
        for copy in 0..copies {
            let later = if copy == 0 {
                Duration::ZERO
            } else {
                self.jitter(REORDER_MS)
            };
            self.schedule_in(
                at + later,
                Event::Deliver {
                    conn,
                    to: 1 - from,
                    msg: Box::new(msg.clone()),
                    post: false,
                    sent_at: now,
                    relay: Some(envelope),
                },
            );
        }
    }

    /// A relay event reaches end `to`: taken if it is of the end's
    /// conversation; from a later one, it first starts a new session of it.
    pub(super) fn relay_receive(
        &mut self,
        conn: u64,
        to: usize,
        msg: TransportMessage,
        envelope: Envelope,
        sent_at: Duration,
    ) {
        if self.now > envelope.expires {
            self.note(|| Entry::Note(format!("conn {conn} end {to}: a relay event expired")));
            return;
        }
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if matches!(c.ends[to], End::Down) {
            return; // stored: fetched when the peer is up
        }
        let Some(mine) = self.relays(conn).map(|r| r.conv[to]) else {
            return;
        };
        if envelope.conv < mine {
            let theirs = envelope.conv;
            self.note(|| {
                Entry::Note(format!(
                    "conn {conn} end {to}: drops an event of conversation {theirs} (at {mine})"
                ))
            });
            return;
        }
        if envelope.conv > mine {
            self.relay_new_session(conn, to, Some(envelope.conv));
        }
        if self.knobs.relay_raw_order {
            self.relay_take(conn, to, msg, sent_at);
            return;
        }
        let Some(relays) = self.relays(conn) else {
            return;
        };
        let expect = relays.expect[to];
        if envelope.seq < expect || relays.held[to].contains_key(&envelope.seq) {
            return; // a copy
        }
        if envelope.seq > expect {
            let held = &mut relays.held[to];
            if held.len() < MAX_HELD {
                held.insert(envelope.seq, (msg, sent_at));
            }
            if held.len() == 1 {
                let epoch = self.crsync_end(conn, to).map_or(0, |e| e.epoch);
                self.schedule_in(
                    HOLD,
                    Event::RelayHold {
                        conn,
                        to,
                        epoch,
                        expect,
                    },
                );
            }
            return;
        }
        self.relay_hand_on(conn, to, msg, sent_at);
    }

    /// The session at `to` takes a message (sent at `sent_at`: one from
    /// before the heal counts as stale).
    fn relay_take(&mut self, conn: u64, to: usize, msg: TransportMessage, sent_at: Duration) {
        if let (Some(healed), Some(c)) = (self.healed, self.conns.get(&conn)) {
            if sent_at < healed {
                self.links[c.link].stale_received[to] += 1;
            }
        }
        self.deliver_sent(conn, to, msg, false, Some(sent_at));
    }

    /// Hands `msg` (the one the reorder buffer expected) to the session, and
    /// the held ones that follow it without a hole.
    fn relay_hand_on(&mut self, conn: u64, to: usize, msg: TransportMessage, sent_at: Duration) {
        let mut next = Some((msg, sent_at));
        while let Some((msg, sent_at)) = next.take() {
            let Some(relays) = self.relays(conn) else {
                return;
            };
            relays.expect[to] += 1;
            let expect = relays.expect[to];
            next = relays.held[to].remove(&expect);
            self.relay_take(conn, to, msg, sent_at);
        }
        // Still a hole before what is held: wait for it, for a while.
        let Some(relays) = self.relays(conn) else {
            return;
        };
        if !relays.held[to].is_empty() {
            let expect = relays.expect[to];
            let epoch = self.crsync_end(conn, to).map_or(0, |e| e.epoch);
            self.schedule_in(
                HOLD,
                Event::RelayHold {
                    conn,
                    to,
                    epoch,
                    expect,
                },
            );
        }
    }

    /// The reorder buffer waited long enough for event `expect`: it skips
    /// the hole and hands on what it holds.
    pub(super) fn relay_hold_ends(&mut self, conn: u64, to: usize, epoch: u64, expect: u64) {
        if self.crsync_end_of(conn, to, epoch).is_none() {
            return;
        }
        let Some(relays) = self.relays(conn) else {
            return;
        };
        if relays.expect[to] != expect {
            return; // it came, or a later hold is waiting
        }
        let Some((&first, _)) = relays.held[to].iter().next() else {
            return;
        };
        let Some((msg, sent_at)) = relays.held[to].remove(&first) else {
            return;
        };
        // A hole of events sent before the heal counts as one message from
        // before it (it costs the session a rewind, as a late one would).
        let from = 1 - to;
        let before_heal = relays.at_heal[from]
            .is_some_and(|(conv, last)| conv == relays.conv[to] && expect <= last);
        relays.expect[to] = first;
        if before_heal {
            if let Some(link) = self.conns.get(&conn).map(|c| c.link) {
                self.links[link].stale_received[to] += 1;
            }
        }
        self.note(|| {
            Entry::Note(format!(
                "conn {conn} end {to}: events {expect}..{first} never came; goes on"
            ))
        });
        self.relay_hand_on(conn, to, msg, sent_at);
    }
}
