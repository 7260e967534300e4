//! The in-process broker: queues, consumers with prefetch credit, acks and requeues — the
//! semantics of RabbitMQ that kiwimq relies on, without a network.
//!
//! It is shared state behind a mutex rather than an actor because communicators on different
//! threads (each with its own actix System, as the blocking communicator has) must share
//! one broker, and an actor would die with the System that started it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::mpsc;

use crate::error::{Error, ErrorKind, Result};
use crate::transport::{
    Acker, DEAD_LETTER_SUFFIX, DeliverFn, Delivery, Outcome, Outgoing, Settle, dead_letter_queue,
};

/// A message at rest in a queue.
#[derive(Debug, Clone)]
struct Stored {
    body: bytes::Bytes,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    traceparent: Option<crate::trace::TraceContext>,
    redelivered: bool,
    /// How often it came back unfinished.
    returns: u32,
}

/// Where a consumer's deliveries go.
pub(crate) enum Sink {
    /// A stream its reader polls on its own thread. tokio's channel stores messages in
    /// blocks it reuses, where a linked-list channel allocates a node per message on the
    /// sender's thread and frees it on the reader's: with glibc's allocator every such free
    /// takes the sender's arena lock, and the two threads of a round trip queue on it.
    Channel(mpsc::UnboundedSender<Delivery>),
    /// Handed over at once, under the broker's lock: for reply consumers, whose handler
    /// only passes the reply on to the future awaiting it.
    Direct(DeliverFn),
}

impl Sink {
    fn is_closed(&self) -> bool {
        match self {
            Sink::Channel(tx) => tx.is_closed(),
            Sink::Direct(_) => false,
        }
    }

    /// Hands `delivery` over; gives it back if the reader went away.
    fn send(&self, delivery: Delivery) -> Option<Delivery> {
        match self {
            Sink::Channel(tx) => tx.send(delivery).err().map(|e| e.0),
            Sink::Direct(deliver) => {
                deliver(delivery);
                None
            }
        }
    }
}

struct Slot {
    tag: String,
    /// Names the consumer in the queue's unacked deliveries without copying its tag.
    id: u64,
    connection: u64,
    sink: Sink,
    /// 0 = unlimited.
    prefetch: u16,
    in_flight: u32,
}

impl Slot {
    fn has_credit(&self) -> bool {
        self.prefetch == 0 || self.in_flight < u32::from(self.prefetch)
    }
}

struct Unacked {
    message: Stored,
    /// The [`Slot::id`] it went to; none for a pulled message.
    consumer: Option<u64>,
    connection: u64,
}

#[derive(Default)]
struct Queue {
    /// Shared with every delivery's acker.
    name: Arc<str>,
    messages: VecDeque<Stored>,
    consumers: Vec<Slot>,
    /// Round-robin position among consumers.
    cursor: usize,
    /// Keyed by the queue's own delivery numbers: foldhash, not SipHash (see `Replies`).
    unacked: HashMap<u64, Unacked, foldhash::fast::RandomState>,
    next_delivery: u64,
    /// Deliveries settle themselves (replies; RPC and broadcasts without a prefetch window):
    /// at-most-once queues.
    auto_ack: bool,
    /// The connection an exclusive queue belongs to; the queue goes when it closes.
    owner: Option<u64>,
    /// The routing key it is bound with (an RPC identifier's, `[broadcast]`), if any: it
    /// receives what is published with that key.
    binding: Option<String>,
    /// Returns after which a message is dead-lettered (as a quorum queue's
    /// `x-delivery-limit`); a discarded message is dead-lettered too.
    delivery_limit: Option<u32>,
}

impl Queue {
    fn new(name: &str, delivery_limit: Option<u32>) -> Self {
        Queue {
            name: name.into(),
            delivery_limit: delivery_limit.filter(|_| !name.ends_with(DEAD_LETTER_SUFFIX)),
            ..Queue::default()
        }
    }

    /// Puts back a message that was not finished, or gives it up: returns it for the
    /// dead-letter queue when it came back too often.
    fn put_back(&mut self, message: Stored) -> Option<Stored> {
        let message = Stored {
            redelivered: true,
            returns: message.returns + 1,
            ..message
        };
        match self.delivery_limit {
            Some(limit) if message.returns > limit => Some(message),
            _ => {
                self.messages.push_front(message);
                None
            }
        }
    }
}

#[derive(Default)]
struct State {
    /// Looked up on every publish and settle: foldhash, not SipHash (see `Replies`).
    queues: HashMap<String, Queue, foldhash::fast::RandomState>,
    /// Routing key → the queues bound with it, as a topic exchange's bindings.
    bindings: HashMap<String, Vec<String>, foldhash::fast::RandomState>,
    /// consumer tag → queue name.
    consumers: HashMap<String, String, foldhash::fast::RandomState>,
    next_id: u64,
}

impl State {
    /// Deletes a queue and its binding.
    fn remove_queue(&mut self, name: &str) {
        let Some(queue) = self.queues.remove(name) else {
            return;
        };
        let Some(key) = queue.binding else {
            return;
        };
        if let Some(bound) = self.bindings.get_mut(&key) {
            bound.retain(|queue| queue != name);
            if bound.is_empty() {
                self.bindings.remove(&key);
            }
        }
    }
}

/// One in-process broker; communicators connected to the same `mem://NAME` share it.
#[derive(Default)]
pub(crate) struct Broker {
    state: Mutex<State>,
}

/// How a queue is created when a consumer asks for it.
#[derive(Debug, Clone)]
pub(crate) enum QueueMode {
    /// Durable, shared, acked by consumers; with a delivery limit when created.
    Shared(Option<u32>),
    /// Exclusive to one connection, consumed once (a second consumer is
    /// `DuplicateSubscriber`) and auto-acked; bound with `binding` (an RPC identifier's
    /// routing key, `[broadcast]`) if given.
    Exclusive { binding: Option<String> },
}

/// Where a message is published: one queue by name, or every queue bound with a key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target<'a> {
    Queue(&'a str),
    Bound(&'a str),
}

impl Broker {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping every communicator would, so recover the guard.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn next_id(&self) -> u64 {
        let mut state = self.lock();
        state.next_id += 1;
        state.next_id
    }

    pub(crate) fn declare(&self, queue: &str, delivery_limit: Option<u32>) {
        self.lock()
            .queues
            .entry(queue.to_owned())
            .or_insert_with(|| Queue::new(queue, delivery_limit));
    }

    /// Moves given-up messages of `queue_name` to its dead-letter queue.
    fn dead_letter(self: &Arc<Self>, state: &mut State, queue_name: &str, dead: Vec<Stored>) {
        if dead.is_empty() {
            return;
        }
        let name = dead_letter_queue(queue_name);
        let queue = state
            .queues
            .entry(name.clone())
            .or_insert_with(|| Queue::new(&name, None));
        for message in dead {
            tracing::warn!(queue = %queue_name, returns = message.returns, "task dead-lettered to {name}");
            queue.messages.push_back(Stored {
                redelivered: false,
                ..message
            });
        }
        self.pump(queue);
    }

    /// Routes a message to its target's queues; `Unroutable` if there is none and it is
    /// mandatory.
    pub(crate) fn publish(self: &Arc<Self>, target: Target<'_>, message: Outgoing) -> Result<()> {
        let mandatory = message.mandatory;
        let stored = Stored {
            body: message.body.into(),
            correlation_id: message.correlation_id,
            reply_to: message.reply_to,
            traceparent: message.traceparent,
            redelivered: false,
            returns: 0,
        };
        let mut state = self.lock();
        let State {
            queues, bindings, ..
        } = &mut *state;
        let (route, routed) = match target {
            Target::Queue(name) => (name, self.fan_out(queues, std::iter::once(name), stored)),
            Target::Bound(key) => {
                let bound = bindings.get(key).map_or(&[][..], Vec::as_slice);
                let names = bound.iter().map(String::as_str);
                (key, self.fan_out(queues, names, stored))
            }
        };
        if !routed && mandatory {
            return Err(Error::new(ErrorKind::Unroutable(route.to_owned())));
        }
        Ok(())
    }

    /// Puts a message in each of the named queues that exists; whether one did.
    fn fan_out<'n>(
        self: &Arc<Self>,
        queues: &mut HashMap<String, Queue, foldhash::fast::RandomState>,
        names: impl ExactSizeIterator<Item = &'n str>,
        stored: Stored,
    ) -> bool {
        let count = names.len();
        let mut stored = Some(stored);
        let mut routed = false;
        for (index, name) in names.enumerate() {
            if let Some(queue) = queues.get_mut(name) {
                // The last queue takes the message itself; only a fan-out copies it.
                let message = if index + 1 == count {
                    stored.take()
                } else {
                    stored.clone()
                };
                queue.messages.extend(message);
                routed = true;
                self.pump(queue);
            }
        }
        routed
    }

    pub(crate) fn consume(
        self: &Arc<Self>,
        connection: u64,
        queue_name: &str,
        mode: QueueMode,
        prefetch: u16,
        sink: Sink,
    ) -> Result<String> {
        let mut state = self.lock();
        state.next_id += 1;
        let id = state.next_id;
        let tag = format!("mem-consumer-{id}");
        match mode {
            QueueMode::Shared(delivery_limit) => {
                state
                    .queues
                    .entry(queue_name.to_owned())
                    .or_insert_with(|| Queue::new(queue_name, delivery_limit));
            }
            QueueMode::Exclusive { binding } => {
                if state.queues.contains_key(queue_name) {
                    return Err(Error::new(ErrorKind::DuplicateSubscriber(
                        queue_name.to_owned(),
                    )));
                }
                if let Some(key) = &binding {
                    let bound = state.bindings.entry(key.clone()).or_default();
                    bound.push(queue_name.to_owned());
                }
                let queue = Queue {
                    // A window asks for acknowledgements: a flood waits in the queue.
                    auto_ack: prefetch == 0,
                    owner: Some(connection),
                    binding,
                    ..Queue::new(queue_name, None)
                };
                state.queues.insert(queue_name.to_owned(), queue);
            }
        }
        state.consumers.insert(tag.clone(), queue_name.to_owned());
        let queue = state.queues.get_mut(queue_name).expect("declared above");
        queue.consumers.push(Slot {
            tag: tag.clone(),
            id,
            connection,
            sink,
            prefetch,
            in_flight: 0,
        });
        self.pump(queue);
        Ok(tag)
    }

    /// Removes a consumer; an exclusive queue is deleted with its last consumer.
    pub(crate) fn cancel(&self, tag: &str) {
        let mut state = self.lock();
        let Some(queue_name) = state.consumers.remove(tag) else {
            return;
        };
        let Some(queue) = state.queues.get_mut(&queue_name) else {
            return;
        };
        queue.consumers.retain(|slot| slot.tag != tag);
        if queue.owner.is_some() && queue.consumers.is_empty() {
            state.remove_queue(&queue_name);
        }
    }

    /// A queue's counts; none if it does not exist.
    pub(crate) fn stats(&self, queue_name: &str) -> Option<crate::transport::QueueStats> {
        let state = self.lock();
        let queue = state.queues.get(queue_name)?;
        Some(crate::transport::QueueStats {
            ready: u32::try_from(queue.messages.len()).unwrap_or(u32::MAX),
            unacknowledged: Some(u32::try_from(queue.unacked.len()).unwrap_or(u32::MAX)),
            consumers: u32::try_from(queue.consumers.len()).unwrap_or(u32::MAX),
        })
    }

    /// Drops a queue's ready messages; returns how many, none if it does not exist.
    pub(crate) fn purge(&self, queue_name: &str) -> Option<u32> {
        let mut state = self.lock();
        let queue = state.queues.get_mut(queue_name)?;
        let count = queue.messages.len();
        queue.messages.clear();
        Some(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// The next ready message of a queue, if any; `None` if there is no such queue.
    pub(crate) fn get(
        self: &Arc<Self>,
        connection: u64,
        queue_name: &str,
    ) -> Option<Option<Delivery>> {
        let mut state = self.lock();
        let queue = state.queues.get_mut(queue_name)?;
        let Some(message) = queue.messages.pop_front() else {
            return Some(None);
        };
        queue.next_delivery += 1;
        let id = queue.next_delivery;
        Some(Some(self.hand_out(queue, id, message, None, connection)))
    }

    /// A connection closed: its exclusive queues go, its consumers stop, and every message it
    /// held unsettled returns to its queue, as a broker does for a closed channel.
    pub(crate) fn disconnect(self: &Arc<Self>, connection: u64) {
        let mut state = self.lock();
        let owned: Vec<String> = state
            .queues
            .iter()
            .filter(|(_, q)| q.owner == Some(connection))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &owned {
            state.remove_queue(name);
        }
        let mut dead = Vec::new();
        let State {
            queues, consumers, ..
        } = &mut *state;
        for (name, queue) in queues.iter_mut() {
            let held: Vec<u64> = queue
                .unacked
                .iter()
                .filter(|(_, u)| u.connection == connection)
                .map(|(id, _)| *id)
                .collect();
            let mut given_up = Vec::new();
            for id in held {
                if let Some(unacked) = queue.unacked.remove(&id) {
                    given_up.extend(queue.put_back(unacked.message));
                }
            }
            if !given_up.is_empty() {
                dead.push((name.clone(), given_up));
            }
            self.pump(queue);
        }
        consumers.retain(|_, queue| queues.contains_key(queue));
        for (name, given_up) in dead {
            self.dead_letter(&mut state, &name, given_up);
        }
    }

    fn settle(self: &Arc<Self>, queue_name: &str, id: u64, outcome: Outcome) {
        let mut state = self.lock();
        let Some(queue) = state.queues.get_mut(queue_name) else {
            return;
        };
        // Unknown ids were already returned by a disconnect: settling them is a no-op, as
        // acking a delivery of a closed channel is.
        let Some(unacked) = queue.unacked.remove(&id) else {
            return;
        };
        if let Some(consumer) = unacked.consumer
            && let Some(slot) = queue.consumers.iter_mut().find(|s| s.id == consumer)
        {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
        let given_up = match outcome {
            Outcome::Ack => None,
            Outcome::Requeue => queue.put_back(unacked.message),
            Outcome::Discard => queue.delivery_limit.map(|_| unacked.message),
        };
        self.pump(queue);
        if let Some(message) = given_up {
            self.dead_letter(&mut state, queue_name, vec![message]);
        }
    }

    /// Delivers queued messages to consumers with credit, round robin.
    fn pump(self: &Arc<Self>, queue: &mut Queue) {
        queue.consumers.retain(|slot| !slot.sink.is_closed());
        while !queue.messages.is_empty() && !queue.consumers.is_empty() {
            let count = queue.consumers.len();
            let Some(offset) =
                (0..count).find(|i| queue.consumers[(queue.cursor + i) % count].has_credit())
            else {
                return;
            };
            let index = (queue.cursor + offset) % count;
            queue.cursor = index + 1;
            let message = queue.messages.pop_front().expect("checked non-empty");
            let (consumer, connection) = {
                let slot = &queue.consumers[index];
                (slot.id, slot.connection)
            };
            let (delivery, id) = if queue.auto_ack {
                (Self::delivery(message, Acker::auto()), None)
            } else {
                queue.next_delivery += 1;
                let id = queue.next_delivery;
                let delivery = self.hand_out(queue, id, message, Some(consumer), connection);
                queue.consumers[index].in_flight += 1;
                (delivery, Some(id))
            };
            if let Some(delivery) = queue.consumers[index].sink.send(delivery) {
                // The reader went away between the check above and now. Its delivery's
                // acker would take our lock to requeue: settle by hand instead.
                queue.consumers.remove(index);
                std::mem::forget(delivery.acker);
                match id.and_then(|id| queue.unacked.remove(&id)) {
                    Some(unacked) => queue.messages.push_front(unacked.message),
                    None => queue.messages.push_front(Stored {
                        body: delivery.body,
                        correlation_id: delivery.correlation_id,
                        reply_to: delivery.reply_to,
                        traceparent: delivery.traceparent,
                        redelivered: false,
                        returns: 0,
                    }),
                }
            }
        }
    }

    /// A delivery to be settled: the message stays with the queue as unacked until then.
    fn hand_out(
        self: &Arc<Self>,
        queue: &mut Queue,
        id: u64,
        message: Stored,
        consumer: Option<u64>,
        connection: u64,
    ) -> Delivery {
        let acker = Acker::new(MemAck {
            broker: Arc::downgrade(self),
            queue: queue.name.clone(),
            id,
        });
        let delivery = Self::delivery(message.clone(), acker);
        queue.unacked.insert(
            id,
            Unacked {
                message,
                consumer,
                connection,
            },
        );
        delivery
    }

    fn delivery(message: Stored, acker: Acker) -> Delivery {
        Delivery {
            body: message.body,
            correlation_id: message.correlation_id,
            reply_to: message.reply_to,
            traceparent: message.traceparent,
            redelivered: message.redelivered,
            delivery_count: message.returns,
            acker,
        }
    }
}

struct MemAck {
    broker: Weak<Broker>,
    queue: Arc<str>,
    id: u64,
}

impl Settle for MemAck {
    fn settle(self: Box<Self>, outcome: Outcome) {
        if let Some(broker) = self.broker.upgrade() {
            broker.settle(&self.queue, self.id, outcome);
        }
    }
}
