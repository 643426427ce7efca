//! The admin routes: `GET /metrics` (Prometheus text), `GET /status` (an
//! HTML page that refreshes itself) and `GET /status.json`, behind the admin
//! token of `[admin]`.

mod page;
mod recent;
mod report;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use crsync_peer::proto::ErrorCode;

use crate::auth::constant_time_eq;
use crate::config::AdminConfig;
use crate::error::ApiError;
use crate::registry::Registry;
use crate::telemetry;

pub(crate) use recent::RecentErrors;
pub use report::{DatabaseView, ErrorView, PeerView, StatusReport, TableView, ago};

/// What the admin routes read.
#[derive(Clone)]
pub(crate) struct AdminState(Arc<AdminInner>);

struct AdminInner {
    registry: Arc<Registry>,
    recent: Arc<RecentErrors>,
    token: Option<String>,
    anonymous: bool,
    started: Instant,
}

impl AdminState {
    pub(crate) fn new(
        config: &AdminConfig,
        registry: Arc<Registry>,
        recent: Arc<RecentErrors>,
    ) -> Self {
        // Installed now, so what happens before the first scrape is counted.
        let _ = telemetry::prometheus();
        AdminState(Arc::new(AdminInner {
            registry,
            recent,
            token: config.token.clone().filter(|t| !t.is_empty()),
            anonymous: config.allow_anonymous,
            started: Instant::now(),
        }))
    }

    /// `401` unless the request carries the admin token (or anonymous
    /// access is allowed).
    fn authorize(&self, parts: &Parts) -> Result<(), ApiError> {
        let presented = crate::routes::bearer(parts)?;
        match (&self.0.token, presented) {
            (Some(token), Some(p)) if constant_time_eq(token.as_bytes(), p.as_bytes()) => Ok(()),
            (_, Some(_)) => Err(ApiError::unauthorized("not the admin token")),
            _ if self.0.anonymous => Ok(()),
            (Some(_), None) => Err(ApiError::unauthorized(
                "the admin routes need the admin token (Authorization: Bearer <token> or ?token=)",
            )),
            (None, None) => Err(ApiError::unauthorized(
                "no admin token is configured: set [admin] token (or allow_anonymous = true)",
            )),
        }
    }

    /// The report; also refreshes the gauges computed from it.
    async fn report(&self) -> StatusReport {
        let open = self.0.registry.open_hosts();
        metrics::gauge!(telemetry::DATABASES_OPEN).set(open.len() as f64);
        let mut databases = Vec::new();
        for (name, path) in self.0.registry.database_files().await {
            databases.push(match open.iter().find(|h| h.name() == name) {
                Some(host) => report::open_view(host).await,
                None => report::closed_view(name, &path).await,
            });
        }
        let mut conflicts = Vec::new();
        for host in &open {
            conflicts.extend(report::recent_conflicts(host, RECENT_CONFLICTS).await);
        }
        conflicts.sort_by_key(|c| std::cmp::Reverse(c["recorded_at_ms"].as_u64()));
        conflicts.truncate(RECENT_CONFLICTS);
        let (version, generated_at, uptime_secs) = report::header(self.0.started);
        StatusReport {
            version,
            generated_at,
            uptime_secs,
            databases,
            errors: self.0.recent.newest_first(),
            conflicts: Some(conflicts),
        }
    }
}

/// Conflicts shown on the status page at most (the newest, over all open databases).
const RECENT_CONFLICTS: usize = 50;

/// The admin routes, to be merged into a router or served alone.
pub(crate) fn admin_routes(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(prometheus_text))
        .route("/status", get(status_page))
        .route("/status.json", get(status_json))
        .with_state(state)
}

async fn prometheus_text(State(state): State<AdminState>, parts: Parts) -> Response {
    if let Err(e) = state.authorize(&parts) {
        return e.into_response();
    }
    let Some(handle) = telemetry::prometheus() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal,
            "another metrics recorder is installed in this process",
        )
        .into_response();
    };
    // Refreshes the gauges computed on demand (lag, open databases).
    let _ = state.report().await;
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        handle.render(),
    )
        .into_response()
}

async fn status_json(State(state): State<AdminState>, parts: Parts) -> Response {
    if let Err(e) = state.authorize(&parts) {
        return e.into_response();
    }
    axum::Json(state.report().await).into_response()
}

async fn status_page(State(state): State<AdminState>, parts: Parts) -> Response {
    if let Err(e) = state.authorize(&parts) {
        return e.into_response();
    }
    let report = state.report().await;
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        page::render(&report),
    )
        .into_response()
}
