//! Identities and versions: [`SiteId`] and [`DbVersion`].

use std::fmt;
use std::str::FromStr;

/// Length in bytes of a cr-sqlite site id.
pub const SITE_ID_LEN: usize = 16;

/// The 16-byte identity cr-sqlite gives every database (`crsql_site_id()`).
///
/// Shown and parsed as 32 lowercase hex digits, as on the wire.
///
/// ```
/// use crsync_peer::SiteId;
/// let id: SiteId = "000102030405060708090a0b0c0d0e0f".parse().unwrap();
/// assert_eq!(id.to_string(), "000102030405060708090a0b0c0d0e0f");
/// assert!("abc".parse::<SiteId>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteId([u8; SITE_ID_LEN]);

/// A site id that is not exactly 16 bytes (or 32 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid site id: {reason}")]
pub struct InvalidSiteId {
    /// What is wrong with it.
    pub reason: String,
}

impl SiteId {
    /// Wraps 16 raw bytes.
    pub const fn from_bytes(bytes: [u8; SITE_ID_LEN]) -> Self {
        Self(bytes)
    }

    /// Takes a byte slice that must be exactly 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, InvalidSiteId> {
        let arr: [u8; SITE_ID_LEN] = bytes.try_into().map_err(|_| InvalidSiteId {
            reason: format!("expected {SITE_ID_LEN} bytes, got {}", bytes.len()),
        })?;
        Ok(Self(arr))
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; SITE_ID_LEN] {
        &self.0
    }

    /// Lowercase hex, as used on the wire.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for SiteId {
    type Err = InvalidSiteId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s).map_err(|e| InvalidSiteId {
            reason: format!("{s:?} is not hex: {e}"),
        })?;
        Self::from_slice(&bytes)
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SiteId({})", self.to_hex())
    }
}

impl serde::Serialize for SiteId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for SiteId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A cr-sqlite database version (`crsql_db_version()`): one step per committed
/// transaction that wrote to a CRR table.
///
/// In a [`Change`](crate::Change) it is always the version at the change's
/// **origin** site, never the local version a merge was recorded under.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct DbVersion(pub i64);

impl DbVersion {
    /// The version before any write: a cursor entry of zero holds nothing.
    pub const ZERO: DbVersion = DbVersion(0);
}

impl fmt::Display for DbVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
