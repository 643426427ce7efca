//! [`Cursor`]: a version vector, origin site -> highest origin version held.

use std::collections::BTreeMap;

use crate::{DbVersion, SiteId};

/// What a database holds, per origin site: the highest origin `db_version`
/// of that site it has merged (or written, for its own site).
///
/// Serialized as on the wire: `{"peers": {"<site hex>": <version>}}`.
///
/// ```
/// use crsync_peer::{Cursor, DbVersion, SiteId};
/// let site = SiteId::from_bytes([7; 16]);
/// let mut cursor = Cursor::new();
/// cursor.advance(site, DbVersion(3));
/// cursor.advance(site, DbVersion(2)); // never goes back
/// assert_eq!(cursor.get(&site), DbVersion(3));
/// assert_eq!(cursor.get(&SiteId::from_bytes([8; 16])), DbVersion::ZERO);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    peers: BTreeMap<SiteId, DbVersion>,
}

impl Cursor {
    /// An empty cursor: holds nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The highest version of `site` held; [`DbVersion::ZERO`] if none.
    pub fn get(&self, site: &SiteId) -> DbVersion {
        self.peers.get(site).copied().unwrap_or(DbVersion::ZERO)
    }

    /// Whether the change `(site, version)` is already held.
    pub fn holds(&self, site: &SiteId, version: DbVersion) -> bool {
        version <= self.get(site)
    }

    /// Raises the entry for `site` to `version` (no-op if already higher).
    pub fn advance(&mut self, site: SiteId, version: DbVersion) {
        if version > DbVersion::ZERO {
            let entry = self.peers.entry(site).or_insert(DbVersion::ZERO);
            *entry = (*entry).max(version);
        }
    }

    /// Pointwise maximum with another cursor.
    pub fn join(&mut self, other: &Cursor) {
        for (site, version) in other.iter() {
            self.advance(site, version);
        }
    }

    /// Whether this cursor holds everything `other` holds.
    pub fn covers(&self, other: &Cursor) -> bool {
        other.iter().all(|(site, v)| self.holds(&site, v))
    }

    /// The entries, ordered by site id.
    pub fn iter(&self) -> impl Iterator<Item = (SiteId, DbVersion)> + '_ {
        self.peers.iter().map(|(s, v)| (*s, *v))
    }

    /// Number of sites with an entry.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no site has an entry.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

impl FromIterator<(SiteId, DbVersion)> for Cursor {
    fn from_iter<T: IntoIterator<Item = (SiteId, DbVersion)>>(iter: T) -> Self {
        let mut cursor = Cursor::new();
        for (site, version) in iter {
            cursor.advance(site, version);
        }
        cursor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape() {
        let site = SiteId::from_bytes([0xab; 16]);
        let cursor: Cursor = [(site, DbVersion(5))].into_iter().collect();
        let json = serde_json::to_string(&cursor).unwrap();
        assert_eq!(json, format!("{{\"peers\":{{\"{}\":5}}}}", "ab".repeat(16)));
        let back: Cursor = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cursor);
        assert!(serde_json::from_str::<Cursor>(r#"{"peers":{"abcd":1}}"#).is_err());
    }

    #[test]
    fn join_and_covers() {
        let a = SiteId::from_bytes([1; 16]);
        let b = SiteId::from_bytes([2; 16]);
        let mut x: Cursor = [(a, DbVersion(3))].into_iter().collect();
        let y: Cursor = [(a, DbVersion(1)), (b, DbVersion(4))].into_iter().collect();
        assert!(!x.covers(&y));
        x.join(&y);
        assert_eq!(x.get(&a), DbVersion(3));
        assert_eq!(x.get(&b), DbVersion(4));
        assert!(x.covers(&y));
    }
}
