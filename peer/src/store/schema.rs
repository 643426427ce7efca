//! What the Store knows about the database's CRR tables, and the checks every
//! incoming change passes before it reaches cr-sqlite.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::Connection;

use crate::change::SENTINEL_CID;
use crate::store::error::InvalidChange;
use crate::{Affinity, Change, Cursor, DbVersion, SiteId, SqlValue, normalize_js};

/// Suffix cr-sqlite gives a CRR table's clock table.
const CLOCK_SUFFIX: &str = "__crsql_clock";

/// The Store's own tables: per-site cursors, the origin of merged versions,
/// facts about the file itself (see `identity`), parts of transactions not
/// yet applied (see `staging`) and the conflict history (see `conflicts`).
/// None of them syncs: they are not CRRs.
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
CREATE TABLE IF NOT EXISTS crsync_remotes (
    site_id BLOB PRIMARY KEY NOT NULL,
    transport TEXT NOT NULL,
    acknowledged INTEGER NOT NULL,
    synced_at INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS crsync_meta (
    key TEXT PRIMARY KEY NOT NULL,
    value ANY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS crsync_staging (
    site_id BLOB NOT NULL,
    origin_version INTEGER NOT NULL,
    upto_seq INTEGER NOT NULL,
    started INTEGER NOT NULL,
    PRIMARY KEY (site_id, origin_version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS crsync_staged (
    site_id BLOB NOT NULL,
    origin_version INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    \"table\" TEXT NOT NULL,
    pk BLOB NOT NULL,
    cid TEXT NOT NULL,
    val,
    col_version INTEGER NOT NULL,
    cl INTEGER NOT NULL,
    UNIQUE (site_id, origin_version, seq)
);
CREATE TABLE IF NOT EXISTS crsync_conflicts (
    id INTEGER PRIMARY KEY NOT NULL,
    recorded_at INTEGER NOT NULL,
    \"table\" TEXT NOT NULL,
    pk BLOB NOT NULL,
    cid TEXT NOT NULL,
    kind TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    lost_val,
    lost_site BLOB NOT NULL,
    lost_version INTEGER,
    lost_col_version INTEGER NOT NULL,
    won_val,
    won_site BLOB NOT NULL,
    won_version INTEGER,
    won_col_version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS crsync_conflicts_by_time ON crsync_conflicts (recorded_at);
";

/// Whether SQLite stores `value` in a column of `affinity` with its type
/// unchanged (conservative: a conversion that may happen counts as one).
fn keeps_type(value: &SqlValue, affinity: Affinity) -> bool {
    match (value, affinity) {
        (SqlValue::Null, _) => true,
        (SqlValue::Real(f), _) if f.is_nan() => false,
        (_, Affinity::Blob) => true,
        (SqlValue::Blob(_), _) => true,
        (SqlValue::Integer(_), Affinity::Integer | Affinity::Numeric) => true,
        (SqlValue::Real(_), Affinity::Real) => true,
        (SqlValue::Text(_), Affinity::Text) => true,
        _ => false,
    }
}

/// Columns of one CRR table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableInfo {
    pub(crate) pk_columns: usize,
    /// The primary key columns, in primary-key order.
    pub(crate) pk_names: Vec<String>,
    /// The non-pk columns.
    pub(crate) columns: BTreeSet<String>,
    /// The affinity of each pk column, in primary-key order.
    pub(crate) pk_affinities: Vec<Affinity>,
    /// The affinity of each non-pk column (from its declared type).
    pub(crate) affinities: BTreeMap<String, Affinity>,
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
        let version: i64 = conn
            .prepare_cached("PRAGMA schema_version")?
            .query_row([], |r| r.get(0))?;
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

    /// Whether cr-sqlite keeps `change` exactly as it comes, so that what a
    /// merge wrote can be relayed from memory instead of read back: its key
    /// is packed as cr-sqlite packs it, and no value changes type under its
    /// column's affinity (SQLite stores text `'7'` in an `INTEGER` column as
    /// 7, a NaN as NULL).
    pub(crate) fn stored_as_given(&self, change: &Change) -> bool {
        let Some(table) = self.tables.get(&change.table) else {
            return false;
        };
        let Ok(pk) = change.pk.unpack() else {
            return false;
        };
        if pk.len() != table.pk_affinities.len()
            || !pk
                .iter()
                .zip(&table.pk_affinities)
                .all(|(v, a)| keeps_type(v, *a))
            || crate::PackedPk::pack(&pk) != change.pk
        {
            return false;
        }
        if change.cid == SENTINEL_CID {
            return change.val == SqlValue::Null;
        }
        table
            .affinities
            .get(&change.cid)
            .is_some_and(|a| keeps_type(&change.val, *a))
    }

    /// Turns `change.val` into what a JavaScript (v1) sender meant, by the
    /// affinity of the column it is for (see [`normalize_js`]); a note says
    /// when that is only an approximation. The row marker (cid `-1`) and
    /// unknown tables or columns are left alone.
    pub(crate) fn normalize_js(&self, change: &mut Change) -> Option<String> {
        if change.cid == SENTINEL_CID {
            return None;
        }
        let affinity = *self
            .tables
            .get(&change.table)?
            .affinities
            .get(&change.cid)?;
        let (val, note) =
            normalize_js(std::mem::replace(&mut change.val, SqlValue::Null), affinity);
        change.val = val;
        note.map(|n| format!("{}.{}: {n}", change.table, change.cid))
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
        let mut columns = column_types(conn, &name)?;
        if columns.is_empty() {
            continue;
        }
        columns.sort_by_key(|c| c.1);
        let pk_names: Vec<String> = columns
            .iter()
            .filter(|c| c.1 > 0)
            .map(|c| c.0.clone())
            .collect();
        let pk_affinities: Vec<Affinity> = columns
            .iter()
            .filter(|c| c.1 > 0)
            .map(|c| Affinity::of_declared_type(&c.2))
            .collect();
        let affinities: BTreeMap<String, Affinity> = columns
            .into_iter()
            .filter(|c| c.1 == 0)
            .map(|c| (c.0, Affinity::of_declared_type(&c.2)))
            .collect();
        tables.insert(
            name,
            TableInfo {
                pk_columns: pk_affinities.len(),
                pk_names,
                columns: affinities.keys().cloned().collect(),
                pk_affinities,
                affinities,
            },
        );
    }
    Ok(tables)
}

/// `(name, position in the primary key or 0, declared type)` for every column of `table`.
fn column_types(conn: &Connection, table: &str) -> rusqlite::Result<Vec<(String, i64, String)>> {
    let mut stmt = conn.prepare("SELECT name, pk, type FROM pragma_table_info(?1)")?;
    let rows = stmt.query_map([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PackedPk;

    /// A schema read from plain SQLite, with stand-in clock tables marking the CRRs.
    fn schema(sql: &str) -> Schema {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(sql).unwrap();
        let mut schema = Schema::default();
        schema.refresh(&conn).unwrap();
        schema
    }

    fn change(table: &str, cid: &str, val: SqlValue) -> Change {
        Change {
            table: table.into(),
            pk: PackedPk::pack(&[SqlValue::Integer(1)]),
            cid: cid.into(),
            val,
            col_version: 1,
            db_version: DbVersion(1),
            site_id: SiteId::from_bytes([1; 16]),
            cl: 1,
            seq: 0,
        }
    }

    #[test]
    fn reads_column_affinities() {
        let s = schema(
            "CREATE TABLE t (b TEXT NOT NULL, a BIGINT NOT NULL, r DOUBLE, n DECIMAL, x,
                 PRIMARY KEY (a, b));
             CREATE TABLE t__crsql_clock (k);
             CREATE TABLE other (y REAL);",
        );
        assert_eq!(s.tables.len(), 1);
        let t = &s.tables["t"];
        assert_eq!(t.pk_columns, 2);
        assert_eq!(t.pk_affinities, vec![Affinity::Integer, Affinity::Text]);
        let expected: BTreeMap<String, Affinity> = [
            ("r", Affinity::Real),
            ("n", Affinity::Numeric),
            ("x", Affinity::Blob),
        ]
        .into_iter()
        .map(|(c, a)| (c.to_owned(), a))
        .collect();
        assert_eq!(t.affinities, expected);
        assert_eq!(t.columns, expected.keys().cloned().collect());
    }

    #[test]
    fn normalizes_javascript_values_by_column() {
        let s = schema(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, i INTEGER, r REAL, x);
             CREATE TABLE t__crsql_clock (k);",
        );
        let normalized = |table, cid, val| {
            let mut c = change(table, cid, val);
            let note = s.normalize_js(&mut c);
            (c.val, note)
        };
        // a REAL 1.0 arrives as 1
        assert_eq!(
            normalized("t", "r", SqlValue::Integer(1)),
            (SqlValue::Real(1.0), None)
        );
        // i64::MIN arrives as the double -2^63
        assert_eq!(
            normalized("t", "i", SqlValue::Real(i64::MIN as f64)),
            (SqlValue::Integer(i64::MIN), None)
        );
        let (val, note) = normalized("t", "i", SqlValue::Real(1e19));
        assert_eq!(val, SqlValue::Integer(i64::MAX));
        assert!(note.unwrap().starts_with("t.i: "));
        // no declared type: as sent
        assert_eq!(
            normalized("t", "x", SqlValue::Real(1.0)),
            (SqlValue::Real(1.0), None)
        );
        // the row marker, unknown columns and tables: left alone
        assert_eq!(
            normalized("t", SENTINEL_CID, SqlValue::Integer(1)),
            (SqlValue::Integer(1), None)
        );
        assert_eq!(
            normalized("t", "nope", SqlValue::Integer(1)),
            (SqlValue::Integer(1), None)
        );
        assert_eq!(
            normalized("u", "r", SqlValue::Integer(1)),
            (SqlValue::Integer(1), None)
        );
    }
}
