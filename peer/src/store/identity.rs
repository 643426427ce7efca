//! Which file a replica is: a copied database file is caught when it opens.
//!
//! cr-sqlite keeps the site id inside the file, so `cp a.db b.db`, a restored
//! backup or a VM image gives two replicas one site id. Both would write the
//! same versions with different rows, and whichever syncs second would see
//! its writes skipped as "already held". So the Store records the identity
//! of the file it was created in (device and inode) in `crsync_meta`, a
//! table that never syncs. A file whose identity differs is a copy: it opens
//! (its rows are readable and writable), but the Peer refuses to sync it
//! until it is forked (a new site id; see `crsync fork`).
//!
//! Also recorded: the newest own version a remote acknowledged holding
//! (`verified_version`; saved within a poll interval and at close). A copy
//! holds at most what the file held when copied, so its own writes above
//! that may differ from the original's: forking re-attributes those to the
//! new site id, and keeps the older ones under the old one. (Writes that no
//! remote had yet may be re-sent under the new id: equal values, no loss.)

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

/// A database file that is not the one its site id was recorded in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{path} is a copy of another replica (recorded file {recorded}, this file {actual}): it shares \
     that replica's site id {site}, and syncing both would lose writes. Run `crsync fork --db {path}` \
     to give this copy a new site id (its rows are kept)"
)]
pub struct CopiedFile {
    /// The database file.
    pub path: String,
    /// The site id it shares.
    pub site: String,
    /// The identity recorded when the site id was created (or first checked).
    pub recorded: String,
    /// This file's identity.
    pub actual: String,
    /// The newest own version known to predate the copy.
    pub verified_version: i64,
}

const FILE_ID: &str = "file_id";
const VERIFIED: &str = "verified_version";

/// The identity of the file at `path` (`device:inode`), if the platform has one.
pub(crate) fn file_id(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(format!("{}:{}", meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

fn get<T: rusqlite::types::FromSql>(conn: &Connection, key: &str) -> rusqlite::Result<Option<T>> {
    conn.query_row("SELECT value FROM crsync_meta WHERE key = ?1", [key], |r| {
        r.get(0)
    })
    .optional()
}

fn set(conn: &Connection, key: &str, value: impl rusqlite::ToSql) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO crsync_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        rusqlite::params![key, value],
    )?;
    Ok(())
}

/// Checks the file's identity at open. Records it on first use (and after a
/// fork), with `own_version` (our newest version) as verified; otherwise a
/// mismatch means a copy.
pub(crate) fn check(
    conn: &Connection,
    path: &Path,
    site: &str,
    own_version: i64,
) -> rusqlite::Result<Option<CopiedFile>> {
    let Some(actual) = file_id(path) else {
        return Ok(None);
    };
    match get::<String>(conn, FILE_ID)? {
        Some(recorded) if recorded != actual => Ok(Some(CopiedFile {
            path: path.display().to_string(),
            site: site.to_owned(),
            recorded,
            actual,
            verified_version: verified_version(conn)?,
        })),
        Some(_) => Ok(None),
        None => {
            record(conn, path, own_version)?;
            Ok(None)
        }
    }
}

/// Records `path` as this site id's own file, with `own_version` verified.
pub(crate) fn record(conn: &Connection, path: &Path, own_version: i64) -> rusqlite::Result<()> {
    // Writing may move the file (copy-up on an overlay filesystem): record
    // the identity it has after the write.
    set(conn, VERIFIED, own_version)?;
    if let Some(id) = file_id(path) {
        set(conn, FILE_ID, id)?;
    }
    Ok(())
}

/// Saves the newest own version a remote acknowledged.
pub(crate) fn save_verified(conn: &Connection, version: i64) -> rusqlite::Result<()> {
    set(conn, VERIFIED, version)
}

/// The newest own version known to predate any copy of this file.
pub(crate) fn verified_version(conn: &Connection) -> rusqlite::Result<i64> {
    Ok(get::<i64>(conn, VERIFIED)?.unwrap_or(0))
}
