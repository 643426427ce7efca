//! Opening database files and reading what the commands report about them.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context as _;
use crsync::{Cursor, Store};

/// cr-sqlite's clock table for CRR `t` is `t__crsql_clock`.
const CLOCK_SUFFIX: &str = "__crsql_clock";

/// Opens a database file that must already exist (`status`, `sync`).
pub(crate) async fn open_existing(path: &Path) -> anyhow::Result<Store> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => anyhow::bail!("{} is not a file", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "database file {} does not exist (create its tables, then run `crsync enable --db {} TABLE...`)",
            path.display(),
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    open(path).await
}

/// Opens (or creates) a database file. The error names the file itself
/// (`OpenError`), so no context is added.
pub(crate) async fn open(path: &Path) -> anyhow::Result<Store> {
    Ok(Store::open(path).await?)
}

/// A CRR table and its number of rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableInfo {
    /// The table.
    pub(crate) name: String,
    /// Rows it holds.
    pub(crate) rows: i64,
}

/// The CRR tables of the database, by name, with their row counts.
pub(crate) async fn crr_tables(store: &Store) -> anyhow::Result<Vec<TableInfo>> {
    let tables = store
        .read(|conn| {
            let mut stmt =
                conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
            let names: Vec<String> = stmt
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            let all: BTreeSet<&str> = names.iter().map(String::as_str).collect();
            let mut tables = Vec::new();
            for clock in &names {
                let Some(name) = clock.strip_suffix(CLOCK_SUFFIX) else {
                    continue;
                };
                if name.is_empty() || !all.contains(name) {
                    continue;
                }
                let sql = format!("SELECT count(*) FROM \"{}\"", name.replace('"', "\"\""));
                let rows = conn.query_row(&sql, [], |row| row.get(0))?;
                tables.push(TableInfo {
                    name: name.to_owned(),
                    rows,
                });
            }
            Ok(tables)
        })
        .await?;
    Ok(tables)
}

/// All user tables (not cr-sqlite's or crsync's own), for hints in errors.
pub(crate) async fn user_tables(store: &Store) -> anyhow::Result<Vec<String>> {
    let names = store
        .read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
                 AND name NOT LIKE 'crsql\\_%' ESCAPE '\\' \
                 AND name NOT LIKE 'crsync\\_%' ESCAPE '\\' \
                 AND name NOT LIKE '%\\_\\_crsql\\_%' ESCAPE '\\' \
                 ORDER BY name",
            )?;
            stmt.query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    Ok(names)
}

/// cr-sqlite's database version (`crsql_db_version()`).
pub(crate) async fn db_version(store: &Store) -> anyhow::Result<i64> {
    Ok(store
        .read(|conn| conn.query_row("SELECT crsql_db_version()", [], |row| row.get(0)))
        .await?)
}

/// What a database holds beyond a cursor: changes, and the tables they touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Missing {
    /// Cell-level changes the cursor lacks.
    pub(crate) changes: usize,
    /// Tables of those changes.
    pub(crate) tables: BTreeSet<String>,
}

/// Counts the changes `store` holds that `cursor` lacks (reading them in
/// batches, in bounded memory). Batches that only raise versions (no
/// surviving change) count for nothing.
pub(crate) async fn missing_from(store: &Store, cursor: &Cursor) -> anyhow::Result<Missing> {
    let mut missing = Missing::default();
    let mut batches = store.changes_since(cursor).await?;
    while let Some(batch) = batches.next_batch().await {
        let batch = batch?;
        missing.changes += batch.changes.len();
        for change in &batch.changes {
            if !missing.tables.contains(&change.table) {
                missing.tables.insert(change.table.clone());
            }
        }
    }
    Ok(missing)
}

/// Closes the store, logging (not failing on) an error: used after the
/// command's own result is known.
pub(crate) async fn close(store: Store) {
    let path = store.path().display().to_string();
    if let Err(e) = store.close().await {
        tracing::warn!("closing {path} failed: {e}");
    }
}
