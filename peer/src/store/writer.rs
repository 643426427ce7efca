//! The writer thread: owns the read-write connection and runs commands one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::{broadcast, oneshot};

use super::conflicts::{self, Conflict, ConflictQuery, Recorder, Retention, apply_change};
use super::error::{EnableError, MergeError, OpenError, StoreError};
use super::identity::{self, CopiedFile};
use super::reader::{CHANGES_AFTER_SQL, change_of_row};
use super::remotes::{self, RemoteRecord};
use super::schema::{BOOTSTRAP_SQL, Schema, load_remote_cursor, quote_ident, table_columns};
use super::staging::{self, HeldPart, HeldParts, Staged};
use super::tail::{CommitRows, LiveTail, TAIL_MAX_COMMIT_CHANGES};
use super::{BookkeepingStats, ChangeSource, MergeReport, StoreEvent};
use crate::proto::batch::{MergePlan, PartAction, check_part, completed_by, plan_merge};
use crate::{Change, ChangeBatch, Cursor, DbVersion, SiteId, telemetry};

/// Prepared statements the writer keeps (rusqlite's default is 16).
const STATEMENT_CACHE: usize = 128;

/// A closure run on the writer connection; it returns its reply, sent
/// once the writer has noticed what it committed (so a caller that reads
/// right after its write sees it in the live tail too).
pub(super) type WriteJob = Box<dyn FnOnce(&mut Connection) -> Box<dyn FnOnce() + Send> + Send>;
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// The commands the writer thread understands.
pub(super) enum Command {
    SchemaVersion(Reply<i64>),
    Cursor(Reply<Cursor>),
    EnableCrr(Vec<String>, oneshot::Sender<Result<(), EnableError>>),
    Merge(
        ChangeBatch,
        oneshot::Sender<Result<MergeReport, MergeError>>,
    ),
    Write(WriteJob),
    Stats(Reply<BookkeepingStats>),
    /// What is staged of transactions in parts.
    Staged(Reply<Staged>),
    /// The conflict history.
    Conflicts(ConflictQuery, Reply<Vec<Conflict>>),
    /// A remote acknowledged our own writes up to this version.
    Acknowledged(i64),
    /// What a Peer saw of a remote (saved on the next poll).
    RemoteSeen(RemoteRecord),
    /// The remotes remembered (after saving what is pending).
    Remotes(Reply<Vec<RemoteRecord>>),
    Close(Reply<()>),
}

pub(super) struct WriterConfig {
    pub(super) path: PathBuf,
    pub(super) poll_interval: Duration,
    pub(super) origin_gc_slack: u64,
    pub(super) stage_in_memory_below: usize,
    pub(super) conflicts: Retention,
    /// Where the rows of each commit go for the sessions to send (`None`: off).
    pub(super) tail: Option<std::sync::Arc<LiveTail>>,
}

struct Writer {
    conn: Connection,
    site: SiteId,
    schema: Schema,
    /// Remote entries of the cursor (our own entry is `crsql_db_version()`).
    remote: Cursor,
    events: broadcast::Sender<StoreEvent>,
    last_data_version: i64,
    /// Highest local db_version already reported to subscribers.
    last_reported: i64,
    /// Our own entry of the cursor: the highest local version that holds rows.
    /// `crsql_db_version()` also counts transactions that wrote nothing (an
    /// upsert of equal values), which a restart forgets; claiming those would
    /// let a remote skip our next writes as "already held".
    own_version: i64,
    origin_records: u64,
    origin_live_after_gc: u64,
    config: WriterConfig,
    /// The file is a copy of another replica's (see [`identity`](super::identity)).
    copied: Option<CopiedFile>,
    /// Our newest own version a remote acknowledged, and what is saved of it.
    verified: i64,
    verified_saved: i64,
    /// Transactions staged in part on disk (mirrors `crsync_staging`).
    staged: Staged,
    /// Transactions staged in part in memory: small enough that writing them
    /// twice (staged, then applied) would cost more than receiving them
    /// again after a crash (see `staging::MEMORY_STAGE_BYTES`).
    held: HeldParts,
    /// Remote records not saved yet.
    remotes: BTreeMap<SiteId, RemoteRecord>,
    /// The `database` label of its metrics.
    database: String,
}

pub(super) fn run(
    config: WriterConfig,
    inbox: flume::Receiver<Command>,
    events: broadcast::Sender<StoreEvent>,
    ready: oneshot::Sender<Result<(SiteId, Option<CopiedFile>), OpenError>>,
) {
    let path = config.path.clone();
    let mut writer = match Writer::open(config, events) {
        Ok(w) => w,
        Err(source) => {
            let _ = ready.send(Err(OpenError::opening(&path, source)));
            return;
        }
    };
    // The tail starts empty at the file's version.
    writer.feed_tail(CommitRows::too_large());
    let _ = ready.send(Ok((writer.site, writer.copied.clone())));
    let mut next_poll = Instant::now() + writer.config.poll_interval;
    let queue_depth =
        metrics::gauge!(telemetry::STORE_QUEUE_DEPTH, "database" => writer.database.clone());
    loop {
        let timeout = next_poll.saturating_duration_since(Instant::now());
        match inbox.recv_timeout(timeout) {
            Ok(Command::Close(reply)) => {
                let _ = reply.send(writer.close());
                return;
            }
            // Notes for later that touch no table: a server's sessions send
            // one per remote per commit, so they skip the checks for other
            // processes' commits around every command.
            Ok(command @ (Command::Acknowledged(_) | Command::RemoteSeen(_))) => {
                writer.handle(command);
            }
            Ok(command) => {
                queue_depth.set(inbox.len() as f64);
                writer.notice_external();
                writer.handle(command);
                writer.notice_own_commits(ChangeSource::Local);
            }
            Err(flume::RecvTimeoutError::Timeout) => {}
            Err(flume::RecvTimeoutError::Disconnected) => {
                if let Err(e) = writer.close() {
                    tracing::warn!(error = %e, "closing the store failed");
                }
                return;
            }
        }
        // Also when commands never stop coming: the queue is never empty
        // for long on a busy server.
        if Instant::now() >= next_poll {
            writer.notice_external();
            writer.save_verified();
            writer.save_remotes();
            next_poll = Instant::now() + writer.config.poll_interval;
        }
    }
}

/// Creates our bookkeeping tables and sets cr-sqlite's config, once per file.
/// A file that has them is not written to, so opening it for reading needs no
/// write lock; otherwise the write lock is taken first (`BEGIN IMMEDIATE`
/// waits within the busy timeout, where a read upgraded to a write would fail
/// at once if another process committed meanwhile).
fn bootstrap(conn: &Connection) -> rusqlite::Result<()> {
    const READY: &str = "SELECT (SELECT count(*) FROM sqlite_master
            WHERE name IN ('crsync_cursor', 'crsync_origin', 'crsync_origin_by_site', 'crsync_meta',
                           'crsync_staging', 'crsync_staged', 'crsync_remotes',
                           'crsync_conflicts', 'crsync_conflicts_by_time')) = 9
        AND crsql_config_get('merge-equal-values') = 1";
    if conn.query_row(READY, [], |r| r.get::<_, bool>(0))? {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let done = conn.execute_batch(BOOTSTRAP_SQL).and_then(|()| {
        // Equal values written concurrently tie-break by site id, so clocks converge too.
        conn.query_row(
            "SELECT crsql_config_set('merge-equal-values', 1)",
            [],
            |_| Ok(()),
        )
    });
    match done {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

impl Writer {
    fn open(
        config: WriterConfig,
        events: broadcast::Sender<StoreEvent>,
    ) -> rusqlite::Result<Writer> {
        let conn = Connection::open(&config.path)?;
        conn.busy_timeout(crate::extension::INIT_BUSY_TIMEOUT)?;
        // Merges with conflict lookups use a few statements per table.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        bootstrap(&conn)?;
        let site_bytes: Vec<u8> = conn.query_row("SELECT crsql_site_id()", [], |r| r.get(0))?;
        let site = SiteId::from_slice(&site_bytes).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
        })?;
        let remote = load_remote_cursor(&conn)?;
        let origin_records: i64 =
            conn.query_row("SELECT count(*) FROM crsync_origin", [], |r| r.get(0))?;
        let last_data_version = data_version(&conn)?;
        let last_reported = db_version(&conn)?;
        let own_version = last_reported;
        let copied = identity::check(&conn, &config.path, &site.to_hex(), own_version)?;
        let verified = identity::verified_version(&conn)?;
        let mut schema = Schema::default();
        schema.refresh(&conn)?;
        let staged = staging::load(&conn)?;
        let stage_in_memory_below = config.stage_in_memory_below;
        let database = telemetry::database_label(&config.path);
        Ok(Writer {
            conn,
            site,
            schema,
            remote,
            events,
            last_data_version,
            last_reported,
            own_version,
            origin_records: origin_records as u64,
            origin_live_after_gc: origin_records as u64,
            config,
            copied,
            verified,
            verified_saved: verified,
            staged,
            held: HeldParts::new(stage_in_memory_below),
            remotes: BTreeMap::new(),
            database,
        })
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::SchemaVersion(reply) => {
                let r = user_version(&self.conn);
                let _ = reply.send(r.map_err(StoreError::from));
            }
            Command::Cursor(reply) => {
                let _ = reply.send(self.cursor().map_err(StoreError::from));
            }
            Command::EnableCrr(tables, reply) => {
                let result = self.enable_crr(&tables);
                self.notice_own_commits(ChangeSource::Local);
                let _ = reply.send(result);
            }
            Command::Merge(batch, reply) => {
                let started = Instant::now();
                let result = self.merge(&batch);
                self.record_merge(started, &result);
                let _ = reply.send(result);
            }
            Command::Write(job) => {
                let reply = job(&mut self.conn);
                self.notice_own_commits(ChangeSource::Local);
                reply();
            }
            Command::Acknowledged(version) => {
                self.verified = self.verified.max(version.min(self.own_version));
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.stats().map_err(StoreError::from));
            }
            Command::Staged(reply) => {
                let _ = reply.send(Ok(self.staged_view()));
            }
            Command::Conflicts(query, reply) => {
                let r = conflicts::list(&self.conn, &query);
                let _ = reply.send(r.map_err(StoreError::from));
            }
            Command::RemoteSeen(record) => {
                self.remotes.insert(record.site, record);
            }
            Command::Remotes(reply) => {
                self.save_remotes();
                let _ = reply.send(remotes::load(&self.conn).map_err(StoreError::from));
            }
            Command::Close(_) => unreachable!("handled by the loop"),
        }
    }

    /// Records a merge's latency, what it applied and what it staged.
    fn record_merge(&self, started: Instant, result: &Result<MergeReport, MergeError>) {
        let database = self.database.clone();
        metrics::histogram!(telemetry::MERGE_SECONDS, "database" => database.clone())
            .record(started.elapsed().as_secs_f64());
        if let Ok(report) = result {
            metrics::counter!(telemetry::CHANGES_MERGED_TOTAL, "database" => database.clone())
                .increment(report.applied as u64);
            if report.staged_changes > 0 {
                metrics::counter!(telemetry::CHUNKS_STAGED_TOTAL, "database" => database)
                    .increment(1);
            }
        }
    }

    fn cursor(&self) -> rusqlite::Result<Cursor> {
        let mut cursor = self.remote.clone();
        cursor.advance(self.site, DbVersion(self.own_version));
        Ok(cursor)
    }

    fn stats(&self) -> rusqlite::Result<BookkeepingStats> {
        let origin: i64 = self
            .conn
            .query_row("SELECT count(*) FROM crsync_origin", [], |r| r.get(0))?;
        let sites: i64 = self
            .conn
            .query_row("SELECT count(*) FROM crsync_cursor", [], |r| r.get(0))?;
        Ok(BookkeepingStats {
            origin_records: origin as u64,
            cursor_sites: sites as u64,
        })
    }

    fn enable_crr(&mut self, tables: &[String]) -> Result<(), EnableError> {
        for table in tables {
            let columns = table_columns(&self.conn, table)?;
            if columns.is_empty() {
                return Err(EnableError::UnknownTable {
                    table: table.clone(),
                });
            }
            if !columns.iter().any(|c| c.1) {
                return Err(EnableError::NoPrimaryKey {
                    table: table.clone(),
                });
            }
        }
        let txn = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for table in tables {
            let result: rusqlite::Result<String> =
                txn.query_row("SELECT crsql_as_crr(?1)", [table], |r| r.get(0));
            if let Err(e) = result {
                return Err(EnableError::Rejected {
                    table: table.clone(),
                    reason: e.to_string(),
                });
            }
        }
        txn.commit()?;
        self.schema.refresh(&self.conn)?;
        Ok(())
    }

    fn merge(&mut self, batch: &ChangeBatch) -> Result<MergeReport, MergeError> {
        if let Some(theirs) = batch.schema_version {
            let ours = user_version(&self.conn)?;
            if theirs > ours {
                return Err(MergeError::Outdated { ours, theirs });
            }
        }
        self.schema.refresh(&self.conn)?;
        let mut dropped = 0;
        let lenient;
        let batch = if batch.javascript {
            // A v1 sender's odd change is left out; the rest still applies.
            // (not `..batch.clone()`: that would copy every change once more)
            let mut kept = ChangeBatch {
                changes: Vec::with_capacity(batch.changes.len()),
                ranges: batch.ranges.clone(),
                schema_version: batch.schema_version,
                javascript: batch.javascript,
                part: batch.part,
                wire: Default::default(),
            };
            for change in &batch.changes {
                match self.schema.check(change) {
                    Ok(()) => {
                        let mut change = change.clone();
                        if let Some(note) = self.schema.normalize_js(&mut change) {
                            tracing::warn!(table = %change.table, column = %change.cid, %note, "a v1 value could only be approximated");
                        }
                        kept.changes.push(change);
                    }
                    Err(reason) => {
                        dropped += 1;
                        tracing::warn!(table = %change.table, %reason, "left out an invalid change from a v1 peer");
                    }
                }
            }
            lenient = kept;
            &lenient
        } else {
            for (index, change) in batch.changes.iter().enumerate() {
                self.schema
                    .check(change)
                    .map_err(|reason| MergeError::Invalid { index, reason })?;
            }
            batch
        };
        let held = self.cursor()?;
        let staged_upto = batch.part.and_then(|p| {
            let key = p.origin();
            (self.staged.get(&key).copied()).or_else(|| self.held.upto(&key))
        });
        if let Some(PartAction::Stage { upto }) = check_part(batch, &held, staged_upto)? {
            return self.stage_part(batch, upto, held, dropped);
        }
        let plan = plan_merge(self.site, &held, batch)?;
        let complete = completed_by(self.staged.keys().chain(self.held.keys()), batch, &plan);
        let covered: Vec<(SiteId, DbVersion)> = complete
            .iter()
            .filter(|key| !plan.transactions.iter().any(|(k, _)| k == *key))
            .copied()
            .collect();
        let mut report = MergeReport {
            skipped: plan.skipped,
            dropped,
            cursor: held.clone(),
            ..MergeReport::default()
        };
        if plan.transactions.is_empty() && plan.cursor == held && covered.is_empty() {
            report.staged = self.staged_view();
            return Ok(report);
        }
        let in_memory = self.held.take(&complete);
        // Some session relays merges (see `LiveTail::wants_merged_rows`):
        // keep what this one writes, to hand it on without reading it back.
        let relaying = (self.config.tail.as_ref()).is_some_and(|t| t.wants_merged_rows());
        let mut relayed = relaying.then(RelayedRows::new);
        let parts = Completed {
            complete: &complete,
            in_memory: &in_memory,
            covered: &covered,
        };
        let applied = self.apply_plan(&plan, parts, &held, &mut report, relayed.as_mut());
        let base = match applied {
            Ok(base) => base,
            Err(e) => {
                // The transaction rolled back, and with it what `staged` forgot.
                self.staged = staging::load(&self.conn)?;
                self.held.put_back(in_memory);
                return Err(e.into());
            }
        };
        report.staged = self.staged_view();
        report.transactions = plan.transactions.len() + covered.len();
        self.origin_records += report.transactions as u64;
        for (site, version) in plan.cursor.iter() {
            if site != self.site {
                self.remote.advance(site, version);
            }
        }
        // Merged rows hold local versions too: our own entry may claim them
        // (they are holes in our own versions), once they are on disk.
        // Only versions that hold rows: cr-sqlite hands a version that wrote
        // nothing (every change lost or was equal) to the next transaction.
        // For every session that relays them (the live tail), what cr-sqlite
        // kept: a change that lost its conflict is not relayed. From memory
        // when every change is known to be stored as it came, else read back.
        let small = report.applied <= TAIL_MAX_COMMIT_CHANGES;
        let (newest, rows) = if small && relaying {
            let (rows, newest) = match relayed.filter(|r| r.exact) {
                Some(relayed) => relayed.into_rows(),
                None => committed_rows(&self.conn, self.site, base)?,
            };
            self.own_version = self.own_version.max(newest.unwrap_or(0));
            (newest, rows.merged())
        } else {
            let newest = self.newest_local_in(&report.tables, base)?;
            let rows = match newest {
                Some(newest) if small => CommitRows::unread(base + 1, newest),
                Some(_) => CommitRows::too_large(),
                None => CommitRows::default(),
            };
            (newest, rows)
        };
        report.local_versions = newest.map(|newest| (base + 1, newest));
        report.cursor = self.cursor()?;
        // Merged rows are reported here, as merges, not as local writes.
        self.last_reported = db_version(&self.conn)?;
        self.feed_tail(rows);
        if !report.tables.is_empty() {
            let _ = self.events.send(StoreEvent::Changed {
                tables: report.tables.clone(),
                source: ChangeSource::Merge,
            });
        } else if report.cursor != held {
            let _ = self.events.send(StoreEvent::CursorAdvanced);
        }
        self.maybe_collect_origins()?;
        Ok(report)
    }

    /// Writes the plan's transactions, and the staged ones it completes,
    /// in one SQLite transaction; returns the local version before it.
    fn apply_plan(
        &mut self,
        plan: &MergePlan<'_>,
        parts: Completed<'_>,
        held: &Cursor,
        report: &mut MergeReport,
        mut relayed: Option<&mut RelayedRows>,
    ) -> rusqlite::Result<i64> {
        let Completed {
            complete,
            in_memory,
            covered,
        } = parts;
        let txn = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let base = db_version(&txn)?;
        {
            let mut insert = txn.prepare_cached(conflicts::INSERT_CHANGE)?;
            let mut impacted = txn.prepare_cached(ROWS_IMPACTED)?;
            if let Some(relayed) = relayed.as_deref_mut() {
                relayed.impacted = rows_impacted(&mut impacted)?;
            }
            let mut recorder = (self.config.conflicts.max_rows > 0)
                .then(|| Recorder::new(&self.schema, self.site));
            let mut record_origin = txn.prepare_cached(
                "INSERT OR REPLACE INTO crsync_origin (local_version, site_id, origin_version) VALUES (?1, ?2, ?3)",
            )?;
            // Each origin transaction gets a local version of its own, so the
            // origin of every merged row can be looked up by its local version.
            let transactions = plan
                .transactions
                .iter()
                .map(|(key, changes)| (*key, changes.as_slice()))
                .chain(covered.iter().map(|key| (*key, &[][..])));
            for (k, ((site, version), changes)) in transactions.enumerate() {
                let local = base + 1 + k as i64;
                // Recorded first: conflicts ask it for the origin of cells
                // this transaction writes.
                record_origin.execute(params![local, site.as_bytes().as_slice(), version.0])?;
                if complete.contains(&(site, version)) && self.staged.contains_key(&(site, version))
                {
                    let (rows, tables) = staging::apply(
                        &txn,
                        &mut self.staged,
                        (site, version),
                        local,
                        recorder.as_mut(),
                    )?;
                    report.applied += rows;
                    report.tables.extend(tables);
                    // Staged rows are not in memory: read back.
                    if let Some(relayed) = relayed.as_deref_mut() {
                        relayed.give_up();
                    }
                }
                let earlier = in_memory
                    .get(&(site, version))
                    .map(|h| h.changes.as_slice());
                for c in earlier.into_iter().flatten().chain(changes.iter().copied()) {
                    apply_change(
                        &txn,
                        &mut insert,
                        recorder.as_mut(),
                        c,
                        (site, version),
                        local,
                    )?;
                    if let Some(relayed) = relayed.as_deref_mut() {
                        relayed.note(&mut impacted, &self.schema, c, local)?;
                    }
                    report.applied += 1;
                    if !report.tables.contains(&c.table) {
                        report.tables.insert(c.table.clone());
                    }
                }
            }
            if recorder.is_some_and(|r| r.recorded > 0) {
                conflicts::trim(&txn, self.config.conflicts)?;
            }
            let mut save_cursor = txn.prepare_cached(
                "INSERT INTO crsync_cursor (site_id, db_version) VALUES (?1, ?2) \
                 ON CONFLICT (site_id) DO UPDATE SET db_version = max(db_version, excluded.db_version)",
            )?;
            for (site, version) in plan.cursor.iter() {
                if site != self.site && version > held.get(&site) {
                    save_cursor.execute(params![site.as_bytes().as_slice(), version.0])?;
                }
            }
        }
        txn.commit()?;
        Ok(base)
    }

    /// Stages a part that is not the last of its transaction; nothing
    /// reaches the user's tables and the cursor does not move.
    fn stage_part(
        &mut self,
        batch: &ChangeBatch,
        upto: i64,
        held: Cursor,
        dropped: usize,
    ) -> Result<MergeReport, MergeError> {
        let mut report = MergeReport {
            cursor: held,
            dropped,
            ..MergeReport::default()
        };
        let Some(part) = batch.part.filter(|p| p.site != self.site) else {
            report.skipped = batch.changes.len();
            report.staged = self.staged_view();
            return Ok(report);
        };
        let key = part.origin();
        report.staged_changes = batch.changes.len();
        if !self.staged.contains_key(&key) && self.held.fits(&key, &batch.changes) {
            self.held.add(key, &batch.changes, upto);
            report.staged = self.staged_view();
            return Ok(report);
        }
        // On disk: what was held in memory of it goes first.
        let spilled = self.held.remove(&key);
        let txn = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let staged = (|| {
            if let Some(held) = &spilled {
                staging::stage(&txn, &mut self.staged, key, &held.changes, held.upto)?;
            }
            staging::stage(&txn, &mut self.staged, key, &batch.changes, upto)?;
            txn.commit()
        })();
        if let Err(e) = staged {
            self.staged = staging::load(&self.conn)?;
            if let Some(held) = spilled {
                self.held.put_back([(key, held)].into_iter().collect());
            }
            return Err(e.into());
        }
        report.staged = self.staged_view();
        Ok(report)
    }

    /// What is staged, on disk and in memory: per transaction, the highest `seq`.
    fn staged_view(&self) -> Staged {
        let mut view = self.staged.clone();
        for (key, held) in &self.held.parts {
            view.entry(*key).or_insert(held.upto);
        }
        view
    }

    /// Sweeps origin records no clock row refers to, once they exceed
    /// twice the live count after the last sweep plus the configured slack.
    fn maybe_collect_origins(&mut self) -> rusqlite::Result<()> {
        if self.origin_records <= 2 * self.origin_live_after_gc + self.config.origin_gc_slack {
            return Ok(());
        }
        let removed = self.conn.execute(&self.schema.origin_gc_sql(), [])?;
        self.origin_records = self.origin_records.saturating_sub(removed as u64);
        self.origin_live_after_gc = self.origin_records;
        tracing::debug!(removed, live = self.origin_records, "swept origin records");
        Ok(())
    }

    /// Reports changes this connection committed outside `merge`.
    ///
    /// cr-sqlite owns the connection's commit hook (it advances its version
    /// there), so a commit is noticed right after each command by comparing
    /// `crsql_db_version()` with the last version reported.
    fn notice_own_commits(&mut self, source: ChangeSource) {
        self.report_changes_since_last(source);
    }

    /// Reports changes other connections committed (cheap `PRAGMA data_version` check).
    fn notice_external(&mut self) {
        match data_version(&self.conn) {
            Ok(v) if v != self.last_data_version => {
                self.last_data_version = v;
                self.report_changes_since_last(ChangeSource::External);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "PRAGMA data_version failed"),
        }
    }

    fn report_changes_since_last(&mut self, source: ChangeSource) {
        let result = (|| -> rusqlite::Result<(BTreeSet<String>, i64)> {
            let now = db_version(&self.conn)?;
            if now <= self.last_reported {
                return Ok((BTreeSet::new(), now));
            }
            let since = self.last_reported;
            let (tables, _, count) = self.rows_since_counted(since)?;
            if self.config.tail.is_some() {
                // Another connection's commit may have moved the stored
                // cursor too: only a read of the file knows.
                let rows = match source {
                    ChangeSource::External => CommitRows::too_large(),
                    _ if count > TAIL_MAX_COMMIT_CHANGES => CommitRows::too_large(),
                    _ => committed_rows(&self.conn, self.site, since)
                        .map(|(rows, _)| rows)
                        .unwrap_or_else(|e| {
                            tracing::warn!(error = %e, "reading a commit's rows failed");
                            CommitRows::too_large()
                        }),
                };
                self.feed_tail(rows);
            }
            Ok((tables, now))
        })();
        match result {
            Ok((tables, now)) => {
                self.last_reported = now;
                if !tables.is_empty() {
                    let _ = self.events.send(StoreEvent::Changed { tables, source });
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading changed tables failed"),
        }
    }

    /// Hands a commit's rows to the live tail, with the cursor a stream
    /// from the file would claim from now: our own entry at the newest
    /// version that holds rows (a read connection's `crsql_db_version()`;
    /// this connection's also counts transactions that wrote nothing).
    fn feed_tail(&mut self, rows: CommitRows) {
        let Some(tail) = &self.config.tail else {
            return;
        };
        let schema_version = user_version(&self.conn);
        match schema_version {
            Ok(schema_version) => {
                let head = self.own_version;
                let mut sender = self.remote.clone();
                sender.advance(self.site, DbVersion(head));
                tail.append(rows, head, sender, schema_version);
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the schema version after a commit failed");
                tail.clear_all();
            }
        }
    }

    /// The newest local version above `since` that holds rows of `tables`
    /// (and moves `own_version` to it): an index seek in each table's clock,
    /// where [`rows_since_counted`](Self::rows_since_counted) reads every row back.
    fn newest_local_in(
        &mut self,
        tables: &BTreeSet<String>,
        since: i64,
    ) -> rusqlite::Result<Option<i64>> {
        let mut newest = None;
        for table in tables {
            let clock = quote_ident(&format!("{table}__crsql_clock"));
            let sql = format!("SELECT max(db_version) FROM {clock} WHERE db_version > ?1");
            let version: Option<i64> = self
                .conn
                .prepare_cached(&sql)?
                .query_row([since], |r| r.get(0))?;
            newest = newest.max(version);
        }
        if let Some(version) = newest {
            self.own_version = self.own_version.max(version);
        }
        Ok(newest)
    }

    /// The tables with rows at local versions above `since`, the highest
    /// such version, and the number of rows; raises our own cursor entry to
    /// that version (rows on disk survive a restart).
    fn rows_since_counted(
        &mut self,
        since: i64,
    ) -> rusqlite::Result<(BTreeSet<String>, Option<i64>, usize)> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT \"table\", max(db_version), count(*) FROM crsql_changes WHERE db_version > ?1 GROUP BY \"table\"",
        )?;
        let mut tables = BTreeSet::new();
        let mut newest = None;
        let mut count = 0usize;
        let mut rows = stmt.query([since])?;
        while let Some(row) = rows.next()? {
            tables.insert(row.get::<_, String>(0)?);
            let version: i64 = row.get(1)?;
            count += row.get::<_, i64>(2)?.max(0) as usize;
            newest = newest.max(Some(version));
            self.own_version = self.own_version.max(version);
        }
        Ok((tables, newest, count))
    }

    /// Saves the acknowledged own version, if it moved (a copy of the file
    /// made later keeps exactly these writes under the old site id).
    fn save_verified(&mut self) {
        if self.verified == self.verified_saved || self.copied.is_some() {
            return;
        }
        match identity::save_verified(&self.conn, self.verified) {
            Ok(()) => self.verified_saved = self.verified,
            Err(e) => tracing::warn!(error = %e, "saving the acknowledged version failed"),
        }
    }

    /// Saves the remote records seen since the last save.
    fn save_remotes(&mut self) {
        if self.remotes.is_empty() || self.copied.is_some() {
            return;
        }
        let saved = self
            .conn
            .transaction()
            .and_then(|txn| remotes::save(&txn, &self.remotes).and_then(|()| txn.commit()));
        match saved {
            Ok(()) => self.remotes.clear(),
            Err(e) => tracing::warn!(error = %e, "saving what we know of remotes failed"),
        }
    }

    fn close(mut self) -> Result<(), StoreError> {
        self.notice_external();
        self.save_verified();
        self.save_remotes();
        // Everything into the main file, even while a read connection is
        // still open: a copy of the file alone then carries what it holds
        // (its identity included).
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::debug!(error = %e, "checkpoint at close failed");
        }
        close_connection(self.conn)
    }
}

/// The transactions in parts that a merge completes: every one
/// (`complete`), the parts held in memory, and those the batch only covers
/// (no change of theirs in it).
#[derive(Clone, Copy)]
struct Completed<'a> {
    complete: &'a BTreeSet<(SiteId, DbVersion)>,
    in_memory: &'a BTreeMap<(SiteId, DbVersion), HeldPart>,
    covered: &'a [(SiteId, DbVersion)],
}

/// What a merge wrote, kept in memory for the live tail instead of read
/// back, while every change is known to be stored as it came: each either
/// changed nothing or wrote exactly itself (`crsql_rows_impacted()` went up
/// by one: not a resurrection, which also writes a row marker of its own),
/// in a type its column keeps ([`Schema::stored_as_given`]).
#[derive(Debug)]
struct RelayedRows {
    rows: Vec<(i64, Change)>,
    /// `crsql_rows_impacted()` after the last change.
    impacted: i64,
    /// False once some change may be stored otherwise: read back instead.
    exact: bool,
}

impl RelayedRows {
    fn new() -> Self {
        RelayedRows {
            rows: Vec::new(),
            impacted: 0,
            exact: true,
        }
    }

    fn give_up(&mut self) {
        self.exact = false;
        self.rows = Vec::new();
    }

    /// `c` was just handed to cr-sqlite under local version `local`;
    /// `impacted` is [`ROWS_IMPACTED`], prepared.
    fn note(
        &mut self,
        impacted: &mut rusqlite::Statement<'_>,
        schema: &Schema,
        c: &Change,
        local: i64,
    ) -> rusqlite::Result<()> {
        if !self.exact {
            return Ok(());
        }
        let now = rows_impacted(impacted)?;
        let wrote = now - std::mem::replace(&mut self.impacted, now);
        match wrote {
            0 => {} // lost, or equal to what is there
            1 if self.rows.len() < TAIL_MAX_COMMIT_CHANGES && schema.stored_as_given(c) => {
                self.rows.push((local, c.clone()));
            }
            _ => self.give_up(),
        }
        Ok(())
    }

    /// The rows as [`committed_rows`] reads them back, in `(local version,
    /// seq)` order, and the highest local version among them.
    fn into_rows(mut self) -> (CommitRows, Option<i64>) {
        self.rows.sort_by_key(|(local, c)| (*local, c.seq));
        let newest = self.rows.last().map(|(local, _)| *local);
        let mut out = CommitRows::default();
        for (local, change) in self.rows {
            out.push(local, change);
        }
        (out, newest)
    }
}

/// Rows cr-sqlite's merges changed in the transaction so far.
const ROWS_IMPACTED: &str = "SELECT crsql_rows_impacted()";

fn rows_impacted(stmt: &mut rusqlite::Statement<'_>) -> rusqlite::Result<i64> {
    stmt.query_row([], |r| r.get(0))
}

/// The rows at local versions above `since`, as a change stream reads them
/// (origin versions from `crsync_origin`), in `(local version, seq)` order,
/// and the highest local version among them.
fn committed_rows(
    conn: &Connection,
    own_site: SiteId,
    since: i64,
) -> rusqlite::Result<(CommitRows, Option<i64>)> {
    let mut stmt = conn.prepare_cached(CHANGES_AFTER_SQL)?;
    let mut rows = stmt.query([since])?;
    let mut out = CommitRows::default();
    let mut newest = None;
    while let Some(row) = rows.next()? {
        let local: i64 = row.get(5)?;
        newest = newest.max(Some(local));
        out.push(local, change_of_row(row, own_site)?);
    }
    Ok((out, newest))
}

/// Runs `crsql_finalize()` (required by cr-sqlite) and closes the connection.
pub(super) fn close_connection(conn: Connection) -> Result<(), StoreError> {
    conn.query_row("SELECT crsql_finalize()", [], |_| Ok(()))?;
    conn.close().map_err(|(_, e)| StoreError::Sqlite(e))
}

// The writer asks these around every command: prepared once per connection.

pub(super) fn db_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT crsql_db_version()")?
        .query_row([], |r| r.get(0))
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA user_version")?
        .query_row([], |r| r.get(0))
}
