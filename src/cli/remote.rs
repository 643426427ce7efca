//! The server side of `crsync sync`: which transport to dial, and a dialer
//! wrapper that reports why connections fail, as typed [`Problem`]s.

use crsync::proto::ErrorCode;
use crsync::transports::tls::RootCertificates;
use crsync::transports::{CreationNotice, SseDialer, WebSocketDialer};
use crsync::wire::MessageKind;
use crsync::{Connection, Dialer, SiteId, TransportError};
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

/// Problems queued for the command before further ones are dropped.
pub(crate) const PROBLEM_QUEUE_CAP: usize = 16;

/// The server to sync with, over HTTP+SSE or WebSocket.
#[derive(Debug, Clone)]
pub(crate) enum Endpoint {
    /// `http://host:port/db/<name>`.
    Sse(SseDialer),
    /// `ws://host:port/db/<name>/ws`.
    Ws(WebSocketDialer),
}

impl Endpoint {
    /// The endpoint for `url`: WebSocket if `ws` is set or the URL is
    /// `ws://`/`wss://` (an `http(s)://{base}` URL becomes `ws(s)://{base}/ws`),
    /// HTTP+SSE otherwise.
    pub(crate) fn new(url: &str, ws: bool, token: Option<&str>) -> anyhow::Result<Endpoint> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            anyhow::anyhow!("invalid URL {url:?}: expected http://host:port/db/<name>")
        })?;
        if rest.is_empty() || rest.starts_with('/') {
            anyhow::bail!("invalid URL {url:?}: no host");
        }
        let scheme = scheme.to_ascii_lowercase();
        let token = token.filter(|t| !t.is_empty());
        match scheme.as_str() {
            "ws" | "wss" => Ok(Endpoint::Ws(ws_dialer(url.to_owned(), token))),
            "http" | "https" if ws => {
                let base = rest.trim_end_matches('/');
                let ws_scheme = if scheme == "https" { "wss" } else { "ws" };
                Ok(Endpoint::Ws(ws_dialer(
                    format!("{ws_scheme}://{base}/ws"),
                    token,
                )))
            }
            "http" | "https" => {
                let dialer = SseDialer::new(url);
                Ok(Endpoint::Sse(match token {
                    Some(t) => dialer.with_token(t),
                    None => dialer,
                }))
            }
            other => anyhow::bail!(
                "unsupported URL scheme {other:?} in {url:?}: use http(s):// (or ws(s):// for WebSocket)"
            ),
        }
    }

    /// The URL dialed (the SSE base, or the WebSocket URL).
    pub(crate) fn url(&self) -> &str {
        match self {
            Endpoint::Sse(d) => d.base(),
            Endpoint::Ws(d) => d.url(),
        }
    }

    /// The database's name: the URL's last path segment (before `/ws`).
    pub(crate) fn database_name(&self) -> &str {
        let url = self.url().trim_end_matches('/');
        let url = match self {
            Endpoint::Ws(_) => url.strip_suffix("/ws").unwrap_or(url),
            Endpoint::Sse(_) => url,
        };
        url.rsplit('/').next().unwrap_or(url)
    }

    /// The transport's name.
    pub(crate) fn transport(&self) -> &'static str {
        match self {
            Endpoint::Sse(_) => "HTTP+SSE",
            Endpoint::Ws(_) => "WebSocket",
        }
    }

    /// Trusts these root certificates too (`--ca-cert`).
    pub(crate) fn with_roots(self, roots: Option<&RootCertificates>) -> Endpoint {
        let Some(roots) = roots else { return self };
        match self {
            Endpoint::Sse(d) => Endpoint::Sse(d.with_root_certificates(roots.clone())),
            Endpoint::Ws(d) => Endpoint::Ws(d.with_root_certificates(roots.clone())),
        }
    }

    /// Raised when a dial created the database on the server.
    pub(crate) fn creation_notice(&self) -> CreationNotice {
        match self {
            Endpoint::Sse(d) => d.creation_notice(),
            Endpoint::Ws(d) => d.creation_notice(),
        }
    }

    /// A fresh dialer for this endpoint.
    pub(crate) fn dialer(&self) -> Box<dyn Dialer> {
        match self {
            Endpoint::Sse(d) => Box::new(d.clone()),
            Endpoint::Ws(d) => Box::new(d.clone()),
        }
    }
}

/// The certificates of `--ca-cert FILE` (PEM), if given.
pub(crate) fn root_certificates(
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<RootCertificates>> {
    let Some(file) = file else { return Ok(None) };
    let pem = std::fs::read(file)
        .map_err(|e| anyhow::anyhow!("cannot read --ca-cert {}: {e}", file.display()))?;
    let roots = RootCertificates::from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("--ca-cert {}: {e}", file.display()))?;
    Ok(Some(roots))
}

fn ws_dialer(url: String, token: Option<&str>) -> WebSocketDialer {
    let dialer = WebSocketDialer::new(url);
    match token {
        Some(t) => dialer.with_token(t),
        None => dialer,
    }
}

/// Why talking to the server failed, sorted by what the command should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// The server refused us (401, 403, unknown database or route): retrying
    /// will not help.
    Refused {
        /// The stable code (`UNAUTHORIZED`, `FORBIDDEN`, `HTTP 404`, ...).
        code: String,
        /// What to tell the user.
        message: String,
    },
    /// The server could not be reached or the connection failed: it may work later.
    Unreachable {
        /// What to tell the user.
        message: String,
    },
    /// The server refused a batch as too large (HTTP 413): the Peer retries
    /// with growing backoff; it goes through once the server's limit is raised.
    TooLarge {
        /// What to tell the user, with the setting to raise.
        message: String,
    },
}

impl Problem {
    /// Sorts a transport error; `url` names the server in messages.
    pub(crate) fn from_error(e: &TransportError, url: &str) -> Problem {
        match e {
            TransportError::Remote { code, message } => {
                let hint = match code {
                    ErrorCode::Unauthorized => {
                        "; pass the server's token with --token or the CRSYNC_TOKEN environment variable"
                    }
                    ErrorCode::Forbidden => "; the token does not allow this on this database",
                    ErrorCode::AlreadyConnected => {
                        "; another process (a `crsync sync --watch`, an app) is syncing this database file with the server"
                    }
                    _ => "",
                };
                let refused = matches!(
                    code,
                    ErrorCode::Unauthorized | ErrorCode::Forbidden | ErrorCode::UnknownDatabase
                );
                let message = format!("the server at {url} refused: {code}: {message}{hint}");
                if refused {
                    Problem::Refused {
                        code: code.to_string(),
                        message,
                    }
                } else {
                    Problem::Unreachable { message }
                }
            }
            TransportError::Http {
                status: 413,
                message,
                ..
            } => Problem::TooLarge {
                message: format!(
                    "the server at {url} refused a batch as too large ({message}); \
                     raise max_body_bytes in the server's config (crsync serve --config FILE, \
                     default 16 MiB) to at least {batch} MiB: crsync sends batches, and large \
                     transactions in parts, of up to {batch} MiB; retrying with backoff",
                    batch = crsync::advanced::DEFAULT_MAX_BATCH_BYTES >> 20
                ),
            },
            TransportError::Http {
                status, message, ..
            } if (400..500).contains(status) && !matches!(status, 408 | 429) => {
                let hint = if *status == 404 {
                    " (check the URL, http://host:port/db/<name>, and whether the server may create databases: --allow-create)"
                } else {
                    ""
                };
                Problem::Refused {
                    code: format!("HTTP {status}"),
                    message: format!("the server at {url} answered HTTP {status}: {message}{hint}"),
                }
            }
            TransportError::Http {
                status, message, ..
            } => Problem::Unreachable {
                message: format!("the server at {url} answered HTTP {status}: {message}"),
            },
            TransportError::Connect { source, .. } => Problem::Unreachable {
                message: format!("cannot reach the server at {url}: {source}"),
            },
            TransportError::Timeout(d) => Problem::Unreachable {
                message: format!("no answer from the server at {url} within {d:?}"),
            },
            other => Problem::Unreachable {
                message: format!("connection to {url} failed: {other}"),
            },
        }
    }

    /// Whether retrying cannot help.
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(self, Problem::Refused { .. })
    }

    /// The message for the user.
    pub(crate) fn message(&self) -> &str {
        match self {
            Problem::Refused { message, .. }
            | Problem::Unreachable { message }
            | Problem::TooLarge { message } => message,
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// Wraps a dialer and reports every failure, typed, on a bounded channel:
/// failed dials, failed sends (an HTTP 403 on `POST data` with a read-only
/// token), and refusals the server sends in-band (WebSocket `error` messages).
pub(crate) struct WatchedDialer {
    inner: Box<dyn Dialer>,
    url: String,
    problems: mpsc::Sender<Problem>,
}

impl WatchedDialer {
    /// Wraps `endpoint`'s dialer; problems go to `problems` (dropped when it is full).
    pub(crate) fn new(endpoint: &Endpoint, problems: mpsc::Sender<Problem>) -> Self {
        WatchedDialer {
            inner: endpoint.dialer(),
            url: endpoint.url().to_owned(),
            problems,
        }
    }
}

impl Dialer for WatchedDialer {
    fn dial(&mut self, local: SiteId) -> BoxFuture<'_, Result<Connection, TransportError>> {
        async move {
            match self.inner.dial(local).await {
                Ok(connection) => Ok(watch(connection, &self.url, &self.problems)),
                Err(e) => {
                    let _ = self.problems.try_send(Problem::from_error(&e, &self.url));
                    Err(e)
                }
            }
        }
        .boxed()
    }

    fn label(&self) -> String {
        self.inner.label()
    }

    fn set_token(&mut self, token: &str) {
        self.inner.set_token(token);
    }
}

fn watch(connection: Connection, url: &str, problems: &mpsc::Sender<Problem>) -> Connection {
    let Connection {
        sink,
        stream,
        label,
    } = connection;
    let (send_url, send_problems) = (url.to_owned(), problems.clone());
    let sink = sink.sink_map_err(move |e| {
        let _ = send_problems.try_send(Problem::from_error(&e, &send_url));
        e
    });
    let (recv_url, recv_problems) = (url.to_owned(), problems.clone());
    let stream = stream.inspect(move |item| {
        if let Ok(received) = item {
            let m = &received.message;
            let code = m.code.as_deref().map(ErrorCode::parse);
            let refused = m.kind == MessageKind::Error
                && matches!(
                    code,
                    Some(
                        ErrorCode::Unauthorized | ErrorCode::Forbidden | ErrorCode::UnknownDatabase
                    )
                );
            if let (true, Some(code)) = (refused, code) {
                let e = TransportError::Remote {
                    code,
                    message: m.error.clone().unwrap_or_default(),
                };
                let _ = recv_problems.try_send(Problem::from_error(&e, &recv_url));
            }
        }
    });
    Connection {
        sink: Box::pin(sink),
        stream: Box::pin(stream),
        label,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_transport() {
        let e = Endpoint::new("http://127.0.0.1:8080/db/notes", false, None).unwrap();
        assert!(matches!(e, Endpoint::Sse(_)));
        assert_eq!(e.url(), "http://127.0.0.1:8080/db/notes");
        let e = Endpoint::new("http://127.0.0.1:8080/db/notes/", true, Some("t")).unwrap();
        assert_eq!(e.url(), "ws://127.0.0.1:8080/db/notes/ws");
        let e = Endpoint::new("https://h/db/x", true, None).unwrap();
        assert_eq!(e.url(), "wss://h/db/x/ws");
        let e = Endpoint::new("ws://h/custom/socket", false, None).unwrap();
        assert!(matches!(e, Endpoint::Ws(_)));
        assert_eq!(e.url(), "ws://h/custom/socket");
        assert!(Endpoint::new("127.0.0.1:8080/db/x", false, None).is_err());
        assert!(Endpoint::new("ftp://h/db/x", false, None).is_err());
        assert!(Endpoint::new("http:///db/x", false, None).is_err());
    }

    #[test]
    fn refusals_are_told_from_network_failures() {
        let unauthorized = TransportError::Remote {
            code: ErrorCode::Unauthorized,
            message: "unknown token".into(),
        };
        let p = Problem::from_error(&unauthorized, "http://h/db/x");
        assert!(p.is_refusal());
        assert!(p.message().contains("--token"), "{p}");
        let not_found = TransportError::Http {
            status: 404,
            target: "t".into(),
            message: "UNKNOWN_DATABASE: no such database".into(),
        };
        assert!(Problem::from_error(&not_found, "u").is_refusal());
        let busy = TransportError::Http {
            status: 503,
            target: "t".into(),
            message: "SHUTTING_DOWN".into(),
        };
        assert!(!Problem::from_error(&busy, "u").is_refusal());
        assert!(!Problem::from_error(&TransportError::Closed, "u").is_refusal());
        // A POST that reached a restarted server before our stream, or a
        // stale session secret: transient.
        for code in [ErrorCode::NotConnected, ErrorCode::SessionMismatch] {
            let gone = TransportError::Remote {
                code,
                message: "no stream".into(),
            };
            assert!(!Problem::from_error(&gone, "u").is_refusal());
        }
        // Too large: retried, with the setting to raise.
        let too_large = TransportError::Http {
            status: 413,
            target: "t".into(),
            message: "payload too large: body exceeds 1024 bytes".into(),
        };
        let p = Problem::from_error(&too_large, "u");
        assert!(!p.is_refusal());
        assert!(p.message().contains("max_body_bytes"), "{p}");
    }
}
