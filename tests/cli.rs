//! End-to-end tests of the `crsync` binary: `enable` and `status` on good and
//! bad input, `serve` on 127.0.0.1 port 0 with `sync --once` from two
//! database files converging through it (HTTP+SSE and WebSocket), refused
//! and unreachable servers, and `sync --watch` printing events until SIGTERM.
//! Every wait has a timeout; nothing sleeps and then asserts.

#[path = "support/process.rs"]
mod support;

use std::path::Path;

use crsync::Store;
use serde_json::Value;
use support::{Fixture, Running, TestServer, crsync, run};

/// The replicated table (the server's schema for new databases).
const SERVER_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY NOT NULL, body TEXT);";
/// The clients' schema: the replicated table and one without a primary key.
const CLIENT_SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY NOT NULL, body TEXT);
     CREATE TABLE IF NOT EXISTS log (line TEXT);";
const TOKEN: &str = "test-token-0123456789";

type Rows = Vec<(i64, String)>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs SQL on a database file through the Store (cr-sqlite loaded), then closes it.
fn write(db: &Path, sql: &'static str) {
    runtime().block_on(async {
        let store = Store::open(db).await.expect("open");
        store
            .write(move |tx| tx.execute_batch(sql))
            .await
            .expect("write");
        store.close().await.expect("close");
    });
}

/// The rows of `notes`.
fn rows(db: &Path) -> Rows {
    runtime().block_on(async {
        let store = Store::open(db).await.expect("open");
        let rows = store
            .read(|c| {
                let mut stmt = c.prepare("SELECT id, body FROM notes ORDER BY id")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect()
            })
            .await
            .expect("read");
        store.close().await.expect("close");
        rows
    })
}

fn status_json(db: &Path) -> Value {
    let mut cmd = crsync();
    cmd.args(["status", "--json", "--db"]).arg(db);
    let out = run(cmd);
    out.assert_success();
    serde_json::from_str(&out.stdout).expect("status --json prints JSON")
}

/// `sync --once` of `db` with `url`; `extra` adds flags (`--ws`, `--token`).
fn sync_once(db: &Path, url: &str, token: Option<&str>, extra: &[&str]) -> support::Output {
    let mut cmd = crsync();
    cmd.args(["sync", "--once", "--timeout", "30", "--db"])
        .arg(db)
        .args(["--url", url])
        .args(extra);
    if let Some(token) = token {
        cmd.env("CRSYNC_TOKEN", token);
    }
    run(cmd)
}

#[test]
fn enable_then_status_reports_tables_site_and_cursor() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let db = fx.client_db("a.db");
    // Idempotent: enabling again succeeds.
    let mut again = crsync();
    again.arg("enable").arg("--db").arg(&db).arg("notes");
    let out = run(again);
    out.assert_success();
    assert!(out.stdout.contains("replicating notes"), "{out:#?}");

    write(&db, "INSERT INTO notes VALUES (1, 'one'), (2, 'two')");
    let json = status_json(&db);
    let site = json["site_id"].as_str().expect("site_id");
    assert_eq!(site.len(), 32);
    assert!(site.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(json["schema_version"], 0);
    assert_eq!(
        json["tables"],
        serde_json::json!([{"name": "notes", "rows": 2}])
    );
    assert_eq!(json["db_version"], 1);
    assert_eq!(json["cursor"]["peers"][site], 1);
    assert_eq!(json["bookkeeping"]["origin_records"], 0);

    let mut text = crsync();
    text.arg("status").arg("--db").arg(&db);
    let out = run(text);
    out.assert_success();
    assert!(
        out.stdout.contains(&format!("site id:       {site}")),
        "{out:#?}"
    );
    assert!(out.stdout.contains("notes (2 rows)"), "{out:#?}");
    assert!(out.stdout.contains("(this database)"), "{out:#?}");
}

#[test]
fn enable_refuses_unknown_tables_and_tables_without_a_primary_key() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let db = fx.client_db("a.db");

    let mut unknown = crsync();
    unknown.arg("enable").arg("--db").arg(&db).args(["nope"]);
    run(unknown)
        .assert_failure(1, "table \"nope\" does not exist")
        .assert_failure(1, "tables in");

    let mut no_pk = crsync();
    no_pk.arg("enable").arg("--db").arg(&db).args(["log"]);
    run(no_pk).assert_failure(1, "has no primary key");

    // All or nothing: a good table next to a bad one is not enabled either.
    let fresh = fx.path("b.db");
    let mut mixed = crsync();
    mixed
        .arg("enable")
        .arg("--db")
        .arg(&fresh)
        .arg("--schema")
        .arg(fx.path("client.sql"))
        .args(["notes", "log"]);
    run(mixed).assert_failure(1, "no primary key");
    assert_eq!(status_json(&fresh)["tables"], serde_json::json!([]));
    assert_eq!(status_json(&db)["tables"][0]["name"], "notes");

    let mut bad_schema = crsync();
    bad_schema
        .arg("enable")
        .arg("--db")
        .arg(fx.path("c.db"))
        .arg("--schema")
        .arg(fx.path("missing.sql"))
        .arg("notes");
    run(bad_schema).assert_failure(1, "cannot read schema file");
    assert!(
        !fx.path("c.db").exists(),
        "a failed enable must not create the file"
    );
}

#[test]
fn missing_arguments_are_usage_errors() {
    for args in [
        &["enable", "notes"][..],
        &["status"],
        &["sync", "--url", "http://127.0.0.1:1/db/x", "--once"],
    ] {
        let mut cmd = crsync();
        cmd.args(args);
        run(cmd).assert_failure(2, "--db");
    }
    let mut cmd = crsync();
    cmd.args(["enable", "--db", "x.db"]);
    run(cmd).assert_failure(2, "<TABLE>");
    let mut cmd = crsync();
    cmd.args([
        "sync",
        "--db",
        "x.db",
        "--url",
        "http://h/db/x",
        "--once",
        "--watch",
    ]);
    run(cmd).assert_failure(2, "cannot be used with");

    let mut help = crsync();
    help.arg("--help");
    let out = run(help);
    out.assert_success();
    for word in ["serve", "enable", "status", "sync"] {
        assert!(out.stdout.contains(word), "help lacks {word}: {out:#?}");
    }
}

#[test]
fn status_and_sync_of_a_missing_file_fail_without_creating_it() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let db = fx.path("missing.db");
    let mut status = crsync();
    status.arg("status").arg("--db").arg(&db);
    run(status).assert_failure(1, "does not exist");
    run({
        let mut c = crsync();
        c.arg("sync")
            .arg("--db")
            .arg(&db)
            .args(["--url", "http://127.0.0.1:1/db/x", "--once"]);
        c
    })
    .assert_failure(1, "does not exist");
    assert!(!db.exists());
}

#[test]
fn serve_refuses_to_start_without_any_token() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let mut cmd = crsync();
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(fx.path("server"));
    run(cmd).assert_failure(1, "allow_anonymous");
}

#[test]
fn two_files_converge_through_serve_with_sync_once() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let server = fx.server(Some(TOKEN), &[]);
    let url = server.db_url("notes");
    let a = fx.client_db("a.db");
    let b = fx.client_db("b.db");
    // Row 2 is written on both sides: a conflict cr-sqlite settles the same way everywhere.
    write(
        &a,
        "INSERT INTO notes VALUES (1, 'from a'), (2, 'conflict: a')",
    );
    write(
        &b,
        "INSERT INTO notes VALUES (3, 'from b'); INSERT INTO notes VALUES (2, 'conflict: b')",
    );

    // a over HTTP+SSE, the token from the environment.
    let out = sync_once(&a, &url, Some(TOKEN), &[]);
    out.assert_success();
    assert!(
        out.stdout.contains("sent     2 changes (notes)"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("received 0 changes"), "{out:#?}");

    // b over WebSocket, the token as a flag.
    let out = sync_once(&b, &url, None, &["--ws", "--token", TOKEN]);
    out.assert_success();
    assert!(out.stdout.contains("/db/notes/ws (WebSocket"), "{out:#?}");
    assert!(
        out.stdout.contains("sent     2 changes (notes)"),
        "{out:#?}"
    );
    assert!(!out.stdout.contains("received 0 changes"), "{out:#?}");

    // a again: it gets b's rows.
    let out = sync_once(&a, &url, Some(TOKEN), &[]);
    out.assert_success();
    assert!(!out.stdout.contains("received 0 changes"), "{out:#?}");

    let rows_a = rows(&a);
    assert_eq!(rows_a.len(), 3, "{rows_a:?}");
    assert_eq!(rows_a, rows(&b));
    assert_eq!(rows_a[0], (1, "from a".into()));
    assert_eq!(rows_a[2], (3, "from b".into()));
    // The server's replica holds the same rows.
    assert_eq!(rows(&fx.path("server/notes.db")), rows_a);

    // Each cursor holds the other's writes: the cursors are equal (the merges
    // used up versions of their own, holes that the ranges vouch for too).
    let (sa, sb) = (status_json(&a), status_json(&b));
    let (site_a, site_b) = (
        sa["site_id"].as_str().unwrap(),
        sb["site_id"].as_str().unwrap(),
    );
    assert!(sa["cursor"]["peers"][site_b].as_i64() >= Some(1), "{sa:#}");
    assert!(sb["cursor"]["peers"][site_a].as_i64() >= Some(1), "{sb:#}");

    // A second round moves nothing.
    let out = sync_once(&b, &url, Some(TOKEN), &["--ws"]);
    out.assert_success();
    assert!(out.stdout.contains("received 0 changes"), "{out:#?}");
    assert!(out.stdout.contains("sent     0 changes"), "{out:#?}");
    // and leaves both cursors equal: a's merge of b's rows used up a version
    // of a's own, a hole that the server vouched for to b.
    let (sa, sb) = (status_json(&a), status_json(&b));
    assert_eq!(sa["cursor"], sb["cursor"], "{sa:#} {sb:#}");

    let (status, rest) = server.running.terminate();
    assert!(status.success(), "serve exited with {status:?}");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

#[test]
fn wrong_or_missing_token_fails_with_a_clear_message() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let server = fx.server(Some(TOKEN), &[]);
    let url = server.db_url("notes");
    let a = fx.client_db("a.db");
    write(&a, "INSERT INTO notes VALUES (1, 'secret')");
    for extra in [&[][..], &["--ws"]] {
        sync_once(&a, &url, Some("wrong-token"), extra)
            .assert_failure(1, "UNAUTHORIZED")
            .assert_failure(1, "--token");
        sync_once(&a, &url, None, extra).assert_failure(1, "UNAUTHORIZED");
        // `--watch` does not retry a refused token forever either.
        let mut watch = crsync();
        watch
            .arg("sync")
            .arg("--db")
            .arg(&a)
            .args(["--url", &url, "--token", "wrong-token"])
            .args(extra);
        run(watch).assert_failure(1, "UNAUTHORIZED");
    }
    // Nothing reached the server: a database created by the refused
    // requests would hold no rows (and none is created before auth).
    let replica = fx.path("server/notes.db");
    assert!(!replica.exists() || rows(&replica).is_empty());
}

#[test]
fn unreachable_server_fails_with_a_clear_message() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let a = fx.client_db("a.db");
    // A port that was just free.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port();
    let url = format!("http://127.0.0.1:{port}/db/notes");
    sync_once(&a, &url, Some(TOKEN), &[]).assert_failure(1, "cannot reach the server");
    sync_once(&a, &url, Some(TOKEN), &["--ws"]).assert_failure(1, "cannot reach the server");
    sync_once(&a, "notes", None, &[]).assert_failure(1, "invalid URL");
}

#[test]
fn sync_once_fails_when_the_server_sends_what_this_database_cannot_hold() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let server = fx.server(Some(TOKEN), &[]);
    let url = server.db_url("notes");
    let a = fx.client_db("a.db");
    write(&a, "INSERT INTO notes VALUES (1, 'one')");
    sync_once(&a, &url, Some(TOKEN), &[]).assert_success();

    // A database whose only CRR is another table cannot apply `notes` changes.
    let other = fx.path("other.db");
    std::fs::write(
        fx.path("other.sql"),
        "CREATE TABLE other (id INTEGER PRIMARY KEY NOT NULL, x TEXT);",
    )
    .expect("write schema");
    let mut enable = crsync();
    enable
        .arg("enable")
        .arg("--db")
        .arg(&other)
        .arg("--schema")
        .arg(fx.path("other.sql"))
        .arg("other");
    run(enable).assert_success();
    for extra in [&[][..], &["--ws"]] {
        sync_once(&other, &url, Some(TOKEN), extra)
            .assert_failure(1, "cannot apply")
            .assert_failure(1, "unknown table \"notes\"");
    }
}

#[test]
fn sync_once_fails_when_the_server_runs_a_newer_schema() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let v2 = fx.path("v2.sql");
    std::fs::write(&v2, format!("{SERVER_SCHEMA}\nPRAGMA user_version = 2;"))
        .expect("write schema");
    let server = TestServer::start(fx.dir.path(), &v2, Some(TOKEN), &[]);
    let url = server.db_url("notes");
    let a = fx.client_db("a.db");
    for extra in [&[][..], &["--ws"]] {
        sync_once(&a, &url, Some(TOKEN), extra)
            .assert_failure(1, "runs schema version 2 but this database has 0");
    }
}

#[test]
fn read_only_token_cannot_send_changes() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let config = fx.path("server.toml");
    std::fs::write(
        &config,
        format!(
            "[[tokens]]\ntoken = \"{TOKEN}\"\ndatabases = [\"notes\"]\ncreate = true\n\n\
             [[tokens]]\ntoken = \"reader\"\ndatabases = [\"notes\"]\naccess = \"read-only\"\n"
        ),
    )
    .expect("write config");
    let config_arg = config.to_str().expect("utf-8 path");
    let server = fx.server(None, &["--config", config_arg]);
    let url = server.db_url("notes");
    let writer = fx.client_db("writer.db");
    write(&writer, "INSERT INTO notes VALUES (1, 'published')");
    sync_once(&writer, &url, Some(TOKEN), &[]).assert_success();

    // A read-only token cannot send the reader's own changes, over either
    // transport: `--once` fails with the server's refusal instead of waiting.
    let reader = fx.client_db("reader.db");
    write(&reader, "INSERT INTO notes VALUES (2, 'not allowed')");
    sync_once(&reader, &url, Some("reader"), &[]).assert_failure(1, "FORBIDDEN");
    sync_once(&reader, &url, Some("reader"), &["--ws"]).assert_failure(1, "FORBIDDEN");
    assert_eq!(rows(&fx.path("server/notes.db")).len(), 1);
}

/// `sync --watch` of `db` over `url`.
fn watch(db: &Path, url: &str, extra: &[&str]) -> Running {
    let mut cmd = crsync();
    cmd.arg("sync")
        .arg("--db")
        .arg(db)
        .args(["--url", url])
        .args(extra)
        .env("CRSYNC_TOKEN", TOKEN);
    let mut running = Running::start(cmd);
    running.wait_for_line("connect");
    running.wait_for_line("eose");
    running
}

#[test]
fn watch_prints_events_and_stops_on_sigterm() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let server = fx.server(Some(TOKEN), &[]);
    let url = server.db_url("notes");
    let a = fx.client_db("a.db");
    let b = fx.client_db("b.db");
    let mut watch_a = watch(&a, &url, &["--ws"]);

    // A change pushed by `sync --once` elsewhere arrives live.
    write(&b, "INSERT INTO notes VALUES (7, 'live from b')");
    sync_once(&b, &url, Some(TOKEN), &[]).assert_success();
    let line = watch_a.wait_for_line("change");
    assert!(line.contains("notes (from remote)"), "{line}");

    // A write to a watched file by another process goes out live to the
    // other watcher (over HTTP+SSE this time).
    let mut watch_b = watch(&b, &url, &[]);
    write(&a, "INSERT INTO notes VALUES (8, 'live from a')");
    watch_a.wait_for_line("change     notes (write by another process)");
    watch_b.wait_for_line("change     notes (from remote)");

    // A second process syncing the same file over the same transport is refused.
    sync_once(&b, &url, Some(TOKEN), &[])
        .assert_failure(1, "ALREADY_CONNECTED")
        .assert_failure(1, "another process");

    for running in [watch_a, watch_b] {
        let (status, rest) = running.terminate();
        assert!(status.success(), "sync --watch exited with {status:?}");
        assert!(rest.iter().any(|l| l.contains("disconnect")), "{rest:?}");
        assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
    }
    let expected = vec![
        (7, "live from b".to_string()),
        (8, "live from a".to_string()),
    ];
    assert_eq!(rows(&a), expected);
    assert_eq!(rows(&b), expected);
}

/// Merges everything `from` holds that `to` lacks, through the Store API.
fn merge_into(from: &Path, to: &Path) {
    runtime().block_on(async {
        let from = Store::open(from).await.expect("open");
        let to = Store::open(to).await.expect("open");
        let mut batches = from
            .changes_since(&to.cursor().await.expect("cursor"))
            .await
            .expect("changes_since");
        while let Some(batch) = batches.next_batch().await {
            to.merge(batch.expect("batch")).await.expect("merge");
        }
        from.close().await.expect("close");
        to.close().await.expect("close");
    });
}

fn status_text(db: &Path) -> String {
    let mut cmd = crsync();
    cmd.arg("status").arg("--db").arg(db);
    let out = run(cmd);
    out.assert_success();
    out.stdout
}

#[test]
fn status_counts_in_words_that_match_what_it_lists() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let a = fx.client_db("a.db");
    let b = fx.client_db("b.db");
    write(&a, "INSERT INTO notes VALUES (1, 'one')");
    let text = status_text(&a);
    assert!(text.contains("notes (1 row)\n"), "{text}");
    assert!(
        text.contains("bookkeeping:   0 origin records, 0 remote sites in the stored cursor"),
        "{text}"
    );
    // b's row arrives: a's cursor lists two sites, one of them a itself.
    write(&b, "INSERT INTO notes VALUES (2, 'two')");
    merge_into(&b, &a);
    let text = status_text(&a);
    assert!(text.contains("notes (2 rows)\n"), "{text}");
    let cursor_lines = text.lines().filter(|l| l.starts_with("  ")).count();
    assert_eq!(cursor_lines, 2, "{text}");
    assert!(
        text.contains("bookkeeping:   1 origin record, 1 remote site in the stored cursor"),
        "{text}"
    );
}

#[test]
fn errors_say_each_cause_once() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let mut cmd = crsync();
    cmd.args(["serve", "--config"]).arg(fx.path("missing.toml"));
    let out = run(cmd);
    out.assert_failure(1, "cannot read config file");
    assert_eq!(
        out.stderr.matches("No such file or directory").count(),
        1,
        "{out:#?}"
    );
    // An open failure says so once (the Store's error already names the file).
    std::fs::create_dir(fx.path("dir.db")).expect("mkdir");
    let mut cmd = crsync();
    cmd.args(["enable", "--db"])
        .arg(fx.path("dir.db"))
        .arg("notes");
    let out = run(cmd);
    assert_eq!(out.code(), Some(1), "{out:#?}");
    assert_eq!(
        out.stderr.matches("cannot open database").count(),
        1,
        "{out:#?}"
    );
}

#[test]
fn a_file_that_is_not_a_database_is_named_as_such() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let path = fx.path("x.db");
    std::fs::write(&path, "just some text, not SQLite at all\n".repeat(20)).expect("write");
    let expected = format!(
        "error: {} is not a SQLite database (file is not a database)\n",
        path.display()
    );
    for command in ["status", "conflicts"] {
        let mut cmd = crsync();
        cmd.args([command, "--db"]).arg(&path);
        let out = run(cmd);
        assert_eq!(out.code(), Some(1), "{out:#?}");
        assert_eq!(out.stderr, expected, "{command}");
    }
    let mut cmd = crsync();
    cmd.args(["enable", "--db"]).arg(&path).arg("notes");
    let out = run(cmd);
    assert_eq!(out.stderr, expected);
    let mut cmd = crsync();
    cmd.args(["fork", "--db"]).arg(&path);
    let out = run(cmd);
    assert!(out.stderr.ends_with(&expected[7..]), "{out:#?}");
    assert!(!out.stderr.contains(": :"), "{out:#?}");
}

#[test]
fn conflicts_lists_what_merges_replaced() {
    let fx = Fixture::with_schemas(SERVER_SCHEMA, CLIENT_SCHEMA);
    let a = fx.client_db("a.db");
    let b = fx.client_db("b.db");
    let mut cmd = crsync();
    cmd.args(["conflicts", "--db"]).arg(&a);
    let out = run(cmd);
    out.assert_success();
    assert!(
        out.stdout.starts_with("no conflicts recorded in"),
        "{out:#?}"
    );

    write(&a, "INSERT INTO notes VALUES (1, 'base'), (2, 'two')");
    merge_into(&a, &b);
    // Concurrent edits: 'from b' > 'from a', so b's values win everywhere.
    write(&a, "UPDATE notes SET body = 'from a' WHERE id = 1");
    write(&b, "UPDATE notes SET body = 'from b' WHERE id = 1");
    write(&a, "UPDATE notes SET body = 'a: two' WHERE id = 2");
    write(&b, "UPDATE notes SET body = 'b: two' WHERE id = 2");
    merge_into(&b, &a);
    assert_eq!(rows(&a), vec![(1, "from b".into()), (2, "b: two".into())]);
    let site = |db: &Path| {
        status_json(db)["site_id"]
            .as_str()
            .expect("site")
            .to_owned()
    };
    let (site_a, site_b) = (site(&a), site(&b));

    let mut cmd = crsync();
    cmd.args(["conflicts", "--db"]).arg(&a);
    let out = run(cmd);
    out.assert_success();
    let text = &out.stdout;
    assert!(text.starts_with("2 conflicts in "), "{text}");
    assert!(
        text.contains("notes[1].body: local value replaced"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  lost: 'from a'  by {site_a} version 2 (col_version 2)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  won:  'from b'  by {site_b} version 2 (col_version 2)"
        )),
        "{text}"
    );
    // newest first
    assert!(text.find("notes[2]").expect("row 2") < text.find("notes[1]").expect("row 1"));

    let mut cmd = crsync();
    cmd.args([
        "conflicts",
        "--json",
        "--limit",
        "1",
        "--table",
        "notes",
        "--db",
    ])
    .arg(&a);
    let out = run(cmd);
    out.assert_success();
    let json: Value = serde_json::from_str(&out.stdout).expect("JSON");
    let list = json["conflicts"].as_array().expect("conflicts");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["table"], "notes");
    assert_eq!(list[0]["pk"], serde_json::json!([2]));
    assert_eq!(list[0]["column"], "body");
    assert_eq!(list[0]["kind"], "replaced");
    assert_eq!(list[0]["lost"]["value"], "a: two");
    assert_eq!(list[0]["lost"]["site_id"], site_a.as_str());
    assert_eq!(list[0]["won"]["value"], "b: two");
    assert_eq!(list[0]["won"]["site_id"], site_b.as_str());

    let mut cmd = crsync();
    cmd.args(["conflicts", "--table", "other", "--db"]).arg(&a);
    let out = run(cmd);
    out.assert_success();
    assert!(out.stdout.starts_with("no conflicts recorded"), "{out:#?}");
}
