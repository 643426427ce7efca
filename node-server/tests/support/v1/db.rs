//! The v1 peer's database: a real SQLite file with cr-sqlite, queried the way the
//! TypeScript peer queries it.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::{Context, Result};
use crsync_peer::rusqlite::{self, Connection, params};

use super::js::JsValue;
use super::wire::{V1Change, V1Cursor};

/// The columns of `crsql_changes` the TypeScript peer selects, in its order.
const CHANGE_COLUMNS: &str = r#""table", pk, cid, val, col_version, db_version, site_id, cl, seq"#;

/// Which rows of `crsql_changes` a paged read walks.
#[derive(Debug, Clone)]
pub enum Scan {
    /// Everything a cursor lacks: all rows, kept if `db_version > cursor[site_id]` (0 if
    /// absent). A transaction larger than a page is split across pages.
    Lacking(V1Cursor),
    /// Live changes: rows with `db_version > after`, own rows only or all (a relaying server).
    After { after: i64, own_only: bool },
}

/// One `LIMIT/OFFSET` page, after filtering.
#[derive(Debug, Clone)]
pub struct Page {
    /// The rows kept (an all-filtered page keeps none and is not sent).
    pub kept: Vec<V1Change>,
    /// The page was full: there may be another.
    pub more: bool,
}

/// One v1 peer's SQLite database (cr-sqlite loaded). Blocking; the client and server
/// models call it from `spawn_blocking`, tests may call it directly.
pub struct V1Db {
    conn: Mutex<Option<Connection>>,
    site: String,
}

impl V1Db {
    /// Opens (creating) `path`, applies `schema` and makes `tables` CRRs.
    pub fn open(path: &Path, schema: &str, tables: &[&str]) -> Result<Self> {
        crsync_peer::load_extension(None).context("load cr-sqlite (set CRSQLITE_PATH)")?;
        let conn = Connection::open(path)?;
        conn.execute_batch(schema)?;
        for table in tables {
            conn.query_row("SELECT crsql_as_crr(?1)", [table], |_| Ok(()))?;
        }
        let site: String =
            conn.query_row("SELECT lower(hex(crsql_site_id()))", [], |r| r.get(0))?;
        Ok(V1Db {
            conn: Mutex::new(Some(conn)),
            site,
        })
    }

    /// This peer's site id, lowercase hex (its `peerId`).
    pub fn site_id(&self) -> &str {
        &self.site
    }

    fn lock(&self) -> MutexGuard<'_, Option<Connection>> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the connection.
    pub fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let guard = self.lock();
        let conn = guard.as_ref().context("the v1 database is closed")?;
        Ok(f(conn)?)
    }

    /// A local write: `f` in one transaction (one local `db_version`).
    pub fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut guard = self.lock();
        let conn = guard.as_mut().context("the v1 database is closed")?;
        let tx = conn.transaction()?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// `PRAGMA user_version` (sent as `schemaVersion`).
    pub fn schema_version(&self) -> Result<i64> {
        self.with(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
    }

    /// `SELECT crsql_db_version()`.
    pub fn db_version(&self) -> Result<i64> {
        self.with(|c| c.query_row("SELECT crsql_db_version()", [], |r| r.get(0)))
    }

    /// Merges one received message: every change inserted into `crsql_changes` exactly
    /// as received (numbers bound as doubles, as better-sqlite3 does), in one transaction.
    pub fn merge(&self, changes: &[V1Change]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let mut insert = tx.prepare_cached(&format!(
                "INSERT INTO crsql_changes ({CHANGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ))?;
            for c in changes {
                insert.execute(params![
                    c.table,
                    c.pk,
                    c.cid,
                    c.val,
                    c.col_version as f64,
                    c.db_version as f64,
                    c.site_id,
                    c.cl as f64,
                    c.seq as f64,
                ])?;
            }
            Ok(())
        })
    }

    /// The cursor: per site in `crsql_changes` (own rows included), its highest `db_version`.
    pub fn cursor(&self) -> Result<V1Cursor> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT lower(hex(site_id)), max(db_version) FROM crsql_changes GROUP BY site_id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// One page of `SELECT ... FROM crsql_changes [WHERE ...] ORDER BY db_version, seq
    /// LIMIT ? OFFSET ?`, values read as better-sqlite3 reads them, filtered as `scan`
    /// says. The caller moves `offset` on by `page_size` while [`Page::more`].
    pub fn read_page(&self, scan: &Scan, page_size: usize, offset: usize) -> Result<Page> {
        let (filter, after) = match scan {
            // No filter in SQL: the TypeScript peer filters the rows in JavaScript.
            // (SQLite allows `?1` to go unused.)
            Scan::Lacking(_) => ("", 0),
            Scan::After {
                after,
                own_only: true,
            } => (
                "WHERE db_version > ?1 AND site_id = crsql_site_id()",
                *after,
            ),
            Scan::After {
                after,
                own_only: false,
            } => ("WHERE db_version > ?1", *after),
        };
        let rows = self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {CHANGE_COLUMNS} FROM crsql_changes {filter} \
                 ORDER BY db_version, seq LIMIT ?2 OFFSET ?3"
            ))?;
            let rows = stmt.query_map(params![after, page_size as i64, offset as i64], |r| {
                Ok(V1Change {
                    table: r.get(0)?,
                    pk: r.get(1)?,
                    cid: r.get(2)?,
                    val: JsValue::from_sql(r.get_ref(3)?),
                    col_version: r.get(4)?,
                    db_version: r.get(5)?,
                    site_id: r.get(6)?,
                    cl: r.get(7)?,
                    seq: r.get(8)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let more = rows.len() == page_size;
        let kept = match scan {
            Scan::Lacking(cursor) => rows
                .into_iter()
                .filter(|c| {
                    c.db_version > cursor.get(&hex::encode(&c.site_id)).copied().unwrap_or(0)
                })
                .collect(),
            Scan::After { .. } => rows,
        };
        Ok(Page { kept, more })
    }

    /// Every page of `scan` that kept a row, read at once (for tests of the model).
    pub fn pages(&self, scan: &Scan, page_size: usize) -> Result<Vec<Vec<V1Change>>> {
        let mut pages = Vec::new();
        let mut offset = 0;
        loop {
            let page = self.read_page(scan, page_size, offset)?;
            if !page.kept.is_empty() {
                pages.push(page.kept);
            }
            if !page.more {
                return Ok(pages);
            }
            offset += page_size;
        }
    }

    /// Everything `cursor` lacks (see [`Scan::Lacking`]), all pages at once.
    pub fn pages_lacking(&self, cursor: &V1Cursor, page_size: usize) -> Result<Vec<Vec<V1Change>>> {
        self.pages(&Scan::Lacking(cursor.clone()), page_size)
    }

    /// The highest `db_version` of this peer's own rows in `crsql_changes` (0 if none).
    pub fn own_max_version(&self) -> Result<i64> {
        self.with(|c| {
            c.query_row(
                "SELECT coalesce(max(db_version), 0) FROM crsql_changes WHERE site_id = crsql_site_id()",
                [],
                |r| r.get(0),
            )
        })
    }

    /// The highest `db_version` in `crsql_changes` (0 if empty).
    pub fn max_version(&self) -> Result<i64> {
        self.with(|c| {
            c.query_row(
                "SELECT coalesce(max(db_version), 0) FROM crsql_changes",
                [],
                |r| r.get(0),
            )
        })
    }

    /// The rows of table `t`, formatted by [`super::format_row`].
    pub fn rows(&self) -> Result<Vec<String>> {
        self.with(super::rows_of_t)
    }

    /// `crsql_finalize()` and close.
    pub fn close(&self) -> Result<()> {
        if let Some(conn) = self.lock().take() {
            conn.execute_batch("SELECT crsql_finalize()")?;
            conn.close().map_err(|(_, e)| e)?;
        }
        Ok(())
    }
}

impl Drop for V1Db {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
