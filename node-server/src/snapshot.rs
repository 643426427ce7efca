//! Snapshot bootstrap, the server side: `GET {base}/snapshot` serves a
//! prepared snapshot of the database (see `crsync_peer::Store::export_snapshot`)
//! for a new replica to start from instead of replaying every change, and
//! `GET {base}/snapshot/info` says whether there is one and how big it is.
//!
//! Both need a token with read access to the database (as the stream does).
//! The snapshot is cached per database under `<data_dir>/.snapshots/`
//! ([`SNAPSHOT_DIR`]) and made again only once the database has moved on by
//! `snapshot_threshold` changes; below the threshold, or with the threshold
//! at 0, both routes answer `404 NO_SNAPSHOT` and a client replays.
//!
//! The download is streamed from the file with `Content-Length`, a strong
//! `ETag` (the sha256, quoted), `Range` requests (206; tower-http's
//! `ServeFile`) and `If-Range` (a range of another snapshot gets the whole
//! new one, 200), plus `x-crsync-snapshot-*` headers (sha256, site, version,
//! changes).

pub(crate) mod cache;

use axum::Json;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use crsync_peer::proto::ErrorCode;
use crsync_peer::proto::snapshot::{
    CHANGES_HEADER, SHA256_HEADER, SITE_HEADER, VERSION_HEADER, etag,
};
use tower::ServiceExt as _;
use tower_http::services::ServeFile;

use crate::error::ApiError;
use crate::host::DbHost;
use crate::routes::{Databases, Target};
use cache::{Current, Unavailable};

/// Directory under the data directory that holds the cached snapshots
/// (`<db>-<hash>.db` and the manifest `<db>.json`). Database names cannot
/// start with a dot, so it never clashes with one.
pub const SNAPSHOT_DIR: &str = ".snapshots";

/// Media type of a snapshot (an SQLite database file).
const SNAPSHOT_MEDIA_TYPE: &str = "application/vnd.sqlite3";

/// `GET {base}/snapshot` (and `HEAD`).
pub(crate) async fn download<S: Databases>(
    target: Target<S>,
    mut request: Request,
) -> Result<Response, Response> {
    let host = target.host().await.map_err(IntoResponse::into_response)?;
    let current = current(&host).await?;
    let snapshot = &current.snapshot;
    let tag = etag(&snapshot.manifest.sha256);
    // A range of another snapshot would splice two files: send the whole
    // current one instead (a date in If-Range never matches: no Last-Modified
    // is promised).
    let same = request
        .headers()
        .get(header::IF_RANGE)
        .map(|v| v.as_bytes() == tag.as_bytes());
    if same == Some(false) {
        request.headers_mut().remove(header::RANGE);
    }
    let served = ServeFile::new(&snapshot.path).oneshot(request).await;
    let Ok(response) = served;
    // The file is open now (or was not found): a rebuild may remove it.
    let mut response = response.map(Body::new);
    if response.status() == StatusCode::NOT_FOUND {
        if let Some(cache) = host.snapshots() {
            cache.forget(snapshot).await;
        }
        return Err(ApiError::internal(
            "the cached snapshot file vanished; retry to get a new one",
        )
        .into_response());
    }
    let success = response.status().is_success();
    if success {
        let sent = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        let database = host.name().to_owned();
        metrics::counter!(crate::telemetry::SNAPSHOTS_SERVED_TOTAL, "database" => database.clone())
            .increment(1);
        metrics::counter!(crate::telemetry::SNAPSHOT_BYTES_TOTAL, "database" => database)
            .increment(sent);
    }
    let headers = response.headers_mut();
    let text = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""));
    headers.insert(header::ETAG, text(&tag));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if success {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(SNAPSHOT_MEDIA_TYPE),
        );
    }
    let m = &snapshot.manifest;
    for (name, value) in [
        (SHA256_HEADER, m.sha256.clone()),
        (SITE_HEADER, m.site_id.to_hex()),
        (VERSION_HEADER, m.version.to_string()),
        (CHANGES_HEADER, m.changes.to_string()),
    ] {
        headers.insert(HeaderName::from_static(name), text(&value));
    }
    Ok(response)
}

/// `GET {base}/snapshot/info`: the snapshot a new replica would download
/// ([`SnapshotInfo`](crsync_peer::proto::snapshot::SnapshotInfo)), made now if
/// it is due.
pub(crate) async fn info<S: Databases>(target: Target<S>) -> Result<Response, Response> {
    let host = target.host().await.map_err(IntoResponse::into_response)?;
    let current = current(&host).await?;
    Ok(Json(current.info()).into_response())
}

/// The snapshot to serve, or the `404 NO_SNAPSHOT` (`500` if making it failed).
async fn current(host: &DbHost) -> Result<Current, Response> {
    let Some(cache) = host.snapshots() else {
        return Err(no_snapshot(
            "snapshots are disabled on this server (snapshot_threshold = 0): sync by replay".into(),
            None,
        ));
    };
    match cache.current(host.peer().store()).await {
        Ok(current) => Ok(current),
        Err(Unavailable::Small { changes, threshold }) => Err(no_snapshot(
            format!(
                "database {:?} holds {changes} changes, below the snapshot threshold of \
                 {threshold}: sync by replay",
                host.name()
            ),
            Some((changes, threshold)),
        )),
        Err(Unavailable::Failed(message)) => Err(ApiError::internal(message).into_response()),
    }
}

/// `404 {"type":"error","code":"NO_SNAPSHOT",...}`, with the database's
/// changes and the threshold when the database is below it.
fn no_snapshot(message: String, size: Option<(u64, u64)>) -> Response {
    let mut body = ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NoSnapshot, message).body();
    if let Some((changes, threshold)) = size {
        body["changes"] = serde_json::json!(changes);
        body["threshold"] = serde_json::json!(threshold);
    }
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}
