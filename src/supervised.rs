//! [`supervised`]: a subscriber actor that kiwimq starts, and starts afresh after it panics
//! or stops — with backoff, and up to a restart limit per minute, past which it is given up
//! and reported.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use actix::dev::ToEnvelope;
use actix::{Actor, AsyncContext, Context, Handler, Message};
use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::{Either, select};
use tokio::sync::watch;

use crate::events::ConnectionEvent;
use crate::panics::payload_text;
use crate::subscriber::{IntoSubscriber, Life, Scope, Subscriber, supervise};

/// A subscriber actor made by `factory`, which kiwimq starts on the communicator's runtime
/// and starts afresh — from `factory` again, so with fresh state — after it panics or
/// stops. Accepted wherever a subscriber is: tasks, RPC, broadcasts, named queues.
///
/// The message it was handling when it panicked is answered with a `Remote` error naming
/// the panic (a task is then acknowledged, or dead-lettered with a delivery limit); the
/// messages queued behind it wait for the fresh actor or go to another subscriber. Restarts
/// back off from 100 ms to 5 s; past 10 restarts within a minute the subscriber is given up:
/// an error is logged and [`ConnectionEvent::SubscriberLost`] is reported. Each restart is
/// logged and reported as [`ConnectionEvent::SubscriberRestarted`].
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
pub fn supervised<A, F>(factory: F) -> Supervised<F>
where
    A: Actor<Context = Context<A>>,
    F: Fn() -> A + Send + 'static,
{
    Supervised {
        factory,
        policy: Policy::default(),
    }
}

/// A supervised subscriber: see [`supervised`].
#[derive(Debug, Clone)]
pub struct Supervised<F> {
    factory: F,
    policy: Policy,
}

impl<F> Supervised<F> {
    /// Gives the subscriber up after more than `restarts` restarts within a minute
    /// (default 10).
    #[must_use]
    pub fn with_max_restarts_per_minute(mut self, restarts: u32) -> Self {
        self.policy.max_restarts = restarts;
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

/// How a supervised actor is restarted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    max_restarts: u32,
    backoff: (Duration, Duration),
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_restarts: 10,
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
        }
    }
}

/// The window of the restart limit.
const WINDOW: Duration = Duration::from_secs(60);

impl<M, A, F> IntoSubscriber<M> for Supervised<F>
where
    M: Message + Send + 'static,
    M::Result: Send,
    A: Actor<Context = Context<A>> + Handler<M>,
    Context<A>: ToEnvelope<A, M>,
    F: Fn() -> A + Send + 'static,
{
    fn into_subscriber(self, scope: &Scope) -> Subscriber<M> {
        supervise(self.policy, self.factory, scope)
    }
}

/// Runs the actor, and runs it again after it ends, until the subscription is dropped
/// (`stop`) or the restart limit is passed. On the communicator's runtime.
pub(crate) async fn run<M, A, F>(
    policy: Policy,
    factory: F,
    life: watch::Sender<Life<M>>,
    mut stop: oneshot::Receiver<()>,
    scope: Scope,
) where
    M: Message + Send + 'static,
    M::Result: Send,
    A: Actor<Context = Context<A>> + Handler<M>,
    F: Fn() -> A + Send + 'static,
{
    let (min, max) = policy.backoff;
    let mut delay = min;
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    loop {
        let started = Instant::now();
        let ended = match std::panic::catch_unwind(AssertUnwindSafe(&factory)) {
            Ok(actor) => {
                let context = Context::<A>::new();
                life.send_replace(Life::Running(context.address().recipient()));
                let running = AssertUnwindSafe(context.into_future(actor)).catch_unwind();
                match select(running, &mut stop).await {
                    Either::Left((Ok(()), _)) => "it stopped".to_owned(),
                    Either::Left((Err(panic), _)) => {
                        format!("it panicked: {}", payload_text(&*panic))
                    }
                    // The subscription is gone: so is the actor.
                    Either::Right(_) => return,
                }
            }
            Err(panic) => format!("its factory panicked: {}", payload_text(&*panic)),
        };
        life.send_replace(Life::Restarting);
        if started.elapsed() >= WINDOW {
            delay = min;
        }
        let now = Instant::now();
        restarts.retain(|at| now.duration_since(*at) < WINDOW);
        restarts.push_back(now);
        let count = u32::try_from(restarts.len()).unwrap_or(u32::MAX);
        if count > policy.max_restarts {
            let reason = format!(
                "{ended}; given up after {count} restarts within {WINDOW:?} (limit {})",
                policy.max_restarts
            );
            scope.report_lost(&reason);
            life.send_replace(Life::Lost);
            return;
        }
        let total = scope.tally.restarted();
        tracing::warn!(subscriber = %scope.identifier, reason = %ended, ?delay, restarts = total, "supervised subscriber ended; restarting it");
        let _ = scope.events.send(ConnectionEvent::SubscriberRestarted {
            identifier: scope.identifier.clone(),
            reason: ended,
        });
        let pause = actix_rt::time::sleep(delay);
        if let Either::Right(_) = select(Box::pin(pause), &mut stop).await {
            return;
        }
        delay = (delay * 2).min(max);
    }
}
