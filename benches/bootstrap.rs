//! Bootstrap benchmark: a new replica of a large database, by snapshot and
//! by change replay, side by side in one run over the same real server.
//!
//! `cargo bench --bench bootstrap` prints one markdown table. Every role runs
//! in a process of its own (this binary re-executed as `child <role> ...`),
//! so each client's peak RSS (`VmHWM`) is its own:
//!
//! - `server`: the node-server on 127.0.0.1:0 (a bearer token,
//!   `snapshot_threshold` 1000) over a data directory whose `bench.db` holds
//!   the source: `CRSYNC_BOOTSTRAP_CHANGES` changes (default 1,002,000:
//!   334,000 rows x 3 columns, written in transactions of 1000 rows, so the
//!   replay works without chunked transactions).
//! - The snapshot is made once (the first `GET /snapshot/info`), timed from
//!   here: the **build**, a one-off on the server, not in the bootstrap time.
//! - `clone`: `SnapshotClient::clone_into` of a new file (download, sha256
//!   check, install), timed inside the child; then the same child opens the
//!   replica with a Peer and syncs, timed separately: until caught up with
//!   the server (nothing to receive), and until the server's replica holds
//!   the new replica's cursor (its first upload stream scans its changes
//!   once, finds nothing to send, and claims its own site).
//! - `replay`: a Peer over an empty file (the schema, nothing else) dialing
//!   the server over HTTP+SSE, timed until its cursor holds the server's
//!   last version.
//!
//! Both replicas are then compared with each other and with the server:
//! every row, who wrote each cell (`crsql_changes` site ids), and the
//! cursors (each but the replica's own entry). Bytes moved: the snapshot's
//! file size, and for both the loopback interface's byte counter
//! (`/proc/net/dev`, both directions, every process on the machine).
//!
//! Without `--bench` (as under `cargo test --all-targets`) it runs a smoke
//! size in a few seconds. Environment: `CRSYNC_BOOTSTRAP_CHANGES`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use crsync::rusqlite::Connection;
use crsync::server::{Server, ServerConfig, TokenConfig};
use crsync::transports::snapshot::SnapshotClient;
use crsync::transports::sse::SseDialer;
use crsync::{Cursor, DbVersion, Peer, PeerEvent, SiteId, Store};
use futures_util::StreamExt;

mod common;

use common::{ROWS_PER_TXN, SCHEMA, close_raw, open_raw, peak_rss_kib, write_source};

const TOKEN: &str = "bench-token";
const DB_NAME: &str = "bench";
/// The server's snapshot threshold in this benchmark.
const THRESHOLD: u64 = 1000;
/// Longest any single step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(1800);
/// The speed-up the issue asks for.
const TARGET_SPEEDUP: f64 = 10.0;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn url(addr: &str) -> String {
    format!("http://{addr}/db/{DB_NAME}")
}

/// Printed by every child at its end: peak RSS in KiB.
fn print_peak() {
    println!("PEAK {}", peak_rss_kib());
}

// ---------------------------------------------------------------- child roles

/// `child gen PATH ROWS`: the source, written as the server's own replica.
fn child_gen(path: &Path, rows: usize) -> anyhow::Result<()> {
    crsync::advanced::load_extension(None)?;
    let c = open_raw(path)?;
    write_source(&c, rows)?;
    let site: Vec<u8> = c.query_row("SELECT crsql_site_id()", [], |r| r.get(0))?;
    let version: i64 = c.query_row("SELECT crsql_db_version()", [], |r| r.get(0))?;
    close_raw(c);
    println!("SOURCE {} {version}", SiteId::from_slice(&site)?.to_hex());
    Ok(())
}

/// `child server DIR`: the node-server; prints `ADDR <addr>`, serves until stdin closes.
fn child_server(dir: &Path) -> anyhow::Result<()> {
    let schema = dir.join("schema.sql");
    std::fs::write(&schema, format!("{SCHEMA};\n"))?;
    let mut config = ServerConfig::default();
    config.bind = "127.0.0.1:0".parse()?;
    config.data_dir = dir.join("data");
    config.schema = Some(schema);
    config.token_env = String::new();
    config.snapshot_threshold = THRESHOLD;
    config.shutdown_timeout = Duration::from_secs(5);
    let mut token = TokenConfig::new(TOKEN, ["*"]);
    token.create = true;
    config.tokens = vec![token];
    runtime()?.block_on(async {
        let server = Server::bind(config).await?;
        println!("ADDR {}", server.local_addr());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = tx.send(());
        });
        server
            .serve(async move {
                let _ = rx.await;
            })
            .await?;
        anyhow::Ok(())
    })?;
    print_peak();
    Ok(())
}

/// Waits for the server's `Connected`, then until the Peer holds what it had.
async fn caught_up(peer: &Peer) -> anyhow::Result<SiteId> {
    let mut events = peer.events();
    let server = loop {
        match tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .context("no connection to the server")?
        {
            Some(PeerEvent::Connected { peer, .. }) => break peer,
            Some(PeerEvent::DialFailed { reason, .. }) => eprintln!("dial failed: {reason}"),
            Some(_) => {}
            None => bail!("event stream ended"),
        }
    };
    peer.wait_caught_up(server, STEP_TIMEOUT).await?;
    Ok(server)
}

fn peer(store: Store, addr: &str) -> Peer {
    let peer = Peer::builder(store).build();
    peer.add_dialer(SseDialer::new(url(addr)).with_token(TOKEN));
    peer
}

/// Whether the server's replica holds `site` at `version` (read from its file).
fn server_holds(replica: &Path, site: SiteId, version: i64) -> anyhow::Result<bool> {
    let c = Connection::open(replica)?;
    c.busy_timeout(Duration::from_secs(5))?;
    let held: Option<i64> = c
        .query_row(
            "SELECT db_version FROM crsync_cursor WHERE site_id = ?1",
            [site.as_bytes().as_slice()],
            |r| r.get(0),
        )
        .ok();
    close_raw(c);
    Ok(held.is_some_and(|v| v >= version))
}

/// `child clone ADDR DB SERVER_REPLICA`: download + install (timed), then a
/// first sync: until caught up with the server, and until the server holds
/// the replica's cursor (its first upload stream, which has nothing to send,
/// ended). Prints `CLONE <secs> <bytes>`, `SYNC <secs> <secs>`, `PEAK`.
fn child_clone(addr: &str, db: &Path, server_replica: &Path) -> anyhow::Result<()> {
    crsync::advanced::load_extension(None)?;
    runtime()?.block_on(async {
        let client = SnapshotClient::new(&url(addr)).with_token(TOKEN);
        let start = Instant::now();
        let report = client.clone_into(db).await?;
        let secs = start.elapsed().as_secs_f64();
        println!("CLONE {secs} {}", report.install.bytes);
        let start = Instant::now();
        let store = Store::open(db).await?;
        let own = store.cursor().await?.get(&store.site_id()).0;
        let peer = peer(store.clone(), addr);
        caught_up(&peer).await?;
        let down = start.elapsed().as_secs_f64();
        while !server_holds(server_replica, store.site_id(), own)? {
            ensure!(start.elapsed() < STEP_TIMEOUT, "the first upload timed out");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("SYNC {down} {}", start.elapsed().as_secs_f64());
        peer.shutdown().await;
        store.close().await?;
        anyhow::Ok(())
    })?;
    print_peak();
    Ok(())
}

/// `child replay ADDR DB SITE VERSION`: a Peer from an empty file until its
/// cursor holds SITE at VERSION. Prints `REPLAY <secs>`, `PEAK`.
fn child_replay(addr: &str, db: &Path, site: &str, version: i64) -> anyhow::Result<()> {
    crsync::advanced::load_extension(None)?;
    let site: SiteId = site.parse()?;
    runtime()?.block_on(async {
        let store = Store::open(db).await?;
        store.write(|tx| tx.execute_batch(SCHEMA)).await?;
        store.enable_crr(&["items"]).await?;
        let start = Instant::now();
        let peer = peer(store.clone(), addr);
        let mut events = peer.events();
        while !store.cursor().await?.holds(&site, DbVersion(version)) {
            ensure!(start.elapsed() < STEP_TIMEOUT, "replay timed out");
            let _ = tokio::time::timeout(Duration::from_millis(100), events.next()).await;
        }
        println!("REPLAY {}", start.elapsed().as_secs_f64());
        peer.shutdown().await;
        store.close().await?;
        anyhow::Ok(())
    })?;
    print_peak();
    Ok(())
}

// ---------------------------------------------------------------- orchestration

/// A child process whose stdout lines arrive on a channel.
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(name: &str, args: &[OsString]) -> anyhow::Result<Proc> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("child")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            name: name.into(),
            child,
            stdin,
            lines,
        })
    }

    /// The next line starting with `prefix` (its rest).
    fn expect(&mut self, prefix: &str) -> anyhow::Result<String> {
        loop {
            match self.lines.recv_timeout(STEP_TIMEOUT) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Err(_) => {
                    let status = self.child.wait()?;
                    bail!("{} ended ({status}) before printing {prefix}", self.name)
                }
            }
        }
    }

    /// Closes stdin, waits for a successful exit and returns the lines not
    /// read yet.
    fn finish(mut self) -> anyhow::Result<Vec<String>> {
        drop(self.stdin.take());
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(STEP_TIMEOUT) {
            rest.push(line);
        }
        let status = self.child.wait()?;
        ensure!(status.success(), "{} failed: {status}", self.name);
        Ok(rest)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn os(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// Bytes through the loopback interface so far (received; on `lo` every
/// byte sent is also received), from `/proc/net/dev`.
fn loopback_bytes() -> u64 {
    std::fs::read_to_string("/proc/net/dev")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.trim_start().starts_with("lo:"))
                .and_then(|l| l.split_once(':'))
                .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Rows, who wrote each cell, and the cursor (its own entry left out) of a
/// replica file.
#[derive(Debug, PartialEq, Eq)]
struct Contents {
    rows_digest: u64,
    rows: u64,
    writers: BTreeMap<SiteId, u64>,
    attribution_digest: u64,
    own: SiteId,
    cursor: Cursor,
}

impl Contents {
    /// The cursor without the entries of the given sites (each replica's own).
    fn cursor_without(&self, sites: &[SiteId]) -> Vec<(SiteId, DbVersion)> {
        self.cursor
            .iter()
            .filter(|(s, _)| !sites.contains(s))
            .collect()
    }
}

fn contents(path: &Path) -> anyhow::Result<Contents> {
    use std::hash::{Hash, Hasher};
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    let own: Vec<u8> = c.query_row("SELECT crsql_site_id()", [], |r| r.get(0))?;
    let own = SiteId::from_slice(&own)?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut rows = 0u64;
    {
        let mut s = c.prepare("SELECT id, name, qty, note FROM items ORDER BY id")?;
        let mut q = s.query([])?;
        while let Some(r) = q.next()? {
            let row: (i64, Option<String>, Option<i64>, Option<String>) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            row.hash(&mut hasher);
            rows += 1;
        }
    }
    let rows_digest = hasher.finish();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut writers = BTreeMap::new();
    {
        let mut s =
            c.prepare("SELECT pk, cid, site_id, col_version FROM crsql_changes ORDER BY pk, cid")?;
        let mut q = s.query([])?;
        while let Some(r) = q.next()? {
            let site: Vec<u8> = r.get(2)?;
            let cell: (Vec<u8>, String, Vec<u8>, i64) =
                (r.get(0)?, r.get(1)?, site.clone(), r.get(3)?);
            cell.hash(&mut hasher);
            *writers.entry(SiteId::from_slice(&site)?).or_insert(0) += 1;
        }
    }
    let mut cursor = Cursor::new();
    {
        let mut s = c.prepare("SELECT site_id, db_version FROM crsync_cursor")?;
        let mut q = s.query([])?;
        while let Some(r) = q.next()? {
            let site: Vec<u8> = r.get(0)?;
            cursor.advance(SiteId::from_slice(&site)?, DbVersion(r.get(1)?));
        }
    }
    close_raw(c);
    Ok(Contents {
        rows_digest,
        rows,
        writers,
        attribution_digest: hasher.finish(),
        own,
        cursor,
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        let arg = |i: usize| -> anyhow::Result<&str> {
            args.get(i).map(String::as_str).context("missing argument")
        };
        return match arg(2)? {
            "gen" => child_gen(Path::new(arg(3)?), arg(4)?.parse()?),
            "server" => child_server(Path::new(arg(3)?)),
            "clone" => child_clone(arg(3)?, Path::new(arg(4)?), Path::new(arg(5)?)),
            "replay" => child_replay(arg(3)?, Path::new(arg(4)?), arg(5)?, arg(6)?.parse()?),
            other => bail!("unknown child role {other:?}"),
        };
    }
    let full = args.iter().any(|a| a == "--bench");
    let changes: usize = if full {
        std::env::var("CRSYNC_BOOTSTRAP_CHANGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_002_000)
    } else {
        3_000
    };
    let rows = (changes / 3).max(1);
    let work = tempfile::tempdir()?;
    let server_dir = work.path().join("server");
    let data = server_dir.join("data");
    std::fs::create_dir_all(&data)?;
    let source = data.join(format!("{DB_NAME}.db"));

    let start = Instant::now();
    let mut generator = Proc::spawn("generator", &os(&[&"gen", &source, &rows.to_string()]))?;
    let line = generator.expect("SOURCE ")?;
    generator.finish()?;
    let (site, version) = line.split_once(' ').context("SOURCE line")?;
    let (site, version) = (site.to_owned(), version.parse::<i64>()?);
    eprintln!(
        "generated {rows} rows ({} changes, {} transactions) in {:.1} s",
        rows * 3,
        rows.div_ceil(ROWS_PER_TXN),
        start.elapsed().as_secs_f64()
    );

    let mut server = Proc::spawn("server", &os(&[&"server", &server_dir]))?;
    let addr = server.expect("ADDR ")?;

    // The one-off build, timed here (the first info request makes it).
    let start = Instant::now();
    let info = runtime()?.block_on(async {
        SnapshotClient::new(&url(&addr))
            .with_token(TOKEN)
            .info()
            .await
    })?;
    let build_secs = start.elapsed().as_secs_f64();
    let info = info.context("the server offered no snapshot")?;

    let run = |role: &str,
               db: &Path,
               extra: &[&dyn AsRef<std::ffi::OsStr>]|
     -> anyhow::Result<(Vec<String>, u64)> {
        let before = loopback_bytes();
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&role, &addr, &db];
        all.extend_from_slice(extra);
        let lines = Proc::spawn(role, &os(&all))?.finish()?;
        Ok((lines, loopback_bytes().saturating_sub(before)))
    };
    let field = |lines: &[String], prefix: &str| -> anyhow::Result<Vec<f64>> {
        let line = lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .with_context(|| format!("no {prefix} line"))?;
        line.split_whitespace()
            .map(|f| f.parse::<f64>().map_err(anyhow::Error::from))
            .collect()
    };

    let clone_db = work.path().join("snapshot.db");
    let (clone_lines, clone_lo) = run("clone", &clone_db, &[&source])?;
    let replay_db = work.path().join("replay.db");
    let (replay_lines, replay_lo) = run("replay", &replay_db, &[&site, &version.to_string()])?;
    let clone = field(&clone_lines, "CLONE ")?;
    let sync = field(&clone_lines, "SYNC ")?;
    let (sync_down, sync_both) = (sync[0], sync[1]);
    let clone_peak = field(&clone_lines, "PEAK ")?[0] * 1024.0;
    let replay = field(&replay_lines, "REPLAY ")?[0];
    let replay_peak = field(&replay_lines, "PEAK ")?[0] * 1024.0;
    server.finish()?;

    // The results are identical: rows, who wrote each cell, cursors.
    crsync::advanced::load_extension(None)?;
    let (s, r, origin) = (
        contents(&clone_db)?,
        contents(&replay_db)?,
        contents(&source)?,
    );
    ensure!(
        s.rows == rows as u64,
        "the snapshot replica holds {} rows, expected {rows}",
        s.rows
    );
    let both = [s.own, r.own];
    ensure!(
        (
            s.rows,
            s.rows_digest,
            &s.writers,
            s.attribution_digest,
            s.cursor_without(&both)
        ) == (
            r.rows,
            r.rows_digest,
            &r.writers,
            r.attribution_digest,
            r.cursor_without(&both)
        ),
        "the replicas differ:\nsnapshot {s:?}\nreplay   {r:?}"
    );
    ensure!(
        (s.rows_digest, s.attribution_digest) == (origin.rows_digest, origin.attribution_digest),
        "the replicas differ from the server"
    );
    let server_site: SiteId = site.parse()?;
    ensure!(
        s.writers.keys().eq([&server_site]),
        "every cell is the server's: {:?}",
        s.writers
    );
    ensure!(
        s.cursor_without(&both) == vec![(server_site, DbVersion(version))],
        "cursor {:?}",
        s.cursor
    );

    let (clone_secs, file_bytes) = (clone[0], clone[1] as u64);
    let speedup = replay / clone_secs;
    println!(
        "crsync bootstrap benchmark: a new replica of a {changes}-change database ({rows} rows x 3 columns, \
         {} transactions of {ROWS_PER_TXN} rows; {} cores; loopback; HTTP+SSE for the replay)",
        rows.div_ceil(ROWS_PER_TXN),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| path | time | client peak RSS | bytes moved | speed-up vs replay |");
    println!("|---|---|---|---|---|");
    println!(
        "| replay: Peer from an empty file, until its cursor holds the server's | {replay:.2} s | {} | {} (loopback, both directions) | 1.00x |",
        mib(replay_peak as u64),
        mib(replay_lo)
    );
    println!(
        "| **snapshot**: download + sha256 check + install (`clone_into`) | {clone_secs:.2} s | {} | {} (file; loopback {}) | **{speedup:.1}x** |",
        mib(clone_peak as u64),
        mib(file_bytes),
        mib(clone_lo)
    );
    println!(
        "| snapshot replica's first sync: caught up with the server (nothing to receive) | {sync_down:.2} s | (same process) | (in the loopback figure above) | |"
    );
    println!(
        "| ... and the server holds its cursor (its first upload starts after the snapshot's {changes} changes: nothing to send) | {sync_both:.2} s | (same process) | | |"
    );
    println!(
        "| snapshot + first sync both ways | {:.2} s | | | {:.1}x |",
        clone_secs + sync_both,
        replay / (clone_secs + sync_both)
    );
    println!(
        "| snapshot build on the server (one-off, `VACUUM INTO` + prepare + sha256; not in the times above) | {build_secs:.2} s | | | {:.1}x with it |",
        replay / (build_secs + clone_secs)
    );
    println!();
    println!(
        "identical: {} rows, every cell's writer and version, cursors (snapshot {} changes, server version {}); target >= {TARGET_SPEEDUP}x: {}",
        s.rows,
        info.changes,
        version,
        if speedup >= TARGET_SPEEDUP {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
