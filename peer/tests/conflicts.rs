//! Conflict history: three replicas write the same cells concurrently (and
//! one deletes a row another updates), then sync by merging batches between
//! the Stores; each replica's history must hold exactly the values it lost,
//! with the right sites and versions. Also: retention trims, recording off
//! records nothing, and the history never travels (sync stream, snapshot).

mod support;

use std::time::Duration;

use crsync_peer::{
    Conflict, ConflictKind, ConflictQuery, Cursor, DbVersion, PackedPk, SiteId, SqlValue, Store,
};
use support::{batches_for, dump, open_store, open_store_with, sync};

/// Runs `sql` on `store`; returns the store's own version after it.
async fn write(store: &Store, sql: &'static str) -> DbVersion {
    store
        .write(move |tx| tx.execute_batch(sql))
        .await
        .expect("write");
    store.cursor().await.expect("cursor").get(&store.site_id())
}

async fn history(store: &Store) -> Vec<Conflict> {
    store
        .conflicts(ConflictQuery::new())
        .await
        .expect("conflicts")
}

/// `(kind, column, lost value, lost site, won value, won site, deleted)`, oldest first.
type Summary = (
    ConflictKind,
    String,
    SqlValue,
    SiteId,
    SqlValue,
    SiteId,
    bool,
);

fn summary(conflicts: &[Conflict]) -> Vec<Summary> {
    conflicts
        .iter()
        .rev()
        .map(|c| {
            (
                c.kind,
                c.column.clone(),
                c.lost.value.clone(),
                c.lost.site,
                c.won.value.clone(),
                c.won.site,
                c.deleted,
            )
        })
        .collect()
}

fn text(s: &str) -> SqlValue {
    SqlValue::text(s)
}

fn pk(id: i64) -> PackedPk {
    PackedPk::pack(&[SqlValue::Integer(id)])
}

#[tokio::test]
async fn three_replicas_record_what_each_lost() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    let c = open_store(dir.path(), "c.db").await;
    let (sa, sb, sc) = (a.site_id(), b.site_id(), c.site_id());

    // Rows 1 and 2 written by a reach everyone: new rows conflict with nothing.
    write(
        &a,
        "INSERT INTO items VALUES (1, 'one', 1, NULL), (2, 'two', 2, NULL)",
    )
    .await;
    sync(&a, &b).await;
    sync(&a, &c).await;
    for s in [&a, &b, &c] {
        assert!(history(s).await.is_empty());
    }

    // Concurrently: everyone renames row 1 (equal column versions: the
    // greatest value wins, 'C') and writes the same value into its `v`
    // (equal values lose nothing); a deletes row 2 while b updates it.
    let va = write(
        &a,
        "UPDATE items SET name = 'A', v = 7 WHERE id = 1; DELETE FROM items WHERE id = 2",
    )
    .await;
    let vb = write(
        &b,
        "UPDATE items SET name = 'B', v = 7 WHERE id = 1; UPDATE items SET v = 20 WHERE id = 2",
    )
    .await;
    let vc = write(&c, "UPDATE items SET name = 'C', v = 7 WHERE id = 1").await;

    sync(&b, &a).await; // 'B' replaces 'A'; a's delete refuses b's update of row 2
    sync(&a, &b).await; // a's delete removes b's update ('A' is gone: a holds 'B')
    sync(&b, &c).await; // c refuses 'B'; the delete reaches c (only a's values there)
    sync(&c, &b).await; // 'C' replaces 'B'
    sync(&a, &c).await; // nothing new for c
    sync(&c, &a).await; // 'C' replaces 'B' at a
    sync(&a, &b).await;
    sync(&b, &c).await;
    let final_state = dump(&a).await;
    assert_eq!(dump(&b).await, final_state);
    assert_eq!(dump(&c).await, final_state);
    // (`dump` ends each table with a "--" row)
    assert_eq!(
        final_state[..2],
        vec![
            vec![
                SqlValue::Integer(1),
                text("C"),
                SqlValue::Integer(7),
                SqlValue::Null
            ],
            vec![text("--")]
        ]
    );

    use ConflictKind::{Refused, Replaced};
    let name = || "name".to_owned();
    // b's update of row 2, lost to a's delete
    let v20 = |kind| {
        (
            kind,
            "v".into(),
            SqlValue::Integer(20),
            sb,
            SqlValue::Null,
            sa,
            true,
        )
    };
    assert_eq!(
        summary(&history(&a).await),
        vec![
            (Replaced, name(), text("A"), sa, text("B"), sb, false),
            v20(Refused),
            (Replaced, name(), text("B"), sb, text("C"), sc, false),
        ]
    );
    assert_eq!(
        summary(&history(&b).await),
        vec![
            v20(Replaced),
            (Replaced, name(), text("B"), sb, text("C"), sc, false),
        ]
    );
    assert_eq!(
        summary(&history(&c).await),
        vec![(Refused, name(), text("B"), sb, text("C"), sc, false)]
    );

    // Versions: every side names its writer's own version.
    let at_a = history(&a).await;
    let (b_lost_at_a, refused_at_a, a_lost_a) = (&at_a[0], &at_a[1], &at_a[2]);
    assert_eq!(a_lost_a.table, "items");
    assert_eq!(a_lost_a.pk, pk(1));
    assert_eq!(a_lost_a.lost.version, Some(va));
    assert_eq!(a_lost_a.won.version, Some(vb));
    assert_eq!(a_lost_a.lost.col_version, a_lost_a.won.col_version);
    assert_eq!(refused_at_a.pk, pk(2));
    assert_eq!(refused_at_a.lost.version, Some(vb));
    assert_eq!(refused_at_a.won.version, Some(va));
    assert_eq!(refused_at_a.won.col_version, 2, "the row's causal length");
    // b's write reached a from b, c's from c; b's replaced value at a was
    // merged: its origin version comes from crsync_origin.
    assert_eq!(b_lost_at_a.lost.version, Some(vb));
    assert_eq!(b_lost_at_a.won.version, Some(vc));
    let at_b = history(&b).await;
    assert_eq!(at_b[1].pk, pk(2));
    assert_eq!(
        at_b[1].lost.version,
        Some(vb),
        "b's update lost to a's delete"
    );
    assert_eq!(at_b[1].won.version, Some(va));
    assert_eq!(at_b[0].lost.version, Some(vb));
    assert_eq!(at_b[0].won.version, Some(vc));
    let at_c = history(&c).await;
    assert_eq!(at_c[0].lost.version, Some(vb));
    assert_eq!(at_c[0].won.version, Some(vc));
    assert!(at_a[0].id > at_a[1].id, "newest first");

    // Filters.
    let only = a
        .conflicts(ConflictQuery::new().table("items").limit(1))
        .await
        .unwrap();
    assert_eq!(only, vec![at_a[0].clone()]);
    assert!(
        a.conflicts(ConflictQuery::new().table("tags"))
            .await
            .unwrap()
            .is_empty()
    );
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}

/// Two replicas, `n` rounds of concurrent writes to one cell: `n` conflicts at `b`.
async fn conflicting_rounds(a: &Store, b: &Store, n: usize) {
    for i in 0..n {
        a.write(move |tx| tx.execute("UPDATE items SET name = ?1 WHERE id = 1", [format!("a{i}")]))
            .await
            .expect("write");
        b.write(move |tx| tx.execute("UPDATE items SET name = ?1 WHERE id = 1", [format!("b{i}")]))
            .await
            .expect("write");
        sync(a, b).await; // 'a..' < 'b..': b refuses it
        sync(b, a).await;
    }
}

/// `a` (default retention) and `b` (at most `b_rows` records, an hour),
/// both holding a's row 1.
async fn row_on_both(dir: &std::path::Path, b_rows: usize) -> (Store, Store) {
    let a = open_store(dir, "a.db").await;
    let b = open_store_with(dir, "b.db", |o| {
        o.conflict_retention(b_rows, Duration::from_secs(3600))
    })
    .await;
    write(&a, "INSERT INTO items (id, name) VALUES (1, 'x')").await;
    sync(&a, &b).await;
    (a, b)
}

#[tokio::test]
async fn retention_keeps_the_newest_and_trims_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = row_on_both(dir.path(), 3).await;
    conflicting_rounds(&a, &b, 5).await;
    let kept = history(&b).await;
    let lost: Vec<SqlValue> = kept.iter().map(|c| c.lost.value.clone()).collect();
    assert_eq!(lost, vec![text("a4"), text("a3"), text("a2")]);

    // Records past the age limit go when the next conflict is recorded.
    b.write(|tx| {
        tx.execute(
            "UPDATE crsync_conflicts SET recorded_at = recorded_at - 7200000",
            [],
        )
    })
    .await
    .unwrap();
    conflicting_rounds(&a, &b, 1).await;
    let kept = history(&b).await;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].lost.value, text("a0"));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn recording_off_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = row_on_both(dir.path(), 0).await;
    conflicting_rounds(&a, &b, 2).await;
    assert!(history(&b).await.is_empty());
    assert_eq!(history(&a).await.len(), 2, "a records with the default");
    assert_eq!(dump(&a).await, dump(&b).await);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn a_staged_transaction_records_its_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store_with(dir.path(), "b.db", |o| o.stage_in_memory_below(0)).await;
    write(&b, "INSERT INTO items (id, name) VALUES (5, 'b-was-here')").await;
    // One transaction of 400 rows (far past 4x the 64-change batches): parts.
    a.write(|tx| {
        tx.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400)
             INSERT INTO items (id, name) SELECT i, 'a' || i FROM n",
        )
    })
    .await
    .unwrap();
    let batches = batches_for(&a, &b.cursor().await.unwrap()).await;
    assert!(batches.iter().any(|b| b.part.is_some_and(|p| p.more)));
    for batch in batches {
        b.merge(batch).await.unwrap();
    }
    // 'b-was-here' > 'a5': b refuses a's name for row 5; a's other columns
    // of row 5 (NULLs where b had NULLs) are equal and lose nothing.
    let at_b = history(&b).await;
    assert_eq!(
        summary(&at_b),
        vec![(
            ConflictKind::Refused,
            "name".into(),
            text("a5"),
            a.site_id(),
            text("b-was-here"),
            b.site_id(),
            false
        )]
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn the_history_never_travels() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    write(&a, "INSERT INTO items (id, name) VALUES (1, 'x')").await;
    sync(&a, &b).await;
    write(
        &a,
        "UPDATE items SET name = 'zz-clobbered-marker' WHERE id = 1",
    )
    .await;
    write(&b, "UPDATE items SET name = 'zzz-winner' WHERE id = 1").await;
    sync(&b, &a).await;
    assert_eq!(history(&a).await.len(), 1);
    assert_eq!(history(&a).await[0].lost.value, text("zz-clobbered-marker"));

    // Not in a sync stream: only the user's tables' changes travel.
    for batch in batches_for(&a, &Cursor::new()).await {
        for change in &batch.changes {
            assert!(
                ["items", "tags"].contains(&change.table.as_str()),
                "{change:?}"
            );
            assert_ne!(change.val, text("zz-clobbered-marker"));
        }
    }
    // Not in a snapshot: no records, and not even the bytes in free pages.
    let snapshot = dir.path().join("a.snapshot.db");
    a.export_snapshot(&snapshot).await.unwrap();
    let bytes = std::fs::read(&snapshot).unwrap();
    let marker = b"zz-clobbered-marker";
    assert!(!bytes.windows(marker.len()).any(|w| w == marker));
    let installed = dir.path().join("c.db");
    Store::install_snapshot(&snapshot, &installed, None)
        .await
        .unwrap();
    let c = Store::open(&installed).await.unwrap();
    assert!(history(&c).await.is_empty());
    assert_eq!(dump(&c).await, dump(&a).await);
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}
