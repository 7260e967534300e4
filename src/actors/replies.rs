//! Routes replies to the futures waiting for them, by correlation id. A reply future
//! registers before its request is published and unregisters when dropped.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use crate::Codec;
use crate::codec::envelope::{Reply, ReplyEnvelope};
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{Delivery, Outcome};

/// Correlation id → the channel of the future awaiting its replies. `None` once closed.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    pending: Mutex<Option<HashMap<String, mpsc::UnboundedSender<bytes::Bytes>>>>,
}

impl Replies {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Some(HashMap::new())),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<HashMap<String, mpsc::UnboundedSender<bytes::Bytes>>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a request; its replies go to the returned future.
    pub(crate) fn expect<R>(
        self: &Arc<Self>,
        correlation_id: String,
        codec: Codec,
    ) -> Result<ReplyFuture<R>> {
        let (tx, rx) = mpsc::unbounded();
        let mut pending = self.lock();
        let map = pending.as_mut().ok_or_else(Error::closed)?;
        map.insert(correlation_id.clone(), tx);
        Ok(ReplyFuture {
            replies: rx,
            codec,
            guard: Guard {
                replies: Arc::downgrade(self),
                correlation_id,
            },
            result: PhantomData,
        })
    }

    /// Hands a reply to the future awaiting it.
    /// Acknowledged once handed over (or found unwanted), so a reply in flight when the
    /// connection drops is delivered again rather than lost.
    pub(crate) fn deliver(&self, delivery: Delivery) {
        let Delivery {
            body,
            correlation_id,
            acker,
            ..
        } = delivery;
        match correlation_id {
            None => tracing::warn!("a reply without a correlation id was dropped"),
            Some(correlation_id) => {
                let pending = self.lock();
                match pending.as_ref().and_then(|map| map.get(&correlation_id)) {
                    Some(tx) => {
                        tracing::debug!(%correlation_id, "reply received");
                        let _ = tx.unbounded_send(body);
                    }
                    None => tracing::debug!(%correlation_id, "reply for a request nobody awaits"),
                }
            }
        }
        acker.settle(Outcome::Ack);
    }

    /// Reads a reply consumer until it ends.
    pub(crate) async fn run(self: Arc<Self>, mut deliveries: impl Stream<Item = Delivery> + Unpin) {
        while let Some(delivery) = deliveries.next().await {
            self.deliver(delivery);
        }
    }

    /// Fails every waiting future with `Closed`, and every later request.
    pub(crate) fn close(&self) {
        self.lock().take();
    }

    /// How many requests await a reply.
    pub(crate) fn len(&self) -> usize {
        self.lock().as_ref().map_or(0, HashMap::len)
    }
}

#[derive(Debug)]
struct Guard {
    replies: std::sync::Weak<Replies>,
    correlation_id: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(replies) = self.replies.upgrade()
            && let Some(map) = replies.lock().as_mut()
        {
            map.remove(&self.correlation_id);
        }
    }
}

/// The result of a task or RPC, decoded as `R` when its reply arrives. A `pending` reply
/// (kiwiPy's deferred result) keeps it waiting for the next one. Resolves with `Closed` if
/// the communicator closes first. Dropping it stops waiting.
#[must_use = "a reply future does nothing unless awaited"]
#[derive(Debug)]
pub struct ReplyFuture<R> {
    replies: mpsc::UnboundedReceiver<bytes::Bytes>,
    codec: Codec,
    guard: Guard,
    result: PhantomData<fn() -> R>,
}

impl<R> ReplyFuture<R> {
    /// The correlation id of the request this future awaits.
    pub fn correlation_id(&self) -> &str {
        &self.guard.correlation_id
    }
}

impl<R: DeserializeOwned> Future for ReplyFuture<R> {
    type Output = Result<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let bytes = match self.replies.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Err(Error::closed())),
                Poll::Ready(Some(bytes)) => bytes,
            };
            let envelope: ReplyEnvelope<R> = match self.codec.decode(&bytes) {
                Ok(envelope) => envelope,
                Err(error) => return Poll::Ready(Err(error)),
            };
            return Poll::Ready(match envelope.reply {
                Reply::Result(value) => Ok(value),
                Reply::Exception(text) => Err(Error::new(ErrorKind::Remote(text))),
                Reply::Cancelled(reason) => Err(Error::new(ErrorKind::Cancelled(reason))),
                Reply::Pending => continue,
            });
        }
    }
}
