//! Store-level convergence: random writes on 2-5 databases, random partial,
//! duplicated, reordered and skipped exchanges, restarts; after a final full
//! exchange every database has the same rows and the same cursor.
//!
//! 200 cases by default; `CRSYNC_PROPTEST_CASES=5000` runs more. The seed is
//! derived from the test name (override with `CRSYNC_PROPTEST_SEED`), and
//! failing cases are saved under `proptest-regressions/`.

mod support;

use std::path::Path;

use crsync_peer::{BatchLimits, MergeError, Store};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestRunner};
use support::{dump, open_store, sync};

#[derive(Debug, Clone)]
enum Op {
    Write {
        db: usize,
        key: i64,
        kind: u8,
        value: i64,
    },
    Exchange {
        from: usize,
        to: usize,
        max_changes: usize,
        order: Vec<usize>,
        skip: Vec<bool>,
        dup: Vec<bool>,
    },
    Restart {
        db: usize,
    },
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..n, 0i64..8, 0u8..6, any::<i64>()).prop_map(|(db, key, kind, value)| Op::Write { db, key, kind, value }),
        3 => (0..n, 0..n, 1usize..6, proptest::collection::vec(0usize..8, 8), proptest::collection::vec(proptest::bool::weighted(0.2), 8), proptest::collection::vec(proptest::bool::weighted(0.2), 8))
            .prop_map(|(from, to, max_changes, order, skip, dup)| Op::Exchange { from, to, max_changes, order, skip, dup }),
        1 => (0..n).prop_map(|db| Op::Restart { db }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (2usize..=5).prop_flat_map(|n| (Just(n), proptest::collection::vec(op(n), 1..40)))
}

async fn write(store: &Store, key: i64, kind: u8, value: i64) {
    store
        .write(move |tx| {
            match kind {
                0 => tx.execute(
                    "INSERT INTO items (id, name, v, w) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, v = excluded.v",
                    (key, format!("n{}", value % 100), value, value.to_le_bytes().to_vec()),
                )?,
                1 => tx.execute("UPDATE items SET v = ?2 WHERE id = ?1", (key, value))?,
                2 => tx.execute("UPDATE items SET name = NULL, w = ?2 WHERE id = ?1", (key, vec![value as u8; 3]))?,
                3 => tx.execute("DELETE FROM items WHERE id = ?1", [key])?,
                4 => tx.execute(
                    "INSERT INTO tags (item, tag, note) VALUES (?1, ?2, ?3) ON CONFLICT DO UPDATE SET note = excluded.note",
                    (key, format!("t{}", value.rem_euclid(3)), value),
                )?,
                _ => tx.execute("DELETE FROM tags WHERE item = ?1", [key])?,
            };
            Ok(())
        })
        .await
        .expect("write");
}

/// A lossy exchange: batches reordered, some skipped, some duplicated.
async fn exchange(
    from: &Store,
    to: &Store,
    max_changes: usize,
    order: &[usize],
    skip: &[bool],
    dup: &[bool],
) {
    let cursor = to.cursor().await.expect("cursor");
    let limits = BatchLimits {
        max_changes,
        max_bytes: 1 << 20,
    };
    let mut stream = from
        .changes_since_with_limits(&cursor, limits)
        .await
        .expect("stream");
    let mut batches = Vec::new();
    while let Some(b) = stream.next_batch().await {
        batches.push(b.expect("batch"));
    }
    let mut sequence: Vec<usize> = (0..batches.len()).collect();
    for (i, j) in order.iter().enumerate() {
        if i < sequence.len() && *j < sequence.len() {
            sequence.swap(i, *j);
        }
    }
    for (k, i) in sequence.into_iter().enumerate() {
        if skip.get(k).copied().unwrap_or(false) {
            continue;
        }
        let copies = if dup.get(k).copied().unwrap_or(false) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            match to.merge(batches[i].clone()).await {
                Ok(_) | Err(MergeError::Rejected(_)) => {}
                Err(e) => panic!("merge failed: {e}"),
            }
        }
    }
}

async fn run_scenario(dir: &Path, n: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let names: Vec<String> = (0..n).map(|i| format!("db{i}.db")).collect();
    let mut stores = Vec::new();
    for name in &names {
        stores.push(open_store(dir, name).await);
    }
    for op in ops {
        match op {
            Op::Write {
                db,
                key,
                kind,
                value,
            } => write(&stores[*db], *key, *kind, *value).await,
            Op::Exchange { from, to, .. } if from == to => {}
            Op::Exchange {
                from,
                to,
                max_changes,
                order,
                skip,
                dup,
            } => exchange(&stores[*from], &stores[*to], *max_changes, order, skip, dup).await,
            Op::Restart { db } => {
                let old = std::mem::replace(&mut stores[*db], open_store(dir, "scratch.db").await);
                old.close().await.expect("close");
                let scratch =
                    std::mem::replace(&mut stores[*db], open_store(dir, &names[*db]).await);
                scratch.close().await.expect("close scratch");
            }
        }
    }
    // Final full exchange, repeated until nothing moves (merges consume local
    // versions, so cursors settle one round after the data does).
    for _ in 0..4 {
        let mut moved = 0;
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    let before = stores[j].cursor().await.expect("cursor");
                    sync(&stores[i], &stores[j]).await;
                    moved += usize::from(stores[j].cursor().await.expect("cursor") != before);
                }
            }
        }
        if moved == 0 {
            break;
        }
    }
    let first = dump(&stores[0]).await;
    let first_cursor = stores[0].cursor().await.expect("cursor");
    for (i, s) in stores.iter().enumerate().skip(1) {
        prop_assert_eq!(&dump(s).await, &first, "db{} diverged", i);
        prop_assert_eq!(
            &s.cursor().await.expect("cursor"),
            &first_cursor,
            "cursor of db{} diverged",
            i
        );
    }
    for s in stores {
        s.close().await.expect("close");
    }
    Ok(())
}

fn seed_from_name(name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn replicas_converge_under_lossy_exchanges() {
    let cases = std::env::var("CRSYNC_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed = std::env::var("CRSYNC_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| seed_from_name("replicas_converge_under_lossy_exchanges"));
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..Config::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(config);
    let result = runner.run(&scenario(), |(n, ops)| {
        let dir = support::fast_tempdir();
        runtime.block_on(run_scenario(dir.path(), n, &ops))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
