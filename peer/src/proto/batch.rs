//! Batches of changes and the pure rules for building and accepting them.
//!
//! A [`ChangeBatch`] carries changes plus, per origin site, a [`VersionRange`]:
//! the sender's claim that the receiver, once it has applied this batch, holds
//! every change of that site in `(after, upto]`. The claim is what lets a
//! cursor advance past versions that have no surviving rows (overwritten cells
//! vanish from `crsql_changes`, and every merge uses up a local version, so a
//! site's own versions have holes), and what lets a receiver notice a gap
//! instead of silently skipping changes.
//!
//! A change outside every range is **unranged**: the receiver applies it
//! (unless its cursor already holds that version) but its cursor does not
//! move. That is how changes travel that nobody can vouch for yet: everything
//! from a v1 peer (which sends no ranges, and whose batches may split a
//! transaction), and changes a sender holds beyond its own cursor.
//!
//! An origin transaction too large for one batch travels in **parts**
//! ([`TxnPart`]): batches of that transaction alone, each naming the span of
//! its `seq` numbers it completes. The receiver stages parts durably and
//! applies the whole transaction at once when the last part arrives (or when a
//! range claims the transaction, see [`check_part`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::{Change, Cursor, DbVersion, SiteId};

/// Default soft limit on changes per batch.
pub const DEFAULT_MAX_BATCH_CHANGES: usize = 1024;
/// Default soft limit on a batch's estimated wire size (below common body limits).
pub const DEFAULT_MAX_BATCH_BYTES: usize = 4 << 20;
/// A transaction alone in a batch goes in parts once it reaches this many
/// times the change limit (or the byte limit at once).
pub const PART_CHANGES_FACTOR: usize = 4;

/// Soft limits on one batch: it is closed at the first transaction boundary past either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Changes per batch.
    pub max_changes: usize,
    /// Estimated wire bytes per batch.
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_changes: DEFAULT_MAX_BATCH_CHANGES,
            max_bytes: DEFAULT_MAX_BATCH_BYTES,
        }
    }
}

/// Origin versions `(after, upto]` of one site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionRange {
    /// Exclusive lower bound: the receiver must already hold everything up to here.
    pub after: DbVersion,
    /// Inclusive upper bound: held after this batch.
    pub upto: DbVersion,
}

impl VersionRange {
    /// Whether `version` lies in `(after, upto]`.
    pub fn contains(&self, version: DbVersion) -> bool {
        self.after < version && version <= self.upto
    }
}

/// What a stream for one receiver may leave out, by the sender's local versions.
///
/// ```
/// use crsync_peer::ReadHint;
/// let mut hint = ReadHint { after_local: 4, ..ReadHint::default() };
/// hint.skip(7, 9);
/// hint.skip(10, 12); // coalesced with 7..=9
/// assert!(hint.skips(3) && hint.skips(8) && hint.skips(12));
/// assert!(!hint.skips(5) && !hint.skips(13));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadHint {
    /// Rows at local versions up to here were already sent to this receiver.
    pub after_local: i64,
    /// Inclusive spans of local versions whose rows came from this receiver
    /// (its merges): it holds them, so they are never sent back. Sorted, disjoint.
    pub skip_local: Vec<(i64, i64)>,
    /// Transactions the receiver has staged in part, by origin, with the
    /// highest `seq` it holds of each: their rows up to it are left out and
    /// the rest goes as parts that continue from there.
    pub staged: BTreeMap<(SiteId, DbVersion), i64>,
    /// Count the changes the stream may hold before it starts
    /// ([`ChangeStream::total`](crate::ChangeStream::total)), for an initial
    /// sync's progress.
    pub count: bool,
}

/// Spans kept in a [`ReadHint`]; older ones are forgotten (their rows may be sent once more).
const MAX_SKIP_SPANS: usize = 64;

impl ReadHint {
    /// Whether rows at `local` may be left out.
    pub fn skips(&self, local: i64) -> bool {
        local <= self.after_local
            || self
                .skip_local
                .binary_search_by(|(lo, hi)| {
                    if *hi < local {
                        std::cmp::Ordering::Less
                    } else if *lo > local {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Equal
                    }
                })
                .is_ok()
    }

    /// Adds the span `first..=last` (local versions only grow, so spans arrive in order).
    pub fn skip(&mut self, first: i64, last: i64) {
        if last < first || last <= self.after_local {
            return;
        }
        match self.skip_local.last_mut() {
            Some((_, hi)) if *hi + 1 >= first => *hi = (*hi).max(last),
            _ => self.skip_local.push((first, last)),
        }
        if self.skip_local.len() > MAX_SKIP_SPANS {
            self.skip_local.remove(0);
        }
    }

    /// Raises `after_local`, dropping the spans it covers.
    pub fn delivered(&mut self, upto: i64) {
        self.after_local = self.after_local.max(upto);
        let after = self.after_local;
        self.skip_local.retain(|(_, hi)| *hi > after);
    }
}

/// Changes and the version ranges they complete.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChangeBatch {
    /// Changes; those inside a range come as whole origin transactions.
    pub changes: Vec<Change>,
    /// Per origin site, what this batch completes.
    pub ranges: BTreeMap<SiteId, VersionRange>,
    /// The sender's schema version (`PRAGMA user_version`) when it read these
    /// changes; a receiver with an older schema refuses the batch.
    pub schema_version: Option<i64>,
    /// The values were written by a JavaScript (v1) peer: numbers follow
    /// JavaScript, so the receiver reads them by each column's declared type
    /// (a `1` for a REAL column is the REAL `1.0`), and an invalid change is
    /// skipped rather than refusing the batch.
    pub javascript: bool,
    /// The batch is one part of an origin transaction too large for one
    /// batch: it holds only that transaction's changes.
    pub part: Option<TxnPart>,
    /// Where its changes' wire JSON is kept, if they came from the Store's
    /// live tail (encoded once for every session). Not part of equality.
    #[serde(skip)]
    pub wire: crate::wire::WireCache,
}

/// One part of an origin transaction sent over several batches.
///
/// The part holds every change of the transaction the sender has with a
/// `seq` in `(after_seq, upto_seq]` (cr-sqlite numbers a transaction's
/// changes from 0, and keeps the numbers when it merges them). The receiver
/// stages parts until the last (`more == false`), then applies the
/// transaction whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TxnPart {
    /// The transaction's origin site.
    pub site: SiteId,
    /// Its origin version.
    pub version: DbVersion,
    /// The receiver must already hold (staged) the changes up to this `seq`;
    /// `-1` for the first part.
    pub after_seq: i64,
    /// The highest `seq` in this part.
    pub upto_seq: i64,
    /// Further parts follow.
    pub more: bool,
}

impl TxnPart {
    /// The transaction this is a part of.
    pub fn origin(&self) -> (SiteId, DbVersion) {
        (self.site, self.version)
    }
}

/// What a receiver does with a part ([`check_part`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartAction {
    /// The receiver holds the transaction already: nothing to stage or apply.
    Held,
    /// Stage the part's changes; the staged `seq` becomes `upto`.
    Stage {
        /// The receiver's staged `seq` afterwards.
        upto: i64,
    },
    /// The last part: apply what is staged with this part's changes.
    Complete,
}

/// Checks `batch`'s part (if any) against what the receiver holds and has
/// staged of that transaction (`staged`: the highest staged `seq`).
///
/// A part that starts past what is staged would leave a hole in the
/// transaction (an earlier part was lost or refused): it is refused as a
/// gap. Parts already staged may come again (a resumed or second sender).
///
/// ```
/// use crsync_peer::{Cursor, DbVersion, SiteId, ChangeBatch, proto::batch::{check_part, PartAction, TxnPart}};
/// let site = SiteId::from_bytes([1; 16]);
/// let part = |after_seq, upto_seq, more| ChangeBatch {
///     part: Some(TxnPart { site, version: DbVersion(3), after_seq, upto_seq, more }),
///     ..ChangeBatch::default()
/// };
/// let held = Cursor::new();
/// assert_eq!(check_part(&part(-1, 99, true), &held, None), Ok(Some(PartAction::Stage { upto: 99 })));
/// assert!(check_part(&part(199, 299, true), &held, Some(99)).is_err()); // (99, 199] is missing
/// assert_eq!(check_part(&part(99, 150, false), &held, Some(99)), Ok(Some(PartAction::Complete)));
/// ```
pub fn check_part(
    batch: &ChangeBatch,
    held: &Cursor,
    staged: Option<i64>,
) -> Result<Option<PartAction>, BatchRejection> {
    let Some(part) = batch.part else {
        return Ok(None);
    };
    let bad = |reason: &str| BatchRejection::BadPart {
        site: part.site,
        version: part.version,
        reason: reason.to_string(),
    };
    if part.after_seq < -1 || part.upto_seq < part.after_seq {
        return Err(bad("its seq span is reversed"));
    }
    if batch.changes.iter().any(|c| c.origin() != part.origin()) {
        return Err(bad("it holds changes of another transaction"));
    }
    if part.more && !batch.ranges.is_empty() {
        return Err(bad("only the last part may carry ranges"));
    }
    if held.holds(&part.site, part.version) {
        return Ok(Some(PartAction::Held));
    }
    let have = staged.unwrap_or(-1);
    if part.after_seq > have {
        return Err(BatchRejection::PartGap {
            site: part.site,
            version: part.version,
            staged: have,
            after: part.after_seq,
        });
    }
    Ok(Some(if part.more {
        PartAction::Stage {
            upto: have.max(part.upto_seq),
        }
    } else {
        PartAction::Complete
    }))
}

impl ChangeBatch {
    /// Whether the batch carries neither changes nor ranges.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.ranges.is_empty()
    }

    /// The receiver's cursor after applying this batch on top of `cursor`.
    pub fn cursor_after(&self, cursor: &Cursor) -> Cursor {
        let mut next = cursor.clone();
        for (site, range) in &self.ranges {
            next.advance(*site, range.upto);
        }
        next
    }
}

/// Of the transactions staged in parts (`staged`), those that `batch`,
/// merged by `plan`, completes: the one it is the last part of, and those its
/// ranges claim (none of their changes need come with it: their last rows may
/// have been overwritten at the sender, or the receiver staged them all).
/// Changes of a staged transaction that come another way (unranged, from a
/// v1 peer) leave it staged.
pub fn completed_by<'a>(
    staged: impl IntoIterator<Item = &'a (SiteId, DbVersion)>,
    batch: &ChangeBatch,
    plan: &MergePlan<'_>,
) -> BTreeSet<(SiteId, DbVersion)> {
    let last_part = batch.part.filter(|p| !p.more).map(|p| p.origin());
    staged
        .into_iter()
        .filter(|key| Some(**key) == last_part || plan.cursor.holds(&key.0, key.1))
        .copied()
        .collect()
}

/// Builds the batches that bring a receiver from its cursor up to the sender's.
///
/// Feed it the sender's changes in the order the sender committed them
/// locally (a transaction's changes by `seq`); it drops what the receiver
/// holds and cuts batches at transaction boundaries once a batch reaches
/// `max_changes` changes or `max_bytes` of estimated wire size. An origin
/// transaction larger than that goes in [parts](TxnPart) of about that size,
/// each a batch of its own.
///
/// Ranges never claim past `sender`, the sender's own cursor: a change beyond
/// it (one the sender holds without proof that it holds everything before it)
/// travels unranged. Where a site's origin versions do not ascend in local
/// order, batches before the last claim that site only up to its
/// [claim limit](Self::with_claim_limits).
///
/// ```
/// use crsync_peer::{BatchBuilder, Change, Cursor, DbVersion, PackedPk, SiteId, SqlValue};
/// let site = SiteId::from_bytes([1; 16]);
/// let change = |v| Change {
///     table: "t".into(), pk: PackedPk::pack(&[SqlValue::Integer(v)]), cid: "x".into(),
///     val: SqlValue::Null, col_version: 1, db_version: DbVersion(v), site_id: site, cl: 1, seq: 0,
/// };
/// let sender: Cursor = [(site, DbVersion(5))].into_iter().collect();
/// let mut builder = BatchBuilder::new(Cursor::new(), sender.clone(), 1);
/// assert!(builder.push(change(1)).is_none());
/// let first = builder.push(change(2)).unwrap(); // a new transaction closes the full batch
/// assert_eq!(first.changes.len(), 1);
/// let last = builder.finish().unwrap();
/// assert_eq!(last.ranges[&site].upto, DbVersion(5));
/// ```
#[derive(Debug)]
pub struct BatchBuilder {
    /// Per site, the version the next range starts after.
    sent: Cursor,
    /// What the sender can vouch for.
    sender: Cursor,
    max_changes: usize,
    max_bytes: usize,
    current_bytes: usize,
    current: ChangeBatch,
    current_txn: Option<(SiteId, DbVersion)>,
    /// Per site, the most a batch before the last may claim.
    limits: BTreeMap<SiteId, DbVersion>,
    /// Sites with changes above their limit, unranged, in the batch in
    /// progress, and in batches already sealed.
    unclaimed: (BTreeSet<SiteId>, BTreeSet<SiteId>),
    /// Where the transaction in progress began in `current`: the index of
    /// its first change, the batch's size before it, and its site's range
    /// before it (to cut the batch in front of it).
    txn_start: (usize, usize, Option<VersionRange>),
    /// The transaction in progress goes in parts: the `seq` the next part
    /// continues after.
    part_after: Option<i64>,
    /// The transaction in progress is one this stream claims.
    txn_claimable: bool,
    /// What the receiver staged (see [`ReadHint::staged`]).
    staged: BTreeMap<(SiteId, DbVersion), i64>,
    /// The estimated wire size of each change in `current`.
    sizes: Vec<usize>,
}

impl BatchBuilder {
    /// Starts from the receiver's cursor; `sender` is the sender's own cursor.
    pub fn new(receiver: Cursor, sender: Cursor, max_changes: usize) -> Self {
        Self {
            sent: receiver,
            sender,
            max_changes: max_changes.max(1),
            max_bytes: DEFAULT_MAX_BATCH_BYTES,
            current_bytes: 0,
            current: ChangeBatch::default(),
            current_txn: None,
            limits: BTreeMap::new(),
            unclaimed: (BTreeSet::new(), BTreeSet::new()),
            txn_start: (0, 0, None),
            part_after: None,
            txn_claimable: false,
            staged: BTreeMap::new(),
            sizes: Vec::new(),
        }
    }

    /// What the receiver has staged of transactions in parts: their changes
    /// up to the staged `seq` are left out, and the rest goes as parts that
    /// continue from there.
    pub fn with_staged(mut self, staged: BTreeMap<(SiteId, DbVersion), i64>) -> Self {
        self.staged = staged;
        self
    }

    /// Limits what batches claim of a site (see [`claim_limits`]): changes of
    /// that site above its limit travel unranged, and only the last batch
    /// ([`finish`](Self::finish)) claims past the limit, and only if every
    /// such change is in it. A claim past the limit in the last batch would
    /// otherwise cover changes of an earlier batch that the receiver may have
    /// refused (no range ties them to the chain of ranges that makes a
    /// refused batch a gap for every later one); the receiver then gets them
    /// again, unclaimed, from its next stream.
    pub fn with_claim_limits(mut self, limits: BTreeMap<SiteId, DbVersion>) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the soft limit on a batch's estimated wire size.
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes.max(1);
        self
    }

    /// Adds one change; returns a finished batch: the batch in progress
    /// when this change opens a new transaction and the batch is full, or
    /// when it continues a transaction that fills a batch alone (a part).
    pub fn push(&mut self, change: Change) -> Option<ChangeBatch> {
        let size = change.approx_wire_size();
        self.push_sized(change, size)
    }

    /// As [`push`](Self::push), with the change's estimated wire size given
    /// (for a sender that knows it, or that pushes a stand-in for the change).
    pub(crate) fn push_sized(&mut self, change: Change, size: usize) -> Option<ChangeBatch> {
        let (site, version) = change.origin();
        let key = (site, version);
        let mut done = None;
        if self.current_txn != Some(key) {
            if self.sent.holds(&site, version) {
                return None;
            }
            // Only a transaction this stream claims goes in parts (and
            // resumes what the receiver staged): the receiver applies it
            // whole when its last part, which claims it, arrives. One it
            // cannot claim (a v1 peer's, or past the sender's cursor) goes
            // unranged, in plain batches, applied as they come.
            let claimable = self.claimable(site, version);
            let staged = self.staged.get(&key).copied().filter(|_| claimable);
            if staged.is_some_and(|staged| change.seq <= staged) {
                return None; // the receiver has it staged
            }
            let full = self.current.changes.len() >= self.max_changes
                || self.current_bytes >= self.max_bytes;
            // The last part of a transaction in parts is a batch of its own,
            // and so is a resumed transaction's first part.
            if (full || self.part_after.is_some() || staged.is_some()) && self.has_pending() {
                done = Some(self.seal_current());
            }
            self.current_txn = Some(key);
            self.txn_claimable = claimable;
            self.part_after = staged;
            self.txn_start = (
                self.current.changes.len(),
                self.current_bytes,
                self.current.ranges.get(&site).copied(),
            );
        } else if self.current_bytes >= self.max_bytes
            || self.current.changes.len() >= self.max_changes * self.changes_factor()
        {
            let (start, bytes_before, range_before) = self.txn_start;
            self.txn_start = (0, 0, None);
            if start > 0 {
                // The batch is full of earlier transactions: they go alone,
                // and this one starts the next batch.
                let tail = self.current.changes.split_off(start);
                let tail_sizes = self.sizes.split_off(start);
                self.sizes.clear();
                let mut front = std::mem::take(&mut self.current);
                match range_before {
                    Some(range) => front.ranges.insert(site, range),
                    None => front.ranges.remove(&site),
                };
                debug_assert!(self.current_bytes >= bytes_before);
                self.current_bytes = 0;
                done = Some(self.seal(front));
                for (change, size) in tail.into_iter().zip(tail_sizes) {
                    self.add(change, size);
                }
            } else if !self.txn_claimable {
                // Unclaimed, the transaction is cut like a v1 peer's.
                let batch = std::mem::take(&mut self.current);
                self.current_bytes = 0;
                self.sizes.clear();
                done = Some(self.seal(batch));
            } else {
                // The transaction alone fills a batch: what it has so far
                // goes as a part.
                let after_seq = self.part_after.unwrap_or(-1);
                let mut part = std::mem::take(&mut self.current);
                self.sizes.clear();
                let upto_seq = part.changes.iter().map(|c| c.seq).max();
                let upto_seq = upto_seq.unwrap_or(after_seq).max(after_seq);
                part.ranges.remove(&site);
                part.part = Some(TxnPart {
                    site,
                    version,
                    after_seq,
                    upto_seq,
                    more: true,
                });
                self.current_bytes = 0;
                self.part_after = Some(upto_seq);
                done = Some(self.seal(part));
            }
        }
        self.add(change, size);
        done
    }

    /// How many times `max_changes` the transaction in progress may reach
    /// before it goes in parts: [`PART_CHANGES_FACTOR`] once it is alone in
    /// the batch. Parts cost a message and a merge each; a transaction of a
    /// few thousand small changes is cheaper whole, and `max_bytes` still
    /// bounds every batch.
    fn changes_factor(&self) -> usize {
        if self.txn_start.0 == 0 {
            PART_CHANGES_FACTOR
        } else {
            1
        }
    }

    /// Whether this stream's ranges may claim `version` of `site`.
    fn claimable(&self, site: SiteId, version: DbVersion) -> bool {
        self.sender.holds(&site, version)
            && self.limits.get(&site).is_none_or(|limit| version <= *limit)
    }

    /// Adds a change to the batch in progress, and its claim to the batch's ranges.
    fn add(&mut self, change: Change, size: usize) {
        let (site, version) = change.origin();
        // The batch's claims already cover the transaction of the change
        // before it (every path that starts a batch afresh starts it empty).
        let claimed = self
            .current
            .changes
            .last()
            .is_some_and(|last| last.origin() == (site, version));
        if !claimed {
            self.claim(site, version);
        }
        self.current_bytes += size;
        self.sizes.push(size);
        self.current.changes.push(change);
    }

    /// Adds `version` of `site` to the claims of the batch in progress.
    fn claim(&mut self, site: SiteId, version: DbVersion) {
        let within_limit = self.limits.get(&site).is_none_or(|limit| version <= *limit);
        if !within_limit && self.sender.holds(&site, version) {
            self.unclaimed.0.insert(site);
        }
        if self.claimable(site, version) {
            let after = self.sent.get(&site);
            let range = self
                .current
                .ranges
                .entry(site)
                .or_insert(VersionRange { after, upto: after });
            range.upto = range.upto.max(version);
        }
    }

    /// Seals the batch in progress; if the transaction in progress went in
    /// parts, this is its last part.
    fn seal_current(&mut self) -> ChangeBatch {
        let mut batch = std::mem::take(&mut self.current);
        self.current_bytes = 0;
        self.sizes.clear();
        batch.part = self.last_part(&batch);
        self.part_after = None;
        self.seal(batch)
    }

    /// The part marker of `batch` if it ends a transaction that went in parts.
    fn last_part(&self, batch: &ChangeBatch) -> Option<TxnPart> {
        let (Some(after_seq), Some((site, version))) = (self.part_after, self.current_txn) else {
            return None;
        };
        let upto_seq = batch.changes.iter().map(|c| c.seq).max()?;
        Some(TxnPart {
            site,
            version,
            after_seq,
            upto_seq: upto_seq.max(after_seq),
            more: false,
        })
    }

    /// Whether a batch is in progress.
    pub fn has_pending(&self) -> bool {
        !self.current.changes.is_empty()
    }

    /// Closes the stream: the last batch, with ranges raised to everything the
    /// sender holds, or `None` if there is nothing left to say.
    pub fn finish(mut self) -> Option<ChangeBatch> {
        let mut batch = std::mem::take(&mut self.current);
        batch.part = self.last_part(&batch);
        for (site, mut upto) in self.sender.iter() {
            if self.unclaimed.1.contains(&site) {
                if let Some(limit) = self.limits.get(&site) {
                    upto = upto.min(*limit);
                }
            }
            let after = self.sent.get(&site);
            let range = batch
                .ranges
                .entry(site)
                .or_insert(VersionRange { after, upto: after });
            range.upto = range.upto.max(upto);
            if range.upto <= range.after {
                batch.ranges.remove(&site);
            }
        }
        let batch = self.seal(batch);
        (!batch.is_empty()).then_some(batch)
    }

    /// Records the batch's ranges as sent.
    fn seal(&mut self, batch: ChangeBatch) -> ChangeBatch {
        let pending = std::mem::take(&mut self.unclaimed.0);
        self.unclaimed.1.extend(pending);
        for (site, range) in &batch.ranges {
            self.sent.advance(*site, range.upto);
        }
        batch
    }
}

/// Per site, the highest version that batches before the last of a stream
/// may claim, for a stream that reads a store's rows in local order.
///
/// `records` are the origin of each local transaction the stream may read,
/// `(local version, site, origin version)` in ascending local order. Origin
/// versions of a site usually ascend with local versions, and a batch's range
/// up to version `v` tells the receiver it holds every change of that site up
/// to `v`. They do not always: a change may arrive unranged ahead of older
/// ones (relayed by a v1 peer), or one origin transaction in parts at several
/// local versions (a v1 peer pages a transaction across messages) with other
/// transactions between. A range claiming such a version before the stream
/// reached its later rows would let the receiver skip them as held. So a
/// site whose versions come back down (or repeat after another transaction)
/// may be claimed, before the last batch, only below the lowest such version.
/// Parts of one transaction at consecutive local versions are in order. Versions `receiver` holds are
/// skipped anyway and do not count; sites not in the result have no limit.
///
/// ```
/// use crsync_peer::{Cursor, DbVersion, SiteId, proto::batch::claim_limits};
/// let s = SiteId::from_bytes([1; 16]);
/// // local 1 holds s@9 (came unranged), local 2 s@8, local 3 s@10
/// let records = [(1, s, DbVersion(9)), (2, s, DbVersion(8)), (3, s, DbVersion(10))];
/// let limits = claim_limits(records, &Cursor::new());
/// assert_eq!(limits[&s], DbVersion(7));
/// ```
pub fn claim_limits(
    records: impl IntoIterator<Item = (i64, SiteId, DbVersion)>,
    receiver: &Cursor,
) -> BTreeMap<SiteId, DbVersion> {
    let mut limits = ClaimLimits::new(receiver.clone());
    for (local, site, version) in records {
        limits.note(local, site, version);
    }
    limits.finish()
}

/// [`claim_limits`], one record at a time (a stream's reader feeds it from a query).
#[derive(Debug, Clone)]
pub struct ClaimLimits {
    receiver: Cursor,
    /// Per site, the highest version so far and the last local version it is at.
    highest: BTreeMap<SiteId, (DbVersion, i64)>,
    limits: BTreeMap<SiteId, DbVersion>,
}

impl ClaimLimits {
    /// For a receiver at `receiver`.
    pub fn new(receiver: Cursor) -> Self {
        ClaimLimits {
            receiver,
            highest: BTreeMap::new(),
            limits: BTreeMap::new(),
        }
    }

    /// The next record, in ascending local order.
    pub fn note(&mut self, local: i64, site: SiteId, version: DbVersion) {
        if self.receiver.holds(&site, version) {
            return;
        }
        match self.highest.get(&site) {
            // The next part of the same transaction, at the next local
            // version: nothing can come between them in the stream.
            Some(&(top, at)) if version == top && (local == at || local == at + 1) => {
                self.highest.insert(site, (version, local));
            }
            Some(&(top, _)) if version <= top => {
                let limit = DbVersion(version.0 - 1);
                let entry = self.limits.entry(site).or_insert(limit);
                *entry = (*entry).min(limit);
            }
            _ => {
                self.highest.insert(site, (version, local));
            }
        }
    }

    /// The limits, per site.
    pub fn finish(self) -> BTreeMap<SiteId, DbVersion> {
        self.limits
    }
}

/// Why a batch cannot be applied on top of a cursor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchRejection {
    /// The batch starts past what the receiver holds: applying it would skip changes.
    #[error("gap for site {site}: receiver holds up to {held}, batch starts after {after}")]
    Gap {
        /// The origin site.
        site: SiteId,
        /// What the receiver holds of it.
        held: DbVersion,
        /// Where the batch starts.
        after: DbVersion,
    },
    /// A part of a transaction starts past what the receiver staged of it:
    /// an earlier part is missing.
    #[error(
        "gap in transaction {version} of site {site}: receiver staged up to seq {staged}, part starts after {after}"
    )]
    PartGap {
        /// The transaction's origin site.
        site: SiteId,
        /// Its origin version.
        version: DbVersion,
        /// The highest `seq` the receiver staged (`-1`: none).
        staged: i64,
        /// Where the part starts.
        after: i64,
    },
    /// A part that breaks the rules of parts.
    #[error("invalid part of transaction {version} of site {site}: {reason}")]
    BadPart {
        /// The transaction's origin site.
        site: SiteId,
        /// Its origin version.
        version: DbVersion,
        /// Which rule.
        reason: String,
    },
    /// A range whose end is before its start, or a negative version.
    #[error("invalid range for site {site}: ({after}, {upto}]")]
    BadRange {
        /// The origin site.
        site: SiteId,
        /// Declared start.
        after: DbVersion,
        /// Declared end.
        upto: DbVersion,
    },
}

/// The transactions of a batch that a receiver still lacks, grouped for applying.
#[derive(Debug, Default, PartialEq)]
pub struct MergePlan<'a> {
    /// Origin transactions to apply, in batch order; each group is one transaction
    /// (or, unranged, the part of one that this batch carries).
    pub transactions: Vec<((SiteId, DbVersion), Vec<&'a Change>)>,
    /// The receiver's cursor once the batch is applied.
    pub cursor: Cursor,
    /// Changes skipped because they were already held.
    pub skipped: usize,
}

/// Checks `batch` against the receiver's cursor `held` and lists what to apply.
///
/// Changes from `own_site` and changes the cursor holds are skipped; every
/// other change is applied, ranged or not. A range that would leave a gap
/// rejects the batch whole.
pub fn plan_merge<'a>(
    own_site: SiteId,
    held: &Cursor,
    batch: &'a ChangeBatch,
) -> Result<MergePlan<'a>, BatchRejection> {
    for (site, range) in &batch.ranges {
        if range.after > range.upto || range.after < DbVersion::ZERO {
            return Err(BatchRejection::BadRange {
                site: *site,
                after: range.after,
                upto: range.upto,
            });
        }
        if *site != own_site && range.after > held.get(site) {
            return Err(BatchRejection::Gap {
                site: *site,
                held: held.get(site),
                after: range.after,
            });
        }
    }
    let mut plan = MergePlan {
        cursor: batch.cursor_after(held),
        ..MergePlan::default()
    };
    let mut index: BTreeMap<(SiteId, DbVersion), usize> = BTreeMap::new();
    for change in &batch.changes {
        let (site, version) = change.origin();
        if site == own_site || held.holds(&site, version) {
            plan.skipped += 1;
            continue;
        }
        let slot = *index.entry((site, version)).or_insert_with(|| {
            plan.transactions.push(((site, version), Vec::new()));
            plan.transactions.len() - 1
        });
        plan.transactions[slot].1.push(change);
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PackedPk, SqlValue};
    use proptest::prelude::*;

    fn site(n: u8) -> SiteId {
        SiteId::from_bytes([n; 16])
    }

    fn change(s: u8, v: i64, seq: i64) -> Change {
        Change {
            table: "t".into(),
            pk: PackedPk::pack(&[SqlValue::Integer(seq)]),
            cid: "x".into(),
            val: SqlValue::Integer(v),
            col_version: 1,
            db_version: DbVersion(v),
            site_id: site(s),
            cl: 1,
            seq,
        }
    }

    #[test]
    fn a_transaction_larger_than_a_batch_goes_in_parts() {
        // One change per batch: a transaction alone in a batch goes in parts
        // of PART_CHANGES_FACTOR (4) changes.
        let sender: Cursor = [(site(1), DbVersion(3))].into_iter().collect();
        let mut b = BatchBuilder::new(Cursor::new(), sender, 1);
        let mut out = Vec::new();
        for (v, n) in [(1, 9), (2, 1), (3, 3)] {
            for seq in 0..n {
                out.extend(b.push(change(1, v, seq)));
            }
        }
        out.extend(b.finish());
        let sizes: Vec<usize> = out.iter().map(|b| b.changes.len()).collect();
        assert_eq!(sizes, vec![4, 4, 1, 1, 3]);
        let part = |after_seq, upto_seq, more| TxnPart {
            site: site(1),
            version: DbVersion(1),
            after_seq,
            upto_seq,
            more,
        };
        let parts: Vec<Option<TxnPart>> = out.iter().map(|b| b.part).collect();
        assert_eq!(
            parts,
            vec![
                Some(part(-1, 3, true)),
                Some(part(3, 7, true)),
                Some(part(7, 8, false)),
                None,
                None
            ]
        );
        // Only the last part claims the transaction; a transaction under
        // the factor travels whole.
        assert!(out[0].ranges.is_empty() && out[1].ranges.is_empty());
        assert_eq!(out[2].ranges[&site(1)].upto, DbVersion(1));
        assert_eq!(out[3].ranges[&site(1)].upto, DbVersion(2));
        assert_eq!(out[4].ranges[&site(1)].upto, DbVersion(3));
        // by size, a part is cut at once
        let sender: Cursor = [(site(1), DbVersion(1))].into_iter().collect();
        let mut b = BatchBuilder::new(Cursor::new(), sender, 100).with_max_bytes(1);
        let mut out: Vec<ChangeBatch> = (0..3).flat_map(|seq| b.push(change(1, 1, seq))).collect();
        out.extend(b.finish());
        assert_eq!(
            out.iter().map(|b| b.changes.len()).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        assert!(out.iter().all(|b| b.part.is_some()));
    }

    #[test]
    fn a_staged_transaction_resumes_after_its_staged_seq() {
        let sender: Cursor = [(site(1), DbVersion(2))].into_iter().collect();
        let staged = [((site(1), DbVersion(1)), 2)].into_iter().collect();
        let mut b = BatchBuilder::new(Cursor::new(), sender, 10).with_staged(staged);
        let mut out: Vec<ChangeBatch> = (0..5).flat_map(|seq| b.push(change(1, 1, seq))).collect();
        out.extend(b.push(change(1, 2, 0)));
        out.extend(b.finish());
        // Even a short rest goes as a part, so that the receiver adds it to
        // what it staged.
        assert_eq!(
            out[0].changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(
            out[0].part,
            Some(TxnPart {
                site: site(1),
                version: DbVersion(1),
                after_seq: 2,
                upto_seq: 4,
                more: false
            })
        );
        assert_eq!(out[1].part, None);
        let held = Cursor::new();
        assert_eq!(
            check_part(&out[0], &held, Some(2)),
            Ok(Some(PartAction::Complete))
        );
        // A receiver that lost what it staged refuses the part as a gap.
        assert!(matches!(
            check_part(&out[0], &held, None),
            Err(BatchRejection::PartGap { .. })
        ));
    }

    #[test]
    fn parts_that_break_the_rules_are_refused() {
        let part = TxnPart {
            site: site(1),
            version: DbVersion(1),
            after_seq: -1,
            upto_seq: 1,
            more: true,
        };
        let batch = |changes: Vec<Change>, part| ChangeBatch {
            changes,
            part: Some(part),
            ..ChangeBatch::default()
        };
        let held = Cursor::new();
        let foreign = batch(vec![change(1, 1, 0), change(1, 2, 0)], part);
        assert!(matches!(
            check_part(&foreign, &held, None),
            Err(BatchRejection::BadPart { .. })
        ));
        let mut ranged = batch(vec![change(1, 1, 0)], part);
        ranged.ranges.insert(
            site(2),
            VersionRange {
                after: DbVersion(0),
                upto: DbVersion(9),
            },
        );
        assert!(matches!(
            check_part(&ranged, &held, None),
            Err(BatchRejection::BadPart { .. })
        ));
        let reversed = TxnPart {
            after_seq: 5,
            upto_seq: 2,
            ..part
        };
        assert!(check_part(&batch(vec![], reversed), &held, Some(9)).is_err());
        // A transaction already held: nothing to do.
        let holds: Cursor = [(site(1), DbVersion(1))].into_iter().collect();
        let fine = batch(vec![change(1, 1, 0)], part);
        assert_eq!(check_part(&fine, &holds, None), Ok(Some(PartAction::Held)));
    }

    #[test]
    fn cuts_batches_by_size_too() {
        let sender: Cursor = [(site(1), DbVersion(3))].into_iter().collect();
        let mut b = BatchBuilder::new(Cursor::new(), sender, 1000).with_max_bytes(1);
        let mut out: Vec<ChangeBatch> = (1..=3).flat_map(|v| b.push(change(1, v, 0))).collect();
        out.extend(b.finish());
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn skips_what_the_receiver_holds_and_reports_empty_ranges() {
        let held: Cursor = [(site(1), DbVersion(2))].into_iter().collect();
        // site 2 had versions up to 7, all overwritten: no rows, but the range still moves.
        let sender: Cursor = [(site(1), DbVersion(2)), (site(2), DbVersion(7))]
            .into_iter()
            .collect();
        let mut b = BatchBuilder::new(held, sender, 10);
        assert!(b.push(change(1, 1, 0)).is_none());
        assert!(b.push(change(1, 2, 0)).is_none());
        let last = b.finish().unwrap();
        assert!(last.changes.is_empty());
        assert_eq!(last.ranges.len(), 1);
        assert_eq!(
            last.ranges[&site(2)],
            VersionRange {
                after: DbVersion(0),
                upto: DbVersion(7)
            }
        );
    }

    #[test]
    fn plan_rejects_gaps_and_bad_ranges() {
        let mut batch = ChangeBatch::default();
        batch.changes.push(change(1, 5, 0));
        batch.ranges.insert(
            site(1),
            VersionRange {
                after: DbVersion(4),
                upto: DbVersion(5),
            },
        );
        let held: Cursor = [(site(1), DbVersion(3))].into_iter().collect();
        assert_eq!(
            plan_merge(site(9), &held, &batch),
            Err(BatchRejection::Gap {
                site: site(1),
                held: DbVersion(3),
                after: DbVersion(4)
            })
        );
        batch.ranges.insert(
            site(1),
            VersionRange {
                after: DbVersion(3),
                upto: DbVersion(2),
            },
        );
        assert!(matches!(
            plan_merge(site(9), &held, &batch),
            Err(BatchRejection::BadRange { .. })
        ));
    }

    #[test]
    fn unranged_changes_apply_without_moving_the_cursor() {
        // A v1 batch: no ranges, versions with holes, half of transaction 7.
        let mut batch = ChangeBatch::default();
        batch.changes.extend([change(1, 3, 0), change(1, 7, 0)]);
        let held: Cursor = [(site(1), DbVersion(2))].into_iter().collect();
        let plan = plan_merge(site(9), &held, &batch).unwrap();
        assert_eq!(plan.transactions.len(), 2);
        assert_eq!(plan.cursor, held);
        // The other half of transaction 7 is not "already held".
        let mut rest = ChangeBatch::default();
        rest.changes.push(change(1, 7, 1));
        let plan = plan_merge(site(9), &plan.cursor, &rest).unwrap();
        assert_eq!(plan.transactions.len(), 1);
        assert_eq!(plan.skipped, 0);
    }

    /// Applies `batches` in order as a Store does, staging parts
    /// ([`check_part`]), skipping the batches `refuse` names and those
    /// refused as gaps; returns what was applied and the final cursor.
    fn apply(
        batches: &[ChangeBatch],
        held: &Cursor,
        refuse: Option<usize>,
    ) -> (std::collections::BTreeSet<(SiteId, DbVersion, i64)>, Cursor) {
        let mut cursor = held.clone();
        let mut applied = std::collections::BTreeSet::new();
        let mut staged: BTreeMap<(SiteId, DbVersion), (i64, Vec<Change>)> = BTreeMap::new();
        let record = |applied: &mut std::collections::BTreeSet<_>, group: Vec<&Change>| {
            applied.extend(group.into_iter().map(|c| (c.site_id, c.db_version, c.seq)));
        };
        for (i, batch) in batches.iter().enumerate() {
            if Some(i) == refuse {
                continue;
            }
            let origin = batch.part.map(|p| p.origin());
            let have = origin.and_then(|o| staged.get(&o)).map(|s| s.0);
            let Ok(action) = check_part(batch, &cursor, have) else {
                continue;
            };
            if let (Some(PartAction::Stage { upto }), Some(origin)) = (action, origin) {
                let entry = staged.entry(origin).or_insert((-1, Vec::new()));
                entry.0 = upto;
                entry.1.extend(batch.changes.iter().cloned());
                continue;
            }
            let Ok(plan) = plan_merge(site(0), &cursor, batch) else {
                continue;
            };
            let covered = completed_by(staged.keys(), batch, &plan);
            for key in covered {
                if let Some((_, earlier)) = staged.remove(&key) {
                    record(&mut applied, earlier.iter().collect());
                }
            }
            for (_, group) in plan.transactions {
                record(&mut applied, group);
            }
            cursor = plan.cursor;
        }
        (applied, cursor)
    }

    #[test]
    fn out_of_order_versions_are_claimed_only_with_their_changes() {
        // The sender holds site 1's version 9 at local 1 (it came unranged,
        // ahead of the rest), then 6..8 at locals 2..4: a batch claiming 9 at
        // once would make the receiver skip 6..8 as held. Simulator seed 8146.
        let sender: Cursor = [(site(1), DbVersion(9))].into_iter().collect();
        let rows = [
            change(1, 9, 0),
            change(1, 6, 1),
            change(1, 7, 2),
            change(1, 8, 3),
        ];
        let records = rows
            .iter()
            .enumerate()
            .map(|(i, c)| (i as i64 + 1, c.site_id, c.db_version));
        let limits = claim_limits(records, &Cursor::new());
        assert_eq!(limits[&site(1)], DbVersion(5));
        let stream = |max| {
            let mut b = BatchBuilder::new(Cursor::new(), sender.clone(), max)
                .with_claim_limits(limits.clone());
            let mut batches: Vec<ChangeBatch> =
                rows.iter().cloned().flat_map(|c| b.push(c)).collect();
            batches.extend(b.finish());
            batches
        };
        // One batch per change: the changes above the limit travel unranged,
        // so no batch may claim them: a receiver that refused one of them
        // would skip it for good. The claim stops at the limit.
        let batches = stream(1);
        let (applied, cursor) = apply(&batches, &Cursor::new(), None);
        assert_eq!(applied.len(), 4, "{batches:?}");
        assert_eq!(cursor.get(&site(1)), DbVersion(5));
        for refused in 0..batches.len() {
            let (applied, cursor) = apply(&batches, &Cursor::new(), Some(refused));
            assert!(applied.len() == 3 && cursor.get(&site(1)) <= DbVersion(5));
        }
        // All in one batch: the claim travels with the changes.
        let (applied, cursor) = apply(&stream(10), &Cursor::new(), None);
        assert_eq!((applied.len(), cursor), (4, sender.clone()));
    }

    #[test]
    fn a_transaction_in_parts_is_claimed_only_at_the_end() {
        // One origin transaction (site 1, version 5) merged in two parts, at
        // locals 1 and 3, with another transaction between.
        let (a, b, c) = (change(1, 5, 0), change(2, 3, 0), change(1, 5, 1));
        let records = [
            (1, a.site_id, a.db_version),
            (2, b.site_id, b.db_version),
            (3, c.site_id, c.db_version),
        ];
        let limits = claim_limits(records, &Cursor::new());
        assert_eq!(limits.get(&site(1)), Some(&DbVersion(4)));
        assert_eq!(limits.get(&site(2)), None);
        // the same transaction at one local version, or at consecutive ones
        // (a v1 peer's pages merged one after the other), is in order
        let together = [(1, a.site_id, a.db_version), (1, c.site_id, c.db_version)];
        assert!(claim_limits(together, &Cursor::new()).is_empty());
        let paged = [(1, a.site_id, a.db_version), (2, c.site_id, c.db_version)];
        assert!(claim_limits(paged, &Cursor::new()).is_empty());
        // versions the receiver holds do not count
        let held: Cursor = [(site(1), DbVersion(5))].into_iter().collect();
        assert!(claim_limits(records, &held).is_empty());
    }

    #[test]
    fn ranges_never_claim_past_the_sender() {
        // The sender holds site 1 up to 4 with proof, and version 6 without.
        let sender: Cursor = [(site(1), DbVersion(4))].into_iter().collect();
        let mut b = BatchBuilder::new(Cursor::new(), sender, 10);
        assert!(b.push(change(1, 3, 0)).is_none());
        assert!(b.push(change(1, 6, 0)).is_none());
        let batch = b.finish().unwrap();
        assert_eq!(batch.changes.len(), 2);
        assert_eq!(
            batch.ranges[&site(1)],
            VersionRange {
                after: DbVersion(0),
                upto: DbVersion(4)
            }
        );
    }

    #[test]
    fn plan_skips_held_and_own() {
        let mut batch = ChangeBatch::default();
        batch.changes.extend([
            change(1, 2, 0),
            change(1, 3, 0),
            change(1, 3, 1),
            change(9, 1, 0),
        ]);
        batch.ranges.insert(
            site(1),
            VersionRange {
                after: DbVersion(0),
                upto: DbVersion(3),
            },
        );
        batch.ranges.insert(
            site(9),
            VersionRange {
                after: DbVersion(0),
                upto: DbVersion(1),
            },
        );
        let held: Cursor = [(site(1), DbVersion(2))].into_iter().collect();
        let plan = plan_merge(site(9), &held, &batch).unwrap();
        assert_eq!(plan.skipped, 2);
        assert_eq!(plan.transactions.len(), 1);
        assert_eq!(plan.transactions[0].0, (site(1), DbVersion(3)));
        assert_eq!(plan.transactions[0].1.len(), 2);
        assert_eq!(plan.cursor.get(&site(1)), DbVersion(3));
    }

    proptest! {
        /// Whatever the local order of the sender's rows (versions out of
        /// order, transactions in parts) and the batch size, the builder's
        /// batches with their claim limits bring a receiver every row it
        /// lacks and never claim past the sender; and if the receiver refuses
        /// any one batch, no claim covers a change it did not apply.
        #[test]
        fn any_local_order_applies_everything_and_claims_only_what_it_sent(
            order in proptest::collection::vec((1u8..4, 1i64..8, 0i64..3), 1..40),
            held_v in proptest::collection::vec(0i64..6, 3),
            max in 1usize..6,
            refused in 0usize..12,
        ) {
            // Local version i holds the row (site, version, seq); duplicates
            // of one (site, version, seq) keep the first.
            let mut seen = std::collections::BTreeSet::new();
            let rows: Vec<(i64, Change)> = order
                .iter()
                .enumerate()
                .filter(|(_, (s, v, q))| seen.insert((*s, *v, *q)))
                .map(|(i, (s, v, q))| (i as i64 + 1, change(*s, *v, *q)))
                .collect();
            let sender: Cursor = (1..4u8).map(|s| (site(s), DbVersion(8))).collect();
            let held: Cursor = (1..4u8).map(|s| (site(s), DbVersion(held_v[s as usize - 1]))).collect();
            let records = rows.iter().map(|(l, c)| (*l, c.site_id, c.db_version));
            let limits = claim_limits(records, &held);
            let mut builder = BatchBuilder::new(held.clone(), sender.clone(), max).with_claim_limits(limits);
            let mut batches: Vec<ChangeBatch> =
                rows.iter().flat_map(|(_, c)| builder.push(c.clone())).collect();
            batches.extend(builder.finish());
            let lacking: std::collections::BTreeSet<_> = rows
                .iter()
                .map(|(_, c)| c)
                .filter(|c| !held.holds(&c.site_id, c.db_version))
                .map(|c| (c.site_id, c.db_version, c.seq))
                .collect();
            let mut most = held.clone();
            most.join(&sender);
            let (applied, cursor) = apply(&batches, &held, None);
            prop_assert_eq!(&applied, &lacking);
            prop_assert!(cursor.covers(&held) && most.covers(&cursor));
            let refused = refused % batches.len().max(1);
            let (applied, cursor) = apply(&batches, &held, Some(refused));
            for change in &lacking {
                if cursor.holds(&change.0, change.1) {
                    prop_assert!(applied.contains(change), "claimed {change:?} without it");
                }
            }
        }

        /// Transactions of any size, batches of any size, one batch refused:
        /// a receiver that stages parts applies every transaction whole, in
        /// one step, or not at all, and after a second stream that resumes
        /// what it staged, it holds everything.
        #[test]
        fn parts_apply_transactions_whole(
            txns in proptest::collection::vec((1u8..3, 1usize..12), 1..12),
            max in 1usize..5,
            refused in 0usize..40,
        ) {
            let mut next = [0i64; 3];
            let mut all = Vec::new();
            for (s, n) in &txns {
                next[*s as usize] += 1;
                for seq in 0..*n as i64 { all.push(change(*s, next[*s as usize], seq)); }
            }
            let sender: Cursor = (1..3u8).map(|s| (site(s), DbVersion(next[s as usize]))).collect();
            let sizes: BTreeMap<(SiteId, DbVersion), usize> = all.iter().fold(BTreeMap::new(), |mut m, c| {
                *m.entry(c.origin()).or_default() += 1;
                m
            });
            let stream = |held: &Cursor, staged: BTreeMap<(SiteId, DbVersion), i64>| {
                let mut b = BatchBuilder::new(held.clone(), sender.clone(), max).with_staged(staged);
                let mut out: Vec<ChangeBatch> = all.iter().cloned().flat_map(|c| b.push(c)).collect();
                out.extend(b.finish());
                out
            };
            let batches = stream(&Cursor::new(), BTreeMap::new());
            let refused = refused % batches.len();
            // A receiver: a step applies some transactions, each must be whole.
            let mut staged: BTreeMap<(SiteId, DbVersion), (i64, Vec<Change>)> = BTreeMap::new();
            let mut cursor = Cursor::new();
            let mut applied: BTreeMap<(SiteId, DbVersion), usize> = BTreeMap::new();
            let mut receive = |batches: &[ChangeBatch], skip: Option<usize>, staged: &mut BTreeMap<(SiteId, DbVersion), (i64, Vec<Change>)>, cursor: &mut Cursor| -> Result<(), TestCaseError> {
                for (i, batch) in batches.iter().enumerate() {
                    if Some(i) == skip { continue; }
                    let origin = batch.part.map(|p| p.origin());
                    let have = origin.and_then(|o| staged.get(&o)).map(|s| s.0);
                    let Ok(action) = check_part(batch, cursor, have) else { continue };
                    if let (Some(PartAction::Stage { upto }), Some(o)) = (action, origin) {
                        let e = staged.entry(o).or_insert((-1, Vec::new()));
                        e.0 = upto;
                        e.1.extend(batch.changes.iter().cloned());
                        continue;
                    }
                    let Ok(plan) = plan_merge(site(0), cursor, batch) else { continue };
                    let mut step: BTreeMap<(SiteId, DbVersion), BTreeSet<i64>> = BTreeMap::new();
                    for (key, group) in &plan.transactions {
                        step.entry(*key).or_default().extend(group.iter().map(|c| c.seq));
                    }
                    let covered = completed_by(staged.keys(), batch, &plan);
                    for key in covered {
                        if let Some((_, earlier)) = staged.remove(&key) {
                            step.entry(key).or_default().extend(earlier.iter().map(|c| c.seq));
                        }
                    }
                    for (key, seqs) in step {
                        prop_assert_eq!(seqs.len(), sizes[&key], "{:?} applied in part", key);
                        prop_assert!(!applied.contains_key(&key), "{:?} applied twice", key);
                        applied.insert(key, seqs.len());
                    }
                    *cursor = plan.cursor;
                }
                Ok(())
            };
            receive(&batches, Some(refused), &mut staged, &mut cursor)?;
            let resume: BTreeMap<(SiteId, DbVersion), i64> = staged.iter().map(|(k, (s, _))| (*k, *s)).collect();
            let again = stream(&cursor, resume);
            receive(&again, None, &mut staged, &mut cursor)?;
            prop_assert_eq!(applied, sizes);
            prop_assert_eq!(cursor, sender);
        }

        /// Whatever the batch size, feeding the builder's batches to `plan_merge`
        /// in order applies every missing transaction exactly once, whole, and
        /// ends at the sender's cursor.
        #[test]
        fn builder_batches_apply_in_order(
            txns in proptest::collection::vec((1u8..4, 1usize..5), 1..30),
            held_v in proptest::collection::vec(0i64..10, 3),
            max in 1usize..8,
        ) {
            let mut next = [0i64; 4];
            let mut all = Vec::new();
            for (s, n) in &txns {
                next[*s as usize] += 1;
                for seq in 0..*n as i64 { all.push(change(*s, next[*s as usize], seq)); }
            }
            let sender: Cursor = (1..4u8).map(|s| (site(s), DbVersion(next[s as usize] + 2))).collect();
            let held: Cursor = (1..4u8).map(|s| (site(s), DbVersion(held_v[s as usize - 1]))).collect();
            let mut builder = BatchBuilder::new(held.clone(), sender.clone(), max);
            let mut batches: Vec<ChangeBatch> = all.iter().cloned().flat_map(|c| builder.push(c)).collect();
            batches.extend(builder.finish());
            let mut cursor = held.clone();
            let mut applied = Vec::new();
            for batch in &batches {
                let plan = plan_merge(site(0), &cursor, batch).unwrap();
                for (_, group) in plan.transactions { applied.extend(group.into_iter().cloned()); }
                cursor = plan.cursor;
            }
            let expected: Vec<Change> = all.into_iter().filter(|c| !held.holds(&c.site_id, c.db_version)).collect();
            prop_assert_eq!(applied, expected);
            let mut want = held.clone();
            want.join(&sender);
            prop_assert_eq!(cursor, want);
        }
    }
}
