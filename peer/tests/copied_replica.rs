//! Two files with one site id: caught, refused, forked, and nothing lost.

mod support;

use std::path::Path;
use std::time::Duration;

use crsync_peer::proto::Trust;
use crsync_peer::{Peer, PeerEvent, SqlValue, Store};
use futures_util::StreamExt;
use support::{dump, memory_pair, open_store, wait_converged};

const WAIT: Duration = Duration::from_secs(10);

async fn insert(store: &Store, id: i64, name: &str) {
    let name = name.to_owned();
    store
        .write(move |tx| {
            tx.execute(
                "INSERT OR REPLACE INTO items (id, name) VALUES (?1, ?2)",
                crsync_peer::rusqlite::params![id, name],
            )
        })
        .await
        .expect("write");
}

fn names(rows: &[Vec<SqlValue>]) -> Vec<String> {
    rows.iter()
        .filter_map(|r| match r.get(1) {
            Some(SqlValue::Text(t)) => Some(String::from_utf8_lossy(t).into_owned()),
            _ => None,
        })
        .collect()
}

/// Connects two peers over memory and returns the first site id conflict
/// either reports, if one comes within `within`.
async fn connect_and_watch(a: &Peer, b: &Peer, within: Duration) -> Option<String> {
    let mut ea = a.events();
    let mut eb = b.events();
    let (ca, cb) = memory_pair();
    a.accept(ca);
    b.accept(cb);
    let conflict = |e: PeerEvent| match e {
        PeerEvent::SiteIdConflict { message, .. } => Some(message),
        _ => None,
    };
    let watch = async {
        loop {
            tokio::select! {
                Some(e) = ea.next() => if let Some(m) = conflict(e) { return m },
                Some(e) = eb.next() => if let Some(m) = conflict(e) { return m },
            }
        }
    };
    tokio::time::timeout(within, watch).await.ok()
}

/// A client of `server`: both ends accept over memory, and a client believes
/// the server it chose (as a dialer does).
fn client(store: &Store) -> Peer {
    Peer::builder(store.clone())
        .accepted_trust(Trust::Full)
        .build()
}

fn copy_db(from: &Path, to: &Path) {
    std::fs::copy(from, to).expect("copy");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", to.display()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cp_copy_is_refused_until_forked_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let original = open_store(dir.path(), "a.db").await;
    insert(&original, 1, "before the copy").await;
    // Synced once: the acknowledged write keeps its site id after a fork.
    let other = Peer::builder(open_store(dir.path(), "other.db").await).build();
    let po = Peer::builder(original.clone()).build();
    let (c1, c2) = memory_pair();
    other.accept(c1);
    po.accept(c2);
    wait_converged(&[other.store(), &original], WAIT).await;
    let acknowledged = async {
        loop {
            let acked = po
                .sessions()
                .iter()
                .any(|s| s.acknowledged.get(&original.site_id()) > crsync_peer::DbVersion(0));
            if acked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, acknowledged)
        .await
        .expect("acknowledged");
    po.shutdown().await;
    other.shutdown().await;
    original.close().await.unwrap();
    copy_db(&dir.path().join("a.db"), &dir.path().join("b.db"));

    let a = open_store(dir.path(), "a.db").await;
    let b = open_store(dir.path(), "b.db").await;
    assert!(a.copied().is_none(), "the original is not a copy");
    let copy = b.copied().expect("the copy is caught at open").to_string();
    assert!(copy.contains("crsync fork --db"), "{copy}");
    assert_eq!(a.site_id(), b.site_id());
    insert(&a, 2, "written by a").await;
    insert(&b, 3, "written by the copy").await;

    let pa = Peer::builder(a.clone()).build();
    let pb = Peer::builder(b.clone()).build();
    let conflict = connect_and_watch(&pa, &pb, WAIT).await.expect("refused");
    assert!(conflict.contains("crsync fork"), "{conflict}");
    // Nothing crossed: each file has only its own rows.
    assert_eq!(names(&dump(&a).await), ["before the copy", "written by a"]);
    assert_eq!(
        names(&dump(&b).await),
        ["before the copy", "written by the copy"]
    );
    pa.shutdown().await;
    pb.shutdown().await;
    b.close().await.unwrap();

    let report = Store::fork(dir.path().join("b.db"), None).await.unwrap();
    assert_eq!(report.old_site, a.site_id());
    assert_ne!(report.new_site, a.site_id());
    assert!(report.reattributed > 0, "{report:?}");
    let b = open_store(dir.path(), "b.db").await;
    assert!(b.copied().is_none(), "a forked file is its own");
    assert_eq!(b.site_id(), report.new_site);

    let pa = Peer::builder(a.clone()).build();
    let pb = Peer::builder(b.clone()).build();
    assert_eq!(
        connect_and_watch(&pa, &pb, Duration::from_millis(500)).await,
        None
    );
    wait_converged(&[&a, &b], WAIT).await;
    assert_eq!(
        names(&dump(&a).await),
        ["before the copy", "written by a", "written by the copy"]
    );
    // The pre-copy row kept its attribution: it was not re-sent as new.
    let site_of_row_1 = |s: Store| async move {
        s.read(|c| {
            c.query_row(
                "SELECT site_id FROM crsql_changes WHERE pk = crsql_pack_columns(1) AND cid = 'name'",
                [],
                |r| r.get::<_, Vec<u8>>(0),
            )
        })
        .await
        .unwrap()
    };
    let old = a.site_id().as_bytes().to_vec();
    assert_eq!(site_of_row_1(a.clone()).await, old);
    assert_eq!(site_of_row_1(b.clone()).await, old);
    pa.shutdown().await;
    pb.shutdown().await;
}

/// A backup copied back over the file keeps its inode, so only the protocol
/// can tell: the other side holds more of this site id than the file wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_is_caught_by_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = Peer::builder(open_store(dir.path(), "server.db").await).build();
    let a_path = dir.path().join("a.db");
    let backup = dir.path().join("backup.db");

    let a = open_store(dir.path(), "a.db").await;
    insert(&a, 1, "backed up").await;
    a.close().await.unwrap();
    copy_db(&a_path, &backup);

    let a = open_store(dir.path(), "a.db").await;
    insert(&a, 2, "after the backup").await;
    let pa = client(&a);
    let (cs, ca) = memory_pair();
    server.accept(cs);
    pa.accept(ca);
    wait_converged(&[server.store(), &a], WAIT).await;
    pa.shutdown().await;
    a.close().await.unwrap();

    // Restore in place: same file, older contents.
    std::fs::copy(&backup, &a_path).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", a_path.display()));
    }
    let a = open_store(dir.path(), "a.db").await;
    assert!(a.copied().is_none(), "same inode: not caught locally");
    let pa = client(&a);
    let conflict = connect_and_watch(&server, &pa, WAIT)
        .await
        .expect("refused");
    assert!(conflict.contains("crsync fork"), "{conflict}");
    let on_server = names(&dump(server.store()).await);
    assert_eq!(on_server, ["backed up", "after the backup"]);
    // Written while refused: kept, and synced once forked.
    insert(&a, 3, "after the restore").await;
    pa.shutdown().await;
    a.close().await.unwrap();

    Store::fork(&a_path, None).await.unwrap();
    let a = open_store(dir.path(), "a.db").await;
    let pa = client(&a);
    let (cs, ca) = memory_pair();
    server.accept(cs);
    pa.accept(ca);
    wait_converged(&[server.store(), &a], WAIT).await;
    assert_eq!(
        names(&dump(&a).await),
        ["backed up", "after the backup", "after the restore"]
    );
    pa.shutdown().await;
    server.shutdown().await;
}
