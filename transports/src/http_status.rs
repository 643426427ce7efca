//! Mapping of refused HTTP requests (SSE stream, POSTs, WebSocket upgrades)
//! to [`TransportError`]s.

use std::time::Duration;

use crsync_peer::TransportError;
use crsync_peer::proto::{ErrorCode, SenderAction};

/// Longest body text quoted in an error.
const MAX_QUOTED_BODY: usize = 512;
/// How long to wait after a 429 that says nothing about it.
pub(crate) const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Longest wait a server's `Retry-After` can impose per attempt.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The parts of a JSON error body `{type: "error", error, code}`.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ErrorBody {
    /// Stable code, when the server sends one (crsync servers do).
    pub(crate) code: Option<String>,
    /// Human-readable text (the body itself when it is not JSON).
    pub(crate) message: String,
    /// Whether the body is a JSON object with `"type": "error"`.
    pub(crate) is_error_message: bool,
    /// `retry_after_ms`, when the server sends one (crsync servers do with 429).
    pub(crate) retry_after: Option<Duration>,
}

impl ErrorBody {
    pub(crate) fn parse(body: &str) -> Self {
        let json = serde_json::from_str::<serde_json::Value>(body).ok();
        let field = |name: &str| {
            json.as_ref()
                .and_then(|j| j.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        ErrorBody {
            code: field("code"),
            message: field("error").unwrap_or_else(|| quote(body)),
            is_error_message: field("type").as_deref() == Some("error"),
            retry_after: json
                .as_ref()
                .and_then(|j| j.get("retry_after_ms"))
                .and_then(serde_json::Value::as_u64)
                .map(Duration::from_millis),
        }
    }
}

/// How long a 429 asks us to wait: the body's `retry_after_ms`, else the
/// `Retry-After` header (seconds), else [`DEFAULT_RETRY_AFTER`]; at most
/// [`MAX_RETRY_AFTER`].
pub(crate) fn retry_after(body: &ErrorBody, header: Option<&str>) -> Duration {
    body.retry_after
        .or_else(|| {
            header
                .and_then(|h| h.trim().parse::<u64>().ok())
                .map(Duration::from_secs)
        })
        .unwrap_or(DEFAULT_RETRY_AFTER)
        .min(MAX_RETRY_AFTER)
}

fn quote(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(MAX_QUOTED_BODY) {
        Some((cut, _)) => format!("{}…", &body[..cut]),
        None => body.to_owned(),
    }
}

/// The error for a request to `target` refused with `status` and `body`:
/// 401 and 403 are typed remote refusals (code from the body, else
/// `UNAUTHORIZED` / `FORBIDDEN`), and so is any other 4xx but 413 and 429
/// whose code tells the sender to retry (`NOT_CONNECTED`); everything else
/// is [`TransportError::Http`], 413 with a message that says so; 429 is
/// [`TransportError::Busy`] with the wait the server asked for
/// (`retry_after_header`: the `Retry-After` header, if any).
pub(crate) fn refused(
    status: u16,
    target: &str,
    body: &str,
    retry_after_header: Option<&str>,
) -> TransportError {
    let parsed = ErrorBody::parse(body);
    let code = parsed.code.as_deref().map(ErrorCode::parse);
    if let Some(code) = code.filter(|c| {
        (400..500).contains(&status)
            && !matches!(status, 413 | 429)
            && c.sender_action() == SenderAction::Retry
    }) {
        return TransportError::Remote {
            code,
            message: parsed.message,
        };
    }
    match status {
        429 => TransportError::Busy {
            retry_after: retry_after(&parsed, retry_after_header),
            code: parsed
                .code
                .as_deref()
                .map_or(ErrorCode::RateLimited, ErrorCode::parse),
            message: parsed.message,
        },
        401 | 403 => TransportError::Remote {
            code: match parsed.code {
                Some(code) => ErrorCode::parse(&code),
                None if status == 401 => ErrorCode::Unauthorized,
                None => ErrorCode::Forbidden,
            },
            message: parsed.message,
        },
        413 => TransportError::Http {
            status,
            target: target.to_owned(),
            message: format!(
                "payload too large: the server refused the body ({})",
                parsed.message
            ),
        },
        _ => TransportError::Http {
            status,
            target: target.to_owned(),
            message: match parsed.code {
                Some(code) => format!("{code}: {}", parsed.message),
                None => parsed.message,
            },
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn typed_refusals() {
        let e = refused(401, "x", r#"{"type":"error","error":"no token"}"#, None);
        assert!(
            matches!(e, TransportError::Remote { ref code, ref message } if code == "UNAUTHORIZED" && message == "no token")
        );
        let e = refused(
            403,
            "x",
            r#"{"type":"error","error":"ro","code":"READ_ONLY"}"#,
            None,
        );
        assert!(matches!(e, TransportError::Remote { ref code, .. } if code == "READ_ONLY"));
        let e = refused(413, "x", "length limit exceeded", None);
        assert!(
            matches!(e, TransportError::Http { status: 413, ref message, .. } if message.contains("length limit exceeded"))
        );
        let e = refused(
            400,
            "x",
            r#"{"type":"error","error":"no stream","code":"NOT_CONNECTED"}"#,
            None,
        );
        assert!(
            matches!(e, TransportError::Remote { ref code, ref message } if *code == ErrorCode::NotConnected && message == "no stream")
        );
        let e = refused(
            404,
            "x",
            r#"{"type":"error","error":"nope","code":"UNKNOWN_DATABASE"}"#,
            None,
        );
        assert!(
            matches!(e, TransportError::Http { status: 404, ref message, .. } if message == "UNKNOWN_DATABASE: nope")
        );
    }

    #[test]
    fn busy_carries_the_wait_from_the_body_then_the_header() {
        let body =
            r#"{"type":"error","error":"slow down","code":"RATE_LIMITED","retry_after_ms":1500}"#;
        let e = refused(429, "x", body, Some("2"));
        assert!(
            matches!(e, TransportError::Busy { ref code, retry_after, .. } if code == "RATE_LIMITED" && retry_after == Duration::from_millis(1500))
        );
        let e = refused(429, "x", "busy", Some("3"));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        let e = refused(429, "x", r#"{"code":"TOO_MANY_CONNECTIONS"}"#, None);
        assert!(
            matches!(e, TransportError::Busy { ref code, retry_after, .. } if code == "TOO_MANY_CONNECTIONS" && retry_after == DEFAULT_RETRY_AFTER)
        );
        let e = refused(429, "x", "", Some("99999"));
        assert_eq!(e.retry_after(), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn long_bodies_are_shortened() {
        let body = "é".repeat(2000);
        let parsed = ErrorBody::parse(&body);
        assert_eq!(parsed.message.chars().count(), MAX_QUOTED_BODY + 1);
    }
}
