//! The status page in a real browser: headless Chromium (Debian's
//! `chromium`, installed by `scripts/setup.sh`) driven over the DevTools
//! protocol, after a real sync. Asserts what a user sees, follows the page's
//! own refresh, and writes a screenshot.
//!
//! Without Chromium the test is skipped with a reason, unless `CI` is set:
//! then it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use crsync_transports::SseDialer;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const ADMIN: &str = "browser-admin";
const DB: &str = "browser_notes";
/// How long the browser may take to start, or the page to show something.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(30);

/// The browser: `CHROMIUM` if set, else `chromium` on `PATH`.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join("chromium"))
        .find(|p| p.is_file())
}

/// A headless Chromium, killed when dropped.
struct Browser {
    child: Child,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts it with a fresh profile in `profile`; returns it and the
    /// DevTools port it chose.
    async fn start(exe: &Path, profile: &Path) -> Result<(Browser, u16)> {
        let child = Command::new(exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--window-size=1200,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let browser = Browser { child };
        let file = profile.join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + BROWSER_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                    return Ok((browser, port));
                }
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "chromium wrote no DevToolsActivePort"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools session with one page.
struct Page {
    socket: Socket,
    next_id: u64,
}

impl Page {
    /// Attaches to the browser's first page target.
    async fn attach(port: u16) -> Result<Page> {
        let targets: Vec<Value> = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await?
            .json()
            .await?;
        let url = targets
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .context("no page target")?;
        let (socket, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Page { socket, next_id: 0 })
    }

    /// Sends a command and waits for its result (events are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::Text(command.to_string().into()))
            .await?;
        let reply = tokio::time::timeout(BROWSER_TIMEOUT, async {
            while let Some(message) = self.socket.next().await {
                if let Message::Text(text) = message? {
                    let value: Value = serde_json::from_str(text.as_str())?;
                    if value["id"] == id {
                        return Ok(value);
                    }
                }
            }
            bail!("the DevTools socket closed")
        })
        .await
        .with_context(|| format!("no reply to {method}"))??;
        if let Some(error) = reply.get("error") {
            bail!("{method} failed: {error}");
        }
        Ok(reply["result"].clone())
    }

    /// The text the page shows.
    async fn text(&mut self) -> Result<String> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": "document.body ? document.body.innerText : ''",
                       "returnByValue": true}),
            )
            .await?;
        Ok(result["result"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Waits until the page shows every one of `wanted`; returns its text.
    async fn wait_for_text(&mut self, wanted: &[&str]) -> Result<String> {
        let deadline = tokio::time::Instant::now() + BROWSER_TIMEOUT;
        loop {
            let text = self.text().await?;
            if wanted.iter().all(|w| text.contains(w)) {
                return Ok(text);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the page never showed {wanted:?}; it shows:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_databases_and_live_peers_in_chromium() -> Result<()> {
    let Some(exe) = chromium() else {
        if std::env::var_os("CI").is_some() {
            bail!("chromium is not installed (scripts/setup.sh installs it)");
        }
        println!("skipped: chromium is not on PATH (run scripts/setup.sh, or set CHROMIUM)");
        return Ok(());
    };
    let mut server = TestServer::start_with(|c| c.admin.token = Some(ADMIN.into())).await?;
    let dir = tempfile::tempdir()?;
    let client = peer(client_store(&dir.path().join("laptop.db")).await?);
    client.add_dialer(SseDialer::new(server.url(&format!("/db/{DB}"))).with_token(ENV));
    for i in 1..=3 {
        insert(client.store(), i, "synced").await?;
    }
    let site = client.site_id();
    wait_until(&client, "the server holds our rows, live", || async {
        let status = client.status().await;
        Ok(status.pending.transactions == 0 && status.phase() == crsync_peer::SyncPhase::Live)
    })
    .await?;

    let profile = dir.path().join("chromium-profile");
    std::fs::create_dir_all(&profile)?;
    let (browser, port) = Browser::start(&exe, &profile).await?;
    let mut page = Page::attach(port).await?;
    page.call("Page.enable", json!({})).await?;
    let url = format!("http://{}/status?token={ADMIN}", server.addr);
    page.call("Page.navigate", json!({"url": url})).await?;

    // What a user sees: the database with its rows, and our client, live.
    let text = page
        .wait_for_text(&[
            "crsync server status",
            DB,
            "todo: 3",
            "kv: 0",
            &site.to_hex(),
            "live",
            "127.0.0.1:",
        ])
        .await?;
    ensure!(text.contains("Connected peers"), "{text}");
    ensure!(text.contains("Recent errors"), "{text}");
    ensure!(
        !text.contains("crsync_origin"),
        "bookkeeping tables are not listed: {text}"
    );

    // The page refreshes by itself: two more rows appear without navigating.
    insert(client.store(), 4, "later").await?;
    insert(client.store(), 5, "later").await?;
    page.wait_for_text(&["todo: 5"]).await?;

    let shot = page
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().context("no screenshot data")?)?;
    ensure!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // Kept after the test in cargo's temp dir for integration tests
    // (`target/tmp`), replaced by the next run, for a person to look at.
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&path, &png)?;
    println!("screenshot of the status page: {}", path.display());

    drop(page);
    drop(browser);
    client.shutdown().await;
    server.shutdown().await
}
