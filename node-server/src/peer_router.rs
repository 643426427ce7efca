//! [`PeerRouter`]: the server side for one existing Peer, to mount in an app
//! (device to device sync, no separate server).

use std::sync::Arc;

use axum::Router;
use tower_http::trace::TraceLayer;

use crate::Peer;
use crate::auth::Auth;
use crate::config::{CorsConfig, DEFAULT_MAX_BODY_BYTES};
use crate::error::ApiError;
use crate::host::DbHost;
use crate::limits::{Limits, LimitsConfig};
use crate::routes::{Databases, Opened, database_routes, not_found};
use crate::snapshot::cache::SnapshotCache;
use crate::tokens::AuthCell;

#[derive(Clone)]
struct SingleState(Arc<SingleInner>);

struct SingleInner {
    auth: AuthCell,
    host: Arc<DbHost>,
    max_body_bytes: usize,
    limits: Arc<Limits>,
}

impl Databases for SingleState {
    fn auth(&self) -> &AuthCell {
        &self.0.auth
    }

    fn limits(&self) -> &Limits {
        &self.0.limits
    }

    fn max_body_bytes(&self) -> usize {
        self.0.max_body_bytes
    }

    fn fixed_name(&self) -> Option<&str> {
        Some(self.0.host.name())
    }

    async fn host(&self, _name: &str, _create: bool) -> Result<Opened, ApiError> {
        Ok(Opened {
            host: Arc::clone(&self.0.host),
            created: false,
        })
    }
}

/// Builds a [`Router`] serving `stream`, `sync`, `data` and `ws` for one
/// existing [`Peer`], with the same handlers as [`Server`](crate::Server).
/// Nest it at any prefix; clients use that prefix as their base URL.
/// Shutting the Peer down ends its streams.
///
/// ```no_run
/// # async fn demo(peer: crsync_node_server::Peer) -> Result<(), Box<dyn std::error::Error>> {
/// use crsync_node_server::{Access, Auth, PeerRouter};
/// let auth = Auth::new().with_token("pairing-secret", ["notes"], Access::ReadWrite);
/// let sync = PeerRouter::new(peer).name("notes").auth(auth).build();
/// let app = axum::Router::new().nest("/sync", sync);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// axum::serve(listener, app).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PeerRouter {
    peer: Peer,
    name: Option<String>,
    auth: Auth,
    max_body_bytes: usize,
    cors: CorsConfig,
    limits: LimitsConfig,
    /// Snapshot directory and threshold.
    snapshots: Option<(std::path::PathBuf, u64)>,
}

impl PeerRouter {
    /// Starts from defaults: the name is the database file's stem, no tokens
    /// (set [`auth`](Self::auth)), 16 MiB bodies, no CORS.
    pub fn new(peer: Peer) -> Self {
        PeerRouter {
            peer,
            name: None,
            auth: Auth::new(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            cors: CorsConfig::default(),
            limits: LimitsConfig::default(),
            snapshots: None,
        }
    }

    /// Serves snapshots of the Peer's database (`GET {prefix}/snapshot`), cached
    /// in `dir`, from `threshold` changes on (see [`ServerConfig::snapshot_threshold`](crate::ServerConfig::snapshot_threshold));
    /// `0` turns them off (the default: an app's database is often small).
    pub fn snapshots(mut self, dir: impl Into<std::path::PathBuf>, threshold: u64) -> Self {
        self.snapshots = (threshold > 0).then(|| (dir.into(), threshold));
        self
    }

    fn default_name(&self) -> String {
        self.peer
            .store()
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "default".into())
    }

    /// Connection caps, rate limits, outbound queues and the stall timeout
    /// (`batch_bytes` does not apply: the Peer's Store is the app's). A
    /// stalled SSE stream is ended and its session closed, but its TCP
    /// connection is only cut when served through [`Server`](crate::Server).
    pub fn limits(mut self, limits: LimitsConfig) -> Self {
        self.limits = limits;
        self
    }

    /// The database name tokens are scoped to.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The accepted tokens ([`Auth::anonymous`] to accept all requests).
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Largest accepted request body.
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Allowed browser origins (`"*"` for any).
    pub fn cors_origins<I: IntoIterator<Item = S>, S: Into<String>>(mut self, origins: I) -> Self {
        self.cors.allowed_origins = origins.into_iter().map(Into::into).collect();
        self
    }

    /// The router. Invalid CORS origins are skipped (logged).
    pub fn build(self) -> Router {
        let name = self.name.clone().unwrap_or_else(|| self.default_name());
        let snapshots = self
            .snapshots
            .map(|(dir, threshold)| SnapshotCache::new(dir, &name, threshold));
        let limits = Arc::new(Limits::new(self.limits));
        let state = SingleState(Arc::new(SingleInner {
            auth: AuthCell::new(self.auth),
            host: DbHost::new(name, self.peer, Arc::clone(&limits), snapshots),
            max_body_bytes: self.max_body_bytes,
            limits,
        }));
        let router = database_routes::<SingleState>(self.max_body_bytes)
            .fallback(not_found)
            .with_state(state)
            .layer(TraceLayer::new_for_http().make_span_with(crate::server::request_span));
        match crate::server::cors_layer(&self.cors) {
            Ok(Some(cors)) => router.layer(cors),
            Ok(None) => router,
            Err(e) => {
                tracing::warn!("CORS disabled: {e}");
                router
            }
        }
    }
}

/// [`PeerRouter::new(peer).auth(auth).build()`](PeerRouter).
pub fn peer_router(peer: Peer, auth: Auth) -> Router {
    PeerRouter::new(peer).auth(auth).build()
}
