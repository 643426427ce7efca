//! JSON errors: every refusal is `{"type":"error","error":"...","code":"..."}`
//! with a stable code ([`ErrorCode`]).

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use crsync_peer::Rejection;
use crsync_peer::proto::ErrorCode;

/// An HTTP error answer: status, stable code and a human-readable message.
///
/// ```
/// use crsync_node_server::ApiError;
/// let e = ApiError::not_connected("abc");
/// assert_eq!(e.status().as_u16(), 400);
/// assert_eq!(e.code(), "NOT_CONNECTED");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to retry after `wait`
    /// (`Retry-After` header in whole seconds, rounded up; `retry_after_ms`
    /// in the body).
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// 429 `RATE_LIMITED`: `who` (a token, a database) is over its rate.
    pub fn rate_limited(who: &str, wait: Duration) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            format!(
                "{who} is over its request rate; retry after {} ms",
                wait.as_millis().max(1)
            ),
        )
        .with_retry_after(wait)
    }

    /// 429 `TOO_MANY_CONNECTIONS`.
    pub fn too_many_connections(message: impl Into<String>, wait: Duration) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyConnections,
            message,
        )
        .with_retry_after(wait)
    }

    /// 400 `MALFORMED`.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::Malformed, message)
    }

    /// 401 `UNAUTHORIZED`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }

    /// 403 `FORBIDDEN`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
    }

    /// 404 `UNKNOWN_DATABASE`.
    pub fn unknown_database(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownDatabase,
            format!(
                "no database named {name:?} on this server, and this token may not create \
                 databases: check the name in the URL, or give the token create = true in \
                 the server's [[tokens]] config"
            ),
        )
    }

    /// 404 `UNKNOWN_DATABASE` for a token that may create the database, on a
    /// route that does not create (a `POST`, a snapshot).
    pub(crate) fn unknown_database_yet(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownDatabase,
            format!(
                "no database named {name:?} yet: a stream or WebSocket opened with this \
                 token creates it"
            ),
        )
    }

    /// 400 `NOT_CONNECTED`: no stream is open for this peer.
    pub fn not_connected(peer: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NotConnected,
            format!("no stream is open for peer {peer}; open GET stream?peerId=... first"),
        )
    }

    /// 413 `PAYLOAD_TOO_LARGE`.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!("body exceeds {limit} bytes"),
        )
    }

    /// 500 `INTERNAL`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            message,
        )
    }

    /// 503 `SHUTTING_DOWN`.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the server is shutting down",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> &ErrorCode {
        &self.code
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// How long the client should wait before retrying, if said.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The JSON body (with `retry_after_ms` when a retry delay is set).
    pub fn body(&self) -> serde_json::Value {
        let mut body =
            serde_json::json!({"type": "error", "error": self.message, "code": self.code});
        if let Some(wait) = self.retry_after {
            body["retry_after_ms"] = serde_json::json!(millis_up(wait));
        }
        body
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        let status =
            StatusCode::from_u16(r.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, r.code, r.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(wait) = self.retry_after {
            let secs = millis_up(wait).div_ceil(1000).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Whole milliseconds, rounded up (at least 1).
fn millis_up(wait: Duration) -> u64 {
    u64::try_from(wait.as_micros().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}
