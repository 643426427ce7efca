//! A [`Sink`] that performs one asynchronous send at a time, in order.
//!
//! `poll_ready` and `poll_flush` resolve only once the previous send has
//! completed (for HTTP: once its response arrived), so a caller that awaits
//! `send` knows the message was delivered. The first failure poisons the sink:
//! it is reported once, and every later call fails with
//! [`TransportError::Closed`], so nothing sent after a lost message can
//! overtake it.

use std::pin::Pin;
use std::task::{Context, Poll};

use crsync_peer::TransportError;
use crsync_peer::wire::TransportMessage;
use futures_util::Sink;
use futures_util::future::{BoxFuture, FutureExt};

/// The per-message work behind a [`SerialSink`]. The state moves into the
/// future and comes back with the outcome.
pub(crate) trait SerialSend: Sized + Send + 'static {
    /// Sends one message.
    fn send(self, message: TransportMessage) -> BoxFuture<'static, (Self, SendResult)>;

    /// Finishes the sink (after every send completed).
    fn close(self) -> BoxFuture<'static, SendResult> {
        futures_util::future::ready(Ok(())).boxed()
    }
}

pub(crate) type SendResult = Result<(), TransportError>;

enum State<S> {
    Idle(S),
    Sending(BoxFuture<'static, (S, SendResult)>),
    Closing(BoxFuture<'static, SendResult>),
    /// A send failed (already reported) or the sink is closed.
    Done,
}

/// See the module docs.
pub(crate) struct SerialSink<S> {
    state: State<S>,
}

impl<S: SerialSend> SerialSink<S> {
    pub(crate) fn new(inner: S) -> Self {
        SerialSink {
            state: State::Idle(inner),
        }
    }

    /// Drives an in-flight send to completion.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<SendResult> {
        match &mut self.state {
            State::Idle(_) => Poll::Ready(Ok(())),
            State::Sending(fut) => match fut.poll_unpin(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready((inner, Ok(()))) => {
                    self.state = State::Idle(inner);
                    Poll::Ready(Ok(()))
                }
                Poll::Ready((_, Err(e))) => {
                    self.state = State::Done;
                    Poll::Ready(Err(e))
                }
            },
            State::Closing(_) | State::Done => Poll::Ready(Err(TransportError::Closed)),
        }
    }
}

impl<S: SerialSend> Unpin for SerialSink<S> {}

impl<S: SerialSend> Sink<TransportMessage> for SerialSink<S> {
    type Error = TransportError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SendResult> {
        self.get_mut().poll_idle(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: TransportMessage) -> SendResult {
        let this = self.get_mut();
        match std::mem::replace(&mut this.state, State::Done) {
            State::Idle(inner) => {
                this.state = State::Sending(inner.send(item));
                Ok(())
            }
            other => {
                this.state = other;
                Err(TransportError::Closed)
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SendResult> {
        self.get_mut().poll_idle(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SendResult> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Idle(_) => {
                    if let State::Idle(inner) = std::mem::replace(&mut this.state, State::Done) {
                        this.state = State::Closing(inner.close());
                    }
                }
                State::Sending(_) => match this.poll_idle(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                },
                State::Closing(fut) => {
                    let result = std::task::ready!(fut.poll_unpin(cx));
                    this.state = State::Done;
                    return Poll::Ready(result);
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crsync_peer::SiteId;
    use futures_util::SinkExt;
    use std::sync::{Arc, Mutex};

    /// Records messages; fails on the third one.
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl SerialSend for Recorder {
        fn send(self, message: TransportMessage) -> BoxFuture<'static, (Self, SendResult)> {
            async move {
                tokio::task::yield_now().await;
                let mut log = self.0.lock().unwrap();
                if log.len() == 2 {
                    drop(log);
                    return (self, Err(TransportError::Io("boom".into())));
                }
                log.push(message.peer_id);
                drop(log);
                (self, Ok(()))
            }
            .boxed()
        }
    }

    fn msg(i: u8) -> TransportMessage {
        TransportMessage::ping(SiteId::from_bytes([i; 16]))
    }

    #[tokio::test]
    async fn first_failure_is_reported_then_closed() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut sink = SerialSink::new(Recorder(log.clone()));
        sink.send(msg(1)).await.unwrap();
        sink.feed(msg(2)).await.unwrap();
        // The failure of the third send surfaces on the next readiness check.
        sink.feed(msg(3)).await.unwrap();
        assert!(matches!(sink.flush().await, Err(TransportError::Io(_))));
        assert!(matches!(
            sink.send(msg(4)).await,
            Err(TransportError::Closed)
        ));
        assert_eq!(log.lock().unwrap().len(), 2);
        sink.close().await.unwrap();
    }

    /// Fails every close.
    struct FailingClose;

    impl SerialSend for FailingClose {
        fn send(self, _: TransportMessage) -> BoxFuture<'static, (Self, SendResult)> {
            futures_util::future::ready((self, Ok(()))).boxed()
        }

        fn close(self) -> BoxFuture<'static, SendResult> {
            futures_util::future::ready(Err(TransportError::Io("close".into()))).boxed()
        }
    }

    #[tokio::test]
    async fn a_finished_sink_never_polls_its_completed_futures() {
        // after a failed send: every later call answers without polling it again
        let mut sink = SerialSink::new(Recorder(Arc::new(Mutex::new(Vec::new()))));
        for i in 1..=3 {
            let _ = sink.send(msg(i)).await;
        }
        assert!(matches!(
            sink.send(msg(4)).await,
            Err(TransportError::Closed)
        ));
        sink.close().await.unwrap();
        sink.close().await.unwrap();
        assert!(matches!(sink.flush().await, Err(TransportError::Closed)));
        // after a close, failed or not
        let mut sink = SerialSink::new(FailingClose);
        sink.send(msg(1)).await.unwrap();
        assert!(matches!(sink.close().await, Err(TransportError::Io(_))));
        sink.close().await.unwrap();
        assert!(matches!(
            sink.send(msg(2)).await,
            Err(TransportError::Closed)
        ));
    }
}
