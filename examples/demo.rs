//! The README demo: a sync server and two peers on two database files, one
//! syncing over HTTP+SSE and one over WebSocket. Both write, offline and
//! live, including conflicting edits of the same row; the events of both
//! peers are printed as they happen; the demo waits until both databases
//! converge, prints them and checks they are identical.
//!
//! Run: `cargo run --example demo [DIR]` (default DIR: `./demo-data`).
//! `laptop.db`, `phone.db`, `schema.sql` and `server/` in DIR are recreated
//! on every run. Exits non-zero if the databases do not converge within
//! 20 seconds.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use crsync::server::{Auth, Server, ServerConfig};
use crsync::transports::{SseDialer, WebSocketDialer};
use crsync::{ChangeSource, Cursor, Peer, PeerEvent, Store};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The replicated table.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS todos (
    id INTEGER PRIMARY KEY NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    done INTEGER NOT NULL DEFAULT 0
);";
/// The database's name on the server.
const DB_NAME: &str = "todos";
/// How long the databases get to converge, each time.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often convergence is re-checked when no event arrives.
const RECHECK: Duration = Duration::from_millis(250);

type Row = (i64, String, i64);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "demo-data".into()),
    );
    fresh_dir(&dir)?;
    let began = Instant::now();

    // The server: port 0, a database created on first use from the schema,
    // and a token generated for this run (no anonymous access).
    let schema_path = dir.join("schema.sql");
    std::fs::write(&schema_path, SCHEMA)?;
    let token = random_token();
    let mut config = ServerConfig::default();
    config.bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    config.data_dir = dir.join("server");
    config.schema = Some(schema_path);
    config.allow_create = true;
    let auth = Auth::new().with_creating_token(token.clone(), [DB_NAME]);
    let server = Server::bind_with_auth(config, auth).await?;
    let addr = server.local_addr();
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    let base = format!("http://{addr}/db/{DB_NAME}");
    println!("server   {base} (token generated for this run)");

    // Two database files, the same schema, the table turned into a CRR.
    let laptop = open(&dir.join("laptop.db")).await?;
    let phone = open(&dir.join("phone.db")).await?;
    println!(
        "laptop   {} (site {})",
        laptop.path().display(),
        laptop.site_id()
    );
    println!(
        "phone    {} (site {})",
        phone.path().display(),
        phone.site_id()
    );

    // Offline: both create todo #1 (a conflict on the same row), and more.
    println!("\n-- offline: both create todo #1 with different titles");
    exec(
        &laptop,
        "INSERT INTO todos (id, title) VALUES (1, 'buy milk'), (2, 'water the plants')",
    )
    .await?;
    exec(
        &phone,
        "INSERT INTO todos (id, title) VALUES (1, 'buy oat milk'), (3, 'call mum')",
    )
    .await?;

    print_rows("laptop", &rows(&laptop).await?);
    print_rows("phone", &rows(&phone).await?);

    // Online: the laptop over HTTP+SSE, the phone over WebSocket.
    println!("\n-- online: laptop over HTTP+SSE, phone over WebSocket");
    let changed = Arc::new(Notify::new());
    let laptop_peer = Peer::builder(laptop.clone()).build();
    let phone_peer = Peer::builder(phone.clone()).build();
    let printers = [
        print_events("laptop", &laptop_peer, &changed, began),
        print_events("phone", &phone_peer, &changed, began),
    ];
    laptop_peer.add_dialer(SseDialer::new(&base).with_token(&token));
    phone_peer.add_dialer(
        WebSocketDialer::new(format!("ws://{addr}/db/{DB_NAME}/ws")).with_token(&token),
    );

    let mut outcome = converge(&laptop, &phone, &changed).await;
    if outcome.is_ok() {
        let winner = rows(&laptop).await?.into_iter().find(|r| r.0 == 1);
        if let Some((_, title, _)) = winner {
            println!(
                "   todo #1 is {title:?} on both: the conflict has the same winner everywhere"
            );
        }
        // Live: both edit at the same moment. Different cells of todo #2
        // merge; the same cell (the title of todo #1) gets one winner.
        println!("\n-- live: both edit todo #1's title and todo #2 at the same time");
        let (a, b) = tokio::join!(
            exec(
                &laptop,
                "UPDATE todos SET title = 'buy milk and bread' WHERE id = 1; UPDATE todos SET title = 'water the plants (twice)' WHERE id = 2"
            ),
            exec(
                &phone,
                "UPDATE todos SET title = 'buy milk, eggs' WHERE id = 1; UPDATE todos SET done = 1 WHERE id = 2; INSERT INTO todos (id, title) VALUES (4, 'book dentist')"
            ),
        );
        outcome = a.and(b).and(converge(&laptop, &phone, &changed).await);
    }

    // Print both, then shut everything down, whatever happened.
    let (laptop_rows, phone_rows) = (rows(&laptop).await?, rows(&phone).await?);
    print_rows("laptop", &laptop_rows);
    print_rows("phone", &phone_rows);
    let identical = laptop_rows == phone_rows;
    println!("\nidentical: {identical}");

    laptop_peer.shutdown().await;
    phone_peer.shutdown().await;
    drop((laptop_peer, phone_peer));
    for printer in printers {
        // The event streams end once their Peers are gone.
        let _ = tokio::time::timeout(Duration::from_secs(2), printer).await;
    }
    laptop.close().await?;
    phone.close().await?;
    let _ = stop_server.send(());
    server_task.await??;
    println!("done in {:.2}s", began.elapsed().as_secs_f64());

    outcome?;
    anyhow::ensure!(identical, "the two databases differ");
    Ok(())
}

/// Removes what a previous run left in `dir` (only the demo's own files).
fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for db in ["laptop.db", "phone.db"] {
        for suffix in ["", "-wal", "-shm"] {
            let path = dir.join(format!("{db}{suffix}"));
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()));
                }
                _ => {}
            }
        }
    }
    match std::fs::remove_dir_all(dir.join("server")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// A 128-bit random token, hex.
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    (0..2)
        .map(|i| {
            // Each RandomState has fresh random keys.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.write_u32(i);
            format!("{:016x}", h.finish())
        })
        .collect()
}

async fn open(path: &Path) -> anyhow::Result<Store> {
    let store = Store::open(path).await?;
    store.write(|tx| tx.execute_batch(SCHEMA)).await?;
    store.enable_crr(&["todos"]).await?;
    Ok(store)
}

async fn exec(store: &Store, sql: &'static str) -> anyhow::Result<()> {
    Ok(store.write(move |tx| tx.execute_batch(sql)).await?)
}

async fn rows(store: &Store) -> anyhow::Result<Vec<Row>> {
    Ok(store
        .read(|c| {
            let mut stmt = c.prepare("SELECT id, title, done FROM todos ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
        .await?)
}

fn print_rows(name: &str, rows: &[Row]) {
    println!("\n{name}:");
    for (id, title, done) in rows {
        let mark = if *done != 0 { "x" } else { " " };
        println!("  [{mark}] #{id} {title}");
    }
}

/// Prints a Peer's events as they happen, and pokes `changed` on each.
fn print_events(
    name: &'static str,
    peer: &Peer,
    changed: &Arc<Notify>,
    began: Instant,
) -> JoinHandle<()> {
    let mut events = peer.events();
    let changed = Arc::clone(changed);
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let t = began.elapsed().as_secs_f64();
            println!("[{t:6.2}s] {name:<6} {}", describe(&event));
            changed.notify_one();
        }
    })
}

fn describe(event: &PeerEvent) -> String {
    let short = |s: &crsync::SiteId| s.to_hex()[..8].to_owned();
    match event {
        PeerEvent::Connected { peer, transport } => {
            format!("connect    server {} via {transport}", short(peer))
        }
        PeerEvent::Sync { peer } => {
            format!("sync       server {} asked for what it lacks", short(peer))
        }
        PeerEvent::Eose { peer } => format!("eose       server {} sent all it had", short(peer)),
        PeerEvent::Change { tables, source } => {
            let who = match source {
                ChangeSource::Local => "local write",
                ChangeSource::External => "write by another process",
                ChangeSource::Merge => "merged from the server",
            };
            let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
            format!("change     {} ({who})", tables.join(", "))
        }
        PeerEvent::Outdated {
            peer,
            remote_version,
            local_version,
        } => format!(
            "outdated   server {} has schema {remote_version}, we have {local_version}",
            short(peer)
        ),
        PeerEvent::Disconnected { reason, .. } => format!("disconnect {reason}"),
        PeerEvent::DialFailed {
            transport, reason, ..
        } => format!("dial failed {transport}: {reason}"),
        other => format!("{other:?}"),
    }
}

/// Whether `from` holds a change that `to` lacks.
async fn lacks(from: &Store, to: &Cursor) -> anyhow::Result<bool> {
    let mut batches = from.changes_since(to).await?;
    while let Some(batch) = batches.next_batch().await {
        if !batch?.changes.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Waits until neither database lacks a change of the other and their rows
/// are identical, re-checking on every event (and every [`RECHECK`]).
async fn converge(a: &Store, b: &Store, changed: &Notify) -> anyhow::Result<()> {
    let wait = async {
        loop {
            let done = !lacks(a, &b.cursor().await?).await?
                && !lacks(b, &a.cursor().await?).await?
                && rows(a).await? == rows(b).await?;
            if done {
                return anyhow::Ok(());
            }
            let _ = tokio::time::timeout(RECHECK, changed.notified()).await;
        }
    };
    tokio::time::timeout(CONVERGE_TIMEOUT, wait)
        .await
        .map_err(|_| {
            anyhow::anyhow!("the databases did not converge within {CONVERGE_TIMEOUT:?}")
        })??;
    println!("-- converged");
    Ok(())
}
