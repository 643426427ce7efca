//! `crsync status`: what a database file holds, and how its sync stands with
//! each remote it synced with (from the record a Peer keeps in the file).

use std::path::PathBuf;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use crsync::advanced::BookkeepingStats;
use crsync::{Cursor, RemoteRecord, SiteId, Store};
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
    /// The remotes it synced with, with how many of our transactions each lacks.
    remotes: Vec<(RemoteRecord, u64)>,
    /// Devices paired through Nostr relays (`crsync pair`).
    paired: Vec<crsync::transports::nostr::PairedDevice>,
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
    let cursor = store.cursor().await?;
    let own = cursor.get(&store.site_id());
    let records = store.remotes().await?;
    let acked: Vec<_> = records.iter().map(|r| r.acknowledged).collect();
    let pending = store.own_versions_after(&acked, own).await?;
    let remotes = records.into_iter().zip(pending).collect();
    Ok(Status {
        site_id: store.site_id(),
        schema_version: store.schema_version().await?,
        db_version: db::db_version(store).await?,
        tables: db::crr_tables(store).await?,
        cursor: store.cursor().await?,
        bookkeeping: store.bookkeeping_stats().await?,
        copied: store.copied().map(ToString::to_string),
        remotes,
        paired: crsync::transports::nostr::DeviceFile::open_for_db(&path)
            .map(|f| f.devices())
            .unwrap_or_default(),
        path,
    })
}

/// Milliseconds since the Unix epoch.
fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// "42s ago", "5m ago", "3h ago", "2d ago".
fn ago(at: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(at)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
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
        "remotes": s.remotes.iter().map(|(r, pending)| json!({
            "site_id": r.site.to_hex(),
            "transport": r.transport,
            "acknowledged": r.acknowledged.0,
            "pending_transactions": pending,
            "last_synced_at_ms": r.synced_at.map(unix_millis),
        })).collect::<Vec<_>>(),
        "paired_devices": s.paired.iter().map(|d| json!({
            "name": d.name,
            "public_key": d.remote_key,
            "site_id": d.remote_site,
            "relays": d.relays,
            "last_message_at": (d.seen_until > 0).then_some(d.seen_until),
        })).collect::<Vec<_>>(),
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
    if s.remotes.is_empty() {
        let _ = writeln!(out, "remotes:       none synced with yet");
    } else {
        let _ = writeln!(
            out,
            "remotes:       last in sync; our transactions each lacks"
        );
        for (r, pending) in &s.remotes {
            let when = r.synced_at.map_or_else(|| "never in sync".to_string(), ago);
            let noun = if *pending == 1 {
                "transaction"
            } else {
                "transactions"
            };
            let _ = writeln!(
                out,
                "  {} via {}: {when}; holds ours up to {}, {pending} local {noun} pending",
                r.site, r.transport, r.acknowledged
            );
        }
    }
    if !s.paired.is_empty() {
        let _ = writeln!(out, "paired devices (Nostr relays):");
        for d in &s.paired {
            let site = d.remote_site.as_deref().unwrap_or("site unknown");
            let _ = writeln!(out, "  {} ({site}) via {}", d.name, d.relays.join(" "));
        }
    }
    out
}
