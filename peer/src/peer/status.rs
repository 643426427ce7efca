//! [`SyncStatus`]: what an app shows about sync, per remote and overall.
//!
//! Built on demand from each session's [`SessionStatus`] (straight from its
//! state machine) and the Peer's record of its links: one per dialer (kept
//! across reconnects, pauses and refusals) and one per accepted connection.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use crate::proto::{ErrorCode, InitialProgress, SessionPhase, SessionStatus};
use crate::{DbVersion, SiteId};

/// Own versions remembered with the time they were first seen, at most
/// (for [`Pending::oldest`]); when more are pending, the newest go unremembered.
const MAX_NOTICED: usize = 4096;

/// Where sync with one remote stands, as an app would show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncPhase {
    /// Dialing, or connected and waiting for the remote to say who it is.
    Connecting,
    /// Receiving what we lacked when we connected.
    InitialDownload,
    /// Sending what the remote lacked (ours came already).
    InitialUpload,
    /// Both initial streams are complete; changes flow as they happen.
    Live,
    /// Paused by the app ([`DialerHandle::pause`](crate::DialerHandle::pause),
    /// [`Peer::pause`](crate::Peer::pause)), or by the remote (it cannot apply what we send).
    Paused,
    /// The remote runs a newer schema; its changes wait for our upgrade.
    Outdated,
    /// The remote refused our credentials; no more dialing until
    /// [`DialerHandle::resume`](crate::DialerHandle::resume) or
    /// [`DialerHandle::set_token`](crate::DialerHandle::set_token).
    Refused,
    /// Not connected; a dialer dials again after its backoff.
    Disconnected,
}

/// Local changes a remote does not hold yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    /// Our own transactions (local versions) not acknowledged.
    pub transactions: u64,
    /// When the Peer first saw the oldest of them (its start, for writes made
    /// before it started).
    pub oldest: Option<SystemTime>,
}

impl Pending {
    /// How long the oldest pending change has waited.
    pub fn oldest_age(&self) -> Option<Duration> {
        self.oldest
            .map(|at| SystemTime::now().duration_since(at).unwrap_or_default())
    }
}

/// Progress of an initial stream in changes, with its rate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Progress {
    /// Changes so far.
    pub done: u64,
    /// How many the stream holds at most, once known; equal to `done` when complete.
    pub total: Option<u64>,
    /// Changes per second since the stream began.
    pub per_second: f64,
}

impl Progress {
    fn new(p: InitialProgress, since: Option<Instant>) -> Self {
        let elapsed = since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        Progress {
            done: p.done,
            total: p.total,
            per_second: if elapsed > 0.0 {
                p.done as f64 / elapsed
            } else {
                0.0
            },
        }
    }

    /// `done / total`, at most 1, once the total is known.
    pub fn fraction(&self) -> Option<f64> {
        InitialProgress {
            done: self.done,
            total: self.total,
        }
        .fraction()
    }
}

/// One remote: a dialer (kept across reconnects) or an accepted connection.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteStatus {
    /// The dialer's or connection's label (transport and address).
    pub transport: String,
    /// Whether we dial it (else it connected to us).
    pub dialed: bool,
    /// The remote's site id, once it said who it is.
    pub peer: Option<SiteId>,
    /// The phase.
    pub phase: SyncPhase,
    /// Since when the current connection is open.
    pub connected_since: Option<SystemTime>,
    /// The newest of our own versions the remote holds.
    pub acknowledged: DbVersion,
    /// Our changes it does not hold yet.
    pub pending: Pending,
    /// The remote's initial stream to us.
    pub download: Progress,
    /// Our initial stream to it.
    pub upload: Progress,
    /// When we were last in sync with it: both initial streams done, nothing
    /// in flight, and it held all of ours.
    pub last_synced_at: Option<SystemTime>,
    /// The last refusal or failure, with its code.
    pub last_error: Option<(ErrorCode, String)>,
}

impl RemoteStatus {
    /// Whether a connection is open.
    pub fn connected(&self) -> bool {
        self.connected_since.is_some()
    }

    /// Whether we were ever in sync with it (since the Peer started).
    pub fn has_synced(&self) -> bool {
        self.last_synced_at.is_some()
    }
}

/// Sync as a whole: every remote, and what none of them holds yet.
///
/// ```no_run
/// # async fn demo(peer: crsync_peer::Peer) {
/// let status = peer.status().await;
/// if !status.connected() {
///     println!("offline; {} local transactions to upload", status.pending.transactions);
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SyncStatus {
    /// Our own newest version.
    pub own_version: DbVersion,
    /// Our changes no remote holds yet.
    pub pending: Pending,
    /// Every remote.
    pub remotes: Vec<RemoteStatus>,
    /// Sync is paused for the whole Peer ([`Peer::pause`](crate::Peer::pause)).
    pub paused: bool,
}

impl SyncStatus {
    /// Whether any remote is connected.
    pub fn connected(&self) -> bool {
        self.remotes.iter().any(RemoteStatus::connected)
    }

    /// The phase of the remote furthest along (a Peer with no remotes is `Disconnected`).
    pub fn phase(&self) -> SyncPhase {
        if self.paused {
            return SyncPhase::Paused;
        }
        let rank = |p: SyncPhase| match p {
            SyncPhase::Live => 7,
            SyncPhase::InitialUpload => 6,
            SyncPhase::InitialDownload => 5,
            SyncPhase::Outdated => 4,
            SyncPhase::Connecting => 3,
            SyncPhase::Paused => 2,
            SyncPhase::Refused => 1,
            SyncPhase::Disconnected => 0,
        };
        self.remotes
            .iter()
            .map(|r| r.phase)
            .max_by_key(|p| rank(*p))
            .unwrap_or(SyncPhase::Disconnected)
    }

    /// When we were last in sync with any remote.
    pub fn last_synced_at(&self) -> Option<SystemTime> {
        self.remotes.iter().filter_map(|r| r.last_synced_at).max()
    }

    /// Whether we were ever in sync with a remote (since the Peer started).
    pub fn has_synced(&self) -> bool {
        self.last_synced_at().is_some()
    }
}

/// What a link's dialer is doing, set by the app and the dial loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkState {
    Active,
    Paused,
    Refused,
}

/// The Peer's record of one link.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) transport: String,
    pub(crate) dialed: bool,
    pub(crate) state: LinkState,
    /// The open session's id.
    pub(crate) session: Option<u64>,
    pub(crate) connected_since: Option<SystemTime>,
    pub(crate) opened: Option<Instant>,
    /// A connection ended or a dial failed since the last connection opened.
    pub(crate) disconnected: bool,
    pub(crate) last_synced_at: Option<SystemTime>,
    /// The last dial failure or refusal, for when no session is open.
    pub(crate) last_error: Option<(ErrorCode, String)>,
    /// When the remote's record was last handed to the Store, and the
    /// newer record that waits for its turn (see `Inner::note_acknowledged`).
    pub(crate) record_saved: Option<Instant>,
    pub(crate) record_due: Option<crate::RemoteRecord>,
}

impl Link {
    /// The record that waits to be saved, if any, noting that it goes now.
    pub(crate) fn take_record(&mut self) -> Option<crate::RemoteRecord> {
        let record = self.record_due.take()?;
        self.record_saved = Some(Instant::now());
        Some(record)
    }

    pub(crate) fn new(transport: String, dialed: bool) -> Self {
        Link {
            transport,
            dialed,
            state: LinkState::Active,
            session: None,
            connected_since: None,
            opened: None,
            disconnected: false,
            last_synced_at: None,
            last_error: None,
            record_saved: None,
            record_due: None,
        }
    }

    /// Whether the session's status shows it in sync with us (we hold `own`).
    pub(crate) fn in_sync(status: &SessionStatus, local: SiteId, own: DbVersion) -> bool {
        status.phase == SessionPhase::Live
            && status.in_flight == 0
            && status.acknowledged.get(&local) >= own
    }
}

/// Own versions with the time the Peer first saw them, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Noticed {
    versions: VecDeque<(DbVersion, SystemTime)>,
}

impl Noticed {
    /// Our own version is now `version` (seen at `at`).
    pub(crate) fn note(&mut self, version: DbVersion, at: SystemTime) {
        let newer = self.versions.back().is_none_or(|(v, _)| version > *v);
        if newer && self.versions.len() < MAX_NOTICED {
            self.versions.push_back((version, at));
        }
    }

    /// Forgets versions every remote of interest holds.
    pub(crate) fn forget_upto(&mut self, version: DbVersion) {
        while self.versions.front().is_some_and(|(v, _)| *v <= version) {
            self.versions.pop_front();
        }
    }

    /// When the oldest version above `acknowledged` was first seen.
    pub(crate) fn oldest_after(&self, acknowledged: DbVersion) -> Option<SystemTime> {
        self.versions
            .iter()
            .find(|(v, _)| *v > acknowledged)
            .map(|(_, at)| *at)
    }
}

/// Builds one remote's status from its link and its session's status.
pub(crate) fn remote_status(
    link: &Link,
    session: Option<&SessionStatus>,
    pending: Pending,
    acknowledged: DbVersion,
) -> RemoteStatus {
    let phase = match (link.state, session) {
        (LinkState::Paused, _) => SyncPhase::Paused,
        (LinkState::Refused, _) => SyncPhase::Refused,
        (LinkState::Active, None) if link.disconnected => SyncPhase::Disconnected,
        (LinkState::Active, None) => SyncPhase::Connecting,
        (LinkState::Active, Some(s)) => match s.phase {
            SessionPhase::Connecting => SyncPhase::Connecting,
            SessionPhase::Initial if !s.received_eose => SyncPhase::InitialDownload,
            SessionPhase::Initial => SyncPhase::InitialUpload,
            SessionPhase::Live => SyncPhase::Live,
            SessionPhase::Paused => SyncPhase::Paused,
            SessionPhase::Outdated => SyncPhase::Outdated,
            _ => SyncPhase::Disconnected,
        },
    };
    RemoteStatus {
        transport: link.transport.clone(),
        dialed: link.dialed,
        peer: session.and_then(|s| s.remote),
        phase,
        connected_since: session.and(link.connected_since),
        acknowledged,
        pending,
        download: session.map_or_else(Progress::default, |s| {
            Progress::new(s.download, link.opened)
        }),
        upload: session.map_or_else(Progress::default, |s| Progress::new(s.upload, link.opened)),
        last_synced_at: link.last_synced_at,
        last_error: session
            .and_then(|s| s.last_error.clone())
            .or_else(|| link.last_error.clone()),
    }
}
