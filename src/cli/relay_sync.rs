//! `crsync sync --relay URL`: sync with every paired device through Nostr
//! relays (see `crsync pair`).
//!
//! `--watch` (the default) keeps syncing and prints the Peer's events.
//! `--once` syncs until every paired device holds everything of ours and
//! sent what we lacked, or until nothing moved for `--timeout` seconds: a
//! device that is away picks up what we published from the relays later, so
//! that ends well too (it says which devices were not reached).

use std::path::Path;
use std::time::{Duration, Instant};

use crsync::transports::nostr::{DeviceFile, NostrDialer};
use crsync::{Peer, PeerEvent, Store};
use futures_util::StreamExt;

use super::{Outcome, db, signal};

/// How often `--once` looks at the sync status.
const STATUS_EVERY: Duration = Duration::from_millis(200);

fn start(store: &Store, file: &DeviceFile, relays: &[String]) -> anyhow::Result<(Peer, usize)> {
    let devices = file.devices();
    if devices.is_empty() {
        anyhow::bail!(
            "no paired devices in {}: pair first (`crsync pair --db FILE invite --relay URL` here, \
             `crsync pair --db FILE join CODE` on the other device)",
            file.path().display()
        );
    }
    let peer = Peer::builder(store.clone()).build();
    for d in &devices {
        let dialer = NostrDialer::new(file.clone(), &d.remote_key)?.with_relays(relays.to_vec());
        drop(peer.add_dialer(dialer));
    }
    Ok((peer, devices.len()))
}

/// Runs the relay sync of `db` (already opened as `store`).
pub(crate) async fn run(
    store: &Store,
    db_path: &Path,
    relays: &[String],
    once: bool,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let file = DeviceFile::open_for_db(db_path)?;
    let (peer, devices) = start(store, &file, relays)?;
    let mut events = peer.events();
    let interrupted = signal::interrupted();
    tokio::pin!(interrupted);
    let began = Instant::now();
    if !once {
        println!(
            "syncing {} (site {}) with {devices} paired device(s) via {}; Ctrl-C to stop",
            db_path.display(),
            store.site_id(),
            relays.join(" ")
        );
        loop {
            tokio::select! {
                () = &mut interrupted => break,
                Some(event) = events.next() => {
                    println!("[{:>8.2}s] {}", began.elapsed().as_secs_f64(), super::sync::describe(&event));
                }
                else => break,
            }
        }
        peer.shutdown().await;
        println!("stopped");
        return Ok(Outcome::Done);
    }
    let before = store.cursor().await?;
    let mut statuses = peer.watch_status(STATUS_EVERY);
    let mut last_activity = tokio::time::Instant::now();
    let mut in_sync = false;
    let mut seen = None;
    let interrupted_once = loop {
        let idle = tokio::time::sleep_until(last_activity + timeout);
        tokio::select! {
            () = &mut interrupted => break true,
            () = idle => break false,
            Some(event) = events.next() => {
                tracing::debug!("{}", super::sync::describe(&event));
                if let PeerEvent::SiteIdConflict { message, .. } = &event {
                    peer.shutdown().await;
                    anyhow::bail!("{message}");
                }
                if !matches!(event, PeerEvent::Change { .. }) {
                    last_activity = tokio::time::Instant::now();
                }
            }
            Some(status) = statuses.next() => {
                let moved: Vec<_> = status.remotes.iter().map(|r| (r.download.done, r.upload.done, r.acknowledged)).collect();
                if seen.as_ref() != Some(&moved) {
                    seen = Some(moved);
                    last_activity = tokio::time::Instant::now();
                }
                let sessions = peer.sessions();
                let own = store.cursor().await?.get(&store.site_id());
                in_sync = status.remotes.len() == devices
                    && status.remotes.iter().all(|r| r.acknowledged >= own && r.peer.is_some())
                    && sessions.len() == devices
                    && sessions.iter().all(|s| s.received_eose);
                if in_sync {
                    break false;
                }
            }
        }
    };
    peer.shutdown().await;
    if interrupted_once {
        return Ok(Outcome::Interrupted);
    }
    let received = db::missing_from(store, &before).await?;
    println!(
        "synced {} via {} in {:.2}s: received {} change(s)",
        db_path.display(),
        relays.join(" "),
        began.elapsed().as_secs_f64(),
        received.changes
    );
    if !in_sync {
        println!(
            "not every paired device answered within {}s: what it lacks is on the relays for it to pick up",
            timeout.as_secs()
        );
    }
    Ok(Outcome::Done)
}
