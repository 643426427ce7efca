//! The WebSocket adapter: text frames of [`TransportMessage`] JSON both ways,
//! one [`Connection`] per socket.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use crsync_peer::proto::ErrorCode;
use crsync_peer::wire::TransportMessage;
use crsync_peer::{Connection, Received};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::Access;
use crate::host::{DbHost, INBOUND_QUEUE_CAP, OUTBOUND_QUEUE_CAP, admit, channel_sink};

/// Runs one WebSocket until either side ends it.
pub(crate) async fn run(socket: WebSocket, host: Arc<DbHost>, access: Access, id: u64) {
    let span = tracing::info_span!("ws", db = host.name(), conn = id);
    serve_socket(socket, host, access, span.clone())
        .instrument(span)
        .await;
}

async fn serve_socket(socket: WebSocket, host: Arc<DbHost>, access: Access, span: tracing::Span) {
    let (mut ws_tx, mut ws_rx) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<TransportMessage>(OUTBOUND_QUEUE_CAP);
    let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE_CAP);
    let me = host.peer().site_id();

    // The writer owns the socket's sending half; the Peer's sink and our own
    // refusals both feed it.
    let writer = tokio::spawn(
        async move {
            while let Some(msg) = out_rx.recv().await {
                if ws_tx
                    .send(Message::Text(msg.to_json().into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = ws_tx.send(Message::Close(None)).await;
        }
        .in_current_span(),
    );

    let conn = Connection {
        sink: channel_sink(out_tx.clone()),
        stream: Box::pin(ReceiverStream::new(in_rx)),
        label: format!("ws {}", host.name()),
    };
    let mut session = host.accept(conn, &span);

    let closed = host.closed();
    tokio::pin!(closed);
    loop {
        let frame = tokio::select! {
            frame = ws_rx.next() => frame,
            () = &mut closed => break,
            // The Peer ended the session.
            _ = &mut session => break,
            // The writer failed: the socket is gone.
            () = out_tx.closed() => break,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
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
