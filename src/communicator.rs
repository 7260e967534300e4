//! [`Communicator`]: the cheap-`Clone` async handle users hold. It encodes and sends from the
//! caller's task and forwards subscriptions, by address, to the actors on its runtime.
//!
//! This file holds connecting, tasks and closing; `rpc` and `broadcasts` the rest of its
//! methods.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::actors::Conduit;
use crate::actors::broadcast_hub::BroadcastHub;
use crate::actors::replies::{Replies, ReplyFuture};
use crate::actors::task_consumer::{Drain, TaskConsumer};
use crate::error::{Error, Result};
use crate::events::ConnectionEvent;
use crate::handlers::HandlerThreads;
use crate::messages::Task;
use crate::runtime::Runtime;
use crate::settings::Settings;
use crate::subscriber::{IntoSubscriber, Scope};
use crate::supervision::{Child, Incidents};
use crate::transport::{DeliverFn, Exchange, Transport};
use crate::tree::{BroadcastHubChild, Inspect, Root, TaskConsumerChild};
use crate::{Codec, mem};

mod broadcasts;
mod presence;
mod rpc;
mod tasks;

pub use tasks::{PulledTask, TaskQueue};

pub use broadcasts::BroadcastOptions;

/// Connects to the broker at `uri` with default [`Settings`]: `mem://` for a private
/// in-process broker, `mem://NAME` for one shared by name within the process, or
/// `amqp://user:pass@host:port/vhost` for RabbitMQ.
pub async fn connect(uri: &str) -> Result<Communicator> {
    Settings::new(uri).connect().await
}

impl Settings {
    /// Connects a [`Communicator`] with these settings.
    pub async fn connect(self) -> Result<Communicator> {
        Communicator::connect_with(self).await
    }
}

/// A connection to a broker for tasks, RPC and broadcasts.
///
/// Cloning is cheap: every clone is the same communicator. It closes with
/// [`close`](Communicator::close), or when the last clone is dropped.
#[derive(Clone)]
pub struct Communicator {
    pub(crate) inner: Arc<Core>,
}

/// A handle on a [`Communicator`] that does not keep it open: what its own subscribers
/// should hold.
///
/// A communicator closes when its last [`Communicator`] handle is dropped. A subscriber
/// that holds one — a workflow process actor that sends tasks and broadcasts, say — would
/// keep it open for ever, since the communicator holds its subscribers: a cycle, whose
/// threads and connection outlive the program's last use of it. Give such subscribers a
/// `WeakCommunicator` ([`Communicator::downgrade`]) and [`upgrade`](Self::upgrade) it for
/// each use: dropping the program's last handle then closes the communicator and its
/// subscribers with it. (`examples/workflow.rs` does this.)
#[derive(Clone)]
pub struct WeakCommunicator {
    inner: std::sync::Weak<Core>,
}

impl WeakCommunicator {
    /// The communicator, while some [`Communicator`] handle keeps it; `None` once the last
    /// one was dropped. A communicator closed with [`Communicator::close`] still upgrades,
    /// and its calls fail with [`ErrorKind::Closed`](crate::ErrorKind::Closed).
    pub fn upgrade(&self) -> Option<Communicator> {
        self.inner.upgrade().map(|inner| Communicator { inner })
    }

    /// [`upgrade`](Self::upgrade), or the `Closed` error a call on a dropped communicator
    /// gets: `weak.communicator()?.task_send(…)`.
    pub fn communicator(&self) -> Result<Communicator> {
        self.upgrade().ok_or_else(Error::closed)
    }
}

impl fmt::Debug for WeakCommunicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakCommunicator")
            .field("open", &(self.inner.strong_count() > 0))
            .finish()
    }
}

/// What every handle on one communicator shares: its settings, its conduit to the broker,
/// its threads, the root of its actor tree, and the replies it awaits.
pub(crate) struct Core {
    pub(crate) settings: Settings,
    pub(crate) conduit: Conduit,
    /// Where the consumer-side actors and closure subscribers run.
    pub(crate) runtime: Runtime,
    /// Where closure subscribers run: never on `runtime`.
    pub(crate) handlers: HandlerThreads,
    /// The root of the actor tree, on a thread of its own where no user code runs.
    pub(crate) root: Child<Root>,
    supervision: Runtime,
    /// Restarts and subscribers lost, for [`Communicator::health`].
    pub(crate) incidents: Incidents,
    pub(crate) replies: Arc<Replies>,
    /// The default task queue's name, shared by every handle on it.
    pub(crate) default_queue: Arc<str>,
    /// Reply queues, one per exchange, as kiwiPy's publishers have.
    pub(crate) task_reply_queue: String,
    pub(crate) message_reply_queue: String,
    closed: AtomicBool,
    /// Who it is and what it did, as its presence announces.
    pub(crate) identity: crate::presence::Identity,
    pub(crate) activity: crate::presence::Activity,
    /// Task queues this communicator has declared (sending declares once).
    declared: Mutex<std::collections::HashSet<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Communicator {
    /// A handle that does not keep this communicator open, for its own subscribers (see
    /// [`WeakCommunicator`]).
    pub fn downgrade(&self) -> WeakCommunicator {
        WeakCommunicator {
            inner: Arc::downgrade(&self.inner),
        }
    }

    pub(crate) async fn connect_with(settings: Settings) -> Result<Self> {
        crate::panics::install_hook();
        let runtime = Runtime::start("kiwimq-runtime")?;
        let supervision = Runtime::start("kiwimq-supervisor")?;
        let transport: Arc<dyn Transport> = match settings.uri.split_once("://") {
            Some(("mem", name)) => Arc::new(mem::MemTransport::connect(name, &settings)),
            Some(("amqp" | "amqps", _)) => {
                crate::amqp::connect(&settings, runtime.arbiter().clone()).await?
            }
            #[cfg(feature = "zeromq")]
            Some(("zmq" | "zmq+ipc", _)) => {
                Arc::new(crate::zeromq::ZmqTransport::connect(&settings).await?)
            }
            #[cfg(not(feature = "zeromq"))]
            Some(("zmq" | "zmq+ipc", _)) => {
                return Err(Error::config(format!(
                    "'{}': kiwimq was built without the `zeromq` feature",
                    settings.uri
                )));
            }
            _ => {
                return Err(Error::config(format!(
                    "unsupported URI '{}': expected mem://[NAME], amqp://…, amqps://…, \
                     zmq:///SERVICE_DIR or zmq+ipc:///PATH",
                    settings.uri
                )));
            }
        };
        let conduit = Conduit {
            transport,
            codec: settings.codec,
            max_message_size: settings.max_message_size,
            dead_lettering: settings.delivery_limit.is_some(),
            delivery_limit: settings.delivery_limit,
            message_prefetch: settings.message_prefetch,
            max_in_flight: settings.max_in_flight,
            handlers: HandlerThreads::shared(settings.handler_threads),
            subscribers: Arc::default(),
        };
        let replies = Replies::new();
        let task_reply_queue = format!("{}-reply-{}", settings.task_exchange, new_id());
        let message_reply_queue = format!("{}-reply-{}", settings.message_exchange, new_id());
        for (exchange, queue) in [
            (Exchange::Tasks, &task_reply_queue),
            (Exchange::Messages, &message_reply_queue),
        ] {
            let to = replies.clone();
            let deliver: DeliverFn = Arc::new(move |delivery| to.deliver(delivery));
            let reader = conduit
                .transport
                .consume_replies(exchange, queue.clone(), deliver)
                .await?;
            runtime.spawn(reader);
        }
        runtime.spawn(Replies::reap(Arc::downgrade(&replies)));
        let broadcast_queue = format!("broadcast-{}", new_id());
        let incidents = Incidents::default();
        let root = Root::start(
            supervision.arbiter(),
            conduit.clone(),
            runtime.arbiter().clone(),
            broadcast_queue,
            incidents.clone(),
        );
        let inner = Core {
            identity: crate::presence::Identity::new(&settings.uri),
            activity: crate::presence::Activity::default(),
            handlers: conduit.handlers.clone(),
            default_queue: settings.task_queue.as_str().into(),
            settings,
            conduit,
            runtime,
            root,
            supervision,
            incidents,
            replies,
            task_reply_queue,
            message_reply_queue,
            closed: AtomicBool::new(false),
            declared: Mutex::default(),
        };
        let inner = Arc::new(inner);
        if let Some(interval) = inner.settings.presence_interval
            && inner.presence_supported()
        {
            let weak = Arc::downgrade(&inner);
            inner
                .runtime
                .spawn(presence::announce_while_open(weak, interval));
        }
        Ok(Self { inner })
    }

    /// The settings this communicator was connected with.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The codec of this communicator.
    pub fn codec(&self) -> Codec {
        self.inner.conduit.codec
    }

    /// Whether [`close`](Self::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Whether the connection to the broker is up now. `false` while reconnecting after a
    /// loss (sends wait meanwhile) and once closed.
    pub fn is_connected(&self) -> bool {
        !self.is_closed() && self.inner.conduit.transport.is_connected()
    }

    /// The RabbitMQ node this communicator is (or was last) connected to, as its URI
    /// without the password: one of [`Settings::with_nodes`]'s. `None` on `mem://`.
    pub fn node(&self) -> Option<String> {
        self.inner.conduit.transport.node()
    }

    /// The changes of this communicator's connection from now on: lost, restored, closed
    /// (kiwiPy's `add_close_callback`, and more). The stream ends after
    /// [`ConnectionEvent::Closed`].
    ///
    /// ```
    /// # async fn example(comm: kiwimq::Communicator) {
    /// use futures::StreamExt;
    /// let mut events = comm.connection_events();
    /// while let Some(event) = events.next().await {
    ///     match event {
    ///         kiwimq::ConnectionEvent::Lost(reason) => eprintln!("broker lost: {reason}"),
    ///         kiwimq::ConnectionEvent::Restored(after) => eprintln!("back after {after:?}"),
    ///         _ => {}
    ///     }
    /// }
    /// # }
    /// ```
    pub fn connection_events(&self) -> futures::stream::BoxStream<'static, ConnectionEvent> {
        crate::events::stream(self.inner.conduit.transport.events().subscribe())
    }

    /// How many task and RPC results this communicator still awaits.
    pub fn pending_replies(&self) -> usize {
        self.inner.replies.len()
    }

    // ---- tasks -------------------------------------------------------------------------

    /// A handle on the named task queue (declared on first use).
    pub fn task_queue(&self, name: impl Into<String>) -> TaskQueue {
        TaskQueue::new(self.inner.clone(), name.into().into())
    }

    /// The default task queue (`kiwipy.tasks` unless configured).
    pub fn default_task_queue(&self) -> TaskQueue {
        TaskQueue::new(self.inner.clone(), self.inner.default_queue.clone())
    }

    /// Sends a task to the default queue. Resolves once the broker accepted it, with a
    /// future of its result. See [`TaskQueue::task_send`].
    pub async fn task_send<T, R>(&self, body: &T) -> Result<ReplyFuture<R>>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.default_task_queue().task_send(body).await
    }

    /// Sends a task to the default queue and asks for no result.
    pub async fn task_send_no_reply<T: Serialize + ?Sized>(&self, body: &T) -> Result<()> {
        self.default_task_queue().task_send_no_reply(body).await
    }

    /// Subscribes to the default task queue; returns the subscriber's identifier.
    pub async fn add_task_subscriber<T, R, S>(&self, subscriber: S) -> Result<String>
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        S: IntoSubscriber<Task<T, R>>,
    {
        self.default_task_queue()
            .add_task_subscriber(subscriber)
            .await
    }

    /// Removes a subscriber of the default task queue.
    pub async fn remove_task_subscriber(&self, identifier: &str) -> Result<()> {
        self.default_task_queue()
            .remove_task_subscriber(identifier)
            .await
    }

    /// Takes one task from the default queue (see [`TaskQueue::next_task`]).
    pub async fn next_task<T: DeserializeOwned + Send + 'static>(
        &self,
        timeout: Duration,
    ) -> Result<PulledTask<T>> {
        self.default_task_queue().next_task(timeout).await
    }

    // ---- lifetime ----------------------------------------------------------------------

    /// Closes the communicator gracefully: it stops taking tasks, lets the task handlers
    /// already running finish within the shutdown grace
    /// ([`Settings::with_shutdown_grace`], default 10 s), then closes the connection, which
    /// returns unfinished tasks to their queues. Results still awaited fail with `Closed`,
    /// and every later call fails with `Closed`. Idempotent.
    ///
    /// Dropping the last clone closes too, but without the grace: running tasks go back
    /// to their queues at once.
    pub async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let inner = self.inner.clone();
        let close = async move {
            inner.drain().await;
            inner.say_goodbye().await;
            inner.replies.close();
            bounded_close(inner.conduit.transport.close()).await
        };
        let result = self.inner.runtime.run(close).await.and_then(|r| r);
        self.inner.conduit.subscribers.close();
        self.inner.runtime.stop();
        self.inner.supervision.stop();
        // Awaited, not joined: the caller's executor thread stays free meanwhile.
        self.inner.runtime.stopped().await;
        self.inner.supervision.stopped().await;
        result
    }

    /// Runs `f` with a communicator connected to `uri`, then closes it, whatever `f`
    /// returned (kiwiPy's `with communicator:`).
    pub async fn scoped<F, Fut, T>(uri: &str, f: F) -> Result<T>
    where
        F: FnOnce(Communicator) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let comm = connect(uri).await?;
        let result = f(comm.clone()).await;
        comm.close().await?;
        result
    }
}

/// Runs `operation` to its end on the communicator's runtime, whatever becomes of the
/// caller's future: a caller that stops waiting (a timeout, a `select!`, a drop) cannot cut
/// a change of subscribers half way (an identifier claimed but never consumed, a binding
/// left without its endpoint). When it succeeded and the caller never took its result —
/// gone before it ended, or after it ended but before the result was read — `undo` takes it
/// back, so the caller that gave up leaves nothing behind.
pub(crate) async fn to_completion<T, Op, Undo, UndoFut>(
    inner: &Arc<Core>,
    operation: Op,
    undo: Undo,
) -> Result<T>
where
    T: Send + 'static,
    Op: Future<Output = Result<T>> + Send + 'static,
    Undo: FnOnce(Arc<Core>, T) -> UndoFut + Send + 'static,
    UndoFut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = futures::channel::oneshot::channel();
    // A weak handle: an operation under way does not keep a dropped communicator open.
    let owner = Arc::downgrade(inner);
    let undo: UndoFn<T> = Box::new(move |inner, value| Box::pin(undo(inner, value)));
    let spawned = inner.runtime.spawn(async move {
        let outcome = operation.await.map(|value| Unclaimed {
            value: Some(value),
            undo: Some(undo),
            owner,
        });
        // Not received: the result is dropped here, and undone.
        let _ = tx.send(outcome);
    });
    if !spawned {
        return Err(Error::closed());
    }
    let mut unclaimed = rx.await.map_err(|_| Error::closed())??;
    Ok(unclaimed
        .value
        .take()
        .expect("an unclaimed result holds its value"))
}

/// What takes an operation's result back.
type UndoFn<T> = Box<dyn FnOnce(Arc<Core>, T) -> futures::future::BoxFuture<'static, ()> + Send>;

/// An operation's result on its way to its caller: undone, on the communicator's runtime,
/// if dropped before the caller takes it (in the channel, with the caller gone).
struct Unclaimed<T: Send + 'static> {
    value: Option<T>,
    undo: Option<UndoFn<T>>,
    owner: std::sync::Weak<Core>,
}

impl<T: Send + 'static> Drop for Unclaimed<T> {
    fn drop(&mut self) {
        if let (Some(value), Some(undo), Some(inner)) =
            (self.value.take(), self.undo.take(), self.owner.upgrade())
        {
            let undone = undo(inner.clone(), value);
            inner.runtime.spawn(undone);
        }
    }
}

impl Core {
    /// Where a subscriber with this identifier starts and reports.
    pub(crate) fn scope(&self, identifier: &str) -> Scope {
        Scope {
            handlers: self.handlers.clone(),
            identifier: identifier.to_owned(),
            events: self.conduit.transport.events(),
            incidents: self.incidents.clone(),
        }
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed());
        }
        Ok(())
    }

    /// Declares a task queue the first time this communicator sends to it.
    pub(crate) async fn declare_once(&self, queue: &str) -> Result<()> {
        if lock(&self.declared).contains(queue) {
            return Ok(());
        }
        self.conduit.transport.declare_task_queue(queue).await?;
        lock(&self.declared).insert(queue.to_owned());
        Ok(())
    }

    /// The actor consuming `queue` for this communicator, started on first use; with
    /// `start: false`, only one that exists.
    pub(crate) async fn task_queue_actor(
        &self,
        queue: &str,
        prefetch: u16,
        start: bool,
    ) -> Result<Option<Child<TaskConsumer>>> {
        self.root
            .send(TaskConsumerChild {
                queue: queue.to_owned(),
                prefetch,
                start,
            })
            .await
    }

    /// Stops every task queue taking tasks and lets running handlers finish, within the
    /// shutdown grace. What is still running then goes back to its queue when the
    /// connection closes.
    async fn drain(&self) {
        let queues = self
            .root
            .send(Inspect)
            .await
            .unwrap_or_default()
            .task_queues;
        let grace = self.settings.shutdown_grace;
        let mut watches = Vec::with_capacity(queues.len());
        for queue in queues {
            if let Ok(running) = queue.send(Drain).await {
                watches.push(running);
            }
        }
        let running: usize = watches.iter().map(|running| *running.borrow()).sum();
        if running > 0 {
            // Said at once: a stop that seems to hang for the grace is waiting for these.
            tracing::warn!(
                running,
                ?grace,
                "closing: waiting up to {grace:?} for {running} running task(s) to finish \
                 (Settings::with_shutdown_grace); what is still running then goes back to \
                 its queue"
            );
        }
        let drains = watches.into_iter().map(|mut running| async move {
            let finished = tokio::time::timeout(grace, running.wait_for(|n| *n == 0))
                .await
                .is_ok();
            if finished { 0 } else { *running.borrow() }
        });
        let unfinished: usize = futures::future::join_all(drains).await.into_iter().sum();
        if unfinished > 0 {
            tracing::warn!(
                unfinished,
                ?grace,
                "closing with tasks still running: they go back to their queues"
            );
        }
    }

    async fn broadcast_hub(&self) -> Result<Child<BroadcastHub>> {
        self.root.send(BroadcastHubChild).await
    }
}

/// How long closing may take at most, whatever the backend: it never hangs. (The AMQP
/// backend bounds each of its steps within this.)
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Closing never hangs: a broker that does not answer the goodbye is left behind.
async fn bounded_close(close: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(CLOSE_TIMEOUT, close)
        .await
        .unwrap_or_else(|_| {
            Err(Error::timeout(format!(
                "the connection did not close within {CLOSE_TIMEOUT:?}"
            )))
        })
}

impl Drop for Core {
    fn drop(&mut self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.replies.close();
        let close = bounded_close(self.conduit.transport.close());
        self.runtime.spawn(async move {
            if let Err(error) = close.await {
                tracing::warn!(%error, "closing the connection failed");
            }
            actix_rt::System::current().stop();
        });
        // The goodbye stops the runtime when it is said; nobody waits for it here, where
        // an executor thread may be dropping the last handle.
        self.runtime.stop_when_done();
    }
}

impl fmt::Debug for Communicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Communicator")
            .field("uri", &self.inner.settings.redacted_uri())
            .field("codec", &self.inner.conduit.codec)
            .field("closed", &self.is_closed())
            .finish()
    }
}
