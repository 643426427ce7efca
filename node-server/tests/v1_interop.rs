//! crsync against real-world wire-v1 peers (the TypeScript `@app/sync`), modelled in
//! `support/v1.rs` with plain HTTP, SSE and SQL: version holes, LIMIT/OFFSET paging that
//! splits transactions, fire-and-forget POSTs, JavaScript values.
//!
//! Each scenario states what must hold; where today's crsync falls short the test fails
//! with the reason (timeouts are [`v1::LIMIT`], and every wait polls with a deadline).

mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crsync_transports::SseDialer;
use support::v1::harness::*;
use support::v1::{self, V1Config, js};

#[test]
fn model_prints_numbers_like_javascript() {
    let cases: [(f64, &str); 14] = [
        (1.0, "1"),
        (-1.0, "-1"),
        (1.5, "1.5"),
        (0.1, "0.1"),
        (-0.0, "0"),
        (i64::MAX as f64, "9223372036854776000"),
        (-(i64::MAX as f64), "-9223372036854776000"),
        (9007199254740993_i64 as f64, "9007199254740992"),
        (1e21, "1e+21"),
        (123456789012345680000.0, "123456789012345680000"),
        (0.000001, "0.000001"),
        (1e-7, "1e-7"),
        (1.5e-10, "1.5e-10"),
        (f64::NAN, "null"),
    ];
    for (f, want) in cases {
        assert_eq!(js::js_number(f), want, "{f:?}");
    }
    assert_eq!(js::js_number(f64::INFINITY), "null");
    // The exact token a TypeScript peer sends for i64::MAX in an INTEGER column.
    let val = js::JsValue::from_sql(crsync_peer::rusqlite::types::ValueRef::Integer(i64::MAX));
    assert_eq!(val.to_json(), "9223372036854776000");
    let blob = js::JsValue::from_sql(crsync_peer::rusqlite::types::ValueRef::Blob(&[0, 255, 16]));
    assert_eq!(blob.to_json(), r#"{"type":"Buffer","data":[0,255,16]}"#);
}

/// The model's own versions have holes: write -> 1, merge -> 2 used up, write -> 3.
#[test]
fn model_merges_leave_holes_in_own_versions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = v1_db(&dir, "a")?;
    let b = v1_db(&dir, "b")?;
    a.write(|tx| tx.execute("INSERT INTO t (id, s) VALUES (1, 'a1')", []))?;
    b.write(|tx| tx.execute("INSERT INTO t (id, s) VALUES (100, 'b')", []))?;
    let pages = b.pages_lacking(&Default::default(), 100)?;
    a.merge(&pages.concat())?;
    a.write(|tx| tx.execute("INSERT INTO t (id, s) VALUES (2, 'a2')", []))?;
    assert_eq!(own_versions(&a)?, vec![1, 3]);
    let cursor = a.cursor()?;
    assert_eq!(cursor.get(a.site_id()), Some(&3), "{cursor:?}");
    assert!(cursor.contains_key(b.site_id()), "{cursor:?}");
    assert_eq!(a.rows()?.len(), 3);
    Ok(())
}

/// The model against itself (TypeScript to TypeScript): a v1 client and a v1 server
/// exchange their rows, initially and live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_v1_client_and_v1_server_sync() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server_db = v1_db(&dir, "server")?;
    write_row(
        &server_db,
        "INSERT INTO t (id, b, s) VALUES (1, x'0001', 'server')",
    )?;
    let server = v1::V1Server::start(server_db.clone(), V1Config::default()).await?;
    let db = v1_db(&dir, "client")?;
    write_row(&db, "INSERT INTO t (id, r, n) VALUES (2, 2.5, 7)")?;
    let mut client = v1::V1Client::new(db.clone(), server.base(), V1Config::default());
    client.connect().await?;
    let replicas = [
        ("v1 server", Replica::V1(&server_db)),
        ("v1 client", Replica::V1(&db)),
    ];
    wait_identical("both rows on both", &replicas, 2, || client.log().summary()).await?;
    write_row(&db, "INSERT INTO t (id, s) VALUES (3, 'client live')")?;
    write_row(
        &server_db,
        "INSERT INTO t (id, s) VALUES (4, 'server live')",
    )?;
    wait_identical("the live rows on both", &replicas, 4, || {
        client.log().summary()
    })
    .await?;
    let rows = db.rows()?;
    ensure!(
        rows[0].contains("b=0001:blob"),
        "Buffer JSON round trip: {rows:?}"
    );
    Ok(())
}

/// cr-sqlite fact behind the REAL scenarios: at equal `col_version`, an incoming INTEGER
/// beats a local REAL even when it is smaller (3.0 local, 2 incoming -> 2.0), while two
/// REALs compare by value. So a peer that turns a v1 `2` into an INTEGER resolves the
/// conflict differently from one that received `2.0` as a REAL.
#[test]
fn cr_sqlite_ranks_an_incoming_integer_above_a_local_real() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut outcomes = Vec::new();
    for (name, incoming) in [
        ("int", js::JsValue::BigInt(2)),
        ("real", js::JsValue::Number(2.0)),
    ] {
        let local = v1_db(&dir, &format!("local-{name}"))?;
        let remote = v1_db(&dir, &format!("remote-{name}"))?;
        local.write(|tx| tx.execute("INSERT INTO t (id, r) VALUES (1, 3.0)", []))?;
        remote.write(|tx| tx.execute("INSERT INTO t (id, r) VALUES (1, 2.0)", []))?;
        let mut changes = remote.pages_lacking(&Default::default(), 100)?.concat();
        for c in changes.iter_mut().filter(|c| c.cid == "r") {
            assert_eq!(c.col_version, 1);
            c.val = incoming.clone();
        }
        local.merge(&changes)?;
        let r: f64 = local.with(|c| c.query_row("SELECT r FROM t", [], |r| r.get(0)))?;
        outcomes.push(r);
    }
    assert_eq!(
        outcomes,
        vec![2.0, 3.0],
        "[incoming INTEGER 2, incoming REAL 2.0] over local 3.0"
    );
    Ok(())
}

/// Upper bound on the POSTs a v1 client may need here: one round is a `sync`, one POST
/// per page, an `eose`, and one POST per live write; a few resends are tolerated.
const SMALL: usize = 12;

/// Scenario 1: a v1 client whose own versions have a hole (write, merge, write) gets both
/// rows to the crsync server without a resend loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_client_with_version_holes_reaches_the_server_without_a_loop() -> Result<()> {
    let server = v1::crsync_server().await?;
    let dir = tempfile::tempdir()?;
    // One change on the server for the v1 client to merge, from a crsync client.
    let c = crsync_peer(v1::crsync_store(&dir.path().join("c.db")).await?);
    store_write(
        c.store(),
        "INSERT INTO t (id, s) VALUES (100, 'from crsync')",
    )
    .await?;
    c.add_dialer(SseDialer::new(base(&server)));
    wait_rows(
        "the crsync client's row on the server",
        Replica::Server(&server),
        |r| has_ids(r, &[100]),
        String::new,
    )
    .await?;
    c.shutdown().await;

    let db = v1_db(&dir, "v1")?;
    write_row(&db, "INSERT INTO t (id, s) VALUES (1, 'v1 first')")?;
    let mut client = v1::V1Client::new(db.clone(), base(&server), V1Config::default());
    client.connect().await?;
    wait_rows(
        "the server's row merged into the v1 client",
        Replica::V1(&db),
        |r| has_ids(r, &[100]),
        || client.log().summary(),
    )
    .await?;
    write_row(
        &db,
        "INSERT INTO t (id, s) VALUES (2, 'v1 after the merge')",
    )?;
    assert_eq!(
        own_versions(&db)?,
        vec![1, 3],
        "the merge used up version 2"
    );

    wait_rows(
        "both v1 rows on the crsync server",
        Replica::Server(&server),
        |r| has_ids(r, &[1, 2, 100]),
        || client.log().summary(),
    )
    .await?;
    settles(&client, SMALL).await?;
    Ok(())
}

/// Scenario 2: a v1 server whose own versions have holes: a crsync client gets all of its
/// rows, and later live writes (after more merges) arrive too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crsync_client_gets_everything_from_a_v1_server_with_version_holes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = V1Config::default();
    let server_db = v1_db(&dir, "server")?;
    write_row(
        &server_db,
        "INSERT INTO t (id, s) VALUES (1, 'server first')",
    )?;
    let server = v1::V1Server::start(server_db.clone(), config.clone()).await?;
    // Another v1 client makes the server merge (using up a version).
    let other_db = v1_db(&dir, "other")?;
    write_row(
        &other_db,
        "INSERT INTO t (id, s) VALUES (50, 'other client')",
    )?;
    let mut other = v1::V1Client::new(other_db.clone(), server.base(), config.clone());
    other.connect().await?;
    wait_rows(
        "the other client's row on the v1 server",
        Replica::V1(&server_db),
        |r| has_ids(r, &[50]),
        || other.log().summary(),
    )
    .await?;
    write_row(
        &server_db,
        "INSERT INTO t (id, s) VALUES (2, 'server after a merge')",
    )?;
    let versions = own_versions(&server_db)?;
    ensure!(
        versions.len() == 2 && versions[1] > versions[0] + 1,
        "no hole: {versions:?}"
    );

    let c = crsync_peer(v1::crsync_store(&dir.path().join("c.db")).await?);
    c.add_dialer(SseDialer::new(server.base()));
    let context = || format!("v1 server: {}", server.log().summary());
    wait_rows(
        "the v1 server's rows on the crsync client",
        Replica::Store(c.store()),
        |r| has_ids(r, &[1, 2, 50]),
        context,
    )
    .await?;

    // Live: another merge on the server, then a server write.
    write_row(
        &other_db,
        "INSERT INTO t (id, s) VALUES (51, 'other client, live')",
    )?;
    wait_rows(
        "the other client's live row on the v1 server",
        Replica::V1(&server_db),
        |r| has_ids(r, &[51]),
        || other.log().summary(),
    )
    .await?;
    write_row(
        &server_db,
        "INSERT INTO t (id, s) VALUES (3, 'server live')",
    )?;
    wait_identical(
        "the crsync client to match the v1 server after live writes",
        &[
            ("v1 server", Replica::V1(&server_db)),
            ("crsync client", Replica::Store(c.store())),
        ],
        5,
        context,
    )
    .await?;
    server.wait_quiet(Duration::from_secs(1), v1::LIMIT).await?;
    let posts = server.log().posts.len();
    ensure!(
        posts <= 2 * SMALL,
        "the v1 server received {posts} POSTs: {}",
        context()
    );
    c.shutdown().await;
    Ok(())
}

/// Scenario 3a: one v1 transaction of 250 rows, paged by 100, reaches the crsync server
/// whole (the later pages carry the same origin version as the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_transaction_from_a_v1_client_arrives_whole() -> Result<()> {
    let server = v1::crsync_server().await?;
    let dir = tempfile::tempdir()?;
    let db = v1_db(&dir, "v1")?;
    write_bulk(&db, 1, 250)?;
    let mut client = v1::V1Client::new(
        db.clone(),
        base(&server),
        V1Config::default().page_size(100),
    );
    client.connect().await?;
    wait_rows(
        "all 250 rows of one split transaction on the server",
        Replica::Server(&server),
        |r| r.len() == 250,
        || client.log().summary(),
    )
    .await?;
    // A sync, 10 pages, an eose; a resend or two at most.
    settles(&client, 2 * SMALL).await?;
    Ok(())
}

/// Scenario 3b: the same from a v1 server to a crsync client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_transaction_from_a_v1_server_arrives_whole() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server_db = v1_db(&dir, "server")?;
    write_bulk(&server_db, 1, 250)?;
    let server = v1::V1Server::start(server_db, V1Config::default().page_size(100)).await?;
    let c = crsync_peer(v1::crsync_store(&dir.path().join("c.db")).await?);
    c.add_dialer(SseDialer::new(server.base()));
    wait_rows(
        "all 250 rows of one split transaction on the crsync client",
        Replica::Store(c.store()),
        |r| r.len() == 250,
        || server.log().summary(),
    )
    .await?;
    c.shutdown().await;
    Ok(())
}

/// Scenario 3c: a large initial upload arrives complete: 30 transactions of 300 changes
/// (75 rows of 4 columns; more would make the v1 peer's quadratic OFFSET paging, in this
/// debug build, the slowest part of the test), in pages of 100, so every transaction is
/// split in three, all POSTed without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_initial_upload_from_a_v1_client_arrives_complete() -> Result<()> {
    let server = v1::crsync_server().await?;
    let dir = tempfile::tempdir()?;
    let db = v1_db(&dir, "v1")?;
    for t in 0..30 {
        write_bulk(&db, 1 + t * 75, 75)?;
    }
    let mut client = v1::V1Client::new(
        db.clone(),
        base(&server),
        V1Config::default().page_size(100),
    );
    client.connect().await?;
    wait_rows(
        "all 2250 rows on the server",
        Replica::Server(&server),
        |r| r.len() == 2250,
        || client.log().summary(),
    )
    .await?;
    // A sync, 90 pages, an eose; at most one full resend.
    settles(&client, 2 * 92).await?;
    Ok(())
}

/// Scenario 4a: a blob sent as Node Buffer JSON arrives as a blob, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_json_blob_from_a_v1_client_is_stored_as_a_blob() -> Result<()> {
    let server = v1::crsync_server().await?;
    let dir = tempfile::tempdir()?;
    let db = v1_db(&dir, "v1")?;
    write_row(&db, "INSERT INTO t (id, b) VALUES (1, x'00ff10')")?;
    let mut client = v1::V1Client::new(db.clone(), base(&server), V1Config::default());
    client.connect().await?;
    let rows = wait_rows(
        "row 1 on the server",
        Replica::Server(&server),
        |r| has_ids(r, &[1]),
        || client.log().summary(),
    )
    .await?;
    let got = row(&rows, 1).context("row 1")?;
    ensure!(
        got.contains("b=00FF10:blob"),
        "the Buffer JSON blob did not arrive as a blob: {got}"
    );
    settles(&client, SMALL).await?;
    Ok(())
}

/// Scenario 4b: integers beyond 2^53 arrive as JavaScript prints them
/// (`9223372036854776000`); they are applied, not refused, and later rows still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounded_big_integers_are_applied_and_later_rows_still_arrive() -> Result<()> {
    let server = v1::crsync_server().await?;
    let dir = tempfile::tempdir()?;
    let db = v1_db(&dir, "v1")?;
    write_row(&db, "INSERT INTO t (id, n) VALUES (1, 9223372036854775807)")?;
    write_row(
        &db,
        "INSERT INTO t (id, n) VALUES (2, -9223372036854775807)",
    )?;
    let mut client = v1::V1Client::new(db.clone(), base(&server), V1Config::default());
    client.connect().await?;
    let rows = wait_rows(
        "rows 1 and 2 (n beyond 2^53) on the server",
        Replica::Server(&server),
        |r| has_ids(r, &[1, 2]),
        || client.log().summary(),
    )
    .await?;
    for id in [1, 2] {
        let got = row(&rows, id).context("row")?;
        ensure!(
            !got.contains("n=NULL"),
            "row {id} arrived without its big integer: {got}"
        );
    }
    write_row(&db, "INSERT INTO t (id, n) VALUES (3, 3)")?;
    wait_rows(
        "a later row from the same v1 client",
        Replica::Server(&server),
        |r| has_ids(r, &[1, 2, 3]),
        || client.log().summary(),
    )
    .await?;
    settles(&client, SMALL).await?;
    Ok(())
}

/// Scenario 4c: a REAL written as `1.0` on one crsync replica, relayed by a v1 server as
/// JSON `1`, is a REAL on another crsync replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_relayed_as_json_1_by_a_v1_server_stays_real() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server_db = v1_db(&dir, "server")?;
    let server = v1::V1Server::start(server_db.clone(), V1Config::default()).await?;
    let a = crsync_peer(v1::crsync_store(&dir.path().join("a.db")).await?);
    store_write(a.store(), "INSERT INTO t (id, r) VALUES (1, 1.0)").await?;
    a.add_dialer(SseDialer::new(server.base()));
    wait_rows(
        "crsync client A's row on the v1 server",
        Replica::V1(&server_db),
        |r| has_ids(r, &[1]),
        || server.log().summary(),
    )
    .await?;
    let b = crsync_peer(v1::crsync_store(&dir.path().join("b.db")).await?);
    b.add_dialer(SseDialer::new(server.base()));
    let rows = wait_rows(
        "the row on crsync client B",
        Replica::Store(b.store()),
        |r| has_ids(r, &[1]),
        || server.log().summary(),
    )
    .await?;
    let got = row(&rows, 1).context("row 1")?;
    ensure!(
        got.contains("r=1.0:real"),
        "the REAL 1.0 sent as JSON 1 is not a REAL: {got}"
    );
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

/// Scenario 4d: a blob written on a crsync replica reaches a v1 client as a blob (Buffer
/// JSON), not as hex text, and without crsync's `$`-tagged values it never asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_from_crsync_reaches_a_v1_client_as_a_blob() -> Result<()> {
    let server = v1::crsync_server().await?;
    let dir = tempfile::tempdir()?;
    let c = crsync_peer(v1::crsync_store(&dir.path().join("c.db")).await?);
    store_write(c.store(), "INSERT INTO t (id, b) VALUES (1, x'00ff10')").await?;
    c.add_dialer(SseDialer::new(base(&server)));
    wait_rows(
        "the crsync client's row on the server",
        Replica::Server(&server),
        |r| has_ids(r, &[1]),
        String::new,
    )
    .await?;
    let db = v1_db(&dir, "v1")?;
    let mut client = v1::V1Client::new(db.clone(), base(&server), V1Config::default());
    client.connect().await?;
    let rows = wait_rows(
        "the row on the v1 client",
        Replica::V1(&db),
        |r| has_ids(r, &[1]),
        || client.log().summary(),
    )
    .await?;
    let got = row(&rows, 1).context("row 1")?;
    ensure!(
        got.contains("b=00FF10:blob"),
        "the blob did not reach the v1 client as a blob: {got}"
    );
    ensure!(
        client.log().tagged_values == 0,
        "crsync sent $-tagged values to a v1 client: {}",
        client.log().summary()
    );
    settles(&client, SMALL).await?;
    c.shutdown().await;
    Ok(())
}

/// Scenario 5: concurrent writes of the same REAL cells (same col_version) on a crsync
/// replica and on a v1 client: `1.0` on both (the v1 one sent as `1`), and `3.0` against
/// `2.0` (sent as `2`). After syncing both ways every replica holds the same value of the
/// same type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_real_writes_converge_in_value_and_type() -> Result<()> {
    let server = v1::crsync_server().await?;
    let dir = tempfile::tempdir()?;
    let c = crsync_peer(v1::crsync_store(&dir.path().join("c.db")).await?);
    store_write(c.store(), "INSERT INTO t (id, r) VALUES (1, 1.0), (2, 3.0)").await?;
    let db = v1_db(&dir, "v1")?;
    write_row(&db, "INSERT INTO t (id, r) VALUES (1, 1.0), (2, 2.0)")?;
    // The crsync replica syncs first, then the v1 client.
    c.add_dialer(SseDialer::new(base(&server)));
    wait_rows(
        "the crsync client's rows on the server",
        Replica::Server(&server),
        |r| has_ids(r, &[1, 2]),
        String::new,
    )
    .await?;
    let mut client = v1::V1Client::new(db.clone(), base(&server), V1Config::default());
    client.connect().await?;
    wait_identical(
        "every replica to agree on r's value and type",
        &[
            ("crsync server", Replica::Server(&server)),
            ("crsync client", Replica::Store(c.store())),
            ("v1 client", Replica::V1(&db)),
        ],
        2,
        || client.log().summary(),
    )
    .await?;
    settles(&client, SMALL).await?;
    c.shutdown().await;
    Ok(())
}

/// Scenario 6: the v1 client's pages arrive reordered (the first page last) and one is
/// lost; after it reconnects (a new stream, a new round) everything it wrote is on the
/// server, with a bounded number of POSTs. Each page is one whole transaction (2 rows of 4
/// columns, pages of 8), so no transaction is split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_and_lost_posts_recover_at_reconnect() -> Result<()> {
    let server = v1::crsync_server().await?;
    let dir = tempfile::tempdir()?;
    let db = v1_db(&dir, "v1")?;
    for t in 0..6 {
        write_bulk(&db, 1 + t * 2, 2)?;
    }
    let mut client = v1::V1Client::new(db.clone(), base(&server), V1Config::default().page_size(8));
    client.set_faults(|post| match (post.round, post.data_index) {
        (1, Some(0)) => v1::PostFate::Delay(Duration::from_millis(500)),
        (1, Some(3)) => v1::PostFate::Drop,
        _ => v1::PostFate::Send,
    });
    client.connect().await?;
    client.wait_quiet(Duration::from_secs(1), v1::LIMIT).await?;
    let log = client.log();
    ensure!(
        log.posts.iter().any(|p| p.fate == v1::PostFate::Drop),
        "no page was dropped: {}",
        log.summary()
    );

    client.clear_faults();
    client.connect().await?;
    wait_rows(
        "all 12 rows on the server after the reconnect",
        Replica::Server(&server),
        |r| r.len() == 12,
        || client.log().summary(),
    )
    .await?;
    settles(&client, 3 * SMALL).await?;
    Ok(())
}

/// Scenario 7: a crsync server relays a v1 client's changes to a crsync client and the
/// crsync client's to the v1 client, initially and live: all three end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crsync_server_relays_between_a_v1_client_and_a_crsync_client() -> Result<()> {
    let server = v1::crsync_server().await?;
    let dir = tempfile::tempdir()?;
    let c = crsync_peer(v1::crsync_store(&dir.path().join("c.db")).await?);
    store_write(
        c.store(),
        "INSERT INTO t (id, r, n, s) VALUES (1, 0.5, 10, 'crsync')",
    )
    .await?;
    let db = v1_db(&dir, "v1")?;
    write_row(&db, "INSERT INTO t (id, r, n, s) VALUES (2, 1.5, 20, 'v1')")?;
    c.add_dialer(SseDialer::new(base(&server)));
    let mut client = v1::V1Client::new(db.clone(), base(&server), V1Config::default());
    client.connect().await?;
    let replicas = [
        ("crsync server", Replica::Server(&server)),
        ("crsync client", Replica::Store(c.store())),
        ("v1 client", Replica::V1(&db)),
    ];
    wait_identical("the initial rows everywhere", &replicas, 2, || {
        client.log().summary()
    })
    .await?;

    store_write(
        c.store(),
        "INSERT INTO t (id, r, n, s) VALUES (3, 2.5, 30, 'crsync live')",
    )
    .await?;
    write_row(
        &db,
        "INSERT INTO t (id, r, n, s) VALUES (4, 3.5, 40, 'v1 live')",
    )?;
    wait_identical("the live rows everywhere", &replicas, 4, || {
        client.log().summary()
    })
    .await?;
    settles(&client, SMALL).await?;
    c.shutdown().await;
    Ok(())
}

/// Scenario 7b: a v1 client that reconnects re-sends the crsync client's rows stamped
/// with its own local versions (the v1 peer is a few writes ahead, so its stamp 6 for the
/// crsync client's version 1 looks like a gap), and its cursor claims those versions too.
/// That may neither make the server claim versions beyond the crsync client's own, nor
/// hide the crsync client's later writes, nor start a resend loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_client_reconnect_does_not_hide_a_crsync_clients_later_writes() -> Result<()> {
    let server = v1::crsync_server().await?;
    let dir = tempfile::tempdir()?;
    let c = crsync_peer(v1::crsync_store(&dir.path().join("c.db")).await?);
    let c_site = c.site_id().to_hex();
    let db = v1_db(&dir, "v1")?;
    for id in 10..15 {
        db.write(|tx| tx.execute("INSERT INTO t (id, s) VALUES (?1, 'v1')", [id]))?;
    }
    store_write(c.store(), "INSERT INTO t (id, s) VALUES (1, 'crsync')").await?;
    c.add_dialer(SseDialer::new(base(&server)));
    let mut client = v1::V1Client::new(db.clone(), base(&server), V1Config::default());
    client.connect().await?;
    let replicas = [
        ("crsync server", Replica::Server(&server)),
        ("crsync client", Replica::Store(c.store())),
        ("v1 client", Replica::V1(&db)),
    ];
    wait_identical("the first rows everywhere", &replicas, 6, || {
        client.log().summary()
    })
    .await?;
    // The v1 peer merged the crsync client's version 1 under its own local version 6.
    let claimed = db.cursor()?.get(&c_site).copied();
    ensure!(
        claimed == Some(6),
        "the v1 cursor's entry for the crsync client: {claimed:?}"
    );

    client.disconnect();
    client.connect().await?;
    wait_round_sent(&client, 2).await?;
    let mut next = 2;
    let mut claimed_after_first = None;
    for (phase, total) in [
        ("2-5", 10),
        ("6-9", 14),
        ("10-13 (past the v1 peer's versions)", 18),
    ] {
        for _ in 0..4 {
            let id = next;
            next += if next == 9 { 11 } else { 1 }; // ids 2..=9, then 20..=23
            c.store()
                .write(move |tx| {
                    tx.execute("INSERT INTO t (id, s) VALUES (?1, 'crsync later')", [id])
                })
                .await?;
        }
        wait_identical(
            &format!("the crsync client's writes {phase} everywhere"),
            &replicas,
            total,
            || client.log().summary(),
        )
        .await?;
        if claimed_after_first.is_none() {
            // Once the v1 client is done re-sending: what does the server claim to hold?
            client.wait_quiet(Duration::from_secs(1), v1::LIMIT).await?;
            let written = c.store().cursor().await?.get(&c.site_id()).0;
            let claim = v1::probe_cursor(&base(&server))
                .await?
                .get(&c_site)
                .copied();
            claimed_after_first = Some((claim, written));
        }
    }
    if let Some((Some(claim), written)) = claimed_after_first {
        ensure!(
            claim <= written,
            "the crsync server claimed to hold the crsync client's versions up to {claim} when \
             that client's own version was only {written}: it believed the v1 client's re-sent \
             rows, stamped with the v1 peer's local versions"
        );
    }
    settles(&client, 2 * SMALL).await?;
    c.shutdown().await;
    Ok(())
}
