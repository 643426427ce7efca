//! The WebSocket adapter: text frames of [`TransportMessage`] JSON both ways,
//! one [`Connection`] per socket.

use std::pin::Pin;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use crsync_peer::proto::ErrorCode;
use crsync_peer::wire::TransportMessage;
use crsync_peer::{Connection, Received};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::auth::Principal;
use crate::conn_log::ConnLog;
use crate::host::{DbHost, INBOUND_QUEUE_CAP, admit};
use crate::limits::{ConnKill, ConnectionPermit, OutboundRx, outbound};
use crate::{Access, telemetry};

/// One accepted WebSocket: who opened it and what it holds.
pub(crate) struct WsConn {
    pub(crate) access: Access,
    pub(crate) key: Principal,
    pub(crate) kill: ConnKill,
    /// Names it in logs.
    pub(crate) id: u64,
    /// Its connection slot, held until it ends.
    pub(crate) permit: ConnectionPermit,
    /// Resolves when a token reload takes its access away: it is closed.
    pub(crate) revoked: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Logs its close (with what it moved) when dropped.
    pub(crate) log: ConnLog,
}

/// Runs one WebSocket until either side ends it.
pub(crate) async fn run(socket: WebSocket, host: Arc<DbHost>, conn: WsConn) {
    let span = tracing::info_span!("ws", db = host.name(), conn = conn.id);
    let WsConn {
        access,
        key,
        kill,
        permit,
        revoked,
        log,
        ..
    } = conn;
    serve_socket(socket, host, access, key, kill, span.clone(), revoked, &log)
        .instrument(span)
        .await;
    drop(permit);
    drop(log);
}

/// Writes what the queue gives to the socket, until the queue ends, the
/// socket fails, or the client stops reading for the stall timeout.
async fn write_socket(
    mut ws_tx: SplitSink<WebSocket, Message>,
    mut out_rx: OutboundRx,
    database: String,
) {
    let bytes_out = telemetry::bytes_out_counter(&database, "ws");
    let watchdog = out_rx.stall();
    let stalled = watchdog.stalled();
    tokio::pin!(stalled);
    loop {
        let queued = tokio::select! {
            queued = out_rx.recv() => queued,
            () = &mut stalled => break,
        };
        let Some(queued) = queued else {
            let _ = ws_tx.send(Message::Close(None)).await;
            return;
        };
        let bytes = queued.len();
        tokio::select! {
            sent = ws_tx.send(Message::Text(queued.joined().into())) => if sent.is_err() {
                return;
            },
            () = &mut stalled => break,
        }
        bytes_out.increment(bytes as u64);
        // Only now do its bytes leave the queue.
        drop(queued);
    }
    tracing::warn!(
        timeout = ?watchdog.timeout(),
        "dropping a stalled websocket: its client read nothing in time"
    );
}

#[allow(clippy::too_many_arguments)]
async fn serve_socket(
    socket: WebSocket,
    host: Arc<DbHost>,
    access: Access,
    key: Principal,
    conn: ConnKill,
    span: tracing::Span,
    mut revoked: Pin<Box<dyn Future<Output = ()> + Send>>,
    log: &ConnLog,
) {
    let (ws_tx, mut ws_rx) = socket.split();
    let config = host.limits().config();
    let (out_tx, out_rx) = outbound(
        host.name(),
        config.outbound_queue_bytes,
        config.stall_timeout,
        conn.progress(),
    );
    let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE_CAP);
    let me = host.peer().site_id();
    let bytes_in = telemetry::bytes_in_counter(host.name(), "ws");

    // The writer owns the socket's sending half; the Peer's sink and our own
    // refusals both feed it.
    let writer =
        tokio::spawn(write_socket(ws_tx, out_rx, host.name().to_owned()).in_current_span());

    let conn = Connection {
        sink: out_tx.clone().sink(),
        stream: Box::pin(ReceiverStream::new(in_rx)),
        label: format!(
            "ws {}{}",
            host.name(),
            crate::host::from_label(conn.remote_addr())
        ),
    };
    let mut session = host.accept(log.counted(conn), &span);

    let closed = host.closed();
    tokio::pin!(closed);
    loop {
        // Rate limits on a socket are back-pressure: the next frame is read
        // only once the token and the database may take one more message.
        let admitted = async {
            host.limits().wait_rate(key).await;
            host.wait_rate().await;
        };
        tokio::select! {
            () = admitted => {}
            () = &mut revoked => {
                tracing::info!("closing: a token reload revoked its token");
                break;
            }
            () = &mut closed => break,
            _ = &mut session => break,
            () = out_tx.closed() => break,
        }
        let frame = tokio::select! {
            frame = ws_rx.next() => frame,
            () = &mut revoked => {
                tracing::info!("closing: a token reload revoked its token");
                break;
            }
            () = &mut closed => break,
            // The Peer ended the session.
            _ = &mut session => break,
            // The writer failed: the socket is gone.
            () = out_tx.closed() => break,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => {
                bytes_in.increment(text.len() as u64);
                text
            }
            Some(Ok(Message::Binary(_))) => {
                let refusal = TransportMessage::error(
                    me,
                    &ErrorCode::Malformed,
                    "expected text frames of JSON",
                );
                if out_tx.send(refusal).await.is_err() {
                    break;
                }
                continue;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
        };
        let refusal = match TransportMessage::from_json(text.as_str()) {
            Err(e) => Some(TransportMessage::error(
                me,
                &ErrorCode::Malformed,
                e.to_string(),
            )),
            Ok(mut msg) => {
                if admit(&mut msg, access) {
                    if in_tx.send(Ok(Received::new(msg))).await.is_err() {
                        break;
                    }
                    None
                } else {
                    Some(TransportMessage::error(
                        me,
                        &ErrorCode::Forbidden,
                        "this token is read-only: data messages are refused",
                    ))
                }
            }
        };
        if let Some(refusal) = refusal {
            tracing::debug!(code = ?refusal.code, "refused a message");
            if out_tx.send(refusal).await.is_err() {
                break;
            }
        }
    }
    // Ending the inbound stream ends the Peer's session, which drops its sink;
    // the writer then drains what is queued and closes the socket.
    drop(in_tx);
    drop(out_tx);
    let _ = writer.await;
    tracing::info!("websocket closed");
}
