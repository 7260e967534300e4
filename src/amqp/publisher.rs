//! Publishing: from the caller's task when the publisher channel is ready, else on the I/O
//! runtime with waiting and retries; publisher confirms, returns (unroutable) and the
//! broker's refusals.

use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Future;
use futures::future::Either;
use lapin::options::BasicPublishOptions;
use lapin::protocol::AMQPSoftError;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::time::Instant;

use super::{
    Attempt, Shared, Slot, State, TICK, amqp_error, amqp_error_refused, lock, soft_error, usable,
};
use crate::error::{Error, ErrorKind, Result};
use crate::settings::Settings;
use crate::transport::{BROADCAST_TOPIC, Exchange, Outgoing, PRESENCE_TOPIC, Route, rpc_key};

/// The publisher channel (confirms on), and what every publish obeys.
pub(super) struct Publisher {
    pub(super) channel: Slot,
    /// Held while a publish is numbered and queued: see [`Shared::publish_in_order`].
    pub(super) order: Mutex<()>,
    /// The largest body a publish may carry; larger ones are refused before sending.
    pub(super) max_message_size: usize,
}

impl Publisher {
    pub(super) fn new(settings: &Settings) -> Self {
        Self {
            channel: Slot::default(),
            order: Mutex::new(()),
            max_message_size: settings.max_message_size,
        }
    }
}

impl Shared {
    /// Where a route goes: exchange and routing key.
    pub(super) fn address(&self, route: &Route) -> (&str, String) {
        let topology = &self.topology;
        match route {
            Route::Task(queue) => (topology.exchange(Exchange::Tasks), queue.to_string()),
            Route::Rpc(identifier) => (topology.exchange(Exchange::Messages), rpc_key(identifier)),
            Route::Broadcast => (
                topology.exchange(Exchange::Messages),
                BROADCAST_TOPIC.to_owned(),
            ),
            Route::Presence => (&topology.presence_exchange, PRESENCE_TOPIC.to_owned()),
            // Straight to the queue through the default exchange, which always exists and
            // needs no binding: a reply reaches a reply queue that survived a broker restart
            // before its owner reconnected and bound it again.
            Route::Reply(queue) => ("", queue.clone()),
        }
    }

    /// The publisher's channel when it is ready now, without waiting or opening anything.
    pub(super) fn ready_publisher(&self) -> Option<Arc<Channel>> {
        let epoch = match &*self.broker.state.borrow() {
            State::Up(_, epoch) => *epoch,
            _ => return None,
        };
        usable(&*self.publisher.channel.0.try_lock().ok()?, epoch)
    }

    /// Resolves `after` from now, give or take a [`TICK`], on any executor.
    pub(super) fn expiry(&self, after: Duration) -> impl Future<Output = ()> + use<> {
        let mut clock = self.broker.clock.subscribe();
        let ticks = after.as_millis().div_ceil(TICK.as_millis());
        let target = *clock.borrow() + u64::try_from(ticks).unwrap_or(u64::MAX / 2) + 1;
        async move {
            let _ = clock.wait_for(|now| *now >= target).await;
        }
    }

    /// Publishes from the caller's task when the publisher channel is ready (no hop to
    /// the I/O runtime, the common case), else — or when that fails — on the I/O runtime
    /// with waiting and retries. Bounded by the send timeout either way.
    pub(super) async fn send(self: Arc<Self>, route: Route, message: Outgoing) -> Result<()> {
        self.broker.check_open()?;
        message.check_size(self.publisher.max_message_size)?;
        let started = std::time::Instant::now();
        if let Some(channel) = self.ready_publisher() {
            let (exchange, routing_key) = self.address(&route);
            let attempt = async {
                let confirm = self
                    .publish_in_order(
                        &channel,
                        exchange,
                        &routing_key,
                        publish_options(&message),
                        &message.body,
                        properties(&message),
                    )
                    .await?;
                confirm.await
            };
            let expiry = self.expiry(self.broker.send_timeout);
            let outcome = match futures::future::select(pin!(attempt), pin!(expiry)).await {
                Either::Left((outcome, _)) => Some(outcome),
                Either::Right(_) => None,
            };
            match outcome {
                Some(Ok(confirmation)) => {
                    return confirmed(confirmation, exchange, routing_key);
                }
                Some(Err(error)) => {
                    if let Some(refused) = self.refusal(&error, exchange, message.body.len()) {
                        return Err(refused);
                    }
                    tracing::debug!(%error, "publish failed; trying again on the I/O runtime");
                    self.broker.wake.notify_one();
                }
                None => return Err(self.unconfirmed("publish")),
            }
        }
        let left = self.broker.send_timeout.saturating_sub(started.elapsed());
        let shared = self.clone();
        self.io
            .run(shared.publish(route, message, left))
            .await
            .and_then(|result| result)
    }

    /// `basic_publish` with its confirm numbered in the order its frames are queued.
    ///
    /// lapin numbers a publish (the delivery tag its confirm waits for) and then queues its
    /// frames, both in the future's first poll, without a lock between them: two threads
    /// publishing on one channel can queue in the other order than they were numbered, and
    /// the broker's ack of one then completes the other's confirm. That reports a message
    /// confirmed that the broker has not got (seen: a 140 MiB body the broker refused,
    /// reported acked while other threads published; `tests/refusals.rs`). The first poll
    /// runs under [`Shared::publish_order`], which makes numbering and queueing one step;
    /// awaiting the frames' sending and the confirm happens outside it.
    pub(super) async fn publish_in_order(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<PublisherConfirm> {
        let mut publish = pin!(channel.basic_publish(
            exchange.into(),
            routing_key.into(),
            options,
            body,
            properties
        ));
        let mut order = Some(&self.publisher.order);
        std::future::poll_fn(|context| match order.take() {
            Some(order) => {
                let _queueing = lock(order);
                publish.as_mut().poll(context)
            }
            None => publish.as_mut().poll(context),
        })
        .await
    }

    /// The broker's refusal of a publish when it is this message's own — the broker names
    /// its size or its exchange — and no retry can change it (too large, no such exchange,
    /// access refused, a failed precondition). Every publish pending on the channel the
    /// broker closed fails with the same error; the others are sent again. A missing
    /// exchange of our own is declared again, so the next send finds it.
    pub(super) fn refusal(
        self: &Arc<Self>,
        error: &lapin::Error,
        exchange: &str,
        size: usize,
    ) -> Option<Error> {
        soft_error(error)?;
        let text = error.to_string();
        let ours = text.contains(&format!("message size {size} "))
            || (!exchange.is_empty() && text.contains(&format!("'{exchange}'")));
        if !ours {
            return None;
        }
        if soft_error(error) == Some(AMQPSoftError::NOTFOUND) && self.topology.owns(exchange) {
            let shared = self.clone();
            self.io.handle.spawn(async move {
                let State::Up(connection, _) = shared.broker.state.borrow().clone() else {
                    return;
                };
                if let Err(error) = shared.declare_topology(&connection).await {
                    tracing::warn!(%error, "declaring the exchanges again failed");
                }
            });
        }
        Some(refused(error))
    }

    pub(super) fn unconfirmed(&self, what: &str) -> Error {
        let mut text = format!(
            "{what}: no confirmation from the broker within the send timeout ({:?})",
            self.broker.send_timeout
        );
        if let Some(reason) = &*lock(&self.broker.blocked) {
            text.push_str(&format!(
                "; the broker blocks this connection's publishes: {reason} (a memory or disk \
                 alarm: RabbitMQ's vm_memory_high_watermark or disk_free_limit)"
            ));
        }
        Error::timeout(text)
    }

    /// Publishes, waiting for the connection and retrying until confirmed, within `within`.
    pub(super) async fn publish(
        self: Arc<Self>,
        route: Route,
        message: Outgoing,
        within: Duration,
    ) -> Result<()> {
        self.broker.check_open()?;
        let deadline = Instant::now() + within;
        let (exchange, routing_key) = self.address(&route);
        let (options, properties) = (publish_options(&message), properties(&message));
        let body = &message.body;
        let refusals = std::sync::atomic::AtomicU32::new(0);
        let refusals = &refusals;
        let confirmation = self
            .retrying(deadline, "publish", || async {
                let channel = self
                    .channel(&self.publisher.channel, true, deadline)
                    .await?;
                let sent = self
                    .publish_in_order(
                        &channel,
                        exchange,
                        &routing_key,
                        options,
                        body,
                        properties.clone(),
                    )
                    .await;
                let confirmed = match sent {
                    Ok(confirm) => confirm.await,
                    Err(error) => Err(error),
                };
                match confirmed {
                    Ok(confirmation) => Ok(confirmation),
                    Err(error) => match self.refusal(&error, exchange, body.len()) {
                        Some(refused) => Err(Attempt::Final(refused)),
                        // A refusal that names nothing of this message may be another
                        // publish's on the shared channel: once more on a fresh channel,
                        // then it is this message's.
                        None if soft_error(&error).is_some()
                            && refusals.fetch_add(1, Ordering::Relaxed) > 0 =>
                        {
                            Err(Attempt::Final(refused(&error)))
                        }
                        None => Err(Attempt::Again(amqp_error(error))),
                    },
                }
            })
            .await?;
        confirmed(confirmation, exchange, routing_key)
    }

    pub(super) async fn declare_task_queue(self: Arc<Self>, queue: String) -> Result<()> {
        self.broker.check_open()?;
        let deadline = Instant::now() + self.broker.send_timeout;
        self.retrying(deadline, "declare queue", || async {
            let channel = self
                .channel(&self.publisher.channel, true, deadline)
                .await?;
            self.topology
                .declare_task_queue(&channel, &queue)
                .await
                .map_err(|e| Attempt::unless_refused(amqp_error_refused(e)))
        })
        .await?;
        // Declared again after a reconnection; one the broker refused is not.
        lock(&self.consumers.task_queues).insert(queue);
        Ok(())
    }
}

pub(super) fn properties(message: &Outgoing) -> BasicProperties {
    let mut properties = BasicProperties::default();
    if let Some(correlation_id) = &message.correlation_id {
        properties = properties.with_correlation_id(correlation_id.as_str().into());
    }
    if let Some(reply_to) = &message.reply_to {
        properties = properties.with_reply_to(reply_to.as_str().into());
    }
    if message.persistent {
        properties = properties.with_delivery_mode(2);
    }
    if let Some(traceparent) = &message.traceparent {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "traceparent".into(),
            lapin::types::AMQPValue::LongString(traceparent.traceparent().into()),
        );
        properties = properties.with_headers(headers);
    }
    properties
}

pub(super) fn publish_options(message: &Outgoing) -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: message.mandatory,
        ..Default::default()
    }
}

/// What a publisher confirm means for the sender.
pub(super) fn confirmed(
    confirmation: Confirmation,
    exchange: &str,
    routing_key: String,
) -> Result<()> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) => {
            tracing::debug!(%exchange, %routing_key, code = returned.reply_code, "message returned unroutable");
            Err(Error::new(ErrorKind::Unroutable(routing_key)))
        }
        Confirmation::Nack(_) => Err(Error::new(ErrorKind::Nacked)),
    }
}

/// A publish the broker refused, in the broker's words.
pub(super) fn refused(error: &lapin::Error) -> Error {
    let reason = format!("the broker refused the message: {error}");
    tracing::warn!(%reason, "publish refused");
    Error::with_source(ErrorKind::Refused(reason), error.clone())
}
