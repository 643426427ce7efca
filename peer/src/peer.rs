//! The [`Peer`]: a [`Store`] synced with any number of remotes at once.
//!
//! Each connection runs one session: the pure state machine
//! [`proto::Session`](crate::proto::Session), driven by `peer/session.rs`,
//! which performs what it asks for (merges, reads, sends). Outgoing connections come from
//! [`Dialer`]s and are redialed with backoff; incoming ones are handed to
//! [`Peer::accept`].

mod session;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_core::Stream;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proto::{SessionStatus, Side, Trust};
use crate::store::ChangeSource;
use crate::transport::{Connection, Dialer, ReconnectPolicy};
use crate::{Cursor, SiteId, Store, StoreEvent};

/// Capacity of the broadcast channel of [`PeerEvent`]s.
pub const PEER_EVENT_CAP: usize = 1024;
/// Default number of batches in flight per remote.
pub const DEFAULT_WINDOW: usize = 8;

/// Something that happened on a [`Peer`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerEvent {
    /// A remote said who it is on a new connection.
    Connected {
        /// The remote's site id.
        peer: SiteId,
        /// The connection's label (transport and address).
        transport: String,
    },
    /// A remote sent its cursor: the initial sync towards it starts.
    Sync {
        /// The remote.
        peer: SiteId,
    },
    /// A remote finished sending what we lacked when we connected.
    Eose {
        /// The remote.
        peer: SiteId,
    },
    /// Committed changes to these tables, local or merged from a remote.
    Change {
        /// The tables.
        tables: BTreeSet<String>,
        /// Who made them.
        source: ChangeSource,
    },
    /// A remote runs a newer schema; its changes wait until ours catches up.
    Outdated {
        /// The remote.
        peer: SiteId,
        /// Its `user_version`.
        remote_version: i64,
        /// Ours.
        local_version: i64,
    },
    /// A connection ended.
    Disconnected {
        /// The remote, if it had said who it is.
        peer: Option<SiteId>,
        /// The connection's label.
        transport: String,
        /// Why.
        reason: String,
    },
    /// A batch or message was refused, by us (`by_remote: false`) or by the
    /// remote; nothing of it was applied.
    Rejected {
        /// The remote.
        peer: SiteId,
        /// Stable code.
        code: crate::proto::ErrorCode,
        /// Detail.
        message: String,
        /// Whether the remote refused what we sent.
        by_remote: bool,
    },
    /// A dial attempt failed (the dialer retries with backoff).
    DialFailed {
        /// The dialer's label.
        transport: String,
        /// Why.
        reason: String,
    },
    /// This replica and another share a site id: one of them is a copied
    /// database file (`cp`, a restored backup, a VM image), and syncing both
    /// would lose writes. Sync stops (dialers stop redialing) until the copy
    /// is forked (`crsync fork --db FILE`, [`Store::fork`]).
    SiteIdConflict {
        /// The remote that showed it, if the conflict was seen over a connection.
        peer: Option<SiteId>,
        /// What happened and how to fix it.
        message: String,
    },
    /// This receiver fell behind and missed events.
    Lagged {
        /// How many.
        missed: u64,
    },
}

/// Options for a [`Peer`]; start from [`Peer::builder`].
#[derive(Debug, Clone)]
pub struct PeerBuilder {
    store: Store,
    config: PeerConfig,
}

#[derive(Debug, Clone)]
pub(crate) struct PeerConfig {
    pub(crate) ping_interval: Duration,
    pub(crate) liveness_timeout: Option<Duration>,
    pub(crate) ack_timeout: Duration,
    pub(crate) window: usize,
    pub(crate) reconnect: ReconnectPolicy,
    pub(crate) schema_poll: Duration,
    pub(crate) accepted_trust: Trust,
    pub(crate) max_claim_sites: usize,
    pub(crate) outbox: usize,
}

impl PeerBuilder {
    /// How often to ping each remote (default 30 s).
    pub fn ping_interval(mut self, d: Duration) -> Self {
        self.config.ping_interval = d;
        self
    }

    /// Drop a dialed connection that received nothing for this long (default 75 s).
    pub fn liveness_timeout(mut self, d: Duration) -> Self {
        self.config.liveness_timeout = Some(d);
        self
    }

    /// Resend from the last acknowledged point if no acknowledgement came for this long (default 10 s).
    pub fn ack_timeout(mut self, d: Duration) -> Self {
        self.config.ack_timeout = d;
        self
    }

    /// Batches in flight per remote (default 8).
    pub fn window(mut self, batches: usize) -> Self {
        self.config.window = batches.max(1);
        self
    }

    /// Backoff between redials (default 500 ms doubling to 30 s, with jitter).
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.config.reconnect = policy;
        self
    }

    /// How often to check our schema version (default 1 s).
    pub fn schema_poll(mut self, d: Duration) -> Self {
        self.config.schema_poll = d;
        self
    }

    /// How far claims of remotes that connected to us are believed (default
    /// [`Trust::OwnSite`]: only about their own site). Remotes we dial are
    /// believed fully.
    pub fn accepted_trust(mut self, trust: Trust) -> Self {
        self.config.accepted_trust = trust;
        self
    }

    /// Sites in one cursor or batch of a remote at most (default 16,384);
    /// larger claims are refused with `LIMIT_EXCEEDED`.
    pub fn max_claim_sites(mut self, sites: usize) -> Self {
        self.config.max_claim_sites = sites;
        self
    }

    /// Messages each session queues for its connection's sink before it
    /// waits (default 16). A server with many remotes keeps this small: every
    /// queued message may be a whole batch.
    pub fn outbox(mut self, messages: usize) -> Self {
        self.config.outbox = messages.max(1);
        self
    }

    /// Starts the Peer. Must be called inside a tokio runtime.
    pub fn build(self) -> Peer {
        Peer::start(self.store, self.config)
    }
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) config: PeerConfig,
    pub(crate) events: broadcast::Sender<PeerEvent>,
    pub(crate) cancel: CancellationToken,
    pub(crate) schema: watch::Receiver<i64>,
    /// Our cursor, refreshed after every commit the Store reports.
    pub(crate) cursor: watch::Receiver<Cursor>,
    /// Every open session's status, as its state machine reports it.
    sessions: watch::Sender<BTreeMap<u64, SessionStatus>>,
    next_session: AtomicU64,
    tasks: TaskTracker,
}

impl Inner {
    pub(crate) fn emit(&self, event: PeerEvent) {
        let _ = self.events.send(event);
    }

    /// A new session's id for [`publish`](Self::publish).
    pub(crate) fn session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a session's status (`None`: it ended).
    pub(crate) fn publish(&self, id: u64, status: Option<SessionStatus>) {
        self.sessions.send_if_modified(|m| match status {
            Some(s) if m.get(&id) != Some(&s) => {
                m.insert(id, s);
                true
            }
            Some(_) => false,
            None => m.remove(&id).is_some(),
        });
    }
}

/// A database that syncs with remote peers. Cheap to clone.
///
/// ```no_run
/// # async fn demo(dialer: impl crsync_peer::Dialer) -> Result<(), Box<dyn std::error::Error>> {
/// use crsync_peer::{Peer, Store};
/// let store = Store::open("notes.db").await?;
/// let peer = Peer::builder(store).build();
/// peer.add_dialer(dialer); // e.g. crsync_transports::sse::SseDialer
/// let mut events = peer.events();
/// # let _ = &mut events;
/// peer.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Peer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("site_id", &self.site_id())
            .finish_non_exhaustive()
    }
}

/// Waiting for a remote ended without it catching up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The time ran out.
    #[error("timed out waiting for {0}")]
    Timeout(SiteId),
    /// The Peer shut down.
    #[error("the peer shut down")]
    Shutdown,
}

impl Peer {
    /// Options with defaults for a Peer over `store`.
    pub fn builder(store: Store) -> PeerBuilder {
        PeerBuilder {
            store,
            config: PeerConfig {
                ping_interval: Duration::from_secs(30),
                liveness_timeout: Some(Duration::from_secs(75)),
                ack_timeout: Duration::from_secs(10),
                window: DEFAULT_WINDOW,
                reconnect: ReconnectPolicy::default(),
                schema_poll: Duration::from_secs(1),
                accepted_trust: Trust::OwnSite,
                max_claim_sites: crate::proto::DEFAULT_MAX_CLAIM_SITES,
                outbox: session::OUTBOX_CAP,
            },
        }
    }

    fn start(store: Store, config: PeerConfig) -> Peer {
        let (events, _) = broadcast::channel(PEER_EVENT_CAP);
        let (schema_tx, schema) = watch::channel(0);
        let (sessions, _) = watch::channel(BTreeMap::new());
        let (cursor_tx, cursor) = watch::channel(Cursor::new());
        let inner = Arc::new(Inner {
            store,
            config,
            events,
            cancel: CancellationToken::new(),
            schema,
            cursor,
            sessions,
            next_session: AtomicU64::new(0),
            tasks: TaskTracker::new(),
        });
        inner
            .tasks
            .spawn(watch_store(inner.clone(), schema_tx, cursor_tx));
        Peer { inner }
    }

    /// This database's site id.
    pub fn site_id(&self) -> SiteId {
        self.inner.store.site_id()
    }

    /// The underlying Store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Events as a stream; a receiver that falls behind gets [`PeerEvent::Lagged`].
    pub fn events(&self) -> impl Stream<Item = PeerEvent> + Send + Unpin + 'static {
        use tokio_stream::StreamExt;
        use tokio_stream::wrappers::BroadcastStream;
        use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
        BroadcastStream::new(self.inner.events.subscribe()).map(|item| match item {
            Ok(event) => event,
            Err(BroadcastStreamRecvError::Lagged(missed)) => PeerEvent::Lagged { missed },
        })
    }

    /// Runs a session over an incoming connection until it ends.
    pub fn accept(&self, connection: Connection) -> JoinHandle<()> {
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            session::run(inner, connection, Side::Accepted).await;
        })
    }

    /// Dials `dialer` now and again whenever its connection ends, with backoff
    /// ([`ReconnectPolicy`]). A connection resets the backoff when it ends,
    /// unless the remote refused what we sent on it (an HTTP 413, say): that
    /// would be refused again at once, so the delays keep growing.
    pub fn add_dialer(&self, dialer: impl Dialer) -> JoinHandle<()> {
        let inner = self.inner.clone();
        self.inner.tasks.spawn(dial_loop(inner, Box::new(dialer)))
    }

    /// Waits until `remote` has sent everything we lacked when we connected (`eose`).
    pub async fn wait_caught_up(&self, remote: SiteId, timeout: Duration) -> Result<(), WaitError> {
        let mut rx = self.inner.sessions.subscribe();
        let wait = rx.wait_for(|m| {
            m.values()
                .any(|s| s.remote == Some(remote) && s.received_eose)
        });
        tokio::select! {
            r = tokio::time::timeout(timeout, wait) => match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err(WaitError::Shutdown),
                Err(_) => Err(WaitError::Timeout(remote)),
            },
            _ = self.inner.cancel.cancelled() => Err(WaitError::Shutdown),
        }
    }

    /// Remotes with at least one open session.
    pub fn connected_peers(&self) -> Vec<SiteId> {
        let sessions = self.inner.sessions.borrow();
        let remotes: BTreeSet<SiteId> = sessions.values().filter_map(|s| s.remote).collect();
        remotes.into_iter().collect()
    }

    /// The status of every open session (one per connection), straight from
    /// its protocol state machine: phase, what the remote acknowledged,
    /// batches in flight, both `eose`s, counts, the last refusal.
    pub fn sessions(&self) -> Vec<SessionStatus> {
        self.inner.sessions.borrow().values().cloned().collect()
    }

    /// Stops dialing, ends every session (in-flight merges finish first) and waits for them.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

/// Forwards Store events as Peer events and tracks our schema version and
/// cursor (every commit notifies the sessions through the cursor watch).
async fn watch_store(
    inner: Arc<Inner>,
    schema_tx: watch::Sender<i64>,
    cursor_tx: watch::Sender<Cursor>,
) {
    let mut store_events = inner.store.subscribe();
    if let Ok(v) = inner.store.schema_version().await {
        schema_tx.send_replace(v);
    }
    if let Ok(c) = inner.store.cursor().await {
        cursor_tx.send_replace(c);
    }
    let mut tick = tokio::time::interval(inner.config.schema_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            event = store_events.recv() => {
                match event {
                    Ok(StoreEvent::Changed { tables, source }) => inner.emit(PeerEvent::Change { tables, source }),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => inner.emit(PeerEvent::Lagged { missed }),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                // Sent even when unchanged: an unranged merge moves no cursor but has rows to relay.
                match inner.store.cursor().await {
                    Ok(c) => { cursor_tx.send_replace(c); }
                    Err(e) => tracing::warn!(error = %e, "cannot read our cursor"),
                }
            },
            _ = tick.tick() => {
                if let Ok(v) = inner.store.schema_version().await {
                    schema_tx.send_if_modified(|old| if *old != v { *old = v; true } else { false });
                }
            }
        }
    }
}

async fn dial_loop(inner: Arc<Inner>, mut dialer: Box<dyn Dialer>) {
    let mut backoff = inner.config.reconnect.backoff();
    let local = inner.store.site_id();
    let mut wait_at_least: Option<Duration> = None;
    loop {
        let attempt = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = dialer.dial(local) => r,
        };
        match attempt {
            Ok(connection) => {
                let ended = session::run(inner.clone(), connection, Side::Dialed).await;
                if ended.site_id_conflict {
                    tracing::warn!(transport = %dialer.label(), "site id conflict: no longer dialing");
                    return;
                }
                // After a refusal (a 413, say) the next attempt would be
                // refused the same way: back off further instead of hammering.
                if ended.refused {
                    tracing::info!(transport = %dialer.label(), "the remote refused what we sent; backing off");
                } else {
                    backoff.reset();
                }
            }
            Err(e) => {
                tracing::debug!(transport = %dialer.label(), error = %e, "dial failed");
                inner.emit(PeerEvent::DialFailed {
                    transport: dialer.label(),
                    reason: e.to_string(),
                });
                // A busy remote (HTTP 429) said how long to wait: never sooner.
                wait_at_least = e.retry_after();
            }
        }
        let delay = backoff
            .next_delay(rand::random::<f64>())
            .max(wait_at_least.take().unwrap_or_default());
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
