//! Scenarios with Nostr relay links: some crsync-to-crsync links become
//! [`LinkKind::Relay`] links, and their peers go offline for long periods
//! (asleep: a pause, the sessions kept; or switched off: a restart), now and
//! then one after the other so that the two ends are never online together,
//! while they write. Drawn from a generator of its own (like
//! [`super::hostile::add`]), so the other choices of a seed do not move.
//!
//! What a relay link does at run time is in `world/relay.rs`.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scenario::{LinkKind, Op, PeerSpec, RelaySpec, Scenario, random_key};

const SALT: u64 = 0x6e6f_7374_725f_6c6e; // "nostr_ln"

/// Relay-carried events expire after one of these (NIP-40): short, so that
/// expiry happens while a peer is away.
const TTLS: [Duration; 4] = [
    Duration::from_secs(20),
    Duration::from_secs(120),
    Duration::from_secs(900),
    Duration::from_secs(7 * 24 * 3600),
];
/// Event size limits: tiny ones cut most messages into parts.
const MAX_BYTES: [usize; 3] = [700, 4_000, 65_536];

/// Makes relay links of some crsync-to-crsync links in `share_percent` of
/// the scenarios, with long offline periods and writes spread over them.
pub fn add(scenario: &mut Scenario, share_percent: u64) {
    let mut rng = StdRng::seed_from_u64(scenario.seed ^ SALT);
    if rng.random_range(0..100) >= share_percent {
        return;
    }
    let crsync = |p: usize| matches!(scenario.peers[p], PeerSpec::Crsync { .. });
    let candidates: Vec<usize> = (0..scenario.links.len())
        .filter(|&l| {
            let link = &scenario.links[l];
            crsync(link.dialer) && crsync(link.acceptor)
        })
        .collect();
    if candidates.is_empty() {
        return;
    }
    let all = rng.random_bool(0.4);
    let mut chosen = Vec::new();
    for &l in &candidates {
        if all || rng.random_bool(0.5) {
            chosen.push(l);
        }
    }
    if chosen.is_empty() {
        chosen.push(candidates[rng.random_range(0..candidates.len())]);
    }
    for &l in &chosen {
        let link = &mut scenario.links[l];
        link.kind = LinkKind::Relay;
        link.relay = Some(RelaySpec {
            relays: rng.random_range(1..=2),
            ttl: TTLS[rng.random_range(0..TTLS.len())],
            max_bytes: MAX_BYTES[rng.random_range(0..MAX_BYTES.len())],
        });
    }
    let n = scenario.peers.len();
    let active = scenario.heal_at.as_millis() as u64;
    let mut end = Duration::ZERO;
    let mut ops: Vec<(Duration, Op)> = Vec::new();
    // Offline periods of the relay links' peers, seconds to an hour.
    let ends: Vec<usize> = chosen
        .iter()
        .flat_map(|&l| [scenario.links[l].dialer, scenario.links[l].acceptor])
        .collect();
    for _ in 0..rng.random_range(1..=4) {
        let peer = ends[rng.random_range(0..ends.len())];
        let at = Duration::from_millis(rng.random_range(0..=active));
        let long = Duration::from_secs(rng.random_range(10..3_600));
        end = end.max(at + long);
        ops.push((at, offline(&mut rng, peer, long)));
        // Writes meanwhile (by anyone: an asleep peer's write waits for it
        // to wake, a switched-off peer's is skipped).
        for _ in 0..rng.random_range(0..=3) {
            let at = at + Duration::from_millis(rng.random_range(0..=long.as_millis() as u64));
            let writer = rng.random_range(0..n);
            ops.push((at, write(&mut rng, writer, scenario.lossy_values)));
        }
    }
    // One relay link's ends take turns: a is away while b writes, then b is
    // away while a writes, never both online together.
    if rng.random_bool(0.5) {
        let l = chosen[rng.random_range(0..chosen.len())];
        let (a, b) = (scenario.links[l].dialer, scenario.links[l].acceptor);
        let mut at = Duration::from_millis(rng.random_range(0..=active));
        let (mut away, mut here) = (a, b);
        for _ in 0..rng.random_range(2..=5) {
            let long = Duration::from_secs(rng.random_range(30..3_600));
            ops.push((at, offline(&mut rng, away, long)));
            // The one here writes, then goes away itself as the other returns.
            let wrote = at + Duration::from_millis(rng.random_range(1..=long.as_millis() as u64));
            ops.push((wrote, write(&mut rng, here, scenario.lossy_values)));
            at += long;
            end = end.max(at);
            std::mem::swap(&mut away, &mut here);
        }
    }
    // Mostly the heal waits for the offline periods to end; sometimes it
    // cuts them short.
    if rng.random_bool(0.7) {
        let after = Duration::from_millis(rng.random_range(0..5_000));
        scenario.heal_at = scenario.heal_at.max(end + after);
    }
    scenario.ops.extend(ops);
    scenario.ops.sort_by_key(|(at, _)| *at);
}

/// Asleep (a pause: sessions kept, events wait at the relays) or switched
/// off (a restart: sessions lost).
fn offline(rng: &mut StdRng, peer: usize, long: Duration) -> Op {
    if rng.random_bool(0.5) {
        Op::Pause {
            peer,
            duration: long,
        }
    } else {
        Op::Restart { peer, down: long }
    }
}

fn write(rng: &mut StdRng, peer: usize, lossy: bool) -> Op {
    let cells = (0..rng.random_range(1..=3))
        .map(|_| {
            let key = random_key(rng, 6);
            (key, super::values::gen_value(rng, key.col, lossy))
        })
        .collect();
    Op::Write { peer, cells }
}
