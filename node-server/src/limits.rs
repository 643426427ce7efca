//! Resource limits: connection caps, rate limits, bounded outbound queues and
//! stalled-stream detection ([`LimitsConfig`], the `[limits]` table).

mod connections;
mod listener;
mod outbound;
mod rate;

use std::time::Duration;

use serde::Deserialize;

pub(crate) use connections::{ConnectionPermit, Connections};
pub(crate) use listener::{ConnKill, IoProgress, KillableListener};
pub(crate) use outbound::{OutboundRx, outbound};
pub(crate) use rate::RateLimiter;

use crate::auth::Principal;
use crate::error::ApiError;

/// Default cap on open streams and WebSockets, whole server.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default cap on open streams and WebSockets per token.
pub const DEFAULT_MAX_CONNECTIONS_PER_TOKEN: usize = 256;
/// Default time a connection may go without draining its outbound queue.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Default bytes of encoded messages queued toward one client.
pub const DEFAULT_OUTBOUND_QUEUE_BYTES: usize = 64 << 10;
/// Default soft limit on the estimated wire size of a batch the server sends.
pub const DEFAULT_SERVER_BATCH_BYTES: usize = 32 << 10;
/// Default kernel send buffer of each accepted socket.
pub const DEFAULT_SOCKET_SEND_BUFFER_BYTES: usize = 256 << 10;
/// Default requests per second per token (and burst).
pub const DEFAULT_RATE_PER_TOKEN: (u32, u32) = (1000, 2000);
/// Default requests per second per database (and burst).
pub const DEFAULT_RATE_PER_DATABASE: (u32, u32) = (5000, 10000);
/// What a refused connection is told to wait before trying again.
const CONNECTION_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The `[limits]` table of the server config. Every key is optional.
///
/// ```
/// use crsync_node_server::ServerConfig;
/// let config = ServerConfig::from_toml_str(r#"
///     [limits]
///     max_connections_per_token = 8
///     stall_timeout_secs = 5
///     rate_per_token = 0          # off
/// "#).expect("must succeed");
/// assert_eq!(config.limits.max_connections_per_token, 8);
/// assert_eq!(config.limits.rate_per_token, 0);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitsConfig {
    /// Open SSE streams plus WebSockets, whole server (default 1024).
    pub max_connections: usize,
    /// Open SSE streams plus WebSockets per token, over all databases
    /// (default 256). Anonymous clients together count as one token.
    pub max_connections_per_token: usize,
    /// A connection whose outbound queue holds data and has not been drained
    /// for this long is dropped (`stall_timeout_secs`, default 60).
    #[serde(
        rename = "stall_timeout_secs",
        deserialize_with = "crate::config::secs"
    )]
    pub stall_timeout: Duration,
    /// Bytes of encoded messages queued toward one client (default 64 KiB).
    pub outbound_queue_bytes: usize,
    /// Kernel send buffer (`SO_SNDBUF`) of each accepted socket (default
    /// 256 KiB; 0: the kernel's autotuning, up to a few MiB per socket, which
    /// hides a client that stopped reading until that much is queued). Served
    /// through [`Server`](crate::Server) only.
    pub socket_send_buffer_bytes: usize,
    /// Soft limit on the estimated wire size of one batch the server sends
    /// (default 32 KiB; a larger origin transaction goes in parts of about
    /// that size). Every message waiting for a client that does not read
    /// costs about this much a few times over; every message costs the
    /// server and the client the same work whatever it carries, so smaller
    /// batches make a burst to many clients slower (16 KiB: about twice the
    /// server CPU of 32 KiB in the fan-out benchmark's burst).
    pub batch_bytes: usize,
    /// Requests per second per token (`0`: no limit; default 1000). A request
    /// is an HTTP request or one WebSocket message.
    pub rate_per_token: u32,
    /// Burst per token (default 2000).
    pub burst_per_token: u32,
    /// Requests per second per database (`0`: no limit; default 5000).
    pub rate_per_database: u32,
    /// Burst per database (default 10000).
    pub burst_per_database: u32,
    /// Sites in one cursor or one batch's ranges at most (default 16,384);
    /// a larger claim is refused with `LIMIT_EXCEEDED` (HTTP 413).
    pub max_claim_sites: usize,
    /// Each database's change streams reading its file at once (default 8):
    /// a thread and a read connection each; more wait for one. Clients that
    /// are caught up never read the file (see `live_tail`).
    pub max_readers: usize,
    /// Caught-up clients get new commits from each database's shared live
    /// tail, read and encoded once for all of them (default `true`; `false`:
    /// every client's stream reads the file, to compare or to save the
    /// tail's memory, about 32 MiB at most per database).
    pub live_tail: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_token: DEFAULT_MAX_CONNECTIONS_PER_TOKEN,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            outbound_queue_bytes: DEFAULT_OUTBOUND_QUEUE_BYTES,
            batch_bytes: DEFAULT_SERVER_BATCH_BYTES,
            socket_send_buffer_bytes: DEFAULT_SOCKET_SEND_BUFFER_BYTES,
            rate_per_token: DEFAULT_RATE_PER_TOKEN.0,
            burst_per_token: DEFAULT_RATE_PER_TOKEN.1,
            rate_per_database: DEFAULT_RATE_PER_DATABASE.0,
            burst_per_database: DEFAULT_RATE_PER_DATABASE.1,
            max_claim_sites: crsync_peer::proto::DEFAULT_MAX_CLAIM_SITES,
            max_readers: crsync_peer::READER_POOL_CAP,
            live_tail: true,
        }
    }
}

/// The limits of one server (or one [`PeerRouter`](crate::PeerRouter)).
pub(crate) struct Limits {
    config: LimitsConfig,
    connections: Connections,
    per_token: Option<RateLimiter<Principal>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Limits {
    pub(crate) fn new(config: LimitsConfig) -> Self {
        Limits {
            connections: Connections::new(config.max_connections, config.max_connections_per_token),
            per_token: RateLimiter::keyed(config.rate_per_token, config.burst_per_token),
            config,
        }
    }

    pub(crate) fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// A new limiter for one database (`None` when that limit is off).
    pub(crate) fn database_limiter(&self) -> Option<RateLimiter<()>> {
        RateLimiter::direct(
            self.config.rate_per_database,
            self.config.burst_per_database,
        )
    }

    /// Counts one request of `key`: `429 RATE_LIMITED` when over its rate.
    pub(crate) fn check_rate(&self, key: Principal) -> Result<(), ApiError> {
        match &self.per_token {
            Some(limiter) => limiter
                .check(&key)
                .map_err(|wait| ApiError::rate_limited("this token", wait)),
            None => Ok(()),
        }
    }

    /// Waits until `key` may send one more request (WebSocket messages:
    /// back-pressure instead of a refusal).
    pub(crate) async fn wait_rate(&self, key: Principal) {
        if let Some(limiter) = &self.per_token {
            limiter.wait(&key).await;
        }
    }

    /// A connection slot for `key`: `429 TOO_MANY_CONNECTIONS` when the
    /// token's or the server's cap is reached.
    pub(crate) fn connect(&self, key: Principal) -> Result<ConnectionPermit, ApiError> {
        self.connections.acquire(key).map_err(|full| {
            tracing::info!(?key, %full, "connection refused");
            ApiError::too_many_connections(full.to_string(), CONNECTION_RETRY_AFTER)
        })
    }
}
