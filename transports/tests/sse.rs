//! The HTTP+SSE dialer against a small v1 server (axum) on 127.0.0.1.
#![allow(clippy::unwrap_used)]
// Handshake and handler signatures are imposed by tungstenite and axum.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use crsync_peer::proto::ErrorCode;
use crsync_peer::wire::{MessageKind, PeerChange, PeerMessage, PeerMessageKind, TransportMessage};
use crsync_peer::{Cursor, DbVersion, Dialer, SiteId, TransportError};
use crsync_transports::sse::SseDialer;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);
const BODY_LIMIT: usize = 16 * 1024;

fn site(n: u8) -> SiteId {
    SiteId::from_bytes([n; 16])
}

fn server_site() -> SiteId {
    site(0xee)
}

#[derive(Clone, Default)]
struct Config {
    /// Tokens allowed to read; `readonly` may also POST `sync` but not `data`.
    token: Option<&'static str>,
    /// Send the duplicate-stream error the v1 way (no code, no peerId).
    v1_errors: bool,
    /// Open streams but never send anything.
    silent: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Post {
    path: String,
    authorization: Option<String>,
    body: serde_json::Value,
}

/// Query parameters and Authorization header of a stream request.
type StreamRequest = (HashMap<String, String>, Option<String>);

#[derive(Default)]
struct Shared {
    config: Config,
    /// Frames to push into each open stream, by peer id.
    streams: Mutex<HashMap<String, mpsc::Sender<String>>>,
    /// Query and Authorization of each stream request.
    stream_requests: Mutex<Vec<StreamRequest>>,
    posts: Mutex<Vec<Post>>,
    /// Scripted answers to the next POSTs (default 200).
    replies: Mutex<VecDeque<(StatusCode, serde_json::Value)>>,
    /// Extra processing time for the next POST.
    stall: Mutex<Option<Duration>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

type App = Arc<Shared>;

fn error_body(error: &str, code: &str) -> serde_json::Value {
    json!({"type": "error", "error": error, "code": code})
}

fn authorized(app: &App, headers: &HeaderMap) -> Result<Option<String>, Response> {
    let authorization = headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned());
    if let Some(token) = app.config.token {
        let ok = authorization.as_deref() == Some(&format!("Bearer {token}"))
            || authorization.as_deref() == Some("Bearer readonly");
        if !ok {
            let body = error_body("missing or unknown token", "UNAUTHORIZED");
            return Err((StatusCode::UNAUTHORIZED, Json(body)).into_response());
        }
    }
    Ok(authorization)
}

fn frame(message: &TransportMessage) -> String {
    message.to_json()
}

async fn stream(
    State(app): State<App>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let authorization = match authorized(&app, &headers) {
        Ok(a) => a,
        Err(refusal) => return refusal,
    };
    app.stream_requests
        .lock()
        .unwrap()
        .push((query.clone(), authorization));
    let Some(peer) = query.get("peerId").cloned() else {
        let body = error_body("missing peerId", "MALFORMED");
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    };
    let (tx, rx) = mpsc::channel::<String>(64);
    let mut first = Vec::new();
    {
        let mut streams = app.streams.lock().unwrap();
        if streams.get(&peer).is_some_and(|s| !s.is_closed()) {
            first.push(if app.config.v1_errors {
                json!({"type": "error", "error": "ALREADY_CONNECTED"}).to_string()
            } else {
                frame(&TransportMessage::error(
                    server_site(),
                    &crsync_peer::proto::ErrorCode::AlreadyConnected,
                    "a stream for this peer is open",
                ))
            });
            drop(tx);
        } else {
            if !app.config.silent {
                first.push(frame(&TransportMessage::connect(server_site())));
                let cursor: Cursor = [(server_site(), DbVersion(7))].into_iter().collect();
                first.push(frame(&TransportMessage::sync(server_site(), cursor)));
            }
            streams.insert(peer, tx);
        }
    }
    let frames = futures_util::stream::iter(first).chain(tokio_stream_from(rx));
    Sse::new(frames.map(|data| Ok::<_, Infallible>(Event::default().data(data)))).into_response()
}

fn tokio_stream_from(mut rx: mpsc::Receiver<String>) -> impl futures_util::Stream<Item = String> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn handle_post(app: App, path: &str, headers: HeaderMap, body: String) -> Response {
    let authorization = match authorized(&app, &headers) {
        Ok(a) => a,
        Err(refusal) => return refusal,
    };
    let now = app.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    app.max_in_flight.fetch_max(now, Ordering::SeqCst);
    // Vary the processing time, so overlapping requests would finish out of order.
    let count = app.posts.lock().unwrap().len() as u64;
    tokio::time::sleep(Duration::from_micros((count * 7919) % 3000)).await;
    let stall = app.stall.lock().unwrap().take();
    if let Some(stall) = stall {
        tokio::time::sleep(stall).await;
    }
    app.in_flight.fetch_sub(1, Ordering::SeqCst);
    if path == "data" && authorization.as_deref() == Some("Bearer readonly") {
        let body = error_body("read-only token", "FORBIDDEN");
        return (StatusCode::FORBIDDEN, Json(body)).into_response();
    }
    app.posts.lock().unwrap().push(Post {
        path: path.to_owned(),
        authorization,
        body: serde_json::from_str(&body).unwrap(),
    });
    let reply = app.replies.lock().unwrap().pop_front();
    match reply {
        Some((status, body)) => (status, Json(body)).into_response(),
        None => Json(json!({"success": true})).into_response(),
    }
}

async fn sync(State(app): State<App>, headers: HeaderMap, body: String) -> Response {
    handle_post(app, "sync", headers, body).await
}

async fn data(State(app): State<App>, headers: HeaderMap, body: String) -> Response {
    handle_post(app, "data", headers, body).await
}

/// Starts a server; returns its base URL (with a path prefix) and its state.
async fn server(config: Config) -> (String, App) {
    let app: App = Arc::new(Shared {
        config,
        ..Shared::default()
    });
    let router = Router::new()
        .route("/db/notes/stream", get(stream))
        .route("/db/notes/sync", post(sync))
        .route("/db/notes/data", post(data))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}/db/notes"), app)
}

/// Pushes a raw frame into the stream of `peer`.
async fn push(app: &App, peer: SiteId, data: String) {
    let tx = app.streams.lock().unwrap().get(&peer.to_hex()).cloned();
    tx.unwrap().send(data).await.unwrap();
}

fn data_message(from: SiteId, n: i64, text_len: usize) -> TransportMessage {
    TransportMessage {
        data: Some(PeerMessage {
            encoded: None,
            kind: PeerMessageKind::Changes,
            data: vec![PeerChange {
                table: "notes".into(),
                pk: "010901".into(),
                cid: "body".into(),
                val: json!("x".repeat(text_len)),
                col_version: 1,
                db_version: n,
                site_id: from.to_hex(),
                cl: 1,
                seq: 0,
            }],
            schema_version: Some(1),
            ranges: None,
            part: None,
        }),
        ..TransportMessage::ping(from)
    }
    .with_kind(MessageKind::Data)
}

trait WithKind {
    fn with_kind(self, kind: MessageKind) -> Self;
}

impl WithKind for TransportMessage {
    fn with_kind(mut self, kind: MessageKind) -> Self {
        self.kind = kind;
        self
    }
}

fn db_version_of(post: &Post) -> i64 {
    post.body["data"]["data"][0]["db_version"].as_i64().unwrap()
}

async fn wait_for_posts(app: &App, n: usize) -> Vec<Post> {
    // Sends complete only after the response, so the posts are already there.
    let posts = app.posts.lock().unwrap().clone();
    assert_eq!(posts.len(), n, "{posts:?}");
    posts
}

#[tokio::test]
async fn messages_round_trip_with_the_token_on_every_request() {
    let (base, app) = server(Config {
        token: Some("tok"),
        ..Config::default()
    })
    .await;
    let me = site(1);
    let mut dialer = SseDialer::new(format!("{base}/")).with_token("tok");
    assert_eq!(dialer.label(), format!("sse {base}"));
    let mut conn = timeout(WAIT, dialer.dial(me)).await.unwrap().unwrap();
    assert_eq!(conn.label, format!("sse {base}"));

    let (query, authorization) = app.stream_requests.lock().unwrap()[0].clone();
    assert_eq!(query.get("peerId"), Some(&me.to_hex()));
    assert_eq!(query.get("crsync").map(String::as_str), Some("lossless"));
    assert_eq!(authorization.as_deref(), Some("Bearer tok"));

    // The server's connect and sync arrive first, in order.
    let first = timeout(WAIT, conn.stream.next()).await.unwrap().unwrap();
    let first = first.unwrap().message;
    assert_eq!(
        (first.kind, first.sender().unwrap()),
        (MessageKind::Connect, server_site())
    );
    let second = timeout(WAIT, conn.stream.next()).await.unwrap().unwrap();
    assert_eq!(second.unwrap().message.kind, MessageKind::Sync);

    // connect and ping are not POSTed; sync and data are, to their endpoints.
    let cursor: Cursor = [(me, DbVersion(2))].into_iter().collect();
    let sync = TransportMessage::sync(me, cursor);
    let data = data_message(me, 2, 5);
    for message in [
        TransportMessage::connect(me),
        sync.clone(),
        TransportMessage::ping(me),
        data.clone(),
    ] {
        timeout(WAIT, conn.sink.send(message))
            .await
            .unwrap()
            .unwrap();
    }
    let posts = wait_for_posts(&app, 2).await;
    assert_eq!(posts[0].path, "sync");
    assert_eq!(posts[0].body, serde_json::to_value(&sync).unwrap());
    assert_eq!(posts[1].path, "data");
    assert_eq!(posts[1].body, serde_json::to_value(&data).unwrap());
    assert!(
        posts
            .iter()
            .all(|p| p.authorization.as_deref() == Some("Bearer tok"))
    );

    // Live messages from the server.
    let live = data_message(server_site(), 8, 3);
    push(&app, me, live.to_json()).await;
    let got = timeout(WAIT, conn.stream.next()).await.unwrap().unwrap();
    assert_eq!(got.unwrap().message, live);

    // The server ends the stream: so does ours.
    app.streams.lock().unwrap().clear();
    assert!(timeout(WAIT, conn.stream.next()).await.unwrap().is_none());
}

#[tokio::test]
async fn a_refused_stream_is_a_typed_dial_error() {
    let (base, _app) = server(Config {
        token: Some("tok"),
        ..Config::default()
    })
    .await;
    let refused = SseDialer::new(&base).with_token("nope").dial(site(1)).await;
    match refused {
        Err(TransportError::Remote { code, message }) => {
            assert_eq!(code, "UNAUTHORIZED");
            assert_eq!(message, "missing or unknown token");
        }
        other => panic!("expected a remote refusal, got {other:?}"),
    }
    let missing = SseDialer::new(&base).dial(site(1)).await;
    assert!(
        matches!(missing, Err(TransportError::Remote { ref code, .. }) if code == "UNAUTHORIZED")
    );

    let wrong_path = base.replace("/db/notes", "/db/other");
    let not_found = SseDialer::new(wrong_path)
        .with_token("tok")
        .dial(site(1))
        .await;
    assert!(
        matches!(not_found, Err(TransportError::Http { status: 404, .. })),
        "{not_found:?}"
    );
}

#[tokio::test]
async fn an_unreachable_server_or_silent_stream_fails_the_dial() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let refused = SseDialer::new(format!("http://{addr}")).dial(site(1)).await;
    assert!(
        matches!(refused, Err(TransportError::Connect { .. })),
        "{refused:?}"
    );

    let (base, _app) = server(Config {
        silent: true,
        ..Config::default()
    })
    .await;
    let silent = SseDialer::new(base)
        .with_dial_timeout(Duration::from_millis(300))
        .dial(site(1))
        .await;
    assert!(
        matches!(silent, Err(TransportError::Timeout(_))),
        "{silent:?}"
    );
}

#[tokio::test]
async fn a_second_stream_for_the_same_peer_is_refused() {
    for v1_errors in [false, true] {
        let (base, _app) = server(Config {
            v1_errors,
            ..Config::default()
        })
        .await;
        let mut dialer = SseDialer::new(&base);
        let _open = dialer.dial(site(1)).await.unwrap();
        let second = timeout(WAIT, dialer.dial(site(1))).await.unwrap();
        assert!(
            matches!(second, Err(TransportError::Remote { ref code, .. }) if code == "ALREADY_CONNECTED"),
            "v1 style {v1_errors}: {second:?}"
        );
        // Another peer is welcome.
        assert!(dialer.dial(site(2)).await.is_ok());
    }
}

#[tokio::test]
async fn a_malformed_frame_is_a_decode_error_and_the_stream_goes_on() {
    let (base, app) = server(Config::default()).await;
    let me = site(3);
    let mut conn = SseDialer::new(&base).dial(me).await.unwrap();
    for _ in 0..2 {
        timeout(WAIT, conn.stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    push(&app, me, "{oops".into()).await;
    push(&app, me, TransportMessage::ping(server_site()).to_json()).await;
    let bad = timeout(WAIT, conn.stream.next()).await.unwrap().unwrap();
    assert!(matches!(bad, Err(TransportError::Decode(_))), "{bad:?}");
    let good = timeout(WAIT, conn.stream.next()).await.unwrap().unwrap();
    assert_eq!(good.unwrap().message.kind, MessageKind::Ping);
}

#[tokio::test]
async fn posts_stay_in_order_one_at_a_time() {
    let (base, app) = server(Config::default()).await;
    let me = site(4);
    let mut conn = SseDialer::new(&base).dial(me).await.unwrap();
    let n = 300;
    for i in 0..n {
        // `feed` does not wait for delivery of this message, only the last.
        timeout(WAIT, conn.sink.feed(data_message(me, i, 10)))
            .await
            .unwrap()
            .unwrap();
    }
    timeout(WAIT, conn.sink.flush()).await.unwrap().unwrap();
    let posts = wait_for_posts(&app, n as usize).await;
    let order: Vec<i64> = posts.iter().map(db_version_of).collect();
    assert_eq!(order, (0..n).collect::<Vec<_>>());
    assert_eq!(app.max_in_flight.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn recoverable_refusals_count_as_delivered_others_fail() {
    let (base, app) = server(Config::default()).await;
    let me = site(5);
    let mut conn = SseDialer::new(&base).dial(me).await.unwrap();
    app.replies.lock().unwrap().extend([
        (StatusCode::BAD_REQUEST, error_body("gap", "GAP")),
        (StatusCode::BAD_REQUEST, error_body("bad", "INVALID_CHANGE")),
        (StatusCode::CONFLICT, error_body("newer", "SCHEMA_OUTDATED")),
        (StatusCode::BAD_REQUEST, error_body("json", "MALFORMED")),
        (
            StatusCode::BAD_REQUEST,
            error_body("no stream", "NOT_CONNECTED"),
        ),
    ]);
    for i in 0..4 {
        timeout(WAIT, conn.sink.send(data_message(me, i, 1)))
            .await
            .unwrap()
            .unwrap();
    }
    let failed = conn.sink.send(data_message(me, 4, 1)).await;
    assert!(
        matches!(failed, Err(TransportError::Remote { code: ErrorCode::NotConnected, ref message }) if message == "no stream"),
        "{failed:?}"
    );
    // Nothing more goes out on this connection.
    let after = conn.sink.send(data_message(me, 5, 1)).await;
    assert!(matches!(after, Err(TransportError::Closed)), "{after:?}");
    wait_for_posts(&app, 5).await;
}

#[tokio::test]
async fn server_errors_fail_the_send() {
    let (base, app) = server(Config::default()).await;
    let me = site(6);
    let mut conn = SseDialer::new(&base).dial(me).await.unwrap();
    app.replies.lock().unwrap().push_back((
        StatusCode::INTERNAL_SERVER_ERROR,
        error_body("disk", "INTERNAL"),
    ));
    let failed = conn
        .sink
        .send(TransportMessage::sync(me, Cursor::new()))
        .await;
    assert!(
        matches!(failed, Err(TransportError::Http { status: 500, .. })),
        "{failed:?}"
    );
}

#[tokio::test]
async fn a_read_only_token_gets_a_typed_refusal_on_data() {
    let (base, _app) = server(Config {
        token: Some("tok"),
        ..Config::default()
    })
    .await;
    let me = site(7);
    let mut conn = SseDialer::new(&base)
        .with_token("readonly")
        .dial(me)
        .await
        .unwrap();
    conn.sink
        .send(TransportMessage::sync(me, Cursor::new()))
        .await
        .unwrap();
    let refused = conn.sink.send(data_message(me, 1, 1)).await;
    assert!(
        matches!(refused, Err(TransportError::Remote { ref code, .. }) if code == "FORBIDDEN"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_oversized_body_is_reported_as_413() {
    let (base, app) = server(Config::default()).await;
    let me = site(8);
    let mut conn = SseDialer::new(&base).dial(me).await.unwrap();
    conn.sink
        .send(data_message(me, 1, BODY_LIMIT / 2))
        .await
        .unwrap();
    let refused = conn.sink.send(data_message(me, 2, BODY_LIMIT * 2)).await;
    match refused {
        Err(TransportError::Http {
            status, message, ..
        }) => {
            assert_eq!(status, 413);
            assert!(message.contains("payload too large"), "{message}");
        }
        other => panic!("expected 413, got {other:?}"),
    }
    wait_for_posts(&app, 1).await;
}

#[tokio::test]
async fn a_post_without_answer_times_out_and_closes_the_sink() {
    let (base, app) = server(Config::default()).await;
    let me = site(9);
    let mut conn = SseDialer::new(&base)
        .with_post_timeout(Duration::from_millis(300))
        .dial(me)
        .await
        .unwrap();
    *app.stall.lock().unwrap() = Some(Duration::from_secs(30));
    let failed = timeout(WAIT, conn.sink.send(data_message(me, 1, 1)))
        .await
        .unwrap();
    assert!(matches!(failed, Err(TransportError::Io(_))), "{failed:?}");
    let after = conn.sink.send(data_message(me, 2, 1)).await;
    assert!(matches!(after, Err(TransportError::Closed)), "{after:?}");
}
