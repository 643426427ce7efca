//! Named tokens from the config: secrets from `token_file`, `create`
//! permission (a database is created on first use only for a token that
//! has it, and the client is told), and replacing the tokens while the
//! server runs (`TokenHandle::reload`): new requests of a removed token get
//! 401 and its open connections are closed, other connections go on.

mod support;

use std::time::Duration;

use anyhow::{Context, Result};
use crsync_node_server::{CREATED_HEADER, Server, ServerConfig, TokenConfig};
use crsync_peer::{Dialer, SiteId, TransportError};
use crsync_transports::sse::SseDialer;
use crsync_transports::ws::WebSocketDialer;
use futures_util::StreamExt;

const PHONE: &str = "phone-secret-0123";
const ADMIN: &str = "admin-secret-4567";

/// Tokens `phone` (all databases, no create) and `admin` (its secret in a
/// file, may create), no environment token.
fn tokens_config(dir: &tempfile::TempDir) -> Result<ServerConfig> {
    let mut config = support::config(dir);
    config.allow_create = false;
    config.token_env = String::new();
    std::fs::write(dir.path().join("admin.token"), format!("{ADMIN}\n"))?;
    let mut phone = TokenConfig::new(PHONE, ["*"]);
    phone.name = Some("phone".into());
    let mut admin = TokenConfig::new("", ["*"]);
    admin.token = None;
    admin.token_file = Some(dir.path().join("admin.token"));
    admin.name = Some("admin".into());
    admin.create = true;
    config.tokens = vec![phone, admin];
    Ok(config)
}

struct Running {
    addr: std::net::SocketAddr,
    tokens: crsync_node_server::TokenHandle,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), crsync_node_server::ServeError>>,
}

async fn start(config: ServerConfig) -> Result<Running> {
    let server = Server::bind(config).await?;
    let addr = server.local_addr();
    let tokens = server.tokens();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    Ok(Running {
        addr,
        tokens,
        stop,
        task,
    })
}

impl Running {
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(support::TIMEOUT, self.task)
            .await
            .context("serve did not return")???;
        Ok(())
    }

    async fn get_stream(&self, db: &str, token: &str) -> Result<reqwest::Response> {
        Ok(reqwest::Client::new()
            .get(format!(
                "http://{}/db/{db}/stream?peerId={}&crsync=lossless",
                self.addr,
                support::PEER_A
            ))
            .bearer_auth(token)
            .send()
            .await?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_token_with_create_creates_and_the_client_is_told() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = start(tokens_config(&dir)?).await?;

    // A token without `create`: 404 naming the fix, and no file appears.
    let refused = server.get_stream("typo", PHONE).await?;
    assert_eq!(refused.status(), 404);
    let body: serde_json::Value = refused.json().await?;
    assert_eq!(body["code"], "UNKNOWN_DATABASE");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains("create = true"), "{message}");
    assert!(!dir.path().join("data/typo.db").exists());
    let dialed = SseDialer::new(format!("http://{}/db/typo", server.addr))
        .with_token(PHONE)
        .dial(SiteId::from_bytes([1; 16]))
        .await;
    assert!(
        matches!(dialed, Err(TransportError::Http { status: 404, .. })),
        "{dialed:?}"
    );

    // The token with `create` (its secret read from a file, newline trimmed)
    // creates it, and the response says so; only the first time.
    let created = server.get_stream("notes", ADMIN).await?;
    assert_eq!(created.status(), 200);
    assert_eq!(
        created.headers().get(CREATED_HEADER).map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    drop(created);
    let again = server.get_stream("notes", PHONE).await?;
    assert_eq!(again.status(), 200);
    assert!(again.headers().get(CREATED_HEADER).is_none());
    drop(again);

    // The dialers raise their creation notice (SSE and WebSocket).
    let sse = SseDialer::new(format!("http://{}/db/fresh", server.addr)).with_token(ADMIN);
    let notice = sse.creation_notice();
    let mut sse = sse;
    let conn = sse.dial(SiteId::from_bytes([2; 16])).await?;
    assert!(notice.take(), "SSE dial that created the database");
    assert!(!notice.take(), "taken once");
    drop(conn);
    let mut ws =
        WebSocketDialer::new(format!("ws://{}/db/fresh2/ws", server.addr)).with_token(ADMIN);
    let notice = ws.creation_notice();
    let conn = ws.dial(SiteId::from_bytes([3; 16])).await?;
    assert!(notice.take(), "WebSocket dial that created the database");
    drop(conn);
    let conn = ws.dial(SiteId::from_bytes([3; 16])).await?;
    assert!(!notice.take(), "the database exists now");
    drop(conn);
    server.stop().await
}

#[tokio::test]
async fn token_files_that_are_missing_or_empty_stop_the_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = tokens_config(&dir)?;
    config.tokens[1].token_file = Some(dir.path().join("missing.token"));
    let e = Server::bind(config.clone())
        .await
        .expect_err("missing file");
    let text = e.to_string();
    assert!(
        text.contains("\"admin\"") && text.contains("missing.token"),
        "{text}"
    );
    std::fs::write(dir.path().join("empty.token"), "\n")?;
    config.tokens[1].token_file = Some(dir.path().join("empty.token"));
    let e = Server::bind(config.clone()).await.expect_err("empty file");
    assert!(e.to_string().contains("is empty"), "{e}");
    // Two different secrets under one name.
    config.tokens[1].token_file = None;
    config.tokens[1].token = Some("x".into());
    config.tokens[1].name = Some("phone".into());
    let e = Server::bind(config).await.expect_err("duplicate name");
    assert!(e.to_string().contains("names must be unique"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refuses_removed_tokens_and_closes_their_connections() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = tokens_config(&dir)?;
    let server = start(config.clone()).await?;
    // Create the database, then open one stream per token.
    drop(server.get_stream("notes", ADMIN).await?);
    let mut phone_ws = WebSocketDialer::new(format!("ws://{}/db/notes/ws", server.addr))
        .with_token(PHONE)
        .dial(SiteId::from_bytes([4; 16]))
        .await?;
    let mut admin_ws = WebSocketDialer::new(format!("ws://{}/db/notes/ws", server.addr))
        .with_token(ADMIN)
        .dial(SiteId::from_bytes([5; 16]))
        .await?;

    // Remove phone; rotate nothing else (admin's file is read again).
    config.tokens.remove(0);
    let names = server.tokens.reload(&config)?;
    assert_eq!(names, vec!["admin".to_string()]);

    let refused = server.get_stream("notes", PHONE).await?;
    assert_eq!(refused.status(), 401);
    // phone's open WebSocket ends; admin's stays open.
    let ended = tokio::time::timeout(support::TIMEOUT, async {
        while let Some(item) = phone_ws.stream.next().await {
            if item.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the removed token's WebSocket was not closed"
    );
    let still = tokio::time::timeout(Duration::from_millis(500), admin_ws.stream.next()).await;
    assert!(
        !matches!(still, Ok(None)),
        "the kept token's WebSocket must stay open: {still:?}"
    );
    assert_eq!(server.get_stream("notes", ADMIN).await?.status(), 200);

    // Rotating admin's secret in its file: the old one is refused.
    std::fs::write(dir.path().join("admin.token"), "rotated-secret\n")?;
    server.tokens.reload(&config)?;
    assert_eq!(server.get_stream("notes", ADMIN).await?.status(), 401);
    assert_eq!(
        server.get_stream("notes", "rotated-secret").await?.status(),
        200
    );

    // A reload that fails keeps the tokens in use.
    std::fs::write(dir.path().join("admin.token"), "")?;
    assert!(server.tokens.reload(&config).is_err());
    assert_eq!(
        server.get_stream("notes", "rotated-secret").await?.status(),
        200
    );
    drop(admin_ws);
    server.stop().await
}
