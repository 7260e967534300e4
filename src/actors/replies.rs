//! Routes replies to the futures waiting for them, by correlation id. A reply future
//! registers before its request is published and unregisters when dropped.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use crate::Codec;
use crate::codec::envelope::{Reply, ReplyEnvelope};
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{Delivery, Outcome};

/// A reply, or why none will come.
type Arrival = Result<bytes::Bytes>;

/// One request awaiting its replies.
#[derive(Debug)]
struct Pending {
    tx: mpsc::UnboundedSender<Arrival>,
    /// When to give up waiting, if ever.
    deadline: Option<Instant>,
}

type PendingMap = HashMap<String, Pending>;

/// How often deadlines are checked: a timeout fires up to this much late.
const REAP_EVERY: Duration = Duration::from_millis(100);

/// Correlation id → the future awaiting its replies. `None` once closed.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    pending: Mutex<Option<PendingMap>>,
}

impl Replies {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Some(HashMap::new())),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<PendingMap>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails the futures whose deadline passed with `Timeout`, every [`REAP_EVERY`],
    /// until the communicator closes.
    pub(crate) async fn reap(replies: Weak<Self>) {
        loop {
            tokio::time::sleep(REAP_EVERY).await;
            let Some(replies) = replies.upgrade() else {
                return;
            };
            let now = Instant::now();
            let mut pending = replies.lock();
            let Some(map) = pending.as_mut() else {
                return;
            };
            map.retain(|correlation_id, waiting| match waiting.deadline {
                Some(deadline) if deadline <= now => {
                    let error = Error::timeout(format!(
                        "no reply to request {correlation_id} in time: the receiver may still be working on it, or the request or its reply was lost"
                    ));
                    let _ = waiting.tx.unbounded_send(Err(error));
                    false
                }
                _ => true,
            });
        }
    }

    /// Registers a request; its replies go to the returned future.
    pub(crate) fn expect<R>(
        self: &Arc<Self>,
        correlation_id: String,
        codec: Codec,
        timeout: Option<Duration>,
    ) -> Result<ReplyFuture<R>> {
        let (tx, rx) = mpsc::unbounded();
        let mut pending = self.lock();
        let map = pending.as_mut().ok_or_else(Error::closed)?;
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        map.insert(correlation_id.clone(), Pending { tx, deadline });
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
                    Some(waiting) => {
                        tracing::debug!(%correlation_id, "reply received");
                        let _ = waiting.tx.unbounded_send(Ok(body));
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
    replies: mpsc::UnboundedReceiver<Arrival>,
    codec: Codec,
    guard: Guard,
    result: PhantomData<fn() -> R>,
}

impl<R> ReplyFuture<R> {
    /// The correlation id of the request this future awaits.
    pub fn correlation_id(&self) -> &str {
        &self.guard.correlation_id
    }

    /// Gives up waiting after `timeout` from now, failing with
    /// [`ErrorKind::Timeout`]; `None` waits as long as the communicator is open. Replaces
    /// the default ([`Settings::with_rpc_timeout`](crate::Settings::with_rpc_timeout) for
    /// RPC, none for tasks). Measured on the communicator's clock, so it works whatever
    /// executor polls the future.
    pub fn with_timeout(self, timeout: Option<Duration>) -> Self {
        if let Some(replies) = self.guard.replies.upgrade()
            && let Some(map) = replies.lock().as_mut()
            && let Some(waiting) = map.get_mut(&self.guard.correlation_id)
        {
            waiting.deadline = timeout.map(|timeout| Instant::now() + timeout);
        }
        self
    }
}

impl<R: DeserializeOwned> Future for ReplyFuture<R> {
    type Output = Result<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let bytes = match self.replies.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Err(Error::closed())),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error)),
                Poll::Ready(Some(Ok(bytes))) => bytes,
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
