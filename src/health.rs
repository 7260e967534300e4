//! [`Health`]: what a communicator can say about itself — for a health endpoint, a fleet
//! runner's report, or a test.

use crate::actors::{broadcast_hub, task_consumer};
use crate::communicator::Communicator;
use crate::tree::Inspect;

/// A communicator's health now: its connection, its subscribers and the work in hand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Whether the connection to the broker is up (not while reconnecting, not closed).
    pub connected: bool,
    /// Task subscribers, over every queue.
    pub task_subscribers: usize,
    /// RPC identifiers served.
    pub rpc_subscribers: usize,
    /// Broadcast subscribers.
    pub broadcast_subscribers: usize,
    /// Tasks being handled now.
    pub tasks_running: usize,
    /// Task and RPC results this communicator awaits.
    pub pending_results: usize,
    /// Restarts so far: of supervised subscribers, and of kiwimq's own actors.
    pub restarts: u64,
    /// Subscribers lost for good so far (see
    /// [`ConnectionEvent::SubscriberLost`](crate::ConnectionEvent::SubscriberLost)).
    pub subscribers_lost: u64,
}

impl Health {
    /// Every subscriber, of any kind.
    pub fn subscribers(&self) -> usize {
        self.task_subscribers + self.rpc_subscribers + self.broadcast_subscribers
    }
}

impl Communicator {
    /// This communicator's [`Health`] now. A closed communicator reports no subscribers.
    pub async fn health(&self) -> Health {
        let inner = &self.inner;
        let mut health = Health {
            connected: self.is_connected(),
            pending_results: inner.replies.len(),
            restarts: inner.incidents.restarts(),
            subscribers_lost: inner.incidents.losses(),
            ..Health::default()
        };
        let Ok(tree) = inner.root.send(Inspect).await else {
            return health;
        };
        health.rpc_subscribers = tree.rpc_endpoints.len();
        for queue in tree.task_queues {
            if let Ok((subscribers, running)) = queue.send(task_consumer::Stats).await {
                health.task_subscribers += subscribers;
                health.tasks_running += running;
            }
        }
        if let Some(hub) = tree.broadcast_hub {
            health.broadcast_subscribers = hub.send(broadcast_hub::Stats).await.unwrap_or(0);
        }
        health
    }
}
