//! Routes replies to the futures waiting for them, by correlation id. A reply future
//! registers before its request is published and unregisters when dropped.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::mpsc;
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

/// The requests awaiting replies, and the deadlines among them in order, so that finding
/// the expired ones looks at those only (most results, a task's, have no deadline).
#[derive(Debug, Default)]
struct Table {
    /// Keyed by our own request ids, hashed with foldhash: SipHash's resistance to chosen
    /// keys buys nothing where every key is a UUID we made, and with the in-process
    /// broker's tables it cost 4% of an in-process task round trip's instructions.
    pending: HashMap<String, Pending, foldhash::fast::RandomState>,
    deadlines: BTreeSet<(Instant, String)>,
}

impl Table {
    /// Sets (or clears) the deadline of a pending request.
    fn set_deadline(&mut self, correlation_id: &str, deadline: Option<Instant>) {
        let Some(waiting) = self.pending.get_mut(correlation_id) else {
            return;
        };
        if let Some(old) = waiting.deadline.take() {
            self.deadlines.remove(&(old, correlation_id.to_owned()));
        }
        if let Some(new) = deadline {
            waiting.deadline = Some(new);
            self.deadlines.insert((new, correlation_id.to_owned()));
        }
    }

    fn remove(&mut self, correlation_id: &str) -> Option<Pending> {
        let waiting = self.pending.remove(correlation_id)?;
        if let Some(deadline) = waiting.deadline {
            self.deadlines
                .remove(&(deadline, correlation_id.to_owned()));
        }
        Some(waiting)
    }
}

/// How often deadlines are checked: a timeout fires up to this much late.
const REAP_EVERY: Duration = Duration::from_millis(100);

/// Correlation id → the future awaiting its replies. `None` once closed.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    pending: Mutex<Option<Table>>,
}

impl Replies {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Some(Table::default())),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Table>> {
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
            let mut table = replies.lock();
            let Some(table) = table.as_mut() else {
                return;
            };
            while let Some((deadline, correlation_id)) = table.deadlines.first()
                && *deadline <= now
            {
                let correlation_id = correlation_id.clone();
                if let Some(waiting) = table.remove(&correlation_id) {
                    let error = Error::timeout(format!(
                        "no reply to request {correlation_id} in time: the receiver may still be working on it, or the request or its reply was lost"
                    ));
                    let _ = waiting.tx.unbounded_send(Err(error));
                }
            }
        }
    }

    /// Registers a request; its replies go to the returned future.
    pub(crate) fn expect<R>(
        self: &Arc<Self>,
        correlation_id: String,
        codec: Codec,
        timeout: Option<Duration>,
        kind: &'static str,
    ) -> Result<ReplyFuture<R>> {
        let (tx, rx) = mpsc::unbounded();
        let mut table = self.lock();
        let table = table.as_mut().ok_or_else(Error::closed)?;
        let waiting = Pending { tx, deadline: None };
        table.pending.insert(correlation_id.clone(), waiting);
        table.set_deadline(&correlation_id, timeout.map(|t| Instant::now() + t));
        crate::metrics::gauge(crate::metrics::RESULTS_PENDING, kind, 1.0);
        Ok(ReplyFuture {
            replies: rx,
            codec,
            guard: PendingReply {
                replies: Arc::downgrade(self),
                correlation_id,
                kind,
                sent: Instant::now(),
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
                let table = self.lock();
                match table.as_ref().and_then(|t| t.pending.get(&correlation_id)) {
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

    /// Fails every waiting future with `Closed`, and every later request.
    pub(crate) fn close(&self) {
        self.lock().take();
    }

    /// How many requests await a reply.
    pub(crate) fn len(&self) -> usize {
        self.lock().as_ref().map_or(0, |table| table.pending.len())
    }
}

#[derive(Debug)]
struct PendingReply {
    replies: std::sync::Weak<Replies>,
    correlation_id: String,
    /// For the metrics: a task's or an RPC's, and when it was sent.
    kind: &'static str,
    sent: Instant,
}

impl PendingReply {
    /// A reply that did not decode as `R`, said as the caller's error: which request's,
    /// what was expected, and for an RPC the likeliest cause besides a codec mismatch.
    fn unreadable<R>(&self, error: &Error) -> Error {
        let reason = match error.kind() {
            ErrorKind::Codec(reason) => reason.as_str(),
            _ => "",
        };
        let mut text = format!(
            "the reply to this {} is not a {}: {reason}",
            self.kind,
            crate::codec::short_type_name::<R>()
        );
        if self.kind == "rpc" {
            text.push_str(
                "; if several communicators serve this identifier, the first answer wins, \
                 and one of them may use another codec or answer with another type",
            );
        }
        Error::new(ErrorKind::Codec(text))
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        crate::metrics::gauge(crate::metrics::RESULTS_PENDING, self.kind, -1.0);
        if let Some(replies) = self.replies.upgrade()
            && let Some(table) = replies.lock().as_mut()
        {
            table.remove(&self.correlation_id);
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
    guard: PendingReply,
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
            && let Some(table) = replies.lock().as_mut()
        {
            let deadline = timeout.map(|timeout| Instant::now() + timeout);
            table.set_deadline(&self.guard.correlation_id, deadline);
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
                Err(error) => return Poll::Ready(Err(self.guard.unreadable::<R>(&error))),
            };
            let guard = &self.guard;
            if !matches!(envelope.reply, Reply::Pending) {
                crate::metrics::elapsed(crate::metrics::ROUND_TRIP_SECONDS, guard.kind, guard.sent);
            }
            return Poll::Ready(match envelope.reply {
                Reply::Result(value) => Ok(value),
                Reply::Exception(text)
                    if text.starts_with(crate::actors::task_consumer::REJECTED) =>
                {
                    Err(Error::new(ErrorKind::Rejected))
                }
                Reply::Exception(text) => Err(Error::new(ErrorKind::Remote(text))),
                Reply::Cancelled(reason) => Err(Error::new(ErrorKind::Cancelled(reason))),
                Reply::Pending => continue,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_expired_deadlines_fail_and_a_lifted_one_never_does() {
        let replies = Replies::new();
        tokio::spawn(Replies::reap(Arc::downgrade(&replies)));
        let short = Some(Duration::from_millis(20));
        let expires: ReplyFuture<i64> = replies
            .expect("a".into(), Codec::Json, short, "rpc")
            .unwrap();
        let lifted: ReplyFuture<i64> = replies
            .expect("b".into(), Codec::Json, short, "rpc")
            .unwrap()
            .with_timeout(None);
        let _task: ReplyFuture<i64> = replies
            .expect("c".into(), Codec::Json, None, "task")
            .unwrap();
        let error = expires.await.unwrap_err();
        assert_eq!(*error.kind(), ErrorKind::Timeout);
        tokio::time::sleep(REAP_EVERY * 3).await;
        assert_eq!(
            replies.len(),
            2,
            "the lifted and the deadline-free ones wait on"
        );
        let table = replies.lock();
        assert!(table.as_ref().unwrap().deadlines.is_empty());
        drop(table);
        drop(lifted);
        assert_eq!(replies.len(), 1);
    }
}
