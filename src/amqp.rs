//! The `amqp://` backend: RabbitMQ through lapin, speaking kiwiPy 0.9's wire protocol.
//!
//! lapin's heartbeats and internal tasks run on a small tokio runtime of its own
//! ([`IoRuntime`]), and the recovery on the `Root`'s thread, so nothing a user's
//! handler does on the communicator's runtime can stall the connection.
//!
//! The transport survives connection loss. Publishes wait for the connection (within the
//! send timeout) and are sent again until the broker confirms them. Each consumer hands the
//! actors above one stream of deliveries made of the lapin consumers it had in turn: when
//! its channel or the connection dies, the current lapin consumer ends, and the root
//! consumes again under the same consumer tag and queue and appends the new lapin consumer,
//! so the actors never notice. The actors poll lapin's consumers themselves: a delivery
//! crosses no thread between lapin's I/O thread and its subscriber's.
//!
//! This file holds the shared state ([`Shared`]) and the [`Transport`] over it; the rest is
//! one concern a file: `connection` (opening, waiting, channels, retries, closing),
//! `publisher`, `consumers`, `rpc_router` (the communicator's one RPC queue, an identifier
//! a binding of it), `recovery` (what the root runs after a loss),
//! `topology` (kiwiPy's exchanges, queues and arguments) and `uri`.

mod ack_batch;
mod connection;
mod consumers;
mod node;
mod publisher;
mod recovery;
mod rpc_router;
pub(crate) mod tls;
mod topology;
mod uri;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::Future;
use futures::future::{BoxFuture, FutureExt};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::{Channel, Connection};
use tokio::runtime::Handle;
use tokio::sync::broadcast;

use crate::error::{Error, ErrorKind, Result};
use crate::events::ConnectionEvent;
use crate::settings::Settings;
use crate::transport::{Consumer, Delivery, Outgoing, QueueStats, Route, Source, Transport};
use connection::Broker;
use consumers::{ConsumerChannel, Consumers};
use publisher::Publisher;
use rpc_router::RpcRouting;
use topology::Topology;

/// Connects to RabbitMQ within the connect timeout and declares both exchanges; the
/// [`Root`](crate::tree::Root) then runs the transport's recovery.
/// `actors` is where the consumer-side actors run: the RPC queue's calls are routed there.
pub(crate) async fn connect(
    settings: &Settings,
    actors: actix_rt::ArbiterHandle,
) -> Result<Arc<dyn Transport>> {
    let shared = Arc::new(Shared::new(settings, actors)?);
    let first = shared.clone();
    let connection = shared
        .io
        .run(async move {
            let connection = Arc::new(first.open_connection().await?);
            first.declare_topology(&connection).await?;
            first.reserve_channels(&connection, 0).await;
            Ok::<_, Error>(connection)
        })
        .await??;
    shared.broker.state.send_replace(State::Up(connection, 0));
    shared.io.handle.spawn(tick(Arc::downgrade(&shared)));
    Ok(Arc::new(AmqpTransport(shared)))
}

/// A lapin error as a kiwimq error. Running out of channels is a limit no retry lifts: it
/// is `Refused`, naming the limit.
fn amqp_error(error: lapin::Error) -> Error {
    if let lapin::ErrorKind::ChannelsLimitReached = error.kind() {
        let reason = "the connection has as many channels open as the broker allows \
                      (channel_max, 2047 by default on RabbitMQ): each task queue consumed \
                      takes one";
        return Error::with_source(ErrorKind::Refused(reason.to_owned()), error);
    }
    let reason = error.to_string();
    Error::with_source(ErrorKind::Connection(reason), error)
}

/// The broker's refusal of one request (it closed the channel, not the connection).
fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// What to tell an operator about a consumer's channel that the broker closed, when the
/// reason is one they can act on. The reply code decides (`PRECONDITION_FAILED`, which
/// RabbitMQ closes a channel with when a delivery's acknowledgement timed out); the text
/// only tells that case from the code's others.
pub(crate) fn explain(error: &lapin::Error) -> Option<&'static str> {
    if soft_error(error) != Some(AMQPSoftError::PRECONDITIONFAILED) {
        return None;
    }
    let text = error.to_string().to_ascii_lowercase();
    (text.contains("acknowledgement") && text.contains("timed out")).then_some(
        "the broker's consumer_timeout (RabbitMQ default 30 min) expired for a task still \
         being handled: raise consumer_timeout in rabbitmq.conf, or per queue with a policy \
         or Settings::with_queue_consumer_timeout (x-consumer-timeout, RabbitMQ 3.12+), above \
         the longest task's duration; the task \
         was returned to the queue and will run again",
    )
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The tokio runtime that owns the connection's I/O, separate from the communicator's
/// actix runtime, where user handlers run and may block.
struct IoRuntime {
    handle: Handle,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl IoRuntime {
    fn start() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kiwimq-amqp")
            .enable_all()
            .build()
            .map_err(|e| Error::connection(format!("cannot start the AMQP runtime: {e}")))?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
        })
    }

    /// Runs `future` here; awaitable from any executor.
    fn run<F>(&self, future: F) -> impl Future<Output = Result<F::Output>> + Send + 'static
    where
        F: Future + Send + 'static,
        F::Output: Send,
    {
        let task = self.handle.spawn(future);
        async move { task.await.map_err(|_| Error::closed()) }
    }

    /// Stops every task here; safe to call from any thread or task.
    fn shutdown(&self) {
        if let Some(runtime) = lock(&self.runtime).take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for IoRuntime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The connection as everyone else sees it.
#[derive(Clone)]
enum State {
    /// Connected; the number counts reconnections, so a cached channel of an older
    /// connection is recognised as dead.
    Up(Arc<Connection>, u64),
    /// Lost, reconnecting; carries the reason.
    Down(Arc<str>),
    Closed,
}

/// A channel for one purpose, reopened when it dies or belongs to an older connection.
#[derive(Default)]
/// Shared behind an `Arc`: cloning a lapin `Channel` clones a dozen `Arc`s, and the
/// publisher's is taken for every publish.
struct Slot(tokio::sync::Mutex<Option<(u64, Arc<Channel>)>>);

/// The channel held, if it belongs to connection `epoch` and is still open.
fn usable(held: &Option<(u64, Arc<Channel>)>, epoch: u64) -> Option<Arc<Channel>> {
    match held {
        Some((opened_in, channel)) if *opened_in == epoch && channel.status().connected() => {
            Some(channel.clone())
        }
        _ => None,
    }
}

/// One RabbitMQ transport's state, in the parts that own it: the broker and the connection
/// to it ([`Broker`]), the publisher channel ([`Publisher`]), the consumers and the
/// channels they consume on ([`Consumers`]), the communicator's RPC queue
/// ([`RpcRouting`]), what is declared ([`Topology`]), and the runtime lapin runs on.
struct Shared {
    broker: Broker,
    publisher: Publisher,
    consumers: Consumers,
    rpc: RpcRouting,
    topology: Topology,
    io: IoRuntime,
}

/// The resolution of [`Shared::expiry`].
const TICK: Duration = Duration::from_millis(250);

/// Advances the clock until the transport is gone.
async fn tick(shared: Weak<Shared>) {
    let mut interval = tokio::time::interval(TICK);
    loop {
        interval.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.broker.clock.send_modify(|now| *now += 1);
    }
}

impl Shared {
    fn new(settings: &Settings, actors: actix_rt::ArbiterHandle) -> Result<Self> {
        Ok(Self {
            broker: Broker::new(settings)?,
            publisher: Publisher::new(settings),
            consumers: Consumers::new(settings),
            rpc: RpcRouting::new(settings, actors),
            topology: Topology::new(settings),
            io: IoRuntime::start()?,
        })
    }
}

/// Why an attempt failed: worth another try, or not.
enum Attempt {
    Again(Error),
    Final(Error),
}

impl Attempt {
    /// The broker refusing a request is final; anything else (a channel or connection
    /// dying under it) is worth another try.
    fn unless_refused(error: Error) -> Self {
        match error.kind() {
            ErrorKind::DuplicateSubscriber(_) | ErrorKind::Config(_) | ErrorKind::Refused(_) => {
                Attempt::Final(error)
            }
            _ => Attempt::Again(error),
        }
    }
}

/// A lapin error whose soft protocol error (a refusal) stops retrying: a limit of the
/// vhost or the broker reached is `Refused`, naming it; a queue declared with other
/// arguments, access refused and the like are `Config` errors.
/// Classified by the reply code; the text only says more within one code (a limit, or
/// which argument differs, both `PRECONDITION_FAILED` on RabbitMQ).
fn amqp_error_refused(error: lapin::Error) -> Error {
    let failed_precondition = soft_error(&error) == Some(AMQPSoftError::PRECONDITIONFAILED);
    match soft_error(&error) {
        Some(_) if failed_precondition && names_a_limit(&error.to_string()) => {
            let reason = format!(
                "the broker refused: {error}: a limit of the broker or its vhost is reached \
                 (rabbitmqctl list_vhost_limits; a policy's or the broker's max queues)"
            );
            Error::with_source(ErrorKind::Refused(reason), error)
        }
        Some(soft) if soft != AMQPSoftError::NOTFOUND => {
            let mut reason = format!("the broker refused: {error} ({soft:?})");
            if let Some(setting) =
                inequivalent_setting(&error.to_string()).filter(|_| failed_precondition)
            {
                reason.push_str(&format!(
                    "; the queue exists with another {setting} than this communicator's: every \
                     process sharing it must agree (or delete the queue to declare it anew)"
                ));
            }
            Error::with_source(ErrorKind::Config(reason), error)
        }
        _ => amqp_error(error),
    }
}

/// Whether a refusal says a limit was reached, as RabbitMQ's do: "queue limit in vhost
/// 'v' (3) is reached", "cannot declare queue 'q': queue limit in cluster (…) is reached".
fn names_a_limit(text: &str) -> bool {
    text.contains("limit") && text.contains("reached")
}

/// The setting behind the argument a broker names in "inequivalent arg '…'".
fn inequivalent_setting(text: &str) -> Option<&'static str> {
    let (_, rest) = text.split_once("inequivalent arg '")?;
    let (argument, _) = rest.split_once('\'')?;
    Some(match argument {
        "x-queue-type" => "queue type (Settings::with_quorum_queues, or with_delivery_limit)",
        "x-delivery-limit" => "delivery limit (Settings::with_delivery_limit)",
        "x-dead-letter-exchange" | "x-dead-letter-routing-key" => {
            "dead-letter queue (quorum queues, from Settings::with_quorum_queues or \
             with_delivery_limit, dead-letter to <queue>.dlq)"
        }
        "x-consumer-timeout" => {
            "consumer timeout (Settings::with_consumer_timeout, with_queue_consumer_timeout)"
        }
        "x-message-ttl" => "message TTL (Settings::with_task_message_ttl)",
        "durable" => {
            "durability (Settings::with_kiwipy_testing_queues: kiwiPy's testing mode declares \
             task queues non-durable, kiwimq's durable; quorum queues, from \
             Settings::with_quorum_queues or with_delivery_limit, are always durable)"
        }
        "x-expires" => "expiry (Settings::with_testing_mode)",
        _ => return None,
    })
}

fn flatten<T>(result: Result<Result<T>>) -> Result<T> {
    result.and_then(|inner| inner)
}

/// The transport over one RabbitMQ connection, restored after every loss.
pub(crate) struct AmqpTransport(Arc<Shared>);

impl Transport for AmqpTransport {
    fn declare_task_queue(&self, queue: &str) -> BoxFuture<'static, Result<()>> {
        let task = self
            .0
            .io
            .run(self.0.clone().declare_task_queue(queue.to_owned()));
        task.map(flatten).boxed()
    }

    fn publish(&self, route: Route, message: Outgoing) -> BoxFuture<'static, Result<()>> {
        self.0.clone().send(route, message).boxed()
    }

    fn consume(&self, source: Source, prefetch: u16) -> BoxFuture<'static, Result<Consumer>> {
        let task = self.0.io.run(self.0.clone().consume(source, prefetch));
        task.map(flatten).boxed()
    }

    fn cancel(&self, tag: &str) -> BoxFuture<'static, Result<()>> {
        let task = self.0.io.run(self.0.clone().cancel(tag.to_owned()));
        task.map(flatten).boxed()
    }

    fn queue_stats(&self, queue: &str) -> BoxFuture<'static, Result<QueueStats>> {
        let task = self.0.io.run(self.0.clone().queue_stats(queue.to_owned()));
        task.map(flatten).boxed()
    }

    fn purge(&self, queue: &str) -> BoxFuture<'static, Result<u32>> {
        let task = self.0.io.run(self.0.clone().purge(queue.to_owned()));
        task.map(flatten).boxed()
    }

    fn get(&self, queue: &str) -> BoxFuture<'static, Result<Option<Delivery>>> {
        let task = self.0.io.run(self.0.clone().get(queue.to_owned()));
        task.map(flatten).boxed()
    }

    fn close(&self) -> BoxFuture<'static, Result<()>> {
        let shared = self.0.clone();
        let task = self.0.io.run(async move { shared.close().await });
        let shared = self.0.clone();
        async move {
            let result = task.await.and_then(|r| r);
            shared.io.shutdown();
            result
        }
        .boxed()
    }

    fn events(&self) -> broadcast::Sender<ConnectionEvent> {
        self.0.broker.events.clone()
    }

    fn is_connected(&self) -> bool {
        matches!(&*self.0.broker.state.borrow(), State::Up(..))
    }

    fn node(&self) -> Option<String> {
        lock(&self.0.broker.node).clone()
    }

    fn recover(&self) -> BoxFuture<'static, ()> {
        let shared = self.0.clone();
        async move {
            let State::Up(connection, _) = shared.broker.state.borrow().clone() else {
                return;
            };
            recovery::run(shared, connection).await;
        }
        .boxed()
    }
}

impl Drop for AmqpTransport {
    /// Dropped without `close` (a communicator whose setup failed): stop every task.
    fn drop(&mut self) {
        self.0.broker.closed.store(true, Ordering::Release);
        self.0.io.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPHardError};

    use super::*;

    fn refusal(kind: AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(kind, text.into())).into()
    }

    /// The broker's reply code decides what a refusal is; its words refine one code, never
    /// make another.
    #[test]
    fn refusals_are_classified_by_their_reply_code() {
        let precondition = AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED);
        let limit = refusal(
            precondition.clone(),
            "PRECONDITION_FAILED - cannot declare queue 'q': queue limit in vhost 'v' (3) is reached",
        );
        assert!(
            matches!(amqp_error_refused(limit).kind(), ErrorKind::Refused(text) if text.contains("limit"))
        );
        let inequivalent = refusal(
            precondition.clone(),
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q'",
        );
        assert!(
            matches!(amqp_error_refused(inequivalent).kind(), ErrorKind::Config(text) if text.contains("with_quorum_queues"))
        );
        // The same words under another code are not a limit, nor an argument's name.
        let denied = refusal(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - the limit of what 'guest' may do is reached; inequivalent arg 'x-queue-type'",
        );
        let error = amqp_error_refused(denied);
        assert!(
            matches!(error.kind(), ErrorKind::Config(text) if !text.contains("with_quorum_queues")),
            "{error}"
        );
        let hard = refusal(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "CONNECTION_FORCED - broker forced connection closure; limit reached",
        );
        assert!(matches!(
            amqp_error_refused(hard).kind(),
            ErrorKind::Connection(_)
        ));

        let timed_out = refusal(
            precondition,
            "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out",
        );
        assert!(explain(&timed_out).is_some());
        let other = refusal(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - delivery acknowledgement on channel 1 timed out",
        );
        assert!(explain(&other).is_none());
    }
}
