//! One origin transaction of 1,000,000 changes through real processes under
//! the default limits: a plain table of 333,334 rows x 3 columns made a CRR
//! in one go (cr-sqlite records every row as one transaction), uploaded by
//! `crsync sync --once` to `crsync serve`, then downloaded by empty replicas,
//! over HTTP+SSE and WebSocket. For each run the table shows the wall time
//! and the peak RSS (`VmHWM`, sampled from `/proc` every 50 ms) of the
//! client and of the server, against the target of 100 MB for any process.
//! Snapshots are off on the server (`snapshot_threshold = 0`): an empty
//! replica would otherwise start from a snapshot and never see the
//! transaction travel (`benches/bootstrap.rs` measures that path).
//!
//! `cargo bench --bench large_txn` prints one markdown table.
//! `CRSYNC_LARGE_TXN_CHANGES` sets the size (default 1,000,000). Without
//! `--bench` (as under `cargo test --all-targets`) it runs 30,000 changes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

mod common;

use common::{ChildProcess, close_raw, open_raw, proc_status_kib, start_serve};

const TOKEN: &str = "bench-token";
const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS big (id INTEGER PRIMARY KEY NOT NULL, a TEXT, b INTEGER, c TEXT)";

fn start_server(dir: &Path) -> anyhow::Result<(ChildProcess, String)> {
    let (child, addr) = start_serve(
        dir,
        &format!(
            "bind = \"127.0.0.1:0\"\ndata_dir = \"data\"\ntoken_env = \"\"\n\
             snapshot_threshold = 0\n\
             [[tokens]]\ntoken = \"{TOKEN}\"\ndatabases = [\"*\"]\n"
        ),
    )?;
    Ok((child, format!("http://{addr}")))
}

fn peak_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM:")
}

/// A database with the table as a CRR; with `rows`, they are written first
/// into the plain table and the table is then made a CRR in one transaction.
fn make_db(path: &Path, rows: usize) -> anyhow::Result<()> {
    let c = open_raw(path)?;
    c.execute_batch(SCHEMA)?;
    let tx = c.unchecked_transaction()?;
    {
        let mut insert = tx.prepare("INSERT INTO big VALUES (?1, ?2, ?3, ?4)")?;
        for i in 0..rows {
            insert.execute((i as i64, format!("row {i}"), (i * 7) as i64, "a note"))?;
        }
    }
    tx.commit()?;
    c.query_row("SELECT crsql_as_crr('big')", [], |_| Ok(()))?;
    close_raw(c);
    Ok(())
}

fn row_count(path: &Path) -> anyhow::Result<i64> {
    let c = open_raw(path)?;
    let n = c.query_row("SELECT count(*) FROM big", [], |r| r.get(0))?;
    close_raw(c);
    Ok(n)
}

/// Runs `crsync sync --once`; returns (seconds, client peak KiB, server peak KiB).
fn sync(db: &Path, url: &str, ws: bool, server_pid: u32) -> anyhow::Result<(f64, u64, u64)> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crsync"));
    cmd.args(["sync", "--once", "--timeout", "3600", "--db"])
        .arg(db)
        .args(["--url", url])
        .env("CRSYNC_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if ws {
        cmd.arg("--ws");
    }
    let began = Instant::now();
    let mut child = ChildProcess(cmd.spawn().context("cannot start crsync sync")?);
    let (mut client_peak, mut server_peak) = (0, peak_kib(server_pid).unwrap_or(0));
    let status = loop {
        if let Some(kib) = peak_kib(child.0.id()) {
            client_peak = client_peak.max(kib);
        }
        if let Some(kib) = peak_kib(server_pid) {
            server_peak = server_peak.max(kib);
        }
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(status.success(), "crsync sync failed: {status}");
    Ok((began.elapsed().as_secs_f64(), client_peak, server_peak))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let changes: usize = if full {
        env_or("CRSYNC_LARGE_TXN_CHANGES", 1_000_000)
    } else {
        30_000
    };
    let rows = changes.div_ceil(3);
    crsync::advanced::load_extension(None)?;
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    std::fs::create_dir_all(&data)?;
    let mut table = Vec::new();
    // Two servers: one receives the upload over SSE, the other over WebSocket.
    for (up_ws, name) in [(false, "sse"), (true, "ws")] {
        let dir = work.path().join(name);
        std::fs::create_dir_all(dir.join("data"))?;
        make_db(&dir.join("data/big.db"), 0)?;
        let (server, base) = start_server(&dir)?;
        let url = format!("{base}/db/big");
        let source: PathBuf = dir.join("source.db");
        let built = Instant::now();
        make_db(&source, rows)?;
        if table.is_empty() {
            println!(
                "one transaction of {} changes ({rows} rows x 3 columns, made a CRR in one go in {:.1} s), default limits",
                rows * 3,
                built.elapsed().as_secs_f64()
            );
        }
        let up = if up_ws { "WebSocket" } else { "HTTP+SSE" };
        let r = sync(&source, &url, up_ws, server.0.id())?;
        table.push((format!("upload over {up}"), r));
        let server_rows = row_count(&dir.join("data/big.db"))?;
        if server_rows != rows as i64 {
            bail!("the server holds {server_rows} rows, not {rows}");
        }
        // Downloads to empty replicas, over the other transport first.
        for down_ws in [!up_ws, up_ws] {
            let replica = dir.join(format!("replica-{down_ws}.db"));
            make_db(&replica, 0)?;
            let down = if down_ws { "WebSocket" } else { "HTTP+SSE" };
            let r = sync(&replica, &url, down_ws, server.0.id())?;
            let got = row_count(&replica)?;
            ensure!(
                got == rows as i64,
                "the replica holds {got} rows, not {rows}"
            );
            table.push((format!("download over {down} ({name} server)"), r));
        }
        drop(server);
    }
    println!(
        "| run | wall time | client peak RSS | server peak RSS (since start) | under 100 MB |"
    );
    println!("|---|---|---|---|---|");
    let mib = |kib: u64| kib as f64 / 1024.0;
    for (run, (secs, client, server)) in table {
        let ok = mib(client.max(server)) < 100.0;
        println!(
            "| {run} | {secs:.1} s | {:.1} MiB | {:.1} MiB | {} |",
            mib(client),
            mib(server),
            if ok { "yes" } else { "NO" }
        );
    }
    Ok(())
}
