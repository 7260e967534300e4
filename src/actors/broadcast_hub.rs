//! The `BroadcastHub` actor: consumes this communicator's broadcast queue and hands each
//! broadcast to every subscriber whose filter it passes.

use std::sync::{Arc, Mutex};

use actix::prelude::*;
use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde::de::{DeserializeOwned, IgnoredAny};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::Codec;
use crate::actors::rpc_endpoint::Gone;
use crate::codec::envelope::{BroadcastEnvelope, plain_text};
use crate::error::Result;
use crate::filter::BroadcastFilter;
use crate::messages::Broadcast;
use crate::subscriber::{Delivered, Subscriber};
use crate::transport::{Delivery, Outcome, Source, Transport};

/// A broadcast subscriber with its type and filter erased: called as a broadcast arrives
/// (in order: a closure's turn is taken then), it gives the broadcast's handling, to run
/// where the subscriber's handlers run — none if the subscriber does not want it. The
/// handling says whether the subscriber turned out to be gone for good.
#[derive(Clone)]
pub(crate) struct BroadcastFn {
    pub(crate) call: BroadcastCall,
    /// A closure: its handling runs on a handler thread.
    pub(crate) on_handler_threads: bool,
}

/// What a broadcast subscriber is called with as a broadcast arrives.
pub(crate) type BroadcastCall =
    Arc<dyn Fn(&bytes::Bytes) -> Option<BroadcastHandling> + Send + Sync>;

/// One broadcast's handling by one subscriber, made on the thread it runs on.
pub(crate) type BroadcastHandling = Box<dyn FnOnce() -> LocalBoxFuture<'static, Gone> + Send>;

/// Erases a typed broadcast recipient behind its filter. Errors are logged: broadcasts are
/// fire and forget. At most `max_in_flight` broadcasts are handed to it at once.
pub(crate) fn broadcast_fn<T>(
    subscriber: Subscriber<Broadcast<T>>,
    filter: BroadcastFilter,
    codec: Codec,
    max_in_flight: usize,
) -> BroadcastFn
where
    T: DeserializeOwned + Send + 'static,
{
    let on_handler_threads = subscriber.on_handler_threads();
    let subscriber = Arc::new(subscriber);
    let in_flight = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let call = Arc::new(move |bytes: &bytes::Bytes| -> Option<BroadcastHandling> {
        let envelope: BroadcastEnvelope<T> = match codec.decode_broadcast(bytes) {
            Ok(envelope) => envelope,
            Err(error) => {
                // Only complain when this subscriber would have wanted the broadcast.
                let header = codec.decode_broadcast::<IgnoredAny>(bytes);
                match header {
                    Ok(h) if !passes(&filter, &h) => {}
                    _ => {
                        tracing::warn!(%error, "undecodable broadcast skipped by a subscriber");
                        crate::metrics::count(crate::metrics::UNDECODABLE, "broadcast");
                    }
                }
                return None;
            }
        };
        if !passes(&filter, &envelope) {
            return None;
        }
        let broadcast = Broadcast {
            body: envelope.body,
            sender: envelope.sender,
            subject: envelope.subject,
            correlation_id: envelope.correlation_id,
        };
        let subscriber = subscriber.clone();
        let in_flight = in_flight.clone();
        let turn = subscriber.turn();
        let mut turn = turn;
        Some(Box::new(move || {
            async move {
                turn.ready().await;
                // Never closed: a permit always comes.
                let _permit = in_flight.acquire_owned().await;
                let started = std::time::Instant::now();
                let delivered = subscriber.deliver_in(turn, broadcast, None).await;
                crate::metrics::elapsed(crate::metrics::HANDLER_SECONDS, "broadcast", started);
                match delivered {
                    Delivered::Answer(Ok(())) => {}
                    Delivered::Answer(Err(error)) => {
                        tracing::error!(subscriber = %subscriber.identifier(), %error, "broadcast subscriber failed");
                    }
                    Delivered::Panicked(text) => {
                        tracing::error!(subscriber = %subscriber.identifier(), panic = %text, "broadcast subscriber panicked");
                    }
                    // Reported by the subscriber already; a broadcast is not kept.
                    Delivered::Interrupted => {}
                    Delivered::Lost => return true,
                }
                false
            }
            .boxed_local()
        }))
    });
    BroadcastFn {
        call,
        on_handler_threads,
    }
}

/// A broadcast being handled: acknowledged once every subscriber's handling has ended
/// (the last one drops it).
struct Handed {
    acker: Mutex<Option<crate::transport::Acker>>,
}

impl Drop for Handed {
    fn drop(&mut self) {
        let acker = self
            .acker
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(acker) = acker {
            acker.settle(Outcome::Ack);
        }
    }
}

/// Whether a broadcast passes a filter, which sees its headers as text: a filter on sender
/// `"47"` matches AiiDA's integer 47.
fn passes<T>(filter: &BroadcastFilter, envelope: &BroadcastEnvelope<T>) -> bool {
    let subject = envelope.subject.as_ref().and_then(plain_text);
    let sender = envelope.sender.as_ref().and_then(plain_text);
    filter.matches(subject.as_deref(), sender.as_deref())
}

/// What a `BroadcastHub` keeps across its restarts: its subscribers, and the consumer to
/// cancel.
#[derive(Clone, Default)]
pub(crate) struct Kept(Arc<Mutex<KeptState>>);

#[derive(Clone, Default)]
struct KeptState {
    subscribers: Vec<(String, BroadcastFn)>,
    consumer: Option<String>,
}

impl Kept {
    fn lock(&self) -> std::sync::MutexGuard<'_, KeptState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hands broadcasts to this communicator's broadcast subscribers.
pub(crate) struct BroadcastHub {
    transport: Arc<dyn Transport>,
    queue: String,
    subscribers: Vec<(String, BroadcastFn)>,
    consumer: Option<String>,
    /// The consumer's prefetch window.
    prefetch: u16,
    /// This communicator's subscribers, in the process-wide gauge.
    gauge: Arc<crate::metrics::SubscriberCount>,
    /// Where closure subscribers' broadcasts are handled.
    handlers: crate::handlers::HandlerThreads,
    /// What a restart starts again from; written whenever it changes.
    kept: Kept,
    /// A restart's predecessor's consumer, to cancel: its stream went with the old context.
    stale: Option<String>,
}

impl BroadcastHub {
    /// The hub, as first started or as `kept` left it.
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        queue: String,
        prefetch: u16,
        gauge: Arc<crate::metrics::SubscriberCount>,
        handlers: crate::handlers::HandlerThreads,
        kept: Kept,
    ) -> Self {
        let KeptState {
            subscribers,
            consumer: stale,
        } = kept.lock().clone();
        Self {
            transport,
            queue,
            prefetch,
            gauge,
            handlers,
            subscribers,
            consumer: None,
            kept,
            stale,
        }
    }

    /// Writes down what a restart starts from.
    fn keep(&self) {
        *self.kept.lock() = KeptState {
            subscribers: self.subscribers.clone(),
            consumer: self.consumer.clone(),
        };
    }

    /// Starts consuming this communicator's broadcast queue into this actor.
    fn consume(&mut self) -> impl ActorFuture<Self, Output = Result<()>> + 'static {
        let consume = self
            .transport
            .consume(Source::Broadcasts(self.queue.clone()), self.prefetch);
        consume.into_actor(self).map(|result, hub, ctx| {
            let consumer = result?;
            hub.consumer = Some(consumer.tag);
            hub.keep();
            ctx.add_stream(consumer.deliveries);
            Ok(())
        })
    }
}

impl Actor for BroadcastHub {
    type Context = Context<Self>;

    /// After a restart, cancels the old consumer and consumes again for the subscribers it
    /// kept.
    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(tag) = self.stale.take() {
            let cancel = self.transport.cancel(&tag);
            actix::spawn(async move {
                let _ = cancel.await;
            });
            self.keep();
        }
        self.consume_again(ctx, 0);
    }
}

impl BroadcastHub {
    /// After a restart, consumes again for the subscribers it kept — trying again, with
    /// backoff, until it does or has no subscriber left.
    fn consume_again(&mut self, ctx: &mut Context<Self>, attempt: u32) {
        if self.subscribers.is_empty() || self.consumer.is_some() {
            return;
        }
        ctx.wait(self.consume().map(move |result, _, ctx| {
            if let Err(error) = result {
                let delay = crate::supervision::retry_delay(attempt);
                tracing::warn!(%error, attempt, "consuming broadcasts again after a restart failed; trying again in {delay:?}");
                ctx.run_later(delay, move |hub, ctx| hub.consume_again(ctx, attempt + 1));
            }
        }));
    }
}

/// Adds a subscriber, starting the consumer for the first one.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct AddSubscriber {
    pub(crate) id: String,
    pub(crate) handler: BroadcastFn,
}

/// Removes a subscriber; `false` if there was none with this id.
#[derive(Message)]
#[rtype(result = "Result<bool>")]
pub(crate) struct RemoveSubscriber {
    pub(crate) id: String,
    /// Removed because it is gone for good (reported lost): taken out of the gauge here.
    pub(crate) dead: bool,
}

impl Handler<AddSubscriber> for BroadcastHub {
    type Result = AtomicResponse<Self, Result<()>>;

    fn handle(&mut self, message: AddSubscriber, _: &mut Context<Self>) -> Self::Result {
        self.subscribers.push((message.id, message.handler));
        self.keep();
        if self.consumer.is_some() {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(()))));
        }
        AtomicResponse::new(Box::pin(self.consume().map(|result, hub, _| {
            if result.is_err() {
                hub.subscribers.pop();
                hub.keep();
            }
            result
        })))
    }
}

impl Handler<RemoveSubscriber> for BroadcastHub {
    type Result = AtomicResponse<Self, Result<bool>>;

    fn handle(&mut self, message: RemoveSubscriber, _: &mut Context<Self>) -> Self::Result {
        let before = self.subscribers.len();
        self.subscribers.retain(|(id, _)| *id != message.id);
        let removed = self.subscribers.len() != before;
        if removed && message.dead {
            self.gauge.add("broadcast", -1);
        }
        let cancel = match (&self.consumer, self.subscribers.is_empty()) {
            (Some(tag), true) => self.transport.cancel(tag),
            _ => {
                self.keep();
                return AtomicResponse::new(Box::pin(fut::ready(Ok(removed))));
            }
        };
        self.consumer = None;
        self.keep();
        AtomicResponse::new(Box::pin(
            cancel.map(move |r| r.map(|()| removed)).into_actor(self),
        ))
    }
}

/// How many broadcast subscribers there are.
#[derive(Message)]
#[rtype(result = "usize")]
pub(crate) struct Stats;

impl Handler<Stats> for BroadcastHub {
    type Result = usize;

    fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
        self.subscribers.len()
    }
}

impl StreamHandler<Delivery> for BroadcastHub {
    fn handle(&mut self, delivery: Delivery, ctx: &mut Context<Self>) {
        tracing::debug!(queue = %self.queue, "broadcast received");
        crate::metrics::count(crate::metrics::DELIVERED, "broadcast");
        let bytes = delivery.body;
        let handlings: Vec<_> = self
            .subscribers
            .iter()
            .filter_map(|(id, handler)| {
                let handling = (handler.call)(&bytes)?;
                Some((id.clone(), handling, handler.on_handler_threads))
            })
            .collect();
        let (trace, span) =
            crate::trace::handle_span("broadcast", &self.queue, None, false, delivery.traceparent);
        // Handed to every subscriber, wherever each runs: the broadcast leaves the prefetch
        // window when the last one's handling ends.
        let done = Arc::new(Handed {
            acker: Mutex::new(Some(delivery.acker)),
        });
        let me = ctx.address();
        for (id, handling, on_handler_threads) in handlings {
            let (done, me, span) = (done.clone(), me.clone(), span.clone());
            let handle = move || {
                let handle = async move {
                    if handling().await {
                        // Reported lost already: no longer offered broadcasts, nor counted.
                        me.do_send(RemoveSubscriber { id, dead: true });
                    }
                    drop(done);
                };
                crate::trace::maybe_scope(trace, handle).instrument(span)
            };
            if on_handler_threads {
                self.handlers.spawn(handle);
            } else {
                actix::spawn(handle());
            }
        }
    }

    fn finished(&mut self, _: &mut Context<Self>) {}
}

crate::supervision::test_hooks!(BroadcastHub);
