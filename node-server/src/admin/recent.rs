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
/// Characters of an error's message kept (a remote's text can be long).
const MESSAGE_CHARS: usize = 500;

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
            Some(code.to_string()),
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
        message: message.chars().take(MESSAGE_CHARS).collect(),
        peer: peer.map(|p| p.to_hex()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crsync_peer::proto::ErrorCode;

    #[test]
    fn the_ring_keeps_the_newest_and_short_messages() {
        let ring = RecentErrors::default();
        let peer: crsync_peer::SiteId = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a".parse().expect("site");
        for i in 0..RECENT_ERRORS_CAP + 5 {
            let event = PeerEvent::Rejected {
                peer,
                code: ErrorCode::Gap,
                message: format!("{i} {}", "x".repeat(2 * MESSAGE_CHARS)),
                by_remote: false,
            };
            ring.push(error_of("db", event).expect("an error"));
        }
        assert!(error_of("db", PeerEvent::Lagged { missed: 1 }).is_none());
        let kept = ring.newest_first();
        assert_eq!(kept.len(), RECENT_ERRORS_CAP);
        assert!(
            kept[0]
                .message
                .starts_with(&format!("{} ", RECENT_ERRORS_CAP + 4))
        );
        assert!(
            kept.iter()
                .all(|e| e.message.chars().count() == MESSAGE_CHARS)
        );
        assert_eq!(kept[0].code.as_deref(), Some("GAP"));
    }
}
