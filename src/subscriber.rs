//! What can subscribe — an actor's `Addr` or `Recipient`, a plain closure returning a future
//! (wrapped in a small actor on the communicator's runtime), or a
//! [`supervised`](crate::supervised) actor kiwimq restarts — and how a message reaches it:
//! a [`Subscriber`] delivers one message and says what became of it, a panic included.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use actix::dev::ToEnvelope;
use actix::{Actor, Addr, Context, Handler, Message, Recipient};
use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::{BoxFuture, LocalBoxFuture, Shared};
use tokio::sync::broadcast;

use crate::events::ConnectionEvent;
use crate::handlers::HandlerThreads;
use crate::messages::HandlerError;
use crate::panics::{PanicNotice, payload_text};
use crate::runtime::Runtime;
use crate::supervision::{Child, Incidents, Policy, Report};
use crate::trace::Traced;

/// Anything that can receive a subscription's messages of type `M`: an actor's [`Addr`], a
/// [`Recipient`], a closure `FnMut(M) -> impl Future<Output = M::Result>`, or
/// [`supervised(factory)`](crate::supervised).
pub trait IntoSubscriber<M: Message + Send>: Send
where
    M::Result: Send,
{
    /// Makes the subscriber within `scope`; closures and supervised actors start there.
    #[doc(hidden)]
    fn into_subscriber(self, scope: &Scope) -> Subscriber<M>;
}

/// Where a subscriber starts and whom it tells when it dies: given by kiwimq.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Scope {
    /// Where closure subscribers run.
    pub(crate) handlers: HandlerThreads,
    pub(crate) identifier: String,
    pub(crate) events: broadcast::Sender<ConnectionEvent>,
    pub(crate) incidents: Incidents,
}

impl Scope {
    /// Where this subscriber's restarts and loss are told.
    pub(crate) fn report(&self) -> Report {
        Report {
            kind: "subscriber",
            name: self.identifier.clone(),
            incidents: self.incidents.clone(),
            events: Some(self.events.clone()),
        }
    }
}

/// A subscriber ready to be registered, made by [`IntoSubscriber`].
#[doc(hidden)]
pub struct Subscriber<M: Message + Send>
where
    M::Result: Send,
{
    target: Target<M>,
    scope: Scope,
    /// Reported lost already: said once.
    lost: AtomicBool,
}

impl<M: Message + Send> std::fmt::Debug for Subscriber<M>
where
    M::Result: Send,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("identifier", &self.scope.identifier)
            .finish_non_exhaustive()
    }
}

/// A closure subscriber's call, in its turn: its answer, or none if it could not run (the
/// communicator is closing).
type PooledFn<M> =
    Arc<dyn Fn(M, Turn) -> LocalBoxFuture<'static, Option<<M as Message>::Result>> + Send + Sync>;

enum Target<M: Message + Send>
where
    M::Result: Send,
{
    /// An actor the user started: when it dies, it is gone.
    Fixed(Recipient<M>),
    /// A closure, run on the handler threads; the end of its latest message's turn.
    Pooled {
        call: PooledFn<M>,
        last_turn: std::sync::Mutex<Shared<oneshot::Receiver<()>>>,
    },
    /// An actor kiwimq restarts; the subscription ends its supervision when dropped.
    Supervised {
        /// The actor as it runs now: waits while it restarts, none once given up.
        current: CurrentFn<M>,
        /// The actor's own thread, stopped with the subscription.
        _thread: Option<Runtime>,
    },
}

/// A supervised subscriber's current recipient (see [`Child::addr`]).
type CurrentFn<M> = Box<dyn Fn() -> BoxFuture<'static, Option<Recipient<M>>> + Send + Sync>;

/// What became of a message handed to a subscriber.
pub(crate) enum Delivered<R> {
    /// The handler answered.
    Answer(R),
    /// Its handler panicked while handling it; carries the panic's text.
    Panicked(String),
    /// Not handled, through no fault of its own: the actor died handling another message
    /// (it was queued behind), or a supervised actor is restarting. Offer it elsewhere.
    Interrupted,
    /// The subscriber is gone for good.
    Lost,
}

impl<M: Message + Send + 'static> Subscriber<M>
where
    M::Result: Send,
{
    fn fixed(recipient: Recipient<M>, scope: &Scope) -> Self {
        Self {
            target: Target::Fixed(recipient),
            scope: scope.clone(),
            lost: AtomicBool::new(false),
        }
    }

    /// The subscriber's identifier.
    pub(crate) fn identifier(&self) -> &str {
        &self.scope.identifier
    }

    /// The next message's turn: a closure is called in the order its turns were taken.
    pub(crate) fn turn(&self) -> Turn {
        let Target::Pooled { last_turn, .. } = &self.target else {
            return Turn::free();
        };
        let (ended, end) = oneshot::channel();
        let previous = std::mem::replace(
            &mut *last_turn.lock().unwrap_or_else(|p| p.into_inner()),
            end.shared(),
        );
        Turn {
            previous: Some(previous),
            ended: Some(ended),
        }
    }

    /// Whether its handlers run on the handler threads (a closure): a message's whole
    /// handling then goes there, in one hop.
    pub(crate) fn on_handler_threads(&self) -> bool {
        matches!(self.target, Target::Pooled { .. })
    }

    /// Hands `message` over, in a turn taken now, and waits for its answer.
    pub(crate) async fn deliver(
        &self,
        message: M,
        notice: Option<&PanicNotice>,
    ) -> Delivered<M::Result> {
        self.deliver_in(self.turn(), message, notice).await
    }

    /// Hands `message` over in `turn` and waits for its answer. `notice` is the message's
    /// panic watch (tasks and RPC requests carry one).
    pub(crate) async fn deliver_in(
        &self,
        turn: Turn,
        message: M,
        notice: Option<&PanicNotice>,
    ) -> Delivered<M::Result> {
        let recipient = match &self.target {
            Target::Fixed(recipient) => recipient.clone(),
            Target::Pooled { call, .. } => {
                return match call(message, turn).await {
                    Some(answer) => Delivered::Answer(answer),
                    None => Delivered::Interrupted,
                };
            }
            Target::Supervised { current, .. } => match current().await {
                Some(recipient) => recipient,
                None => return Delivered::Lost,
            },
        };
        match recipient.send(message).await {
            Ok(answer) => Delivered::Answer(answer),
            Err(_) => {
                if let Some(text) = notice.and_then(PanicNotice::panic) {
                    self.died(&format!("it panicked: {text}"));
                    return Delivered::Panicked(text.to_owned());
                }
                if recipient.connected() {
                    // The actor lives, but the future of this message's answer was dropped:
                    // it panicked on its own task.
                    return Delivered::Panicked(
                        "the handler's future ended without an answer (it panicked)".to_owned(),
                    );
                }
                self.died("its actor stopped");
                match self.target {
                    Target::Fixed(_) | Target::Pooled { .. } => Delivered::Lost,
                    Target::Supervised { .. } => Delivered::Interrupted,
                }
            }
        }
    }

    /// The actor is gone: a user's actor for good (reported once); a supervised one is
    /// restarted by its supervision, which reports.
    fn died(&self, reason: &str) {
        if matches!(self.target, Target::Fixed(_)) && !self.lost.swap(true, Ordering::AcqRel) {
            self.scope.report().lost(reason);
        }
    }
}

impl<M> IntoSubscriber<M> for Recipient<M>
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    fn into_subscriber(self, scope: &Scope) -> Subscriber<M> {
        Subscriber::fixed(self, scope)
    }
}

impl<M, A> IntoSubscriber<M> for Addr<A>
where
    M: Message + Send + 'static,
    M::Result: Send,
    A: Actor + Handler<M>,
    A::Context: ToEnvelope<A, M>,
{
    fn into_subscriber(self, scope: &Scope) -> Subscriber<M> {
        Subscriber::fixed(self.recipient(), scope)
    }
}

impl<M, R, F, Fut> IntoSubscriber<M> for F
where
    M: Message<Result = Result<R, HandlerError>> + Traced + Send + 'static,
    R: Send + 'static,
    F: FnMut(M) -> Fut + Send + 'static,
    Fut: Future<Output = M::Result> + 'static,
{
    /// The closure runs on the communicator's handler threads (see `handlers`): each
    /// message's call and future on a thread not busy computing. Calls are one at a time
    /// (the closure is `FnMut`); their futures run concurrently. A panic in the closure or
    /// its future is the message's answer (a failure naming it).
    fn into_subscriber(self, scope: &Scope) -> Subscriber<M> {
        let closure = Arc::new(std::sync::Mutex::new(self));
        let handlers = scope.handlers.clone();
        let call: PooledFn<M> = Arc::new(move |message: M, turn: Turn| {
            let closure = closure.clone();
            let handle = move || async move {
                let mut turn = turn;
                turn.ready().await;
                let ended = turn.ended.take();
                let trace = message.trace_context();
                let called = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    let mut f = closure.lock().unwrap_or_else(|p| p.into_inner());
                    (*f)(message)
                }));
                let future = match called {
                    Ok(future) => future,
                    Err(panic) => {
                        drop(ended);
                        return Err(HandlerError::panicked(&payload_text(&*panic)));
                    }
                };
                // What the handler sends continues the message's trace.
                let mut answer = pin!(crate::trace::maybe_scope(
                    trace,
                    AssertUnwindSafe(future).catch_unwind()
                ));
                let first = futures::poll!(answer.as_mut());
                drop(ended);
                let outcome = match first {
                    Poll::Ready(outcome) => outcome,
                    Poll::Pending => answer.await,
                };
                outcome.unwrap_or_else(|panic| Err(HandlerError::panicked(&payload_text(&*panic))))
            };
            if handlers.is_current() {
                // Already on a handler thread (the message's whole handling runs there):
                // no second hop.
                return handle().map(Some).boxed_local();
            }
            handlers.run(handle).boxed_local()
        });
        Subscriber {
            target: Target::Pooled {
                call,
                last_turn: std::sync::Mutex::new(Turn::over()),
            },
            scope: scope.clone(),
            lost: AtomicBool::new(false),
        }
    }
}

/// One message's turn at a closure subscriber: it waits for the previous message's turn to
/// end (its call made and its future polled once), and ends its own when dropped — so the
/// closure is called in the order the messages came, whichever threads they run on.
pub(crate) struct Turn {
    /// The previous turn's end, until awaited.
    previous: Option<Shared<oneshot::Receiver<()>>>,
    ended: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// An ended turn's end.
    fn over() -> Shared<oneshot::Receiver<()>> {
        let (_, rx) = oneshot::channel();
        rx.shared()
    }

    /// Waits until the previous message's turn has ended: a message takes a permit to run
    /// only then, or messages holding permits could wait for one that waits for a permit.
    pub(crate) async fn ready(&mut self) {
        if let Some(previous) = self.previous.take() {
            let _ = previous.await;
        }
    }

    /// A turn that waits for nothing (subscribers that are not closures).
    pub(crate) fn free() -> Self {
        Self {
            previous: None,
            ended: None,
        }
    }
}

/// Starts the supervision of an actor made by `factory` (see [`crate::supervised`]), on a
/// thread of its own: an actor computing delays only its own messages.
pub(crate) fn supervised_subscriber<M, A, F>(
    policy: Policy,
    factory: F,
    scope: &Scope,
) -> Subscriber<M>
where
    M: Message + Send + 'static,
    M::Result: Send,
    A: Actor<Context = Context<A>> + Handler<M>,
    F: Fn() -> A + Send + 'static,
{
    let thread = Runtime::start("kiwimq-actor")
        .map_err(|error| tracing::warn!(subscriber = %scope.identifier, %error, "the supervised subscriber does not start"))
        .ok();
    let child: Option<Child<A>> = thread.as_ref().map(|thread| {
        crate::supervision::start(thread.arbiter(), policy, move |_| factory(), scope.report())
    });
    let current: CurrentFn<M> = Box::new(move || {
        let child = child.clone();
        async move { child?.addr().await.map(Addr::recipient) }.boxed()
    });
    Subscriber {
        target: Target::Supervised {
            current,
            _thread: thread,
        },
        scope: scope.clone(),
        lost: AtomicBool::new(false),
    }
}
