//! `crsync conflicts`: the values merges replaced or refused.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use crsync::wire::{Encoding, encode_value};
use crsync::{Conflict, ConflictQuery, ConflictSide, SqlValue};
use serde_json::json;

use super::{Outcome, count, db};

/// Arguments of `crsync conflicts`.
#[derive(Debug, Args)]
pub(crate) struct ConflictsArgs {
    /// The database file (must exist).
    #[arg(long, value_name = "FILE")]
    db: PathBuf,
    /// Only conflicts in this table.
    #[arg(long, value_name = "TABLE")]
    table: Option<String>,
    /// At most this many (the newest).
    #[arg(long, value_name = "N", default_value_t = 50)]
    limit: usize,
    /// Print one JSON object instead of text (for scripts).
    #[arg(long)]
    json: bool,
}

/// Runs `crsync conflicts`.
pub(crate) async fn run(args: ConflictsArgs) -> anyhow::Result<Outcome> {
    let store = db::open_existing(&args.db).await?;
    let mut query = ConflictQuery::new().limit(args.limit);
    if let Some(table) = &args.table {
        query = query.table(table.clone());
    }
    let conflicts = store.conflicts(query).await;
    db::close(store).await;
    let conflicts = conflicts?;
    if args.json {
        let list: Vec<serde_json::Value> = conflicts.iter().map(to_json).collect();
        let out = json!({"path": args.db.display().to_string(), "conflicts": list});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", to_text(&args.db, &conflicts));
    }
    Ok(Outcome::Done)
}

fn side_json(s: &ConflictSide) -> serde_json::Value {
    json!({
        "value": encode_value(&s.value, Encoding::Lossless),
        "site_id": s.site.to_hex(),
        "version": s.version.map(|v| v.0),
        "col_version": s.col_version,
    })
}

fn to_json(c: &Conflict) -> serde_json::Value {
    let pk: Vec<serde_json::Value> =
        c.pk.unpack()
            .unwrap_or_default()
            .iter()
            .map(|v| encode_value(v, Encoding::Lossless))
            .collect();
    json!({
        "id": c.id,
        "recorded_at_ms": unix_ms(c.recorded_at),
        "table": c.table,
        "pk": pk,
        "column": c.column,
        "kind": c.kind.as_str(),
        "deleted": c.deleted,
        "lost": side_json(&c.lost),
        "won": side_json(&c.won),
    })
}

fn to_text(path: &std::path::Path, conflicts: &[Conflict]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if conflicts.is_empty() {
        let _ = writeln!(out, "no conflicts recorded in {}", path.display());
        return out;
    }
    let _ = writeln!(
        out,
        "{} in {} (newest first)",
        count(conflicts.len() as u64, "conflict", "conflicts"),
        path.display()
    );
    for c in conflicts {
        let pk: Vec<String> = c.pk.unpack().unwrap_or_default().iter().map(show).collect();
        let what = match (c.kind, c.deleted) {
            (crsync::ConflictKind::Replaced, true) => "lost to a delete of the row",
            (crsync::ConflictKind::Replaced, false) => "local value replaced",
            (_, true) => "incoming write refused: the row is deleted",
            _ => "incoming value refused",
        };
        let _ = writeln!(
            out,
            "#{} {} {}[{}].{}: {what}",
            c.id,
            utc(c.recorded_at),
            c.table,
            pk.join(", "),
            c.column
        );
        let won = if c.deleted {
            "(row deleted)".to_owned()
        } else {
            show(&c.won.value)
        };
        let _ = writeln!(out, "  lost: {}", side_text(&show(&c.lost.value), &c.lost));
        let _ = writeln!(out, "  won:  {}", side_text(&won, &c.won));
    }
    out
}

fn side_text(value: &str, s: &ConflictSide) -> String {
    let version = s
        .version
        .map_or_else(|| "version unknown".to_owned(), |v| format!("version {v}"));
    format!(
        "{value}  by {} {version} (col_version {})",
        s.site, s.col_version
    )
}

/// A value as SQL would write it.
fn show(v: &SqlValue) -> String {
    match v {
        SqlValue::Null => "NULL".into(),
        SqlValue::Integer(i) => i.to_string(),
        SqlValue::Real(f) => format!("{f:?}"),
        SqlValue::Text(t) => format!("'{}'", String::from_utf8_lossy(t).replace('\'', "''")),
        SqlValue::Blob(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("x'{hex}'")
        }
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `YYYY-MM-DD HH:MM:SSZ` (UTC).
fn utc(t: SystemTime) -> String {
    let secs = unix_ms(t).div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        let at = |s: u64| UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert_eq!(utc(at(0)), "1970-01-01 00:00:00Z");
        assert_eq!(utc(at(951_782_400)), "2000-02-29 00:00:00Z");
        assert_eq!(utc(at(1_798_761_599)), "2026-12-31 23:59:59Z");
    }
}
