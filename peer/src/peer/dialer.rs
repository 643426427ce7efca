//! One dialer's loop and the [`DialerHandle`] that pauses, resumes and removes it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::session::{self, Stop};
use super::status::LinkState;
use super::{Inner, PeerEvent};
use crate::proto::{ErrorCode, Side};
use crate::transport::{Dialer, TransportError};

/// Tokens a handle may queue for its dialer before `set_token` waits.
const TOKEN_QUEUE_CAP: usize = 4;

/// What kind of dial failure a [`PeerEvent::DialFailed`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DialFailure {
    /// The remote did not accept our credentials (HTTP 401): the dialer
    /// stops until it gets a new token ([`DialerHandle::set_token`]) or is
    /// resumed.
    Unauthorized,
    /// Our credentials do not grant this database (HTTP 403): as above.
    Forbidden,
    /// The remote is busy and said when to come back (HTTP 429).
    Busy,
    /// Anything else (unreachable, timed out, refused for now): retried with backoff.
    Transient,
}

impl DialFailure {
    /// Classifies a dial error.
    pub fn of(error: &TransportError) -> Self {
        let code = match error {
            TransportError::Http { status: 401, .. } => return DialFailure::Unauthorized,
            TransportError::Http { status: 403, .. } => return DialFailure::Forbidden,
            TransportError::Busy { .. } => return DialFailure::Busy,
            TransportError::Remote { code, .. } => code,
            _ => return DialFailure::Transient,
        };
        match code {
            ErrorCode::Unauthorized => DialFailure::Unauthorized,
            ErrorCode::Forbidden => DialFailure::Forbidden,
            _ => DialFailure::Transient,
        }
    }

    /// Whether redialing is pointless until the credentials change.
    pub fn is_credential_refusal(self) -> bool {
        matches!(self, DialFailure::Unauthorized | DialFailure::Forbidden)
    }

    fn code(self) -> ErrorCode {
        match self {
            DialFailure::Unauthorized => ErrorCode::Unauthorized,
            DialFailure::Forbidden => ErrorCode::Forbidden,
            DialFailure::Busy => ErrorCode::RateLimited,
            DialFailure::Transient => ErrorCode::Internal,
        }
    }
}

/// What the app wants of a dialer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Run,
    Pause,
    Remove,
}

/// Controls one dialer of a [`Peer`](crate::Peer) (from
/// [`Peer::add_dialer`](crate::Peer::add_dialer)). Dropping it leaves the
/// dialer running.
///
/// ```no_run
/// # async fn demo(peer: crsync_peer::Peer, dialer: impl crsync_peer::Dialer) {
/// let handle = peer.add_dialer(dialer);
/// handle.pause(); // on a metered network: the connection closes
/// handle.resume(); // dials again at once
/// handle.remove().await; // for good
/// # }
/// ```
#[derive(Debug)]
pub struct DialerHandle {
    /// Shared with the loop, which so never sees it closed.
    wanted: Arc<watch::Sender<Wanted>>,
    tokens: mpsc::Sender<String>,
    task: JoinHandle<()>,
}

impl DialerHandle {
    /// Closes this dialer's connection (a `Disconnected` event says "paused")
    /// and stops dialing until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.wanted.send_replace(Wanted::Pause);
    }

    /// Dials again now: after a pause, or after the remote refused our credentials.
    pub fn resume(&self) {
        self.wanted.send_replace(Wanted::Run);
    }

    /// Gives the dialer a new token (for a dialer whose credentials were
    /// refused, say) and resumes it. Dialers that take no token ignore it.
    pub async fn set_token(&self, token: impl Into<String>) {
        let _ = self.tokens.send(token.into()).await;
        self.resume();
    }

    /// Stops this dialer for good: its connection closes, and this waits
    /// until its task has ended.
    pub async fn remove(self) {
        self.wanted.send_replace(Wanted::Remove);
        let _ = self.task.await;
    }
}

/// Starts the loop of `dialer` on `inner`'s Peer.
pub(super) fn start(inner: Arc<Inner>, dialer: Box<dyn Dialer>) -> DialerHandle {
    let (wanted, wanted_rx) = watch::channel(Wanted::Run);
    let wanted = Arc::new(wanted);
    let (tokens, tokens_rx) = mpsc::channel(TOKEN_QUEUE_CAP);
    let keep = wanted.clone();
    let task = inner.tasks.clone().spawn(async move {
        dial_loop(inner, dialer, wanted_rx, tokens_rx).await;
        drop(keep);
    });
    DialerHandle {
        wanted,
        tokens,
        task,
    }
}

/// Why the dial loop stopped waiting.
enum Woken {
    Go,
    Quit,
}

async fn dial_loop(
    inner: Arc<Inner>,
    mut dialer: Box<dyn Dialer>,
    mut wanted: watch::Receiver<Wanted>,
    mut tokens: mpsc::Receiver<String>,
) {
    let link = inner.add_link(dialer.label(), true);
    let mut backoff = inner.config.reconnect.backoff();
    let local = inner.store.site_id();
    let mut paused = inner.paused.subscribe();
    let mut refused = false;
    let mut delay = Duration::ZERO;
    loop {
        // Wait out the backoff, a pause or a refusal; a new token or a
        // resume after a refusal dials at once.
        let woken = wait(
            &inner,
            link,
            &mut wanted,
            &mut paused,
            &mut tokens,
            &mut *dialer,
            delay,
            &mut refused,
        )
        .await;
        if matches!(woken, Woken::Quit) {
            break;
        }
        let stop = Stop::from_token(inner.cancel.child_token());
        let attempt = tokio::select! {
            _ = inner.cancel.cancelled() => break,
            _ = stopped(&mut wanted, &mut paused) => continue,
            r = dialer.dial(local) => r,
        };
        delay = match attempt {
            Ok(connection) => {
                let settings = dialer.link_settings();
                let run = session::run(
                    inner.clone(),
                    connection,
                    (Side::Dialed, settings),
                    link,
                    stop.clone(),
                );
                tokio::pin!(run);
                let ended = tokio::select! {
                    ended = &mut run => ended,
                    why = stopped(&mut wanted, &mut paused) => {
                        stop.stop(why);
                        run.await
                    }
                };
                if ended.site_id_conflict {
                    tracing::warn!(transport = %dialer.label(), "site id conflict: no longer dialing");
                    break;
                }
                // After a refusal (a 413, say) the next attempt would be
                // refused the same way: back off further instead of hammering.
                if ended.refused {
                    tracing::info!(transport = %dialer.label(), "the remote refused what we sent; backing off");
                } else {
                    backoff.reset();
                }
                backoff.next_delay(rand::random::<f64>())
            }
            Err(e) => {
                let failure = DialFailure::of(&e);
                tracing::debug!(transport = %dialer.label(), error = %e, ?failure, "dial failed");
                inner.emit(PeerEvent::DialFailed {
                    transport: dialer.label(),
                    failure,
                    reason: e.to_string(),
                });
                let message = e.to_string();
                inner.update_link(link, |l| {
                    l.disconnected = true;
                    l.last_error = Some((failure.code(), message));
                    if failure.is_credential_refusal() {
                        l.state = LinkState::Refused;
                    }
                });
                refused = failure.is_credential_refusal();
                // A busy remote (HTTP 429) said how long to wait: never sooner.
                backoff
                    .next_delay(rand::random::<f64>())
                    .max(e.retry_after().unwrap_or_default())
            }
        };
    }
    inner.remove_link(link);
}

/// Resolves when the app pauses or removes the dialer, or pauses the whole
/// Peer; says why (for the `Disconnected` event).
async fn stopped(
    wanted: &mut watch::Receiver<Wanted>,
    paused: &mut watch::Receiver<bool>,
) -> &'static str {
    tokio::select! {
        r = wanted.wait_for(|w| *w != Wanted::Run) => match r.map(|w| *w) {
            Ok(Wanted::Remove) | Err(_) => "dialer removed",
            _ => "paused",
        },
        _ = paused.wait_for(|p| *p) => "sync paused",
    }
}

#[allow(clippy::too_many_arguments)]
async fn wait(
    inner: &Inner,
    link: u64,
    wanted: &mut watch::Receiver<Wanted>,
    paused: &mut watch::Receiver<bool>,
    tokens: &mut mpsc::Receiver<String>,
    dialer: &mut dyn Dialer,
    delay: Duration,
    refused: &mut bool,
) -> Woken {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    let mut slept = delay.is_zero();
    loop {
        let want = *wanted.borrow_and_update();
        let peer_paused = *paused.borrow_and_update();
        if want == Wanted::Remove {
            return Woken::Quit;
        }
        let state = if want == Wanted::Pause || peer_paused {
            LinkState::Paused
        } else if *refused {
            LinkState::Refused
        } else {
            LinkState::Active
        };
        inner.update_link(link, |l| l.state = state);
        if state == LinkState::Active && slept {
            return Woken::Go;
        }
        tokio::select! {
            _ = inner.cancel.cancelled() => return Woken::Quit,
            _ = &mut sleep, if !slept => slept = true,
            r = wanted.changed() => {
                if r.is_err() {
                    return Woken::Quit;
                }
                // A resume dials at once, refused or not.
                if *wanted.borrow() == Wanted::Run {
                    *refused = false;
                    slept = true;
                }
            }
            r = paused.changed() => {
                if r.is_err() {
                    return Woken::Quit;
                }
                if !*paused.borrow() {
                    slept = true;
                }
            }
            Some(token) = tokens.recv() => {
                dialer.set_token(&token);
                *refused = false;
                slept = true;
            }
        }
    }
}
