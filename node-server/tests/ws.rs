//! The WebSocket route, driven by a raw client.

mod support;

use anyhow::{Context, Result, bail};
use crsync_peer::SiteId;
use crsync_peer::wire::{MessageKind, TransportMessage};
use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &TestServer, db: &str, token: &str) -> Result<Socket, WsError> {
    let mut request = format!("ws://{}/db/{db}/ws", server.addr).into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

async fn next_message(socket: &mut Socket) -> Result<Option<TransportMessage>> {
    loop {
        let frame = tokio::time::timeout(TIMEOUT, socket.next())
            .await
            .context("no frame within the timeout")?;
        match frame {
            None | Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Ok(Message::Text(text))) => {
                let message = TransportMessage::from_json(text.as_str())?;
                if message.kind != MessageKind::Ping {
                    return Ok(Some(message));
                }
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("websocket error: {e}"),
        }
    }
}

/// Reads until an `error` message arrives; returns its code.
async fn next_error(socket: &mut Socket) -> Result<String> {
    loop {
        match next_message(socket).await? {
            Some(m) if m.kind == MessageKind::Error => return Ok(m.code.unwrap_or_default()),
            Some(_) => continue,
            None => bail!("socket closed before an error message"),
        }
    }
}

fn status_of(e: WsError) -> u16 {
    match e {
        WsError::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test]
async fn websocket_auth() -> Result<()> {
    let server = TestServer::start().await?;
    assert_eq!(
        status_of(
            connect(&server, "notes", "wrong")
                .await
                .expect_err("refused")
        ),
        401
    );
    assert_eq!(
        status_of(connect(&server, "notes", OTHER).await.expect_err("refused")),
        403
    );
    let response = reqwest::get(server.url("/db/notes/ws")).await?;
    assert_eq!(response.status(), 401);
    Ok(())
}

#[tokio::test]
async fn websocket_exchange_and_refusals() -> Result<()> {
    let server = TestServer::start().await?;
    // A read-only token may not create it.
    server.create("notes").await?;
    let mut socket = connect(&server, "notes", RO).await?;
    let connect_msg = next_message(&mut socket).await?.context("connect")?;
    assert_eq!(connect_msg.kind, MessageKind::Connect);
    let sync = next_message(&mut socket).await?.context("sync")?;
    assert_eq!(sync.kind, MessageKind::Sync);

    let me = SiteId::from_bytes([7; 16]);
    socket
        .send(Message::text(TransportMessage::connect(me).to_json()))
        .await?;
    socket.send(Message::text("{not json")).await?;
    assert_eq!(next_error(&mut socket).await?, "MALFORMED");

    // A read-only token may not send data: refused, not applied.
    let data = serde_json::json!({
        "type": "data", "peerId": me.to_hex(),
        "data": {"type": "changes", "data": [{
            "table": "todo", "pk": "010901", "cid": "title", "val": "x",
            "col_version": 1, "db_version": 1, "site_id": me.to_hex(), "cl": 1, "seq": 0
        }]}
    });
    socket.send(Message::text(data.to_string())).await?;
    assert_eq!(next_error(&mut socket).await?, "FORBIDDEN");
    assert_eq!(replica_counts(&server.replica("notes"))?, (0, 0));

    // The socket stays usable; closing it ends the session cleanly.
    socket.close(None).await?;
    Ok(())
}

#[tokio::test]
async fn websocket_bad_data_is_refused_in_band() -> Result<()> {
    let server = TestServer::start().await?;
    let mut socket = connect(&server, "notes", RW).await?;
    next_message(&mut socket).await?;
    let me = SiteId::from_bytes([8; 16]);
    socket
        .send(Message::text(TransportMessage::connect(me).to_json()))
        .await?;
    let data = serde_json::json!({
        "type": "data", "peerId": me.to_hex(),
        "data": {"type": "changes", "data": [{
            "table": "nope", "pk": "010901", "cid": "title", "val": "x",
            "col_version": 1, "db_version": 1, "site_id": me.to_hex(), "cl": 1, "seq": 0
        }]}
    });
    socket.send(Message::text(data.to_string())).await?;
    assert_eq!(next_error(&mut socket).await?, "INVALID_CHANGE");
    assert_eq!(replica_counts(&server.replica("notes"))?, (0, 0));
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_closes_websockets() -> Result<()> {
    let mut server = TestServer::start().await?;
    let mut socket = connect(&server, "notes", RW).await?;
    assert_eq!(
        next_message(&mut socket).await?.map(|m| m.kind),
        Some(MessageKind::Connect)
    );
    server.shutdown().await?;
    // Whatever was queued, then the end of the socket.
    while next_message(&mut socket).await?.is_some() {}
    Ok(())
}
