//! A [`Dialer`] over memory pairs, with a listener for the accepting side.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crsync_peer::{Connection, Dialer, SiteId, TransportError};
use futures_util::Stream;
use futures_util::future::{BoxFuture, FutureExt};
use tokio::sync::mpsc;

use super::{CutHandle, FaultConfig, labeled_pair};

/// How many dialed connections may wait for [`MemoryListener::accept`]
/// before `dial` waits too.
pub const LISTENER_BACKLOG: usize = 16;

/// A dialer and its listener, both named `name` in connection labels.
///
/// Every dial makes a fresh pair from `config`, with the seed
/// `config.seed` mixed with the dial's number (so a run is reproducible but two
/// connections do not fault alike).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use crsync_peer::{Dialer, SiteId, TransportError};
/// use crsync_transports::memory::{self, FaultConfig};
///
/// let (mut dialer, mut listener) = memory::dialer("server", FaultConfig::default());
/// let control = dialer.control();
/// let me = SiteId::from_bytes([1; 16]);
///
/// let ours = dialer.dial(me).await?;
/// let theirs = listener.accept().await.expect("dialer alive");
/// assert_eq!(ours.label, "memory:server#1");
/// assert_eq!(theirs.label, "memory:server#1 (accepted)");
///
/// control.set_online(false);
/// assert!(matches!(dialer.dial(me).await, Err(TransportError::Connect { .. })));
/// control.set_online(true);
/// assert!(dialer.dial(me).await.is_ok());
/// # Ok(()) }
/// ```
pub fn dialer(name: impl Into<String>, config: FaultConfig) -> (MemoryDialer, MemoryListener) {
    let (tx, rx) = mpsc::channel(LISTENER_BACKLOG);
    let dialer = MemoryDialer {
        name: name.into(),
        config,
        tx,
        control: MemoryControl::default(),
    };
    (dialer, MemoryListener { rx })
}

/// Dials memory pairs; see [`dialer`].
#[derive(Debug)]
pub struct MemoryDialer {
    name: String,
    config: FaultConfig,
    tx: mpsc::Sender<Connection>,
    control: MemoryControl,
}

impl MemoryDialer {
    /// A handle to switch this dialer offline, cut its connections and count
    /// its dials, usable after the dialer moved into a Peer.
    pub fn control(&self) -> MemoryControl {
        self.control.clone()
    }
}

impl Dialer for MemoryDialer {
    fn dial(&mut self, _local: SiteId) -> BoxFuture<'_, Result<Connection, TransportError>> {
        async move {
            let target = self.label();
            if !self.control.is_online() {
                return Err(TransportError::Connect {
                    target,
                    source: "memory network is offline".into(),
                });
            }
            let number = self.control.inner.dials.fetch_add(1, Ordering::SeqCst) + 1;
            let mut config = self.config.clone();
            config.seed ^= number.wrapping_mul(0xD1B5_4A32_D192_ED03);
            let label = format!("{target}#{number}");
            let accepted = format!("{label} (accepted)");
            let (ours, theirs, cut) = labeled_pair(config, label, accepted);
            self.tx
                .send(theirs)
                .await
                .map_err(|_| TransportError::Connect {
                    target,
                    source: "the memory listener is gone".into(),
                })?;
            self.control.register(cut);
            Ok(ours)
        }
        .boxed()
    }

    fn label(&self) -> String {
        format!("memory:{}", self.name)
    }
}

/// Control over a [`MemoryDialer`]. Cloneable.
#[derive(Debug, Clone, Default)]
pub struct MemoryControl {
    inner: Arc<ControlInner>,
}

#[derive(Debug)]
struct ControlInner {
    online: AtomicBool,
    dials: AtomicU64,
    live: Mutex<Vec<CutHandle>>,
}

impl Default for ControlInner {
    fn default() -> Self {
        ControlInner {
            online: AtomicBool::new(true),
            dials: AtomicU64::new(0),
            live: Mutex::new(Vec::new()),
        }
    }
}

impl MemoryControl {
    /// Online (the default): dials succeed. Offline: dials fail with
    /// [`TransportError::Connect`]; connections already open stay open (use
    /// [`cut_all`](Self::cut_all) to drop them).
    pub fn set_online(&self, online: bool) {
        self.inner.online.store(online, Ordering::SeqCst);
    }

    /// Whether dials succeed.
    pub fn is_online(&self) -> bool {
        self.inner.online.load(Ordering::SeqCst)
    }

    /// Number of successful dials so far.
    pub fn dial_count(&self) -> u64 {
        self.inner.dials.load(Ordering::SeqCst)
    }

    /// Cuts every connection this dialer made.
    pub fn cut_all(&self) {
        for cut in self.live().drain(..) {
            cut.cut();
        }
    }

    fn register(&self, cut: CutHandle) {
        let mut live = self.live();
        live.retain(|c| !c.is_cut());
        live.push(cut);
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Vec<CutHandle>> {
        // The list stays valid even if a holder panicked.
        self.inner
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The accepting side of a [`MemoryDialer`]: yields the far end of every
/// dialed connection (hand it to `Peer::accept`).
#[derive(Debug)]
pub struct MemoryListener {
    rx: mpsc::Receiver<Connection>,
}

impl MemoryListener {
    /// The next dialed connection; `None` once the dialer is dropped.
    pub async fn accept(&mut self) -> Option<Connection> {
        self.rx.recv().await
    }
}

impl Stream for MemoryListener {
    type Item = Connection;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Connection>> {
        self.get_mut().rx.poll_recv(cx)
    }
}
