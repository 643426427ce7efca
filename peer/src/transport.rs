//! The transport interface: a connection is a sink and a stream of
//! [`TransportMessage`]s. Transports (crate `crsync-transports`, the
//! node-server) produce [`Connection`]s; the [`Peer`](crate::Peer) runs the
//! sync protocol over them and knows nothing about sockets or HTTP.
//!
//! - Outgoing connections come from a [`Dialer`]; the Peer redials it with
//!   backoff ([`ReconnectPolicy`]) whenever the connection ends.
//! - Incoming connections (a server) are handed to
//!   [`Peer::accept`](crate::Peer::accept).

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use futures_core::Stream;
use futures_util::Sink;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use crate::proto::ErrorCode;
use crate::wire::{DecodeError, TransportMessage};

/// Boxed error from an underlying library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Outgoing half of a connection.
pub type MessageSink = Pin<Box<dyn Sink<TransportMessage, Error = TransportError> + Send>>;
/// Incoming half of a connection.
pub type MessageStream = Pin<Box<dyn Stream<Item = Result<Received, TransportError>> + Send>>;

/// One received message, with an optional way to tell the transport how its
/// processing ended (an HTTP `POST` answers 200 only once it is processed).
#[derive(Debug)]
pub struct Received {
    /// The message.
    pub message: TransportMessage,
    /// Completion signal for transports that answer per message.
    pub reply: Option<oneshot::Sender<Result<(), Rejection>>>,
    /// The message may have been written before this connection's session
    /// began: a store-and-forward relay's stored event from a remote
    /// session that had not heard of ours, or the transport's record of an
    /// absent remote's last request. Its cursor is then not taken as proof
    /// that the remote is a copy (see [`Received::from_before_session`]).
    pub may_predate_session: bool,
}

impl Received {
    /// A message with no completion signal.
    pub fn new(message: TransportMessage) -> Self {
        Received {
            message,
            reply: None,
            may_predate_session: false,
        }
    }

    /// A message that may have been written before the session began (a
    /// relay's stored event, a remembered request). A socket transport's
    /// messages never are: the remote writes them on the connection.
    ///
    /// The session checks the remote's first cursor against what it held of
    /// the remote's own site when it began: less means the remote is a
    /// copy of a replica that went on writing. That holds only for a cursor
    /// written after the session began; an older one may predate versions
    /// of the remote that reached us since by another path, so such a
    /// cursor is not checked, and the next one is.
    pub fn from_before_session(message: TransportMessage) -> Self {
        Received {
            may_predate_session: true,
            ..Received::new(message)
        }
    }

    /// A message whose sender waits for the outcome.
    pub fn with_reply(
        message: TransportMessage,
    ) -> (Self, oneshot::Receiver<Result<(), Rejection>>) {
        let (tx, rx) = oneshot::channel();
        (
            Received {
                message,
                reply: Some(tx),
                may_predate_session: false,
            },
            rx,
        )
    }
}

/// Why a received message was refused, with a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl Rejection {
    /// A rejection with this code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }

    /// Whether the fault is the sender's (HTTP 400) rather than ours (500).
    pub fn client_error(&self) -> bool {
        self.code.is_client_error()
    }
}

/// A transport failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Could not connect.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// Where.
        target: String,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The remote refused with a typed error (`ALREADY_CONNECTED`, `UNAUTHORIZED`, ...).
    #[error("remote refused: {code}: {message}")]
    Remote {
        /// Stable code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// The remote is busy (HTTP 429 `RATE_LIMITED` or `TOO_MANY_CONNECTIONS`):
    /// try again, but not before `retry_after`.
    #[error("remote busy: {code}: {message} (retry after {retry_after:?})")]
    Busy {
        /// Stable code.
        code: ErrorCode,
        /// Detail.
        message: String,
        /// How long the remote asked us to wait.
        retry_after: Duration,
    },
    /// An HTTP request failed with a status.
    #[error("HTTP {status} from {target}: {message}")]
    Http {
        /// Status code.
        status: u16,
        /// The URL.
        target: String,
        /// The body or reason.
        message: String,
    },
    /// A message from the remote could not be decoded.
    #[error("undecodable message: {0}")]
    Decode(#[from] DecodeError),
    /// Nothing received within the liveness timeout.
    #[error("no message from the remote for {0:?}")]
    Timeout(Duration),
    /// The connection was closed.
    #[error("connection closed")]
    Closed,
    /// Any other I/O failure.
    #[error("transport I/O: {0}")]
    Io(#[source] BoxError),
}

impl TransportError {
    /// How long the remote asked us to wait before trying again, if it did
    /// ([`TransportError::Busy`]).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TransportError::Busy { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// A live connection to one remote peer.
pub struct Connection {
    /// Messages to the remote.
    pub sink: MessageSink,
    /// Messages from the remote.
    pub stream: MessageStream,
    /// What this is, for events and logs (e.g. `"sse http://127.0.0.1:8080/db/notes"`).
    pub label: String,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// Something that opens outgoing connections (an HTTP+SSE or WebSocket client).
pub trait Dialer: Send + 'static {
    /// Opens a connection. `local` is our site id (clients name themselves in URLs).
    fn dial(&mut self, local: crate::SiteId) -> BoxFuture<'_, Result<Connection, TransportError>>;

    /// What this dials, for events and logs.
    fn label(&self) -> String;

    /// Takes a new credential for the next dials (after the remote refused
    /// the old one, say). Dialers without credentials ignore it (the default).
    fn set_token(&mut self, token: &str) {
        let _ = token;
    }

    /// Session timings and limits for this dialer's connections, where they
    /// differ from the Peer's (a store-and-forward relay link waits far
    /// longer for acknowledgements than a socket). The default changes
    /// nothing.
    fn link_settings(&self) -> LinkSettings {
        LinkSettings::default()
    }
}

/// Per-connection overrides of the Peer's session settings
/// ([`Dialer::link_settings`]); every `None` keeps the Peer's own.
///
/// ```
/// use crsync_peer::LinkSettings;
/// use std::time::Duration;
/// let relay = LinkSettings::default()
///     .with_liveness_timeout(None)
///     .with_ack_timeout(Duration::from_secs(3600))
///     .with_max_batch_bytes(16 * 1024);
/// assert_eq!(relay.liveness_timeout, Some(None));
/// assert_eq!(LinkSettings::default().ack_timeout, None);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinkSettings {
    /// How often to ping the remote.
    pub ping_interval: Option<Duration>,
    /// Drop the connection after this long without a message (`Some(None)`: never).
    pub liveness_timeout: Option<Option<Duration>>,
    /// Resend from the acknowledged point after this long without an acknowledgement.
    pub ack_timeout: Option<Duration>,
    /// Batches in flight.
    pub window: Option<usize>,
    /// Soft limit on a batch's estimated wire size (the carrier's message size).
    pub max_batch_bytes: Option<usize>,
}

impl LinkSettings {
    /// Pings at this interval.
    pub fn with_ping_interval(mut self, d: Duration) -> Self {
        self.ping_interval = Some(d);
        self
    }

    /// Liveness timeout (`None`: a quiet remote is never dropped).
    pub fn with_liveness_timeout(mut self, d: Option<Duration>) -> Self {
        self.liveness_timeout = Some(d);
        self
    }

    /// Acknowledgement timeout.
    pub fn with_ack_timeout(mut self, d: Duration) -> Self {
        self.ack_timeout = Some(d);
        self
    }

    /// Batches in flight (at least 1).
    pub fn with_window(mut self, batches: usize) -> Self {
        self.window = Some(batches.max(1));
        self
    }

    /// Soft limit on a batch's estimated wire size (at least 1 byte).
    pub fn with_max_batch_bytes(mut self, bytes: usize) -> Self {
        self.max_batch_bytes = Some(bytes.max(1));
        self
    }
}

/// Exponential backoff with jitter for redialing.
///
/// ```
/// use crsync_peer::ReconnectPolicy;
/// use std::time::Duration;
/// let policy = ReconnectPolicy::default();
/// let mut backoff = policy.backoff();
/// let first = backoff.next_delay(0.5);
/// assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
/// for _ in 0..20 { backoff.next_delay(1.0); }
/// assert!(backoff.next_delay(1.0) <= policy.max);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconnectPolicy {
    /// Delay before the first retry (jitter draws it down to as low as half).
    pub initial: Duration,
    /// Cap on the delay.
    pub max: Duration,
    /// Growth factor per failed attempt.
    pub multiplier: f64,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }
}

impl ReconnectPolicy {
    /// A fresh backoff sequence.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            policy: *self,
            attempt: 0,
        }
    }
}

/// State of one backoff sequence: pure, the caller supplies the randomness.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: ReconnectPolicy,
    attempt: u32,
}

impl Backoff {
    /// The delay before the next attempt. `unit` in `[0, 1]` is the jitter
    /// draw: the delay is uniform in `[d/2, d]` ("equal jitter") where `d`
    /// is the exponential delay for this attempt, capped at `max`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self.policy.multiplier.powi(self.attempt.min(64) as i32);
        let full = self.policy.initial.mul_f64(exp).min(self.policy.max);
        self.attempt = self.attempt.saturating_add(1);
        full.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// Back to the first delay (after a good connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}
