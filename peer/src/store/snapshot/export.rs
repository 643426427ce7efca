//! Exporting a prepared snapshot of a database (see [`super`]).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, TransactionBehavior, params};

use super::{
    LOCAL_TABLES, SIDE_FILES, SNAPSHOT_PLACEHOLDER_SITE, changes_after, max_clock_version,
    open_existing, sync_file, table_exists, with_suffix,
};
use crate::store::fork::rekey;
use crate::store::schema::load_remote_cursor;
use crate::store::writer::close_connection;
use crate::{Cursor, SiteId, StoreError};

/// A snapshot written by [`Store::export_snapshot`](crate::Store::export_snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotExport {
    /// The snapshot file.
    pub path: PathBuf,
    /// The exporting database's site id (its writes keep it in the snapshot).
    pub site_id: SiteId,
    /// The exporter's own version at the snapshot: the highest local version
    /// of any row in it. The database has moved on since the snapshot by the
    /// changes above it ([`Store::count_changes_after`](crate::Store::count_changes_after)).
    pub version: i64,
    /// The snapshot's cursor: the exporter's cursor at the snapshot (its own
    /// site at `version`, and every origin it had merged).
    pub cursor: Cursor,
    /// Changes in the snapshot (live cells, as `crsql_changes` lists them).
    pub changes: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// Exporting a snapshot failed; nothing is left at the destination.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// SQLite failed while copying or preparing the snapshot.
    #[error("cannot export a snapshot of {source_db} to {dest}: {source}")]
    Sqlite {
        /// The database exported.
        source_db: PathBuf,
        /// The snapshot file.
        dest: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file system failed (the destination's name, a sync, a removal).
    #[error("cannot write the snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database file no longer has the site id of the Store exporting it
    /// (it was forked or replaced under the open Store).
    #[error("{path} has site id {found}, not the exporting Store's {expected}")]
    SiteChanged {
        /// The database file.
        path: PathBuf,
        /// The Store's site id.
        expected: SiteId,
        /// The file's.
        found: String,
    },
    /// The export's worker thread failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Copies the database at `source` (whose site id is `site`) to `dest` with
/// `VACUUM INTO` and prepares the copy (see [`super`]). `dest` is replaced.
pub(crate) fn export(
    source: &Path,
    site: SiteId,
    dest: &Path,
) -> Result<SnapshotExport, ExportError> {
    remove_with_side_files(dest)?;
    let result = export_to(source, site, dest);
    if result.is_err() {
        let _ = remove_with_side_files(dest);
    }
    result
}

fn export_to(source: &Path, site: SiteId, dest: &Path) -> Result<SnapshotExport, ExportError> {
    let sqlite = |e: rusqlite::Error| ExportError::Sqlite {
        source_db: source.to_path_buf(),
        dest: dest.to_path_buf(),
        source: e,
    };
    let into = dest.to_str().ok_or_else(|| ExportError::Io {
        path: dest.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the snapshot path is not valid UTF-8",
        ),
    })?;
    // One read transaction of the source: a consistent copy, while the
    // Store's writer goes on (WAL).
    let conn = open_existing(source).map_err(sqlite)?;
    let copied = conn.execute("VACUUM INTO ?1", [into]);
    close_connection(conn)?;
    copied.map_err(sqlite)?;

    let mut conn = Connection::open(dest).map_err(sqlite)?;
    let prepared = prepare(&mut conn, site, dest);
    close_connection(conn)?;
    let (version, cursor, changes) = prepared?;
    for suffix in SIDE_FILES {
        let side = with_suffix(dest, suffix);
        if side.exists() {
            return Err(ExportError::Io {
                path: side,
                source: std::io::Error::other("SQLite left a side file behind the snapshot"),
            });
        }
    }
    let io = |e| ExportError::Io {
        path: dest.to_path_buf(),
        source: e,
    };
    sync_file(dest).map_err(io)?;
    let bytes = std::fs::metadata(dest).map_err(io)?.len();
    Ok(SnapshotExport {
        path: dest.to_path_buf(),
        site_id: site,
        version,
        cursor,
        changes,
        bytes,
    })
}

/// Prepares the copy in one transaction: re-keys ordinal 0, clears what must
/// not travel, writes the exporter's own cursor entry. Returns the
/// exporter's version, the snapshot's cursor and its number of changes.
fn prepare(
    conn: &mut Connection,
    site: SiteId,
    dest: &Path,
) -> Result<(i64, Cursor, u64), ExportError> {
    let sqlite = |e: rusqlite::Error| ExportError::Sqlite {
        source_db: dest.to_path_buf(),
        dest: dest.to_path_buf(),
        source: e,
    };
    // A copy nobody else opens, discarded on any failure: it needs no
    // rollback journal (re-keying rewrites every clock row).
    conn.pragma_update(None, "journal_mode", "DELETE")
        .and_then(|()| conn.pragma_update(None, "journal_mode", "OFF"))
        .and_then(|()| conn.pragma_update(None, "synchronous", "OFF"))
        .map_err(sqlite)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Exclusive)
        .map_err(sqlite)?;
    let own: Vec<u8> = tx
        .query_row(
            "SELECT site_id FROM crsql_site_id WHERE ordinal = 0",
            [],
            |r| r.get(0),
        )
        .map_err(sqlite)?;
    if own.as_slice() != site.as_bytes().as_slice() {
        return Err(ExportError::SiteChanged {
            path: dest.to_path_buf(),
            expected: site,
            found: hex::encode(&own),
        });
    }
    let prepared = (|| {
        rekey(&tx, &own, SNAPSHOT_PLACEHOLDER_SITE, i64::MAX)?;
        // Facts about the server's file and its remotes, and its own
        // history, do not travel; zeroed as they are deleted, so they do not
        // travel in free pages either.
        tx.pragma_update(None, "secure_delete", true)?;
        for table in ["crsync_meta", "crsync_remotes"]
            .into_iter()
            .chain(LOCAL_TABLES)
        {
            if table_exists(&tx, table)? {
                tx.execute(&format!("DELETE FROM {table}"), [])?;
            }
        }
        tx.pragma_update(None, "secure_delete", false)?;
        let version = max_clock_version(&tx)?;
        if version > 0 {
            tx.execute(
                "INSERT INTO crsync_cursor (site_id, db_version) VALUES (?1, ?2)
                 ON CONFLICT (site_id) DO UPDATE SET db_version = max(db_version, excluded.db_version)",
                params![own, version],
            )?;
        }
        let cursor = load_remote_cursor(&tx)?;
        let changes = changes_after(&tx, 0)?;
        Ok((version, cursor, changes))
    })()
    .map_err(sqlite)?;
    tx.commit().map_err(sqlite)?;
    conn.pragma_update(None, "journal_mode", "DELETE")
        .map_err(sqlite)?;
    Ok(prepared)
}

/// Removes `path` and SQLite's side files of it, if present.
fn remove_with_side_files(path: &Path) -> Result<(), ExportError> {
    for suffix in std::iter::once("").chain(SIDE_FILES) {
        let file = with_suffix(path, suffix);
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ExportError::Io { path: file, source }),
        }
    }
    Ok(())
}
