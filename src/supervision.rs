//! Who restarts what: the one supervision mechanism of a communicator's actor tree.
//!
//! Every actor kiwimq starts — the tree's [`Root`](crate::tree::Root), its children
//! (`TaskConsumer`, `RpcEndpoint`, `BroadcastHub`) and the [`supervised`](crate::supervised)
//! subscriber actors of its users — runs under [`start`]: its context runs inside a loop
//! that catches the actor's end, a panic included, and starts it again from its factory,
//! after a backoff, counting the restart in the communicator's [`Incidents`] and logging
//! it. What the actor must keep across a restart (subscribers, consumers, the children of
//! the root) lives outside it, in state its factory shares, so the fresh actor takes up
//! where the old one stopped; a panic loses only the messages in its mailbox, whose senders
//! get a clear error. A [`Child`] handle follows the actor across restarts: its address
//! changes, the handle does not.
//!
//! The policies differ only in when to give up: kiwimq's own actors never give up (a queue
//! that silently stopped consuming would be worse than one that keeps restarting, loudly); a
//! user's supervised subscriber is given up past its restart limit and reported lost.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, AsyncContext, Context, Handler, Message};
use actix_rt::ArbiterHandle;
use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::{Either, select};
use tokio::sync::{broadcast, watch};

use crate::error::{Error, Result};
use crate::events::ConnectionEvent;
use crate::panics::payload_text;

/// What went wrong in a communicator's actor tree: restarts (of kiwimq's actors and of
/// supervised subscribers) and subscribers lost for good. Shared by the whole tree, read
/// by [`Communicator::health`](crate::Communicator::health).
#[derive(Debug, Clone, Default)]
pub(crate) struct Incidents(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    restarts: AtomicU64,
    /// Watched: a fleet stops when every worker is lost, and must not miss one.
    lost: watch::Sender<u64>,
}

impl Incidents {
    /// Counts a restart; returns how many there were.
    pub(crate) fn restarted(&self) -> u64 {
        self.0.restarts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a subscriber lost for good.
    pub(crate) fn lost(&self) {
        self.0.lost.send_modify(|lost| *lost += 1);
    }

    /// Waits until `count` subscribers in all were lost for good.
    pub(crate) async fn lost_at_least(&self, count: u64) {
        let mut lost = self.0.lost.subscribe();
        // The sender lives as long as `self`: this only ends with the count reached.
        let _ = lost.wait_for(|lost| *lost >= count).await;
    }

    pub(crate) fn restarts(&self) -> u64 {
        self.0.restarts.load(Ordering::Relaxed)
    }

    pub(crate) fn losses(&self) -> u64 {
        *self.0.lost.borrow()
    }
}

/// When a supervised actor is restarted, and when it is given up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Restarts within [`WINDOW`] past which the actor is given up; `None`: never.
    pub(crate) max_restarts: Option<u32>,
    /// The first restart's delay, doubled for restarts in a row up to the second.
    pub(crate) backoff: (Duration, Duration),
}

impl Policy {
    /// kiwimq's own actors: restarted at once the first time, never given up.
    pub(crate) const OWN: Policy = Policy {
        max_restarts: None,
        backoff: (Duration::ZERO, Duration::from_secs(1)),
    };
}

impl Default for Policy {
    /// A user's supervised subscriber: 100 ms to 5 s, given up past 10 restarts a minute.
    fn default() -> Self {
        Self {
            max_restarts: Some(10),
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
        }
    }
}

/// The window of the restart limit; an actor that ran this long starts again at the
/// shortest delay.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// How long an actor waits before trying again, the `attempt`th time in a row, what a
/// restart must redo (consuming again): from 100 ms, doubling, up to 5 s.
pub(crate) fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(6)).min(Duration::from_secs(5))
}

/// Whom a supervised actor's restarts and loss are told to.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    /// What the actor is, as the log says it: `TaskConsumer`, `subscriber`…
    pub(crate) kind: &'static str,
    /// Which one: a queue, an identifier.
    pub(crate) name: String,
    pub(crate) incidents: Incidents,
    /// Where a user's subscriber's restarts and loss are reported as events; none for
    /// kiwimq's own actors (logged and counted only).
    pub(crate) events: Option<broadcast::Sender<ConnectionEvent>>,
}

impl Report {
    /// Reports the actor gone for good: an error in the log, an event, a count.
    pub(crate) fn lost(&self, reason: &str) {
        self.incidents.lost();
        tracing::error!(subscriber = %self.name, %reason, "subscriber lost for good");
        if let Some(events) = &self.events {
            let _ = events.send(ConnectionEvent::SubscriberLost {
                identifier: self.name.clone(),
                reason: reason.to_owned(),
            });
        }
    }

    fn restarted(&self, reason: String, delay: Duration) {
        let restarts = self.incidents.restarted();
        tracing::warn!(actor = self.kind, name = %self.name, %reason, ?delay, restarts, "a supervised actor ended; starting it again");
        if let Some(events) = &self.events {
            let _ = events.send(ConnectionEvent::SubscriberRestarted {
                identifier: self.name.clone(),
                reason,
            });
        }
    }
}

/// A supervised actor's state, as its supervision publishes it.
#[derive(Debug)]
pub(crate) enum ChildState<A: Actor> {
    /// Its address, and whether it is dying (raised by a panic before the unwinding).
    Running(Addr<A>, Arc<AtomicBool>),
    Restarting,
    /// Given up (reported), or its supervision stopped.
    Over,
}

/// A handle on a supervised actor that follows it across restarts. The supervision ends
/// when the last clone is dropped (the actor stops with it).
pub(crate) struct Child<A: Actor> {
    life: watch::Receiver<ChildState<A>>,
    _stop: Arc<oneshot::Sender<()>>,
}

impl<A: Actor> Clone for Child<A> {
    fn clone(&self) -> Self {
        Self {
            life: self.life.clone(),
            _stop: self._stop.clone(),
        }
    }
}

impl<A: Actor> std::fmt::Debug for Child<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Child")
    }
}

impl<A: Actor<Context = Context<A>>> Child<A> {
    /// The actor's address, waiting while it restarts; none once it is over.
    pub(crate) async fn addr(&self) -> Option<Addr<A>> {
        let mut life = self.life.clone();
        let running = life
            .wait_for(|life| match life {
                ChildState::Running(addr, dying) => {
                    addr.connected() && !dying.load(Ordering::Acquire)
                }
                ChildState::Restarting => false,
                ChildState::Over => true,
            })
            .await;
        match running.as_deref() {
            Ok(ChildState::Running(addr, _)) => Some(addr.clone()),
            _ => None,
        }
    }

    /// Sends `message` to the actor as it is now. `Closed` once it is over; a
    /// `Connection` error (worth trying again) if it restarted with the message in its
    /// mailbox.
    pub(crate) async fn send<M>(&self, message: M) -> Result<M::Result>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        let addr = self.addr().await.ok_or_else(Error::closed)?;
        addr.send(message)
            .await
            .map_err(|_| match *self.life.borrow() {
                ChildState::Over => Error::closed(),
                _ => Error::connection(format!(
                    "kiwimq's {} actor restarted while handling this request; try again",
                    std::any::type_name::<A>().rsplit("::").next().unwrap_or("")
                )),
            })
    }

    /// Sends `message` without waiting, if the actor runs now.
    pub(crate) fn do_send<M>(&self, message: M)
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        if let ChildState::Running(addr, dying) = &*self.life.borrow()
            && !dying.load(Ordering::Acquire)
        {
            addr.do_send(message);
        }
    }
}

/// Starts the actor `factory` makes on `arbiter`, supervised by `policy` (see the module
/// docs). The factory is called again for each restart, with the fresh context.
pub(crate) fn start<A, F>(
    arbiter: &ArbiterHandle,
    policy: Policy,
    factory: F,
    report: Report,
) -> Child<A>
where
    A: Actor<Context = Context<A>>,
    F: FnMut(&mut Context<A>) -> A + Send + 'static,
{
    let (life, watched) = watch::channel(ChildState::Restarting);
    let (stop, stopped) = oneshot::channel();
    let spawned = arbiter.spawn_fn(move || {
        actix_rt::spawn(run(policy, factory, life, stopped, report));
    });
    if !spawned {
        tracing::debug!("the runtime is stopping: a supervised actor does not start");
    }
    // If it did not spawn, the life's sender went with the closure: the child is over.
    Child {
        life: watched,
        _stop: Arc::new(stop),
    }
}

/// Runs the actor, and runs it again after it ends, until its handles are dropped (`stop`)
/// or the policy gives it up.
async fn run<A, F>(
    policy: Policy,
    mut factory: F,
    life: watch::Sender<ChildState<A>>,
    mut stop: oneshot::Receiver<()>,
    report: Report,
) where
    A: Actor<Context = Context<A>>,
    F: FnMut(&mut Context<A>) -> A,
{
    let (min, max) = policy.backoff;
    let mut delay = min;
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    loop {
        let started = Instant::now();
        let mut context = Context::<A>::new();
        let ended = match std::panic::catch_unwind(AssertUnwindSafe(|| factory(&mut context))) {
            Ok(actor) => {
                let dying = Arc::new(AtomicBool::new(false));
                life.send_replace(ChildState::Running(context.address(), dying.clone()));
                let running = Box::pin(
                    AssertUnwindSafe(crate::panics::raising_on_panic(
                        dying,
                        context.into_future(actor),
                    ))
                    .catch_unwind(),
                );
                match select(running, &mut stop).await {
                    Either::Left((Ok(()), _)) => "it stopped".to_owned(),
                    Either::Left((Err(panic), _)) => {
                        format!("it panicked: {}", payload_text(&*panic))
                    }
                    // Nobody holds it any more: neither does its supervision.
                    Either::Right(_) => {
                        life.send_replace(ChildState::Over);
                        return;
                    }
                }
            }
            Err(panic) => format!("its factory panicked: {}", payload_text(&*panic)),
        };
        if stop.try_recv().is_err() || life.is_closed() {
            // Every handle is gone: an actor that stopped because nobody holds it is done.
            life.send_replace(ChildState::Over);
            return;
        }
        life.send_replace(ChildState::Restarting);
        if started.elapsed() >= WINDOW {
            delay = min;
        }
        let now = Instant::now();
        restarts.retain(|at| now.duration_since(*at) < WINDOW);
        restarts.push_back(now);
        let count = u32::try_from(restarts.len()).unwrap_or(u32::MAX);
        if let Some(limit) = policy.max_restarts
            && count > limit
        {
            report.lost(&format!(
                "{ended}; given up after {count} restarts within {WINDOW:?} (limit {limit})"
            ));
            life.send_replace(ChildState::Over);
            return;
        }
        report.restarted(ended, delay);
        if !delay.is_zero() {
            let pause = actix_rt::time::sleep(delay);
            if let Either::Right(_) = select(Box::pin(pause), &mut stop).await {
                life.send_replace(ChildState::Over);
                return;
            }
        }
        delay = (delay * 2).max(Duration::from_millis(10)).min(max);
    }
}

/// Implements the [`hooks`] for an actor, in tests only.
macro_rules! test_hooks {
    ($actor:ty) => {
        #[cfg(test)]
        impl actix::Handler<crate::supervision::hooks::Stop> for $actor {
            type Result = ();

            fn handle(
                &mut self,
                _: crate::supervision::hooks::Stop,
                ctx: &mut actix::Context<Self>,
            ) {
                actix::ActorContext::stop(ctx);
            }
        }

        #[cfg(test)]
        impl actix::Handler<crate::supervision::hooks::Panic> for $actor {
            type Result = ();

            fn handle(
                &mut self,
                crate::supervision::hooks::Panic(text): crate::supervision::hooks::Panic,
                _: &mut actix::Context<Self>,
            ) {
                panic!("{text}");
            }
        }
    };
}
pub(crate) use test_hooks;

/// Test hooks: messages that stop an actor or make it panic, as a failure would.
#[cfg(test)]
pub(crate) mod hooks {
    /// Stops the actor.
    #[derive(actix::Message)]
    #[rtype(result = "()")]
    pub(crate) struct Stop;

    /// Panics in the actor's handler, with this text.
    #[derive(actix::Message)]
    #[rtype(result = "()")]
    pub(crate) struct Panic(pub(crate) &'static str);
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::runtime::Runtime;

    /// Blocks the thread that drops it until told to go on: holds a panicking actor in the
    /// middle of its unwinding, where its mailbox still lives.
    struct HeldWhileUnwinding {
        dropping: mpsc::Sender<()>,
        go_on: mpsc::Receiver<()>,
    }

    impl Drop for HeldWhileUnwinding {
        fn drop(&mut self) {
            let _ = self.dropping.send(());
            let _ = self.go_on.recv_timeout(Duration::from_secs(10));
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct PanicHolding(HeldWhileUnwinding);

    struct Fragile;

    impl Actor for Fragile {
        type Context = Context<Self>;
    }

    impl Handler<PanicHolding> for Fragile {
        type Result = ();

        fn handle(&mut self, PanicHolding(_held): PanicHolding, _: &mut Context<Self>) {
            panic!("fragile");
        }
    }

    #[actix_rt::test]
    async fn a_panicking_actor_hands_its_address_to_nobody_while_it_unwinds() {
        crate::panics::install_hook();
        let thread = Runtime::start("kiwimq-test-actor").unwrap();
        let incidents = Incidents::default();
        let report = Report {
            kind: "test",
            name: "fragile".to_owned(),
            incidents: incidents.clone(),
            events: None,
        };
        let child = start(thread.arbiter(), Policy::OWN, |_| Fragile, report);
        let first = child.addr().await.unwrap();

        let (dropping, dropped) = mpsc::channel();
        let (go_on, held) = mpsc::channel();
        first.do_send(PanicHolding(HeldWhileUnwinding {
            dropping,
            go_on: held,
        }));
        dropped.recv_timeout(Duration::from_secs(10)).unwrap();
        // The actor is unwinding, its mailbox still open: it must not be handed out.
        assert!(first.connected());
        let waiting = actix_rt::time::timeout(Duration::from_millis(50), child.addr()).await;
        assert!(waiting.is_err(), "the dying actor's address was handed out");

        go_on.send(()).unwrap();
        let second = actix_rt::time::timeout(Duration::from_secs(10), child.addr())
            .await
            .unwrap()
            .unwrap();
        assert!(second != first, "a fresh actor runs after the panic");
        assert_eq!(incidents.restarts(), 1);
    }
}
