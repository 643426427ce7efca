//! What must hold once the healed world is quiescent.

use std::collections::BTreeMap;

use crsync_peer::proto::SessionPhase;

use super::scenario::LinkKind;
use super::trace::{fmt_cursor, peer_index};
use super::values::{CellKey, Version};
use super::world::{End, Node, World};

/// Changes sent per link direction after the heal, at most, per version
/// written in the whole run (see [`check`]).
pub const HEALED_CHANGES_PER_VERSION: u64 = 3;

fn rows(world: &World, peer: usize) -> BTreeMap<CellKey, Version> {
    match &world.peers[peer].node {
        Node::Crsync(store) => store.cells.iter().map(|(k, c)| (*k, c.version())).collect(),
        Node::V1(v1) => v1.cells.iter().map(|(k, c)| (*k, c.version())).collect(),
    }
}

/// Checks, in order:
///
/// 1. **Nothing lost, all identical**: every replica (v1 ones included) holds,
///    for every cell, exactly the LWW winner of all versions ever written to
///    it (column version, value and site), and no other cell.
/// 2. **Cursors**: crsync replicas joined by crsync-to-crsync links (a
///    component) have identical cursors, every entry. A site's entry moves
///    only by ranges, which only crsync peers send, and each stream ends by
///    raising its ranges to the sender's whole cursor; so after quiescence
///    both ends of a crsync link hold each other's cursor, and the equality
///    spreads over the component. Across components (joined only through v1
///    peers) cursors legitimately differ: a v1 peer relays changes but no
///    claims. Everywhere, no entry claims more of a site than the site itself
///    wrote (a crsync site's `own_version`, a v1 site's highest own version):
///    an over-claim would make receivers skip that site's next writes.
/// 3. **Sessions settled**: every link is connected, and every crsync session
///    is `Live` (it sent and received `eose`), has nothing in flight, nothing
///    queued, no read open and no per-message reply left unanswered.
/// 4. **No message loop**: the run went quiet within [`HEAL_LIMIT`]
///    (checked by the run), and after the heal each link direction carried at
///    most [`HEALED_CHANGES_PER_VERSION`] changes per version written in the
///    whole run. Without faults a direction sends at most one initial stream
///    (each surviving row once: at most one change per version written),
///    then each row that becomes new at the sender once (a version wins at a
///    replica at most once), plus what a resend from before the heal still
///    repeats; a loop would grow without bound.
///
/// [`HEAL_LIMIT`]: super::world::HEAL_LIMIT
pub fn check(world: &World) -> Result<(), String> {
    let mut problems = Vec::new();
    // 1. rows
    for peer in 0..world.peers.len() {
        let have = rows(world, peer);
        let mut diffs = Vec::new();
        for (key, want) in &world.expected {
            match have.get(key) {
                Some(got) if got == want => {}
                got => diffs.push(format!("{key:?}: has {got:?}, expected {want:?}")),
            }
        }
        for key in have.keys().filter(|k| !world.expected.contains_key(k)) {
            diffs.push(format!("{key:?}: has {:?}, never written", have[key]));
        }
        if !diffs.is_empty() {
            let kind = if matches!(world.peers[peer].node, Node::V1(_)) {
                "v1"
            } else {
                "crsync"
            };
            problems.push(format!(
                "p{peer} ({kind}) differs in {} cells:\n    {}",
                diffs.len(),
                diffs
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n    ")
            ));
        }
    }
    // 2. cursors
    let n = world.peers.len();
    let crsync: Vec<usize> = (0..n)
        .filter(|p| matches!(world.peers[*p].node, Node::Crsync(_)))
        .collect();
    let mut component: Vec<usize> = (0..n).collect();
    fn root(c: &mut [usize], i: usize) -> usize {
        let mut r = i;
        while c[r] != r {
            r = c[r];
        }
        c[i] = r;
        r
    }
    for link in &world.links {
        if matches!(link.kind, LinkKind::Stream | LinkKind::SseCrsync) {
            let (a, b) = (
                root(&mut component, link.dialer),
                root(&mut component, link.acceptor),
            );
            component[a] = b;
        }
    }
    let cursor_of = |p: usize| match &world.peers[p].node {
        Node::Crsync(store) => store.cursor(),
        Node::V1(v1) => v1.cursor(),
    };
    for &a in &crsync {
        for &b in &crsync {
            if a < b && root(&mut component, a) == root(&mut component, b) {
                let (ca, cb) = (cursor_of(a), cursor_of(b));
                if ca != cb {
                    problems.push(format!(
                        "cursors of p{a} and p{b} differ: {} vs {}",
                        fmt_cursor(&ca),
                        fmt_cursor(&cb)
                    ));
                }
            }
        }
        for (site, version) in cursor_of(a).iter() {
            let s = peer_index(&site);
            let most = match world.peers.get(s).map(|p| &p.node) {
                Some(Node::Crsync(store)) => store.own_version,
                Some(Node::V1(v1)) => v1.max_own,
                None => {
                    problems.push(format!("p{a}'s cursor names an unknown site {site}"));
                    continue;
                }
            };
            if version.0 > most {
                problems.push(format!(
                    "p{a} claims p{s} up to {} but p{s} holds its own rows only up to {most}",
                    version.0
                ));
            }
        }
    }
    // 3. sessions
    for (l, link) in world.links.iter().enumerate() {
        let Some(conn) = link.conn.and_then(|c| world.conns.get(&c).map(|x| (c, x))) else {
            problems.push(format!("link {l} is not connected"));
            continue;
        };
        let (id, conn) = conn;
        for (e, end) in conn.ends.iter().enumerate() {
            let End::Crsync(end) = end else { continue };
            let status = end.session.status();
            let peer = if e == 0 { link.dialer } else { link.acceptor };
            if status.phase != SessionPhase::Live || status.in_flight > 0 {
                problems.push(format!(
                    "p{peer} conn {id}: session not settled: {:?}, {} in flight, eose received {}, sent {}",
                    status.phase, status.in_flight, status.received_eose, status.sent_eose
                ));
            }
            if !end.inbox.is_empty() || end.stream.is_some() || !end.open_replies.is_empty() {
                problems.push(format!(
                    "p{peer} conn {id}: {} queued, read open {}, replies unanswered {:?}",
                    end.inbox.len(),
                    end.stream.is_some(),
                    end.open_replies
                ));
            }
        }
        // 4. bound
        let bound = HEALED_CHANGES_PER_VERSION * world.stats.versions_written.max(1);
        for (d, sent) in link.healed_changes.iter().enumerate() {
            if *sent > bound {
                problems.push(format!(
                    "link {l} direction {d} sent {sent} changes after the heal, more than {bound} ({HEALED_CHANGES_PER_VERSION} per version written)"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n  "))
    }
}
