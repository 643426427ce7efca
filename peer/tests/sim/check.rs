//! What must hold once the healed world is quiescent.

use std::collections::BTreeMap;

use crsync_peer::proto::SessionPhase;

use super::scenario::LinkKind;
use super::trace::{fmt_cursor, peer_index};
use super::values::{CellKey, Version};
use super::world::{End, Node, World};

/// Per peer, a representative of its crsync component (crsync peers joined
/// by crsync-to-crsync links); a v1 peer is alone.
fn components(world: &World) -> Vec<usize> {
    fn root(c: &mut [usize], i: usize) -> usize {
        let mut r = i;
        while c[r] != r {
            r = c[r];
        }
        r
    }
    let mut c: Vec<usize> = (0..world.peers.len()).collect();
    for link in &world.links {
        if matches!(
            link.kind,
            LinkKind::Stream | LinkKind::SseCrsync | LinkKind::Relay
        ) {
            let (a, b) = (root(&mut c, link.dialer), root(&mut c, link.acceptor));
            c[a] = b;
        }
    }
    (0..c.len()).map(|i| root(&mut c, i)).collect()
}

/// Pairs of crsync replicas in one component, on the same schema, whose
/// cursors differ. (A replica on an older schema refuses the batches of a
/// newer one, claims included, until it upgrades.)
pub fn cursor_lag(world: &World) -> Vec<String> {
    let components = components(world);
    let cursors: Vec<Option<(i64, crsync_peer::Cursor)>> = world
        .peers
        .iter()
        .map(|p| match &p.node {
            Node::Crsync(store) if !p.hostile => Some((store.schema_version, store.cursor())),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    if world.own_site_trust {
        // Claims relayed through an accepting session are not believed, so
        // cursors may lag there; what must hold is that none claims more of
        // a site than the site itself holds.
        for (a, ca) in cursors.iter().enumerate() {
            let Some((_, ca)) = ca else { continue };
            for (s, cs) in cursors.iter().enumerate() {
                let Some((_, cs)) = cs else { continue };
                let site = world.peers[s].site;
                if ca.get(&site) > cs.get(&site) {
                    out.push(format!(
                        "p{a} claims more of p{s} than p{s} holds: {} vs {}",
                        fmt_cursor(ca),
                        fmt_cursor(cs)
                    ));
                }
            }
        }
        return out;
    }
    for a in 0..cursors.len() {
        for b in a + 1..cursors.len() {
            if let (Some((sa, ca)), Some((sb, cb))) = (&cursors[a], &cursors[b]) {
                if components[a] == components[b] && sa == sb && ca != cb {
                    out.push(format!(
                        "cursors of p{a} and p{b} differ: {} vs {}",
                        fmt_cursor(ca),
                        fmt_cursor(cb)
                    ));
                }
            }
        }
    }
    out
}

/// Every replica's row for `key`, with where it sits (local/origin versions).
fn holders(world: &World, key: &CellKey) -> String {
    let mut out = Vec::new();
    for (p, peer) in world.peers.iter().enumerate() {
        let row = match &peer.node {
            Node::Crsync(store) => store.cells.get(key).map(|c| {
                format!(
                    "cv {} {:?} site p{} origin {} at local {}",
                    c.col_version,
                    c.val,
                    peer_index(&c.site),
                    c.origin,
                    c.local
                )
            }),
            Node::V1(v1) => v1.cells.get(key).map(|c| {
                format!(
                    "cv {} {:?} site p{} at db_version {}",
                    c.col_version,
                    c.val,
                    peer_index(&c.site),
                    c.db_version
                )
            }),
        };
        out.push(format!("p{p}: {}", row.unwrap_or_else(|| "-".into())));
    }
    out.join("; ")
}

fn rows(world: &World, peer: usize) -> BTreeMap<CellKey, Version> {
    match &world.peers[peer].node {
        Node::Crsync(store) => store.cells.iter().map(|(k, c)| (*k, c.version())).collect(),
        Node::V1(v1) => v1.cells.iter().map(|(k, c)| (*k, c.version())).collect(),
    }
}

/// Whether `got` is a version the hostile peer forged for `key` that beats
/// the honest winner (`None`: no honest write): what a replica holds when a
/// forged change was applied as data.
fn forged_wins(world: &World, key: &CellKey, got: &Version, honest: Option<&Version>) -> bool {
    world.forged.get(key).is_some_and(|forged| {
        forged.contains(got)
            && honest
                .is_none_or(|h| super::values::cmp_versions(got, h) == std::cmp::Ordering::Greater)
    })
}

/// Checks, in order:
///
/// 1. **Nothing lost, all identical**: every replica (v1 ones included) holds,
///    for every cell, exactly the LWW winner of all versions ever written to
///    it (column version, value and site), and no other cell. With a
///    hostile peer ([`super::hostile`]): its replica is not checked, and a
///    version it forged under another site's id may win a cell, if it does
///    so at every honest replica (honest replicas end identical).
/// 2. **Cursors claim only what is proven** (checked for honest replicas;
///    the hostile peer's claims about other sites, its cursors and forged
///    ranges, must be believed by nobody). No crsync replica's entry for a
///    site exceeds what that site itself holds (a crsync site's
///    `own_version`, a v1 site's highest own version): an over-claim makes
///    receivers skip that site's next writes. And a claim needs evidence: a
///    crsync site is claimed only inside its crsync component (peers joined
///    by crsync-to-crsync links: only crsync sends ranges, and v1 peers relay
///    changes but no claims), and a v1 site never (a v1 sender pages without
///    a snapshot and may skip a row unseen, so nothing it sends proves its
///    versions).
///    And inside a component, crsync replicas on the same schema end with
///    **identical cursors** ([`cursor_lag`]): version-only advances (holes,
///    overwritten versions) travel as change-less batches live, and a merge
///    that only moves the cursor passes the claim on. (Known exception, about
///    1 in 100,000 scenarios: a sender holding a site's versions out of local
///    order withholds the claim past them in that stream (`claim_limits`),
///    and if nothing changes at the sender afterwards no later stream passes
///    it on; seed 52036.)
/// 3. **Sessions settled**: every link is connected, and every crsync session
///    is `Live` (it sent and received `eose`), has nothing in flight, nothing
///    queued, no read open and no per-message reply left unanswered.
/// 4. **No message loop**: the run went quiet within [`HEAL_LIMIT`]
///    (checked by the run), and after the heal, per link direction:
///    - changes sent <= versions written x (stream starts + 1). A stream
///      started from the remote's cursor sends each row the sender holds at
///      most once (at most one change per version ever written), and live
///      streams send each row once more at most when it becomes new at the
///      sender (a version wins at a replica at most once).
///    - stream starts <= 2 + messages on that link from before the heal
///      (delivered after it, or still queued at an end then, counting a
///      merge in flight as one) + the sender's window. Without faults a
///      stream starts when the connection is made and when the remote asks
///      again after a schema upgrade; any other restart answers something
///      from before the heal, at most one each: a `sync` queued while the
///      sender was paused, or a batch that the remote, paused meanwhile,
///      finds past its cursor (a gap, and it asks again). And each batch of
///      a stream the remote could not follow that is still in flight when it
///      asks again is one more gap, one more request, one more restart: at
///      most a window of them (an SSE client cannot POST its refusals, so
///      its server streams on from a cursor the client never reached). A
///      loop would keep asking.
///
/// [`HEAL_LIMIT`]: super::world::HEAL_LIMIT
pub fn check(world: &World) -> Result<(), String> {
    let mut problems = Vec::new();
    // 1. rows (of the honest replicas; the hostile peer's are its own business)
    let honest: Vec<usize> = (0..world.peers.len())
        .filter(|p| !world.peers[*p].hostile)
        .collect();
    for &peer in &honest {
        let have = rows(world, peer);
        let mut diffs = Vec::new();
        for (key, want) in &world.expected {
            match have.get(key) {
                Some(got) if got == want || forged_wins(world, key, got, Some(want)) => {}
                got => diffs.push(format!("{key:?}: has {got:?}, expected {want:?}")),
            }
        }
        for key in have.keys().filter(|k| !world.expected.contains_key(k)) {
            if !forged_wins(world, key, &have[key], None) {
                diffs.push(format!("{key:?}: has {:?}, never written", have[key]));
            }
        }
        if !diffs.is_empty() {
            let first = world
                .expected
                .keys()
                .chain(have.keys())
                .find(|k| have.get(k) != world.expected.get(k));
            if let Some(key) = first {
                diffs.insert(0, format!("everyone's {key:?}: {}", holders(world, key)));
            }
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
    // Honest rows end identical everywhere. Forged rows (a hostile peer's
    // changes under another site's id) may not: the site whose id was forged
    // never takes changes under its own id (nobody receives its own writes),
    // so it, and replicas that hear only through it, lack them. (Part 1
    // checked that each replica holds every honest winner or a forged one.)
    let forged_under = |key: &CellKey, v: Option<&Version>| {
        v.is_some_and(|v| world.forged.get(key).is_some_and(|f| f.contains(v)))
    };
    if let Some((&first, rest)) = honest.split_first() {
        let want = rows(world, first);
        for &peer in rest {
            let have = rows(world, peer);
            let differs = |k: &&CellKey| {
                let (w, h) = (want.get(*k), have.get(*k));
                w != h && !forged_under(k, w) && !forged_under(k, h)
            };
            if let Some(key) = want.keys().chain(have.keys()).find(differs) {
                let key = Some(key);
                problems.push(format!(
                    "p{peer} and p{first} hold different rows; first: {key:?}: {}",
                    key.map(|k| holders(world, k)).unwrap_or_default()
                ));
            }
        }
    }
    // 2. cursors
    let components = components(world);
    // The hostile peer's own cursor is not checked; what others believe of
    // its site is (it holds its own rows only up to its `own_version`).
    let crsync: Vec<usize> = (0..world.peers.len())
        .filter(|p| matches!(world.peers[*p].node, Node::Crsync(_)) && !world.peers[*p].hostile)
        .collect();
    for &a in &crsync {
        let Node::Crsync(store) = &world.peers[a].node else {
            continue;
        };
        for (site, version) in store.cursor().iter() {
            let s = peer_index(&site);
            if world.peers.get(s).is_some_and(|p| p.hostile) {
                // A site speaks for itself: a lie about its own versions is
                // believed and harms only that site (its own sessions are
                // then refused as a copy).
                continue;
            }
            let (most, evidence) = match world.peers.get(s).map(|p| &p.node) {
                Some(Node::Crsync(other)) => (other.own_version, components[s] == components[a]),
                // no v1 message is evidence: a v1 site is never claimed
                Some(Node::V1(v1)) => (v1.max_own, false),
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
            if !evidence {
                problems.push(format!(
                    "p{a} claims p{s} up to {} without a path for that claim",
                    version.0
                ));
            }
        }
    }
    problems.extend(cursor_lag(world));
    // 3. sessions
    for (l, link) in world.links.iter().enumerate() {
        let Some(conn) = link.conn.and_then(|c| world.conns.get(&c).map(|x| (c, x))) else {
            let hostile = world.peers[link.dialer].hostile || world.peers[link.acceptor].hostile;
            if !(link.given_up && hostile) {
                let why = if link.given_up {
                    " (given up: site id conflict)"
                } else {
                    ""
                };
                problems.push(format!("link {l} is not connected{why}"));
            }
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
        // 4. no loop
        let versions = world.stats.versions_written.max(1);
        for d in 0..2 {
            let (sent, restarts) = (link.healed_changes[d], link.healed_restarts[d]);
            let stale = link.stale_received[0] + link.stale_received[1];
            if sent > versions * (restarts + 1) {
                problems.push(format!(
                    "link {l} direction {d} sent {sent} changes after the heal, more than {versions} versions written x ({restarts} stream starts + 1)"
                ));
            }
            let sender = if d == 0 { link.dialer } else { link.acceptor };
            let window = world.peers[sender].window as u64;
            if restarts > 2 + stale + window {
                problems.push(format!(
                    "link {l} direction {d} restarted its stream {restarts} times after the heal, more than 2 + {stale} messages on the link from before the heal + a window of {window}"
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
