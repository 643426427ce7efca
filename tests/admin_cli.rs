//! `crsync admin status` against a real `crsync serve` with `[admin] token`
//! in its config file, while `crsync sync --watch` keeps a client connected.

#[path = "support/process.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Fixture, Running, crsync, run, write_sql};

const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY NOT NULL, body TEXT);";
const TOKEN: &str = "db-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

fn admin_status(base: &str, token: Option<&str>, json: bool) -> support::Output {
    let mut cmd = crsync();
    cmd.args(["admin", "status", "--url", base]);
    if let Some(token) = token {
        cmd.args(["--token", token]);
    }
    if json {
        cmd.arg("--json");
    }
    run(cmd)
}

#[test]
fn admin_status_prints_databases_and_a_live_peer() {
    let fx = Fixture::new(SCHEMA);
    let config = fx.path("crsync.toml");
    std::fs::write(&config, format!("[admin]\ntoken = \"{ADMIN}\"\n")).expect("config");
    let config = config.to_str().expect("utf-8 path").to_owned();
    let server = fx.server(Some(TOKEN), &["--config", &config]);
    let db = fx.client_db("a.db");
    write_sql(&db, "INSERT INTO notes VALUES (1, 'one'), (2, 'two')");
    let mut watch = crsync();
    watch
        .args(["sync", "--watch", "--db"])
        .arg(&db)
        .args(["--url", &server.db_url("notes")])
        .env("CRSYNC_TOKEN", TOKEN);
    let watching = Running::start(watch);

    // Without the admin token: refused, and said so.
    admin_status(&server.base, None, false).assert_failure(1, "401");
    admin_status(&server.base, Some(TOKEN), false).assert_failure(1, "not the admin token");

    // The client shows up live, with both rows on the server.
    let deadline = Instant::now() + Duration::from_secs(30);
    let report: Value = loop {
        let out = admin_status(&server.base, Some(ADMIN), true);
        out.assert_success();
        let report: Value = serde_json::from_str(&out.stdout).expect("--json prints JSON");
        let notes = report["databases"]
            .as_array()
            .and_then(|dbs| dbs.iter().find(|d| d["name"] == "notes"));
        let live = notes.is_some_and(|d| {
            d["tables"] == serde_json::json!([{"name": "notes", "rows": 2}])
                && d["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["phase"] == "live"))
        });
        if live {
            break report;
        }
        assert!(Instant::now() < deadline, "never live: {report:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(report["errors"].as_array().is_some_and(Vec::is_empty));

    let out = admin_status(&server.base, Some(ADMIN), false);
    out.assert_success();
    for needle in [
        "crsync server",
        "databases: 1",
        "notes",
        "rows: notes 2",
        "sse 127.0.0.1:",
        "live",
        "recent errors: 0",
    ] {
        assert!(
            out.stdout.contains(needle),
            "no {needle:?} in:\n{}",
            out.stdout
        );
    }
    drop(watching);
    drop(server);
}
