//! A model of crsync's Store: the rows of `crsql_changes`, the cursor, and
//! the merge and read paths of `store/writer.rs` and `store/reader.rs`,
//! built on the crate's pure functions (`plan_merge`, `BatchBuilder`,
//! `normalize_js`).

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};

use crsync_peer::proto::batch::{PartAction, check_part, claim_limits, completed_by};
use crsync_peer::proto::{MergeFailure, MergeOutcome};
use crsync_peer::{
    BatchBuilder, Change, ChangeBatch, Cursor, DbVersion, ReadHint, SiteId, SqlValue, normalize_js,
    plan_merge,
};

use super::values::{CellKey, Version, changes, cmp_versions};

/// One row of `crsql_changes` plus its origin record.
#[derive(Debug, Clone)]
pub struct Cell {
    pub val: SqlValue,
    pub col_version: i64,
    /// The local db_version the row is at.
    pub local: i64,
    /// The origin site.
    pub site: SiteId,
    /// The origin's db_version (our own rows: `local`).
    pub origin: i64,
    pub cl: i64,
    pub seq: i64,
}

impl Cell {
    pub fn version(&self) -> Version {
        Version {
            col_version: self.col_version,
            val: self.val.clone(),
            site: self.site,
        }
    }
}

/// The model store of one crsync peer.
#[derive(Debug, Clone)]
pub struct Store {
    pub site: SiteId,
    pub cells: BTreeMap<CellKey, Cell>,
    /// `crsql_db_version()`. A local transaction uses one even when it
    /// writes no row (equal values); a merged row is stored at `max(counter +
    /// 1, pending, given)` and a change that loses uses none (checked on
    /// cr-sqlite 0.16.3).
    pub counter: i64,
    /// Our own cursor entry: the highest local version that holds rows.
    pub own_version: i64,
    /// The remote entries of our cursor (`crsync_cursor`).
    pub remote: Cursor,
    /// `PRAGMA user_version`.
    pub schema_version: i64,
    /// Transactions staged in part (`crsync_staged`): the highest `seq`
    /// staged and the changes. Durable: a restart keeps them.
    pub staged: BTreeMap<(SiteId, DbVersion), (i64, Vec<Change>)>,
    /// The batch size limit of the read path.
    pub max_changes: usize,
}

/// What a merge did, for the driver.
#[derive(Debug)]
pub struct Merged {
    pub result: Result<MergeOutcome, MergeFailure>,
    /// The Store reports a change (its `tables` are not empty): the Peer
    /// refreshes every session's cursor.
    pub notify: bool,
    /// Changes that won and were stored.
    pub won: usize,
}

impl Store {
    pub fn new(site: SiteId, schema_version: i64, max_changes: usize) -> Self {
        Store {
            site,
            cells: BTreeMap::new(),
            counter: 0,
            own_version: 0,
            remote: Cursor::new(),
            schema_version,
            max_changes,
            staged: BTreeMap::new(),
        }
    }

    /// `Store::staged`.
    pub fn staged_seqs(&self) -> BTreeMap<(SiteId, DbVersion), i64> {
        self.staged.iter().map(|(k, (seq, _))| (*k, *seq)).collect()
    }

    /// `Store::cursor`: the remote entries plus our own.
    pub fn cursor(&self) -> Cursor {
        let mut cursor = self.remote.clone();
        cursor.advance(self.site, DbVersion(self.own_version));
        cursor
    }

    /// A local transaction. Returns the versions it created (none: it wrote
    /// only equal values, which still uses up a db_version).
    pub fn write(&mut self, txn: &[(CellKey, SqlValue)]) -> Vec<(CellKey, Version)> {
        self.counter += 1;
        let local = self.counter;
        let mut created = Vec::new();
        for (key, val) in txn {
            let current = self.cells.get(key);
            if !changes(current.map(|c| &c.val), val) {
                continue;
            }
            let col_version = current.map_or(1, |c| c.col_version + 1);
            let cell = Cell {
                val: val.clone(),
                col_version,
                local,
                site: self.site,
                origin: local,
                cl: 1,
                seq: created.len() as i64,
            };
            created.push((*key, cell.version()));
            self.cells.insert(*key, cell);
        }
        if !created.is_empty() {
            self.own_version = local;
        }
        created
    }

    /// `Writer::merge`.
    pub fn merge(&mut self, batch: &ChangeBatch) -> Merged {
        let failed = |f| Merged {
            result: Err(f),
            notify: false,
            won: 0,
        };
        if let Some(theirs) = batch.schema_version {
            if theirs > self.schema_version {
                return failed(MergeFailure::Outdated {
                    ours: self.schema_version,
                    theirs,
                });
            }
        }
        // Every change the simulator sends names a known cell; a v1 sender's
        // numbers are read by the column's affinity.
        let mut normalized;
        let batch = if batch.javascript {
            normalized = batch.clone();
            for change in &mut normalized.changes {
                if let Some(key) = CellKey::parse(&change.table, &change.pk, &change.cid) {
                    let val = std::mem::replace(&mut change.val, SqlValue::Null);
                    change.val = normalize_js(val, key.affinity()).0;
                }
            }
            normalized
                .changes
                .retain(|c| CellKey::parse(&c.table, &c.pk, &c.cid).is_some());
            &normalized
        } else {
            for (index, c) in batch.changes.iter().enumerate() {
                if CellKey::parse(&c.table, &c.pk, &c.cid).is_none() {
                    return failed(MergeFailure::Invalid(format!(
                        "change #{index}: unknown cell"
                    )));
                }
            }
            batch
        };
        let held = self.cursor();
        // `Writer::merge`: a part that is not the last is staged.
        let have = batch
            .part
            .and_then(|p| self.staged.get(&p.origin()))
            .map(|s| s.0);
        match check_part(batch, &held, have) {
            Err(rejection) => return failed(MergeFailure::Rejected(rejection)),
            Ok(Some(PartAction::Stage { upto })) => {
                if let Some(part) = batch.part.filter(|p| p.site != self.site) {
                    let entry = self.staged.entry(part.origin()).or_insert((-1, Vec::new()));
                    entry.0 = entry.0.max(upto);
                    entry.1.extend(batch.changes.iter().cloned());
                }
                return Merged {
                    result: Ok(MergeOutcome {
                        cursor: held,
                        local_versions: None,
                        staged: self.staged_seqs(),
                    }),
                    notify: false,
                    won: 0,
                };
            }
            Ok(_) => {}
        }
        let plan = match plan_merge(self.site, &held, batch) {
            Ok(plan) => plan,
            Err(rejection) => return failed(MergeFailure::Rejected(rejection)),
        };
        let complete = completed_by(self.staged.keys(), batch, &plan);
        let covered: Vec<(SiteId, DbVersion)> = complete
            .iter()
            .filter(|key| !plan.transactions.iter().any(|(k, _)| k == *key))
            .copied()
            .collect();
        if plan.transactions.is_empty() && plan.cursor == held && covered.is_empty() {
            return Merged {
                result: Ok(MergeOutcome {
                    cursor: held,
                    local_versions: None,
                    staged: self.staged_seqs(),
                }),
                notify: false,
                won: 0,
            };
        }
        // Staged changes join their transaction, ahead of the last part's.
        let transactions: Vec<((SiteId, DbVersion), Vec<Change>)> = plan
            .transactions
            .iter()
            .map(|(key, group)| (*key, group.iter().map(|c| (*c).clone()).collect()))
            .chain(covered.iter().map(|key| (*key, Vec::new())))
            .map(|(key, group)| {
                match complete
                    .contains(&key)
                    .then(|| self.staged.remove(&key))
                    .flatten()
                {
                    Some((_, mut earlier)) => {
                        earlier.extend(group);
                        (key, earlier)
                    }
                    None => (key, group),
                }
            })
            .collect();
        // Each origin transaction asks for a local version of its own.
        let base = self.counter;
        let mut pending = base;
        let mut won = 0;
        for (k, ((site, version), group)) in transactions.iter().enumerate() {
            let given = base + 1 + k as i64;
            for c in group {
                let Some(key) = CellKey::parse(&c.table, &c.pk, &c.cid) else {
                    continue;
                };
                let incoming = Version {
                    col_version: c.col_version,
                    val: c.val.clone(),
                    site: *site,
                };
                let wins = match self.cells.get(&key) {
                    None => true,
                    Some(cell) => cmp_versions(&incoming, &cell.version()) == Ordering::Greater,
                };
                if wins {
                    won += 1;
                    let local = (base + 1).max(pending).max(given);
                    pending = local;
                    self.cells.insert(
                        key,
                        Cell {
                            val: c.val.clone(),
                            col_version: c.col_version,
                            local,
                            site: *site,
                            origin: version.0,
                            cl: c.cl,
                            seq: c.seq,
                        },
                    );
                }
            }
        }
        self.counter = pending;
        // `rows_since(base)`: our own entry may claim the versions merged rows
        // hold, and the session learns which local versions came from this remote.
        let local_versions = (pending > base).then_some((base + 1, pending));
        if pending > base {
            self.own_version = self.own_version.max(pending);
        }
        for (site, version) in plan.cursor.iter() {
            if site != self.site {
                self.remote.advance(site, version);
            }
        }
        let cursor = self.cursor();
        // As the Store: an event for applied changes, and for a cursor that
        // moved without them (claims to pass on to the other remotes).
        let notify = !transactions.is_empty() || cursor != held;
        Merged {
            result: Ok(MergeOutcome {
                cursor,
                local_versions,
                staged: self.staged_seqs(),
            }),
            notify,
            won,
        }
    }

    /// A restart: `crsql_db_version()` is recomputed from the clock rows, and
    /// the Store's own entry starts from it (`Writer::open`).
    pub fn restart(&mut self) {
        self.counter = self.stored_version();
        self.own_version = self.counter;
    }

    /// `crsql_db_version()` on a read connection: cr-sqlite reads it from
    /// storage (the highest version in the clock tables), so versions that
    /// hold no row, which only the writer connection counts, are not in it.
    fn stored_version(&self) -> i64 {
        self.cells.values().map(|c| c.local).max().unwrap_or(0)
    }

    /// `reader.rs` `lowest_local_version`, over the origin records that clock
    /// rows still refer to.
    fn lowest_local_version(&self, receiver: &Cursor) -> i64 {
        let mut from = receiver.get(&self.site).0;
        for cell in self.cells.values() {
            if cell.site != self.site && cell.origin > receiver.get(&cell.site).0 {
                from = from.min(cell.local - 1);
            }
        }
        from.max(0)
    }

    /// `reader.rs` `read_snapshot`: every batch of the stream, with its `read_upto`.
    pub fn read(&self, receiver: &Cursor, hint: &ReadHint) -> VecDeque<(ChangeBatch, i64)> {
        // `sender_cursor`: the stored remote cursor and `crsql_db_version()`.
        let end = self.stored_version();
        let mut snapshot = self.remote.clone();
        snapshot.advance(self.site, DbVersion(end));
        let from = self.lowest_local_version(receiver).max(hint.after_local);
        let mut rows: Vec<(&CellKey, &Cell)> = self
            .cells
            .iter()
            .filter(|(_, c)| c.local > from && !hint.skips(c.local))
            .collect();
        rows.sort_by_key(|(_, c)| (c.local, c.seq));
        // `claim_limits_after`: the origin records of merged rows above `from`.
        let mut records: Vec<(i64, SiteId, DbVersion)> = self
            .cells
            .values()
            .filter(|c| c.local > from && c.site != self.site && !hint.skips(c.local))
            .map(|c| (c.local, c.site, DbVersion(c.origin)))
            .collect();
        records.sort();
        records.dedup();
        let limits = claim_limits(records, receiver);
        let mut builder = BatchBuilder::new(receiver.clone(), snapshot, self.max_changes)
            .with_claim_limits(limits)
            .with_staged(hint.staged.clone());
        let stamp = |mut batch: ChangeBatch| {
            batch.schema_version = Some(self.schema_version);
            batch
        };
        let mut out = VecDeque::new();
        let mut last_local = from;
        for (key, cell) in rows {
            let change = Change {
                table: key.table_name().into(),
                pk: key.packed_pk(),
                cid: key.cid().into(),
                val: cell.val.clone(),
                col_version: cell.col_version,
                db_version: DbVersion(cell.origin),
                site_id: cell.site,
                cl: cell.cl,
                seq: cell.seq,
            };
            let read_before = last_local;
            last_local = cell.local;
            let upto = if read_before < cell.local {
                read_before
            } else {
                cell.local - 1
            };
            if let Some(batch) = builder.push(change) {
                out.push_back((stamp(batch), upto));
            }
        }
        if let Some(batch) = builder.finish() {
            out.push_back((stamp(batch), end.max(last_local)));
        }
        out
    }
}
