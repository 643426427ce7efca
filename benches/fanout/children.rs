//! The child processes: the server, and the full Peers that write and follow.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use crsync::transports::{SseDialer, WebSocketDialer};
use crsync::{Peer, PeerEvent, Store};
use futures_util::StreamExt;

use crate::common::{SCHEMA, STEP_TIMEOUT, items_checksum, print_usage, runtime};
use crate::{CATCHUP_TIMEOUT, DB_NAME, TOKEN, now_us};

/// Caps given to the server: far above any client count here.
const SERVER_MAX_CONNECTIONS: usize = 50_000;

/// `child server DIR`: the node-server on 127.0.0.1:0 with raised limits;
/// prints `ADDR <addr>`, serves until stdin closes, then prints `PEAK`.
pub(crate) fn server(dir: &Path) -> anyhow::Result<()> {
    let mut config = crate::common::bench_server_config(dir, TOKEN)?;
    config.limits.max_connections = SERVER_MAX_CONNECTIONS;
    config.limits.max_connections_per_token = SERVER_MAX_CONNECTIONS;
    config.limits.rate_per_token = 0;
    config.limits.rate_per_database = 0;
    if let Ok(bytes) = std::env::var("CRSYNC_BENCH_BATCH_BYTES") {
        config.limits.batch_bytes = bytes.parse()?;
    }
    crate::common::serve_until_stdin_closes(config)
}

/// `child peer TRANSPORT ADDR DB`: a full Peer dialing the server. Prints
/// `READY` once caught up, then takes commands on stdin, one a line:
/// `write ID` (prints `WROTE ID <commit µs>`), `burst FIRST COUNT PER_SEC`
/// (paced single-row transactions; prints `BURST <first µs> <last µs>`),
/// `check ROWS` (waits until it holds ROWS rows; prints `CHECK <rows>
/// <checksum>`). Stdin closing stops it.
pub(crate) fn peer(args: &[String]) -> anyhow::Result<()> {
    let [transport, addr, db] = args else {
        bail!("usage: child peer TRANSPORT ADDR DB")
    };
    crsync::advanced::load_extension(None)?;
    let (tx, mut commands) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    runtime()?.block_on(async {
        let store = Store::open(db).await?;
        store.write(|tx| tx.execute_batch(SCHEMA)).await?;
        store.enable_crr(&["items"]).await?;
        let peer = Peer::builder(store.clone()).build();
        let mut events = peer.events();
        match transport.as_str() {
            "sse" => peer.add_dialer(
                SseDialer::new(format!("http://{addr}/db/{DB_NAME}")).with_token(TOKEN),
            ),
            "ws" => peer.add_dialer(
                WebSocketDialer::new(format!("ws://{addr}/db/{DB_NAME}/ws")).with_token(TOKEN),
            ),
            other => bail!("unknown transport {other:?}"),
        };
        let server = loop {
            match tokio::time::timeout(Duration::from_secs(60), events.next())
                .await
                .context("no connection to the server")?
            {
                Some(PeerEvent::Connected { peer, .. }) => break peer,
                Some(PeerEvent::DialFailed { reason, .. }) => eprintln!("dial failed: {reason}"),
                Some(_) => {}
                None => bail!("event stream ended"),
            }
        };
        peer.wait_caught_up(server, STEP_TIMEOUT).await?;
        // Nobody reads the events from here on.
        drop(events);
        println!("READY");
        while let Some(line) = commands.recv().await {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                ["write", id] => {
                    let id: i64 = id.parse()?;
                    insert(&store, id).await?;
                    println!("WROTE {id} {}", now_us());
                }
                ["burst", first, count, per_sec] => {
                    let (first, count, per_sec): (i64, u64, u64) =
                        (first.parse()?, count.parse()?, per_sec.parse()?);
                    // Each write is handed to the Store at its due time without
                    // waiting for the one before (the Store commits them in order,
                    // one transaction each), so the pace holds while a commit
                    // takes longer than the interval.
                    let start = tokio::time::Instant::now();
                    let began = now_us();
                    let mut writes = tokio::task::JoinSet::new();
                    for i in 0..count {
                        tokio::time::sleep_until(
                            start + Duration::from_micros(i * 1_000_000 / per_sec.max(1)),
                        )
                        .await;
                        let store = store.clone();
                        writes.spawn(async move { insert(&store, first + i as i64).await });
                    }
                    while let Some(done) = writes.join_next().await {
                        done??;
                    }
                    println!("BURST {began} {}", now_us());
                }
                ["check", rows] => {
                    let rows: i64 = rows.parse()?;
                    let start = Instant::now();
                    let (n, sum) = loop {
                        let (n, sum) = store.read(items_checksum).await?;
                        if n >= rows || start.elapsed() > CATCHUP_TIMEOUT {
                            break (n, sum);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    };
                    println!("CHECK {n} {sum:016x}");
                }
                other => bail!("unknown command {other:?}"),
            }
        }
        peer.shutdown().await;
        store.close().await?;
        anyhow::Ok(())
    })?;
    print_usage();
    Ok(())
}

/// One single-row transaction: row `id`, its `qty` the id too (what the
/// light clients look for).
pub(crate) async fn insert(store: &Store, id: i64) -> anyhow::Result<()> {
    store
        .write(move |tx| {
            tx.execute(
                "INSERT INTO items VALUES (?1, 'fan', ?1, 'a fan-out probe row')",
                [id],
            )
        })
        .await?;
    Ok(())
}
