//! Consuming: each consumer's channel and queue, the stream of deliveries its actor polls
//! (the lapin consumers it had, one after another), restoring consumers after a loss,
//! settling deliveries, and pulling one task.

use std::collections::{HashMap, HashSet};
use std::pin::pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::channel::mpsc;
use futures::stream::BoxStream;
use futures::{Future, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions, BasicRejectOptions, QueueDeleteOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::runtime::Handle;
use tokio::time::Instant;

use super::ack_batch::AckBatch;
use super::{Attempt, Shared, Slot, amqp_error, amqp_error_refused, explain, lock, soft_error};
use crate::error::{Error, ErrorKind, Result};
use crate::settings::Settings;
use crate::transport::{Acker, Consumer, Delivery, Outcome, QueueStats, Settle, Source};

/// The transport's consumers, and the channels they declare their queues and consume on.
pub(super) struct Consumers {
    /// Consumer tag → what it consumes.
    pub(super) registrations: Mutex<HashMap<String, Registration>>,
    /// The prefetch window of RPC and broadcast consumers (0: none, auto-acked).
    pub(super) message_prefetch: u16,
    /// The channel `basic.get` pulls tasks on.
    pub(super) puller: Slot,
    /// Declare and delete the queues of consumers on shared channels, whose refusals (an
    /// identifier taken) must not close a channel others consume on. Several, because the
    /// broker handles one channel's requests one after another: thousands of RPC
    /// identifiers are declared in parallel (10,000: 21 s on one, 15 s on four, 13 s on
    /// eight, on two cores shared with the broker).
    pub(super) declarers: [Slot; DECLARERS],
    /// The channels the consumers of exclusive RPC identifiers' queues share, each with how
    /// many consumers it was given: thousands of RPC identifiers stay far below
    /// `channel_max`. (The RPC queue and the broadcast queue have a channel of their own,
    /// where their deliveries are acknowledged in batches.)
    pub(super) shared_channels: tokio::sync::Mutex<Vec<(Weak<ConsumerChannel>, usize)>>,
    /// Task queues declared so far, declared again after a reconnection (a broker restart
    /// loses non-durable ones).
    pub(super) task_queues: Mutex<HashSet<String>>,
}

/// A registered consumer: what to restore after a loss, and the stream it feeds.
pub(super) struct Registration {
    pub(super) source: Source,
    pub(super) prefetch: u16,
    /// Where the lapin consumers go, one after another, as deliveries.
    pub(super) sender: mpsc::UnboundedSender<BoxStream<'static, Delivery>>,
    /// The channel consuming now; none while it waits to be restored.
    pub(super) active: Option<Arc<ConsumerChannel>>,
    /// Failed restorations in a row, and when to try again.
    pub(super) failures: u32,
    pub(super) retry_at: Option<Instant>,
}

/// A consumer's channel, closed once it is no longer consumed from and every delivery it
/// handed out is settled (closing earlier would requeue tasks still being worked on).
pub(super) struct ConsumerChannel {
    pub(super) channel: Channel,
    pub(super) io: Handle,
}

impl Drop for ConsumerChannel {
    fn drop(&mut self) {
        let channel = self.channel.clone();
        self.io.spawn(async move {
            if channel.status().connected() {
                let _ = channel.close(200, "consumer cancelled".into()).await;
            }
        });
    }
}

/// Channels declaring the queues of consumers on shared channels.
const DECLARERS: usize = 8;

impl Consumers {
    pub(super) fn new(settings: &Settings) -> Self {
        Self {
            registrations: Mutex::default(),
            message_prefetch: settings.message_prefetch,
            puller: Slot::default(),
            declarers: Default::default(),
            shared_channels: tokio::sync::Mutex::default(),
            task_queues: Mutex::default(),
        }
    }

    /// The declaring channel's slot for a consumer's queue (always the same one for a
    /// queue, so its declaration and its deletion are in order).
    pub(super) fn declarer(&self, queue: &str) -> &Slot {
        let hash = queue.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        &self.declarers[hash % DECLARERS]
    }
}

/// Consumers a shared channel is given at most.
const SHARED_CONSUMERS: usize = 1_000;

/// Consumers restored at once after a loss: their declarations and consumes are pipelined.
const RESTORING_AT_ONCE: usize = 256;

impl Shared {
    pub(super) fn queue_of(&self, source: &Source) -> String {
        match source {
            Source::Tasks(queue)
            | Source::Broadcasts(queue)
            | Source::Presence(queue)
            | Source::Replies(_, queue) => queue.clone(),
            Source::Rpc(identifier) => self.topology.rpc_queue(identifier),
        }
    }

    /// Declares the source's queue on `connection` (number `epoch`) and consumes it under
    /// `tag`: a task or reply queue on a channel of its own (its prefetch and acks are its
    /// own), an RPC or broadcast queue on a shared channel; an RPC identifier, unless it
    /// has a queue of its own, as a binding of the communicator's RPC queue. Returns the
    /// channel and what feeds the consumer.
    pub(super) async fn start(
        self: &Arc<Self>,
        connection: &Connection,
        epoch: u64,
        tag: &str,
        source: &Source,
        prefetch: u16,
    ) -> Result<(Arc<ConsumerChannel>, LapinFeed)> {
        let topology = &self.topology;
        if let Source::Rpc(identifier) = source
            && !topology.exclusive_rpc_identifiers
        {
            return self.route_rpc(connection, epoch, identifier).await;
        }
        let queue = self.queue_of(source);
        let (guard, acks) = match source {
            Source::Tasks(queue) => {
                let guard = self.own_channel(connection).await?;
                guard
                    .channel
                    .basic_qos(prefetch, BasicQosOptions::default())
                    .await
                    .map_err(amqp_error)?;
                // Its own channel: a refusal there is this declaration's.
                topology
                    .declare_task_queue(&guard.channel, queue)
                    .await
                    .map_err(amqp_error_refused)?;
                (guard, Acks::Each)
            }
            Source::Replies(exchange, queue) => {
                let guard = self.own_channel(connection).await?;
                topology
                    .declare_reply_queue(&guard.channel, *exchange, queue)
                    .await
                    .map_err(|error| own_queue_refused(error, queue))?;
                // Acknowledged, so a reply lost in flight with the connection comes again.
                (guard, Acks::Each)
            }
            Source::Broadcasts(queue) | Source::Presence(queue) => {
                // A channel of its own, so that its deliveries can be acknowledged in
                // batches; a refusal there is this declaration's.
                let guard = self.own_channel(connection).await?;
                let declaration = match source {
                    Source::Presence(_) => topology.presence_queue_declaration(queue),
                    _ => topology.broadcast_queue_declaration(queue),
                };
                declaration
                    .declare(&guard.channel)
                    .await
                    .map_err(|error| own_queue_refused(error, queue))?;
                let acks = self.window(&guard, prefetch).await?;
                (guard, acks)
            }
            Source::Rpc(_) => {
                let declarer = self
                    .channel_on(self.consumers.declarer(&queue), false, connection, epoch)
                    .await?;
                if let Source::Rpc(identifier) = source {
                    topology
                        .declare_rpc_queue(&declarer, identifier)
                        .await
                        .map_err(|e| self.declare_error(e, source, &queue))?;
                }
                let guard = self.shared_channel(connection).await?;
                // RabbitMQ applies a non-global prefetch to each consumer started on the
                // channel afterwards: this one holds at most `prefetch` unacked. On a shared
                // channel each delivery is acknowledged by itself.
                let acks = match self.window(&guard, prefetch).await? {
                    Acks::Batched(_) => Acks::Each,
                    none => none,
                };
                (guard, acks)
            }
        };
        let options = BasicConsumeOptions {
            no_ack: matches!(acks, Acks::Auto),
            ..Default::default()
        };
        let consumer = guard
            .channel
            .basic_consume(
                queue.as_str().into(),
                tag.into(),
                options,
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error)?;
        Ok((guard, LapinFeed::Consumer(consumer, acks)))
    }

    /// Sets a consumer's prefetch window on `guard`'s channel; how its deliveries are then
    /// acknowledged: none (no window), or in batches.
    pub(super) async fn window(&self, guard: &ConsumerChannel, prefetch: u16) -> Result<Acks> {
        if prefetch == 0 {
            return Ok(Acks::Auto);
        }
        guard
            .channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(amqp_error)?;
        Ok(Acks::Batched(prefetch))
    }

    /// A declaration the broker refused. The declaring channel is shared, and every
    /// declaration pending on it fails with the refusal of one: it is this one's only when
    /// the broker names its queue (an identifier taken is `DuplicateSubscriber`); the
    /// others are tried again.
    pub(super) fn declare_error(&self, error: lapin::Error, source: &Source, queue: &str) -> Error {
        let ours = !queue.is_empty() && error.to_string().contains(&format!("'{queue}'"));
        match (soft_error(&error), source) {
            (Some(AMQPSoftError::RESOURCELOCKED), Source::Rpc(identifier)) if ours => {
                Error::new(ErrorKind::DuplicateSubscriber(identifier.clone()))
            }
            (Some(_), _) if ours => own_queue_refused(error, queue),
            _ => amqp_error(error),
        }
    }

    /// A channel for one consumer, closed with its last delivery settled.
    pub(super) async fn own_channel(
        &self,
        connection: &Connection,
    ) -> Result<Arc<ConsumerChannel>> {
        let channel = connection.create_channel().await.map_err(amqp_error)?;
        Ok(Arc::new(ConsumerChannel {
            channel,
            io: self.io.handle.clone(),
        }))
    }

    /// A shared consumer channel on `connection` with room for one more consumer, opened
    /// when none has.
    async fn shared_channel(&self, connection: &Connection) -> Result<Arc<ConsumerChannel>> {
        let mut shared = self.consumers.shared_channels.lock().await;
        // A channel of a lost connection is closed; one whose consumers all went is gone.
        shared.retain(|(channel, _)| {
            channel
                .upgrade()
                .is_some_and(|guard| guard.channel.status().connected())
        });
        for (channel, given) in shared.iter_mut() {
            if *given < SHARED_CONSUMERS
                && let Some(guard) = channel.upgrade()
            {
                *given += 1;
                return Ok(guard);
            }
        }
        let guard = self.own_channel(connection).await?;
        shared.push((Arc::downgrade(&guard), 1));
        Ok(guard)
    }

    /// Makes `guard`'s channel the active one of consumer `tag` in `consumers` and appends
    /// the lapin consumer's deliveries to the consumer's stream. `false` when the consumer
    /// was cancelled meanwhile: its lapin consumer is cancelled too.
    fn activate(
        self: &Arc<Self>,
        consumers: &mut HashMap<String, Registration>,
        tag: &str,
        (guard, feed): (Arc<ConsumerChannel>, LapinFeed),
    ) -> bool {
        let Some(entry) = consumers.get_mut(tag) else {
            let shared = self.clone();
            let tag = tag.to_owned();
            self.io.handle.spawn(async move {
                match feed {
                    LapinFeed::Consumer(..) => {
                        let _ = guard
                            .channel
                            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                            .await;
                    }
                    LapinFeed::Routed(_) => {
                        let router = shared.rpc.router.lock().await.clone();
                        if let Some(router) = router {
                            let _ = shared.unroute_rpc(&tag, &router).await;
                        }
                    }
                }
            });
            return false;
        };
        entry.active = Some(guard.clone());
        entry.failures = 0;
        entry.retry_at = None;
        let shared = Arc::downgrade(self);
        let deliveries = match feed {
            LapinFeed::Consumer(consumer, acks) => {
                deliveries(shared, tag.to_owned(), consumer, guard, acks)
            }
            LapinFeed::Routed(calls) => {
                let tag = tag.to_owned();
                let ended = futures::stream::once(async move {
                    consumer_ended(&shared, &tag, &guard);
                })
                .filter_map(|()| futures::future::ready(None));
                calls.chain(ended).boxed()
            }
        };
        entry.sender.unbounded_send(deliveries).is_ok()
    }

    pub(super) async fn consume(
        self: Arc<Self>,
        source: Source,
        prefetch: u16,
    ) -> Result<Consumer> {
        self.broker.check_open()?;
        let deadline = Instant::now() + self.broker.send_timeout;
        let tag = match &source {
            Source::Rpc(identifier) => identifier.clone(),
            _ => format!("kiwimq-{}", uuid::Uuid::new_v4()),
        };
        let started = self
            .retrying(deadline, "consume", || async {
                let (connection, epoch) =
                    self.connection(deadline).await.map_err(Attempt::Final)?;
                self.start(&connection, epoch, &tag, &source, prefetch)
                    .await
                    .map_err(Attempt::unless_refused)
            })
            .await?;
        let (sender, receiver) = mpsc::unbounded();
        let entry = Registration {
            source,
            prefetch,
            sender,
            active: None,
            failures: 0,
            retry_at: None,
        };
        // Registered and activated at once: restoration never sees it without a consumer
        // and starts a second one under the same tag.
        let mut consumers = lock(&self.consumers.registrations);
        consumers.insert(tag.clone(), entry);
        self.activate(&mut consumers, &tag, started);
        drop(consumers);
        Ok(Consumer {
            tag,
            deliveries: receiver.flatten().boxed(),
        })
    }

    /// Restores the consumers that lost their channel and are due, on `connection`
    /// (number `epoch`), many at once; with `replies_only`, the reply queues' alone.
    pub(super) async fn restore_consumers(
        self: &Arc<Self>,
        connection: &Connection,
        epoch: u64,
        replies_only: bool,
    ) {
        let now = Instant::now();
        let due: Vec<(String, Source, u16)> = lock(&self.consumers.registrations)
            .iter()
            .filter(|(_, entry)| {
                entry.active.is_none()
                    && entry.retry_at.is_none_or(|at| at <= now)
                    && (!replies_only || matches!(entry.source, Source::Replies(..)))
            })
            .map(|(tag, entry)| (tag.clone(), entry.source.clone(), entry.prefetch))
            .collect();
        if due.is_empty() {
            return;
        }
        let restoring = due.len();
        let started = std::time::Instant::now();
        futures::stream::iter(due)
            .for_each_concurrent(RESTORING_AT_ONCE, |(tag, source, prefetch)| async move {
                self.restore(connection, epoch, tag, source, prefetch).await;
            })
            .await;
        tracing::info!(consumers = restoring, took = ?started.elapsed(), "consumers restored");
    }

    async fn restore(
        self: &Arc<Self>,
        connection: &Connection,
        epoch: u64,
        tag: String,
        source: Source,
        prefetch: u16,
    ) {
        match self.start(connection, epoch, &tag, &source, prefetch).await {
            Ok(started) => {
                if self.activate(&mut lock(&self.consumers.registrations), &tag, started) {
                    tracing::debug!(%tag, queue = %self.queue_of(&source), "consumer restored");
                }
            }
            Err(error) => {
                let mut consumers = lock(&self.consumers.registrations);
                if let Some(entry) = consumers.get_mut(&tag) {
                    entry.failures += 1;
                    // Soon again, up to a second: the usual refusal is a queue the broker
                    // still holds for the lost connection, let go within moments.
                    let pause = Duration::from_millis(100 << entry.failures.min(3));
                    entry.retry_at = Some(Instant::now() + pause);
                    if error.is_retryable() && entry.failures < 4 {
                        tracing::debug!(%tag, %error, failures = entry.failures, "could not restore a consumer yet; trying again in {pause:?}");
                    } else {
                        tracing::warn!(%tag, %error, failures = entry.failures, "could not restore a consumer; trying again in {pause:?}");
                    }
                }
            }
        }
    }

    pub(super) async fn cancel(self: Arc<Self>, tag: String) -> Result<()> {
        self.broker.check_open()?;
        let Some(entry) = lock(&self.consumers.registrations).remove(&tag) else {
            return Ok(());
        };
        // Without an active channel there is nothing to cancel on the broker: the
        // connection that consumed is gone.
        let Some(guard) = entry.active else {
            return Ok(());
        };
        if let Source::Rpc(identifier) = &entry.source
            && !self.topology.exclusive_rpc_identifiers
        {
            let router = self.rpc.router.lock().await.clone();
            return match router {
                Some(router) if Arc::ptr_eq(&router.guard, &guard) => {
                    self.unroute_rpc(identifier, &router).await
                }
                // Its router is gone with its connection, and the binding with it.
                _ => Ok(()),
            };
        }
        let channel = &guard.channel;
        if !channel.status().connected() {
            return Ok(());
        }
        channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .map_err(amqp_error)?;
        if matches!(
            entry.source,
            Source::Rpc(_) | Source::Broadcasts(_) | Source::Presence(_)
        ) {
            // On the declaring channel: a refusal must not close the shared one.
            let deadline = Instant::now() + self.broker.send_timeout;
            let queue = self.queue_of(&entry.source);
            self.retrying(deadline, "delete queue", || async {
                let declarer = self
                    .channel(self.consumers.declarer(&queue), false, deadline)
                    .await?;
                declarer
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map_err(|e| Attempt::unless_refused(amqp_error_refused(e)))
            })
            .await?;
        }
        Ok(())
    }

    /// A queue's counts by a passive declaration, on a channel of its own (the broker closes
    /// it when the queue does not exist). RabbitMQ says nothing of unacknowledged messages
    /// over AMQP.
    pub(super) async fn queue_stats(self: Arc<Self>, queue: String) -> Result<QueueStats> {
        let declared = self
            .on_own_channel(&queue, async |channel: lapin::Channel| {
                let options = lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                channel
                    .queue_declare(queue.as_str().into(), options, FieldTable::default())
                    .await
            })
            .await?;
        Ok(QueueStats {
            ready: declared.message_count(),
            unacknowledged: None,
            consumers: declared.consumer_count(),
        })
    }

    /// Deletes a queue's ready messages, on a channel of its own.
    pub(super) async fn purge(self: Arc<Self>, queue: String) -> Result<u32> {
        self.on_own_channel(&queue, async |channel: lapin::Channel| {
            channel
                .queue_purge(
                    queue.as_str().into(),
                    lapin::options::QueuePurgeOptions::default(),
                )
                .await
        })
        .await
    }

    /// Runs one request about `queue` on a fresh channel, closed after; a missing queue is
    /// `Refused` naming it.
    async fn on_own_channel<T>(
        &self,
        queue: &str,
        request: impl AsyncFnOnce(lapin::Channel) -> lapin::Result<T>,
    ) -> Result<T> {
        self.broker.check_open()?;
        let deadline = Instant::now() + self.broker.send_timeout;
        let (connection, _) = self.connection(deadline).await?;
        let channel = connection.create_channel().await.map_err(amqp_error)?;
        let result = request(channel.clone()).await;
        if channel.status().connected() {
            let _ = channel.close(200, "done".into()).await;
        }
        result.map_err(|error| queue_error(queue, error))
    }

    pub(super) async fn get(self: Arc<Self>, queue: String) -> Result<Option<Delivery>> {
        self.broker.check_open()?;
        let deadline = Instant::now() + self.broker.send_timeout;
        let (channel, message) = self
            .retrying(deadline, "get", || async {
                let channel = self
                    .channel(&self.consumers.puller, false, deadline)
                    .await?;
                let message = channel
                    .basic_get(queue.as_str().into(), BasicGetOptions::default())
                    .await
                    .map_err(|e| Attempt::unless_refused(queue_error(&queue, e)))?;
                Ok((channel, message))
            })
            .await?;
        Ok(message.map(|m| {
            // The puller channel is shared and stays open: no guard closes it.
            let acker = AmqpAck {
                channel: SettledOn::Shared(channel),
                tag: m.delivery.delivery_tag,
            };
            convert(m.delivery, Acker::new(acker))
        }))
    }
}

/// A broker's error about `queue`: a missing queue is `Refused` naming it, at once (the
/// broker will not make one up), other refusals as [`amqp_error_refused`] says.
fn queue_error(queue: &str, error: lapin::Error) -> Error {
    match soft_error(&error) {
        Some(AMQPSoftError::NOTFOUND) => Error::with_source(
            ErrorKind::Refused(format!("no queue named '{queue}' on the broker")),
            error,
        ),
        _ => amqp_error_refused(error),
    }
}

/// One lapin consumer's deliveries, ready for the actors, then — when it ends because its
/// channel or connection died — a word to the supervisor to consume again.
pub(super) fn deliveries(
    shared: Weak<Shared>,
    tag: String,
    consumer: lapin::Consumer,
    guard: Arc<ConsumerChannel>,
    acks: Acks,
) -> BoxStream<'static, Delivery> {
    let batch = match acks {
        Acks::Batched(prefetch) => Some(AckBatch::new(prefetch, guard.io.clone(), guard.clone())),
        _ => None,
    };
    let logged_tag = tag.clone();
    let delivered = consumer
        .take_while(move |item| {
            if let Err(error) = item {
                let text = error.to_string();
                match explain(error) {
                    Some(advice) => tracing::error!(tag = %logged_tag, error = %text, "{advice}"),
                    None => tracing::debug!(tag = %logged_tag, error = %text, "consumer stopped"),
                }
            }
            futures::future::ready(item.is_ok())
        })
        .filter_map({
            let guard = guard.clone();
            move |item| {
                let delivery = item.ok().map(|delivery| {
                    let acker = match (&batch, acks) {
                        (_, Acks::Auto) => Acker::auto(),
                        (Some(batch), _) => Acker::new(batch.enroll(&delivery)),
                        (None, _) => Acker::new(AmqpAck::new(&delivery, &guard)),
                    };
                    convert(delivery, acker)
                });
                futures::future::ready(delivery)
            }
        });
    let ended = futures::stream::once(async move { consumer_ended(&shared, &tag, &guard) })
        .filter_map(|()| futures::future::ready(None));
    delivered.chain(ended).boxed()
}

/// What feeds a consumer on one connection: a lapin consumer (and how its deliveries are
/// acknowledged), or the calls the communicator's RPC queue routes to an identifier.
pub(super) enum LapinFeed {
    Consumer(lapin::Consumer, Acks),
    Routed(mpsc::UnboundedReceiver<Delivery>),
}

/// The broker's refusal to declare one of this communicator's own exclusive queues (its
/// reply, broadcast and RPC queues). After a lost connection the broker holds such a queue
/// for the old connection until it notices that one is gone (about a second): that
/// `RESOURCE_LOCKED` is a passing state, worth trying again, not a configuration error.
pub(super) fn own_queue_refused(error: lapin::Error, queue: &str) -> Error {
    match soft_error(&error) {
        Some(AMQPSoftError::RESOURCELOCKED) => Error::with_source(
            ErrorKind::Connection(format!(
                "the broker still holds the queue '{queue}' for this communicator's previous \
                 connection"
            )),
            error,
        ),
        _ => amqp_error_refused(error),
    }
}

/// A lapin consumer ended. Unless it was cancelled or already replaced, the consumer waits
/// to be restored, and the supervisor is told at once.
pub(super) fn consumer_ended(shared: &Weak<Shared>, tag: &str, guard: &Arc<ConsumerChannel>) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    let mut consumers = lock(&shared.consumers.registrations);
    if let Some(entry) = consumers.get_mut(tag)
        && entry
            .active
            .as_ref()
            .is_some_and(|active| Arc::ptr_eq(active, guard))
    {
        entry.active = None;
        drop(consumers);
        tracing::info!(%tag, "consumer interrupted; restoring it");
        shared.broker.wake.notify_one();
    }
}

/// How a consumer's deliveries are acknowledged.
#[derive(Debug, Clone, Copy)]
pub(super) enum Acks {
    /// By the broker on delivery (no window).
    Auto,
    /// One by one (task and reply queues, and consumers on shared channels).
    Each,
    /// In batches, within a window of this many (see `ack_batch`).
    Batched(u16),
}

pub(super) fn convert(delivery: lapin::message::Delivery, acker: Acker) -> Delivery {
    let properties = &delivery.properties;
    let traceparent = properties.headers().as_ref().and_then(|headers| {
        match headers.inner().get("traceparent")? {
            lapin::types::AMQPValue::LongString(text) => {
                crate::trace::TraceContext::parse(std::str::from_utf8(text.as_bytes()).ok()?)
            }
            lapin::types::AMQPValue::ShortString(text) => {
                crate::trace::TraceContext::parse(text.as_str())
            }
            _ => None,
        }
    });
    let delivery_count = properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("x-delivery-count"))
        .and_then(delivery_count);
    Delivery {
        delivery_count: delivery_count.unwrap_or(0),
        correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
        reply_to: properties.reply_to().as_ref().map(|s| s.to_string()),
        traceparent,
        redelivered: delivery.redelivered,
        body: delivery.data.into(),
        acker,
    }
}

/// The count in an `x-delivery-count` header, whatever integer type the broker chose.
fn delivery_count(value: &lapin::types::AMQPValue) -> Option<u32> {
    use lapin::types::AMQPValue::*;
    let count: i64 = match value {
        ShortShortInt(n) => (*n).into(),
        ShortShortUInt(n) => (*n).into(),
        ShortInt(n) => (*n).into(),
        ShortUInt(n) => (*n).into(),
        LongInt(n) => (*n).into(),
        LongUInt(n) => (*n).into(),
        LongLongInt(n) => *n,
        _ => return None,
    };
    u32::try_from(count).ok()
}

/// Settles one delivery with a frame on the channel it came on, queued from the settling
/// thread. lapin's `Acker` would send the frame from lapin's runtime, a thread woken for
/// every delivery. The channel is the one object it came on: once that is gone the frame is
/// refused, never sent on a channel opened after it, where the tag names another delivery.
pub(super) struct AmqpAck {
    channel: SettledOn,
    tag: u64,
}

/// The channel a delivery came on, held until it is settled.
pub(super) enum SettledOn {
    /// A consumer's channel of its own, kept open until its deliveries are settled.
    Consumer(Arc<ConsumerChannel>),
    /// The shared puller channel.
    Shared(Arc<Channel>),
}

impl AmqpAck {
    /// Settles `delivery`, which came on `guard`'s channel, kept open until then.
    pub(super) fn new(delivery: &lapin::message::Delivery, guard: &Arc<ConsumerChannel>) -> Self {
        Self {
            channel: SettledOn::Consumer(guard.clone()),
            tag: delivery.delivery_tag,
        }
    }

    /// The ack, nack or reject `outcome` asks for.
    async fn send(&self, outcome: Outcome) -> lapin::Result<()> {
        let channel = match &self.channel {
            SettledOn::Consumer(guard) => &guard.channel,
            SettledOn::Shared(channel) => channel,
        };
        match outcome {
            Outcome::Ack => {
                channel
                    .basic_ack(self.tag, BasicAckOptions::default())
                    .await
            }
            Outcome::Requeue => {
                let options = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                channel.basic_nack(self.tag, options).await
            }
            Outcome::Discard => {
                let options = BasicRejectOptions { requeue: false };
                channel.basic_reject(self.tag, options).await
            }
        }
    }
}

impl Settle for AmqpAck {
    /// Hands the ack, nack or reject to lapin right here: the first poll of lapin's future
    /// queues the frame, so nothing is spawned per delivery. Only a refusal known at once
    /// (the delivery's channel is gone) is reported; what happens to the frame later is the
    /// connection's story, and an unsettled delivery comes again anyway.
    fn settle(self: Box<Self>, outcome: Outcome) {
        if let Some(error) = queue_now(async move { self.send(outcome).await }) {
            tracing::warn!(?outcome, %error, "delivery not settled: its channel is gone, the broker will redeliver it");
        }
    }
}

/// Polls lapin's ack, nack or reject once, which queues its frame: the broker answers none,
/// so nothing is left to await. The error if the channel refused it at once (it is gone).
pub(super) fn queue_now(settling: impl Future<Output = lapin::Result<()>>) -> Option<lapin::Error> {
    let mut context = std::task::Context::from_waker(futures::task::noop_waker_ref());
    match pin!(settling).poll(&mut context) {
        std::task::Poll::Ready(Err(error)) => Some(error),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPErrorKind};

    use super::*;

    /// A delivery settled after its channel closed is refused: the frame never goes on the
    /// channel the consumer has now, where its tag names another delivery. On the shared
    /// broker, a queue of the test's own.
    #[tokio::test]
    async fn a_settle_after_its_channel_closed_never_lands_on_the_next_channel() {
        use lapin::options::{
            BasicPublishOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
        };
        let uri = std::env::var("KIWIMQ_URL")
            .ok()
            .filter(|uri| uri.starts_with("amqp://"))
            .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let connection = Connection::connect(&uri, lapin::ConnectionProperties::default())
            .await
            .expect("the test broker answers");
        let queue = format!("kiwimq-test-settle-{}", uuid::Uuid::new_v4().simple());
        let setup = connection.create_channel().await.unwrap();
        // Gone a minute after its last use even if the test fails before it deletes it.
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-expires".into(),
            lapin::types::AMQPValue::LongUInt(60_000),
        );
        setup
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await
            .unwrap();
        for body in [b"first", b"other"] {
            setup
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    Default::default(),
                )
                .await
                .unwrap();
        }
        // One delivery at a time, so a stray ack of the next channel's tag would let a
        // second one through, and the next channel's own ack of that tag would be refused.
        let take = async |channel: &Channel| {
            channel
                .basic_qos(1, BasicQosOptions::default())
                .await
                .unwrap();
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            consumer.next().await.unwrap().unwrap()
        };
        let first = connection.create_channel().await.unwrap();
        let stale = take(&first).await;
        let guard = Arc::new(ConsumerChannel {
            channel: first.clone(),
            io: Handle::current(),
        });
        let settle = Box::new(AmqpAck::new(&stale, &guard));
        first.close(200, "test".into()).await.unwrap();
        let next = connection.create_channel().await.unwrap();
        let taken = take(&next).await;
        assert_eq!(
            taken.delivery_tag, stale.delivery_tag,
            "the same tag, another delivery"
        );
        settle.settle(Outcome::Ack);
        // The next channel's own ack of its tag goes through only if that tag was not
        // acknowledged already (the broker would close the channel: unknown delivery tag);
        // qos is a round trip after it on the same channel.
        next.basic_ack(taken.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();
        next.basic_qos(1, BasicQosOptions::default())
            .await
            .expect("the next channel is open: its tag was acknowledged once");
        setup
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        drop(guard);
        connection.close(200, "done".into()).await.unwrap();
    }

    fn refusal(soft: AMQPSoftError, text: &str) -> lapin::Error {
        let error = AMQPError::new(AMQPErrorKind::Soft(soft), text.into());
        lapin::ErrorKind::ProtocolError(error).into()
    }

    #[test]
    fn an_own_queue_the_broker_still_holds_is_worth_another_try() {
        let held = refusal(
            AMQPSoftError::RESOURCELOCKED,
            "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'q'",
        );
        let error = own_queue_refused(held, "q");
        assert!(error.is_retryable(), "{error}");
        assert!(
            error.to_string().contains("still holds the queue 'q'"),
            "{error}"
        );
    }

    #[test]
    fn a_limit_reached_is_refused_and_other_refusals_are_configuration() {
        let limit = refusal(
            AMQPSoftError::PRECONDITIONFAILED,
            "PRECONDITION_FAILED - cannot declare queue 'q': queue limit in vhost 'v' (3) is reached",
        );
        let error = own_queue_refused(limit, "q");
        assert!(matches!(error.kind(), ErrorKind::Refused(_)), "{error}");
        let other = refusal(
            AMQPSoftError::PRECONDITIONFAILED,
            "PRECONDITION_FAILED - inequivalent arg 'x-expires' for queue 'q'",
        );
        let error = own_queue_refused(other, "q");
        assert!(matches!(error.kind(), ErrorKind::Config(_)), "{error}");
        assert!(!error.is_retryable());
    }
}
