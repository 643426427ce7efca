//! One direction of a memory pair: a fault-injecting writer and a reader over
//! a bounded queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crsync_peer::wire::TransportMessage;
use crsync_peer::{MessageSink, MessageStream, Received, TransportError};
use futures_util::future::{BoxFuture, FutureExt};
use rand::Rng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{CutHandle, FaultConfig, cut_signal, direction_rng};
use crate::serial_sink::{SendResult, SerialSend, SerialSink};

/// What travels through the queue.
enum Payload {
    Message(Box<TransportMessage>),
    Json(String),
}

struct Envelope {
    payload: Payload,
    /// Not readable before this instant (delay fault).
    due: Option<Instant>,
}

/// Builds one direction: the writer's sink and the reader's stream.
pub(super) fn direction(
    config: Arc<FaultConfig>,
    direction: u64,
    cut: &CutHandle,
    sent: Arc<AtomicU64>,
) -> (MessageSink, MessageStream) {
    let (tx, rx) = mpsc::channel(config.capacity.max(1));
    let writer = Writer {
        tx,
        rng: direction_rng(config.seed, direction),
        delay_rng: direction_rng(config.seed, direction + 2),
        held: None,
        config,
        cut: cut.clone(),
        cut_rx: cut.subscribe(),
        sent,
    };
    let reader = Reader {
        rx,
        cut: cut.subscribe(),
        done: false,
    };
    let stream = futures_util::stream::unfold(reader, |mut reader| async move {
        let item = reader.next().await?;
        Some((item, reader))
    });
    (Box::pin(SerialSink::new(writer)), Box::pin(stream))
}

struct Writer {
    tx: mpsc::Sender<Envelope>,
    /// Draws the drop, duplicate and reorder faults.
    rng: StdRng,
    /// Draws delays (apart, so that adding a delay keeps the sequence).
    delay_rng: StdRng,
    /// A message held back by the reorder fault, and whether it is duplicated.
    held: Option<(TransportMessage, bool)>,
    config: Arc<FaultConfig>,
    cut: CutHandle,
    cut_rx: watch::Receiver<bool>,
    /// Messages sent on the pair, both directions together.
    sent: Arc<AtomicU64>,
}

impl Writer {
    async fn push(&mut self, message: TransportMessage) -> SendResult {
        if self.cut.is_cut() {
            return Err(TransportError::Closed);
        }
        let count = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        if self.config.cut_after.is_some_and(|limit| count > limit) {
            self.cut.cut();
            return Err(TransportError::Closed);
        }
        // Draw every roll on every message so one fault's rate does not
        // shift the others.
        let drop = self.rng.random::<f64>() < self.config.drop;
        let duplicate = self.rng.random::<f64>() < self.config.duplicate;
        let reorder = self.rng.random::<f64>() < self.config.reorder;
        if drop {
            tracing::trace!(kind = ?message.kind, "fault: drop");
            return Ok(());
        }
        if reorder && self.held.is_none() {
            tracing::trace!(kind = ?message.kind, "fault: hold back");
            self.held = Some((message, duplicate));
            return Ok(());
        }
        let held = self.held.take();
        self.deliver(message, duplicate).await?;
        if let Some((message, duplicate)) = held {
            self.deliver(message, duplicate).await?;
        }
        Ok(())
    }

    async fn deliver(&mut self, message: TransportMessage, duplicate: bool) -> SendResult {
        if duplicate {
            tracing::trace!(kind = ?message.kind, "fault: duplicate");
            self.enqueue(message.clone()).await?;
        }
        self.enqueue(message).await
    }

    async fn enqueue(&mut self, message: TransportMessage) -> SendResult {
        let due = self.config.delay.map(|(min, max)| {
            let span = u64::try_from((max - min).as_nanos()).unwrap_or(u64::MAX);
            Instant::now() + min + Duration::from_nanos(self.delay_rng.random_range(0..=span))
        });
        let payload = if self.config.json {
            Payload::Json(message.to_json())
        } else {
            // Handed over as it is: its changes decoded, as a receiver
            // reading the fields expects.
            let mut message = message;
            if let Err(e) = message.materialize() {
                return Err(TransportError::Decode(e));
            }
            Payload::Message(Box::new(message))
        };
        let envelope = Envelope { payload, due };
        tokio::select! {
            biased;
            () = cut_signal(&mut self.cut_rx) => Err(TransportError::Closed),
            sent = self.tx.send(envelope) => sent.map_err(|_| TransportError::Closed),
        }
    }
}

impl SerialSend for Writer {
    fn send(mut self, message: TransportMessage) -> BoxFuture<'static, (Self, SendResult)> {
        async move {
            let result = self.push(message).await;
            (self, result)
        }
        .boxed()
    }

    fn close(mut self) -> BoxFuture<'static, SendResult> {
        async move {
            if let Some((message, duplicate)) = self.held.take() {
                if self.cut.is_cut() {
                    return Ok(());
                }
                self.deliver(message, duplicate).await?;
            }
            Ok(())
        }
        .boxed()
    }
}

struct Reader {
    rx: mpsc::Receiver<Envelope>,
    cut: watch::Receiver<bool>,
    done: bool,
}

impl Reader {
    async fn next(&mut self) -> Option<Result<Received, TransportError>> {
        if self.done {
            return None;
        }
        let envelope = tokio::select! {
            biased;
            envelope = self.rx.recv() => match envelope {
                Some(envelope) => envelope,
                None => {
                    self.done = true;
                    // The writer is gone: cleanly, unless it went with a cut.
                    let cut = *self.cut.borrow();
                    return cut.then_some(Err(TransportError::Closed));
                }
            },
            () = cut_signal(&mut self.cut) => match self.rx.try_recv() {
                Ok(envelope) => envelope,
                Err(_) => {
                    self.done = true;
                    return Some(Err(TransportError::Closed));
                }
            },
        };
        if let Some(due) = envelope.due {
            tokio::time::sleep_until(due).await;
        }
        Some(match envelope.payload {
            Payload::Message(message) => Ok(Received::new(*message)),
            Payload::Json(text) => TransportMessage::from_json(&text)
                .map(Received::new)
                .map_err(TransportError::from),
        })
    }
}
