//! A model of a v1 peer (the TypeScript `@app/sync` over better-sqlite3 and
//! cr-sqlite), which has none of crsync's extensions: no ranges, no acks, no
//! codes, no hello. As `node-server/tests/support/v1` (backed by real
//! cr-sqlite) found it behaves:
//!
//! - A received `data` message is one transaction of inserts into
//!   `crsql_changes` with the origin's `db_version`; cr-sqlite stores each
//!   winning row at the local version `max(db_version + 1, pending, given)`,
//!   so rows of other sites sit at the v1 peer's *local* versions, and its own
//!   versions have holes.
//! - Its cursor is `max(db_version)` per site of its rows (for other sites
//!   these are local versions, not theirs).
//! - On a `sync` it pages all rows `ORDER BY db_version, seq LIMIT/OFFSET`,
//!   keeps those with `db_version > cursor[site]`, one message per page (an
//!   all-filtered page is not sent), each page queried afresh (so a
//!   transaction may be split, and a concurrent merge can shift the pages),
//!   then sends `eose`.
//! - Live, it polls and sends rows above what it sent: a client its own rows,
//!   a server all rows (its own and those merged from any client, the sender
//!   included).
//! - Values follow JavaScript ([`js_json`], [`js_read`]).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crsync_peer::wire::{MessageKind, PeerChange, PeerMessage, PeerMessageKind, TransportMessage};
use crsync_peer::{Cursor, DbVersion, PackedPk, SiteId, SqlValue};

use super::values::{CellKey, Version, changes, cmp_versions, js_json, js_read};

/// One row of the v1 peer's `crsql_changes`.
#[derive(Debug, Clone)]
pub struct V1Cell {
    pub val: SqlValue,
    pub col_version: i64,
    /// The local version cr-sqlite stored it at (own rows: their version).
    pub db_version: i64,
    pub site: SiteId,
    pub cl: i64,
    pub seq: i64,
}

impl V1Cell {
    pub fn version(&self) -> Version {
        Version {
            col_version: self.col_version,
            val: self.val.clone(),
            site: self.site,
        }
    }
}

#[derive(Debug, Clone)]
pub struct V1Peer {
    pub site: SiteId,
    pub cells: BTreeMap<CellKey, V1Cell>,
    /// `crsql_db_version()`.
    pub counter: i64,
    /// The highest version it wrote itself.
    pub max_own: i64,
    pub page_size: usize,
    pub schema_version: i64,
}

impl V1Peer {
    pub fn new(site: SiteId, page_size: usize, schema_version: i64) -> Self {
        V1Peer {
            site,
            cells: BTreeMap::new(),
            counter: 0,
            max_own: 0,
            page_size,
            schema_version,
        }
    }

    /// `SELECT site_id, max(db_version) ... GROUP BY site_id`.
    pub fn cursor(&self) -> Cursor {
        self.cells
            .values()
            .map(|c| (c.site, DbVersion(c.db_version)))
            .collect()
    }

    pub fn write(&mut self, txn: &[(CellKey, SqlValue)]) -> Vec<(CellKey, Version)> {
        self.counter += 1;
        let local = self.counter;
        let mut created = Vec::new();
        for (key, val) in txn {
            let current = self.cells.get(key);
            if !changes(current.map(|c| &c.val), val) {
                continue;
            }
            let cell = V1Cell {
                val: val.clone(),
                col_version: current.map_or(1, |c| c.col_version + 1),
                db_version: local,
                site: self.site,
                cl: 1,
                seq: created.len() as i64,
            };
            created.push((*key, cell.version()));
            self.cells.insert(*key, cell);
        }
        if !created.is_empty() {
            self.max_own = local;
        }
        created
    }

    /// Merges one `data` message in one transaction. Returns how many changes won.
    pub fn merge(&mut self, data: &PeerMessage) -> usize {
        if data.schema_version.is_some_and(|v| v > self.schema_version) {
            return 0; // not applied (the v1 server answers 400)
        }
        let mut pending = self.counter;
        let mut won = 0;
        for change in &data.data {
            let Some((key, site)) = parse_change(change) else {
                continue;
            };
            let mut incoming = V1Cell {
                val: js_read(&change.val, key.affinity()),
                col_version: change.col_version,
                db_version: 0,
                site,
                cl: change.cl,
                seq: change.seq,
            };
            let wins = match self.cells.get(&key) {
                None => true,
                Some(cell) => {
                    cmp_versions(&incoming.version(), &cell.version()) == Ordering::Greater
                }
            };
            if wins {
                won += 1;
                pending = (self.counter + 1).max(pending).max(change.db_version);
                incoming.db_version = pending;
                self.cells.insert(key, incoming);
            }
        }
        self.counter = pending;
        won
    }

    fn encode(&self, key: &CellKey, cell: &V1Cell) -> PeerChange {
        PeerChange {
            table: key.table_name().into(),
            pk: hex::encode(key.packed_pk().0),
            cid: key.cid().into(),
            val: js_json(&cell.val),
            col_version: cell.col_version,
            db_version: cell.db_version,
            site_id: cell.site.to_hex(),
            cl: cell.cl,
            seq: cell.seq,
        }
    }

    /// Rows sorted as `ORDER BY db_version, seq` (ties in a fixed order).
    fn sorted(&self, keep: impl Fn(&V1Cell) -> bool) -> Vec<(&CellKey, &V1Cell)> {
        let mut rows: Vec<(&CellKey, &V1Cell)> =
            self.cells.iter().filter(|(_, c)| keep(c)).collect();
        rows.sort_by_key(|(k, c)| (c.db_version, c.seq, **k));
        rows
    }

    /// One page of a `sync` answer, on the rows as they are now: `ORDER BY
    /// db_version, seq LIMIT page_size OFFSET offset`, then the rows with
    /// `db_version > cursor[site]`. Also whether the page was full.
    pub fn page(&self, cursor: &Cursor, offset: usize) -> (Vec<PeerChange>, bool) {
        let page: Vec<(&CellKey, &V1Cell)> = self
            .sorted(|_| true)
            .into_iter()
            .skip(offset)
            .take(self.page_size)
            .collect();
        let full = page.len() == self.page_size;
        let kept = page
            .into_iter()
            .filter(|(_, c)| c.db_version > cursor.get(&c.site).0)
            .map(|(k, c)| self.encode(k, c))
            .collect();
        (kept, full)
    }

    /// What the live poll sends: rows above `after`, own ones only or all.
    pub fn live(&self, after: i64, own_only: bool) -> Vec<PeerChange> {
        self.sorted(|c| c.db_version > after && (!own_only || c.site == self.site))
            .into_iter()
            .map(|(k, c)| self.encode(k, c))
            .collect()
    }

    /// A `data` message as v1 builds it (no ranges).
    pub fn data(&self, changes: Vec<PeerChange>, eose: bool) -> TransportMessage {
        TransportMessage {
            data: Some(PeerMessage {
                encoded: None,
                kind: if eose {
                    PeerMessageKind::Eose
                } else {
                    PeerMessageKind::Changes
                },
                data: changes,
                schema_version: Some(self.schema_version),
                ranges: None,
                part: None,
            }),
            ..bare(MessageKind::Data, self.site)
        }
    }

    pub fn sync(&self) -> TransportMessage {
        TransportMessage {
            cursor: Some(self.cursor()),
            ..bare(MessageKind::Sync, self.site)
        }
    }

    pub fn connect(&self) -> TransportMessage {
        bare(MessageKind::Connect, self.site)
    }

    pub fn ping(&self) -> TransportMessage {
        bare(MessageKind::Ping, self.site)
    }
}

fn bare(kind: MessageKind, site: SiteId) -> TransportMessage {
    TransportMessage {
        kind,
        peer_id: site.to_hex(),
        cursor: None,
        data: None,
        error: None,
        code: None,
        crsync: None,
        ack: None,
        n: None,
        total: None,
    }
}

fn parse_change(c: &PeerChange) -> Option<(CellKey, SiteId)> {
    let pk = PackedPk(hex::decode(&c.pk).ok()?);
    let key = CellKey::parse(&c.table, &pk, &c.cid)?;
    let site: SiteId = c.site_id.parse().ok()?;
    Some((key, site))
}
