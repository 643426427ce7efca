//! What a receiver believes of a remote's claims (DESIGN §5).
//!
//! A batch's ranges say "you now hold everything of site S up to V"; a
//! cursor says "I hold everything of S up to V". Both are claims. Believing
//! a forged range would silence a site for good (its later versions look
//! "already held"), so a session believes a claim only as far as its
//! [`Trust`] in the remote allows. What it does not believe is still applied
//! as data (unranged changes, which never move the cursor).
//!
//! Copied replicas are caught here too: two files sharing one site id write
//! the same versions with different contents, and whichever syncs second
//! would have its writes skipped as "already held". A crsync peer whose own
//! version is below what the other side already holds of its site id is
//! such a copy (or a restored backup); see [`own_version_conflict`].

use crate::{ChangeBatch, Cursor, DbVersion, SiteId};

/// How far a session believes a remote's claims about sites.
///
/// ```
/// use crsync_peer::proto::{SessionConfig, Side, Trust};
/// // The server a client dialed is believed; a client that connected to us
/// // only about itself.
/// assert_eq!(Trust::default_for(Side::Dialed), Trust::Full);
/// assert_eq!(Trust::default_for(Side::Accepted), Trust::OwnSite);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Trust {
    /// Believe the remote's ranges about every site: a server we chose to
    /// dial, or a replica of our own (it can lose our data anyway).
    Full,
    /// Believe the remote's ranges only about its own site; ranges about
    /// other sites are dropped (their changes are still applied, unranged,
    /// and never move the cursor). The default for remotes that connected to
    /// us: any holder of a token.
    OwnSite,
}

impl Trust {
    /// The default for a connection opened from `side`.
    pub fn default_for(side: super::Side) -> Trust {
        match side {
            super::Side::Dialed => Trust::Full,
            super::Side::Accepted => Trust::OwnSite,
        }
    }
}

/// The hello's `believes` value of a [`Trust::OwnSite`] receiver.
pub(crate) const OWN_SITE: &str = "own-site";

/// Sites in one claim (a cursor or a batch's ranges) at most, by default.
pub const DEFAULT_MAX_CLAIM_SITES: usize = 16_384;

/// Drops what `trust` does not let us believe of `batch`, sent by `remote`
/// while we hold `held`. Returns how many ranges and changes were dropped.
///
/// Under [`Trust::OwnSite`]:
/// - only the remote's range about its own site is kept: a site speaks for
///   itself (its own entry counts local versions its merges used, which no
///   change in hand can prove). A remote that lies about itself harms only
///   its own site id, and is caught as a copy when the real owner comes back
///   ([`own_version_conflict`]);
/// - changes of another site that has spoken for itself (we hold some of
///   it) and that are newer than anything that site told us are dropped: a
///   forger would otherwise plant rows under its name that the site itself
///   never accepts (nobody receives its own writes), so replicas could never
///   agree. The site sends its real writes itself. Changes of sites we hold
///   nothing of are relayed data and are kept (unranged).
pub(crate) fn believe(
    batch: &mut ChangeBatch,
    remote: SiteId,
    trust: Trust,
    held: &Cursor,
) -> usize {
    if trust == Trust::Full {
        return 0;
    }
    let before = batch.ranges.len() + batch.changes.len();
    batch.ranges.retain(|site, _| *site == remote);
    batch.changes.retain(|c| {
        let known = held.get(&c.site_id);
        c.site_id == remote || known == DbVersion(0) || c.db_version <= known
    });
    before - batch.ranges.len() - batch.changes.len()
}

/// A site id shared by two replicas, seen from one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteConflict {
    /// The remote holds more of our site id than we ever wrote: this replica
    /// is a copy (`cp`, a restored backup, a VM snapshot) of one that went on
    /// writing and syncing.
    WeAreACopy {
        /// Our own newest version.
        ours: DbVersion,
        /// What the remote holds of our site id.
        theirs: DbVersion,
    },
    /// The remote's own newest version is below what we already hold of its
    /// site id: the remote is such a copy.
    RemoteIsACopy {
        /// The remote's own newest version, as its cursor says.
        remote_own: DbVersion,
        /// What we hold of its site id.
        held: DbVersion,
    },
}

impl SiteConflict {
    /// The explanation for a person, naming the fix.
    pub fn message(&self, local: SiteId, remote: SiteId) -> String {
        match self {
            SiteConflict::WeAreACopy { ours, theirs } => format!(
                "site id {local} is also used by another replica: this database wrote up to \
                 version {ours} under it, but {remote} already holds version {theirs}. This \
                 file is a copy (cp, a restored backup or a VM snapshot) of a database that \
                 went on syncing; syncing it would lose writes. Run `crsync fork --db FILE` on \
                 this copy to give it a new site id (its rows are kept)",
                ours = ours.0,
                theirs = theirs.0,
            ),
            SiteConflict::RemoteIsACopy { remote_own, held } => format!(
                "site id {remote} is also used by another replica: {remote} wrote up to version \
                 {own} under it, but {local} already holds version {held}. The remote's file \
                 is a copy (cp, a restored backup or a VM snapshot) of a database that went on \
                 syncing; syncing it would lose writes. Run `crsync fork --db FILE` on that \
                 copy to give it a new site id (its rows are kept)",
                own = remote_own.0,
                held = held.0,
            ),
        }
    }
}

/// Checks a crsync remote's cursor for a site id shared by two replicas.
///
/// `our_own` is the newest version we wrote ourselves (our cursor's own
/// entry, which never goes down); `held` is our cursor. Only a crsync
/// remote's cursor is evidence: a v1 peer reports other sites at its own
/// local versions. What it says of our site counts only if `about_us` (we
/// believe its claims about other sites: [`Trust::Full`]).
pub(crate) fn own_version_conflict(
    theirs: &Cursor,
    local: SiteId,
    our_own: DbVersion,
    about_us: bool,
    remote: SiteId,
    held: &Cursor,
) -> Option<SiteConflict> {
    let of_us = theirs.get(&local);
    if about_us && of_us > our_own {
        return Some(SiteConflict::WeAreACopy {
            ours: our_own,
            theirs: of_us,
        });
    }
    let remote_own = theirs.get(&remote);
    let of_them = held.get(&remote);
    // A remote that has not written yet (entry 0) may just be a fresh cursor
    // that omits itself; only a stated own version below ours is a copy.
    if remote_own > DbVersion(0) && remote_own < of_them {
        return Some(SiteConflict::RemoteIsACopy {
            remote_own,
            held: of_them,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Change, PackedPk, SqlValue, VersionRange};

    const A: SiteId = SiteId::from_bytes([1; 16]);
    const B: SiteId = SiteId::from_bytes([2; 16]);
    const C: SiteId = SiteId::from_bytes([3; 16]);

    fn change(site: SiteId, version: i64) -> Change {
        Change {
            table: "t".into(),
            pk: PackedPk::pack(&[SqlValue::Integer(1)]),
            cid: "v".into(),
            val: SqlValue::Integer(version),
            col_version: 1,
            db_version: DbVersion(version),
            site_id: site,
            cl: 1,
            seq: 0,
        }
    }

    fn range(after: i64, upto: i64) -> VersionRange {
        VersionRange {
            after: DbVersion(after),
            upto: DbVersion(upto),
        }
    }

    #[test]
    fn own_site_trust_keeps_only_claims_about_the_remote_itself() {
        let mut batch = ChangeBatch {
            changes: vec![change(A, 3), change(B, 9)],
            ranges: [(A, range(2, 8)), (B, range(0, 9)), (C, range(0, 7))]
                .into_iter()
                .collect(),
            ..ChangeBatch::default()
        };
        assert_eq!(believe(&mut batch, A, Trust::OwnSite, &Cursor::new()), 2);
        assert_eq!(batch.ranges, [(A, range(2, 8))].into_iter().collect());
        assert_eq!(batch.changes.len(), 2, "changes are still applied");
    }

    #[test]
    fn a_forged_claim_about_another_site_is_not_believed_from_an_accepted_remote() {
        let forged = ChangeBatch {
            changes: vec![change(B, 1_000_000_000_000_000)],
            ranges: [(B, range(0, 1_000_000_000_000_000))].into_iter().collect(),
            ..ChangeBatch::default()
        };
        // B never spoke for itself: its change is relayed data, kept unranged.
        let mut batch = forged.clone();
        believe(&mut batch, A, Trust::OwnSite, &Cursor::new());
        assert!(batch.ranges.is_empty());
        assert_eq!(batch.changes.len(), 1);
        // B did: a change newer than anything B told us is a forgery.
        let held: Cursor = [(B, DbVersion(7))].into_iter().collect();
        let mut batch = forged.clone();
        assert_eq!(believe(&mut batch, A, Trust::OwnSite, &held), 2);
        assert!(batch.is_empty());
        let mut full = forged.clone();
        assert_eq!(believe(&mut full, A, Trust::Full, &held), 0);
        assert_eq!(full, forged);
    }

    #[test]
    fn a_copy_is_seen_from_both_sides() {
        // B (a server) holds A up to 7; A's file says it wrote only up to 5.
        let server_cursor: Cursor = [(A, DbVersion(7)), (B, DbVersion(3))].into_iter().collect();
        let client_cursor: Cursor = [(A, DbVersion(5))].into_iter().collect();
        // The client reads the server's cursor.
        assert_eq!(
            own_version_conflict(&server_cursor, A, DbVersion(5), true, B, &client_cursor),
            Some(SiteConflict::WeAreACopy {
                ours: DbVersion(5),
                theirs: DbVersion(7)
            })
        );
        // The server reads the client's cursor.
        assert_eq!(
            own_version_conflict(&client_cursor, B, DbVersion(3), true, A, &server_cursor),
            Some(SiteConflict::RemoteIsACopy {
                remote_own: DbVersion(5),
                held: DbVersion(7)
            })
        );
        // Equal or ahead is fine; so is a remote that omits itself.
        let ahead: Cursor = [(A, DbVersion(9))].into_iter().collect();
        assert_eq!(
            own_version_conflict(&ahead, B, DbVersion(3), true, A, &server_cursor),
            None
        );
        assert_eq!(
            own_version_conflict(&Cursor::new(), B, DbVersion(3), true, A, &server_cursor),
            None
        );
        let msg = SiteConflict::WeAreACopy {
            ours: DbVersion(5),
            theirs: DbVersion(7),
        }
        .message(A, B);
        assert!(msg.contains("crsync fork --db FILE"), "{msg}");
    }
}
