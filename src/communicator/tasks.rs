//! [`TaskQueue`], a handle on one named task queue (send, subscribe, pull), and
//! [`PulledTask`], a task taken in pull mode and held until its outcome is known.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Core;
use crate::actors::replies::ReplyFuture;
use crate::actors::task_consumer::{self, task_fn};
use crate::actors::{Conduit, encode_reply, exception_reply};
use crate::codec::envelope::Host;
use crate::codec::envelope::TaskEnvelope;
use crate::error::{Error, ErrorKind, Result};
use crate::messages::{HandlerError, Task};
use crate::subscriber::IntoSubscriber;
use crate::trace::TraceContext;
use crate::transport::{Acker, Delivery, Exchange, Outcome, Outgoing, QueueStats, Route};

/// One named task queue: tasks sent to it wait there, durably, until a worker takes one.
#[derive(Clone)]
pub struct TaskQueue {
    inner: Arc<Core>,
    /// Shared with the metrics' labels: naming the queue in each costs a count.
    name: Arc<str>,
    prefetch: Option<u16>,
}

impl TaskQueue {
    pub(crate) fn new(inner: Arc<Core>, name: Arc<str>) -> Self {
        Self {
            inner,
            name,
            prefetch: None,
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's dead-letter queue, `<name>.dlq`: where tasks go that came back more
    /// often than [`Settings::with_delivery_limit`](crate::Settings::with_delivery_limit)
    /// allows, or that no subscriber could decode. Read it like any task queue (it has no
    /// delivery limit of its own); it exists only with a delivery limit.
    pub fn dead_letters(&self) -> TaskQueue {
        TaskQueue::new(
            self.inner.clone(),
            crate::transport::dead_letter_queue(&self.name).into(),
        )
    }

    /// This queue's counts now, without taking a task. `Refused` if the broker has no such
    /// queue (it is declared by the first send or subscriber).
    pub async fn stats(&self) -> Result<QueueStats> {
        self.inner.check_open()?;
        self.inner.conduit.transport.queue_stats(&self.name).await
    }

    /// Deletes every task waiting in this queue (not those being handled now); returns how
    /// many. Their senders get no result.
    pub async fn purge(&self) -> Result<u32> {
        self.inner.check_open()?;
        self.inner.conduit.transport.purge(&self.name).await
    }

    /// Sends every task of this queue's dead-letter queue (see
    /// [`dead_letters`](Self::dead_letters)) back to this queue, to run again, with its
    /// correlation id and reply address: a sender still waiting gets the result. Returns
    /// how many. Each is taken off the dead-letter queue only once the queue has it; with no
    /// such queue the send fails `Unroutable` and the task stays a dead letter. A queue
    /// without a dead-letter queue is `Refused` at once.
    pub async fn requeue_dead_letters(&self) -> Result<u32> {
        let inner = &self.inner;
        inner.check_open()?;
        let dead = crate::transport::dead_letter_queue(&self.name);
        let transport = &inner.conduit.transport;
        let mut moved = 0;
        let no_dead_letter_queue = |error: Error| match error.kind() {
            ErrorKind::Refused(_) => Error::new(ErrorKind::Refused(format!(
                "'{}' has no dead-letter queue '{dead}' (one is declared with the queue by \
                 Settings::with_delivery_limit or with_quorum_queues)",
                self.name
            ))),
            _ => error,
        };
        while let Some(delivery) = transport.get(&dead).await.map_err(no_dead_letter_queue)? {
            let message = Outgoing {
                body: delivery.body.to_vec(),
                correlation_id: delivery.correlation_id.clone(),
                reply_to: delivery.reply_to.clone(),
                persistent: true,
                mandatory: true,
                traceparent: delivery.traceparent,
            };
            // On failure the delivery is dropped unsettled: back to the dead-letter queue.
            transport
                .publish(Route::Task(self.name.clone()), message)
                .await?;
            delivery.acker.settle(Outcome::Ack);
            moved += 1;
        }
        Ok(moved)
    }

    /// How many tasks this communicator's subscribers to this queue hold at once (0 = no
    /// limit). Applies when the queue's first subscriber is added; the default is the
    /// communicator's setting.
    #[must_use]
    pub fn with_prefetch(mut self, count: u16) -> Self {
        self.prefetch = Some(count);
        self
    }

    /// Sends a task. Resolves once the broker accepted (and, on RabbitMQ, confirmed) it,
    /// with a future of its result: the handler's value, [`ErrorKind::Remote`] if it failed.
    /// The task waits in the queue while no worker is there.
    pub async fn task_send<T, R>(&self, body: &T) -> Result<ReplyFuture<R>>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let reply = self.inner.replies.expect(
            correlation_id.clone(),
            self.inner.conduit.codec,
            None,
            "task",
        )?;
        self.publish(body, false, correlation_id).await?;
        Ok(reply)
    }

    /// Sends a task whose result nobody wants: nothing is sent back.
    pub async fn task_send_no_reply<T: Serialize + ?Sized>(&self, body: &T) -> Result<()> {
        self.publish(body, true, uuid::Uuid::new_v4().to_string())
            .await
    }

    async fn publish<T: Serialize + ?Sized>(
        &self,
        body: &T,
        no_reply: bool,
        correlation_id: String,
    ) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        let body = inner.conduit.codec.encode(&(body, no_reply))?;
        inner.declare_once(&self.name).await?;
        let message = Outgoing {
            body,
            correlation_id: Some(correlation_id),
            reply_to: (!no_reply).then(|| inner.task_reply_queue.clone()),
            persistent: true,
            mandatory: true,
            traceparent: None,
        };
        inner
            .conduit
            .send(Route::Task(self.name.clone()), message)
            .await
    }

    /// Subscribes an actor (or closure) to this queue; returns its identifier. Each task goes
    /// to one subscriber of one communicator; it is acknowledged after the handler finished.
    pub async fn add_task_subscriber<T, R, S>(&self, subscriber: S) -> Result<String>
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        S: IntoSubscriber<Task<T, R>>,
    {
        let inner = &self.inner;
        inner.check_open()?;
        let id = uuid::Uuid::new_v4().to_string();
        let handler = task_fn(
            subscriber.into_subscriber(&inner.scope(&id)),
            inner.conduit.codec,
            self.name.clone(),
            inner.activity.clone(),
        );
        let prefetch = self.prefetch.unwrap_or(inner.settings.task_prefetch);
        // Added as one operation: a caller that gives up has it undone.
        let queue = self.name.clone();
        crate::communicator::to_completion(
            inner,
            add_subscriber(inner.clone(), queue.clone(), prefetch, id, handler),
            |inner, id| async move {
                let _ = remove_subscriber(inner, queue, id).await;
            },
        )
        .await
    }

    /// Removes a subscriber; `UnknownSubscriber` if this queue has none with `identifier`.
    /// Tasks it is handling still complete.
    pub async fn remove_task_subscriber(&self, identifier: &str) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        crate::communicator::to_completion(
            inner,
            remove_subscriber(inner.clone(), self.name.clone(), identifier.to_owned()),
            |_, ()| async {},
        )
        .await
    }

    /// Takes the next task, waiting up to `timeout` for one; `QueueEmpty` if none came.
    /// The task is held until [`PulledTask::process`] or [`PulledTask::requeue`]; dropped
    /// without an outcome, it goes back to the queue.
    pub async fn next_task<T: DeserializeOwned + Send + 'static>(
        &self,
        timeout: Duration,
    ) -> Result<PulledTask<T>> {
        let inner = self.inner.clone();
        let name = self.name.to_string();
        let delivery = self
            .inner
            .runtime
            .run(wait_for_task(inner, name, timeout))
            .await??;
        PulledTask::decode(delivery, self.inner.conduit.clone(), None).await
    }

    /// Iterates over the tasks in the queue until it is empty. Tasks dropped without an
    /// outcome go back to the queue when the stream is dropped, so one pass sees each task
    /// once.
    pub fn iter_tasks<T: DeserializeOwned + Send + 'static>(
        &self,
    ) -> impl Stream<Item = Result<PulledTask<T>>> + use<T> {
        let parked: Parking = Arc::default();
        let state = (self.clone(), parked);
        futures::stream::unfold(Some(state), |state| async move {
            let (queue, parked) = state?;
            queue.inner.check_open().ok()?;
            if let Err(error) = queue.inner.declare_once(&queue.name).await {
                return Some((Err(error), None));
            }
            match queue.inner.conduit.transport.get(&queue.name).await {
                Ok(None) => None,
                Ok(Some(delivery)) => {
                    let task = PulledTask::decode(
                        delivery,
                        queue.inner.conduit.clone(),
                        Some(parked.clone()),
                    )
                    .await;
                    Some((task, Some((queue, parked))))
                }
                Err(error) => Some((Err(error), None)),
            }
        })
    }
}

impl fmt::Debug for TaskQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskQueue")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Adds a subscriber to this communicator's consumer of `queue`, started on first use.
async fn add_subscriber(
    inner: Arc<Core>,
    queue: Arc<str>,
    prefetch: u16,
    id: String,
    handler: task_consumer::TaskFn,
) -> Result<String> {
    let actor = inner
        .task_queue_actor(&queue, prefetch, true)
        .await?
        .ok_or_else(Error::closed)?;
    actor
        .send(task_consumer::AddSubscriber {
            id: id.clone(),
            handler,
        })
        .await??;
    Ok(id)
}

async fn remove_subscriber(inner: Arc<Core>, queue: Arc<str>, id: String) -> Result<()> {
    let Some(actor) = inner.task_queue_actor(&queue, 0, false).await? else {
        return Err(Error::new(ErrorKind::UnknownSubscriber(id)));
    };
    actor
        .send(task_consumer::RemoveSubscriber { id, dead: false })
        .await?
}

/// Polls the queue until a task comes or the deadline passes.
async fn wait_for_task(inner: Arc<Core>, queue: String, timeout: Duration) -> Result<Delivery> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    inner.declare_once(&queue).await?;
    loop {
        inner.check_open()?;
        if let Some(delivery) = inner.conduit.transport.get(&queue).await? {
            return Ok(delivery);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(Error::new(ErrorKind::QueueEmpty));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Ackers of tasks an iteration handed out and the user dropped: they requeue when the
/// iteration ends, not at once, or the same task would come straight back.
type Parking = Arc<Mutex<Vec<Acker>>>;

/// A task taken from a queue in pull mode. Decide its fate with [`process`](Self::process)
/// (result sent back, then acked) or [`requeue`](Self::requeue); dropped undecided, it
/// returns to the queue.
pub struct PulledTask<T> {
    body: T,
    no_reply: bool,
    redelivered: bool,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    /// The handling's trace context: a child of the sender's, when it sent one.
    trace: Option<TraceContext>,
    acker: Option<Acker>,
    conduit: Conduit,
    parking: Option<Parking>,
}

impl<T: DeserializeOwned> PulledTask<T> {
    /// Decodes a delivery; undecodable tasks get an error reply and are discarded (they
    /// would fail the same way for every worker), and the caller gets the `Codec` error.
    async fn decode(
        delivery: Delivery,
        conduit: Conduit,
        parking: Option<Parking>,
    ) -> Result<Self> {
        let Delivery {
            body,
            correlation_id,
            reply_to,
            redelivered,
            delivery_count: _,
            acker,
            traceparent,
        } = delivery;
        match conduit.codec.decode::<TaskEnvelope<T>>(&body) {
            Ok((body, no_reply)) => Ok(Self {
                body,
                no_reply,
                redelivered,
                correlation_id,
                reply_to,
                trace: traceparent.map(|sender| sender.child()),
                acker: Some(acker),
                conduit,
                parking,
            }),
            Err(error) => {
                tracing::warn!(?correlation_id, %error, "undecodable pulled task discarded");
                if let Some(reply_to) = reply_to {
                    let text = format!("the task could not be decoded: {error}");
                    let bytes = exception_reply(conduit.codec, &text, Some(Host::this_process()));
                    let _ = conduit
                        .reply(Exchange::Tasks, reply_to, correlation_id, bytes)
                        .await;
                }
                acker.settle(Outcome::Discard);
                Err(error)
            }
        }
    }
}

impl<T> PulledTask<T> {
    /// The task's body.
    pub fn body(&self) -> &T {
        &self.body
    }

    /// Whether the broker delivered this task before.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Whether the sender asked for no result.
    pub fn no_reply(&self) -> bool {
        self.no_reply
    }

    /// The trace this task's handling is part of, when its sender sent one (see
    /// [`crate::trace`]): [`process`](Self::process) sends the result in it, and what the
    /// worker sends inside [`trace::scope`](crate::trace::scope) with it continues it.
    pub fn trace(&self) -> Option<TraceContext> {
        self.trace
    }

    /// Records the task's outcome: the result or error is sent to the sender (unless it
    /// asked for none), then the task is acknowledged. [`HandlerError::Rejected`] requeues.
    pub async fn process<R: Serialize>(
        mut self,
        outcome: std::result::Result<R, HandlerError>,
    ) -> Result<()> {
        let Some(acker) = self.acker.take() else {
            return Ok(());
        };
        if matches!(outcome, Err(HandlerError::Rejected)) {
            acker.settle(Outcome::Requeue);
            return Ok(());
        }
        if let (false, Some(reply_to)) = (self.no_reply, self.reply_to.take()) {
            let bytes = encode_reply(self.conduit.codec, outcome, Some(Host::this_process()));
            let correlation_id = self.correlation_id.clone();
            let reply = self
                .conduit
                .reply(Exchange::Tasks, reply_to, correlation_id, bytes);
            if let Err(error) = crate::trace::maybe_scope(self.trace, reply).await {
                acker.settle(Outcome::Requeue);
                return Err(error);
            }
        }
        acker.settle(Outcome::Ack);
        Ok(())
    }

    /// Puts the task back in the queue for any worker.
    pub fn requeue(mut self) {
        if let Some(acker) = self.acker.take() {
            acker.settle(Outcome::Requeue);
        }
    }
}

impl<T> Drop for PulledTask<T> {
    fn drop(&mut self) {
        let (Some(acker), Some(parking)) = (self.acker.take(), &self.parking) else {
            return;
        };
        parking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(acker);
    }
}

impl<T: fmt::Debug> fmt::Debug for PulledTask<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PulledTask")
            .field("body", &self.body)
            .field("no_reply", &self.no_reply)
            .field("redelivered", &self.redelivered)
            .field("correlation_id", &self.correlation_id)
            .finish_non_exhaustive()
    }
}
