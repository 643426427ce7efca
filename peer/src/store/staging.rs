//! Parts of origin transactions received but not yet applied.
//!
//! A transaction too large for one batch arrives in [parts](crate::TxnPart).
//! Each part is written to `crsync_staged` in a SQLite transaction of its
//! own, so what arrived survives a disconnect or a crash, and
//! `crsync_staging` keeps, per transaction, the highest `seq` staged (a
//! sender resumes after it). Nothing staged is visible in the user's tables:
//! the transaction is applied whole, in the SQLite transaction that merges
//! its last part (or a range that claims it), and its staged rows are
//! deleted in that same transaction.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{Connection, params};

use super::conflicts::{INSERT_CHANGE, Recorder, apply_change};
use crate::{Change, DbVersion, PackedPk, SiteId};

/// Transactions staged at most; a new one beyond this drops the one staged
/// longest ago (a sender that never finished), which restarts if it comes
/// back.
pub(crate) const MAX_STAGED_TRANSACTIONS: usize = 16;

/// Per staged transaction (origin site, origin version), the highest `seq` staged.
pub(crate) type Staged = BTreeMap<(SiteId, DbVersion), i64>;

/// Default of `StoreBuilder::stage_in_memory_below`: a transaction whose
/// parts (estimated wire size) stay under this is staged in memory, not on
/// disk: written once, when it completes, instead
/// of twice. A crash or restart loses it and the sender sends it again from
/// its start (nothing of it was applied). Larger ones go to disk, where they
/// survive and resume.
pub(crate) const MEMORY_STAGE_BYTES: usize = 1 << 20;
/// Bytes staged in memory at most, over all transactions.
pub(crate) const MEMORY_STAGE_TOTAL: usize = 16 << 20;

/// Parts of one transaction held in memory.
#[derive(Debug, Default)]
pub(crate) struct HeldPart {
    pub(crate) upto: i64,
    pub(crate) changes: Vec<Change>,
    bytes: usize,
}

/// The transactions staged in memory.
#[derive(Debug, Default)]
pub(crate) struct HeldParts {
    pub(crate) parts: BTreeMap<(SiteId, DbVersion), HeldPart>,
    bytes: usize,
    /// Bytes one transaction may hold.
    limit: usize,
}

impl HeldParts {
    /// Holds transactions of up to `limit` bytes each.
    pub(crate) fn new(limit: usize) -> Self {
        HeldParts {
            limit,
            ..HeldParts::default()
        }
    }

    /// The highest `seq` held of `key`.
    pub(crate) fn upto(&self, key: &(SiteId, DbVersion)) -> Option<i64> {
        self.parts.get(key).map(|p| p.upto)
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &(SiteId, DbVersion)> {
        self.parts.keys()
    }

    /// Whether `changes` may join `key` in memory.
    pub(crate) fn fits(&self, key: &(SiteId, DbVersion), changes: &[Change]) -> bool {
        let adding: usize = changes.iter().map(Change::approx_wire_size).sum();
        let has = self.parts.get(key).map_or(0, |p| p.bytes);
        has + adding < self.limit && self.bytes + adding <= MEMORY_STAGE_TOTAL
    }

    pub(crate) fn add(&mut self, key: (SiteId, DbVersion), changes: &[Change], upto: i64) {
        let adding: usize = changes.iter().map(Change::approx_wire_size).sum();
        let part = self.parts.entry(key).or_insert_with(|| HeldPart {
            upto,
            ..HeldPart::default()
        });
        part.upto = part.upto.max(upto);
        part.changes.extend(changes.iter().cloned());
        part.bytes += adding;
        self.bytes += adding;
    }

    pub(crate) fn remove(&mut self, key: &(SiteId, DbVersion)) -> Option<HeldPart> {
        let part = self.parts.remove(key)?;
        self.bytes -= part.bytes;
        Some(part)
    }

    /// Takes out the held transactions among `keys` (to apply them).
    pub(crate) fn take(
        &mut self,
        keys: &BTreeSet<(SiteId, DbVersion)>,
    ) -> BTreeMap<(SiteId, DbVersion), HeldPart> {
        keys.iter()
            .filter_map(|key| Some((*key, self.remove(key)?)))
            .collect()
    }

    /// Puts back what [`take`](Self::take) took (the merge failed).
    pub(crate) fn put_back(&mut self, parts: BTreeMap<(SiteId, DbVersion), HeldPart>) {
        for (key, part) in parts {
            self.bytes += part.bytes;
            self.parts.insert(key, part);
        }
    }
}

/// What is staged, as recorded in the file.
pub(crate) fn load(conn: &Connection) -> rusqlite::Result<Staged> {
    let mut stmt = conn.prepare("SELECT site_id, origin_version, upto_seq FROM crsync_staging")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?, r.get(2)?))
    })?;
    let mut staged = Staged::new();
    for row in rows {
        let (site, version, upto) = row?;
        if let Ok(site) = SiteId::from_slice(&site) {
            staged.insert((site, DbVersion(version)), upto);
        }
    }
    Ok(staged)
}

/// Stages `changes` (already checked) of transaction `key`; `upto` is the
/// staged `seq` afterwards. Drops the oldest staged transaction first when
/// `key` is new and the table is full.
pub(crate) fn stage(
    conn: &Connection,
    staged: &mut Staged,
    key: (SiteId, DbVersion),
    changes: &[Change],
    upto: i64,
) -> rusqlite::Result<()> {
    let (site, version) = key;
    let site_bytes = site.as_bytes().as_slice();
    if !staged.contains_key(&key) && staged.len() >= MAX_STAGED_TRANSACTIONS {
        let oldest: Option<(Vec<u8>, i64)> = conn
            .query_row(
                "SELECT site_id, origin_version FROM crsync_staging ORDER BY started LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ok();
        if let Some((old_site, old_version)) = oldest {
            if let Ok(old) = SiteId::from_slice(&old_site) {
                tracing::warn!(site = %old, version = old_version, "dropping a staged transaction that never completed");
                discard(conn, staged, (old, DbVersion(old_version)))?;
            }
        }
    }
    let mut insert = conn.prepare_cached(
        "INSERT OR REPLACE INTO crsync_staged \
         (site_id, origin_version, seq, \"table\", pk, cid, val, col_version, cl) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for c in changes {
        insert.execute(params![
            site_bytes,
            version.0,
            c.seq,
            c.table,
            c.pk.0,
            c.cid,
            c.val,
            c.col_version,
            c.cl
        ])?;
    }
    conn.execute(
        "INSERT INTO crsync_staging (site_id, origin_version, upto_seq, started) \
         VALUES (?1, ?2, ?3, unixepoch()) \
         ON CONFLICT (site_id, origin_version) DO UPDATE SET upto_seq = max(upto_seq, excluded.upto_seq)",
        params![site_bytes, version.0, upto],
    )?;
    let entry = staged.entry(key).or_insert(upto);
    *entry = (*entry).max(upto);
    Ok(())
}

/// Hands the staged rows of `key` to cr-sqlite under local version `local`
/// (recording conflicts with `recorder`, see [`conflicts`](super::conflicts))
/// and forgets them; returns how many there were and the tables they are
/// for. Runs inside the merge's SQLite transaction, so `staged` must be
/// reloaded if that rolls back.
pub(crate) fn apply(
    conn: &Connection,
    staged: &mut Staged,
    key: (SiteId, DbVersion),
    local: i64,
    recorder: Option<&mut Recorder<'_>>,
) -> rusqlite::Result<(usize, BTreeSet<String>)> {
    let (site, version) = key;
    let site_bytes = site.as_bytes().as_slice();
    let Some(recorder) = recorder else {
        // Nothing to record: one statement, no row through Rust.
        let tables = conn
            .prepare_cached(
                "SELECT DISTINCT \"table\" FROM crsync_staged WHERE site_id = ?1 AND origin_version = ?2",
            )?
            .query_map(params![site_bytes, version.0], |r| r.get(0))?
            .collect::<rusqlite::Result<BTreeSet<String>>>()?;
        let applied = conn.prepare_cached(
            "INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq) \
             SELECT \"table\", pk, cid, val, col_version, ?3, site_id, cl, seq FROM crsync_staged \
             WHERE site_id = ?1 AND origin_version = ?2 ORDER BY seq",
        )?
        .execute(params![site_bytes, version.0, local])?;
        discard(conn, staged, key)?;
        return Ok((applied, tables));
    };
    let mut tables = BTreeSet::new();
    let mut applied = 0;
    let mut insert = conn.prepare_cached(INSERT_CHANGE)?;
    let mut stmt = conn.prepare_cached(
        "SELECT \"table\", pk, cid, val, col_version, cl, seq FROM crsync_staged \
         WHERE site_id = ?1 AND origin_version = ?2 ORDER BY seq",
    )?;
    let mut rows = stmt.query(params![site_bytes, version.0])?;
    while let Some(r) = rows.next()? {
        let change = Change {
            table: r.get(0)?,
            pk: PackedPk(r.get(1)?),
            cid: r.get(2)?,
            val: r.get(3)?,
            col_version: r.get(4)?,
            db_version: version,
            site_id: site,
            cl: r.get(5)?,
            seq: r.get(6)?,
        };
        apply_change(conn, &mut insert, Some(&mut *recorder), &change, key, local)?;
        applied += 1;
        if !tables.contains(&change.table) {
            tables.insert(change.table);
        }
    }
    drop(rows);
    drop(stmt);
    drop(insert);
    discard(conn, staged, key)?;
    Ok((applied, tables))
}

/// Forgets a staged transaction without applying it.
pub(crate) fn discard(
    conn: &Connection,
    staged: &mut Staged,
    key: (SiteId, DbVersion),
) -> rusqlite::Result<()> {
    let (site, version) = key;
    let site_bytes = site.as_bytes().as_slice();
    conn.prepare_cached("DELETE FROM crsync_staged WHERE site_id = ?1 AND origin_version = ?2")?
        .execute(params![site_bytes, version.0])?;
    conn.prepare_cached("DELETE FROM crsync_staging WHERE site_id = ?1 AND origin_version = ?2")?
        .execute(params![site_bytes, version.0])?;
    staged.remove(&key);
    Ok(())
}
