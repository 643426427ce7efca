//! What goes in and out of a [`Session`](super::Session): its inputs, its
//! outputs for the driver, its events and settings.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::proto::ErrorCode;
use crate::proto::trust::{DEFAULT_MAX_CLAIM_SITES, SiteConflict, Trust};
use crate::transport::Rejection;
use crate::wire::TransportMessage;
use crate::{BatchRejection, ChangeBatch, Cursor, DbVersion, ReadHint, SiteId};

/// Identifies a per-message reply (an HTTP `POST` waiting for its outcome).
pub type ReplyId = u64;

/// Which end opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// We dialed it: the liveness timeout applies.
    Dialed,
    /// A remote connected to us.
    Accepted,
}

/// Settings of one session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Batches in flight at most.
    pub window: usize,
    /// Resend from the acknowledged point when no acknowledgement came for
    /// this long; ask again when the remote's initial stream stalls this long.
    pub ack_timeout: Duration,
    /// How often to ping.
    pub ping_interval: Duration,
    /// Close a dialed connection that received nothing for this long.
    pub liveness_timeout: Option<Duration>,
    /// Which end opened the connection.
    pub side: Side,
    /// How far the remote's claims about sites are believed.
    pub trust: Trust,
    /// Sites in one cursor or one batch's ranges at most; a larger claim is
    /// refused with `LIMIT_EXCEEDED`.
    pub max_claim_sites: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            window: 8,
            ack_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            liveness_timeout: Some(Duration::from_secs(75)),
            side: Side::Dialed,
            trust: Trust::Full,
            max_claim_sites: DEFAULT_MAX_CLAIM_SITES,
        }
    }
}

/// Something for the session to take in.
// Inputs are moved into the session one at a time, never stored in bulk:
// boxing the message would cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Input {
    /// A message from the remote; `reply` if the transport waits for its outcome.
    Received {
        /// The message.
        message: TransportMessage,
        /// The reply to answer with [`Output::Reply`].
        reply: Option<ReplyId>,
    },
    /// A message from the remote that may have been written before this
    /// session began (a relay's stored event, a transport's record of an
    /// absent remote's request: [`crate::Received::from_before_session`]).
    /// Taken as [`Input::Received`], except that its cursor is not checked
    /// against what the session held when it began (a copied-replica
    /// check that holds only for what the remote wrote since).
    ReceivedEarlier {
        /// The message.
        message: TransportMessage,
        /// The reply to answer with [`Output::Reply`].
        reply: Option<ReplyId>,
    },
    /// The remote sent something that is not a message.
    Undecodable {
        /// Why it does not decode.
        error: String,
        /// The reply to answer, if any.
        reply: Option<ReplyId>,
    },
    /// The next batch of the stream the session asked for ([`Output::Read`]).
    Batch {
        /// The batch.
        batch: ChangeBatch,
        /// The highest local version the stream has read up to.
        read_upto: i64,
    },
    /// The stream the session asked for is open; `total`: how many changes
    /// it holds at most, when the read was asked to count them.
    StreamOpened {
        /// At most this many changes.
        total: Option<u64>,
    },
    /// The stream ended: every batch was delivered.
    StreamEnded,
    /// Reading the stream failed; the session reads again later.
    StreamFailed(String),
    /// The driver dropped the stream because it stalled (the session wanted
    /// no batch for a while: the remote is not taking what we send), to give
    /// back its read connection and thread. What the session has not taken
    /// yet is read again, by a new stream, once it wants more.
    StreamParked,
    /// The merge the session asked for finished.
    Merged(Result<MergeOutcome, MergeFailure>),
    /// The store committed something (a local write, or a merge from any
    /// remote); `cursor` is what it holds now.
    LocalChanged {
        /// Our cursor.
        cursor: Cursor,
    },
    /// Our schema version changed.
    SchemaChanged(i64),
    /// The time of [`Session::poll_timeout`] came (early calls are harmless).
    Timeout,
}

/// A merge succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeOutcome {
    /// Our cursor after the merge.
    pub cursor: Cursor,
    /// The span of local versions the merge wrote rows under, if any.
    pub local_versions: Option<(i64, i64)>,
    /// What we have staged of transactions in parts afterwards (origin site
    /// and version, highest `seq`), for the remote to resume after.
    pub staged: BTreeMap<(SiteId, DbVersion), i64>,
}

/// A merge was refused; nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MergeFailure {
    /// The batch does not fit our cursor (a gap).
    Rejected(BatchRejection),
    /// A change is invalid for our database.
    Invalid(String),
    /// The sender's schema is newer than ours.
    Outdated {
        /// Our `user_version`.
        ours: i64,
        /// The sender's.
        theirs: i64,
    },
    /// The store failed.
    Failed(String),
}

/// Work for the driver.
#[derive(Debug)]
pub enum Output {
    /// Apply this batch atomically and report with [`Input::Merged`].
    Merge(ChangeBatch),
    /// Open a stream of what a receiver at `from` lacks, leaving out the rows
    /// `hint` names (already sent, or merged from this remote), and feed its
    /// batches as [`Input::Batch`] while [`Session::wants_batch`].
    Read {
        /// The receiver's cursor.
        from: Cursor,
        /// Rows to leave out, by local version.
        hint: ReadHint,
    },
    /// Drop the stream in progress.
    CancelRead,
    /// Answer a per-message reply.
    Reply {
        /// Which.
        id: ReplyId,
        /// The outcome.
        result: Result<(), Rejection>,
    },
    /// Tell the application.
    Event(SessionEvent),
    /// End the session.
    Close(CloseReason),
}

/// What happened, for the Peer's events.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The remote said who it is.
    Identified(SiteId),
    /// The remote asked for everything its cursor lacks: our initial stream starts.
    SyncRequested,
    /// The remote's initial stream to us is complete.
    Eose,
    /// The remote runs a newer schema; its changes wait for our upgrade.
    Outdated {
        /// Its `user_version`.
        remote_version: i64,
        /// Ours.
        local_version: i64,
    },
    /// A message was refused, by us or by the remote.
    Rejected {
        /// The code.
        code: ErrorCode,
        /// Detail.
        message: String,
        /// Whether the remote refused what we sent.
        by_remote: bool,
    },
    /// Values or changes of a v1 sender that could only be approximated or were left out.
    Approximated(Vec<String>),
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The remote refused us in a way that retrying on this connection cannot fix.
    #[error("remote refused: {code}: {message}")]
    Refused {
        /// The code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// Nothing received for this long.
    #[error("no message from the remote for {0:?}")]
    Timeout(Duration),
    /// The remote has our own site id.
    #[error("connected to ourselves")]
    ConnectedToSelf,
    /// Our store failed to merge what the remote sent. The remote's stream
    /// goes on as if it had been applied (the refusal may never reach it),
    /// and a later batch could claim the refused changes: only a new
    /// connection, which syncs from our cursor, is safe.
    #[error("the store failed a merge: {0}")]
    MergeFailed(String),
    /// This replica and the remote's share a site id (one is a copied file).
    #[error("{message}")]
    SiteIdConflict {
        /// Which of the two is the copy.
        conflict: SiteConflict,
        /// The explanation, naming the fix.
        message: String,
    },
}
