#![doc = include_str!("../README.md")]

mod admin;
mod auth;
mod config;
mod conn_log;
mod error;
mod host;
mod limits;
mod peer_router;
mod registry;
mod routes;
mod server;
mod session;
mod snapshot;
pub mod telemetry;
mod tls;
mod tokens;
mod ws;

pub use admin::{DatabaseView, ErrorView, PeerView, StatusReport, TableView, ago};
pub use auth::{Access, Auth, NoTokens, TokenError};
pub use config::{
    AdminConfig, ConfigError, CorsConfig, DEFAULT_BIND, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PING_INTERVAL, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_SNAPSHOT_THRESHOLD, DEFAULT_TOKEN_ENV,
    ServerConfig, TlsConfig, TokenConfig,
};
pub use error::ApiError;
pub use host::{INBOUND_QUEUE_CAP, OUTBOUND_QUEUE_CAP};
pub use limits::{
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_TOKEN, DEFAULT_OUTBOUND_QUEUE_BYTES,
    DEFAULT_RATE_PER_DATABASE, DEFAULT_RATE_PER_TOKEN, DEFAULT_SERVER_BATCH_BYTES,
    DEFAULT_SOCKET_SEND_BUFFER_BYTES, DEFAULT_STALL_TIMEOUT, LimitsConfig,
};
pub use peer_router::{PeerRouter, peer_router};
pub use registry::{MAX_NAME_LEN, valid_database_name};
pub use routes::CREATED_HEADER;
pub use server::{ServeError, Server};
pub use snapshot::SNAPSHOT_DIR;
pub use tokens::TokenHandle;

/// The Peer type served (re-exported for convenience).
pub use crsync_peer::Peer;
