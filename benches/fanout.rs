//! Fan-out benchmark: one server keeps thousands of live clients current
//! (issue 9).
//!
//! `cargo bench --bench fanout` prints one markdown table per scenario, the
//! issue's target beside each measurement. Processes:
//!
//! - `server` (this binary re-executed as `child server DIR`): the
//!   node-server through its public API (`crsync::server::Server`), one database (`fan`,
//!   the `items` table of `benches/common`), connection caps raised to 50,000
//!   (whole server and per token) and both rate limits off; everything else
//!   is the default config. Its CPU time (utime + stime of
//!   `/proc/<pid>/stat`) and memory (`VmRSS`, sampled every 50 ms, and
//!   `VmHWM`) are read from `/proc` by the orchestrator.
//! - three full `Peer`s (`child peer TRANSPORT ADDR DB`), each over a file
//!   of its own: the **writer**, dialing the server with the scenario's
//!   transport, and two followers, one over SSE and one over WebSocket. The
//!   writer makes every write: single-row transactions through its Store,
//!   which its Peer uploads to the server like any client's. At the end of a
//!   scenario all three report their row count and a checksum of `items`,
//!   which must equal the server replica's (read by the orchestrator).
//! - the **light clients**, N of them, in this (orchestrating) process on one
//!   tokio runtime (2 worker threads), each a minimal v1 JSON client like the
//!   TypeScript `@app/sync` one on a real loopback socket. SSE: `GET
//!   {base}/stream?peerId=<hex>` with the bearer token (one shared reqwest
//!   client, HTTP/1.1, its pool kept for the `POST`s); on the server's
//!   `connect` it `POST`s `{base}/sync` with its cursor (`{"peers":{}}` the
//!   first time, its cursor after a reconnect); it decodes every `data`
//!   message, keeps a per-site cursor, and notes the instant it first sees
//!   each row (its `qty` column holds the row id). WebSocket: the same over
//!   `{base}/ws` (it sends `connect`, then `sync` on the server's `connect`).
//!   This process's own CPU time is printed next to every phase: if it
//!   approaches a full core, the clients, not the server, set the pace, and
//!   they should be split across processes.
//!
//! The light clients are in `fanout/light.rs`, the child roles in
//! `fanout/children.rs`.
//!
//! All instants are wall-clock microseconds on this one machine
//! (`SystemTime`), so the writer's instant and a client's are comparable.
//!
//! Scenarios, for N = 100 and 1,000 with SSE and with WebSocket (a fresh
//! server each):
//! 1. **connect**: all N connect (at most 256 handshakes at a time); the time
//!    until every one has had its `eose`, and the server's RSS before and with
//!    them (per connection: the difference / N).
//! 2. **one write**: the writer writes one row; for each client, the time from
//!    the writer's commit until the client has the row. 20 rounds 200 ms
//!    apart, pooled: p50 / p99 / max over clients x rounds, and the worst
//!    round's max.
//! 3. **burst**: 1,000 single-row transactions/s for 10 s on the writer
//!    (paced); **catch-up** is the time from the burst's last commit until
//!    the last client has the last row (p50 / p99 over clients too), beside
//!    the time until the server's replica held it (polled read-only); server
//!    CPU seconds during the burst and until catch-up, peak RSS (the highest
//!    sample and `VmHWM`), and the most server threads sampled.
//!
//! At the end of each of these runs: how many light clients hold every row,
//! their reconnects and errors, and whether the three full Peers' replicas
//! equal the server's (row count and checksum).
//!
//! Then, 4. **idle**: 10,000 SSE clients connect to a fresh server; its RSS
//! before and with them, per connection, how many got their `eose`, and one
//! write's time to all of them.
//!
//! Environment: `CRSYNC_BENCH_ONLY` (e.g. `sse,ws,idle,100,1000`: only these
//! transports, client counts and the idle part; `live` names scenarios 1-3),
//! `CRSYNC_BENCH_CLIENTS` (client counts of scenarios 1-3, e.g. `100,1000`),
//! `CRSYNC_BENCH_IDLE` (idle clients, default 10000), `CRSYNC_BENCH_OUT` (also
//! write the tables to this file), `CRSYNC_BENCH_LOG` (a tracing filter for
//! the children's stderr). Without `--bench` (as under `cargo test
//! --all-targets`) it runs a smoke size in a few seconds: 20 clients per
//! transport, 3 rounds, a 1 s burst, 50 idle clients.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use crsync::rusqlite::{Connection, OpenFlags};

// A bench root resolves modules beside it, not in a folder named after it.
#[path = "fanout/children.rs"]
mod children;
mod common;
#[path = "fanout/light.rs"]
mod light;

use common::{
    Proc, STEP_TIMEOUT, cpu_secs, init_logging, items_checksum, os, percentile, proc_cpu_secs,
    proc_status_kib,
};
use light::Clients;

const TOKEN: &str = "bench-token";
const DB_NAME: &str = "fan";
/// Spacing of the one-write rounds.
const ROUND_SPACING: Duration = Duration::from_millis(200);
/// How often the orchestrator samples the server's RSS and the clients' state.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Longest wait for every client's `eose`, or for one write to reach every client.
const WAIT_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for the catch-up after a burst (the issue measured about 115 s).
const CATCHUP_TIMEOUT: Duration = Duration::from_secs(600);

/// Wall-clock microseconds since the epoch: the one clock every process shares.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Raises this process's open-file soft limit to its hard limit (children
/// inherit it): 10,000 clients need more than the usual 1,024.
#[allow(unsafe_code)]
fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return 0;
        }
    }
    lim.rlim_cur
}

// ---------------------------------------------------------------- orchestration

/// The highest `VmRSS` and thread count of a process among the samples taken.
struct RssSampler {
    pid: u32,
    max_kib: u64,
    max_threads: u64,
    last: Instant,
}

impl RssSampler {
    fn new(pid: u32) -> Self {
        let mut s = RssSampler {
            pid,
            max_kib: 0,
            max_threads: 0,
            last: Instant::now(),
        };
        s.reset();
        s
    }

    fn now(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS:").unwrap_or(0)
    }

    /// `Threads:` of `/proc/<pid>/status` (the same parser: a bare number).
    fn threads(&self) -> u64 {
        proc_status_kib(self.pid, "Threads:").unwrap_or(0)
    }

    fn sample(&mut self) {
        if self.last.elapsed() >= SAMPLE_EVERY {
            self.last = Instant::now();
            self.max_kib = self.max_kib.max(self.now());
            self.max_threads = self.max_threads.max(self.threads());
        }
    }

    fn reset(&mut self) {
        self.max_kib = self.now();
        self.max_threads = self.threads();
    }
}

struct ServerProc {
    proc: Proc,
    addr: String,
    pid: u32,
    replica: PathBuf,
}

impl ServerProc {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut proc = Proc::spawn("server", &os(&[&"server", &dir]))?;
        let (_, line) = proc.expect("ADDR ")?;
        Ok(ServerProc {
            pid: proc.child.id(),
            proc,
            addr: line["ADDR ".len()..].trim().to_string(),
            replica: dir.join("data").join(format!("{DB_NAME}.db")),
        })
    }

    fn cpu(&self) -> f64 {
        proc_cpu_secs(self.pid)
    }

    fn kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid, field).unwrap_or(0)
    }

    /// Waits until the server's replica holds row `id` (sampling its RSS
    /// meanwhile); returns when it first did (wall-clock µs), `None` on timeout.
    fn wait_holds(&self, id: i64, timeout: Duration, rss: &mut RssSampler) -> Option<u64> {
        let c =
            Connection::open_with_flags(&self.replica, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
        let start = Instant::now();
        while start.elapsed() < timeout {
            let held: Option<i64> = c
                .query_row("SELECT 1 FROM items WHERE id = ?1", [id], |r| r.get(0))
                .ok();
            if held.is_some() {
                return Some(now_us());
            }
            rss.sample();
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Row count and checksum of the server's replica, read with a plain
    /// connection from this process.
    fn checksum(&self) -> anyhow::Result<(i64, u64)> {
        let c = Connection::open_with_flags(&self.replica, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        Ok(items_checksum(&c)?)
    }
}

fn spawn_peer(name: &str, transport: &str, addr: &str, db: &Path) -> anyhow::Result<Proc> {
    let mut p = Proc::spawn(name, &os(&[&"peer", &transport, &addr, &db]))?;
    p.expect("READY")?;
    Ok(p)
}

fn send(p: &mut Proc, command: &str) -> anyhow::Result<()> {
    let stdin = p.stdin.as_mut().context("stdin closed")?;
    writeln!(stdin, "{command}")?;
    stdin.flush()?;
    Ok(())
}

/// The sizes of a run.
struct Plan {
    rounds: usize,
    burst_writes: u64,
    burst_rate: u64,
}

struct Live {
    transport: &'static str,
    n: usize,
    connect_s: f64,
    eose: usize,
    rss_before_kib: u64,
    rss_with_kib: u64,
    connect_client_cpu: f64,
    /// One write: every client's latency of every round (ms), and each round's max.
    one_ms: Vec<f64>,
    round_max_ms: Vec<f64>,
    one_client_cpu: f64,
    one_wall: f64,
    burst_writes: u64,
    burst_s: f64,
    /// From the burst's last commit until the server's replica held it (ms).
    server_held_ms: Option<f64>,
    /// Per client: from the burst's last commit until it had the last row (ms).
    catchup_ms: Vec<f64>,
    caught_up: usize,
    server_cpu_burst: f64,
    server_cpu_total: f64,
    burst_rss_max_kib: u64,
    burst_threads_max: u64,
    burst_client_cpu: f64,
    burst_wall: f64,
    /// `data` messages each client received from the burst's start until caught up (mean).
    burst_messages: f64,
    server_hwm_kib: u64,
    rows: i64,
    complete_clients: usize,
    reconnects: u64,
    errors: u64,
    peers_equal: String,
    server_end: common::Usage,
}

fn live(
    rt: &tokio::runtime::Runtime,
    transport: &'static str,
    n: usize,
    plan: &Plan,
    work: &Path,
) -> anyhow::Result<Live> {
    let dir = work.join(format!("live-{transport}-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    let server = ServerProc::start(&dir.join("server"))?;
    let addr = server.addr.clone();
    let mut writer = spawn_peer("writer peer", transport, &addr, &dir.join("writer.db"))?;
    let mut followers = vec![
        spawn_peer("SSE follower", "sse", &addr, &dir.join("follow-sse.db"))?,
        spawn_peer("WS follower", "ws", &addr, &dir.join("follow-ws.db"))?,
    ];
    let mut rss = RssSampler::new(server.pid);

    // 1. connect
    std::thread::sleep(Duration::from_millis(200));
    let rss_before_kib = server.kib("VmRSS:");
    let cpu0 = cpu_secs();
    let start = Instant::now();
    let clients = Clients::start(rt, transport, &addr, n);
    let eose = clients.wait_all(
        |s| s.eose_at.load(Ordering::Acquire) != 0,
        WAIT_TIMEOUT,
        &mut rss,
    );
    let connect_s = start.elapsed().as_secs_f64();
    let connect_client_cpu = cpu_secs() - cpu0;
    ensure!(
        eose == n,
        "{transport} {n}: only {eose} clients had their eose"
    );
    std::thread::sleep(Duration::from_millis(300));
    let rss_with_kib = server.kib("VmRSS:");
    eprintln!("{transport} {n}: connected in {connect_s:.2} s");

    // 2. one write at a time
    let mut next_id = 0i64;
    let mut one_ms = Vec::new();
    let mut round_max_ms = Vec::new();
    let cpu0 = cpu_secs();
    let start = Instant::now();
    for _ in 0..plan.rounds {
        let id = next_id;
        next_id += 1;
        send(&mut writer, &format!("write {id}"))?;
        let (_, line) = writer.expect("WROTE ")?;
        let stamp: u64 = line
            .split_whitespace()
            .nth(2)
            .context("WROTE line")?
            .parse()?;
        let got = clients.wait_all(|s| s.last().0 >= id, WAIT_TIMEOUT, &mut rss);
        ensure!(
            got == n,
            "{transport} {n}: row {id} reached only {got} clients"
        );
        let mut round: Vec<f64> = Vec::with_capacity(n);
        for s in &clients.stats {
            let (last, at) = s.last();
            ensure!(last == id, "a client saw row {last} during round {id}");
            round.push(at.saturating_sub(stamp) as f64 / 1000.0);
        }
        one_ms.extend_from_slice(&round);
        let (p50, _, worst) = spread(&mut round);
        eprintln!("{transport} {n}: round {id}: p50 {p50:.1} ms, last {worst:.1} ms");
        round_max_ms.push(worst);
        std::thread::sleep(ROUND_SPACING);
    }
    let one_client_cpu = cpu_secs() - cpu0;
    let one_wall = start.elapsed().as_secs_f64();
    eprintln!("{transport} {n}: one-write rounds done");

    // 3. burst
    let first = next_id;
    let last = first + plan.burst_writes as i64 - 1;
    next_id = last + 1;
    rss.reset();
    let cpu0 = cpu_secs();
    let server_cpu0 = server.cpu();
    let messages0 = clients.sum(|s| s.messages.load(Ordering::Relaxed));
    let wall0 = Instant::now();
    send(
        &mut writer,
        &format!("burst {first} {} {}", plan.burst_writes, plan.burst_rate),
    )?;
    let line = loop {
        if let Some((_, line)) = writer.line("BURST ", SAMPLE_EVERY)? {
            break line;
        }
        rss.sample();
        ensure!(wall0.elapsed() < STEP_TIMEOUT, "the burst did not end");
    };
    let server_cpu_burst = server.cpu() - server_cpu0;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let (began, ended) = (f[0], f[1]);
    let burst_s = ended.saturating_sub(began) as f64 / 1e6;
    let server_held_ms = server
        .wait_holds(last, CATCHUP_TIMEOUT, &mut rss)
        .map(|at| at.saturating_sub(ended) as f64 / 1000.0);
    let caught_up = clients.wait_all(|s| s.last().0 >= last, CATCHUP_TIMEOUT, &mut rss);
    let server_cpu_total = server.cpu() - server_cpu0;
    let burst_client_cpu = cpu_secs() - cpu0;
    let burst_wall = wall0.elapsed().as_secs_f64();
    let burst_messages =
        (clients.sum(|s| s.messages.load(Ordering::Relaxed)) - messages0) as f64 / n.max(1) as f64;
    let catchup_ms: Vec<f64> = clients
        .stats
        .iter()
        .filter(|s| s.last().0 >= last)
        .map(|s| s.last().1.saturating_sub(ended) as f64 / 1000.0)
        .collect();
    let server_hwm_kib = server.kib("VmHWM:");
    eprintln!("{transport} {n}: burst done, {caught_up}/{n} caught up");

    // Correctness: the full Peers and the server hold the same rows.
    let rows = next_id;
    let complete_clients = clients.count(|s| s.rows.load(Ordering::Relaxed) >= rows as u64);
    let reconnects = clients.sum(|s| s.reconnects.load(Ordering::Relaxed).into());
    let errors = clients.sum(|s| s.errors.load(Ordering::Relaxed).into());
    drop(clients);
    let mut sums = Vec::new();
    for p in std::iter::once(&mut writer).chain(followers.iter_mut()) {
        send(p, &format!("check {rows}"))?;
        let (_, line) = p.expect("CHECK ")?;
        sums.push(line["CHECK ".len()..].trim().to_string());
    }
    let (server_rows, server_sum) = server.checksum()?;
    let server_line = format!("{server_rows} {server_sum:016x}");
    let peers_equal = if server_rows == rows && sums.iter().all(|s| *s == server_line) {
        format!("yes: 3 peers = server = {rows} rows, checksum {server_sum:016x}")
    } else {
        format!("**NO**: server {server_line}, peers {sums:?}, expected {rows} rows")
    };
    writer.finish()?;
    for p in followers {
        p.finish()?;
    }
    let (_, server_end) = server.proc.finish()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Live {
        transport,
        n,
        connect_s,
        eose,
        rss_before_kib,
        rss_with_kib,
        connect_client_cpu,
        one_ms,
        round_max_ms,
        one_client_cpu,
        one_wall,
        burst_writes: plan.burst_writes,
        burst_s,
        catchup_ms,
        server_held_ms,
        caught_up,
        server_cpu_burst,
        server_cpu_total,
        burst_rss_max_kib: rss.max_kib,
        burst_threads_max: rss.max_threads,
        burst_client_cpu,
        burst_wall,
        burst_messages,
        server_hwm_kib,
        rows,
        complete_clients,
        reconnects,
        errors,
        peers_equal,
        server_end,
    })
}

struct Idle {
    n: usize,
    eose: usize,
    connect_s: f64,
    rss_before_kib: u64,
    rss_with_kib: u64,
    client_rss_delta_kib: u64,
    one_ms: Vec<f64>,
    reconnects: u64,
    errors: u64,
}

fn idle(rt: &tokio::runtime::Runtime, n: usize, work: &Path) -> anyhow::Result<Idle> {
    let dir = work.join("idle");
    let _ = std::fs::remove_dir_all(&dir);
    let server = ServerProc::start(&dir.join("server"))?;
    let addr = server.addr.clone();
    // Opens the database (and proves the server works) before the baseline.
    let mut writer = spawn_peer("writer peer", "sse", &addr, &dir.join("writer.db"))?;
    let mut rss = RssSampler::new(server.pid);
    std::thread::sleep(Duration::from_millis(300));
    let rss_before_kib = server.kib("VmRSS:");
    let own_before = proc_status_kib(std::process::id(), "VmRSS:").unwrap_or(0);
    let start = Instant::now();
    let clients = Clients::start(rt, "sse", &addr, n);
    let eose = clients.wait_all(
        |s| s.eose_at.load(Ordering::Acquire) != 0,
        WAIT_TIMEOUT,
        &mut rss,
    );
    let connect_s = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let rss_with_kib = server.kib("VmRSS:");
    let client_rss_delta_kib =
        proc_status_kib(std::process::id(), "VmRSS:").map_or(0, |k| k.saturating_sub(own_before));
    eprintln!("idle {n}: {eose} eose in {connect_s:.2} s");
    // One write to all of them.
    send(&mut writer, "write 0")?;
    let (_, line) = writer.expect("WROTE ")?;
    let stamp: u64 = line
        .split_whitespace()
        .nth(2)
        .context("WROTE line")?
        .parse()?;
    clients.wait_all(|s| s.last().0 >= 0, WAIT_TIMEOUT, &mut rss);
    let one_ms = clients
        .stats
        .iter()
        .filter(|s| s.last().0 >= 0)
        .map(|s| s.last().1.saturating_sub(stamp) as f64 / 1000.0)
        .collect();
    let reconnects = clients.sum(|s| s.reconnects.load(Ordering::Relaxed).into());
    let errors = clients.sum(|s| s.errors.load(Ordering::Relaxed).into());
    drop(clients);
    writer.finish()?;
    server.proc.finish()?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Idle {
        n,
        eose,
        connect_s,
        rss_before_kib,
        rss_with_kib,
        client_rss_delta_kib,
        one_ms,
        reconnects,
        errors,
    })
}

// ---------------------------------------------------------------- report

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 * 1024.0 / 1e6)
}

/// p50 / p99 / max of `v` in ms.
fn spread(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (
        percentile(v, 50.0),
        percentile(v, 99.0),
        v.last().copied().unwrap_or(f64::NAN),
    )
}

fn name(transport: &str) -> &'static str {
    if transport == "ws" {
        "WebSocket"
    } else {
        "SSE"
    }
}

fn main() -> anyhow::Result<()> {
    let nofile = raise_nofile_limit();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        init_logging();
        return match args.get(2).map(String::as_str).unwrap_or_default() {
            "server" => children::server(Path::new(args.get(3).context("missing DIR")?)),
            "peer" => children::peer(&args[3..]),
            other => bail!("unknown child role {other:?}"),
        };
    }
    let full = args.iter().any(|a| a == "--bench");
    let list = |name: &str| -> Vec<String> {
        std::env::var(name)
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let only = list("CRSYNC_BENCH_ONLY");
    let sizes: Vec<usize> = match list("CRSYNC_BENCH_CLIENTS") {
        v if !v.is_empty() => v.iter().filter_map(|s| s.parse().ok()).collect(),
        _ if full => vec![100, 1000],
        _ => vec![20],
    };
    let idle_n: usize = std::env::var("CRSYNC_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 10_000 } else { 50 });
    let plan = if full {
        Plan {
            rounds: 20,
            burst_writes: 10_000,
            burst_rate: 1000,
        }
    } else {
        Plan {
            rounds: 3,
            burst_writes: 1000,
            burst_rate: 1000,
        }
    };
    const TRANSPORTS: [&str; 2] = ["sse", "ws"];
    const PARTS: [&str; 2] = ["live", "idle"];
    let sizes_named = only.iter().any(|o| o.parse::<usize>().is_ok());
    let parts_named = only.iter().any(|o| PARTS.contains(&o.as_str()));
    let transports_named = only.iter().any(|o| TRANSPORTS.contains(&o.as_str()));
    let named = |o: &str| only.iter().any(|x| x == o);
    let run_live = !parts_named || named("live") || sizes_named;
    let run_idle = (!parts_named && !sizes_named) || named("idle");
    let pick_transport = |t: &str| !transports_named || named(t);
    let pick_size = |n: usize| !sizes_named || named(&n.to_string());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let work = tempfile::tempdir()?;
    let mut out = String::new();
    let mut say = |s: String| {
        println!("{s}");
        let _ = std::io::stdout().flush();
        out.push_str(&s);
        out.push('\n');
    };
    say(format!(
        "crsync fan-out benchmark ({} cores; loopback; light v1 JSON clients in one process on 2 tokio workers; open-file limit {nofile}; {})",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if full { "full size" } else { "smoke size" }
    ));

    let mut results = Vec::new();
    if run_live {
        for n in sizes.iter().copied().filter(|&n| pick_size(n)) {
            for t in TRANSPORTS.into_iter().filter(|t| pick_transport(t)) {
                results.push(live(&rt, t, n, &plan, work.path())?);
            }
        }
    }
    if !results.is_empty() {
        say(String::new());
        say("**1. Connect**: all N connect; until every one has had its `eose`".into());
        say(String::new());
        say("| transport | clients | all `eose` | server RSS before → with clients | per connection | client process CPU |".into());
        say("|---|---|---|---|---|---|".into());
        for r in &results {
            say(format!(
                "| {} | {} | {:.2} s ({}/{}) | {} → {} | {:.0} KiB | {:.2} s |",
                name(r.transport),
                r.n,
                r.connect_s,
                r.eose,
                r.n,
                mb(r.rss_before_kib),
                mb(r.rss_with_kib),
                r.rss_with_kib.saturating_sub(r.rss_before_kib) as f64 / r.n as f64,
                r.connect_client_cpu,
            ));
        }
        say(String::new());
        say(format!(
            "**2. One write**: one row committed on the writer Peer until each client has it; {} rounds {} ms apart, pooled over clients x rounds. Target with 1,000 clients: p99 < 100 ms",
            plan.rounds,
            ROUND_SPACING.as_millis()
        ));
        say(String::new());
        say("| transport | clients | p50 | p99 | max | worst round: last client | client process CPU |".into());
        say("|---|---|---|---|---|---|---|".into());
        for r in &mut results {
            let (p50, p99, max) = spread(&mut r.one_ms);
            let (_, _, worst) = spread(&mut r.round_max_ms);
            say(format!(
                "| {} | {} | {p50:.1} ms | {p99:.1} ms | {max:.1} ms | {worst:.1} ms | {:.2} s in {:.1} s |",
                name(r.transport),
                r.n,
                r.one_client_cpu,
                r.one_wall,
            ));
        }
        say(String::new());
        say(format!(
            "**3. Burst**: {} single-row transactions at {}/s on the writer Peer; catch-up = from the burst's last commit until the client has the last row (and until the server's replica held it). Targets with 1,000 clients: catch-up < 1 s, server peak RSS < 300 MB",
            plan.burst_writes, plan.burst_rate
        ));
        say(String::new());
        say("| transport | clients | burst (achieved) | server held the last write | catch-up: last client | p50 / p99 client | server CPU: burst / until caught up | server peak RSS: burst (sampled) / VmHWM | server threads (max sampled) | `data` messages per client | client process CPU (cores) |".into());
        say("|---|---|---|---|---|---|---|---|---|---|---|".into());
        for r in &mut results {
            let (p50, p99, max) = spread(&mut r.catchup_ms);
            let held = r.server_held_ms.map_or_else(
                || "not in time".to_string(),
                |ms| format!("{:.2} s", ms / 1000.0),
            );
            let last = if r.caught_up == r.n {
                format!("**{:.2} s**", max / 1000.0)
            } else {
                format!(
                    "> {} s ({}/{} caught up)",
                    CATCHUP_TIMEOUT.as_secs(),
                    r.caught_up,
                    r.n
                )
            };
            say(format!(
                "| {} | {} | {:.1} s ({:.0}/s) | {held} | {last} | {:.2} s / {:.2} s | {:.1} s / {:.1} s | {} / {} | {} | {:.0} | {:.1} s in {:.1} s ({:.2}) |",
                name(r.transport),
                r.n,
                r.burst_s,
                r.burst_writes as f64 / r.burst_s.max(1e-9),
                p50 / 1000.0,
                p99 / 1000.0,
                r.server_cpu_burst,
                r.server_cpu_total,
                mb(r.burst_rss_max_kib),
                mb(r.server_hwm_kib),
                r.burst_threads_max,
                r.burst_messages,
                r.burst_client_cpu,
                r.burst_wall,
                r.burst_client_cpu / r.burst_wall.max(1e-9),
            ));
        }
        say(String::new());
        say("Correctness at the end of each run:".into());
        say(String::new());
        say("| transport | clients | rows written | light clients holding every row | reconnects / errors | full Peers (writer, SSE, WS) vs server replica | server at exit: peak RSS, CPU |".into());
        say("|---|---|---|---|---|---|---|".into());
        for r in &results {
            say(format!(
                "| {} | {} | {} | {}/{} | {} / {} | {} | {:.1} MB, {:.1} s |",
                name(r.transport),
                r.n,
                r.rows,
                r.complete_clients,
                r.n,
                r.reconnects,
                r.errors,
                r.peers_equal,
                r.server_end.mib * 1.048_576,
                r.server_end.cpu,
            ));
        }
    }
    if run_idle {
        let mut r = idle(&rt, idle_n, work.path())?;
        let (p50, p99, max) = spread(&mut r.one_ms);
        say(String::new());
        say(format!(
            "**4. Idle**: {} SSE clients connect and stay. Target: 10,000 held in < 1 GB",
            r.n
        ));
        say(String::new());
        say("| clients | all `eose` | server RSS before → with clients | per connection | one write to all: p50 / p99 / max | reconnects / errors | client process RSS growth |".into());
        say("|---|---|---|---|---|---|---|".into());
        say(format!(
            "| {} | {:.2} s ({}/{}) | {} → **{}** | {:.0} KiB | {p50:.0} / {p99:.0} / {max:.0} ms ({} clients) | {} / {} | {} |",
            r.n,
            r.connect_s,
            r.eose,
            r.n,
            mb(r.rss_before_kib),
            mb(r.rss_with_kib),
            r.rss_with_kib.saturating_sub(r.rss_before_kib) as f64 / r.n as f64,
            r.one_ms.len(),
            r.reconnects,
            r.errors,
            mb(r.client_rss_delta_kib),
        ));
        ensure!(
            r.eose == r.n,
            "only {}/{} idle clients had their eose",
            r.eose,
            r.n
        );
    }
    if let Ok(path) = std::env::var("CRSYNC_BENCH_OUT") {
        std::fs::write(path, &out)?;
    }
    drop(rt);
    Ok(())
}
