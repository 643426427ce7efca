//! [`DbHost`]: one served database: its Peer plus the SSE streams open on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crsync_peer::proto::ErrorCode;
use crsync_peer::wire::{Hello, MessageKind, TransportMessage};
use crsync_peer::{Connection, Received, SiteId, TransportError};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::Peer;
use crate::error::ApiError;
use crate::limits::{Limits, OutboundRx, RateLimiter, outbound};

/// Messages queued from the Peer to one client before the Peer waits (the
/// queue is also bounded in bytes: `[limits] outbound_queue_bytes`).
pub const OUTBOUND_QUEUE_CAP: usize = 16;
/// Messages queued from one client to the Peer before the sender (a `POST`
/// or the WebSocket reader) waits.
pub const INBOUND_QUEUE_CAP: usize = 16;

type Inbound = mpsc::Sender<Result<Received, TransportError>>;

struct Slot {
    id: u64,
    inbound: Inbound,
}

/// One database served over HTTP: its Peer and the open SSE streams by peer id.
pub(crate) struct DbHost {
    name: String,
    peer: Peer,
    streams: Mutex<HashMap<SiteId, Slot>>,
    next_id: AtomicU64,
    closing: watch::Sender<bool>,
    limits: Arc<Limits>,
    rate: Option<RateLimiter<()>>,
}

/// A stream for this peer id is already open.
#[derive(Debug)]
pub(crate) struct AlreadyConnected;

/// An open SSE session: what the Peer sends, and a guard that unregisters the
/// stream when dropped (when the HTTP response body is dropped).
pub(crate) struct SseSession {
    pub(crate) outbound: OutboundRx,
    pub(crate) guard: StreamGuard,
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
        if streams.get(&self.client).is_some_and(|s| s.id == self.id) {
            streams.remove(&self.client);
        }
        drop(streams);
        tracing::info!(db = %self.host.name, peer = %self.client, "stream closed");
    }
}

impl DbHost {
    pub(crate) fn new(name: impl Into<String>, peer: Peer, limits: Arc<Limits>) -> Arc<Self> {
        Arc::new(DbHost {
            name: name.into(),
            peer,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            closing: watch::channel(false).0,
            rate: limits.database_limiter(),
            limits,
        })
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

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<SiteId, Slot>> {
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

    /// Opens an SSE session for `client`: registers it, synthesizes the
    /// client's `connect` (with crsync's capabilities if `lossless`), and
    /// hands the connection to the Peer.
    pub(crate) fn open_sse(
        self: &Arc<Self>,
        client: SiteId,
        lossless: bool,
        io: Option<Arc<crate::limits::IoProgress>>,
        span: &tracing::Span,
    ) -> Result<SseSession, AlreadyConnected> {
        let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE_CAP);
        let config = self.limits.config();
        let (out_tx, out_rx) = outbound(config.outbound_queue_bytes, config.stall_timeout, io);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut streams = self.lock_streams();
            if streams.contains_key(&client) {
                return Err(AlreadyConnected);
            }
            let connect = TransportMessage {
                crsync: lossless.then(Hello::current),
                ..TransportMessage::connect(client)
            };
            // The channel is new and empty: this cannot fail.
            let _ = in_tx.try_send(Ok(Received::new(connect)));
            streams.insert(client, Slot { id, inbound: in_tx });
        }
        let conn = Connection {
            sink: out_tx.sink(),
            stream: Box::pin(ReceiverStream::new(in_rx)),
            label: format!("sse {}/{}", self.name, client),
        };
        // Detached: the session ends when the SSE body is dropped or the Peer stops.
        drop(self.accept(conn, span));
        Ok(SseSession {
            outbound: out_rx,
            guard: StreamGuard {
                host: Arc::clone(self),
                client,
                id,
            },
        })
    }

    /// Delivers a message `POST`ed by `client` into its stream's connection
    /// and waits until the Peer has processed it.
    pub(crate) async fn deliver(
        &self,
        client: &str,
        message: TransportMessage,
    ) -> Result<(), ApiError> {
        let site: SiteId = client
            .parse()
            .map_err(|e| ApiError::malformed(format!("peerId: {e}")))?;
        let inbound = self
            .lock_streams()
            .get(&site)
            .map(|slot| slot.inbound.clone())
            .ok_or_else(|| ApiError::not_connected(client))?;
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
