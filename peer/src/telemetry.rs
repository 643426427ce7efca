//! Metrics through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! The Store and the Peer record counters, gauges and a histogram where
//! things happen (merges in the Store's writer, sessions in the Peer); an
//! app sees them once it installs a recorder of its choice (the server
//! installs a Prometheus one), and pays next to nothing otherwise. Labels
//! are bounded: `database` (the Store's file name without extension),
//! `transport` (the first word of a connection's label: `sse`, `ws`, `http`,
//! `nostr`, `memory`, else `other`), `phase`, `code`, `side`; never a peer id.
//! Call [`describe`] once to attach the help texts below.

use std::path::Path;

use crate::proto::{ErrorCode, SessionPhase};

/// Counter: connections (sessions) opened, by `database`, `transport`.
pub const CONNECTIONS_TOTAL: &str = "crsync_connections_total";
/// Gauge: connections open now, by `database`, `transport`.
pub const CONNECTIONS_OPEN: &str = "crsync_connections_open";
/// Gauge: open sessions by `database`, `phase` (`connecting`, `initial`,
/// `live`, `paused`, `outdated`).
pub const SESSIONS: &str = "crsync_sessions";
/// Counter: changes received from remotes in `data` messages, by `database`.
pub const CHANGES_IN_TOTAL: &str = "crsync_changes_in_total";
/// Counter: changes sent to remotes in `data` messages, by `database`.
pub const CHANGES_OUT_TOTAL: &str = "crsync_changes_out_total";
/// Counter: changes a merge handed to cr-sqlite, by `database`.
pub const CHANGES_MERGED_TOTAL: &str = "crsync_changes_merged_total";
/// Histogram: seconds one merge of a batch takes in the Store's writer, by `database`.
pub const MERGE_SECONDS: &str = "crsync_merge_seconds";
/// Counter: batches or messages refused, by `database`, `code` (a known
/// code, else `OTHER`), `side` (`local`: we refused it; `remote`: the remote
/// refused ours).
pub const BATCHES_REJECTED_TOTAL: &str = "crsync_batches_rejected_total";
/// Gauge: commands waiting for the Store's writer thread, by `database`.
pub const STORE_QUEUE_DEPTH: &str = "crsync_store_queue_depth";
/// Counter: chunks of large transactions staged (a transaction in parts), by `database`.
pub const CHUNKS_STAGED_TOTAL: &str = "crsync_chunks_staged_total";

/// Attaches a help text to each metric the Store and the Peer record (once
/// a recorder is installed).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CONNECTIONS_TOTAL, "Connections (sessions) opened");
    describe_gauge!(CONNECTIONS_OPEN, "Connections open now");
    describe_gauge!(SESSIONS, "Open sessions by phase");
    describe_counter!(CHANGES_IN_TOTAL, "Changes received from remotes");
    describe_counter!(CHANGES_OUT_TOTAL, "Changes sent to remotes");
    describe_counter!(CHANGES_MERGED_TOTAL, "Changes a merge handed to cr-sqlite");
    describe_histogram!(
        MERGE_SECONDS,
        metrics::Unit::Seconds,
        "Time one merge takes in the Store's writer"
    );
    describe_counter!(
        BATCHES_REJECTED_TOTAL,
        "Batches or messages refused, by code and side"
    );
    describe_gauge!(
        STORE_QUEUE_DEPTH,
        "Commands waiting for the Store's writer thread"
    );
    describe_counter!(CHUNKS_STAGED_TOTAL, "Chunks of large transactions staged");
}

/// The `database` label of a Store's file: its name up to the first dot
/// (`notes` for `notes.db` and for a hidden `.notes.db.creating`).
pub(crate) fn database_label(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    let name = name.trim_start_matches('.');
    name.split('.').next().unwrap_or_default().to_owned()
}

/// The `transport` label of a connection's label (bounded to a few values).
pub fn transport_label(label: &str) -> &'static str {
    match label.split_whitespace().next().unwrap_or_default() {
        "sse" => "sse",
        "ws" => "ws",
        "http" => "http",
        "nostr" => "nostr",
        "memory" => "memory",
        _ => "other",
    }
}

/// The `phase` label of a session phase.
pub(crate) fn phase_label(phase: SessionPhase) -> &'static str {
    match phase {
        SessionPhase::Connecting => "connecting",
        SessionPhase::Initial => "initial",
        SessionPhase::Live => "live",
        SessionPhase::Paused => "paused",
        SessionPhase::Outdated => "outdated",
        _ => "closed",
    }
}

/// Counts a refusal. A code this build does not know (a remote may send
/// any text) is counted as `OTHER`, so a remote cannot grow the label set.
pub(crate) fn rejected(database: &str, code: &ErrorCode, by_remote: bool) {
    let code = match code {
        ErrorCode::Other(_) => "OTHER",
        known => known.as_str(),
    };
    metrics::counter!(
        BATCHES_REJECTED_TOTAL,
        "database" => database.to_owned(),
        "code" => code.to_owned(),
        "side" => if by_remote { "remote" } else { "local" },
    )
    .increment(1);
}

/// One session's share of the connection and phase gauges; gives it back
/// when dropped (however the session ends).
pub(crate) struct SessionGauges {
    database: String,
    transport: &'static str,
    phase: Option<&'static str>,
}

impl SessionGauges {
    /// A session opened on a connection labelled `label`.
    pub(crate) fn open(database: &str, label: &str) -> Self {
        let transport = transport_label(label);
        let labels = [
            ("database", database.to_owned()),
            ("transport", transport.to_owned()),
        ];
        metrics::counter!(CONNECTIONS_TOTAL, &labels).increment(1);
        metrics::gauge!(CONNECTIONS_OPEN, &labels).increment(1.0);
        SessionGauges {
            database: database.to_owned(),
            transport,
            phase: None,
        }
    }

    /// The session is now in `phase`.
    pub(crate) fn phase(&mut self, phase: SessionPhase) {
        let phase = phase_label(phase);
        if self.phase == Some(phase) {
            return;
        }
        self.leave_phase();
        metrics::gauge!(SESSIONS, "database" => self.database.clone(), "phase" => phase)
            .increment(1.0);
        self.phase = Some(phase);
    }

    fn leave_phase(&mut self) {
        if let Some(old) = self.phase.take() {
            metrics::gauge!(SESSIONS, "database" => self.database.clone(), "phase" => old)
                .decrement(1.0);
        }
    }
}

impl Drop for SessionGauges {
    fn drop(&mut self) {
        self.leave_phase();
        metrics::gauge!(
            CONNECTIONS_OPEN,
            "database" => self.database.clone(),
            "transport" => self.transport,
        )
        .decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_bounded() {
        assert_eq!(database_label(Path::new("/data/notes.db")), "notes");
        assert_eq!(
            database_label(Path::new("/data/.notes.db.creating")),
            "notes"
        );
        assert_eq!(transport_label("sse notes/0a0a from 127.0.0.1:5000"), "sse");
        assert_eq!(transport_label("ws notes"), "ws");
        assert_eq!(transport_label("carrier pigeon"), "other");
        assert_eq!(phase_label(SessionPhase::Live), "live");
    }
}
