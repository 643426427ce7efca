//! [`DbHost`]: one served database: its Peer plus the SSE streams open on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crsync_peer::proto::ErrorCode;
use crsync_peer::wire::{Hello, MessageKind, TransportMessage};
use crsync_peer::{Connection, Received, SiteId, TransportError};
use futures_util::SinkExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::Peer;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::limits::{Limits, OutboundRx, RateLimiter, outbound};
use crate::session::{Binding, SessionSecret, admit_post, may_replace};
use crate::snapshot::cache::SnapshotCache;

/// Messages queued from the Peer to one client before the Peer waits (the
/// queue is also bounded in bytes: `[limits] outbound_queue_bytes`).
pub const OUTBOUND_QUEUE_CAP: usize = 16;
/// Messages queued from one client to the Peer before the sender (a `POST`
/// or the WebSocket reader) waits.
pub const INBOUND_QUEUE_CAP: usize = 16;

type Inbound = mpsc::Sender<Result<Received, TransportError>>;

/// One open SSE stream.
struct Slot {
    id: u64,
    inbound: Inbound,
    /// Who opened it.
    principal: Principal,
    /// The secret a crsync client presents on its POSTs (`None`: v1).
    secret: Option<SessionSecret>,
}

impl Slot {
    fn binding(&self) -> Binding<'_> {
        Binding {
            principal: self.principal,
            secret: self.secret.as_ref(),
        }
    }
}

/// One database served over HTTP: its Peer and the open SSE streams by peer
/// id (one per principal at most, see [`crate::session`]).
pub(crate) struct DbHost {
    name: String,
    peer: Peer,
    streams: Mutex<HashMap<SiteId, Vec<Slot>>>,
    next_id: AtomicU64,
    closing: watch::Sender<bool>,
    limits: Arc<Limits>,
    rate: Option<RateLimiter<()>>,
    /// Its cached snapshot for new replicas (`None`: snapshots are off).
    snapshots: Option<Arc<SnapshotCache>>,
}

/// A stream for this peer id is already open.
#[derive(Debug)]
pub(crate) struct AlreadyConnected;

/// An open SSE session: what the Peer sends (its `connect` carries the
/// session secret of a crsync client), and a guard that unregisters the
/// stream when dropped (when the HTTP response body is dropped).
pub(crate) struct SseSession {
    pub(crate) outbound: OutboundRx,
    pub(crate) guard: StreamGuard,
}

/// What a `GET stream` asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamRequest<'a> {
    /// Who asks.
    pub(crate) principal: Principal,
    /// For which peer id.
    pub(crate) client: SiteId,
    /// A crsync client (the `crsync` query parameter): its stream gets a secret.
    pub(crate) crsync: bool,
    /// It reads the lossless value encoding.
    pub(crate) lossless: bool,
    /// The secret of its previous stream, to replace that one.
    pub(crate) presented: Option<&'a str>,
    /// The client's address, when known (for the connection's label).
    pub(crate) from: Option<std::net::SocketAddr>,
}

/// Unregisters an SSE stream when dropped.
pub(crate) struct StreamGuard {
    host: Arc<DbHost>,
    client: SiteId,
    id: u64,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self.host.lock_streams();
        if let Some(slots) = streams.get_mut(&self.client) {
            slots.retain(|s| s.id != self.id);
            if slots.is_empty() {
                streams.remove(&self.client);
            }
        }
        drop(streams);
        tracing::info!(db = %self.host.name, peer = %self.client, "stream closed");
    }
}

impl DbHost {
    pub(crate) fn new(
        name: impl Into<String>,
        peer: Peer,
        limits: Arc<Limits>,
        snapshots: Option<SnapshotCache>,
    ) -> Arc<Self> {
        Arc::new(DbHost {
            snapshots: snapshots.map(Arc::new),
            name: name.into(),
            peer,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            closing: watch::channel(false).0,
            rate: limits.database_limiter(),
            limits,
        })
    }

    /// The snapshot cache, if snapshots are on.
    pub(crate) fn snapshots(&self) -> Option<&Arc<SnapshotCache>> {
        self.snapshots.as_ref()
    }

    /// The server's limits.
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Counts one request on this database: `429 RATE_LIMITED` when over its rate.
    pub(crate) fn check_rate(&self) -> Result<(), ApiError> {
        match &self.rate {
            Some(limiter) => limiter
                .check(&())
                .map_err(|wait| ApiError::rate_limited("this database", wait)),
            None => Ok(()),
        }
    }

    /// Waits until this database takes one more request.
    pub(crate) async fn wait_rate(&self) {
        if let Some(limiter) = &self.rate {
            limiter.wait(&()).await;
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn peer(&self) -> &Peer {
        &self.peer
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<SiteId, Vec<Slot>>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    pub(crate) fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    /// Resolves once [`shutdown`](Self::shutdown) has begun.
    pub(crate) fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }

    /// Hands a connection to the Peer, inside a span naming it.
    /// The Peer owns the session task; it ends with the connection or at shutdown.
    pub(crate) fn accept(&self, conn: Connection, span: &tracing::Span) -> JoinHandle<()> {
        let _entered = span.enter();
        tracing::info!(label = %conn.label, "connection accepted");
        self.peer.accept(conn)
    }

    /// Opens an SSE session: registers it (refused if the same principal
    /// holds a stream for this peer id, unless the request presents that
    /// stream's secret: then it replaces it), synthesizes the client's
    /// `connect` (with crsync's capabilities if `lossless`), and hands the
    /// connection to the Peer.
    pub(crate) fn open_sse(
        self: &Arc<Self>,
        request: StreamRequest<'_>,
        io: Option<Arc<crate::limits::IoProgress>>,
        span: &tracing::Span,
        log: &crate::conn_log::ConnLog,
    ) -> Result<SseSession, AlreadyConnected> {
        let StreamRequest {
            principal,
            client,
            crsync,
            lossless,
            presented,
            from,
        } = request;
        let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE_CAP);
        let config = self.limits.config();
        let (out_tx, out_rx) = outbound(
            &self.name,
            config.outbound_queue_bytes,
            config.stall_timeout,
            io,
        );
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let secret = crsync.then(SessionSecret::random);
        {
            let mut streams = self.lock_streams();
            let slots = streams.entry(client).or_default();
            if let Some(open) = slots.iter().position(|s| s.principal == principal) {
                if !may_replace(slots[open].binding(), presented) {
                    return Err(AlreadyConnected);
                }
                // Dropping its inbound sender ends the old session.
                slots.remove(open);
                let _entered = span.enter();
                tracing::info!("the client replaced its previous stream (it presented its secret)");
            }
            let connect = TransportMessage {
                crsync: lossless.then(Hello::current),
                ..TransportMessage::connect(client)
            };
            // The channel is new and empty: this cannot fail.
            let _ = in_tx.try_send(Ok(Received::new(connect)));
            slots.push(Slot {
                id,
                inbound: in_tx,
                principal,
                secret: secret.clone(),
            });
        }
        // A crsync client learns its session secret from our `connect`.
        let handed_out = secret.clone();
        let sink = out_tx.sink().with(move |mut msg: TransportMessage| {
            if let (MessageKind::Connect, Some(secret)) = (msg.kind, &handed_out) {
                msg.crsync.get_or_insert_with(Hello::current).session =
                    Some(secret.as_str().to_owned());
            }
            futures_util::future::ready(Ok::<_, TransportError>(msg))
        });
        let conn = Connection {
            sink: Box::pin(sink),
            stream: Box::pin(ReceiverStream::new(in_rx)),
            label: format!("sse {}/{}{}", self.name, client, from_label(from)),
        };
        // Detached: the session ends when the SSE body is dropped or the Peer stops.
        drop(self.accept(log.counted(conn), span));
        Ok(SseSession {
            outbound: out_rx,
            guard: StreamGuard {
                host: Arc::clone(self),
                client,
                id,
            },
        })
    }

    /// Delivers a message `POST`ed by `principal` (presenting the session
    /// secret `presented`) for peer `client` into its stream's connection
    /// and waits until the Peer has processed it. Refused, touching no
    /// session, unless the stream is the principal's own and, for a crsync
    /// stream, the secret is its secret (see [`crate::session`]).
    pub(crate) async fn deliver(
        &self,
        principal: Principal,
        presented: Option<&str>,
        client: &str,
        message: TransportMessage,
    ) -> Result<(), ApiError> {
        let site: SiteId = client
            .parse()
            .map_err(|e| ApiError::malformed(format!("peerId: {e}")))?;
        let inbound = {
            let streams = self.lock_streams();
            let slots = streams.get(&site).map(Vec::as_slice).unwrap_or_default();
            match admit_post(slots.iter().map(Slot::binding), principal, presented) {
                // Streams are gone once shutdown began: say so, not "no stream".
                None if self.is_closing() => return Err(ApiError::shutting_down()),
                None => return Err(ApiError::not_connected(client)),
                Some(Err(refusal)) => {
                    tracing::debug!(db = %self.name, peer = %site, "refused a POST: {}", refusal.message());
                    return Err(refusal);
                }
                Some(Ok(index)) => slots[index].inbound.clone(),
            }
        };
        let (received, reply) = Received::with_reply(message);
        inbound
            .send(Ok(received))
            .await
            .map_err(|_| ApiError::not_connected(client))?;
        match reply.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(rejection)) => Err(rejection.into()),
            Err(_) if self.is_closing() => Err(ApiError::shutting_down()),
            Err(_) => Err(ApiError::internal(
                "the connection closed before the message was processed",
            )),
        }
    }

    /// Stops serving: refuses new streams, closes open ones and shuts the Peer
    /// and its Store down.
    pub(crate) async fn shutdown(&self) {
        self.closing.send_replace(true);
        self.lock_streams().clear();
        self.peer.shutdown().await;
        if let Err(e) = self.peer.store().clone().close().await {
            tracing::warn!(db = %self.name, "closing the store failed: {e}");
        }
    }

    /// The `error` message refusing a second stream for the same peer. Its
    /// text is the bare code, as wire v1 specifies it (v1 clients compare
    /// `error` with `"ALREADY_CONNECTED"`; they read no `code`).
    pub(crate) fn already_connected(&self, client: SiteId) -> TransportMessage {
        tracing::debug!(peer = %client, "a stream for this peer is already open");
        TransportMessage::error(
            self.peer.site_id(),
            &ErrorCode::AlreadyConnected,
            ErrorCode::AlreadyConnected.as_str(),
        )
    }
}

/// The end of a connection's label naming the client's address
/// (` from 127.0.0.1:5000`), read back by the status page.
pub(crate) fn from_label(addr: Option<std::net::SocketAddr>) -> String {
    addr.map(|a| format!("{FROM}{a}")).unwrap_or_default()
}

/// What separates a connection's label from the client's address.
pub(crate) const FROM: &str = " from ";

/// Whether a message may be sent with the given access: a read-only token may
/// send anything but changes. A data message without changes (every Peer ends
/// its initial stream with an `eose`) is let through with its version ranges
/// removed, so a read-only client can never move the server's cursor.
pub(crate) fn admit(message: &mut TransportMessage, access: crate::Access) -> bool {
    if access == crate::Access::ReadWrite || message.kind != MessageKind::Data {
        return true;
    }
    match message.data.as_mut() {
        Some(data) if data.data.is_empty() => {
            data.ranges = None;
            true
        }
        _ => false,
    }
}
