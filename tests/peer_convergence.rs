//! Peer-level convergence over the fault-injecting in-memory transport.
//!
//! 2-4 peers in a star, chain or mesh; every link drops, duplicates and
//! reorders messages (seeded) and round-trips them through JSON; random
//! writes (conflicting keys on purpose), cut links and peer restarts. When the
//! writes stop, every replica must end with identical rows.
//!
//! 200 cases by default; `CRSYNC_PROPTEST_CASES=2000` runs more and
//! `CRSYNC_PROPTEST_SEED=n` picks another seed (default: derived from the test name).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crsync::rusqlite;
use crsync::transports::memory::{self, FaultConfig, MemoryControl};
use crsync::{Peer, ReconnectPolicy, SqlValue, Store};
use futures_util::StreamExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, RngSeed, TestRunner};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY NOT NULL, name TEXT, v INTEGER, w BLOB);
    CREATE TABLE IF NOT EXISTS tags (item INTEGER NOT NULL, tag TEXT NOT NULL, note TEXT, PRIMARY KEY (item, tag));";

#[derive(Debug, Clone, Copy)]
enum Topology {
    Star,
    Chain,
    Mesh,
}

impl Topology {
    fn edges(self, n: usize) -> Vec<(usize, usize)> {
        match self {
            Topology::Star => (1..n).map(|i| (i, 0)).collect(),
            Topology::Chain => (1..n).map(|i| (i, i - 1)).collect(),
            Topology::Mesh => (0..n)
                .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        peer: usize,
        key: i64,
        kind: u8,
        value: i64,
    },
    Cut {
        edge: usize,
    },
    Restart {
        peer: usize,
    },
    Pause {
        millis: u64,
    },
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..n, 0i64..6, 0u8..5, any::<i64>()).prop_map(|(peer, key, kind, value)| Op::Write { peer, key, kind, value }),
        1 => (0usize..8).prop_map(|edge| Op::Cut { edge }),
        1 => (0..n).prop_map(|peer| Op::Restart { peer }),
        2 => (0u64..30).prop_map(|millis| Op::Pause { millis }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Topology, f64, u64, Vec<Op>)> {
    (
        2usize..=4,
        prop_oneof![
            Just(Topology::Star),
            Just(Topology::Chain),
            Just(Topology::Mesh)
        ],
        prop_oneof![Just(0.0), Just(0.05), Just(0.15)],
        any::<u64>(),
    )
        .prop_flat_map(|(n, t, p, seed)| {
            (
                Just(n),
                Just(t),
                Just(p),
                Just(seed),
                proptest::collection::vec(op(n), 1..16),
            )
        })
}

async fn open(dir: &Path, i: usize) -> Store {
    let store = Store::builder(dir.join(format!("p{i}.db")))
        .poll_interval(Duration::from_millis(20))
        .max_batch_changes(4)
        .open()
        .await
        .expect("open");
    store
        .write(|tx| tx.execute_batch(SCHEMA))
        .await
        .expect("schema");
    store.enable_crr(&["items", "tags"]).await.expect("crr");
    store
}

fn peer(store: Store) -> Peer {
    Peer::builder(store)
        .ack_timeout(Duration::from_millis(100))
        .window(4)
        .schema_poll(Duration::from_millis(50))
        .reconnect(ReconnectPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
            multiplier: 2.0,
        })
        .build()
}

async fn dump(store: &Store) -> Vec<Vec<SqlValue>> {
    store
        .read(|c| {
            let mut out = Vec::new();
            for sql in [
                "SELECT id, name, v, w FROM items ORDER BY id",
                "SELECT item, tag, note, NULL FROM tags ORDER BY 1, 2",
            ] {
                let mut stmt = c.prepare(sql)?;
                let rows = stmt.query_map([], |r| {
                    (0..4)
                        .map(|i| r.get::<_, SqlValue>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()
                })?;
                for row in rows {
                    out.push(row?);
                }
                out.push(vec![]);
            }
            Ok(out)
        })
        .await
        .expect("dump")
}

/// Every change this replica holds, as (table, pk, column, origin site, origin
/// version (minus the local one where no origin is recorded), seq).
async fn clocks(store: &Store) -> Vec<(String, String, String, String, i64, i64)> {
    store
        .read(|c| {
            let mut stmt = c.prepare(
                "SELECT \"table\", quote(pk), cid, hex(c.site_id), coalesce(o.origin_version, -c.db_version), seq
                 FROM crsql_changes c LEFT JOIN crsync_origin o ON o.local_version = c.db_version
                 ORDER BY 4, 5, 6",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
        .unwrap_or_default()
}

async fn write(store: &Store, key: i64, kind: u8, value: i64) {
    store
        .write(move |tx| {
            match kind {
                0 => tx.execute(
                    "INSERT INTO items (id, name, v, w) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (id) DO UPDATE SET name = excluded.name, v = excluded.v",
                    (key, format!("n{}", value % 50), value, value.to_be_bytes().to_vec()),
                )?,
                1 => tx.execute("UPDATE items SET v = ?2 WHERE id = ?1", (key, value))?,
                2 => tx.execute("DELETE FROM items WHERE id = ?1", [key])?,
                3 => tx.execute(
                    "INSERT INTO tags VALUES (?1, ?2, ?3) ON CONFLICT DO UPDATE SET note = excluded.note",
                    (key, format!("t{}", value.rem_euclid(2)), value),
                )?,
                _ => tx.execute("DELETE FROM tags WHERE item = ?1", [key])?,
            };
            Ok(())
        })
        .await
        .expect("write");
}

/// The peers, replaceable on restart; links look their far end up here.
type Slots = Arc<Mutex<Vec<Peer>>>;

fn current(slots: &Slots, i: usize) -> Peer {
    slots.lock().expect("slots")[i].clone()
}

/// Connects `from` to `to` over a faulty link; returns its control.
fn link(slots: &Slots, from: usize, to: usize, faults: FaultConfig) -> MemoryControl {
    let (dialer, mut listener) = memory::dialer(format!("{from}->{to}"), faults);
    let control = dialer.control();
    current(slots, from).add_dialer(dialer);
    let slots = slots.clone();
    tokio::spawn(async move {
        while let Some(conn) = listener.next().await {
            tracing::debug!(label = %conn.label, to, "accepting");
            current(&slots, to).accept(conn);
        }
    });
    control
}

async fn run_scenario(
    dir: &Path,
    n: usize,
    topology: Topology,
    p: f64,
    seed: u64,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let mut peers = Vec::new();
    for i in 0..n {
        peers.push(peer(open(dir, i).await));
    }
    let slots: Slots = Arc::new(Mutex::new(peers));
    let edges = topology.edges(n);
    let faults = |e: usize| {
        FaultConfig::seeded(seed.wrapping_add(e as u64))
            .with_drop(p)
            .with_duplicate(p)
            .with_reorder(p)
            .with_json(true)
    };
    let mut controls: Vec<MemoryControl> = edges
        .iter()
        .enumerate()
        .map(|(e, (a, b))| link(&slots, *a, *b, faults(e)))
        .collect();
    for op in ops {
        match op {
            Op::Write {
                peer,
                key,
                kind,
                value,
            } => write(current(&slots, *peer).store(), *key, *kind, *value).await,
            Op::Cut { edge } => {
                if let Some(c) = controls.get(edge % controls.len().max(1)) {
                    c.cut_all();
                }
            }
            Op::Pause { millis } => tokio::time::sleep(Duration::from_millis(*millis)).await,
            Op::Restart { peer: k } => {
                let old = current(&slots, *k);
                old.shutdown().await;
                old.store().clone().close().await.expect("close");
                let fresh = peer(open(dir, *k).await);
                slots.lock().expect("slots")[*k] = fresh;
                // links this peer dialed died with it: dial them again
                for (e, (a, b)) in edges.iter().enumerate() {
                    if a == k {
                        controls[e] = link(&slots, *a, *b, faults(e));
                    }
                }
            }
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let peers: Vec<Peer> = slots.lock().expect("slots").clone();
    loop {
        let first = dump(peers[0].store()).await;
        let mut all = true;
        for p in &peers[1..] {
            if dump(p.store()).await != first {
                all = false;
                break;
            }
        }
        if all {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let mut report = String::new();
            for (i, p) in peers.iter().enumerate() {
                report.push_str(&format!(
                    "peer {i} (site {}): {:?}\n  cursor: {:?}\n  changes: {:?}\n",
                    p.store().site_id(),
                    dump(p.store()).await,
                    p.store().cursor().await,
                    clocks(p.store()).await,
                ));
            }
            return Err(TestCaseError::fail(format!(
                "replicas diverged for 15 s:\n{report}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in peers {
        p.shutdown().await;
        p.store().clone().close().await.expect("close");
    }
    Ok(())
}

fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("crsync-peers")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn peers_converge_over_faulty_links() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let name = "peers_converge_over_faulty_links";
    let cases = std::env::var("CRSYNC_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed = std::env::var("CRSYNC_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
        });
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/peer_convergence.txt",
        ))),
        max_shrink_iters: 16,
        ..Config::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut runner = TestRunner::new(config);
    let result = runner.run(&scenario(), |(n, topology, p, seed, ops)| {
        let dir = fast_tempdir();
        runtime.block_on(run_scenario(dir.path(), n, topology, p, seed, &ops))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
