//! `crsync pair` and `crsync sync --relay` as real child processes, through
//! an in-process relay (nostr-relay-builder) on 127.0.0.1, port 0.

#[path = "support/process.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use nostr_relay_builder::prelude::{LocalRelay, RateLimit, RelayBuilder};
use support::{Fixture, Running, crsync, run, write_sql};

const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY NOT NULL, body TEXT);";

/// A relay running on its own runtime for the whole test.
fn relay() -> (tokio::runtime::Runtime, LocalRelay, String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (relay, url) = rt.block_on(async {
        let builder = RelayBuilder::default()
            .addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .rate_limit(RateLimit {
                max_reqs: 500,
                notes_per_minute: 1_000_000,
            });
        let relay = LocalRelay::new(builder);
        relay.run().await.expect("relay");
        let url = relay.url().await.to_string();
        (relay, url.trim_end_matches('/').to_owned())
    });
    (rt, relay, url)
}

fn notes(db: &Path) -> Vec<(i64, String)> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let store = crsync::Store::open(db).await.expect("open");
            let rows = store
                .read(|c| {
                    let mut s = c.prepare("SELECT id, body FROM notes ORDER BY id")?;
                    let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                    rows.collect::<crsync::rusqlite::Result<Vec<_>>>()
                })
                .await
                .expect("read");
            store.close().await.expect("close");
            rows
        })
}

fn cmd(args: &[&str], db: &Path) -> std::process::Command {
    let mut c = crsync();
    c.arg(args[0]).arg("--db").arg(db).args(&args[1..]);
    c
}

#[test]
fn pair_sync_list_and_unpair_through_a_relay() {
    let (_rt, _relay, url) = relay();
    let fx = Fixture::new(SCHEMA);
    let (a, b) = (fx.client_db("a.db"), fx.client_db("b.db"));
    let mut invite = Running::start(cmd(
        &["pair", "invite", "--relay", &url, "--name", "alice"],
        &a,
    ));
    let code = invite.wait_for_line("crsync-pair:");
    let joined = run(cmd(&["pair", "join", code.trim(), "--name", "bob"], &b));
    joined.assert_success();
    assert!(
        joined.stdout.contains("paired with alice"),
        "{}",
        joined.stdout
    );
    invite.wait_for_line("paired with bob");
    invite.wait_exit().assert_success();

    // The keys are in a private file, and never printed.
    let file = a.with_extension("db.nostr.json");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)
            .expect("device file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json");
    let secret = json["devices"]["bob"]["local_secret"]
        .as_str()
        .expect("secret")
        .to_owned();
    assert!(!joined.stdout.contains(&secret) && !joined.stderr.contains(&secret));

    // The code works once.
    let again = run(cmd(
        &["pair", "join", code.trim(), "--timeout", "3"],
        &fx.client_db("c.db"),
    ));
    assert!(
        again.code() != Some(0),
        "a used code paired again: {}",
        again.stdout
    );

    write_sql(&a, "INSERT INTO notes (id, body) VALUES (1, 'from a')");
    write_sql(&b, "INSERT INTO notes (id, body) VALUES (2, 'from b')");
    let sa = Running::start(cmd(
        &["sync", "--relay", &url, "--once", "--timeout", "30"],
        &a,
    ));
    let sb = Running::start(cmd(
        &["sync", "--relay", &url, "--once", "--timeout", "30"],
        &b,
    ));
    let (oa, ob) = (sa.wait_exit(), sb.wait_exit());
    oa.assert_success();
    ob.assert_success();
    let expected = vec![(1, "from a".to_string()), (2, "from b".to_string())];
    assert_eq!(notes(&a), expected, "{}\n{}", oa.stdout, oa.stderr);
    assert_eq!(notes(&b), expected, "{}\n{}", ob.stdout, ob.stderr);

    let list = run(cmd(&["pair", "list"], &a));
    list.assert_success();
    assert!(list.stdout.contains("bob"), "{}", list.stdout);
    let status = run(cmd(&["status"], &a));
    status.assert_success();
    assert!(
        status.stdout.contains("paired devices") && status.stdout.contains("bob"),
        "{}",
        status.stdout
    );
    run(cmd(&["pair", "remove", "bob"], &a)).assert_success();
    let list = run(cmd(&["pair", "list"], &a));
    assert!(list.stdout.contains("no paired devices"), "{}", list.stdout);
    // With nobody paired, a relay sync says what to do.
    run(cmd(&["sync", "--relay", &url, "--once"], &a)).assert_failure(1, "crsync pair");
}
