//! The [`Root`] of a communicator's actor tree, and its children.
//!
//! ```text
//! Communicator ──Child<Root>──► Root  (supervision thread; owns the connection's recovery)
//!                                ├─ TaskConsumer     one per consumed queue  ┐ on the runtime,
//!                                ├─ RpcEndpoint   one per identifier      │ restarted with
//!                                └─ BroadcastHub  one per communicator    ┘ their subscribers
//!                                      │ Task / Rpc / Broadcast
//!                                      ▼
//!          subscribers: closures (handler threads), supervised actors (a thread each),
//!                       the user's actors (where the user started them)
//! ```
//!
//! Every actor here runs under `supervision::start` — the one mechanism, with
//! [`Policy::OWN`]: one that panics or stops is started again with what it keeps (the
//! root its children; each child its subscribers and consumer), counted and logged. The
//! root runs on a thread of its own where no user code runs; it drives the transport's
//! recovery (on `amqp://` the lapin connection's watch, the reconnect loop, and the
//! restoring of the topology and of every consumer), which a panic restarts with it.
//!
//! The [`Communicator`](crate::Communicator) reaches the root and its children through
//! [`Child`] handles; sending stays on the caller's task and the children poll their
//! consumers themselves, so the hot paths cross no extra actor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use actix::prelude::*;
use actix_rt::ArbiterHandle;

use crate::actors::Conduit;
use crate::actors::broadcast_hub::{self, BroadcastHub};
use crate::actors::rpc_endpoint::{self, RpcEndpoint, RpcFn};
use crate::actors::task_consumer::{self, TaskConsumer};
use crate::error::{Error, ErrorKind, Result};
use crate::supervision::{Child, Incidents, Policy, Report};
use crate::transport::Consumer;

/// The root of the actor tree (see the module docs).
pub(crate) struct Root {
    conduit: Conduit,
    /// Where the children run: the communicator's runtime.
    children: ArbiterHandle,
    broadcast_queue: String,
    incidents: Incidents,
    /// Its children, kept across its own restarts.
    tree: Arc<Mutex<Children>>,
}

/// The root's children.
#[derive(Default)]
struct Children {
    task_queues: HashMap<String, Child<TaskConsumer>>,
    /// RPC identifier → its endpoint; none while it is being subscribed or removed.
    rpc: HashMap<String, Option<Child<RpcEndpoint>>>,
    broadcast_hub: Option<Child<BroadcastHub>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Root {
    /// Starts the root, supervised, on `on` (the supervision thread); its children start
    /// on `children` (the runtime).
    pub(crate) fn start(
        on: &ArbiterHandle,
        conduit: Conduit,
        children: ArbiterHandle,
        broadcast_queue: String,
        incidents: Incidents,
    ) -> Child<Root> {
        let tree = Arc::<Mutex<Children>>::default();
        let report = Report {
            kind: "Root",
            name: "the actor tree".into(),
            incidents: incidents.clone(),
            events: None,
        };
        crate::supervision::start(
            on,
            Policy::OWN,
            move |_| Root {
                conduit: conduit.clone(),
                children: children.clone(),
                broadcast_queue: broadcast_queue.clone(),
                incidents: incidents.clone(),
                tree: tree.clone(),
            },
            report,
        )
    }

    fn report(&self, kind: &'static str, name: &str) -> Report {
        Report {
            kind,
            name: name.to_owned(),
            incidents: self.incidents.clone(),
            events: None,
        }
    }
}

impl Actor for Root {
    type Context = Context<Self>;

    /// Starts watching the connection: the transport's recovery runs as long as the root
    /// does, and again after the root restarts.
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.spawn(self.conduit.transport.recover().into_actor(self));
    }
}

/// The `TaskConsumer` child consuming `queue`, started (with this prefetch) unless it exists;
/// with `start: false`, only an existing one.
#[derive(Message)]
#[rtype(result = "Option<Child<TaskConsumer>>")]
pub(crate) struct TaskConsumerChild {
    pub(crate) queue: String,
    pub(crate) prefetch: u16,
    pub(crate) start: bool,
}

impl Handler<TaskConsumerChild> for Root {
    type Result = Option<Child<TaskConsumer>>;

    fn handle(&mut self, message: TaskConsumerChild, _: &mut Context<Self>) -> Self::Result {
        let mut tree = lock(&self.tree);
        if let Some(child) = tree.task_queues.get(&message.queue) {
            return Some(child.clone());
        }
        if !message.start {
            return None;
        }
        let conduit = self.conduit.clone();
        let (queue, prefetch) = (message.queue.clone(), message.prefetch);
        let kept = task_consumer::Kept::new(&queue);
        let child = crate::supervision::start(
            &self.children,
            Policy::OWN,
            move |_| TaskConsumer::new(conduit.clone(), queue.clone(), prefetch, kept.clone()),
            self.report("TaskConsumer", &message.queue),
        );
        tree.task_queues.insert(message.queue, child.clone());
        Some(child)
    }
}

/// Claims an RPC identifier before subscribing; `DuplicateSubscriber` if it is taken.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct ClaimRpc(pub(crate) String);

impl Handler<ClaimRpc> for Root {
    type Result = Result<()>;

    fn handle(&mut self, ClaimRpc(identifier): ClaimRpc, _: &mut Context<Self>) -> Self::Result {
        let mut tree = lock(&self.tree);
        if tree.rpc.contains_key(&identifier) {
            return Err(Error::new(ErrorKind::DuplicateSubscriber(identifier)));
        }
        tree.rpc.insert(identifier, None);
        Ok(())
    }
}

/// Starts the endpoint of a claimed identifier on its consumer; or, without a consumer
/// (subscribing failed), gives the claim up.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct StartRpc {
    pub(crate) identifier: String,
    pub(crate) started: Option<(RpcFn, Consumer)>,
}

impl Handler<StartRpc> for Root {
    type Result = ();

    fn handle(&mut self, message: StartRpc, ctx: &mut Context<Self>) {
        let StartRpc {
            identifier,
            started,
        } = message;
        let mut tree = lock(&self.tree);
        let Some((handler, consumer)) = started else {
            tree.rpc.remove(&identifier);
            return;
        };
        let conduit = self.conduit.clone();
        let id = identifier.clone();
        let kept = rpc_endpoint::Kept::new(consumer.tag.clone());
        let mut first = Some(consumer);
        // Weak: an endpoint does not keep the root's mailbox open.
        let root = ctx.address().downgrade();
        let forgotten = identifier.clone();
        let forget: rpc_endpoint::Forget = Arc::new(move || {
            if let Some(root) = root.upgrade() {
                root.do_send(ForgetRpc(forgotten.clone()));
            }
        });
        let endpoint = crate::supervision::start(
            &self.children,
            Policy::OWN,
            move |ctx| {
                let consumer = first.take();
                RpcEndpoint::new(
                    conduit.clone(),
                    id.clone(),
                    handler.clone(),
                    consumer,
                    kept.clone(),
                    forget.clone(),
                    ctx,
                )
            },
            self.report("RpcEndpoint", &identifier),
        );
        tree.rpc.insert(identifier, Some(endpoint));
    }
}

/// Forgets an identifier whose subscriber is gone for good (an actor the user started
/// died): its endpoint stops serving it and it is free again, so callers learn at once
/// that nobody serves it, and `health()` no longer counts it.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ForgetRpc(pub(crate) String);

impl Handler<ForgetRpc> for Root {
    type Result = ();

    fn handle(&mut self, ForgetRpc(identifier): ForgetRpc, ctx: &mut Context<Self>) {
        let Some(Some(endpoint)) = lock(&self.tree).rpc.remove(&identifier) else {
            return;
        };
        self.conduit.subscribers.add("rpc", -1);
        tracing::warn!(%identifier, "the identifier's subscriber is gone for good: no longer served");
        ctx.spawn(
            async move {
                let _ = endpoint.send(rpc_endpoint::Unsubscribe).await;
            }
            .into_actor(self),
        );
    }
}

/// Takes an RPC identifier's endpoint, to unsubscribe it; none if it has none. The
/// identifier stays claimed until [`ReleaseRpc`]: added again before its subscription is
/// gone, it would be bound anew and then unbound by the old one's removal.
#[derive(Message)]
#[rtype(result = "Option<Child<RpcEndpoint>>")]
pub(crate) struct RemoveRpc(pub(crate) String);

impl Handler<RemoveRpc> for Root {
    type Result = Option<Child<RpcEndpoint>>;

    fn handle(&mut self, RemoveRpc(identifier): RemoveRpc, _: &mut Context<Self>) -> Self::Result {
        match lock(&self.tree).rpc.get_mut(&identifier) {
            Some(endpoint @ Some(_)) => endpoint.take(),
            // Still being subscribed or removed, or unknown: nothing to remove now.
            _ => None,
        }
    }
}

/// Frees an identifier whose endpoint [`RemoveRpc`] took, once it has unsubscribed.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ReleaseRpc(pub(crate) String);

impl Handler<ReleaseRpc> for Root {
    type Result = ();

    fn handle(&mut self, ReleaseRpc(identifier): ReleaseRpc, _: &mut Context<Self>) {
        let mut tree = lock(&self.tree);
        if let Some(None) = tree.rpc.get(&identifier) {
            tree.rpc.remove(&identifier);
        }
    }
}

/// The `BroadcastHub` child, started on first use.
#[derive(Message)]
#[rtype(result = "Child<BroadcastHub>")]
pub(crate) struct BroadcastHubChild;

impl Handler<BroadcastHubChild> for Root {
    type Result = MessageResult<BroadcastHubChild>;

    fn handle(&mut self, _: BroadcastHubChild, _: &mut Context<Self>) -> Self::Result {
        let mut tree = lock(&self.tree);
        if let Some(hub) = &tree.broadcast_hub {
            return MessageResult(hub.clone());
        }
        let conduit = self.conduit.clone();
        let queue = self.broadcast_queue.clone();
        let kept = broadcast_hub::Kept::default();
        let hub = crate::supervision::start(
            &self.children,
            Policy::OWN,
            move |_| {
                BroadcastHub::new(
                    conduit.transport.clone(),
                    queue.clone(),
                    conduit.message_prefetch,
                    conduit.subscribers.clone(),
                    conduit.handlers.clone(),
                    kept.clone(),
                )
            },
            self.report("BroadcastHub", &self.broadcast_queue),
        );
        tree.broadcast_hub = Some(hub.clone());
        MessageResult(hub)
    }
}

/// What the tree holds now: its children, to ask them for their figures.
#[derive(Message)]
#[rtype(result = "Tree")]
pub(crate) struct Inspect;

/// The root's children, as [`Inspect`] answers.
#[derive(Debug, Default)]
pub(crate) struct Tree {
    pub(crate) task_queues: Vec<Child<TaskConsumer>>,
    pub(crate) rpc_endpoints: Vec<Child<RpcEndpoint>>,
    pub(crate) broadcast_hub: Option<Child<BroadcastHub>>,
}

impl Handler<Inspect> for Root {
    type Result = MessageResult<Inspect>;

    fn handle(&mut self, _: Inspect, _: &mut Context<Self>) -> Self::Result {
        let tree = lock(&self.tree);
        MessageResult(Tree {
            task_queues: tree.task_queues.values().cloned().collect(),
            rpc_endpoints: tree.rpc.values().flatten().cloned().collect(),
            broadcast_hub: tree.broadcast_hub.clone(),
        })
    }
}

crate::supervision::test_hooks!(Root);

/// Makes a future the root runs beside the connection's recovery panic, as a failure in
/// the recovery would: the root's context goes with it.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct PanicInRecovery;

#[cfg(test)]
impl Handler<PanicInRecovery> for Root {
    type Result = ();

    fn handle(&mut self, _: PanicInRecovery, ctx: &mut Context<Self>) {
        ctx.spawn(fut::ready(()).map(|(), _: &mut Root, _| panic!("injected into recovery")));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::supervision::hooks::{Panic, Stop};
    use crate::{
        Broadcast, BroadcastFilter, BroadcastOptions, Communicator, HandlerError, Rpc, Task,
    };

    async fn until(what: &str, mut condition: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A communicator with one subscriber of each kind; the broadcasts it heard.
    async fn serving() -> (Communicator, Arc<AtomicUsize>) {
        let comm = crate::connect(&format!("mem://{}", uuid::Uuid::new_v4().simple()))
            .await
            .unwrap();
        comm.add_task_subscriber(
            |task: Task<u32>| async move { Ok::<_, HandlerError>(task.body + 1) },
        )
        .await
        .unwrap();
        comm.add_rpc_subscriber(Some("echo"), |rpc: Rpc<u32>| async move {
            Ok::<_, HandlerError>(rpc.body)
        })
        .await
        .unwrap();
        let heard = Arc::new(AtomicUsize::new(0));
        let counter = heard.clone();
        comm.add_broadcast_subscriber(BroadcastFilter::new(), move |_: Broadcast<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .await
        .unwrap();
        (comm, heard)
    }

    /// The communicator serves each kind of subscriber as before, and still has them.
    async fn still_serves(comm: &Communicator, heard: &AtomicUsize) {
        let task = comm.task_send::<_, u32>(&1u32).await.unwrap();
        assert_eq!(task.await.unwrap(), 2);
        let rpc = comm.rpc_send::<_, u32>("echo", &7u32).await.unwrap();
        assert_eq!(rpc.await.unwrap(), 7);
        let before = heard.load(Ordering::SeqCst);
        until("a broadcast heard", async || {
            comm.broadcast_send(&1u32, BroadcastOptions::default())
                .await
                .unwrap();
            heard.load(Ordering::SeqCst) > before
        })
        .await;
        let health = comm.health().await;
        assert_eq!(
            (
                health.task_subscribers,
                health.rpc_subscribers,
                health.broadcast_subscribers
            ),
            (1, 1, 1)
        );
    }

    /// Each child stopped, as a failure would stop it, is started again — counted — and
    /// serves its subscribers as before.
    #[actix_rt::test]
    async fn a_child_that_stops_is_started_again_with_its_subscribers() {
        let (comm, heard) = serving().await;
        let tree = comm.inner.root.send(Inspect).await.unwrap();
        tree.task_queues[0].send(Stop).await.unwrap();
        tree.broadcast_hub.unwrap().send(Stop).await.unwrap();
        tree.rpc_endpoints[0].send(Stop).await.unwrap();
        until("three restarts", async || comm.health().await.restarts == 3).await;
        still_serves(&comm, &heard).await;
        comm.close().await.unwrap();
    }

    /// Each child that panics — and the root, in a handler and beside the recovery it
    /// drives — is started again with what it kept: the communicator keeps serving.
    #[actix_rt::test]
    async fn a_child_or_root_that_panics_is_started_again_with_its_state() {
        let (comm, heard) = serving().await;
        let tree = comm.inner.root.send(Inspect).await.unwrap();
        // The panicking message's sender learns the actor restarted: a clear error.
        let panicked = tree.task_queues[0]
            .send(Panic("injected into a TaskConsumer"))
            .await;
        assert!(panicked.unwrap_err().is_retryable());
        let _ = tree.rpc_endpoints[0]
            .send(Panic("injected into an RpcEndpoint"))
            .await;
        let _ = tree
            .broadcast_hub
            .as_ref()
            .unwrap()
            .send(Panic("injected into the BroadcastHub"))
            .await;
        until("three restarts", async || comm.health().await.restarts == 3).await;
        still_serves(&comm, &heard).await;

        let _ = comm.inner.root.send(Panic("injected into the Root")).await;
        until("the root's restart", async || {
            comm.health().await.restarts == 4
        })
        .await;
        still_serves(&comm, &heard).await;
        comm.inner.root.do_send(PanicInRecovery);
        until("the root's restart", async || {
            comm.health().await.restarts == 5
        })
        .await;
        still_serves(&comm, &heard).await;
        // The children are the ones it had: none started twice.
        let tree = comm.inner.root.send(Inspect).await.unwrap();
        assert_eq!((tree.task_queues.len(), tree.rpc_endpoints.len()), (1, 1));
        comm.close().await.unwrap();
    }

    /// A child whose consuming again after a restart is refused for a while keeps trying,
    /// with backoff, until it consumes: never registered and deaf.
    #[actix_rt::test]
    async fn a_child_refused_its_consumer_after_a_restart_tries_again() {
        let (comm, heard) = serving().await;
        let tree = comm.inner.root.send(Inspect).await.unwrap();
        // Each child's first two consumes again are refused (the hook counts over all).
        comm.inner.conduit.transport.refuse_consumes(6);
        let _ = tree.task_queues[0].send(Panic("injected")).await;
        let _ = tree.rpc_endpoints[0].send(Panic("injected")).await;
        let _ = tree
            .broadcast_hub
            .as_ref()
            .unwrap()
            .send(Panic("injected"))
            .await;
        until("three restarts", async || comm.health().await.restarts == 3).await;
        until("the identifier served again", async || {
            comm.rpc_send::<_, u32>("echo", &7u32).await.is_ok()
        })
        .await;
        still_serves(&comm, &heard).await;
        comm.close().await.unwrap();
    }
}
