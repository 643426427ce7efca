//! `crsync serve` for operators, through the real binary: connection log
//! lines in text (no ANSI escapes into a pipe) and JSON, named tokens with
//! `token_file` and `create` (the client is told when its database was
//! created; a token without `create` gets a 404 naming the fix), tokens
//! reloaded on SIGHUP (removed tokens refused, their open syncs cut), and
//! HTTPS/WSS with a certificate the test makes, dialed with `--ca-cert`.

#[path = "support/process.rs"]
mod support;

use std::path::{Path, PathBuf};

use serde_json::Value;
use support::{Fixture, Running, TestServer, crsync, run};

const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY NOT NULL, body TEXT);";
const PHONE: &str = "phone-secret-0123456789";
const ADMIN: &str = "admin-secret-0123456789";
const LAPTOP: &str = "laptop-secret-0123456789";

/// `sync --once` of `db` with `url` and `token`, plus `extra` flags.
fn sync_once(db: &Path, url: &str, token: &str, extra: &[&str]) -> support::Output {
    let mut cmd = crsync();
    cmd.args(["sync", "--once", "--timeout", "30", "--db"])
        .arg(db)
        .args(["--url", url])
        .args(extra)
        .env("CRSYNC_TOKEN", token);
    run(cmd)
}

/// Writes the server config with these `[[tokens]]` entries (TOML).
fn write_config(fixture: &Fixture, tokens: &str) -> PathBuf {
    let path = fixture.path("crsync.toml");
    std::fs::write(&path, tokens).expect("write config");
    path
}

const TOKENS: &str = r#"
[[tokens]]
name = "phone"
token = "phone-secret-0123456789"
databases = ["*"]

[[tokens]]
name = "admin"
token_file = "admin.token"
databases = ["*"]
create = true
"#;

fn server_with_tokens(fixture: &Fixture, extra: &[&str]) -> TestServer {
    std::fs::write(fixture.path("admin.token"), format!("{ADMIN}\n")).expect("token file");
    let config = write_config(fixture, TOKENS);
    let mut args = vec!["--config", config.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    fixture.server(None, &args)
}

#[test]
fn only_a_token_with_create_creates_and_the_client_is_told() {
    let fixture = Fixture::new(SCHEMA);
    let server = server_with_tokens(&fixture, &[]);
    let db = fixture.client_db("phone.db");

    // The phone's token may not create: a typo stays a typo.
    let out = sync_once(&db, &server.db_url("nots"), PHONE, &[]);
    out.assert_failure(1, "create = true");
    assert!(!fixture.path("server/nots.db").exists());

    // The admin's token creates it, and `sync` says so, once.
    let admin_db = fixture.client_db("admin.db");
    let out = sync_once(&admin_db, &server.db_url("notes"), ADMIN, &["--ws"]);
    out.assert_success();
    assert!(
        out.stdout.contains("created database notes on the server"),
        "{out:#?}"
    );
    let out = sync_once(&admin_db, &server.db_url("notes"), ADMIN, &[]);
    out.assert_success();
    assert!(!out.stdout.contains("created database"), "{out:#?}");
    // Now the phone syncs with it.
    sync_once(&db, &server.db_url("notes"), PHONE, &[]).assert_success();
    let (_, _, stderr) = server.running.terminate_with_stderr();
    assert!(
        !stderr.contains(PHONE) && !stderr.contains(ADMIN),
        "secrets in logs: {stderr}"
    );
}

/// The `connection opened` / `connection closed` lines of a JSON log.
fn connection_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("connection "))
        })
        .collect()
}

#[test]
fn connection_logs_in_text_without_ansi_and_in_json() {
    let fixture = Fixture::new(SCHEMA);
    let db = fixture.client_db("a.db");

    // Text: stderr is a pipe, so no colours; one line on open, one on close.
    let server = server_with_tokens(&fixture, &[]);
    sync_once(&db, &server.db_url("notes"), ADMIN, &[]).assert_success();
    let (_, _, stderr) = server.running.terminate_with_stderr();
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escapes in a pipe: {stderr}"
    );
    let opened = stderr
        .lines()
        .find(|l| l.contains("connection opened"))
        .unwrap_or_else(|| panic!("no open line: {stderr}"));
    for field in [
        "client=127.0.0.1:",
        "db=notes",
        "transport=sse",
        "token=admin",
    ] {
        assert!(opened.contains(field), "{field} missing: {opened}");
    }
    let closed = stderr
        .lines()
        .find(|l| l.contains("connection closed"))
        .unwrap_or_else(|| panic!("no close line: {stderr}"));
    for field in ["token=admin", "changes_in=", "changes_out=", "duration_ms="] {
        assert!(closed.contains(field), "{field} missing: {closed}");
    }

    // JSON: every stderr line is an object; a WebSocket's lines carry the
    // same fields, and the close counts what it moved.
    let server = server_with_tokens(&fixture, &["--log-format", "json"]);
    let writer = fixture.client_db("w.db");
    write_row(&writer);
    sync_once(&writer, &server.db_url("notes"), PHONE, &["--ws"]).assert_success();
    let (_, _, stderr) = server.running.terminate_with_stderr();
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
    let lines = connection_lines(&stderr);
    let closed = lines
        .iter()
        .find(|v| v["fields"]["message"] == "connection closed" && v["fields"]["transport"] == "ws")
        .unwrap_or_else(|| panic!("no ws close line: {lines:#?}"));
    let f = &closed["fields"];
    assert_eq!(f["db"], "notes");
    assert_eq!(f["token"], "phone");
    assert!(
        f["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{f}"
    );
    assert_eq!(f["changes_in"], 1, "{f}");
    assert!(
        f["changes_out"].as_u64().is_some() && f["duration_ms"].as_u64().is_some(),
        "{f}"
    );
}

/// One row in `notes` (one change: its `body`).
fn write_row(db: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = crsync::Store::open(db).await.expect("open");
        store
            .write(|tx| tx.execute("INSERT INTO notes VALUES (1, 'one')", []))
            .await
            .expect("write");
        store.close().await.expect("close");
    });
}

#[test]
fn sighup_reloads_tokens_refusing_removed_ones_and_cutting_their_syncs() {
    let fixture = Fixture::new(SCHEMA);
    let mut server = server_with_tokens(&fixture, &[]);
    let db = fixture.client_db("a.db");
    sync_once(&db, &server.db_url("notes"), ADMIN, &[]).assert_success();

    // A live sync with the phone's token.
    let phone_db = fixture.client_db("phone.db");
    let mut cmd = crsync();
    cmd.args(["sync", "--watch", "--ws", "--db"])
        .arg(&phone_db)
        .args(["--url", &server.db_url("notes")])
        .env("CRSYNC_TOKEN", PHONE);
    let mut watching = Running::start(cmd);
    watching.wait_for_line("eose");

    // Drop the phone, add the laptop (secret in a file), rotate the admin's.
    std::fs::write(fixture.path("laptop.token"), format!("{LAPTOP}\n")).expect("write");
    std::fs::write(fixture.path("admin.token"), "admin-rotated-0123456789\n").expect("write");
    write_config(
        &fixture,
        r#"
[[tokens]]
name = "admin"
token_file = "admin.token"
databases = ["*"]
create = true

[[tokens]]
name = "laptop"
token_file = "laptop.token"
databases = ["notes"]
"#,
    );
    server.running.signal("HUP");
    server
        .running
        .wait_for_line("tokens reloaded: admin, laptop");

    // The phone's open sync is cut, and it is refused from then on.
    let out = watching.wait_exit();
    assert_eq!(out.code(), Some(1), "{out:#?}");
    sync_once(&phone_db, &server.db_url("notes"), PHONE, &[]).assert_failure(1, "token");
    sync_once(&db, &server.db_url("notes"), ADMIN, &[]).assert_failure(1, "token");
    sync_once(
        &db,
        &server.db_url("notes"),
        "admin-rotated-0123456789",
        &[],
    )
    .assert_success();
    let laptop = fixture.client_db("laptop.db");
    sync_once(&laptop, &server.db_url("notes"), LAPTOP, &["--ws"]).assert_success();

    // A config that fails keeps the tokens in use.
    std::fs::write(fixture.path("laptop.token"), "").expect("write");
    server.running.signal("HUP");
    server.running.wait_for_line("tokens not reloaded");
    sync_once(&laptop, &server.db_url("notes"), LAPTOP, &[]).assert_success();
    server.running.terminate();
}

#[test]
fn serve_and_sync_over_https_and_wss_with_a_generated_certificate() {
    let fixture = Fixture::new(SCHEMA);
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("certificate");
    std::fs::write(fixture.path("cert.pem"), made.cert.pem()).expect("write");
    std::fs::write(fixture.path("key.pem"), made.signing_key.serialize_pem()).expect("write");
    let cert = fixture.path("cert.pem");
    let key = fixture.path("key.pem");
    let server = fixture.server(
        Some(ADMIN),
        &[
            "--tls-cert",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
        ],
    );
    assert!(server.base.starts_with("https://"), "{}", server.base);
    let ca = ["--ca-cert", cert.to_str().expect("utf-8")];

    let a = fixture.client_db("a.db");
    write_row(&a);
    let out = sync_once(&a, &server.db_url("notes"), ADMIN, &ca);
    out.assert_success();
    assert!(out.stdout.contains("sent     1 change"), "{out:#?}");
    let b = fixture.client_db("b.db");
    let out = sync_once(
        &b,
        &server.db_url("notes"),
        ADMIN,
        &[&ca[..], &["--ws"]].concat(),
    );
    out.assert_success();
    assert!(out.stdout.contains("wss://"), "{out:#?}");
    assert!(out.stdout.contains("received 1 change"), "{out:#?}");

    // Without the certificate the client refuses the server.
    let out = sync_once(&b, &server.db_url("notes"), ADMIN, &[]);
    assert_eq!(out.code(), Some(1), "{out:#?}");
    server.running.terminate();
}
