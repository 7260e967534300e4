//! [`ConnectionEvent`]: what a communicator reports about its connection to the broker, as
//! kiwiPy's `add_close_callback` does, and more: losses and restorations too.

use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use tokio::sync::broadcast;

/// A change in a communicator's connection, or in its subscribers' lives. Watch them with
/// [`Communicator::connection_events`](crate::Communicator::connection_events).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// The connection was lost; the communicator is reconnecting. Sends wait (within the
    /// send timeout) and subscribers resume once it is back. Carries the reason.
    Lost(String),
    /// The connection is back, with every exchange, queue and subscriber re-created;
    /// carries how long it was down.
    Restored(Duration),
    /// A connection was opened, to this node (its URI without the password): after a
    /// loss, on a cluster, the node it failed over to. `Restored` follows once every
    /// subscriber is back.
    Connected {
        /// The node's URI, password hidden.
        node: String,
    },
    /// The communicator was closed; nothing follows.
    Closed,
    /// A [`supervised`](crate::supervised) subscriber's actor panicked or stopped and is
    /// being started afresh.
    SubscriberRestarted {
        /// The subscriber's identifier (as its `add_*_subscriber` returned it).
        identifier: String,
        /// What ended the actor.
        reason: String,
    },
    /// A subscriber is gone for good: an actor the user started died (it panicked or
    /// stopped), or a supervised one passed its restart limit. It receives nothing more;
    /// what it would have received goes to other subscribers, or back to its queue.
    SubscriberLost {
        /// The subscriber's identifier.
        identifier: String,
        /// What ended it.
        reason: String,
    },
}

/// How far an observer may fall behind before it misses events (it then skips to the
/// newest ones: events report changes, the newest state is what matters).
pub(crate) const EVENT_BACKLOG: usize = 64;

/// The sending side, kept by each transport.
pub(crate) fn channel() -> broadcast::Sender<ConnectionEvent> {
    broadcast::channel(EVENT_BACKLOG).0
}

/// A receiver as a stream that ends after `Closed` (or when the transport is gone).
pub(crate) fn stream(
    receiver: broadcast::Receiver<ConnectionEvent>,
) -> BoxStream<'static, ConnectionEvent> {
    futures::stream::unfold(Some(receiver), |receiver| async move {
        let mut receiver = receiver?;
        loop {
            match receiver.recv().await {
                Ok(ConnectionEvent::Closed) => return Some((ConnectionEvent::Closed, None)),
                Ok(event) => return Some((event, Some(receiver))),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "a connection-event observer fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .boxed()
}
