//! A hostile peer: a crsync client with a read-write token that, besides
//! running an honest session, sends forged messages on its connection to a
//! crsync server (an accepted session, which is where DESIGN.md §5 says
//! claims must be weighed):
//!
//! - ranges for other sites' versions up to 10^15 with no changes (the
//!   issue's "forged ranges silence a site for good"), also for sites nobody
//!   ever wrote for;
//! - a range for its own site far past anything it sent;
//! - changes under another site's id with huge versions (with or without a
//!   forged range for that site);
//! - a huge cursor (every site at 10^15, many unknown sites), as a request
//!   or as an acknowledgement.
//!
//! It is drawn from a generator of its own, seeded from the scenario's seed,
//! so a scenario without a hostile peer is exactly what it was before.
//! [`check`](super::check::check) then asks the same of the honest replicas
//! as always: identical rows (the forged rows count as written, and may have
//! been applied or refused, the same everywhere), and cursors that never
//! claim a site past what it holds or name a site that never wrote.

use std::collections::BTreeMap;
use std::time::Duration;

use crsync_peer::wire::{Encoding, TransportMessage};
use crsync_peer::{Change, ChangeBatch, Cursor, DbVersion, SiteId, SqlValue, VersionRange};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scenario::{LinkKind, LinkSpec, PeerSpec, Scenario, faults};
use super::values::{CellKey, Version, gen_value};

/// The forged version of the issue: 10^15.
pub const HUGE: i64 = 1_000_000_000_000_000;
/// Unknown sites in a "many sites" attack: above the default limit (about 10,000).
pub const MANY_STRANGERS: usize = 12_000;
/// With [`Kind::Many`], the share of hostile peers that also send one
/// message naming [`MANY_STRANGERS`] sites.
const MANY_SHARE: f64 = 0.025;
/// Salt of the hostile generator (the scenario's seed is xor-ed with it).
const SALT: u64 = 0x686f_7374_696c_6521;

/// What the hostile peer sends; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ranges,
    OwnRange,
    Changes,
    Cursors,
    /// One cursor or range map of [`MANY_STRANGERS`] sites per hostile peer
    /// (in [`MANY_SHARE`] of them). Not in the default list: while such a
    /// message is accepted, the remote's window holds 12,000 entries for the
    /// rest of the run, and the run takes twice as long.
    Many,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Ranges,
        Kind::OwnRange,
        Kind::Changes,
        Kind::Cursors,
        Kind::Many,
    ];
    /// The kinds made when `CRSYNC_SIM_HOSTILE` is not set. Not `Changes`:
    /// a forged change under a site id the attacked peer has not heard of yet
    /// is relayed as data, and the site itself never takes it (nobody
    /// receives its own writes), so a cell it captured can stay apart at
    /// that site (README, Known limits; seed 1587 with
    /// `CRSYNC_SIM_HOSTILE=changes`).
    pub const DEFAULT: [Kind; 3] = [Kind::Ranges, Kind::OwnRange, Kind::Cursors];

    fn name(self) -> &'static str {
        match self {
            Kind::Ranges => "ranges",
            Kind::OwnRange => "own-range",
            Kind::Changes => "changes",
            Kind::Cursors => "cursors",
            Kind::Many => "many",
        }
    }

    /// `CRSYNC_SIM_HOSTILE`: `off`, or a comma list of kind names.
    pub fn parse_list(text: &str) -> Vec<Kind> {
        if text.trim().is_empty() {
            return Kind::DEFAULT.to_vec();
        }
        Kind::ALL
            .into_iter()
            .filter(|k| text.split(',').any(|w| w.trim() == k.name()))
            .collect()
    }
}

/// Who a forged range or change names.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// A peer of the scenario (the server itself, a v1 peer, anyone).
    Peer(usize),
    /// The `n`th of the sites nobody ever wrote for.
    Stranger(usize),
}

/// One forged message.
#[derive(Debug, Clone)]
pub enum Attack {
    /// `data` without changes, ranges `(0, 10^15]` for `targets`.
    Ranges { targets: Vec<Target>, eose: bool },
    /// `data` without changes, a range for the hostile's own site `(0, 10^15]`.
    OwnRange,
    /// `data` with changes under `victim`'s site id at versions from 10^15,
    /// and a range `(0, 10^15 + n]` for it if `ranged`.
    Changes {
        victim: usize,
        cells: Vec<(CellKey, SqlValue, i64)>,
        ranged: bool,
    },
    /// A `sync` (or an acknowledgement) claiming every peer's site at
    /// 10^15 and `strangers` unknown sites.
    Cursor { strangers: usize, ack: bool },
}

impl Attack {
    /// In short, for traces and scenario descriptions.
    pub fn describe(&self) -> String {
        match self {
            Attack::Ranges { targets, eose } => {
                let peers: Vec<String> = targets
                    .iter()
                    .filter_map(|t| match t {
                        Target::Peer(p) => Some(format!("p{p}")),
                        Target::Stranger(_) => None,
                    })
                    .collect();
                let strangers = targets.len() - peers.len();
                format!(
                    "forged ranges (0, 10^15] for {} and {strangers} strangers{}",
                    peers.join(" "),
                    if *eose { " (eose)" } else { "" }
                )
            }
            Attack::OwnRange => "a forged range (0, 10^15] for its own site".into(),
            Attack::Changes {
                victim,
                cells,
                ranged,
            } => format!(
                "{} forged changes under p{victim}'s id at 10^15{}: {:?}",
                cells.len(),
                if *ranged { " with a range" } else { "" },
                cells
                    .iter()
                    .map(|(k, _, cv)| (k.table, k.pk, k.col, *cv))
                    .collect::<Vec<_>>()
            ),
            Attack::Cursor { strangers, ack } => format!(
                "a {} claiming every site at 10^15 and {strangers} strangers",
                if *ack { "sync ack" } else { "sync" }
            ),
        }
    }
}

/// The hostile peer of a scenario.
#[derive(Debug, Clone)]
pub struct Hostile {
    pub peer: usize,
    pub link: usize,
    pub attacks: Vec<(Duration, Attack)>,
}

/// The sites nobody wrote for (first byte 0xF0: no peer index).
pub fn stranger(n: usize) -> SiteId {
    let mut bytes = [0xF0u8; 16];
    bytes[8..].copy_from_slice(&(n as u64).to_be_bytes());
    SiteId::from_bytes(bytes)
}

fn site(peer: usize) -> SiteId {
    SiteId::from_bytes([peer as u8 + 1; 16])
}

/// Adds a hostile peer to `scenario` in `share_percent` of the scenarios,
/// making the attacks of `kinds`; leaves the scenario as it was otherwise.
pub fn add(scenario: &mut Scenario, share_percent: u64, kinds: &[Kind]) -> Option<Hostile> {
    let mut rng = StdRng::seed_from_u64(scenario.seed ^ SALT);
    let kinds_given = kinds.len();
    if kinds.is_empty() || rng.random_range(0..100) >= share_percent {
        return None;
    }
    let crsync: Vec<usize> = (0..scenario.peers.len())
        .filter(|p| matches!(scenario.peers[*p], PeerSpec::Crsync { .. }))
        .collect();
    let acceptor = crsync[rng.random_range(0..crsync.len())];
    let peer = scenario.peers.len();
    scenario.peers.push(PeerSpec::Crsync {
        schema: 2,
        max_changes: rng.random_range(1..=8),
        window: rng.random_range(1..=8),
    });
    let link = scenario.links.len();
    scenario.links.push(LinkSpec {
        dialer: peer,
        acceptor,
        kind: if rng.random_bool(0.5) {
            LinkKind::SseCrsync
        } else {
            LinkKind::Stream
        },
        faults: faults(&mut rng),
        relay: None,
    });
    let everyone = scenario.peers.len();
    let count = rng.random_range(2..=10);
    let kinds: Vec<Kind> = kinds.iter().copied().filter(|k| *k != Kind::Many).collect();
    let many = kinds.len() < kinds_given && (kinds.is_empty() || rng.random_bool(MANY_SHARE));
    let mut attacks = Vec::new();
    for _ in 0..count {
        let at = Duration::from_millis(rng.random_range(0..scenario.heal_at.as_millis() as u64));
        let Some(&kind) = kinds.get(rng.random_range(0..kinds.len().max(1))) else {
            break;
        };
        let attack = match kind {
            Kind::Ranges => {
                let n = rng.random_range(1..=3);
                let mut targets: Vec<Target> = (0..n)
                    .map(|_| Target::Peer(rng.random_range(0..everyone)))
                    .collect();
                let strangers = if rng.random_bool(0.5) {
                    0
                } else {
                    rng.random_range(1..=20)
                };
                targets.extend((0..strangers).map(Target::Stranger));
                Attack::Ranges {
                    targets,
                    eose: rng.random_bool(0.3),
                }
            }
            Kind::OwnRange => Attack::OwnRange,
            Kind::Changes => {
                let victim = loop {
                    let v = rng.random_range(0..everyone);
                    if v != peer {
                        break v;
                    }
                };
                let n = rng.random_range(1..=3);
                let cells = (0..n)
                    .map(|_| {
                        let key = CellKey {
                            table: rng.random_range(0..2),
                            pk: rng.random_range(0..8),
                            col: rng.random_range(0..4),
                        };
                        let val = gen_value(&mut rng, key.col, scenario.lossy_values);
                        let col_version = if rng.random_bool(0.5) {
                            rng.random_range(1..=3)
                        } else {
                            rng.random_range(1_000..1_000_000)
                        };
                        (key, val, col_version)
                    })
                    .collect();
                Attack::Changes {
                    victim,
                    cells,
                    ranged: rng.random_bool(0.5),
                }
            }
            Kind::Cursors | Kind::Many => Attack::Cursor {
                strangers: rng.random_range(0..=30),
                ack: rng.random_bool(0.5),
            },
        };
        attacks.push((at, attack));
    }
    // `many`: one message past the size limit (a cursor or ranges).
    if many {
        let at = Duration::from_millis(rng.random_range(0..scenario.heal_at.as_millis() as u64));
        let attack = if rng.random_bool(0.5) {
            Attack::Ranges {
                targets: (0..MANY_STRANGERS).map(Target::Stranger).collect(),
                eose: rng.random_bool(0.5),
            }
        } else {
            Attack::Cursor {
                strangers: MANY_STRANGERS,
                ack: rng.random_bool(0.5),
            }
        };
        attacks.push((at, attack));
    }
    attacks.sort_by_key(|(at, _)| *at);
    Some(Hostile {
        peer,
        link,
        attacks,
    })
}

fn huge_range(upto: i64) -> VersionRange {
    VersionRange {
        after: DbVersion::ZERO,
        upto: DbVersion(upto),
    }
}

/// The message of `attack` from `hostile` in a world of `peers` peers, and
/// the versions it writes (forged changes), for the check.
pub fn message(
    attack: &Attack,
    hostile: usize,
    peers: usize,
) -> (TransportMessage, Vec<(CellKey, Version)>) {
    let from = site(hostile);
    let data = |batch: ChangeBatch, eose: bool| {
        TransportMessage::data(from, &batch, eose, 1, Encoding::Lossless)
    };
    match attack {
        Attack::Ranges { targets, eose } => {
            let ranges: BTreeMap<SiteId, VersionRange> = targets
                .iter()
                .map(|t| match t {
                    Target::Peer(p) => (site(*p), huge_range(HUGE)),
                    Target::Stranger(n) => (stranger(*n), huge_range(HUGE)),
                })
                .collect();
            let batch = ChangeBatch {
                ranges,
                ..ChangeBatch::default()
            };
            (data(batch, *eose), Vec::new())
        }
        Attack::OwnRange => {
            let batch = ChangeBatch {
                ranges: [(from, huge_range(HUGE))].into_iter().collect(),
                ..ChangeBatch::default()
            };
            (data(batch, false), Vec::new())
        }
        Attack::Changes {
            victim,
            cells,
            ranged,
        } => {
            let victim_site = site(*victim);
            let mut written = Vec::new();
            let changes: Vec<Change> = cells
                .iter()
                .enumerate()
                .map(|(i, (key, val, col_version))| {
                    written.push((
                        *key,
                        Version {
                            col_version: *col_version,
                            val: val.clone(),
                            site: victim_site,
                        },
                    ));
                    Change {
                        table: key.table_name().into(),
                        pk: key.packed_pk(),
                        cid: key.cid().into(),
                        val: val.clone(),
                        col_version: *col_version,
                        // One forged transaction per change.
                        db_version: DbVersion(HUGE + i as i64),
                        site_id: victim_site,
                        cl: 1,
                        seq: 0,
                    }
                })
                .collect();
            let top = HUGE + cells.len() as i64;
            let ranges = if *ranged {
                [(victim_site, huge_range(top))].into_iter().collect()
            } else {
                BTreeMap::new()
            };
            let batch = ChangeBatch {
                changes,
                ranges,
                schema_version: Some(1),
                javascript: false,
                part: None,
                ..ChangeBatch::default()
            };
            (data(batch, false), written)
        }
        Attack::Cursor { strangers, ack } => {
            let cursor: Cursor = (0..peers)
                .map(|p| (site(p), DbVersion(HUGE)))
                .chain((0..*strangers).map(|n| (stranger(n), DbVersion(HUGE))))
                .collect();
            let message = if *ack {
                TransportMessage::ack(from, cursor)
            } else {
                TransportMessage::sync(from, cursor)
            };
            (message, Vec::new())
        }
    }
}
