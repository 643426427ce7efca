//! [`Session`]: the protocol state machine of one connection to one remote.
//!
//! No I/O and no clock: the driver feeds [`Input`]s with the current time and
//! performs what the session asks for ([`Output`]s, messages from
//! [`Session::poll_transmit`], a wake-up at [`Session::poll_timeout`]).
//!
//! What it decides:
//! - **Incoming**: one message at a time. A `data` message becomes one
//!   [`Output::Merge`]; the next message waits until [`Input::Merged`]
//!   ([`Session::is_busy`]). A refused merge is answered with its code, on the
//!   per-message reply when the transport has one (HTTP `POST`), else in-band.
//! - **Outgoing**: on the remote's `sync` request it asks for a stream of what
//!   the remote's cursor lacks ([`Output::Read`]), sends it within the
//!   [window](crate::proto::window::OutgoingWindow), ends it with `eose`, then
//!   follows local changes. After a gap, a lost acknowledgement or a new
//!   request it starts again from what the remote acknowledged.
//! - **v1 remotes** (no crsync hello, no ranges): their changes are unranged
//!   (applied, cursor unmoved: their versions have holes and their batches may
//!   split a transaction), and no v1 message is evidence for a cursor: a v1
//!   sender pages with LIMIT/OFFSET and no snapshot, so a row overwritten
//!   while it pages shifts the offsets and another row is skipped in that
//!   round, unseen. Its versions are asked for again at every connect. Of a
//!   v1 remote's cursor only its own entry is believed (see `v1_claims`).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

mod io;

pub use io::{
    CloseReason, Input, MergeFailure, MergeOutcome, Output, ReplyId, SessionConfig, SessionEvent,
    Side,
};

use crate::proto::received::ReceivedRun;
use crate::proto::trust::{OWN_SITE, Trust, believe, own_version_conflict};
use crate::proto::window::{OutgoingWindow, Phase, SyncOutcome};
use crate::proto::{
    ErrorCode, InitialProgress, Message, ParsedData, SenderAction, SessionPhase, SessionStatus,
};
use crate::transport::Rejection;
use crate::wire::{Encoding, Hello, MessageKind, TransportMessage};
use crate::{ChangeBatch, Cursor, DbVersion, ReadHint, SiteId, VersionRange};

/// Control messages (errors, pings) kept while the connection is busy; more are dropped.
const MAX_PENDING_CONTROL: usize = 32;
/// Messages received while a merge runs, kept in order.
const MAX_QUEUED_MESSAGES: usize = 64;
/// How long to wait before reading again after a read failed.
const READ_RETRY: Duration = Duration::from_secs(1);
/// A live batch that only claims versions (no changes: the remote's own
/// rows, merged here) goes at most this often; the claims in between ride
/// on the next one. The remote acknowledges each with a message of its
/// own, over HTTP a `POST`, one at a time: claiming every merge of a
/// writer's batches back to it took half of the writer's `POST`s.
const LIVE_CLAIM_EVERY: Duration = Duration::from_millis(500);
/// Staged transactions read from one remote's hello at most.
const MAX_STAGED_CLAIMS: usize = 64;

/// A merge in progress.
#[derive(Debug)]
struct PendingMerge {
    reply: Option<ReplyId>,
    eose: bool,
    /// What the remote holds, by its own ranges.
    holds: Cursor,
    /// The message's number, counted once it is merged.
    number: Option<(u64, u64)>,
}

/// What a numbered message that came ahead of a hole in its run claimed,
/// believed once the messages before it arrived. (Its `eose` is taken at
/// once: a stream that ends with a hole in it is sent again from the
/// acknowledged point after the acknowledgement timeout, like any other.)
type HeldClaims = BTreeMap<SiteId, VersionRange>;

/// Claims held for messages ahead of a hole, at most; later ones are
/// forgotten (the sender sends them again after its acknowledgement timeout).
const MAX_HELD_CLAIMS: usize = 1024;

/// The protocol state of one connection. See the [module docs](self).
///
/// ```
/// use std::time::Instant;
/// use crsync_peer::proto::{Input, Output, Session, SessionConfig};
/// use crsync_peer::wire::TransportMessage;
/// use crsync_peer::{Cursor, SiteId};
/// let (a, b) = (SiteId::from_bytes([1; 16]), SiteId::from_bytes([2; 16]));
/// let now = Instant::now();
/// let mut session = Session::new(SessionConfig::default(), a, Cursor::new(), 0, now);
/// // First our `connect`, then our request.
/// assert_eq!(session.poll_transmit(now).unwrap().kind, crsync_peer::wire::MessageKind::Connect);
/// assert_eq!(session.poll_transmit(now).unwrap().kind, crsync_peer::wire::MessageKind::Sync);
/// // The remote asks for everything: the session wants a stream read.
/// session.handle(Input::Received { message: TransportMessage::sync(b, Cursor::new()), reply: None }, now);
/// let outputs: Vec<Output> = std::iter::from_fn(|| session.poll_output()).collect();
/// assert!(outputs.iter().any(|o| matches!(o, Output::Read { .. })));
/// ```
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    local: SiteId,
    remote: Option<SiteId>,
    /// The remote said it is a crsync peer: it reads our acknowledgements.
    remote_is_crsync: bool,
    /// The remote believes our ranges only about our own site.
    remote_believes_own_site: bool,
    encoding: Encoding,
    window: OutgoingWindow,
    /// Our cursor, as the driver last told us.
    cursor: Cursor,
    /// Our cursor when the session began, until the remote's first cursor
    /// is checked against it (see `check_site_conflict`).
    held_at_start: Option<Cursor>,
    schema_version: i64,
    // ---- outgoing stream
    reading: bool,
    need_stream: bool,
    buffered: Option<(ChangeBatch, i64)>,
    eose_pending: bool,
    /// A read failed, or a live claim waits: read again at this time.
    retry_read: Option<Instant>,
    /// When the last live batch without changes was buffered to send.
    last_live_claim: Option<Instant>,
    /// Rows the next stream may leave out: every row at a local version up to
    /// `after_local` was sent (or held) since the stream last started from the
    /// remote's acknowledged point, and rows merged from this remote.
    hint: ReadHint,
    /// The remote's cursor in its latest request (not an acknowledgement).
    requested: Cursor,
    /// Our initial stream's progress: changes sent, and how many it holds at most.
    upload: InitialProgress,
    /// The remote's initial stream's progress, as far as it told us.
    download: InitialProgress,
    /// Ranges of the initial stream's change-less batches, sent with `eose`.
    eose_ranges: BTreeMap<SiteId, VersionRange>,
    // ---- incoming
    merging: Option<PendingMerge>,
    /// Messages that came during a merge, with whether each may predate
    /// the session ([`Input::ReceivedEarlier`]).
    queued: VecDeque<(TransportMessage, Option<ReplyId>, bool)>,
    /// How far the remote's numbered messages arrived, told in our acks.
    received: ReceivedRun,
    /// By message number: the claims of messages that came ahead of a hole.
    held_claims: BTreeMap<(u64, u64), HeldClaims>,
    eose_received: bool,
    awaiting_schema: Option<i64>,
    /// What we have staged of transactions in parts, told to the remote in
    /// our requests and acknowledgements so that it resumes them.
    staged: BTreeMap<(SiteId, DbVersion), i64>,
    // ---- control
    control: VecDeque<TransportMessage>,
    request_pending: bool,
    ack_pending: bool,
    // ---- timers
    last_request: Instant,
    last_progress_in: Instant,
    last_received: Instant,
    last_ping: Instant,
    // ---- bookkeeping
    outputs: VecDeque<Output>,
    closed: bool,
    changes_received: u64,
    changes_sent: u64,
    /// Ranges of the remote not believed (dropped or cut short).
    claims_refused: u64,
    last_error: Option<(ErrorCode, String)>,
}

impl Session {
    /// A new session; `cursor` and `schema_version` are ours now.
    pub fn new(
        config: SessionConfig,
        local: SiteId,
        cursor: Cursor,
        schema_version: i64,
        now: Instant,
    ) -> Self {
        let window = OutgoingWindow::new(config.window, false, now);
        let mut session = Session {
            config,
            local,
            remote: None,
            remote_is_crsync: false,
            remote_believes_own_site: false,
            encoding: Encoding::V1,
            window,
            held_at_start: Some(cursor.clone()),
            cursor,
            schema_version,
            reading: false,
            need_stream: false,
            buffered: None,
            eose_pending: false,
            retry_read: None,
            last_live_claim: None,
            hint: ReadHint::default(),
            requested: Cursor::new(),
            upload: InitialProgress::default(),
            download: InitialProgress::default(),
            eose_ranges: BTreeMap::new(),
            merging: None,
            queued: VecDeque::new(),
            received: ReceivedRun::default(),
            held_claims: BTreeMap::new(),
            eose_received: false,
            awaiting_schema: None,
            staged: BTreeMap::new(),
            control: VecDeque::new(),
            request_pending: true,
            ack_pending: false,
            last_request: now,
            last_progress_in: now,
            last_received: now,
            last_ping: now,
            outputs: VecDeque::new(),
            closed: false,
            changes_received: 0,
            changes_sent: 0,
            claims_refused: 0,
            last_error: None,
        };
        let connect = session.announce(TransportMessage::connect(local));
        session.control.push_back(connect);
        session
    }

    /// Tells the session what the store has staged of transactions in parts
    /// (see [`Store::staged`](crate::Store::staged)), before the first
    /// request goes out: the remote resumes them instead of starting over.
    pub fn set_staged(&mut self, staged: BTreeMap<(SiteId, DbVersion), i64>) {
        self.staged = staged;
    }

    /// Adds what we believe to the hello of `message`, for the remote to
    /// send us only claims we take, and on a `sync` what we have staged.
    fn announce(&self, mut message: TransportMessage) -> TransportMessage {
        let sync = message.kind == MessageKind::Sync;
        if let Some(hello) = message.crsync.as_mut() {
            if self.config.trust == Trust::OwnSite {
                hello.believes = Some(OWN_SITE.into());
            }
            if sync && !self.staged.is_empty() {
                let staged = self.staged.iter();
                let staged = staged.map(|((site, version), seq)| (site.to_hex(), version.0, *seq));
                hello.staged = Some(staged.collect());
            }
        }
        message
    }

    /// Takes what the remote's `sync` says it has staged: our streams to it
    /// resume those transactions.
    fn remote_staged(&mut self, hello: Option<&Hello>) {
        if self.remote_is_crsync {
            let mut staged = hello
                .map(|h| h.staged(MAX_STAGED_CLAIMS))
                .unwrap_or_default();
            if self.remote_believes_own_site {
                // We send it no parts of other sites' transactions (see `on_batch`).
                staged.retain(|(site, _), _| *site == self.local);
            }
            self.hint.staged = staged;
        }
    }

    /// The remote, once it said who it is.
    pub fn remote(&self) -> Option<SiteId> {
        self.remote
    }

    /// Whether a merge is running: hold further [`Input::Received`] until it ends.
    pub fn is_busy(&self) -> bool {
        self.merging.is_some() || self.queued.len() >= MAX_QUEUED_MESSAGES
    }

    /// Whether the session wants the next batch of its stream.
    pub fn wants_batch(&self) -> bool {
        !self.closed && self.reading && self.buffered.is_none() && !self.eose_pending
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) has a message now.
    pub fn has_transmit(&self) -> bool {
        !self.closed
            && (!self.control.is_empty()
                || self.request_pending
                || self.ack_pending
                || (self.window.can_send() && (self.buffered.is_some() || self.eose_pending)))
    }

    /// Work for the driver, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When to call back with [`Input::Timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let c = &self.config;
        let mut next = self.last_ping + c.ping_interval;
        if !self.eose_received {
            next = next.min(self.last_request.max(self.last_progress_in) + c.ack_timeout);
        }
        if let Some(at) = self.window.ack_deadline(c.ack_timeout) {
            next = next.min(at);
        }
        if let Some(at) = self.retry_read {
            next = next.min(at);
        }
        if let (Side::Dialed, Some(limit)) = (c.side, c.liveness_timeout) {
            next = next.min(self.last_received + limit);
        }
        Some(next)
    }

    /// The next message to send, when the connection can take one: control
    /// messages first, then our request or acknowledgement, then data.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<TransportMessage> {
        if self.closed {
            // Only the errors that explain the close are still sent.
            return self.control.pop_front();
        }
        if let Some(message) = self.control.pop_front() {
            return Some(message);
        }
        if std::mem::take(&mut self.request_pending) {
            self.ack_pending = false;
            self.last_request = now;
            let sync = TransportMessage::sync(self.local, self.cursor.clone());
            return Some(self.announce(sync));
        }
        if std::mem::take(&mut self.ack_pending) {
            let mut ack = self.announce(TransportMessage::ack(self.local, self.cursor.clone()));
            if let Some(hello) = ack.crsync.as_mut() {
                hello.received = self.received.received();
            }
            return Some(ack);
        }
        if !self.window.can_send() {
            return None;
        }
        if let Some((batch, read_upto)) = self.buffered.take() {
            let after = batch.cursor_after(self.window.sent());
            let number = self.window.on_sent(after, now);
            self.hint.delivered(read_upto);
            self.changes_sent += batch.changes.len() as u64;
            let initial = self.window.phase() == Phase::Initial;
            if initial {
                self.upload.done += batch.changes.len() as u64;
            }
            let mut message = TransportMessage::data(
                self.local,
                &batch,
                false,
                batch.schema_version.unwrap_or(self.schema_version),
                self.encoding,
            );
            message.n = self.remote_is_crsync.then_some(number);
            if initial && self.remote_is_crsync {
                message.total = self.upload.total;
            }
            self.drive();
            return Some(message);
        }
        if std::mem::take(&mut self.eose_pending) {
            let eose = ChangeBatch {
                ranges: std::mem::take(&mut self.eose_ranges),
                ..ChangeBatch::default()
            };
            let number = if eose.ranges.is_empty() {
                self.window.number()
            } else {
                let after = eose.cursor_after(self.window.sent());
                self.window.on_sent(after, now)
            };
            if self.window.phase() == Phase::Initial {
                self.upload.complete();
            }
            self.window.on_initial_complete();
            let mut message =
                TransportMessage::data(self.local, &eose, true, self.schema_version, self.encoding);
            message.n = self.remote_is_crsync.then_some(number);
            self.drive();
            return Some(message);
        }
        None
    }

    /// Where the session stands.
    pub fn status(&self) -> SessionStatus {
        let phase = if self.closed {
            SessionPhase::Closed
        } else if self.remote.is_none() {
            SessionPhase::Connecting
        } else if self.awaiting_schema.is_some() {
            SessionPhase::Outdated
        } else if self.window.is_paused() {
            SessionPhase::Paused
        } else if self.eose_received && self.window.phase() == Phase::Live {
            SessionPhase::Live
        } else {
            SessionPhase::Initial
        };
        SessionStatus {
            remote: self.remote,
            crsync: self.remote_is_crsync,
            phase,
            acknowledged: self.window.acked().clone(),
            requested: self.requested.clone(),
            in_flight: self.window.in_flight(),
            received_eose: self.eose_received,
            sent_eose: self.window.phase() == Phase::Live,
            changes_received: self.changes_received,
            changes_sent: self.changes_sent,
            download: self.download,
            upload: self.upload,
            claims_refused: self.claims_refused,
            last_error: self.last_error.clone(),
        }
    }

    /// Takes one input.
    pub fn handle(&mut self, input: Input, now: Instant) {
        if self.closed {
            return;
        }
        match input {
            Input::Received { message, reply } => self.take_in(message, reply, false, now),
            Input::ReceivedEarlier { message, reply } => self.take_in(message, reply, true, now),
            Input::Undecodable { error, reply } => {
                self.last_received = now;
                self.reject(reply, Rejection::new(ErrorCode::Malformed, error));
            }
            Input::Batch { batch, read_upto } => self.on_batch(batch, read_upto, now),
            Input::StreamOpened { total } => {
                if let (Some(total), Phase::Initial) = (total, self.window.phase()) {
                    // What is left, after what went already (a restarted
                    // stream sends some of it again).
                    self.upload.total = Some(self.upload.done + total);
                }
            }
            Input::StreamEnded => {
                self.reading = false;
                if self.window.phase() == Phase::Initial {
                    self.eose_pending = true;
                }
            }
            Input::StreamParked => {
                // The buffered batch is kept; rows after the last one
                // delivered are read again from `hint.after_local`.
                if self.reading {
                    self.reading = false;
                    self.need_stream = true;
                }
            }
            Input::StreamFailed(_) => {
                self.reading = false;
                self.retry_read = Some(now + READ_RETRY);
            }
            Input::Merged(result) => {
                self.merged(result, now);
                while self.merging.is_none() {
                    let Some((message, reply, earlier)) = self.queued.pop_front() else {
                        break;
                    };
                    self.receive(message, reply, earlier, now);
                }
            }
            Input::LocalChanged { cursor } => {
                self.cursor.join(&cursor);
                if self.window.phase() != Phase::AwaitingSync {
                    self.need_stream = true;
                }
            }
            Input::SchemaChanged(version) => {
                self.schema_version = version;
                if self.awaiting_schema.is_some_and(|theirs| version >= theirs) {
                    // Our schema caught up: ask again for what we declined.
                    self.awaiting_schema = None;
                    self.request_pending = true;
                }
            }
            Input::Timeout => self.on_timeout(now),
        }
        self.drive();
    }

    /// Opens a stream when one is needed and the window has room.
    fn drive(&mut self) {
        if self.closed || self.reading || !self.need_stream || !self.window.can_send() {
            return;
        }
        if self.buffered.is_some() || self.eose_pending {
            return;
        }
        self.need_stream = false;
        self.reading = true;
        let mut hint = self.hint.clone();
        hint.count = self.window.phase() == Phase::Initial;
        self.outputs.push_back(Output::Read {
            from: self.window.sent().clone(),
            hint,
        });
    }

    /// Drops the stream in progress; the next starts from the window's
    /// (possibly rewound) `sent`, with nothing counted as delivered.
    fn rewind_stream(&mut self) {
        if self.reading {
            self.outputs.push_back(Output::CancelRead);
        }
        self.reading = false;
        self.buffered = None;
        self.eose_pending = false;
        self.need_stream = true;
        self.hint.after_local = 0;
    }

    fn on_batch(&mut self, mut batch: ChangeBatch, read_upto: i64, now: Instant) {
        if !self.reading {
            return; // from a stream already cancelled
        }
        if self.remote_believes_own_site {
            // Claims it would drop would never be acknowledged: the other
            // sites' changes go unranged (applied, re-sent after a reconnect).
            batch.ranges.retain(|site, _| *site == self.local);
            // Nor would it take the last part of another site's transaction
            // as completing it: those go as plain batches, applied as they come.
            batch.part = batch.part.filter(|p| p.site == self.local);
        }
        // Our store holds what it read, even before its change event reaches
        // us: our own entry must never lag what a remote may learn from us.
        let own = batch.changes.iter().filter(|c| c.site_id == self.local);
        if let Some(newest) = own.map(|c| c.db_version).max() {
            self.cursor.advance(self.local, newest);
        }
        if let Some(range) = batch.ranges.get(&self.local) {
            self.cursor.advance(self.local, range.upto);
        }
        if batch.changes.is_empty() {
            // Only version bumps (versions whose rows the remote has or that
            // were overwritten). In the initial stream they ride on `eose`.
            // Live, they go to a crsync remote on their own, so that its
            // cursor ends equal to ours (merging them writes no rows, so they
            // start nothing in return); a v1 remote reads no ranges.
            let live_claim = self.window.phase() == Phase::Live
                && self.remote_is_crsync
                && !batch.ranges.is_empty();
            if !live_claim {
                self.hint.delivered(read_upto);
                if self.window.phase() == Phase::Initial {
                    self.eose_ranges.extend(batch.ranges);
                }
                return;
            }
            if let Some(due) = (self.last_live_claim)
                .map(|at| at + LIVE_CLAIM_EVERY)
                .filter(|due| now < *due)
            {
                // Too soon after the last: this stream is dropped, and the
                // next (at the latest then) claims these versions too.
                self.outputs.push_back(Output::CancelRead);
                self.reading = false;
                self.retry_read = Some(self.retry_read.map_or(due, |at| at.min(due)));
                return;
            }
            self.last_live_claim = Some(now);
        }
        self.buffered = Some((batch, read_upto));
    }

    fn on_timeout(&mut self, now: Instant) {
        let c = self.config.clone();
        if self.retry_read.is_some_and(|at| now >= at) {
            self.retry_read = None;
            self.need_stream = true;
        }
        if now.duration_since(self.last_ping) >= c.ping_interval {
            self.last_ping = now;
            self.push_control(TransportMessage::ping(self.local));
        }
        let stalled_since = self.last_request.max(self.last_progress_in);
        if !self.eose_received && now.duration_since(stalled_since) >= c.ack_timeout {
            // Our request, or the remote's eose, may have been lost: ask again.
            self.request_pending = true;
            self.last_request = now;
        }
        if self.window.check_ack_timeout(now, c.ack_timeout) {
            self.rewind_stream();
        }
        if let (Side::Dialed, Some(limit)) = (c.side, c.liveness_timeout) {
            if now.duration_since(self.last_received) >= limit {
                self.close(CloseReason::Timeout(limit));
            }
        }
    }

    fn push_control(&mut self, message: TransportMessage) {
        if self.control.len() < MAX_PENDING_CONTROL {
            self.control.push_back(message);
        }
    }

    fn close(&mut self, reason: CloseReason) {
        if !self.closed {
            self.outputs.push_back(Output::Close(reason));
            self.control.retain(|m| m.kind == MessageKind::Error);
        }
        self.closed = true;
    }

    /// Whether messages explaining the close are left to send (drain them
    /// with [`poll_transmit`](Self::poll_transmit) after [`Output::Close`]).
    pub fn has_farewell(&self) -> bool {
        self.closed && !self.control.is_empty()
    }

    fn event(&mut self, event: SessionEvent) {
        self.outputs.push_back(Output::Event(event));
    }

    /// Refuses a message: an event, the reply if there is one, and in-band
    /// when there is no reply or the refusal must pause the sender (an HTTP
    /// client counts any answer as delivered).
    fn reject(&mut self, reply: Option<ReplyId>, rejection: Rejection) {
        self.last_error = Some((rejection.code.clone(), rejection.message.clone()));
        if self.remote.is_some() {
            self.event(SessionEvent::Rejected {
                code: rejection.code.clone(),
                message: rejection.message.clone(),
                by_remote: false,
            });
        }
        let pauses = rejection.code.sender_action() == SenderAction::Pause;
        if reply.is_none() || pauses {
            self.push_control(TransportMessage::error(
                self.local,
                &rejection.code,
                rejection.message.clone(),
            ));
        }
        if let Some(id) = reply {
            self.outputs.push_back(Output::Reply {
                id,
                result: Err(rejection),
            });
        }
    }

    fn accept(&mut self, reply: Option<ReplyId>) {
        if let Some(id) = reply {
            self.outputs.push_back(Output::Reply { id, result: Ok(()) });
        }
    }

    /// A message arrived: taken now, or queued while a merge runs.
    fn take_in(
        &mut self,
        message: TransportMessage,
        reply: Option<ReplyId>,
        earlier: bool,
        now: Instant,
    ) {
        self.last_received = now;
        if self.merging.is_some() {
            if self.queued.len() < MAX_QUEUED_MESSAGES {
                self.queued.push_back((message, reply, earlier));
            } else if let Some(id) = reply {
                let r = Rejection::new(ErrorCode::Internal, "too many messages queued");
                self.outputs.push_back(Output::Reply { id, result: Err(r) });
            }
        } else {
            self.receive(message, reply, earlier, now);
        }
    }

    /// `earlier`: the message may predate the session (see [`Input::ReceivedEarlier`]).
    fn receive(
        &mut self,
        message: TransportMessage,
        reply: Option<ReplyId>,
        earlier: bool,
        now: Instant,
    ) {
        let javascript = !self.remote_is_crsync;
        let (sender, message) = match Message::parse(message, javascript) {
            Ok(parsed) => parsed,
            Err(e) => {
                return self.reject(reply, Rejection::new(ErrorCode::Malformed, e.to_string()));
            }
        };
        if let Err(rejection) = self.identify(sender) {
            return self.reject(reply, rejection);
        }
        if self.closed {
            return;
        }
        if let Err(rejection) = self.check_claim_size(&message) {
            return self.reject(reply, rejection);
        }
        match message {
            Message::Connect { hello } => {
                self.hello(hello.as_ref());
                self.accept(reply);
            }
            Message::Ping => self.accept(reply),
            Message::SyncRequest { cursor, hello } => {
                self.hello(hello.as_ref());
                if self.check_site_conflict(&cursor, reply, earlier) {
                    return;
                }
                self.remote_staged(hello.as_ref());
                self.on_sync(cursor, false, None, now);
                self.accept(reply);
            }
            Message::Ack { cursor, hello } => {
                self.hello(hello.as_ref());
                if self.check_site_conflict(&cursor, reply, earlier) {
                    return;
                }
                self.remote_staged(hello.as_ref());
                let received = hello.as_ref().and_then(|h| h.received);
                self.on_sync(cursor, true, received, now);
                self.accept(reply);
            }
            Message::Error { code, message } => {
                self.on_remote_error(code, message, now);
                self.accept(reply);
            }
            Message::Data(data) => self.on_data(data, reply, now),
        }
    }

    fn identify(&mut self, sender: SiteId) -> Result<(), Rejection> {
        match self.remote {
            Some(remote) if remote != sender => Err(Rejection::new(
                ErrorCode::PeerMismatch,
                format!("message from {sender} on a connection with {remote}"),
            )),
            Some(_) => Ok(()),
            None if sender == self.local => {
                self.close(CloseReason::ConnectedToSelf);
                Err(Rejection::new(
                    ErrorCode::PeerMismatch,
                    "connected to ourselves",
                ))
            }
            None => {
                self.remote = Some(sender);
                self.event(SessionEvent::Identified(sender));
                Ok(())
            }
        }
    }

    fn hello(&mut self, hello: Option<&Hello>) {
        if let Some(h) = hello {
            self.remote_believes_own_site = h.believes.as_deref() == Some(OWN_SITE);
            self.window.set_numbered(h.version >= 2);
        }
        if hello.is_some() && !self.remote_is_crsync {
            self.encoding = Hello::encoding(hello);
            self.remote_is_crsync = true;
            self.window.set_acks_expected(true);
        }
    }

    /// Refuses a cursor or a range map with more sites than we accept.
    fn check_claim_size(&self, message: &Message) -> Result<(), Rejection> {
        let (what, sites) = match message {
            Message::SyncRequest { cursor, .. } | Message::Ack { cursor, .. } => {
                ("cursor", cursor.len())
            }
            Message::Data(data) => ("ranges", data.batch.ranges.len()),
            _ => return Ok(()),
        };
        let limit = self.config.max_claim_sites;
        if sites > limit {
            return Err(Rejection::new(
                ErrorCode::LimitExceeded,
                format!("{what} names {sites} sites; at most {limit} are accepted"),
            ));
        }
        Ok(())
    }

    /// Refuses the remote when its cursor shows that one of us is a copy of
    /// a replica that went on writing under the same site id. A cursor that
    /// may predate the session (`earlier`) is checked only for what it says
    /// of us.
    fn check_site_conflict(
        &mut self,
        theirs: &Cursor,
        reply: Option<ReplyId>,
        earlier: bool,
    ) -> bool {
        let Some(remote) = self.remote.filter(|_| self.remote_is_crsync) else {
            return false;
        };
        let our_own = self.cursor.get(&self.local);
        // What the remote says of itself is compared with what we held when
        // the session began, in its first cursor only: by then the remote
        // had sent us all of that (on earlier connections), while a later or
        // duplicated message may be older than what it sent since. A cursor
        // written before the session began (a relay's stored request) may
        // also be older than what reached us of the remote by another path
        // meanwhile: it is not compared, and the next one is.
        let held = if earlier {
            Cursor::new()
        } else {
            self.held_at_start.take().unwrap_or_default()
        };
        // Under own-site trust the remote's claims about other sites (ours
        // included) are not believed: only what it says of itself counts.
        let about_us = self.config.trust == Trust::Full;
        let Some(conflict) =
            own_version_conflict(theirs, self.local, our_own, about_us, remote, &held)
        else {
            return false;
        };
        let message = conflict.message(self.local, remote);
        let code = ErrorCode::SiteIdConflict;
        self.reject(reply, Rejection::new(code.clone(), message.clone()));
        if reply.is_some() {
            // Also in-band: an SSE client reads its stream, not only the answer.
            let error = TransportMessage::error(self.local, &code, message.clone());
            self.push_control(error);
        }
        self.close(CloseReason::SiteIdConflict { conflict, message });
        true
    }

    fn on_sync(&mut self, cursor: Cursor, ack: bool, received: Option<u64>, now: Instant) {
        // A crsync remote's cursor says what it holds: it decides only what
        // we send it (claims of sites we have not heard of yet are kept: we
        // may learn those sites from the remote itself, and must not send
        // their rows back). Its size is capped by `max_claim_sites`.
        let cursor = if self.remote_is_crsync {
            cursor
        } else {
            v1_claims(cursor, self.remote)
        };
        match self.window.on_sync(cursor, ack, received, now) {
            SyncOutcome::StartInitial => {
                self.upload = InitialProgress::default();
                self.requested = self.window.acked().clone();
                self.rewind_stream();
                self.eose_ranges.clear();
                self.event(SessionEvent::SyncRequested);
            }
            SyncOutcome::Rewind => self.rewind_stream(),
            SyncOutcome::Acknowledged => {}
        }
    }

    fn on_remote_error(&mut self, code: ErrorCode, message: String, now: Instant) {
        self.last_error = Some((code.clone(), message.clone()));
        self.event(SessionEvent::Rejected {
            code: code.clone(),
            message: message.clone(),
            by_remote: true,
        });
        match code.sender_action() {
            SenderAction::Resend => {
                self.window.on_gap(now);
                self.rewind_stream();
            }
            SenderAction::Pause => self.window.pause(),
            SenderAction::Ignore => {}
            _ => self.close(CloseReason::Refused { code, message }),
        }
    }

    fn on_data(&mut self, mut data: ParsedData, reply: Option<ReplyId>, now: Instant) {
        if data.ranged && !self.remote_is_crsync {
            // Only crsync sends ranges (its hello may have been lost).
            self.hello(Some(&Hello::current()));
        }
        self.last_progress_in = now;
        if !data.notes.is_empty() {
            self.event(SessionEvent::Approximated(std::mem::take(&mut data.notes)));
        }
        let remote = self.remote.unwrap_or(self.local);
        self.changes_received += data.batch.changes.len() as u64;
        if !self.eose_received {
            self.download.done += data.batch.changes.len() as u64;
            if let Some(total) = data.total {
                self.download.total = Some(total.max(self.download.done));
            }
        }
        let trust = self.config.trust;
        self.claims_refused += believe(&mut data.batch, remote, trust, &self.cursor) as u64;
        // The remote holds what its ranges claim, and its own changes up to
        // the newest it sent: those are never sent back to it.
        let mut holds = data.batch.cursor_after(&Cursor::new());
        let own_newest = data.batch.changes.iter().filter(|c| c.site_id == remote);
        if let Some(newest) = own_newest.map(|c| c.db_version).max() {
            holds.advance(remote, newest);
        }
        // A batch's ranges vouch for it and for the batches of its run
        // before it: ahead of a hole (one lost, or still on its way), its
        // changes go in now and its claims once the hole is filled.
        if let Some((first, n)) = data.number {
            if !self.received.follows_all_before(first, n) {
                let ranges = std::mem::take(&mut data.batch.ranges);
                if self.held_claims.len() < MAX_HELD_CLAIMS && !ranges.is_empty() {
                    self.held_claims.insert((first, n), ranges);
                }
            }
        }
        self.merging = Some(PendingMerge {
            reply,
            eose: data.eose,
            holds,
            number: data.number,
        });
        self.outputs.push_back(Output::Merge(data.batch));
    }

    fn merged(&mut self, result: Result<MergeOutcome, MergeFailure>, now: Instant) {
        let Some(pending) = self.merging.take() else {
            return;
        };
        self.last_progress_in = now;
        match result {
            Ok(outcome) => {
                self.cursor.join(&outcome.cursor);
                self.staged = outcome.staged;
                if let Some((first, last)) = outcome.local_versions {
                    self.hint.skip(first, last);
                }
                self.window.on_remote_holds(&pending.holds);
                if let Some((first, n)) = pending.number {
                    self.received.note(first, n);
                }
                self.release_held_claims();
                if pending.eose && !self.eose_received {
                    self.eose_received = true;
                    self.download.complete();
                    self.event(SessionEvent::Eose);
                }
                // A v1 peer reads every `sync` as "send everything again": ack crsync peers only.
                if self.remote_is_crsync {
                    self.ack_pending = true;
                }
                self.accept(pending.reply);
            }
            Err(MergeFailure::Rejected(rejection)) => {
                // Ask again from our cursor: the remote restarts from where we are.
                self.request_pending = true;
                self.reject(
                    pending.reply,
                    Rejection::new(ErrorCode::Gap, rejection.to_string()),
                );
            }
            Err(MergeFailure::Invalid(reason)) => {
                self.reject(
                    pending.reply,
                    Rejection::new(ErrorCode::InvalidChange, reason),
                );
            }
            Err(MergeFailure::Outdated { ours, theirs }) => {
                if theirs > self.schema_version {
                    self.event(SessionEvent::Outdated {
                        remote_version: theirs,
                        local_version: ours,
                    });
                    self.awaiting_schema = Some(theirs);
                } else {
                    // The store refused this batch under the schema it had
                    // when the merge ran; ours caught up since (we took
                    // `SchemaChanged` meanwhile): ask again now, as that
                    // upgrade will not come a second time.
                    self.request_pending = true;
                }
                self.reject(
                    pending.reply,
                    Rejection::new(
                        ErrorCode::SchemaOutdated,
                        format!(
                            "schema version {theirs} is newer than ours ({ours}); changes wait for an upgrade"
                        ),
                    ),
                );
            }
            Err(MergeFailure::Failed(reason)) => {
                // Our refusal may never reach the remote (a v1 peer ignores
                // it, an SSE client cannot POST it), its stream goes on
                // counting the batch as delivered, and a later batch may
                // claim the refused changes; asking again on this
                // connection cannot tell those batches from the answer. A
                // new connection syncs from our cursor (a crsync remote that
                // reads INTERNAL closes too).
                self.reject(
                    pending.reply,
                    Rejection::new(ErrorCode::Internal, reason.clone()),
                );
                self.close(CloseReason::MergeFailed(reason));
            }
        }
    }

    /// Merges the first held claims whose message now follows every message
    /// of its run (one at a time: [`merged`](Self::merged) releases the
    /// next); forgets those of runs the sender has left.
    fn release_held_claims(&mut self) {
        if self.merging.is_some() {
            return;
        }
        let received = &self.received;
        self.held_claims
            .retain(|&(first, _), _| !received.is_past(first));
        let Some(entry) = self.held_claims.first_entry() else {
            return;
        };
        let (first, n) = *entry.key();
        if !self.received.arrived_through(first, n) {
            return;
        }
        let batch = ChangeBatch {
            ranges: entry.remove(),
            ..ChangeBatch::default()
        };
        self.merging = Some(PendingMerge {
            reply: None,
            eose: false,
            holds: Cursor::new(),
            number: None,
        });
        self.outputs.push_back(Output::Merge(batch));
    }
}

/// What a v1 remote's cursor says that can be believed: its own entry only.
///
/// cr-sqlite records a merged row under the receiver's local version, so a v1
/// peer, which reads its cursor off `crsql_changes`, reports other sites at
/// its own local versions: "site C up to 6" when it holds C's version 1.
/// Believing that would hide C's versions 2 to 6 from it for good.
fn v1_claims(cursor: Cursor, remote: Option<SiteId>) -> Cursor {
    remote
        .map(|r| [(r, cursor.get(&r))].into_iter().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
