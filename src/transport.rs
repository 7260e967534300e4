//! The seam between the communicator and a backend: a small AMQP-shaped [`Transport`] that
//! moves encoded bytes. Everything above it (envelopes, subscribers, replies, filters) is
//! shared by every backend, so `mem://` and `amqp://` behave the same by construction.

use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt};
use futures::stream::{BoxStream, StreamExt};

use crate::error::{Error, Result};
use crate::events::ConnectionEvent;

/// The two exchanges of kiwiPy's model: tasks and their replies go on one, RPC, broadcasts
/// and RPC replies on the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exchange {
    Tasks,
    Messages,
}

/// Where a published message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// The task queue of this name (on the task exchange), shared with the queue's handle.
    Task(Arc<str>),
    /// The RPC subscriber with this identifier (on the message exchange).
    Rpc(String),
    /// Every broadcast queue (on the message exchange).
    Broadcast,
    /// A reply queue, by the name a request carried in `reply_to`: straight to that queue,
    /// whichever exchange it is bound to.
    Reply(String),
    /// Every presence watcher (see [`crate::presence`]): on an exchange of kiwimq's own,
    /// which kiwiPy's and AiiDA's peers never bind.
    Presence,
}

impl Route {
    /// The kind of message it carries, as the metrics and spans name it.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Route::Task(_) => "task",
            Route::Rpc(_) => "rpc",
            Route::Broadcast => "broadcast",
            Route::Reply(_) => "reply",
            Route::Presence => "presence",
        }
    }

    /// Where it goes: a queue, an identifier, or `[broadcast]`.
    pub(crate) fn target(&self) -> &str {
        match self {
            Route::Task(queue) => queue,
            Route::Rpc(identifier) | Route::Reply(identifier) => identifier,
            Route::Broadcast => BROADCAST_TOPIC,
            Route::Presence => PRESENCE_TOPIC,
        }
    }
}

/// The prefix of RPC routing keys on kiwiPy's message exchange: `[rpc].<identifier>`.
pub(crate) const RPC_TOPIC: &str = "[rpc]";
/// The routing key of broadcasts on kiwiPy's message exchange.
pub(crate) const BROADCAST_TOPIC: &str = "[broadcast]";
/// The routing key of presence announcements, on kiwimq's own presence exchange.
pub(crate) const PRESENCE_TOPIC: &str = "[kiwimq.presence]";

/// The routing key of an RPC identifier's calls.
pub(crate) fn rpc_key(identifier: &str) -> String {
    format!("{RPC_TOPIC}.{identifier}")
}

/// What a consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// A task queue (declared by the consumer when missing); acked by the consumer.
    Tasks(String),
    /// The exclusive queue of one RPC identifier; auto-acked. Only one consumer may exist.
    Rpc(String),
    /// This communicator's broadcast queue, by name; auto-acked.
    Broadcasts(String),
    /// A presence watcher's queue, by name: exclusive, auto-acked, bound to the presence
    /// exchange.
    Presence(String),
    /// One of this communicator's reply queues (one per exchange), by name; acked by the
    /// consumer once the reply is handed over.
    Replies(Exchange, String),
}

/// Where a task queue with a delivery limit puts the tasks it gives up on: poison tasks,
/// and tasks no subscriber could decode.
pub(crate) fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}{DEAD_LETTER_SUFFIX}")
}

/// The suffix of a dead-letter queue's name.
pub(crate) const DEAD_LETTER_SUFFIX: &str = ".dlq";

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outgoing {
    pub(crate) body: Vec<u8>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) reply_to: Option<String>,
    /// Survives a broker restart (tasks).
    pub(crate) persistent: bool,
    /// Fails with `Unroutable` when no queue takes it.
    pub(crate) mandatory: bool,
    /// The W3C trace context to carry (the AMQP header `traceparent`; kept as is in
    /// `mem://`).
    pub(crate) traceparent: Option<TraceContext>,
}

impl Outgoing {
    /// Refuses a body over `limit` bytes before it costs any traffic: the same rule on every
    /// backend, RabbitMQ's `max_message_size`.
    pub(crate) fn check_size(&self, limit: usize) -> Result<()> {
        let size = self.body.len();
        if size > limit {
            return Err(Error::refused(format!(
                "message size {size} is larger than the limit of {limit} bytes \
                 (Settings::with_max_message_size; RabbitMQ's max_message_size)"
            )));
        }
        Ok(())
    }
}

/// A message received from a queue.
#[derive(Debug)]
pub(crate) struct Delivery {
    /// Shared, so handing a body to several subscribers or keeping it for a requeue
    /// copies nothing.
    pub(crate) body: bytes::Bytes,
    pub(crate) correlation_id: Option<String>,
    pub(crate) reply_to: Option<String>,
    pub(crate) redelivered: bool,
    /// How many times it was returned to its queue before (RabbitMQ's `x-delivery-count`
    /// header of quorum queues; the in-process broker's count): 0 when unknown.
    pub(crate) delivery_count: u32,
    /// The sender's W3C trace context (the AMQP header `traceparent`), if it sent a
    /// well-formed one.
    pub(crate) traceparent: Option<TraceContext>,
    pub(crate) acker: Acker,
}

/// What becomes of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Done: remove it from the queue.
    Ack,
    /// Not done: put it back for another consumer.
    Requeue,
    /// Unusable: drop it (to the dead-letter exchange when the queue has one).
    Discard,
}

/// How a backend settles one delivery. Fire and forget: settling never blocks the caller.
pub(crate) trait Settle: Send {
    fn settle(self: Box<Self>, outcome: Outcome);
}

/// Settles a delivery exactly once; dropped unsettled, it requeues the message so nothing is
/// lost when a handler or a pulled task goes away without an outcome.
pub(crate) struct Acker(Option<Box<dyn Settle>>);

impl Acker {
    pub(crate) fn new(settle: impl Settle + 'static) -> Self {
        Self(Some(Box::new(settle)))
    }

    /// For auto-acked deliveries: settling does nothing.
    pub(crate) fn auto() -> Self {
        Self(None)
    }

    pub(crate) fn settle(mut self, outcome: Outcome) {
        if let Some(settle) = self.0.take() {
            settle.settle(outcome);
        }
    }
}

impl Drop for Acker {
    fn drop(&mut self) {
        if let Some(settle) = self.0.take() {
            settle.settle(Outcome::Requeue);
        }
    }
}

impl std::fmt::Debug for Acker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Acker(pending)"
        } else {
            "Acker(settled)"
        })
    }
}

/// A running consumer: its tag (to cancel it) and its deliveries.
pub(crate) struct Consumer {
    pub(crate) tag: String,
    pub(crate) deliveries: BoxStream<'static, Delivery>,
}

use crate::trace::TraceContext;

/// Where a reply consumer hands its deliveries.
pub(crate) type DeliverFn = Arc<dyn Fn(Delivery) + Send + Sync>;

/// A backend. Every future is `'static` and `Send` so callers may await it anywhere.
pub(crate) trait Transport: Send + Sync + 'static {
    /// Declares a task queue (idempotent), so tasks wait in it while nobody consumes.
    fn declare_task_queue(&self, queue: &str) -> BoxFuture<'static, Result<()>>;

    /// Publishes and resolves once the broker has taken responsibility for the message.
    fn publish(&self, route: Route, message: Outgoing) -> BoxFuture<'static, Result<()>>;

    /// Starts a consumer holding at most `prefetch` unsettled deliveries (0 = unlimited).
    fn consume(&self, source: Source, prefetch: u16) -> BoxFuture<'static, Result<Consumer>>;

    /// Consumes a reply queue, handing each delivery to `deliver`; resolves with the loop
    /// that reads the consumer, for the caller to run. A backend may instead call `deliver`
    /// as the reply is published (the in-process one does, sparing a thread hop per reply),
    /// so `deliver` must not block.
    fn consume_replies(
        &self,
        exchange: Exchange,
        queue: String,
        deliver: DeliverFn,
    ) -> BoxFuture<'static, Result<BoxFuture<'static, ()>>> {
        let consume = self.consume(Source::Replies(exchange, queue), 0);
        async move {
            let consumer = consume.await?;
            let reader = consumer.deliveries.for_each(move |delivery| {
                deliver(delivery);
                futures::future::ready(())
            });
            Ok(reader.boxed())
        }
        .boxed()
    }

    /// Stops a consumer; its unsettled deliveries stay valid. An RPC consumer's queue goes.
    fn cancel(&self, tag: &str) -> BoxFuture<'static, Result<()>>;

    /// A task queue's counts, without taking a message. `Refused` if there is no such queue.
    fn queue_stats(&self, queue: &str) -> BoxFuture<'static, Result<QueueStats>>;

    /// Deletes every ready message of a task queue; returns how many.
    fn purge(&self, queue: &str) -> BoxFuture<'static, Result<u32>>;

    /// Takes one message from a task queue, if it holds any.
    fn get(&self, queue: &str) -> BoxFuture<'static, Result<Option<Delivery>>>;

    /// Closes the connection; later operations fail with `Closed`.
    fn close(&self) -> BoxFuture<'static, Result<()>>;

    /// Where this connection's events go: changes of the connection, and what the layers
    /// above report beside them (subscribers lost or restarted).
    fn events(&self) -> tokio::sync::broadcast::Sender<ConnectionEvent>;

    /// Whether the connection is up now.
    fn is_connected(&self) -> bool;

    /// Whether it has a channel for presence that no kiwiPy or AiiDA peer hears (every
    /// backend but a ZeroMQ connection to AiiDA's broker).
    fn carries_presence(&self) -> bool {
        true
    }

    /// Refuses the next `count` consumes, as a broker refusing for a while would (a test
    /// hook of the in-process backend).
    #[cfg(test)]
    fn refuse_consumes(&self, _count: u32) {}

    /// The broker node of the current (or last) connection, password hidden; none for a
    /// backend without nodes.
    fn node(&self) -> Option<String> {
        None
    }

    /// Watches the connection and restores it after a loss — with its topology and every
    /// consumer — until the transport closes. The [`Root`](crate::tree::Root)
    /// runs it.
    fn recover(&self) -> BoxFuture<'static, ()>;
}

/// A task queue's counts, as [`TaskQueue::stats`](crate::TaskQueue::stats) reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Tasks waiting to be delivered.
    pub ready: u32,
    /// Tasks delivered and not yet acknowledged; `None` where the broker does not say
    /// (RabbitMQ over AMQP: its management API or `rabbitmqctl list_queues` does).
    pub unacknowledged: Option<u32>,
    /// Consumers of the queue, over every communicator.
    pub consumers: u32,
}
