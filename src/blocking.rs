//! kiwimq without async: a [`Communicator`] whose every call blocks until done, for scripts,
//! CLIs, simulation codes and plain `fn main` — kiwiPy's thread communicator.
//!
//! It wraps the async [`crate::Communicator`], whose own thread keeps the connection and its
//! heartbeats alive. Subscribers are plain closures run on a bounded pool of handler
//! threads ([`Settings::with_blocking_threads`], 16 by default; a burst beyond that waits its
//! turn), so a closure may block for as long as it likes without stalling the connection.
//! A panic in a closure is its message's answer: an error naming the panic. Results come
//! back as [`Reply`] handles to [`wait`](Reply::wait) on.
//!
//! ```
//! use kiwimq::blocking::Communicator;
//! use kiwimq::{HandlerError, Task};
//!
//! # fn main() -> kiwimq::Result<()> {
//! let comm = Communicator::connect("mem://")?;
//! comm.add_task_subscriber(|task: Task<u64>| {
//!     std::thread::sleep(std::time::Duration::from_millis(10)); // blocking is fine
//!     Ok::<_, HandlerError>(task.body * 2)
//! })?;
//! let doubled: u64 = comm.task_send(&21u64)?.wait()?;
//! assert_eq!(doubled, 42);
//! comm.close()
//! # }
//! ```
//!
//! Every call may be made from any thread, an async runtime's included (it then blocks that
//! thread, as any blocking call does).

mod pool;

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind, Result};
use crate::{
    Broadcast, BroadcastFilter, BroadcastOptions, Codec, ConnectionEvent, HandlerError,
    ReplyFuture, Rpc, Settings, Task,
};
use pool::HandlerPool;

/// Wakes a thread parked on a future.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Drives `future` on this thread until it is ready or `deadline` passes (then it is left
/// as it is, to be waited on again). Unlike `futures::executor::block_on` it may be called
/// from within any executor, so a subscriber may use the blocking API too.
fn run_until<F: Future + Unpin>(future: &mut F, deadline: Option<Instant>) -> Option<F::Output> {
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut context = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = std::pin::Pin::new(&mut *future).poll(&mut context) {
            return Some(output);
        }
        match deadline {
            None => thread::park(),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return None;
                }
                thread::park_timeout(deadline - now);
            }
        }
    }
}

/// Drives `future` to its end on this thread.
fn run<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    run_until(&mut future, None).expect("without a deadline the future ran to its end")
}

/// A result to come: of a task or an RPC. [`wait`](Reply::wait) for it, or
/// [`wait_timeout`](Reply::wait_timeout) and try again later.
pub struct Reply<R> {
    future: Option<ReplyFuture<R>>,
}

impl<R: DeserializeOwned> Reply<R> {
    fn new(future: ReplyFuture<R>) -> Self {
        Self {
            future: Some(future),
        }
    }

    /// Blocks until the result comes: the handler's value, [`ErrorKind::Remote`] when it
    /// failed, `Closed` when the communicator closed first (an RPC also fails with
    /// `Timeout` after [`Settings::with_rpc_timeout`]).
    pub fn wait(mut self) -> Result<R> {
        match self.future.take() {
            Some(future) => run(future),
            None => Err(spent()),
        }
    }

    /// Blocks until the result comes or `timeout` passes; then fails with
    /// [`ErrorKind::Timeout`] and may be waited on again. Once it returned the result, the
    /// handle is spent: later waits fail with `Closed`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<R> {
        let Some(future) = self.future.as_mut() else {
            return Err(spent());
        };
        match run_until(future, Some(Instant::now() + timeout)) {
            Some(result) => {
                self.future = None;
                result
            }
            None => Err(Error::timeout(format!("no result within {timeout:?}"))),
        }
    }

    /// The correlation id of the request this reply answers.
    pub fn correlation_id(&self) -> Option<&str> {
        self.future.as_ref().map(ReplyFuture::correlation_id)
    }
}

fn spent() -> Error {
    Error::new(ErrorKind::Closed)
}

impl<R> fmt::Debug for Reply<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("pending", &self.future.is_some())
            .finish()
    }
}

/// A connection to a broker whose every call blocks until done. Cheap to clone; closed by
/// [`close`](Communicator::close) or when the last clone is dropped, which also ends its
/// thread.
#[derive(Clone, Debug)]
pub struct Communicator {
    inner: crate::Communicator,
    /// Where the blocking subscribers run ([`Settings::with_blocking_threads`]).
    pool: Arc<HandlerPool>,
}

impl Communicator {
    /// Connects to `uri` with default [`Settings`] (`mem://`, `mem://NAME`, `amqp://…`).
    pub fn connect(uri: &str) -> Result<Self> {
        Self::connect_with(Settings::new(uri))
    }

    /// Connects with `settings`.
    pub fn connect_with(settings: Settings) -> Result<Self> {
        let inner = run(settings.connect())?;
        let pool = Arc::new(HandlerPool::new(inner.settings().blocking_threads));
        Ok(Self { inner, pool })
    }

    /// The async communicator underneath, for code that mixes both.
    pub fn as_async(&self) -> &crate::Communicator {
        &self.inner
    }

    /// The settings it connected with.
    pub fn settings(&self) -> &Settings {
        self.inner.settings()
    }

    /// The codec of its messages.
    pub fn codec(&self) -> Codec {
        self.inner.codec()
    }

    /// Whether it was closed.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Whether the connection is up now (not while reconnecting, not once closed).
    pub fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }

    /// The connection's changes from now on, blocking for each; ends after `Closed`.
    pub fn connection_events(&self) -> impl Iterator<Item = ConnectionEvent> + use<> {
        let mut events = self.inner.connection_events();
        std::iter::from_fn(move || run(events.next()))
    }

    // ---- tasks -------------------------------------------------------------------------

    /// A handle on the task queue `name`.
    pub fn task_queue(&self, name: impl Into<String>) -> TaskQueue {
        TaskQueue {
            inner: self.inner.task_queue(name),
            pool: self.pool.clone(),
        }
    }

    /// The handle on the default task queue.
    pub fn default_task_queue(&self) -> TaskQueue {
        TaskQueue {
            inner: self.inner.default_task_queue(),
            pool: self.pool.clone(),
        }
    }

    /// Sends a task to the default queue; returns once the broker confirmed it.
    pub fn task_send<T, R>(&self, body: &T) -> Result<Reply<R>>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.default_task_queue().task_send(body)
    }

    /// Sends a task to the default queue whose result nobody wants.
    pub fn task_send_no_reply<T: Serialize + ?Sized>(&self, body: &T) -> Result<()> {
        self.default_task_queue().task_send_no_reply(body)
    }

    /// Subscribes a closure to the default task queue; its return value (or error) is the
    /// task's result. Returns the subscriber's identifier.
    pub fn add_task_subscriber<T, R, F>(&self, handler: F) -> Result<String>
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Task<T, R>) -> std::result::Result<R, HandlerError> + Send + Sync + 'static,
    {
        self.default_task_queue().add_task_subscriber(handler)
    }

    /// Removes a task subscriber of the default queue.
    pub fn remove_task_subscriber(&self, identifier: &str) -> Result<()> {
        self.default_task_queue().remove_task_subscriber(identifier)
    }

    /// Takes the next task of the default queue, waiting up to `timeout`.
    pub fn next_task<T: DeserializeOwned + Send + 'static>(
        &self,
        timeout: Duration,
    ) -> Result<PulledTask<T>> {
        self.default_task_queue().next_task(timeout)
    }

    // ---- RPC ---------------------------------------------------------------------------

    /// Calls the RPC subscriber `identifier`; `Unroutable` at once when nobody serves it.
    pub fn rpc_send<T, R>(&self, identifier: &str, body: &T) -> Result<Reply<R>>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        run(self.inner.rpc_send(identifier, body)).map(Reply::new)
    }

    /// Serves RPC under `identifier` (or a generated one, returned) with a closure.
    pub fn add_rpc_subscriber<T, R, F>(
        &self,
        identifier: Option<&str>,
        handler: F,
    ) -> Result<String>
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Rpc<T, R>) -> std::result::Result<R, HandlerError> + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let pool = self.pool.clone();
        run(self
            .inner
            .add_rpc_subscriber(identifier, move |rpc: Rpc<T, R>| {
                let handler = handler.clone();
                let pool = pool.clone();
                async move { pool.run(move || handler(rpc)).await }
            }))
    }

    /// Stops serving `identifier`.
    pub fn remove_rpc_subscriber(&self, identifier: &str) -> Result<()> {
        run(self.inner.remove_rpc_subscriber(identifier))
    }

    // ---- broadcasts --------------------------------------------------------------------

    /// Sends a broadcast to every subscriber whose filter matches.
    pub fn broadcast_send<T: Serialize + ?Sized>(
        &self,
        body: &T,
        options: BroadcastOptions,
    ) -> Result<()> {
        run(self.inner.broadcast_send(body, options))
    }

    /// Subscribes a closure to the broadcasts `filter` lets through.
    pub fn add_broadcast_subscriber<T, F>(
        &self,
        filter: BroadcastFilter,
        handler: F,
    ) -> Result<String>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Broadcast<T>) + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let pool = self.pool.clone();
        run(self
            .inner
            .add_broadcast_subscriber(filter, move |broadcast: Broadcast<T>| {
                let handler = handler.clone();
                let pool = pool.clone();
                async move {
                    pool.run(move || {
                        handler(broadcast);
                        Ok(())
                    })
                    .await
                }
            }))
    }

    /// Removes a broadcast subscriber.
    pub fn remove_broadcast_subscriber(&self, identifier: &str) -> Result<()> {
        run(self.inner.remove_broadcast_subscriber(identifier))
    }

    // ---- lifetime ----------------------------------------------------------------------

    /// Closes gracefully (see [`crate::Communicator::close`]); later calls fail with
    /// `Closed`. The communicator's thread ends when the last clone is dropped.
    pub fn close(&self) -> Result<()> {
        run(self.inner.close())
    }
}

/// A blocking handle on one named task queue.
#[derive(Clone, Debug)]
pub struct TaskQueue {
    inner: crate::TaskQueue,
    pool: Arc<HandlerPool>,
}

impl TaskQueue {
    /// The queue's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }

    /// How many tasks this communicator's subscribers hold at once (see
    /// [`crate::TaskQueue::with_prefetch`]).
    #[must_use]
    pub fn with_prefetch(self, count: u16) -> Self {
        Self {
            inner: self.inner.with_prefetch(count),
            pool: self.pool,
        }
    }

    /// The queue's dead-letter queue (see [`crate::TaskQueue::dead_letters`]).
    pub fn dead_letters(&self) -> TaskQueue {
        TaskQueue {
            inner: self.inner.dead_letters(),
            pool: self.pool.clone(),
        }
    }

    /// Sends a task; returns once the broker confirmed it, with its result to come.
    pub fn task_send<T, R>(&self, body: &T) -> Result<Reply<R>>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        run(self.inner.task_send(body)).map(Reply::new)
    }

    /// Sends a task whose result nobody wants.
    pub fn task_send_no_reply<T: Serialize + ?Sized>(&self, body: &T) -> Result<()> {
        run(self.inner.task_send_no_reply(body))
    }

    /// Subscribes a closure; its return value (or error) is the task's result, and the task
    /// is acknowledged once it returned. `Err(HandlerError::Rejected)` offers the task to the
    /// next subscriber.
    pub fn add_task_subscriber<T, R, F>(&self, handler: F) -> Result<String>
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Task<T, R>) -> std::result::Result<R, HandlerError> + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let pool = self.pool.clone();
        run(self.inner.add_task_subscriber(move |task: Task<T, R>| {
            let handler = handler.clone();
            let pool = pool.clone();
            async move { pool.run(move || handler(task)).await }
        }))
    }

    /// Removes a task subscriber.
    pub fn remove_task_subscriber(&self, identifier: &str) -> Result<()> {
        run(self.inner.remove_task_subscriber(identifier))
    }

    /// Takes the next task, waiting up to `timeout`; `QueueEmpty` if none came.
    pub fn next_task<T: DeserializeOwned + Send + 'static>(
        &self,
        timeout: Duration,
    ) -> Result<PulledTask<T>> {
        run(self.inner.next_task(timeout)).map(|inner| PulledTask { inner })
    }

    /// The tasks in the queue until it is empty; tasks dropped without an outcome go back
    /// to the queue when the iterator is dropped.
    pub fn iter_tasks<T: DeserializeOwned + Send + 'static>(
        &self,
    ) -> impl Iterator<Item = Result<PulledTask<T>>> + use<T> {
        let mut tasks = Box::pin(self.inner.iter_tasks::<T>());
        std::iter::from_fn(move || run(tasks.next()))
            .map(|task| task.map(|inner| PulledTask { inner }))
    }
}

/// A task taken in pull mode: [`process`](PulledTask::process) it or
/// [`requeue`](PulledTask::requeue) it; dropped undecided, it returns to the queue.
#[derive(Debug)]
pub struct PulledTask<T> {
    inner: crate::PulledTask<T>,
}

impl<T> PulledTask<T> {
    /// The task's body.
    pub fn body(&self) -> &T {
        self.inner.body()
    }

    /// Whether the broker delivered it before.
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered()
    }

    /// Whether the sender asked for no result.
    pub fn no_reply(&self) -> bool {
        self.inner.no_reply()
    }

    /// Sends the outcome to the sender (unless it wanted none), then acknowledges the task.
    pub fn process<R: Serialize>(
        self,
        outcome: std::result::Result<R, HandlerError>,
    ) -> Result<()> {
        run(self.inner.process(outcome))
    }

    /// Puts the task back in the queue.
    pub fn requeue(self) {
        self.inner.requeue();
    }
}
