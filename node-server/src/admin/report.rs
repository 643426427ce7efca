//! [`StatusReport`]: what `/status.json` answers and `/status` shows.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crsync_peer::{RemoteStatus, SyncPhase};
use serde::{Deserialize, Serialize};

use crate::host::{DbHost, FROM};
use crate::telemetry;

/// The server's state: its databases, their clients, recent errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct StatusReport {
    /// The server's version (`crsync-node-server`).
    pub version: String,
    /// When the report was made (Unix seconds).
    pub generated_at: u64,
    /// Seconds since the server started.
    pub uptime_secs: u64,
    /// Every database file in the data directory, by name.
    pub databases: Vec<DatabaseView>,
    /// The last refusals and failures, newest first (at most 50).
    pub errors: Vec<ErrorView>,
    /// Recent conflicts of the open databases, newest first (from each
    /// Store's conflict history, [`Store::conflicts`](crsync_peer::Store::conflicts)).
    pub conflicts: Option<Vec<serde_json::Value>>,
}

/// One database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct DatabaseView {
    /// Its name.
    pub name: String,
    /// Whether it is open (the numbers below are known only then).
    pub open: bool,
    /// Size of its file and write-ahead log, in bytes.
    pub size_bytes: u64,
    /// Its own newest version (`crsql_db_version`), when open.
    pub db_version: Option<i64>,
    /// Its site id, when open.
    pub site_id: Option<String>,
    /// Rows per table, when open.
    pub tables: Vec<TableView>,
    /// Its clients (connected or not yet forgotten).
    pub peers: Vec<PeerView>,
}

/// Rows of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TableView {
    /// The table.
    pub name: String,
    /// Its rows.
    pub rows: u64,
}

/// One client of a database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct PeerView {
    /// `sse` or `ws`.
    pub transport: String,
    /// The client's address, when known.
    pub address: Option<String>,
    /// The client's site id, once it said who it is.
    pub peer: Option<String>,
    /// Where sync with it stands (`connecting`, `initial-download`,
    /// `initial-upload`, `live`, `paused`, `outdated`, `refused`, `disconnected`).
    pub phase: String,
    /// Our own transactions it does not hold yet.
    pub lag: u64,
    /// Since when it is connected (Unix seconds).
    pub connected_since: Option<u64>,
    /// The last refusal or failure on its connection.
    pub last_error: Option<String>,
}

/// One recent error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ErrorView {
    /// When (Unix seconds).
    pub at: u64,
    /// Which database.
    pub database: String,
    /// What kind (`refused`, `refused by the client`, `dial failed`, `site id conflict`).
    pub kind: String,
    /// Its stable code, if it has one.
    pub code: Option<String>,
    /// What happened.
    pub message: String,
    /// The client's site id, when known.
    pub peer: Option<String>,
}

/// Unix seconds of `at`.
pub(crate) fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The phase as the report names it.
pub(crate) fn phase_name(phase: SyncPhase) -> &'static str {
    match phase {
        SyncPhase::Connecting => "connecting",
        SyncPhase::InitialDownload => "initial-download",
        SyncPhase::InitialUpload => "initial-upload",
        SyncPhase::Live => "live",
        SyncPhase::Paused => "paused",
        SyncPhase::Outdated => "outdated",
        SyncPhase::Refused => "refused",
        _ => "disconnected",
    }
}

fn peer_view(remote: &RemoteStatus) -> PeerView {
    let (label, address) = match remote.transport.split_once(FROM) {
        Some((label, address)) => (label, Some(address.to_owned())),
        None => (remote.transport.as_str(), None),
    };
    PeerView {
        transport: crsync_peer::telemetry::transport_label(label).to_owned(),
        address,
        peer: remote.peer.map(|p| p.to_hex()),
        phase: phase_name(remote.phase).to_owned(),
        lag: remote.pending.transactions,
        connected_since: remote.connected_since.map(unix_secs),
        last_error: remote
            .last_error
            .as_ref()
            .map(|(code, message)| format!("{code}: {message}")),
    }
}

/// Size of a database file with its write-ahead log.
async fn file_size(path: &Path) -> u64 {
    let mut size = 0;
    for suffix in ["", "-wal"] {
        let file = format!("{}{suffix}", path.display());
        if let Ok(meta) = tokio::fs::metadata(file).await {
            size += meta.len();
        }
    }
    size
}

/// An open database's view; also sets its lag gauge.
pub(crate) async fn open_view(host: &Arc<DbHost>) -> DatabaseView {
    let peer = host.peer();
    let status = peer.status().await;
    let peers: Vec<PeerView> = status.remotes.iter().map(peer_view).collect();
    let slowest = status
        .remotes
        .iter()
        .filter(|r| r.connected())
        .map(|r| r.pending.transactions)
        .max()
        .unwrap_or(0);
    metrics::gauge!(telemetry::SLOWEST_CLIENT_LAG, "database" => host.name().to_owned())
        .set(slowest as f64);
    let tables = match crate::registry::row_counts(peer.store()).await {
        Ok(tables) => tables
            .into_iter()
            .map(|(name, rows)| TableView { name, rows })
            .collect(),
        Err(e) => {
            tracing::warn!(db = host.name(), "cannot count rows: {e}");
            Vec::new()
        }
    };
    DatabaseView {
        name: host.name().to_owned(),
        open: true,
        size_bytes: file_size(peer.store().path()).await,
        db_version: Some(status.own_version.0),
        site_id: Some(peer.site_id().to_hex()),
        tables,
        peers,
    }
}

/// A database file that is not open.
pub(crate) async fn closed_view(name: String, path: &Path) -> DatabaseView {
    DatabaseView {
        name,
        open: false,
        size_bytes: file_size(path).await,
        db_version: None,
        site_id: None,
        tables: Vec::new(),
        peers: Vec::new(),
    }
}

/// The report's header fields.
pub(crate) fn header(started: std::time::Instant) -> (String, u64, u64) {
    (
        env!("CARGO_PKG_VERSION").to_owned(),
        unix_secs(SystemTime::now()),
        started.elapsed().as_secs(),
    )
}

/// How long ago `at` (Unix seconds) was, as `3m 20s`.
pub fn ago(at: u64, now: u64) -> String {
    let secs = Duration::from_secs(now.saturating_sub(at)).as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        _ => format!("{}h {}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// The newest `limit` conflicts of an open database, as JSON objects.
pub(crate) async fn recent_conflicts(host: &Arc<DbHost>, limit: usize) -> Vec<serde_json::Value> {
    let query = crsync_peer::ConflictQuery::new().limit(limit);
    let Ok(records) = host.peer().store().conflicts(query).await else {
        return Vec::new();
    };
    let side = |s: &crsync_peer::ConflictSide| {
        serde_json::json!({
            "value": format!("{:?}", s.value),
            "site": s.site.to_hex(),
            "version": s.version.map(|v| v.0),
            "col_version": s.col_version,
        })
    };
    records
        .iter()
        .map(|c| {
            serde_json::json!({
                "database": host.name(),
                "table": c.table,
                "pk": hex::encode(&c.pk.0),
                "column": c.column,
                "kind": c.kind.as_str(),
                "lost": side(&c.lost),
                "won": side(&c.won),
                "recorded_at_ms": c.recorded_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            })
        })
        .collect()
}
