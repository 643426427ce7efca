//! A v1 client over HTTP + SSE, as the TypeScript `@app/sync` client behaves.
//!
//! - `GET {base}/stream?peerId=<hex>` (no `crsync` parameter, no token), read as SSE.
//! - On the server's `connect`: `POST {base}/sync` with our cursor, once.
//! - On the server's `sync` (every time one arrives): everything its cursor lacks, one
//!   `POST {base}/data` per page, then an `eose` page with `data: []`; the first `sync` of
//!   a connection also starts the live poller (own changes with `db_version` above what was
//!   sent, every `poll_interval`, paged the same way).
//! - Every received `data` message is merged in one transaction (unless its
//!   `schemaVersion` is newer than ours).
//! - POSTs are fire-and-forget and concurrent: each is spawned, none waits for the one
//!   before, and the response is only recorded. A test can delay or drop chosen POSTs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use tokio::task::JoinSet;

use super::wire::{V1Change, V1Kind, V1Message, V1PeerMessage};
use super::{AbortOnDrop, Scan, V1Config, V1Db, blocking, for_each_page};

/// What happens to one POST (decided by the test's fault plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostFate {
    /// Sent at once.
    Send,
    /// Sent after this delay (later POSTs overtake it).
    Delay(Duration),
    /// Never sent (a lost request).
    Drop,
}

/// What the fault plan sees of a POST about to be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostInfo {
    /// Position among all POSTs of this client, from 0.
    pub index: usize,
    /// Connection number, from 1.
    pub round: usize,
    /// Position among this round's `data` POSTs, from 0 (`None` for `sync`).
    pub data_index: Option<usize>,
    /// `"sync"`, `"changes"` or `"eose"`.
    pub kind: &'static str,
    /// Changes carried.
    pub changes: usize,
}

/// One POST the client made (or dropped) and, once it came, its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostRecord {
    pub info: PostInfo,
    pub fate: PostFate,
    /// HTTP status, once answered (`None` while in flight, dropped, or on a network error).
    pub status: Option<u16>,
    /// Response body, or the network error.
    pub body: Option<String>,
}

/// What the client saw and did.
#[derive(Debug, Clone, Default)]
pub struct ClientLog {
    pub posts: Vec<PostRecord>,
    /// The server's peerId (from `connect`).
    pub server: Option<String>,
    /// The cursor in the last `sync` the server sent: what it claims to hold.
    pub server_cursor: Option<super::wire::V1Cursor>,
    pub syncs_received: usize,
    pub data_received: usize,
    pub changes_received: usize,
    pub eose_received: usize,
    /// Values that arrived as crsync `$`-tagged objects (a v1 peer never asks for them).
    pub tagged_values: usize,
    pub merge_errors: Vec<String>,
    pub errors_received: Vec<String>,
    pub undecodable: Vec<String>,
}

impl ClientLog {
    /// POSTs actually sent (not dropped).
    pub fn posts_sent(&self) -> usize {
        self.posts
            .iter()
            .filter(|p| p.fate != PostFate::Drop)
            .count()
    }

    /// A one-paragraph account for failure messages: POST counts by status, the last
    /// refusals, and what was received.
    pub fn summary(&self) -> String {
        let mut by_status = std::collections::BTreeMap::<String, usize>::new();
        for p in &self.posts {
            let key = match (p.fate, p.status) {
                (PostFate::Drop, _) => "dropped".to_owned(),
                (_, Some(s)) => s.to_string(),
                (_, None) => "pending".to_owned(),
            };
            *by_status.entry(key).or_default() += 1;
        }
        let refusals: Vec<String> = self
            .posts
            .iter()
            .filter(|p| {
                p.status.is_some_and(|s| s >= 300) || (p.status.is_none() && p.body.is_some())
            })
            .rev()
            .take(3)
            .map(|p| {
                format!(
                    "#{} {} -> {:?} {}",
                    p.info.index,
                    p.info.kind,
                    p.status,
                    p.body.as_deref().unwrap_or("")
                )
            })
            .collect();
        format!(
            "{} POSTs ({} sent; by status {:?}); last refusals: {:?}; received {} syncs, {} data \
             messages ({} changes, {} eose), {} tagged values; merge errors: {:?}; errors: {:?}",
            self.posts.len(),
            self.posts_sent(),
            by_status,
            refusals,
            self.syncs_received,
            self.data_received,
            self.changes_received,
            self.eose_received,
            self.tagged_values,
            self.merge_errors,
            self.errors_received,
        )
    }
}

type FaultPlan = dyn Fn(&PostInfo) -> PostFate + Send + Sync;

struct Shared {
    db: Arc<V1Db>,
    base: String,
    http: reqwest::Client,
    config: V1Config,
    faults: Mutex<Arc<FaultPlan>>,
    log: Mutex<ClientLog>,
    posts: Mutex<JoinSet<()>>,
    round: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A v1 client; see the [module docs](self).
pub struct V1Client {
    shared: Arc<Shared>,
    connection: Option<AbortOnDrop>,
}

impl V1Client {
    /// A client of the server at `base` (not connected yet).
    pub fn new(db: Arc<V1Db>, base: impl Into<String>, config: V1Config) -> Self {
        let mut base = base.into();
        while base.ends_with('/') {
            base.pop();
        }
        V1Client {
            shared: Arc::new(Shared {
                db,
                base,
                http: reqwest::Client::new(),
                config,
                faults: Mutex::new(Arc::new(|_: &PostInfo| PostFate::Send)),
                log: Mutex::new(ClientLog::default()),
                posts: Mutex::new(JoinSet::new()),
                round: AtomicUsize::new(0),
            }),
            connection: None,
        }
    }

    /// The client's database.
    pub fn db(&self) -> &Arc<V1Db> {
        &self.shared.db
    }

    /// Decides the fate of every later POST.
    pub fn set_faults(&self, plan: impl Fn(&PostInfo) -> PostFate + Send + Sync + 'static) {
        *lock(&self.shared.faults) = Arc::new(plan);
    }

    /// Sends every later POST at once.
    pub fn clear_faults(&self) {
        self.set_faults(|_| PostFate::Send);
    }

    /// A snapshot of what the client saw and did.
    pub fn log(&self) -> ClientLog {
        lock(&self.shared.log).clone()
    }

    /// Opens the stream (a new round); returns once its first message arrived. A stream
    /// whose first message is an `error` (the server still holds our previous stream:
    /// it notices a closed one asynchronously) is retried every 100 ms, as an EventSource
    /// reconnects, within [`super::LIMIT`].
    pub async fn connect(&mut self) -> Result<()> {
        self.disconnect();
        let round = self.shared.round.fetch_add(1, Ordering::Relaxed) + 1;
        let url = format!(
            "{}/stream?peerId={}",
            self.shared.base,
            self.shared.db.site_id()
        );
        let deadline = tokio::time::Instant::now() + super::LIMIT;
        let (frames, first) = loop {
            let response = self
                .shared
                .http
                .get(&url)
                .header("accept", "text/event-stream")
                .send()
                .await
                .with_context(|| format!("GET {url}"))?;
            if !response.status().is_success() {
                let status = response.status();
                bail!("GET {url}: HTTP {status}: {}", response.text().await?);
            }
            let mut frames = SseFrames::new(response);
            let first = frames
                .next()
                .await
                .with_context(|| format!("{url}: the stream ended before its first message"))??;
            // An `error` first (`"error":"ALREADY_CONNECTED"`, from crsync and v1
            // servers alike): the old stream is not closed yet, so try again.
            let refused = matches!(V1Message::parse(&first), Ok((V1Message::Error { .. }, _)));
            if !refused {
                break (frames, first);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{url}: still refused after {:?}: {first}", super::LIMIT);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let shared = self.shared.clone();
        self.connection = Some(AbortOnDrop(tokio::spawn(run_connection(
            shared, frames, first, round,
        ))));
        Ok(())
    }

    /// Closes the stream (the live poller stops; POSTs in flight go on).
    pub fn disconnect(&mut self) {
        self.connection = None;
    }

    /// Waits until no POST was made or answered for `quiet`, within `limit`; fails if the
    /// client keeps POSTing (a resend loop).
    pub async fn wait_quiet(&self, quiet: Duration, limit: Duration) -> Result<()> {
        super::wait_quiet(
            "the v1 client",
            || {
                let log = lock(&self.shared.log);
                let answered = log.posts.iter().filter(|p| p.body.is_some()).count();
                log.posts.len() + answered
            },
            || self.log().summary(),
            quiet,
            limit,
        )
        .await
    }
}

/// One connection: reads the stream and reacts, until it ends or is aborted.
async fn run_connection(shared: Arc<Shared>, mut frames: SseFrames, first: String, round: usize) {
    let round = Round {
        shared: shared.clone(),
        number: round,
        data_posts: Arc::new(AtomicUsize::new(0)),
        sent_upto: Arc::new(Mutex::new(0)),
    };
    let mut poller: Option<AbortOnDrop> = None;
    let mut first = Some(Ok(first));
    loop {
        let Some(frame) = (match first.take() {
            Some(first) => Some(first),
            None => frames.next().await,
        }) else {
            break;
        };
        let text = match frame {
            Ok(text) => text,
            Err(e) => {
                lock(&shared.log)
                    .errors_received
                    .push(format!("stream: {e}"));
                return;
            }
        };
        let (message, extras) = match V1Message::parse(&text) {
            Ok(parsed) => parsed,
            Err(e) => {
                lock(&shared.log).undecodable.push(format!("{e}: {text}"));
                continue;
            }
        };
        lock(&shared.log).tagged_values += extras.tagged_values;
        match message {
            V1Message::Connect { peer } => {
                lock(&shared.log).server = Some(peer);
                let db = shared.db.clone();
                match blocking(move || db.cursor()).await {
                    Ok(cursor) => {
                        let sync = V1Message::Sync {
                            peer: shared.db.site_id().to_owned(),
                            cursor,
                        };
                        round.post("sync", "sync", None, 0, sync.to_json());
                    }
                    Err(e) => lock(&shared.log)
                        .errors_received
                        .push(format!("cursor: {e}")),
                }
            }
            V1Message::Sync { cursor, .. } => {
                {
                    let mut log = lock(&shared.log);
                    log.syncs_received += 1;
                    log.server_cursor = Some(cursor.clone());
                }
                if let Err(e) = round.send_lacking(cursor).await {
                    lock(&shared.log).errors_received.push(format!("send: {e}"));
                }
                if poller.is_none() {
                    poller = Some(AbortOnDrop(tokio::spawn(round.clone().poll_live())));
                }
            }
            V1Message::Data { data, .. } => {
                {
                    let mut log = lock(&shared.log);
                    log.data_received += 1;
                    log.changes_received += data.changes.len();
                    log.eose_received += usize::from(data.kind == V1Kind::Eose);
                }
                let db = shared.db.clone();
                let result = blocking(move || {
                    let ours = db.schema_version()?;
                    if data.schema_version.is_some_and(|theirs| theirs > ours) {
                        anyhow::bail!("outdated: schemaVersion {:?} > {ours}", data.schema_version);
                    }
                    db.merge(&data.changes)
                })
                .await;
                if let Err(e) = result {
                    lock(&shared.log).merge_errors.push(e.to_string());
                }
            }
            V1Message::Ping { .. } => {}
            V1Message::Error { error, .. } => lock(&shared.log).errors_received.push(error),
        }
    }
    lock(&shared.log)
        .errors_received
        .push(format!("round {} stream ended", round.number));
}

/// Per-connection state shared by the reader and the live poller.
#[derive(Clone)]
struct Round {
    shared: Arc<Shared>,
    number: usize,
    data_posts: Arc<AtomicUsize>,
    /// Highest own `db_version` sent (live polling sends what is above it).
    sent_upto: Arc<Mutex<i64>>,
}

impl Round {
    /// Everything `cursor` lacks, page by page, then `eose`.
    async fn send_lacking(&self, cursor: super::wire::V1Cursor) -> Result<()> {
        let db = self.shared.db.clone();
        let (own, schema) =
            blocking(move || Ok((db.own_max_version()?, db.schema_version()?))).await?;
        {
            let mut sent = lock(&self.sent_upto);
            *sent = (*sent).max(own);
        }
        let page_size = self.shared.config.page_size;
        for_each_page(&self.shared.db, Scan::Lacking(cursor), page_size, |page| {
            self.post_data(V1Kind::Changes, page, schema)
        })
        .await?;
        self.post_data(V1Kind::Eose, Vec::new(), schema);
        Ok(())
    }

    /// Every `poll_interval`: own changes above what was sent.
    async fn poll_live(self) {
        let mut tick = tokio::time::interval(self.shared.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.poll_once().await {
                lock(&self.shared.log)
                    .errors_received
                    .push(format!("poll: {e}"));
            }
        }
    }

    async fn poll_once(&self) -> Result<()> {
        let after = *lock(&self.sent_upto);
        let db = self.shared.db.clone();
        let schema = blocking(move || db.schema_version()).await?;
        let mut top = after;
        let scan = Scan::After {
            after,
            own_only: true,
        };
        for_each_page(
            &self.shared.db,
            scan,
            self.shared.config.page_size,
            |page| {
                top = page.iter().map(|c| c.db_version).fold(top, i64::max);
                self.post_data(V1Kind::Changes, page, schema);
            },
        )
        .await?;
        let mut sent = lock(&self.sent_upto);
        *sent = (*sent).max(top);
        Ok(())
    }

    fn post_data(&self, kind: V1Kind, changes: Vec<V1Change>, schema_version: i64) {
        let count = changes.len();
        let message = V1Message::Data {
            peer: self.shared.db.site_id().to_owned(),
            data: V1PeerMessage {
                kind,
                changes,
                schema_version: Some(schema_version),
            },
        };
        let data_index = self.data_posts.fetch_add(1, Ordering::Relaxed);
        self.post(
            "data",
            kind.as_str(),
            Some(data_index),
            count,
            message.to_json(),
        );
    }

    /// Fire and forget: spawned, never awaited; the answer is only recorded.
    fn post(
        &self,
        route: &'static str,
        kind: &'static str,
        data_index: Option<usize>,
        changes: usize,
        body: String,
    ) {
        let shared = &self.shared;
        let plan = lock(&shared.faults).clone();
        let (slot, fate) = {
            let mut log = lock(&shared.log);
            let info = PostInfo {
                index: log.posts.len(),
                round: self.number,
                data_index,
                kind,
                changes,
            };
            let fate = plan(&info);
            log.posts.push(PostRecord {
                info,
                fate,
                status: None,
                body: None,
            });
            (log.posts.len() - 1, fate)
        };
        if fate == PostFate::Drop {
            return;
        }
        let shared2 = shared.clone();
        let url = format!("{}/{route}", shared.base);
        let mut posts = lock(&shared.posts);
        while posts.try_join_next().is_some() {}
        posts.spawn(async move {
            if let PostFate::Delay(d) = fate {
                tokio::time::sleep(d).await;
            }
            let result = shared2
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let (status, text) = match result {
                Ok(response) => {
                    let status = response.status().as_u16();
                    (Some(status), response.text().await.unwrap_or_default())
                }
                Err(e) => (None, format!("network error: {e}")),
            };
            let mut log = lock(&shared2.log);
            log.posts[slot].status = status;
            log.posts[slot].body = Some(text);
        });
    }
}

/// What a v1 server claims to hold: the cursor in the `sync` it sends a newcomer (a
/// throwaway peerId that never posts anything).
pub async fn probe_cursor(base: &str) -> Result<super::wire::V1Cursor> {
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let peer = format!(
        "{:032x}",
        nanos ^ ((PROBES.fetch_add(1, Ordering::Relaxed) as u128) << 100)
    );
    let url = format!("{}/stream?peerId={peer}", base.trim_end_matches('/'));
    let response = reqwest::get(&url)
        .await
        .with_context(|| format!("GET {url}"))?;
    if !response.status().is_success() {
        bail!("GET {url}: HTTP {}", response.status());
    }
    let mut frames = SseFrames::new(response);
    let read = async {
        while let Some(frame) = frames.next().await {
            if let (V1Message::Sync { cursor, .. }, _) = V1Message::parse(&frame?)? {
                return Ok(cursor);
            }
        }
        bail!("{url}: the stream ended before a sync")
    };
    tokio::time::timeout(super::LIMIT, read)
        .await
        .with_context(|| format!("{url}: no sync within {:?}", super::LIMIT))?
}

type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// The `data` of each SSE event, as an EventSource delivers it (`\n` line ends, as axum
/// writes them).
struct SseFrames {
    body: ByteStream,
    buf: Vec<u8>,
}

impl SseFrames {
    fn new(response: reqwest::Response) -> Self {
        SseFrames {
            body: Box::pin(response.bytes_stream()),
            buf: Vec::new(),
        }
    }

    async fn next(&mut self) -> Option<Result<String>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
                let frame = match String::from_utf8(frame) {
                    Ok(frame) => frame,
                    Err(e) => return Some(Err(e.into())),
                };
                let data: Vec<&str> = frame
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|l| l.strip_prefix(' ').unwrap_or(l))
                    .collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                return Some(Ok(data.join("\n")));
            }
            match self.body.next().await? {
                Ok(chunk) => self.buf.extend_from_slice(&chunk),
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}
