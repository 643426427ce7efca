//! What the Store knows about the database's CRR tables, and the checks every
//! incoming change passes before it reaches cr-sqlite.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::Connection;

use crate::change::SENTINEL_CID;
use crate::store::error::InvalidChange;
use crate::{Change, Cursor, DbVersion, SiteId};

/// Suffix cr-sqlite gives a CRR table's clock table.
const CLOCK_SUFFIX: &str = "__crsql_clock";

/// The Store's own tables: per-site cursors and the origin of merged versions.
pub(crate) const BOOTSTRAP_SQL: &str = "
CREATE TABLE IF NOT EXISTS crsync_cursor (
    site_id BLOB PRIMARY KEY NOT NULL,
    db_version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS crsync_origin (
    local_version INTEGER PRIMARY KEY NOT NULL,
    site_id BLOB NOT NULL,
    origin_version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS crsync_origin_by_site ON crsync_origin (site_id, origin_version);
";

/// Columns of one CRR table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableInfo {
    pub(crate) pk_columns: usize,
    pub(crate) columns: BTreeSet<String>,
}

/// The CRR tables, refreshed whenever `PRAGMA schema_version` moves.
#[derive(Debug, Default)]
pub(crate) struct Schema {
    pub(crate) tables: BTreeMap<String, TableInfo>,
    schema_version: Option<i64>,
}

impl Schema {
    /// Re-reads the table list if the schema changed since the last read.
    pub(crate) fn refresh(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        let version: i64 = conn.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        if self.schema_version == Some(version) {
            return Ok(());
        }
        self.tables = read_crr_tables(conn)?;
        self.schema_version = Some(version);
        Ok(())
    }

    /// Checks one change against the schema.
    pub(crate) fn check(&self, change: &Change) -> Result<(), InvalidChange> {
        let table = self
            .tables
            .get(&change.table)
            .ok_or_else(|| InvalidChange::UnknownTable {
                table: change.table.clone(),
            })?;
        if change.cid != SENTINEL_CID && !table.columns.contains(&change.cid) {
            return Err(InvalidChange::UnknownColumn {
                table: change.table.clone(),
                column: change.cid.clone(),
            });
        }
        let pk = change.pk.unpack().map_err(InvalidChange::MalformedPk)?;
        if pk.len() != table.pk_columns {
            return Err(InvalidChange::PkColumnCount {
                expected: table.pk_columns,
                found: pk.len(),
            });
        }
        if change.db_version <= DbVersion::ZERO
            || change.col_version < 0
            || change.cl < 0
            || change.seq < 0
        {
            return Err(InvalidChange::NegativeVersion {
                db_version: change.db_version.0,
                col_version: change.col_version,
                cl: change.cl,
                seq: change.seq,
            });
        }
        Ok(())
    }

    /// `DELETE` that drops origin records no clock row refers to any more.
    pub(crate) fn origin_gc_sql(&self) -> String {
        let mut sql = String::from("DELETE FROM crsync_origin WHERE 1");
        for table in self.tables.keys() {
            sql.push_str(&format!(
                " AND NOT EXISTS (SELECT 1 FROM {} WHERE db_version = crsync_origin.local_version)",
                quote_ident(&format!("{table}{CLOCK_SUFFIX}"))
            ));
        }
        sql
    }
}

fn read_crr_tables(conn: &Connection) -> rusqlite::Result<BTreeMap<String, TableInfo>> {
    let mut names = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%__crsql_clock'",
    )?;
    for name in stmt.query_map([], |r| r.get::<_, String>(0))? {
        if let Some(base) = name?.strip_suffix(CLOCK_SUFFIX) {
            names.push(base.to_owned());
        }
    }
    let mut tables = BTreeMap::new();
    for name in names {
        let columns = table_columns(conn, &name)?;
        if columns.is_empty() {
            continue;
        }
        let pk_columns = columns.iter().filter(|c| c.1).count();
        let columns = columns.into_iter().filter(|c| !c.1).map(|c| c.0).collect();
        tables.insert(
            name,
            TableInfo {
                pk_columns,
                columns,
            },
        );
    }
    Ok(tables)
}

/// `(name, is_pk)` for every column of `table`; empty if the table does not exist.
pub(crate) fn table_columns(
    conn: &Connection,
    table: &str,
) -> rusqlite::Result<Vec<(String, bool)>> {
    let mut stmt = conn.prepare("SELECT name, pk FROM pragma_table_info(?1)")?;
    let rows = stmt.query_map([table], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? > 0))
    })?;
    rows.collect()
}

/// Quotes an SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The stored cursor of remote origins (`crsync_cursor`); rows with a malformed
/// site id are ignored.
pub(crate) fn load_remote_cursor(conn: &Connection) -> rusqlite::Result<Cursor> {
    let mut cursor = Cursor::new();
    let mut stmt = conn.prepare_cached("SELECT site_id, db_version FROM crsync_cursor")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (site, version) = row?;
        if let Ok(site) = SiteId::from_slice(&site) {
            cursor.advance(site, DbVersion(version));
        }
    }
    Ok(cursor)
}
