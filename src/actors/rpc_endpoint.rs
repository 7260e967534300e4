//! The `RpcEndpoint` actor: consumes the exclusive queue of one RPC identifier and answers
//! each request with its subscriber's result.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::{Conduit, encode_reply, exception_reply};
use crate::Codec;
use crate::error::Result;
use crate::messages::{HandlerError, Rpc};
use crate::panics::PanicWatch;
use crate::subscriber::{Delivered, Subscriber};
use crate::transport::{Consumer, Delivery, Exchange, Outcome, Source};

/// An RPC subscriber with its types erased: called as a request arrives (so a closure's
/// calls keep the requests' order), it gives the request's handling — request bytes in,
/// reply map bytes out, and whether the subscriber is gone for good — to run where the
/// subscriber's handlers run.
#[derive(Clone)]
pub(crate) struct RpcFn {
    pub(crate) call: Arc<dyn Fn(bytes::Bytes, Option<String>) -> RpcHandling + Send + Sync>,
    /// A closure: the handling runs on a handler thread, not on kiwimq's runtime.
    pub(crate) on_handler_threads: bool,
}

/// One request's handling, made on the thread it runs on.
pub(crate) type RpcHandling = Box<dyn FnOnce() -> LocalBoxFuture<'static, (Vec<u8>, Gone)> + Send>;

/// Whether a subscriber turned out to be gone for good while handling a message.
pub(crate) type Gone = bool;

/// Erases a typed RPC subscriber. Every request gets a reply: bad bytes, a panic and a
/// dead subscriber become exception replies naming the problem.
pub(crate) fn rpc_fn<T, R>(
    subscriber: Subscriber<Rpc<T, R>>,
    codec: Codec,
    max_in_flight: usize,
) -> RpcFn
where
    T: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
{
    let on_handler_threads = subscriber.on_handler_threads();
    let subscriber = Arc::new(subscriber);
    // Calls handled at once; the others wait for a permit, unacknowledged, within the
    // consumer's prefetch window.
    let in_flight = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let call = Arc::new(move |body: bytes::Bytes, correlation_id: Option<String>| {
        let subscriber = subscriber.clone();
        let in_flight = in_flight.clone();
        let mut turn = subscriber.turn();
        let handling: RpcHandling = Box::new(move || {
            async move {
                turn.ready().await;
                // Never closed: a permit always comes.
                let _permit = in_flight.acquire_owned().await;
                let body: T = match codec.decode(&body) {
                    Ok(body) => body,
                    Err(error) => {
                        tracing::warn!(?correlation_id, %error, "undecodable RPC request");
                        crate::metrics::count(crate::metrics::UNDECODABLE, "rpc");
                        let text = format!("the request could not be decoded: {error}");
                        return (exception_reply(codec, &text, None), false);
                    }
                };
                let (watch, notice) = PanicWatch::new();
                let request = Rpc {
                    body,
                    correlation_id,
                    trace: crate::trace::TraceContext::current(),
                    result: PhantomData,
                    _watch: watch,
                };
                let started = std::time::Instant::now();
                let delivered = subscriber.deliver_in(turn, request, Some(&notice)).await;
                crate::metrics::elapsed(crate::metrics::HANDLER_SECONDS, "rpc", started);
                let died = "the RPC subscriber died before it handled the request";
                match delivered {
                    Delivered::Answer(outcome) => (encode_reply(codec, outcome, None), false),
                    Delivered::Panicked(text) => {
                        tracing::error!(identifier = %subscriber.identifier(), "an RPC handler panicked; the caller gets the panic as an error");
                        let reply =
                            encode_reply::<R>(codec, Err(HandlerError::Panicked(text)), None);
                        (reply, false)
                    }
                    Delivered::Interrupted => (exception_reply(codec, died, None), false),
                    Delivered::Lost => (exception_reply(codec, died, None), true),
                }
            }
            .boxed_local()
        });
        handling
    });
    RpcFn {
        call,
        on_handler_threads,
    }
}

/// What an `RpcEndpoint` keeps across its restarts: its consumer's tag, to cancel it.
#[derive(Clone)]
pub(crate) struct Kept(Arc<Mutex<String>>);

impl Kept {
    pub(crate) fn new(tag: String) -> Self {
        Self(Arc::new(Mutex::new(tag)))
    }

    fn tag(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, tag: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = tag;
    }
}

/// Serves one RPC identifier.
pub(crate) struct RpcEndpoint {
    conduit: Conduit,
    identifier: String,
    handler: RpcFn,
    /// The consumer's tag, to cancel it, kept across restarts.
    kept: Kept,
    /// Restarted: the consumer went with the old context and must be made again.
    resubscribe: bool,
    /// Told when the subscriber is gone for good: the root forgets the identifier.
    forget: Forget,
}

/// Tells the root that an identifier's subscriber is gone for good.
pub(crate) type Forget = Arc<dyn Fn() + Send + Sync>;

impl RpcEndpoint {
    /// The endpoint of `identifier`, fed by `consumer` when first started; started again
    /// (without one), it consumes anew.
    pub(crate) fn new(
        conduit: Conduit,
        identifier: String,
        handler: RpcFn,
        consumer: Option<Consumer>,
        kept: Kept,
        forget: Forget,
        ctx: &mut Context<Self>,
    ) -> Self {
        let resubscribe = match consumer {
            Some(consumer) => {
                ctx.add_stream(consumer.deliveries);
                false
            }
            None => true,
        };
        Self {
            conduit,
            identifier,
            handler,
            kept,
            resubscribe,
            forget,
        }
    }
}

impl Actor for RpcEndpoint {
    type Context = Context<Self>;

    /// After a restart, serves the identifier again: the old consumer is cancelled (its
    /// queue goes) and a new one made.
    fn started(&mut self, ctx: &mut Context<Self>) {
        if std::mem::take(&mut self.resubscribe) {
            self.consume_again(ctx, 0);
        }
    }
}

impl RpcEndpoint {
    /// After a restart, serves the identifier again — trying again, with backoff, until it
    /// does: never registered and deaf.
    fn consume_again(&mut self, ctx: &mut Context<Self>, attempt: u32) {
        let transport = self.conduit.transport.clone();
        let (identifier, tag) = (self.identifier.clone(), self.kept.tag());
        let prefetch = self.conduit.message_prefetch;
        let consume = async move {
            let _ = transport.cancel(&tag).await;
            transport.consume(Source::Rpc(identifier), prefetch).await
        };
        ctx.wait(consume.into_actor(self).map(move |result, endpoint, ctx| match result {
            Ok(consumer) => {
                endpoint.kept.set(consumer.tag);
                ctx.add_stream(consumer.deliveries);
            }
            Err(error) => {
                let delay = crate::supervision::retry_delay(attempt);
                tracing::warn!(identifier = %endpoint.identifier, %error, attempt, "serving the identifier again after a restart failed; trying again in {delay:?}");
                ctx.run_later(delay, move |endpoint, ctx| endpoint.consume_again(ctx, attempt + 1));
            }
        }));
    }
}

/// Stops serving: the consumer is cancelled (an RPC queue goes with it).
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct Unsubscribe;

impl Handler<Unsubscribe> for RpcEndpoint {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, _: Unsubscribe, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.conduit.transport.cancel(&self.kept.tag()))
    }
}

impl StreamHandler<Delivery> for RpcEndpoint {
    fn handle(&mut self, delivery: Delivery, _: &mut Context<Self>) {
        let Delivery {
            body,
            correlation_id,
            reply_to,
            traceparent,
            acker,
            ..
        } = delivery;
        let (trace, span) = crate::trace::handle_span(
            "rpc",
            &self.identifier,
            correlation_id.as_deref(),
            false,
            traceparent,
        );
        tracing::debug!(identifier = %self.identifier, ?correlation_id, "RPC received");
        crate::metrics::count(crate::metrics::DELIVERED, "rpc");
        let handling = (self.handler.call)(body, correlation_id.clone());
        let conduit = self.conduit.clone();
        let identifier = self.identifier.clone();
        let forget = self.forget.clone();
        // Made where it runs: a closure's on a handler thread (one hop, the reply sent from
        // there), an actor's here.
        let answering = move || {
            let answering = async move {
                let (bytes, gone) = handling().await;
                if gone {
                    // Reported lost already; the identifier is no longer served.
                    forget();
                }
                let Some(reply_to) = reply_to else {
                    tracing::warn!(%identifier, ?correlation_id, "RPC without reply_to: the reply is dropped");
                    acker.settle(Outcome::Ack);
                    return;
                };
                if let Err(error) = conduit
                    .reply(Exchange::Messages, reply_to, correlation_id, bytes)
                    .await
                {
                    tracing::warn!(%identifier, %error, "RPC reply failed");
                }
                // Answered (or given up): the call leaves the prefetch window. An RPC is
                // at most once, as in kiwiPy: it is not requeued whatever became of it.
                acker.settle(Outcome::Ack);
            };
            crate::trace::maybe_scope(trace, answering).instrument(span)
        };
        if self.handler.on_handler_threads {
            self.conduit.handlers.spawn(answering);
        } else {
            actix::spawn(answering());
        }
    }

    /// A cancelled consumer's stream ends; the endpoint stops once nobody holds its
    /// address (the supervisor forgot it), without being started again.
    fn finished(&mut self, _: &mut Context<Self>) {}
}

crate::supervision::test_hooks!(RpcEndpoint);
