//! What this database knows of the remotes it synced with, kept across
//! restarts for `crsync status`: per remote site, how it was reached, the
//! newest of our versions it acknowledged, and when we were last in sync.
//! A local bookkeeping table (`crsync_remotes`); it never syncs.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, params};

use crate::{DbVersion, SiteId};

/// Remotes remembered at most; the ones synced longest ago are forgotten first.
const MAX_REMOTES: i64 = 10_000;

/// One remote, as last seen by a [`Peer`](crate::Peer) on this database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRecord {
    /// The remote's site id.
    pub site: SiteId,
    /// How it was reached (the dialer's or connection's label).
    pub transport: String,
    /// The newest of our own versions it acknowledged.
    pub acknowledged: DbVersion,
    /// When we were last in sync with it, if ever.
    pub synced_at: Option<SystemTime>,
}

fn millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Writes `records` (newer facts win: versions and times never go back).
pub(super) fn save(
    conn: &Connection,
    records: &BTreeMap<SiteId, RemoteRecord>,
) -> rusqlite::Result<()> {
    let mut upsert = conn.prepare_cached(
        "INSERT INTO crsync_remotes (site_id, transport, acknowledged, synced_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (site_id) DO UPDATE SET transport = excluded.transport,
             acknowledged = max(acknowledged, excluded.acknowledged),
             synced_at = max(coalesce(synced_at, 0), coalesce(excluded.synced_at, 0))",
    )?;
    for r in records.values() {
        upsert.execute(params![
            r.site.as_bytes().as_slice(),
            r.transport,
            r.acknowledged.0,
            r.synced_at.map(millis)
        ])?;
    }
    conn.execute(
        "DELETE FROM crsync_remotes WHERE site_id IN (SELECT site_id FROM crsync_remotes
             ORDER BY coalesce(synced_at, 0) DESC LIMIT -1 OFFSET ?1)",
        [MAX_REMOTES],
    )?;
    Ok(())
}

/// Every remembered remote, most recently synced first.
pub(super) fn load(conn: &Connection) -> rusqlite::Result<Vec<RemoteRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT site_id, transport, acknowledged, synced_at FROM crsync_remotes
         ORDER BY coalesce(synced_at, 0) DESC",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, Vec<u8>>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<i64>>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (site, transport, acknowledged, synced_at) = row?;
        let Ok(site) = SiteId::from_slice(&site) else {
            continue;
        };
        out.push(RemoteRecord {
            site,
            transport,
            acknowledged: DbVersion(acknowledged),
            synced_at: synced_at
                .filter(|ms| *ms > 0)
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms as u64)),
        });
    }
    Ok(out)
}
