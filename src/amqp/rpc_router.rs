//! The communicator's RPC queue: one exclusive queue, consumed once per connection, bound
//! once per RPC identifier it serves with `[rpc].<identifier>`. Each call goes to its
//! identifier's stream by the routing key it came with, on the runtime where the
//! `RpcEndpoint`s that read those streams run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use futures::channel::mpsc;
use lapin::Connection;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions};
use lapin::types::FieldTable;
use tokio::time::Instant;

use super::ack_batch::AckBatch;
use super::consumers::{LapinFeed, convert, own_queue_refused};

use super::consumers::ConsumerChannel;
use super::{Attempt, Shared, amqp_error, amqp_error_refused, lock};
use crate::error::{Error, Result};
use crate::settings::Settings;
use crate::transport::{Acker, Delivery, Outcome, RPC_TOPIC, Source, rpc_key};

/// The communicator's RPC queue, and its consumer on the current connection.
pub(super) struct RpcRouting {
    /// The communicator's one RPC queue, bound once per identifier it serves (unless each
    /// identifier has an exclusive queue of its own).
    pub(super) queue: String,
    /// The RPC queue's consumer on the current connection, and where it sends each
    /// identifier's calls.
    pub(super) router: tokio::sync::Mutex<Option<Arc<RpcRouter>>>,
    /// Where the consumer-side actors run, and so where the RPC queue's calls are routed
    /// to their identifiers: a call then crosses from lapin's I/O loop to the actors'
    /// thread once, as a queue of its own would (routed on the I/O runtime, it crossed
    /// twice, and the RPC round trip took ~10% longer).
    pub(super) actors: actix_rt::ArbiterHandle,
}

impl RpcRouting {
    pub(super) fn new(settings: &Settings, actors: actix_rt::ArbiterHandle) -> Self {
        Self {
            queue: format!(
                "{}.rpc-{}",
                settings.message_exchange,
                uuid::Uuid::new_v4().simple()
            ),
            router: tokio::sync::Mutex::default(),
            actors,
        }
    }
}

/// The consumer of a communicator's RPC queue on one connection: each call goes to its
/// identifier's stream by the routing key it was sent with.
pub(super) struct RpcRouter {
    epoch: u64,
    /// The prefetch window its calls are acknowledged in; none: they settle themselves.
    window: Option<u16>,
    pub(super) guard: Arc<ConsumerChannel>,
    /// Identifier → its consumer's deliveries on this connection. Emptied when the queue's
    /// consumer ends, which ends each identifier's stream: each is then restored.
    routes: Mutex<HashMap<String, mpsc::UnboundedSender<Delivery>>>,
}

impl Shared {
    /// The communicator's RPC queue consumed on `connection` (number `epoch`), declared
    /// and consumed when it is not yet.
    async fn rpc_router(
        self: &Arc<Self>,
        connection: &Connection,
        epoch: u64,
    ) -> Result<Arc<RpcRouter>> {
        let mut held = self.rpc.router.lock().await;
        if let Some(router) = &*held
            && router.epoch == epoch
            && router.guard.channel.status().connected()
        {
            return Ok(router.clone());
        }
        let guard = self.own_channel(connection).await?;
        let queue = self.rpc.queue.as_str();
        self.topology
            .declare_rpc_router_queue(&guard.channel, queue)
            .await
            .map_err(|error| own_queue_refused(error, queue))?;
        let prefetch = self.consumers.message_prefetch;
        if prefetch > 0 {
            guard
                .channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await
                .map_err(amqp_error)?;
        }
        let options = BasicConsumeOptions {
            // With a window, each call is acknowledged once answered: a flood of calls
            // waits in the broker.
            no_ack: prefetch == 0,
            ..Default::default()
        };
        let consumer = guard
            .channel
            .basic_consume(
                queue.into(),
                "kiwimq-rpc".into(),
                options,
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error)?;
        let router = Arc::new(RpcRouter {
            window: (prefetch > 0).then_some(prefetch),
            epoch,
            guard,
            routes: Mutex::default(),
        });
        if !self.rpc.actors.spawn(route_calls(router.clone(), consumer)) {
            return Err(Error::closed());
        }
        *held = Some(router.clone());
        Ok(router)
    }

    /// Serves `identifier` from the communicator's RPC queue: its calls are routed to a
    /// stream of their own, then the queue is bound with the identifier's routing key.
    pub(super) async fn route_rpc(
        self: &Arc<Self>,
        connection: &Connection,
        epoch: u64,
        identifier: &str,
    ) -> Result<(Arc<ConsumerChannel>, LapinFeed)> {
        let router = self.rpc_router(connection, epoch).await?;
        let (sender, receiver) = mpsc::unbounded();
        lock(&router.routes).insert(identifier.to_owned(), sender);
        let bound = async {
            let declarer = self
                .channel_on(
                    self.consumers.declarer(identifier),
                    false,
                    connection,
                    epoch,
                )
                .await?;
            declarer
                .queue_bind(
                    self.rpc.queue.as_str().into(),
                    self.topology.message_exchange.as_str().into(),
                    rpc_key(identifier).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|error| self.declare_error(error, &Source::Rpc(identifier.to_owned()), ""))
        };
        match bound.await {
            Ok(()) => Ok((router.guard.clone(), LapinFeed::Routed(receiver))),
            Err(error) => {
                lock(&router.routes).remove(identifier);
                Err(error)
            }
        }
    }

    /// Stops serving `identifier` from the communicator's RPC queue: unbound, then its
    /// stream ends. Nothing to do on the broker when its connection is gone.
    pub(super) async fn unroute_rpc(
        self: &Arc<Self>,
        identifier: &str,
        router: &RpcRouter,
    ) -> Result<()> {
        if router.guard.channel.status().connected() {
            let deadline = Instant::now() + self.broker.send_timeout;
            let key = rpc_key(identifier);
            self.retrying(deadline, "unbind", || async {
                let declarer = self
                    .channel(self.consumers.declarer(identifier), false, deadline)
                    .await?;
                declarer
                    .queue_unbind(
                        self.rpc.queue.as_str().into(),
                        self.topology.message_exchange.as_str().into(),
                        key.as_str().into(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| Attempt::unless_refused(amqp_error_refused(e)))
            })
            .await?;
        }
        lock(&router.routes).remove(identifier);
        Ok(())
    }
}

/// Routes each call on the communicator's RPC queue to its identifier's stream, until the
/// queue's consumer ends; then every identifier's stream ends, and each is restored.
async fn route_calls(router: Arc<RpcRouter>, mut consumer: lapin::Consumer) {
    let prefix = format!("{RPC_TOPIC}.");
    // Its own channel: the calls are acknowledged in batches.
    let batch = router
        .window
        .map(|prefetch| AckBatch::new(prefetch, router.guard.io.clone(), router.guard.clone()));
    while let Some(item) = consumer.next().await {
        let delivery = match item {
            Ok(delivery) => delivery,
            Err(error) => {
                tracing::debug!(%error, "the RPC queue's consumer stopped");
                break;
            }
        };
        let key = delivery.routing_key.as_str();
        let routes = lock(&router.routes);
        let acker = match &batch {
            Some(batch) => Acker::new(batch.enroll(&delivery)),
            None => Acker::auto(),
        };
        match key.strip_prefix(&prefix).and_then(|id| routes.get(id)) {
            Some(route) => {
                let _ = route.unbounded_send(convert(delivery, acker));
            }
            // Sent before the identifier was unbound, handled after: as when its own
            // queue is deleted, the call goes unanswered (and leaves the window).
            None => {
                tracing::debug!(routing_key = %key, "a call for an identifier no longer served");
                acker.settle(Outcome::Ack);
            }
        }
    }
    lock(&router.routes).clear();
}
