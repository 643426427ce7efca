//! [`SessionStatus`]: where one session stands, read straight from its state machine.

use crate::proto::ErrorCode;
use crate::{Cursor, SiteId};

/// The phase of a session, as an app would show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionPhase {
    /// Nothing heard from the remote yet.
    Connecting,
    /// The initial exchange is under way: the remote's initial stream to us,
    /// ours to it, or both, are not complete.
    Initial,
    /// Both initial streams are complete; live changes flow.
    Live,
    /// The remote refused what we send (it cannot apply it) and we wait until it asks again.
    Paused,
    /// The remote runs a newer schema; its changes wait for our upgrade.
    Outdated,
    /// The session ended.
    Closed,
}

/// How far an initial stream (everything one side lacked when the session
/// began) has come, in changes.
///
/// ```
/// use crsync_peer::proto::InitialProgress;
/// let p = InitialProgress { done: 250, total: Some(1000) };
/// assert_eq!(p.fraction(), Some(0.25));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InitialProgress {
    /// Changes that went (or came) so far.
    pub done: u64,
    /// How many the stream holds at most, once the sender said (a crsync
    /// sender counts them when its stream starts; a v1 sender never says).
    /// When the stream completes it becomes `done`: the bar ends at 100%.
    pub total: Option<u64>,
}

impl InitialProgress {
    /// `done / total`, at most 1.
    pub fn fraction(&self) -> Option<f64> {
        self.total.map(|total| {
            if total == 0 {
                1.0
            } else {
                (self.done as f64 / total as f64).min(1.0)
            }
        })
    }

    /// The stream is complete: what was done is the total.
    pub(crate) fn complete(&mut self) {
        self.total = Some(self.done);
    }
}

/// A snapshot of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatus {
    /// The remote, once it said who it is.
    pub remote: Option<SiteId>,
    /// The remote is a crsync peer (it acknowledges and sends ranges); else a v1 peer.
    pub crsync: bool,
    /// The phase.
    pub phase: SessionPhase,
    /// What the remote has acknowledged holding (for a v1 remote: what we sent it).
    pub acknowledged: Cursor,
    /// What the remote held when it last asked for everything it lacks
    /// (its latest `sync` that is not an acknowledgement).
    pub requested: Cursor,
    /// Batches sent and not yet acknowledged.
    pub in_flight: usize,
    /// The remote's initial stream to us is complete (`eose` received).
    pub received_eose: bool,
    /// Our initial stream to the remote is complete (`eose` sent).
    pub sent_eose: bool,
    /// Changes received from the remote and handed to the store.
    pub changes_received: u64,
    /// Changes sent to the remote.
    pub changes_sent: u64,
    /// The remote's initial stream to us, so far.
    pub download: InitialProgress,
    /// Our initial stream to the remote, so far.
    pub upload: InitialProgress,
    /// The remote's version ranges and changes not believed (see
    /// [`Trust`](crate::proto::Trust)).
    pub claims_refused: u64,
    /// The last refusal, by either side.
    pub last_error: Option<(ErrorCode, String)>,
}
