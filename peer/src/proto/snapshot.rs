//! What a server says about a database snapshot: the `GET {base}/snapshot/info`
//! answer and the headers of `GET {base}/snapshot` (see the node-server's
//! README and `crsync_transports::snapshot`).

use crate::{Cursor, SiteId};

/// Response header of `GET {base}/snapshot`: the file's sha256, lowercase hex
/// (the `ETag` is the same, quoted).
pub const SHA256_HEADER: &str = "x-crsync-snapshot-sha256";
/// Response header: the site id of the database the snapshot was made of.
pub const SITE_HEADER: &str = "x-crsync-snapshot-site";
/// Response header: that database's own version at the snapshot.
pub const VERSION_HEADER: &str = "x-crsync-snapshot-version";
/// Response header: the changes (live cells) in the snapshot.
pub const CHANGES_HEADER: &str = "x-crsync-snapshot-changes";

/// `GET {base}/snapshot/info`: the snapshot a new replica would download.
///
/// ```
/// use crsync_peer::proto::snapshot::{SnapshotInfo, etag};
/// let json = r#"{"sha256":"ab","bytes":4096,"changes":10,"behind":0,"site_id":"000102030405060708090a0b0c0d0e0f",
///     "version":7,"cursor":{"peers":{}},"threshold":5,"built_at_ms":0}"#;
/// let info: SnapshotInfo = serde_json::from_str(json).unwrap();
/// assert_eq!(info.version, 7);
/// assert_eq!(etag(&info.sha256), "\"ab\"");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    /// sha256 of the file, lowercase hex.
    pub sha256: String,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// Changes (live cells) in the snapshot.
    pub changes: u64,
    /// Changes the database holds beyond the snapshot, as of this answer
    /// (a new replica gets them by sync after installing it).
    pub behind: u64,
    /// The site id of the database the snapshot was made of.
    pub site_id: SiteId,
    /// That database's own version at the snapshot.
    pub version: i64,
    /// The snapshot's cursor: what a replica installed from it holds.
    pub cursor: Cursor,
    /// The server's `snapshot_threshold`.
    pub threshold: u64,
    /// When the snapshot was made (milliseconds since the Unix epoch).
    pub built_at_ms: u64,
}

/// The strong `ETag` of a snapshot with this sha256: the hex, quoted.
pub fn etag(sha256: &str) -> String {
    format!("\"{sha256}\"")
}
