//! Nostr relay benchmark: two devices paired through a local nostr-rs-relay
//! process (a real relay, its SQLite database on disk, rate limits raised),
//! each a Peer with the Nostr transport in this process.
//!
//! - **Initial sync**: device A holds the source (100,000 changes: rows of
//!   3 columns in transactions of 1,000 rows); B is empty; both start; timed
//!   from the start of the Peers until B's cursor holds A's last version.
//! - **On the relay**: the gift wraps (kind 1059) the relay stores after the
//!   initial sync, counted with a plain REQ, and their size as event JSON:
//!   events published, and bytes per change.
//! - **Live latency**: A writes one row at a time, waiting for each to
//!   arrive; B takes the time when its `PeerEvent::Change` (source `Merge`)
//!   shows the row: p50 / p99 / max over the writes.
//!
//! `cargo bench --bench relay_nostr` (100,000 changes, 200 writes) prints a
//! markdown table. Without `--bench` (as under `cargo test --all-targets`) a
//! smoke size. Environment: `CRSYNC_BENCH_CHANGES`, `CRSYNC_BENCH_WRITES`;
//! the relay binary as for the tests (`CRSYNC_NOSTR_RS_RELAY`, else where
//! `scripts/setup.sh` installs it).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use crsync::transports::nostr::{self as relay_transport, DeviceFile, Invitation, NostrDialer};
use crsync::{ChangeSource, Peer, PeerEvent, Store};
use futures_util::StreamExt;
use nostr::{Filter, Kind};

mod common;
#[path = "../tests/support/nostr_relay.rs"]
mod nostr_relay;

use common::{ROWS_PER_TXN, close_raw, open_raw, write_source};
use nostr_relay::NostrRsRelay;
use nostr_relay::client::RelayClient;

/// Limit on any one wait.
const WAIT: Duration = Duration::from_secs(1800);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Device {
    store: Store,
    file: DeviceFile,
}

async fn device(path: &Path) -> anyhow::Result<Device> {
    let store = Store::open(path).await?;
    store.enable_crr(&["items"]).await?;
    let file = DeviceFile::open_for_db(path)?;
    Ok(Device { store, file })
}

fn peer(d: &Device, remote: &str) -> anyhow::Result<Peer> {
    let peer = Peer::builder(d.store.clone()).build();
    drop(peer.add_dialer(NostrDialer::new(d.file.clone(), remote)?));
    Ok(peer)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (changes, writes) = if full {
        (
            env("CRSYNC_BENCH_CHANGES", 100_000),
            env("CRSYNC_BENCH_WRITES", 200),
        )
    } else {
        (3_000, 10)
    };
    let rows = changes.div_ceil(3);
    crsync::advanced::load_extension(None)?;
    let dir = tempfile::tempdir()?;
    let (a_path, b_path) = (dir.path().join("a.db"), dir.path().join("b.db"));
    {
        let c = open_raw(&a_path)?;
        write_source(&c, rows)?;
        close_raw(c);
        let c = open_raw(&b_path)?;
        common::create_schema(&c)?;
        close_raw(c);
    }
    let relay = NostrRsRelay::start();
    let url = relay.url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (a, b) = (device(&a_path).await?, device(&b_path).await?);
        let total: i64 = a
            .store
            .read(|c| c.query_row("SELECT count(*) FROM crsql_changes", [], |r| r.get(0)))
            .await?;
        // Pairing through the relay.
        let mut invite = Invitation::new(
            &a.file,
            a.store.site_id(),
            "a",
            vec![url.clone()],
            Duration::from_secs(600),
        )?;
        let code = invite.code().clone();
        let waiting = tokio::spawn(async move { invite.next(Duration::from_secs(60)).await });
        let joined =
            relay_transport::join(&b.file, &code, b.store.site_id(), "b", Duration::from_secs(60))
                .await?;
        let relay_transport::PairingOutcome::Paired(on_a) = waiting.await?? else {
            anyhow::bail!("pairing refused");
        };
        let (before_events, before_bytes) = RelayClient::open(&url)
            .await
            .count(Filter::new().kind(Kind::GiftWrap))
            .await;

        // Initial sync.
        let a_site = a.store.site_id();
        let a_version = a.store.cursor().await?.get(&a_site);
        let started = Instant::now();
        let pb = peer(&b, &joined.remote_key)?;
        let mut events = pb.events();
        let pa = peer(&a, &on_a.remote_key)?;
        let deadline = started + WAIT;
        while !b.store.cursor().await?.holds(&a_site, a_version) {
            ensure!(Instant::now() < deadline, "no initial sync within {WAIT:?}");
            let _ = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
        }
        let initial = started.elapsed();
        let (after_events, after_bytes) = RelayClient::open(&url)
            .await
            .count(Filter::new().kind(Kind::GiftWrap))
            .await;
        let (published, bytes) = (after_events - before_events, after_bytes - before_bytes);

        // Live latency: one row at a time.
        let mut latencies = Vec::with_capacity(writes);
        for i in 0..writes {
            let id = 10_000_000 + i as i64;
            let wrote = Instant::now();
            a.store
                .write(move |tx| {
                    tx.execute(
                        "INSERT INTO items (id, name, qty, note) VALUES (?1, 'live', ?1, 'x')",
                        [id],
                    )
                })
                .await?;
            loop {
                let event = tokio::time::timeout(Duration::from_secs(60), events.next())
                    .await
                    .context("no change from A within 60 s")?;
                if !matches!(
                    event,
                    Some(PeerEvent::Change {
                        source: ChangeSource::Merge,
                        ..
                    }) | Some(PeerEvent::Lagged { .. })
                ) {
                    continue;
                }
                let here: i64 = b
                    .store
                    .read(move |c| {
                        c.query_row("SELECT count(*) FROM items WHERE id = ?1", [id], |r| {
                            r.get(0)
                        })
                    })
                    .await?;
                if here == 1 {
                    latencies.push(wrote.elapsed());
                    break;
                }
            }
        }
        latencies.sort();
        pa.shutdown().await;
        pb.shutdown().await;

        println!(
            "\n### Nostr relay sync (nostr-rs-relay 0.8.12 on 127.0.0.1, two Peers in one process)\n"
        );
        println!("| measure | value |");
        println!("|---|---|");
        println!(
            "| initial sync, {total} changes ({rows} rows x 3 columns, {ROWS_PER_TXN} rows per transaction) | {:.2} s ({:.0} changes/s) |",
            initial.as_secs_f64(),
            total as f64 / initial.as_secs_f64()
        );
        println!("| events published (gift wraps stored by the relay) | {published} |");
        println!(
            "| bytes on the relay (event JSON) | {:.1} MB, {:.0} bytes per change |",
            bytes as f64 / 1e6,
            bytes as f64 / total.max(1) as f64
        );
        println!(
            "| live latency of one write, {} writes | p50 {}, p99 {}, max {} |",
            latencies.len(),
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            ms(latencies.last().copied().unwrap_or_default())
        );
        println!(
            "| relay database on disk | {:.1} MB |",
            relay.db_bytes() as f64 / 1e6
        );
        a.store.close().await?;
        b.store.close().await?;
        anyhow::Ok(())
    })?;
    drop(relay);
    Ok(())
}
