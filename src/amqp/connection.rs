//! The connection: opening it, waiting for it through an outage, the channels held on it,
//! retrying what a lost connection interrupted, recording a loss and a restoration, and
//! closing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;

use super::consumers::{ConsumerChannel, Registration};
use super::node::{self, Node};
use super::{Attempt, Shared, Slot, State, amqp_error, lock, usable};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{self, ConnectionEvent};
use crate::settings::Settings;
use crate::transport::Source;

/// The broker as this transport sees it: its nodes, the connection to one of them (its
/// state, its events, why it blocks publishes) and how long to wait for it.
pub(super) struct Broker {
    /// The broker's nodes (one, or a cluster's), connected to one at a time.
    pub(super) nodes: Vec<Node>,
    /// Which node the next connection tries first: the one after the last connected.
    pub(super) next_node: AtomicUsize,
    /// The node of the current (or last) connection.
    pub(super) node: Mutex<Option<String>>,
    /// The broker, as errors name it: its nodes' URIs without passwords.
    pub(super) redacted: String,
    pub(super) connect_timeout: Duration,
    /// How long a request (a publish, a declaration, a consume) waits for the connection.
    pub(super) send_timeout: Duration,
    pub(super) reconnect_delay: (Duration, Duration),
    pub(super) state: watch::Sender<State>,
    pub(super) events: broadcast::Sender<ConnectionEvent>,
    pub(super) closed: AtomicBool,
    /// Why the broker blocks this connection's publishes (a memory or disk alarm), while
    /// it does: a send that times out meanwhile says so.
    pub(super) blocked: Mutex<Option<String>>,
    /// Asks the recovery to look now: something failed.
    pub(super) wake: Notify,
    /// Ticks every [`TICK`](super::TICK): deadlines awaited outside the I/O runtime, where
    /// tokio's timers may not exist.
    pub(super) clock: watch::Sender<u64>,
}

impl Broker {
    pub(super) fn new(settings: &Settings) -> Result<Self> {
        let nodes = settings
            .uris()
            .map(|uri| Node::new(uri, &settings.tls))
            .collect::<Result<Vec<_>>>()?;
        node::one_scheme(&nodes)?;
        let redacted = nodes
            .iter()
            .map(|node| node.redacted.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Self {
            next_node: AtomicUsize::new(node::random_start(nodes.len())),
            nodes,
            node: Mutex::default(),
            redacted,
            connect_timeout: settings.connect_timeout,
            send_timeout: settings.send_timeout,
            reconnect_delay: settings.reconnect_delay,
            state: watch::Sender::new(State::Down("not connected yet".into())),
            events: events::channel(),
            closed: AtomicBool::new(false),
            blocked: Mutex::default(),
            wake: Notify::new(),
            clock: watch::Sender::new(0),
        })
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// `Closed` once the transport is closed.
    pub(super) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::closed());
        }
        Ok(())
    }

    /// Tells the connection's observers (none is fine).
    pub(super) fn emit(&self, event: ConnectionEvent) {
        let _ = self.events.send(event);
    }
}

/// How long closing waits for the broker's goodbye, plus a millisecond per consumer.
const CLOSE_PATIENCE: Duration = Duration::from_secs(5);

impl Shared {
    /// Opens a connection to one of the broker's nodes, each tried within the connect
    /// timeout, in turn from the one after the node of the last connection (a random one at
    /// first), and notes which node answered.
    pub(super) async fn open_connection(&self) -> Result<Connection> {
        let count = self.broker.nodes.len();
        let start = self.broker.next_node.load(Ordering::Acquire);
        let mut failures = Vec::new();
        for index in (start..start + count).map(|i| i % count) {
            let node = &self.broker.nodes[index];
            match tokio::time::timeout(self.broker.connect_timeout, node.connect()).await {
                Ok(Ok(connection)) => {
                    self.broker.next_node.store(index + 1, Ordering::Release);
                    *lock(&self.broker.node) = Some(node.redacted.clone());
                    if count > 1 {
                        tracing::info!(node = %node.redacted, "connected");
                    }
                    self.broker.emit(ConnectionEvent::Connected {
                        node: node.redacted.clone(),
                    });
                    return Ok(connection);
                }
                Ok(Err(error)) => {
                    let reason = format!(
                        "cannot connect to {}: {}",
                        node.redacted,
                        node.explain(&error)
                    );
                    failures.push(if super::node::is_not_amqp(&error) {
                        Error::new(ErrorKind::Connection(reason))
                    } else {
                        Error::with_source(ErrorKind::Connection(reason), error)
                    });
                }
                Err(_) => failures.push(Error::timeout(format!(
                    "no answer from {} within {:?}",
                    node.redacted, self.broker.connect_timeout
                ))),
            }
        }
        if failures.len() == 1 {
            return Err(failures.remove(0));
        }
        let reasons: Vec<String> = failures.iter().map(ToString::to_string).collect();
        Err(Error::connection(format!(
            "no node of the broker answered: {}",
            reasons.join("; ")
        )))
    }

    /// Declares the exchanges and every task queue declared so far.
    pub(super) async fn declare_topology(&self, connection: &Connection) -> Result<()> {
        let channel = connection.create_channel().await.map_err(amqp_error)?;
        self.topology
            .declare_exchanges(&channel)
            .await
            .map_err(amqp_error)?;
        let queues: Vec<String> = lock(&self.consumers.task_queues).iter().cloned().collect();
        for queue in queues {
            self.topology
                .declare_task_queue(&channel, &queue)
                .await
                .map_err(amqp_error)?;
        }
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }

    /// The current connection, waiting for it through an outage until `deadline`.
    pub(super) async fn connection(&self, deadline: Instant) -> Result<(Arc<Connection>, u64)> {
        let mut receiver = self.broker.state.subscribe();
        let waited = tokio::time::timeout_at(
            deadline,
            receiver.wait_for(|state| !matches!(state, State::Down(_))),
        )
        .await;
        let state = match waited {
            Ok(Ok(state)) => state.clone(),
            Ok(Err(_)) => State::Closed,
            Err(_) => {
                let reason = match &*self.broker.state.borrow() {
                    State::Down(reason) => reason.to_string(),
                    _ => "the connection changed while waiting".to_owned(),
                };
                return Err(Error::timeout(format!(
                    "no connection to {} within the send timeout ({:?}); last error: {reason}",
                    self.broker.redacted, self.broker.send_timeout
                )));
            }
        };
        match state {
            State::Up(connection, epoch) => Ok((connection, epoch)),
            State::Down(_) | State::Closed => Err(Error::closed()),
        }
    }

    /// The slot's channel on the current connection, opened when needed. Waiting for the
    /// connection takes `deadline` into account (a final failure); opening may fail because
    /// the connection just died (worth another try).
    pub(super) async fn channel(
        &self,
        slot: &Slot,
        confirm: bool,
        deadline: Instant,
    ) -> std::result::Result<Arc<Channel>, Attempt> {
        let (connection, epoch) = self.connection(deadline).await.map_err(Attempt::Final)?;
        self.channel_on(slot, confirm, &connection, epoch)
            .await
            .map_err(Attempt::unless_refused)
    }

    /// Opens the publisher's and the declarer's channels on a new connection before any
    /// consumer's: however many queues are consumed, sending and subscribing find their
    /// channels (a connection has `channel_max` of them).
    pub(super) async fn reserve_channels(&self, connection: &Connection, epoch: u64) {
        let declarers = self.consumers.declarers.iter().map(|slot| (slot, false));
        let slots = std::iter::once((&self.publisher.channel, true)).chain(declarers);
        let opening =
            slots.map(|(slot, confirm)| self.channel_on(slot, confirm, connection, epoch));
        for opened in futures::future::join_all(opening).await {
            if let Err(error) = opened {
                tracing::debug!(%error, "opening a channel ahead failed; it opens when needed");
            }
        }
    }

    /// The slot's channel on `connection` (number `epoch`), opened when needed.
    pub(super) async fn channel_on(
        &self,
        slot: &Slot,
        confirm: bool,
        connection: &Connection,
        epoch: u64,
    ) -> Result<Arc<Channel>> {
        let mut slot = slot.0.lock().await;
        if let Some(channel) = usable(&slot, epoch) {
            return Ok(channel);
        }
        let open = async {
            let channel = connection.create_channel().await?;
            if confirm {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
            }
            Ok(channel)
        };
        let channel = Arc::new(open.await.map_err(amqp_error)?);
        *slot = Some((epoch, channel.clone()));
        Ok(channel)
    }

    /// Runs `attempt` until it succeeds, fails for a reason retrying cannot mend, or
    /// `deadline` passes. A failed attempt wakes the supervisor, which notices a lost
    /// connection at once.
    pub(super) async fn retrying<T, F, Fut>(
        &self,
        deadline: Instant,
        what: &str,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, Attempt>>,
    {
        let mut pause = Duration::from_millis(25);
        loop {
            self.broker.check_open()?;
            let error = match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(Attempt::Final(error))) => return Err(error),
                Ok(Err(Attempt::Again(error))) => error,
                Err(_) => return Err(self.unconfirmed(what)),
            };
            self.broker.check_open()?;
            tracing::debug!(%error, "{what} failed; trying again");
            self.broker.wake.notify_one();
            if Instant::now() + pause >= deadline {
                return Err(error);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Records a lost connection: waiting senders hold, every consumer awaits restoration.
    pub(super) fn lost(&self, reason: &str) {
        if self.broker.is_closed() {
            return;
        }
        self.broker.state.send_replace(State::Down(reason.into()));
        for entry in lock(&self.consumers.registrations).values_mut() {
            entry.active = None;
            entry.retry_at = None;
        }
        tracing::warn!(node = ?lock(&self.broker.node), %reason, "connection lost; reconnecting");
        self.broker.emit(ConnectionEvent::Lost(reason.to_owned()));
    }

    /// Records a restored connection: consumers are back, waiting senders go on.
    pub(super) fn restored(&self, connection: Arc<Connection>, epoch: u64, down_for: Duration) {
        if self.broker.is_closed() {
            return;
        }
        // A new connection: the old one's block (if any) went with it.
        lock(&self.broker.blocked).take();
        self.broker.state.send_replace(State::Up(connection, epoch));
        tracing::info!(node = ?lock(&self.broker.node), ?down_for, "connection restored");
        ::metrics::counter!(crate::metrics::RECONNECTS).increment(1);
        self.broker.emit(ConnectionEvent::Restored(down_for));
    }

    pub(super) async fn close(&self) -> Result<()> {
        if self.broker.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let previous = self.broker.state.send_replace(State::Closed);
        self.broker.emit(ConnectionEvent::Closed);
        self.broker.wake.notify_one();
        let entries: Vec<Registration> = lock(&self.consumers.registrations)
            .drain()
            .map(|(_, e)| e)
            .collect();
        let consumers = entries.len();
        let reply_queues: Vec<String> = entries
            .iter()
            .filter_map(|entry| match &entry.source {
                Source::Replies(_, queue) => Some(queue.clone()),
                _ => None,
            })
            .collect();
        let State::Up(connection, _) = previous else {
            return Ok(());
        };
        if !connection.status().connected() {
            return Ok(());
        }
        // Each consumer's channel closes before the connection does: a channel closing
        // while the connection goes makes lapin report a connection error. Once each (many
        // consumers share one), all at once.
        let mut channels: Vec<Arc<ConsumerChannel>> = Vec::new();
        for guard in entries.into_iter().filter_map(|entry| entry.active) {
            if !channels.iter().any(|known| Arc::ptr_eq(known, &guard)) {
                channels.push(guard);
            }
        }
        let closing = channels
            .iter()
            .filter(|guard| guard.channel.status().connected());
        futures::future::join_all(closing.map(|guard| guard.channel.close(200, "closing".into())))
            .await;
        // Nobody waits for replies any more: the reply queues go now rather than when they
        // expire.
        if let Ok(channel) = connection.create_channel().await {
            for queue in reply_queues {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel.close(200, "reply queues deleted".into()).await;
        }
        // The broker deletes this connection's exclusive queues before it answers: give it
        // time for each, then leave it be.
        let patience = CLOSE_PATIENCE + Duration::from_millis(consumers as u64);
        let closing = connection.close(200, "kiwimq communicator closed".into());
        match tokio::time::timeout(patience, closing).await {
            // Whatever went wrong, the connection is gone, as closing wants.
            Ok(Err(error)) => tracing::debug!(%error, "the connection failed while closing"),
            Err(_) => tracing::debug!(
                ?patience,
                "the broker did not acknowledge the close in time; the connection is dropped"
            ),
            Ok(Ok(())) => {}
        }
        Ok(())
    }
}
