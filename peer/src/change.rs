//! [`Change`]: one row of `crsql_changes`, labelled with its origin.

use crate::{DbVersion, PackedPk, SiteId, SqlValue};

/// The `cid` cr-sqlite uses for a row's existence (insert/delete) marker.
pub const SENTINEL_CID: &str = "-1";

/// One cell-level change, as cr-sqlite exchanges them.
///
/// `site_id` and `db_version` name the change's **origin**: the database that
/// made the write and its version there. They never name a relaying peer.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    /// The CRR table.
    pub table: String,
    /// The row's packed primary key.
    pub pk: PackedPk,
    /// The column, or [`SENTINEL_CID`] for the row marker.
    pub cid: String,
    /// The new value.
    pub val: SqlValue,
    /// The column's version (a per-cell Lamport counter).
    pub col_version: i64,
    /// The origin's database version of the write.
    pub db_version: DbVersion,
    /// The origin site.
    pub site_id: SiteId,
    /// Causal length of the row: odd = alive, even = deleted.
    pub cl: i64,
    /// Position of the change within its origin transaction.
    pub seq: i64,
}

impl Change {
    /// An upper estimate of this change's size as wire JSON, in bytes.
    pub fn approx_wire_size(&self) -> usize {
        let val = match &self.val {
            SqlValue::Null | SqlValue::Integer(_) | SqlValue::Real(_) => 32,
            // escaping can double text; text that is not UTF-8 goes as lossy
            // UTF-8 (up to 3 bytes per byte) or as `{"$text": base64}`
            SqlValue::Text(t) if std::str::from_utf8(t).is_ok() => 2 * t.len() + 2,
            SqlValue::Text(t) => 3 * t.len() + 16,
            // Node Buffer JSON takes up to 4 bytes a byte ("255,"; base64: 4/3)
            SqlValue::Blob(b) => 4 * b.len() + 32,
        };
        // field names, numbers and the 32-hex-digit site id
        160 + self.table.len() + self.cid.len() + 2 * self.pk.0.len() + val
    }

    /// The origin transaction this change belongs to.
    pub fn origin(&self) -> (SiteId, DbVersion) {
        (self.site_id, self.db_version)
    }
}
