//! The [`Peer`]: a [`Store`] synced with any number of remotes at once.
//!
//! Each connection runs one session: the pure state machine
//! [`proto::Session`](crate::proto::Session), driven by `peer/session.rs`,
//! which performs what it asks for (merges, reads, sends). Outgoing connections come from
//! [`Dialer`]s and are redialed with backoff; incoming ones are handed to
//! [`Peer::accept`].

mod dialer;
mod session;
mod status;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures_core::Stream;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::proto::{SessionStatus, Side, Trust};
use crate::store::ChangeSource;
use crate::transport::{Connection, Dialer, LinkSettings, ReconnectPolicy};
use crate::{Cursor, DbVersion, SiteId, Store, StoreEvent};
pub use dialer::{DialFailure, DialerHandle};
use status::{Link, Noticed};
pub use status::{Pending, Progress, RemoteStatus, SyncPhase, SyncStatus};

/// Capacity of the broadcast channel of [`PeerEvent`]s.
pub const PEER_EVENT_CAP: usize = 1024;
/// Default number of batches in flight per remote.
pub const DEFAULT_WINDOW: usize = 8;
/// How often a remote that stays in sync is noted again in the Store's
/// record of remotes ([`Store::remotes`]).
const REMOTE_SAVE_EVERY: Duration = Duration::from_secs(5);

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
    /// A dial attempt failed. The dialer retries with backoff, except when
    /// the remote refused our credentials ([`DialFailure::Unauthorized`],
    /// [`DialFailure::Forbidden`]): then it waits for
    /// [`DialerHandle::set_token`] or [`DialerHandle::resume`], and this
    /// event comes once.
    DialFailed {
        /// The dialer's label.
        transport: String,
        /// What kind of failure.
        failure: DialFailure,
        /// Why, in words.
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
    /// Sessions running now (what a session's commit coalescing scales with).
    open_sessions: AtomicUsize,
    /// Every dialer and accepted connection, by link id.
    links: Mutex<BTreeMap<u64, Link>>,
    /// Bumped whenever a link changes (for status watchers).
    links_changed: watch::Sender<u64>,
    next_link: AtomicU64,
    /// Per remote site, the newest of our own versions it acknowledged.
    acknowledged: watch::Sender<BTreeMap<SiteId, DbVersion>>,
    /// The same values counted, so the lowest is found without scanning
    /// every remote (updated under `acknowledged`'s lock).
    acknowledged_levels: Mutex<BTreeMap<DbVersion, usize>>,
    /// Own versions with the time they were first seen.
    noticed: Mutex<Noticed>,
    /// Sync is paused for the whole Peer.
    paused: watch::Sender<bool>,
    /// When the Peer started (the first-seen time of older writes).
    started: SystemTime,
    /// Ends the sessions of accepted connections when sync is paused.
    accepted_stop: Mutex<session::Stop>,
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

    /// How many sessions are running now.
    pub(crate) fn open_sessions(&self) -> usize {
        self.open_sessions.load(Ordering::Relaxed)
    }

    /// Records the status of session `id` on `link` (`None`: it ended).
    pub(crate) fn publish(&self, id: u64, link: u64, status: Option<SessionStatus>) {
        if let Some(s) = &status {
            self.note_acknowledged(link, s);
        }
        self.sessions.send_if_modified(|m| match status {
            Some(s) if m.get(&id) != Some(&s) => {
                m.insert(id, s);
                true
            }
            Some(_) => false,
            None => m.remove(&id).is_some(),
        });
    }

    /// Raises what the session's remote acknowledged of ours, and notes
    /// when we were in sync with it.
    fn note_acknowledged(&self, link: u64, s: &SessionStatus) {
        let Some(remote) = s.remote else { return };
        let local = self.store.site_id();
        let acked = s.acknowledged.get(&local);
        let mut floor = None;
        // Most calls raise nothing: find that out under the read lock.
        let known = self
            .acknowledged
            .borrow()
            .get(&remote)
            .is_some_and(|old| acked <= *old);
        let raised = !known
            && self.acknowledged.send_if_modified(|m| {
                let mut levels = self
                    .acknowledged_levels
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let old = match m.get(&remote) {
                    Some(old) => *old,
                    None => {
                        *levels.entry(DbVersion::ZERO).or_default() += 1;
                        DbVersion::ZERO
                    }
                };
                if acked <= old {
                    m.entry(remote).or_insert(old);
                    return false;
                }
                m.insert(remote, acked);
                if let Some(count) = levels.get_mut(&old) {
                    *count -= 1;
                    if *count == 0 {
                        levels.remove(&old);
                    }
                }
                *levels.entry(acked).or_default() += 1;
                floor = levels.keys().next().copied();
                true
            });
        if raised {
            if let Some(floor) = floor {
                self.lock_noticed().forget_upto(floor);
            }
        }
        let own = self.cursor.borrow().get(&local);
        let in_sync = Link::in_sync(s, local, own);
        if !raised && !in_sync {
            return;
        }
        let now = SystemTime::now();
        let mut links = self.lock_links();
        let Some(link) = links.get_mut(&link) else {
            return;
        };
        let newly_synced = in_sync
            && link
                .last_synced_at
                .is_none_or(|at| now.duration_since(at).unwrap_or_default() >= REMOTE_SAVE_EVERY);
        if in_sync {
            link.last_synced_at = Some(now);
        }
        if raised || newly_synced {
            link.record_due = Some(crate::RemoteRecord {
                site: remote,
                transport: link.transport.clone(),
                acknowledged: acked,
                synced_at: link.last_synced_at,
            });
        }
        // At most one record per remote every REMOTE_SAVE_EVERY: a server's
        // remotes each acknowledge every commit. What waits is handed on by
        // a later call or when the session ends.
        let due = link
            .record_saved
            .is_none_or(|at| at.elapsed() >= REMOTE_SAVE_EVERY);
        if due {
            if let Some(record) = link.take_record() {
                self.store.note_remote(record);
            }
        }
    }

    pub(crate) fn lock_links(&self) -> MutexGuard<'_, BTreeMap<u64, Link>> {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_accepted_stop(&self) -> MutexGuard<'_, session::Stop> {
        self.accepted_stop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_noticed(&self) -> MutexGuard<'_, Noticed> {
        self.noticed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes a link and tells status watchers.
    pub(crate) fn update_link(&self, link: u64, f: impl FnOnce(&mut Link)) {
        if let Some(l) = self.lock_links().get_mut(&link) {
            f(l);
        }
        self.links_changed.send_modify(|v| *v += 1);
    }

    /// A new link; returns its id.
    pub(crate) fn add_link(&self, transport: String, dialed: bool) -> u64 {
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        self.lock_links().insert(id, Link::new(transport, dialed));
        self.links_changed.send_modify(|v| *v += 1);
        id
    }

    pub(crate) fn remove_link(&self, link: u64) {
        self.lock_links().remove(&link);
        self.links_changed.send_modify(|v| *v += 1);
    }

    /// A session opened on `link`.
    pub(crate) fn session_opened(&self, link: u64, session: u64) {
        // With a second remote, what one sends us is relayed to the other.
        if self.open_sessions.fetch_add(1, Ordering::Relaxed) >= 1 {
            self.store.expect_relaying();
        }
        self.update_link(link, |l| {
            l.session = Some(session);
            l.connected_since = Some(SystemTime::now());
            l.opened = Some(Instant::now());
            l.disconnected = false;
        });
    }

    /// The session of `link` ended; `last_error` is its last refusal, if any.
    pub(crate) fn session_closed(
        &self,
        link: u64,
        last_error: Option<(crate::proto::ErrorCode, String)>,
    ) {
        self.open_sessions.fetch_sub(1, Ordering::Relaxed);
        self.update_link(link, |l| {
            if let Some(record) = l.take_record() {
                self.store.note_remote(record);
            }
            l.session = None;
            l.connected_since = None;
            l.opened = None;
            l.disconnected = true;
            if last_error.is_some() {
                l.last_error = last_error;
            }
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
    /// Sync is paused ([`Peer::pause`]): it cannot happen until resumed.
    #[error("sync is paused")]
    Paused,
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
        let cancel = CancellationToken::new();
        let accepted_stop = Mutex::new(session::Stop::from_token(cancel.child_token()));
        let inner = Arc::new(Inner {
            store,
            config,
            events,
            cancel,
            schema,
            cursor,
            sessions,
            next_session: AtomicU64::new(0),
            open_sessions: AtomicUsize::new(0),
            links: Mutex::new(BTreeMap::new()),
            links_changed: watch::channel(0).0,
            next_link: AtomicU64::new(0),
            acknowledged: watch::channel(BTreeMap::new()).0,
            acknowledged_levels: Mutex::new(BTreeMap::new()),
            noticed: Mutex::new(Noticed::default()),
            paused: watch::channel(false).0,
            started: SystemTime::now(),
            accepted_stop,
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

    /// Runs a session over an incoming connection until it ends. While sync
    /// is paused ([`pause`](Self::pause)) the connection is closed at once.
    pub fn accept(&self, connection: Connection) -> JoinHandle<()> {
        let inner = self.inner.clone();
        self.inner.tasks.spawn(async move {
            if *inner.paused.borrow() {
                return;
            }
            let link = inner.add_link(connection.label.clone(), false);
            let stop = inner.lock_accepted_stop().clone();
            let side = (Side::Accepted, LinkSettings::default());
            session::run(inner.clone(), connection, side, link, stop).await;
            inner.remove_link(link);
        })
    }

    /// Dials `dialer` now and again whenever its connection ends, with backoff
    /// ([`ReconnectPolicy`]). A connection resets the backoff when it ends,
    /// unless the remote refused what we sent on it (an HTTP 413, say): that
    /// would be refused again at once, so the delays keep growing. A refused
    /// credential (HTTP 401 or 403) stops the dialing until the handle
    /// supplies a new token or resumes.
    ///
    /// The returned handle pauses, resumes and removes this dialer; dropping
    /// it leaves the dialer running.
    pub fn add_dialer(&self, dialer: impl Dialer) -> DialerHandle {
        dialer::start(self.inner.clone(), Box::new(dialer))
    }

    /// Pauses sync entirely: every dialer stops (its connection closes with
    /// a `Disconnected` event) and accepted connections are closed and
    /// refused, until [`resume`](Self::resume). Nothing local is lost: the
    /// changes are sent after the resume.
    pub fn pause(&self) {
        self.inner.paused.send_replace(true);
        let fresh = session::Stop::from_token(self.inner.cancel.child_token());
        let old = std::mem::replace(&mut *self.inner.lock_accepted_stop(), fresh);
        old.stop("sync paused");
        self.inner.links_changed.send_modify(|v| *v += 1);
    }

    /// Resumes sync after [`pause`](Self::pause) (dialers paused one by one
    /// through their handles stay paused).
    pub fn resume(&self) {
        self.inner.paused.send_replace(false);
        self.inner.links_changed.send_modify(|v| *v += 1);
    }

    /// Waits until `remote` has sent everything we lacked when we connected
    /// (`eose`). Fails at once with [`WaitError::Paused`] while sync is paused.
    pub async fn wait_caught_up(&self, remote: SiteId, timeout: Duration) -> Result<(), WaitError> {
        let mut rx = self.inner.sessions.subscribe();
        let wait = rx.wait_for(|m| {
            m.values()
                .any(|s| s.remote == Some(remote) && s.received_eose)
        });
        self.wait_unpaused(wait, timeout, remote).await
    }

    /// Waits until a remote holds our own write `version` (the version
    /// [`Store::write_versioned`] returned): `remote` names one, `None` takes
    /// any. Fails at once with [`WaitError::Paused`] while sync is paused.
    ///
    /// ```no_run
    /// # async fn demo(peer: crsync_peer::Peer) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// let (_, version) = peer
    ///     .store()
    ///     .write_versioned(|tx| tx.execute("INSERT INTO notes (id, body) VALUES (1, 'hi')", []))
    ///     .await?;
    /// if let Some(version) = version {
    ///     peer.wait_acknowledged(version, None, Duration::from_secs(10)).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn wait_acknowledged(
        &self,
        version: DbVersion,
        remote: Option<SiteId>,
        timeout: Duration,
    ) -> Result<(), WaitError> {
        let mut rx = self.inner.acknowledged.subscribe();
        let wait = rx.wait_for(|m| match remote {
            Some(r) => m.get(&r).is_some_and(|v| *v >= version),
            None => m.values().any(|v| *v >= version),
        });
        let who = remote.unwrap_or(self.site_id());
        self.wait_unpaused(wait, timeout, who).await
    }

    async fn wait_unpaused<T, E>(
        &self,
        wait: impl std::future::Future<Output = Result<T, E>>,
        timeout: Duration,
        remote: SiteId,
    ) -> Result<(), WaitError> {
        let mut paused = self.inner.paused.subscribe();
        if *paused.borrow_and_update() {
            return Err(WaitError::Paused);
        }
        tokio::select! {
            r = tokio::time::timeout(timeout, wait) => match r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err(WaitError::Shutdown),
                Err(_) => Err(WaitError::Timeout(remote)),
            },
            _ = paused.wait_for(|p| *p) => Err(WaitError::Paused),
            _ = self.inner.cancel.cancelled() => Err(WaitError::Shutdown),
        }
    }

    /// Sync as a whole and per remote: phases, what each remote holds of
    /// ours, what is still to upload, initial-sync progress, last sync, the
    /// last error. See [`watch_status`](Self::watch_status) to follow it.
    pub async fn status(&self) -> SyncStatus {
        let inner = &self.inner;
        let local = self.site_id();
        let own = match inner.store.cursor().await {
            Ok(cursor) => cursor.get(&local),
            Err(_) => inner.cursor.borrow().get(&local),
        };
        let acked = inner.acknowledged.borrow().clone();
        let sessions = inner.sessions.borrow().clone();
        let links: Vec<status::Link> = inner.lock_links().values().cloned().collect();
        let mut remotes = Vec::with_capacity(links.len());
        let mut floors = Vec::with_capacity(links.len());
        for link in &links {
            let session = link.session.and_then(|id| sessions.get(&id));
            let known = session
                .and_then(|s| s.remote)
                .and_then(|r| acked.get(&r).copied())
                .unwrap_or(DbVersion::ZERO);
            floors.push(known);
            remotes.push((link, session, known));
        }
        let best = acked.values().max().copied().unwrap_or(DbVersion::ZERO);
        floors.push(best);
        let counts = inner
            .store
            .own_versions_after(&floors, own)
            .await
            .unwrap_or_default();
        let count = |i: usize| counts.get(i).copied().unwrap_or(0);
        let noticed = inner.lock_noticed();
        let pending = |i: usize, after: DbVersion| Pending {
            transactions: count(i),
            oldest: (count(i) > 0).then(|| noticed.oldest_after(after).unwrap_or(inner.started)),
        };
        let overall = pending(links.len(), best);
        let remotes = remotes
            .into_iter()
            .enumerate()
            .map(|(i, (link, session, known))| {
                let mut remote = status::remote_status(link, session, pending(i, known), known);
                // A session publishes only what changes, so the link's time
                // may be older than a sync that is still holding.
                if session.is_some_and(|s| status::Link::in_sync(s, local, own)) {
                    remote.last_synced_at = Some(SystemTime::now());
                }
                remote
            })
            .collect();
        drop(noticed);
        SyncStatus {
            own_version: own,
            pending: overall,
            remotes,
            paused: *inner.paused.borrow(),
        }
    }

    /// The [`status`](Self::status) each time it may have changed (at most
    /// every `every`), starting with the current one.
    pub fn watch_status(
        &self,
        every: Duration,
    ) -> impl Stream<Item = SyncStatus> + Send + Unpin + 'static {
        let peer = self.clone();
        let sessions = self.inner.sessions.subscribe();
        let links = self.inner.links_changed.subscribe();
        let cursor = self.inner.cursor.clone();
        let state = (peer, sessions, links, cursor, true);
        Box::pin(futures_util::stream::unfold(
            state,
            move |(peer, mut sessions, mut links, mut cursor, first)| async move {
                if !first {
                    tokio::time::sleep(every).await;
                    tokio::select! {
                        r = sessions.changed() => r.ok()?,
                        r = links.changed() => r.ok()?,
                        r = cursor.changed() => r.ok()?,
                        _ = peer.inner.cancel.cancelled() => return None,
                    }
                }
                sessions.mark_unchanged();
                links.mark_unchanged();
                cursor.mark_unchanged();
                let status = peer.status().await;
                Some((status, (peer, sessions, links, cursor, false)))
            },
        ))
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
    let local = inner.store.site_id();
    if let Ok(c) = inner.store.cursor().await {
        // Writes made before we started count as first seen at the start.
        inner.lock_noticed().note(c.get(&local), inner.started);
        cursor_tx.send_replace(c);
    }
    let mut tick = tokio::time::interval(inner.config.schema_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            event = store_events.recv() => {
                let mut own_write = false;
                match event {
                    Ok(StoreEvent::Changed { tables, source }) => {
                        own_write = source != ChangeSource::Merge;
                        inner.emit(PeerEvent::Change { tables, source });
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => inner.emit(PeerEvent::Lagged { missed }),
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                // Sent even when unchanged: an unranged merge moves no cursor but has rows to relay.
                match inner.store.cursor().await {
                    Ok(c) => {
                        if own_write {
                            inner.lock_noticed().note(c.get(&local), SystemTime::now());
                        }
                        cursor_tx.send_replace(c);
                    }
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
