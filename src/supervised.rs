//! [`supervised`]: a subscriber actor that kiwimq starts, and starts afresh after it panics
//! or stops — with backoff, and up to a restart limit per minute, past which it is given up
//! and reported. Its supervision is the one every kiwimq actor has (`supervision`).

use std::time::Duration;

use actix::dev::ToEnvelope;
use actix::{Actor, Context, Handler, Message};

use crate::subscriber::{IntoSubscriber, Scope, Subscriber, supervised_subscriber};
use crate::supervision::Policy;

/// A subscriber actor made by `factory`, which kiwimq starts on the communicator's runtime
/// and starts afresh — from `factory` again, so with fresh state — after it panics or
/// stops. Accepted wherever a subscriber is: tasks, RPC, broadcasts, named queues.
///
/// The message it was handling when it panicked is answered with a `Remote` error naming
/// the panic (a task is then acknowledged, or dead-lettered with a delivery limit); the
/// messages queued behind it wait for the fresh actor or go to another subscriber. Restarts
/// back off from 100 ms to 5 s; past 10 restarts within a minute the subscriber is given up:
/// an error is logged and [`ConnectionEvent::SubscriberLost`](crate::ConnectionEvent::SubscriberLost) is reported. Each restart is
/// logged and reported as [`ConnectionEvent::SubscriberRestarted`](crate::ConnectionEvent::SubscriberRestarted).
///
/// ```
/// use actix::prelude::*;
/// use kiwimq::{HandlerError, Task};
///
/// struct Worker { handled: u64 }
/// impl Actor for Worker { type Context = Context<Self>; }
/// impl Handler<Task<u64>> for Worker {
///     type Result = Result<u64, HandlerError>;
///     fn handle(&mut self, task: Task<u64>, _: &mut Context<Self>) -> Self::Result {
///         self.handled += 1;
///         Ok(task.body + 1)
///     }
/// }
///
/// # fn main() -> kiwimq::Result<()> {
/// # actix_rt::System::new().block_on(async {
/// let comm = kiwimq::connect("mem://").await?;
/// comm.add_task_subscriber(kiwimq::supervised(|| Worker { handled: 0 })).await?;
/// assert_eq!(comm.task_send::<_, u64>(&41u64).await?.await?, 42);
/// comm.close().await
/// # })
/// # }
/// ```
pub fn supervised<A, F>(factory: F) -> SupervisedActor<F>
where
    A: Actor<Context = Context<A>>,
    F: Fn() -> A + Send + 'static,
{
    SupervisedActor {
        factory,
        policy: Policy::default(),
    }
}

/// A supervised subscriber actor: see [`supervised`].
#[derive(Debug, Clone)]
pub struct SupervisedActor<F> {
    factory: F,
    policy: Policy,
}

impl<F> SupervisedActor<F> {
    /// Gives the subscriber up after more than `restarts` restarts within a minute
    /// (default 10).
    #[must_use]
    pub fn with_max_restarts_per_minute(mut self, restarts: u32) -> Self {
        self.policy.max_restarts = Some(restarts);
        self
    }

    /// Waits `min` before the first restart, doubling up to `max` for restarts in a row
    /// (default 100 ms to 5 s); an actor that ran a minute starts again at `min`.
    #[must_use]
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.policy.backoff = (min, max.max(min));
        self
    }
}

impl<M, A, F> IntoSubscriber<M> for SupervisedActor<F>
where
    M: Message + Send + 'static,
    M::Result: Send,
    A: Actor<Context = Context<A>> + Handler<M>,
    Context<A>: ToEnvelope<A, M>,
    F: Fn() -> A + Send + 'static,
{
    fn into_subscriber(self, scope: &Scope) -> Subscriber<M> {
        supervised_subscriber(self.policy, self.factory, scope)
    }
}
