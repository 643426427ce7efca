//! The HTTP handlers (`stream`, `sync`, `data`, `ws`; `snapshot` in
//! [`crate::snapshot`]), shared by the
//! multi-database server and [`PeerRouter`](crate::PeerRouter).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use crsync_peer::SiteId;
use crsync_peer::proto::ErrorCode;
use crsync_peer::wire::{LOSSLESS, MessageKind, SESSION_HEADER, TransportMessage};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::auth::{Access, Principal};
use crate::conn_log::ConnLog;
use crate::error::ApiError;
use crate::host::{DbHost, SseSession, StreamRequest, admit};
use crate::limits::{ConnKill, Limits};
use crate::tokens::AuthCell;

/// Where the handlers find the database a request addresses.
pub(crate) trait Databases: Clone + Send + Sync + 'static {
    /// The tokens (replaced at a reload).
    fn auth(&self) -> &AuthCell;
    /// Connection caps and rate limits.
    fn limits(&self) -> &Limits;
    /// The body limit, for the 413 message.
    fn max_body_bytes(&self) -> usize;
    /// The database name when the path does not carry one.
    fn fixed_name(&self) -> Option<&str>;
    /// The database `name`, opened if needed, or created when `create`
    /// (the caller's token may create it); whether this call created it.
    fn host(
        &self,
        name: &str,
        create: bool,
    ) -> impl Future<Output = Result<Opened, ApiError>> + Send;
}

/// A database a request reached.
pub(crate) struct Opened {
    pub(crate) host: Arc<DbHost>,
    /// This request created it (the client is told: [`CREATED_HEADER`]).
    pub(crate) created: bool,
}

/// Response header on the stream and the WebSocket upgrade: `1` when the
/// request created the database.
pub const CREATED_HEADER: &str = "x-crsync-created";

/// Counter naming WebSocket connections in logs.
static NEXT_WS: AtomicU64 = AtomicU64::new(0);

/// An authorized request for one database.
pub(crate) struct Target<S> {
    state: S,
    name: String,
    access: Access,
    principal: Principal,
    /// The token's name, for logs.
    token_name: Arc<str>,
    /// The token may create the database.
    create: bool,
    /// The client's address, when known.
    client: Option<SocketAddr>,
    /// Cuts the request's TCP connection (a stalled stream).
    kill: ConnKill,
}

impl<S: Databases> Target<S> {
    /// The database (never created here), after counting the request
    /// against its rate.
    pub(crate) async fn host(&self) -> Result<Arc<DbHost>, ApiError> {
        Ok(self.open(false).await?.host)
    }

    /// As [`host`](Self::host), creating the database when `create` and
    /// the token may (only a stream or a WebSocket creates one), and saying
    /// whether this request created it.
    async fn open(&self, create: bool) -> Result<Opened, ApiError> {
        let opened = self
            .state
            .host(&self.name, create && self.create)
            .await
            .map_err(|e| {
                if self.create && matches!(e.code(), ErrorCode::UnknownDatabase) {
                    ApiError::unknown_database_yet(&self.name)
                } else {
                    e
                }
            })?;
        if opened.host.is_closing() {
            return Err(ApiError::shutting_down());
        }
        opened.host.check_rate()?;
        Ok(opened)
    }

    /// Logs the connection's open now and its close when dropped.
    fn conn_log(&self, transport: &'static str) -> ConnLog {
        ConnLog::open(
            self.client,
            &self.name,
            transport,
            Arc::clone(&self.token_name),
        )
    }

    /// Resolves when a token reload takes this request's access away.
    fn revoked(&self) -> impl Future<Output = ()> + Send + 'static {
        self.state
            .auth()
            .revoked(self.principal, &self.name, self.access)
    }
}

/// Marks a response to a request that created its database.
fn mark_created(response: &mut Response, created: bool) {
    if created {
        response
            .headers_mut()
            .insert(CREATED_HEADER, HeaderValue::from_static("1"));
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The bearer token: the `Authorization` header, else the `token` query
/// parameter (browsers' EventSource cannot set headers).
pub(crate) fn bearer(parts: &Parts) -> Result<Option<String>, ApiError> {
    if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("invalid Authorization header"))?;
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::unauthorized(
                "expected Authorization: Bearer <token>",
            ));
        }
        return Ok(Some(token.trim().to_string()));
    }
    let query = Query::<TokenQuery>::try_from_uri(&parts.uri)
        .map_err(|e| ApiError::malformed(format!("query string: {e}")))?;
    Ok(query.0.token)
}

impl<S: Databases> FromRequestParts<S> for Target<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let name = match state.fixed_name() {
            Some(name) => name.to_string(),
            None => {
                let Path(params) =
                    Path::<std::collections::HashMap<String, String>>::from_request_parts(
                        parts, state,
                    )
                    .await
                    .map_err(|e| ApiError::malformed(e.body_text()))?;
                params
                    .get("name")
                    .cloned()
                    .ok_or_else(|| ApiError::internal("route lacks a database name"))?
            }
        };
        let token = bearer(parts)?;
        let caller = state.auth().current().authorize(token.as_deref(), &name)?;
        state.limits().check_rate(caller.principal)?;
        let kill = ConnKill::of(parts);
        let client = kill.peer_addr().or_else(|| {
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|info| info.0)
        });
        Ok(Target {
            state: state.clone(),
            name,
            access: caller.access,
            principal: caller.principal,
            token_name: caller.name,
            create: caller.create,
            client,
            kill,
        })
    }
}

/// The stream/sync/data/ws routes, relative to a database's base URL.
pub(crate) fn database_routes<S: Databases>(max_body_bytes: usize) -> Router<S> {
    Router::new()
        .route("/stream", get(stream::<S>))
        .route("/sync", post(post_sync::<S>))
        .route("/data", post(post_data::<S>))
        .route("/ws", get(websocket::<S>))
        .route("/snapshot", get(crate::snapshot::download::<S>))
        .route("/snapshot/info", get(crate::snapshot::info::<S>))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// JSON 404 for unknown routes.
pub(crate) async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        format!("no route for {}", uri.path()),
    )
}

/// JSON 405 for a known route called with the wrong method.
pub(crate) async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[derive(Deserialize)]
struct StreamQuery {
    #[serde(rename = "peerId")]
    peer_id: Option<String>,
    crsync: Option<String>,
}

/// The session secret a request presents ([`SESSION_HEADER`]); a value that
/// is not text presents a secret nothing matches.
fn presented_secret(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(SESSION_HEADER)
        .map(|v| v.to_str().unwrap_or_default())
}

/// The initial read buffer of each WebSocket.
const WS_READ_BUFFER_BYTES: usize = 8 << 10;
/// Bytes of an SSE stream given to hyper and not yet taken by the socket, at most
/// (plus one message).
const SSE_UNWRITTEN_BYTES: u64 = 32 << 10;

async fn stream<S: Databases>(
    target: Target<S>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = Query::<StreamQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::malformed(format!("query string: {e}")))?;
    let peer_id = query
        .peer_id
        .ok_or_else(|| ApiError::malformed("missing query parameter peerId"))?;
    let client: SiteId = peer_id
        .parse()
        .map_err(|e| ApiError::malformed(format!("peerId: {e}")))?;
    let lossless = query
        .crsync
        .as_ref()
        .is_some_and(|c| c.split(',').any(|e| e.trim() == LOSSLESS));
    let Opened { host, created } = target.open(true).await?;
    // Refused before any stream starts.
    let permit = host.limits().connect(target.principal)?;
    let span = tracing::info_span!("sse", db = host.name(), peer = %client);
    let log = target.conn_log("sse");
    let revoked = target.revoked();
    let request = StreamRequest {
        principal: target.principal,
        client,
        crsync: query.crsync.is_some(),
        lossless,
        presented: presented_secret(&headers),
        from: target.kill.remote_addr(),
    };
    let mut response = match host.open_sse(request, target.kill.progress(), &span, &log) {
        Ok(SseSession { outbound, guard }) => {
            let stall = outbound.stall();
            let kill = target.kill.clone();
            let watchdog = AbortOnDropHandle::new(tokio::spawn(
                async move {
                    stall.stalled().await;
                    tracing::warn!(
                        timeout = ?stall.timeout(),
                        "dropping a stalled stream: its client read nothing in time"
                    );
                    if !kill.kill() {
                        tracing::debug!(
                            "no handle on the connection: it ends when the client leaves"
                        );
                    }
                }
                .instrument(span.clone()),
            ));
            // hyper takes body chunks into its write buffer (up to about
            // 400 KiB) while the socket is full: take the next message from
            // our byte-bounded queue only once the socket has taken all but
            // SSE_UNWRITTEN_BYTES of what went before, so what waits for a
            // client that does not read waits in our queue, where the stall
            // watchdog sees it.
            let progress = target.kill.progress();
            let base = progress.as_ref().map_or(0, |p| p.written());
            let queued = outbound.into_stream();
            let bytes_out = crate::telemetry::bytes_out_counter(host.name(), "sse");
            let events = futures_util::stream::unfold(
                (queued, progress, base),
                |(mut queued, progress, given)| async move {
                    if let Some(p) = &progress {
                        p.written_at_least(given.saturating_sub(SSE_UNWRITTEN_BYTES))
                            .await;
                    }
                    let message = queued.next().await?;
                    let given = given + message.len() as u64;
                    Some((message, (queued, progress, given)))
                },
            )
            .map(move |queued| {
                // The guard unregisters the stream when the body is
                // dropped; the permit frees the connection slot; the
                // watchdog is aborted; the log says the stream closed.
                let _ = (&guard, &permit, &watchdog, &log);
                bytes_out.increment(queued.len() as u64);
                futures_util::stream::iter(
                    queued.into_sse_event().into_iter().map(Ok::<_, Infallible>),
                )
            })
            .flatten()
            .take_until(host.closed())
            .take_until(revoked);
            // Each message goes out as it is queued, the changes sessions
            // share included: axum's `Event` would copy it again, growing
            // its buffer as it goes, and search it for line breaks (there
            // are none, see `MessageText`).
            (
                [
                    (header::CONTENT_TYPE, "text/event-stream"),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                axum::body::Body::from_stream(events),
            )
                .into_response()
        }
        Err(_) => {
            let _entered = span.enter();
            tracing::info!("refused a second stream for the same peer");
            let refusal = host.already_connected(client);
            let events = futures_util::stream::once(async move {
                Ok::<_, Infallible>(Event::default().data(refusal.to_json()))
            });
            Sse::new(events).into_response()
        }
    };
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    mark_created(&mut response, created);
    Ok(response)
}

async fn post_sync<S: Databases>(
    target: Target<S>,
    State(state): State<S>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    post_message(target, &state, &headers, body, MessageKind::Sync).await
}

async fn post_data<S: Databases>(
    target: Target<S>,
    State(state): State<S>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    post_message(target, &state, &headers, body, MessageKind::Data).await
}

async fn post_message<S: Databases>(
    target: Target<S>,
    state: &S,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    expected: MessageKind,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::payload_too_large(state.max_body_bytes())
        } else {
            ApiError::malformed(r.body_text())
        }
    })?;
    crate::telemetry::bytes_in_counter(&target.name, "sse").increment(body.len() as u64);
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::malformed(format!("body is not UTF-8: {e}")))?;
    let mut message =
        TransportMessage::from_json(text).map_err(|e| ApiError::malformed(e.to_string()))?;
    if message.kind != expected {
        return Err(ApiError::malformed(format!(
            "expected a message of type {expected:?}, got {:?}",
            message.kind
        )));
    }
    if !admit(&mut message, target.access) {
        return Err(ApiError::forbidden(
            "this token is read-only: data messages are refused",
        ));
    }
    let host = target.host().await?;
    let peer_id = message.peer_id.clone();
    host.deliver(
        target.principal,
        presented_secret(headers),
        &peer_id,
        message,
    )
    .await?;
    Ok(Json(serde_json::json!({"success": true})))
}

async fn websocket<S: Databases>(
    target: Target<S>,
    State(state): State<S>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade =
        upgrade.map_err(|r| ApiError::new(r.status(), ErrorCode::Malformed, r.body_text()))?;
    let Opened { host, created } = target.open(true).await?;
    // Refused before the upgrade.
    let permit = host.limits().connect(target.principal)?;
    let conn = crate::ws::WsConn {
        access: target.access,
        key: target.principal,
        kill: target.kill.clone(),
        id: NEXT_WS.fetch_add(1, Ordering::Relaxed),
        permit,
        revoked: Box::pin(target.revoked()),
        log: target.conn_log("ws"),
    };
    let mut response = upgrade
        .max_message_size(state.max_body_bytes())
        // Frames go to the socket as they come: what waits is counted in our
        // byte-bounded queue, not in tungstenite's buffer.
        .write_buffer_size(0)
        // tungstenite reserves its read buffer up front (128 KiB by default);
        // a frame larger than this still arrives whole, the buffer grows.
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .on_upgrade(move |socket| crate::ws::run(socket, host, conn));
    mark_created(&mut response, created);
    Ok(response)
}
