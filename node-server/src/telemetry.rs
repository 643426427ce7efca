//! The server's own metrics (bytes at its edge, outbound queues, snapshots,
//! lag), beside those of the Store and the Peer
//! ([`crsync_peer::telemetry`]), and the Prometheus recorder that renders
//! them all at `GET /metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter: bytes received from clients (POST bodies, WebSocket frames), by `database`, `transport`.
pub const BYTES_IN_TOTAL: &str = "crsync_bytes_in_total";
/// Counter: bytes sent to clients (SSE events, WebSocket frames), by `database`, `transport`.
pub const BYTES_OUT_TOTAL: &str = "crsync_bytes_out_total";
/// Gauge: bytes waiting in the outbound queues of a database's connections, by `database`.
pub const OUTBOUND_QUEUED_BYTES: &str = "crsync_outbound_queued_bytes";
/// Counter: snapshot downloads served (whole or a range), by `database`.
pub const SNAPSHOTS_SERVED_TOTAL: &str = "crsync_snapshots_served_total";
/// Counter: snapshot bytes served, by `database`.
pub const SNAPSHOT_BYTES_TOTAL: &str = "crsync_snapshot_bytes_total";
/// Counter: snapshots built (`VACUUM INTO`), by `database`.
pub const SNAPSHOTS_BUILT_TOTAL: &str = "crsync_snapshots_built_total";
/// Gauge: our own transactions the slowest connected client lacks, by
/// `database` (refreshed on each scrape of `/metrics` and `/status.json`).
pub const SLOWEST_CLIENT_LAG: &str = "crsync_slowest_client_lag";
/// Gauge: databases open.
pub const DATABASES_OPEN: &str = "crsync_databases_open";

/// Bucket bounds of [`crsync_peer::telemetry::MERGE_SECONDS`], in seconds.
const MERGE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process's Prometheus recorder, installed by the first server that
/// asks (`None` when the app installed another recorder first: then
/// `/metrics` answers 503 and the app's recorder gets the metrics).
pub(crate) fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(crsync_peer::telemetry::MERGE_SECONDS.to_owned()),
                    MERGE_BUCKETS,
                )
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed: /metrics stays empty");
                return None;
            }
            crsync_peer::telemetry::describe();
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        BYTES_IN_TOTAL,
        metrics::Unit::Bytes,
        "Bytes received from clients"
    );
    describe_counter!(
        BYTES_OUT_TOTAL,
        metrics::Unit::Bytes,
        "Bytes sent to clients"
    );
    describe_gauge!(
        OUTBOUND_QUEUED_BYTES,
        metrics::Unit::Bytes,
        "Bytes waiting in outbound queues"
    );
    describe_counter!(SNAPSHOTS_SERVED_TOTAL, "Snapshot downloads served");
    describe_counter!(
        SNAPSHOT_BYTES_TOTAL,
        metrics::Unit::Bytes,
        "Snapshot bytes served"
    );
    describe_counter!(SNAPSHOTS_BUILT_TOTAL, "Snapshots built");
    describe_gauge!(
        SLOWEST_CLIENT_LAG,
        "Own transactions the slowest connected client lacks"
    );
    describe_gauge!(DATABASES_OPEN, "Databases open");
}

/// The counter of bytes received on `database` over `transport`.
pub(crate) fn bytes_in_counter(database: &str, transport: &'static str) -> metrics::Counter {
    metrics::counter!(BYTES_IN_TOTAL, "database" => database.to_owned(), "transport" => transport)
}

/// The counter of bytes sent on `database` over `transport` (a connection
/// registers it once and counts every message in it).
pub(crate) fn bytes_out_counter(database: &str, transport: &'static str) -> metrics::Counter {
    metrics::counter!(BYTES_OUT_TOTAL, "database" => database.to_owned(), "transport" => transport)
}
