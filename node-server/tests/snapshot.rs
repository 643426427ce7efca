//! `GET {base}/snapshot` and `/snapshot/info` over real sockets: the
//! threshold, the cache and when it is made again, ETag, Range and If-Range,
//! auth, one build for concurrent requests, the cache across a restart.

mod support;

use std::path::Path;

use anyhow::{Context, Result};
use crsync_node_server::{SNAPSHOT_DIR, Server, ServerConfig};
use crsync_peer::Store;
use crsync_peer::proto::snapshot::{CHANGES_HEADER, SHA256_HEADER, SITE_HEADER, SnapshotInfo};
use sha2::Digest as _;
use support::*;

/// Writes `n` rows into `todo` of the replica file with a connection of its
/// own (the server's Store sees them as writes of its own site, as it would
/// another process's), in transactions of 100.
fn write_rows(replica: &Path, first: i64, n: i64) -> Result<()> {
    let conn = crsync_peer::rusqlite::Connection::open(replica)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut id = first;
    while id < first + n {
        let tx = conn.unchecked_transaction()?;
        for _ in 0..100.min(first + n - id) {
            tx.execute(
                "INSERT OR REPLACE INTO todo VALUES (?1, ?2)",
                (id, format!("row {id}")),
            )?;
            id += 1;
        }
        tx.commit()?;
    }
    conn.query_row("SELECT crsql_finalize()", [], |_| Ok(()))?;
    Ok(())
}

async fn get(server: &TestServer, path: &str, token: Option<&str>) -> Result<reqwest::Response> {
    let mut request = server.client.get(server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    Ok(request.send().await?)
}

async fn info(server: &TestServer) -> Result<SnapshotInfo> {
    let response = get(server, "/db/notes/snapshot/info", Some(RW)).await?;
    anyhow::ensure!(response.status() == 200, "info: {}", response.text().await?);
    Ok(response.json().await?)
}

/// The snapshot files in the cache (not the manifest).
fn cached_files(server: &TestServer) -> Vec<String> {
    let dir = server.dir.path().join("data").join(SNAPSHOT_DIR);
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".db"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

async fn start(threshold: u64) -> Result<TestServer> {
    TestServer::start_with(|c| c.snapshot_threshold = threshold).await
}

/// Creates `notes` on the server (first use) and fills it with `rows` rows.
async fn notes_with_rows(server: &TestServer, rows: i64) -> Result<()> {
    server.create("notes").await?;
    let first = get(server, "/db/notes/snapshot/info", Some(RW)).await?;
    anyhow::ensure!(first.status() == 404, "{}", first.text().await?);
    write_rows(&server.replica("notes"), 0, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_and_small_databases_have_no_snapshot() -> Result<()> {
    let server = start(0).await?;
    notes_with_rows(&server, 10).await?;
    for path in ["/db/notes/snapshot", "/db/notes/snapshot/info"] {
        let response = get(&server, path, Some(RW)).await?;
        assert_eq!(response.status(), 404);
        let body: serde_json::Value = response.json().await?;
        assert_eq!(body["code"], "NO_SNAPSHOT");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("snapshot_threshold = 0"),
            "{body}"
        );
    }

    let server = start(100).await?;
    notes_with_rows(&server, 10).await?;
    let response = get(&server, "/db/notes/snapshot", Some(RW)).await?;
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["code"], "NO_SNAPSHOT");
    assert_eq!(
        (body["changes"].as_u64(), body["threshold"].as_u64()),
        (Some(10), Some(100))
    );
    assert!(cached_files(&server).is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_served_whole_and_in_ranges_and_made_again_past_the_threshold() -> Result<()>
{
    let server = start(50).await?;
    notes_with_rows(&server, 60).await?;
    let first = info(&server).await?;
    assert_eq!((first.changes, first.behind, first.threshold), (60, 0, 50));
    assert_eq!(first.cursor.get(&first.site_id).0, first.version);

    // Whole: streamed with its length, ETag and headers; the body is what they say.
    let response = get(&server, "/db/notes/snapshot", Some(RW)).await?;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let etag = format!("\"{}\"", first.sha256);
    assert_eq!(headers["etag"], etag.as_str());
    assert_eq!(headers["content-length"], first.bytes.to_string().as_str());
    assert_eq!(headers["accept-ranges"], "bytes");
    assert_eq!(headers[SHA256_HEADER], first.sha256.as_str());
    assert_eq!(headers[SITE_HEADER], first.site_id.to_hex().as_str());
    assert_eq!(headers[CHANGES_HEADER], "60");
    let body = response.bytes().await?;
    assert_eq!(body.len() as u64, first.bytes);
    assert_eq!(hex::encode(sha2::Sha256::digest(&body)), first.sha256);

    // A range of the same snapshot: 206 with that slice.
    let ranged = server
        .client
        .get(server.url("/db/notes/snapshot"))
        .bearer_auth(RW)
        .header("range", "bytes=1000-")
        .header("if-range", &etag)
        .send()
        .await?;
    assert_eq!(ranged.status(), 206);
    assert_eq!(
        ranged.headers()["content-range"],
        format!("bytes 1000-{}/{}", first.bytes - 1, first.bytes).as_str()
    );
    assert_eq!(ranged.bytes().await?, body.slice(1000..));
    // A range of another snapshot: the whole current one.
    let other = server
        .client
        .get(server.url("/db/notes/snapshot"))
        .bearer_auth(RW)
        .header("range", "bytes=1000-")
        .header("if-range", "\"0000\"")
        .send()
        .await?;
    assert_eq!(other.status(), 200);
    assert_eq!(other.bytes().await?, body);
    let head = server
        .client
        .head(server.url("/db/notes/snapshot"))
        .bearer_auth(RW)
        .send()
        .await?;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["etag"], etag.as_str());
    assert!(head.bytes().await?.is_empty());

    // The file installs as a replica holding the server's rows.
    let client_dir = tempfile::tempdir()?;
    let file = client_dir.path().join("download.db");
    std::fs::write(&file, &body)?;
    let report = Store::install_snapshot(&file, client_dir.path().join("r.db"), None).await?;
    assert_eq!(report.rows, 60);

    // Moved on by less than the threshold: the same snapshot, `behind` says how far.
    write_rows(&server.replica("notes"), 100, 30)?;
    let second = info(&server).await?;
    assert_eq!(
        (second.sha256.as_str(), second.behind),
        (first.sha256.as_str(), 30)
    );
    assert_eq!(cached_files(&server).len(), 1);
    // By the threshold: made again, and the old file goes.
    write_rows(&server.replica("notes"), 200, 20)?;
    let third = info(&server).await?;
    assert_ne!(third.sha256, first.sha256);
    assert_eq!((third.changes, third.behind), (110, 0));
    assert!(third.version > first.version);
    assert_eq!(
        cached_files(&server).len(),
        1,
        "{:?}",
        cached_files(&server)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_needs_read_access_to_the_database() -> Result<()> {
    let server = start(5).await?;
    notes_with_rows(&server, 10).await?;
    for path in ["/db/notes/snapshot", "/db/notes/snapshot/info"] {
        let none = get(&server, path, None).await?;
        assert_eq!(none.status(), 401, "{path} without a token");
        let wrong = get(&server, path, Some("not-a-token")).await?;
        assert_eq!(wrong.status(), 401, "{path} with an unknown token");
        let other = get(&server, path, Some(OTHER)).await?;
        assert_eq!(other.status(), 403, "{path} with another database's token");
        let body: serde_json::Value = other.json().await?;
        assert_eq!(body["code"], "FORBIDDEN");
        let read_only = get(&server, path, Some(RO)).await?;
        assert_eq!(read_only.status(), 200, "{path} with a read-only token");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_wait_for_one_build() -> Result<()> {
    let server = start(50).await?;
    notes_with_rows(&server, 500).await?;
    let answers = futures_util::future::join_all((0..4).map(|_| info(&server))).await;
    let answers: Vec<SnapshotInfo> = answers.into_iter().collect::<Result<_>>()?;
    for a in &answers {
        assert_eq!(
            (&a.sha256, a.built_at_ms),
            (&answers[0].sha256, answers[0].built_at_ms),
            "one build served every request"
        );
    }
    assert_eq!(cached_files(&server).len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_outlives_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config: ServerConfig = config(&dir);
    config.snapshot_threshold = 50;
    let serve = |config: ServerConfig| async move {
        let server = Server::bind_with_auth(config, auth()).await?;
        let addr = server.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = stopped.await;
        }));
        anyhow::Ok((addr, stop, task))
    };
    let client = reqwest::Client::new();
    let info_at = |addr: std::net::SocketAddr| {
        let client = client.clone();
        async move {
            let r = client
                .get(format!("http://{addr}/db/notes/snapshot/info"))
                .bearer_auth(RW)
                .send()
                .await?;
            anyhow::Ok((r.status().as_u16(), r.text().await?))
        }
    };
    let (addr, stop, task) = serve(config.clone()).await?;
    // A stream of a token with `create` creates the database (a snapshot
    // request never does).
    let created = client
        .get(format!(
            "http://{addr}/db/notes/stream?peerId=0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f"
        ))
        .bearer_auth(RW)
        .send()
        .await?;
    assert_eq!(created.status(), 200);
    drop(created);
    assert_eq!(info_at(addr).await?.0, 404);
    write_rows(&dir.path().join("data").join("notes.db"), 0, 80)?;
    let (status, before) = info_at(addr).await?;
    assert_eq!(status, 200, "{before}");
    let _ = stop.send(());
    task.await.context("serve")??;

    let (addr, stop, task) = serve(config).await?;
    let (status, after) = info_at(addr).await?;
    assert_eq!(status, 200, "{after}");
    let before: SnapshotInfo = serde_json::from_str(&before)?;
    let after: SnapshotInfo = serde_json::from_str(&after)?;
    assert_eq!(
        (after.sha256, after.built_at_ms),
        (before.sha256, before.built_at_ms),
        "the cached snapshot was reused"
    );
    let _ = stop.send(());
    task.await.context("serve")??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_file_removed_from_under_the_server_is_made_again() -> Result<()> {
    let server = start(50).await?;
    notes_with_rows(&server, 100).await?;
    let first = info(&server).await?;
    let dir = server.dir.path().join("data").join(SNAPSHOT_DIR);
    for file in cached_files(&server) {
        std::fs::remove_file(dir.join(file))?;
    }
    let gone = get(&server, "/db/notes/snapshot", Some(RW)).await?;
    assert_eq!(gone.status(), 500);
    let again = info(&server).await?;
    assert_ne!(again.built_at_ms, first.built_at_ms, "made again");
    let response = get(&server, "/db/notes/snapshot", Some(RW)).await?;
    assert_eq!(response.status(), 200);
    let body = response.bytes().await?;
    assert_eq!(hex::encode(sha2::Sha256::digest(&body)), again.sha256);
    Ok(())
}
