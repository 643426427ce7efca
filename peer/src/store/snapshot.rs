//! Snapshots: a new replica starts from a copy of another's file instead of
//! replaying every change.
//!
//! - **Export** ([`Store::export_snapshot`](crate::Store::export_snapshot),
//!   run by the server): `VACUUM INTO` a consistent copy of the database,
//!   then *prepare* it so that installing it is O(1): the exporter's own
//!   writes (clock rows on ordinal 0) move to an ordinal of their own that
//!   holds the exporter's site id, exactly as a fork that keeps everything
//!   ([`Store::fork`](crate::Store::fork)); ordinal 0 gets a placeholder id
//!   (16 zero bytes); bookkeeping that must not travel is cleared
//!   (`crsync_meta`, the identity of the exporter's file; the staging tables
//!   of chunked transactions, `crsync_staged` and `crsync_staging`, and the
//!   conflict history `crsync_conflicts`, where they exist; with
//!   `secure_delete`, so their bytes do not linger in free pages); and `crsync_cursor` gets the exporter's own site at its own
//!   version, so the snapshot's cursor is the exporter's cursor at the
//!   snapshot. `crsync_origin` stays: it maps merged rows' local versions to
//!   their origin versions, which the copy keeps.
//! - **Install** ([`Store::install_snapshot`](crate::Store::install_snapshot),
//!   run by the new replica, before any Store opens the target): checks the
//!   file (`PRAGMA quick_check`, a prepared snapshot's placeholder on
//!   ordinal 0), gives ordinal 0 a new random site id, records the file's
//!   identity with nothing acknowledged, and renames it into place. The
//!   target must be absent or an empty database: user data is never
//!   overwritten.
//!
//! The result holds the exporter's rows and cursor at the snapshot; it then
//! syncs only what came after. Its own writes sync under its new site id, and
//! the exporter's writes stay attributed to the exporter.

mod export;
mod install;

use std::path::Path;

use rusqlite::Connection;

pub use export::{ExportError, SnapshotExport};
pub use install::{InstallError, InstallReport};

pub(crate) use export::export;
pub(crate) use install::{check_target_only, install, snapshot_floor};

use super::fork::clock_tables;
use super::schema::quote_ident;
use super::writer::close_connection;
use crate::StoreError;

/// The site id ordinal 0 holds in a prepared snapshot, until a replica
/// installs it and gives it a site id of its own.
pub const SNAPSHOT_PLACEHOLDER_SITE: crate::SiteId = crate::SiteId::from_bytes([0; 16]);

/// Bookkeeping tables of chunked transactions: what a receiver staged of
/// transactions not complete yet. They describe the exporter's sessions, not
/// the data, so a snapshot leaves them empty.
/// Tables of a replica's own that a snapshot leaves empty (besides `crsync_meta`).
const LOCAL_TABLES: [&str; 3] = ["crsync_staged", "crsync_staging", "crsync_conflicts"];

/// Changes (live cells, as `crsql_changes` lists them) written at local
/// versions above `version`, on a connection of its own (`0`: all of them).
pub(crate) fn count_changes_after(path: &Path, version: i64) -> Result<u64, StoreError> {
    let conn = open_existing(path)?;
    // One read transaction: every table counted at the same version.
    let counted = conn.execute_batch("BEGIN").and_then(|()| {
        let counted = changes_after(&conn, version);
        let _ = conn.execute_batch("ROLLBACK");
        counted
    });
    close_connection(conn)?;
    Ok(counted?)
}

/// A connection to an existing database file (never creates one), with a
/// busy timeout.
fn open_existing(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// As [`count_changes_after`], on `conn` (in the caller's transaction).
fn changes_after(conn: &Connection, version: i64) -> rusqlite::Result<u64> {
    let mut total = 0u64;
    for clock in clock_tables(conn)? {
        // cr-sqlite indexes clock rows by db_version: this reads only the
        // rows above `version`.
        let n: i64 = conn.query_row(
            &format!(
                "SELECT count(*) FROM {} WHERE db_version > ?1",
                quote_ident(&clock)
            ),
            [version],
            |r| r.get(0),
        )?;
        total += n as u64;
    }
    Ok(total)
}

/// The highest local version any clock row holds (0 for none): the
/// database's own cursor entry when it was last written.
fn max_clock_version(conn: &Connection) -> rusqlite::Result<i64> {
    let mut newest = 0i64;
    for clock in clock_tables(conn)? {
        let v: Option<i64> = conn.query_row(
            &format!("SELECT max(db_version) FROM {}", quote_ident(&clock)),
            [],
            |r| r.get(0),
        )?;
        newest = newest.max(v.unwrap_or(0));
    }
    Ok(newest)
}

/// Whether the table exists in the main schema.
fn table_exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// Durably writes a file's data (after SQLite closed it).
fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Durably records renames in `dir` (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// `path` with `suffix` appended to its file name (`a.db` + `-wal`).
fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    std::path::PathBuf::from(name)
}

/// SQLite's side files of a database.
const SIDE_FILES: [&str; 3] = ["-wal", "-shm", "-journal"];
