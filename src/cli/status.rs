//! `crsync status`: what a database file holds.

use std::path::PathBuf;

use clap::Args;
use crsync::{BookkeepingStats, Cursor, SiteId, Store};
use serde_json::json;

use super::db::{self, TableInfo};
use super::{Outcome, count};

/// Arguments of `crsync status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The database file (must exist).
    #[arg(long, value_name = "FILE")]
    db: PathBuf,
    /// Print one JSON object instead of text (for scripts).
    #[arg(long)]
    json: bool,
}

/// Everything `status` reports.
#[derive(Debug)]
struct Status {
    path: PathBuf,
    site_id: SiteId,
    schema_version: i64,
    db_version: i64,
    tables: Vec<TableInfo>,
    cursor: Cursor,
    bookkeeping: BookkeepingStats,
    /// Why this file may not sync (a copy of another replica's file).
    copied: Option<String>,
}

/// Runs `crsync status`.
pub(crate) async fn run(args: StatusArgs) -> anyhow::Result<Outcome> {
    let store = db::open_existing(&args.db).await?;
    let status = read(&store, args.db.clone()).await;
    db::close(store).await;
    let status = status?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&status))?);
    } else {
        print!("{}", to_text(&status));
    }
    Ok(Outcome::Done)
}

async fn read(store: &Store, path: PathBuf) -> anyhow::Result<Status> {
    Ok(Status {
        path,
        site_id: store.site_id(),
        schema_version: store.schema_version().await?,
        db_version: db::db_version(store).await?,
        tables: db::crr_tables(store).await?,
        cursor: store.cursor().await?,
        bookkeeping: store.bookkeeping_stats().await?,
        copied: store.copied().map(ToString::to_string),
    })
}

fn to_json(s: &Status) -> serde_json::Value {
    let cursor: serde_json::Map<String, serde_json::Value> = s
        .cursor
        .iter()
        .map(|(site, version)| (site.to_hex(), json!(version.0)))
        .collect();
    json!({
        "path": s.path.display().to_string(),
        "site_id": s.site_id.to_hex(),
        "schema_version": s.schema_version,
        "db_version": s.db_version,
        "tables": s.tables.iter().map(|t| json!({"name": t.name, "rows": t.rows})).collect::<Vec<_>>(),
        "cursor": {"peers": cursor},
        "bookkeeping": {
            "origin_records": s.bookkeeping.origin_records,
            "cursor_sites": s.bookkeeping.cursor_sites,
        },
        "copied": s.copied,
    })
}

fn to_text(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "database:      {}", s.path.display());
    let _ = writeln!(out, "site id:       {}", s.site_id);
    if let Some(copied) = &s.copied {
        let _ = writeln!(out, "NOT SYNCING:   {copied}");
    }
    let _ = writeln!(out, "schema:        user_version {}", s.schema_version);
    let _ = writeln!(out, "db version:    {}", s.db_version);
    if s.tables.is_empty() {
        let _ = writeln!(
            out,
            "crr tables:    none (turn tables into CRRs with `crsync enable`)"
        );
    } else {
        let list: Vec<String> = s
            .tables
            .iter()
            .map(|t| {
                format!(
                    "{} ({})",
                    t.name,
                    count(t.rows.max(0) as u64, "row", "rows")
                )
            })
            .collect();
        let _ = writeln!(out, "crr tables:    {}", list.join(", "));
    }
    if s.cursor.is_empty() {
        let _ = writeln!(out, "cursor:        empty (no changes yet)");
    } else {
        let _ = writeln!(out, "cursor:        origin site -> highest version held");
        for (site, version) in s.cursor.iter() {
            let mark = if site == s.site_id {
                "  (this database)"
            } else {
                ""
            };
            let _ = writeln!(out, "  {site} {version}{mark}");
        }
    }
    // The cursor lists this database too; the stored cursor only the others.
    let _ = writeln!(
        out,
        "bookkeeping:   {}, {} in the stored cursor",
        count(
            s.bookkeeping.origin_records,
            "origin record",
            "origin records"
        ),
        count(s.bookkeeping.cursor_sites, "remote site", "remote sites")
    );
    out
}
