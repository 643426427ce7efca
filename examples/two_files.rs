//! Two database files on disk, changes written to each, synced both ways through
//! the Store API (no network), printed identical.
//!
//! Run: `cargo run --example two_files [DIR]` (default DIR: ./demo-data).

use crsync::{Cursor, Store};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS todos (
    id INTEGER PRIMARY KEY NOT NULL, title TEXT, done INTEGER NOT NULL DEFAULT 0)";

async fn open(path: std::path::PathBuf) -> anyhow::Result<Store> {
    let store = Store::open(path).await?;
    store.write(|tx| tx.execute_batch(SCHEMA)).await?;
    store.enable_crr(&["todos"]).await?;
    Ok(store)
}

/// Sends `to` everything it lacks from `from`; returns the number of changes sent.
async fn sync(from: &Store, to: &Store) -> anyhow::Result<usize> {
    let mut sent = 0;
    let mut batches = from.changes_since(&to.cursor().await?).await?;
    while let Some(batch) = batches.next_batch().await {
        sent += to.merge(batch?).await?.applied;
    }
    Ok(sent)
}

async fn rows(store: &Store) -> anyhow::Result<Vec<(i64, Option<String>, i64)>> {
    Ok(store
        .read(|c| {
            let mut stmt = c.prepare("SELECT id, title, done FROM todos ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
        .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "demo-data".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let laptop = open(dir.join("laptop.db")).await?;
    let phone = open(dir.join("phone.db")).await?;
    println!("laptop {} / phone {}", laptop.site_id(), phone.site_id());

    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    laptop
        .write(move |tx| {
            tx.execute(
                "INSERT INTO todos (id, title) VALUES (?1, 'buy milk (laptop)')",
                [stamp],
            )
        })
        .await?;
    phone
        .write(move |tx| {
            tx.execute(
                "INSERT INTO todos (id, title) VALUES (?1, 'call mum (phone)')",
                [stamp + 1],
            )
        })
        .await?;
    let a = sync(&laptop, &phone).await?;
    let b = sync(&phone, &laptop).await?;
    println!("laptop -> phone: {a} changes, phone -> laptop: {b} changes");

    // concurrent, conflicting edits of the same row on both sides
    laptop
        .write(move |tx| tx.execute("UPDATE todos SET done = 1 WHERE id = ?1", [stamp + 1]))
        .await?;
    phone
        .write(move |tx| {
            tx.execute(
                "UPDATE todos SET title = 'call mum (edited)' WHERE id = ?1",
                [stamp + 1],
            )
        })
        .await?;
    let a = sync(&laptop, &phone).await?;
    let b = sync(&phone, &laptop).await?;
    println!("after concurrent edits: laptop -> phone: {a} changes, phone -> laptop: {b} changes");

    let (l, p) = (rows(&laptop).await?, rows(&phone).await?);
    for (id, title, done) in &l {
        println!("  {id} {:<24} done={done}", title.as_deref().unwrap_or(""));
    }
    println!(
        "identical: {} ({} rows); cursors equal after a second round: {}",
        l == p,
        l.len(),
        {
            sync(&laptop, &phone).await?;
            laptop.cursor().await? == phone.cursor().await?
        }
    );
    let _: Cursor = laptop.cursor().await?;
    laptop.close().await?;
    phone.close().await?;
    anyhow::ensure!(l == p, "the two databases differ");
    Ok(())
}
