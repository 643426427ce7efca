//! End-to-end tests of the HTTP + SSE routes over real sockets.

mod support;

use anyhow::Result;
use crsync_peer::wire::{Encoding, MessageKind, TransportMessage};
use crsync_peer::{Cursor, SiteId, Store};
use serde_json::{Value, json};
use support::*;

async fn get_status(server: &TestServer, path: &str, token: Option<&str>) -> Result<(u16, Value)> {
    let mut request = server.client.get(server.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, serde_json::from_str(&response.text().await?)?))
}

type Corrupt = fn(&mut Value);

fn sync_body(peer: &str) -> String {
    json!({"type": "sync", "peerId": peer, "cursor": {"peers": {}}}).to_string()
}

/// A `data` message holding one row written on a client replica.
async fn client_data(dir: &std::path::Path) -> Result<(SiteId, Value)> {
    let store = Store::open(dir.join("client.db")).await?;
    store.write(|tx| tx.execute_batch(SCHEMA)).await?;
    store.enable_crr(&["todo"]).await?;
    store
        .write(|tx| tx.execute("INSERT INTO todo VALUES (1, 'milk')", []))
        .await?;
    let mut batches = store.changes_since(&Cursor::new()).await?;
    let batch = batches.next_batch().await.expect("one batch")?;
    let message = TransportMessage::data(store.site_id(), &batch, false, 1, Encoding::Lossless);
    let site = store.site_id();
    store.close().await?;
    Ok((site, serde_json::from_str(&message.to_json())?))
}

#[tokio::test]
async fn health_and_unknown_route() -> Result<()> {
    let server = TestServer::start().await?;
    let (status, body) = get_status(&server, "/health", None).await?;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    assert_eq!(body["maxBodyBytes"], 16 * 1024 * 1024);
    let (status, body) = get_status(&server, "/nope", None).await?;
    assert_eq!((status, body["code"].as_str()), (404, Some("NOT_FOUND")));
    let (status, body) = get_status(&server, "/db/notes/sync", Some(RW)).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("METHOD_NOT_ALLOWED"))
    );
    Ok(())
}

#[tokio::test]
async fn auth_matrix() -> Result<()> {
    let server = TestServer::start().await?;
    // Read-only tokens may not create it.
    server.create("notes").await?;
    let stream = |peer: &str| format!("/db/notes/stream?peerId={peer}");

    // No token, wrong token: 401 with a JSON error.
    let response = server
        .client
        .get(server.url(&stream(PEER_A)))
        .send()
        .await?;
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body: Value = serde_json::from_str(&response.text().await?)?;
    assert_eq!(body["type"], "error");
    assert_eq!(body["code"], "UNAUTHORIZED");
    let (status, body) = get_status(&server, &stream(PEER_A), Some("wrong")).await?;
    assert_eq!((status, body["code"].as_str()), (401, Some("UNAUTHORIZED")));
    let (status, _) = server
        .post("notes", "sync", "wrong", sync_body(PEER_A))
        .await?;
    assert_eq!(status, 401);

    // A token for another database: 403.
    let (status, body) = get_status(&server, &stream(PEER_A), Some(OTHER)).await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("FORBIDDEN")));
    let (status, body) = server
        .post("notes", "sync", OTHER, sync_body(PEER_A))
        .await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("FORBIDDEN")));

    // Read-only: may stream and sync, not send data.
    let mut reader = server.open_stream("notes", PEER_A, RO).await?;
    assert_eq!(
        reader.next().await?.map(|m| m.kind),
        Some(MessageKind::Connect)
    );
    let (status, body) = server.post("notes", "sync", RO, sync_body(PEER_A)).await?;
    assert_eq!((status, body), (200, json!({"success": true})));
    let (_, data) = client_data(server.dir.path()).await?;
    let mut data = data;
    data["peerId"] = json!(PEER_A);
    let (status, body) = server.post("notes", "data", RO, data.to_string()).await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("FORBIDDEN")));
    assert_eq!(replica_counts(&server.replica("notes"))?, (0, 0));
    // ...but a bare eose (no changes, no ranges), which every Peer sends, is fine.
    let eose = json!({"type": "data", "peerId": PEER_A, "data": {"type": "eose", "data": []}});
    let (status, body) = server.post("notes", "data", RO, eose.to_string()).await?;
    assert_eq!((status, body), (200, json!({"success": true})));
    // Ranges from a read-only client are dropped: they cannot move the server's cursor.
    let ranges = json!({"type": "data", "peerId": PEER_A,
        "data": {"type": "eose", "data": [], "ranges": {PEER_A: [0, 5]}}});
    let (status, body) = server.post("notes", "data", RO, ranges.to_string()).await?;
    assert_eq!((status, body), (200, json!({"success": true})));
    let server_cursor = server.post("notes", "sync", RO, sync_body(PEER_A)).await?;
    assert_eq!(server_cursor.0, 200);

    // The token given as a query parameter (EventSource cannot set headers).
    let response = server
        .client
        .get(server.url(&format!("/db/notes/stream?peerId={PEER_B}&token={RW}")))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let mut reader_b = SseReader::new(response);
    assert_eq!(
        reader_b.next().await?.map(|m| m.kind),
        Some(MessageKind::Connect)
    );

    // The all-databases (environment) token works everywhere.
    for db in ["notes", "todo", "anything"] {
        let mut reader = server.open_stream(db, PEER_C, ENV).await?;
        assert_eq!(
            reader.next().await?.map(|m| m.kind),
            Some(MessageKind::Connect)
        );
    }
    Ok(())
}

#[tokio::test]
async fn env_token_from_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = config(&dir);
    let mut ro = crsync_node_server::TokenConfig::new("ro", ["notes"]);
    ro.access = crsync_node_server::Access::ReadOnly;
    config.tokens.push(ro);
    let auth = crsync_node_server::Auth::from_config(&config, Some("from-env".into()))?;
    let server = crsync_node_server::Server::bind_with_auth(config, auth).await?;
    let addr = server.local_addr();
    let task = tokio::spawn(server.serve(std::future::pending()));
    let client = reqwest::Client::new();
    for (token, db, expected) in [
        ("from-env", "x", 200),
        // The read-only token may not create notes: 404, then the env token does.
        ("ro", "notes", 404),
        ("from-env", "notes", 200),
        ("ro", "notes", 200),
        ("ro", "x", 403),
    ] {
        let response = client
            .get(format!("http://{addr}/db/{db}/stream?peerId={PEER_A}"))
            .bearer_auth(token)
            .send()
            .await?;
        assert_eq!(response.status(), expected, "{token} on {db}");
    }
    task.abort();
    Ok(())
}

#[tokio::test]
async fn refuses_to_start_without_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = config(&dir);
    config.token_env = "CRSYNC_TEST_UNSET_VARIABLE".into();
    let err = crsync_node_server::Server::bind(config.clone())
        .await
        .expect_err("no tokens configured");
    assert!(err.to_string().contains("allow_anonymous"), "{err}");
    config.allow_anonymous = true;
    let server = crsync_node_server::Server::bind(config).await?;
    let addr = server.local_addr();
    let task = tokio::spawn(server.serve(std::future::pending()));
    let response = reqwest::get(format!("http://{addr}/db/notes/stream?peerId={PEER_A}")).await?;
    assert_eq!(response.status(), 200);
    task.abort();
    Ok(())
}

#[tokio::test]
async fn bad_peer_id_is_400() -> Result<()> {
    let server = TestServer::start().await?;
    for query in ["", "?peerId=", "?peerId=zz", "?peerId=abcd"] {
        let (status, body) =
            get_status(&server, &format!("/db/notes/stream{query}"), Some(RW)).await?;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("MALFORMED")),
            "{query}"
        );
        assert_eq!(body["type"], "error");
    }
    Ok(())
}

#[tokio::test]
async fn stream_starts_with_connect_then_sync() -> Result<()> {
    let server = TestServer::start().await?;
    let mut reader = server.open_stream("notes", PEER_A, RW).await?;
    let connect = reader.next().await?.expect("connect");
    assert_eq!(connect.kind, MessageKind::Connect);
    let server_site: SiteId = connect.peer_id.parse()?;
    assert_ne!(server_site.to_hex(), PEER_A);
    let sync = reader.next_non_ping().await?.expect("sync");
    assert_eq!(sync.kind, MessageKind::Sync);
    assert_eq!(sync.peer_id, connect.peer_id);
    assert!(sync.cursor.is_some());
    Ok(())
}

#[tokio::test]
async fn pings_follow_the_configured_interval() -> Result<()> {
    let server =
        TestServer::start_with(|c| c.ping_interval = std::time::Duration::from_millis(300)).await?;
    let mut reader = server.open_stream("notes", PEER_A, RW).await?;
    let server_id = reader.next().await?.expect("connect").peer_id;
    loop {
        let message = reader.next().await?.expect("stream open");
        if message.kind == MessageKind::Ping {
            assert_eq!(message.peer_id, server_id);
            break;
        }
    }
    Ok(())
}

#[tokio::test]
async fn second_stream_is_refused_then_allowed_after_close() -> Result<()> {
    let server = TestServer::start().await?;
    let mut first = server.open_stream("notes", PEER_A, RW).await?;
    assert_eq!(
        first.next().await?.map(|m| m.kind),
        Some(MessageKind::Connect)
    );

    let mut second = server.open_stream("notes", PEER_A, RW).await?;
    let refusal = second.next().await?.expect("error frame");
    assert_eq!(refusal.kind, MessageKind::Error);
    assert_eq!(refusal.code.as_deref(), Some("ALREADY_CONNECTED"));
    // v1 clients read only `error`, which wire v1 gives as the bare code
    assert_eq!(refusal.error.as_deref(), Some("ALREADY_CONNECTED"));
    assert!(refusal.error.is_some());
    assert!(
        second.next().await?.is_none(),
        "the refused stream is closed"
    );

    // Another peer is fine; and once the first stream is gone, the peer may reconnect.
    let mut other = server.open_stream("notes", PEER_B, RW).await?;
    assert_eq!(
        other.next().await?.map(|m| m.kind),
        Some(MessageKind::Connect)
    );
    drop(first);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let mut again = server.open_stream("notes", PEER_A, RW).await?;
        let first_frame = again.next().await?.expect("frame");
        if first_frame.kind == MessageKind::Connect {
            break;
        }
        // The server notices the dropped connection asynchronously; wait for it.
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream never released"
        );
        tokio::task::yield_now().await;
    }
    Ok(())
}

#[tokio::test]
async fn post_without_stream_is_not_connected() -> Result<()> {
    let server = TestServer::start().await?;
    // A POST never creates a database: 404 until a stream created it.
    let (status, body) = server.post("notes", "sync", RW, sync_body(PEER_A)).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("UNKNOWN_DATABASE"))
    );
    server.create("notes").await?;
    let (status, body) = server.post("notes", "sync", RW, sync_body(PEER_A)).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("NOT_CONNECTED"))
    );
    assert_eq!(body["type"], "error");
    Ok(())
}

#[tokio::test]
async fn malformed_bodies_are_400() -> Result<()> {
    let server = TestServer::start().await?;
    let mut reader = server.open_stream("notes", PEER_A, RW).await?;
    reader.next().await?;
    for body in [
        "{not json".to_string(),
        "[]".to_string(),
        json!({"type": "bogus", "peerId": PEER_A}).to_string(),
        // The wrong type for the route.
        json!({"type": "ping", "peerId": PEER_A}).to_string(),
    ] {
        let (status, json) = server.post("notes", "sync", RW, body.clone()).await?;
        assert_eq!(
            (status, json["code"].as_str()),
            (400, Some("MALFORMED")),
            "{body}"
        );
    }
    let (status, json) = server
        .post(
            "notes",
            "sync",
            RW,
            json!({"type": "sync", "peerId": "xyz", "cursor": {"peers": {}}}).to_string(),
        )
        .await?;
    assert_eq!((status, json["code"].as_str()), (400, Some("MALFORMED")));
    Ok(())
}

#[tokio::test]
async fn oversized_body_is_413_json() -> Result<()> {
    let server = TestServer::start_with(|c| c.max_body_bytes = 1024).await?;
    let mut reader = server.open_stream("notes", PEER_A, RW).await?;
    reader.next().await?;
    let body = json!({"type": "data", "peerId": PEER_A, "data": {"type": "changes", "data": [], "pad": "x".repeat(4096)}});
    let (status, json) = server.post("notes", "data", RW, body.to_string()).await?;
    assert_eq!(status, 413);
    assert_eq!(
        json,
        json!({"type": "error", "error": "body exceeds 1024 bytes", "code": "PAYLOAD_TOO_LARGE"})
    );
    Ok(())
}

#[tokio::test]
async fn unknown_database_for_a_token_without_create() -> Result<()> {
    let server = TestServer::start_with(|c| c.allow_create = false).await?;
    let (status, body) = get_status(
        &server,
        &format!("/db/notes/stream?peerId={PEER_A}"),
        Some(RO),
    )
    .await?;
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("create = true")),
        "{body}"
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("UNKNOWN_DATABASE"))
    );
    assert!(!server.replica("notes").exists());
    let (status, body) = get_status(
        &server,
        &format!("/db/bad.name/stream?peerId={PEER_A}"),
        Some(ENV),
    )
    .await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("MALFORMED")));
    Ok(())
}

#[tokio::test]
async fn created_database_has_the_schema_as_crrs() -> Result<()> {
    let server = TestServer::start().await?;
    let mut reader = server.open_stream("todo", PEER_A, RW).await?;
    reader.next().await?;
    let conn = crsync_peer::rusqlite::Connection::open(server.replica("todo"))?;
    let crr: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name = 'todo__crsql_clock'",
        [],
        |r| r.get(0),
    )?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    conn.execute_batch("SELECT crsql_finalize()")?;
    assert_eq!((crr, version), (1, 1));
    Ok(())
}

#[tokio::test]
async fn data_is_applied_and_bad_data_is_refused() -> Result<()> {
    let server = TestServer::start().await?;
    let (site, good) = client_data(server.dir.path()).await?;
    let peer = site.to_hex();
    let mut reader = server.open_stream("notes", &peer, RW).await?;
    assert_eq!(
        reader.next().await?.map(|m| m.kind),
        Some(MessageKind::Connect)
    );
    let (status, _) = server.post("notes", "sync", RW, sync_body(&peer)).await?;
    assert_eq!(status, 200);

    let cases: [(&str, Corrupt, &str); 3] = [
        (
            "unknown table",
            |m| m["data"]["data"][0]["table"] = json!("nope"),
            "INVALID_CHANGE",
        ),
        (
            "bad hex",
            |m| m["data"]["data"][0]["pk"] = json!("0g"),
            "MALFORMED",
        ),
        (
            "short site id",
            |m| m["data"]["data"][0]["site_id"] = json!("abcd"),
            "MALFORMED",
        ),
    ];
    for (what, corrupt, code) in cases {
        let mut bad = good.clone();
        corrupt(&mut bad);
        let (status, body) = server.post("notes", "data", RW, bad.to_string()).await?;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some(code)),
            "{what}: {body}"
        );
        assert_eq!(body["type"], "error");
        assert_eq!(replica_counts(&server.replica("notes"))?, (0, 0), "{what}");
    }

    let (status, body) = server.post("notes", "data", RW, good.to_string()).await?;
    assert_eq!((status, body), (200, json!({"success": true})));
    let (rows, _) = replica_counts(&server.replica("notes"))?;
    assert_eq!(rows, 1);
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_ends_streams() -> Result<()> {
    let mut server = TestServer::start().await?;
    let mut reader = server.open_stream("notes", PEER_A, RW).await?;
    assert_eq!(
        reader.next().await?.map(|m| m.kind),
        Some(MessageKind::Connect)
    );
    server.shutdown().await?;
    // The stream ends (possibly after frames already queued).
    while reader
        .next()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .is_some()
    {}
    assert!(
        server
            .client
            .get(server.url("/health"))
            .send()
            .await
            .is_err()
    );
    Ok(())
}

/// Reads frames until a `data` message with at least one change.
async fn next_changes(reader: &mut SseReader) -> Result<Value> {
    loop {
        let message = reader.next().await?.expect("stream open");
        if message.kind == MessageKind::Data {
            let data = message.data.expect("data");
            if !data.data.is_empty() {
                return Ok(serde_json::to_value(&data.data)?);
            }
        }
    }
}

#[tokio::test]
async fn value_encoding_follows_the_crsync_parameter() -> Result<()> {
    let server = TestServer::start().await?;
    // Create the database, then put a blob in it through a second connection.
    let mut reader = server.open_stream("notes", PEER_A, RW).await?;
    reader.next().await?;
    drop(reader);
    let replica = Store::open(server.replica("notes")).await?;
    replica
        .write(|tx| tx.execute("INSERT INTO kv VALUES ('b', x'00ff')", []))
        .await?;
    replica.close().await?;

    for (peer, param, expected) in [
        // to a v1 peer, as a v1 (Node) peer writes a blob itself
        (PEER_B, "", json!({"type": "Buffer", "data": [0, 255]})),
        (PEER_C, "&crsync=lossless", json!({"$blob": "AP8="})),
    ] {
        let response = server
            .client
            .get(server.url(&format!("/db/notes/stream?peerId={peer}{param}")))
            .bearer_auth(RW)
            .send()
            .await?;
        let mut reader = SseReader::new(response);
        assert_eq!(
            reader.next().await?.map(|m| m.kind),
            Some(MessageKind::Connect)
        );
        // A crsync client (the `crsync` parameter) presents its session secret.
        let session = reader.session().map(str::to_owned);
        assert_eq!(session.is_some(), !param.is_empty());
        let (status, _) = server
            .post_with(
                "notes",
                "sync",
                Some(RW),
                session.as_deref(),
                sync_body(peer),
            )
            .await?;
        assert_eq!(status, 200);
        let changes = next_changes(&mut reader).await?;
        let val = changes
            .as_array()
            .and_then(|c| c.iter().find(|c| c["cid"] == "v"))
            .map(|c| c["val"].clone());
        assert_eq!(val, Some(expected), "{param}: {changes}");
    }
    Ok(())
}

#[tokio::test]
async fn cors_preflight() -> Result<()> {
    let server = TestServer::start_with(|c| {
        c.cors.allowed_origins = vec!["http://app.example".into()];
    })
    .await?;
    let response = server
        .client
        .request(reqwest::Method::OPTIONS, server.url("/db/notes/sync"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await?;
    assert!(response.status().is_success());
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    let response = server
        .client
        .get(server.url("/health"))
        .header("origin", "http://evil.example")
        .send()
        .await?;
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    Ok(())
}

#[tokio::test]
async fn large_upload_under_the_limit_is_accepted() -> Result<()> {
    let server = TestServer::start().await?;
    let store = client_store(&server.dir.path().join("big.db")).await?;
    let title = "x".repeat(3 * 1024 * 1024); // above the TypeScript server's 1 MiB default
    store
        .write(move |tx| tx.execute("INSERT INTO todo VALUES (1, ?1)", [title]))
        .await?;
    let mut batches = store.changes_since(&Cursor::new()).await?;
    let batch = batches.next_batch().await.expect("one batch")?;
    let message = TransportMessage::data(store.site_id(), &batch, false, 1, Encoding::Lossless);
    let peer = store.site_id().to_hex();
    store.close().await?;

    let mut reader = server.open_stream("notes", &peer, RW).await?;
    reader.next().await?;
    let body = message.to_json();
    assert!(body.len() > 3 * 1024 * 1024);
    let (status, json) = server.post("notes", "data", RW, body).await?;
    assert_eq!((status, json), (200, json!({"success": true})));
    assert_eq!(replica_counts(&server.replica("notes"))?.0, 1);
    Ok(())
}

#[tokio::test]
async fn concurrent_first_use_creates_one_database() -> Result<()> {
    let server = TestServer::start().await?;
    let peers = [PEER_A, PEER_B, PEER_C];
    let opened =
        futures_util::future::join_all(peers.iter().map(|p| server.open_stream("fresh", p, ENV)))
            .await;
    let mut sites = std::collections::BTreeSet::new();
    for reader in opened {
        let connect = reader?.next().await?.expect("connect");
        sites.insert(connect.peer_id);
    }
    assert_eq!(sites.len(), 1, "one server replica answered all streams");
    Ok(())
}
