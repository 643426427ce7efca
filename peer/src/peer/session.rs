//! One connection to one remote: the driver of a [`proto::Session`](Session).
//!
//! The protocol decisions live in the pure state machine; this loop only
//! performs them: it merges and reads through the Store, moves messages
//! between the connection and the state machine, answers per-message
//! replies, turns session events into [`PeerEvent`]s and wakes the machine
//! at its deadline. Everything outgoing goes through a bounded outbox drained
//! by a writer task, and the loop takes an outbox slot only when the machine
//! has a message for it, so a slow remote slows only its own session and the
//! loop never stops reading while it waits to write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, OptionFuture};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use super::{Inner, PeerEvent};
use crate::proto::{
    CloseReason, ErrorCode, Input, MergeFailure, MergeOutcome, Output, ReplyId, Session,
    SessionConfig, SessionEvent, Side, SiteConflict, Trust,
};
use crate::store::MergeError;
use crate::transport::{Connection, LinkSettings, Received, Rejection, TransportError};
use crate::wire::TransportMessage;
use crate::{ChangeStream, MergeReport, SiteId, telemetry};

/// Messages queued for the writer task (default of [`PeerBuilder::outbox`](super::PeerBuilder::outbox)).
pub(crate) const OUTBOX_CAP: usize = 16;
/// How long the writer may take to flush what is queued when the session ends.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new session waits for the Store's cursor before it starts from
/// the Peer's last known one.
const START_WAIT: Duration = Duration::from_millis(500);
/// How long a change stream may wait for the session to want its next batch
/// before it is parked (dropped, to be read again later).
const PARK_STALLED_STREAM_AFTER: Duration = Duration::from_secs(2);
/// Commits that come sooner than [`coalesce_window`] after the session last
/// sent changes are sent together: the session takes the Store's cursor
/// only that long after the send, with every commit that came meanwhile. A
/// commit after a quiet spell goes at once; in a burst of commits, one
/// stream and one message carry several instead of one each.
///
/// The window is at least `COALESCE_MIN` and grows by
/// `COALESCE_PER_SESSION` for every session the Peer runs, up to
/// `COALESCE_MAX`. A send costs about the same whatever it carries, so with
/// N sessions a burst costs N sends per window: scaling the window with N
/// keeps a burst's sends at about `1 / COALESCE_PER_SESSION` (20,000) per
/// second for the whole Peer, whether it serves 10 sessions or 10,000.
///
/// Commits also wait while a message the session queued is not yet sent
/// (over HTTP: answered), however long ago it was queued: a transport that
/// sends one message per round trip then carries every commit of the round
/// trip in the next, instead of queueing one small message per coalescing
/// window behind it (with 50 ms round trips and a commit every 5 ms, commits
/// waited up to 920 ms in that queue, and now two or three round trips). A
/// commit after a quiet spell still goes at once.
const COALESCE_MIN: Duration = Duration::from_millis(5);
const COALESCE_PER_SESSION: Duration = Duration::from_micros(50);
const COALESCE_MAX: Duration = Duration::from_millis(100);

/// How long after a send of changes a session waits for more commits, when
/// the Peer runs `sessions` sessions (see [`COALESCE_MIN`]).
fn coalesce_window(sessions: usize) -> Duration {
    let sessions = u32::try_from(sessions).unwrap_or(u32::MAX);
    COALESCE_PER_SESSION
        .saturating_mul(sessions)
        .clamp(COALESCE_MIN, COALESCE_MAX)
}

/// How a session ended, for the dialer's backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ended {
    /// The remote refused something we sent (an HTTP 4xx such as 413, or a
    /// typed refusal other than "your stream is gone"): sending it again at
    /// once would be refused again, so the redial backoff keeps growing.
    pub(crate) refused: bool,
    /// One of the two replicas is a copy: redialing cannot help.
    pub(crate) site_id_conflict: bool,
}

/// Ends a session from outside: the Peer's shutdown, or the app pausing or
/// removing the link. The reason is what the `Disconnected` event says.
#[derive(Debug, Clone)]
pub(crate) struct Stop {
    token: tokio_util::sync::CancellationToken,
    reason: Arc<std::sync::Mutex<&'static str>>,
}

impl Stop {
    /// A stop triggered by `token` too (a child of the Peer's shutdown token).
    pub(crate) fn from_token(token: tokio_util::sync::CancellationToken) -> Self {
        Stop {
            token,
            reason: Arc::new(std::sync::Mutex::new("peer shutting down")),
        }
    }

    /// Ends the session, saying why.
    pub(crate) fn stop(&self, reason: &'static str) {
        if let Ok(mut r) = self.reason.lock() {
            *r = reason;
        }
        self.token.cancel();
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .map(|r| (*r).to_string())
            .unwrap_or_default()
    }
}

/// Runs a session over `connection` until it ends; `link` is the Peer's
/// record of the dialer or accepted connection it belongs to.
/// `side` comes with the link's overrides of the Peer's settings.
pub(crate) async fn run(
    inner: Arc<Inner>,
    connection: Connection,
    side: (Side, LinkSettings),
    link: u64,
    stop: Stop,
) -> Ended {
    let span = tracing::info_span!("session", local = %inner.store.site_id(), transport = %connection.label);
    if let Some(copy) = inner.store.copied() {
        let _entered = span.enter();
        tracing::warn!(%copy, "not syncing a copied database file");
        inner.emit(PeerEvent::SiteIdConflict {
            peer: None,
            message: copy.to_string(),
        });
        inner.emit(PeerEvent::Disconnected {
            peer: None,
            transport: connection.label,
            reason: copy.to_string(),
        });
        return Ended {
            refused: true,
            site_id_conflict: true,
        };
    }
    run_inner(inner, connection, side, link, stop)
        .instrument(span)
        .await
}

/// Whether a send failure is the remote refusing what we sent (see [`Ended`]).
fn is_refusal(e: &TransportError) -> bool {
    match e {
        TransportError::Http { status, .. } => (400..500).contains(status),
        TransportError::Remote { code, .. } => {
            !matches!(code, ErrorCode::NotConnected | ErrorCode::SessionMismatch)
        }
        _ => false,
    }
}

type MergeFuture = BoxFuture<'static, Result<MergeReport, MergeError>>;
type OpenFuture = BoxFuture<'static, Result<ChangeStream, crate::StoreError>>;

async fn run_inner(
    inner: Arc<Inner>,
    connection: Connection,
    (side, settings): (Side, LinkSettings),
    link: u64,
    stop: Stop,
) -> Ended {
    let Connection {
        mut sink,
        mut stream,
        label,
    } = connection;
    let local = inner.store.site_id();
    let config = SessionConfig {
        window: settings.window.unwrap_or(inner.config.window),
        ack_timeout: settings.ack_timeout.unwrap_or(inner.config.ack_timeout),
        ping_interval: settings.ping_interval.unwrap_or(inner.config.ping_interval),
        liveness_timeout: settings
            .liveness_timeout
            .unwrap_or(inner.config.liveness_timeout),
        side,
        trust: match side {
            Side::Dialed => Trust::Full,
            Side::Accepted => inner.config.accepted_trust,
        },
        max_claim_sites: inner.config.max_claim_sites,
    };
    let mut cursor_rx = inner.cursor.clone();
    let mut schema = inner.schema.clone();
    // The Store's writer may be busy for a while (applying a large
    // transaction): then the session starts from the last cursor the Peer
    // heard of, which can only lag (the remote sends a little more again).
    let cursor = match tokio::time::timeout(START_WAIT, inner.store.cursor()).await {
        Ok(Ok(cursor)) => cursor,
        _ => cursor_rx.borrow_and_update().clone(),
    };
    let schema_version = *schema.borrow_and_update();
    let mut core = Session::new(config, local, cursor, schema_version, Instant::now());
    match tokio::time::timeout(START_WAIT, inner.store.staged()).await {
        Ok(Ok(staged)) => core.set_staged(staged),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not read staged transactions"),
        // Without it the remote sends staged transactions from their start.
        Err(_) => tracing::debug!("the store is busy: starting without what is staged"),
    }
    tracing::debug!("session started");

    let (outbox, mut outbox_rx) = mpsc::channel(inner.config.outbox);
    // How many messages the writer has sent (for an HTTP transport: had
    // answered), against how many the loop handed it.
    let (written_tx, mut written) = watch::channel(0u64);
    let mut handed: u64 = 0;
    let writer_failed = stop.token.child_token();
    let writer_done = writer_failed.clone();
    let writer = tokio::spawn(async move {
        let mut result = Ok(());
        while let Some(message) = outbox_rx.recv().await {
            if let Err(e) = sink.send(message).await {
                result = Err(e);
                break;
            }
            written_tx.send_modify(|n| *n += 1);
        }
        // A sink that failed is not polled again (some adapters panic when
        // polled after their error, e.g. `sink_map_err`).
        if result.is_ok() {
            let _ = sink.close().await;
        }
        writer_done.cancel();
        result
    });

    let mut limits = inner.store.batch_limits();
    if let Some(bytes) = settings.max_batch_bytes {
        limits.max_bytes = bytes;
    }
    let mut replies: HashMap<ReplyId, oneshot::Sender<Result<(), Rejection>>> = HashMap::new();
    let mut next_reply: ReplyId = 0;
    let mut reading: Option<ChangeStream> = None;
    let mut opening: Option<OpenFuture> = None;
    let mut stalled_since: Option<tokio::time::Instant> = None;
    // When the session last sent changes, and when it takes the Store's
    // cursor if it moved sooner than `coalesce_window` after that.
    let mut changes_sent: Option<tokio::time::Instant> = None;
    let mut cursor_due: Option<tokio::time::Instant> = None;
    // New commits wait while a message is still on its way (see `COALESCE_MIN`).
    let mut cursor_waits_for_writer = false;
    let mut merging: Option<MergeFuture> = None;
    let mut remote: Option<SiteId> = None;
    let id = inner.session_id();
    inner.session_opened(link, id);
    let database = telemetry::database_label(inner.store.path());
    let mut gauges = telemetry::SessionGauges::open(&database, &label);
    // Registered once: a lookup by name and labels costs more than the count.
    let changes_out =
        metrics::counter!(telemetry::CHANGES_OUT_TOTAL, "database" => database.clone());
    let changes_in = metrics::counter!(telemetry::CHANGES_IN_TOTAL, "database" => database.clone());
    let mut site_id_conflict = false;
    let mut noted_own = crate::DbVersion(0);
    let mut published: Option<crate::proto::SessionStatus> = None;
    let mut refresh_status = false;

    // Polled in every turn of the loop: made once, so that a turn does not
    // register and drop waiters on the token again. The writer's token is a
    // child of the stop token, so it ends on a stop too.
    let ended = writer_failed.cancelled();
    tokio::pin!(ended);
    let reason: String = 'session: loop {
        while let Some(output) = core.poll_output() {
            match output {
                Output::Merge(batch) => {
                    tracing::trace!(batch = %BatchSummary(&batch), "merging");
                    let store = inner.store.clone();
                    merging = Some(Box::pin(async move { store.merge(batch).await }));
                }
                Output::Read { from, hint } => {
                    tracing::trace!(?from, ?hint, "reading");
                    // From the live tail at once, or from the file once one
                    // of the Store's readers is free: meanwhile the session
                    // goes on receiving.
                    reading = None;
                    let store = inner.store.clone();
                    opening = Some(Box::pin(async move {
                        store.changes_since_hinted(&from, &hint, limits).await
                    }));
                }
                Output::CancelRead => {
                    reading = None;
                    opening = None;
                }
                Output::Reply { id, result } => {
                    if let Some(reply) = replies.remove(&id) {
                        let _ = reply.send(result);
                    }
                }
                Output::Event(event) => on_event(&inner, &label, &mut remote, event),
                Output::Close(reason) => {
                    // Ours to fix: name our file in the message.
                    let ours = |m: &str| {
                        m.replace(
                            "--db FILE",
                            &format!("--db {}", inner.store.path().display()),
                        )
                    };
                    let conflict = match &reason {
                        CloseReason::SiteIdConflict {
                            conflict: SiteConflict::WeAreACopy { .. },
                            message,
                        }
                        | CloseReason::Refused {
                            code: ErrorCode::SiteIdConflict,
                            message,
                        } => Some(ours(message)),
                        CloseReason::SiteIdConflict { message, .. } => Some(message.clone()),
                        _ => None,
                    };
                    if let Some(message) = conflict {
                        tracing::warn!(%message, "site id conflict");
                        inner.emit(PeerEvent::SiteIdConflict {
                            peer: remote,
                            message,
                        });
                        site_id_conflict = true;
                    }
                    // Send the error that explains the close, if there is room.
                    while let Some(message) = core.poll_transmit(Instant::now()) {
                        let _ = outbox.try_send(message);
                    }
                    break 'session reason.to_string();
                }
            }
        }
        let status = core.status();
        gauges.phase(status.phase);
        let acked_own = status.acknowledged.get(&local);
        if acked_own > noted_own {
            noted_own = acked_own;
            inner.store.note_acknowledged(acked_own);
        }
        // Published when it changed (most turns change nothing a status
        // shows), and at every timer wake-up (pings), which keeps the time
        // last in sync fresh in the link's saved record.
        if refresh_status || published.as_ref() != Some(&status) {
            refresh_status = false;
            published = Some(status.clone());
            inner.publish(id, link, Some(status));
        }
        let want_transmit = core.has_transmit();
        let want_batch = core.wants_batch() && reading.is_some();
        // A stream the session takes nothing from (the remote does not read)
        // is parked after a while: its thread, read connection and read
        // transaction are given back, and it is read again when wanted.
        if reading.is_none() || want_batch {
            stalled_since = None;
        } else if stalled_since.is_none() {
            stalled_since = Some(tokio::time::Instant::now());
        }
        let park = OptionFuture::from(
            stalled_since.map(|at| tokio::time::sleep_until(at + PARK_STALLED_STREAM_AFTER)),
        );
        let deadline = core.poll_timeout();
        let wake = OptionFuture::from(deadline.map(|at| tokio::time::sleep_until(at.into())));
        let coalesced = OptionFuture::from(cursor_due.map(tokio::time::sleep_until));
        tokio::select! {
            biased;
            _ = &mut ended => break if stop.token.is_cancelled() {
                stop.reason()
            } else {
                "connection closed while sending".into()
            },
            Some(opened) = OptionFuture::from(opening.as_mut()), if opening.is_some() => {
                opening = None;
                match opened {
                    Ok(s) => {
                        let total = s.total();
                        reading = Some(s);
                        core.handle(Input::StreamOpened { total }, Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read changes; will retry");
                        core.handle(Input::StreamFailed(e.to_string()), Instant::now());
                    }
                }
            }
            Some(result) = OptionFuture::from(merging.as_mut()), if merging.is_some() => {
                merging = None;
                if let Ok(report) = &result {
                    tracing::trace!(local = ?report.local_versions, cursor = ?report.cursor, "merged");
                }
                core.handle(Input::Merged(merge_result(result)), Instant::now());
            }
            permit = outbox.reserve(), if want_transmit => {
                let Ok(permit) = permit else { break "writer gone".into() };
                match core.poll_transmit(Instant::now()) {
                    Some(message) => {
                        if count_changes(&changes_out, &message) > 0 {
                            changes_sent = Some(tokio::time::Instant::now());
                        }
                        permit.send(message);
                        handed += 1;
                    }
                    None => drop(permit),
                }
            }
            item = stream.next(), if !core.is_busy() => match item {
                None => break "closed by remote".into(),
                Some(Err(TransportError::Decode(e))) => {
                    tracing::warn!(error = %e, "undecodable message");
                    core.handle(Input::Undecodable { error: e.to_string(), reply: None }, Instant::now());
                }
                Some(Err(e)) => break e.to_string(),
                Some(Ok(Received { message, reply, may_predate_session })) => {
                    tracing::trace!(?message, "received");
                    count_changes(&changes_in, &message);
                    let reply = reply.map(|tx| {
                        next_reply += 1;
                        replies.insert(next_reply, tx);
                        next_reply
                    });
                    let input = if may_predate_session {
                        Input::ReceivedEarlier { message, reply }
                    } else {
                        Input::Received { message, reply }
                    };
                    core.handle(input, Instant::now());
                }
            },
            Some(batch) = OptionFuture::from(reading.as_mut().map(|s| s.next_batch_to_send())), if want_batch => {
                let input = match batch {
                    Some(Ok(batch)) => {
                        tracing::trace!(batch = %BatchSummary(&batch), "read");
                        Input::Batch {
                        batch,
                        read_upto: reading.as_ref().map_or(0, |s| s.read_upto()),
                    }},
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "reading changes failed; will retry");
                        reading = None;
                        Input::StreamFailed(e.to_string())
                    }
                    None => {
                        reading = None;
                        Input::StreamEnded
                    }
                };
                core.handle(input, Instant::now());
            }
            changed = cursor_rx.changed(), if cursor_due.is_none() && !cursor_waits_for_writer => {
                if changed.is_err() {
                    break "peer shutting down".into();
                }
                let now = tokio::time::Instant::now();
                let window = coalesce_window(inner.open_sessions());
                match changes_sent {
                    Some(at) if now < at + window => cursor_due = Some(at + window),
                    _ if handed > *written.borrow() => cursor_waits_for_writer = true,
                    _ => {
                        take_local_changes(&mut core, &mut cursor_rx);
                    }
                }
            }
            Some(()) = coalesced => {
                cursor_due = None;
                if handed > *written.borrow() {
                    cursor_waits_for_writer = true;
                } else {
                    take_local_changes(&mut core, &mut cursor_rx);
                }
            }
            sent = written.changed(), if cursor_waits_for_writer => {
                // A writer that ended ends the session (`ended`, above).
                if sent.is_err() || *written.borrow_and_update() >= handed {
                    cursor_waits_for_writer = false;
                    take_local_changes(&mut core, &mut cursor_rx);
                }
            }
            changed = schema.changed() => {
                if changed.is_err() {
                    break "peer shutting down".into();
                }
                let version = *schema.borrow_and_update();
                core.handle(Input::SchemaChanged(version), Instant::now());
            }
            Some(()) = wake => {
                refresh_status = true;
                core.handle(Input::Timeout, Instant::now());
            }
            Some(()) = park => {
                tracing::debug!("parking a stalled change stream");
                reading = None;
                stalled_since = None;
                core.handle(Input::StreamParked, Instant::now());
            }
        }
    };

    drop(reading);
    drop(opening);
    drop(outbox);
    // Let the writer flush what is queued, but not forever.
    let write_error = match tokio::time::timeout(FLUSH_TIMEOUT, writer).await {
        Ok(Ok(Err(e))) => Some(e),
        _ => None,
    };
    let ended = Ended {
        refused: write_error.as_ref().is_some_and(is_refusal),
        site_id_conflict,
    };
    let reason = match write_error {
        // The sink's own error says more than "closed while sending".
        Some(e) if reason.starts_with("connection closed") => format!("send failed: {e}"),
        _ => reason,
    };
    tracing::debug!(%reason, "session ended");
    drop(gauges);
    inner.publish(id, link, None);
    inner.session_closed(link, core.status().last_error);
    inner.emit(PeerEvent::Disconnected {
        peer: remote,
        transport: label,
        reason,
    });
    ended
}

/// Hands the core the Store's cursor: the commits since it last took it.
fn take_local_changes(core: &mut Session, cursor_rx: &mut watch::Receiver<crate::Cursor>) {
    let cursor = cursor_rx.borrow_and_update().clone();
    core.handle(Input::LocalChanged { cursor }, Instant::now());
}

/// Counts the changes `message` carries in `counter`; returns how many.
fn count_changes(counter: &metrics::Counter, message: &TransportMessage) -> usize {
    let count = message.data.as_ref().map_or(0, |data| data.change_count());
    if count > 0 {
        counter.increment(count as u64);
    }
    count
}

fn merge_result(result: Result<MergeReport, MergeError>) -> Result<MergeOutcome, MergeFailure> {
    match result {
        Ok(report) => Ok(MergeOutcome {
            cursor: report.cursor,
            local_versions: report.local_versions,
            staged: report.staged,
        }),
        Err(MergeError::Rejected(rejection)) => Err(MergeFailure::Rejected(rejection)),
        Err(MergeError::Invalid { index, reason }) => {
            Err(MergeFailure::Invalid(format!("change #{index}: {reason}")))
        }
        Err(MergeError::Outdated { ours, theirs }) => Err(MergeFailure::Outdated { ours, theirs }),
        Err(e) => {
            tracing::error!(error = %e, "merge failed");
            Err(MergeFailure::Failed(e.to_string()))
        }
    }
}

fn on_event(inner: &Inner, label: &str, remote: &mut Option<SiteId>, event: SessionEvent) {
    tracing::trace!(?event, "session event");
    if let SessionEvent::Identified(peer) = event {
        *remote = Some(peer);
        inner.emit(PeerEvent::Connected {
            peer,
            transport: label.to_owned(),
        });
        return;
    }
    let Some(peer) = *remote else {
        return;
    };
    match event {
        SessionEvent::SyncRequested => inner.emit(PeerEvent::Sync { peer }),
        SessionEvent::Eose => inner.emit(PeerEvent::Eose { peer }),
        SessionEvent::Outdated {
            remote_version,
            local_version,
        } => inner.emit(PeerEvent::Outdated {
            peer,
            remote_version,
            local_version,
        }),
        SessionEvent::Rejected {
            code,
            message,
            by_remote,
        } => {
            if by_remote {
                tracing::info!(%peer, %code, %message, "remote reported an error");
            }
            telemetry::rejected(
                &telemetry::database_label(inner.store.path()),
                &code,
                by_remote,
            );
            inner.emit(PeerEvent::Rejected {
                peer,
                code,
                message,
                by_remote,
            });
        }
        SessionEvent::Approximated(notes) => {
            for note in notes {
                tracing::warn!(%peer, %note, "a v1 change could only be approximated");
            }
        }
        _ => {}
    }
}

/// A batch in one line for trace logs: its transactions, ranges and part.
struct BatchSummary<'a>(&'a crate::ChangeBatch);

impl std::fmt::Display for BatchSummary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut last = None;
        write!(f, "txns [")?;
        for change in &self.0.changes {
            let origin = change.origin();
            if last != Some(origin) {
                write!(f, " {:.8}:{}", origin.0.to_hex(), origin.1.0)?;
                last = Some(origin);
            }
        }
        write!(f, " ] ranges [")?;
        for (site, range) in &self.0.ranges {
            write!(
                f,
                " {:.8}:({},{}]",
                site.to_hex(),
                range.after.0,
                range.upto.0
            )?;
        }
        write!(f, " ] part {:?}", self.0.part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coalescing_window_grows_with_the_sessions_within_its_bounds() {
        assert_eq!(coalesce_window(1), COALESCE_MIN, "a device");
        assert_eq!(coalesce_window(100), COALESCE_MIN);
        assert_eq!(coalesce_window(1000), Duration::from_millis(50));
        assert_eq!(coalesce_window(usize::MAX), COALESCE_MAX);
    }
}
