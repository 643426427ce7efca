//! WebSocket client transport (tokio-tungstenite).
//!
//! Every [`TransportMessage`] travels as one text frame holding its JSON (the
//! same JSON as the HTTP+SSE transport). On the stream:
//! - a text frame that does not decode yields `Err(TransportError::Decode)`
//!   and the connection goes on (a binary frame is read as UTF-8 JSON too);
//! - WebSocket pings are answered by tungstenite while the stream is polled,
//!   and never surface;
//! - a close frame, or the socket closing, ends the stream; any other socket
//!   error yields one `Err(TransportError::Io)` and ends it.
//!
//! On the sink, the first socket error is reported once (`Io`, or `Closed`
//! when the socket was already closed) and finishes it, as does a completed
//! close: later sends fail with `Closed` and closing again is `Ok`.
//!
//! [`WebSocketDialer`] opens `ws://` URLs (and `wss://` with the `rustls`
//! feature); [`connection_from_ws`] turns any WebSocket (a server's accepted
//! socket, or a test's in-memory one) into a [`Connection`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crsync_peer::wire::TransportMessage;
use crsync_peer::{Connection, Dialer, MessageStream, Received, SiteId, TransportError};
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::{Sink, Stream, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::{DEFAULT_DIAL_TIMEOUT, http_status};

/// How long the stream keeps reading after a close frame, so that the close
/// reply goes out and the remote can end the socket.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Dials a crsync WebSocket endpoint.
///
/// The URL gets a `peerId=<our site id hex>` query parameter (like the SSE
/// stream), so a server can refuse a duplicate before the upgrade; the first
/// message is still the Peer's `connect`. A refused upgrade maps to a typed
/// error: 401/403 to [`TransportError::Remote`] (code from the JSON body),
/// other statuses to [`TransportError::Http`], an unreachable host to
/// [`TransportError::Connect`], no completed upgrade within the dial timeout
/// to [`TransportError::Timeout`].
///
/// ```no_run
/// # async fn demo() -> Result<(), crsync_peer::TransportError> {
/// use crsync_peer::{Dialer, SiteId};
/// use crsync_transports::ws::WebSocketDialer;
///
/// let mut dialer = WebSocketDialer::new("ws://127.0.0.1:8080/db/notes/ws").with_token("s3cret");
/// let connection = dialer.dial(SiteId::from_bytes([1; 16])).await?;
/// assert_eq!(connection.label, "ws ws://127.0.0.1:8080/db/notes/ws");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WebSocketDialer {
    url: String,
    token: Option<String>,
    dial_timeout: Duration,
    created: crate::CreationNotice,
    #[cfg(feature = "tls")]
    roots: Option<crate::tls::RootCertificates>,
}

impl std::fmt::Debug for WebSocketDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketDialer")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("dial_timeout", &self.dial_timeout)
            .finish()
    }
}

impl WebSocketDialer {
    /// A dialer for `url` (`ws://host:port/path`).
    pub fn new(url: impl Into<String>) -> Self {
        WebSocketDialer {
            url: url.into(),
            token: None,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            created: crate::CreationNotice::default(),
            #[cfg(feature = "tls")]
            roots: None,
        }
    }

    /// Trusts these root certificates for `wss://`, besides the webpki roots.
    #[cfg(feature = "tls")]
    pub fn with_root_certificates(mut self, roots: crate::tls::RootCertificates) -> Self {
        self.roots = Some(roots);
        self
    }

    /// Raised when a dial created the database on the server.
    pub fn creation_notice(&self) -> crate::CreationNotice {
        self.created.clone()
    }

    /// Limit on connecting and completing the upgrade (default
    /// [`DEFAULT_DIAL_TIMEOUT`]); past it, `dial` fails with
    /// [`TransportError::Timeout`].
    pub fn with_dial_timeout(mut self, timeout: Duration) -> Self {
        self.dial_timeout = timeout;
        self
    }

    /// Sends `Authorization: Bearer <token>` with the upgrade request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The URL this dials (without the `peerId` parameter).
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self, local: SiteId) -> Result<Connection, TransportError> {
        let target = self.url.clone();
        let connect_error = |source: crsync_peer::BoxError| TransportError::Connect {
            target: target.clone(),
            source,
        };
        let separator = if self.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}peerId={}", self.url, local.to_hex());
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| connect_error(Box::new(e)))?;
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| connect_error(Box::new(e)))?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        #[cfg(feature = "tls")]
        let handshake = {
            let connector = match &self.roots {
                Some(roots) => Some(tokio_tungstenite::Connector::Rustls(
                    roots.rustls().map_err(|e| connect_error(Box::new(e)))?,
                )),
                None => None,
            };
            // Nagle off (`true`): a small frame (a live change, an ack)
            // must not wait for the server's delayed ACK.
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector)
        };
        #[cfg(not(feature = "tls"))]
        let handshake = tokio_tungstenite::connect_async_with_config(request, None, true);
        let (socket, response) = tokio::time::timeout(self.dial_timeout, handshake)
            .await
            .map_err(|_| TransportError::Timeout(self.dial_timeout))?
            .map_err(|e| match e {
                WsError::Http(response) => {
                    let body = response
                        .body()
                        .as_deref()
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok());
                    http_status::refused(response.status().as_u16(), &target, &body, retry_after)
                }
                other => connect_error(Box::new(other)),
            })?;
        tracing::debug!(url = %self.url, "websocket connected");
        self.created.raise_if(
            response
                .headers()
                .get(crate::CREATED_HEADER)
                .and_then(|v| v.to_str().ok()),
        );
        Ok(connection_from_ws(socket, self.label()))
    }
}

impl Dialer for WebSocketDialer {
    fn dial(&mut self, local: SiteId) -> BoxFuture<'_, Result<Connection, TransportError>> {
        self.connect(local).boxed()
    }

    fn label(&self) -> String {
        format!("ws {}", self.url)
    }

    fn set_token(&mut self, token: &str) {
        self.token = Some(token.to_owned());
    }
}

/// Turns a WebSocket (anything that streams and sinks tungstenite
/// [`Message`]s, such as a `WebSocketStream`) into a [`Connection`], with the
/// framing described in the [module docs](self).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use crsync_peer::{SiteId, wire::TransportMessage};
/// use crsync_transports::ws::connection_from_ws;
/// use futures_util::{SinkExt, StreamExt};
/// use tokio_tungstenite::{WebSocketStream, tungstenite::protocol::Role};
///
/// let (client_io, server_io) = tokio::io::duplex(64 * 1024);
/// let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
/// let server = WebSocketStream::from_raw_socket(server_io, Role::Server, None).await;
/// let mut a = connection_from_ws(client, "client");
/// let mut b = connection_from_ws(server, "server");
///
/// let ping = TransportMessage::ping(SiteId::from_bytes([3; 16]));
/// a.sink.send(ping.clone()).await?;
/// assert_eq!(b.stream.next().await.expect("open")?.message, ping);
/// # Ok(()) }
/// ```
pub fn connection_from_ws<S>(socket: S, label: impl Into<String>) -> Connection
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Send + 'static,
{
    let (sink, stream) = socket.split();
    Connection {
        sink: Box::pin(FrameSink {
            frames: sink,
            finished: false,
        }),
        stream: messages(stream),
        label: label.into(),
    }
}

/// Messages to text frames. The first socket error is reported once and
/// finishes the sink, as does a completed close: after that, sends fail with
/// [`TransportError::Closed`] and closing again is `Ok`, without touching the
/// socket (whose sink must not be polled after it failed or closed).
struct FrameSink<S> {
    frames: S,
    finished: bool,
}

impl<S> FrameSink<S>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    /// Polls one operation on the socket unless finished; an error finishes.
    fn on_socket(
        &mut self,
        op: impl FnOnce(Pin<&mut S>) -> Poll<Result<(), WsError>>,
    ) -> Poll<Result<(), TransportError>> {
        if self.finished {
            return Poll::Ready(Err(TransportError::Closed));
        }
        let result = std::task::ready!(op(Pin::new(&mut self.frames)));
        Poll::Ready(self.finish_on_error(result))
    }

    fn finish_on_error(&mut self, result: Result<(), WsError>) -> Result<(), TransportError> {
        if result.is_err() {
            self.finished = true;
        }
        result.map_err(send_error)
    }
}

impl<S> Sink<TransportMessage> for FrameSink<S>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    type Error = TransportError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().on_socket(|s| s.poll_ready(cx))
    }

    fn start_send(self: Pin<&mut Self>, message: TransportMessage) -> Result<(), Self::Error> {
        let this = self.get_mut();
        if this.finished {
            return Err(TransportError::Closed);
        }
        let result = Pin::new(&mut this.frames).start_send(Message::text(message.to_json()));
        this.finish_on_error(result)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.get_mut().on_socket(|s| s.poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(Ok(()));
        }
        let result = std::task::ready!(this.on_socket(|s| s.poll_close(cx)));
        this.finished = true;
        Poll::Ready(result)
    }
}

fn send_error(e: WsError) -> TransportError {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => TransportError::Closed,
        other => TransportError::Io(Box::new(other)),
    }
}

fn decode(text: &str) -> Result<Received, TransportError> {
    TransportMessage::from_json(text)
        .map(Received::new)
        .map_err(TransportError::from)
}

/// Frames to messages, per the module docs.
fn messages<S>(frames: S) -> MessageStream
where
    S: Stream<Item = Result<Message, WsError>> + Send + Unpin + 'static,
{
    Box::pin(futures_util::stream::unfold(
        (frames, false),
        |(mut frames, done)| async move {
            if done {
                return None;
            }
            loop {
                let item = match frames.next().await? {
                    Ok(Message::Text(text)) => decode(text.as_str()),
                    Ok(Message::Binary(bytes)) => match std::str::from_utf8(&bytes) {
                        Ok(text) => decode(text),
                        Err(_) => Err(TransportError::Decode(
                            crsync_peer::wire::DecodeError::Malformed(
                                "binary frame is not UTF-8 JSON".into(),
                            ),
                        )),
                    },
                    Ok(Message::Close(frame)) => {
                        tracing::debug!(?frame, "websocket closed by the remote");
                        // Keep reading so tungstenite flushes its close reply;
                        // the socket then reports its end.
                        let drain = async { while let Some(Ok(_)) = frames.next().await {} };
                        let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
                        return None;
                    }
                    Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                    Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return None,
                    Err(e) => return Some((Err(TransportError::Io(Box::new(e))), (frames, true))),
                };
                return Some((item, (frames, false)));
            }
        },
    ))
}
