//! Store rules: validation, gaps, crash atomicity, bounded bookkeeping, change notices.

mod support;

use std::time::Duration;

use crsync_peer::{
    BatchRejection, ChangeSource, Cursor, DbVersion, EnableError, InvalidChange, MergeError,
    PackedPk, SqlValue, StoreEvent, VersionRange,
};
use support::{batches_for, close_side, dump, open_store, side_connection, sync};

type Spoil = Box<dyn Fn(&mut crsync_peer::Change)>;
type Expect = fn(&InvalidChange) -> bool;

/// One batch with every change `a` has (from an empty cursor).
async fn all_changes(a: &crsync_peer::Store) -> crsync_peer::ChangeBatch {
    let mut batches = batches_for(a, &Cursor::new()).await;
    assert_eq!(batches.len(), 1);
    batches.remove(0)
}

#[tokio::test]
async fn invalid_changes_are_rejected_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    a.write(|tx| tx.execute_batch("INSERT INTO items VALUES (1, 'x', 1, NULL), (2, 'y', 2, NULL)"))
        .await
        .unwrap();
    let good = all_changes(&a).await;
    let before = (dump(&b).await, b.cursor().await.unwrap());

    let cases: Vec<(Spoil, Expect)> = vec![
        (Box::new(|c| c.table = "nope".into()), |e| {
            matches!(e, InvalidChange::UnknownTable { .. })
        }),
        (Box::new(|c| c.cid = "nope".into()), |e| {
            matches!(e, InvalidChange::UnknownColumn { .. })
        }),
        (Box::new(|c| c.pk = PackedPk(vec![])), |e| {
            matches!(e, InvalidChange::MalformedPk(_))
        }),
        (Box::new(|c| c.pk = PackedPk(vec![1, 0x09])), |e| {
            matches!(e, InvalidChange::MalformedPk(_))
        }),
        (
            Box::new(|c| c.pk = PackedPk::pack(&[SqlValue::Integer(1), SqlValue::Integer(2)])),
            |e| {
                matches!(
                    e,
                    InvalidChange::PkColumnCount {
                        expected: 1,
                        found: 2
                    }
                )
            },
        ),
        (Box::new(|c| c.col_version = -1), |e| {
            matches!(e, InvalidChange::NegativeVersion { .. })
        }),
        (Box::new(|c| c.cl = -3), |e| {
            matches!(e, InvalidChange::NegativeVersion { .. })
        }),
    ];
    for (i, (spoil, expected)) in cases.iter().enumerate() {
        let mut batch = good.clone();
        // spoil the last change, so a partial apply would be visible
        let last = batch.changes.len() - 1;
        spoil(&mut batch.changes[last]);
        match b.merge(batch).await {
            Err(MergeError::Invalid { index, reason }) => {
                assert_eq!(index, last, "case {i}");
                assert!(expected(&reason), "case {i}: {reason:?}");
            }
            other => panic!("case {i}: expected an invalid-change error, got {other:?}"),
        }
        assert_eq!(
            (dump(&b).await, b.cursor().await.unwrap()),
            before,
            "case {i} changed the database"
        );
    }
    // a zero origin version is refused too
    let mut batch = good.clone();
    batch.changes[0].db_version = DbVersion(0);
    assert!(b.merge(batch).await.is_err());
    // and the good batch still applies
    b.merge(good).await.unwrap();
    assert_eq!(dump(&a).await, dump(&b).await);
}

#[tokio::test]
async fn a_site_id_of_the_wrong_length_does_not_decode() {
    let site = "00".repeat(15);
    let json = format!(
        r#"{{"table":"items","pk":"010901","cid":"name","val":{{"Text":"x"}},"col_version":1,"db_version":1,"site_id":"{site}","cl":1,"seq":0}}"#
    );
    let err = serde_json::from_str::<crsync_peer::Change>(&json).unwrap_err();
    assert!(err.to_string().contains("expected 16 bytes"), "{err}");
}

#[tokio::test]
async fn a_gap_is_refused_whole_and_resending_from_the_cursor_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    for i in 0..6 {
        a.write(move |tx| tx.execute("INSERT INTO items (id, name) VALUES (?1, 'x')", [i]))
            .await
            .unwrap();
    }
    let stream = {
        let mut s = a
            .changes_since_with_limits(
                &Cursor::new(),
                crsync_peer::BatchLimits {
                    max_changes: 1,
                    max_bytes: 1 << 20,
                },
            )
            .await
            .unwrap();
        let mut v = Vec::new();
        while let Some(batch) = s.next_batch().await {
            v.push(batch.unwrap());
        }
        v
    };
    assert!(stream.len() >= 3);
    let empty = dump(&b).await;
    // deliver the second batch first: it starts past what b holds (with
    // one change per batch, a row's transaction goes in parts: the second
    // is a part whose first part b lacks)
    let err = b.merge(stream[1].clone()).await.unwrap_err();
    assert!(
        matches!(
            err,
            MergeError::Rejected(BatchRejection::Gap { .. } | BatchRejection::PartGap { .. })
        ),
        "{err:?}"
    );
    assert_eq!(b.cursor().await.unwrap().get(&a.site_id()), DbVersion::ZERO);
    assert_eq!(
        dump(&b).await,
        empty,
        "a refused batch changed the database"
    );
    // duplicates and reorders of what is held are harmless
    b.merge(stream[0].clone()).await.unwrap();
    b.merge(stream[0].clone()).await.unwrap();
    // the sender resumes from the receiver's cursor: everything arrives
    sync(&a, &b).await;
    assert_eq!(dump(&a).await, dump(&b).await);
    // a range that claims to start past the receiver is a gap even with no rows
    let mut claim = crsync_peer::ChangeBatch::default();
    let held = b.cursor().await.unwrap().get(&a.site_id());
    claim.ranges.insert(
        a.site_id(),
        VersionRange {
            after: DbVersion(held.0 + 5),
            upto: DbVersion(held.0 + 9),
        },
    );
    assert!(matches!(
        b.merge(claim).await,
        Err(MergeError::Rejected(BatchRejection::Gap { .. }))
    ));
}

#[tokio::test]
async fn merge_and_cursor_commit_together() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    a.write(|tx| tx.execute_batch("INSERT INTO items VALUES (1, 'x', 1, NULL)"))
        .await
        .unwrap();
    let batch = all_changes(&a).await;
    // inject a failure between applying the changes and saving the cursor
    b.write(|tx| {
        tx.execute_batch(
            "CREATE TRIGGER fail_cursor BEFORE INSERT ON crsync_cursor BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
    })
    .await
    .unwrap();
    let before = dump(&b).await;
    let err = b.merge(batch.clone()).await.unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(
        dump(&b).await,
        before,
        "changes were applied without the cursor"
    );
    assert_eq!(b.cursor().await.unwrap().get(&a.site_id()), DbVersion::ZERO);
    assert_eq!(b.bookkeeping_stats().await.unwrap().origin_records, 0);
    b.write(|tx| tx.execute_batch("DROP TRIGGER fail_cursor"))
        .await
        .unwrap();
    b.merge(batch).await.unwrap();
    assert_eq!(dump(&a).await, dump(&b).await);
    assert_eq!(
        b.cursor().await.unwrap().get(&a.site_id()),
        a.cursor().await.unwrap().get(&a.site_id())
    );
}

#[tokio::test]
async fn overwriting_one_cell_a_thousand_times_keeps_bookkeeping_small() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    a.write(|tx| tx.execute_batch("INSERT INTO items VALUES (1, 'v0', 0, NULL)"))
        .await
        .unwrap();
    sync(&a, &b).await;
    for i in 1..=1000 {
        a.write(move |tx| tx.execute("UPDATE items SET v = ?1 WHERE id = 1", [i]))
            .await
            .unwrap();
        sync(&a, &b).await;
    }
    assert_eq!(dump(&a).await, dump(&b).await);
    let stats = b.bookkeeping_stats().await.unwrap();
    // live merged transactions: the insert (name, w) and the last update (v);
    // the rest is bounded by the sweep threshold, not by the 1000 updates.
    assert!(
        stats.origin_records <= 2 * 2 + crsync_peer::DEFAULT_ORIGIN_GC_SLACK + 1,
        "origin records grew with history: {stats:?}"
    );
    assert_eq!(stats.cursor_sites, 1);
    // and b still relays correctly with the swept bookkeeping
    let c = open_store(dir.path(), "c.db").await;
    sync(&b, &c).await;
    assert_eq!(dump(&a).await, dump(&c).await);
    assert_eq!(
        c.cursor().await.unwrap().get(&a.site_id()),
        a.cursor().await.unwrap().get(&a.site_id())
    );
}

#[tokio::test]
async fn writes_are_noticed_from_this_store_and_from_other_connections() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let mut events = a.subscribe();
    a.write(|tx| tx.execute_batch("INSERT INTO tags VALUES (1, 't', NULL)"))
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        event,
        StoreEvent::Changed {
            tables: ["tags".to_string()].into(),
            source: ChangeSource::Local
        }
    );
    // another connection (as another process would) writes to the same file
    let side = side_connection(&dir.path().join("a.db"));
    side.execute("INSERT INTO items (id, name) VALUES (7, 'side')", [])
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        event,
        StoreEvent::Changed {
            tables: ["items".to_string()].into(),
            source: ChangeSource::External
        }
    );
    close_side(side);
    // and the external write is part of what the store sends
    let b = open_store(dir.path(), "b.db").await;
    sync(&a, &b).await;
    assert_eq!(dump(&a).await, dump(&b).await);
}

#[tokio::test]
async fn enabling_tables_reports_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    a.write(|tx| tx.execute_batch("CREATE TABLE nokey (a, b); CREATE TABLE uniq (id INTEGER PRIMARY KEY NOT NULL, u TEXT UNIQUE);"))
        .await
        .unwrap();
    assert!(matches!(
        a.enable_crr(&["missing"]).await,
        Err(EnableError::UnknownTable { .. })
    ));
    assert!(matches!(
        a.enable_crr(&["nokey"]).await,
        Err(EnableError::NoPrimaryKey { .. })
    ));
    match a.enable_crr(&["uniq"]).await {
        Err(EnableError::Rejected { table, reason }) => {
            assert_eq!(table, "uniq");
            assert!(!reason.is_empty());
        }
        other => panic!("expected cr-sqlite to refuse a unique index, got {other:?}"),
    }
    // all or nothing: a bad table in the list leaves the good one alone
    a.write(|tx| tx.execute_batch("CREATE TABLE good (id INTEGER PRIMARY KEY NOT NULL, v)"))
        .await
        .unwrap();
    assert!(a.enable_crr(&["good", "nokey"]).await.is_err());
    let is_crr: bool = a
        .read(|c| {
            c.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'good__crsql_clock'",
                [],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    assert!(!is_crr);
    a.enable_crr(&["good"]).await.unwrap();
    a.enable_crr(&["good"]).await.unwrap(); // idempotent
}

#[tokio::test]
async fn schema_version_is_user_version() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    assert_eq!(a.schema_version().await.unwrap(), 0);
    a.write(|tx| tx.execute_batch("PRAGMA user_version = 3"))
        .await
        .unwrap();
    assert_eq!(a.schema_version().await.unwrap(), 3);
}

/// A command queued behind `close` is never answered by the writer thread;
/// its caller must get `Closed` instead of waiting forever (a session
/// accepted during a restart once hung here, holding its connection open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_racing_close_end_with_closed() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..10 {
        let store = support::open_store(dir.path(), &format!("r{round}.db")).await;
        let mut calls = Vec::new();
        for _ in 0..40 {
            let s = store.clone();
            calls.push(tokio::spawn(async move { s.cursor().await.is_ok() }));
        }
        store.clone().close().await.unwrap();
        for call in calls {
            tokio::time::timeout(std::time::Duration::from_secs(5), call)
                .await
                .expect("a command hung after close")
                .unwrap();
        }
    }
}
