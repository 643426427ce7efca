//! A v1 server (a small axum app), as the TypeScript `@app/sync` server behaves.
//!
//! - `GET /stream?peerId=<hex>`: SSE; `connect` with the server's peerId, then `sync` with
//!   its cursor. Other query parameters (crsync's `crsync=lossless`, `token`) and the
//!   `Authorization` header are ignored. No peerId: 400. A second stream for the same
//!   peerId: one `error` frame `ALREADY_CONNECTED`.
//! - `POST /sync`: everything the client's cursor lacks, one `data` message per page, then
//!   `eose`, pushed on the client's stream; the client then gets live changes.
//! - `POST /data`: merged in one transaction; `200 {"success":true}`, or
//!   `400 {"type":"error","error":"..."}` (no `code`). No stream open for the peer: 400.
//! - Live changes: every `poll_interval`, all rows of `crsql_changes` with a `db_version`
//!   above the last poll (own writes and rows merged from clients alike), paged, pushed to
//!   every client that has sent `sync`.
//! - A `ping` to every stream each `ping_interval`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Result;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::wire::{V1Change, V1Kind, V1Message, V1PeerMessage};
use super::{AbortOnDrop, Scan, V1Config, V1Db, blocking, for_each_page};

/// What the server saw and did.
#[derive(Debug, Clone, Default)]
pub struct ServerLog {
    /// Every POST: route, status, response body.
    pub posts: Vec<(String, u16, String)>,
    pub streams_opened: usize,
    pub changes_merged: usize,
    /// Values that arrived as crsync `$`-tagged objects (a v1 peer never asks for them).
    pub tagged_values: usize,
    pub merge_errors: Vec<String>,
}

impl ServerLog {
    /// A one-line account for failure messages.
    pub fn summary(&self) -> String {
        let refused: Vec<&(String, u16, String)> = self
            .posts
            .iter()
            .filter(|p| p.1 != 200)
            .rev()
            .take(3)
            .collect();
        format!(
            "{} POSTs received ({} refused, last: {:?}), {} streams, {} changes merged, \
             {} tagged values, merge errors: {:?}",
            self.posts.len(),
            self.posts.iter().filter(|p| p.1 != 200).count(),
            refused,
            self.streams_opened,
            self.changes_merged,
            self.tagged_values,
            self.merge_errors,
        )
    }
}

struct Slot {
    id: u64,
    tx: mpsc::UnboundedSender<String>,
    /// Sent `sync`: gets live changes.
    synced: bool,
}

struct Shared {
    db: Arc<V1Db>,
    config: V1Config,
    clients: Mutex<HashMap<String, Slot>>,
    next_id: AtomicU64,
    log: Mutex<ServerLog>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn message(&self, kind: V1Kind, changes: Vec<V1Change>, schema_version: i64) -> String {
        V1Message::Data {
            peer: self.db.site_id().to_owned(),
            data: V1PeerMessage {
                kind,
                changes,
                schema_version: Some(schema_version),
            },
        }
        .to_json()
    }

    /// Pushes `text` to one client; false if it is gone.
    fn push(&self, peer: &str, text: String) -> bool {
        lock(&self.clients)
            .get(peer)
            .is_some_and(|slot| slot.tx.send(text).is_ok())
    }
}

/// A running v1 server on 127.0.0.1; see the [module docs](self).
pub struct V1Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _tasks: Vec<AbortOnDrop>,
}

impl V1Server {
    /// Starts serving `db` on a free port.
    pub async fn start(db: Arc<V1Db>, config: V1Config) -> Result<Self> {
        let live_from = {
            let db = db.clone();
            blocking(move || db.max_version()).await?
        };
        let shared = Arc::new(Shared {
            db,
            config,
            clients: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            log: Mutex::new(ServerLog::default()),
        });
        let app = Router::new()
            .route("/stream", get(stream))
            .route("/sync", post(post_sync))
            .route("/data", post(post_data))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let serve = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let poller = tokio::spawn(poll_live(shared.clone(), live_from));
        let pinger = tokio::spawn(ping(shared.clone()));
        Ok(V1Server {
            addr,
            shared,
            _tasks: vec![AbortOnDrop(serve), AbortOnDrop(poller), AbortOnDrop(pinger)],
        })
    }

    /// The base URL (`http://127.0.0.1:<port>`).
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's database.
    pub fn db(&self) -> &Arc<V1Db> {
        &self.shared.db
    }

    /// A snapshot of what the server saw and did.
    pub fn log(&self) -> ServerLog {
        lock(&self.shared.log).clone()
    }

    /// Waits until no POST arrived for `quiet`, within `limit`; fails if its client keeps
    /// POSTing (a resend loop).
    pub async fn wait_quiet(
        &self,
        quiet: std::time::Duration,
        limit: std::time::Duration,
    ) -> Result<()> {
        super::wait_quiet(
            "the v1 server's clients",
            || lock(&self.shared.log).posts.len(),
            || self.log().summary(),
            quiet,
            limit,
        )
        .await
    }
}

fn error_response(status: StatusCode, error: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"type": "error", "error": error.into()})),
    )
        .into_response()
}

/// Unregisters a stream when its body is dropped.
struct SlotGuard {
    shared: Arc<Shared>,
    peer: String,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut clients = lock(&self.shared.clients);
        if clients.get(&self.peer).is_some_and(|s| s.id == self.id) {
            clients.remove(&self.peer);
        }
    }
}

async fn stream(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(peer) = query.get("peerId").filter(|p| !p.is_empty()).cloned() else {
        return error_response(StatusCode::BAD_REQUEST, "peerId is required");
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut clients = lock(&shared.clients);
        if clients.contains_key(&peer) {
            let refusal = V1Message::Error {
                peer: shared.db.site_id().to_owned(),
                error: "ALREADY_CONNECTED".into(),
            }
            .to_json();
            let once = futures_util::stream::once(async move {
                Ok::<_, Infallible>(Event::default().data(refusal))
            });
            return Sse::new(once).into_response();
        }
        clients.insert(
            peer.clone(),
            Slot {
                id,
                tx: tx.clone(),
                synced: false,
            },
        );
    }
    lock(&shared.log).streams_opened += 1;
    let server = shared.db.site_id().to_owned();
    let _ = tx.send(
        V1Message::Connect {
            peer: server.clone(),
        }
        .to_json(),
    );
    let db = shared.db.clone();
    match blocking(move || db.cursor()).await {
        Ok(cursor) => {
            let _ = tx.send(
                V1Message::Sync {
                    peer: server,
                    cursor,
                }
                .to_json(),
            );
        }
        Err(e) => lock(&shared.log).merge_errors.push(format!("cursor: {e}")),
    }
    let guard = SlotGuard {
        shared: shared.clone(),
        peer,
        id,
    };
    let events = UnboundedReceiverStream::new(rx).map(move |text| {
        let _ = &guard;
        Ok::<_, Infallible>(Event::default().data(text))
    });
    Sse::new(events).into_response()
}

/// Records a POST's outcome and turns it into the response.
fn answer(shared: &Shared, route: &str, result: Result<(), (StatusCode, String)>) -> Response {
    let (status, body) = match result {
        Ok(()) => (StatusCode::OK, json!({"success": true})),
        Err((status, error)) => (status, json!({"type": "error", "error": error})),
    };
    lock(&shared.log)
        .posts
        .push((route.to_owned(), status.as_u16(), body.to_string()));
    (status, axum::Json(body)).into_response()
}

fn bad(e: impl std::fmt::Display) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, e.to_string())
}

async fn post_sync(State(shared): State<Arc<Shared>>, body: String) -> Response {
    let result = handle_sync(&shared, &body).await;
    answer(&shared, "sync", result)
}

async fn handle_sync(shared: &Arc<Shared>, body: &str) -> Result<(), (StatusCode, String)> {
    let (message, _) = V1Message::parse(body).map_err(bad)?;
    let V1Message::Sync { peer, cursor } = message else {
        return Err(bad("expected a sync message"));
    };
    // Live first, so nothing committed while the history is read is missed.
    match lock(&shared.clients).get_mut(&peer) {
        Some(slot) => slot.synced = true,
        None => return Err(bad("Peer not connected")),
    }
    let internal = |e: anyhow::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let db = shared.db.clone();
    let schema = blocking(move || db.schema_version())
        .await
        .map_err(internal)?;
    for_each_page(
        &shared.db,
        Scan::Lacking(cursor),
        shared.config.page_size,
        |page| {
            shared.push(&peer, shared.message(V1Kind::Changes, page, schema));
        },
    )
    .await
    .map_err(internal)?;
    shared.push(&peer, shared.message(V1Kind::Eose, Vec::new(), schema));
    Ok(())
}

async fn post_data(State(shared): State<Arc<Shared>>, body: String) -> Response {
    let result = handle_data(&shared, &body).await;
    answer(&shared, "data", result)
}

async fn handle_data(shared: &Arc<Shared>, body: &str) -> Result<(), (StatusCode, String)> {
    let (message, extras) = V1Message::parse(body).map_err(bad)?;
    lock(&shared.log).tagged_values += extras.tagged_values;
    let V1Message::Data { peer, data } = message else {
        return Err(bad("expected a data message"));
    };
    if !lock(&shared.clients).contains_key(&peer) {
        return Err(bad("Peer not connected"));
    }
    let count = data.changes.len();
    let db = shared.db.clone();
    let result = blocking(move || {
        let ours = db.schema_version()?;
        if data.schema_version.is_some_and(|theirs| theirs > ours) {
            anyhow::bail!("outdated: schemaVersion {:?} > {ours}", data.schema_version);
        }
        db.merge(&data.changes)
    })
    .await;
    match result {
        Ok(()) => {
            lock(&shared.log).changes_merged += count;
            Ok(())
        }
        Err(e) => {
            lock(&shared.log).merge_errors.push(e.to_string());
            Err(bad(e))
        }
    }
}

/// Every `poll_interval`: all changes above the last poll, to every synced client.
async fn poll_live(shared: Arc<Shared>, mut after: i64) {
    let mut tick = tokio::time::interval(shared.config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match poll_once(&shared, after).await {
            Ok(top) => after = top,
            Err(e) => lock(&shared.log).merge_errors.push(format!("poll: {e}")),
        }
    }
}

/// One poll; returns the highest `db_version` seen.
async fn poll_once(shared: &Arc<Shared>, after: i64) -> Result<i64> {
    let db = shared.db.clone();
    let schema = blocking(move || db.schema_version()).await?;
    let synced: Vec<String> = lock(&shared.clients)
        .iter()
        .filter(|(_, slot)| slot.synced)
        .map(|(peer, _)| peer.clone())
        .collect();
    let mut top = after;
    let scan = Scan::After {
        after,
        own_only: false,
    };
    for_each_page(&shared.db, scan, shared.config.page_size, |page| {
        top = page.iter().map(|c| c.db_version).fold(top, i64::max);
        let text = shared.message(V1Kind::Changes, page, schema);
        for peer in &synced {
            shared.push(peer, text.clone());
        }
    })
    .await?;
    Ok(top)
}

async fn ping(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.ping_interval);
    tick.tick().await; // the first tick is immediate
    loop {
        tick.tick().await;
        let text = V1Message::Ping {
            peer: shared.db.site_id().to_owned(),
        }
        .to_json();
        for slot in lock(&shared.clients).values() {
            let _ = slot.tx.send(text.clone());
        }
    }
}
