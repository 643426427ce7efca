//! Two or more crsync devices paired through Nostr relays, for the relay
//! tests (`tests/nostr.rs` over nostr-relay-builder in process,
//! `tests/nostr_rs_relay.rs` over a nostr-rs-relay process).
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::time::Duration;

use crsync::transports::nostr::{self, DeviceFile, Invitation, NostrDialer, PairingOutcome};
use crsync::{Peer, ReconnectPolicy, Store};

const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY NOT NULL, body TEXT)";
/// Every wait in these tests gives up after this long.
pub const WAIT: Duration = Duration::from_secs(60);

/// A database with the test table, and its Nostr device file.
pub struct Device {
    pub store: Store,
    pub file: DeviceFile,
}

/// Logs to stderr as `RUST_LOG` says (nothing without it), once per process.
pub fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Opens `<name>.db` in `dir` with the test table as a CRR.
pub async fn device(dir: &Path, name: &str) -> Device {
    trace();
    let path = dir.join(format!("{name}.db"));
    let store = Store::builder(&path)
        .poll_interval(Duration::from_millis(20))
        .open()
        .await
        .expect("open");
    store
        .write(|tx| tx.execute_batch(SCHEMA))
        .await
        .expect("schema");
    store.enable_crr(&["items"]).await.expect("crr");
    let file = DeviceFile::open_for_db(&path).expect("device file");
    Device { store, file }
}

/// Pairs `a` (inviting) and `b` (joining) through `relays`; returns
/// (b's key as a knows it, a's key as b knows it).
pub async fn pair(a: &Device, b: &Device, relays: &[String]) -> (String, String) {
    let mut invite = Invitation::new(
        &a.file,
        a.store.site_id(),
        "a",
        relays.to_vec(),
        Duration::from_secs(600),
    )
    .expect("invitation");
    let code = invite.code().clone();
    let waiting = tokio::spawn(async move { invite.next(WAIT).await });
    let joined = nostr::join(&b.file, &code, b.store.site_id(), "b", WAIT)
        .await
        .expect("joins");
    let PairingOutcome::Paired(on_a) = waiting.await.expect("task").expect("answers") else {
        panic!("refused")
    };
    assert_eq!(on_a.site(), Some(b.store.site_id()));
    assert_eq!(joined.site(), Some(a.store.site_id()));
    (on_a.remote_key, joined.remote_key)
}

/// A Peer on `d` dialing each of `remotes` (paired keys) through their
/// relays, or through `relays` when given; quick redials and acks.
pub fn peer(d: &Device, remotes: &[&str], relays: Option<&[String]>) -> Peer {
    let relays = relays.map(<[String]>::to_vec);
    peer_with(d, remotes, |dialer| match &relays {
        Some(relays) => dialer.with_relays(relays.clone()),
        None => dialer,
    })
}

/// [`peer`], with each dialer changed by `f` (relays, relay settings).
pub fn peer_with(d: &Device, remotes: &[&str], f: impl Fn(NostrDialer) -> NostrDialer) -> Peer {
    let peer = Peer::builder(d.store.clone())
        .reconnect(ReconnectPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            multiplier: 2.0,
        })
        .build();
    for r in remotes {
        let dialer = NostrDialer::new(d.file.clone(), r)
            .expect("paired")
            .with_ack_timeout(Duration::from_secs(2))
            .with_dial_timeout(Duration::from_secs(5));
        drop(peer.add_dialer(f(dialer)));
    }
    peer
}
