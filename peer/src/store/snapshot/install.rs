//! Installing a downloaded snapshot as a new replica (see [`super`]).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::{
    SIDE_FILES, SNAPSHOT_PLACEHOLDER_SITE, open_existing, sync_dir, sync_file, table_exists,
    with_suffix,
};
use crate::store::fork::clock_tables;
use crate::store::identity;
use crate::store::schema::{BOOTSTRAP_SQL, load_remote_cursor, quote_ident};
use crate::store::writer::{close_connection, db_version};
use crate::{Cursor, DbVersion, ExtensionError, SiteId, StoreError};

/// What [`Store::install_snapshot`](crate::Store::install_snapshot) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstallReport {
    /// The database file now in place.
    pub path: PathBuf,
    /// Its new site id (its own writes will sync under it).
    pub site_id: SiteId,
    /// Its cursor: the snapshot's (the exporter's at the snapshot), plus its
    /// own entry.
    pub cursor: Cursor,
    /// Rows in its CRR tables.
    pub rows: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// The target existed (an empty database) and was replaced.
    pub replaced_empty: bool,
}

/// Installing a snapshot failed. The target is unchanged; the snapshot file
/// is kept (a failure before its checks passed changed nothing in it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// The cr-sqlite extension could not be loaded.
    #[error(transparent)]
    Extension(#[from] ExtensionError),
    /// No snapshot file at this path.
    #[error("no snapshot file at {0}")]
    Missing(PathBuf),
    /// The file is not an intact SQLite database.
    #[error("the snapshot {path} is damaged: {detail}")]
    Corrupt {
        /// The snapshot file.
        path: PathBuf,
        /// What SQLite reported (`PRAGMA quick_check`, or the open error).
        detail: String,
    },
    /// The file is a database, but not a snapshot prepared for installing
    /// (no cr-sqlite site table, or ordinal 0 is not the placeholder).
    #[error("{path} is not a crsync snapshot: {reason}")]
    NotASnapshot {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The target holds data, which a snapshot never overwrites.
    #[error(
        "{target} already holds data ({rows} {} in {table}); a snapshot is only installed as \
         a new file or over an empty database", if *rows == 1 { "row" } else { "rows" }
    )]
    TargetNotEmpty {
        /// The target file.
        target: PathBuf,
        /// A table with rows.
        table: String,
        /// Its rows.
        rows: u64,
    },
    /// The target exists but is not a database that could be checked.
    #[error("{target} exists and is not a readable database ({detail}); not replacing it")]
    TargetUnreadable {
        /// The target file.
        target: PathBuf,
        /// Why.
        detail: String,
    },
    /// Another connection has the target open (its `-wal` or `-journal` is
    /// still there once ours closed).
    #[error("{target} is open in another process ({side} exists); close it first")]
    TargetInUse {
        /// The target file.
        target: PathBuf,
        /// The side file found.
        side: PathBuf,
    },
    /// SQLite failed on the snapshot.
    #[error("cannot install the snapshot {path}: {source}")]
    Sqlite {
        /// The snapshot file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file system failed.
    #[error("cannot install the snapshot as {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Closing a connection or a worker thread failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Installs the snapshot `file` as `target` (see [`super`]).
pub(crate) fn install(
    file: &Path,
    target: &Path,
    extension: Option<&Path>,
) -> Result<InstallReport, InstallError> {
    crate::load_extension(extension)?;
    if !file.is_file() {
        return Err(InstallError::Missing(file.to_path_buf()));
    }
    let replaced_empty = check_target(target)?;
    let (site_id, cursor, rows) = give_identity(file)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    sync_file(file).map_err(io(file))?;
    let bytes = std::fs::metadata(file).map_err(io(file))?.len();
    move_into_place(file, target, replaced_empty)?;
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(dir).map_err(io(dir))?;
    }
    Ok(InstallReport {
        path: target.to_path_buf(),
        site_id,
        cursor,
        rows,
        bytes,
        replaced_empty,
    })
}

/// Checks the snapshot and gives ordinal 0 a new random site id, in one
/// transaction (a crash before its commit leaves the file as downloaded;
/// after it, installing again just picks another id). Returns the new site
/// id, the cursor and the rows of the CRR tables.
fn give_identity(file: &Path) -> Result<(SiteId, Cursor, u64), InstallError> {
    check_header(file)?;
    let mut conn = open_existing(file).map_err(|e| InstallError::Corrupt {
        path: file.to_path_buf(),
        detail: format!("SQLite cannot open it: {e}"),
    })?;
    let result = give_identity_on(&mut conn, file);
    let closed = close_connection(conn);
    let done = result?;
    closed?;
    Ok(done)
}

fn give_identity_on(
    conn: &mut Connection,
    file: &Path,
) -> Result<(SiteId, Cursor, u64), InstallError> {
    let sqlite = |e| corrupt_or_sqlite(file, e);
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(sqlite)?;
    if check != "ok" {
        return Err(InstallError::Corrupt {
            path: file.to_path_buf(),
            detail: check,
        });
    }
    let not_snapshot = |reason: &str| InstallError::NotASnapshot {
        path: file.to_path_buf(),
        reason: reason.to_owned(),
    };
    if !table_exists(conn, "crsql_site_id").map_err(sqlite)? {
        return Err(not_snapshot(
            "it has no cr-sqlite site table (crsql_site_id)",
        ));
    }
    let local: Option<Vec<u8>> = conn
        .query_row(
            "SELECT site_id FROM crsql_site_id WHERE ordinal = 0",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(sqlite)?;
    match local {
        Some(id) if id.as_slice() == SNAPSHOT_PLACEHOLDER_SITE.as_bytes().as_slice() => {}
        // An install that stopped between its commit and the move: its site
        // id was never used (no own writes), so it may get another.
        Some(_) if half_installed(conn).map_err(sqlite)? => {}
        Some(id) => {
            return Err(not_snapshot(&format!(
                "its local site id is {}, not the placeholder of a prepared snapshot \
                 (is it a database file, not a snapshot?)",
                hex::encode(id)
            )));
        }
        None => return Err(not_snapshot("it has no local site id (ordinal 0)")),
    }
    conn.execute_batch(BOOTSTRAP_SQL).map_err(sqlite)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Exclusive)
        .map_err(sqlite)?;
    let site = SiteId::from_bytes(rand::random());
    let done = (|| {
        tx.execute(
            "UPDATE crsql_site_id SET site_id = ?1 WHERE ordinal = 0",
            [site.as_bytes().as_slice()],
        )?;
        let version = db_version(&tx)?;
        tx.execute("DELETE FROM crsync_meta", [])?;
        // The file's own writes all come after this version.
        tx.execute(
            "INSERT INTO crsync_meta (key, value) VALUES (?1, ?2)",
            rusqlite::params![INSTALLED_MARK, version],
        )?;
        // Nothing of the new site id was acknowledged by anyone. The inode
        // recorded is the target's once renamed (a rename keeps it).
        identity::record(&tx, file, 0)?;
        let mut cursor = load_remote_cursor(&tx)?;
        // What the snapshot held: a remote holding that much holds every row
        // up to `version` (see `snapshot_floor`).
        tx.execute(
            "INSERT INTO crsync_meta (key, value) VALUES (?1, ?2)",
            rusqlite::params![
                SNAPSHOT_CURSOR,
                serde_json::to_string(&cursor).unwrap_or_default()
            ],
        )?;
        cursor.advance(site, DbVersion(version));
        let mut rows = 0u64;
        for clock in clock_tables(&tx)? {
            let Some(table) = clock.strip_suffix("__crsql_clock") else {
                continue;
            };
            if table_exists(&tx, table)? {
                let n: i64 = tx.query_row(
                    &format!("SELECT count(*) FROM {}", quote_ident(table)),
                    [],
                    |r| r.get(0),
                )?;
                rows += n as u64;
            }
        }
        Ok((cursor, rows))
    })()
    .map_err(sqlite)?;
    tx.commit().map_err(sqlite)?;
    Ok((site, done.0, done.1))
}

/// Checks the SQLite header: the magic string, and a file at least as long
/// as the pages the header counts (a cut download is caught here, before
/// cr-sqlite reads the file).
fn check_header(file: &Path) -> Result<(), InstallError> {
    use std::io::Read as _;
    let corrupt = |detail: String| InstallError::Corrupt {
        path: file.to_path_buf(),
        detail,
    };
    let mut header = [0u8; 100];
    let mut f = std::fs::File::open(file).map_err(|source| InstallError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    let len = f
        .metadata()
        .map_err(|source| InstallError::Io {
            path: file.to_path_buf(),
            source,
        })?
        .len();
    if f.read_exact(&mut header).is_err() || &header[..16] != b"SQLite format 3\0" {
        return Err(corrupt("not an SQLite database (no SQLite header)".into()));
    }
    let be32 = |at: usize| {
        u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536u64,
        n => u64::from(n),
    };
    // The page count in the header is valid when the change counter matches
    // the "version valid for" number (SQLite 3.7.0 and later write both).
    if be32(24) == be32(92) {
        let expected = u64::from(be32(28)) * page_size;
        if len < expected {
            return Err(corrupt(format!(
                "truncated: {len} bytes, the header counts {} pages of {page_size} bytes ({expected} bytes)",
                be32(28)
            )));
        }
    }
    Ok(())
}

/// Key in `crsync_meta` of a file installed from a snapshot, with the
/// snapshot's version as its value: every own write of the file is above it
/// (a fact about the file, like its identity; `crsync_meta` never travels).
/// A reader could start a stream for a remote that holds none of our own
/// writes there instead of at 0.
const INSTALLED_MARK: &str = "installed_from_snapshot";
/// Key in `crsync_meta` of the cursor of the snapshot a file was installed from.
const SNAPSHOT_CURSOR: &str = "snapshot_cursor";

/// For a file installed from a snapshot: the snapshot's version and cursor.
/// Every row at a local version up to it came with the snapshot, so a
/// stream for a remote whose cursor covers the snapshot's starts after it
/// (instead of reading the whole file to find none of our own writes).
pub(crate) fn snapshot_floor(conn: &Connection) -> rusqlite::Result<Option<(i64, Cursor)>> {
    let get = |key: &str| {
        conn.query_row("SELECT value FROM crsync_meta WHERE key = ?1", [key], |r| {
            r.get::<_, rusqlite::types::Value>(0)
        })
        .optional()
    };
    let (Some(rusqlite::types::Value::Integer(version)), Some(rusqlite::types::Value::Text(json))) =
        (get(INSTALLED_MARK)?, get(SNAPSHOT_CURSOR)?)
    else {
        return Ok(None);
    };
    Ok(serde_json::from_str(&json)
        .ok()
        .map(|cursor| (version, cursor)))
}

/// Whether the file was given its identity by an install and has no writes
/// of its own since (no clock row on ordinal 0; a full scan, on this rare
/// path only).
fn half_installed(conn: &Connection) -> rusqlite::Result<bool> {
    if !table_exists(conn, "crsync_meta")? {
        return Ok(false);
    }
    let marked: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM crsync_meta WHERE key = ?1",
            [INSTALLED_MARK],
            |r| r.get(0),
        )
        .optional()?;
    if marked.is_none() {
        return Ok(false);
    }
    for clock in clock_tables(conn)? {
        let own: Option<i64> = conn
            .query_row(
                &format!(
                    "SELECT 1 FROM {} WHERE site_id = 0 LIMIT 1",
                    quote_ident(&clock)
                ),
                [],
                |r| r.get(0),
            )
            .optional()?;
        if own.is_some() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn corrupt_or_sqlite(file: &Path, e: rusqlite::Error) -> InstallError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => InstallError::Corrupt {
            path: file.to_path_buf(),
            detail: e.to_string(),
        },
        _ => InstallError::Sqlite {
            path: file.to_path_buf(),
            source: e,
        },
    }
}

/// [`Store::check_snapshot_target`](crate::Store::check_snapshot_target).
pub(crate) fn check_target_only(
    target: &Path,
    extension: Option<&Path>,
) -> Result<bool, InstallError> {
    crate::load_extension(extension)?;
    check_target(target)
}

/// Whether `target` may be replaced: `Ok(false)` if it does not exist (stale
/// side files of a removed database are deleted, so SQLite cannot apply
/// them to the new file), `Ok(true)` if it is an empty database nobody else
/// has open; otherwise the refusal.
fn check_target(target: &Path) -> Result<bool, InstallError> {
    let io = |source| InstallError::Io {
        path: target.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            for suffix in SIDE_FILES {
                let side = with_suffix(target, suffix);
                match std::fs::remove_file(&side) {
                    Ok(()) => {
                        tracing::warn!(file = %side.display(), "removed a stale side file of a database that no longer exists")
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(InstallError::Io { path: side, source }),
                }
            }
            return Ok(false);
        }
        Err(e) => return Err(io(e)),
        Ok(meta) if !meta.is_file() => {
            return Err(InstallError::TargetUnreadable {
                target: target.to_path_buf(),
                detail: "not a regular file".into(),
            });
        }
        Ok(_) => {}
    }
    let unreadable = |e: rusqlite::Error| InstallError::TargetUnreadable {
        target: target.to_path_buf(),
        detail: e.to_string(),
    };
    let conn = open_existing(target).map_err(unreadable)?;
    let found = first_table_with_rows(&conn);
    close_connection(conn)?;
    if let Some((table, rows)) = found.map_err(unreadable)? {
        return Err(InstallError::TargetNotEmpty {
            target: target.to_path_buf(),
            table,
            rows,
        });
    }
    for suffix in ["-wal", "-journal"] {
        let side = with_suffix(target, suffix);
        if side.exists() {
            return Err(InstallError::TargetInUse {
                target: target.to_path_buf(),
                side,
            });
        }
    }
    // Left by a connection that closed: it belongs to the old file.
    match std::fs::remove_file(with_suffix(target, "-shm")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
        _ => Ok(true),
    }
}

/// A table of the user's (CRR or not, clock tables included) that has rows.
/// cr-sqlite's and crsync's own bookkeeping does not count.
fn first_table_with_rows(conn: &Connection) -> rusqlite::Result<Option<(String, u64)>> {
    let names: Vec<String> = {
        let mut stmt = conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
             AND name NOT LIKE 'crsql\\_%' ESCAPE '\\' \
             AND name NOT LIKE 'crsync\\_%' ESCAPE '\\' \
             ORDER BY name",
        )?;
        stmt.query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for name in names {
        let rows: i64 = conn.query_row(
            &format!("SELECT count(*) FROM {}", quote_ident(&name)),
            [],
            |r| r.get(0),
        )?;
        if rows > 0 {
            return Ok(Some((name, rows as u64)));
        }
    }
    Ok(None)
}

/// Moves the installed file to `target`: a hard link then an unlink where
/// the target must not exist (so a file created meanwhile is never
/// replaced), a rename over the empty database otherwise.
fn move_into_place(file: &Path, target: &Path, replace: bool) -> Result<(), InstallError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    if replace {
        return std::fs::rename(file, target).map_err(io(target));
    }
    match std::fs::hard_link(file, target) {
        Ok(()) => std::fs::remove_file(file).map_err(io(file)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(InstallError::TargetNotEmpty {
                target: target.to_path_buf(),
                table: "(a file created while installing)".into(),
                rows: 0,
            })
        }
        // No hard links on this file system: a plain rename.
        Err(_) => std::fs::rename(file, target).map_err(io(target)),
    }
}
