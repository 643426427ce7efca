//! `crsync sync --once` shows an initial sync's progress on stderr: plain
//! lines without a terminal, an indicatif bar on one (a real pseudo-terminal,
//! from util-linux `script`), both ending at 100%; and `crsync status` shows
//! how sync stands with each remote afterwards.

#[path = "support/process.rs"]
mod support;

use std::path::Path;
use std::process::Command;

use crsync::Store;
use support::{Fixture, crsync, run};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS notes (
    id INTEGER PRIMARY KEY NOT NULL, title TEXT, body TEXT, n INTEGER);";
const TOKEN: &str = "progress-token-0123456789";
/// Rows written: three changes each, in transactions of 100 rows.
const ROWS: i64 = 6_000;

/// A replica holding `ROWS` rows of its own.
fn written(fx: &Fixture, name: &str) -> std::path::PathBuf {
    let db = fx.client_db(name);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let store = Store::open(&db).await.expect("open");
            for chunk in 0..ROWS / 100 {
                store
                    .write(move |tx| {
                        let mut insert =
                            tx.prepare("INSERT INTO notes VALUES (?1, 'title', 'body', ?1)")?;
                        for i in chunk * 100..(chunk + 1) * 100 {
                            insert.execute([i])?;
                        }
                        Ok(())
                    })
                    .await
                    .expect("write");
            }
            store.close().await.expect("close");
        });
    db
}

fn sync_args(db: &Path, url: &str) -> Vec<String> {
    ["sync", "--once", "--timeout", "60", "--db"]
        .iter()
        .map(|s| s.to_string())
        .chain([db.display().to_string(), "--url".into(), url.into()])
        .collect()
}

/// `crsync sync --once` of `db` with the server at `url`, without a terminal.
fn sync_once(db: &Path, url: &str) -> support::Output {
    let mut cmd = crsync();
    cmd.args(sync_args(db, url)).env("CRSYNC_TOKEN", TOKEN);
    run(cmd)
}

/// The `N` of a line "`verb` N/N changes (100%)", if `text` has one.
fn completed(text: &str, verb: &str) -> Option<u64> {
    text.split(['\n', '\r']).find_map(|line| {
        let rest = line.trim_start().strip_prefix(verb)?.trim_start();
        let (done, rest) = rest.split_once('/')?;
        let (total, _) = rest.split_once(' ')?;
        (done == total).then(|| done.parse().ok()).flatten()
    })
}

#[test]
fn without_a_terminal_progress_is_plain_lines_that_end_at_100_percent() {
    let fx = Fixture::new(SCHEMA);
    let server = fx.server(Some(TOKEN), &[]);
    let url = server.db_url("notes");
    let a = written(&fx, "a.db");
    let out = sync_once(&a, &url);
    out.assert_success();
    let uploaded = completed(&out.stderr, "uploaded").unwrap_or_else(|| panic!("{out:#?}"));
    assert!(uploaded >= ROWS as u64 * 3, "{out:#?}");
    assert!(out.stderr.contains("changes (100%)"), "{out:#?}");
    assert!(
        !out.stderr.contains('\r'),
        "no bar without a terminal: {out:#?}"
    );

    let b = fx.client_db("b.db");
    let out = sync_once(&b, &url);
    out.assert_success();
    let downloaded = completed(&out.stderr, "downloaded").unwrap_or_else(|| panic!("{out:#?}"));
    assert!(downloaded >= ROWS as u64 * 3, "{out:#?}");
    assert!(
        out.stdout
            .contains(&format!("received {} changes", ROWS * 3)),
        "{out:#?}"
    );
}

#[test]
fn status_shows_each_remote_with_its_last_sync_and_what_it_lacks() {
    let fx = Fixture::new(SCHEMA);
    let server = fx.server(Some(TOKEN), &[]);
    let url = server.db_url("notes");
    let a = fx.client_db("a.db");
    let status = |json: bool| {
        let mut cmd = crsync();
        cmd.args(["status", "--db"]).arg(&a);
        if json {
            cmd.arg("--json");
        }
        let out = run(cmd);
        out.assert_success();
        out.stdout
    };
    assert!(status(false).contains("remotes:       none synced with yet"));
    let write = |id: i64| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                let store = Store::open(&a).await.expect("open");
                store
                    .write(move |tx| tx.execute("INSERT INTO notes (id) VALUES (?1)", [id]))
                    .await
                    .expect("write");
                store.close().await.expect("close");
            });
    };
    write(1);
    sync_once(&a, &url).assert_success();
    let text = status(false);
    assert!(text.contains(&format!("via sse {url}")), "{text}");
    assert!(
        text.contains("s ago; holds ours up to 1, 0 local transactions pending"),
        "{text}"
    );
    write(2);
    write(3);
    let text = status(false);
    assert!(
        text.contains("holds ours up to 1, 2 local transactions pending"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&status(true)).expect("json");
    let remote = &json["remotes"][0];
    assert_eq!(remote["pending_transactions"], 2, "{json}");
    assert_eq!(remote["acknowledged"], 1, "{json}");
    assert!(remote["last_synced_at_ms"].as_u64().is_some(), "{json}");
}

#[test]
fn on_a_terminal_progress_is_a_bar() {
    let fx = Fixture::new(SCHEMA);
    let server = fx.server(Some(TOKEN), &[]);
    let url = server.db_url("notes");
    let a = written(&fx, "a.db");
    sync_once(&a, &url).assert_success();

    // `script` runs the command on a new pseudo-terminal and copies what it
    // printed there to its own stdout.
    let b = fx.client_db("b.db");
    let crsync_cmd = crsync();
    let mut line = vec![crsync_cmd.get_program().to_string_lossy().into_owned()];
    line.extend(sync_args(&b, &url));
    let quoted: Vec<String> = line.iter().map(|a| format!("'{a}'")).collect();
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", &quoted.join(" "), "/dev/null"])
        .env("CRSYNC_TOKEN", TOKEN)
        .env_remove("RUST_LOG");
    let out = run(cmd);
    out.assert_success();
    let shown = &strip_ansi(&out.stdout);
    assert!(shown.contains("received"), "the sync ran: {out:#?}");
    assert!(shown.contains("] "), "a bar: {out:#?}");
    assert!(out.stdout.contains("\u{1b}["), "redrawn in place: {out:#?}");
    let downloaded = completed(shown, "downloaded")
        .or_else(|| {
            // The bar's last frame: "downloaded [=====] N/N changes, ..."
            shown.split(['\n', '\r']).find_map(|l| {
                let l = l.trim_start().strip_prefix("downloaded [")?;
                let (_, rest) = l.split_once("] ")?;
                let (done, rest) = rest.split_once('/')?;
                let (total, _) = rest.split_once(' ')?;
                (done == total).then(|| done.parse().ok()).flatten()
            })
        })
        .unwrap_or_else(|| panic!("a bar at 100%: {shown:?}"));
    assert!(downloaded >= ROWS as u64 * 3, "{shown:?}");
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
