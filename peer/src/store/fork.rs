//! [`Store::fork`](crate::Store::fork): a new site id for a copied database file.
//!
//! cr-sqlite keeps the local site id as ordinal 0 of `crsql_site_id`, and
//! every clock row names its writer by ordinal. Forking gives ordinal 0 a new
//! random site id and moves the old one to a new ordinal. The file's own
//! writes up to its verified version (those that predate any copy, see
//! [`identity`](super::identity)) keep the old site id, so nothing the
//! original already sent is sent again as new; its writes after that stay on
//! ordinal 0 and so become the new site's, and sync as new writes. The
//! cursor holds the old site up to the verified version, so the original's
//! later writes come in from the other replicas.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, TransactionBehavior, params};

use super::identity;
use super::schema::{BOOTSTRAP_SQL, quote_ident};
use super::writer::close_connection;
use crate::{ExtensionError, OpenError, SiteId, StoreError};

/// What a fork changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ForkReport {
    /// The site id the file had (its earlier writes keep it).
    pub old_site: SiteId,
    /// The file's new site id.
    pub new_site: SiteId,
    /// Own writes up to this version keep the old site id.
    pub kept_upto: i64,
    /// Cells re-attributed to the new site id (written after `kept_upto`).
    pub reattributed: u64,
}

/// Forking failed; the file is unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForkError {
    /// The cr-sqlite extension could not be loaded.
    #[error(transparent)]
    Extension(#[from] ExtensionError),
    /// No such file (forking never creates one).
    #[error("no database file at {0}")]
    Missing(PathBuf),
    /// The file is not a cr-sqlite database.
    #[error("{0} has no cr-sqlite site id: it is not a crsync database")]
    NotCrsync(PathBuf),
    /// The file cannot be opened (for example it is not a SQLite database).
    #[error(transparent)]
    Open(#[from] OpenError),
    /// SQLite failed (the transaction was rolled back).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for ForkError {
    fn from(e: rusqlite::Error) -> Self {
        ForkError::Store(StoreError::Sqlite(e))
    }
}

/// Forks the file at `path`, which no Store may have open (a process that
/// has it open keeps the old site id cached).
pub(crate) fn fork(path: &Path, extension: Option<&Path>) -> Result<ForkReport, ForkError> {
    if !path.is_file() {
        return Err(ForkError::Missing(path.to_path_buf()));
    }
    crate::load_extension(extension)?;
    let mut conn = Connection::open(path).map_err(|e| OpenError::opening(path, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let result = fork_on(&mut conn, path);
    close_connection(conn)?;
    result
}

fn fork_on(conn: &mut Connection, path: &Path) -> Result<ForkReport, ForkError> {
    conn.execute_batch(BOOTSTRAP_SQL)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    let old: Vec<u8> = tx
        .query_row(
            "SELECT site_id FROM crsql_site_id WHERE ordinal = 0",
            [],
            |r| r.get(0),
        )
        .map_err(|_| ForkError::NotCrsync(path.to_path_buf()))?;
    let old_site =
        SiteId::from_slice(&old).map_err(|_| ForkError::NotCrsync(path.to_path_buf()))?;
    let new_site = SiteId::from_bytes(rand::random());
    let kept_upto = identity::verified_version(&tx)?;

    let reattributed = rekey(&tx, &old, new_site, kept_upto)?.left_on_new;
    if kept_upto > 0 {
        tx.execute(
            "INSERT INTO crsync_cursor (site_id, db_version) VALUES (?1, ?2)
             ON CONFLICT (site_id) DO UPDATE SET db_version = max(db_version, excluded.db_version)",
            params![old, kept_upto],
        )?;
    }
    // The new site id has no acknowledged writes yet.
    identity::record(&tx, path, 0)?;
    tx.commit()?;
    Ok(ForkReport {
        old_site,
        new_site,
        kept_upto,
        reattributed,
    })
}

/// What [`rekey`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rekeyed {
    /// The ordinal the old site id now has.
    pub(super) ordinal: i64,
    /// Clock rows left on ordinal 0 (written after `upto`): they are the new site's.
    pub(super) left_on_new: u64,
}

/// The re-keying both a fork and a snapshot use: ordinal 0 of
/// `crsql_site_id` (cr-sqlite's local site) gets `new_site`, the old site id
/// `old` moves to an ordinal of its own, and own clock rows up to version
/// `upto` move with it (`i64::MAX`: all of them), so they keep their
/// attribution. Runs inside the caller's transaction.
pub(super) fn rekey(
    tx: &rusqlite::Transaction<'_>,
    old: &[u8],
    new_site: SiteId,
    upto: i64,
) -> rusqlite::Result<Rekeyed> {
    tx.execute(
        "UPDATE crsql_site_id SET site_id = ?1 WHERE ordinal = 0",
        [new_site.as_bytes().as_slice()],
    )?;
    tx.execute(
        "INSERT OR IGNORE INTO crsql_site_id (site_id) VALUES (?1)",
        [old],
    )?;
    let ordinal: i64 = tx.query_row(
        "SELECT ordinal FROM crsql_site_id WHERE site_id = ?1",
        [old],
        |r| r.get(0),
    )?;
    let mut left_on_new = 0u64;
    for clock in clock_tables(tx)? {
        let table = quote_ident(&clock);
        tx.execute(
            &format!("UPDATE {table} SET site_id = ?1 WHERE site_id = 0 AND db_version <= ?2"),
            params![ordinal, upto],
        )?;
        if upto < i64::MAX {
            let later: i64 = tx.query_row(
                &format!("SELECT count(*) FROM {table} WHERE site_id = 0"),
                [],
                |r| r.get(0),
            )?;
            left_on_new += later as u64;
        }
    }
    Ok(Rekeyed {
        ordinal,
        left_on_new,
    })
}

/// cr-sqlite's clock tables (one per CRR: `<table>__crsql_clock`).
pub(super) fn clock_tables(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '%\\_\\_crsql\\_clock' ESCAPE '\\'",
    )?;
    stmt.query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()
}
