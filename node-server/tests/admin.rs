//! The admin routes over real sockets: `/metrics` moving under a real sync,
//! `/status.json`, the admin token, and `[admin] bind`.

mod support;

use anyhow::{Context, Result, ensure};
use crsync_node_server::StatusReport;
use crsync_transports::{SseDialer, WebSocketDialer};
use support::*;

const ADMIN: &str = "admin-token";

async fn admin_server() -> Result<TestServer> {
    TestServer::start_with(|c| c.admin.token = Some(ADMIN.into())).await
}

/// The sum of the samples of `name` whose labels include every `labels` pair.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let wanted = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            (metric == name && wanted).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// `GET path` with the admin token; its body once it answered 200.
async fn admin_get(server: &TestServer, path: &str) -> Result<reqwest::Response> {
    let response = server
        .client
        .get(server.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    ensure!(
        response.status() == 200,
        "GET {path}: {}",
        response.status()
    );
    Ok(response)
}

async fn scrape(server: &TestServer) -> Result<String> {
    Ok(admin_get(server, "/metrics").await?.text().await?)
}

async fn status(server: &TestServer) -> Result<StatusReport> {
    Ok(admin_get(server, "/status.json").await?.json().await?)
}

async fn server_rows(server: &TestServer, db: &str) -> Result<u64> {
    let report = status(server).await?;
    Ok(report
        .databases
        .iter()
        .find(|d| d.name == db)
        .and_then(|d| d.tables.iter().find(|t| t.name == "todo"))
        .map_or(0, |t| t.rows))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_under_a_real_sync() -> Result<()> {
    const DB: &str = "metrics_sync";
    let mut server = admin_server().await?;
    let dir = tempfile::tempdir()?;
    let a = peer(client_store(&dir.path().join("a.db")).await?);
    let b = peer(client_store(&dir.path().join("b.db")).await?);
    a.add_dialer(SseDialer::new(server.url(&format!("/db/{DB}"))).with_token(ENV));
    let ws = format!("ws://{}/db/{DB}/ws", server.addr);
    b.add_dialer(WebSocketDialer::new(ws).with_token(ENV));
    for i in 0..5 {
        insert(a.store(), i, "first").await?;
    }
    wait_until(&b, "b holds a's rows", || async {
        Ok(contents(b.store()).await?.len() == 5)
    })
    .await?;

    let before = scrape(&server).await?;
    let db = [("database", DB)];
    let changes_in = sample(&before, "crsync_changes_in_total", &db);
    let merged = sample(&before, "crsync_changes_merged_total", &db);
    let bytes_in = sample(&before, "crsync_bytes_in_total", &db);
    let bytes_out = sample(&before, "crsync_bytes_out_total", &db);
    let merges = sample(&before, "crsync_merge_seconds_count", &db);
    // Five rows (one change each: `title`) came in from `a` over SSE.
    ensure!(changes_in >= 5.0, "changes in: {changes_in}\n{before}");
    ensure!(merged >= 5.0, "changes merged: {merged}");
    ensure!(merges >= 1.0, "merges: {merges}");
    ensure!(
        bytes_in > 0.0 && bytes_out > 0.0,
        "bytes: {bytes_in} in, {bytes_out} out"
    );
    ensure!(
        sample(&before, "crsync_changes_out_total", &db) >= 5.0,
        "the rows went out to b"
    );
    for transport in ["sse", "ws"] {
        let labels = [("database", DB), ("transport", transport)];
        ensure!(
            sample(&before, "crsync_connections_total", &labels) >= 1.0,
            "no {transport} connection counted"
        );
        ensure!(
            sample(&before, "crsync_connections_open", &labels) >= 1.0,
            "no open {transport} connection"
        );
    }
    let live = [("database", DB), ("phase", "live")];
    ensure!(
        sample(&before, "crsync_sessions", &live) >= 1.0,
        "no live session"
    );
    ensure!(before.contains("# HELP crsync_merge_seconds"), "help texts");
    ensure!(
        before.contains("crsync_merge_seconds_bucket"),
        "a histogram"
    );

    for i in 5..25 {
        insert(a.store(), i, "more").await?;
    }
    wait_until(&a, "the server holds 25 rows", || async {
        Ok(server_rows(&server, DB).await? == 25)
    })
    .await?;
    let after = scrape(&server).await?;
    let grew = |name: &str, was: f64| {
        let now = sample(&after, name, &db);
        ensure!(now > was, "{name} did not grow: {was} -> {now}");
        Ok(())
    };
    grew("crsync_changes_in_total", changes_in)?;
    grew("crsync_changes_merged_total", merged)?;
    grew("crsync_bytes_in_total", bytes_in)?;
    grew("crsync_merge_seconds_count", merges)?;

    a.shutdown().await;
    b.shutdown().await;
    server.shutdown().await
}

#[tokio::test]
async fn status_json_lists_databases_and_their_clients() -> Result<()> {
    const DB: &str = "status_json";
    let mut server = admin_server().await?;
    let dir = tempfile::tempdir()?;
    let a = peer(client_store(&dir.path().join("a.db")).await?);
    a.add_dialer(SseDialer::new(server.url(&format!("/db/{DB}"))).with_token(ENV));
    insert(a.store(), 1, "one").await?;
    insert(a.store(), 2, "two").await?;
    wait_until(
        &a,
        "the server shows a live client with our rows",
        || async {
            let report = status(&server).await?;
            let Some(db) = report.databases.iter().find(|d| d.name == DB) else {
                return Ok(false);
            };
            let rows = db.tables.iter().find(|t| t.name == "todo").map(|t| t.rows);
            Ok(rows == Some(2) && db.peers.iter().any(|p| p.phase == "live"))
        },
    )
    .await?;
    let report = status(&server).await?;
    let db = report
        .databases
        .iter()
        .find(|d| d.name == DB)
        .context("database listed")?;
    ensure!(
        db.open && db.size_bytes > 0 && db.db_version.is_some(),
        "{db:?}"
    );
    let client = db
        .peers
        .iter()
        .find(|p| p.phase == "live")
        .context("live")?;
    ensure!(client.transport == "sse", "{client:?}");
    ensure!(
        client
            .address
            .as_deref()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{client:?}"
    );
    ensure!(
        client.peer.as_deref() == Some(&*a.site_id().to_hex()),
        "{client:?}"
    );
    ensure!(client.connected_since.is_some(), "{client:?}");
    ensure!(
        report.conflicts.as_ref().is_some_and(|c| c.is_empty()),
        "no conflicts yet: {:?}",
        report.conflicts
    );
    a.shutdown().await;
    server.shutdown().await
}

#[tokio::test]
async fn concurrent_writes_show_as_conflicts() -> Result<()> {
    const DB: &str = "status_conflicts";
    let mut server = admin_server().await?;
    let dir = tempfile::tempdir()?;
    // Both write row 1 before either syncs: the server keeps one, records the other.
    let a = peer(client_store(&dir.path().join("a.db")).await?);
    let b = peer(client_store(&dir.path().join("b.db")).await?);
    insert(a.store(), 1, "from a").await?;
    insert(b.store(), 1, "from b").await?;
    a.add_dialer(SseDialer::new(server.url(&format!("/db/{DB}"))).with_token(ENV));
    b.add_dialer(SseDialer::new(server.url(&format!("/db/{DB}"))).with_token(ENV));
    wait_until(&a, "the server records the conflict", || async {
        let report = status(&server).await?;
        Ok(report.conflicts.as_ref().is_some_and(|c| !c.is_empty()))
    })
    .await?;
    let report = status(&server).await?;
    let conflicts = report.conflicts.context("conflicts")?;
    let c = &conflicts[0];
    ensure!(c["database"] == DB && c["table"] == "todo", "{c}");
    let values = [
        c["lost"]["value"].to_string(),
        c["won"]["value"].to_string(),
    ];
    ensure!(
        values.iter().any(|v| v.contains("from a")) && values.iter().any(|v| v.contains("from b")),
        "{c}"
    );
    let page = admin_get(&server, "/status").await?.text().await?;
    ensure!(
        page.contains("<ul id=\"conflicts\">") && page.contains("from "),
        "{page}"
    );
    a.shutdown().await;
    b.shutdown().await;
    server.shutdown().await
}

#[tokio::test]
async fn admin_routes_need_the_admin_token() -> Result<()> {
    let mut server = admin_server().await?;
    for path in ["/metrics", "/status", "/status.json"] {
        let url = server.url(path);
        let none = server.client.get(&url).send().await?;
        ensure!(
            none.status() == 401,
            "{path} without a token: {}",
            none.status()
        );
        // A database token is not the admin token.
        let db_token = server.client.get(&url).bearer_auth(ENV).send().await?;
        ensure!(db_token.status() == 401, "{path}: {}", db_token.status());
        let query = server
            .client
            .get(format!("{url}?token={ADMIN}"))
            .send()
            .await?;
        ensure!(query.status() == 200, "{path}?token=: {}", query.status());
    }
    server.shutdown().await?;

    // No admin token configured: refused, and the error says what to set.
    let mut open = TestServer::start().await?;
    let refused = open.client.get(open.url("/status.json")).send().await?;
    ensure!(refused.status() == 401);
    ensure!(refused.text().await?.contains("[admin] token"));
    open.shutdown().await?;

    let mut anonymous = TestServer::start_with(|c| c.admin.allow_anonymous = true).await?;
    let ok = anonymous
        .client
        .get(anonymous.url("/metrics"))
        .send()
        .await?;
    ensure!(ok.status() == 200, "anonymous: {}", ok.status());
    anonymous.shutdown().await
}

#[tokio::test]
async fn admin_routes_on_their_own_listener() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = support::config(&dir);
    config.admin.token = Some(ADMIN.into());
    config.admin.bind = Some("127.0.0.1:0".parse()?);
    let server = crsync_node_server::Server::bind_with_auth(config, support::auth()).await?;
    let (main, admin) = (server.local_addr(), server.admin_addr());
    ensure!(main != admin, "a second listener");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let on_main = client
        .get(format!("http://{main}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    ensure!(
        on_main.status() == 404,
        "main listener: {}",
        on_main.status()
    );
    let on_admin = client
        .get(format!("http://{admin}/status.json"))
        .bearer_auth(ADMIN)
        .send()
        .await?;
    ensure!(
        on_admin.status() == 200,
        "admin listener: {}",
        on_admin.status()
    );
    let health = client.get(format!("http://{admin}/health")).send().await?;
    ensure!(health.status() == 404, "only admin routes there");
    let _ = stop.send(());
    tokio::time::timeout(TIMEOUT, task).await???;
    Ok(())
}

#[tokio::test]
async fn a_refused_batch_shows_in_recent_errors_and_metrics() -> Result<()> {
    const DB: &str = "status_errors";
    let mut server = admin_server().await?;
    let dir = tempfile::tempdir()?;
    // A client with a table the server's schema does not have.
    let store = client_store(&dir.path().join("a.db")).await?;
    store
        .write(|tx| tx.execute_batch("CREATE TABLE extra (id INTEGER PRIMARY KEY NOT NULL, v)"))
        .await?;
    store.enable_crr(&["extra"]).await?;
    store
        .write(|tx| tx.execute("INSERT INTO extra VALUES (1, 'x')", []))
        .await?;
    let a = peer(store);
    a.add_dialer(SseDialer::new(server.url(&format!("/db/{DB}"))).with_token(ENV));
    wait_until(&a, "the server reports an error", || async {
        Ok(status(&server)
            .await?
            .errors
            .iter()
            .any(|e| e.database == DB))
    })
    .await?;
    let report = status(&server).await?;
    let error = report
        .errors
        .iter()
        .find(|e| e.database == DB)
        .context("error")?;
    ensure!(error.kind == "refused", "{error:?}");
    ensure!(
        error.peer.as_deref() == Some(&*a.site_id().to_hex()),
        "{error:?}"
    );
    let code = error.code.clone().context("a code")?;
    let text = scrape(&server).await?;
    let labels = [("database", DB), ("code", code.as_str()), ("side", "local")];
    ensure!(
        sample(&text, "crsync_batches_rejected_total", &labels) >= 1.0,
        "rejection not counted ({code}):\n{text}"
    );
    let page = server
        .client
        .get(server.url(&format!("/status?token={ADMIN}")))
        .send()
        .await?
        .text()
        .await?;
    ensure!(page.contains(&code) && page.contains("refused"), "{page}");
    a.shutdown().await;
    server.shutdown().await
}
