//! Shared helpers for the end-to-end tests (included with `mod support;`).
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod v1;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use crsync_node_server::{Access, Auth, Server, ServerConfig};
use crsync_peer::wire::TransportMessage;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SCHEMA: &str = "CREATE TABLE todo (id INTEGER PRIMARY KEY NOT NULL, title TEXT);
CREATE TABLE kv (k TEXT PRIMARY KEY NOT NULL, v);
PRAGMA user_version = 1;
";
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const RW: &str = "rw-token";
pub const RO: &str = "ro-token";
pub const OTHER: &str = "other-db-token";
pub const ENV: &str = "env-token";

/// Session secrets of the streams opened with [`TestServer::open_stream`],
/// by (database, peer id), as their `connect` handed them out.
type Sessions = Arc<Mutex<HashMap<(String, String), String>>>;

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    sessions: Sessions,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), crsync_node_server::ServeError>>>,
}

pub fn config(dir: &tempfile::TempDir) -> ServerConfig {
    let schema = dir.path().join("schema.sql");
    std::fs::write(&schema, SCHEMA).expect("write schema");
    let mut config = ServerConfig::default();
    config.bind = "127.0.0.1:0".parse().expect("addr");
    config.data_dir = dir.path().join("data");
    std::fs::create_dir_all(&config.data_dir).expect("data dir");
    config.schema = Some(schema);
    config.allow_create = true;
    config.shutdown_timeout = Duration::from_secs(5);
    config
}

pub fn auth() -> Auth {
    Auth::new()
        .with_creating_token(RW, ["notes", "todo"])
        .with_token(RO, ["notes"], Access::ReadOnly)
        .with_token(OTHER, ["elsewhere"], Access::ReadWrite)
        .with_creating_token(ENV, ["*"])
}

impl TestServer {
    pub async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Result<Self> {
        Self::start_with_auth(tweak, auth()).await
    }

    /// As [`start_with`](Self::start_with), with other tokens.
    pub async fn start_with_auth(
        tweak: impl FnOnce(&mut ServerConfig),
        auth: Auth,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = config(&dir);
        tweak(&mut config);
        let server = Server::bind_with_auth(config, auth).await?;
        let addr = server.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        Ok(TestServer {
            addr,
            dir,
            client: reqwest::Client::new(),
            sessions: Sessions::default(),
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Creates database `db` (a stream of the `ENV` token, which may create,
    /// opened for a peer no test uses, then closed).
    pub async fn create(&self, db: &str) -> Result<()> {
        let response = self
            .client
            .get(self.url(&format!(
                "/db/{db}/stream?peerId=0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f"
            )))
            .bearer_auth(ENV)
            .send()
            .await?;
        if response.status() != 200 {
            bail!("creating {db}: HTTP {}", response.status());
        }
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn replica(&self, name: &str) -> PathBuf {
        self.dir.path().join("data").join(format!("{name}.db"))
    }

    /// Triggers graceful shutdown and waits for `serve` to return.
    pub async fn shutdown(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(TIMEOUT, task)
                .await
                .context("serve did not return")???;
        }
        Ok(())
    }

    /// Opens a crsync client's stream (`crsync=lossless`). Its session
    /// secret, once the reader has read the `connect`, is presented by
    /// [`post`](Self::post) for this database and peer, as a crsync client does.
    pub async fn open_stream(&self, db: &str, peer: &str, token: &str) -> Result<SseReader> {
        let response = self
            .client
            .get(self.url(&format!("/db/{db}/stream?peerId={peer}&crsync=lossless")))
            .bearer_auth(token)
            .send()
            .await?;
        if response.status() != 200 {
            bail!(
                "stream: HTTP {}: {}",
                response.status(),
                response.text().await?
            );
        }
        let mut reader = SseReader::new(response);
        reader.record = Some((self.sessions.clone(), (db.to_owned(), peer.to_owned())));
        Ok(reader)
    }

    /// POSTs `body`, presenting the session secret of the stream
    /// [`open_stream`](Self::open_stream) opened for its peer id, if any.
    pub async fn post(
        &self,
        db: &str,
        route: &str,
        token: &str,
        body: String,
    ) -> Result<(u16, serde_json::Value)> {
        let peer = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|b| b["peerId"].as_str().map(str::to_owned));
        let session = peer.and_then(|peer| {
            let sessions = self.sessions.lock().expect("sessions");
            sessions.get(&(db.to_owned(), peer)).cloned()
        });
        self.post_with(db, route, Some(token), session.as_deref(), body)
            .await
    }

    /// POSTs `body` with exactly this token and session secret (either may be absent).
    pub async fn post_with(
        &self,
        db: &str,
        route: &str,
        token: Option<&str>,
        session: Option<&str>,
        body: String,
    ) -> Result<(u16, serde_json::Value)> {
        let mut request = self
            .client
            .post(self.url(&format!("/db/{db}/{route}")))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(session) = session {
            request = request.header(crsync_peer::wire::SESSION_HEADER, session);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let json =
            serde_json::from_str(&response.text().await?).context("response body is not JSON")?;
        Ok((status, json))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// Reads `data: <json>\n\n` frames from an SSE response.
pub struct SseReader {
    body: ByteStream,
    buf: String,
    /// The session secret of the stream's `connect`, once read.
    session: Option<String>,
    /// Where to record it for [`TestServer::post`].
    record: Option<(Sessions, (String, String))>,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        SseReader {
            body: Box::pin(response.bytes_stream()),
            buf: String::new(),
            session: None,
            record: None,
        }
    }

    /// The session secret the server handed out in this stream's `connect`.
    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// The next frame's message, `None` when the stream ends.
    pub async fn next(&mut self) -> Result<Option<TransportMessage>> {
        tokio::time::timeout(TIMEOUT, self.next_inner())
            .await
            .context("no SSE frame within the timeout")?
    }

    async fn next_inner(&mut self) -> Result<Option<TransportMessage>> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = frame
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                let message = TransportMessage::from_json(&data.join("\n"))?;
                let secret = message.crsync.as_ref().and_then(|h| h.session.clone());
                if let (crsync_peer::wire::MessageKind::Connect, Some(secret)) =
                    (message.kind, secret)
                {
                    if let Some((sessions, key)) = &self.record {
                        let mut sessions = sessions.lock().expect("sessions");
                        sessions.insert(key.clone(), secret.clone());
                    }
                    self.session = Some(secret);
                }
                return Ok(Some(message));
            }
            match self.body.next().await {
                Some(chunk) => self.buf.push_str(std::str::from_utf8(&chunk?)?),
                None => return Ok(None),
            }
        }
    }

    /// Skips pings; the next other message.
    pub async fn next_non_ping(&mut self) -> Result<Option<TransportMessage>> {
        loop {
            match self.next().await? {
                Some(m) if m.kind == crsync_peer::wire::MessageKind::Ping => continue,
                other => return Ok(other),
            }
        }
    }
}

/// Row count of `todo` and of `crsql_changes` in a replica file.
pub fn replica_counts(path: &std::path::Path) -> Result<(i64, i64)> {
    let conn = crsync_peer::rusqlite::Connection::open(path)?;
    let rows = conn.query_row("SELECT count(*) FROM todo", [], |r| r.get(0))?;
    let changes = conn.query_row("SELECT count(*) FROM crsql_changes", [], |r| r.get(0))?;
    conn.execute_batch("SELECT crsql_finalize()")?;
    Ok((rows, changes))
}

pub const PEER_A: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";
pub const PEER_B: &str = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";
pub const PEER_C: &str = "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c";

/// A client replica with the test schema, as CRRs.
pub async fn client_store(path: &std::path::Path) -> Result<crsync_peer::Store> {
    let store = crsync_peer::Store::open(path).await?;
    store.write(|tx| tx.execute_batch(SCHEMA)).await?;
    store.enable_crr(&["todo", "kv"]).await?;
    Ok(store)
}

/// A Peer on `store` with short ping and acknowledgement timeouts.
pub fn peer(store: crsync_peer::Store) -> crsync_peer::Peer {
    crsync_peer::Peer::builder(store)
        .ping_interval(Duration::from_millis(500))
        .ack_timeout(Duration::from_secs(2))
        .build()
}

/// Inserts the row (`id`, `title`) into `todo`, in one transaction.
pub async fn insert(store: &crsync_peer::Store, id: i64, title: &str) -> Result<()> {
    let title = title.to_string();
    store
        .write(move |tx| tx.execute("INSERT INTO todo VALUES (?1, ?2)", (id, title)))
        .await?;
    Ok(())
}

/// All rows of `todo` and `kv`, for comparing replicas.
pub async fn contents(store: &crsync_peer::Store) -> Result<Vec<String>> {
    Ok(store
        .read(|conn| {
            let mut rows = Vec::new();
            let mut stmt = conn.prepare("SELECT id, title FROM todo ORDER BY id")?;
            let todo = stmt.query_map([], |r| {
                Ok(format!(
                    "todo {} {:?}",
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<String>>(1)?
                ))
            })?;
            for row in todo {
                rows.push(row?);
            }
            let mut stmt = conn.prepare("SELECT k, v FROM kv ORDER BY k")?;
            let kv = stmt.query_map([], |r| {
                let v: crsync_peer::rusqlite::types::Value = r.get(1)?;
                Ok(format!("kv {} {:?}", r.get::<_, String>(0)?, v))
            })?;
            for row in kv {
                rows.push(row?);
            }
            Ok(rows)
        })
        .await?)
}

/// Waits (re-checking on every Peer event, with a timeout) until `check` holds.
pub async fn wait_until<F, Fut>(peer: &crsync_peer::Peer, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let mut events = peer.events();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if check().await? {
            return Ok(());
        }
        // Re-check on the next event, or at least every 200 ms (merges into the
        // replica from elsewhere do not always raise an event on this Peer).
        let next = tokio::time::timeout(Duration::from_millis(200), events.next());
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        let _ = next.await;
    }
}
