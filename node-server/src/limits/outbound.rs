//! The outbound queue of one connection, bounded by bytes and by count, and
//! the watchdog that notices when its client stopped reading.
//!
//! Messages are encoded to JSON as they enter (the changes of a message
//! from the live tail stay the string every session shares, see
//! [`MessageText`]), so what waits is counted in bytes: the sender takes
//! `min(len, budget)` permits of a byte semaphore and the consumer gives
//! them back once it has handed the text on (SSE: to the
//! HTTP body; WebSocket: once the frame is written). A message larger than the
//! whole budget goes when the queue is empty. "Progress" is a message leaving
//! the queue; a queue that holds data and made no progress for the stall
//! timeout is stalled.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use crsync_peer::wire::{MessageText, TransportMessage};
use crsync_peer::{MessageSink, TransportError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use super::listener::IoProgress;
use crate::host::OUTBOUND_QUEUE_CAP;

/// Bytes waiting, and since when nothing left the queue.
struct MeterState {
    queued: usize,
    since: Instant,
}

/// The queue's bytes, also counted in the database's
/// [`OUTBOUND_QUEUED_BYTES`](crate::telemetry::OUTBOUND_QUEUED_BYTES) gauge.
struct Meter(Mutex<MeterState>, metrics::Gauge);

impl Drop for Meter {
    fn drop(&mut self) {
        self.1.decrement(self.lock().queued as f64);
    }
}

impl Meter {
    fn lock(&self) -> std::sync::MutexGuard<'_, MeterState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, bytes: usize) {
        let mut m = self.lock();
        if m.queued == 0 {
            // Only now does the consumer owe us anything.
            m.since = Instant::now();
        }
        m.queued += bytes;
        self.1.increment(bytes as f64);
    }

    fn remove(&self, bytes: usize) {
        let mut m = self.lock();
        self.1.decrement(bytes.min(m.queued) as f64);
        m.queued = m.queued.saturating_sub(bytes);
        m.since = Instant::now();
    }
}

/// The sending half: clone it for refusals beside the Peer's sink.
#[derive(Clone)]
pub(crate) struct Outbound {
    tx: mpsc::Sender<Queued>,
    budget: Arc<Semaphore>,
    meter: Arc<Meter>,
    max: usize,
}

/// One encoded message; dropping it is progress (its bytes leave the queue).
pub(crate) struct Queued {
    text: MessageText,
    bytes: usize,
    meter: Arc<Meter>,
    _permit: OwnedSemaphorePermit,
}

impl Queued {
    /// The JSON text's length (its bytes stay counted until `self` is dropped).
    pub(crate) fn len(&self) -> usize {
        self.bytes
    }

    /// The JSON text, joined (for a WebSocket text frame).
    pub(crate) fn joined(&self) -> String {
        self.text.joined()
    }

    /// The message as one SSE event, `data: <json>\n\n` (the JSON holds no
    /// line break: see [`MessageText`]), in pieces for the HTTP body. Changes
    /// the sessions share are not copied: the body holds the shared string
    /// until the socket took it. Taking the pieces is progress, as dropping
    /// `self` is.
    pub(crate) fn into_sse_event(mut self) -> Vec<Bytes> {
        let (head, shared, tail) = std::mem::take(&mut self.text).into_parts();
        match shared {
            Some(shared) => {
                let mut first = String::with_capacity(SSE_DATA.len() + head.len());
                first.push_str(SSE_DATA);
                first.push_str(&head);
                let mut last = tail;
                last.push_str(SSE_END);
                let shared = Bytes::from_owner(SharedJson(shared));
                vec![Bytes::from(first), shared, Bytes::from(last)]
            }
            None => {
                let framed = SSE_DATA.len() + head.len() + tail.len() + SSE_END.len();
                let mut event = String::with_capacity(framed);
                event.push_str(SSE_DATA);
                event.push_str(&head);
                event.push_str(&tail);
                event.push_str(SSE_END);
                vec![Bytes::from(event)]
            }
        }
    }
}

/// A shared JSON string as the bytes of an HTTP body chunk.
struct SharedJson(Arc<str>);

impl AsRef<[u8]> for SharedJson {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// What starts and what ends an SSE event.
const SSE_DATA: &str = "data: ";
const SSE_END: &str = "\n\n";

impl Drop for Queued {
    fn drop(&mut self) {
        self.meter.remove(self.bytes);
    }
}

/// The receiving half.
pub(crate) struct OutboundRx {
    rx: mpsc::Receiver<Queued>,
    stall: Stall,
}

/// Resolves when the queue is stalled; see [`Stall::stalled`].
#[derive(Clone)]
pub(crate) struct Stall {
    meter: Arc<Meter>,
    budget: Arc<Semaphore>,
    timeout: Duration,
    io: Option<Arc<IoProgress>>,
}

/// A queue of at most `budget_bytes` of encoded messages (and at most
/// [`OUTBOUND_QUEUE_CAP`] messages), stalled after `stall_timeout` without
/// progress: nothing left the queue, and the socket (`io`, when known) took
/// no bytes.
pub(crate) fn outbound(
    database: &str,
    budget_bytes: usize,
    stall_timeout: Duration,
    io: Option<Arc<IoProgress>>,
) -> (Outbound, OutboundRx) {
    let max = budget_bytes.clamp(1, Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE_CAP);
    let budget = Arc::new(Semaphore::new(max));
    let gauge = metrics::gauge!(
        crate::telemetry::OUTBOUND_QUEUED_BYTES,
        "database" => database.to_owned()
    );
    let meter = Arc::new(Meter(
        Mutex::new(MeterState {
            queued: 0,
            since: Instant::now(),
        }),
        gauge,
    ));
    let stall = Stall {
        meter: Arc::clone(&meter),
        budget: Arc::clone(&budget),
        timeout: stall_timeout,
        io,
    };
    (
        Outbound {
            tx,
            budget,
            meter,
            max,
        },
        OutboundRx { rx, stall },
    )
}

impl Outbound {
    /// Encodes `message` and queues it, waiting for room.
    pub(crate) async fn send(&self, message: TransportMessage) -> Result<(), TransportError> {
        let text = message.to_text();
        drop(message);
        let bytes = text.len();
        let permits = u32::try_from(bytes.clamp(1, self.max)).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.budget)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| TransportError::Closed)?;
        self.meter.add(bytes);
        let queued = Queued {
            text,
            bytes,
            meter: Arc::clone(&self.meter),
            _permit: permit,
        };
        self.tx
            .send(queued)
            .await
            .map_err(|_| TransportError::Closed)
    }

    /// The Peer's sink for this connection.
    pub(crate) fn sink(self) -> MessageSink {
        Box::pin(futures_util::sink::unfold(
            self,
            |out, message: TransportMessage| async move {
                out.send(message).await?;
                Ok::<_, TransportError>(out)
            },
        ))
    }

    /// Resolves once the receiving half is gone.
    pub(crate) async fn closed(&self) {
        self.tx.closed().await;
    }
}

impl OutboundRx {
    /// The next message; `None` once every sender is gone.
    pub(crate) async fn recv(&mut self) -> Option<Queued> {
        self.rx.recv().await
    }

    /// The stall watchdog of this queue.
    pub(crate) fn stall(&self) -> Stall {
        self.stall.clone()
    }

    /// As a stream (for an SSE body).
    pub(crate) fn into_stream(self) -> tokio_stream::wrappers::ReceiverStream<Queued> {
        tokio_stream::wrappers::ReceiverStream::new(self.rx)
    }
}

impl Stall {
    /// Resolves once the queue has held data for the stall timeout with
    /// nothing leaving it; then refuses further sends (the Peer's session
    /// ends, and what it holds is freed).
    pub(crate) async fn stalled(&self) {
        loop {
            let (queued, mut since) = {
                let m = self.meter.lock();
                (m.queued, m.since)
            };
            if let Some(io) = &self.io {
                since = since.max(io.last());
            }
            let now = Instant::now();
            if queued > 0 && now >= since + self.timeout {
                self.budget.close();
                return;
            }
            let wake = if queued > 0 {
                since + self.timeout
            } else {
                now + self.timeout
            };
            tokio::time::sleep_until(wake).await;
        }
    }

    /// The configured timeout.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crsync_peer::SiteId;

    fn ping() -> TransportMessage {
        TransportMessage::ping(SiteId::from_bytes([7; 16]))
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_by_bytes_and_stalls_only_without_progress() {
        let one = ping().to_json().len();
        let (out, mut rx) = outbound("test", 2 * one, Duration::from_secs(10), None);
        out.send(ping()).await.unwrap();
        out.send(ping()).await.unwrap();
        // A third waits for room.
        let third = tokio::time::timeout(Duration::from_secs(1), out.send(ping())).await;
        assert!(third.is_err(), "the budget is full");
        // Slow but reading: one message taken every 9 s is never a stall.
        let stall = rx.stall();
        let watchdog = tokio::spawn(async move { stall.stalled().await });
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(9)).await;
            let m = rx.recv().await.unwrap();
            drop(m);
            out.send(ping()).await.unwrap();
        }
        assert!(!watchdog.is_finished());
        // Stop reading: stalled 10 s after the last progress, and sends fail.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(watchdog.is_finished());
        assert!(out.send(ping()).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_queue_never_stalls_and_a_big_message_still_goes() {
        let (out, mut rx) = outbound("test", 8, Duration::from_secs(1), None);
        let stall = rx.stall();
        let watchdog = tokio::spawn(async move { stall.stalled().await });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!watchdog.is_finished(), "nothing queued, nothing owed");
        out.send(ping()).await.unwrap(); // larger than the whole budget
        let queued = rx.recv().await.unwrap();
        assert!(queued.joined().contains("ping"));
        let event = queued.into_sse_event().concat();
        assert_eq!(event, format!("data: {}\n\n", ping().to_json()).as_bytes());
    }
}
