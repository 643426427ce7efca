//! Store benchmark: raw cr-sqlite copy vs. the Store's batched stream + merge.
//!
//! `cargo bench --bench store` prints a table. Each measurement runs in a child
//! process of its own, so its peak memory (VmHWM) is its own. Without `--bench`
//! (as under `cargo test --all-targets`) it runs a small smoke size.
//!
//! Environment: `CRSYNC_BENCH_ROWS` (default 100000; a second run uses 3x).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crsync::Store;
use crsync::rusqlite;

mod common;

use common::{
    close_raw, copy_raw, create_schema, open_raw, peak_rss_kib, store_copy, write_source,
};

const ROWS_PER_TXN: usize = common::ROWS_PER_TXN;

/// The source database: `rows` rows x 3 columns.
fn generate(path: &Path, rows: usize) -> rusqlite::Result<()> {
    let c = open_raw(path)?;
    write_source(&c, rows)?;
    close_raw(c);
    Ok(())
}

fn dest_schema(path: &Path) -> rusqlite::Result<()> {
    let c = open_raw(path)?;
    create_schema(&c)?;
    close_raw(c);
    Ok(())
}

/// Raw cr-sqlite copy from `src` into `dst`, committing every `per_txn` changes.
fn run_raw(src: &Path, dst: &Path, per_txn: usize) -> anyhow::Result<usize> {
    let s = open_raw(src)?;
    let d = open_raw(dst)?;
    let n = copy_raw(&s, &d, per_txn)?;
    close_raw(s);
    close_raw(d);
    Ok(n)
}

/// The Store: batches for an empty cursor, merged into a second Store.
async fn run_store(src: &Path, dst: &Path) -> anyhow::Result<usize> {
    let a = Store::open(src).await?;
    let b = Store::open(dst).await?;
    let n = store_copy(&a, &b).await?;
    a.close().await?;
    b.close().await?;
    Ok(n)
}

/// Child: `store-bench child raw|store SRC DST` -> prints "changes seconds peak_kib".
fn child(kind: &str, src: &Path, dst: &Path) -> anyhow::Result<()> {
    crsync::advanced::load_extension(None)?;
    let start = Instant::now();
    let n = match kind {
        "raw" => run_raw(src, dst, usize::MAX)?,
        "raw-batched" => run_raw(src, dst, crsync::advanced::DEFAULT_MAX_BATCH_CHANGES)?,
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(run_store(src, dst))?,
    };
    println!("{n} {} {}", start.elapsed().as_secs_f64(), peak_rss_kib());
    Ok(())
}

struct Measured {
    changes: usize,
    seconds: f64,
    peak_mib: f64,
}

fn measure(kind: &str, source: &Path, work: &Path) -> anyhow::Result<Measured> {
    let src = work.join(format!("{kind}-src.db"));
    let dst = work.join(format!("{kind}-dst.db"));
    for p in [&src, &dst] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
        }
    }
    std::fs::copy(source, &src)?;
    dest_schema(&dst)?;
    let out = Command::new(std::env::current_exe()?)
        .args(["child", kind])
        .arg(&src)
        .arg(&dst)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let f: Vec<&str> = text.split_whitespace().collect();
    anyhow::ensure!(f.len() == 3, "bad child output {text:?}");
    Ok(Measured {
        changes: f[0].parse()?,
        seconds: f[1].parse()?,
        peak_mib: f[2].parse::<f64>()? / 1024.0,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        return child(&args[2], &PathBuf::from(&args[3]), &PathBuf::from(&args[4]));
    }
    let full = args.iter().any(|a| a == "--bench");
    let base: usize = if full {
        std::env::var("CRSYNC_BENCH_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000)
    } else {
        2_000
    };
    crsync::advanced::load_extension(None)?;
    let work = tempfile::tempdir()?;
    println!(
        "crsync Store benchmark (file-backed, WAL, synchronous=NORMAL; {ROWS_PER_TXN} rows per source transaction)"
    );
    println!(
        "| rows x 3 cols | changes | raw, 1 txn (changes/s) | raw, 1024/txn (changes/s) | Store stream+merge (changes/s) | Store / raw | Store / raw 1024 | raw peak RSS | Store peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for rows in [base, 3 * base] {
        let source = work.path().join(format!("source-{rows}.db"));
        generate(&source, rows)?;
        let raw = measure("raw", &source, work.path())?;
        let batched = measure("raw-batched", &source, work.path())?;
        let store = measure("store", &source, work.path())?;
        anyhow::ensure!(
            raw.changes == store.changes,
            "raw copied {} changes, Store {}",
            raw.changes,
            store.changes
        );
        let rate = |m: &Measured| m.changes as f64 / m.seconds;
        println!(
            "| {rows} | {} | {:.0} ({:.2} s) | {:.0} ({:.2} s) | {:.0} ({:.2} s) | {:.2}x | {:.2}x | {:.1} MiB | {:.1} MiB |",
            raw.changes,
            rate(&raw),
            raw.seconds,
            rate(&batched),
            batched.seconds,
            rate(&store),
            store.seconds,
            rate(&store) / rate(&raw),
            rate(&store) / rate(&batched),
            raw.peak_mib,
            store.peak_mib
        );
    }
    Ok(())
}
