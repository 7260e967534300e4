//! The `mem://` backend: an in-process [`Broker`](broker::Broker) with RabbitMQ's semantics,
//! the embedded default. `mem://NAME` shares one broker between communicators, as two
//! processes share one RabbitMQ; plain `mem://` gets a private one.

mod broker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use futures::StreamExt;
use futures::future::{self, BoxFuture, FutureExt};

use crate::error::{Error, ErrorKind, Result};
use crate::events::{self, ConnectionEvent};
use crate::settings::Settings;
use crate::transport::{
    BROADCAST_TOPIC, Consumer, DeliverFn, Delivery, Exchange, Outgoing, PRESENCE_TOPIC, QueueStats,
    Route, Source, Transport, rpc_key,
};
use broker::{Broker, QueueMode, Sink, Target};

/// Named brokers, alive while a communicator uses them.
static BROKERS: LazyLock<Mutex<HashMap<String, Weak<Broker>>>> = LazyLock::new(Default::default);

/// One communicator's connection to an in-process broker.
pub(crate) struct MemTransport {
    broker: Arc<Broker>,
    /// Identifies this connection's exclusive queues and unsettled deliveries.
    connection: u64,
    /// Task queues this connection creates dead-letter tasks returned more often.
    delivery_limit: Option<u32>,
    /// The largest body a publish may carry.
    max_message_size: usize,
    /// An RPC identifier is one queue in the broker, refused to a second connection;
    /// otherwise each connection serving it has a queue bound with its key, as kiwiPy's
    /// anonymous queues are on RabbitMQ, and every one of them gets each call.
    exclusive_rpc_identifiers: bool,
    closed: AtomicBool,
    /// Consumes still to refuse, as a broker refusing for a while would (a test hook).
    #[cfg(test)]
    pub(crate) refuse_consumes: std::sync::atomic::AtomicU32,
    events: tokio::sync::broadcast::Sender<ConnectionEvent>,
}

impl MemTransport {
    /// Connects to the broker named by a `mem://NAME` URI, or a private one for `mem://`.
    pub(crate) fn connect(name: &str, settings: &Settings) -> Self {
        let broker = if name.is_empty() {
            Arc::new(Broker::default())
        } else {
            let mut brokers = BROKERS.lock().unwrap_or_else(|p| p.into_inner());
            brokers.retain(|_, broker| broker.strong_count() > 0);
            match brokers.get(name).and_then(Weak::upgrade) {
                Some(broker) => broker,
                None => {
                    let broker = Arc::new(Broker::default());
                    brokers.insert(name.to_owned(), Arc::downgrade(&broker));
                    broker
                }
            }
        };
        let connection = broker.next_id();
        Self {
            broker,
            connection,
            delivery_limit: settings.delivery_limit,
            max_message_size: settings.max_message_size,
            exclusive_rpc_identifiers: settings.exclusive_rpc_identifiers,
            closed: AtomicBool::new(false),
            #[cfg(test)]
            refuse_consumes: Default::default(),
            events: events::channel(),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed());
        }
        Ok(())
    }
}

/// A request about a queue that does not exist, refused as RabbitMQ refuses it.
fn no_queue(queue: &str) -> Error {
    Error::new(ErrorKind::Refused(format!("no queue named '{queue}'")))
}

impl Transport for MemTransport {
    fn declare_task_queue(&self, queue: &str) -> BoxFuture<'static, Result<()>> {
        let result = self
            .check_open()
            .map(|()| self.broker.declare(queue, self.delivery_limit));
        future::ready(result).boxed()
    }

    fn publish(&self, route: Route, message: Outgoing) -> BoxFuture<'static, Result<()>> {
        let result = self.check_open();
        let result = result.and_then(|()| message.check_size(self.max_message_size));
        let result = result.and_then(|()| match &route {
            Route::Task(queue) => self.broker.publish(Target::Queue(queue), message),
            Route::Rpc(identifier) => {
                let key = rpc_key(identifier);
                self.broker.publish(Target::Bound(&key), message)
            }
            Route::Broadcast => self.broker.publish(Target::Bound(BROADCAST_TOPIC), message),
            Route::Presence => self.broker.publish(Target::Bound(PRESENCE_TOPIC), message),
            Route::Reply(queue) => self.broker.publish(Target::Queue(queue), message),
        });
        future::ready(result).boxed()
    }

    #[cfg(test)]
    fn refuse_consumes(&self, count: u32) {
        self.refuse_consumes.store(count, Ordering::Release);
    }

    fn consume(&self, source: Source, prefetch: u16) -> BoxFuture<'static, Result<Consumer>> {
        #[cfg(test)]
        if self
            .refuse_consumes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            let error = Error::connection("refused by the test hook");
            return future::ready(Err(error)).boxed();
        }
        let bound = |key: String| QueueMode::Exclusive { binding: Some(key) };
        let (queue, mode) = match source {
            Source::Tasks(queue) => (queue, QueueMode::Shared(self.delivery_limit)),
            Source::Rpc(identifier) => {
                let key = rpc_key(&identifier);
                let queue = match self.exclusive_rpc_identifiers {
                    true => key.clone(),
                    false => format!("{key}@{}", self.connection),
                };
                (queue, bound(key))
            }
            Source::Broadcasts(queue) => (queue, bound(BROADCAST_TOPIC.to_owned())),
            Source::Presence(queue) => (queue, bound(PRESENCE_TOPIC.to_owned())),
            Source::Replies(_, queue) => (queue, QueueMode::Exclusive { binding: None }),
        };
        let (tx, mut deliveries) = tokio::sync::mpsc::unbounded_channel();
        let result = self.check_open().and_then(|()| {
            let tag =
                self.broker
                    .consume(self.connection, &queue, mode, prefetch, Sink::Channel(tx))?;
            Ok(Consumer {
                tag,
                deliveries: futures::stream::poll_fn(move |cx| deliveries.poll_recv(cx)).boxed(),
            })
        });
        future::ready(result).boxed()
    }

    /// Replies are handed over as they are published: no reader, no thread hop.
    fn consume_replies(
        &self,
        _: Exchange,
        queue: String,
        deliver: DeliverFn,
    ) -> BoxFuture<'static, Result<BoxFuture<'static, ()>>> {
        let mode = QueueMode::Exclusive { binding: None };
        let result = self.check_open().and_then(|()| {
            self.broker
                .consume(self.connection, &queue, mode, 0, Sink::Direct(deliver))?;
            Ok(future::ready(()).boxed())
        });
        future::ready(result).boxed()
    }

    fn cancel(&self, tag: &str) -> BoxFuture<'static, Result<()>> {
        let result = self.check_open().map(|()| self.broker.cancel(tag));
        future::ready(result).boxed()
    }

    fn queue_stats(&self, queue: &str) -> BoxFuture<'static, Result<QueueStats>> {
        let result = self
            .check_open()
            .and_then(|()| self.broker.stats(queue).ok_or_else(|| no_queue(queue)));
        future::ready(result).boxed()
    }

    fn purge(&self, queue: &str) -> BoxFuture<'static, Result<u32>> {
        let result = self
            .check_open()
            .and_then(|()| self.broker.purge(queue).ok_or_else(|| no_queue(queue)));
        future::ready(result).boxed()
    }

    fn get(&self, queue: &str) -> BoxFuture<'static, Result<Option<Delivery>>> {
        let result = self.check_open().and_then(|()| {
            self.broker
                .get(self.connection, queue)
                .ok_or_else(|| no_queue(queue))
        });
        future::ready(result).boxed()
    }

    fn close(&self) -> BoxFuture<'static, Result<()>> {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.broker.disconnect(self.connection);
            let _ = self.events.send(ConnectionEvent::Closed);
        }
        future::ready(Ok(())).boxed()
    }

    fn events(&self) -> tokio::sync::broadcast::Sender<ConnectionEvent> {
        self.events.clone()
    }

    /// An in-process broker cannot be lost: connected until closed.
    /// An in-process broker cannot be lost: nothing to watch.
    fn recover(&self) -> BoxFuture<'static, ()> {
        future::pending().boxed()
    }

    fn is_connected(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

impl Drop for MemTransport {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.broker.disconnect(self.connection);
        }
    }
}
