//! The light clients: minimal v1 JSON clients (like the TypeScript
//! `@app/sync` one) over SSE or WebSocket, many on one tokio runtime, each
//! noting when it first sees each row.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{DB_NAME, RssSampler, TOKEN, now_us};

/// Handshakes (SSE `GET` or WebSocket upgrade) in flight at once.
const CONNECTS_IN_FLIGHT: usize = 256;
/// `POST /sync` requests in flight at once (each may hold a pooled connection).
const POSTS_IN_FLIGHT: usize = 64;
/// Idle connections the shared HTTP pool keeps for the `POST`s.
const POOL_IDLE: usize = 256;

/// What one light client has seen, read by the orchestrator.
#[derive(Default)]
pub(crate) struct ClientStats {
    /// When its first `eose` came (µs; 0: not yet).
    pub(crate) eose_at: AtomicU64,
    /// Rows seen (changes of the `qty` column).
    pub(crate) rows: AtomicU64,
    /// `data` messages received.
    pub(crate) messages: AtomicU64,
    /// When the row with the highest id so far first came (µs).
    pub(crate) last_at: AtomicU64,
    /// The highest row id seen (-1: none).
    pub(crate) last_id: AtomicI64,
    /// Streams or sockets that ended and were opened again.
    pub(crate) reconnects: AtomicU32,
    /// `error` messages, failed requests and undecodable frames.
    pub(crate) errors: AtomicU32,
}

impl ClientStats {
    pub(crate) fn new() -> Self {
        let s = ClientStats::default();
        s.last_id.store(-1, Ordering::Relaxed);
        s
    }

    pub(crate) fn last(&self) -> (i64, u64) {
        let id = self.last_id.load(Ordering::Acquire);
        (id, self.last_at.load(Ordering::Relaxed))
    }
}

/// A transport message as a minimal v1 client reads it.
#[derive(Deserialize)]
pub(crate) struct WireMessage<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Option<WireData<'a>>,
}

#[derive(Deserialize)]
pub(crate) struct WireData<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    data: Vec<WireChange<'a>>,
}

/// One change as a light client reads it: every field parsed, only the
/// ones it uses kept, without allocating (`val` is read as a number only for
/// the `qty` column, which comes before it on the wire; otherwise skipped).
pub(crate) struct WireChange<'a> {
    cid: Cow<'a, str>,
    qty: Option<i64>,
    db_version: i64,
    site_id: Cow<'a, str>,
}

impl<'de: 'a, 'a> Deserialize<'de> for WireChange<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = WireChange<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a change")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                use serde::de::{Error, IgnoredAny};
                let (mut cid, mut qty, mut db_version, mut site_id) = (None, None, None, None);
                // Borrowed: names, column names and hex ids hold no escapes.
                while let Some(key) = map.next_key::<&'de str>()? {
                    match key {
                        "cid" => cid = Some(Cow::Borrowed(map.next_value::<&'de str>()?)),
                        "val" if cid.as_deref() == Some("qty") => {
                            qty = map.next_value::<serde_json::Number>()?.as_i64();
                        }
                        "db_version" => db_version = Some(map.next_value::<i64>()?),
                        "site_id" => site_id = Some(Cow::Borrowed(map.next_value::<&'de str>()?)),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(WireChange {
                    cid: cid.ok_or_else(|| Error::missing_field("cid"))?,
                    qty,
                    db_version: db_version.ok_or_else(|| Error::missing_field("db_version"))?,
                    site_id: site_id.ok_or_else(|| Error::missing_field("site_id"))?,
                })
            }
        }
        d.deserialize_map(Fields)
    }
}

/// One light client's protocol state: its site id and per-site cursor.
pub(crate) struct LightClient {
    site: String,
    cursor: HashMap<String, i64>,
    pub(crate) stats: Arc<ClientStats>,
}

/// What the connection should do after a message.
pub(crate) enum Reply {
    Nothing,
    /// The server's `connect`: send our `sync` with this body.
    Sync(String),
}

impl LightClient {
    pub(crate) fn new(stats: Arc<ClientStats>) -> Self {
        LightClient {
            site: hex(&rand::random::<[u8; 16]>()),
            cursor: HashMap::new(),
            stats,
        }
    }

    pub(crate) fn sync_body(&self) -> String {
        serde_json::json!({"type": "sync", "peerId": self.site, "cursor": {"peers": self.cursor}})
            .to_string()
    }

    pub(crate) fn on_message(&mut self, text: &str) -> Reply {
        let Ok(message) = serde_json::from_str::<WireMessage<'_>>(text) else {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return Reply::Nothing;
        };
        match message.kind.as_ref() {
            "connect" => return Reply::Sync(self.sync_body()),
            "error" => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            "data" => {
                let Some(data) = message.data else {
                    return Reply::Nothing;
                };
                let now = now_us();
                self.stats.messages.fetch_add(1, Ordering::Relaxed);
                for change in &data.data {
                    match self.cursor.get_mut(change.site_id.as_ref()) {
                        Some(v) => *v = (*v).max(change.db_version),
                        None => {
                            self.cursor
                                .insert(change.site_id.to_string(), change.db_version);
                        }
                    }
                    if change.cid == "qty" {
                        let Some(id) = change.qty else {
                            continue;
                        };
                        self.stats.rows.fetch_add(1, Ordering::Relaxed);
                        if id > self.stats.last_id.load(Ordering::Relaxed) {
                            self.stats.last_at.store(now, Ordering::Relaxed);
                            self.stats.last_id.store(id, Ordering::Release);
                        }
                    }
                }
                if data.kind == "eose" && self.stats.eose_at.load(Ordering::Relaxed) == 0 {
                    self.stats.eose_at.store(now, Ordering::Release);
                }
            }
            _ => {}
        }
        Reply::Nothing
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What every light client shares.
pub(crate) struct Shared {
    http: reqwest::Client,
    addr: String,
    connects: Semaphore,
    posts: Semaphore,
}

/// An SSE light client, reconnecting with its cursor when its stream ends.
pub(crate) async fn run_sse(shared: Arc<Shared>, stats: Arc<ClientStats>) {
    let mut client = LightClient::new(stats.clone());
    let base = format!("http://{}/db/{DB_NAME}", shared.addr);
    let mut first = true;
    loop {
        if !first {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        first = false;
        let response = {
            let _permit = shared.connects.acquire().await;
            shared
                .http
                .get(format!("{base}/stream?peerId={}", client.site))
                .bearer_auth(TOKEN)
                .send()
                .await
        };
        let mut response = match response {
            Ok(r) if r.status().is_success() => r,
            _ => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let mut buf: Vec<u8> = Vec::new();
        // Where the search for the next frame's end resumes.
        let mut scanned = 0;
        while let Ok(Some(chunk)) = response.chunk().await {
            buf.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(end) = memchr::memmem::find(&buf[scanned.max(start)..], b"\n\n")
                .map(|p| p + scanned.max(start))
            {
                let frame = &buf[start..end];
                start = end + 2;
                scanned = start;
                let Some(text) = sse_data(frame) else {
                    continue;
                };
                if let Reply::Sync(body) = client.on_message(&text) {
                    let shared = shared.clone();
                    let stats = stats.clone();
                    let url = format!("{base}/sync");
                    tokio::spawn(async move {
                        let _permit = shared.posts.acquire().await;
                        let sent = shared
                            .http
                            .post(url)
                            .bearer_auth(TOKEN)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await;
                        if !sent.is_ok_and(|r| r.status().is_success()) {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }
            buf.drain(..start);
            scanned = scanned
                .saturating_sub(start)
                .max(buf.len().saturating_sub(1));
        }
    }
}

/// The `data:` lines of one SSE frame, joined (comments and other fields skipped).
pub(crate) fn sse_data(frame: &[u8]) -> Option<Cow<'_, str>> {
    let text = std::str::from_utf8(frame).ok()?;
    let mut lines = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l));
    let first = lines.next()?;
    match lines.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => {
            let mut all = format!("{first}\n{second}");
            for l in lines {
                all.push('\n');
                all.push_str(l);
            }
            Some(Cow::Owned(all))
        }
    }
}

/// A WebSocket light client, reconnecting with its cursor when its socket ends.
pub(crate) async fn run_ws(shared: Arc<Shared>, stats: Arc<ClientStats>) {
    let mut client = LightClient::new(stats.clone());
    let url = format!("ws://{}/db/{DB_NAME}/ws", shared.addr);
    let mut first = true;
    loop {
        if !first {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        first = false;
        let socket = {
            let _permit = shared.connects.acquire().await;
            ws_connect(&url, &client.site).await
        };
        let Ok(socket) = socket else {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (mut tx, mut rx) = socket.split();
        let connect = serde_json::json!({"type": "connect", "peerId": client.site}).to_string();
        if tx
            .send(tungstenite::Message::Text(connect.into()))
            .await
            .is_err()
        {
            continue;
        }
        while let Some(Ok(frame)) = rx.next().await {
            let reply = match &frame {
                tungstenite::Message::Text(text) => client.on_message(text.as_str()),
                tungstenite::Message::Close(_) => break,
                _ => Reply::Nothing,
            };
            if let Reply::Sync(body) = reply {
                if tx
                    .send(tungstenite::Message::Text(body.into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

pub(crate) type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) async fn ws_connect(url: &str, site: &str) -> anyhow::Result<WsStream> {
    let mut request = format!("{url}?peerId={site}").into_client_request()?;
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    // Small buffers, as a minimal client would keep (tungstenite reserves
    // 128 KiB per socket by default).
    let config = WebSocketConfig::default()
        .read_buffer_size(8 << 10)
        .write_buffer_size(0);
    let (socket, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
    Ok(socket)
}

/// N light clients on the orchestrator's runtime; dropping them ends them.
pub(crate) struct Clients {
    pub(crate) stats: Vec<Arc<ClientStats>>,
    _tasks: tokio::task::JoinSet<()>,
}

impl Clients {
    pub(crate) fn start(
        rt: &tokio::runtime::Runtime,
        transport: &str,
        addr: &str,
        n: usize,
    ) -> Self {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(POOL_IDLE)
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            http,
            addr: addr.to_string(),
            connects: Semaphore::new(CONNECTS_IN_FLIGHT),
            posts: Semaphore::new(POSTS_IN_FLIGHT),
        });
        let mut tasks = tokio::task::JoinSet::new();
        let stats: Vec<_> = (0..n).map(|_| Arc::new(ClientStats::new())).collect();
        for s in &stats {
            if transport == "ws" {
                tasks.spawn_on(run_ws(shared.clone(), s.clone()), rt.handle());
            } else {
                tasks.spawn_on(run_sse(shared.clone(), s.clone()), rt.handle());
            }
        }
        Clients {
            stats,
            _tasks: tasks,
        }
    }

    pub(crate) fn count(&self, pred: impl Fn(&ClientStats) -> bool) -> usize {
        self.stats.iter().filter(|s| pred(s)).count()
    }

    /// Waits until `pred` holds for every client (sampling the server's RSS
    /// meanwhile); returns how many it holds for.
    pub(crate) fn wait_all(
        &self,
        pred: impl Fn(&ClientStats) -> bool,
        timeout: Duration,
        rss: &mut RssSampler,
    ) -> usize {
        let start = Instant::now();
        loop {
            let n = self.count(&pred);
            if n == self.stats.len() || start.elapsed() > timeout {
                return n;
            }
            rss.sample();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub(crate) fn sum(&self, f: impl Fn(&ClientStats) -> u64) -> u64 {
        self.stats.iter().map(|s| f(s)).sum()
    }
}
