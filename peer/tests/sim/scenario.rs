//! A scenario: peers, links with their faults, and timed operations, all
//! drawn from one seed.

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

use super::values::CellKey;

/// What runs on a peer.
#[derive(Debug, Clone)]
pub enum PeerSpec {
    Crsync {
        /// Starting `user_version` (1 or 2; all reach 2 at the heal).
        schema: i64,
        /// Batch size limit of the read path.
        max_changes: usize,
        /// Batches in flight per session.
        window: usize,
    },
    V1 {
        page_size: usize,
    },
}

/// How a link carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// crsync to crsync over a stream (WebSocket): ordered both ways.
    Stream,
    /// A crsync client of a crsync server over HTTP+SSE: the client's
    /// POSTs go one at a time (ordered; `connect`, `ping`, `error` are not
    /// POSTed), but the server cannot know that (`ordered: false`).
    SseCrsync,
    /// A v1 client of a crsync server: its POSTs are fire-and-forget
    /// (unordered, may be lost), the server's SSE stream is ordered.
    V1Client,
    /// A crsync client of a v1 server: serial POSTs, ordered SSE.
    V1Server,
    /// Two crsync peers paired through Nostr relays ([`LinkSpec::relay`]):
    /// store-and-forward, unordered both ways, the ends need not be online
    /// together (see `world/relay.rs`).
    Relay,
}

/// The relays of a [`LinkKind::Relay`] link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelaySpec {
    /// How many relays carry every event (1 or 2): a second one delivers
    /// copies, in its own order.
    pub relays: usize,
    /// Stored events expire this long after they were published (NIP-40).
    pub ttl: Duration,
    /// Largest event the relays take, in bytes of message JSON: a larger
    /// message goes as numbered parts, reassembled by the receiver, and is
    /// lost if any part is.
    pub max_bytes: usize,
}

/// Seeded faults of one link while the scenario runs (none after the heal).
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Unordered direction: a message is lost.
    pub drop: f64,
    /// Unordered direction: a message arrives twice.
    pub dup: f64,
    /// Unordered direction: a message is held back (up to 2 s).
    pub reorder: f64,
    /// Ordered direction: a message is lost, which breaks the connection.
    pub cut: f64,
    /// One-way latency in milliseconds: base + up to jitter.
    pub latency_ms: u64,
    pub jitter_ms: u64,
}

impl Faults {
    pub const NONE: Faults = Faults {
        drop: 0.0,
        dup: 0.0,
        reorder: 0.0,
        cut: 0.0,
        latency_ms: 5,
        jitter_ms: 10,
    };
}

#[derive(Debug, Clone)]
pub struct LinkSpec {
    pub dialer: usize,
    pub acceptor: usize,
    pub kind: LinkKind,
    pub faults: Faults,
    /// The relays, for a [`LinkKind::Relay`] link.
    pub relay: Option<RelaySpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    Star,
    Chain,
    Mesh,
}

#[derive(Debug, Clone)]
pub enum Op {
    /// One local transaction.
    Write {
        peer: usize,
        cells: Vec<(CellKey, crsync_peer::SqlValue)>,
    },
    /// Rewrites a cell with the value it holds (a transaction with no rows).
    Rewrite { peer: usize, key: CellKey },
    /// Breaks a link's connection (it redials after a backoff).
    Cut { link: usize },
    /// Stops a peer for a while (store kept, sessions lost).
    Restart { peer: usize, down: Duration },
    /// Freezes a peer (no events processed) for a while.
    Pause { peer: usize, duration: Duration },
    /// Raises a crsync peer's schema version to 2.
    Upgrade { peer: usize },
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub topology: Topology,
    pub peers: Vec<PeerSpec>,
    pub links: Vec<LinkSpec>,
    /// Values a v1 peer cannot carry are written (no v1 peer present).
    pub lossy_values: bool,
    pub ops: Vec<(Duration, Op)>,
    pub heal_at: Duration,
    /// Accepting sessions believe only their remote's claims about itself
    /// (the default `Trust` of an accepted connection); otherwise every
    /// session believes every claim. Odd seeds (no draw, so the other
    /// choices of a seed do not move).
    pub own_site_trust: bool,
    /// A hostile peer (the last peer, on the last link), if any: added by
    /// [`super::hostile::add`] from a generator of its own.
    pub hostile: Option<super::hostile::Hostile>,
}

pub fn faults(rng: &mut StdRng) -> Faults {
    if rng.random_bool(0.25) {
        return Faults {
            latency_ms: rng.random_range(1..50),
            ..Faults::NONE
        };
    }
    Faults {
        drop: rng.random_range(0.0..0.3),
        dup: rng.random_range(0.0..0.2),
        reorder: rng.random_range(0.0..0.3),
        cut: if rng.random_bool(0.5) {
            rng.random_range(0.0..0.03)
        } else {
            0.0
        },
        latency_ms: rng.random_range(1..150),
        jitter_ms: rng.random_range(0..300),
    }
}

pub fn random_key(rng: &mut StdRng, keys: i64) -> CellKey {
    CellKey {
        table: rng.random_range(0..2),
        pk: rng.random_range(0..keys),
        col: rng.random_range(0..4),
    }
}

impl Scenario {
    pub fn generate(seed: u64, rng: &mut StdRng) -> Scenario {
        let n = rng.random_range(2..=5usize);
        let topology = match rng.random_range(0..3) {
            0 => Topology::Star,
            1 => Topology::Chain,
            _ => Topology::Mesh,
        };
        let v1_count = rng.random_range(0..=2usize.min(n - 1));
        // v1 peers never link to each other: in a star they are leaves (or the
        // centre, alone), in a chain never adjacent.
        let mut is_v1 = vec![false; n];
        for _ in 0..v1_count {
            for _attempt in 0..8 {
                let i = rng.random_range(0..n);
                if is_v1[i] {
                    continue;
                }
                let ok = match topology {
                    Topology::Star => {
                        if i == 0 {
                            !is_v1.iter().any(|v| *v)
                        } else {
                            !is_v1[0]
                        }
                    }
                    Topology::Chain => {
                        let left = i > 0 && is_v1[i - 1];
                        let right = i + 1 < n && is_v1[i + 1];
                        !(left || right)
                    }
                    Topology::Mesh => true,
                };
                if ok && (0..n).filter(|j| !is_v1[*j]).count() > 1 {
                    is_v1[i] = true;
                    break;
                }
            }
        }
        let edges: Vec<(usize, usize)> = match topology {
            Topology::Star => (1..n).map(|i| (i, 0)).collect(),
            Topology::Chain => (0..n - 1).map(|i| (i, i + 1)).collect(),
            Topology::Mesh => (0..n)
                .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
                .filter(|(i, j)| !(is_v1[*i] && is_v1[*j]))
                .collect(),
        };
        let peers: Vec<PeerSpec> = is_v1
            .iter()
            .map(|v1| {
                if *v1 {
                    PeerSpec::V1 {
                        page_size: rng.random_range(1..=6),
                    }
                } else {
                    PeerSpec::Crsync {
                        schema: if rng.random_bool(0.15) { 1 } else { 2 },
                        max_changes: rng.random_range(1..=8),
                        window: rng.random_range(1..=8),
                    }
                }
            })
            .collect();
        let degree = |p: usize| edges.iter().filter(|(a, b)| *a == p || *b == p).count();
        let links = edges
            .iter()
            .map(|&(a, b)| {
                // In a star the leaves dial the centre; elsewhere either end may
                // dial, except that a v1 peer with several links serves them all
                // (a v1 client sends only its own rows live: it relays nothing).
                let (dialer, acceptor) = if is_v1[a] && degree(a) > 1 {
                    (b, a)
                } else if (is_v1[b] && degree(b) > 1)
                    || topology == Topology::Star
                    || rng.random_bool(0.5)
                {
                    (a, b)
                } else {
                    (b, a)
                };
                let kind = match (is_v1[dialer], is_v1[acceptor]) {
                    (true, _) => LinkKind::V1Client,
                    (_, true) => LinkKind::V1Server,
                    _ if rng.random_bool(0.25) => LinkKind::SseCrsync,
                    _ => LinkKind::Stream,
                };
                LinkSpec {
                    dialer,
                    acceptor,
                    kind,
                    faults: faults(rng),
                    relay: None,
                }
            })
            .collect::<Vec<_>>();
        let lossy_values = v1_count == 0;
        let active = Duration::from_millis(rng.random_range(2_000..90_000));
        let keys = rng.random_range(1..=6i64);
        let op_count = rng.random_range(2..=24usize);
        let mut ops = Vec::new();
        for _ in 0..op_count {
            let at = Duration::from_millis(rng.random_range(0..=active.as_millis() as u64));
            let peer = rng.random_range(0..n);
            let roll = rng.random_range(0..100);
            let op = if roll < 50 {
                let k = rng.random_range(1..=4);
                let cells = (0..k)
                    .map(|_| {
                        let key = random_key(rng, keys);
                        (key, super::values::gen_value(rng, key.col, lossy_values))
                    })
                    .collect();
                Op::Write { peer, cells }
            } else if roll < 58 {
                // The same cell on several peers at once (equal values now and then).
                let key = random_key(rng, keys);
                let val = super::values::gen_value(rng, key.col, lossy_values);
                for p in 0..n {
                    if p == peer || rng.random_bool(0.5) {
                        let val = if rng.random_bool(0.3) {
                            val.clone()
                        } else {
                            super::values::gen_value(rng, key.col, lossy_values)
                        };
                        ops.push((
                            at,
                            Op::Write {
                                peer: p,
                                cells: vec![(key, val)],
                            },
                        ));
                    }
                }
                continue;
            } else if roll < 61 {
                let size = rng.random_range(20..=60);
                let table = rng.random_range(0..2);
                let cells = (0..size)
                    .map(|i| {
                        let key = CellKey {
                            table,
                            pk: 100 + i / 4,
                            col: (i % 4) as u8,
                        };
                        (key, super::values::gen_value(rng, key.col, lossy_values))
                    })
                    .collect();
                Op::Write { peer, cells }
            } else if roll < 65 {
                Op::Rewrite {
                    peer,
                    key: random_key(rng, keys),
                }
            } else if roll < 77 {
                if links.is_empty() {
                    continue;
                }
                Op::Cut {
                    link: rng.random_range(0..links.len()),
                }
            } else if roll < 85 {
                Op::Restart {
                    peer,
                    down: Duration::from_millis(rng.random_range(10..30_000)),
                }
            } else if roll < 93 {
                Op::Pause {
                    peer,
                    duration: Duration::from_millis(rng.random_range(100..100_000)),
                }
            } else {
                Op::Upgrade { peer }
            };
            ops.push((at, op));
        }
        ops.sort_by_key(|(at, _)| *at);
        let heal_at = active + Duration::from_millis(rng.random_range(0..5_000));
        Scenario {
            seed,
            topology,
            peers,
            links,
            lossy_values,
            ops,
            heal_at,
            own_site_trust: seed % 2 == 1,
            hostile: None,
        }
    }
}
