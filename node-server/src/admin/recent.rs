//! [`RecentErrors`]: the last refusals and failures of every database's
//! Peer, for the status page.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use crsync_peer::PeerEvent;
use futures_util::StreamExt;

use super::report::ErrorView;

/// Errors kept, at most (the oldest go first).
pub(crate) const RECENT_ERRORS_CAP: usize = 50;

/// A bounded ring of recent errors, shared by all databases of a server.
#[derive(Debug, Default)]
pub(crate) struct RecentErrors(Mutex<VecDeque<ErrorView>>);

impl RecentErrors {
    fn push(&self, error: ErrorView) {
        let mut ring = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if ring.len() == RECENT_ERRORS_CAP {
            ring.pop_front();
        }
        ring.push_back(error);
    }

    /// The errors kept, newest first.
    pub(crate) fn newest_first(&self) -> Vec<ErrorView> {
        let ring = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter().rev().cloned().collect()
    }

    /// Records what `events` (of database `database`) report as errors,
    /// until they end or `closed` resolves.
    pub(crate) async fn watch(
        &self,
        database: String,
        events: impl futures_util::Stream<Item = PeerEvent> + Unpin,
        closed: impl Future<Output = ()>,
    ) {
        let mut events = events;
        tokio::pin!(closed);
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                () = &mut closed => return,
            };
            let Some(event) = event else { return };
            if let Some(error) = error_of(&database, event) {
                self.push(error);
            }
        }
    }
}

/// The error an event reports, if it reports one.
fn error_of(database: &str, event: PeerEvent) -> Option<ErrorView> {
    let (kind, code, message, peer) = match event {
        PeerEvent::Rejected {
            peer,
            code,
            message,
            by_remote,
        } => (
            if by_remote {
                "refused by the client"
            } else {
                "refused"
            },
            Some(code.as_str().to_owned()),
            message,
            Some(peer),
        ),
        PeerEvent::DialFailed {
            transport, reason, ..
        } => ("dial failed", None, format!("{transport}: {reason}"), None),
        PeerEvent::SiteIdConflict { peer, message } => (
            "site id conflict",
            Some("SITE_ID_CONFLICT".to_owned()),
            message,
            peer,
        ),
        _ => return None,
    };
    Some(ErrorView {
        at: super::report::unix_secs(SystemTime::now()),
        database: database.to_owned(),
        kind: kind.to_owned(),
        code,
        message,
        peer: peer.map(|p| p.to_hex()),
    })
}
