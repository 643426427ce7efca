//! What the benchmarks share: the source data, the raw cr-sqlite copy (the
//! baseline), the Store's stream + merge, peak-memory reading, and a
//! `crsync serve` child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

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
