//! The session alone: inputs in, outputs checked (the simulator drives many).

use std::time::{Duration, Instant};

use super::*;
use crate::wire::{MessageKind, PeerChange, PeerMessage, PeerMessageKind};
use crate::{Change, DbVersion, PackedPk, SqlValue};

const US: SiteId = SiteId::from_bytes([1; 16]);
const THEM: SiteId = SiteId::from_bytes([2; 16]);

fn session() -> (Session, Instant) {
    let now = Instant::now();
    let config = SessionConfig::default();
    (Session::new(config, US, Cursor::new(), 0, now), now)
}

/// A session whose remote said in its `sync` that it is crsync, with the
/// outputs of that taken.
fn crsync_session() -> (Session, Instant) {
    let (mut s, now) = session();
    transmits(&mut s, now);
    let mut hello = TransportMessage::sync(THEM, Cursor::new());
    hello.crsync = Some(Hello::current());
    s.handle(received(hello), now);
    outputs(&mut s);
    (s, now)
}

fn outputs(s: &mut Session) -> Vec<Output> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

fn transmits(s: &mut Session, now: Instant) -> Vec<TransportMessage> {
    std::iter::from_fn(|| s.poll_transmit(now)).collect()
}

fn received(message: TransportMessage) -> Input {
    Input::Received {
        message,
        reply: None,
    }
}

/// A v1 `data` message: no ranges, no hello, JavaScript values.
fn v1_data(kind: PeerMessageKind, versions: &[i64]) -> TransportMessage {
    let change = |v: &i64| PeerChange {
        table: "t".into(),
        pk: hex::encode(PackedPk::pack(&[SqlValue::Integer(*v)]).0),
        cid: "x".into(),
        val: serde_json::json!(1),
        col_version: 1,
        db_version: *v,
        site_id: THEM.to_hex(),
        cl: 1,
        seq: 0,
    };
    TransportMessage {
        kind: MessageKind::Data,
        data: Some(PeerMessage {
            encoded: None,
            kind,
            data: versions.iter().map(change).collect(),
            schema_version: Some(0),
            ranges: None,
            part: None,
        }),
        ..TransportMessage::ping(THEM)
    }
}

fn merge_of(outs: Vec<Output>) -> ChangeBatch {
    outs.into_iter()
        .find_map(|o| match o {
            Output::Merge(b) => Some(b),
            _ => None,
        })
        .expect("a merge")
}

fn merged(s: &mut Session, cursor: Cursor, now: Instant) {
    let outcome = MergeOutcome {
        cursor,
        local_versions: None,
        staged: Default::default(),
    };
    s.handle(Input::Merged(Ok(outcome)), now);
}

/// The read the session asks for among `outs`, if any: from where, and its hint.
fn read_of(outs: Vec<Output>) -> Option<(Cursor, ReadHint)> {
    outs.into_iter().find_map(|o| match o {
        Output::Read { from, hint } => Some((from, hint)),
        _ => None,
    })
}

/// The `after_local` of the read among `outs`, if there is one.
fn read_after(outs: Vec<Output>) -> Option<i64> {
    read_of(outs).map(|(_, hint)| hint.after_local)
}

#[test]
fn a_v1_batch_with_holes_is_merged_unranged_with_javascript_values() {
    let (mut s, now) = session();
    transmits(&mut s, now); // connect, sync: the round starts
    s.handle(received(v1_data(PeerMessageKind::Changes, &[1, 3, 7])), now);
    let batch = merge_of(outputs(&mut s));
    assert!(batch.ranges.is_empty(), "{:?}", batch.ranges);
    assert!(batch.javascript);
    assert_eq!(batch.changes.len(), 3);
    assert!(s.is_busy());
    merged(&mut s, Cursor::new(), now);
    assert!(!s.is_busy());
    // no GAP, no re-request, no ack to a v1 peer
    assert!(transmits(&mut s, now).is_empty());
}

#[test]
fn a_v1_eose_vouches_for_nothing() {
    // A v1 sender pages without a snapshot: a row overwritten while it pages
    // shifts the offsets and another is skipped, unseen (simulator seed 2 with
    // CRSYNC_SIM_V1_PAGING=interleaved). So no round proves its versions.
    let (mut s, now) = session();
    transmits(&mut s, now);
    s.handle(received(v1_data(PeerMessageKind::Changes, &[1, 3])), now);
    merge_of(outputs(&mut s));
    merged(&mut s, Cursor::new(), now);
    s.handle(received(v1_data(PeerMessageKind::Eose, &[])), now);
    assert!(merge_of(outputs(&mut s)).ranges.is_empty());
    assert!(s.status().received_eose || s.is_busy());
}

/// A merge the store failed ends the connection: the remote's stream goes
/// on counting the batch as delivered (a v1 peer sends a change once and
/// reads no refusal; a crsync server never hears its SSE client's refusal,
/// as the client POSTs no errors), and a later batch of it claimed the
/// refused changes. Simulator seeds 2418, 9447, 50692.
#[test]
fn a_failed_merge_ends_the_connection() {
    let (mut s, now) = session();
    transmits(&mut s, now); // connect, sync
    s.handle(received(v1_data(PeerMessageKind::Changes, &[1])), now);
    merge_of(outputs(&mut s));
    s.handle(
        Input::Merged(Err(MergeFailure::Failed("disk full".into()))),
        now,
    );
    let outs = outputs(&mut s);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Close(CloseReason::MergeFailed(_)))),
        "{outs:?}"
    );
    assert_eq!(s.status().phase, SessionPhase::Closed);
}

#[test]
fn a_gap_is_answered_and_we_ask_again() {
    let (mut s, now) = session();
    transmits(&mut s, now);
    s.handle(received(TransportMessage::connect(THEM)), now);
    let mut batch = ChangeBatch::default();
    batch.ranges.insert(
        THEM,
        VersionRange {
            after: DbVersion(5),
            upto: DbVersion(6),
        },
    );
    s.handle(
        Input::Received {
            message: TransportMessage::data(THEM, &batch, false, 0, Encoding::Lossless),
            reply: Some(7),
        },
        now,
    );
    merge_of(outputs(&mut s));
    let gap = crate::BatchRejection::Gap {
        site: THEM,
        held: DbVersion(0),
        after: DbVersion(5),
    };
    s.handle(Input::Merged(Err(MergeFailure::Rejected(gap))), now);
    let outs = outputs(&mut s);
    assert!(outs.iter().any(|o| matches!(
        o,
        Output::Reply { id: 7, result: Err(r) } if r.code == ErrorCode::Gap
    )));
    let sent = transmits(&mut s, now);
    assert!(
        sent.iter()
            .any(|m| m.kind == MessageKind::Sync && m.ack.is_none()),
        "{sent:?}"
    );
}

/// A merge refused as outdated whose answer comes after our upgrade: the
/// session asks again instead of waiting for an upgrade that already
/// happened (it stayed `Outdated`, and its refusal paused the remote for
/// good). Simulator seed 8727.
#[test]
fn an_outdated_refusal_that_comes_after_our_upgrade_asks_again() {
    let now = Instant::now();
    let mut s = Session::new(SessionConfig::default(), US, Cursor::new(), 1, now);
    transmits(&mut s, now);
    s.handle(received(TransportMessage::connect(THEM)), now);
    let batch = ChangeBatch {
        changes: vec![change(1)],
        ..ChangeBatch::default()
    };
    s.handle(
        received(TransportMessage::data(
            THEM,
            &batch,
            false,
            2,
            Encoding::Lossless,
        )),
        now,
    );
    merge_of(outputs(&mut s));
    // The store refused it under schema 1; we upgrade before hearing so.
    s.handle(Input::SchemaChanged(2), now);
    s.handle(
        Input::Merged(Err(MergeFailure::Outdated { ours: 1, theirs: 2 })),
        now,
    );
    assert_ne!(s.status().phase, SessionPhase::Outdated);
    let sent = transmits(&mut s, now);
    let kinds: Vec<_> = sent.iter().map(|m| (m.kind, m.ack)).collect();
    // the refusal (the batch was not applied), then a new request
    assert_eq!(
        kinds,
        vec![(MessageKind::Error, None), (MessageKind::Sync, None)],
        "{sent:?}"
    );
}

fn change(v: i64) -> Change {
    Change {
        table: "t".into(),
        pk: PackedPk::pack(&[SqlValue::Integer(v)]),
        cid: "x".into(),
        val: SqlValue::Integer(v),
        col_version: 1,
        db_version: DbVersion(v),
        site_id: US,
        cl: 1,
        seq: 0,
    }
}

#[test]
fn a_live_read_starts_after_what_the_last_stream_delivered() {
    let (mut s, now) = session();
    transmits(&mut s, now);
    s.handle(received(TransportMessage::sync(THEM, Cursor::new())), now);
    assert_eq!(read_after(outputs(&mut s)), Some(0));
    assert!(s.wants_batch());
    let batch = ChangeBatch {
        changes: vec![change(1)],
        ranges: [(
            US,
            VersionRange {
                after: DbVersion(0),
                upto: DbVersion(1),
            },
        )]
        .into_iter()
        .collect(),
        ..ChangeBatch::default()
    };
    s.handle(
        Input::Batch {
            batch,
            read_upto: 4,
        },
        now,
    );
    s.handle(Input::StreamEnded, now);
    let sent = transmits(&mut s, now);
    let kinds: Vec<_> = sent
        .iter()
        .map(|m| m.data.as_ref().map(|d| d.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![Some(PeerMessageKind::Changes), Some(PeerMessageKind::Eose)]
    );
    // a local write: the next stream skips what was already sent
    let cursor: Cursor = [(US, DbVersion(5))].into_iter().collect();
    s.handle(Input::LocalChanged { cursor }, now);
    assert_eq!(read_after(outputs(&mut s)), Some(4));
}

#[test]
fn the_window_bounds_batches_in_flight_and_a_lost_ack_resends() {
    let (mut s, now) = crsync_session();
    let mut sent = 0;
    for v in 1..=20 {
        if !s.wants_batch() {
            break;
        }
        let batch = ChangeBatch {
            changes: vec![change(v)],
            ranges: [(
                US,
                VersionRange {
                    after: DbVersion(v - 1),
                    upto: DbVersion(v),
                },
            )]
            .into_iter()
            .collect(),
            ..ChangeBatch::default()
        };
        s.handle(
            Input::Batch {
                batch,
                read_upto: v,
            },
            now,
        );
        sent += transmits(&mut s, now).len();
    }
    assert_eq!(sent, SessionConfig::default().window);
    assert!(!s.wants_batch());
    // no acknowledgement comes: after the timeout, the stream restarts from zero
    let later = now + SessionConfig::default().ack_timeout + Duration::from_millis(1);
    s.handle(Input::Timeout, later);
    let outs = outputs(&mut s);
    assert!(outs.iter().any(|o| matches!(o, Output::CancelRead)));
    assert!(outs.iter().any(|o| matches!(
        o,
        Output::Read { from, hint } if from.is_empty() && hint.after_local == 0
    )));
}

/// A stream parked while the window is full is read again, once the remote
/// acknowledges, from after the last batch sent: nothing is skipped (the
/// batch the session held is sent first) and nothing delivered is re-read.
#[test]
fn a_parked_stream_is_read_again_after_what_was_delivered() {
    let (mut s, now) = crsync_session();
    let ranged = |v: i64| ChangeBatch {
        changes: vec![change(v)],
        ranges: [(US, range(v - 1, v))].into_iter().collect(),
        ..ChangeBatch::default()
    };
    let window = SessionConfig::default().window as i64;
    for v in 1..=window + 1 {
        s.handle(
            Input::Batch {
                batch: ranged(v),
                read_upto: v,
            },
            now,
        );
        transmits(&mut s, now);
    }
    // the window is full and one batch waits in the session: park the stream
    assert!(!s.wants_batch());
    s.handle(Input::StreamParked, now);
    assert!(
        read_of(outputs(&mut s)).is_none(),
        "nothing read while nothing can go"
    );
    // the remote acknowledges everything sent: the held batch goes, then a new read
    let acked: Cursor = [(US, DbVersion(window))].into_iter().collect();
    let mut ack = TransportMessage::ack(THEM, acked);
    if let Some(hello) = ack.crsync.as_mut() {
        hello.received = Some(window as u64);
    }
    s.handle(received(ack), now);
    let sent = transmits(&mut s, now);
    let versions: Vec<i64> = sent
        .iter()
        .filter_map(|m| m.data.as_ref())
        .flat_map(|d| d.data.iter().map(|c| c.db_version))
        .collect();
    assert_eq!(versions, vec![window + 1]);
    let (from, hint) = read_of(outputs(&mut s)).expect("a new read");
    assert_eq!(from.get(&US), DbVersion(window + 1));
    assert_eq!(hint.after_local, window + 1);
}

#[test]
fn a_dialed_session_closes_when_nothing_arrives() {
    let (mut s, now) = session();
    let limit = SessionConfig::default().liveness_timeout.expect("a limit");
    assert!(s.poll_timeout().expect("a timer") <= now + limit);
    s.handle(Input::Timeout, now + limit);
    assert!(
        outputs(&mut s)
            .iter()
            .any(|o| matches!(o, Output::Close(CloseReason::Timeout(_))))
    );
    assert_eq!(s.status().phase, SessionPhase::Closed);
}

/// A session whose v1 remote asked for everything and got our (empty) initial stream.
fn live_with_v1_remote() -> (Session, Instant) {
    let (mut s, now) = session();
    transmits(&mut s, now);
    s.handle(
        received(TransportMessage::sync(THEM, Cursor::new()).without_hello()),
        now,
    );
    outputs(&mut s);
    s.handle(Input::StreamEnded, now);
    transmits(&mut s, now); // eose
    (s, now)
}

#[test]
fn a_v1_remotes_own_changes_are_not_echoed_back_to_it() {
    let (mut s, now) = live_with_v1_remote();
    s.handle(received(v1_data(PeerMessageKind::Changes, &[4, 9])), now);
    merge_of(outputs(&mut s));
    merged(&mut s, Cursor::new(), now);
    s.handle(
        Input::LocalChanged {
            cursor: Cursor::new(),
        },
        now,
    );
    let (read, _) = read_of(outputs(&mut s)).expect("a read");
    assert_eq!(read.get(&THEM), DbVersion(9));
}

#[test]
fn rows_merged_from_a_remote_are_not_read_back_for_it() {
    let (mut s, now) = live_with_v1_remote();
    s.handle(received(v1_data(PeerMessageKind::Changes, &[3])), now);
    merge_of(outputs(&mut s));
    let outcome = MergeOutcome {
        cursor: Cursor::new(),
        local_versions: Some((10, 11)),
        staged: Default::default(),
    };
    s.handle(Input::Merged(Ok(outcome)), now);
    s.handle(
        Input::LocalChanged {
            cursor: Cursor::new(),
        },
        now,
    );
    let (_, hint) = read_of(outputs(&mut s)).expect("a read");
    assert!(hint.skips(10) && hint.skips(11) && !hint.skips(12));
}

#[test]
fn of_a_v1_cursor_only_the_remotes_own_entry_is_believed() {
    let (mut s, now) = session();
    transmits(&mut s, now);
    let other = SiteId::from_bytes([3; 16]);
    // A v1 peer reports a relayed site at its own local version.
    let claim: Cursor = [(THEM, DbVersion(5)), (other, DbVersion(6))]
        .into_iter()
        .collect();
    s.handle(
        received(TransportMessage::sync(THEM, claim).without_hello()),
        now,
    );
    let (from, _) = read_of(outputs(&mut s)).expect("a read");
    assert_eq!(from.get(&THEM), DbVersion(5));
    assert_eq!(from.get(&other), DbVersion::ZERO);
}

trait WithoutHello {
    fn without_hello(self) -> Self;
}

impl WithoutHello for TransportMessage {
    /// As a v1 peer sends it.
    fn without_hello(mut self) -> Self {
        self.crsync = None;
        self
    }
}

// ---- trust (DESIGN §5)

const OTHER: SiteId = SiteId::from_bytes([3; 16]);

fn range(after: i64, upto: i64) -> VersionRange {
    VersionRange {
        after: DbVersion(after),
        upto: DbVersion(upto),
    }
}

/// A session on the accepting side, with its trust default, after the
/// remote's hello.
fn accepted(cursor: Cursor, max_claim_sites: usize) -> (Session, Instant) {
    let now = Instant::now();
    let config = SessionConfig {
        side: Side::Accepted,
        trust: Trust::default_for(Side::Accepted),
        max_claim_sites,
        ..SessionConfig::default()
    };
    let mut s = Session::new(config, US, cursor, 0, now);
    transmits(&mut s, now);
    s.handle(received(TransportMessage::connect(THEM)), now);
    (s, now)
}

#[test]
fn an_accepted_remote_cannot_claim_another_site() {
    let (mut s, now) = accepted(Cursor::new(), 16);
    let forged = ChangeBatch {
        changes: vec![Change {
            site_id: OTHER,
            db_version: DbVersion(1_000_000_000_000_000),
            ..change(1)
        }],
        ranges: [
            (OTHER, range(0, 1_000_000_000_000_000)),
            (THEM, range(0, 4)),
        ]
        .into_iter()
        .collect(),
        ..ChangeBatch::default()
    };
    let message = TransportMessage::data(THEM, &forged, false, 0, Encoding::Lossless);
    s.handle(received(message), now);
    let batch = merge_of(outputs(&mut s));
    assert_eq!(batch.ranges, [(THEM, range(0, 4))].into_iter().collect());
    assert_eq!(batch.changes.len(), 1, "the change is applied, unranged");
    assert_eq!(s.status().claims_refused, 1);
}

#[test]
fn a_dialer_believes_the_server_it_chose() {
    let (mut s, now) = session();
    transmits(&mut s, now);
    s.handle(received(TransportMessage::connect(THEM)), now);
    let relayed = ChangeBatch {
        changes: vec![Change {
            site_id: OTHER,
            ..change(3)
        }],
        ranges: [(OTHER, range(0, 3))].into_iter().collect(),
        ..ChangeBatch::default()
    };
    let message = TransportMessage::data(THEM, &relayed, false, 0, Encoding::Lossless);
    s.handle(received(message), now);
    assert_eq!(merge_of(outputs(&mut s)).ranges.len(), 1);
}

#[test]
fn an_own_site_receiver_says_so_and_is_sent_no_other_claims() {
    let now = Instant::now();
    let config = SessionConfig {
        side: Side::Accepted,
        trust: Trust::OwnSite,
        ..SessionConfig::default()
    };
    let mut server = Session::new(config, US, Cursor::new(), 0, now);
    let hellos: Vec<_> = transmits(&mut server, now)
        .into_iter()
        .filter_map(|m| m.crsync)
        .collect();
    assert!(!hellos.is_empty());
    assert!(
        hellos
            .iter()
            .all(|h| h.believes.as_deref() == Some("own-site"))
    );

    // A client that heard it sends only its own ranges.
    let mut ours: Cursor = [(US, DbVersion(2))].into_iter().collect();
    ours.advance(OTHER, DbVersion(3));
    let mut client = Session::new(SessionConfig::default(), US, ours, 0, now);
    transmits(&mut client, now);
    let own_site = |mut m: TransportMessage| {
        if let Some(h) = m.crsync.as_mut() {
            h.believes = Some("own-site".into());
        }
        m
    };
    client.handle(received(own_site(TransportMessage::connect(THEM))), now);
    let sync = own_site(TransportMessage::sync(THEM, Cursor::new()));
    client.handle(received(sync), now);
    assert!(read_of(outputs(&mut client)).is_some());
    let batch = ChangeBatch {
        changes: vec![
            change(2),
            Change {
                site_id: OTHER,
                ..change(3)
            },
        ],
        ranges: [(US, range(0, 2)), (OTHER, range(0, 3))]
            .into_iter()
            .collect(),
        ..ChangeBatch::default()
    };
    client.handle(
        Input::Batch {
            batch,
            read_upto: 3,
        },
        now,
    );
    let data = transmits(&mut client, now)
        .into_iter()
        .find(|m| m.kind == MessageKind::Data)
        .expect("the batch goes out");
    let ranges = data.data.and_then(|d| d.ranges).expect("ranges");
    assert_eq!(ranges.len(), 1, "{ranges:?}");
}

#[test]
fn a_claim_naming_too_many_sites_is_refused() {
    let (mut s, now) = accepted(Cursor::new(), 3);
    let huge: Cursor = (10..20u8)
        .map(|i| (SiteId::from_bytes([i; 16]), DbVersion(1)))
        .collect();
    s.handle(
        Input::Received {
            message: TransportMessage::sync(THEM, huge),
            reply: Some(1),
        },
        now,
    );
    let outs = outputs(&mut s);
    assert!(
        outs.iter().any(|o| matches!(
            o,
            Output::Reply { id: 1, result: Err(r) } if r.code == ErrorCode::LimitExceeded
        )),
        "{outs:?}"
    );
    assert!(read_of(outs).is_none(), "no stream started");
}

#[test]
fn a_cursor_holding_more_of_us_than_we_wrote_means_we_are_a_copy() {
    let ours: Cursor = [(US, DbVersion(5))].into_iter().collect();
    let (mut s, now) = {
        let now = Instant::now();
        let mut s = Session::new(SessionConfig::default(), US, ours, 0, now);
        transmits(&mut s, now);
        s.handle(received(TransportMessage::connect(THEM)), now);
        (s, now)
    };
    let theirs: Cursor = [(US, DbVersion(7))].into_iter().collect();
    s.handle(received(TransportMessage::sync(THEM, theirs)), now);
    let outs = outputs(&mut s);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Close(CloseReason::SiteIdConflict { message: m, .. }) if m.contains("crsync fork"))),
        "{outs:?}"
    );
    let farewell = transmits(&mut s, now);
    assert!(
        farewell
            .iter()
            .any(|m| m.code.as_deref() == Some("SITE_ID_CONFLICT")),
        "the remote is told why: {farewell:?}"
    );
}

#[test]
fn a_remote_below_what_we_hold_of_it_is_a_copy() {
    let held: Cursor = [(THEM, DbVersion(9))].into_iter().collect();
    let (mut s, now) = accepted(held, 16);
    let theirs: Cursor = [(THEM, DbVersion(4))].into_iter().collect();
    let message = TransportMessage::sync(THEM, theirs);
    s.handle(
        Input::Received {
            message,
            reply: Some(5),
        },
        now,
    );
    let outs = outputs(&mut s);
    let reply = outs.iter().position(|o| {
        matches!(o, Output::Reply { id: 5, result: Err(r) } if r.code == ErrorCode::SiteIdConflict)
    });
    let close = outs
        .iter()
        .position(|o| matches!(o, Output::Close(CloseReason::SiteIdConflict { .. })));
    assert!(
        reply.is_some() && close.is_some() && reply < close,
        "{outs:?}"
    );
    assert!(
        transmits(&mut s, now)
            .iter()
            .any(|m| m.code.as_deref() == Some("SITE_ID_CONFLICT")),
        "and in-band"
    );
    // Equal or ahead is fine.
    let held: Cursor = [(THEM, DbVersion(9))].into_iter().collect();
    let (mut s, now) = accepted(held, 16);
    let theirs: Cursor = [(THEM, DbVersion(9))].into_iter().collect();
    s.handle(received(TransportMessage::sync(THEM, theirs)), now);
    assert!(
        !outputs(&mut s)
            .iter()
            .any(|o| matches!(o, Output::Close(_)))
    );
}

/// A cursor that may predate the session (a relay's stored request, written
/// before versions of the remote reached us by another path) is not taken
/// as proof of a copy; the remote's next cursor, written since, is checked.
#[test]
fn a_cursor_from_before_the_session_is_not_checked_against_what_it_held() {
    let held: Cursor = [(THEM, DbVersion(9))].into_iter().collect();
    let (mut s, now) = accepted(held, 16);
    let stale: Cursor = [(THEM, DbVersion(4))].into_iter().collect();
    s.handle(
        Input::ReceivedEarlier {
            message: TransportMessage::sync(THEM, stale),
            reply: None,
        },
        now,
    );
    let outs = outputs(&mut s);
    assert!(
        !outs.iter().any(|o| matches!(o, Output::Close(_))),
        "{outs:?}"
    );
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Event(SessionEvent::SyncRequested))),
        "the request is taken: {outs:?}"
    );
    // Written since, and still below what the session held: a copy.
    let theirs: Cursor = [(THEM, DbVersion(5))].into_iter().collect();
    s.handle(received(TransportMessage::ack(THEM, theirs)), now);
    assert!(
        outputs(&mut s)
            .iter()
            .any(|o| matches!(o, Output::Close(CloseReason::SiteIdConflict { .. })))
    );
}

/// A remote that believes us only about our own site, live after our
/// (empty) initial stream: another site's changes go to it unranged.
fn live_with_own_site_remote() -> (Session, Instant) {
    let (mut s, now) = session();
    transmits(&mut s, now);
    let mut request = TransportMessage::sync(THEM, Cursor::new());
    request.crsync = Some(Hello {
        believes: Some(OWN_SITE.into()),
        ..Hello::current()
    });
    s.handle(received(request), now);
    outputs(&mut s);
    s.handle(Input::StreamEnded, now);
    let eose = transmits(&mut s, now);
    assert!(eose.iter().any(|m| m.data.is_some()), "eose: {eose:?}");
    (s, now)
}

fn ack_received(cursor: Cursor, received: Option<u64>) -> TransportMessage {
    let mut ack = TransportMessage::ack(THEM, cursor);
    if let Some(hello) = ack.crsync.as_mut() {
        hello.received = received;
    }
    ack
}

#[test]
fn a_lost_unranged_batch_is_sent_again_on_the_same_connection() {
    // Chain 3 -> 2 -> 1 -> 0 (proptest peers_converge_over_faulty_links):
    // site 3's changes reach 0 unranged, as no range of them is believed.
    // One such batch lost in transit was covered by the next one's ack and
    // never sent again until a reconnect.
    let (mut s, now) = live_with_own_site_remote();
    let other = SiteId::from_bytes([9; 16]);
    let relayed = |v: i64| ChangeBatch {
        changes: vec![Change {
            site_id: other,
            ..change(v)
        }],
        ranges: [(other, range(v - 1, v))].into_iter().collect(),
        ..ChangeBatch::default()
    };
    s.handle(
        Input::LocalChanged {
            cursor: Cursor::new(),
        },
        now,
    );
    assert!(read_of(outputs(&mut s)).is_some(), "a live read");
    let mut numbers = Vec::new();
    for v in 1..=2 {
        s.handle(
            Input::Batch {
                batch: relayed(v),
                read_upto: v,
            },
            now,
        );
        for m in transmits(&mut s, now) {
            let data = m.data.as_ref().expect("data");
            assert!(
                data.ranges.as_ref().is_none_or(|r| r.is_empty()),
                "unranged: {data:?}"
            );
            numbers.push(m.n.expect("numbered"));
        }
    }
    let (first, last) = (numbers[0], numbers[1]);
    assert_eq!(first.0, last.0, "one run");
    // The first was lost, the second arrived: the remote's run has a hole.
    s.handle(
        received(ack_received(Cursor::new(), first.1.checked_sub(1))),
        now,
    );
    assert_eq!(s.status().in_flight, 2, "neither counts as delivered");
    let timeout = SessionConfig::default().ack_timeout;
    s.handle(Input::Timeout, now + timeout);
    let (_, hint) = read_of(outputs(&mut s)).expect("read again");
    assert_eq!(hint.after_local, 0, "from the acknowledged point");
    // A remote that received both acknowledges them.
    let (mut s, now) = live_with_own_site_remote();
    s.handle(
        Input::LocalChanged {
            cursor: Cursor::new(),
        },
        now,
    );
    outputs(&mut s);
    let mut last = 0;
    for v in 1..=2 {
        s.handle(
            Input::Batch {
                batch: relayed(v),
                read_upto: v,
            },
            now,
        );
        last = transmits(&mut s, now)[0].n.expect("numbered").1;
    }
    s.handle(received(ack_received(Cursor::new(), Some(last))), now);
    assert_eq!(s.status().in_flight, 0);
}

/// A crsync `data` message of THEM's: `versions` of its changes, its ranges,
/// and its number in the run that began at `first`.
fn numbered(
    versions: &[i64],
    ranges: &[(SiteId, i64, i64)],
    eose: bool,
    (first, n): (u64, u64),
) -> TransportMessage {
    let batch = ChangeBatch {
        changes: versions
            .iter()
            .map(|&v| Change {
                site_id: THEM,
                ..change(v)
            })
            .collect(),
        ranges: ranges
            .iter()
            .map(|&(site, after, upto)| {
                let range = VersionRange {
                    after: DbVersion(after),
                    upto: DbVersion(upto),
                };
                (site, range)
            })
            .collect(),
        ..ChangeBatch::default()
    };
    let mut message = TransportMessage::data(THEM, &batch, eose, 0, Encoding::Lossless);
    message.n = Some((first, n));
    message
}

/// A sender claims versions in a later message that earlier messages of its
/// run carried: believing the claim of a message that overtook a lost one
/// would move the cursor past changes never merged, and the sender's next
/// run, from that cursor, would never send them (peer_convergence, CI run
/// of stop 18: a relayed transaction lost for good in a mesh).
#[test]
fn a_claim_waits_for_the_messages_of_its_run_before_it() {
    let (mut s, now) = crsync_session();
    s.handle(received(numbered(&[], &[], false, (1, 1))), now);
    merge_of(outputs(&mut s));
    merged(&mut s, Cursor::new(), now);
    // 2 (THEM's versions 1 and 2, unclaimed) is late; 3 claims them
    s.handle(received(numbered(&[], &[(THEM, 0, 2)], false, (1, 3))), now);
    let early = merge_of(outputs(&mut s));
    assert!(
        early.ranges.is_empty(),
        "claimed ahead of a hole: {early:?}"
    );
    merged(&mut s, Cursor::new(), now);
    s.handle(received(numbered(&[1, 2], &[], false, (1, 2))), now);
    let late = merge_of(outputs(&mut s));
    assert_eq!(late.changes.len(), 2);
    assert!(late.ranges.is_empty());
    merged(&mut s, Cursor::new(), now);
    // the hole is filled: the claim goes in now
    let claim = merge_of(outputs(&mut s));
    assert!(claim.changes.is_empty());
    assert_eq!(
        claim.ranges.get(&THEM).map(|r| (r.after.0, r.upto.0)),
        Some((0, 2))
    );
    let held: Cursor = [(THEM, DbVersion(2))].into_iter().collect();
    merged(&mut s, held, now);
    assert!(!s.is_busy());
}

/// Messages that arrive in order, and copies of earlier ones, are believed at once.
#[test]
fn a_claim_in_order_is_believed_at_once() {
    let (mut s, now) = crsync_session();
    s.handle(
        received(numbered(&[1], &[(THEM, 0, 1)], false, (1, 1))),
        now,
    );
    assert_eq!(merge_of(outputs(&mut s)).ranges.len(), 1);
    merged(&mut s, Cursor::new(), now);
    s.handle(
        received(numbered(&[1], &[(THEM, 0, 1)], false, (1, 1))),
        now,
    );
    assert_eq!(merge_of(outputs(&mut s)).ranges.len(), 1, "a copy");
    merged(&mut s, Cursor::new(), now);
    // a new run starts from what was acknowledged: its first message stands alone
    s.handle(
        received(numbered(&[2], &[(THEM, 1, 2)], false, (5, 5))),
        now,
    );
    assert_eq!(merge_of(outputs(&mut s)).ranges.len(), 1, "a new run");
}

#[test]
fn live_claims_without_changes_go_at_most_every_interval_and_the_last_one_goes() {
    let (mut s, now) = live_with_own_site_remote();
    let claim = |after: i64, upto: i64| Input::Batch {
        batch: ChangeBatch {
            ranges: [(US, range(after, upto))].into_iter().collect(),
            ..ChangeBatch::default()
        },
        read_upto: upto,
    };
    // The wire's ranges: site hex to (after, upto).
    let claims_sent = |s: &mut Session, at: Instant| -> Vec<(i64, i64)> {
        (transmits(s, at).iter())
            .filter_map(|m| m.data.as_ref()?.ranges.as_ref()?.get(&US.to_hex()).copied())
            .collect()
    };
    let local_write = |s: &mut Session, at: Instant| {
        s.handle(
            Input::LocalChanged {
                cursor: Cursor::new(),
            },
            at,
        );
        assert!(read_of(outputs(s)).is_some(), "a live read");
    };
    local_write(&mut s, now);
    s.handle(claim(0, 3), now);
    assert_eq!(
        claims_sent(&mut s, now),
        vec![(0, 3)],
        "the first goes at once"
    );
    s.handle(Input::StreamEnded, now);

    // Soon after: the stream is dropped, nothing goes, and nothing counts as
    // delivered (the next read starts where this one did).
    let soon = now + Duration::from_millis(10);
    local_write(&mut s, soon);
    s.handle(claim(3, 5), soon);
    assert!(
        outputs(&mut s)
            .iter()
            .any(|o| matches!(o, Output::CancelRead)),
        "the stream is dropped"
    );
    assert!(claims_sent(&mut s, soon).is_empty(), "held back");
    let later = now + Duration::from_millis(20);
    s.handle(
        Input::LocalChanged {
            cursor: Cursor::new(),
        },
        later,
    );
    let (_, hint) = read_of(outputs(&mut s)).expect("read again");
    assert_eq!(hint.after_local, 3, "from after the last claim sent");
    s.handle(claim(3, 7), later);
    assert!(claims_sent(&mut s, later).is_empty(), "still held back");

    // Changes go at once, whatever came before.
    let changes = Input::Batch {
        batch: ChangeBatch {
            changes: vec![change(8)],
            ranges: [(US, range(3, 8))].into_iter().collect(),
            ..ChangeBatch::default()
        },
        read_upto: 8,
    };
    local_write(&mut s, later);
    s.handle(changes, later);
    assert_eq!(claims_sent(&mut s, later), vec![(3, 8)]);
    s.handle(Input::StreamEnded, later);

    // A claim held back goes by the end of the interval, without another write.
    local_write(&mut s, later);
    s.handle(claim(8, 9), later);
    assert!(claims_sent(&mut s, later).is_empty());
    let due = now + LIVE_CLAIM_EVERY;
    s.handle(Input::Timeout, due);
    let (_, hint) = read_of(outputs(&mut s)).expect("read at the deadline");
    assert_eq!(hint.after_local, 8);
    s.handle(claim(8, 9), due);
    assert_eq!(claims_sent(&mut s, due), vec![(8, 9)]);
}
