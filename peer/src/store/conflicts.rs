//! Conflict history: values a merge replaced or refused.
//!
//! While a merge applies a change, the cell's local state is read just
//! before and just after cr-sqlite's insert: from the table's key table
//! (`<t>__crsql_pks`, by primary key, through its unique index), its clock
//! table (`<t>__crsql_clock`, by key and column) and the base table (the
//! value), never from `crsql_changes`. Afterwards the cell either holds the
//! incoming write (the local value was replaced) or its own (the incoming
//! value was refused); the loser is recorded in `crsync_conflicts` when it
//! differs from the winner and another site wrote it. A row deleted by an
//! incoming delete records each of its columns another site wrote; a write
//! refused because the row was deleted records the write.
//!
//! A key never seen before costs one index probe: the common case of an
//! initial sync. The history is bounded (rows and age), lives in the file
//! only (no CRR: it never syncs), and is left out of snapshots.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use super::schema::{Schema, TableInfo, quote_ident};
use crate::change::SENTINEL_CID;
use crate::{Change, DbVersion, PackedPk, SiteId, SqlValue};

/// Default of [`StoreBuilder::conflict_retention`](crate::StoreBuilder::conflict_retention): rows kept at most.
pub(crate) const DEFAULT_MAX_ROWS: usize = 10_000;
/// Default: records older than this are trimmed (30 days).
pub(crate) const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Keys remembered per merge as "first seen in this merge"; past this the
/// memory is cleared (later changes of those keys then take the full lookup:
/// slower, still right).
const FRESH_KEYS_CAP: usize = 65_536;

/// How much conflict history a Store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retention {
    /// Rows kept at most; 0 records nothing.
    pub(crate) max_rows: usize,
    /// Records older than this are trimmed.
    pub(crate) max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_rows: DEFAULT_MAX_ROWS,
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

/// A value a merge replaced (the local value lost) or refused (the incoming
/// value lost), from [`Store::conflicts`](crate::Store::conflicts).
///
/// ```no_run
/// # async fn demo(store: crsync_peer::Store) -> Result<(), Box<dyn std::error::Error>> {
/// use crsync_peer::ConflictQuery;
/// for c in store.conflicts(ConflictQuery::new().table("notes").limit(20)).await? {
///     println!("{}.{}: {:?} (by {}) lost to {:?} (by {})",
///         c.table, c.column, c.lost.value, c.lost.site, c.won.value, c.won.site);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Conflict {
    /// Position in the history; newer records have higher ids.
    pub id: i64,
    /// When the merge recorded it.
    pub recorded_at: SystemTime,
    /// The CRR table.
    pub table: String,
    /// The row's packed primary key ([`PackedPk::unpack`] gives its values).
    pub pk: PackedPk,
    /// The column.
    pub column: String,
    /// Whether the local value lost ([`ConflictKind::Replaced`]) or the incoming one.
    pub kind: ConflictKind,
    /// The winner is the row's deletion (`won.value` is NULL, `won.col_version`
    /// the row's causal length).
    pub deleted: bool,
    /// The value that lost, and who wrote it.
    pub lost: ConflictSide,
    /// The value that won, and who wrote it.
    pub won: ConflictSide,
}

/// Which side of a merge lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConflictKind {
    /// The incoming write replaced the local value.
    Replaced,
    /// The local value stayed; the incoming write was refused.
    Refused,
}

impl ConflictKind {
    /// `"replaced"` or `"refused"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::Replaced => "replaced",
            ConflictKind::Refused => "refused",
        }
    }
}

/// One side of a [`Conflict`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ConflictSide {
    /// The value (NULL for a deletion).
    pub value: SqlValue,
    /// The site that wrote it.
    pub site: SiteId,
    /// That site's own version of the write, where known (merged writes from
    /// before crsync kept origins may lack it).
    pub version: Option<DbVersion>,
    /// The cell's column version (for a deletion: the row's causal length).
    pub col_version: i64,
}

/// What [`Store::conflicts`](crate::Store::conflicts) returns: newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConflictQuery {
    table: Option<String>,
    limit: Option<usize>,
}

impl ConflictQuery {
    /// Every table, no limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only records of this table.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// At most `n` records (the newest).
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }
}

/// A clock row: `(col_version, local db_version, site id)`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    col_version: i64,
    db_version: i64,
    site: SiteId,
}

/// A cell's state around the insert of one change.
#[derive(Debug)]
struct Cell {
    /// The row's sentinel clock (its causal length), if it has one.
    sentinel: Option<Clock>,
    /// The cell's clock.
    clock: Option<Clock>,
}

impl Cell {
    /// The row's causal length: the sentinel's version, else 1 (alive).
    fn cl(&self) -> i64 {
        self.sentinel.as_ref().map_or(1, |s| s.col_version)
    }
}

/// What was read before the insert.
enum Before {
    /// A column write: the cell and its value (if the row is alive).
    Column { cell: Cell, value: Option<SqlValue> },
    /// A delete of a live row: each column's clock and value.
    Delete {
        columns: Vec<(String, Clock, SqlValue)>,
    },
}

/// A key's state within one merge.
#[derive(Debug, Clone, Copy)]
enum Seen {
    /// Absent before this merge; bit `i` set: column `i` written by it.
    Fresh(u64),
    /// Present (or written twice): every change takes the full lookup.
    Known,
}

/// One table's lookups (SQL built once per merge) and its keys seen.
struct Table<'a> {
    info: &'a TableInfo,
    /// Key of a primary key in `<t>__crsql_pks`.
    probe: String,
    /// Sentinel and one column's clock of a key.
    cell: String,
    /// Every column's clock of a key.
    row: String,
    /// Per column, its value by primary key.
    values: HashMap<&'a str, String>,
    /// Per column, its bit in [`Seen::Fresh`] (the first 64).
    bits: HashMap<&'a str, u64>,
    seen: HashMap<Vec<u8>, Seen>,
}

impl<'a> Table<'a> {
    fn new(name: &str, info: &'a TableInfo) -> Self {
        let clock = quote_ident(&format!("{name}__crsql_clock"));
        let by_pk = pk_match(info, 1);
        let clocks = format!(
            "SELECT c.col_name, c.col_version, c.db_version, s.site_id FROM {clock} c \
             JOIN crsql_site_id s ON s.ordinal = c.site_id WHERE c.key = ?1"
        );
        Table {
            info,
            probe: format!(
                "SELECT __crsql_key FROM {} WHERE {by_pk}",
                quote_ident(&format!("{name}__crsql_pks"))
            ),
            cell: format!("{clocks} AND c.col_name IN (?2, '-1')"),
            row: format!("{clocks} AND c.col_name <> '-1'"),
            values: info
                .columns
                .iter()
                .map(|c| {
                    let sql = format!(
                        "SELECT {} FROM {} WHERE {by_pk}",
                        quote_ident(c),
                        quote_ident(name)
                    );
                    (c.as_str(), sql)
                })
                .collect(),
            bits: info
                .columns
                .iter()
                .take(64)
                .enumerate()
                .map(|(i, c)| (c.as_str(), 1u64 << i))
                .collect(),
            seen: HashMap::new(),
        }
    }
}

/// Records the conflicts of one merge (one SQLite transaction).
pub(crate) struct Recorder<'a> {
    schema: &'a Schema,
    own_site: SiteId,
    now_ms: i64,
    tables: HashMap<&'a str, Table<'a>>,
    /// Keys remembered, over all tables.
    seen: usize,
    /// Records written.
    pub(crate) recorded: usize,
}

impl<'a> Recorder<'a> {
    pub(crate) fn new(schema: &'a Schema, own_site: SiteId) -> Self {
        Recorder {
            schema,
            own_site,
            now_ms: unix_ms(SystemTime::now()),
            tables: HashMap::new(),
            seen: 0,
            recorded: 0,
        }
    }

    /// Reads what the insert of `c` may change; `None`: it cannot conflict.
    fn before(&mut self, conn: &Connection, c: &Change) -> rusqlite::Result<Option<(i64, Before)>> {
        let Some((name, info)) = self.schema.tables.get_key_value(c.table.as_str()) else {
            return Ok(None);
        };
        if self.seen >= FRESH_KEYS_CAP {
            // Forgetting is safe: a forgotten key takes the full lookup.
            for table in self.tables.values_mut() {
                table.seen.clear();
            }
            self.seen = 0;
        }
        let table = self
            .tables
            .entry(name.as_str())
            .or_insert_with(|| Table::new(name, info));
        let bit = table.bits.get(c.cid.as_str()).copied();
        let seen = table.seen.get_mut(c.pk.0.as_slice());
        if let (Some(Seen::Fresh(bits)), Some(bit)) = (seen, bit) {
            if *bits & bit == 0 {
                // A key new in this merge, at a column it has not written yet.
                *bits |= bit;
                return Ok(None);
            }
        }
        let seen = table.seen.get(c.pk.0.as_slice()).copied();
        let Ok(pk) = c.pk.unpack() else {
            return Ok(None);
        };
        let key = probe_key(conn, table, &pk)?;
        let now_seen = match (seen, key, bit) {
            (None, None, Some(bit)) => Seen::Fresh(bit),
            _ => Seen::Known,
        };
        table.seen.insert(c.pk.0.clone(), now_seen);
        if seen.is_none() {
            self.seen += 1;
        }
        let Some(key) = key else {
            return Ok(None);
        };
        let cell = read_cell(conn, table, key, &c.cid)?;
        let alive = cell.cl() % 2 == 1;
        let before = if c.cid == SENTINEL_CID {
            // Only a delete that wins over a live row loses values.
            if !(alive && c.cl % 2 == 0 && c.cl > cell.cl()) {
                return Ok(None);
            }
            let columns = read_row(conn, table, key, &pk)?;
            Before::Delete { columns }
        } else {
            let value = match (&cell.clock, alive) {
                (Some(_), true) => read_value(conn, table, &c.cid, &pk)?,
                _ => None,
            };
            Before::Column { cell, value }
        };
        Ok(Some((key, before)))
    }

    /// Compares the cell after the insert of `c` (from `origin`, written
    /// under local version `local`) with what `before` read, and records the loser.
    fn after(
        &mut self,
        conn: &Connection,
        c: &Change,
        origin: (SiteId, DbVersion),
        local: i64,
        key: i64,
        before: Before,
    ) -> rusqlite::Result<()> {
        let (site, version) = origin;
        let incoming = |value: SqlValue, col_version| ConflictSide {
            value,
            site,
            version: Some(version),
            col_version,
        };
        match before {
            Before::Delete { columns } => {
                let now = read_cell(conn, self.table(&c.table), key, SENTINEL_CID)?;
                if now.cl() != c.cl {
                    return Ok(());
                }
                for (column, clock, value) in columns {
                    if clock.site == site {
                        continue;
                    }
                    let lost = self.side(conn, value, &clock)?;
                    self.record(
                        conn,
                        c,
                        &column,
                        ConflictKind::Replaced,
                        true,
                        lost,
                        incoming(SqlValue::Null, c.cl),
                    )?;
                }
            }
            Before::Column { cell, value } => {
                let now = read_cell(conn, self.table(&c.table), key, &c.cid)?;
                let took = now
                    .clock
                    .as_ref()
                    .is_some_and(|k| k.db_version == local && k.site == site);
                if took {
                    let (Some(clock), Some(value)) = (cell.clock, value) else {
                        return Ok(());
                    };
                    if clock.site == site || value == c.val {
                        return Ok(());
                    }
                    let lost = self.side(conn, value, &clock)?;
                    let won = incoming(c.val.clone(), c.col_version);
                    self.record(conn, c, &c.cid, ConflictKind::Replaced, false, lost, won)?;
                    return Ok(());
                }
                // Refused: by the row's deletion, or by the cell's own value.
                let lost = incoming(c.val.clone(), c.col_version);
                let (winner, value, deleted) = match (&now.clock, now.cl() % 2 == 1) {
                    (Some(clock), true) => match value {
                        Some(value) => (*clock, value, false),
                        // nothing was here and nothing changed
                        None => return Ok(()),
                    },
                    _ => match now.sentinel {
                        Some(sentinel) => (sentinel, SqlValue::Null, true),
                        None => return Ok(()),
                    },
                };
                if winner.site == site || (!deleted && value == c.val) {
                    return Ok(());
                }
                let won = self.side(conn, value, &winner)?;
                self.record(conn, c, &c.cid, ConflictKind::Refused, deleted, lost, won)?;
            }
        }
        Ok(())
    }

    /// The lookups of a table [`before`](Self::before) saw.
    fn table(&self, name: &str) -> &Table<'a> {
        &self.tables[name]
    }

    /// A local cell's side: its origin version from `crsync_origin` (our
    /// own writes are their own origin).
    fn side(
        &self,
        conn: &Connection,
        value: SqlValue,
        clock: &Clock,
    ) -> rusqlite::Result<ConflictSide> {
        let version = if clock.site == self.own_site {
            Some(DbVersion(clock.db_version))
        } else {
            conn.prepare_cached(
                "SELECT origin_version FROM crsync_origin WHERE local_version = ?1 AND site_id = ?2",
            )?
            .query_row(
                params![clock.db_version, clock.site.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .optional()?
            .map(DbVersion)
        };
        Ok(ConflictSide {
            value,
            site: clock.site,
            version,
            col_version: clock.col_version,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        conn: &Connection,
        c: &Change,
        column: &str,
        kind: ConflictKind,
        deleted: bool,
        lost: ConflictSide,
        won: ConflictSide,
    ) -> rusqlite::Result<()> {
        conn.prepare_cached(
            "INSERT INTO crsync_conflicts (recorded_at, \"table\", pk, cid, kind, deleted, \
             lost_val, lost_site, lost_version, lost_col_version, \
             won_val, won_site, won_version, won_col_version) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?
        .execute(params![
            self.now_ms,
            c.table,
            c.pk.0,
            column,
            kind.as_str(),
            deleted,
            lost.value,
            lost.site.as_bytes().as_slice(),
            lost.version.map(|v| v.0),
            lost.col_version,
            won.value,
            won.site.as_bytes().as_slice(),
            won.version.map(|v| v.0),
            won.col_version,
        ])?;
        self.recorded += 1;
        Ok(())
    }
}

/// Hands a change to cr-sqlite (see [`apply_change`]).
pub(crate) const INSERT_CHANGE: &str = "INSERT INTO crsql_changes \
    (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// Hands one change to cr-sqlite with `insert` ([`INSERT_CHANGE`]) under
/// local version `local` (origin `origin`), recording what it replaces or
/// what refuses it.
pub(crate) fn apply_change(
    conn: &Connection,
    insert: &mut rusqlite::Statement<'_>,
    recorder: Option<&mut Recorder<'_>>,
    c: &Change,
    origin: (SiteId, DbVersion),
    local: i64,
) -> rusqlite::Result<()> {
    let row = params![
        c.table,
        c.pk.0,
        c.cid,
        c.val,
        c.col_version,
        local,
        origin.0.as_bytes().as_slice(),
        c.cl,
        c.seq
    ];
    let Some(recorder) = recorder else {
        insert.execute(row)?;
        return Ok(());
    };
    let before = recorder.before(conn, c)?;
    insert.execute(row)?;
    if let Some((key, before)) = before {
        recorder.after(conn, c, origin, local, key, before)?;
    }
    Ok(())
}

/// Trims the history to `retention` (run in the merge's transaction, after recording).
pub(crate) fn trim(conn: &Connection, retention: Retention) -> rusqlite::Result<()> {
    let cutoff = unix_ms(SystemTime::now()).saturating_sub(retention.max_age.as_millis() as i64);
    conn.prepare_cached("DELETE FROM crsync_conflicts WHERE recorded_at < ?1")?
        .execute([cutoff])?;
    let rows: i64 = conn
        .prepare_cached("SELECT count(*) FROM crsync_conflicts")?
        .query_row([], |r| r.get(0))?;
    let excess = rows - retention.max_rows as i64;
    if excess > 0 {
        conn.prepare_cached(
            "DELETE FROM crsync_conflicts WHERE id IN \
             (SELECT id FROM crsync_conflicts ORDER BY id LIMIT ?1)",
        )?
        .execute([excess])?;
    }
    Ok(())
}

/// The records `query` asks for, newest first.
pub(crate) fn list(conn: &Connection, query: &ConflictQuery) -> rusqlite::Result<Vec<Conflict>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, recorded_at, \"table\", pk, cid, kind, deleted, \
         lost_val, lost_site, lost_version, lost_col_version, \
         won_val, won_site, won_version, won_col_version \
         FROM crsync_conflicts WHERE ?1 IS NULL OR \"table\" = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let limit = query.limit.map_or(-1, |n| n.min(i64::MAX as usize) as i64);
    let rows = stmt.query_map(params![query.table, limit], |r| {
        let side = |at: usize| -> rusqlite::Result<ConflictSide> {
            Ok(ConflictSide {
                value: r.get(at)?,
                site: site_of(r.get::<_, Vec<u8>>(at + 1)?, at + 1)?,
                version: r.get::<_, Option<i64>>(at + 2)?.map(DbVersion),
                col_version: r.get(at + 3)?,
            })
        };
        let kind: String = r.get(5)?;
        Ok(Conflict {
            id: r.get(0)?,
            recorded_at: UNIX_EPOCH + Duration::from_millis(r.get::<_, i64>(1)?.max(0) as u64),
            table: r.get(2)?,
            pk: PackedPk(r.get(3)?),
            column: r.get(4)?,
            kind: if kind == "refused" {
                ConflictKind::Refused
            } else {
                ConflictKind::Replaced
            },
            deleted: r.get(6)?,
            lost: side(7)?,
            won: side(11)?,
        })
    })?;
    rows.collect()
}

fn site_of(bytes: Vec<u8>, column: usize) -> rusqlite::Result<SiteId> {
    SiteId::from_slice(&bytes).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Blob, Box::new(e))
    })
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64)
}

/// `WHERE` clause matching the primary key columns to `?{first}`, `?{first+1}`, ...
fn pk_match(table: &TableInfo, first: usize) -> String {
    table
        .pk_names
        .iter()
        .enumerate()
        .map(|(i, name)| format!("{} IS ?{}", quote_ident(name), first + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The row's key in cr-sqlite's key table, through its unique index on the pk.
fn probe_key(
    conn: &Connection,
    table: &Table<'_>,
    pk: &[SqlValue],
) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(&table.probe)?
        .query_row(rusqlite::params_from_iter(pk), |r| r.get(0))
        .optional()
}

fn clock_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, Clock)> {
    Ok((
        r.get(0)?,
        Clock {
            col_version: r.get(1)?,
            db_version: r.get(2)?,
            site: site_of(r.get(3)?, 3)?,
        },
    ))
}

/// The sentinel and `cid`'s clock of row `key`.
fn read_cell(conn: &Connection, table: &Table<'_>, key: i64, cid: &str) -> rusqlite::Result<Cell> {
    let mut stmt = conn.prepare_cached(&table.cell)?;
    let mut rows = stmt.query(params![key, cid])?;
    let mut cell = Cell {
        sentinel: None,
        clock: None,
    };
    while let Some(r) = rows.next()? {
        let (col, clock) = clock_row(r)?;
        if col == SENTINEL_CID {
            cell.sentinel = Some(clock);
        }
        if col == cid {
            cell.clock = Some(clock);
        }
    }
    Ok(cell)
}

/// Column `cid`'s value of the row with primary key `pk`, if the row exists.
fn read_value(
    conn: &Connection,
    table: &Table<'_>,
    cid: &str,
    pk: &[SqlValue],
) -> rusqlite::Result<Option<SqlValue>> {
    let Some(sql) = table.values.get(cid) else {
        return Ok(None);
    };
    conn.prepare_cached(sql)?
        .query_row(rusqlite::params_from_iter(pk), |r| r.get(0))
        .optional()
}

/// Every written column of live row `key`: its clock and value.
fn read_row(
    conn: &Connection,
    table: &Table<'_>,
    key: i64,
    pk: &[SqlValue],
) -> rusqlite::Result<Vec<(String, Clock, SqlValue)>> {
    let clocks = conn
        .prepare_cached(&table.row)?
        .query_map([key], clock_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut columns = Vec::with_capacity(clocks.len());
    for (column, clock) in clocks {
        if !table.info.columns.contains(&column) {
            continue;
        }
        let value = read_value(conn, table, &column, pk)?.unwrap_or(SqlValue::Null);
        columns.push((column, clock, value));
    }
    Ok(columns)
}
