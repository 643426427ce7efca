//! A real `nostr-rs-relay` process for tests and benchmarks: on 127.0.0.1,
//! its database in a temporary directory, its rate limits raised; killed on
//! drop; restarted keeping or losing its events.
//!
//! The binary is installed by `scripts/setup.sh` (see
//! `scripts/nostr-rs-relay/install.sh`); it is found through
//! `CRSYNC_NOSTR_RS_RELAY`, else at the install location.
//!
//! nostr-rs-relay cannot tell which port it got for port 0 (it logs the
//! configured address), so a free port is picked by binding port 0 first;
//! if another process takes it meanwhile, the relay fails to bind (or
//! someone else answers, with another name) and a new port is tried.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where the binary is, if not at the install location.
pub(crate) const RELAY_ENV: &str = "CRSYNC_NOSTR_RS_RELAY";
/// How long a relay may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports tried before giving up.
const PORT_ATTEMPTS: usize = 5;
/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

static STARTED: AtomicU64 = AtomicU64::new(0);

/// The relay's settings that tests change.
#[derive(Debug, Clone)]
pub(crate) struct RelayConfig {
    /// Events accepted per second, for the whole relay (0: no limit).
    pub(crate) messages_per_sec: u32,
    /// Subscriptions created per minute (0: no limit).
    pub(crate) subscriptions_per_min: u32,
    /// Largest EVENT message, in bytes (nostr-rs-relay's default: 128 KB).
    pub(crate) max_event_bytes: usize,
}

impl Default for RelayConfig {
    /// Limits raised far above what a test sends; the event size limit kept.
    fn default() -> Self {
        RelayConfig {
            messages_per_sec: 100_000,
            subscriptions_per_min: 0,
            max_event_bytes: 131_072,
        }
    }
}

/// The nostr-rs-relay binary: `CRSYNC_NOSTR_RS_RELAY`, else where
/// `scripts/setup.sh` installs it. Panics, saying how to install it, if it
/// is missing.
pub(crate) fn relay_binary() -> PathBuf {
    let path = match std::env::var_os(RELAY_ENV) {
        Some(p) => PathBuf::from(p),
        None => {
            let data = std::env::var_os("XDG_DATA_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))
                .unwrap_or_else(|| PathBuf::from("."));
            data.join("crsync/nostr-rs-relay/bin/nostr-rs-relay")
        }
    };
    assert!(
        path.is_file(),
        "nostr-rs-relay not found at {} (set {RELAY_ENV}, or run scripts/setup.sh, which installs it)",
        path.display()
    );
    path
}

/// A running nostr-rs-relay; killed on drop.
pub(crate) struct NostrRsRelay {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    name: String,
    config: RelayConfig,
}

impl NostrRsRelay {
    /// Starts a relay with the default test settings and waits until it answers.
    pub(crate) fn start() -> NostrRsRelay {
        NostrRsRelay::with_config(RelayConfig::default())
    }

    /// Starts a relay with these settings and waits until it answers.
    pub(crate) fn with_config(config: RelayConfig) -> NostrRsRelay {
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let mut relay = NostrRsRelay {
            child: None,
            dir: tempfile::tempdir().expect("temp dir for nostr-rs-relay"),
            port: 0,
            name: format!("crsync-test-{}-{n}", std::process::id()),
            config,
        };
        std::fs::create_dir_all(relay.db_dir()).expect("relay db dir");
        relay.launch(None);
        relay
    }

    /// `ws://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The relay's database directory.
    pub(crate) fn db_dir(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    /// Size of the relay's database files, in bytes (SQLite file and WAL).
    pub(crate) fn db_bytes(&self) -> u64 {
        std::fs::read_dir(self.db_dir())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Stops the relay (kill, as a crash would). Its events stay on disk.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the relay process runs.
    pub(crate) fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the relay and starts it again, on the same port if it is still
    /// free, keeping its events or (`keep_events: false`) with an empty
    /// database.
    pub(crate) fn restart(&mut self, keep_events: bool) {
        self.stop();
        if !keep_events {
            let db = self.db_dir();
            std::fs::remove_dir_all(&db).expect("remove relay db");
            std::fs::create_dir_all(&db).expect("relay db dir");
        }
        let port = self.port;
        self.launch(Some(port));
    }

    /// Starts the process on `port` (or a free one) and waits until it
    /// answers as this relay; tries other ports when the port is taken.
    fn launch(&mut self, mut port: Option<u16>) {
        let binary = relay_binary();
        let mut errors = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let p = port.take().unwrap_or_else(free_port);
            match self.try_launch(&binary, p) {
                Ok(()) => return,
                Err(e) => errors.push(format!("port {p}: {e}")),
            }
        }
        panic!(
            "nostr-rs-relay did not start in {PORT_ATTEMPTS} attempts:\n  {}",
            errors.join("\n  ")
        );
    }

    fn try_launch(&mut self, binary: &Path, port: u16) -> Result<(), String> {
        let config = self.dir.path().join("config.toml");
        std::fs::write(&config, self.config_toml(port)).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(self.dir.path().join(format!("relay-{port}.log")))
            .map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .arg("--db")
            .arg(self.db_dir())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        self.child = Some(child);
        self.port = port;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.is_running() {
                let log = self.log(port);
                self.stop();
                return Err(format!("the relay exited: {log}"));
            }
            match probe(port) {
                Ok(name) if name == self.name => return Ok(()),
                Ok(other) => {
                    self.stop();
                    return Err(format!("another relay ({other:?}) answers there"));
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    let log = self.log(port);
                    self.stop();
                    return Err(format!(
                        "no answer within {START_TIMEOUT:?}: {e}; log: {log}"
                    ));
                }
            }
        }
    }

    fn log(&self, port: u16) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("relay-{port}.log")))
            .unwrap_or_default()
    }

    fn config_toml(&self, port: u16) -> String {
        let c = &self.config;
        format!(
            r#"[info]
relay_url = "ws://127.0.0.1:{port}/"
name = "{name}"
description = "crsync test relay"

[database]
engine = "sqlite"

[network]
address = "127.0.0.1"
port = {port}

[options]
reject_future_seconds = 1800

[limits]
messages_per_sec = {mps}
subscriptions_per_min = {spm}
max_event_bytes = {meb}
max_ws_message_bytes = {wsb}
max_ws_frame_bytes = {wsb}
broadcast_buffer = 16384
event_persist_buffer = 16384
"#,
            name = self.name,
            mps = c.messages_per_sec,
            spm = c.subscriptions_per_min,
            meb = c.max_event_bytes,
            wsb = c.max_event_bytes.max(131_072) + 4096,
        )
    }
}

impl Drop for NostrRsRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// The relay's name from its NIP-11 information document.
fn probe(port: u16) -> Result<String, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(PROBE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/nostr+json\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or("no HTTP body")?;
    let info: serde_json::Value =
        serde_json::from_str(body.trim()).map_err(|e| format!("{e}: {body:?}"))?;
    info.get("name")
        .and_then(|n| n.as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("no name in {info}"))
}

/// A plain Nostr client over one WebSocket (`tokio-tungstenite` and the
/// `nostr` crate's message types): publishes, fetches, counts what a relay
/// stores.
pub(crate) mod client {
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use nostr::{ClientMessage, Event, Filter, JsonUtil, RelayMessage, SubscriptionId};
    use tokio::net::TcpStream;
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

    /// Limit on waiting for one message from the relay.
    pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

    /// What the relay said about a published event (the texts are shown in
    /// failure messages).
    #[derive(Debug)]
    #[allow(dead_code)]
    pub(crate) enum Published {
        /// `OK` with its status and message.
        Ok(bool, String),
        /// A NOTICE instead, or the connection closed.
        Refused(String),
    }

    /// One WebSocket connection to a relay.
    pub(crate) struct RelayClient {
        ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    }

    impl RelayClient {
        pub(crate) async fn open(url: &str) -> RelayClient {
            let (ws, _) =
                tokio::time::timeout(REPLY_TIMEOUT, tokio_tungstenite::connect_async(url))
                    .await
                    .expect("connect in time")
                    .expect("connect");
            RelayClient { ws }
        }

        pub(crate) async fn send(&mut self, msg: ClientMessage<'_>) {
            self.ws
                .send(Message::text(msg.as_json()))
                .await
                .expect("send");
        }

        /// The next relay message; `None` when the connection closed.
        pub(crate) async fn next(&mut self) -> Option<RelayMessage<'static>> {
            loop {
                let frame = tokio::time::timeout(REPLY_TIMEOUT, self.ws.next())
                    .await
                    .expect("an answer from the relay in time");
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        return Some(
                            RelayMessage::from_json(text.as_str()).expect("relay message"),
                        );
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                    Some(Ok(_)) => {}
                }
            }
        }

        pub(crate) async fn publish(&mut self, event: &Event) -> Published {
            self.send(ClientMessage::event(event.clone())).await;
            loop {
                match self.next().await {
                    Some(RelayMessage::Ok {
                        event_id,
                        status,
                        message,
                    }) if event_id == event.id => {
                        return Published::Ok(status, message.into_owned());
                    }
                    Some(RelayMessage::Notice(n)) => return Published::Refused(n.into_owned()),
                    None => return Published::Refused("connection closed".into()),
                    Some(_) => {}
                }
            }
        }

        /// Stored events matching `filter`, up to the relay's EOSE.
        pub(crate) async fn fetch(&mut self, filter: Filter) -> Vec<Event> {
            let id = SubscriptionId::generate();
            self.send(ClientMessage::req(id.clone(), vec![filter]))
                .await;
            let mut events = Vec::new();
            loop {
                match self.next().await.expect("relay open") {
                    RelayMessage::Event {
                        subscription_id,
                        event,
                    } if *subscription_id == id => events.push(event.into_owned()),
                    RelayMessage::EndOfStoredEvents(sid) if *sid == id => break,
                    RelayMessage::Closed { message, .. } => {
                        panic!("subscription closed: {message}")
                    }
                    _ => {}
                }
            }
            self.send(ClientMessage::close(id)).await;
            events
        }

        /// How many stored events match `filter`, and their size as JSON.
        pub(crate) async fn count(&mut self, filter: Filter) -> (u64, u64) {
            let events = self.fetch(filter).await;
            let bytes = events.iter().map(|e| e.as_json().len() as u64).sum();
            (events.len() as u64, bytes)
        }
    }
}
