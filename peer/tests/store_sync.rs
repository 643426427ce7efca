//! Store-level sync: exchange, relay, lossless values, restart.

mod support;

use crsync_peer::{Cursor, DbVersion, SqlValue, Store};
use support::{dump, open_store, sync};

#[tokio::test]
async fn two_stores_converge_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    a.write(|tx| {
        tx.execute_batch("INSERT INTO items VALUES (1, 'a1', 1, NULL), (2, 'a2', 2, x'00ff')")
    })
    .await
    .unwrap();
    b.write(|tx| {
        tx.execute_batch(
            "INSERT INTO items VALUES (3, 'b3', 3, NULL); INSERT INTO tags VALUES (3, 'x', 'note')",
        )
    })
    .await
    .unwrap();
    a.write(|tx| {
        tx.execute_batch(
            "UPDATE items SET name = 'a1!' WHERE id = 1; DELETE FROM items WHERE id = 2",
        )
    })
    .await
    .unwrap();
    sync(&a, &b).await;
    sync(&b, &a).await;
    assert_eq!(dump(&a).await, dump(&b).await);
    // Merging consumes local versions, so b learns a's final version in a second round.
    sync(&a, &b).await;
    assert_eq!(a.cursor().await.unwrap(), b.cursor().await.unwrap());
    // a second exchange sends nothing new
    let again = sync(&a, &b).await;
    assert_eq!(again.applied, 0);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn relayed_changes_keep_their_origin_version() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    let c = open_store(dir.path(), "c.db").await;
    for i in 0..5 {
        a.write(move |tx| tx.execute("INSERT INTO items (id, name) VALUES (?1, 'a')", [i]))
            .await
            .unwrap();
    }
    // b makes local writes of its own first, so its local versions differ from a's.
    for i in 100..110 {
        b.write(move |tx| tx.execute("INSERT INTO items (id, name) VALUES (?1, 'b')", [i]))
            .await
            .unwrap();
    }
    sync(&a, &b).await;
    sync(&b, &c).await; // c gets a's changes only through b
    let a_version = a.cursor().await.unwrap().get(&a.site_id());
    assert_eq!(c.cursor().await.unwrap().get(&a.site_id()), a_version);
    // so a direct exchange a -> c finds nothing missing
    let direct = sync(&a, &c).await;
    assert_eq!(direct.applied, 0);
    assert_eq!(dump(&a).await.len(), dump(&a).await.len());
    sync(&c, &a).await;
    assert_eq!(dump(&a).await, dump(&c).await);
    assert_eq!(dump(&b).await, dump(&c).await);
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}

#[tokio::test]
async fn values_survive_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    let blob: Vec<u8> = (0..=255).collect();
    let values = vec![
        (1, SqlValue::Integer(i64::MAX), SqlValue::Blob(blob.clone())),
        (2, SqlValue::Integer(i64::MIN), SqlValue::Blob(vec![])),
        (3, SqlValue::Integer((1 << 53) + 1), SqlValue::Null),
        (
            4,
            SqlValue::Real(0.1 + 0.2),
            SqlValue::text("ünïcødé \u{0} nul"),
        ),
        (5, SqlValue::Real(f64::MAX), SqlValue::Real(-0.0)),
    ];
    let rows = values.clone();
    a.write(move |tx| {
        for (id, v, w) in rows {
            tx.execute(
                "INSERT INTO items (id, name, v, w) VALUES (?1, 'n', ?2, ?3)",
                (id, v, w),
            )?;
        }
        Ok(())
    })
    .await
    .unwrap();
    sync(&a, &b).await;
    let got = b
        .read(|c| {
            let mut s = c.prepare("SELECT id, v, w FROM items ORDER BY id")?;
            let r = s.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, SqlValue>(1)?,
                    r.get::<_, SqlValue>(2)?,
                ))
            })?;
            r.collect::<Result<Vec<_>, _>>()
        })
        .await
        .unwrap();
    assert_eq!(got, values);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn cursors_and_bookkeeping_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    a.write(|tx| tx.execute_batch("INSERT INTO items VALUES (1, 'x', 1, NULL)"))
        .await
        .unwrap();
    sync(&a, &b).await;
    let before = b.cursor().await.unwrap();
    let site_b = b.site_id();
    b.close().await.unwrap();
    let b = open_store(dir.path(), "b.db").await;
    assert_eq!(b.site_id(), site_b);
    assert_eq!(b.cursor().await.unwrap(), before);
    // relaying after restart still uses the origin version
    let c = open_store(dir.path(), "c.db").await;
    sync(&b, &c).await;
    assert_eq!(
        c.cursor().await.unwrap().get(&a.site_id()),
        before.get(&a.site_id())
    );
    a.write(|tx| tx.execute_batch("INSERT INTO items VALUES (2, 'y', 2, NULL)"))
        .await
        .unwrap();
    let r = sync(&a, &b).await;
    assert_eq!(
        r.transactions, 1,
        "only the new transaction is sent after restart"
    );
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}

#[tokio::test]
async fn empty_cursor_gets_everything_and_full_cursor_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    a.write(|tx| tx.execute_batch("INSERT INTO items VALUES (1, 'x', 1, NULL)"))
        .await
        .unwrap();
    let all = support::batches_for(&a, &Cursor::new()).await;
    assert_eq!(all.iter().map(|b| b.changes.len()).sum::<usize>(), 3);
    let none = support::batches_for(&a, &a.cursor().await.unwrap()).await;
    assert!(none.is_empty(), "{none:?}");
    let _ = DbVersion::ZERO;
    a.close().await.unwrap();
    let _ = Store::builder("unused");
}

#[tokio::test]
async fn a_read_upto_hint_skips_only_what_was_already_read() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    a.write(|tx| tx.execute_batch("INSERT INTO items VALUES (1, 'x', 1, NULL)"))
        .await
        .unwrap();
    sync(&a, &b).await;
    // b's merges consume b's local versions: b now has own versions with no rows
    let a_view_of_b = a.cursor().await.unwrap();
    let limits = crsync_peer::BatchLimits::default();
    let collect = |after_local: i64| {
        let b = b.clone();
        let from = a_view_of_b.clone();
        let hint = crsync_peer::ReadHint {
            after_local,
            ..Default::default()
        };
        async move {
            let mut s = b.changes_since_hinted(&from, &hint, limits).await.unwrap();
            let mut v = Vec::new();
            while let Some(x) = s.next_batch().await {
                v.push(x.unwrap());
            }
            (v, s.read_upto())
        }
    };
    let (empty, read_upto) = collect(0).await;
    assert!(empty.iter().all(|x| x.changes.is_empty()), "{empty:?}");
    assert!(read_upto > 0);
    // then b writes; a stream hinted past what was read sends the same as an unhinted one
    b.write(|tx| tx.execute_batch("INSERT INTO items VALUES (2, 'y', 2, NULL)"))
        .await
        .unwrap();
    let (plain, plain_upto) = collect(0).await;
    let (hinted, _) = collect(read_upto).await;
    assert_eq!(plain, hinted);
    assert_eq!(plain.iter().map(|x| x.changes.len()).sum::<usize>(), 3);
    // a hint past the write skips it
    let (past, _) = collect(plain_upto).await;
    assert_eq!(past.iter().map(|x| x.changes.len()).sum::<usize>(), 0);
}

/// Text SQLite holds as bytes that are not UTF-8, in a primary key and in a
/// column, reaches another store byte for byte: merged directly, and through
/// lossless wire JSON.
#[tokio::test]
async fn text_that_is_not_utf8_survives_byte_for_byte() {
    use crsync_peer::wire::{Encoding, TransportMessage};
    const TABLE: &str = "CREATE TABLE raw (k TEXT PRIMARY KEY NOT NULL, note TEXT)";
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &'static str| {
        let path = dir.path().to_owned();
        async move {
            let s = open_store(&path, name).await;
            s.write(|tx| tx.execute_batch(TABLE)).await.unwrap();
            s.enable_crr(&["raw"]).await.unwrap();
            s
        }
    };
    let (a, b, c) = (open("a.db").await, open("b.db").await, open("c.db").await);
    a.write(|tx| {
        tx.execute_batch(
            "INSERT INTO raw VALUES (CAST(x'ff00fe' AS TEXT), CAST(x'ff00fe' AS TEXT));
             INSERT INTO raw VALUES ('plain', CAST(x'80' AS TEXT));
             UPDATE raw SET note = CAST(x'c328' AS TEXT) WHERE k = 'plain'",
        )
    })
    .await
    .unwrap();
    // a -> b: the Store's own stream and merge
    sync(&a, &b).await;
    // a -> c: through the JSON text a crsync peer sends
    for batch in support::batches_for(&a, &Cursor::new()).await {
        let json =
            TransportMessage::data(a.site_id(), &batch, false, 0, Encoding::Lossless).to_json();
        let back = TransportMessage::from_json(&json).unwrap();
        let batch = crsync_peer::proto::ParsedData::decode(&back.data.unwrap(), false)
            .unwrap()
            .batch;
        c.merge(batch).await.unwrap();
    }
    let t = || "text".to_owned();
    let expected = vec![
        ("706C61696E".to_owned(), t(), "C328".to_owned(), t()),
        ("FF00FE".to_owned(), t(), "FF00FE".to_owned(), t()),
    ];
    assert_eq!(raw_hex(&a).await, expected);
    assert_eq!(raw_hex(&b).await, expected);
    assert_eq!(raw_hex(&c).await, expected);
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}

/// `raw`'s rows as hex, with their storage types.
async fn raw_hex(s: &Store) -> Vec<(String, String, String, String)> {
    s.read(|conn| {
        let mut stmt =
            conn.prepare("SELECT hex(k), typeof(k), hex(note), typeof(note) FROM raw ORDER BY k")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        rows.collect()
    })
    .await
    .expect("read raw")
}

/// Upserts that write equal values commit no rows, yet cr-sqlite counts a
/// version for each; a cursor claiming them went back after a restart, and a
/// receiver told the higher version skipped the next writes as "held".
#[tokio::test]
async fn no_op_upserts_never_claim_versions_a_restart_forgets() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    for i in 0..200i64 {
        // 50 distinct rows, then 150 upserts of values they already have
        let id = i % 50;
        a.write(move |tx| {
            tx.execute(
                "INSERT INTO items (id, name) VALUES (?1, 'same') \
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                [id],
            )
        })
        .await
        .unwrap();
    }
    let site = a.site_id();
    let before = a.cursor().await.unwrap().get(&site);
    let newest_row: i64 = a
        .read(|c| {
            c.query_row("SELECT max(db_version) FROM crsql_changes", [], |r| {
                r.get(0)
            })
        })
        .await
        .unwrap();
    assert_eq!(
        before.0, newest_row,
        "the cursor claims versions without rows"
    );
    sync(&a, &b).await;
    a.close().await.unwrap();
    let a = open_store(dir.path(), "a.db").await;
    assert_eq!(
        a.cursor().await.unwrap().get(&site),
        before,
        "the cursor moved back after a restart"
    );
    a.write(|tx| tx.execute_batch("INSERT INTO items (id, name) VALUES (999, 'after restart')"))
        .await
        .unwrap();
    sync(&a, &b).await;
    let names: Vec<String> = b
        .read(|c| {
            c.prepare("SELECT name FROM items WHERE id = 999")?
                .query_map([], |r| r.get(0))?
                .collect()
        })
        .await
        .unwrap();
    assert_eq!(names, vec!["after restart".to_string()]);
}

/// A merge that writes nothing (its change equals what is held) reports no
/// local versions: cr-sqlite gives that version to the next transaction, and a
/// session that skipped it for the sender would hide the next writes from it.
#[tokio::test]
async fn a_merge_that_writes_nothing_reports_no_local_versions() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    a.write(|tx| tx.execute_batch("INSERT INTO items VALUES (1, 'x', 1, NULL)"))
        .await
        .unwrap();
    let batches = support::batches_for(&a, &b.cursor().await.unwrap()).await;
    let first = b.merge(batches[0].clone()).await.unwrap();
    assert!(first.local_versions.is_some());
    // the same changes again, unranged (as a v1 peer relays them): applied, but equal
    let mut again = batches[0].clone();
    again.ranges.clear();
    for change in &mut again.changes {
        change.db_version = crsync_peer::DbVersion(change.db_version.0 + 5);
    }
    let report = b.merge(again).await.unwrap();
    assert!(report.transactions > 0);
    assert_eq!(report.local_versions, None);
}

/// A store can hold one site's versions out of their local order: here a's
/// version 2 arrived unranged (as a v1 peer relays it) before its version 1.
/// A stream read from b in small batches must still bring c both, and never
/// claim a's versions in a batch without their changes (it claimed 2 with
/// the first batch, and c then skipped version 1 as held). Simulator seeds
/// 8146 and 47601.
#[tokio::test]
async fn versions_out_of_local_order_are_all_sent_before_they_are_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    let c = open_store(dir.path(), "c.db").await;
    for sql in [
        "INSERT INTO items (id, name) VALUES (1, 'first')",
        "INSERT INTO items (id, name) VALUES (2, 'second')",
    ] {
        a.write(move |tx| tx.execute_batch(sql)).await.unwrap();
    }
    let site = a.site_id();
    let all = support::batches_for(&a, &Cursor::new()).await;
    let second: Vec<_> = all
        .iter()
        .flat_map(|batch| batch.changes.iter())
        .filter(|change| change.db_version == DbVersion(2))
        .cloned()
        .collect();
    assert!(!second.is_empty());
    // b gets version 2 alone, unranged; then everything, ranged
    b.merge(crsync_peer::ChangeBatch {
        changes: second,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(b.cursor().await.unwrap().get(&site), DbVersion(0));
    sync(&a, &b).await;
    assert_eq!(b.cursor().await.unwrap().get(&site), DbVersion(2));
    // c reads from b one change per batch
    let limits = crsync_peer::BatchLimits {
        max_changes: 1,
        ..Default::default()
    };
    let mut stream = b
        .changes_since_with_limits(&c.cursor().await.unwrap(), limits)
        .await
        .unwrap();
    while let Some(batch) = stream.next_batch().await {
        c.merge(batch.unwrap()).await.unwrap();
    }
    assert_eq!(dump(&c).await, dump(&a).await);
    // Version 2 went unranged in an earlier batch, so b's stream leaves it
    // unclaimed (c could have refused that batch); a's own stream claims it.
    assert!(c.cursor().await.unwrap().get(&site) <= DbVersion(2));
    sync(&a, &c).await;
    assert_eq!(c.cursor().await.unwrap().get(&site), DbVersion(2));
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}

/// Known limit (README, "A v1 server relays other sites' changes labelled
/// with its own local versions"): a copy of site `a`'s version 2 that came
/// through a v1 server, labelled with that server's local version 8, makes
/// the relay `x` claim `a`'s versions up to 3 in a batch without the row (by
/// its labels the row is version 8, sent later). A receiver `r` that takes
/// that claim skips the true copy from `a` as held, and skips `x`'s copy once
/// `a` told it of versions past 8: the row never reaches it. Relay scenario
/// seed 16 of the simulator (with a variant that held a stream's `eose`)
/// ends this way. Closing it needs "origin version unknown" on the wire.
#[tokio::test]
#[ignore = "known limit: a v1-relabelled copy makes a later claim unsound"]
async fn a_copy_relabelled_by_a_v1_relay_makes_a_claim_unsound() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let x = support::open_store_with(dir.path(), "x.db", |b| b.max_batch_changes(1)).await;
    let r = open_store(dir.path(), "r.db").await;
    for id in 1..=9 {
        a.write(move |tx| tx.execute("INSERT INTO items (id) VALUES (?1)", [id]))
            .await
            .unwrap();
    }
    let site = a.site_id();
    let all = support::batches_for(&a, &Cursor::new()).await;
    let changes: Vec<crsync_peer::Change> = all.into_iter().flat_map(|b| b.changes).collect();
    let of = |v: i64| -> Vec<crsync_peer::Change> {
        changes
            .iter()
            .filter(|c| c.db_version == DbVersion(v))
            .cloned()
            .collect()
    };
    let batch = |changes: Vec<crsync_peer::Change>, ranged: Option<(i64, i64)>| {
        let mut b = crsync_peer::ChangeBatch {
            changes,
            ..Default::default()
        };
        if let Some((after, upto)) = ranged {
            let range = crsync_peer::VersionRange {
                after: DbVersion(after),
                upto: DbVersion(upto),
            };
            b.ranges.insert(site, range);
        }
        b
    };
    // x: a's version 1 from a, version 3 unranged, then version 2 as a v1
    // server relays it (its own local version 8 as the origin version), then
    // a's own batch of versions 2 and 3: version 2 ties with the copy, whose
    // label stays.
    x.merge(batch(of(1), Some((0, 1)))).await.unwrap();
    x.merge(batch(of(3), None)).await.unwrap();
    let mut relabelled = of(2);
    for c in &mut relabelled {
        c.db_version = DbVersion(8);
    }
    x.merge(batch(relabelled, None)).await.unwrap();
    x.merge(batch([of(2), of(3)].concat(), Some((1, 3))))
        .await
        .unwrap();
    assert_eq!(x.cursor().await.unwrap().get(&site), DbVersion(3));
    // The tie wrote no row, but left origin records at the local versions it
    // would have used, which happen to hold the claim back until they are
    // swept or, as here, the next merge's transactions take those versions.
    let b = open_store(dir.path(), "b.db").await;
    for id in 10..12 {
        b.write(move |tx| tx.execute("INSERT INTO items (id) VALUES (?1)", [id]))
            .await
            .unwrap();
    }
    sync(&b, &x).await;
    // r, at a's version 1, takes x's stream up to the first batch that
    // claims a's version 2: the claim comes without row 2.
    r.merge(batch(of(1), Some((0, 1)))).await.unwrap();
    let cursor = r.cursor().await.unwrap();
    for b in support::batches_for(&x, &cursor).await {
        let claims = b.ranges.get(&site).is_some_and(|g| g.upto >= DbVersion(2));
        if claims {
            // x's labels put row 2 at version 8, later in the stream.
            assert!(b.changes.iter().all(|c| c.db_version != DbVersion(8)));
        }
        r.merge(b).await.unwrap();
        if claims {
            break;
        }
    }
    assert_eq!(r.cursor().await.unwrap().get(&site), DbVersion(3));
    // then a's stream (from a's version 1, requested before that claim came)
    // and x's again, from where r is now.
    r.merge(batch(changes.clone(), Some((1, 9)))).await.unwrap();
    sync(&a, &x).await;
    sync(&x, &r).await;
    sync(&a, &r).await;
    assert_eq!(dump(&r).await, dump(&x).await, "r lacks a's row 2");
}
