//! The `amqp://` backend: RabbitMQ through lapin, speaking kiwiPy 0.9's wire protocol.
//!
//! A [`ConnectionSupervisor`](supervisor::ConnectionSupervisor) actor owns the connection on
//! the communicator's runtime; [`AmqpTransport`] publishes on one confirm-mode channel (many
//! publishes in flight, each awaiting only its own confirm), gives every consumer a channel
//! of its own (its prefetch, and errors that stay local), and pulls on a channel of its own.

mod supervisor;
mod topology;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use actix::{Actor, Addr};
use actix_rt::ArbiterHandle;
use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt};
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::error::{Error, ErrorKind, Result};
use crate::runtime::Runtime;
use crate::settings::Settings;
use crate::transport::{
    Acker, Consumer, Delivery, Exchange, Outcome, Outgoing, Route, Settle, Source, Transport,
};
use supervisor::{Close, ConnectionSupervisor, OpenChannel};
use topology::{BROADCAST_TOPIC, RPC_TOPIC, Topology};

/// Connects to RabbitMQ on the communicator's runtime, within the connect timeout, and
/// declares both exchanges.
pub(crate) async fn connect(settings: &Settings, runtime: &Runtime) -> Result<Arc<dyn Transport>> {
    let uri = settings.uri.clone();
    let redacted = settings.redacted_uri();
    let timeout = settings.connect_timeout;
    let connect = async move {
        let properties = ConnectionProperties::default();
        match tokio::time::timeout(timeout, Connection::connect(&uri, properties)).await {
            Ok(Ok(connection)) => Ok(ConnectionSupervisor::new(connection).start()),
            Ok(Err(error)) => Err(Error::with_source(
                ErrorKind::Connection(format!("cannot connect to {redacted}: {error}")),
                error,
            )),
            Err(_) => Err(Error::new(ErrorKind::Timeout)),
        }
    };
    let supervisor = runtime.run(connect).await??;
    let shared = Arc::new(Shared {
        supervisor,
        topology: Topology::new(settings),
        arbiter: runtime.arbiter().clone(),
        publisher: Slot::default(),
        puller: Slot::default(),
        consumers: Mutex::default(),
        closed: AtomicBool::new(false),
    });
    let channel = shared.publisher().await?;
    shared
        .topology
        .declare_exchanges(&channel)
        .await
        .map_err(amqp_error)?;
    Ok(Arc::new(AmqpTransport(shared)))
}

/// A lapin error as a kiwimq error.
fn amqp_error(error: lapin::Error) -> Error {
    let reason = error.to_string();
    Error::with_source(ErrorKind::Connection(reason), error)
}

fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// A channel opened on demand and reopened after the broker closed it.
#[derive(Default)]
struct Slot(Mutex<Option<Channel>>);

/// A consumer's channel, closed once the consumer is cancelled and every delivery it
/// handed out is settled (closing earlier would requeue tasks still being worked on).
struct ConsumerChannel {
    channel: Channel,
    arbiter: ArbiterHandle,
}

impl Drop for ConsumerChannel {
    fn drop(&mut self) {
        let channel = self.channel.clone();
        self.arbiter.spawn(async move {
            if channel.status().connected() {
                let _ = channel.close(200, "consumer cancelled".into()).await;
            }
        });
    }
}

/// A running consumer's channel, and the queue to delete when it is cancelled.
type Registered = (Arc<ConsumerChannel>, Option<String>);

struct Shared {
    supervisor: Addr<ConnectionSupervisor>,
    topology: Topology,
    arbiter: ArbiterHandle,
    publisher: Slot,
    puller: Slot,
    /// Consumer tag → its channel (and, for an RPC or broadcast consumer, its queue to
    /// delete on cancel).
    consumers: Mutex<HashMap<String, Registered>>,
    closed: AtomicBool,
}

impl Shared {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed());
        }
        Ok(())
    }

    async fn open(&self, confirm: bool) -> Result<Channel> {
        self.supervisor
            .send(OpenChannel { confirm })
            .await
            .map_err(|_| Error::closed())?
    }

    async fn slot(&self, slot: &Slot, confirm: bool) -> Result<Channel> {
        if let Some(channel) = slot.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = self.open(confirm).await?;
        *slot.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(channel.clone());
        Ok(channel)
    }

    async fn publisher(&self) -> Result<Channel> {
        self.slot(&self.publisher, true).await
    }

    async fn publish(self: Arc<Self>, route: Route, message: Outgoing) -> Result<()> {
        self.check_open()?;
        let topology = &self.topology;
        let (exchange, routing_key) = match &route {
            Route::Task(queue) => (topology.exchange(Exchange::Tasks), queue.clone()),
            Route::Rpc(identifier) => (
                topology.exchange(Exchange::Messages),
                format!("{RPC_TOPIC}.{identifier}"),
            ),
            Route::Broadcast => (
                topology.exchange(Exchange::Messages),
                BROADCAST_TOPIC.to_owned(),
            ),
            Route::Reply(exchange, queue) => (topology.exchange(*exchange), queue.clone()),
        };
        let mut properties = BasicProperties::default();
        if let Some(correlation_id) = message.correlation_id {
            properties = properties.with_correlation_id(correlation_id.into());
        }
        if let Some(reply_to) = message.reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        if message.persistent {
            properties = properties.with_delivery_mode(2);
        }
        let options = BasicPublishOptions {
            mandatory: message.mandatory,
            ..Default::default()
        };
        let channel = self.publisher().await?;
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.as_str().into(),
                options,
                &message.body,
                properties,
            )
            .await
            .map_err(amqp_error)?;
        match confirm.await.map_err(amqp_error)? {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                tracing::debug!(%exchange, %routing_key, code = returned.reply_code, "message returned unroutable");
                Err(Error::new(ErrorKind::Unroutable(routing_key)))
            }
            Confirmation::Nack(_) => Err(Error::new(ErrorKind::Nacked)),
        }
    }

    async fn consume(self: Arc<Self>, source: Source, prefetch: u16) -> Result<Consumer> {
        self.check_open()?;
        let channel = self.open(false).await?;
        let topology = &self.topology;
        let tag = match &source {
            Source::Rpc(identifier) => identifier.clone(),
            _ => format!("kiwimq-{}", uuid::Uuid::new_v4()),
        };
        let (queue, delete_on_cancel, no_ack) = match &source {
            Source::Tasks(queue) => {
                channel
                    .basic_qos(prefetch, BasicQosOptions::default())
                    .await
                    .map_err(amqp_error)?;
                topology
                    .declare_task_queue(&channel, queue)
                    .await
                    .map_err(amqp_error)?;
                (queue.clone(), false, false)
            }
            Source::Rpc(identifier) => {
                let queue = topology
                    .declare_rpc_queue(&channel, identifier)
                    .await
                    .map_err(|e| match soft_error(&e) {
                        Some(AMQPSoftError::RESOURCELOCKED) => {
                            Error::new(ErrorKind::DuplicateSubscriber(identifier.clone()))
                        }
                        _ => amqp_error(e),
                    })?;
                (queue, true, true)
            }
            Source::Broadcasts(queue) => {
                topology
                    .declare_broadcast_queue(&channel, queue)
                    .await
                    .map_err(amqp_error)?;
                (queue.clone(), true, true)
            }
            Source::Replies(exchange, queue) => {
                topology
                    .declare_reply_queue(&channel, *exchange, queue)
                    .await
                    .map_err(amqp_error)?;
                (queue.clone(), false, true)
            }
        };
        let options = BasicConsumeOptions {
            no_ack,
            ..Default::default()
        };
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                options,
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error)?;
        let guard = Arc::new(ConsumerChannel {
            channel,
            arbiter: self.arbiter.clone(),
        });
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                tag.clone(),
                (guard.clone(), delete_on_cancel.then(|| queue.clone())),
            );
        let arbiter = self.arbiter.clone();
        let deliveries = consumer
            .take_while(|delivery| {
                if let Err(error) = delivery {
                    tracing::warn!(%error, "consumer stopped");
                }
                futures::future::ready(delivery.is_ok())
            })
            .filter_map(move |delivery| {
                let acker = match (&delivery, no_ack) {
                    (Ok(_), true) | (Err(_), _) => None,
                    (Ok(d), false) => Some(AmqpAck {
                        acker: d.acker.clone(),
                        arbiter: arbiter.clone(),
                        _channel: Some(guard.clone()),
                    }),
                };
                futures::future::ready(delivery.ok().map(|d| convert(d, acker)))
            })
            .boxed();
        Ok(Consumer { tag, deliveries })
    }

    async fn cancel(self: Arc<Self>, tag: String) -> Result<()> {
        self.check_open()?;
        let entry = self
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&tag);
        let Some((guard, delete)) = entry else {
            return Ok(());
        };
        let channel = &guard.channel;
        channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .map_err(amqp_error)?;
        if let Some(queue) = delete {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(amqp_error)?;
        }
        Ok(())
    }

    async fn get(self: Arc<Self>, queue: String) -> Result<Option<Delivery>> {
        self.check_open()?;
        let channel = self.slot(&self.puller, false).await?;
        let message = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .map_err(amqp_error)?;
        Ok(message.map(|m| {
            // The puller channel is shared and stays open: no guard.
            let acker = AmqpAck {
                acker: m.delivery.acker.clone(),
                arbiter: self.arbiter.clone(),
                _channel: None,
            };
            convert(m.delivery, Some(acker))
        }))
    }
}

fn convert(delivery: lapin::message::Delivery, acker: Option<AmqpAck>) -> Delivery {
    let properties = &delivery.properties;
    Delivery {
        correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
        reply_to: properties.reply_to().as_ref().map(|s| s.to_string()),
        redelivered: delivery.redelivered,
        body: delivery.data.into(),
        acker: acker.map_or_else(Acker::auto, Acker::new),
    }
}

/// Settles one delivery on its channel, from the runtime.
struct AmqpAck {
    acker: lapin::Acker,
    arbiter: ArbiterHandle,
    /// Keeps the consumer's channel open until this delivery is settled.
    _channel: Option<Arc<ConsumerChannel>>,
}

impl Settle for AmqpAck {
    fn settle(self: Box<Self>, outcome: Outcome) {
        let AmqpAck {
            acker,
            arbiter,
            _channel,
        } = *self;
        arbiter.spawn(async move {
            let result = match outcome {
                Outcome::Ack => acker.ack(BasicAckOptions::default()).await,
                Outcome::Requeue => acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await,
                Outcome::Discard => acker.reject(BasicRejectOptions { requeue: false }).await,
            };
            match result {
                Ok(true) => {}
                Ok(false) => tracing::warn!(?outcome, "delivery not settled: its channel is gone, the broker will redeliver it"),
                Err(error) => tracing::warn!(?outcome, %error, "settling a delivery failed; the broker will redeliver it"),
            }
            drop(_channel);
        });
    }
}

/// The transport over one RabbitMQ connection.
pub(crate) struct AmqpTransport(Arc<Shared>);

impl Transport for AmqpTransport {
    fn declare_task_queue(&self, queue: &str) -> BoxFuture<'static, Result<()>> {
        let shared = self.0.clone();
        let queue = queue.to_owned();
        async move {
            shared.check_open()?;
            let channel = shared.publisher().await?;
            shared
                .topology
                .declare_task_queue(&channel, &queue)
                .await
                .map_err(amqp_error)
        }
        .boxed()
    }

    fn publish(&self, route: Route, message: Outgoing) -> BoxFuture<'static, Result<()>> {
        self.0.clone().publish(route, message).boxed()
    }

    fn consume(&self, source: Source, prefetch: u16) -> BoxFuture<'static, Result<Consumer>> {
        self.0.clone().consume(source, prefetch).boxed()
    }

    fn cancel(&self, tag: &str) -> BoxFuture<'static, Result<()>> {
        self.0.clone().cancel(tag.to_owned()).boxed()
    }

    fn get(&self, queue: &str) -> BoxFuture<'static, Result<Option<Delivery>>> {
        self.0.clone().get(queue.to_owned()).boxed()
    }

    fn close(&self) -> BoxFuture<'static, Result<()>> {
        let shared = self.0.clone();
        async move {
            if shared.closed.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            shared
                .consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            shared
                .supervisor
                .send(Close)
                .await
                .map_err(|_| Error::closed())?
        }
        .boxed()
    }
}
