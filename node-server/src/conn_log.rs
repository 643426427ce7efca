//! One log line when a sync connection (SSE stream or WebSocket) opens and
//! one when it closes, with who it was and what it moved.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crsync_peer::wire::TransportMessage;
use crsync_peer::{Connection, TransportError};
use futures_util::{SinkExt, StreamExt};

/// Changes a connection carried, counted as they pass.
#[derive(Debug, Default)]
struct Counts {
    received: AtomicU64,
    sent: AtomicU64,
}

fn changes(message: &TransportMessage) -> u64 {
    message.data.as_ref().map_or(0, |d| d.data.len() as u64)
}

/// Logs `connection opened` now and `connection closed` (with changes in
/// and out and the duration) when dropped.
#[derive(Debug)]
pub(crate) struct ConnLog {
    client: Option<SocketAddr>,
    db: String,
    transport: &'static str,
    token: Arc<str>,
    started: Instant,
    counts: Arc<Counts>,
}

impl ConnLog {
    /// A connection of `transport` (`sse`, `ws`) from `client` on `db`, made
    /// with the token named `token`.
    pub(crate) fn open(
        client: Option<SocketAddr>,
        db: &str,
        transport: &'static str,
        token: Arc<str>,
    ) -> Self {
        let log = ConnLog {
            client,
            db: db.to_owned(),
            transport,
            token,
            started: Instant::now(),
            counts: Arc::default(),
        };
        tracing::info!(
            client = %log.client_text(),
            db = %log.db,
            transport = %log.transport,
            token = %log.token,
            "connection opened"
        );
        log
    }

    fn client_text(&self) -> String {
        self.client
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
    }

    /// `conn`, counting the changes that pass through it.
    pub(crate) fn counted(&self, conn: Connection) -> Connection {
        let inbound = Arc::clone(&self.counts);
        let outbound = Arc::clone(&self.counts);
        Connection {
            stream: Box::pin(conn.stream.inspect(move |item| {
                if let Ok(received) = item {
                    inbound
                        .received
                        .fetch_add(changes(&received.message), Ordering::Relaxed);
                }
            })),
            sink: Box::pin(conn.sink.with(move |message: TransportMessage| {
                outbound
                    .sent
                    .fetch_add(changes(&message), Ordering::Relaxed);
                futures_util::future::ready(Ok::<_, TransportError>(message))
            })),
            label: conn.label,
        }
    }
}

impl Drop for ConnLog {
    fn drop(&mut self) {
        tracing::info!(
            client = %self.client_text(),
            db = %self.db,
            transport = %self.transport,
            token = %self.token,
            changes_in = self.counts.received.load(Ordering::Relaxed),
            changes_out = self.counts.sent.load(Ordering::Relaxed),
            duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "connection closed"
        );
    }
}
