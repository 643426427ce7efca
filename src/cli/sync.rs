//! `crsync sync`: replicate a database file with a server.
//!
//! `--once` connects, waits until it has everything the server had (the
//! server's `eose`) and until the server holds every change of ours (checked
//! by reading the server's cursor on a short probe connection), reports what
//! moved and exits. `--watch` (the default) keeps syncing and prints the
//! Peer's events until Ctrl-C or SIGTERM. A file that does not exist, or
//! has no CRR rows and an empty cursor, first starts from the server's
//! snapshot when the server offers one (`crsync clone`), then syncs only
//! what came after.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use crsync::{ChangeSource, Cursor, Peer, PeerEvent, SiteId, Store};
use futures_util::{FutureExt as _, StreamExt};
use tokio::sync::mpsc;

use super::remote::{self, Endpoint, PROBLEM_QUEUE_CAP, Problem, WatchedDialer};
use super::{Outcome, signal};
use super::{clone, db};

/// First pause between two checks of the server's cursor in `--once`.
const ACK_POLL_START: Duration = Duration::from_millis(50);
/// Longest pause between two checks of the server's cursor in `--once`.
const ACK_POLL_MAX: Duration = Duration::from_secs(1);

/// Arguments of `crsync sync`.
#[derive(Debug, Args)]
pub(crate) struct SyncArgs {
    /// The database file: with its tables enabled (`crsync enable`), or
    /// absent or empty to start from the server's snapshot if it offers one.
    #[arg(long, value_name = "FILE")]
    db: PathBuf,
    /// The database on the server, e.g. http://127.0.0.1:8080/db/notes.
    #[arg(long, value_name = "URL")]
    url: String,
    /// Use WebSocket: an http(s)://{base} URL becomes ws(s)://{base}/ws
    /// (a ws:// URL implies it and is used as given).
    #[arg(long)]
    ws: bool,
    /// Bearer token for the server.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CRSYNC_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Sync until both sides hold everything, report, and exit.
    #[arg(long, conflicts_with = "watch")]
    once: bool,
    /// Keep syncing and print events until Ctrl-C (the default).
    #[arg(long)]
    watch: bool,
    /// With --once: give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, requires = "once")]
    timeout: f64,
}

/// Runs `crsync sync`.
pub(crate) async fn run(args: SyncArgs) -> anyhow::Result<Outcome> {
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--timeout must be a positive number of seconds"))?;
    let endpoint = Endpoint::new(&args.url, args.ws, args.token.as_deref())?;
    // A new (or empty) file starts from the server's snapshot when it
    // offers one, before any Store opens the file.
    if clone::wants_bootstrap(&args.db).await?
        && !clone::bootstrap(&args.db, endpoint.url(), args.token.as_deref()).await?
        && !args.db.exists()
    {
        anyhow::bail!(
            "database file {} does not exist, and the server offers no snapshot to start from \
             (its database is below its snapshot_threshold, or snapshots are off): create its \
             tables, then run `crsync enable --db {} TABLE...`",
            args.db.display(),
            args.db.display()
        );
    }
    let store = db::open_existing(&args.db).await?;
    if let Some(copy) = store.copied().cloned() {
        db::close(store).await;
        return Err(copy.into());
    }
    let tables = db::crr_tables(&store).await;
    match &tables {
        Ok(t) if t.is_empty() => eprintln!(
            "warning: {} has no CRR tables; run `crsync enable --db {} TABLE...` first",
            args.db.display(),
            args.db.display()
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot list the CRR tables: {e:#}"),
    }
    let result = if args.once {
        once(&store, &endpoint, &args, timeout).await
    } else {
        watch(&store, &endpoint, &args).await
    };
    db::close(store).await;
    result
}

/// A started Peer with its events and the problems of its connection.
struct Session {
    peer: Peer,
    events: Box<dyn futures_util::Stream<Item = PeerEvent> + Send + Unpin>,
    problems: mpsc::Receiver<Problem>,
}

fn start(store: &Store, endpoint: &Endpoint) -> Session {
    let peer = Peer::builder(store.clone()).build();
    let events = Box::new(peer.events());
    let (tx, problems) = mpsc::channel(PROBLEM_QUEUE_CAP);
    drop(peer.add_dialer(WatchedDialer::new(endpoint, tx)));
    Session {
        peer,
        events,
        problems,
    }
}

/// `--watch`: print events until interrupted, or until the server refuses us.
async fn watch(store: &Store, endpoint: &Endpoint, args: &SyncArgs) -> anyhow::Result<Outcome> {
    println!(
        "syncing {} (site {}) with {} over {}; Ctrl-C to stop",
        args.db.display(),
        store.site_id(),
        endpoint.url(),
        endpoint.transport()
    );
    let began = Instant::now();
    let mut session = start(store, endpoint);
    let interrupted = signal::interrupted();
    tokio::pin!(interrupted);
    let result = loop {
        tokio::select! {
            () = &mut interrupted => break Ok(Outcome::Done),
            Some(event) = session.events.next() => {
                println!("[{:>8.2}s] {}", began.elapsed().as_secs_f64(), describe(&event));
                if let PeerEvent::SiteIdConflict { message, .. } = event {
                    break Err(anyhow::anyhow!("{message}"));
                }
            }
            Some(problem) = session.problems.recv() => {
                match problem {
                    Problem::Refused { .. } => break Err(anyhow::anyhow!("{problem}")),
                    // Only the server's operator can fix it: say so each time.
                    Problem::TooLarge { .. } => eprintln!("warning: {problem}"),
                    // Network trouble (a restarted server, say): the Peer
                    // redials with backoff and a `dial failed` or
                    // `disconnect` event says so.
                    Problem::Unreachable { .. } => tracing::debug!("{problem}"),
                }
            }
            else => break Err(anyhow::anyhow!("the peer stopped")),
        }
    };
    session.peer.shutdown().await;
    // The sessions' last events (their disconnects) are already queued.
    while let Some(Some(event)) = session.events.next().now_or_never() {
        println!(
            "[{:>8.2}s] {}",
            began.elapsed().as_secs_f64(),
            describe(&event)
        );
    }
    if result.is_ok() {
        println!("stopped");
    }
    result
}

/// One line for an event.
fn describe(event: &PeerEvent) -> String {
    match event {
        PeerEvent::Connected { peer, transport } => format!("connect    {peer} via {transport}"),
        PeerEvent::Sync { peer } => {
            format!("sync       {peer} sent its cursor; sending what it lacks")
        }
        PeerEvent::Eose { peer } => format!("eose       {peer}: caught up with it"),
        PeerEvent::Change { tables, source } => {
            let who = match source {
                ChangeSource::Local => "local write",
                ChangeSource::External => "write by another process",
                ChangeSource::Merge => "from remote",
            };
            format!("change     {} ({who})", join(tables))
        }
        PeerEvent::Outdated {
            peer,
            remote_version,
            local_version,
        } => format!(
            "outdated   {peer} runs schema version {remote_version}, ours is {local_version}: \
             its changes wait until we upgrade"
        ),
        PeerEvent::Disconnected {
            peer,
            transport,
            reason,
        } => match peer {
            Some(peer) => format!("disconnect {peer} ({transport}): {reason}"),
            None => format!("disconnect {transport}: {reason}"),
        },
        PeerEvent::DialFailed {
            transport,
            failure,
            reason,
        } => {
            if failure.is_credential_refusal() {
                format!("refused    {transport}: {reason} (not retrying: check the token)")
            } else {
                format!("dial failed {transport}: {reason} (retrying)")
            }
        }
        PeerEvent::Lagged { missed } => format!("lagged     {missed} events not shown"),
        PeerEvent::SiteIdConflict { message, .. } => format!("refused    {message}"),
        other => format!("{other:?}"),
    }
}

fn join(tables: &BTreeSet<String>) -> String {
    tables.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// What `--once` did.
#[derive(Debug)]
struct Report {
    server: SiteId,
    received: db::Missing,
    sent: db::Missing,
    elapsed: Duration,
}

/// `--once`: sync until both sides hold everything, then report.
async fn once(
    store: &Store,
    endpoint: &Endpoint,
    args: &SyncArgs,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let interrupted = signal::interrupted();
    tokio::pin!(interrupted);
    let began = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || {
        anyhow::anyhow!(
            "gave up after {timeout:?}: not in sync with {} yet (is the server reachable? \
             RUST_LOG=info shows more)",
            endpoint.url()
        )
    };
    // A first look at the server: it tells unreachable servers and refused
    // tokens apart before anything starts, and what the server lacks.
    let server = tokio::select! {
        () = &mut interrupted => return Ok(Outcome::Interrupted),
        r = tokio::time::timeout_at(deadline, remote::probe(endpoint)) => {
            r.map_err(|_| timed_out())?.map_err(|p| anyhow::anyhow!("{p}"))?
        }
    };
    let before = store.cursor().await?;
    let sent = db::missing_from(store, &server.cursor).await?;
    let mut session = start(store, endpoint);
    let result = tokio::select! {
        () = &mut interrupted => Ok(None),
        r = tokio::time::timeout_at(
            deadline,
            once_session(store, endpoint, &server.cursor, &mut session),
        ) => match r {
            Ok(r) => r.map(Some),
            Err(_) => Err(timed_out()),
        },
    };
    // What came over the wire (more than the store gained when a change was
    // sent twice; less when a large transaction resumed what was staged).
    let transferred: u64 = session
        .peer
        .sessions()
        .iter()
        .map(|s| s.changes_received)
        .sum();
    // Whatever happened, end the sessions cleanly before the Store closes.
    session.peer.shutdown().await;
    let Some(server) = result? else {
        return Ok(Outcome::Interrupted);
    };
    let report = Report {
        server,
        received: db::missing_from(store, &before).await?,
        sent,
        elapsed: began.elapsed(),
    };
    println!(
        "synced {} with {} ({}, server site {}) in {:.2}s",
        args.db.display(),
        endpoint.url(),
        endpoint.transport(),
        report.server,
        report.elapsed.as_secs_f64()
    );
    println!("received {}", counted(&report.received));
    println!("sent     {}", counted(&report.sent));
    println!("downloaded {transferred} changes");
    Ok(Outcome::Done)
}

fn counted(m: &db::Missing) -> String {
    let noun = if m.changes == 1 { "change" } else { "changes" };
    if m.tables.is_empty() {
        format!("{} {noun}", m.changes)
    } else {
        format!("{} {noun} ({})", m.changes, join(&m.tables))
    }
}

/// Waits for the connection, for the server's `eose`, then until the server
/// holds all of ours. Returns the server's site id.
async fn once_session(
    store: &Store,
    endpoint: &Endpoint,
    server_before: &Cursor,
    session: &mut Session,
) -> anyhow::Result<SiteId> {
    // 1. Connected: the remote's site id.
    let server = loop {
        tokio::select! {
            Some(event) = session.events.next() => {
                check_event(&event)?;
                if let PeerEvent::Connected { peer, .. } = event {
                    break peer;
                }
            }
            Some(problem) = session.problems.recv() => {
                // Before the first connection, any failure ends `--once`.
                anyhow::bail!("{problem}");
            }
            else => anyhow::bail!("the peer stopped before it connected"),
        }
    };
    tracing::info!(%server, "connected");
    // 2. Caught up: the server sent everything we lacked. The overall
    // deadline bounds the wait, so this one never fires first.
    let far = Duration::from_secs(60 * 60 * 24 * 365);
    let caught_up = session.peer.wait_caught_up(server, far);
    tokio::pin!(caught_up);
    loop {
        tokio::select! {
            r = &mut caught_up => {
                r.with_context(|| format!("waiting for {server} to send what we lack"))?;
                break;
            }
            Some(event) = session.events.next() => check_event(&event)?,
            Some(problem) = session.problems.recv() => refused(problem)?,
            else => anyhow::bail!("the peer stopped"),
        }
    }
    // The server's initial stream began after `server_before` was read, so
    // once it is merged our cursor covers it. If not, the server sent changes
    // this database refused (a table or column it lacks): its `eose` alone
    // does not say so.
    let ours = store.cursor().await?;
    if !ours.covers(server_before) {
        let behind: Vec<String> = server_before
            .iter()
            .filter(|(site, version)| ours.get(site) < *version)
            .map(|(site, version)| {
                format!("{site} (server has {version}, we have {})", ours.get(&site))
            })
            .collect();
        anyhow::bail!(
            "the server sent changes this database did not apply (does it have the server's \
             tables and columns? `crsync status` lists ours); behind on: {}",
            behind.join(", ")
        );
    }
    tracing::info!(%server, "caught up");
    // 3. Acknowledged: the server's cursor covers every change of ours.
    let mut pause = ACK_POLL_START;
    loop {
        match remote::probe(endpoint).await {
            Ok(state) => {
                let lacking = db::missing_from(store, &state.cursor).await?;
                if lacking.changes == 0 {
                    break;
                }
                tracing::info!(
                    changes = lacking.changes,
                    "the server does not hold all our changes yet"
                );
            }
            Err(problem) => refused(problem)?,
        }
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                Some(event) = session.events.next() => check_event(&event)?,
                Some(problem) = session.problems.recv() => refused(problem)?,
                else => anyhow::bail!("the peer stopped"),
            }
        }
        pause = (pause * 2).min(ACK_POLL_MAX);
    }
    Ok(server)
}

/// Fails on events that mean `--once` cannot finish.
fn check_event(event: &PeerEvent) -> anyhow::Result<()> {
    tracing::debug!("{}", describe(event));
    if let PeerEvent::SiteIdConflict { message, .. } = event {
        anyhow::bail!("{message}");
    }
    if let PeerEvent::Outdated {
        peer,
        remote_version,
        local_version,
    } = event
    {
        anyhow::bail!(
            "{peer} runs schema version {remote_version} but this database has {local_version}: \
             upgrade the local schema (and its PRAGMA user_version), then sync again"
        );
    }
    Ok(())
}

/// Fails on refusals; other trouble is retried by the Peer (within the deadline).
fn refused(problem: Problem) -> anyhow::Result<()> {
    if problem.is_refusal() {
        anyhow::bail!("{problem}");
    }
    tracing::warn!("{problem}; retrying");
    Ok(())
}
