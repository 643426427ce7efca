//! The sync protocol without I/O: no tokio, no SQLite, no clock.
//!
//! - [`batch`]: what a batch claims ([`VersionRange`](crate::VersionRange)s),
//!   how a sender cuts batches and how a receiver plans a merge.
//! - [`window`]: the outgoing window of one remote (what is in flight, what
//!   the remote acknowledged).
//! - [`ReceivedRun`]: how far a remote's numbered messages arrived without a hole.
//! - [`ErrorCode`]: every refusal's stable code and what it means for the sender.
//! - [`Message`]: a wire message parsed once, at the edge.
//! - [`snapshot`]: what a server says about the snapshot a new replica can
//!   start from (its info answer and download headers).
//! - [`Session`]: the state machine of one connection to one remote. The
//!   [`Peer`](crate::Peer) drives one per connection; tests drive many in a
//!   simulator with virtual time.
//!
//! A session takes [`Input`]s with the current time and produces work for
//! its driver, in the manner of quinn-proto: [`Session::poll_output`] yields
//! merges to run, streams to open, events and replies;
//! [`Session::poll_transmit`] yields the next message to send whenever the
//! connection can take one; [`Session::poll_timeout`] says when to come back
//! with [`Input::Timeout`].

pub mod batch;
mod codes;
mod message;
mod received;
mod session;
pub mod snapshot;
mod status;
mod trust;
pub mod window;

pub use codes::{ErrorCode, SenderAction};
pub use message::{Message, ParsedData};
pub use received::ReceivedRun;
pub use session::{
    CloseReason, Input, MergeFailure, MergeOutcome, Output, ReplyId, Session, SessionConfig,
    SessionEvent, Side,
};
pub use status::{InitialProgress, SessionPhase, SessionStatus};
pub use trust::{DEFAULT_MAX_CLAIM_SITES, SiteConflict, Trust};
