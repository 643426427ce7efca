//! What to send one remote next: the pure state of the outgoing half of a session.
//!
//! The remote's cursor, learned from its `sync` messages, is the
//! acknowledgement: a batch counts as delivered only once a cursor from the
//! remote covers it. Batches go out in a window of bounded size; when the
//! remote reports a gap, or acknowledgements stop coming while batches are in
//! flight, sending restarts from the last acknowledged point.
//!
//! A crsync remote of protocol version 2 also acknowledges how far our
//! numbered messages arrived without a hole ([`ReceivedRun`](super::ReceivedRun)):
//! a batch whose changes no range covers is delivered only once its number is.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::Cursor;

/// Where a session's outgoing side stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The remote has not sent its cursor yet: nothing to send.
    AwaitingSync,
    /// Streaming everything the remote lacked at its `sync`; ends with `eose`.
    Initial,
    /// Caught up; live changes flow as they happen.
    Live,
}

/// What the caller should do after the remote's `sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncOutcome {
    /// (Re)start the stream from the remote's cursor and finish it with `eose`.
    StartInitial,
    /// An acknowledgement: keep streaming.
    Acknowledged,
    /// The remote resumes after refusing our batches: restart from its cursor.
    Rewind,
}

/// The outgoing window of one session.
///
/// ```
/// use crsync_peer::{Cursor, DbVersion, SiteId, proto::window::{OutgoingWindow, Phase, SyncOutcome}};
/// use std::time::{Duration, Instant};
/// let now = Instant::now();
/// let site = SiteId::from_bytes([1; 16]);
/// let mut w = OutgoingWindow::new(2, true, now);
/// assert!(!w.can_send());
/// assert_eq!(w.on_sync(Cursor::new(), false, None, now), SyncOutcome::StartInitial);
/// let after: Cursor = [(site, DbVersion(5))].into_iter().collect();
/// w.on_sent(after.clone(), now);
/// assert_eq!(w.in_flight(), 1);
/// w.on_sync(after, true, None, now); // the remote acknowledges
/// assert_eq!(w.in_flight(), 0);
/// assert_eq!(w.phase(), Phase::Initial);
/// ```
#[derive(Debug, Clone)]
pub struct OutgoingWindow {
    acked: Cursor,
    sent: Cursor,
    /// Per batch in flight: the remote's cursor once it applies it, and its number.
    unacked: VecDeque<(Cursor, u64)>,
    window: usize,
    acks_expected: bool,
    /// The remote acknowledges message numbers (protocol version 2).
    numbered: bool,
    /// The number of the next message, and of the first of the current run.
    next_number: u64,
    run_first: u64,
    /// How far the remote received our messages without a hole.
    received: Option<u64>,
    last_progress: Instant,
    phase: Phase,
    paused: bool,
}

impl OutgoingWindow {
    /// `window`: batches in flight at most. `acks_expected`: the remote is a
    /// crsync peer that acknowledges with `sync` (a v1 peer does not; its
    /// batches count as delivered once sent).
    pub fn new(window: usize, acks_expected: bool, now: Instant) -> Self {
        OutgoingWindow {
            acked: Cursor::new(),
            sent: Cursor::new(),
            unacked: VecDeque::new(),
            window: window.max(1),
            acks_expected,
            numbered: false,
            next_number: 1,
            run_first: 1,
            received: None,
            last_progress: now,
            phase: Phase::AwaitingSync,
            paused: false,
        }
    }

    /// Switches acknowledgement mode (once the remote's `connect` told us who it is).
    pub fn set_acks_expected(&mut self, acks_expected: bool) {
        self.acks_expected = acks_expected;
    }

    /// The remote acknowledges message numbers too: a batch counts as
    /// delivered only once its number is acknowledged.
    pub fn set_numbered(&mut self, numbered: bool) {
        self.numbered = numbered;
    }

    /// Numbers the next message: `(first of the current run, its number)`.
    pub fn number(&mut self) -> (u64, u64) {
        let n = self.next_number;
        self.next_number += 1;
        (self.run_first, n)
    }

    /// The stream restarts: later messages begin a new run.
    fn new_run(&mut self) {
        self.run_first = self.next_number;
    }

    /// The remote's `sync` with its cursor. `ack` marks an acknowledgement
    /// from a crsync peer; any other `sync` asks for everything its cursor
    /// lacks, from the start (as in v1). `received`: how far the remote
    /// received our numbered messages without a hole, if it said.
    pub fn on_sync(
        &mut self,
        cursor: Cursor,
        ack: bool,
        received: Option<u64>,
        now: Instant,
    ) -> SyncOutcome {
        let was_paused = std::mem::replace(&mut self.paused, false);
        if ack {
            self.received = self.received.max(received);
        }
        if !ack || self.phase == Phase::AwaitingSync || !self.acks_expected {
            self.acked = cursor.clone();
            self.sent = cursor;
            self.unacked.clear();
            self.new_run();
            self.phase = Phase::Initial;
            self.last_progress = now;
            return SyncOutcome::StartInitial;
        }
        self.acked.join(&cursor);
        if was_paused {
            self.on_gap(now);
            return SyncOutcome::Rewind;
        }
        self.sent.join(&cursor);
        let before = self.unacked.len();
        let received = |n: u64| !self.numbered || self.received.is_some_and(|r| r >= n);
        while self
            .unacked
            .front()
            .is_some_and(|(after, n)| self.acked.covers(after) && received(*n))
        {
            self.unacked.pop_front();
        }
        if self.unacked.len() < before || self.unacked.is_empty() {
            self.last_progress = now;
        }
        SyncOutcome::Acknowledged
    }

    /// The remote sent us a batch: it holds everything up to `cursor`.
    pub fn on_remote_holds(&mut self, cursor: &Cursor) {
        self.acked.join(cursor);
        self.sent.join(cursor);
    }

    /// Whether another batch may go out now.
    pub fn can_send(&self) -> bool {
        self.phase != Phase::AwaitingSync && !self.paused && self.unacked.len() < self.window
    }

    /// A batch goes out; `after` is the remote's cursor once it applies it.
    /// Returns the message's number (see [`number`](Self::number)).
    pub fn on_sent(&mut self, after: Cursor, now: Instant) -> (u64, u64) {
        let number = self.number();
        if self.acks_expected {
            if self.unacked.is_empty() {
                self.last_progress = now;
            }
            self.unacked.push_back((after.clone(), number.1));
        } else {
            self.acked.join(&after);
        }
        self.sent.join(&after);
        number
    }

    /// The initial stream is complete (`eose` sent).
    pub fn on_initial_complete(&mut self) {
        if self.phase == Phase::Initial {
            self.phase = Phase::Live;
        }
    }

    /// The remote reported a gap: resend from what it acknowledged.
    pub fn on_gap(&mut self, now: Instant) {
        self.sent = self.acked.clone();
        self.unacked.clear();
        self.new_run();
        self.last_progress = now;
    }

    /// Resets to the acknowledged point if batches have waited for an
    /// acknowledgement for `timeout` or longer (from the
    /// [deadline](Self::ack_deadline) on). Returns whether it did.
    pub fn check_ack_timeout(&mut self, now: Instant, timeout: Duration) -> bool {
        if !self.unacked.is_empty() && now.duration_since(self.last_progress) >= timeout {
            self.on_gap(now);
            return true;
        }
        false
    }

    /// When [`check_ack_timeout`](Self::check_ack_timeout) would next fire, if batches are in flight.
    pub fn ack_deadline(&self, timeout: Duration) -> Option<Instant> {
        (!self.unacked.is_empty()).then(|| self.last_progress + timeout)
    }

    /// Stops sending until the remote's next `sync` (it cannot apply what we send).
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// What we have sent (the stream restarts from here).
    pub fn sent(&self) -> &Cursor {
        &self.sent
    }

    /// What the remote acknowledged.
    pub fn acked(&self) -> &Cursor {
        &self.acked
    }

    /// Batches sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.unacked.len()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether sending is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DbVersion, SiteId};

    const ACK: bool = true;

    fn cur(v: i64) -> Cursor {
        [(SiteId::from_bytes([1; 16]), DbVersion(v))]
            .into_iter()
            .collect()
    }

    #[test]
    fn window_limits_batches_in_flight() {
        let now = Instant::now();
        let mut w = OutgoingWindow::new(2, true, now);
        w.on_sync(cur(0), ACK, None, now);
        w.on_sent(cur(1), now);
        w.on_sent(cur(2), now);
        assert!(!w.can_send());
        w.on_sync(cur(1), ACK, None, now);
        assert!(w.can_send());
        assert_eq!(w.in_flight(), 1);
    }

    #[test]
    fn a_numbered_remote_acknowledges_a_batch_only_once_its_number_arrived() {
        // Two batches that claim nothing (another site's changes, relayed
        // unranged): the cursor cannot tell whether they arrived.
        let t0 = Instant::now();
        let mut w = OutgoingWindow::new(4, true, t0);
        w.set_numbered(true);
        w.on_sync(cur(0), ACK, None, t0);
        assert_eq!(w.on_sent(cur(0), t0), (1, 1));
        assert_eq!(w.on_sent(cur(0), t0), (1, 2));
        // Message 1 was lost; 2 arrived, so the remote's run has a hole at 1.
        w.on_sync(cur(0), ACK, None, t0);
        assert_eq!(w.in_flight(), 2, "nothing is acknowledged without numbers");
        let timeout = Duration::from_secs(5);
        assert!(
            w.check_ack_timeout(t0 + timeout, timeout),
            "so the stream rewinds"
        );
        // The next stream is a new run; its first message completes it at once.
        assert_eq!(w.on_sent(cur(0), t0 + timeout), (3, 3));
        w.on_sync(cur(0), ACK, Some(3), t0 + timeout);
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn timeout_rewinds_to_the_acknowledged_point() {
        let t0 = Instant::now();
        let mut w = OutgoingWindow::new(4, true, t0);
        w.on_sync(cur(0), ACK, None, t0);
        w.on_sent(cur(1), t0);
        w.on_sent(cur(2), t0);
        w.on_sync(cur(1), ACK, None, t0);
        assert!(!w.check_ack_timeout(t0 + Duration::from_secs(1), Duration::from_secs(5)));
        assert!(w.check_ack_timeout(t0 + Duration::from_secs(6), Duration::from_secs(5)));
        assert_eq!(w.sent(), &cur(1));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn the_ack_deadline_is_when_the_timeout_fires() {
        // A driver that sleeps until `ack_deadline` must find the timeout due
        // then, or it wakes at the same instant forever (seen in the simulator).
        let t0 = Instant::now();
        let timeout = Duration::from_secs(10);
        let mut w = OutgoingWindow::new(4, true, t0);
        w.on_sync(cur(0), ACK, None, t0);
        w.on_sent(cur(1), t0);
        let deadline = w.ack_deadline(timeout).unwrap();
        assert!(!w.check_ack_timeout(deadline - Duration::from_millis(1), timeout));
        assert!(w.check_ack_timeout(deadline, timeout));
        assert_eq!(w.ack_deadline(timeout), None);
    }

    #[test]
    fn gap_rewinds_and_pause_holds_until_sync() {
        let t0 = Instant::now();
        let mut w = OutgoingWindow::new(4, true, t0);
        w.on_sync(cur(3), ACK, None, t0);
        w.on_sent(cur(5), t0);
        w.on_gap(t0);
        assert_eq!(w.sent(), &cur(3));
        w.on_sent(cur(5), t0);
        w.pause();
        assert!(!w.can_send());
        assert_eq!(w.on_sync(cur(3), ACK, None, t0), SyncOutcome::Rewind);
        assert!(w.can_send());
        assert_eq!(w.sent(), &cur(3));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn v1_remote_restarts_on_every_sync_and_never_waits_for_acks() {
        let t0 = Instant::now();
        let mut w = OutgoingWindow::new(1, false, t0);
        assert_eq!(w.on_sync(cur(0), ACK, None, t0), SyncOutcome::StartInitial);
        w.on_sent(cur(1), t0);
        w.on_sent(cur(2), t0);
        assert!(w.can_send());
        assert_eq!(w.on_sync(cur(0), ACK, None, t0), SyncOutcome::StartInitial);
        assert_eq!(w.sent(), &cur(0));
    }

    #[test]
    fn a_sync_request_restarts_even_when_live() {
        let t0 = Instant::now();
        let mut w = OutgoingWindow::new(4, true, t0);
        w.on_sync(cur(0), !ACK, None, t0);
        w.on_sent(cur(4), t0);
        w.on_initial_complete();
        assert_eq!(w.phase(), Phase::Live);
        // the remote lost our eose or its state: it asks again from its cursor
        assert_eq!(w.on_sync(cur(2), !ACK, None, t0), SyncOutcome::StartInitial);
        assert_eq!(w.phase(), Phase::Initial);
        assert_eq!(w.sent(), &cur(2));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn what_the_remote_sent_is_not_echoed() {
        let t0 = Instant::now();
        let mut w = OutgoingWindow::new(1, true, t0);
        w.on_sync(cur(0), ACK, None, t0);
        w.on_remote_holds(&cur(9));
        assert_eq!(w.sent(), &cur(9));
    }
}
