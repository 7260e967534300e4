//! The `BroadcastHub` actor: consumes this communicator's broadcast queue and hands each
//! broadcast to every subscriber whose filter it passes.

use std::sync::{Arc, Mutex};

use actix::prelude::*;
use futures::FutureExt;
use futures::future::{self, BoxFuture};
use serde::de::{DeserializeOwned, IgnoredAny};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::Codec;
use crate::codec::envelope::{BroadcastEnvelope, plain_text};
use crate::error::Result;
use crate::filter::BroadcastFilter;
use crate::messages::Broadcast;
use crate::subscriber::{Delivered, Subscriber};
use crate::transport::{Delivery, Outcome, Source, Transport};

/// A broadcast subscriber with its type and filter erased.
pub(crate) type BroadcastFn = Arc<dyn Fn(bytes::Bytes) -> BoxFuture<'static, ()> + Send + Sync>;

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
    let subscriber = Arc::new(subscriber);
    let in_flight = Arc::new(Semaphore::new(max_in_flight.max(1)));
    Arc::new(move |bytes: bytes::Bytes| {
        let envelope: BroadcastEnvelope<T> = match codec.decode_broadcast(&bytes) {
            Ok(envelope) => envelope,
            Err(error) => {
                // Only complain when this subscriber would have wanted the broadcast.
                let header = codec.decode_broadcast::<IgnoredAny>(&bytes);
                match header {
                    Ok(h) if !passes(&filter, &h) => {}
                    _ => {
                        tracing::warn!(%error, "undecodable broadcast skipped by a subscriber");
                        crate::metrics::count(crate::metrics::UNDECODABLE, "broadcast");
                    }
                }
                return future::ready(()).boxed();
            }
        };
        if !passes(&filter, &envelope) {
            return future::ready(()).boxed();
        }
        let broadcast = Broadcast {
            body: envelope.body,
            sender: envelope.sender,
            subject: envelope.subject,
            correlation_id: envelope.correlation_id,
        };
        let subscriber = subscriber.clone();
        let in_flight = in_flight.clone();
        async move {
            // Never closed: a permit always comes.
            let _permit = in_flight.acquire_owned().await;
            let started = std::time::Instant::now();
            let delivered = subscriber.deliver(broadcast, None).await;
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
                Delivered::Interrupted | Delivered::Lost => {}
            }
        }
        .boxed()
    })
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
        if self.subscribers.is_empty() {
            return;
        }
        ctx.wait(self.consume().map(|result, _, _| {
            if let Err(error) = result {
                tracing::error!(%error, "consuming broadcasts again after a restart failed");
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
    fn handle(&mut self, delivery: Delivery, _: &mut Context<Self>) {
        tracing::debug!(queue = %self.queue, "broadcast received");
        crate::metrics::count(crate::metrics::DELIVERED, "broadcast");
        let bytes = delivery.body;
        let handlers: Vec<_> = self
            .subscribers
            .iter()
            .map(|(_, handler)| handler(bytes.clone()))
            .collect();
        let (trace, span) =
            crate::trace::handle_span("broadcast", &self.queue, None, false, delivery.traceparent);
        let acker = delivery.acker;
        // Handed to every subscriber: the broadcast leaves the prefetch window.
        let handling = future::join_all(handlers).map(|_| acker.settle(Outcome::Ack));
        actix::spawn(crate::trace::maybe_scope(trace, handling).instrument(span));
    }

    fn finished(&mut self, _: &mut Context<Self>) {}
}

crate::supervision::test_hooks!(BroadcastHub);
