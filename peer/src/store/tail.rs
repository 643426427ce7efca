//! The live tail: the rows of the latest commits, read once by the writer
//! and shared by every session that is caught up.
//!
//! Without it, every session woken by a commit opened a change stream of its
//! own (a thread, a read connection, a read transaction, the cursor and
//! origin lookups) to read the same few rows again. The writer already reads
//! what each commit wrote (to tell which tables changed), so it keeps those
//! rows here, in commit order, up to a bound. A stream whose rows all lie in
//! the tail ([`LiveTail::stream`]) is built from memory, with the same batch
//! builder and the same claims as a stream read from the file, and costs no
//! SQLite work at all; one that starts before the tail reads from the file.
//!
//! The tail holds every row at the local versions `(base, head]` as
//! `crsql_changes` lists them: a row a later commit overwrote (the same
//! cell, or any cell of a row deleted since) is marked superseded and no
//! longer sent, as it is gone from `crsql_changes` too (a stream that began
//! before the overwrite then leaves the cell to the next stream, which
//! holds the new value). Commits the writer did not make itself (another
//! process on the file), or too large to keep, empty the tail: the next
//! streams read from the file.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use super::reader::covered_before;
use crate::proto::batch::ClaimLimits;
use crate::wire::{ChangeEncoder, Encoding, WireCache, change_json};
use crate::{
    BatchBuilder, BatchLimits, Change, ChangeBatch, Cursor, PackedPk, ReadHint, SENTINEL_CID,
    SiteId, SqlValue,
};

/// Commits kept at most.
pub const TAIL_MAX_COMMITS: usize = 65536;
/// Estimated memory of the rows kept at most (rows, their encodings and
/// their index entries).
pub const TAIL_MAX_BYTES: usize = 32 << 20;
/// A commit with more changes than this is not kept (it empties the tail).
pub const TAIL_MAX_COMMIT_CHANGES: usize = 8192;

/// One row of a commit: the change as sent (origin version) and the local
/// version it is stored at.
#[derive(Debug)]
pub(super) struct TailRow {
    pub(super) local: i64,
    pub(super) change: Change,
    /// Its estimated wire size ([`Change::approx_wire_size`]).
    wire_size: usize,
    /// A later commit overwrote this cell (or deleted its row).
    superseded: AtomicBool,
    /// Its wire JSON, per [`Encoding`], encoded by the first session that sends it.
    json: [OnceLock<Box<str>>; 2],
}

impl TailRow {
    fn live(&self) -> bool {
        !self.superseded.load(Ordering::Relaxed)
    }
}

/// Where the latest rows of one database row are in the tail: per column,
/// the commit (by sequence number) and the row's index in it.
type RowCells = Vec<(String, u64, usize)>;

/// The rows one commit wrote, in `(local version, seq)` order.
#[derive(Debug)]
pub(super) struct TailCommit {
    /// The local versions of the commit.
    first_local: i64,
    last_local: i64,
    rows: Vec<TailRow>,
    bytes: usize,
    /// A merge whose rows were not read (no session has wanted a merge's
    /// rows yet): a stream that needs them reads the file.
    unread: bool,
    /// Rows a merge wrote (read back for sessions that relay them).
    merge: bool,
    /// A stream was built from this commit's rows.
    served: AtomicBool,
}

#[derive(Debug)]
struct TailState {
    /// Every row at a local version in `(base, head]` is in `commits`.
    base: i64,
    head: i64,
    commits: VecDeque<Arc<TailCommit>>,
    /// Sequence number of the first of `commits`.
    first_seq: u64,
    /// The tail's rows of each database row, to mark what a commit overwrites.
    cells: HashMap<(String, PackedPk), RowCells>,
    bytes: usize,
    /// The sender's cursor at `head` (what a stream may claim).
    sender: Cursor,
    schema_version: i64,
    /// Merges read back in a row that left the tail before any stream used them.
    unserved_merges: u32,
}

/// The shared live tail of one Store (see the module docs).
#[derive(Debug)]
pub(super) struct LiveTail {
    state: RwLock<TailState>,
    /// Streams that found a merge's rows unread and needed them.
    needed_unread: AtomicU32,
    /// The JSON of the batches sent last, for every session that sends the
    /// same rows next (sessions at the same place get the same batches).
    sent: Arc<SentBatches>,
}

/// How many batches' JSON [`SentBatches`] keeps (each about a server batch,
/// 32 KiB by default).
const SENT_BATCHES_KEPT: usize = 16;

/// The wire JSON of recently sent batches, by encoding and by the rows they
/// carry, shared by every message that carries the same rows.
#[derive(Debug, Default)]
struct SentBatches(Mutex<VecDeque<SentBatch>>);

#[derive(Debug)]
struct SentBatch {
    encoding: Encoding,
    /// Per change, its commit (by first local version) and row index.
    rows: Box<[(i64, u32)]>,
    json: Arc<str>,
}

impl SentBatches {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<SentBatch>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(
        &self,
        encoding: Encoding,
        rows: impl ExactSizeIterator<Item = (i64, u32)> + Clone,
    ) -> Option<Arc<str>> {
        self.lock()
            .iter()
            .find(|b| {
                b.encoding == encoding
                    && b.rows.len() == rows.len()
                    && b.rows.iter().copied().eq(rows.clone())
            })
            .map(|b| Arc::clone(&b.json))
    }

    fn put(&self, encoding: Encoding, rows: Box<[(i64, u32)]>, json: Arc<str>) {
        let mut kept = self.lock();
        if kept.len() >= SENT_BATCHES_KEPT {
            kept.pop_front();
        }
        kept.push_back(SentBatch {
            encoding,
            rows,
            json,
        });
    }
}

/// After this many merges in a row whose rows were read but left the tail
/// unserved, merges are no longer read back (see [`TailState::evict_first`]).
const UNSERVED_MERGES_OFF: u32 = 8;

/// After this many streams needed a merge's unread rows, every merge's rows
/// are read into the tail (a few, since a session can ask before it has
/// recorded its own merge as one to leave out).
const WANTED_AFTER: u32 = 4;

/// Collects the rows of one commit; gives up (and keeps nothing) past
/// [`TAIL_MAX_COMMIT_CHANGES`].
#[derive(Debug, Default)]
pub(super) struct CommitRows {
    rows: Vec<TailRow>,
    bytes: usize,
    overflowed: bool,
    /// Not read: a merge at these local versions.
    unread: Option<(i64, i64)>,
    /// The rows a merge wrote, read back.
    merge: bool,
}

/// What a row costs the tail: the change and its strings, its wire JSON once
/// encoded, and its entry in the cell index (measured about
/// 700-800 bytes for a small change, whose wire estimate is about 200).
fn row_memory(wire_size: usize) -> usize {
    2 * wire_size + 400
}

impl CommitRows {
    /// A merge at local versions `first..=last` whose rows are not read
    /// (see [`LiveTail::wants_merged_rows`]).
    pub(super) fn unread(first: i64, last: i64) -> Self {
        CommitRows {
            unread: Some((first, last)),
            ..CommitRows::default()
        }
    }

    /// Marks the rows as a merge's, read back for the sessions that relay them.
    pub(super) fn merged(mut self) -> Self {
        self.merge = true;
        self
    }

    /// A commit not kept: it empties the tail.
    pub(super) fn too_large() -> Self {
        CommitRows {
            overflowed: true,
            ..CommitRows::default()
        }
    }

    /// Adds a row, unless the commit is already too large to keep.
    pub(super) fn push(&mut self, local: i64, change: Change) {
        if self.overflowed {
            return;
        }
        if self.rows.len() >= TAIL_MAX_COMMIT_CHANGES {
            self.overflowed = true;
            self.rows = Vec::new();
            self.bytes = 0;
            return;
        }
        let wire_size = change.approx_wire_size();
        self.bytes += row_memory(wire_size);
        self.rows.push(TailRow {
            local,
            change,
            wire_size,
            superseded: AtomicBool::new(false),
            json: Default::default(),
        });
    }
}

impl LiveTail {
    /// A tail that serves nothing until the writer's first
    /// [`append`](Self::append) tells it where it starts.
    pub(super) fn new() -> Self {
        LiveTail {
            state: RwLock::new(TailState {
                base: i64::MAX,
                head: 0,
                commits: VecDeque::new(),
                first_seq: 0,
                cells: HashMap::new(),
                bytes: 0,
                sender: Cursor::new(),
                schema_version: 0,
                unserved_merges: 0,
            }),
            needed_unread: AtomicU32::new(0),
            sent: Arc::default(),
        }
    }

    /// Whether a merge's rows should be read into the tail: some session
    /// relays merges (a server, a device with several remotes). A replica
    /// whose only remote is where its merges come from never reads them back.
    pub(super) fn wants_merged_rows(&self) -> bool {
        self.needed_unread.load(Ordering::Relaxed) >= WANTED_AFTER
    }

    /// Merges' rows are wanted (see [`Store::expect_relaying`](super::Store::expect_relaying)).
    pub(super) fn expect_relaying(&self) {
        self.needed_unread
            .fetch_max(WANTED_AFTER, Ordering::Relaxed);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, TailState> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, TailState> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a commit of the writer: `rows` are every row at local
    /// versions above the previous head up to `head`; `sender` and
    /// `schema_version` are the Store's at `head`.
    pub(super) fn append(&self, rows: CommitRows, head: i64, sender: Cursor, schema_version: i64) {
        let mut state = self.write();
        state.sender = sender;
        state.schema_version = schema_version;
        if rows.overflowed || state.base > state.head {
            state.clear(head);
            return;
        }
        if head <= state.head && rows.rows.is_empty() {
            return; // only the cursor moved (a claim merged)
        }
        state.head = state.head.max(head);
        if let Some((first_local, last_local)) = rows.unread {
            let commit = TailCommit {
                first_local,
                last_local,
                rows: Vec::new(),
                bytes: 0,
                unread: true,
                merge: true,
                served: AtomicBool::new(false),
            };
            state.commits.push_back(Arc::new(commit));
            while state.commits.len() > TAIL_MAX_COMMITS {
                state.evict_first();
            }
            return;
        }
        if rows.rows.is_empty() {
            return;
        }
        let first_local = rows.rows.first().map_or(head, |r| r.local);
        let last_local = rows.rows.last().map_or(head, |r| r.local);
        state.bytes += rows.bytes;
        let commit = Arc::new(TailCommit {
            first_local,
            last_local,
            rows: rows.rows,
            bytes: rows.bytes,
            unread: false,
            merge: rows.merge,
            served: AtomicBool::new(false),
        });
        let seq = state.first_seq + state.commits.len() as u64;
        state.supersede(&commit, seq);
        state.commits.push_back(commit);
        while state.commits.len() > TAIL_MAX_COMMITS || state.bytes > TAIL_MAX_BYTES {
            state.evict_first();
        }
        if state.unserved_merges >= UNSERVED_MERGES_OFF {
            // Whoever wanted merges' rows (a session catching up from the
            // file, say, during an initial sync) no longer reads them from
            // here: stop reading them back until streams need them again.
            state.unserved_merges = 0;
            self.needed_unread.store(0, Ordering::Relaxed);
        }
    }

    /// Forgets every commit, and where it stands: every stream reads the
    /// file until the next commit.
    pub(super) fn clear_all(&self) {
        let mut state = self.write();
        let head = state.head;
        state.clear(head);
        state.base = i64::MAX;
    }

    /// A stream of what a receiver at `receiver` lacks above local version
    /// `hint.after_local`, if the tail holds all of it; `None` otherwise
    /// (read from the file). Counting ([`ReadHint::count`]) is the file's job.
    pub(super) fn stream(
        self: &Arc<Self>,
        own_site: SiteId,
        receiver: &Cursor,
        hint: &ReadHint,
        limits: BatchLimits,
    ) -> Option<TailStream> {
        if hint.count {
            return None;
        }
        let state = self.read();
        let after = hint.after_local;
        if after < state.base {
            return None;
        }
        let first = state.commits.partition_point(|c| c.last_local <= after);
        let commits: Arc<[Arc<TailCommit>]> = state.commits.range(first..).cloned().collect();
        let needs_unread = commits.iter().any(|c| {
            c.unread && (c.first_local.max(after + 1)..=c.last_local).any(|v| !hint.skips(v))
        });
        if needs_unread {
            self.needed_unread.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let end = state.head.max(after);
        let sender = state.sender.clone();
        let schema_version = state.schema_version;
        drop(state);
        let mut claims = ClaimLimits::new(receiver.clone());
        for commit in commits.iter() {
            let mut sends = false;
            let rows = commit.rows.iter();
            for row in rows.filter(|r| r.local > after && !hint.skips(r.local) && r.live()) {
                sends = true;
                if row.change.site_id != own_site {
                    claims.note(row.local, row.change.site_id, row.change.db_version);
                }
            }
            if sends && commit.merge && !commit.served.load(Ordering::Relaxed) {
                commit.served.store(true, Ordering::Relaxed);
            }
        }
        let builder = BatchBuilder::new(receiver.clone(), sender.clone(), limits.max_changes)
            .with_max_bytes(limits.max_bytes)
            .with_claim_limits(claims.finish())
            .with_staged(hint.staged.clone());
        Some(TailStream {
            commits,
            at: (0, 0),
            after,
            hint: hint.clone(),
            last_local: after,
            end,
            schema_version,
            builder: Some(builder),
            snapshot: sender,
            sent: Arc::clone(&self.sent),
        })
    }
}

impl TailState {
    fn clear(&mut self, head: i64) {
        self.first_seq += self.commits.len() as u64;
        self.commits.clear();
        self.cells.clear();
        self.bytes = 0;
        self.head = self.head.max(head);
        self.base = self.head;
    }

    /// Marks the rows `commit` (number `seq`) overwrites, and indexes its own.
    fn supersede(&mut self, commit: &TailCommit, seq: u64) {
        for (index, row) in commit.rows.iter().enumerate() {
            let c = &row.change;
            let cells = self
                .cells
                .entry((c.table.clone(), c.pk.clone()))
                .or_default();
            // A deleted row (an even causal length) keeps only its marker.
            let deletes = c.cid == SENTINEL_CID && c.cl % 2 == 0;
            let first_seq = self.first_seq;
            let commits = &self.commits;
            cells.retain(|(cid, at, i)| {
                let overwritten = deletes || *cid == c.cid;
                if overwritten {
                    let old = if *at == seq {
                        commit.rows.get(*i)
                    } else {
                        commits
                            .get((*at - first_seq) as usize)
                            .and_then(|old| old.rows.get(*i))
                    };
                    if let Some(old) = old {
                        old.superseded.store(true, Ordering::Relaxed);
                    }
                }
                !overwritten
            });
            cells.push((c.cid.clone(), seq, index));
        }
    }

    /// Drops the oldest commit; its rows leave the index. Counts it in
    /// `unserved_merges` if it was a merge whose rows were read back and no
    /// stream used; a commit a stream used resets the count.
    fn evict_first(&mut self) {
        let Some(old) = self.commits.pop_front() else {
            return;
        };
        if old.served.load(Ordering::Relaxed) {
            self.unserved_merges = 0;
        } else if old.merge && !old.unread {
            self.unserved_merges += 1;
        }
        let seq = self.first_seq;
        self.first_seq += 1;
        self.bytes -= old.bytes;
        self.base = old.last_local;
        for row in &old.rows {
            let key = (row.change.table.clone(), row.change.pk.clone());
            if let Some(cells) = self.cells.get_mut(&key) {
                cells.retain(|(_, at, _)| *at != seq);
                if cells.is_empty() {
                    self.cells.remove(&key);
                }
            }
        }
    }
}

/// A change stream built from the tail: the batches a read of the file at
/// the tail's head would give.
#[derive(Debug)]
pub(super) struct TailStream {
    commits: Arc<[Arc<TailCommit>]>,
    /// The next row: commit index, row index.
    at: (usize, usize),
    after: i64,
    hint: ReadHint,
    last_local: i64,
    end: i64,
    schema_version: i64,
    /// `None` once the last batch was returned.
    builder: Option<BatchBuilder>,
    snapshot: Cursor,
    sent: Arc<SentBatches>,
}

impl TailStream {
    /// The sender's cursor the stream claims from.
    pub(super) fn snapshot(&self) -> &Cursor {
        &self.snapshot
    }

    /// The next batch and the local version it covers (as the file reader's).
    ///
    /// With `to_send`, the batch's changes are stand-ins that hold only what
    /// a sender reads of them (origin site, version, `seq`, clocks; no
    /// table, key, column or value), and their wire JSON comes from the
    /// batch's encoder: what a session sends costs no copy of any change.
    /// Without it they are the changes themselves.
    pub(super) fn next_batch(&mut self, to_send: bool) -> Option<(ChangeBatch, i64)> {
        let builder = self.builder.as_mut()?;
        while let Some(commit) = self.commits.get(self.at.0) {
            let Some(row) = commit.rows.get(self.at.1) else {
                self.at = (self.at.0 + 1, 0);
                continue;
            };
            let position = pack_position(self.at);
            self.at.1 += 1;
            if row.local <= self.after || self.hint.skips(row.local) || !row.live() {
                continue;
            }
            // As the file reader counts it.
            let upto = covered_before(self.last_local, row.local);
            self.last_local = row.local;
            // The builder reads only the origin, `seq` and size; the row's
            // position travels in `col_version` until the batch is sealed.
            let stand_in = Change {
                table: String::new(),
                pk: PackedPk(Vec::new()),
                cid: String::new(),
                val: SqlValue::Null,
                col_version: position,
                db_version: row.change.db_version,
                site_id: row.change.site_id,
                cl: row.change.cl,
                seq: row.change.seq,
            };
            if let Some(batch) = builder.push_sized(stand_in, row.wire_size) {
                return Some((self.seal(batch, to_send), upto));
            }
        }
        let last = self.builder.take()?.finish()?;
        let upto = self.end.max(self.last_local);
        Some((self.seal(last, to_send), upto))
    }

    /// Turns the builder's stand-ins into the batch's changes (see
    /// [`next_batch`](Self::next_batch)), and gives it its encoder.
    fn seal(&self, mut batch: ChangeBatch, to_send: bool) -> ChangeBatch {
        let mut positions = Vec::with_capacity(batch.changes.len());
        for change in &mut batch.changes {
            let at = unpack_position(change.col_version);
            let row = &self.commits[at.0].rows[at.1];
            if to_send {
                change.col_version = row.change.col_version;
            } else {
                *change = row.change.clone();
            }
            positions.push(at);
        }
        batch.schema_version = Some(self.schema_version);
        batch.wire = WireCache::new(Arc::new(TailBatchWire {
            commits: self.commits.clone(),
            positions,
            sent: Arc::clone(&self.sent),
        }));
        batch
    }
}

/// A row's place in a stream (commit index, row index) as a stand-in's
/// `col_version` carries it through the batch builder.
fn pack_position((commit, row): (usize, usize)) -> i64 {
    (commit as i64) << 32 | row as i64
}

fn unpack_position(position: i64) -> (usize, usize) {
    ((position >> 32) as usize, (position & 0xffff_ffff) as usize)
}

/// The encoder of a batch from the tail: where its changes are among the
/// stream's rows, each row's JSON encoded once for every session.
struct TailBatchWire {
    commits: Arc<[Arc<TailCommit>]>,
    /// Per change of the batch, its commit and row index.
    positions: Vec<(usize, usize)>,
    sent: Arc<SentBatches>,
}

impl TailBatchWire {
    fn row(&self, at: (usize, usize)) -> &TailRow {
        &self.commits[at.0].rows[at.1]
    }

    /// The row's wire JSON, encoded the first time any session needs it.
    fn row_json(&self, at: (usize, usize), encoding: Encoding) -> &str {
        let slot = match encoding {
            Encoding::V1 => 0,
            Encoding::Lossless => 1,
        };
        let row = self.row(at);
        row.json[slot].get_or_init(|| change_json(&row.change, encoding).into_boxed_str())
    }

    /// The batch's rows as [`SentBatches`] knows them: per change, its
    /// commit (by first local version) and row index.
    fn sent_key(&self) -> impl ExactSizeIterator<Item = (i64, u32)> + Clone + '_ {
        (self.positions.iter()).map(|&(commit, row)| (self.commits[commit].first_local, row as u32))
    }
}

impl ChangeEncoder for TailBatchWire {
    /// The JSON another session's message with the same rows already has,
    /// if the batch still holds exactly its rows, in order; else encoded
    /// (and kept for the next session).
    fn encode(&self, changes: &[Change], encoding: Encoding) -> Arc<str> {
        let unedited = changes.len() == self.positions.len()
            && changes
                .iter()
                .zip(&self.positions)
                .all(|(change, at)| same_write(&self.row(*at).change, change));
        let mut json = String::new();
        if !unedited {
            json.reserve(changes.len() * 160);
            self.write_json(changes, encoding, &mut json);
            return json.into();
        }
        if let Some(json) = self.sent.get(encoding, self.sent_key()) {
            return json; // no allocation for a batch already sent
        }
        // Sized exactly: growing it would copy it again.
        let commas = self.positions.len().saturating_sub(1);
        let rows = self
            .positions
            .iter()
            .map(|&at| self.row_json(at, encoding).len());
        json.reserve_exact(rows.sum::<usize>() + commas);
        for (i, &at) in self.positions.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(self.row_json(at, encoding));
        }
        let json: Arc<str> = json.into();
        self.sent
            .put(encoding, self.sent_key().collect(), Arc::clone(&json));
        json
    }

    /// Each change's JSON as kept with its row. Changes are matched to the
    /// rows by origin, in order: a change not among them (the batch was
    /// edited since) is encoded from itself.
    fn write_json(&self, changes: &[Change], encoding: Encoding, out: &mut String) {
        let mut next = 0;
        for (i, change) in changes.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let n = self.positions.len();
            let found = (0..n)
                .map(|k| (next + k) % n)
                .find(|&k| same_write(&self.row(self.positions[k]).change, change));
            match found {
                Some(k) => {
                    next = k + 1;
                    out.push_str(self.row_json(self.positions[k], encoding));
                }
                None => out.push_str(&change_json(change, encoding)),
            }
        }
    }
}

/// Whether `change` (the change or its stand-in) is the write of `row`: the
/// same origin (site, version, `seq`) and clocks.
fn same_write(row: &Change, change: &Change) -> bool {
    row.seq == change.seq
        && row.db_version == change.db_version
        && row.col_version == change.col_version
        && row.cl == change.cl
        && row.site_id == change.site_id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DbVersion, SqlValue};

    fn site(n: u8) -> SiteId {
        SiteId::from_slice(&[n; 16]).expect("site")
    }

    /// A merge of `n` rows from site 2, at local versions from `local`.
    fn merge(local: i64, n: usize) -> CommitRows {
        let mut rows = CommitRows::default();
        for i in 0..n as i64 {
            rows.push(
                local + i,
                Change {
                    table: "t".into(),
                    pk: PackedPk::pack(&[SqlValue::Integer(local + i)]),
                    cid: "x".into(),
                    val: SqlValue::Text(vec![b'v'; 1000]),
                    col_version: 1,
                    db_version: DbVersion(local + i),
                    site_id: site(2),
                    cl: 1,
                    seq: 0,
                },
            );
        }
        rows.merged()
    }

    /// Appends merges of 100 rows until one pushed an older one out.
    fn fill(tail: &Arc<LiveTail>, head: &mut i64, commits: usize) {
        for _ in 0..commits {
            tail.append(merge(*head + 1, 100), *head + 100, Cursor::new(), 0);
            *head += 100;
        }
    }

    fn wanted(tail: &LiveTail) {
        tail.needed_unread.store(WANTED_AFTER, Ordering::Relaxed);
    }

    #[test]
    fn a_peer_that_expects_to_relay_has_merges_read_back_from_the_first() {
        let tail = Arc::new(LiveTail::new());
        tail.append(CommitRows::default(), 0, Cursor::new(), 0);
        assert!(!tail.wants_merged_rows(), "one remote: merges stay unread");
        tail.expect_relaying();
        assert!(tail.wants_merged_rows());
        // Saying it again does not stack up: unused, it still turns off.
        tail.expect_relaying();
        let mut head = 0;
        while tail.read().base == 0 {
            fill(&tail, &mut head, 1);
        }
        fill(&tail, &mut head, UNSERVED_MERGES_OFF as usize);
        assert!(!tail.wants_merged_rows());
    }

    #[test]
    fn merges_stop_being_read_back_when_they_leave_the_tail_unused() {
        let tail = Arc::new(LiveTail::new());
        tail.append(CommitRows::default(), 0, Cursor::new(), 0);
        wanted(&tail);
        let mut head = 0;
        while tail.read().base == 0 {
            fill(&tail, &mut head, 1);
        }
        assert!(tail.wants_merged_rows(), "one merge left unused");
        fill(&tail, &mut head, UNSERVED_MERGES_OFF as usize);
        assert!(
            !tail.wants_merged_rows(),
            "merges that left unserved turn the read-back off"
        );
        // A stream that needs merged rows again turns it back on.
        for _ in 0..WANTED_AFTER {
            tail.append(
                CommitRows::unread(head + 1, head + 1),
                head + 1,
                Cursor::new(),
                0,
            );
            head += 1;
            let hint = ReadHint {
                after_local: head - 1,
                ..ReadHint::default()
            };
            let stream = tail.stream(site(1), &Cursor::new(), &hint, BatchLimits::default());
            assert!(stream.is_none(), "unread: from the file");
        }
        assert!(tail.wants_merged_rows());
    }

    #[test]
    fn merges_a_stream_uses_keep_being_read_back() {
        let tail = Arc::new(LiveTail::new());
        tail.append(CommitRows::default(), 0, Cursor::new(), 0);
        wanted(&tail);
        let mut head = 0;
        for _ in 0..400 {
            fill(&tail, &mut head, 1);
            // A caught-up receiver reads each new commit from the tail.
            let hint = ReadHint {
                after_local: head - 100,
                ..ReadHint::default()
            };
            let stream = tail.stream(site(1), &Cursor::new(), &hint, BatchLimits::default());
            assert!(stream.is_some(), "in the tail");
        }
        assert!(tail.wants_merged_rows());
    }
}
