//! The `TaskConsumer` actor: consumes one task queue while it has subscribers, offers each
//! task to them in turn, sends the result back and acks only after the handler finished.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::Instrument;

use super::{Conduit, encode_reply, exception_reply};
use crate::Codec;
use crate::codec::envelope::{Host, TaskEnvelope};
use crate::error::{Error, ErrorKind, Result};
use crate::messages::{HandlerError, Task};
use crate::metrics::QueueMeters;
use crate::panics::PanicWatch;
use crate::presence::{Activity, Outcome as Ended};
use crate::subscriber::{Delivered, Subscriber};
use crate::transport::{Delivery, Exchange, Outcome, Source};

/// A task as the dispatcher sees it, before a subscriber decodes it with its own type.
#[derive(Clone)]
pub(crate) struct TaskInput {
    pub(crate) body: bytes::Bytes,
    pub(crate) redelivered: bool,
    pub(crate) correlation_id: Option<String>,
}

/// What one subscriber made of a task.
pub(crate) enum TaskAnswer {
    /// Handled: the encoded reply map, unless the sender asked for none. `panicked`: the
    /// reply names the handler's panic, and a queue with a delivery limit dead-letters the
    /// task rather than acknowledging it.
    Reply {
        bytes: Vec<u8>,
        no_reply: bool,
        panicked: bool,
    },
    /// Declined: offer it to the next subscriber.
    Rejected,
    /// Not a task of this subscriber's type.
    Undecodable(Error),
    /// Not handled through no fault of its own (its actor died handling another task, or
    /// is restarting): offer it to the next subscriber.
    Interrupted,
    /// The subscriber is gone for good (reported already): remove it.
    Lost,
}

/// A task subscriber with its types erased; its future is made on the thread it runs on.
#[derive(Clone)]
pub(crate) struct TaskFn {
    pub(crate) call: Arc<dyn Fn(TaskInput) -> LocalBoxFuture<'static, TaskAnswer> + Send + Sync>,
    /// A closure: a task offered to it first is handled on a handler thread.
    pub(crate) on_handler_threads: bool,
}

/// Erases a typed task subscriber.
pub(crate) fn task_fn<T, R>(
    subscriber: Subscriber<Task<T, R>>,
    codec: Codec,
    queue: Arc<str>,
    activity: Activity,
) -> TaskFn
where
    T: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
{
    let tally = activity.tally(&queue);
    let on_handler_threads = subscriber.on_handler_threads();
    let subscriber = Arc::new(subscriber);
    let call = Arc::new(move |input: TaskInput| {
        let subscriber = subscriber.clone();
        let (queue, activity, tally) = (queue.clone(), activity.clone(), tally.clone());
        async move {
            let (body, no_reply): TaskEnvelope<T> = match codec.decode(&input.body) {
                Ok(envelope) => envelope,
                Err(error) => return TaskAnswer::Undecodable(error),
            };
            let (watch, notice) = PanicWatch::new();
            let started = std::time::Instant::now();
            let progress = activity.begin(&queue, input.correlation_id.as_deref());
            let task = Task {
                body,
                redelivered: input.redelivered,
                correlation_id: input.correlation_id,
                trace: crate::trace::TraceContext::current(),
                result: PhantomData,
                progress: Some(progress),
                _watch: watch,
            };
            let delivered = subscriber.deliver(task, Some(&notice)).await;
            crate::metrics::elapsed(crate::metrics::HANDLER_SECONDS, "task", started);
            let outcome = match delivered {
                Delivered::Answer(Err(HandlerError::Rejected)) => {
                    tally.ended(Ended::Rejected);
                    return TaskAnswer::Rejected;
                }
                Delivered::Answer(outcome) => outcome,
                Delivered::Panicked(text) => Err(HandlerError::Panicked(text)),
                Delivered::Interrupted => return TaskAnswer::Interrupted,
                Delivered::Lost => return TaskAnswer::Lost,
            };
            let panicked = matches!(outcome, Err(HandlerError::Panicked(_)));
            let ended = match &outcome {
                Ok(_) => Ended::Handled,
                Err(_) if panicked => Ended::Panicked,
                Err(_) => Ended::Failed,
            };
            tally.ended(ended);
            TaskAnswer::Reply {
                bytes: encode_reply(codec, outcome, Some(Host::this_process())),
                no_reply,
                panicked,
            }
        }
        .boxed_local()
    });
    TaskFn {
        call,
        on_handler_threads,
    }
}

/// What a `TaskConsumer` keeps across its restarts, shared with its supervision's factory:
/// the subscribers, the consumer to cancel, whether it is closing, and its counts.
#[derive(Clone)]
pub(crate) struct Kept(Arc<Mutex<KeptState>>);

struct KeptState {
    subscribers: Arc<Vec<(String, TaskFn)>>,
    consumer: Option<String>,
    draining: bool,
    running: Arc<watch::Sender<usize>>,
    meters: Arc<QueueMeters>,
}

impl Kept {
    pub(crate) fn new(queue: &str) -> Self {
        Self(Arc::new(Mutex::new(KeptState {
            subscribers: Arc::default(),
            consumer: None,
            draining: false,
            running: Arc::new(watch::Sender::new(0)),
            meters: Arc::new(QueueMeters::new(&queue.into())),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeptState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Consumes one task queue for one communicator.
pub(crate) struct TaskConsumer {
    conduit: Conduit,
    queue: Arc<str>,
    /// Its counters, registered once.
    meters: Arc<QueueMeters>,
    prefetch: u16,
    /// Copied on write, so each delivery takes a snapshot for the price of a count.
    subscribers: Arc<Vec<(String, TaskFn)>>,
    /// The running consumer's tag; none while there are no subscribers.
    consumer: Option<String>,
    /// How many tasks are being handled now.
    running: Arc<watch::Sender<usize>>,
    /// Closing: no new consumer starts.
    draining: bool,
    /// Which subscriber is offered the next task first: they take turns, so that several
    /// actor subscribers of one queue work at once.
    turn: usize,
    /// What a restart starts again from; written whenever it changes.
    kept: Kept,
    /// A restart's predecessor's consumer, to cancel: its stream went with the old context.
    stale: Option<String>,
}

impl TaskConsumer {
    /// The queue's actor, as first started or as `kept` left it.
    pub(crate) fn new(conduit: Conduit, queue: String, prefetch: u16, kept: Kept) -> Self {
        let state = kept.lock();
        let actor = Self {
            conduit,
            meters: state.meters.clone(),
            queue: queue.into(),
            prefetch,
            subscribers: state.subscribers.clone(),
            consumer: None,
            running: state.running.clone(),
            draining: state.draining,
            turn: 0,
            stale: state.consumer.clone(),
            kept: kept.clone(),
        };
        drop(state);
        actor
    }

    /// Writes down what a restart starts from.
    fn keep(&self) {
        let mut kept = self.kept.lock();
        kept.subscribers = self.subscribers.clone();
        kept.consumer = self.consumer.clone();
        kept.draining = self.draining;
    }

    /// Starts consuming the queue; its deliveries come to this actor as a stream.
    fn consume(&mut self) -> impl ActorFuture<Self, Output = Result<()>> + 'static {
        let consume = self
            .conduit
            .transport
            .consume(Source::Tasks(self.queue.to_string()), self.prefetch);
        consume.into_actor(self).map(|result, actor, ctx| {
            let consumer = result?;
            tracing::debug!(queue = %actor.queue, tag = %consumer.tag, "consuming tasks");
            actor.consumer = Some(consumer.tag);
            actor.keep();
            ctx.add_stream(consumer.deliveries);
            Ok(())
        })
    }
}

impl Actor for TaskConsumer {
    type Context = Context<Self>;

    /// After a restart, cancels the old consumer on the broker (what it delivered and
    /// nobody settled goes back to the queue) and consumes again for the subscribers it
    /// kept.
    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(tag) = self.stale.take() {
            let cancel = self.conduit.transport.cancel(&tag);
            actix::spawn(async move {
                let _ = cancel.await;
            });
            self.keep();
        }
        self.consume_again(ctx, 0);
    }
}

impl TaskConsumer {
    /// After a restart, consumes again for the subscribers it kept — trying again, with
    /// backoff, until it does, or has no subscriber left, or closes: never registered and
    /// deaf.
    fn consume_again(&mut self, ctx: &mut Context<Self>, attempt: u32) {
        if self.subscribers.is_empty() || self.draining || self.consumer.is_some() {
            return;
        }
        ctx.wait(self.consume().map(move |result, actor, ctx| {
            if let Err(error) = result {
                let delay = crate::supervision::retry_delay(attempt);
                tracing::warn!(queue = %actor.queue, %error, attempt, "consuming again after a restart failed; trying again in {delay:?}");
                ctx.run_later(delay, move |actor, ctx| actor.consume_again(ctx, attempt + 1));
            }
        }));
    }
}

/// Adds a subscriber, starting the consumer for the first one.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct AddSubscriber {
    pub(crate) id: String,
    pub(crate) handler: TaskFn,
}

/// Removes a subscriber, stopping the consumer after the last one.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct RemoveSubscriber {
    pub(crate) id: String,
    /// Removed because its actor died: no error if already gone.
    pub(crate) dead: bool,
}

impl Handler<AddSubscriber> for TaskConsumer {
    type Result = AtomicResponse<Self, Result<()>>;

    fn handle(&mut self, message: AddSubscriber, _: &mut Context<Self>) -> Self::Result {
        if self.subscribers.iter().any(|(id, _)| *id == message.id) {
            let error = Error::new(ErrorKind::DuplicateSubscriber(message.id));
            return AtomicResponse::new(Box::pin(fut::ready(Err(error))));
        }
        if self.draining {
            return AtomicResponse::new(Box::pin(fut::ready(Err(Error::closed()))));
        }
        Arc::make_mut(&mut self.subscribers).push((message.id, message.handler));
        self.conduit.subscribers.add("task", 1);
        self.keep();
        if self.consumer.is_some() {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(()))));
        }
        AtomicResponse::new(Box::pin(self.consume().map(|result, actor, _| {
            if result.is_err() {
                Arc::make_mut(&mut actor.subscribers).pop();
                actor.conduit.subscribers.add("task", -1);
                actor.keep();
            }
            result
        })))
    }
}

impl Handler<RemoveSubscriber> for TaskConsumer {
    type Result = AtomicResponse<Self, Result<()>>;

    fn handle(&mut self, message: RemoveSubscriber, _: &mut Context<Self>) -> Self::Result {
        let before = self.subscribers.len();
        Arc::make_mut(&mut self.subscribers).retain(|(id, _)| *id != message.id);
        if self.subscribers.len() < before {
            self.conduit.subscribers.add("task", -1);
        }
        if self.subscribers.len() == before && !message.dead {
            let error = Error::new(ErrorKind::UnknownSubscriber(message.id));
            return AtomicResponse::new(Box::pin(fut::ready(Err(error))));
        }
        let cancel = match (&self.consumer, self.subscribers.is_empty()) {
            (Some(tag), true) => self.conduit.transport.cancel(tag),
            _ => {
                self.keep();
                return AtomicResponse::new(Box::pin(fut::ready(Ok(()))));
            }
        };
        self.consumer = None;
        self.keep();
        AtomicResponse::new(Box::pin(cancel.into_actor(self)))
    }
}

/// How many subscribers the queue has, and how many tasks they are handling.
#[derive(Message)]
#[rtype(result = "(usize, usize)")]
pub(crate) struct Stats;

impl Handler<Stats> for TaskConsumer {
    type Result = MessageResult<Stats>;

    fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
        MessageResult((self.subscribers.len(), *self.running.borrow()))
    }
}

/// Asks for the queue's name, prefetch, subscribers and tasks running, for its presence.
#[derive(Message)]
#[rtype(result = "(Arc<str>, u16, usize, usize)")]
pub(crate) struct Describe;

impl Handler<Describe> for TaskConsumer {
    type Result = MessageResult<Describe>;

    fn handle(&mut self, _: Describe, _: &mut Context<Self>) -> Self::Result {
        MessageResult((
            self.queue.clone(),
            self.prefetch,
            self.subscribers.len(),
            *self.running.borrow(),
        ))
    }
}

/// Stops taking tasks (the consumer is cancelled; tasks already delivered stay ours) and
/// answers with a watch of how many are still being handled.
#[derive(Message)]
#[rtype(result = "watch::Receiver<usize>")]
pub(crate) struct Drain;

impl Handler<Drain> for TaskConsumer {
    type Result = AtomicResponse<Self, watch::Receiver<usize>>;

    fn handle(&mut self, _: Drain, _: &mut Context<Self>) -> Self::Result {
        self.draining = true;
        let running = self.running.subscribe();
        let consumer = self.consumer.take();
        self.keep();
        let Some(tag) = consumer else {
            return AtomicResponse::new(Box::pin(fut::ready(running)));
        };
        let cancel = self.conduit.transport.cancel(&tag);
        let queue = self.queue.clone();
        AtomicResponse::new(Box::pin(cancel.into_actor(self).map(
            move |result, _, _| {
                if let Err(error) = result {
                    tracing::debug!(%queue, %error, "cancelling the consumer while closing failed");
                }
                running
            },
        )))
    }
}

/// Counts a task as running while it lives; carries its queue's meters to the dispatch.
struct Running {
    count: Arc<watch::Sender<usize>>,
    meters: Arc<QueueMeters>,
}

impl Running {
    fn start(count: &Arc<watch::Sender<usize>>, meters: &Arc<QueueMeters>) -> Self {
        count.send_modify(|n| *n += 1);
        meters.running.increment(1.0);
        Self {
            count: count.clone(),
            meters: meters.clone(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.count.send_modify(|n| *n -= 1);
        self.meters.running.decrement(1.0);
    }
}

/// Settles a task, counting how.
fn settle(
    acker: crate::transport::Acker,
    outcome: Outcome,
    meters: &QueueMeters,
    dead_lettering: bool,
) {
    let counter = match outcome {
        Outcome::Ack => &meters.acked,
        Outcome::Requeue => &meters.requeued,
        Outcome::Discard if dead_lettering => &meters.dead_lettered,
        Outcome::Discard => &meters.rejected,
    };
    counter.increment(1);
    acker.settle(outcome);
}

impl StreamHandler<Delivery> for TaskConsumer {
    fn handle(&mut self, delivery: Delivery, ctx: &mut Context<Self>) {
        self.meters.delivered.increment(1);
        if delivery.redelivered {
            self.meters.redelivered.increment(1);
        }
        if self.draining {
            // Delivered just before the consumer was cancelled: back to the queue.
            settle(delivery.acker, Outcome::Requeue, &self.meters, false);
            return;
        }
        let subscribers = self.subscribers.clone();
        let conduit = self.conduit.clone();
        let queue = self.queue.clone();
        let me = ctx.address();
        let running = Running::start(&self.running, &self.meters);
        let first = self.turn;
        self.turn = self.turn.wrapping_add(1);
        let (trace, span) = crate::trace::handle_span(
            "task",
            &self.queue,
            delivery.correlation_id.as_deref(),
            delivery.redelivered,
            delivery.traceparent,
        );
        let on_handler_threads = subscribers
            .get(first % subscribers.len().max(1))
            .is_some_and(|(_, handler)| handler.on_handler_threads);
        let handlers = conduit.handlers.clone();
        // Made where it runs: offered first to a closure, on a handler thread (one hop, the
        // reply and the ack sent from there); to an actor, here.
        let handling = move || {
            let handling = async move {
                dispatch(
                    delivery,
                    subscribers,
                    first,
                    conduit,
                    queue,
                    &running.meters,
                    me,
                )
                .await;
                drop(running);
            };
            crate::trace::maybe_scope(trace, handling).instrument(span)
        };
        if on_handler_threads {
            handlers.spawn(handling);
        } else {
            actix::spawn(handling());
        }
    }

    /// A cancelled consumer's stream ends; the actor lives on for the next one.
    fn finished(&mut self, _: &mut Context<Self>) {}
}

/// Offers one task to the subscribers in turn, from the `first`th on, and settles it.
async fn dispatch(
    delivery: Delivery,
    subscribers: Arc<Vec<(String, TaskFn)>>,
    first: usize,
    conduit: Conduit,
    queue: Arc<str>,
    meters: &QueueMeters,
    me: Addr<TaskConsumer>,
) {
    let Delivery {
        body,
        correlation_id,
        reply_to,
        redelivered,
        delivery_count,
        acker,
        ..
    } = delivery;
    tracing::debug!(%queue, ?correlation_id, redelivered, "task received");
    let input = TaskInput {
        body,
        redelivered,
        correlation_id: correlation_id.clone(),
    };
    let mut undecodable = None;
    let mut declined = false;
    let mut rejected = false;
    let count = subscribers.len();
    let in_turn = subscribers
        .iter()
        .cycle()
        .skip(first % count.max(1))
        .take(count);
    for (id, handler) in in_turn {
        match (handler.call)(input.clone()).await {
            TaskAnswer::Reply {
                bytes,
                no_reply,
                panicked,
            } => {
                let outcome = match (no_reply, reply_to) {
                    (false, Some(reply_to)) => {
                        match conduit
                            .reply(Exchange::Tasks, reply_to, correlation_id.clone(), bytes)
                            .await
                        {
                            Ok(()) => Outcome::Ack,
                            Err(error) => {
                                tracing::warn!(%queue, ?correlation_id, %error, "task reply failed; requeueing");
                                Outcome::Requeue
                            }
                        }
                    }
                    _ => Outcome::Ack,
                };
                let outcome = match outcome {
                    // Answered, and kept for a look in the dead-letter queue.
                    Outcome::Ack if panicked && conduit.dead_lettering => Outcome::Discard,
                    outcome => outcome,
                };
                if panicked {
                    tracing::error!(%queue, subscriber = %id, ?correlation_id, "a task handler panicked; the sender gets the panic as an error");
                }
                settle(acker, outcome, meters, conduit.dead_lettering);
                return;
            }
            TaskAnswer::Rejected => {
                declined = true;
                rejected = true;
            }
            TaskAnswer::Interrupted => declined = true,
            TaskAnswer::Undecodable(error) => undecodable = Some(error),
            TaskAnswer::Lost => {
                declined = true;
                me.do_send(RemoveSubscriber {
                    id: id.clone(),
                    dead: true,
                });
            }
        }
    }
    match undecodable {
        Some(error) if !declined => {
            tracing::warn!(%queue, ?correlation_id, %error, "undecodable task discarded");
            meters.undecodable.increment(1);
            if let Some(reply_to) = reply_to {
                let bytes = exception_reply(
                    conduit.codec,
                    &format!("the task could not be decoded: {error}"),
                    Some(Host::this_process()),
                );
                if let Err(error) = conduit
                    .reply(Exchange::Tasks, reply_to, correlation_id, bytes)
                    .await
                {
                    tracing::warn!(%queue, %error, "could not report an undecodable task");
                }
            }
            settle(acker, Outcome::Discard, meters, conduit.dead_lettering);
        }
        _ if rejected
            && conduit
                .delivery_limit
                .is_some_and(|limit| delivery_count >= limit) =>
        {
            // Put back once more, the broker would give it up: the sender is told why.
            tracing::warn!(%queue, ?correlation_id, delivery_count, "every subscriber rejected the task on its last delivery: dead-lettered");
            if let Some(reply_to) = reply_to {
                let text = format!("{REJECTED} {delivery_count} time(s) before");
                let bytes = exception_reply(conduit.codec, &text, Some(Host::this_process()));
                if let Err(error) = conduit
                    .reply(Exchange::Tasks, reply_to, correlation_id, bytes)
                    .await
                {
                    tracing::warn!(%queue, %error, "could not report a rejected task");
                }
            }
            settle(acker, Outcome::Discard, meters, conduit.dead_lettering);
        }
        _ => {
            if rejected {
                // Not at once: a worker whose every subscriber rejects the task would get it
                // straight back, and spin.
                tracing::debug!(%queue, ?correlation_id, "every subscriber rejected the task; requeued in {REJECTED_PAUSE:?}");
                actix_rt::time::sleep(REJECTED_PAUSE).await;
            } else {
                tracing::debug!(%queue, ?correlation_id, "no subscriber took the task; requeued");
            }
            settle(acker, Outcome::Requeue, meters, false);
        }
    }
}

/// How long a task every subscriber rejected is held before it goes back to its queue.
pub(crate) const REJECTED_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// How the exception reply of a task given up after every subscriber rejected it begins;
/// the sender reads it as [`ErrorKind::Rejected`](crate::ErrorKind::Rejected).
pub(crate) const REJECTED: &str = "rejected by every subscriber: given up after it was returned";

crate::supervision::test_hooks!(TaskConsumer);
