//! HTTP + Server-Sent Events client transport, wire protocol v1.
//!
//! For a server base URL `{base}` (which may carry a path prefix, such as
//! `http://127.0.0.1:8080/db/notes`):
//! - **incoming**: `GET {base}/stream?peerId=<our site id hex>&crsync=lossless`,
//!   read with `reqwest` and `eventsource-stream`; every SSE event's `data` is one
//!   [`TransportMessage`] (one that does not decode yields
//!   `Err(TransportError::Decode)` and the stream goes on). The
//!   `crsync=lossless` parameter tells a crsync server that we read the
//!   lossless value encoding, since our `connect` message is never POSTed.
//!   A crsync server answers with a session secret in its `connect`
//!   (`crsync.session`); every POST of the connection presents it in the
//!   [`SESSION_HEADER`] header, so no other client can act in our session.
//!   The next dial presents it on the `GET` too: if the server still holds
//!   our previous stream (half-open), the new one replaces it instead of
//!   being refused with `ALREADY_CONNECTED`.
//! - **outgoing**: `sync` is POSTed to `{base}/sync` and `data` to
//!   `{base}/data` as JSON; `connect` and `ping` are not sent (v1 has no
//!   endpoint for them; the stream itself tells the server we are there), nor
//!   is `error`.
//!
//! POSTs go strictly one at a time, in order, and a send completes only when
//! the server answered, so a completed send means the server processed the
//! message:
//! - 2xx: delivered;
//! - 4xx with a JSON body `{type: "error", error, code}` whose code is `GAP`,
//!   `INVALID_CHANGE`, `SCHEMA_OUTDATED` or `MALFORMED`: logged at warn level
//!   and treated as delivered (the protocol recovers through `sync`);
//! - 401 / 403: [`TransportError::Remote`] with the body's code (default
//!   `UNAUTHORIZED` / `FORBIDDEN`; `SESSION_MISMATCH` when the server no
//!   longer knows our session secret);
//! - another 4xx whose code says retry (`NOT_CONNECTED`: a POST that reached
//!   a restarted server before our stream did): [`TransportError::Remote`]
//!   with that code;
//! - 413: [`TransportError::Http`] with status 413 (the batch must be split);
//! - 429 (`RATE_LIMITED`): waited out (the body's `retry_after_ms`, else the
//!   `Retry-After` header, at most 5 minutes per wait) and the same message
//!   sent again, as often as needed;
//! - any other status, a timeout or a network error: an error.
//!
//! After an error the sink refuses every further message
//! ([`TransportError::Closed`]): the Peer drops the connection and redials.
//!
//! ```no_run
//! # async fn demo() -> Result<(), crsync_peer::TransportError> {
//! use crsync_peer::{Dialer, SiteId};
//! use crsync_transports::sse::SseDialer;
//!
//! let mut dialer = SseDialer::new("http://127.0.0.1:8080/db/notes").with_token("s3cret");
//! // Returns once the server's first message (its `connect`) arrived.
//! let connection = dialer.dial(SiteId::from_bytes([1; 16])).await?;
//! assert_eq!(connection.label, "sse http://127.0.0.1:8080/db/notes");
//! # Ok(()) }
//! ```

use std::time::Duration;

use crsync_peer::proto::{ErrorCode, SenderAction};
use crsync_peer::wire::{LOSSLESS, MessageKind, SESSION_HEADER, TransportMessage};
use crsync_peer::{Connection, Dialer, MessageStream, Received, SiteId, TransportError};
use eventsource_stream::{Event, EventStreamError, Eventsource as _};
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::{StreamExt, stream};

use crate::http_status::{self, ErrorBody};
use crate::serial_sink::{SendResult, SerialSend, SerialSink};

pub use crate::DEFAULT_DIAL_TIMEOUT;

/// Default limit on one POST, from sending to the complete response.
pub const DEFAULT_POST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a refused stream's error body may take to arrive.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);

type EventStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>,
>;

/// Dials a v1 HTTP+SSE server; see the [module docs](self).
///
/// `dial` returns once the stream is open and its first message arrived, so
/// refusals surface there: 401/403 as [`TransportError::Remote`], other
/// statuses (404, 400...) as [`TransportError::Http`], 429 (`TOO_MANY_CONNECTIONS`,
/// `RATE_LIMITED`) as [`TransportError::Busy`] with the server's Retry-After (the
/// Peer waits at least that long before it redials), a first message of type
/// `error` (such as `ALREADY_CONNECTED`) as [`TransportError::Remote`] with its
/// code, an unreachable server as [`TransportError::Connect`], and no first
/// message within the dial timeout as [`TransportError::Timeout`].
#[derive(Clone)]
pub struct SseDialer {
    base: String,
    token: Option<String>,
    dial_timeout: Duration,
    post_timeout: Duration,
    http: Option<reqwest::Client>,
    /// The session secret of the last stream (presented on the next dial).
    session: Option<String>,
    created: crate::CreationNotice,
    #[cfg(feature = "tls")]
    roots: Option<crate::tls::RootCertificates>,
}

impl std::fmt::Debug for SseDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseDialer")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("dial_timeout", &self.dial_timeout)
            .field("post_timeout", &self.post_timeout)
            .field("session", &self.session.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl SseDialer {
    /// A dialer for the server at `base` (a trailing `/` is ignored).
    pub fn new(base: impl Into<String>) -> Self {
        let mut base = base.into();
        while base.ends_with('/') {
            base.pop();
        }
        SseDialer {
            base,
            token: None,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            post_timeout: DEFAULT_POST_TIMEOUT,
            http: None,
            session: None,
            created: crate::CreationNotice::default(),
            #[cfg(feature = "tls")]
            roots: None,
        }
    }

    /// Trusts these root certificates for `https://` (the stream and the
    /// POSTs), besides the usual roots. Not applied to a client given with
    /// [`with_http_client`](Self::with_http_client).
    #[cfg(feature = "tls")]
    pub fn with_root_certificates(mut self, roots: crate::tls::RootCertificates) -> Self {
        self.roots = Some(roots);
        self
    }

    /// Raised when a dial created the database on the server.
    pub fn creation_notice(&self) -> crate::CreationNotice {
        self.created.clone()
    }

    /// Sends `Authorization: Bearer <token>` on the stream and on every POST.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Limit on opening the stream and receiving its first message
    /// (default [`DEFAULT_DIAL_TIMEOUT`]).
    pub fn with_dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// Limit on one POST (default [`DEFAULT_POST_TIMEOUT`]); it does not
    /// apply to a client given with [`with_http_client`](Self::with_http_client).
    pub fn with_post_timeout(mut self, timeout: Duration) -> Self {
        self.post_timeout = timeout;
        self
    }

    /// Uses this client for the POSTs (shares its connection pool).
    pub fn with_http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn http_client(&mut self) -> Result<reqwest::Client, TransportError> {
        if let Some(client) = &self.http {
            return Ok(client.clone());
        }
        let builder = reqwest::Client::builder().timeout(self.post_timeout);
        #[cfg(feature = "tls")]
        let builder = crate::tls::RootCertificates::trusted(builder, self.roots.as_ref());
        let client = builder.build().map_err(|e| TransportError::Connect {
            target: self.base.clone(),
            source: Box::new(e),
        })?;
        self.http = Some(client.clone());
        Ok(client)
    }

    /// The client of the stream: no overall timeout (a stream lasts), no
    /// redirects; the dial timeout bounds connecting and the first message.
    fn stream_client(&self) -> Result<reqwest::Client, TransportError> {
        let builder = reqwest::Client::builder()
            .connect_timeout(self.dial_timeout)
            .redirect(reqwest::redirect::Policy::none());
        #[cfg(feature = "tls")]
        let builder = crate::tls::RootCertificates::trusted(builder, self.roots.as_ref());
        builder.build().map_err(|e| TransportError::Connect {
            target: self.stream_target(),
            source: Box::new(e),
        })
    }

    /// Opens `GET {base}/stream`; a refusal (any status but 2xx) is mapped
    /// from its status and body.
    async fn open_events(&self, local: SiteId) -> Result<EventStream, TransportError> {
        let url = format!(
            "{}/stream?peerId={}&crsync={LOSSLESS}",
            self.base,
            local.to_hex()
        );
        let target = self.stream_target();
        let mut request = self
            .stream_client()?
            .get(&url)
            .header("Accept", "text/event-stream");
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        if let Some(session) = &self.session {
            request = request.header(SESSION_HEADER, session);
        }
        let response = request.send().await.map_err(|e| TransportError::Connect {
            target: target.clone(),
            source: Box::new(e),
        })?;
        let status = response.status();
        if status.is_success() {
            self.created.raise_if(
                response
                    .headers()
                    .get(crate::CREATED_HEADER)
                    .and_then(|v| v.to_str().ok()),
            );
        } else {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = match tokio::time::timeout(ERROR_BODY_TIMEOUT, response.text()).await {
                Ok(Ok(text)) => text,
                _ => String::new(),
            };
            return Err(http_status::refused(
                status.as_u16(),
                &target,
                &body,
                retry_after.as_deref(),
            ));
        }
        Ok(Box::pin(response.bytes_stream().eventsource()))
    }

    fn stream_target(&self) -> String {
        format!("{}/stream", self.base)
    }

    async fn connect(&mut self, local: SiteId) -> Result<Connection, TransportError> {
        let http = self.http_client()?;
        let target = self.stream_target();
        let opened = async {
            let mut events = self.open_events(local).await?;
            let first = first_message(&mut events, &target).await?;
            Ok::<_, TransportError>((events, first))
        };
        let (events, first) = tokio::time::timeout(self.dial_timeout, opened)
            .await
            .map_err(|_| TransportError::Timeout(self.dial_timeout))??;
        if first.kind == MessageKind::Error {
            let message = first.error.unwrap_or_default();
            return Err(TransportError::Remote {
                code: code_of(first.code.as_deref(), &message),
                message,
            });
        }
        tracing::debug!(base = %self.base, first = ?first.kind, "sse stream open");
        // A v1 server hands out no secret: POSTs then go without one.
        self.session = first.crsync.as_ref().and_then(|h| h.session.clone());
        let messages: MessageStream =
            Box::pin(stream::once(async { Ok(Received::new(first)) }).chain(messages(events)));
        let poster = Poster {
            http,
            base: self.base.clone(),
            token: self.token.clone(),
            session: self.session.clone(),
        };
        Ok(Connection {
            sink: Box::pin(SerialSink::new(poster)),
            stream: messages,
            label: self.label(),
        })
    }
}

impl Dialer for SseDialer {
    fn dial(&mut self, local: SiteId) -> BoxFuture<'_, Result<Connection, TransportError>> {
        self.connect(local).boxed()
    }

    fn label(&self) -> String {
        format!("sse {}", self.base)
    }

    fn set_token(&mut self, token: &str) {
        self.token = Some(token.to_owned());
    }
}

/// The code of an error: its `code` field, else inferred from a v1 text.
fn code_of(code: Option<&str>, message: &str) -> ErrorCode {
    code.map_or_else(|| ErrorCode::from_v1_text(message), ErrorCode::parse)
}

/// Waits for the stream's first event and decodes it.
async fn first_message(
    events: &mut EventStream,
    target: &str,
) -> Result<TransportMessage, TransportError> {
    while let Some(item) = events.next().await {
        match item {
            Ok(event) if event.data.is_empty() => continue,
            Ok(event) => {
                return TransportMessage::from_json(&event.data).map_err(|e| {
                    // An error frame without the fields of a TransportMessage.
                    let body = ErrorBody::parse(&event.data);
                    if body.is_error_message {
                        TransportError::Remote {
                            code: code_of(body.code.as_deref(), &body.message),
                            message: body.message,
                        }
                    } else {
                        TransportError::Decode(e)
                    }
                });
            }
            Err(e) => {
                return Err(TransportError::Connect {
                    target: target.to_owned(),
                    source: e.to_string().into(),
                });
            }
        }
    }
    Err(TransportError::Connect {
        target: target.to_owned(),
        source: "the stream ended before its first message".into(),
    })
}

/// Events after the first, as messages. Ends on the stream's end; any other
/// failure yields one error and ends (the client does not reconnect by
/// itself: the Peer redials).
fn messages(events: EventStream) -> impl futures_util::Stream<Item = SendItem> + Send {
    stream::unfold((events, false), |(mut events, done)| async move {
        if done {
            return None;
        }
        loop {
            match events.next().await? {
                Ok(event) if event.data.is_empty() => continue,
                Ok(event) => {
                    let item = TransportMessage::from_json(&event.data)
                        .map(Received::new)
                        .map_err(TransportError::from);
                    return Some((item, (events, false)));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "sse stream failed");
                    let item = Err(TransportError::Io(e.to_string().into()));
                    return Some((item, (events, true)));
                }
            }
        }
    })
}

type SendItem = Result<Received, TransportError>;

/// The POSTing half.
struct Poster {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    /// The stream's session secret, presented on every POST.
    session: Option<String>,
}

impl Poster {
    async fn post(&self, message: TransportMessage) -> SendResult {
        let path = match message.kind {
            MessageKind::Sync => "sync",
            MessageKind::Data => "data",
            MessageKind::Connect | MessageKind::Ping => return Ok(()),
            MessageKind::Error => {
                tracing::debug!(?message, "v1 has no endpoint for error messages; not sent");
                return Ok(());
            }
        };
        let url = format!("{}/{path}", self.base);
        let json = message.to_json();
        drop(message);
        // A 429 (rate limit) is waited out and the same message sent again:
        // nothing is lost, nothing overtakes it, the session goes on.
        let (status, body) = loop {
            let mut request = self
                .http
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json.clone());
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            if let Some(session) = &self.session {
                request = request.header(SESSION_HEADER, session);
            }
            let response = request
                .send()
                .await
                .map_err(|e| TransportError::Io(Box::new(e)))?;
            let status = response.status();
            let retry_header = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // Read the body in every case, so the connection can be reused.
            let body = response.text().await;
            if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                let refusal = ErrorBody::parse(body.as_deref().unwrap_or_default());
                let wait = http_status::retry_after(&refusal, retry_header.as_deref());
                tracing::info!(%url, ?wait, error = %refusal.message, "server busy (429): sending again after its Retry-After");
                tokio::time::sleep(wait).await;
                continue;
            }
            break (status, body);
        };
        if status.is_success() {
            return Ok(());
        }
        let body = body.unwrap_or_default();
        let status = status.as_u16();
        if (400..500).contains(&status) && !matches!(status, 401 | 403 | 413) {
            let refusal = ErrorBody::parse(&body);
            // Refusals the sync protocol recovers from by itself (a gap is
            // resent, a pause waits for the next request): the POST counts as delivered.
            if let Some(code) = refusal
                .code
                .as_deref()
                .map(ErrorCode::parse)
                .filter(|code| {
                    matches!(
                        code.sender_action(),
                        SenderAction::Resend | SenderAction::Pause | SenderAction::Ignore
                    )
                })
            {
                tracing::warn!(
                    %url, status, %code, error = %refusal.message,
                    "server refused a message; sync recovers it"
                );
                return Ok(());
            }
        }
        Err(http_status::refused(status, &url, &body, None))
    }
}

impl SerialSend for Poster {
    fn send(self, message: TransportMessage) -> BoxFuture<'static, (Self, SendResult)> {
        async move {
            let result = self.post(message).await;
            (self, result)
        }
        .boxed()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_inferred_only_from_code_like_text() {
        assert_eq!(
            code_of(None, "ALREADY_CONNECTED"),
            ErrorCode::AlreadyConnected
        );
        assert_eq!(code_of(None, "Already connected").as_str(), "ERROR");
        assert_eq!(code_of(Some("GAP"), "whatever"), ErrorCode::Gap);
    }

    #[test]
    fn trailing_slashes_are_trimmed() {
        assert_eq!(SseDialer::new("http://h/db/x//").base(), "http://h/db/x");
        assert_eq!(SseDialer::new("http://h/db/x").label(), "sse http://h/db/x");
    }
}
