//! The [`Supervisor`]: the root of a communicator's actor tree.
//!
//! It runs on a thread of its own where no user code runs, so no handler can stall it. It
//! owns the connection — the transport, whose recovery it drives: on `amqp://` the lapin
//! connection's watch, reconnect loop, and the restoring of the topology and of every
//! consumer (each child's consumer stream goes on with the new lapin consumer appended); on
//! `mem://` the in-process broker's handle. It starts the consumer-side actors as its
//! children — one `TaskQueue` per consumed queue, one `RpcEndpoint` per RPC identifier, the
//! `BroadcastHub` — on the communicator's runtime under actix's `Supervisor`, so a child
//! that stops is started again in place with its subscribers (each child's `Supervised`
//! impl consumes again); every restart is logged and counted.
//!
//! The [`Communicator`](crate::Communicator) talks to the supervisor and its children by
//! address; sending stays on the caller's task and the children poll their consumers
//! themselves, so the hot paths cross no extra actor.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::prelude::*;
use actix_rt::ArbiterHandle;

use crate::actors::Link;
use crate::actors::broadcast_hub::BroadcastHub;
use crate::actors::rpc_endpoint::{RpcEndpoint, RpcFn};
use crate::actors::task_queue::TaskQueue;
use crate::error::{Error, ErrorKind, Result};
use crate::transport::Consumer;

/// Counts what went wrong in a communicator's actor tree: restarts (of kiwimq's actors and
/// of supervised subscribers) and subscribers lost for good. Shared with the children and
/// the subscribers, which count their own.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally(Arc<Counts>);

#[derive(Debug, Default)]
pub(crate) struct Counts {
    restarts: AtomicU64,
    lost: AtomicU64,
}

impl Tally {
    /// Logs and counts a restart of kiwimq's actor `what`.
    pub(crate) fn record(&self, what: &str, name: &str) {
        let count = self.restarted();
        tracing::warn!(actor = what, %name, restarts = count, "a kiwimq actor stopped; started again with its subscribers");
    }

    /// Counts a restart; returns how many there were.
    pub(crate) fn restarted(&self) -> u64 {
        self.0.restarts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a subscriber lost for good.
    pub(crate) fn lost(&self) {
        self.0.lost.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn restarts(&self) -> u64 {
        self.0.restarts.load(Ordering::Relaxed)
    }

    pub(crate) fn losses(&self) -> u64 {
        self.0.lost.load(Ordering::Relaxed)
    }
}

/// The root of the actor tree (see the module docs).
pub(crate) struct Supervisor {
    link: Link,
    /// Where the children run: the communicator's runtime.
    children: ArbiterHandle,
    task_queues: HashMap<String, Addr<TaskQueue>>,
    /// RPC identifier → its endpoint; none while it is being subscribed.
    rpc: HashMap<String, Option<Addr<RpcEndpoint>>>,
    broadcast_hub: Option<Addr<BroadcastHub>>,
    broadcast_queue: String,
    /// Restarts and losses, shared with the children and the communicator.
    tally: Tally,
}

impl Supervisor {
    pub(crate) fn new(
        link: Link,
        children: ArbiterHandle,
        broadcast_queue: String,
        tally: Tally,
    ) -> Self {
        Self {
            link,
            children,
            task_queues: HashMap::new(),
            rpc: HashMap::new(),
            broadcast_hub: None,
            broadcast_queue,
            tally,
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    /// Starts watching the connection: the transport's recovery runs as long as the
    /// supervisor does.
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.spawn(self.link.transport.supervise().into_actor(self));
    }
}

/// The `TaskQueue` child consuming `queue`, started (with this prefetch) unless it exists;
/// with `start: false`, only an existing one.
#[derive(Message)]
#[rtype(result = "Option<Addr<TaskQueue>>")]
pub(crate) struct TaskQueueChild {
    pub(crate) queue: String,
    pub(crate) prefetch: u16,
    pub(crate) start: bool,
}

impl Handler<TaskQueueChild> for Supervisor {
    type Result = Option<Addr<TaskQueue>>;

    fn handle(&mut self, message: TaskQueueChild, _: &mut Context<Self>) -> Self::Result {
        if let Some(child) = self.task_queues.get(&message.queue) {
            return Some(child.clone());
        }
        if !message.start {
            return None;
        }
        let (link, tally) = (self.link.clone(), self.tally.clone());
        let (queue, prefetch) = (message.queue.clone(), message.prefetch);
        let child = actix::Supervisor::start_in_arbiter(&self.children, move |_| {
            TaskQueue::new(link, queue, prefetch, tally)
        });
        self.task_queues.insert(message.queue, child.clone());
        Some(child)
    }
}

/// Claims an RPC identifier before subscribing; `DuplicateSubscriber` if it is taken.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct ClaimRpc(pub(crate) String);

impl Handler<ClaimRpc> for Supervisor {
    type Result = Result<()>;

    fn handle(&mut self, ClaimRpc(identifier): ClaimRpc, _: &mut Context<Self>) -> Self::Result {
        if self.rpc.contains_key(&identifier) {
            return Err(Error::new(ErrorKind::DuplicateSubscriber(identifier)));
        }
        self.rpc.insert(identifier, None);
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

impl Handler<StartRpc> for Supervisor {
    type Result = ();

    fn handle(&mut self, message: StartRpc, _: &mut Context<Self>) {
        let StartRpc {
            identifier,
            started,
        } = message;
        let Some((handler, consumer)) = started else {
            self.rpc.remove(&identifier);
            return;
        };
        let (link, tally) = (self.link.clone(), self.tally.clone());
        let id = identifier.clone();
        let endpoint = actix::Supervisor::start_in_arbiter(&self.children, move |ctx| {
            RpcEndpoint::new(link, id, handler, consumer, tally, ctx)
        });
        self.rpc.insert(identifier, Some(endpoint));
    }
}

/// Takes an RPC identifier's endpoint, to unsubscribe it; none if it has none. The
/// identifier stays claimed until [`ReleaseRpc`]: added again before its subscription is
/// gone, it would be bound anew and then unbound by the old one's removal.
#[derive(Message)]
#[rtype(result = "Option<Addr<RpcEndpoint>>")]
pub(crate) struct RemoveRpc(pub(crate) String);

impl Handler<RemoveRpc> for Supervisor {
    type Result = Option<Addr<RpcEndpoint>>;

    fn handle(&mut self, RemoveRpc(identifier): RemoveRpc, _: &mut Context<Self>) -> Self::Result {
        match self.rpc.get_mut(&identifier) {
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

impl Handler<ReleaseRpc> for Supervisor {
    type Result = ();

    fn handle(&mut self, ReleaseRpc(identifier): ReleaseRpc, _: &mut Context<Self>) {
        if let Some(None) = self.rpc.get(&identifier) {
            self.rpc.remove(&identifier);
        }
    }
}

/// The `BroadcastHub` child, started on first use.
#[derive(Message)]
#[rtype(result = "Addr<BroadcastHub>")]
pub(crate) struct BroadcastHubChild;

impl Handler<BroadcastHubChild> for Supervisor {
    type Result = Addr<BroadcastHub>;

    fn handle(&mut self, _: BroadcastHubChild, _: &mut Context<Self>) -> Self::Result {
        let (link, tally) = (self.link.clone(), self.tally.clone());
        let queue = self.broadcast_queue.clone();
        let children = self.children.clone();
        self.broadcast_hub
            .get_or_insert_with(|| {
                actix::Supervisor::start_in_arbiter(&children, move |_| {
                    BroadcastHub::new(link.transport, queue, link.message_prefetch, tally)
                })
            })
            .clone()
    }
}

/// What the tree holds now: its children, to ask them for their figures.
#[derive(Message)]
#[rtype(result = "Tree")]
pub(crate) struct Inspect;

/// The supervisor's children.
#[derive(Debug, Default)]
pub(crate) struct Tree {
    pub(crate) task_queues: Vec<Addr<TaskQueue>>,
    pub(crate) rpc_endpoints: Vec<Addr<RpcEndpoint>>,
    pub(crate) broadcast_hub: Option<Addr<BroadcastHub>>,
}

impl Handler<Inspect> for Supervisor {
    type Result = MessageResult<Inspect>;

    fn handle(&mut self, _: Inspect, _: &mut Context<Self>) -> Self::Result {
        MessageResult(Tree {
            task_queues: self.task_queues.values().cloned().collect(),
            rpc_endpoints: self.rpc.values().flatten().cloned().collect(),
            broadcast_hub: self.broadcast_hub.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::actors::{broadcast_hub, rpc_endpoint, task_queue};
    use crate::{Broadcast, BroadcastFilter, BroadcastOptions, HandlerError, Rpc, Task};

    async fn until(what: &str, mut condition: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            actix_rt::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Every child stopped as a failure would stop it is started again by actix's
    /// `Supervisor`, counted, and serves its subscribers as before.
    #[actix_rt::test]
    async fn a_child_that_stops_is_started_again_with_its_subscribers() {
        let comm = crate::connect("mem://").await.unwrap();
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
        let heard = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = heard.clone();
        comm.add_broadcast_subscriber(BroadcastFilter::new(), move |_: Broadcast<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .await
        .unwrap();

        let tree = comm.inner.supervisor.send(Inspect).await.unwrap();
        tree.task_queues[0].send(task_queue::Stop).await.unwrap();
        tree.broadcast_hub
            .unwrap()
            .send(broadcast_hub::Stop)
            .await
            .unwrap();
        tree.rpc_endpoints[0]
            .send(rpc_endpoint::Stop)
            .await
            .unwrap();
        until("three restarts", async || comm.health().await.restarts == 3).await;

        assert_eq!(
            comm.task_send::<_, u32>(&1u32)
                .await
                .unwrap()
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            comm.rpc_send::<_, u32>("echo", &7u32)
                .await
                .unwrap()
                .await
                .unwrap(),
            7
        );
        comm.broadcast_send(&1u32, BroadcastOptions::default())
            .await
            .unwrap();
        until("the broadcast", async || heard.load(Ordering::SeqCst) == 1).await;
        let health = comm.health().await;
        assert_eq!(
            (
                health.task_subscribers,
                health.rpc_subscribers,
                health.broadcast_subscribers
            ),
            (1, 1, 1)
        );
        comm.close().await.unwrap();
    }
}
