//! Store-level: an origin transaction larger than a batch travels in parts,
//! is staged durably by the receiver and applied whole; a lost part is a gap;
//! a receiver that restarts resumes where its staging ended.

mod support;

use std::collections::BTreeMap;

use crsync_peer::{BatchRejection, ChangeBatch, Cursor, MergeError, ReadHint, Store};
use support::{batches_for, dump, open_store};

/// One local transaction of `rows` rows (3 changes each, plus the row marker).
async fn write_big(store: &Store, rows: i64) {
    store
        .write(move |tx| {
            let mut stmt =
                tx.prepare("INSERT INTO items (id, name, v, w) VALUES (?1, ?2, ?3, NULL)")?;
            for i in 0..rows {
                stmt.execute(crsync_peer::rusqlite::params![i, format!("row {i}"), i * 7])?;
            }
            Ok(())
        })
        .await
        .expect("write");
}

/// `open_store`, staging every transaction in parts on disk.
async fn open_staging_on_disk(dir: &std::path::Path, name: &str) -> Store {
    let store = Store::builder(dir.join(name))
        .max_batch_changes(64)
        .stage_in_memory_below(0)
        .open()
        .await
        .expect("open");
    store
        .write(|tx| tx.execute_batch(support::SCHEMA))
        .await
        .expect("schema");
    store.enable_crr(&["items", "tags"]).await.expect("enable");
    store
}

/// Rows in the on-disk staging table.
async fn staged_rows(store: &Store) -> i64 {
    store
        .read(|c| c.query_row("SELECT count(*) FROM crsync_staged", [], |r| r.get(0)))
        .await
        .expect("count")
}

async fn item_count(store: &Store) -> i64 {
    store
        .read(|c| c.query_row("SELECT count(*) FROM items", [], |r| r.get(0)))
        .await
        .expect("count")
}

async fn stream_with(from: &Store, cursor: &Cursor, hint: &ReadHint) -> Vec<ChangeBatch> {
    let limits = from.batch_limits();
    let mut stream = from
        .changes_since_hinted(cursor, hint, limits)
        .await
        .expect("stream");
    let mut out = Vec::new();
    while let Some(batch) = stream.next_batch().await {
        out.push(batch.expect("batch"));
    }
    out
}

#[tokio::test]
async fn a_large_transaction_goes_in_parts_and_applies_whole() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    write_big(&a, 2_000).await; // 6,000 changes, batches of 64
    let batches = batches_for(&a, &b.cursor().await.unwrap()).await;
    let parts: Vec<_> = batches.iter().filter_map(|b| b.part).collect();
    assert!(parts.len() > 20, "{} parts", parts.len()); // of 4 x 64 changes
    assert!(parts[..parts.len() - 1].iter().all(|p| p.more));
    assert!(!parts.last().unwrap().more);
    let (last, staged) = batches.split_last().unwrap();
    for (i, batch) in staged.iter().enumerate() {
        let report = b.merge(batch.clone()).await.expect("stage");
        assert_eq!(report.applied, 0);
        assert!(report.staged_changes > 0);
        assert_eq!(item_count(&b).await, 0, "nothing visible after part {i}");
        assert_eq!(b.cursor().await.unwrap(), Cursor::new());
    }
    assert_eq!(b.staged().await.unwrap().len(), 1);
    // Past a MiB, the parts held in memory went to disk with the rest.
    assert!(staged_rows(&b).await > 5_000);
    let report = b.merge(last.clone()).await.expect("complete");
    assert_eq!(report.transactions, 1);
    assert_eq!(item_count(&b).await, 2_000);
    assert_eq!(dump(&a).await, dump(&b).await);
    assert!(b.staged().await.unwrap().is_empty(), "staging is cleared");
    let cursor = b.cursor().await.unwrap();
    assert_eq!(
        cursor.get(&a.site_id()),
        a.cursor().await.unwrap().get(&a.site_id())
    );
    // and relayed on from b, still in parts, to a third replica
    let c = open_store(dir.path(), "c.db").await;
    let relayed = batches_for(&b, &c.cursor().await.unwrap()).await;
    assert!(relayed.iter().filter(|b| b.part.is_some()).count() > 20);
    for batch in relayed {
        c.merge(batch).await.expect("merge");
    }
    assert_eq!(dump(&a).await, dump(&c).await);
}

#[tokio::test]
async fn a_missing_part_is_a_gap_and_nothing_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    write_big(&a, 500).await;
    let batches = batches_for(&a, &Cursor::new()).await;
    assert!(batches.len() > 4);
    b.merge(batches[0].clone()).await.expect("first part");
    // the second part is lost: every later one is refused, the last too
    for batch in &batches[2..] {
        match b.merge(batch.clone()).await {
            Err(MergeError::Rejected(BatchRejection::PartGap { staged, after, .. })) => {
                assert!(after > staged)
            }
            other => panic!("expected a part gap, got {other:?}"),
        }
    }
    assert_eq!(item_count(&b).await, 0);
    assert_eq!(b.cursor().await.unwrap(), Cursor::new());
}

#[tokio::test]
async fn a_restarted_receiver_resumes_after_what_it_staged() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    write_big(&a, 1_000).await;
    let total: usize = batches_for(&a, &Cursor::new())
        .await
        .iter()
        .map(|b| b.changes.len())
        .sum();
    let first = batches_for(&a, &Cursor::new()).await;
    let half = first.len() / 2;
    let b = {
        b.close().await.unwrap();
        open_staging_on_disk(dir.path(), "b.db").await
    };
    for batch in &first[..half] {
        b.merge(batch.clone()).await.expect("stage");
    }
    assert!(staged_rows(&b).await > 0);
    b.close().await.unwrap();
    // a restart: the staged parts are on disk
    let b = open_staging_on_disk(dir.path(), "b.db").await;
    let staged = b.staged().await.unwrap();
    assert_eq!(staged.len(), 1);
    assert_eq!(item_count(&b).await, 0);
    let hint = ReadHint {
        staged: staged.clone(),
        ..ReadHint::default()
    };
    let rest = stream_with(&a, &b.cursor().await.unwrap(), &hint).await;
    let resent: usize = rest.iter().map(|b| b.changes.len()).sum();
    let staged_changes: usize = first[..half].iter().map(|b| b.changes.len()).sum();
    assert_eq!(
        resent,
        total - staged_changes,
        "only what was not staged is sent again"
    );
    let first_part = rest[0].part.expect("a part");
    assert_eq!(first_part.after_seq, *staged.values().next().unwrap());
    for batch in rest {
        b.merge(batch).await.expect("merge");
    }
    assert_eq!(dump(&a).await, dump(&b).await);
    assert!(b.staged().await.unwrap().is_empty());
    // a stale hint (the receiver lost its staging) is refused, not applied in part
    let c = open_staging_on_disk(dir.path(), "c.db").await;
    let stale = stream_with(&a, &Cursor::new(), &hint).await;
    assert!(matches!(
        c.merge(stale[0].clone()).await,
        Err(MergeError::Rejected(BatchRejection::PartGap { .. }))
    ));
    assert_eq!(item_count(&c).await, 0);
    let _: BTreeMap<_, _> = c.staged().await.unwrap();
}

#[tokio::test]
async fn a_transaction_staged_in_memory_is_sent_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    write_big(&a, 500).await;
    let batches = batches_for(&a, &Cursor::new()).await;
    for batch in &batches[..batches.len() / 2] {
        b.merge(batch.clone()).await.expect("stage");
    }
    assert_eq!(staged_rows(&b).await, 0, "held in memory");
    b.close().await.unwrap();
    let b = open_store(dir.path(), "b.db").await;
    // nothing of it survived and nothing of it was applied
    assert!(b.staged().await.unwrap().is_empty());
    assert_eq!(item_count(&b).await, 0);
    for batch in batches_for(&a, &b.cursor().await.unwrap()).await {
        b.merge(batch).await.expect("merge");
    }
    assert_eq!(dump(&a).await, dump(&b).await);
}

#[tokio::test]
async fn small_transactions_travel_whole_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path(), "a.db").await;
    for i in 0..100 {
        a.write(move |tx| {
            tx.execute(
                "INSERT INTO items (id, name, v, w) VALUES (?1, 'x', 1, NULL)",
                [i],
            )
        })
        .await
        .unwrap();
    }
    let batches = batches_for(&a, &Cursor::new()).await;
    assert!(batches.iter().all(|b| b.part.is_none()));
}
