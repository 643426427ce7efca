//! An in-memory connection pair with seeded fault injection, for tests.
//!
//! [`pair`] returns two [`Connection`]s wired to each other. Each direction is
//! a bounded queue of [`MEMORY_QUEUE_CAP`] messages (see
//! [`FaultConfig::capacity`]): when the reader falls behind, the writer's
//! `send` waits, so memory never grows without bound.
//!
//! Faults are decided by the writing side with a [`StdRng`] seeded from
//! [`FaultConfig::seed`] (one generator per direction), so the same seed and
//! the same messages give the same delivered sequence:
//! - **drop**: the message vanishes;
//! - **duplicate**: it is delivered twice;
//! - **reorder**: it is held back and delivered right after the next message
//!   (on close, it is delivered last);
//! - **delay**: it waits a random time in the configured range before it can be
//!   read; the queue stays first-in first-out, so a delay slows the messages
//!   behind it too and never reorders by itself;
//! - **cut**: a [`CutHandle`] (or [`FaultConfig::cut_after`]) closes both
//!   directions: further sends fail with [`TransportError::Closed`]; each
//!   stream delivers what was already queued, then yields
//!   `Err(TransportError::Closed)` and ends.
//!
//! Closing a sink (`SinkExt::close`) ends the other side's stream after the
//! queued messages (a clean end: no error item).
//!
//! [`dialer`] gives a [`MemoryDialer`] (implements [`Dialer`]) and a
//! [`MemoryListener`]: every dial makes a fresh pair, returns one end and
//! hands the other to the listener.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use crsync_peer::{SiteId, wire::TransportMessage};
//! use crsync_transports::memory::{self, FaultConfig};
//! use futures_util::{SinkExt, StreamExt};
//!
//! let me = SiteId::from_bytes([7; 16]);
//! let (mut a, mut b, cut) = memory::pair_with_cut(FaultConfig::seeded(42).with_json(true));
//! a.sink.send(TransportMessage::ping(me)).await?;
//! let received = b.stream.next().await.expect("stream open")?;
//! assert_eq!(received.message, TransportMessage::ping(me));
//!
//! cut.cut();
//! assert!(a.sink.send(TransportMessage::ping(me)).await.is_err());
//! assert!(b.stream.next().await.expect("one error item").is_err());
//! assert!(b.stream.next().await.is_none());
//! # Ok(()) }
//! ```
//!
//! [`Dialer`]: crsync_peer::Dialer

mod dialer;
mod link;

use std::sync::Arc;
use std::time::Duration;

use crsync_peer::Connection;
#[cfg(doc)]
use crsync_peer::TransportError;
use rand::rngs::StdRng;
use tokio::sync::watch;

pub use dialer::{LISTENER_BACKLOG, MemoryControl, MemoryDialer, MemoryListener, dialer};

/// Default capacity, in messages, of each direction of a memory pair.
pub const MEMORY_QUEUE_CAP: usize = 64;

/// Which faults a memory pair injects, and how it behaves.
///
/// Probabilities are in `[0, 1]` (values outside are clamped). The default
/// injects nothing.
///
/// ```
/// use crsync_transports::memory::FaultConfig;
/// use std::time::Duration;
/// let faults = FaultConfig::seeded(7)
///     .with_drop(0.05)
///     .with_duplicate(0.05)
///     .with_reorder(0.1)
///     .with_delay(Duration::ZERO, Duration::from_millis(20))
///     .with_cut_after(500);
/// assert_eq!(faults.seed, 7);
/// assert!(!FaultConfig::default().has_faults());
/// assert!(faults.has_faults());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Seed of the fault generators.
    pub seed: u64,
    /// Probability that a message is dropped.
    pub drop: f64,
    /// Probability that a message is delivered twice.
    pub duplicate: f64,
    /// Probability that a message is swapped with the next one.
    pub reorder: f64,
    /// Each delivered message waits a uniform random time in `min..=max`.
    pub delay: Option<(Duration, Duration)>,
    /// Cut the connection when this many messages (both directions together)
    /// have been sent: the send after the last allowed one fails and cuts.
    pub cut_after: Option<u64>,
    /// Carry messages as JSON text and parse them on arrival, to exercise the
    /// codec (a message that does not parse arrives as
    /// `Err(TransportError::Decode)`).
    pub json: bool,
    /// Capacity of each direction's queue, in messages (at least 1).
    pub capacity: usize,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            seed: 0,
            drop: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            delay: None,
            cut_after: None,
            json: false,
            capacity: MEMORY_QUEUE_CAP,
        }
    }
}

impl FaultConfig {
    /// No faults, with this seed (add faults with the `with_*` methods).
    pub fn seeded(seed: u64) -> Self {
        FaultConfig {
            seed,
            ..Self::default()
        }
    }

    /// Sets the drop probability.
    pub fn with_drop(mut self, probability: f64) -> Self {
        self.drop = probability;
        self
    }

    /// Sets the duplicate probability.
    pub fn with_duplicate(mut self, probability: f64) -> Self {
        self.duplicate = probability;
        self
    }

    /// Sets the probability that a message swaps places with the next one.
    pub fn with_reorder(mut self, probability: f64) -> Self {
        self.reorder = probability;
        self
    }

    /// Delays every message by a uniform random time in `min..=max`.
    pub fn with_delay(mut self, min: Duration, max: Duration) -> Self {
        self.delay = Some((min.min(max), max.max(min)));
        self
    }

    /// Cuts the connection after `messages` sends (both directions together).
    pub fn with_cut_after(mut self, messages: u64) -> Self {
        self.cut_after = Some(messages);
        self
    }

    /// Round-trips every message through JSON text.
    pub fn with_json(mut self, json: bool) -> Self {
        self.json = json;
        self
    }

    /// Sets the capacity of each direction's queue.
    pub fn with_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Whether any fault is configured.
    pub fn has_faults(&self) -> bool {
        self.drop > 0.0
            || self.duplicate > 0.0
            || self.reorder > 0.0
            || self.delay.is_some_and(|(_, max)| !max.is_zero())
            || self.cut_after.is_some()
    }
}

/// Closes both directions of a memory pair (see the module docs). Cloneable;
/// all clones cut the same pair.
#[derive(Debug, Clone)]
pub struct CutHandle {
    state: Arc<watch::Sender<bool>>,
}

impl CutHandle {
    fn new() -> Self {
        CutHandle {
            state: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Cuts the connection. Idempotent.
    pub fn cut(&self) {
        if !self.state.send_replace(true) {
            tracing::debug!("memory connection cut");
        }
    }

    /// Whether the connection was cut.
    pub fn is_cut(&self) -> bool {
        *self.state.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.state.subscribe()
    }
}

/// Resolves once the pair is cut (never, if every handle is gone uncut).
async fn cut_signal(cut: &mut watch::Receiver<bool>) {
    if cut.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A connected pair of in-memory connections, `(a, b)`: what `a` sends, `b`
/// receives, and the other way round.
pub fn pair(config: FaultConfig) -> (Connection, Connection) {
    let (a, b, _) = pair_with_cut(config);
    (a, b)
}

/// Like [`pair`], with a handle that cuts the connection.
pub fn pair_with_cut(config: FaultConfig) -> (Connection, Connection, CutHandle) {
    labeled_pair(config, "memory:a".into(), "memory:b".into())
}

pub(crate) fn labeled_pair(
    config: FaultConfig,
    label_a: String,
    label_b: String,
) -> (Connection, Connection, CutHandle) {
    let cut = CutHandle::new();
    let config = Arc::new(config);
    let sent = Arc::default();
    let (a_sink, b_stream) = link::direction(config.clone(), 0, &cut, Arc::clone(&sent));
    let (b_sink, a_stream) = link::direction(config, 1, &cut, sent);
    let a = Connection {
        sink: a_sink,
        stream: a_stream,
        label: label_a,
    };
    let b = Connection {
        sink: b_sink,
        stream: b_stream,
        label: label_b,
    };
    (a, b, cut)
}

/// The generator for one direction of a pair.
fn direction_rng(seed: u64, direction: u64) -> StdRng {
    use rand::SeedableRng;
    StdRng::seed_from_u64(seed ^ direction.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}
