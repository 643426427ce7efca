//! Network sync benchmark: initial sync of ~1M changes between two peers
//! through the node-server (HTTP+SSE and WebSocket on loopback), next to the
//! raw in-process merge of the same changes, the peak memory of every
//! process, and the live latency of single-row writes.
//!
//! `cargo bench --bench sync` prints two markdown tables. Every role runs in a
//! process of its own (this binary re-executed as `child <role> ...`), so each
//! process's peak RSS (`VmHWM`) is its own:
//!
//! - `raw`: `crsql_changes` of the source file copied row by row with
//!   `INSERT INTO crsql_changes` into an empty replica, one transaction (as in
//!   `benches/store.rs`); `store`: the Store's stream + merge in one process.
//! - `server`: the node-server (`allow_create`, a schema, a bearer token).
//! - `source`: peer A over a copy of the source file, dialing the server.
//! - `dest`: peer B over an empty file, dialing the server; reports when its
//!   cursor holds the source's last version.
//!
//! Initial sync is measured three ways per transport, each with a fresh
//! server: **upload** (A alone until the server's replica holds everything;
//! timed by polling the replica's cursor from this process), then
//! **download** (A stopped; B alone until it holds everything), and
//! **A -> B** (B online and caught up with an empty server, then A starts;
//! timed until B holds everything: the server merges and relays at once).
//!
//! Live latency: A and B (separate processes) both connected through a fresh
//! server; A writes one row every 10 ms, stamping the wall-clock time into the
//! row; B takes the time when its `PeerEvent::Change` (source `Merge`)
//! arrives and reads the stamps of the new rows. Same machine, same clock.
//!
//! Without `--bench` (as under `cargo test --all-targets`) it runs a smoke
//! size in a few seconds. Environment: `CRSYNC_BENCH_CHANGES` (default
//! 1002000; a second, smaller run uses 30% of it), `CRSYNC_BENCH_WRITES`
//! (latency writes, default 1000), `CRSYNC_BENCH_ONLY` (e.g. `legs,ws,big`:
//! only these parts, transports and sizes), `CRSYNC_BENCH_OUT` (also write the
//! tables to this file), `CRSYNC_BENCH_LOG` (a tracing filter for the
//! children's logs on stderr), `CRSYNC_BENCH_CONFLICTS=off` (the in-process
//! Store merge without conflict recording, to measure what it costs),
//! `CRSYNC_BENCH_TOP_PAD` (glibc's `MALLOC_TOP_PAD_` of every child, default
//! 16 MiB, the same for every contender: see [`MALLOC_TOP_PAD`]). Results and how to read them:
//! `benches/SYNC_RESULTS.md`.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use crsync::rusqlite::{Connection, OpenFlags};
use crsync::transports::{SseDialer, WebSocketDialer};
use crsync::{ChangeSource, DbVersion, Peer, PeerEvent, SiteId, Store};
use futures_util::{Stream, StreamExt};

mod common;

use common::{
    Proc, ROWS_PER_TXN, SCHEMA, STEP_TIMEOUT, Usage, close_raw, copy_raw, create_schema,
    init_logging, mib, now_ns, open_raw, os, percentile, print_usage, remove_db, runtime,
    stdin_closed, store_copy, write_source,
};

/// glibc's `MALLOC_TOP_PAD_` for every child process (16 MiB). With the
/// default (128 KiB) glibc gives freed heap back to the kernel and faults it
/// in again: the single-threaded raw copy spent about half its CPU in those
/// page faults, while the Store (its allocations spread over threads and
/// arenas) hardly did. The same setting for every contender keeps the
/// comparison about the work, not the allocator; `CRSYNC_BENCH_TOP_PAD`
/// overrides it (`131072`: glibc's default).
const MALLOC_TOP_PAD: &str = "16777216";

const TOKEN: &str = "bench-token";
const DB_NAME: &str = "bench";
const LATENCY_WARMUP: usize = 20;
const LATENCY_INTERVAL: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------- helpers
// ---------------------------------------------------------------- child roles

/// `child gen PATH ROWS`: the source database, `ROWS` rows x 3 columns in
/// transactions of 1000 rows. Prints `SOURCE <site hex> <db_version>`.
fn child_gen(path: &Path, rows: usize) -> anyhow::Result<()> {
    crsync::advanced::load_extension(None)?;
    remove_db(path);
    let c = open_raw(path)?;
    write_source(&c, rows)?;
    let site: Vec<u8> = c.query_row("SELECT crsql_site_id()", [], |r| r.get(0))?;
    let version: i64 = c.query_row("SELECT crsql_db_version()", [], |r| r.get(0))?;
    close_raw(c);
    println!("SOURCE {} {version}", SiteId::from_slice(&site)?.to_hex());
    Ok(())
}

/// `child raw SRC DST`: raw cr-sqlite copy in one transaction.
fn child_raw(src: &Path, dst: &Path) -> anyhow::Result<()> {
    crsync::advanced::load_extension(None)?;
    let d = open_raw(dst)?;
    create_schema(&d)?;
    let s = open_raw(src)?;
    let start = Instant::now();
    let n = copy_raw(&s, &d, usize::MAX)?;
    let secs = start.elapsed().as_secs_f64();
    close_raw(s);
    close_raw(d);
    println!("RESULT {n} {secs}");
    print_usage();
    Ok(())
}

/// `child store SRC DST`: the Store's batched stream + merge, in one process.
fn child_store(src: &Path, dst: &Path) -> anyhow::Result<()> {
    crsync::advanced::load_extension(None)?;
    runtime()?.block_on(async {
        let a = Store::open(src).await?;
        let mut b = Store::builder(dst);
        if std::env::var("CRSYNC_BENCH_CONFLICTS").is_ok_and(|v| v == "off") {
            b = b.conflict_retention(0, Duration::ZERO);
        }
        let b = b.open().await?;
        b.write(|tx| tx.execute_batch(SCHEMA)).await?;
        b.enable_crr(&["items"]).await?;
        let start = Instant::now();
        let n = store_copy(&a, &b).await?;
        let secs = start.elapsed().as_secs_f64();
        a.close().await?;
        b.close().await?;
        println!("RESULT {n} {secs}");
        anyhow::Ok(())
    })?;
    print_usage();
    Ok(())
}

/// `child server DIR`: the node-server on 127.0.0.1:0; prints `ADDR <addr>`,
/// serves until stdin closes, then prints `PEAK <kib> <cpu secs>`.
fn child_server(dir: &Path) -> anyhow::Result<()> {
    common::serve_until_stdin_closes(common::bench_server_config(dir, TOKEN)?)
}

fn add_dialer(peer: &Peer, transport: &str, addr: &str) -> anyhow::Result<()> {
    match transport {
        "sse" => {
            peer.add_dialer(
                SseDialer::new(format!("http://{addr}/db/{DB_NAME}")).with_token(TOKEN),
            );
        }
        "ws" => {
            peer.add_dialer(
                WebSocketDialer::new(format!("ws://{addr}/db/{DB_NAME}/ws")).with_token(TOKEN),
            );
        }
        other => bail!("unknown transport {other:?}"),
    }
    Ok(())
}

/// Waits for the server's `Connected`, then for its `eose`: we hold what it had.
async fn caught_up_with_server(
    peer: &Peer,
    events: &mut (impl Stream<Item = PeerEvent> + Unpin),
) -> anyhow::Result<SiteId> {
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

/// `child peer ROLE TRANSPORT ADDR DB [ARGS]`.
fn child_peer(args: &[String]) -> anyhow::Result<()> {
    let [role, transport, addr, db, rest @ ..] = args else {
        bail!("usage: child peer ROLE TRANSPORT ADDR DB [ARGS]")
    };
    crsync::advanced::load_extension(None)?;
    runtime()?.block_on(async {
        let stop = stdin_closed();
        let store = Store::open(db).await?;
        if role != "source" {
            store.write(|tx| tx.execute_batch(SCHEMA)).await?;
            store.enable_crr(&["items"]).await?;
        }
        let peer = Peer::builder(store.clone()).build();
        let mut events = peer.events();
        add_dialer(&peer, transport, addr)?;
        match role.as_str() {
            // Uploads what it holds; the orchestrator watches the server's replica.
            "source" => println!("STARTED"),
            // Downloads until its cursor holds the source's last version.
            "dest" => {
                let site: SiteId = rest.first().context("site")?.parse()?;
                let version = DbVersion(rest.get(1).context("version")?.parse()?);
                caught_up_with_server(&peer, &mut events).await?;
                println!("READY");
                while !store.cursor().await?.holds(&site, version) {
                    let _ = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
                }
                let rows: i64 = store
                    .read(|c| c.query_row("SELECT count(*) FROM items", [], |r| r.get(0)))
                    .await?;
                println!("DONE {rows}");
            }
            "writer" => {
                let writes: usize = rest.first().context("writes")?.parse()?;
                caught_up_with_server(&peer, &mut events).await?;
                println!("READY");
                let mut tick = tokio::time::interval(LATENCY_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for id in 0..writes as i64 {
                    tick.tick().await;
                    let stamp = now_ns();
                    store
                        .write(move |tx| {
                            tx.execute(
                                "INSERT INTO items VALUES (?1, 'live', ?2, 'latency probe')",
                                (id, stamp),
                            )
                        })
                        .await?;
                }
                println!("WROTE");
            }
            "reader" => {
                let writes: usize = rest.first().context("writes")?.parse()?;
                caught_up_with_server(&peer, &mut events).await?;
                println!("READY");
                let mut last = -1i64;
                let mut got = 0;
                while got < writes {
                    let event = tokio::time::timeout(Duration::from_secs(30), events.next())
                        .await
                        .context("no change from the writer within 30 s")?;
                    match event {
                        Some(PeerEvent::Change {
                            source: ChangeSource::Merge,
                            ..
                        })
                        | Some(PeerEvent::Lagged { .. }) => {}
                        Some(_) => continue,
                        None => bail!("event stream ended"),
                    }
                    let seen = now_ns();
                    let rows: Vec<(i64, i64)> = store
                        .read(move |c| {
                            let mut st =
                                c.prepare("SELECT id, qty FROM items WHERE id > ?1 ORDER BY id")?;
                            let rows = st.query_map([last], |r| Ok((r.get(0)?, r.get(1)?)))?;
                            rows.collect()
                        })
                        .await?;
                    for (id, stamp) in rows {
                        println!("LAT {id} {}", seen - stamp);
                        last = id;
                        got += 1;
                    }
                }
                println!("DONE {got}");
            }
            other => bail!("unknown role {other:?}"),
        }
        let _ = stop.await;
        peer.shutdown().await;
        store.close().await?;
        anyhow::Ok(())
    })?;
    print_usage();
    Ok(())
}

// ---------------------------------------------------------------- orchestration

/// A child process, with [`MALLOC_TOP_PAD`] (or `CRSYNC_BENCH_TOP_PAD`).
fn spawn_child(name: &str, args: &[OsString]) -> anyhow::Result<Proc> {
    let pad = std::env::var("CRSYNC_BENCH_TOP_PAD").unwrap_or_else(|_| MALLOC_TOP_PAD.into());
    Proc::spawn_env(name, args, &[("MALLOC_TOP_PAD_", pad)])
}

struct Source {
    path: PathBuf,
    site: String,
    version: i64,
    changes: usize,
}

struct ServerProc {
    proc: Proc,
    addr: String,
    replica: PathBuf,
}

fn start_server(dir: &Path) -> anyhow::Result<ServerProc> {
    std::fs::create_dir_all(dir)?;
    let mut proc = spawn_child("server", &os(&[&"server", &dir]))?;
    let (_, line) = proc.expect("ADDR ")?;
    Ok(ServerProc {
        proc,
        addr: line["ADDR ".len()..].trim().to_string(),
        replica: dir.join("data").join(format!("{DB_NAME}.db")),
    })
}

/// The server replica's cursor entry for the source site, read with a plain
/// connection from this process (no cr-sqlite loaded here).
struct ReplicaWatch {
    path: PathBuf,
    site: Vec<u8>,
    conn: Option<Connection>,
}

impl ReplicaWatch {
    fn new(path: &Path, site: &str) -> anyhow::Result<Self> {
        Ok(ReplicaWatch {
            path: path.to_path_buf(),
            site: site.parse::<SiteId>()?.as_bytes().to_vec(),
            conn: None,
        })
    }

    fn holds(&mut self, version: i64) -> bool {
        if self.conn.is_none() && self.path.exists() {
            self.conn = Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .ok();
        }
        let Some(c) = &self.conn else { return false };
        c.query_row(
            "SELECT db_version FROM crsync_cursor WHERE site_id = ?1",
            [&self.site],
            |r| r.get::<_, i64>(0),
        )
        .is_ok_and(|v| v >= version)
    }
}

fn in_process(kind: &str, source: &Source, work: &Path) -> anyhow::Result<(f64, Usage)> {
    let src = work.join(format!("{kind}-src.db"));
    let dst = work.join(format!("{kind}-dst.db"));
    remove_db(&src);
    remove_db(&dst);
    std::fs::copy(&source.path, &src)?;
    let p = spawn_child(kind, &os(&[&kind, &src, &dst]))?;
    let (lines, peak) = p.finish()?;
    let result = lines
        .iter()
        .find_map(|l| l.strip_prefix("RESULT "))
        .context("no RESULT")?;
    let f: Vec<&str> = result.split_whitespace().collect();
    let n: usize = f[0].parse()?;
    ensure!(
        n == source.changes,
        "{kind} copied {n} changes, expected {}",
        source.changes
    );
    remove_db(&src);
    remove_db(&dst);
    Ok((f[1].parse()?, peak))
}

struct Legs {
    upload: f64,
    download: f64,
    source_peak: Usage,
    dest_peak: Usage,
    server_peak: Usage,
}

fn spawn_source(transport: &str, addr: &str, source: &Source, dir: &Path) -> anyhow::Result<Proc> {
    let db = dir.join("a.db");
    remove_db(&db);
    std::fs::copy(&source.path, &db)?;
    spawn_child(
        "source peer",
        &os(&[&"peer", &"source", &transport, &addr, &db]),
    )
}

fn spawn_dest(transport: &str, addr: &str, source: &Source, dir: &Path) -> anyhow::Result<Proc> {
    let db = dir.join("b.db");
    remove_db(&db);
    let version = source.version.to_string();
    spawn_child(
        "dest peer",
        &os(&[
            &"peer",
            &"dest",
            &transport,
            &addr,
            &db,
            &source.site,
            &version,
        ]),
    )
}

fn check_rows(line: &str, source: &Source) -> anyhow::Result<()> {
    let rows: usize = line["DONE ".len()..].trim().parse()?;
    ensure!(
        rows * 3 == source.changes,
        "destination holds {rows} rows, expected {}",
        source.changes / 3
    );
    Ok(())
}

/// Upload (A alone), then download (B alone), through one server.
fn legs(transport: &str, source: &Source, work: &Path) -> anyhow::Result<Legs> {
    let dir = work.join(format!("legs-{transport}"));
    let _ = std::fs::remove_dir_all(&dir);
    let server = start_server(&dir.join("server"))?;
    let mut watch = ReplicaWatch::new(&server.replica, &source.site)?;
    let start = Instant::now();
    let a = spawn_source(transport, &server.addr, source, &dir)?;
    while !watch.holds(source.version) {
        ensure!(start.elapsed() < STEP_TIMEOUT, "upload timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
    let upload = start.elapsed().as_secs_f64();
    drop(watch);
    let (_, source_peak) = a.finish()?;

    let start = Instant::now();
    let mut b = spawn_dest(transport, &server.addr, source, &dir)?;
    let (at, line) = b.expect("DONE ")?;
    let download = at.duration_since(start).as_secs_f64();
    check_rows(&line, source)?;
    let (_, dest_peak) = b.finish()?;
    let (_, server_peak) = server.proc.finish()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Legs {
        upload,
        download,
        source_peak,
        dest_peak,
        server_peak,
    })
}

struct Relay {
    total: f64,
    server_holds: Option<f64>,
    source_peak: Usage,
    dest_peak: Usage,
    server_peak: Usage,
}

/// B online first, then A: the server merges and relays at the same time.
fn relay(transport: &str, source: &Source, work: &Path) -> anyhow::Result<Relay> {
    let dir = work.join(format!("relay-{transport}"));
    let _ = std::fs::remove_dir_all(&dir);
    let server = start_server(&dir.join("server"))?;
    let mut watch = ReplicaWatch::new(&server.replica, &source.site)?;
    let mut b = spawn_dest(transport, &server.addr, source, &dir)?;
    b.expect("READY")?;
    let start = Instant::now();
    let a = spawn_source(transport, &server.addr, source, &dir)?;
    let mut server_holds = None;
    let (at, line) = loop {
        if let Some(done) = b.line("DONE ", Duration::from_millis(10))? {
            break done;
        }
        if server_holds.is_none() && watch.holds(source.version) {
            server_holds = Some(start.elapsed().as_secs_f64());
        }
        ensure!(start.elapsed() < STEP_TIMEOUT, "relay timed out");
    };
    let total = at.duration_since(start).as_secs_f64();
    check_rows(&line, source)?;
    drop(watch);
    let (_, dest_peak) = b.finish()?;
    let (_, source_peak) = a.finish()?;
    let (_, server_peak) = server.proc.finish()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Relay {
        total,
        server_holds,
        source_peak,
        dest_peak,
        server_peak,
    })
}

struct Latency {
    samples_ms: Vec<f64>,
    writer_peak: Usage,
    reader_peak: Usage,
    server_peak: Usage,
}

fn latency(transport: &str, writes: usize, work: &Path) -> anyhow::Result<Latency> {
    let dir = work.join(format!("latency-{transport}"));
    let _ = std::fs::remove_dir_all(&dir);
    let server = start_server(&dir.join("server"))?;
    let total = (writes + LATENCY_WARMUP).to_string();
    let (a_db, b_db) = (dir.join("a.db"), dir.join("b.db"));
    let addr = &server.addr;
    let mut b = spawn_child(
        "reader peer",
        &os(&[&"peer", &"reader", &transport, addr, &b_db, &total]),
    )?;
    b.expect("READY")?;
    let mut a = spawn_child(
        "writer peer",
        &os(&[&"peer", &"writer", &transport, addr, &a_db, &total]),
    )?;
    a.expect("WROTE")?;
    b.expect("DONE ")?;
    let (lines, reader_peak) = b.finish()?;
    let (_, writer_peak) = a.finish()?;
    let (_, server_peak) = server.proc.finish()?;
    let mut samples_ms = Vec::new();
    for line in lines.iter().filter_map(|l| l.strip_prefix("LAT ")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let id: usize = f[0].parse()?;
        if id >= LATENCY_WARMUP {
            samples_ms.push(f[1].parse::<f64>()? / 1e6);
        }
    }
    ensure!(
        samples_ms.len() == writes,
        "{} latency samples, expected {writes}",
        samples_ms.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Latency {
        samples_ms,
        writer_peak,
        reader_peak,
        server_peak,
    })
}

fn generate(work: &Path, rows: usize) -> anyhow::Result<Source> {
    let path = work.join(format!("source-{rows}.db"));
    let start = Instant::now();
    let p = spawn_child("generator", &os(&[&"gen", &path, &rows.to_string()]))?;
    let mut p = p;
    let (_, line) = p.expect("SOURCE ")?;
    drop(p.stdin.take());
    let status = p.child.wait()?;
    ensure!(status.success(), "generator failed");
    let f: Vec<&str> = line.split_whitespace().collect();
    eprintln!(
        "generated {rows} rows ({} changes) in {:.1} s",
        rows * 3,
        start.elapsed().as_secs_f64()
    );
    Ok(Source {
        path,
        site: f[1].to_string(),
        version: f[2].parse()?,
        changes: rows * 3,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        let role = args.get(2).map(String::as_str).unwrap_or_default();
        init_logging();
        let arg = |i: usize| -> anyhow::Result<PathBuf> {
            Ok(PathBuf::from(args.get(i).context("missing argument")?))
        };
        return match role {
            "gen" => child_gen(&arg(3)?, args.get(4).context("rows")?.parse()?),
            "raw" => child_raw(&arg(3)?, &arg(4)?),
            "store" => child_store(&arg(3)?, &arg(4)?),
            "server" => child_server(&arg(3)?),
            "peer" => child_peer(&args[3..]),
            other => bail!("unknown child role {other:?}"),
        };
    }
    let full = args.iter().any(|a| a == "--bench");
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (changes, writes) = if full {
        (
            env("CRSYNC_BENCH_CHANGES", 1_002_000),
            env("CRSYNC_BENCH_WRITES", 1000),
        )
    } else {
        (3_000, 20)
    };
    let big_rows = (changes / 3).max(1);
    let small_rows = (big_rows * 3 / 10).max(1);
    // `CRSYNC_BENCH_ONLY=legs,ws,big`: run only these parts (raw, store,
    // relay, legs, latency), transports (sse, ws) and sizes (small, big).
    let only: Vec<String> = std::env::var("CRSYNC_BENCH_ONLY")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let pick = |group: &[&str], item: &str| {
        !only.iter().any(|o| group.contains(&o.as_str())) || only.iter().any(|o| o == item)
    };
    const PARTS: [&str; 5] = ["raw", "store", "relay", "legs", "latency"];
    const TRANSPORTS: [&str; 2] = ["sse", "ws"];
    const SIZES: [&str; 2] = ["small", "big"];
    let work = tempfile::tempdir()?;
    let mut out = String::new();
    let mut say = |s: String| {
        println!("{s}");
        let _ = std::io::stdout().flush();
        out.push_str(&s);
        out.push('\n');
    };

    say(format!(
        "crsync network sync benchmark ({} cores; loopback; file-backed, WAL, synchronous=NORMAL; source written in transactions of {ROWS_PER_TXN} rows x 3 columns)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    say(String::new());
    say("| changes | path | time | changes/s | vs raw | source A: peak RSS (CPU) | server: peak RSS (CPU) | dest B: peak RSS (CPU) |".into());
    say("|---|---|---|---|---|---|---|---|".into());
    for (size, rows) in [("small", small_rows), ("big", big_rows)] {
        if !pick(&SIZES, size)
            || !(pick(&PARTS, "raw")
                || pick(&PARTS, "store")
                || pick(&PARTS, "relay")
                || pick(&PARTS, "legs"))
        {
            continue;
        }
        let source = generate(work.path(), rows)?;
        let n = source.changes;
        let rate = |secs: f64| n as f64 / secs;
        // The ratio's denominator: always measured.
        let (raw_s, raw_peak) = in_process("raw", &source, work.path())?;
        let raw_rate = rate(raw_s);
        let row = |what: &str, secs: f64, a: String, s: String, b: String| {
            format!(
                "| {n} | {what} | {secs:.2} s | {:.0} | {:.2}x | {a} | {s} | {b} |",
                rate(secs),
                rate(secs) / raw_rate
            )
        };
        say(row(
            "raw in-process merge (1 txn)",
            raw_s,
            mib(raw_peak),
            "-".into(),
            "-".into(),
        ));
        if pick(&PARTS, "store") {
            let (store_s, store_peak) = in_process("store", &source, work.path())?;
            say(row(
                "Store stream+merge, in-process",
                store_s,
                mib(store_peak),
                "-".into(),
                "-".into(),
            ));
        }
        for transport in TRANSPORTS {
            if !pick(&TRANSPORTS, transport) {
                continue;
            }
            let name = if transport == "sse" {
                "SSE"
            } else {
                "WebSocket"
            };
            if pick(&PARTS, "relay") {
                let r = relay(transport, &source, work.path())?;
                say(row(
                    &format!(
                        "**{name} A -> server -> B** (both online){}",
                        r.server_holds
                            .map(|s| format!("; server held all at {s:.2} s"))
                            .unwrap_or_default()
                    ),
                    r.total,
                    mib(r.source_peak),
                    mib(r.server_peak),
                    mib(r.dest_peak),
                ));
            }
            if !pick(&PARTS, "legs") {
                continue;
            }
            let l = legs(transport, &source, work.path())?;
            say(row(
                &format!("{name} upload A -> server (alone)"),
                l.upload,
                mib(l.source_peak),
                mib(l.server_peak),
                "-".into(),
            ));
            say(row(
                &format!("{name} download server -> B (alone)"),
                l.download,
                "-".into(),
                "(same server)".into(),
                mib(l.dest_peak),
            ));
            say(row(
                &format!("{name} upload, then download (sum)"),
                l.upload + l.download,
                "".into(),
                "".into(),
                "".into(),
            ));
        }
        remove_db(&source.path);
    }

    if !pick(&PARTS, "latency") {
        return Ok(());
    }
    say(String::new());
    say(format!(
        "Live latency: one row written on A every {} ms, until it is committed on B ({writes} writes after {LATENCY_WARMUP} warm-up writes)",
        LATENCY_INTERVAL.as_millis()
    ));
    say(String::new());
    say("| transport | writes | p50 | p90 | p99 | max | writer A: peak RSS (CPU) | server: peak RSS (CPU) | reader B: peak RSS (CPU) |".into());
    say("|---|---|---|---|---|---|---|---|---|".into());
    for transport in TRANSPORTS {
        if !pick(&TRANSPORTS, transport) {
            continue;
        }
        let name = if transport == "sse" {
            "SSE"
        } else {
            "WebSocket"
        };
        let mut l = latency(transport, writes, work.path())?;
        l.samples_ms.sort_by(f64::total_cmp);
        let s = &l.samples_ms;
        say(format!(
            "| {name} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} | {} |",
            s.len(),
            percentile(s, 50.0),
            percentile(s, 90.0),
            percentile(s, 99.0),
            s.last().copied().unwrap_or(f64::NAN),
            mib(l.writer_peak),
            mib(l.server_peak),
            mib(l.reader_peak),
        ));
    }
    if let Ok(path) = std::env::var("CRSYNC_BENCH_OUT") {
        std::fs::write(path, &out)?;
    }
    Ok(())
}
