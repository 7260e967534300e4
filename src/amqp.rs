//! The `amqp://` backend: RabbitMQ through lapin, speaking kiwiPy 0.9's wire protocol.
//!
//! Everything here runs on a small tokio runtime of its own ([`IoRuntime`]): lapin's
//! heartbeats and internal tasks, publishes, and the
//! [supervisor](supervisor::supervise), so nothing a user's handler does on the
//! communicator's runtime can stall the connection.
//!
//! The transport survives connection loss. Publishes wait for the connection (within the
//! send timeout) and are sent again until the broker confirms them. Each consumer hands the
//! actors above one stream of deliveries made of the lapin consumers it had in turn: when
//! its channel or the connection dies, the current lapin consumer ends, and the supervisor
//! consumes again under the same consumer tag and queue and appends the new lapin consumer,
//! so the actors never notice. The actors poll lapin's consumers themselves: a delivery
//! crosses no thread between lapin's I/O thread and its subscriber's.

mod recovery;
mod topology;
mod uri;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::channel::mpsc;
use futures::future::{BoxFuture, FutureExt};
use futures::stream::BoxStream;
use std::pin::pin;

use futures::future::Either;
use futures::{Future, StreamExt};
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::runtime::Handle;
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::events::{self, ConnectionEvent};
use crate::settings::Settings;
use crate::transport::{
    Acker, Consumer, Delivery, Exchange, Outcome, Outgoing, Route, Settle, Source, Transport,
};
use topology::{BROADCAST_TOPIC, RPC_TOPIC, Topology};

/// Connects to RabbitMQ within the connect timeout and declares both exchanges; the
/// [`Supervisor`](crate::supervisor::Supervisor) then runs the transport's recovery.
pub(crate) async fn connect(settings: &Settings) -> Result<Arc<dyn Transport>> {
    let shared = Arc::new(Shared::new(settings)?);
    let first = shared.clone();
    let connection = shared
        .io
        .run(async move {
            let connection = Arc::new(first.open_connection().await?);
            first.declare_topology(&connection).await?;
            Ok::<_, Error>(connection)
        })
        .await??;
    shared.state.send_replace(State::Up(connection, 0));
    shared.io.handle.spawn(tick(Arc::downgrade(&shared)));
    Ok(Arc::new(AmqpTransport(shared)))
}

/// A lapin error as a kiwimq error.
fn amqp_error(error: lapin::Error) -> Error {
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
/// reason is one they can act on.
pub(crate) fn explain(error: &str) -> Option<&'static str> {
    let error = error.to_ascii_lowercase();
    (error.contains("acknowledgement") && error.contains("timed out")).then_some(
        "the broker's consumer_timeout (RabbitMQ default 30 min) expired for a task still \
         being handled: raise consumer_timeout in rabbitmq.conf, or per queue with the \
         x-consumer-timeout argument / a policy, above the longest task's duration; the task \
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

/// A consumer's channel, closed once it is no longer consumed from and every delivery it
/// handed out is settled (closing earlier would requeue tasks still being worked on).
struct ConsumerChannel {
    channel: Channel,
    io: Handle,
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

/// A registered consumer: what to restore after a loss, and the stream it feeds.
struct Entry {
    source: Source,
    prefetch: u16,
    /// Where the lapin consumers go, one after another, as deliveries.
    sender: mpsc::UnboundedSender<BoxStream<'static, Delivery>>,
    /// The channel consuming now; none while it waits to be restored.
    active: Option<Arc<ConsumerChannel>>,
    /// Failed restorations in a row, and when to try again.
    failures: u32,
    retry_at: Option<Instant>,
}

struct Shared {
    uri: lapin::uri::AMQPUri,
    redacted: String,
    connect_timeout: Duration,
    send_timeout: Duration,
    reconnect_delay: (Duration, Duration),
    /// The largest body a publish may carry; larger ones are refused before sending.
    max_message_size: usize,
    topology: Topology,
    io: IoRuntime,
    state: watch::Sender<State>,
    events: broadcast::Sender<ConnectionEvent>,
    publisher: Slot,
    puller: Slot,
    /// Consumer tag → what it consumes.
    consumers: Mutex<HashMap<String, Entry>>,
    /// Task queues declared so far, declared again after a reconnection (a broker restart
    /// loses non-durable ones).
    task_queues: Mutex<HashSet<String>>,
    closed: AtomicBool,
    /// Asks the supervisor to look now: something failed.
    wake: Notify,
    /// Ticks every [`TICK`]: deadlines awaited outside the I/O runtime, where tokio's
    /// timers may not exist.
    clock: watch::Sender<u64>,
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
        shared.clock.send_modify(|now| *now += 1);
    }
}

impl Shared {
    fn new(settings: &Settings) -> Result<Self> {
        Ok(Self {
            uri: uri::parse(&settings.uri, &settings.redacted_uri())?,
            redacted: settings.redacted_uri(),
            connect_timeout: settings.connect_timeout,
            send_timeout: settings.send_timeout,
            reconnect_delay: settings.reconnect_delay,
            max_message_size: settings.max_message_size,
            topology: Topology::new(settings),
            io: IoRuntime::start()?,
            state: watch::Sender::new(State::Down("not connected yet".into())),
            events: events::channel(),
            publisher: Slot::default(),
            puller: Slot::default(),
            consumers: Mutex::default(),
            task_queues: Mutex::default(),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
            clock: watch::Sender::new(0),
        })
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::closed());
        }
        Ok(())
    }

    fn emit(&self, event: ConnectionEvent) {
        // No observer is fine.
        let _ = self.events.send(event);
    }

    /// Opens a connection, within the connect timeout.
    async fn open_connection(&self) -> Result<Connection> {
        let properties = ConnectionProperties::default();
        match tokio::time::timeout(
            self.connect_timeout,
            Connection::connect_uri(self.uri.clone(), properties),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(Error::with_source(
                ErrorKind::Connection(format!("cannot connect to {}: {error}", self.redacted)),
                error,
            )),
            Err(_) => Err(Error::timeout(format!(
                "no answer from {} within {:?}",
                self.redacted, self.connect_timeout
            ))),
        }
    }

    /// Declares the exchanges and every task queue declared so far.
    async fn declare_topology(&self, connection: &Connection) -> Result<()> {
        let channel = connection.create_channel().await.map_err(amqp_error)?;
        self.topology
            .declare_exchanges(&channel)
            .await
            .map_err(amqp_error)?;
        let queues: Vec<String> = lock(&self.task_queues).iter().cloned().collect();
        for queue in queues {
            self.topology
                .declare_task_queue(&channel, &queue)
                .await
                .map_err(amqp_error)?;
        }
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// The current connection, waiting for it through an outage until `deadline`.
    async fn connection(&self, deadline: Instant) -> Result<(Arc<Connection>, u64)> {
        let mut receiver = self.state.subscribe();
        let waited = tokio::time::timeout_at(
            deadline,
            receiver.wait_for(|state| !matches!(state, State::Down(_))),
        )
        .await;
        let state = match waited {
            Ok(Ok(state)) => state.clone(),
            Ok(Err(_)) => State::Closed,
            Err(_) => {
                let reason = match &*self.state.borrow() {
                    State::Down(reason) => reason.to_string(),
                    _ => "the connection changed while waiting".to_owned(),
                };
                return Err(Error::timeout(format!(
                    "no connection to {} within the send timeout ({:?}); last error: {reason}",
                    self.redacted, self.send_timeout
                )));
            }
        };
        match state {
            State::Up(connection, epoch) => Ok((connection, epoch)),
            State::Down(_) | State::Closed => Err(Error::closed()),
        }
    }

    /// The slot's channel on the current connection, opened when needed. Waiting for the
    /// connection takes `deadline` into account (a final failure); opening may fail because
    /// the connection just died (worth another try).
    async fn channel(
        &self,
        slot: &Slot,
        confirm: bool,
        deadline: Instant,
    ) -> std::result::Result<Arc<Channel>, Attempt> {
        let (connection, epoch) = self.connection(deadline).await.map_err(Attempt::Final)?;
        let mut slot = slot.0.lock().await;
        if let Some(channel) = usable(&slot, epoch) {
            return Ok(channel);
        }
        let open = async {
            let channel = connection.create_channel().await?;
            if confirm {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
            }
            Ok(channel)
        };
        let channel = Arc::new(open.await.map_err(|e| Attempt::Again(amqp_error(e)))?);
        *slot = Some((epoch, channel.clone()));
        Ok(channel)
    }

    /// Runs `attempt` until it succeeds, fails for a reason retrying cannot mend, or
    /// `deadline` passes. A failed attempt wakes the supervisor, which notices a lost
    /// connection at once.
    async fn retrying<T, F, Fut>(&self, deadline: Instant, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, Attempt>>,
    {
        let mut pause = Duration::from_millis(25);
        loop {
            self.check_open()?;
            let error = match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(Attempt::Final(error))) => return Err(error),
                Ok(Err(Attempt::Again(error))) => error,
                Err(_) => return Err(self.unconfirmed(what)),
            };
            self.check_open()?;
            tracing::debug!(%error, "{what} failed; trying again");
            self.wake.notify_one();
            if Instant::now() + pause >= deadline {
                return Err(error);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Where a route goes: exchange and routing key.
    fn address(&self, route: &Route) -> (&str, String) {
        let topology = &self.topology;
        match route {
            Route::Task(queue) => (topology.exchange(Exchange::Tasks), queue.clone()),
            Route::Rpc(identifier) => (
                topology.exchange(Exchange::Messages),
                format!("{RPC_TOPIC}.{identifier}"),
            ),
            Route::Broadcast => (
                topology.exchange(Exchange::Messages),
                BROADCAST_TOPIC.to_owned(),
            ),
            // Straight to the queue through the default exchange, which always exists and
            // needs no binding: a reply reaches a reply queue that survived a broker restart
            // before its owner reconnected and bound it again.
            Route::Reply(queue) => ("", queue.clone()),
        }
    }

    /// The publisher's channel when it is ready now, without waiting or opening anything.
    fn ready_publisher(&self) -> Option<Arc<Channel>> {
        let epoch = match &*self.state.borrow() {
            State::Up(_, epoch) => *epoch,
            _ => return None,
        };
        usable(&*self.publisher.0.try_lock().ok()?, epoch)
    }

    /// Resolves `after` from now, give or take a [`TICK`], on any executor.
    fn expiry(&self, after: Duration) -> impl Future<Output = ()> + use<> {
        let mut clock = self.clock.subscribe();
        let ticks = after.as_millis().div_ceil(TICK.as_millis());
        let target = *clock.borrow() + u64::try_from(ticks).unwrap_or(u64::MAX / 2) + 1;
        async move {
            let _ = clock.wait_for(|now| *now >= target).await;
        }
    }

    /// Publishes from the caller's task when the publisher channel is ready (no hop to
    /// the I/O runtime, the common case), else — or when that fails — on the I/O runtime
    /// with waiting and retries. Bounded by the send timeout either way.
    async fn send(self: Arc<Self>, route: Route, message: Outgoing) -> Result<()> {
        self.check_open()?;
        message.check_size(self.max_message_size)?;
        let started = std::time::Instant::now();
        if let Some(channel) = self.ready_publisher() {
            let (exchange, routing_key) = self.address(&route);
            let attempt = async {
                let confirm = channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.as_str().into(),
                        publish_options(&message),
                        &message.body,
                        properties(&message),
                    )
                    .await?;
                confirm.await
            };
            let expiry = self.expiry(self.send_timeout);
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
                    self.wake.notify_one();
                }
                None => return Err(self.unconfirmed("publish")),
            }
        }
        let left = self.send_timeout.saturating_sub(started.elapsed());
        let shared = self.clone();
        self.io
            .run(shared.publish(route, message, left))
            .await
            .and_then(|result| result)
    }

    /// The broker's refusal of a publish when it is this message's own — the broker names
    /// its size or its exchange — and no retry can change it (too large, no such exchange,
    /// access refused, a failed precondition). Every publish pending on the channel the
    /// broker closed fails with the same error; the others are sent again. A missing
    /// exchange of our own is declared again, so the next send finds it.
    fn refusal(
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
                let State::Up(connection, _) = shared.state.borrow().clone() else {
                    return;
                };
                if let Err(error) = shared.declare_topology(&connection).await {
                    tracing::warn!(%error, "declaring the exchanges again failed");
                }
            });
        }
        Some(refused(error))
    }

    fn unconfirmed(&self, what: &str) -> Error {
        Error::timeout(format!(
            "{what}: no confirmation from the broker within the send timeout ({:?})",
            self.send_timeout
        ))
    }

    /// Publishes, waiting for the connection and retrying until confirmed, within `within`.
    async fn publish(
        self: Arc<Self>,
        route: Route,
        message: Outgoing,
        within: Duration,
    ) -> Result<()> {
        self.check_open()?;
        let deadline = Instant::now() + within;
        let (exchange, routing_key) = self.address(&route);
        let (options, properties) = (publish_options(&message), properties(&message));
        let body = &message.body;
        let refusals = std::sync::atomic::AtomicU32::new(0);
        let refusals = &refusals;
        let confirmation = self
            .retrying(deadline, "publish", || async {
                let channel = self.channel(&self.publisher, true, deadline).await?;
                let sent = channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.as_str().into(),
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

    fn queue_of(&self, source: &Source) -> String {
        match source {
            Source::Tasks(queue) | Source::Broadcasts(queue) | Source::Replies(_, queue) => {
                queue.clone()
            }
            Source::Rpc(identifier) => self.topology.rpc_queue(identifier),
        }
    }

    /// Opens a channel on `connection`, declares the source's queue and consumes it under
    /// `tag`. Returns the channel, the consumer and whether deliveries are auto-acked.
    async fn start(
        &self,
        connection: &Connection,
        tag: &str,
        source: &Source,
        prefetch: u16,
    ) -> Result<(Channel, lapin::Consumer, bool)> {
        let channel = connection.create_channel().await.map_err(amqp_error)?;
        let topology = &self.topology;
        let queue = self.queue_of(source);
        let no_ack = match source {
            Source::Tasks(queue) => {
                channel
                    .basic_qos(prefetch, BasicQosOptions::default())
                    .await
                    .map_err(amqp_error)?;
                topology
                    .declare_task_queue(&channel, queue)
                    .await
                    .map_err(amqp_error)?;
                false
            }
            Source::Rpc(identifier) => {
                topology
                    .declare_rpc_queue(&channel, identifier)
                    .await
                    .map_err(|e| match soft_error(&e) {
                        Some(AMQPSoftError::RESOURCELOCKED) => {
                            Error::new(ErrorKind::DuplicateSubscriber(identifier.clone()))
                        }
                        _ => amqp_error(e),
                    })?;
                true
            }
            Source::Broadcasts(queue) => {
                topology
                    .declare_broadcast_queue(&channel, queue)
                    .await
                    .map_err(amqp_error)?;
                true
            }
            Source::Replies(exchange, queue) => {
                topology
                    .declare_reply_queue(&channel, *exchange, queue)
                    .await
                    .map_err(amqp_error)?;
                // Acknowledged, so a reply lost in flight with the connection comes again.
                false
            }
        };
        let options = BasicConsumeOptions {
            no_ack,
            ..Default::default()
        };
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.into(),
                options,
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error)?;
        Ok((channel, consumer, no_ack))
    }

    /// Makes `channel` the active one of consumer `tag` and appends its deliveries to the
    /// consumer's stream, unless the consumer was cancelled or activated meanwhile (then
    /// the channel just closes).
    fn activate(
        self: &Arc<Self>,
        tag: &str,
        channel: Channel,
        consumer: lapin::Consumer,
        no_ack: bool,
    ) -> bool {
        let guard = Arc::new(ConsumerChannel {
            channel,
            io: self.io.handle.clone(),
        });
        let mut consumers = lock(&self.consumers);
        let Some(entry) = consumers.get_mut(tag) else {
            return false;
        };
        if entry.active.is_some() {
            // Another activation (the caller's first one, or the supervisor's restoring)
            // won: one lapin consumer per tag, this channel just closes.
            return false;
        }
        entry.active = Some(guard.clone());
        entry.failures = 0;
        entry.retry_at = None;
        let deliveries = deliveries(
            Arc::downgrade(self),
            tag.to_owned(),
            consumer,
            guard,
            no_ack,
        );
        entry.sender.unbounded_send(deliveries).is_ok()
    }

    async fn consume(self: Arc<Self>, source: Source, prefetch: u16) -> Result<Consumer> {
        self.check_open()?;
        let deadline = Instant::now() + self.send_timeout;
        let tag = match &source {
            Source::Rpc(identifier) => identifier.clone(),
            _ => format!("kiwimq-{}", uuid::Uuid::new_v4()),
        };
        let (channel, consumer, no_ack) = self
            .retrying(deadline, "consume", || async {
                let (connection, _) = self.connection(deadline).await.map_err(Attempt::Final)?;
                self.start(&connection, &tag, &source, prefetch)
                    .await
                    .map_err(Attempt::unless_refused)
            })
            .await?;
        let (sender, receiver) = mpsc::unbounded();
        lock(&self.consumers).insert(
            tag.clone(),
            Entry {
                source,
                prefetch,
                sender,
                active: None,
                failures: 0,
                retry_at: None,
            },
        );
        self.activate(&tag, channel, consumer, no_ack);
        Ok(Consumer {
            tag,
            deliveries: receiver.flatten().boxed(),
        })
    }

    /// Restores the consumers that lost their channel and are due, on `connection`.
    async fn restore_consumers(self: &Arc<Self>, connection: &Connection) {
        let now = Instant::now();
        let due: Vec<(String, Source, u16)> = lock(&self.consumers)
            .iter()
            .filter(|(_, entry)| {
                entry.active.is_none() && entry.retry_at.is_none_or(|at| at <= now)
            })
            .map(|(tag, entry)| (tag.clone(), entry.source.clone(), entry.prefetch))
            .collect();
        for (tag, source, prefetch) in due {
            match self.start(connection, &tag, &source, prefetch).await {
                Ok((channel, consumer, no_ack)) => {
                    if self.activate(&tag, channel, consumer, no_ack) {
                        tracing::info!(%tag, queue = %self.queue_of(&source), "consumer restored");
                    }
                }
                Err(error) => {
                    let mut consumers = lock(&self.consumers);
                    if let Some(entry) = consumers.get_mut(&tag) {
                        entry.failures += 1;
                        let pause = Duration::from_millis(100 << entry.failures.min(6));
                        entry.retry_at = Some(Instant::now() + pause);
                        tracing::warn!(%tag, %error, failures = entry.failures, "could not restore a consumer; trying again in {pause:?}");
                    }
                }
            }
        }
    }

    /// Records a lost connection: waiting senders hold, every consumer awaits restoration.
    fn lost(&self, reason: &str) {
        if self.is_closed() {
            return;
        }
        self.state.send_replace(State::Down(reason.into()));
        for entry in lock(&self.consumers).values_mut() {
            entry.active = None;
            entry.retry_at = None;
        }
        tracing::warn!(uri = %self.redacted, %reason, "connection lost; reconnecting");
        self.emit(ConnectionEvent::Lost(reason.to_owned()));
    }

    /// Records a restored connection: consumers are back, waiting senders go on.
    fn restored(&self, connection: Arc<Connection>, epoch: u64, down_for: Duration) {
        if self.is_closed() {
            return;
        }
        self.state.send_replace(State::Up(connection, epoch));
        tracing::info!(uri = %self.redacted, ?down_for, "connection restored");
        self.emit(ConnectionEvent::Restored(down_for));
    }

    async fn cancel(self: Arc<Self>, tag: String) -> Result<()> {
        self.check_open()?;
        let Some(entry) = lock(&self.consumers).remove(&tag) else {
            return Ok(());
        };
        // Without an active channel there is nothing to cancel on the broker: the
        // connection that consumed is gone.
        let Some(guard) = entry.active else {
            return Ok(());
        };
        let channel = &guard.channel;
        if !channel.status().connected() {
            return Ok(());
        }
        channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .map_err(amqp_error)?;
        if matches!(entry.source, Source::Rpc(_) | Source::Broadcasts(_)) {
            let queue = self.queue_of(&entry.source);
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(amqp_error)?;
        }
        Ok(())
    }

    async fn declare_task_queue(self: Arc<Self>, queue: String) -> Result<()> {
        self.check_open()?;
        lock(&self.task_queues).insert(queue.clone());
        let deadline = Instant::now() + self.send_timeout;
        self.retrying(deadline, "declare queue", || async {
            let channel = self.channel(&self.publisher, true, deadline).await?;
            self.topology
                .declare_task_queue(&channel, &queue)
                .await
                .map_err(|e| Attempt::unless_refused(amqp_error_refused(e)))
        })
        .await
    }

    async fn get(self: Arc<Self>, queue: String) -> Result<Option<Delivery>> {
        self.check_open()?;
        let deadline = Instant::now() + self.send_timeout;
        let (channel, message) = self
            .retrying(deadline, "get", || async {
                let channel = self.channel(&self.puller, false, deadline).await?;
                let message = channel
                    .basic_get(queue.as_str().into(), BasicGetOptions::default())
                    .await
                    .map_err(|e| Attempt::unless_refused(amqp_error_refused(e)))?;
                Ok((channel, message))
            })
            .await?;
        drop(channel);
        Ok(message.map(|m| {
            // The puller channel is shared and stays open: no guard.
            let acker = AmqpAck {
                acker: m.delivery.acker.clone(),
                _channel: None,
            };
            convert(m.delivery, Some(acker))
        }))
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let previous = self.state.send_replace(State::Closed);
        self.emit(ConnectionEvent::Closed);
        self.wake.notify_one();
        let entries: Vec<Entry> = lock(&self.consumers).drain().map(|(_, e)| e).collect();
        let reply_queues: Vec<String> = entries
            .iter()
            .filter_map(|entry| match &entry.source {
                Source::Replies(_, queue) => Some(queue.clone()),
                _ => None,
            })
            .collect();
        let State::Up(connection, _) = previous else {
            return Ok(());
        };
        if !connection.status().connected() {
            return Ok(());
        }
        // Each consumer's channel closes before the connection does: a channel closing
        // while the connection goes makes lapin report a connection error.
        for entry in entries {
            if let Some(guard) = entry.active
                && guard.channel.status().connected()
            {
                let _ = guard.channel.close(200, "closing".into()).await;
            }
        }
        // Nobody waits for replies any more: the reply queues go now rather than when they
        // expire.
        if let Ok(channel) = connection.create_channel().await {
            for queue in reply_queues {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel.close(200, "reply queues deleted".into()).await;
        }
        if let Err(error) = connection
            .close(200, "kiwimq communicator closed".into())
            .await
        {
            // Whatever went wrong, the connection is gone, as closing wants.
            tracing::debug!(%error, "the connection failed while closing");
        }
        Ok(())
    }
}

fn properties(message: &Outgoing) -> BasicProperties {
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
    properties
}

fn publish_options(message: &Outgoing) -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: message.mandatory,
        ..Default::default()
    }
}

/// What a publisher confirm means for the sender.
fn confirmed(confirmation: Confirmation, exchange: &str, routing_key: String) -> Result<()> {
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
fn refused(error: &lapin::Error) -> Error {
    let reason = format!("the broker refused the message: {error}");
    tracing::warn!(%reason, "publish refused");
    Error::with_source(ErrorKind::Refused(reason), error.clone())
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
            ErrorKind::DuplicateSubscriber(_) | ErrorKind::Config(_) => Attempt::Final(error),
            _ => Attempt::Again(error),
        }
    }
}

/// A lapin error whose soft protocol error (a refusal) becomes a `Config` error, so
/// retrying stops: a queue declared with other arguments, access refused, and the like.
fn amqp_error_refused(error: lapin::Error) -> Error {
    match soft_error(&error) {
        Some(soft) if soft != AMQPSoftError::NOTFOUND => {
            let reason = format!("the broker refused: {error} ({soft:?})");
            Error::with_source(ErrorKind::Config(reason), error)
        }
        _ => amqp_error(error),
    }
}

/// One lapin consumer's deliveries, ready for the actors, then — when it ends because its
/// channel or connection died — a word to the supervisor to consume again.
fn deliveries(
    shared: Weak<Shared>,
    tag: String,
    consumer: lapin::Consumer,
    guard: Arc<ConsumerChannel>,
    no_ack: bool,
) -> BoxStream<'static, Delivery> {
    let logged_tag = tag.clone();
    let delivered = consumer
        .take_while(move |item| {
            if let Err(error) = item {
                let text = error.to_string();
                match explain(&text) {
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
                    let acker = (!no_ack).then(|| AmqpAck {
                        acker: delivery.acker.clone(),
                        _channel: Some(guard.clone()),
                    });
                    convert(delivery, acker)
                });
                futures::future::ready(delivery)
            }
        });
    let ended = futures::stream::once(async move { consumer_ended(&shared, &tag, &guard) })
        .filter_map(|()| futures::future::ready(None));
    delivered.chain(ended).boxed()
}

/// A lapin consumer ended. Unless it was cancelled or already replaced, the consumer waits
/// to be restored, and the supervisor is told at once.
fn consumer_ended(shared: &Weak<Shared>, tag: &str, guard: &Arc<ConsumerChannel>) {
    let Some(shared) = shared.upgrade() else {
        return;
    };
    let mut consumers = lock(&shared.consumers);
    if let Some(entry) = consumers.get_mut(tag)
        && entry
            .active
            .as_ref()
            .is_some_and(|active| Arc::ptr_eq(active, guard))
    {
        entry.active = None;
        drop(consumers);
        tracing::info!(%tag, "consumer interrupted; restoring it");
        shared.wake.notify_one();
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

/// Settles one delivery on its channel.
struct AmqpAck {
    acker: lapin::Acker,
    /// Keeps the consumer's channel open until this delivery is settled.
    _channel: Option<Arc<ConsumerChannel>>,
}

impl Settle for AmqpAck {
    /// Hands the ack, nack or reject to lapin right here: the first poll of lapin's future
    /// queues the command, so nothing is spawned per delivery. Only a refusal known at once
    /// (the delivery's channel is gone) is reported; what happens to the frame later is the
    /// connection's story, and an unsettled delivery comes again anyway.
    fn settle(self: Box<Self>, outcome: Outcome) {
        let AmqpAck { acker, _channel } = *self;
        let settling = async move {
            match outcome {
                Outcome::Ack => acker.ack(BasicAckOptions::default()).await,
                Outcome::Requeue => {
                    let options = BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    };
                    acker.nack(options).await
                }
                Outcome::Discard => acker.reject(BasicRejectOptions { requeue: false }).await,
            }
        };
        let mut context = std::task::Context::from_waker(futures::task::noop_waker_ref());
        match pin!(settling).poll(&mut context) {
            std::task::Poll::Ready(Ok(false)) => tracing::warn!(
                ?outcome,
                "delivery not settled: its channel is gone, the broker will redeliver it"
            ),
            std::task::Poll::Ready(Err(error)) => {
                tracing::warn!(?outcome, %error, "settling a delivery failed; the broker will redeliver it")
            }
            _ => {}
        }
    }
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
        self.0.events.clone()
    }

    fn is_connected(&self) -> bool {
        matches!(&*self.0.state.borrow(), State::Up(..))
    }

    fn supervise(&self) -> BoxFuture<'static, ()> {
        let shared = self.0.clone();
        async move {
            let State::Up(connection, _) = shared.state.borrow().clone() else {
                return;
            };
            recovery::supervise(shared, connection).await;
        }
        .boxed()
    }
}

impl Drop for AmqpTransport {
    /// Dropped without `close` (a communicator whose setup failed): stop every task.
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.io.shutdown();
    }
}
