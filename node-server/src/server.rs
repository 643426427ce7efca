//! [`Server`]: the multi-database server `crsync serve` runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::routing::get;
use crsync_peer::proto::snapshot;
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::admin::{AdminState, RecentErrors, admin_routes};
use crate::auth::{Auth, NoTokens, TokenError};
use crate::config::{CorsConfig, ServerConfig};
use crate::error::ApiError;
use crate::limits::{ConnKill, KillableListener, Limits};
use crate::registry::{Registry, RegistryOptions};
use crate::routes::{Databases, Opened, database_routes, method_not_allowed, not_found};
use crate::tokens::{AuthCell, TokenHandle};

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// No token is configured and anonymous access is not allowed.
    #[error(transparent)]
    NoTokens(#[from] NoTokens),
    /// A configured token cannot be used (an unreadable or empty token file, ...).
    #[error(transparent)]
    Tokens(TokenError),
    /// The `[tls]` certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The schema file could not be read.
    #[error("cannot read schema file {path}: {source}")]
    Schema {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The data directory is missing (and creating databases is not allowed)
    /// or cannot be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cr-sqlite extension could not be loaded.
    #[error(transparent)]
    Extension(#[from] crsync_peer::ExtensionError),
    /// An allowed CORS origin is not a valid header value.
    #[error("invalid CORS origin {0:?}")]
    CorsOrigin(String),
    /// Binding or serving the socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct ServerState(Arc<ServerInner>);

struct ServerInner {
    auth: AuthCell,
    registry: Arc<Registry>,
    max_body_bytes: usize,
    limits: Arc<Limits>,
}

impl Databases for ServerState {
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
        None
    }

    async fn host(&self, name: &str, create: bool) -> Result<Opened, ApiError> {
        self.0.registry.get(name, create).await
    }
}

/// The multi-database server: `/db/{name}/stream|sync|data|ws|snapshot` and `/health`.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use crsync_node_server::{Server, ServerConfig};
/// let config = ServerConfig::from_toml_file("crsync.toml")?;
/// let server = Server::bind(config).await?;
/// println!("listening on http://{}", server.local_addr());
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// // e.g. send on `stop` from a Ctrl-C handler
/// server.serve(async { let _ = stopped.await; }).await?;
/// # drop(stop);
/// # Ok(()) }
/// ```
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    app: Router,
    /// `[admin] bind`: the admin routes' own listener.
    admin: Option<AdminListener>,
    state: ServerState,
    shutdown_timeout: Duration,
    send_buffer_bytes: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The listener of `[admin] bind`, serving only the admin routes.
struct AdminListener {
    listener: TcpListener,
    addr: SocketAddr,
    app: Router,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds `config.bind` with the tokens from the config and the
    /// environment variable it names (`CRSYNC_TOKEN` by default).
    pub async fn bind(config: ServerConfig) -> Result<Server, ServeError> {
        let auth = Auth::from_config_and_env(&config).map_err(|e| match e {
            TokenError::NoTokens(e) => ServeError::NoTokens(e),
            e => ServeError::Tokens(e),
        })?;
        Self::bind_with_auth(config, auth).await
    }

    /// Binds `config.bind` with an explicit token set (the config's `tokens`,
    /// `token_env` and `allow_anonymous` are ignored; `allow_create` lets
    /// anonymous clients create databases, if the set allows them).
    pub async fn bind_with_auth(config: ServerConfig, auth: Auth) -> Result<Server, ServeError> {
        if !auth.has_tokens() && !auth.allows_anonymous() {
            return Err(NoTokens {
                env: config.token_env.clone(),
            }
            .into());
        }
        crsync_peer::load_extension(config.extension_path.as_deref())?;
        let schema_sql = match &config.schema {
            Some(path) => Some(tokio::fs::read_to_string(path).await.map_err(|source| {
                ServeError::Schema {
                    path: path.clone(),
                    source,
                }
            })?),
            None => None,
        };
        let auth = auth.allow_anonymous_create(config.allow_create);
        let tls = match &config.tls {
            Some(tls) => Some(crate::tls::acceptor(tls).map_err(ServeError::Tls)?),
            None => None,
        };
        let data_dir_result = if auth.may_create_any() {
            tokio::fs::create_dir_all(&config.data_dir).await
        } else {
            tokio::fs::metadata(&config.data_dir).await.map(drop)
        };
        data_dir_result.map_err(|source| ServeError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let cors = cors_layer(&config.cors)?;
        let limits = Arc::new(Limits::new(config.limits.clone()));
        let recent = Arc::new(RecentErrors::default());
        let registry = Arc::new(Registry::new(RegistryOptions {
            data_dir: config.data_dir.clone(),
            schema_sql,
            ping_interval: config.ping_interval,
            extension_path: config.extension_path.clone(),
            limits: Arc::clone(&limits),
            snapshot_threshold: config.snapshot_threshold,
            recent: Arc::clone(&recent),
        }));
        let admin = admin_routes(AdminState::new(
            &config.admin,
            Arc::clone(&registry),
            recent,
        ));
        let state = ServerState(Arc::new(ServerInner {
            auth: AuthCell::new(auth),
            registry,
            max_body_bytes: config.max_body_bytes,
            limits,
        }));
        let app = Router::new()
            .route("/health", get(health))
            .method_not_allowed_fallback(method_not_allowed)
            .nest(
                "/db/{name}",
                database_routes::<ServerState>(config.max_body_bytes),
            )
            .fallback(not_found)
            .with_state(state.clone());
        // The admin routes: on their own listener, or beside the others.
        let (app, admin_listener) = match config.admin.bind {
            Some(bind) => {
                let listener = TcpListener::bind(bind)
                    .await
                    .map_err(|source| ServeError::Io { addr: bind, source })?;
                let admin_app = admin
                    .fallback(not_found)
                    .layer(TraceLayer::new_for_http().make_span_with(request_span));
                (app, Some((listener, admin_app)))
            }
            None => (app.merge(admin), None),
        };
        let mut app = app.layer(TraceLayer::new_for_http().make_span_with(request_span));
        if let Some(cors) = cors {
            app = app.layer(cors);
        }
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|source| ServeError::Io {
                addr: config.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Io {
            addr: config.bind,
            source,
        })?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, data_dir = %config.data_dir.display(), "crsync server listening");
        let admin = match admin_listener {
            Some((listener, app)) => {
                let admin_addr = listener.local_addr().map_err(|source| ServeError::Io {
                    addr: config.admin.bind.unwrap_or(config.bind),
                    source,
                })?;
                tracing::info!(addr = %admin_addr, "admin routes (/metrics, /status) listening");
                Some(AdminListener {
                    listener,
                    addr: admin_addr,
                    app,
                })
            }
            None => None,
        };
        Ok(Server {
            listener,
            addr,
            app,
            admin,
            state,
            shutdown_timeout: config.shutdown_timeout,
            send_buffer_bytes: config.limits.socket_send_buffer_bytes,
            tls,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the admin routes (`/metrics`, `/status`, `/status.json`)
    /// are served on: `[admin] bind` when set, else [`local_addr`](Self::local_addr).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.as_ref().map_or(self.addr, |a| a.addr)
    }

    /// Whether it serves HTTPS/WSS (`[tls]`), else plain HTTP/WS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A handle that replaces the accepted tokens while the server runs.
    pub fn tokens(&self) -> TokenHandle {
        TokenHandle(self.state.0.auth.clone())
    }

    /// Serves until `shutdown` resolves, then stops accepting, shuts every
    /// database's Peer down (which ends the streams and finishes messages in
    /// flight), and waits up to the configured timeout for open requests.
    pub async fn serve<F>(self, shutdown: F) -> Result<(), ServeError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Server {
            listener,
            addr,
            app,
            admin,
            state,
            shutdown_timeout,
            send_buffer_bytes,
            tls,
        } = self;
        let (began_tx, began_rx) = tokio::sync::watch::channel(false);
        let began_tx = Arc::new(began_tx);
        let signal_tx = Arc::clone(&began_tx);
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections");
            signal_tx.send_replace(true);
        };
        // Once shutdown begins, shut the Peers down while axum drains: their
        // sessions end, which ends the SSE bodies and WebSockets.
        let mut began = began_rx.clone();
        let stopper = tokio::spawn(async move {
            if began.wait_for(|b| *b).await.is_ok() {
                state.0.registry.shutdown().await;
            }
        });
        let mut began = began_rx.clone();
        let deadline = async move {
            if began.wait_for(|b| *b).await.is_ok() {
                tokio::time::sleep(shutdown_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        // The admin listener stops accepting when shutdown begins; it is
        // dropped with its open requests when serve returns.
        let admin_task = admin.map(
            |AdminListener {
                 listener,
                 addr,
                 app,
             }| {
                let mut began = began_rx.clone();
                tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                    let stop = async move {
                        let _ = began.wait_for(|b| *b).await;
                    };
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                    {
                        tracing::error!(%addr, "admin listener failed: {e}");
                    }
                }))
            },
        );
        // Connections a handler can cut (a stalled stream), with TCP_NODELAY.
        let listener = KillableListener {
            tcp: listener,
            send_buffer_bytes,
            tls,
            handshakes: tokio::task::JoinSet::new(),
        };
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<ConnKill>(),
        )
        .with_graceful_shutdown(signal);
        let result = tokio::select! {
            result = server => result.map_err(|source| ServeError::Io { addr, source }),
            () = deadline => {
                tracing::warn!(?shutdown_timeout, "connections still open after the shutdown timeout");
                Ok(())
            }
        };
        began_tx.send_replace(true);
        if tokio::time::timeout(shutdown_timeout, stopper)
            .await
            .is_err()
        {
            tracing::warn!("databases still closing after the shutdown timeout");
        }
        drop(admin_task);
        result
    }
}

/// A span per request naming the path only: the query may carry a token.
pub(crate) fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
}

/// `GET /health`: liveness, and the body limit clients must split batches under.
async fn health(
    axum::extract::State(state): axum::extract::State<ServerState>,
) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok", "maxBodyBytes": state.0.max_body_bytes}))
}

/// The CORS layer for the configured origins (`None` when there are none).
pub(crate) fn cors_layer(config: &CorsConfig) -> Result<Option<CorsLayer>, ServeError> {
    if config.allowed_origins.is_empty() {
        return Ok(None);
    }
    let origin = if config.allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let origins = config
            .allowed_origins
            .iter()
            .map(|o| HeaderValue::from_str(o).map_err(|_| ServeError::CorsOrigin(o.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(origins)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::RANGE,
                header::IF_RANGE,
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static(crsync_peer::wire::SESSION_HEADER),
            ])
            // What a browser may read of a snapshot download.
            .expose_headers([
                header::ETAG,
                header::CONTENT_RANGE,
                HeaderName::from_static(snapshot::SHA256_HEADER),
                HeaderName::from_static(snapshot::SITE_HEADER),
                HeaderName::from_static(snapshot::VERSION_HEADER),
                HeaderName::from_static(snapshot::CHANGES_HEADER),
            ]),
    ))
}
