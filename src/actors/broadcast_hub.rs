//! The `BroadcastHub` actor: consumes this communicator's broadcast queue and hands each
//! broadcast to every subscriber whose filter it passes.

use std::sync::Arc;

use actix::prelude::*;
use futures::FutureExt;
use futures::future::{self, BoxFuture};
use serde::de::{DeserializeOwned, IgnoredAny};

use crate::Codec;
use crate::codec::envelope::BroadcastEnvelope;
use crate::error::Result;
use crate::filter::BroadcastFilter;
use crate::messages::Broadcast;
use crate::subscriber::{Delivered, Subscriber};
use crate::transport::{Delivery, Source, Transport};

/// A broadcast subscriber with its type and filter erased.
pub(crate) type BroadcastFn = Arc<dyn Fn(bytes::Bytes) -> BoxFuture<'static, ()> + Send + Sync>;

/// Erases a typed broadcast recipient behind its filter. Errors are logged: broadcasts are
/// fire and forget.
pub(crate) fn broadcast_fn<T>(
    subscriber: Subscriber<Broadcast<T>>,
    filter: BroadcastFilter,
    codec: Codec,
) -> BroadcastFn
where
    T: DeserializeOwned + Send + 'static,
{
    let subscriber = Arc::new(subscriber);
    Arc::new(move |bytes: bytes::Bytes| {
        let envelope: BroadcastEnvelope<T> = match codec.decode(&bytes) {
            Ok(envelope) => envelope,
            Err(error) => {
                // Only complain when this subscriber would have wanted the broadcast.
                let header = codec.decode::<BroadcastEnvelope<IgnoredAny>>(&bytes);
                match header {
                    Ok(h) if !filter.matches(h.subject.as_deref(), h.sender.as_deref()) => {}
                    _ => tracing::warn!(%error, "undecodable broadcast skipped by a subscriber"),
                }
                return future::ready(()).boxed();
            }
        };
        if !filter.matches(envelope.subject.as_deref(), envelope.sender.as_deref()) {
            return future::ready(()).boxed();
        }
        let broadcast = Broadcast {
            body: envelope.body,
            sender: envelope.sender,
            subject: envelope.subject,
            correlation_id: envelope.correlation_id,
        };
        let subscriber = subscriber.clone();
        async move {
            match subscriber.deliver(broadcast, None).await {
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

/// Hands broadcasts to this communicator's broadcast subscribers.
pub(crate) struct BroadcastHub {
    transport: Arc<dyn Transport>,
    queue: String,
    subscribers: Vec<(String, BroadcastFn)>,
    consumer: Option<String>,
}

impl BroadcastHub {
    pub(crate) fn new(transport: Arc<dyn Transport>, queue: String) -> Self {
        Self {
            transport,
            queue,
            subscribers: Vec::new(),
            consumer: None,
        }
    }
}

impl Actor for BroadcastHub {
    type Context = Context<Self>;
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
        if self.consumer.is_some() {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(()))));
        }
        let consume = self
            .transport
            .consume(Source::Broadcasts(self.queue.clone()), 0);
        AtomicResponse::new(Box::pin(consume.into_actor(self).map(
            |result, hub, ctx| match result {
                Ok(consumer) => {
                    hub.consumer = Some(consumer.tag);
                    ctx.add_stream(consumer.deliveries);
                    Ok(())
                }
                Err(error) => {
                    hub.subscribers.pop();
                    Err(error)
                }
            },
        )))
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
            _ => return AtomicResponse::new(Box::pin(fut::ready(Ok(removed)))),
        };
        self.consumer = None;
        AtomicResponse::new(Box::pin(
            cancel.map(move |r| r.map(|()| removed)).into_actor(self),
        ))
    }
}

impl StreamHandler<Delivery> for BroadcastHub {
    fn handle(&mut self, delivery: Delivery, _: &mut Context<Self>) {
        tracing::debug!(queue = %self.queue, "broadcast received");
        let bytes = delivery.body;
        let handlers: Vec<_> = self
            .subscribers
            .iter()
            .map(|(_, handler)| handler(bytes.clone()))
            .collect();
        actix::spawn(future::join_all(handlers).map(|_| ()));
    }

    fn finished(&mut self, _: &mut Context<Self>) {}
}
