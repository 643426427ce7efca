//! `crsync sync`: replicate a database file with a server.
//!
//! `--once` connects, waits until it has everything the server had (the
//! server's `eose`) and until the server acknowledged every change of ours
//! (the Peer's status, on the one connection), showing the initial sync's
//! progress on stderr, reports what moved and exits. `--watch` (the default) keeps syncing and prints the
//! Peer's events until Ctrl-C or SIGTERM. A file that does not exist, or
//! has no CRR rows and an empty cursor, first starts from the server's
//! snapshot when the server offers one (`crsync clone`), then syncs only
//! what came after.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use crsync::proto::ErrorCode;
use crsync::{ChangeSource, Cursor, DbVersion, Peer, PeerEvent, SiteId, Store};
use futures_util::{FutureExt as _, StreamExt};
use tokio::sync::mpsc;

use super::progress::ProgressReport;
use super::remote::{Endpoint, PROBLEM_QUEUE_CAP, Problem, WatchedDialer};
use super::{Outcome, signal};
use super::{clone, db};

/// How often `--once` looks at the sync status (and redraws its progress).
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// Arguments of `crsync sync`.
#[derive(Debug, Args)]
pub(crate) struct SyncArgs {
    /// The database file: with its tables enabled (`crsync enable`), or
    /// absent or empty to start from the server's snapshot if it offers one.
    #[arg(long, value_name = "FILE")]
    db: PathBuf,
    /// The database on the server, e.g. http://127.0.0.1:8080/db/notes.
    #[arg(long, value_name = "URL", required_unless_present = "relays")]
    url: Option<String>,
    /// Sync with the paired devices (`crsync pair`) through this Nostr relay
    /// (ws:// or wss://) instead of a server; repeat for more relays.
    #[arg(long = "relay", value_name = "URL", conflicts_with_all = ["url", "ws", "token"])]
    relays: Vec<String>,
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
    /// Also trust the root certificate(s) in this PEM file for https:// and
    /// wss:// (a private CA or a self-signed server certificate).
    #[arg(long, value_name = "FILE", env = "CRSYNC_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Sync until both sides hold everything, report, and exit.
    #[arg(long, conflicts_with = "watch")]
    once: bool,
    /// Keep syncing and print events until Ctrl-C (the default).
    #[arg(long)]
    watch: bool,
    /// With --once: give up after this many seconds without progress.
    #[arg(long, value_name = "SECS", default_value_t = 60.0, requires = "once")]
    timeout: f64,
}

/// Runs `crsync sync`.
pub(crate) async fn run(args: SyncArgs) -> anyhow::Result<Outcome> {
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--timeout must be a positive number of seconds"))?;
    let Some(url) = args.url.as_deref() else {
        let store = db::open_existing(&args.db).await?;
        let result =
            super::relay_sync::run(&store, &args.db, &args.relays, args.once, timeout).await;
        db::close(store).await;
        return result;
    };
    let roots = super::remote::root_certificates(args.ca_cert.as_deref())?;
    let endpoint = Endpoint::new(url, args.ws, args.token.as_deref())?.with_roots(roots.as_ref());
    // A new (or empty) file starts from the server's snapshot when it
    // offers one, before any Store opens the file.
    if clone::wants_bootstrap(&args.db).await?
        && !clone::bootstrap(
            &args.db,
            endpoint.url(),
            args.token.as_deref(),
            roots.as_ref(),
        )
        .await?
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
                if matches!(event, PeerEvent::Connected { .. }) {
                    say_if_created(endpoint);
                }
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
pub(crate) fn describe(event: &PeerEvent) -> String {
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
    let before = store.cursor().await?;
    let mut session = start(store, endpoint);
    let mut progress = ProgressReport::new();
    let result = tokio::select! {
        () = &mut interrupted => Ok(None),
        r = once_session(store, endpoint, &mut session, &mut progress, timeout) => r.map(Some),
    };
    progress.abandon();
    // What went over the wire (more than the store gained when a change was
    // sent twice; less when a large transaction resumed what was staged).
    let transferred: u64 = session
        .peer
        .sessions()
        .iter()
        .map(|s| s.changes_received)
        .sum();
    // Whatever happened, end the sessions cleanly before the Store closes.
    session.peer.shutdown().await;
    let Some(synced) = result? else {
        return Ok(Outcome::Interrupted);
    };
    let received = db::missing_from(store, &before).await?;
    let sent = db::missing_from(store, &synced.server_had).await?;
    println!(
        "synced {} with {} ({}, server site {}) in {:.2}s",
        args.db.display(),
        endpoint.url(),
        endpoint.transport(),
        synced.server,
        began.elapsed().as_secs_f64()
    );
    say_if_created(endpoint);
    println!("received {}", counted(&received));
    println!("sent     {}", counted(&sent));
    println!("downloaded {transferred} {}", plural(transferred, "change"));
    Ok(Outcome::Done)
}

/// Says so when our connection created the database on the server (its
/// token has `create`): a mistyped name shows here instead of going unnoticed.
fn say_if_created(endpoint: &Endpoint) {
    if endpoint.creation_notice().take() {
        println!(
            "created database {} on the server (it did not exist; if the name is a typo, \
             fix the URL)",
            endpoint.database_name()
        );
    }
}

fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        noun.to_string()
    } else {
        format!("{noun}s")
    }
}

fn counted(m: &db::Missing) -> String {
    let noun = plural(m.changes as u64, "change");
    if m.tables.is_empty() {
        format!("{} {noun}", m.changes)
    } else {
        format!("{} {noun} ({})", m.changes, join(&m.tables))
    }
}

/// What `--once` learned of the server.
struct Synced {
    server: SiteId,
    /// The server's cursor when it asked us for what it lacked.
    server_had: Cursor,
}

/// Where `--once` stands.
enum Stage {
    /// Waiting for the server to say who it is.
    Connecting,
    /// Waiting for the server's `eose`: it sent everything we lacked.
    CatchingUp(SiteId),
    /// Waiting until the server acknowledges our own version (as it was
    /// once we were caught up).
    Acknowledging(SiteId, DbVersion),
}

/// Syncs until the server sent everything we lacked and acknowledged all of
/// ours, showing progress; gives up after `timeout` without progress.
async fn once_session(
    store: &Store,
    endpoint: &Endpoint,
    session: &mut Session,
    progress: &mut ProgressReport,
    timeout: Duration,
) -> anyhow::Result<Synced> {
    let local = store.site_id();
    let mut statuses = session.peer.watch_status(STATUS_EVERY);
    let mut stage = Stage::Connecting;
    let mut server_had = Cursor::new();
    let mut last_activity = tokio::time::Instant::now();
    let mut seen = None;
    loop {
        let idle = tokio::time::sleep_until(last_activity + timeout);
        tokio::select! {
            () = idle => anyhow::bail!(
                "gave up after {timeout:?} without progress: not in sync with {} yet (is the \
                 server reachable? RUST_LOG=info shows more)",
                endpoint.url()
            ),
            Some(event) = session.events.next() => {
                check_event(&event)?;
                last_activity = tokio::time::Instant::now();
            }
            Some(problem) = session.problems.recv() => {
                // Before the first connection, any failure ends `--once`.
                if matches!(stage, Stage::Connecting) {
                    anyhow::bail!("{problem}");
                }
                refused(problem)?;
            }
            Some(status) = statuses.next() => {
                let Some(remote) = status.remotes.first() else { continue };
                let moved = (remote.download.done, remote.upload.done, remote.acknowledged);
                if seen != Some(moved) {
                    seen = Some(moved);
                    last_activity = tokio::time::Instant::now();
                }
                progress.update(remote);
                let sessions = session.peer.sessions();
                let server_session = |server: SiteId| {
                    sessions.iter().find(|s| s.remote == Some(server)).cloned()
                };
                // One status may move more than one stage on.
                loop {
                    match stage {
                        Stage::Connecting => {
                            let Some(server) = remote.peer else { break };
                            tracing::info!(%server, "connected");
                            stage = Stage::CatchingUp(server);
                        }
                        Stage::CatchingUp(server) => {
                            let Some(s) = server_session(server) else { break };
                            if server_had.is_empty() {
                                server_had = s.requested.clone();
                            }
                            if !s.received_eose {
                                break;
                            }
                            tracing::info!(%server, "caught up");
                            let own = store.cursor().await?.get(&local);
                            stage = Stage::Acknowledging(server, own);
                        }
                        Stage::Acknowledging(server, own) => {
                            if remote.peer == Some(server) && remote.acknowledged >= own {
                                return Ok(Synced { server, server_had });
                            }
                            break;
                        }
                    }
                }
            }
            else => anyhow::bail!("the peer stopped"),
        }
    }
}

/// Fails on events that mean `--once` cannot finish.
fn check_event(event: &PeerEvent) -> anyhow::Result<()> {
    tracing::debug!("{}", describe(event));
    if let PeerEvent::SiteIdConflict { message, .. } = event {
        anyhow::bail!("{message}");
    }
    if let PeerEvent::Rejected {
        code: ErrorCode::InvalidChange,
        message,
        by_remote: false,
        ..
    } = event
    {
        anyhow::bail!(
            "the server sent changes this database cannot apply (does it have the server's \
             tables and columns? `crsync status` lists ours): {message}"
        );
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
