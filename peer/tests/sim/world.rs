//! The simulated world: peers, connections, an event queue in virtual time,
//! and the driver that does for each `proto::Session` what
//! `peer/src/peer/session.rs` does for it.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use crsync_peer::proto::{
    CloseReason, ErrorCode, Input, MergeFailure, MergeOutcome, Output, ReplyId, Session,
    SessionConfig, SessionEvent, Side, Trust,
};
use crsync_peer::wire::{Hello, MessageKind, TransportMessage};
use crsync_peer::{BatchRejection, ChangeBatch, Cursor, SiteId};
use rand::Rng;
use rand::rngs::StdRng;

use super::hostile::{self, Hostile};
use super::scenario::{Faults, LinkKind, Op, PeerSpec, Scenario};
use super::store::Store;
use super::trace::{Entry, Summary, Trace};
use super::v1::V1Peer;
use super::values::{CellKey, Version, cmp_versions};

mod relay;

/// After the heal, the run is quiescent once nothing but pings moved for this long.
pub const QUIET: Duration = Duration::from_secs(120);
/// The heal must reach quiescence within this much virtual time.
pub const HEAL_LIMIT: Duration = Duration::from_secs(1800);
/// Before the heal, how often a store read or merge fails.
const STORE_FAILURE: f64 = 0.01;
/// Timeouts handled at one instant without the deadline moving: a spin.
const SPIN_LIMIT: u32 = 1000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub enum Node {
    Crsync(Store),
    V1(V1Peer),
}

pub struct Peer {
    pub node: Node,
    pub site: SiteId,
    pub up: bool,
    /// Bumped at each restart: events of an earlier life are void.
    pub inc: u64,
    pub paused_until: Duration,
    /// Events held while paused, in order.
    deferred: VecDeque<Event>,
    notify_pending: bool,
    pub window: usize,
    /// The hostile peer ([`super::hostile`]): not an honest replica.
    pub hostile: bool,
}

pub struct Link {
    pub dialer: usize,
    pub acceptor: usize,
    pub kind: LinkKind,
    pub faults: Faults,
    pub conn: Option<u64>,
    token: u64,
    attempts: u32,
    /// A session on it ended with a site id conflict: its dialer stopped for
    /// good, as a Peer's does.
    pub given_up: bool,
    /// Per direction (0: from the dialer), after the heal: changes sent,
    pub healed_changes: [u64; 2],
    /// streams (re)started from the remote's cursor (a read with nothing
    /// counted as delivered),
    pub healed_restarts: [u64; 2],
    /// and messages the sending end received that were sent before the heal.
    pub stale_received: [u64; 2],
    /// The relays of a [`LinkKind::Relay`] link and what they store.
    relay: Option<relay::Relays>,
}

pub struct CrsyncEnd {
    /// Unique per session: events of a session that was replaced are void.
    epoch: u64,
    pub session: Session,
    pub stream: Option<VecDeque<(ChangeBatch, i64)>>,
    feeding: bool,
    /// Messages waiting for the session, each with whether it may predate
    /// it ([`Input::ReceivedEarlier`]: a relay's stored event).
    pub inbox: VecDeque<(TransportMessage, Option<ReplyId>, bool)>,
    /// When the session began.
    started: Duration,
    pub open_replies: BTreeSet<ReplyId>,
    next_reply: ReplyId,
    timeout: Option<Instant>,
    /// `after_local` of the last read (a drop to 0 is a rewind).
    last_read_after: i64,
}

pub struct V1End {
    /// The v1 peer is the server of this connection (it relays all rows live).
    server: bool,
    /// A client sends its `sync` once the server's `connect` arrived.
    ready: bool,
    /// Live changes flow (after the first `sync`): the version up to which rows went out.
    live: Option<i64>,
    /// The `sync` answer in progress: (job id, cursor, raw offset).
    job: Option<(u64, Cursor, usize)>,
    next_job: u64,
}

pub enum End {
    Crsync(Box<CrsyncEnd>),
    V1(V1End),
    /// A relay link's end whose peer is down: the other end goes on.
    Down,
}

pub struct Conn {
    pub link: usize,
    /// 0: the dialer's end, 1: the acceptor's.
    pub ends: [End; 2],
    /// Per direction (from end d), when its last message arrives.
    last: [Duration; 2],
    /// Per direction: an ordered stream lost a message; nothing after it arrives.
    broken: [bool; 2],
}

enum Event {
    Deliver {
        conn: u64,
        to: usize,
        msg: Box<TransportMessage>,
        post: bool,
        sent_at: Duration,
        /// Carried by a relay: its envelope.
        relay: Option<relay::Envelope>,
    },
    MergeExec {
        peer: usize,
        inc: u64,
        conn: u64,
        end: usize,
        epoch: u64,
        batch: ChangeBatch,
    },
    MergeDone {
        conn: u64,
        end: usize,
        epoch: u64,
        result: Result<MergeOutcome, MergeFailure>,
    },
    FeedBatch {
        conn: u64,
        end: usize,
        epoch: u64,
    },
    Notify {
        peer: usize,
        inc: u64,
    },
    V1Page {
        conn: u64,
        end: usize,
        job: u64,
    },
    V1Poll {
        peer: usize,
        inc: u64,
    },
    V1Ping {
        conn: u64,
        end: usize,
    },
    Cut {
        conn: u64,
    },
    Redial {
        link: usize,
        token: u64,
    },
    PeerUp {
        peer: usize,
        inc: u64,
    },
    /// A pause may have ended.
    Resume {
        peer: usize,
    },
    Op(Op),
    Heal,
    /// The hostile peer sends its `n`th forged message.
    Attack(usize),
    /// A relay end's reorder buffer stops waiting for event `expect`.
    RelayHold {
        conn: u64,
        to: usize,
        epoch: u64,
        expect: u64,
    },
}

struct Scheduled {
    at: Duration,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Direction properties of a link kind, seen from the sending end.
struct Dir {
    ordered: bool,
    /// One message at a time (serial POSTs): each waits for the previous.
    serial: bool,
    /// Delivered as a POST: the receiver answers with a reply.
    post: bool,
    /// `connect`, `ping` and `error` are not POSTed.
    skips_control: bool,
}

fn direction(kind: LinkKind, from: usize) -> Dir {
    let stream = Dir {
        ordered: true,
        serial: false,
        post: false,
        skips_control: false,
    };
    let serial_post = Dir {
        ordered: true,
        serial: true,
        post: true,
        skips_control: true,
    };
    match (kind, from) {
        // Not used: relays carry messages their own way (`relay.rs`).
        (LinkKind::Relay, _) => Dir {
            ordered: false,
            serial: false,
            post: false,
            skips_control: false,
        },
        (LinkKind::Stream, _) | (_, 1) => stream,
        (LinkKind::SseCrsync | LinkKind::V1Server, _) => serial_post,
        (LinkKind::V1Client, _) => Dir {
            ordered: false,
            serial: false,
            post: true,
            skips_control: true,
        },
    }
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub messages: u64,
    pub data_messages: u64,
    pub changes_sent: u64,
    pub versions_written: u64,
    pub merges: u64,
    pub reads: u64,
    /// Merges of a part of a transaction (staged, or the last one), and
    /// parts refused for a missing earlier part.
    pub parts_merged: u64,
    pub part_gaps: u64,
    pub virtual_time: Duration,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.messages += other.messages;
        self.data_messages += other.data_messages;
        self.changes_sent += other.changes_sent;
        self.versions_written += other.versions_written;
        self.merges += other.merges;
        self.reads += other.reads;
        self.parts_merged += other.parts_merged;
        self.part_gaps += other.part_gaps;
        self.virtual_time += other.virtual_time;
    }
}

/// Modelling choices that decide whether known core issues show.
#[derive(Debug, Clone, Copy)]
pub struct Knobs {
    /// A v1 peer reads each page of a `sync` answer separately, so merges
    /// can run between pages and shift its OFFSETs.
    pub v1_interleaved_paging: bool,
    /// A relay link's transport hands events on in the order they come,
    /// copies included, instead of in its sender's order.
    pub relay_raw_order: bool,
}

pub struct World {
    pub rng: StdRng,
    /// See [`Scenario::own_site_trust`].
    pub own_site_trust: bool,
    pub knobs: Knobs,
    base: Instant,
    pub now: Duration,
    pub peers: Vec<Peer>,
    pub links: Vec<Link>,
    pub conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    pub trace: Option<Trace>,
    pub healed: Option<Duration>,
    last_activity: Duration,
    pub stats: Stats,
    /// Per cell, the LWW winner of every version ever written.
    pub expected: BTreeMap<CellKey, Version>,
    /// The hostile peer of the scenario, if any.
    pub hostile: Option<Hostile>,
    /// Per cell, the versions the hostile peer forged under other sites' ids.
    pub forged: BTreeMap<CellKey, Vec<Version>>,
    error: Option<String>,
    spin: (Duration, u32),
    next_epoch: u64,
}

impl World {
    pub fn new(scenario: &Scenario, rng: StdRng, trace: Option<Trace>, knobs: Knobs) -> World {
        let peers = scenario
            .peers
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let site = SiteId::from_bytes([i as u8 + 1; 16]);
                let (node, window) = match spec {
                    PeerSpec::Crsync {
                        schema,
                        max_changes,
                        window,
                    } => (
                        Node::Crsync(Store::new(site, *schema, *max_changes)),
                        *window,
                    ),
                    PeerSpec::V1 { page_size } => (Node::V1(V1Peer::new(site, *page_size, 2)), 0),
                };
                Peer {
                    node,
                    site,
                    up: true,
                    inc: 0,
                    paused_until: Duration::ZERO,
                    deferred: VecDeque::new(),
                    notify_pending: false,
                    window,
                    hostile: scenario.hostile.as_ref().is_some_and(|h| h.peer == i),
                }
            })
            .collect();
        let links = scenario
            .links
            .iter()
            .map(|l| Link {
                dialer: l.dialer,
                acceptor: l.acceptor,
                kind: l.kind,
                faults: l.faults,
                conn: None,
                token: 0,
                attempts: 0,
                given_up: false,
                healed_changes: [0; 2],
                healed_restarts: [0; 2],
                stale_received: [0; 2],
                relay: l.relay.map(relay::Relays::new),
            })
            .collect();
        let mut world = World {
            rng,
            own_site_trust: scenario.own_site_trust,
            knobs,
            base: Instant::now(),
            now: Duration::ZERO,
            peers,
            links,
            conns: BTreeMap::new(),
            next_conn: 1,
            queue: BinaryHeap::new(),
            seq: 0,
            trace,
            healed: None,
            last_activity: Duration::ZERO,
            stats: Stats::default(),
            expected: BTreeMap::new(),
            hostile: scenario.hostile.clone(),
            forged: BTreeMap::new(),
            error: None,
            spin: (Duration::ZERO, 0),
            next_epoch: 1,
        };
        for (at, op) in &scenario.ops {
            world.schedule_at(*at, Event::Op(op.clone()));
        }
        world.schedule_at(scenario.heal_at, Event::Heal);
        if let Some(h) = &scenario.hostile {
            for (i, (at, _)) in h.attacks.iter().enumerate() {
                world.schedule_at(*at, Event::Attack(i));
            }
        }
        for i in 0..world.peers.len() {
            if matches!(world.peers[i].node, Node::V1(_)) {
                let at = ms(world.rng.random_range(0..5_000));
                world.schedule_at(at, Event::V1Poll { peer: i, inc: 0 });
            }
        }
        for link in 0..world.links.len() {
            let at = ms(world.rng.random_range(0..1_000));
            world.schedule_at(at, Event::Redial { link, token: 0 });
        }
        world
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn schedule_at(&mut self, at: Duration, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    fn schedule_in(&mut self, delay: Duration, event: Event) {
        self.schedule_at(self.now + delay, event);
    }

    fn jitter(&mut self, max_ms: u64) -> Duration {
        ms(self.rng.random_range(0..=max_ms))
    }

    fn note(&mut self, entry: impl FnOnce() -> Entry) {
        if let Some(trace) = self.trace.as_mut() {
            trace.push(self.now, entry());
        }
    }

    fn fail(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(message);
        }
    }

    fn peer_of(&self, conn: &Conn, end: usize) -> usize {
        let link = &self.links[conn.link];
        if end == 0 { link.dialer } else { link.acceptor }
    }

    fn crsync_end(&mut self, conn: u64, end: usize) -> Option<&mut CrsyncEnd> {
        match self.conns.get_mut(&conn)?.ends.get_mut(end)? {
            End::Crsync(e) => Some(e),
            End::V1(_) | End::Down => None,
        }
    }

    /// The session at an end, if it is still the one of `epoch`.
    fn crsync_end_of(&mut self, conn: u64, end: usize, epoch: u64) -> Option<&mut CrsyncEnd> {
        self.crsync_end(conn, end).filter(|e| e.epoch == epoch)
    }

    fn store(&mut self, peer: usize) -> Option<&mut Store> {
        match &mut self.peers[peer].node {
            Node::Crsync(s) => Some(s),
            Node::V1(_) => None,
        }
    }

    fn v1(&mut self, peer: usize) -> Option<&mut V1Peer> {
        match &mut self.peers[peer].node {
            Node::V1(v) => Some(v),
            Node::Crsync(_) => None,
        }
    }

    /// The peer an event happens at, if any (a paused peer defers it).
    fn target(&self, event: &Event) -> Option<usize> {
        let at_end = |conn: &u64, end: &usize| self.conns.get(conn).map(|c| self.peer_of(c, *end));
        match event {
            Event::Deliver { conn, to, .. } => at_end(conn, to),
            Event::MergeExec { peer, .. }
            | Event::Notify { peer, .. }
            | Event::V1Poll { peer, .. }
            | Event::PeerUp { peer, .. } => Some(*peer),
            Event::MergeDone { conn, end, .. }
            | Event::FeedBatch { conn, end, .. }
            | Event::V1Page { conn, end, .. }
            | Event::V1Ping { conn, end }
            | Event::RelayHold { conn, to: end, .. } => at_end(conn, end),
            Event::Redial { link, .. } => Some(self.links[*link].dialer),
            Event::Op(
                Op::Write { peer, .. }
                | Op::Rewrite { peer, .. }
                | Op::Upgrade { peer }
                | Op::Restart { peer, .. },
            ) => Some(*peer),
            Event::Attack(_) => self.hostile.as_ref().map(|h| h.peer),
            Event::Op(Op::Cut { .. } | Op::Pause { .. })
            | Event::Cut { .. }
            | Event::Resume { .. }
            | Event::Heal => None,
        }
    }

    /// The earliest session deadline: (time, conn, end).
    fn next_timer(&self) -> Option<(Duration, u64, usize)> {
        let mut best: Option<(Duration, u64, usize)> = None;
        for (id, conn) in &self.conns {
            for (e, end) in conn.ends.iter().enumerate() {
                let End::Crsync(end) = end else { continue };
                let Some(at) = end.timeout else { continue };
                let paused = self.peers[self.peer_of(conn, e)].paused_until;
                let at = at
                    .saturating_duration_since(self.base)
                    .max(paused)
                    .max(self.now);
                if best.is_none_or(|(b, ..)| at < b) {
                    best = Some((at, *id, e));
                }
            }
        }
        best
    }

    /// Runs the scenario to quiescence after the heal.
    pub fn run(&mut self, heal_at: Duration) -> Result<(), String> {
        loop {
            if let Some(e) = self.error.take() {
                return Err(e);
            }
            let event_at = self.queue.peek().map(|Reverse(s)| s.at);
            let timer = self.next_timer();
            let use_timer = match (event_at, timer) {
                (Some(e), Some((t, ..))) => t < e,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (None, None) => return Err("nothing left to run".into()),
            };
            let at = if use_timer {
                timer.map_or(Duration::ZERO, |t| t.0)
            } else {
                event_at.unwrap_or_default()
            };
            let all_up = self.links.iter().all(|l| l.conn.is_some() || l.given_up);
            if self.healed.is_some() && all_up && at > self.last_activity + QUIET {
                self.stats.virtual_time = self.now;
                return Ok(());
            }
            if at > heal_at + HEAL_LIMIT {
                return Err(format!(
                    "no quiescence {}s after the heal: something keeps sending (last activity at {:.3}s)",
                    HEAL_LIMIT.as_secs(),
                    self.last_activity.as_secs_f64()
                ));
            }
            self.now = at.max(self.now);
            if use_timer {
                let Some((_, conn, end)) = timer else {
                    continue;
                };
                self.on_timer(conn, end);
                continue;
            }
            let Some(Reverse(scheduled)) = self.queue.pop() else {
                continue;
            };
            // A frozen peer takes nothing now; a frozen acceptor does not
            // answer a dial either.
            let mut held = self.target(&scheduled.event);
            if let Event::Redial { link, .. } = &scheduled.event {
                let acceptor = self.links[*link].acceptor;
                if self.peers[acceptor].paused_until > self.now {
                    held = Some(acceptor);
                }
            }
            if let Some(peer) = held.filter(|p| self.peers[*p].paused_until > self.now) {
                self.peers[peer].deferred.push_back(scheduled.event);
                continue;
            }
            self.handle(scheduled.event);
        }
    }

    fn on_timer(&mut self, conn: u64, end: usize) {
        let now = self.instant();
        let Some(e) = self.crsync_end(conn, end) else {
            return;
        };
        let before = e.timeout;
        e.session.handle(Input::Timeout, now);
        self.pump(conn, end);
        let after = self.crsync_end(conn, end).and_then(|e| e.timeout);
        if after.is_some() && after == before && after.is_some_and(|a| a <= now) {
            if self.spin.0 == self.now {
                self.spin.1 += 1;
            } else {
                self.spin = (self.now, 1);
            }
            if self.spin.1 > SPIN_LIMIT {
                self.fail(format!(
                    "timer spin: conn {conn} end {end}: poll_timeout stays at {:.3}s, which Input::Timeout does not move",
                    self.now.as_secs_f64()
                ));
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver {
                conn,
                to,
                msg,
                post,
                sent_at,
                relay,
            } => {
                if let Some(envelope) = relay {
                    // counted as stale when its session takes it
                    return self.relay_receive(conn, to, *msg, envelope, sent_at);
                }
                if let (Some(healed), Some(c)) = (self.healed, self.conns.get(&conn)) {
                    if sent_at < healed {
                        self.links[c.link].stale_received[to] += 1;
                    }
                }
                self.deliver(conn, to, *msg, post)
            }
            Event::MergeExec {
                peer,
                inc,
                conn,
                end,
                epoch,
                batch,
            } => {
                if self.peers[peer].inc != inc || !self.peers[peer].up {
                    return; // the process died before the merge committed
                }
                if self.crsync_end_of(conn, end, epoch).is_none() {
                    return; // the session that asked is gone (a relay end restarted)
                }
                // Now and then the store fails (busy, disk): nothing applied.
                let fails = self.healed.is_none() && self.rng.random_bool(STORE_FAILURE);
                let Some(store) = self.store(peer) else {
                    return;
                };
                let merged = if fails {
                    super::store::Merged {
                        result: Err(MergeFailure::Failed("injected store failure".into())),
                        notify: false,
                        won: 0,
                    }
                } else {
                    store.merge(&batch)
                };
                self.stats.merges += 1;
                match &merged.result {
                    Ok(_) if batch.part.is_some() => self.stats.parts_merged += 1,
                    Err(MergeFailure::Rejected(BatchRejection::PartGap { .. })) => {
                        self.stats.part_gaps += 1
                    }
                    _ => {}
                }
                let (n, won) = (batch.changes.len(), merged.won);
                self.note(|| Entry::Merge {
                    peer,
                    conn,
                    changes: n,
                    result: match &merged.result {
                        Ok(o) => format!(
                            "ok, {won} won, cursor {}",
                            super::trace::fmt_cursor(&o.cursor)
                        ),
                        Err(e) => format!("{e:?}"),
                    },
                });
                if merged.notify {
                    self.notify(peer);
                }
                let delay = self.jitter(3);
                self.schedule_in(
                    delay,
                    Event::MergeDone {
                        conn,
                        end,
                        epoch,
                        result: merged.result,
                    },
                );
            }
            Event::MergeDone {
                conn,
                end,
                epoch,
                result,
            } => {
                let now = self.instant();
                if let Some(e) = self.crsync_end_of(conn, end, epoch) {
                    e.session.handle(Input::Merged(result), now);
                    self.pump(conn, end);
                }
            }
            Event::FeedBatch { conn, end, epoch } => {
                let now = self.instant();
                let Some(e) = self.crsync_end_of(conn, end, epoch) else {
                    return;
                };
                e.feeding = false;
                if e.session.wants_batch() {
                    if let Some(stream) = e.stream.as_mut() {
                        match stream.pop_front() {
                            Some((batch, read_upto)) => {
                                e.session.handle(Input::Batch { batch, read_upto }, now)
                            }
                            None => {
                                e.stream = None;
                                e.session.handle(Input::StreamEnded, now);
                            }
                        }
                    }
                }
                self.pump(conn, end);
            }
            Event::Notify { peer, inc } => {
                self.peers[peer].notify_pending = false;
                if self.peers[peer].inc != inc || !self.peers[peer].up {
                    return;
                }
                let Some(store) = self.store(peer) else {
                    return;
                };
                let cursor = store.cursor();
                self.each_session(peer, |s, now| {
                    s.handle(
                        Input::LocalChanged {
                            cursor: cursor.clone(),
                        },
                        now,
                    )
                });
            }
            Event::V1Page { conn, end, job } => self.v1_page(conn, end, job),
            Event::V1Poll { peer, inc } => self.v1_poll(peer, inc),
            Event::V1Ping { conn, end } => {
                if self.conns.contains_key(&conn) {
                    let peer = self
                        .conns
                        .get(&conn)
                        .map(|c| self.peer_of(c, end))
                        .unwrap_or(0);
                    if let Some(v1) = self.v1(peer) {
                        let ping = v1.ping();
                        self.send(conn, end, ping);
                    }
                    self.schedule_in(Duration::from_secs(30), Event::V1Ping { conn, end });
                }
            }
            Event::Cut { conn } => {
                if self.is_relay(conn) {
                    self.relay_resubscribe(conn);
                } else {
                    self.close_conn(conn, "connection lost")
                }
            }
            Event::Redial { link, token } => {
                if self.links[link].token == token && self.links[link].conn.is_none() {
                    self.dial(link);
                }
            }
            Event::PeerUp { peer, inc } => {
                if self.peers[peer].inc == inc && !self.peers[peer].up {
                    self.peer_up(peer);
                }
            }
            Event::Resume { peer } => {
                if self.peers[peer].paused_until <= self.now {
                    self.resume(peer);
                }
            }
            Event::Op(op) => self.op(op),
            Event::Heal => self.heal(),
            Event::Attack(n) => self.attack(n),
            Event::RelayHold {
                conn,
                to,
                epoch,
                expect,
            } => self.relay_hold_ends(conn, to, epoch, expect),
        }
    }

    /// The hostile peer sends a forged message on its connection, if it is up
    /// and connected (only before the heal: attacks are scheduled before it).
    fn attack(&mut self, n: usize) {
        let Some(h) = &self.hostile else { return };
        let (peer, link) = (h.peer, h.link);
        let Some((_, attack)) = h.attacks.get(n).cloned() else {
            return;
        };
        if !self.peers[peer].up || self.healed.is_some() {
            return;
        }
        let Some(conn) = self.links[link].conn else {
            return;
        };
        let (message, forged) = hostile::message(&attack, peer, self.peers.len());
        self.note(|| Entry::Note(format!("p{peer} (hostile) sends {}", attack.describe())));
        self.last_activity = self.now;
        for (key, version) in forged {
            self.stats.versions_written += 1;
            self.forged.entry(key).or_default().push(version);
        }
        self.send(conn, 0, message);
    }

    /// Ends a pause: what it held happens now, in order.
    fn resume(&mut self, peer: usize) {
        self.peers[peer].paused_until = Duration::ZERO;
        while let Some(event) = self.peers[peer].deferred.pop_front() {
            self.schedule_at(self.now, event);
        }
    }

    /// Every session of a peer takes an input.
    fn each_session(&mut self, peer: usize, f: impl Fn(&mut Session, Instant)) {
        let now = self.instant();
        let ends: Vec<(u64, usize)> = self
            .conns
            .iter()
            .flat_map(|(id, c)| {
                (0..2)
                    .filter(|e| self.peer_of(c, *e) == peer && matches!(c.ends[*e], End::Crsync(_)))
                    .map(move |e| (*id, e))
            })
            .collect();
        for (conn, end) in ends {
            if let Some(e) = self.crsync_end(conn, end) {
                f(&mut e.session, now);
                self.pump(conn, end);
            }
        }
    }

    fn notify(&mut self, peer: usize) {
        if !self.peers[peer].notify_pending {
            self.peers[peer].notify_pending = true;
            let inc = self.peers[peer].inc;
            let delay = self.jitter(10);
            self.schedule_in(delay, Event::Notify { peer, inc });
        }
    }

    // ---- the driver of one crsync session (peer/src/peer/session.rs)

    fn pump(&mut self, conn: u64, end: usize) {
        let now = self.instant();
        for _ in 0..100_000 {
            let Some(e) = self.crsync_end(conn, end) else {
                return;
            };
            if let Some(output) = e.session.poll_output() {
                self.on_output(conn, end, output);
                continue;
            }
            if e.session.has_transmit() {
                if let Some(mut message) = e.session.poll_transmit(now) {
                    if message.data.as_ref().is_some_and(|d| d.encoded.is_some()) {
                        // Encoded once in the live tail: through wire JSON,
                        // as every real transport sends it.
                        message = TransportMessage::from_json(&message.to_json())
                            .expect("a message encoded from the live tail decodes");
                    }
                    self.send(conn, end, message);
                    continue;
                }
            }
            if !e.session.is_busy() {
                if let Some((message, reply, earlier)) = e.inbox.pop_front() {
                    let summary = self.trace.is_some().then(|| Summary::of(&message));
                    if let Some(e) = self.crsync_end(conn, end) {
                        let input = if earlier {
                            Input::ReceivedEarlier { message, reply }
                        } else {
                            Input::Received { message, reply }
                        };
                        e.session.handle(input, now);
                    }
                    if let Some(msg) = summary {
                        self.note(|| Entry::Note(format!("conn {conn} end {end} takes {msg:?}")));
                    }
                    continue;
                }
            }
            if e.session.wants_batch() && e.stream.is_some() && !e.feeding {
                e.feeding = true;
                let epoch = e.epoch;
                let delay = self.jitter(2);
                self.schedule_in(delay, Event::FeedBatch { conn, end, epoch });
                continue;
            }
            e.timeout = e.session.poll_timeout();
            return;
        }
        self.fail(format!("conn {conn} end {end}: the session never settles"));
    }

    fn on_output(&mut self, conn: u64, end: usize, output: Output) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let peer = self.peer_of(c, end);
        let kind = self.links[c.link].kind;
        match output {
            Output::Merge(batch) => {
                let inc = self.peers[peer].inc;
                let epoch = self.crsync_end(conn, end).map_or(0, |e| e.epoch);
                let delay = self.jitter(20);
                self.schedule_in(
                    delay,
                    Event::MergeExec {
                        peer,
                        inc,
                        conn,
                        end,
                        epoch,
                        batch,
                    },
                );
            }
            Output::Read { from, hint } => {
                self.stats.reads += 1;
                self.last_activity = self.now;
                let link = c.link;
                let previous = self.crsync_end(conn, end).map_or(0, |e| {
                    std::mem::replace(&mut e.last_read_after, hint.after_local)
                });
                if self.healed.is_some() && hint.after_local == 0 && previous > 0 {
                    // a rewind (gap, ack timeout, pause); a new request counts below
                    self.links[link].healed_restarts[end] += 1;
                }
                if self.healed.is_none() && self.rng.random_bool(STORE_FAILURE) {
                    self.note(|| Entry::Note(format!("p{peer} conn {conn}: read fails")));
                    let now = self.instant();
                    if let Some(e) = self.crsync_end(conn, end) {
                        e.session
                            .handle(Input::StreamFailed("injected read failure".into()), now);
                    }
                    return;
                }
                let Some(store) = self.store(peer) else {
                    return;
                };
                let batches = store.read(&from, &hint);
                let after_local = hint.after_local;
                let n = batches.len();
                self.note(|| Entry::Read {
                    peer,
                    conn,
                    from: super::trace::fmt_cursor(&from),
                    after_local,
                    skip: hint.skip_local.clone(),
                    batches: n,
                    detail: batches
                        .iter()
                        .map(|(b, upto)| {
                            let changes: Vec<String> = b
                                .changes
                                .iter()
                                .map(|c| {
                                    let key = CellKey::parse(&c.table, &c.pk, &c.cid);
                                    format!(
                                        "p{}@{}{:?}",
                                        super::trace::peer_index(&c.site_id),
                                        c.db_version.0,
                                        key.map(|k| (k.table, k.pk, k.col))
                                    )
                                })
                                .collect();
                            let ranges: Vec<String> = b
                                .ranges
                                .iter()
                                .map(|(s, r)| {
                                    format!(
                                        "p{}:({},{}]",
                                        super::trace::peer_index(s),
                                        r.after.0,
                                        r.upto.0
                                    )
                                })
                                .collect();
                            format!(
                                "[{}] ranges {{{}}} upto {upto}",
                                changes.join(" "),
                                ranges.join(" ")
                            )
                        })
                        .collect(),
                });
                if let Some(e) = self.crsync_end(conn, end) {
                    e.stream = Some(batches);
                }
            }
            Output::CancelRead => {
                if let Some(e) = self.crsync_end(conn, end) {
                    e.stream = None;
                }
            }
            Output::Reply { id, result } => {
                let known = self
                    .crsync_end(conn, end)
                    .is_some_and(|e| e.open_replies.remove(&id));
                if !known {
                    self.fail(format!(
                        "conn {conn} end {end}: reply {id} was never asked for or is answered twice"
                    ));
                }
                self.note(|| Entry::Note(format!("conn {conn}: reply {id}: {result:?}")));
                // A crsync SSE client counts these refusals as delivered; any
                // other failure ends its sink, and the connection.
                if kind == LinkKind::SseCrsync {
                    if let Err(r) = result {
                        let recoverable = matches!(
                            r.code,
                            ErrorCode::Gap
                                | ErrorCode::InvalidChange
                                | ErrorCode::SchemaOutdated
                                | ErrorCode::Malformed
                        );
                        if !recoverable {
                            let delay = self.latency(conn);
                            self.schedule_in(delay, Event::Cut { conn });
                        }
                    }
                }
            }
            Output::Event(event) => {
                if self.healed.is_some() && event == SessionEvent::SyncRequested {
                    self.links[c.link].healed_restarts[end] += 1;
                    if let Some(e) = self.crsync_end(conn, end) {
                        e.last_read_after = 0;
                    }
                }
                self.note(|| Entry::Note(format!("p{peer} conn {conn}: {event:?}")));
            }
            Output::Close(reason) => {
                self.note(|| Entry::Note(format!("p{peer} conn {conn}: close: {reason}")));
                let conflict = matches!(
                    &reason,
                    CloseReason::SiteIdConflict { .. }
                        | CloseReason::Refused {
                            code: ErrorCode::SiteIdConflict,
                            ..
                        }
                );
                if let (true, Some(c)) = (conflict, self.conns.get(&conn)) {
                    let link = c.link;
                    self.links[link].given_up = true;
                }
                if !conflict && self.is_relay(conn) {
                    // The relays stay: the Peer dials anew, a new session.
                    self.relay_new_session(conn, end, None);
                    return;
                }
                self.close_conn(conn, "closed by a session");
            }
        }
    }

    fn latency(&mut self, conn: u64) -> Duration {
        let faults = self.faults(conn);
        ms(faults.latency_ms) + self.jitter(faults.jitter_ms)
    }

    fn faults(&self, conn: u64) -> Faults {
        match (self.healed, self.conns.get(&conn)) {
            (None, Some(c)) => self.links[c.link].faults,
            _ => Faults::NONE,
        }
    }

    /// Puts a message on the wire, with the link's faults.
    fn send(&mut self, conn: u64, from: usize, msg: TransportMessage) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let link = c.link;
        let kind = self.links[link].kind;
        let dir = direction(kind, from);
        let (from_peer, to_peer) = (self.peer_of(c, from), self.peer_of(c, 1 - from));
        if dir.skips_control
            && matches!(
                msg.kind,
                MessageKind::Connect | MessageKind::Ping | MessageKind::Error
            )
        {
            return;
        }
        self.stats.messages += 1;
        if msg.kind != MessageKind::Ping {
            self.last_activity = self.now;
        }
        if let Some(data) = &msg.data {
            if !data.data.is_empty() {
                self.stats.data_messages += 1;
                self.stats.changes_sent += data.data.len() as u64;
                if self.healed.is_some() {
                    self.links[link].healed_changes[from] += data.data.len() as u64;
                }
            }
        }
        // Now and then through JSON text, as on a real wire.
        let msg = if self.rng.random_bool(0.1) {
            match TransportMessage::from_json(&msg.to_json()) {
                Ok(back) => back,
                Err(e) => {
                    self.fail(format!(
                        "a message does not survive JSON: {e}: {}",
                        msg.to_json()
                    ));
                    return;
                }
            }
        } else {
            msg
        };
        self.note(|| Entry::Send {
            conn,
            from: from_peer,
            to: to_peer,
            msg: Summary::of(&msg),
        });
        if kind == LinkKind::Relay {
            self.relay_publish(conn, from, msg);
            return;
        }
        let faults = self.faults(conn);
        let latency = self.latency(conn);
        if dir.ordered {
            if self.conns.get(&conn).is_some_and(|c| c.broken[from]) {
                return;
            }
            if self.rng.random_bool(faults.cut) {
                // Lost on a stream that must not lose: the connection breaks.
                self.note(|| Entry::Drop {
                    conn,
                    from: from_peer,
                    to: to_peer,
                    msg: Summary::of(&msg),
                });
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.broken[from] = true;
                }
                self.schedule_in(latency, Event::Cut { conn });
                return;
            }
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            let at = if dir.serial {
                self.now.max(c.last[from]) + latency
            } else {
                (self.now + latency).max(c.last[from])
            };
            c.last[from] = at;
            self.schedule_at(
                at,
                Event::Deliver {
                    conn,
                    to: 1 - from,
                    msg: Box::new(msg),
                    post: dir.post,
                    sent_at: self.now,
                    relay: None,
                },
            );
        } else {
            if self.rng.random_bool(faults.drop) {
                self.note(|| Entry::Drop {
                    conn,
                    from: from_peer,
                    to: to_peer,
                    msg: Summary::of(&msg),
                });
                return;
            }
            let copies = if self.rng.random_bool(faults.dup) {
                2
            } else {
                1
            };
            if copies == 2 {
                self.note(|| Entry::Dup { conn, to: to_peer });
            }
            for _ in 0..copies {
                let held = if self.rng.random_bool(faults.reorder) {
                    self.jitter(2_000)
                } else {
                    Duration::ZERO
                };
                let at = self.now + latency + held;
                self.schedule_at(
                    at,
                    Event::Deliver {
                        conn,
                        to: 1 - from,
                        msg: Box::new(msg.clone()),
                        post: dir.post,
                        sent_at: self.now,
                        relay: None,
                    },
                );
            }
        }
    }

    fn deliver(&mut self, conn: u64, to: usize, msg: TransportMessage, post: bool) {
        self.deliver_sent(conn, to, msg, post, None);
    }

    /// [`Self::deliver`] of a message sent at `sent_at`, if it may have
    /// been sent before the receiving session began (a relay's stored
    /// event): the session is told so when it was.
    pub(super) fn deliver_sent(
        &mut self,
        conn: u64,
        to: usize,
        msg: TransportMessage,
        post: bool,
        sent_at: Option<Duration>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        match &mut c.ends[to] {
            End::Crsync(e) => {
                let reply = post.then(|| {
                    e.next_reply += 1;
                    e.open_replies.insert(e.next_reply);
                    e.next_reply
                });
                let summary = self.trace.is_some().then(|| Summary::of(&msg));
                let earlier = sent_at.is_some_and(|at| at < e.started);
                e.inbox.push_back((msg, reply, earlier));
                if let Some(msg) = summary {
                    self.note(|| Entry::Deliver {
                        conn,
                        to,
                        msg,
                        reply,
                    });
                }
                self.pump(conn, to);
            }
            End::Down => {}
            End::V1(_) => {
                if self.trace.is_some() {
                    let msg = Summary::of(&msg);
                    self.note(|| Entry::Deliver {
                        conn,
                        to,
                        msg,
                        reply: None,
                    });
                }
                self.v1_receive(conn, to, msg);
            }
        }
    }

    // ---- the v1 peer's behaviour on a connection

    fn v1_end(&mut self, conn: u64, end: usize) -> Option<&mut V1End> {
        match self.conns.get_mut(&conn)?.ends.get_mut(end)? {
            End::V1(e) => Some(e),
            End::Crsync(_) | End::Down => None,
        }
    }

    fn v1_receive(&mut self, conn: u64, end: usize, msg: TransportMessage) {
        let Some(peer) = self.conns.get(&conn).map(|c| self.peer_of(c, end)) else {
            return;
        };
        match msg.kind {
            MessageKind::Connect => {
                let Some(e) = self.v1_end(conn, end) else {
                    return;
                };
                if !e.ready {
                    e.ready = true;
                    if let Some(v1) = self.v1(peer) {
                        let sync = v1.sync();
                        self.send(conn, end, sync);
                    }
                }
            }
            // An `ack` is a `sync` to v1, which knows no acks.
            MessageKind::Sync => {
                if let (Some(_), Some(c)) = (self.healed, self.conns.get(&conn)) {
                    self.links[c.link].healed_restarts[end] += 1;
                }
                let cursor = msg.cursor.unwrap_or_default();
                let counter = self.v1(peer).map_or(0, |v| v.counter);
                let Some(e) = self.v1_end(conn, end) else {
                    return;
                };
                // Live first, so nothing committed while the history is read is missed.
                e.live.get_or_insert(counter);
                e.next_job += 1;
                let job = e.next_job;
                e.job = Some((job, cursor, 0));
                let delay = ms(1) + self.jitter(10);
                self.schedule_in(delay, Event::V1Page { conn, end, job });
            }
            MessageKind::Data => {
                let Some(data) = msg.data else { return };
                if let Some(v1) = self.v1(peer) {
                    let won = v1.merge(&data);
                    self.stats.merges += 1;
                    self.note(|| Entry::Merge {
                        peer,
                        conn,
                        changes: data.data.len(),
                        result: format!("v1: {won} won"),
                    });
                }
            }
            MessageKind::Ping | MessageKind::Error => {}
        }
    }

    /// Sends the next page of a v1 `sync` answer; with
    /// [`Knobs::v1_interleaved_paging`] one page per event (merges may run
    /// between pages), else the whole answer at once, from one snapshot.
    fn v1_page(&mut self, conn: u64, end: usize, job: u64) {
        loop {
            if !self.v1_page_once(conn, end, job) || self.knobs.v1_interleaved_paging {
                return;
            }
        }
    }

    /// One page; whether more follow.
    fn v1_page_once(&mut self, conn: u64, end: usize, job: u64) -> bool {
        let Some(peer) = self.conns.get(&conn).map(|c| self.peer_of(c, end)) else {
            return false;
        };
        let Some(e) = self.v1_end(conn, end) else {
            return false;
        };
        let Some((id, cursor, offset)) = e.job.clone() else {
            return false;
        };
        if id != job {
            return false;
        }
        let Some(v1) = self.v1(peer) else {
            return false;
        };
        let (kept, full) = v1.page(&cursor, offset);
        let len = v1.page_size;
        let data = (!kept.is_empty()).then(|| v1.data(kept, false));
        let eose = (!full).then(|| v1.data(Vec::new(), true));
        if let Some(data) = data {
            self.send(conn, end, data);
        }
        let Some(e) = self.v1_end(conn, end) else {
            return false;
        };
        if let Some(eose) = eose {
            e.job = None;
            self.send(conn, end, eose);
            return false;
        }
        e.job = Some((id, cursor, offset + len));
        if self.knobs.v1_interleaved_paging {
            let delay = ms(1) + self.jitter(20);
            self.schedule_in(delay, Event::V1Page { conn, end, job });
        }
        true
    }

    fn v1_poll(&mut self, peer: usize, inc: u64) {
        if self.peers[peer].inc != inc || !self.peers[peer].up {
            return;
        }
        let ends: Vec<(u64, usize)> = self
            .conns
            .iter()
            .flat_map(|(id, c)| {
                (0..2)
                    .filter(|e| self.peer_of(c, *e) == peer && matches!(c.ends[*e], End::V1(_)))
                    .map(move |e| (*id, e))
            })
            .collect();
        for (conn, end) in ends {
            let Some(e) = self.v1_end(conn, end) else {
                continue;
            };
            let (Some(after), server) = (e.live, e.server) else {
                continue;
            };
            let Some(v1) = self.v1(peer) else { return };
            let rows = v1.live(after, !server);
            let top = rows.iter().map(|c| c.db_version).fold(after, i64::max);
            let pages: Vec<TransportMessage> = rows
                .chunks(v1.page_size)
                .map(|page| v1.data(page.to_vec(), false))
                .collect();
            if let Some(e) = self.v1_end(conn, end) {
                e.live = Some(top);
            }
            for page in pages {
                self.send(conn, end, page);
            }
        }
        self.schedule_in(Duration::from_secs(5), Event::V1Poll { peer, inc });
    }

    // ---- connections

    /// A new session at `peer`; `relay`: with the timings of a relay link
    /// (see `relay::SESSION_TIMINGS`).
    fn crsync_session(&mut self, peer: usize, side: Side, relay: bool) -> Option<CrsyncEnd> {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let Node::Crsync(store) = &self.peers[peer].node else {
            return None;
        };
        let (ack_timeout, ping_interval, liveness_timeout) = if relay {
            relay::SESSION_TIMINGS
        } else {
            (
                Duration::from_secs(10),
                Duration::from_secs(30),
                Some(Duration::from_secs(75)),
            )
        };
        let config = SessionConfig {
            window: self.peers[peer].window,
            ack_timeout,
            ping_interval,
            liveness_timeout,
            side,
            trust: if self.own_site_trust {
                Trust::default_for(side)
            } else {
                Trust::Full
            },
            ..SessionConfig::default()
        };
        let mut session = Session::new(
            config,
            store.site,
            store.cursor(),
            store.schema_version,
            self.instant(),
        );
        session.set_staged(store.staged_seqs());
        Some(CrsyncEnd {
            epoch,
            session,
            stream: None,
            feeding: false,
            inbox: VecDeque::new(),
            started: self.now,
            open_replies: BTreeSet::new(),
            next_reply: 0,
            timeout: None,
            last_read_after: 0,
        })
    }

    fn v1_conn_end(&self, peer: usize, server: bool) -> Option<V1End> {
        let Node::V1(_) = &self.peers[peer].node else {
            return None;
        };
        Some(V1End {
            server,
            ready: server,
            live: None,
            job: None,
            next_job: 0,
        })
    }

    fn dial(&mut self, link: usize) {
        let (dialer, acceptor, kind) = {
            let l = &self.links[link];
            (l.dialer, l.acceptor, l.kind)
        };
        if kind == LinkKind::Relay {
            self.relay_dial(link);
            return;
        }
        if !self.peers[dialer].up {
            return; // dials again when it is back
        }
        if !self.peers[acceptor].up {
            self.note(|| Entry::Note(format!("link {link}: dial failed, p{acceptor} is down")));
            self.redial_later(link);
            return;
        }
        let ends = match kind {
            LinkKind::Stream => (
                self.crsync_session(dialer, Side::Dialed, false)
                    .map(|e| End::Crsync(Box::new(e))),
                self.crsync_session(acceptor, Side::Accepted, false)
                    .map(|e| End::Crsync(Box::new(e))),
            ),
            LinkKind::SseCrsync => (
                self.crsync_session(dialer, Side::Dialed, false)
                    .map(|e| End::Crsync(Box::new(e))),
                self.crsync_session(acceptor, Side::Accepted, false)
                    .map(|e| End::Crsync(Box::new(e))),
            ),
            LinkKind::V1Client => (
                self.v1_conn_end(dialer, false).map(End::V1),
                self.crsync_session(acceptor, Side::Accepted, false)
                    .map(|e| End::Crsync(Box::new(e))),
            ),
            LinkKind::V1Server => (
                self.crsync_session(dialer, Side::Dialed, false)
                    .map(|e| End::Crsync(Box::new(e))),
                self.v1_conn_end(acceptor, true).map(End::V1),
            ),
            LinkKind::Relay => (None, None),
        };
        let (Some(a), Some(b)) = ends else {
            self.fail(format!("link {link}: peer kinds do not fit {kind:?}"));
            return;
        };
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
                "link {link}: p{dialer} -> p{acceptor} connected as conn {id} ({kind:?})"
            ))
        });
        let dialer_site = self.peers[dialer].site;
        match kind {
            LinkKind::Stream | LinkKind::Relay => {}
            // The SSE server synthesizes the client's `connect` (node-server host.rs).
            LinkKind::SseCrsync | LinkKind::V1Client => {
                let connect = TransportMessage {
                    crsync: (kind == LinkKind::SseCrsync).then(Hello::current),
                    ..TransportMessage::connect(dialer_site)
                };
                if let Some(e) = self.crsync_end(id, 1) {
                    e.inbox.push_back((connect, None, false));
                }
            }
            LinkKind::V1Server => {
                if let Some(v1) = self.v1(acceptor) {
                    let (connect, sync) = (v1.connect(), v1.sync());
                    self.send(id, 1, connect);
                    self.send(id, 1, sync);
                }
                self.schedule_in(Duration::from_secs(30), Event::V1Ping { conn: id, end: 1 });
            }
        }
        for end in 0..2 {
            self.pump(id, end);
        }
    }

    fn redial_later(&mut self, link: usize) {
        let l = &mut self.links[link];
        if l.given_up {
            return;
        }
        l.token += 1;
        let token = l.token;
        let cap = 500u64 << l.attempts.min(6);
        l.attempts += 1;
        let delay = ms(250) + self.jitter(cap.min(30_000));
        self.schedule_in(delay, Event::Redial { link, token });
    }

    fn close_conn(&mut self, conn: u64, why: &str) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let link = c.link;
        self.note(|| Entry::Note(format!("conn {conn} (link {link}) ends: {why}")));
        self.links[link].conn = None;
        self.redial_later(link);
    }

    fn peer_up(&mut self, peer: usize) {
        self.peers[peer].up = true;
        self.note(|| Entry::Note(format!("p{peer} is up")));
        self.relay_peer_up(peer);
        if matches!(self.peers[peer].node, Node::V1(_)) {
            let inc = self.peers[peer].inc;
            let delay = self.jitter(5_000);
            self.schedule_in(delay, Event::V1Poll { peer, inc });
        }
        for link in 0..self.links.len() {
            if self.links[link].dialer == peer
                && self.links[link].conn.is_none()
                && !self.links[link].given_up
            {
                self.links[link].token += 1;
                let token = self.links[link].token;
                let delay = self.jitter(500);
                self.schedule_in(delay, Event::Redial { link, token });
            }
        }
    }

    fn record(&mut self, created: Vec<(CellKey, Version)>) {
        self.stats.versions_written += created.len() as u64;
        for (key, version) in created {
            match self.expected.get(&key) {
                Some(v) if cmp_versions(v, &version) != Ordering::Less => {}
                _ => {
                    self.expected.insert(key, version);
                }
            }
        }
    }

    fn op(&mut self, op: Op) {
        if self.healed.is_some()
            && matches!(op, Op::Cut { .. } | Op::Restart { .. } | Op::Pause { .. })
        {
            // A fault held back by a pause: faults end at the heal.
            return;
        }
        match op {
            Op::Write { peer, cells } => {
                if !self.peers[peer].up {
                    return;
                }
                self.last_activity = self.now;
                let created = match &mut self.peers[peer].node {
                    Node::Crsync(store) => store.write(&cells),
                    Node::V1(v1) => v1.write(&cells),
                };
                let n = created.len();
                self.note(|| {
                    Entry::Note(format!("p{peer} writes {} cells, {n} changed", cells.len()))
                });
                if n > 0 && matches!(self.peers[peer].node, Node::Crsync(_)) {
                    self.notify(peer);
                }
                self.record(created);
            }
            Op::Rewrite { peer, key } => {
                if !self.peers[peer].up {
                    return;
                }
                if let Some(store) = self.store(peer) {
                    if let Some(val) = store.cells.get(&key).map(|c| c.val.clone()) {
                        let created = store.write(&[(key, val)]);
                        debug_assert!(created.is_empty());
                        self.note(|| {
                            Entry::Note(format!("p{peer} rewrites {key:?} with its value"))
                        });
                    }
                }
            }
            Op::Cut { link } => {
                if let Some(conn) = self.links[link].conn {
                    if self.is_relay(conn) {
                        self.relay_resubscribe(conn);
                    } else {
                        self.close_conn(conn, "cut");
                    }
                }
            }
            Op::Restart { peer, down } => {
                if !self.peers[peer].up {
                    return;
                }
                let conns: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| (0..2).any(|e| self.peer_of(c, e) == peer))
                    .map(|(id, _)| *id)
                    .collect();
                for conn in conns {
                    if self.is_relay(conn) {
                        self.relay_end_down(conn, peer);
                    } else {
                        self.close_conn(conn, "peer restarts");
                    }
                }
                if let Some(store) = self.store(peer) {
                    store.restart();
                }
                let p = &mut self.peers[peer];
                p.inc += 1;
                p.up = false;
                p.notify_pending = false;
                let inc = p.inc;
                self.note(|| Entry::Note(format!("p{peer} restarts, down for {down:?}")));
                self.schedule_in(down, Event::PeerUp { peer, inc });
            }
            Op::Pause { peer, duration } => {
                let until = self.now + duration;
                let p = &mut self.peers[peer];
                p.paused_until = p.paused_until.max(until);
                let until = p.paused_until;
                self.schedule_at(until, Event::Resume { peer });
                self.note(|| Entry::Note(format!("p{peer} pauses for {duration:?}")));
            }
            Op::Upgrade { peer } => self.upgrade(peer),
        }
    }

    fn upgrade(&mut self, peer: usize) {
        if !self.peers[peer].up {
            return;
        }
        let Some(store) = self.store(peer) else {
            return;
        };
        if store.schema_version >= 2 {
            return;
        }
        store.schema_version = 2;
        self.note(|| Entry::Note(format!("p{peer} upgrades its schema to 2")));
        self.each_session(peer, |s, now| s.handle(Input::SchemaChanged(2), now));
    }

    /// Faults stop, every peer runs, every link connects; a v1 client's
    /// connection is made anew (its lost POSTs are only recovered by a
    /// reconnect, as in v1 itself).
    fn heal(&mut self) {
        self.healed = Some(self.now);
        self.last_activity = self.now;
        self.relay_heal();
        // What waits at an end from before the heal counts as stale too:
        // messages queued behind a merge, and the merge itself.
        let backlog: Vec<(usize, usize, u64)> = self
            .conns
            .values()
            .flat_map(|c| {
                c.ends
                    .iter()
                    .enumerate()
                    .filter_map(move |(e, end)| match end {
                        End::Crsync(x) => Some((
                            c.link,
                            e,
                            x.inbox.len() as u64 + u64::from(x.session.is_busy()),
                        )),
                        End::V1(_) | End::Down => None,
                    })
            })
            .collect();
        for (link, end, n) in backlog {
            self.links[link].stale_received[end] += n;
        }
        self.note(|| Entry::Note("heal".into()));
        for peer in 0..self.peers.len() {
            self.resume(peer);
            if !self.peers[peer].up {
                self.peer_up(peer);
            }
        }
        for peer in 0..self.peers.len() {
            self.upgrade(peer);
        }
        for link in 0..self.links.len() {
            if self.links[link].kind == LinkKind::V1Client {
                if let Some(conn) = self.links[link].conn {
                    self.close_conn(conn, "heal: the v1 client reconnects");
                }
            }
            if self.links[link].conn.is_none() {
                self.links[link].token += 1;
                self.links[link].attempts = 0;
                let token = self.links[link].token;
                let delay = self.jitter(100);
                self.schedule_in(delay, Event::Redial { link, token });
            }
        }
    }
}
