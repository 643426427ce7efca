//! One connection to one remote: the protocol loop.
//!
//! Incoming messages are handled one at a time (a merge finishes before the
//! next message is read). Everything outgoing goes through a bounded outbox
//! drained by a writer task, and the loop only takes an outbox slot when it
//! has one to fill, so a slow remote slows only its own session and the loop
//! never stops reading while it waits to write.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::{Inner, PeerEvent};
use crate::outgoing::{OutgoingWindow, Phase, SyncOutcome};
use crate::store::MergeError;
use crate::transport::{Connection, Received, Rejection, TransportError, codes};
use crate::wire::{Encoding, Hello, MessageKind, PeerMessageKind, TransportMessage};
use crate::{ChangeBatch, ChangeStream, SiteId};

/// Messages queued for the writer task.
pub(crate) const OUTBOX_CAP: usize = 16;
/// Control messages (errors) kept while the outbox is full; more are dropped.
const MAX_PENDING_CONTROL: usize = 32;
/// How often timers are checked.
const TICK: Duration = Duration::from_millis(250);

/// Which end opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// We dialed it: the liveness timeout applies.
    Dialed,
    /// A remote connected to us.
    Accepted,
}

struct Session {
    inner: Arc<Inner>,
    local: SiteId,
    label: String,
    side: Side,
    remote: Option<SiteId>,
    /// The remote said it is a crsync peer: it reads our acknowledgements.
    remote_is_crsync: bool,
    encoding: Encoding,
    window: OutgoingWindow,
    stream: Option<ChangeStream>,
    need_stream: bool,
    /// Where the next stream may start scanning: past change-less batches
    /// skipped since `sent` last moved back (see `Store::changes_since_hinted`).
    scan_hint: crate::Cursor,
    /// Ranges of the initial stream's change-less batches, sent with `eose`.
    eose_ranges: std::collections::BTreeMap<SiteId, crate::VersionRange>,
    control: VecDeque<TransportMessage>,
    /// Send a `sync` request: "everything my cursor lacks, then eose".
    request_pending: bool,
    /// Send an acknowledgement (`sync` with `ack`), coalesced.
    ack_pending: bool,
    /// The remote finished its initial stream to us.
    eose_received: bool,
    last_request: Instant,
    awaiting_schema: Option<i64>,
    last_received: Instant,
    last_ping: Instant,
}

pub(crate) async fn run(
    inner: Arc<Inner>,
    connection: Connection,
    side: Side,
) -> Result<(), TransportError> {
    let span = tracing::info_span!("session", local = %inner.store.site_id(), transport = %connection.label);
    run_inner(inner, connection, side).instrument(span).await
}

async fn run_inner(
    inner: Arc<Inner>,
    connection: Connection,
    side: Side,
) -> Result<(), TransportError> {
    let Connection {
        mut sink,
        mut stream,
        label,
    } = connection;
    let now = Instant::now();
    let local = inner.store.site_id();
    let (outbox, mut outbox_rx) = mpsc::channel::<TransportMessage>(OUTBOX_CAP);
    let writer_failed = inner.cancel.child_token();
    let writer_done = writer_failed.clone();
    let writer = tokio::spawn(async move {
        let mut result = Ok(());
        while let Some(message) = outbox_rx.recv().await {
            if let Err(e) = sink.send(message).await {
                result = Err(e);
                break;
            }
        }
        let _ = sink.close().await;
        writer_done.cancel();
        result
    });

    let mut session = Session {
        inner: inner.clone(),
        local,
        label: label.clone(),
        side,
        remote: None,
        remote_is_crsync: false,
        encoding: Encoding::V1,
        window: OutgoingWindow::new(inner.config.window, false, now),
        stream: None,
        need_stream: false,
        eose_ranges: std::collections::BTreeMap::new(),
        scan_hint: crate::Cursor::new(),
        control: VecDeque::new(),
        request_pending: true,
        ack_pending: false,
        eose_received: false,
        last_request: now,
        awaiting_schema: None,
        last_received: now,
        last_ping: now,
    };
    session.control.push_back(TransportMessage::connect(local));

    let mut store_events = inner.store.subscribe();
    let mut schema = inner.schema.clone();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let reason: Result<String, TransportError> = loop {
        let want_control =
            !session.control.is_empty() || session.request_pending || session.ack_pending;
        let want_data = !want_control
            && session.window.can_send()
            && (session.stream.is_some() || session.need_stream);
        tokio::select! {
            biased;
            _ = inner.cancel.cancelled() => break Ok("peer shutting down".into()),
            _ = writer_failed.cancelled() => break Ok("connection closed while sending".into()),
            item = stream.next() => match item {
                None => break Ok("closed by remote".into()),
                Some(Err(TransportError::Decode(e))) => {
                    tracing::warn!(error = %e, "undecodable message");
                    session.push_control(TransportMessage::error(local, codes::MALFORMED, e.to_string()));
                }
                Some(Err(e)) => break Err(e),
                Some(Ok(received)) => {
                    session.last_received = Instant::now();
                    if let Err(e) = session.handle(received).await {
                        break Err(e);
                    }
                }
            },
            permit = outbox.reserve(), if want_control => {
                let Ok(permit) = permit else { break Ok("writer gone".into()) };
                match session.next_control().await {
                    Some(message) => permit.send(message),
                    None => drop(permit),
                }
            }
            permit = outbox.reserve(), if want_data => {
                let Ok(permit) = permit else { break Ok("writer gone".into()) };
                if let Some(message) = session.next_data().await {
                    permit.send(message);
                }
            }
            event = store_events.recv() => match event {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // A stream already running may have started before this change:
                    // read again once it ends.
                    if session.window.phase() != Phase::AwaitingSync {
                        session.need_stream = true;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break Ok("store closed".into()),
            },
            changed = schema.changed() => {
                if changed.is_err() {
                    break Ok("peer shutting down".into());
                }
                let ours = *schema.borrow_and_update();
                if session.awaiting_schema.is_some_and(|theirs| ours >= theirs) {
                    // Our schema caught up: ask again for what we declined.
                    session.awaiting_schema = None;
                    session.request_pending = true;
                }
            }
            _ = tick.tick() => {
                if let Err(e) = session.on_tick() {
                    break Err(e);
                }
            }
        }
    };

    drop(session.stream.take());
    drop(outbox);
    // Let the writer flush what is queued, but not forever.
    let write_error = match tokio::time::timeout(Duration::from_secs(5), writer).await {
        Ok(Ok(Err(e))) => Some(e),
        _ => None,
    };
    let reason = match (reason, write_error) {
        (Err(e), _) => e.to_string(),
        // The sink's own error says more than "closed while sending".
        (Ok(_), Some(e)) => format!("send failed: {e}"),
        (Ok(r), None) => r,
    };
    tracing::debug!(%reason, "session ended");
    if let Some(remote) = session.remote {
        inner.session_closed(remote);
    }
    inner.emit(PeerEvent::Disconnected {
        peer: session.remote,
        transport: label,
        reason,
    });
    Ok(())
}

impl Session {
    fn push_control(&mut self, message: TransportMessage) {
        if self.control.len() < MAX_PENDING_CONTROL {
            self.control.push_back(message);
        }
    }

    /// The next control message: queued ones first, then a `sync` request,
    /// then a coalesced acknowledgement.
    async fn next_control(&mut self) -> Option<TransportMessage> {
        if let Some(message) = self.control.pop_front() {
            return Some(message);
        }
        let request = std::mem::replace(&mut self.request_pending, false);
        let ack = std::mem::replace(&mut self.ack_pending, false);
        if !request && !ack {
            return None;
        }
        match self.inner.store.cursor().await {
            Ok(cursor) if request => {
                self.last_request = Instant::now();
                Some(TransportMessage::sync(self.local, cursor))
            }
            Ok(cursor) => Some(TransportMessage::ack(self.local, cursor)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read our cursor");
                None
            }
        }
    }

    /// The next batch for the remote, or `eose` when the initial stream ends.
    async fn next_data(&mut self) -> Option<TransportMessage> {
        if self.stream.is_none() {
            self.need_stream = false;
            let limits = self.inner.store.batch_limits();
            match self
                .inner
                .store
                .changes_since_hinted(self.window.sent(), &self.scan_hint, limits)
                .await
            {
                Ok(s) => self.stream = Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read changes");
                    return None;
                }
            }
        }
        // Read fresh: a batch must never claim an older schema than the rows it carries.
        let schema_version = match self.inner.store.schema_version().await {
            Ok(v) => v,
            Err(_) => *self.inner.schema.borrow(),
        };
        let stream = self.stream.as_mut()?;
        match stream.next_batch().await {
            Some(Ok(batch)) if batch.changes.is_empty() => {
                // Only version bumps (our merges consume local versions): not
                // worth a message of its own. In the initial stream the ranges
                // ride on `eose`, so the remote ends up with our whole cursor;
                // live, they are dropped (the next batch's range starts where
                // the remote's cursor is, so skipping them opens no gap).
                self.scan_hint.join(&batch.cursor_after(self.window.sent()));
                if self.window.phase() == Phase::Initial {
                    self.eose_ranges.extend(batch.ranges);
                }
                None
            }
            Some(Ok(batch)) => {
                let after = batch.cursor_after(self.window.sent());
                self.window.on_sent(after, Instant::now());
                Some(TransportMessage::data(
                    self.local,
                    &batch,
                    false,
                    schema_version,
                    self.encoding,
                ))
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "reading changes failed; will retry");
                self.stream = None;
                self.need_stream = true;
                None
            }
            None => {
                self.stream = None;
                if self.window.phase() == Phase::Initial {
                    self.window.on_initial_complete();
                    let eose = ChangeBatch {
                        changes: Vec::new(),
                        ranges: std::mem::take(&mut self.eose_ranges),
                    };
                    if !eose.ranges.is_empty() {
                        let after = eose.cursor_after(self.window.sent());
                        self.window.on_sent(after, Instant::now());
                    }
                    return Some(TransportMessage::data(
                        self.local,
                        &eose,
                        true,
                        schema_version,
                        self.encoding,
                    ));
                }
                None
            }
        }
    }

    /// Drops the current stream; the next one starts from the window's
    /// (possibly rewound) `sent`, so the scan hint no longer applies.
    fn rewind_stream(&mut self) {
        self.stream = None;
        self.need_stream = true;
        self.scan_hint = crate::Cursor::new();
    }

    fn on_tick(&mut self) -> Result<(), TransportError> {
        let now = Instant::now();
        let config = self.inner.config.clone();
        if now.duration_since(self.last_ping) >= config.ping_interval {
            self.last_ping = now;
            self.push_control(TransportMessage::ping(self.local));
        }
        if !self.eose_received && now.duration_since(self.last_request) > config.ack_timeout {
            // Our request, or the remote's eose, may have been lost: ask again.
            self.request_pending = true;
        }
        if self.window.check_ack_timeout(now, config.ack_timeout) {
            tracing::info!(
                "no acknowledgement in time; resending from the last acknowledged point"
            );
            self.rewind_stream();
        }
        if let (Side::Dialed, Some(limit)) = (self.side, config.liveness_timeout) {
            if now.duration_since(self.last_received) > limit {
                return Err(TransportError::Timeout(limit));
            }
        }
        Ok(())
    }

    /// Handles one message and answers its reply, if it has one.
    async fn handle(&mut self, received: Received) -> Result<(), TransportError> {
        let Received { message, reply } = received;
        let outcome = self.process(message).await;
        let (result, fatal) = match outcome {
            Ok(()) => (Ok(()), None),
            Err(Handled::Rejected(r)) => (Err(r), None),
            Err(Handled::Fatal(r, e)) => (Err(r), Some(e)),
        };
        if let (Err(rejection), Some(peer)) = (&result, self.remote) {
            self.inner.emit(PeerEvent::Rejected {
                peer,
                code: rejection.code.to_string(),
                message: rejection.message.clone(),
                by_remote: false,
            });
        }
        if let Err(rejection) = &result {
            // A transport that answers per message (an HTTP POST) reports the
            // rejection there; otherwise say it in-band. Errors that pause the
            // sender go in-band always: an HTTP client counts a 4xx as delivered.
            let pauses = matches!(
                rejection.code,
                codes::SCHEMA_OUTDATED | codes::INVALID_CHANGE
            );
            if reply.is_none() || pauses {
                self.push_control(TransportMessage::error(
                    self.local,
                    rejection.code,
                    rejection.message.clone(),
                ));
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
        match fatal {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn identify(&mut self, message: &TransportMessage) -> Result<SiteId, Handled> {
        let sender = message
            .sender()
            .map_err(|e| Handled::rejected(codes::MALFORMED, e.to_string()))?;
        match self.remote {
            Some(remote) if remote != sender => Err(Handled::rejected(
                codes::PEER_MISMATCH,
                format!("message from {sender} on a connection with {remote}"),
            )),
            Some(remote) => Ok(remote),
            None if sender == self.local => {
                let r = Rejection {
                    code: codes::PEER_MISMATCH,
                    message: "connected to ourselves".into(),
                    client_error: true,
                };
                Err(Handled::Fatal(
                    r,
                    TransportError::Remote {
                        code: codes::PEER_MISMATCH.into(),
                        message: "connected to ourselves".into(),
                    },
                ))
            }
            None => {
                self.remote = Some(sender);
                self.inner.session_opened(sender);
                self.inner.emit(PeerEvent::Connected {
                    peer: sender,
                    transport: self.label.clone(),
                });
                Ok(sender)
            }
        }
    }

    async fn process(&mut self, message: TransportMessage) -> Result<(), Handled> {
        let remote = self.identify(&message)?;
        if message.crsync.is_some() && !self.remote_is_crsync {
            self.encoding = Hello::encoding(message.crsync.as_ref());
            self.remote_is_crsync = true;
            self.window.set_acks_expected(true);
        }
        match message.kind {
            MessageKind::Connect => Ok(()),
            MessageKind::Ping => Ok(()),
            MessageKind::Sync => {
                let cursor = message.cursor.ok_or_else(|| {
                    Handled::rejected(codes::MALFORMED, "sync message without cursor")
                })?;
                let ack = message.ack == Some(true);
                match self.window.on_sync(cursor, ack, Instant::now()) {
                    SyncOutcome::StartInitial => {
                        self.rewind_stream();
                        self.eose_ranges.clear();
                        self.inner.emit(PeerEvent::Sync { peer: remote });
                    }
                    SyncOutcome::Rewind => {
                        self.rewind_stream();
                    }
                    SyncOutcome::Acknowledged => {}
                }
                Ok(())
            }
            MessageKind::Data => self.process_data(remote, message).await,
            MessageKind::Error => {
                let code = message
                    .code
                    .clone()
                    .or(message.error.clone())
                    .unwrap_or_default();
                let text = message.error.unwrap_or_default();
                tracing::info!(%remote, %code, %text, "remote reported an error");
                self.inner.emit(PeerEvent::Rejected {
                    peer: remote,
                    code: code.clone(),
                    message: text.clone(),
                    by_remote: true,
                });
                match code.as_str() {
                    codes::GAP => {
                        self.window.on_gap(Instant::now());
                        self.rewind_stream();
                    }
                    codes::SCHEMA_OUTDATED | codes::INVALID_CHANGE => self.window.pause(),
                    codes::MALFORMED | codes::PEER_MISMATCH => {}
                    _ => {
                        let e = TransportError::Remote {
                            code: code.clone(),
                            message: text.clone(),
                        };
                        return Err(Handled::Fatal(
                            Rejection {
                                code: codes::INTERNAL,
                                message: text,
                                client_error: false,
                            },
                            e,
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    async fn process_data(
        &mut self,
        remote: SiteId,
        message: TransportMessage,
    ) -> Result<(), Handled> {
        let data = message
            .data
            .ok_or_else(|| Handled::rejected(codes::MALFORMED, "data message without data"))?;
        // Read fresh (the watch is polled): a stale version would misreport `Outdated`.
        let ours = match self.inner.store.schema_version().await {
            Ok(v) => v,
            Err(_) => *self.inner.schema.borrow(),
        };
        if let Some(theirs) = data.schema_version.filter(|v| *v > ours) {
            self.inner.emit(PeerEvent::Outdated {
                peer: remote,
                remote_version: theirs,
                local_version: ours,
            });
            self.awaiting_schema = Some(theirs);
            let text = format!(
                "schema version {theirs} is newer than ours ({ours}); changes wait for an upgrade"
            );
            return Err(Handled::rejected(codes::SCHEMA_OUTDATED, text));
        }
        let batch = data
            .to_batch()
            .map_err(|e| Handled::rejected(codes::MALFORMED, e.to_string()))?;
        let holds = batch.cursor_after(&crate::Cursor::new());
        match self.inner.store.merge(batch).await {
            Ok(_) => {
                self.window.on_remote_holds(&holds);
                if data.kind == PeerMessageKind::Eose {
                    self.eose_received = true;
                    self.inner.eose_received(remote);
                    self.inner.emit(PeerEvent::Eose { peer: remote });
                }
                // A v1 peer reads every `sync` as "send everything again": ack crsync peers only.
                if self.remote_is_crsync {
                    self.ack_pending = true;
                }
                Ok(())
            }
            Err(MergeError::Rejected(rejection)) => {
                let text = rejection.to_string();
                // Ask again from our cursor: the remote restarts from where we are.
                self.request_pending = true;
                Err(Handled::rejected(codes::GAP, text))
            }
            Err(MergeError::Invalid { index, reason }) => {
                let text = format!("change #{index}: {reason}");
                Err(Handled::rejected(codes::INVALID_CHANGE, text))
            }
            Err(e) => {
                tracing::error!(error = %e, "merge failed");
                Err(Handled::Rejected(Rejection {
                    code: codes::INTERNAL,
                    message: e.to_string(),
                    client_error: false,
                }))
            }
        }
    }
}

/// How processing a message failed.
enum Handled {
    /// Refused; the session goes on.
    Rejected(Rejection),
    /// Refused, and the session ends.
    Fatal(Rejection, TransportError),
}

impl Handled {
    fn rejected(code: &'static str, message: impl Into<String>) -> Self {
        Handled::Rejected(Rejection {
            code,
            message: message.into(),
            client_error: true,
        })
    }
}
