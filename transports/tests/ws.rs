//! The WebSocket dialer against a small tokio-tungstenite server on 127.0.0.1.
#![allow(clippy::unwrap_used)]
// Handshake and handler signatures are imposed by tungstenite and axum.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::time::Duration;

use crsync_peer::wire::{MessageKind, TransportMessage};
use crsync_peer::{Cursor, DbVersion, Dialer, SiteId, TransportError};
use crsync_transports::ws::{WebSocketDialer, connection_from_ws};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

const WAIT: Duration = Duration::from_secs(10);

fn client_site() -> SiteId {
    SiteId::from_bytes([1; 16])
}

fn server_site() -> SiteId {
    SiteId::from_bytes([2; 16])
}

/// One upgraded socket, with what the client sent in its request.
struct Accepted {
    socket: WebSocketStream<TcpStream>,
    uri: String,
    authorization: Option<String>,
}

/// How the test server answers upgrade requests.
#[derive(Clone, Copy)]
enum Gate {
    Open,
    /// 401 unless `Authorization: Bearer <token>`.
    Token(&'static str),
    NotFound,
}

async fn server(gate: Gate) -> (String, mpsc::Receiver<Accepted>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (seen_tx, seen_rx) = std::sync::mpsc::channel();
                let callback = move |request: &Request, response: Response| {
                    let authorization = request
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned());
                    let refuse = |status: StatusCode, body: &str| -> ErrorResponse {
                        let mut refusal = ErrorResponse::new(Some(body.to_owned()));
                        *refusal.status_mut() = status;
                        refusal
                    };
                    match gate {
                        Gate::Token(token)
                            if authorization.as_deref() != Some(&format!("Bearer {token}")) =>
                        {
                            return Err(refuse(
                                StatusCode::UNAUTHORIZED,
                                r#"{"type":"error","error":"bad token","code":"UNAUTHORIZED"}"#,
                            ));
                        }
                        Gate::NotFound => {
                            return Err(refuse(
                                StatusCode::NOT_FOUND,
                                r#"{"type":"error","error":"no such database","code":"UNKNOWN_DATABASE"}"#,
                            ));
                        }
                        _ => {}
                    }
                    seen_tx
                        .send((request.uri().to_string(), authorization))
                        .unwrap();
                    Ok(response)
                };
                if let Ok(socket) = tokio_tungstenite::accept_hdr_async(tcp, callback).await {
                    let (uri, authorization) = seen_rx.recv().unwrap();
                    let _ = tx
                        .send(Accepted {
                            socket,
                            uri,
                            authorization,
                        })
                        .await;
                }
            });
        }
    });
    (format!("ws://{addr}/db/notes/ws"), rx)
}

async fn accept(rx: &mut mpsc::Receiver<Accepted>) -> Accepted {
    timeout(WAIT, rx.recv()).await.unwrap().unwrap()
}

#[tokio::test]
async fn messages_round_trip_both_ways_with_the_token() {
    let (url, mut accepted) = server(Gate::Token("s3cret")).await;
    let mut dialer = WebSocketDialer::new(&url).with_token("s3cret");
    assert_eq!(dialer.label(), format!("ws {url}"));
    let mut client = timeout(WAIT, dialer.dial(client_site()))
        .await
        .unwrap()
        .unwrap();
    let accepted = accept(&mut accepted).await;
    assert_eq!(accepted.authorization.as_deref(), Some("Bearer s3cret"));
    assert_eq!(
        accepted.uri,
        format!("/db/notes/ws?peerId={}", client_site().to_hex())
    );
    let mut server = connection_from_ws(accepted.socket, "server");

    let cursor: Cursor = [(server_site(), DbVersion(3))].into_iter().collect();
    let sent = vec![
        TransportMessage::connect(client_site()),
        TransportMessage::sync(client_site(), cursor),
        TransportMessage::ping(client_site()),
    ];
    for message in &sent {
        client.sink.send(message.clone()).await.unwrap();
    }
    for message in &sent {
        let got = timeout(WAIT, server.stream.next()).await.unwrap().unwrap();
        assert_eq!(&got.unwrap().message, message);
    }

    let reply =
        TransportMessage::error(server_site(), &crsync_peer::proto::ErrorCode::Gap, "resend");
    server
        .sink
        .send(TransportMessage::connect(server_site()))
        .await
        .unwrap();
    server.sink.send(reply.clone()).await.unwrap();
    let first = timeout(WAIT, client.stream.next()).await.unwrap().unwrap();
    assert_eq!(first.unwrap().message.kind, MessageKind::Connect);
    let second = timeout(WAIT, client.stream.next()).await.unwrap().unwrap();
    assert_eq!(second.unwrap().message, reply);
}

#[tokio::test]
async fn a_wrong_token_is_a_typed_refusal() {
    let (url, _accepted) = server(Gate::Token("s3cret")).await;
    let refused = WebSocketDialer::new(&url)
        .with_token("wrong")
        .dial(client_site())
        .await;
    match refused {
        Err(TransportError::Remote { code, message }) => {
            assert_eq!(code, "UNAUTHORIZED");
            assert_eq!(message, "bad token");
        }
        other => panic!("expected a remote refusal, got {other:?}"),
    }
    let missing = WebSocketDialer::new(&url).dial(client_site()).await;
    assert!(
        matches!(missing, Err(TransportError::Remote { ref code, .. }) if code == "UNAUTHORIZED")
    );
}

#[tokio::test]
async fn other_refusals_are_http_errors() {
    let (url, _accepted) = server(Gate::NotFound).await;
    let refused = WebSocketDialer::new(&url).dial(client_site()).await;
    assert!(
        matches!(refused, Err(TransportError::Http { status: 404, ref message, .. }) if message.contains("UNKNOWN_DATABASE")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    let refused = WebSocketDialer::new(format!("ws://{addr}/ws"))
        .dial(client_site())
        .await;
    assert!(
        matches!(refused, Err(TransportError::Connect { .. })),
        "{refused:?}"
    );
    let bad_url = WebSocketDialer::new("not a url").dial(client_site()).await;
    assert!(matches!(bad_url, Err(TransportError::Connect { .. })));
}

#[tokio::test]
async fn a_server_that_never_upgrades_times_the_dial_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        // Accept the TCP connection and say nothing.
        let (tcp, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(tcp);
    });
    let silent = WebSocketDialer::new(format!("ws://{addr}/ws"))
        .with_dial_timeout(Duration::from_millis(300))
        .dial(client_site())
        .await;
    assert!(
        matches!(silent, Err(TransportError::Timeout(_))),
        "{silent:?}"
    );
    holder.abort();
}

#[tokio::test]
async fn a_malformed_frame_is_a_decode_error_and_the_connection_goes_on() {
    let (url, mut accepted) = server(Gate::Open).await;
    let mut client = WebSocketDialer::new(&url)
        .dial(client_site())
        .await
        .unwrap();
    let mut socket = accept(&mut accepted).await.socket;
    socket.send(Message::text("{not json")).await.unwrap();
    socket
        .send(Message::binary(Bytes::from_static(&[0xff, 0xfe])))
        .await
        .unwrap();
    let ping = TransportMessage::ping(server_site());
    socket.send(Message::text(ping.to_json())).await.unwrap();

    for _ in 0..2 {
        let bad = timeout(WAIT, client.stream.next()).await.unwrap().unwrap();
        assert!(matches!(bad, Err(TransportError::Decode(_))), "{bad:?}");
    }
    let good = timeout(WAIT, client.stream.next()).await.unwrap().unwrap();
    assert_eq!(good.unwrap().message, ping);
}

#[tokio::test]
async fn websocket_pings_are_answered_and_hidden() {
    let (url, mut accepted) = server(Gate::Open).await;
    let mut client = WebSocketDialer::new(&url)
        .dial(client_site())
        .await
        .unwrap();
    let mut socket = accept(&mut accepted).await.socket;
    let reader = tokio::spawn(async move {
        let first = client.stream.next().await.unwrap().unwrap();
        (client, first.message)
    });
    socket
        .send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    let pong = timeout(WAIT, socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(Bytes::from_static(b"are you there")));
    // The ping never reached the message stream.
    let ping = TransportMessage::ping(server_site());
    socket.send(Message::text(ping.to_json())).await.unwrap();
    let (_client, first) = timeout(WAIT, reader).await.unwrap().unwrap();
    assert_eq!(first, ping);
}

#[tokio::test]
async fn a_close_frame_ends_the_stream() {
    let (url, mut accepted) = server(Gate::Open).await;
    let mut client = WebSocketDialer::new(&url)
        .dial(client_site())
        .await
        .unwrap();
    let mut socket = accept(&mut accepted).await.socket;
    let server = tokio::spawn(async move {
        socket.close(None).await.unwrap();
        // Read the client's close reply, then the socket ends.
        while let Some(Ok(_)) = socket.next().await {}
    });
    let end = timeout(WAIT, client.stream.next()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
    timeout(WAIT, server).await.unwrap().unwrap();
    let after = client
        .sink
        .send(TransportMessage::ping(client_site()))
        .await;
    assert!(after.is_err());
}

/// Sends pings until one fails (the socket is gone), within [`WAIT`].
async fn send_until_it_fails(sink: &mut crsync_peer::MessageSink) -> TransportError {
    timeout(WAIT, async {
        loop {
            if let Err(e) = sink.send(TransportMessage::ping(client_site())).await {
                return e;
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn closing_after_a_failed_send_does_not_panic() {
    let (url, mut accepted) = server(Gate::Open).await;
    let mut client = WebSocketDialer::new(&url)
        .dial(client_site())
        .await
        .unwrap();
    // The server accepts, then drops the socket without a close frame.
    drop(accept(&mut accepted).await.socket);
    let failed = send_until_it_fails(&mut client.sink).await;
    assert!(
        matches!(failed, TransportError::Io(_) | TransportError::Closed),
        "{failed:?}"
    );
    // The session then closes its sink: an error or Ok, never a panic.
    let _ = timeout(WAIT, client.sink.close()).await.unwrap();
    // and the sink stays finished
    let again = client
        .sink
        .send(TransportMessage::ping(client_site()))
        .await;
    assert!(matches!(again, Err(TransportError::Closed)), "{again:?}");
    let _ = timeout(WAIT, client.sink.close()).await.unwrap();
}

#[tokio::test]
async fn closing_after_the_remote_closed_does_not_panic() {
    let (url, mut accepted) = server(Gate::Open).await;
    let mut client = WebSocketDialer::new(&url)
        .dial(client_site())
        .await
        .unwrap();
    let mut socket = accept(&mut accepted).await.socket;
    let server = tokio::spawn(async move {
        socket.close(None).await.unwrap();
        while let Some(Ok(_)) = socket.next().await {}
    });
    // The stream reads the close frame and ends.
    assert!(timeout(WAIT, client.stream.next()).await.unwrap().is_none());
    timeout(WAIT, server).await.unwrap().unwrap();
    let failed = send_until_it_fails(&mut client.sink).await;
    assert!(matches!(failed, TransportError::Closed), "{failed:?}");
    let _ = timeout(WAIT, client.sink.close()).await.unwrap();
    let _ = timeout(WAIT, client.sink.close()).await.unwrap();
}
