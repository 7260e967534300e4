//! What can subscribe: an actor's `Addr` or `Recipient`, or a plain closure returning a
//! future (wrapped in a small actor on the communicator's runtime).

use std::future::Future;

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Context, Handler, Message, Recipient, ResponseFuture};
use actix_rt::ArbiterHandle;

/// Anything that can receive a subscription's messages of type `M`: an actor's [`Addr`], a
/// [`Recipient`], or a closure `FnMut(M) -> impl Future<Output = M::Result>`.
pub trait IntoSubscriber<M: Message + Send>: Send
where
    M::Result: Send,
{
    /// The recipient the communicator delivers to; closures are started as a small actor on
    /// `arbiter`.
    fn into_recipient(self, arbiter: &ArbiterHandle) -> Recipient<M>;
}

impl<M> IntoSubscriber<M> for Recipient<M>
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    fn into_recipient(self, _: &ArbiterHandle) -> Recipient<M> {
        self
    }
}

impl<M, A> IntoSubscriber<M> for Addr<A>
where
    M: Message + Send + 'static,
    M::Result: Send,
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
{
    fn into_recipient(self, _: &ArbiterHandle) -> Recipient<M> {
        self.recipient()
    }
}

impl<M, F, Fut> IntoSubscriber<M> for F
where
    M: Message + Send + 'static,
    M::Result: Send,
    F: FnMut(M) -> Fut + Send + 'static,
    Fut: Future<Output = M::Result> + 'static,
{
    fn into_recipient(self, arbiter: &ArbiterHandle) -> Recipient<M> {
        FnActor { f: Box::new(self) }
            .start_in_arbiter_handle(arbiter)
            .recipient()
    }
}

/// The actor that runs a closure subscriber: each message's future runs concurrently.
struct FnActor<F> {
    /// Boxed so the actor is `Unpin` whatever the closure captures.
    f: Box<F>,
}

impl<F: Send + 'static> FnActor<F> {
    fn start_in_arbiter_handle(self, arbiter: &ArbiterHandle) -> Addr<Self> {
        Actor::start_in_arbiter(arbiter, move |_| self)
    }
}

impl<F: 'static> Actor for FnActor<F> {
    type Context = Context<Self>;
}

impl<M, F, Fut> Handler<M> for FnActor<F>
where
    M: Message + 'static,
    F: FnMut(M) -> Fut + 'static,
    Fut: Future<Output = M::Result> + 'static,
{
    type Result = ResponseFuture<M::Result>;

    fn handle(&mut self, message: M, _: &mut Context<Self>) -> Self::Result {
        Box::pin((self.f)(message))
    }
}
