//! What the benchmarks share: the source data, the raw cr-sqlite copy (the
//! baseline), the Store's stream + merge, peak-memory reading, and a
//! `crsync serve` child process.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};

use crsync::rusqlite::{self, Connection};
use crsync::{Cursor, Store};

/// The benchmark table: a key and 3 columns.
pub(crate) const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY NOT NULL, name TEXT, qty INTEGER, note TEXT)";
/// Rows per transaction in the source database.
pub(crate) const ROWS_PER_TXN: usize = 1000;

/// A file-backed connection (WAL, `synchronous=NORMAL`).
pub(crate) fn open_raw(path: &Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(c)
}

/// `crsql_finalize()`, then close.
pub(crate) fn close_raw(c: Connection) {
    let _ = c.query_row("SELECT crsql_finalize()", [], |_| Ok(()));
    let _ = c.close();
}

/// Creates the table as a CRR on `c`.
pub(crate) fn create_schema(c: &Connection) -> rusqlite::Result<()> {
    c.execute_batch(SCHEMA)?;
    c.query_row("SELECT crsql_as_crr('items')", [], |_| Ok(()))
}

/// The source data on `c`: `rows` rows x 3 columns, in transactions of `ROWS_PER_TXN` rows.
pub(crate) fn write_source(c: &Connection, rows: usize) -> rusqlite::Result<()> {
    create_schema(c)?;
    let mut id = 0;
    while id < rows {
        let tx = c.unchecked_transaction()?;
        {
            let mut st = tx.prepare_cached("INSERT INTO items VALUES (?1, ?2, ?3, ?4)")?;
            for _ in 0..ROWS_PER_TXN.min(rows - id) {
                st.execute((
                    id as i64,
                    format!("item-{id}"),
                    (id * 7) as i64,
                    "a note of moderate length",
                ))?;
                id += 1;
            }
        }
        tx.commit()?;
    }
    Ok(())
}

/// Raw cr-sqlite: every row of `crsql_changes` on `s` inserted with
/// `INSERT INTO crsql_changes` on `d`, committing every `per_txn` changes
/// (`usize::MAX`: one transaction). Returns the number of changes.
pub(crate) fn copy_raw(s: &Connection, d: &Connection, per_txn: usize) -> rusqlite::Result<usize> {
    let mut n = 0;
    d.execute_batch("BEGIN")?;
    {
        let mut read = s.prepare(
            "SELECT \"table\", pk, cid, val, col_version, db_version, site_id, cl, seq FROM crsql_changes",
        )?;
        let mut write = d.prepare(
            "INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            let v: [rusqlite::types::Value; 9] =
                std::array::from_fn(|i| r.get(i).unwrap_or(rusqlite::types::Value::Null));
            write.execute(rusqlite::params_from_iter(v.iter()))?;
            n += 1;
            if n % per_txn == 0 {
                d.execute_batch("COMMIT; BEGIN")?;
            }
        }
    }
    d.execute_batch("COMMIT")?;
    Ok(n)
}

/// The Store: batches for an empty cursor from `a`, merged into `b`. Returns the changes applied.
pub(crate) async fn store_copy(a: &Store, b: &Store) -> anyhow::Result<usize> {
    let mut stream = a.changes_since(&Cursor::new()).await?;
    let mut n = 0;
    while let Some(batch) = stream.next_batch().await {
        n += b.merge(batch?).await?.applied;
    }
    Ok(n)
}

/// Row count and a checksum (64-bit FNV-1a over every row in id order) of
/// the benchmark table on `c`: two replicas holding the same rows agree.
pub(crate) fn items_checksum(c: &Connection) -> rusqlite::Result<(i64, u64)> {
    let mut st = c.prepare("SELECT id, name, qty, note FROM items ORDER BY id")?;
    let mut rows = st.query([])?;
    let (mut n, mut hash) = (0i64, 0xcbf2_9ce4_8422_2325u64);
    while let Some(r) = rows.next()? {
        let row = format!(
            "{}|{:?}|{:?}|{:?}\n",
            r.get::<_, i64>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, Option<i64>>(2)?,
            r.get::<_, Option<String>>(3)?
        );
        for b in row.bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        n += 1;
    }
    Ok((n, hash))
}

/// This process's peak resident set size (`VmHWM`), in KiB.
pub(crate) fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`), if the process runs.
pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A child process, killed when dropped.
pub(crate) struct ChildProcess(pub(crate) Child);

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `crsync serve` with `config` written to `dir/crsync.toml` (relative paths
/// in it are under `dir`); returns the child and its `host:port` once it listens.
pub(crate) fn start_serve(dir: &Path, config: &str) -> anyhow::Result<(ChildProcess, String)> {
    let file = dir.join("crsync.toml");
    std::fs::write(&file, config)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_crsync"))
        .args(["serve", "--config"])
        .arg(&file)
        .env_remove("CRSYNC_TOKEN")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start crsync serve")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let child = ChildProcess(child);
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().context("server exited")??;
    let addr = first
        .rsplit_once("http://")
        .map(|(_, a)| a.trim().to_string())
        .with_context(|| format!("unexpected first line {first:?}"))?;
    // Keep draining stdout so the child never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    Ok((child, addr))
}

/// Longest any single step may take before a benchmark gives up.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(900);

// ---------------------------------------------------------------- child processes

/// User + system CPU time of this process so far, in seconds.
pub(crate) fn cpu_secs() -> f64 {
    stat_cpu_secs("/proc/self/stat")
}

/// User + system CPU time of process `pid` so far, in seconds (0 once it has gone).
pub(crate) fn proc_cpu_secs(pid: u32) -> f64 {
    stat_cpu_secs(&format!("/proc/{pid}/stat"))
}

fn stat_cpu_secs(path: &str) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

/// Printed by every child at its end: peak RSS and CPU time.
pub(crate) fn print_usage() {
    println!("PEAK {} {}", peak_rss_kib(), cpu_secs());
}

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub(crate) fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// Blocks until stdin closes (the orchestrator's "stop" signal).
pub(crate) fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    rx
}

/// `CRSYNC_BENCH_LOG=<filter>` (e.g. `info,crsync_peer=debug`) logs a child's tracing to stderr.
pub(crate) fn init_logging() {
    if let Ok(filter) = std::env::var("CRSYNC_BENCH_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A child process whose stdout lines arrive, timestamped, on a channel.
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) stdin: Option<ChildStdin>,
    pub(crate) lines: mpsc::Receiver<(Instant, String)>,
    pub(crate) seen: Vec<String>,
}

impl Proc {
    /// This binary re-executed as `child ARGS...`.
    pub(crate) fn spawn(name: &str, args: &[OsString]) -> anyhow::Result<Proc> {
        Proc::spawn_env(name, args, &[])
    }

    /// As [`spawn`](Self::spawn), with these environment variables set.
    pub(crate) fn spawn_env(
        name: &str,
        args: &[OsString],
        env: &[(&str, String)],
    ) -> anyhow::Result<Proc> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("child")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
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
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            name: name.into(),
            child,
            stdin,
            lines,
            seen: Vec::new(),
        })
    }

    /// The next line starting with `prefix`, waiting at most `wait`.
    pub(crate) fn line(
        &mut self,
        prefix: &str,
        wait: Duration,
    ) -> anyhow::Result<Option<(Instant, String)>> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if line.starts_with(prefix) => return Ok(Some((at, line))),
                Ok((_, line)) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(None),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!("{} exited ({status}) before printing {prefix}", self.name)
                }
            }
        }
    }

    pub(crate) fn expect(&mut self, prefix: &str) -> anyhow::Result<(Instant, String)> {
        self.line(prefix, STEP_TIMEOUT)?
            .with_context(|| format!("{} did not print {prefix} in time", self.name))
    }

    /// Closes stdin (the stop signal), collects the rest of the output, and
    /// returns every line not consumed yet plus its peak RSS and CPU time.
    pub(crate) fn finish(mut self) -> anyhow::Result<(Vec<String>, Usage)> {
        drop(self.stdin.take());
        while let Ok((_, line)) = self.lines.recv_timeout(STEP_TIMEOUT) {
            self.seen.push(line);
        }
        let status = self.child.wait()?;
        ensure!(status.success(), "{} failed: {status}", self.name);
        let usage = self
            .seen
            .iter()
            .find_map(|l| l.strip_prefix("PEAK "))
            .with_context(|| format!("{} printed no PEAK", self.name))?;
        let f: Vec<&str> = usage.split_whitespace().collect();
        ensure!(f.len() == 2, "bad PEAK line {usage:?}");
        let peak = Usage {
            mib: f[0].parse::<f64>()? / 1024.0,
            cpu: f[1].parse()?,
        };
        Ok((std::mem::take(&mut self.seen), peak))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only on an error path: the child is still running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn os(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Peak RSS and CPU time of one child process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) mib: f64,
    pub(crate) cpu: f64,
}

pub(crate) fn mib(u: Usage) -> String {
    format!("{:.1} MiB ({:.1} s CPU)", u.mib, u.cpu)
}

/// The benchmarks' server: 127.0.0.1:0, databases under `dir/data` created
/// on first use with the bench table, one bearer token (`token`) that may
/// create them.
pub(crate) fn bench_server_config(
    dir: &Path,
    token: &str,
) -> anyhow::Result<crsync::server::ServerConfig> {
    let schema = dir.join("schema.sql");
    std::fs::write(&schema, format!("{SCHEMA};\n"))?;
    let mut config = crsync::server::ServerConfig::default();
    config.bind = "127.0.0.1:0".parse()?;
    config.data_dir = dir.join("data");
    config.schema = Some(schema);
    config.allow_create = true;
    config.token_env = String::new();
    config.shutdown_timeout = Duration::from_secs(5);
    let mut bearer = crsync::server::TokenConfig::new(token, ["*"]);
    bearer.create = true;
    config.tokens = vec![bearer];
    Ok(config)
}

/// A `child server` role: serves `config`, printing `ADDR <addr>` once it
/// listens, until stdin closes; then prints `PEAK <kib> <cpu secs>`.
pub(crate) fn serve_until_stdin_closes(config: crsync::server::ServerConfig) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let server = crsync::server::Server::bind(config).await?;
        println!("ADDR {}", server.local_addr());
        let stop = stdin_closed();
        server
            .serve(async move {
                let _ = stop.await;
            })
            .await?;
        anyhow::Ok(())
    })?;
    print_usage();
    Ok(())
}
