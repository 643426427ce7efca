//! The live tail: a stream of what was committed since a receiver's last
//! read is built from memory, and carries exactly what a read of the file
//! would (same changes, same claims, same `read_upto`), for local writes,
//! merges, rows merged from the receiver itself, and large transactions.

mod support;

use crsync_peer::{BatchLimits, ChangeBatch, Cursor, ReadHint, Store};
use support::{dump, open_store, open_store_with, sync};

/// Every batch of a hinted stream, the stream's `read_upto`, and whether it
/// came from memory.
async fn collect(
    store: &Store,
    from: &Cursor,
    hint: &ReadHint,
    limits: BatchLimits,
) -> (Vec<ChangeBatch>, i64, bool) {
    let mut s = store
        .changes_since_hinted(from, hint, limits)
        .await
        .expect("open a change stream");
    let memory = s.from_memory();
    let mut batches = Vec::new();
    while let Some(b) = s.next_batch().await {
        batches.push(b.expect("read a batch"));
    }
    (batches, s.read_upto(), memory)
}

/// The file's view of the same database: a second Store on it, tail off.
async fn file_view(dir: &std::path::Path, name: &str) -> Store {
    open_store_with(dir, name, |b| b.live_tail(false)).await
}

/// The stream `a` (in `dir`, file `a.db`) gives a receiver at `from`, from
/// its live tail, checked against a read of the file with the same hint:
/// same batches, same `read_upto`. Returns the tail's batches and the file's.
async fn tail_and_file(
    dir: &std::path::Path,
    a: &Store,
    from: &Cursor,
    hint: &ReadHint,
    limits: BatchLimits,
) -> (Vec<ChangeBatch>, Vec<ChangeBatch>) {
    let (tail, tail_upto, memory) = collect(a, from, hint, limits).await;
    assert!(memory, "a caught-up stream comes from the live tail");
    let file = file_view(dir, "a.db").await;
    let (read, read_upto, memory) = collect(&file, from, hint, limits).await;
    assert!(!memory);
    assert_eq!(tail, read, "the tail's batches are the file's");
    assert_eq!(tail_upto, read_upto);
    same_messages_to_send(a, from, hint, limits, &read).await;
    (tail, read)
}

/// What a session sends from the tail (stand-in changes, JSON kept by the
/// tail) is, message for message, the JSON of the file's batches `read`.
async fn same_messages_to_send(
    a: &Store,
    from: &Cursor,
    hint: &ReadHint,
    limits: BatchLimits,
    read: &[ChangeBatch],
) {
    use crsync_peer::wire::{Encoding, TransportMessage};
    let mut s = a
        .changes_since_hinted(from, hint, limits)
        .await
        .expect("open a change stream");
    let mut to_send = Vec::new();
    while let Some(b) = s.next_batch_to_send().await {
        to_send.push(b.expect("read a batch"));
    }
    assert_eq!(to_send.len(), read.len());
    for (sent, own) in to_send.iter().zip(read) {
        assert_eq!(sent.ranges, own.ranges);
        assert_eq!(sent.part, own.part);
        let origins = |b: &ChangeBatch| -> Vec<_> {
            b.changes
                .iter()
                .map(|c| (c.site_id, c.db_version, c.seq, c.col_version, c.cl))
                .collect()
        };
        assert_eq!(origins(sent), origins(own));
        for encoding in [Encoding::V1, Encoding::Lossless] {
            let site = a.site_id();
            let m1 = TransportMessage::data(site, sent, false, 3, encoding);
            let m2 = TransportMessage::data(site, own, false, 3, encoding);
            assert_eq!(m1.to_json(), m2.to_json(), "the same JSON is sent");
        }
    }
}

/// Makes `store` keep merged rows in its tail, as a server does once a few
/// of its sessions asked for what it merged from someone else: until then a
/// merge's rows are not read back, and a stream that needs them reads the file.
async fn warm_up_relaying(dir: &std::path::Path, store: &Store) {
    let w = open_store(dir, "warm.db").await;
    let (mut from_file, mut after_local) = (0, 0);
    for i in 0..8i64 {
        w.write(move |tx| tx.execute("INSERT INTO tags VALUES (?1, 'warm', NULL)", [9000 + i]))
            .await
            .expect("write on the warm-up store");
        sync(&w, store).await;
        let hint = ReadHint {
            after_local,
            ..ReadHint::default()
        };
        let (_, upto, memory) = collect(store, &Cursor::new(), &hint, BatchLimits::default()).await;
        from_file += usize::from(!memory);
        after_local = upto;
    }
    assert!(
        (1..8).contains(&from_file),
        "the first relays read the file, the later ones the tail: {from_file} of 8 from the file"
    );
}

#[tokio::test]
async fn a_caught_up_stream_comes_from_memory_and_equals_a_read_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    let c = open_store(dir.path(), "c.db").await;
    warm_up_relaying(dir.path(), &a).await;
    a.write(|tx| tx.execute_batch("INSERT INTO items VALUES (1, 'a', 1, NULL)"))
        .await
        .unwrap();
    // b catches up from the file, as a session's first stream does.
    let limits = BatchLimits::default();
    let (first, upto, _) = collect(&a, &Cursor::new(), &ReadHint::default(), limits).await;
    for batch in first {
        b.merge(batch).await.unwrap();
    }
    // Then a commits local writes and merges c's (a relay).
    for i in 10..20 {
        a.write(move |tx| tx.execute("INSERT INTO items VALUES (?1, 'x', ?1, x'01')", [i as i64]))
            .await
            .unwrap();
    }
    c.write(|tx| {
        tx.execute_batch(
            "INSERT INTO items VALUES (100, 'c', 1, NULL); INSERT INTO tags VALUES (100, 't', 'n')",
        )
    })
    .await
    .unwrap();
    sync(&c, &a).await;
    a.write(|tx| tx.execute_batch("DELETE FROM items WHERE id = 1"))
        .await
        .unwrap();

    let hint = ReadHint {
        after_local: upto,
        ..ReadHint::default()
    };
    let from = b.cursor().await.unwrap();
    let (tail, _) = tail_and_file(dir.path(), &a, &from, &hint, limits).await;
    for batch in tail {
        b.merge(batch).await.unwrap();
    }
    assert_eq!(dump(&a).await, dump(&b).await);
    let (held, source) = (b.cursor().await.unwrap(), a.cursor().await.unwrap());
    assert!(held.covers(&source), "{held:?} lacks some of {source:?}");
}

#[tokio::test]
async fn rows_merged_from_the_receiver_are_left_out_without_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let c = open_store(dir.path(), "c.db").await;
    let limits = BatchLimits::default();
    let (_, upto, _) = collect(&a, &c.cursor().await.unwrap(), &ReadHint::default(), limits).await;
    c.write(|tx| tx.execute_batch("INSERT INTO items VALUES (7, 'c', 7, NULL)"))
        .await
        .unwrap();
    let mut spans = Vec::new();
    for batch in support::batches_for(&c, &a.cursor().await.unwrap()).await {
        let report = a.merge(batch).await.unwrap();
        spans.extend(report.local_versions);
    }
    let (lo, hi) = (spans[0].0, spans[spans.len() - 1].1);
    a.write(|tx| tx.execute_batch("INSERT INTO items VALUES (8, 'a', 8, NULL)"))
        .await
        .unwrap();
    let mut hint = ReadHint {
        after_local: upto,
        ..ReadHint::default()
    };
    hint.skip(lo, hi);
    let from = c.cursor().await.unwrap();
    let (tail, _) = tail_and_file(dir.path(), &a, &from, &hint, limits).await;
    let sent: Vec<i64> = tail
        .iter()
        .flat_map(|b| &b.changes)
        .map(|ch| ch.db_version.0)
        .collect();
    assert!(!sent.is_empty());
    assert!(
        tail.iter()
            .flat_map(|b| &b.changes)
            .all(|ch| ch.site_id == a.site_id()),
        "c's own rows are not sent back to c: {tail:?}"
    );
}

#[tokio::test]
async fn a_transaction_larger_than_a_batch_goes_in_the_same_parts_as_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let limits = BatchLimits::default();
    let (_, upto, _) = collect(&a, &Cursor::new(), &ReadHint::default(), limits).await;
    a.write(|tx| {
        for i in 0..500i64 {
            tx.execute(
                "INSERT INTO items VALUES (?1, 'a row of some length', ?1, NULL)",
                [i],
            )?;
        }
        Ok(())
    })
    .await
    .unwrap();
    let hint = ReadHint {
        after_local: upto,
        ..ReadHint::default()
    };
    // Small batches: the transaction (1,500 changes) goes in parts.
    let small = BatchLimits {
        max_changes: 64,
        max_bytes: 4 << 10,
    };
    let (tail, _) = tail_and_file(dir.path(), &a, &Cursor::new(), &hint, small).await;
    assert!(tail.len() > 2 && tail[0].part.is_some(), "{}", tail.len());
}

#[tokio::test]
async fn a_commit_too_large_to_keep_or_from_another_process_is_read_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    let limits = BatchLimits::default();
    let (_, upto, _) = collect(&a, &Cursor::new(), &ReadHint::default(), limits).await;
    let rows = crsync_peer::TAIL_MAX_COMMIT_CHANGES as i64 / 3 + 10;
    a.write(move |tx| {
        for i in 0..rows {
            tx.execute("INSERT INTO items VALUES (?1, 'big', ?1, NULL)", [i])?;
        }
        Ok(())
    })
    .await
    .unwrap();
    let hint = ReadHint {
        after_local: upto,
        ..ReadHint::default()
    };
    let (big, big_upto, memory) = collect(&a, &Cursor::new(), &hint, limits).await;
    assert!(
        !memory,
        "a commit over the tail's limit is read from the file"
    );
    for batch in big {
        b.merge(batch).await.unwrap();
    }
    // The next commit is kept again.
    a.write(|tx| tx.execute_batch("UPDATE items SET name = 'small' WHERE id = 1"))
        .await
        .unwrap();
    let hint = ReadHint {
        after_local: big_upto,
        ..ReadHint::default()
    };
    let (small, small_upto, memory) = collect(&a, &b.cursor().await.unwrap(), &hint, limits).await;
    assert!(memory);
    for batch in small {
        b.merge(batch).await.unwrap();
    }
    // A write by another connection (another process) empties the tail.
    let mut events = a.subscribe();
    let other = support::side_connection(&dir.path().join("a.db"));
    other
        .execute_batch("UPDATE items SET name = 'other' WHERE id = 2")
        .unwrap();
    // a notices it on its next poll
    tokio::time::timeout(std::time::Duration::from_secs(5), events.recv())
        .await
        .expect("a notices the other writer")
        .unwrap();
    let hint = ReadHint {
        after_local: small_upto,
        ..ReadHint::default()
    };
    let (ext, _, memory) = collect(&a, &b.cursor().await.unwrap(), &hint, limits).await;
    assert!(!memory, "another writer's commit is read from the file");
    for batch in ext {
        b.merge(batch).await.unwrap();
    }
    assert_eq!(dump(&a).await, dump(&b).await);
}

#[tokio::test]
async fn overwritten_and_deleted_rows_are_sent_as_the_file_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    let c = open_store(dir.path(), "c.db").await;
    warm_up_relaying(dir.path(), &a).await;
    sync(&a, &b).await;
    let limits = BatchLimits::default();
    let (_, upto, _) = collect(&a, &Cursor::new(), &ReadHint::default(), limits).await;
    for sql in [
        "INSERT INTO items VALUES (50, 'first', 1, NULL), (51, 'x', 1, NULL), (52, 'y', 1, NULL)",
        "UPDATE items SET name = 'second' WHERE id = 50",
        "DELETE FROM items WHERE id = 51",
        "INSERT INTO items VALUES (51, 'back', 2, NULL)",
        "DELETE FROM items WHERE id = 52",
        "INSERT INTO tags VALUES (50, 't', 'n'); UPDATE tags SET note = 'm' WHERE item = 50",
    ] {
        a.write(move |tx| tx.execute_batch(sql)).await.unwrap();
    }
    // and a remote overwrites one of them
    c.write(|tx| tx.execute_batch("INSERT INTO items VALUES (50, 'zzz-remote', 9, NULL)"))
        .await
        .unwrap();
    sync(&c, &a).await;
    let hint = ReadHint {
        after_local: upto,
        ..ReadHint::default()
    };
    let (tail, tail_upto, memory) = collect(&a, &Cursor::new(), &hint, limits).await;
    assert!(memory);
    let file = file_view(dir.path(), "a.db").await;
    let (read, read_upto, _) = collect(&file, &Cursor::new(), &hint, limits).await;
    assert_eq!(
        tail, read,
        "superseded rows are left out as the file leaves them out"
    );
    assert_eq!(tail_upto, read_upto);
    for batch in tail {
        b.merge(batch).await.unwrap();
    }
    assert_eq!(dump(&a).await, dump(&b).await);
}

#[tokio::test]
async fn a_message_from_the_tail_is_the_same_json_as_one_encoded_per_session() {
    use crsync_peer::wire::{Encoding, TransportMessage};
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let limits = BatchLimits::default();
    let (_, upto, _) = collect(&a, &Cursor::new(), &ReadHint::default(), limits).await;
    a.write(|tx| {
        tx.execute_batch(
            "INSERT INTO items VALUES (1, 'quote \" and \\ and é', 9007199254740993, x'00ff'), \
             (2, NULL, -1, NULL); INSERT INTO tags VALUES (1, 't', 'n')",
        )
    })
    .await
    .unwrap();
    let hint = ReadHint {
        after_local: upto,
        ..ReadHint::default()
    };
    let (tail, read) = tail_and_file(dir.path(), &a, &Cursor::new(), &hint, limits).await;
    assert!(!tail.is_empty() && tail.iter().all(|b| b.wire.is_set()));
    assert!(read.iter().all(|b| !b.wire.is_set()));
    for encoding in [Encoding::V1, Encoding::Lossless] {
        for eose in [false, true] {
            for (shared, own) in tail.iter().zip(&read) {
                let site = a.site_id();
                let mut m1 = TransportMessage::data(site, shared, eose, 3, encoding);
                m1.n = Some((1, 2));
                let mut m2 = TransportMessage::data(site, own, eose, 3, encoding);
                m2.n = Some((1, 2));
                // Twice: the second time from what the first encoded.
                assert_eq!(m1.to_json(), m2.to_json());
                assert_eq!(m1.to_json(), m2.to_json());
                let decoded = TransportMessage::from_json(&m1.to_json()).unwrap();
                assert_eq!(decoded, m2);
                let mut materialized = m1.clone();
                materialized.materialize().unwrap();
                assert_eq!(materialized, m2);
            }
        }
    }
}

/// Sessions at the same place send the same batches: the first message
/// encodes them, and every later one with the same rows shares that JSON
/// (the same bytes in memory, not a copy). A batch edited since it was read
/// is encoded from what it holds.
#[tokio::test]
async fn sessions_at_the_same_place_share_one_encoding() {
    use crsync_peer::wire::{Encoding, TransportMessage};
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let limits = BatchLimits::default();
    let (_, upto, _) = collect(&a, &Cursor::new(), &ReadHint::default(), limits).await;
    for i in 1..=5 {
        a.write(move |tx| tx.execute("INSERT INTO items VALUES (?1, 'x', ?1, NULL)", [i as i64]))
            .await
            .unwrap();
    }
    let hint = ReadHint {
        after_local: upto,
        ..ReadHint::default()
    };
    let batch = || async {
        let mut s = a
            .changes_since_hinted(&Cursor::new(), &hint, limits)
            .await
            .unwrap();
        assert!(s.from_memory());
        s.next_batch_to_send().await.unwrap().unwrap()
    };
    let (first, second) = (batch().await, batch().await);
    let site = a.site_id();
    let json = |b: &ChangeBatch, encoding| {
        let m = TransportMessage::data(site, b, false, 3, encoding);
        let encoded = m.data.as_ref().unwrap().encoded.clone().unwrap();
        (encoded, m.to_json())
    };
    for encoding in [Encoding::V1, Encoding::Lossless] {
        let (e1, t1) = json(&first, encoding);
        let (e2, t2) = json(&second, encoding);
        assert_eq!(t1, t2);
        assert!(
            std::ptr::eq(e1.json().as_ptr(), e2.json().as_ptr()),
            "the second message shares the first one's JSON"
        );
    }
    let (v1, _) = json(&first, Encoding::V1);
    let (lossless, _) = json(&first, Encoding::Lossless);
    assert!(!std::ptr::eq(v1.json().as_ptr(), lossless.json().as_ptr()));

    // One change fewer: not the shared JSON, and exactly what it holds.
    let mut edited = batch().await;
    let dropped = edited.changes.pop().unwrap();
    let (e3, t3) = json(&edited, Encoding::V1);
    assert_eq!(e3.len(), edited.changes.len());
    let decoded = TransportMessage::from_json(&t3).unwrap();
    let changes = decoded.data.unwrap().changes().unwrap().into_owned();
    assert_eq!(changes.len(), edited.changes.len());
    assert!(
        changes
            .iter()
            .all(|c| !(c.db_version == dropped.db_version.0 && c.seq == dropped.seq)),
        "the dropped change is not sent"
    );
}

/// A relay `a`, the receiver `b` of its stream, and where b's next read of
/// a starts.
struct Relay<'s> {
    dir: &'s std::path::Path,
    a: &'s Store,
    b: &'s Store,
    upto: i64,
}

impl Relay<'_> {
    /// Checks a's tail against a read of the file from where b stands, and
    /// merges it into b.
    async fn step(&mut self) {
        let hint = ReadHint {
            after_local: self.upto,
            ..ReadHint::default()
        };
        let limits = BatchLimits::default();
        let from = self.b.cursor().await.expect("b's cursor");
        let (tail, _) = tail_and_file(self.dir, self.a, &from, &hint, limits).await;
        for batch in tail {
            self.b.merge(batch).await.expect("b merges");
        }
        self.upto = collect(self.a, &from, &hint, limits).await.1;
    }

    /// `c` commits each of `sqls`, a merges what it lacks of c (edited by
    /// `edit` on the way), then [`step`](Self::step).
    async fn merge_from(&mut self, c: &Store, sqls: &[&'static str], edit: fn(&mut ChangeBatch)) {
        for &sql in sqls {
            c.write(move |tx| tx.execute_batch(sql))
                .await
                .expect("c writes");
        }
        let from = self.a.cursor().await.expect("a's cursor");
        for mut batch in support::batches_for(c, &from).await {
            edit(&mut batch);
            self.a.merge(batch).await.expect("a merges");
        }
        self.step().await;
    }
}

/// A relay keeps what a merge wrote in memory when every change is stored as
/// it came, and reads it back otherwise: either way its stream is what a
/// read of the file gives. Merges here: changes that all win, changes that
/// lose or equal what is there, one cell written twice in one merge, a row
/// deleted and brought back (with its row marker, and without it: then
/// cr-sqlite writes one of its own), and values SQLite stores in another
/// type than they came in (text '7' in an INTEGER column, an integral real
/// there too).
#[tokio::test]
async fn merged_rows_kept_in_memory_are_what_the_file_holds() {
    use crsync_peer::SqlValue;
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    let c = open_store(dir.path(), "c.db").await;
    warm_up_relaying(dir.path(), &a).await;
    sync(&a, &b).await;
    let upto = collect(
        &a,
        &Cursor::new(),
        &ReadHint::default(),
        BatchLimits::default(),
    )
    .await
    .1;
    let mut relay = Relay {
        dir: dir.path(),
        a: &a,
        b: &b,
        upto,
    };
    let as_is: fn(&mut ChangeBatch) = |_| {};
    let all_win = "INSERT INTO items VALUES (200, 'c', 1, x'02'), (201, 'd', 2, NULL);
         INSERT INTO tags VALUES (200, 't', 'n')";
    relay.merge_from(&c, &[all_win], as_is).await;
    // some lose: a wrote the same cells more often
    a.write(|tx| {
        tx.execute_batch(
            "UPDATE items SET name = 'a1' WHERE id = 200; UPDATE items SET name = 'a2' WHERE id = 200",
        )
    })
    .await
    .unwrap();
    let lose = "UPDATE items SET name = 'c1', v = 9 WHERE id = 200";
    relay.merge_from(&c, &[lose], as_is).await;
    // one cell twice in one merge (two of c's transactions in one batch)
    let twice = [
        "UPDATE items SET name = 'x1' WHERE id = 201",
        "UPDATE items SET name = 'x2' WHERE id = 201",
    ];
    relay.merge_from(&c, &twice, as_is).await;
    // deleted, then brought back: a resurrection
    relay
        .merge_from(&c, &["DELETE FROM items WHERE id = 201"], as_is)
        .await;
    let back = "INSERT INTO items VALUES (201, 'back', 3, NULL)";
    relay.merge_from(&c, &[back], as_is).await;
    // brought back by column changes without the row marker: cr-sqlite
    // writes a marker of its own
    relay
        .merge_from(&c, &["DELETE FROM items WHERE id = 200"], as_is)
        .await;
    let again = "INSERT INTO items VALUES (200, 'again', 4, NULL)";
    let unmarked: fn(&mut ChangeBatch) = |batch| batch.changes.retain(|ch| ch.cid != "-1");
    relay.merge_from(&c, &[again], unmarked).await;
    // values that change type on the way in
    let retype = "UPDATE items SET v = 10 WHERE id = 200; UPDATE items SET v = 11 WHERE id = 201";
    let retyped: fn(&mut ChangeBatch) = |batch| {
        for change in &mut batch.changes {
            match change.val {
                SqlValue::Integer(10) => change.val = SqlValue::text("7"),
                SqlValue::Integer(11) => change.val = SqlValue::Real(8.0),
                _ => {}
            }
        }
    };
    relay.merge_from(&c, &[retype], retyped).await;
    assert_eq!(dump(&a).await, dump(&b).await);
    let v = |rows: &[Vec<SqlValue>], id: i64| {
        rows.iter()
            .find(|r| r.first() == Some(&SqlValue::Integer(id)))
            .map(|r| r[2].clone())
    };
    let rows = dump(&b).await;
    assert_eq!(
        v(&rows, 200),
        Some(SqlValue::Integer(7)),
        "as SQLite stored it"
    );
    assert_eq!(v(&rows, 201), Some(SqlValue::Integer(8)));
}
