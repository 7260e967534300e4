//! kiwimq as a client of a ZeroMQ broker: one DEALER socket on an I/O thread of its own,
//! bridged to the runtime by a shared [`Link`] (an outbox the thread drains, the consumers it
//! feeds) and a socket pair that wakes it.
//!
//! What the broker forgets, the client remembers: every subscription (sent again whenever a
//! connection is made after a loss) and every task the broker has not yet confirmed (sent
//! again if it was handed to a connection that was then lost). With `zmq:///SERVICE_DIR` the
//! thread also watches `broker.sockets`, so a broker that came back in a new socket directory
//! (AiiDA's does, after a crash) is followed without restarting anything.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use futures::future::{self, BoxFuture, FutureExt};
use serde_json::value::RawValue;
use tokio::sync::{broadcast, watch};

use super::protocol::{
    self, Answer, BroadcastEnvelope, Incoming, Outgoing, ReplyEnvelope, TaskEnvelope, kind,
};
use super::service::{ServiceStatus, service_dir_of_socket};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{self, ConnectionEvent};
use crate::settings::Settings;
use crate::transport::{
    Acker, Consumer, DeliverFn, Delivery, Exchange, Outcome, QueueStats, Route, Settle, Source,
    Transport,
};

/// Where a reply to a received task goes (the `reply_to` of its delivery).
const TASK_REPLY_TO: &str = "zmq:task_response";
/// Where a reply to a received RPC goes.
const RPC_REPLY_TO: &str = "zmq:rpc_response";

/// How often the I/O thread wakes without traffic: to look at `broker.sockets`, and to
/// finish closing.
const TICK: Duration = Duration::from_millis(500);

/// How long a settle (ack or requeue) is remembered to be sent again after a reconnect: a
/// broker killed before it wrote a settle down still holds the task for this client, which
/// would otherwise never settle it again.
const SETTLE_MEMORY: Duration = Duration::from_secs(10);

/// At most this many recent settles are remembered.
const SETTLES_KEPT: usize = 100_000;

/// The longest `close` waits for the unsubscriptions to leave.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// What the answer to a task that wants its result says on AiiDA's broker.
const NO_RESULTS: &str = "the task is queued and will run, but this ZeroMQ broker does not \
     return task results (AiiDA's broker drops them): send it with task_send_no_reply, or use \
     kiwimq's broker (`kiwimq broker`), which returns them";

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `zmq+ipc:///ABS/router.sock`: this socket, for good.
    Fixed(String),
    /// `zmq:///ABS/SERVICE_DIR`: the socket `broker.sockets` names, now and after restarts.
    ServiceDir(PathBuf),
}

impl Endpoint {
    /// Reads a `zmq://` or `zmq+ipc://` URI; paths must be absolute.
    pub(crate) fn parse(uri: &str) -> Result<Self> {
        let (scheme, path) = uri
            .split_once("://")
            .ok_or_else(|| Error::config(format!("'{uri}' is not a URI")))?;
        if !path.starts_with('/') {
            return Err(Error::config(format!(
                "'{uri}': a ZeroMQ broker is named by an absolute path \
                 (zmq:///ABS/SERVICE_DIR or zmq+ipc:///ABS/router.sock)"
            )));
        }
        match scheme {
            "zmq" => Ok(Self::ServiceDir(PathBuf::from(path))),
            "zmq+ipc" => Ok(Self::Fixed(format!("ipc://{path}"))),
            _ => Err(Error::config(format!("'{uri}' is not a zmq:// URI"))),
        }
    }

    /// The socket's endpoint now: `None` while a service directory has no `broker.sockets`.
    fn current(&self) -> Option<String> {
        match self {
            Self::Fixed(endpoint) => Some(endpoint.clone()),
            Self::ServiceDir(dir) => sockets_endpoint(dir),
        }
    }
}

/// The endpoint a broker's `broker.sockets` names: `ipc://<its text>/router.sock`.
pub(crate) fn sockets_endpoint(service_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(service_dir.join("broker.sockets")).ok()?;
    let dir = text.trim();
    (!dir.is_empty()).then(|| format!("ipc://{dir}/router.sock"))
}

/// A task sent and not yet confirmed by the broker.
struct Unconfirmed {
    frame: Arc<Vec<u8>>,
    /// When it was handed to the socket; a loss after that means sending it again.
    handed: Option<Instant>,
    wants_result: bool,
    correlation_id: Option<String>,
    done: oneshot::Sender<Result<()>>,
}

/// A task consumer of this connection.
struct TaskConsumer {
    tag: String,
    prefetch: u16,
    deliveries: mpsc::UnboundedSender<Delivery>,
}

/// A message waiting to be sent.
struct Frame {
    /// `Arc`, so an unconfirmed task keeps its bytes for free.
    bytes: Arc<Vec<u8>>,
    /// The task this sends, to note when it was handed over.
    task_id: Option<String>,
}

/// What the I/O thread and the handles share (the outbox apart: see [`Link`]).
#[derive(Default)]
struct State {
    unconfirmed: HashMap<String, Unconfirmed>,
    tasks: Vec<TaskConsumer>,
    /// Round robin over `tasks`.
    next_task: usize,
    /// By identifier: the consumer's tag and deliveries.
    rpcs: HashMap<String, (String, mpsc::UnboundedSender<Delivery>)>,
    broadcasts: Vec<(String, mpsc::UnboundedSender<Delivery>)>,
    /// Presence watchers (on kiwimq's broker only).
    presence: Vec<(String, mpsc::UnboundedSender<Delivery>)>,
    replies: [Option<DeliverFn>; 2],
    connected: bool,
    /// Subscriptions waiting to be known to the broker: the id of the barrier RPC sent after
    /// them (see [`ZmqTransport::consume`]).
    barriers: HashMap<String, oneshot::Sender<()>>,
    /// When the connection was lost, while it is.
    lost: Option<Instant>,
    closing: bool,
}

impl State {
    /// The connection is gone: notes since when, and lets go of the subscriptions waiting
    /// for their barrier (they are sent again on the reconnect). Whether it was connected.
    fn disconnect(&mut self) -> bool {
        let was = std::mem::replace(&mut self.connected, false);
        self.lost.get_or_insert_with(Instant::now);
        self.barriers.clear();
        was
    }

    /// The prefetch the connection declares: the sum of its task consumers' (unlimited if
    /// any is), as the broker keeps one limit per connection.
    fn task_prefetch(&self) -> Option<u32> {
        let mut total = 0u32;
        for consumer in &self.tasks {
            if consumer.prefetch == 0 {
                return None;
            }
            total = total.saturating_add(u32::from(consumer.prefetch));
        }
        Some(total)
    }
}

/// The handles' side of the I/O thread.
pub(crate) struct Link {
    state: Mutex<State>,
    /// Frames to send, in order. A lock of its own, taken after `state` or alone, so that
    /// settling a delivery (which sends) may happen while `state` is held — dropping a
    /// consumer's channel drops its deliveries, and their ackers requeue them.
    outbox: Mutex<VecDeque<Frame>>,
    /// Recent settles, to send again after a reconnect (taken alone, or after `state`).
    settled: Mutex<RecentSettles>,
    /// The tasks handed to this client and not settled, to tell a restarted kiwimq broker
    /// which of those it thinks this client holds really reached it (taken alone, after
    /// `state`, or after `settled`).
    held: Mutex<HashSet<String>>,
    /// Whether the broker is kiwimq's (its `broker.status` says so, read once at connect),
    /// which reads kiwimq's own message types: presence, and which tasks a client holds.
    kiwimq_broker: AtomicBool,
    waker: UnixStream,
    /// This client's id as a JSON string, the `sender` of what it sends.
    sender: Box<RawValue>,
    /// The RPC identifier this client subscribes so that the broker fans broadcasts out to
    /// it: AiiDA's broker sends them only to clients holding a task or RPC subscription.
    broadcast_identifier: String,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the I/O thread; a byte already waiting wakes it just as well.
    fn wake(&self) {
        let _ = (&self.waker).write(&[1]);
    }

    fn outbox(&self) -> MutexGuard<'_, VecDeque<Frame>> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settled(&self) -> MutexGuard<'_, RecentSettles> {
        self.settled.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_kiwimq_broker(&self) -> bool {
        self.kiwimq_broker.load(Ordering::Acquire)
    }

    fn held(&self) -> MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame (the caller wakes the thread).
    fn push(&self, bytes: Vec<u8>) {
        self.outbox().push_back(Frame {
            bytes: Arc::new(bytes),
            task_id: None,
        });
    }

    fn send(&self, frame: Vec<u8>) {
        self.push(frame);
        self.wake();
    }

    fn subscription(&self, kind: &'static str, identifier: &str, prefetch: Option<u32>) -> Vec<u8> {
        Outgoing::subscription(kind, &self.sender, identifier, prefetch).encode()
    }

    /// Every subscription this connection holds, as the frames that make them.
    fn subscriptions(&self, state: &State) -> Vec<Vec<u8>> {
        let prefetch = state.task_prefetch();
        let tasks = state
            .tasks
            .iter()
            .map(|c| self.subscription(kind::SUBSCRIBE_TASK, &c.tag, prefetch));
        let rpcs = state
            .rpcs
            .keys()
            .map(|identifier| self.subscription(kind::SUBSCRIBE_RPC, identifier, None));
        let broadcasts = (!state.broadcasts.is_empty())
            .then(|| self.subscription(kind::SUBSCRIBE_RPC, &self.broadcast_identifier, None));
        let presence = (!state.presence.is_empty())
            .then(|| self.subscription(kind::WATCH_PRESENCE, &self.broadcast_identifier, None));
        tasks
            .chain(rpcs)
            .chain(broadcasts)
            .chain(presence)
            .collect()
    }
}

/// The settles sent lately, oldest first (at most `SETTLES_KEPT`, none older than
/// `SETTLE_MEMORY`), and how many of them each task has.
#[derive(Default)]
struct RecentSettles {
    order: VecDeque<RecentSettle>,
    of_task: HashMap<String, u32>,
}

impl RecentSettles {
    fn push(&mut self, recent: RecentSettle) {
        let now = recent.at;
        while self.order.front().is_some_and(|oldest| {
            now.duration_since(oldest.at) > SETTLE_MEMORY || self.order.len() >= SETTLES_KEPT
        }) {
            if let Some(oldest) = self.order.pop_front() {
                self.forget(&oldest.task_id);
            }
        }
        *self.of_task.entry(recent.task_id.clone()).or_default() += 1;
        self.order.push_back(recent);
    }

    fn forget(&mut self, task_id: &str) {
        if let Some(count) = self.of_task.get_mut(task_id) {
            *count -= 1;
            if *count == 0 {
                self.of_task.remove(task_id);
            }
        }
    }

    /// Forgets the settles of `task_id` (delivered again: they are of an earlier delivery).
    fn forget_task(&mut self, task_id: &str) {
        if self.of_task.remove(task_id).is_some() {
            self.order.retain(|recent| recent.task_id != task_id);
        }
    }

    fn since(&self, since: Option<Instant>) -> impl Iterator<Item = &RecentSettle> {
        self.order
            .iter()
            .filter(move |recent| since.is_some_and(|since| recent.at >= since))
    }
}

/// A settle sent lately, to send again after a reconnect: of one delivery of a task.
struct RecentSettle {
    at: Instant,
    /// The task it settles: a new delivery of it makes this settle one not to send again.
    task_id: String,
    frame: Arc<Vec<u8>>,
}

/// Acks or requeues one delivery of a task with the broker.
struct TaskSettle {
    link: Arc<Link>,
    task_id: String,
    delivery: Option<u64>,
}

impl Settle for TaskSettle {
    fn settle(self: Box<Self>, outcome: Outcome) {
        let kind = match outcome {
            Outcome::Ack => kind::TASK_ACK,
            Outcome::Requeue => kind::TASK_NACK,
            Outcome::Discard => {
                // The protocol has no dead-letter place: an unusable task is acked so it does
                // not come back for ever, and said so.
                tracing::error!(task_id = %self.task_id, "an undecodable task was dropped");
                kind::TASK_ACK
            }
        };
        let frame = Outgoing {
            task_id: Some(&self.task_id),
            delivery: self.delivery,
            ..Outgoing::new(kind, &self.link.sender)
        }
        .encode();
        let frame = Arc::new(frame);
        {
            let mut settled = self.link.settled();
            let now = Instant::now();
            // No longer held, under the lock of the settles: a reconnect sees this task
            // either held or settled, never neither (it would tell a restarted broker it
            // does not hold a task whose settle it has not sent again: the task would run
            // twice).
            self.link.held().remove(&self.task_id);
            settled.push(RecentSettle {
                at: now,
                task_id: self.task_id,
                frame: frame.clone(),
            });
        }
        self.link.outbox().push_back(Frame {
            bytes: frame,
            task_id: None,
        });
        self.link.wake();
    }
}

/// One communicator's connection to a ZeroMQ broker.
pub(crate) struct ZmqTransport {
    link: Arc<Link>,
    /// The one task queue the protocol has, by the name the communicator gives it.
    task_queue: String,
    send_timeout: Duration,
    max_message_size: usize,
    node: String,
    /// The broker's service directory, whose `broker.status` gives the task queue's counts;
    /// none for `zmq+ipc://`.
    service_dir: Option<PathBuf>,
    events: broadcast::Sender<ConnectionEvent>,
    /// `true` once the I/O thread has ended.
    ended: watch::Receiver<bool>,
}

impl ZmqTransport {
    /// Finds the broker (waiting for a service directory's `broker.sockets`, as AiiDA's
    /// clients do) and connects within the connect timeout.
    pub(crate) async fn connect(settings: &Settings) -> Result<Self> {
        if settings.codec != crate::Codec::Json {
            return Err(Error::config(format!(
                "a ZeroMQ broker carries JSON: zmq:// needs Codec::Json (got {})",
                settings.codec.name()
            )));
        }
        let endpoint = Endpoint::parse(&settings.uri)?;
        let service_dir = match &endpoint {
            Endpoint::ServiceDir(dir) => Some(dir.clone()),
            // kiwimq's broker marks its socket's directory with its service directory.
            Endpoint::Fixed(endpoint) => {
                service_dir_of_socket(Path::new(endpoint.trim_start_matches("ipc://")))
            }
        };
        let deadline = Instant::now() + settings.connect_timeout;
        let first = loop {
            if let Some(current) = endpoint.current() {
                break current;
            }
            if Instant::now() >= deadline {
                return Err(Error::connection(format!(
                    "no ZeroMQ broker in {}: broker.sockets did not appear within {:?} \
                     (is the AiiDA daemon, `verdi daemon broker` or `kiwimq broker` running?)",
                    settings.uri, settings.connect_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let client_id = format!("kiwimq-{}", &protocol::new_id()[..12]);
        let (waker, wakee) = UnixStream::pair()
            .and_then(|(a, b)| {
                a.set_nonblocking(true)?;
                b.set_nonblocking(true)?;
                Ok((a, b))
            })
            .map_err(|e| Error::connection(format!("cannot make the I/O thread's waker: {e}")))?;
        let link = Arc::new(Link {
            state: Mutex::default(),
            outbox: Mutex::default(),
            settled: Mutex::default(),
            held: Mutex::default(),
            kiwimq_broker: AtomicBool::new(false),
            waker,
            sender: protocol::json_string(&client_id),
            broadcast_identifier: format!("{client_id}.broadcasts"),
        });
        let events = events::channel();
        let (connected_tx, connected_rx) = oneshot::channel();
        let (ended_tx, ended) = watch::channel(false);
        let io = Io::open(
            &client_id,
            &first,
            endpoint,
            link.clone(),
            events.clone(),
            wakee,
        )?;
        std::thread::Builder::new()
            .name("kiwimq-zmq".into())
            .spawn(move || {
                io.run(connected_tx);
                let _ = ended_tx.send(true);
            })
            .map_err(|e| Error::connection(format!("cannot start the ZeroMQ I/O thread: {e}")))?;
        let transport = Self {
            link,
            task_queue: settings.task_queue.clone(),
            send_timeout: settings.send_timeout,
            max_message_size: settings.max_message_size,
            node: first.clone(),
            service_dir,
            events,
            ended,
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, connected_rx).await {
            Ok(Ok(())) => {
                // A broker that answers has written its status.
                let kiwimq_broker = transport
                    .service_dir
                    .as_deref()
                    .is_some_and(is_kiwimq_broker);
                transport
                    .link
                    .kiwimq_broker
                    .store(kiwimq_broker, Ordering::Release);
                Ok(transport)
            }
            _ => {
                transport.stop();
                Err(Error::connection(format!(
                    "no ZeroMQ broker answers at {first} (within {:?})",
                    settings.connect_timeout
                )))
            }
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.link.lock().closing {
            return Err(Error::closed());
        }
        Ok(())
    }

    fn check_queue(&self, queue: &str) -> Result<()> {
        if queue == self.task_queue {
            return Ok(());
        }
        Err(Error::refused(format!(
            "a ZeroMQ broker has one task queue ('{}' here): there is no queue '{queue}'",
            self.task_queue
        )))
    }

    /// Tells the I/O thread to finish.
    fn stop(&self) {
        self.link.lock().closing = true;
        self.link.wake();
    }

    fn publish_task(
        &self,
        message: crate::transport::Outgoing,
    ) -> Result<BoxFuture<'static, Result<()>>> {
        let TaskEnvelope(body, _no_reply) = TaskEnvelope::parse(&message.body)?;
        let id = message
            .correlation_id
            .clone()
            .unwrap_or_else(protocol::new_id);
        let wants_result = message.reply_to.is_some();
        // Always `no_reply: false`: it is what makes the broker confirm the task is stored.
        let frame = Arc::new(
            Outgoing {
                id: id.clone(),
                body: Some(body),
                no_reply: Some(false),
                results: wants_result.then_some(true),
                ..Outgoing::new(kind::TASK, &self.link.sender)
            }
            .encode(),
        );
        let (done, confirmed) = oneshot::channel();
        {
            let mut state = self.link.lock();
            state.unconfirmed.insert(
                id.clone(),
                Unconfirmed {
                    frame: frame.clone(),
                    handed: None,
                    wants_result,
                    correlation_id: message.correlation_id,
                    done,
                },
            );
            self.link.outbox().push_back(Frame {
                bytes: frame,
                task_id: Some(id.clone()),
            });
        }
        self.link.wake();
        let link = self.link.clone();
        let timeout = self.send_timeout;
        Ok(async move {
            match tokio::time::timeout(timeout, confirmed).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(Error::closed()),
                Err(_) => {
                    link.lock().unconfirmed.remove(&id);
                    Err(Error::timeout(format!(
                        "the ZeroMQ broker's confirm of task {id} (within {timeout:?})"
                    )))
                }
            }
        }
        .boxed())
    }

    fn reply(&self, reply_to: &str, message: &crate::transport::Outgoing) -> Result<()> {
        let kind = match reply_to {
            TASK_REPLY_TO => kind::TASK_RESPONSE,
            RPC_REPLY_TO => kind::RPC_RESPONSE,
            other => {
                return Err(Error::refused(format!(
                    "no reply address '{other}' on a ZeroMQ broker"
                )));
            }
        };
        let Some(id) = message.correlation_id.as_deref() else {
            return Err(Error::refused("a reply without the id of its request"));
        };
        let (result, error) = match ReplyEnvelope::parse(&message.body)? {
            Answer::Pending => return Ok(()),
            Answer::Result(result) => (Some(result), None),
            Answer::Error(text) => (None, Some(text)),
        };
        let mut response = Outgoing {
            result: Some(result.unwrap_or_else(|| protocol::null())),
            error: Some(error.as_deref()),
            ..Outgoing::new(kind, &self.link.sender)
        };
        if kind == kind::TASK_RESPONSE {
            response.task_id = Some(id);
        } else {
            response.rpc_id = Some(id);
        }
        self.link.send(response.encode());
        Ok(())
    }
}

impl Drop for ZmqTransport {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The task queue's counts in a service directory's `broker.status` (AiiDA's format: its
/// `pending_tasks`, `processing_tasks` and `task_subscribers`), at most 5 s old.
fn status_counts(dir: &Path) -> Result<QueueStats> {
    let status = ServiceStatus::read(dir)?;
    let count = |value: Option<u64>, field: &str| {
        value
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            .ok_or_else(|| {
                Error::codec(format!(
                    "{}: no count '{field}'",
                    dir.join("broker.status").display()
                ))
            })
    };
    Ok(QueueStats {
        ready: count(status.pending_tasks, "pending_tasks")?,
        unacknowledged: Some(count(status.processing_tasks, "processing_tasks")?),
        consumers: count(status.task_subscribers, "task_subscribers")?,
    })
}

fn refused_here(what: &str) -> Error {
    Error::refused(format!(
        "{what}: AiiDA's ZeroMQ broker protocol has no such request"
    ))
}

impl Transport for ZmqTransport {
    fn declare_task_queue(&self, queue: &str) -> BoxFuture<'static, Result<()>> {
        let result = self.check_open().and_then(|()| self.check_queue(queue));
        future::ready(result).boxed()
    }

    fn publish(
        &self,
        route: Route,
        message: crate::transport::Outgoing,
    ) -> BoxFuture<'static, Result<()>> {
        let sent = self
            .check_open()
            .and_then(|()| message.check_size(self.max_message_size));
        if let Err(error) = sent {
            return future::ready(Err(error)).boxed();
        }
        let result = match &route {
            Route::Task(queue) => match self.check_queue(queue) {
                Ok(()) => {
                    return self
                        .publish_task(message)
                        .unwrap_or_else(|e| future::ready(Err(e)).boxed());
                }
                Err(error) => Err(error),
            },
            Route::Rpc(identifier) => serde_json::from_slice::<&RawValue>(&message.body)
                .map_err(|e| Error::codec(format!("an RPC body that is not JSON: {e}")))
                .map(|body| {
                    let frame = Outgoing {
                        id: message
                            .correlation_id
                            .clone()
                            .unwrap_or_else(protocol::new_id),
                        recipient: Some(identifier),
                        body: Some(body),
                        ..Outgoing::new(kind::RPC, &self.link.sender)
                    }
                    .encode();
                    self.link.send(frame);
                }),
            Route::Broadcast => BroadcastEnvelope::parse(&message.body).map(|envelope| {
                let sender = if envelope.sender.get() == "null" {
                    &self.link.sender
                } else {
                    envelope.sender
                };
                let frame = Outgoing {
                    body: Some(envelope.body),
                    subject: Some(envelope.subject),
                    correlation_id: Some(envelope.correlation_id),
                    ..Outgoing::new(kind::BROADCAST, sender)
                }
                .encode();
                self.link.send(frame);
            }),
            Route::Reply(reply_to) => self.reply(reply_to, &message),
            Route::Presence if self.link.is_kiwimq_broker() => {
                serde_json::from_slice::<&RawValue>(&message.body)
                    .map_err(|e| Error::codec(format!("a presence that is not JSON: {e}")))
                    .map(|body| {
                        let frame = Outgoing {
                            body: Some(body),
                            ..Outgoing::new(kind::PRESENCE, &self.link.sender)
                        }
                        .encode();
                        self.link.send(frame);
                    })
            }
            Route::Presence => Err(presence_refused()),
        };
        future::ready(result).boxed()
    }

    fn consume(&self, source: Source, prefetch: u16) -> BoxFuture<'static, Result<Consumer>> {
        let result = self.check_open().and_then(|()| {
            let (deliveries, stream) = mpsc::unbounded();
            let mut state = self.link.lock();
            let tag = match source {
                Source::Tasks(queue) => {
                    self.check_queue(&queue)?;
                    let tag = format!("task-{}", &protocol::new_id()[..12]);
                    state.tasks.push(TaskConsumer {
                        tag: tag.clone(),
                        prefetch,
                        deliveries,
                    });
                    // The latest declaration is the connection's limit: all say the total.
                    let frames = state
                        .tasks
                        .iter()
                        .map(|c| c.tag.clone())
                        .collect::<Vec<_>>();
                    let total = state.task_prefetch();
                    for tag in frames {
                        let frame = self.link.subscription(kind::SUBSCRIBE_TASK, &tag, total);
                        self.link.push(frame);
                    }
                    tag
                }
                Source::Rpc(identifier) => {
                    if state.rpcs.contains_key(&identifier) {
                        return Err(Error::new(ErrorKind::DuplicateSubscriber(identifier)));
                    }
                    let tag = format!("rpc-{}", &protocol::new_id()[..12]);
                    let frame = self
                        .link
                        .subscription(kind::SUBSCRIBE_RPC, &identifier, None);
                    self.link.push(frame);
                    state.rpcs.insert(identifier, (tag.clone(), deliveries));
                    tag
                }
                Source::Broadcasts(_) => {
                    let tag = format!("broadcast-{}", &protocol::new_id()[..12]);
                    if state.broadcasts.is_empty() {
                        let frame = self.link.subscription(
                            kind::SUBSCRIBE_RPC,
                            &self.link.broadcast_identifier,
                            None,
                        );
                        self.link.push(frame);
                    }
                    state.broadcasts.push((tag.clone(), deliveries));
                    tag
                }
                Source::Replies(..) => {
                    return Err(Error::refused("replies are consumed with consume_replies"));
                }
                Source::Presence(_) if self.link.is_kiwimq_broker() => {
                    let tag = format!("presence-{}", &protocol::new_id()[..12]);
                    if state.presence.is_empty() {
                        let frame = self.link.subscription(
                            kind::WATCH_PRESENCE,
                            &self.link.broadcast_identifier,
                            None,
                        );
                        self.link.push(frame);
                    }
                    state.presence.push((tag.clone(), deliveries));
                    tag
                }
                Source::Presence(_) => return Err(presence_refused()),
            };
            // The protocol does not answer a subscription. A broker handles one client's
            // messages in order, so the answer to an RPC sent right after it ("Recipient not
            // found", for an identifier no one holds) says that the subscription is in place:
            // a message sent once this returns finds the new subscriber.
            // Not connected: the subscription is sent on the (re)connect; nothing to wait for.
            let barrier = protocol::new_id();
            let (done, known) = oneshot::channel();
            if state.connected {
                state.barriers.insert(barrier.clone(), done);
                let recipient = format!("kiwimq-barrier-{barrier}");
                let frame = Outgoing {
                    id: barrier.clone(),
                    recipient: Some(&recipient),
                    body: Some(protocol::null()),
                    ..Outgoing::new(kind::RPC, &self.link.sender)
                }
                .encode();
                self.link.push(frame);
            }
            drop(state);
            self.link.wake();
            Ok((
                Consumer {
                    tag,
                    deliveries: stream.boxed(),
                },
                barrier,
                known,
            ))
        });
        let link = self.link.clone();
        let within = self.send_timeout;
        async move {
            let (consumer, barrier, known) = result?;
            // Lost meanwhile, or not connected (the barrier is dropped: `known` ends at once),
            // or no answer within the send timeout: the subscription stands and is sent again
            // on the reconnect.
            if tokio::time::timeout(within, known).await.is_err() {
                link.lock().barriers.remove(&barrier);
                tracing::debug!("a subscription not yet acknowledged by the broker; it stands");
            }
            Ok(consumer)
        }
        .boxed()
    }

    fn consume_replies(
        &self,
        exchange: Exchange,
        _queue: String,
        deliver: DeliverFn,
    ) -> BoxFuture<'static, Result<BoxFuture<'static, ()>>> {
        let slot = match exchange {
            Exchange::Tasks => 0,
            Exchange::Messages => 1,
        };
        self.link.lock().replies[slot] = Some(deliver);
        let mut ended = self.ended.clone();
        let reader = async move {
            let _ = ended.wait_for(|ended| *ended).await;
        };
        future::ready(Ok(reader.boxed())).boxed()
    }

    fn cancel(&self, tag: &str) -> BoxFuture<'static, Result<()>> {
        let mut state = self.link.lock();
        if let Some(at) = state.tasks.iter().position(|c| c.tag == tag) {
            state.tasks.remove(at);
            let frame = self.link.subscription(kind::UNSUBSCRIBE_TASK, tag, None);
            self.link.push(frame);
            // The limit the others declare shrinks with it.
            let total = state.task_prefetch();
            if let Some(other) = state.tasks.first().map(|c| c.tag.clone()) {
                let frame = self.link.subscription(kind::SUBSCRIBE_TASK, &other, total);
                self.link.push(frame);
            }
        } else if let Some(identifier) = state
            .rpcs
            .iter()
            .find(|(_, (t, _))| t == tag)
            .map(|(identifier, _)| identifier.clone())
        {
            state.rpcs.remove(&identifier);
            let frame = self
                .link
                .subscription(kind::UNSUBSCRIBE_RPC, &identifier, None);
            self.link.push(frame);
        } else if let Some(at) = state.broadcasts.iter().position(|(t, _)| t == tag) {
            state.broadcasts.remove(at);
            if state.broadcasts.is_empty() {
                let frame = self.link.subscription(
                    kind::UNSUBSCRIBE_RPC,
                    &self.link.broadcast_identifier,
                    None,
                );
                self.link.push(frame);
            }
        } else if let Some(at) = state.presence.iter().position(|(t, _)| t == tag) {
            state.presence.remove(at);
            if state.presence.is_empty() {
                let frame = self.link.subscription(
                    kind::UNWATCH_PRESENCE,
                    &self.link.broadcast_identifier,
                    None,
                );
                self.link.push(frame);
            }
        }
        drop(state);
        self.link.wake();
        future::ready(Ok(())).boxed()
    }

    /// The protocol has no such request; both AiiDA's broker and kiwimq's write the counts
    /// to `broker.status` every 5 s, which a `zmq:///SERVICE_DIR` communicator reads.
    fn carries_presence(&self) -> bool {
        self.link.is_kiwimq_broker()
    }

    fn queue_stats(&self, queue: &str) -> BoxFuture<'static, Result<QueueStats>> {
        let result = self.check_open().and_then(|()| self.check_queue(queue));
        let result = result.and_then(|()| match &self.service_dir {
            Some(dir) => status_counts(dir),
            None => Err(refused_here(
                "a task queue's counts (zmq:///SERVICE_DIR reads them from broker.status)",
            )),
        });
        future::ready(result).boxed()
    }

    fn purge(&self, _queue: &str) -> BoxFuture<'static, Result<u32>> {
        future::ready(Err(refused_here("purging the task queue"))).boxed()
    }

    fn get(&self, _queue: &str) -> BoxFuture<'static, Result<Option<Delivery>>> {
        future::ready(Err(refused_here(
            "taking one task (pull mode; subscribe instead)",
        )))
        .boxed()
    }

    fn close(&self) -> BoxFuture<'static, Result<()>> {
        {
            let mut state = self.link.lock();
            if !state.closing {
                let frames = state
                    .tasks
                    .iter()
                    .map(|c| self.link.subscription(kind::UNSUBSCRIBE_TASK, &c.tag, None))
                    .chain(
                        state
                            .rpcs
                            .keys()
                            .map(|i| self.link.subscription(kind::UNSUBSCRIBE_RPC, i, None)),
                    )
                    .chain((!state.broadcasts.is_empty()).then(|| {
                        self.link.subscription(
                            kind::UNSUBSCRIBE_RPC,
                            &self.link.broadcast_identifier,
                            None,
                        )
                    }))
                    .chain((!state.presence.is_empty()).then(|| {
                        self.link.subscription(
                            kind::UNWATCH_PRESENCE,
                            &self.link.broadcast_identifier,
                            None,
                        )
                    }))
                    .collect::<Vec<_>>();
                for frame in frames {
                    self.link.push(frame);
                }
                state.tasks.clear();
                state.rpcs.clear();
                state.broadcasts.clear();
                state.presence.clear();
                state.closing = true;
            }
        }
        self.link.wake();
        let mut ended = self.ended.clone();
        let events = self.events.clone();
        async move {
            let _ = ended.wait_for(|ended| *ended).await;
            let _ = events.send(ConnectionEvent::Closed);
            Ok(())
        }
        .boxed()
    }

    fn events(&self) -> broadcast::Sender<ConnectionEvent> {
        self.events.clone()
    }

    fn is_connected(&self) -> bool {
        let state = self.link.lock();
        state.connected && !state.closing
    }

    fn node(&self) -> Option<String> {
        Some(self.node.clone())
    }

    fn recover(&self) -> BoxFuture<'static, ()> {
        // The I/O thread recovers by itself (libzmq reconnects; the thread subscribes
        // again and follows a moved socket): the root has only to wait for the end.
        let mut ended = self.ended.clone();
        async move {
            let _ = ended.wait_for(|ended| *ended).await;
        }
        .boxed()
    }
}

/// The I/O thread's own: the sockets (which never leave it) and where it is connected.
struct Io {
    _context: zmq::Context,
    dealer: zmq::Socket,
    monitor: zmq::Socket,
    wakee: UnixStream,
    endpoint: Endpoint,
    current: String,
    link: Arc<Link>,
    events: broadcast::Sender<ConnectionEvent>,
    /// Whether a connection was ever made (the first is the connect's; later ones are
    /// recoveries).
    ever_connected: bool,
}

fn zmq_error(what: &str, error: zmq::Error) -> Error {
    Error::connection(format!("ZeroMQ: {what}: {error}"))
}

impl Io {
    fn open(
        client_id: &str,
        first: &str,
        endpoint: Endpoint,
        link: Arc<Link>,
        events: broadcast::Sender<ConnectionEvent>,
        wakee: UnixStream,
    ) -> Result<Self> {
        let context = zmq::Context::new();
        let dealer = context
            .socket(zmq::DEALER)
            .map_err(|e| zmq_error("a DEALER socket", e))?;
        let options = || -> std::result::Result<(), zmq::Error> {
            dealer.set_identity(client_id.as_bytes())?;
            dealer.set_linger(0)?;
            dealer.set_reconnect_ivl(100)?;
            dealer.set_reconnect_ivl_max(1000)?;
            // As AiiDA's broker does on its side: a broker that stops answering (stopped,
            // or its machine gone) is noticed within 6 s.
            dealer.set_heartbeat_ivl(2000)?;
            dealer.set_heartbeat_timeout(6000)?;
            Ok(())
        };
        options().map_err(|e| zmq_error("socket options", e))?;
        let monitor_endpoint = format!("inproc://monitor-{client_id}");
        let watched = zmq::SocketEvent::CONNECTED as i32 | zmq::SocketEvent::DISCONNECTED as i32;
        dealer
            .monitor(&monitor_endpoint, watched)
            .map_err(|e| zmq_error("a socket monitor", e))?;
        let monitor = context
            .socket(zmq::PAIR)
            .map_err(|e| zmq_error("a PAIR socket", e))?;
        monitor
            .connect(&monitor_endpoint)
            .map_err(|e| zmq_error("the socket monitor", e))?;
        dealer
            .connect(first)
            .map_err(|e| zmq_error(&format!("connecting to {first}"), e))?;
        Ok(Self {
            _context: context,
            dealer,
            monitor,
            wakee,
            endpoint,
            current: first.to_owned(),
            link,
            events,
            ever_connected: false,
        })
    }

    fn run(mut self, connected: oneshot::Sender<()>) {
        let mut connected = Some(connected);
        let mut closing_since: Option<Instant> = None;
        let mut last_look = Instant::now();
        loop {
            let closing = self.link.lock().closing;
            let want_out = !self.link.outbox().is_empty();
            if closing {
                let since = *closing_since.get_or_insert_with(Instant::now);
                // Leave once the unsubscriptions are out, or the broker is not there to take
                // them, or it took too long.
                if !want_out || !self.link.lock().connected || since.elapsed() > CLOSE_FLUSH {
                    break;
                }
            }
            let dealer_events = if want_out {
                zmq::POLLIN | zmq::POLLOUT
            } else {
                zmq::POLLIN
            };
            let mut items = [
                self.dealer.as_poll_item(dealer_events),
                self.monitor.as_poll_item(zmq::POLLIN),
                zmq::PollItem::from_fd(self.wakee.as_raw_fd(), zmq::POLLIN),
            ];
            if let Err(error) = zmq::poll(&mut items, TICK.as_millis() as i64) {
                if error == zmq::Error::EINTR {
                    continue;
                }
                tracing::error!(%error, "ZeroMQ poll failed; the client stops");
                break;
            }
            let (readable, monitored, woken) = (
                items[0].is_readable(),
                items[1].is_readable(),
                items[2].is_readable(),
            );
            if woken {
                let mut sink = [0u8; 64];
                while matches!((&self.wakee).read(&mut sink), Ok(n) if n > 0) {}
            }
            // Messages first: what the last connection brought is handled before a reconnect
            // tells the broker which tasks this client holds.
            if readable {
                self.read_messages();
            }
            if monitored {
                self.read_monitor(&mut connected);
            }
            self.write_outbox();
            if last_look.elapsed() >= TICK {
                last_look = Instant::now();
                self.follow_socket();
            }
        }
        let mut state = self.link.lock();
        state.connected = false;
        // Whoever still waits for a confirm learns the connection is gone.
        for (_, unconfirmed) in state.unconfirmed.drain() {
            let _ = unconfirmed.done.send(Err(Error::closed()));
        }
        state.tasks.clear();
        state.rpcs.clear();
        state.broadcasts.clear();
        state.presence.clear();
        state.replies = [None, None];
    }

    /// With a service directory: when `broker.sockets` names another socket (the broker
    /// restarted elsewhere), moves there.
    fn follow_socket(&mut self) {
        let Endpoint::ServiceDir(_) = &self.endpoint else {
            return;
        };
        let Some(now) = self.endpoint.current() else {
            return;
        };
        if now == self.current {
            return;
        }
        tracing::warn!(from = %self.current, to = %now, "the ZeroMQ broker moved; following it");
        let _ = self.dealer.disconnect(&self.current);
        if let Err(error) = self.dealer.connect(&now) {
            tracing::error!(%error, endpoint = %now, "cannot connect to the moved broker");
            return;
        }
        self.current = now;
        // What the old connection held is gone with it: all of it goes again.
        let mut state = self.link.lock();
        let lost = *state.lost.get_or_insert_with(Instant::now);
        for unconfirmed in state.unconfirmed.values_mut() {
            unconfirmed.handed.get_or_insert(lost);
        }
        if state.disconnect() {
            let _ = self
                .events
                .send(ConnectionEvent::Lost("the ZeroMQ broker moved".into()));
        }
    }

    fn read_monitor(&mut self, connected: &mut Option<oneshot::Sender<()>>) {
        while let Ok(frames) = self.monitor.recv_multipart(zmq::DONTWAIT) {
            let Some(event) = frames
                .first()
                .filter(|f| f.len() >= 2)
                .map(|f| zmq::SocketEvent::from_raw(u16::from_le_bytes([f[0], f[1]])))
            else {
                continue;
            };
            match event {
                zmq::SocketEvent::CONNECTED => self.on_connected(connected),
                zmq::SocketEvent::DISCONNECTED => {
                    let mut state = self.link.lock();
                    if state.disconnect() {
                        drop(state);
                        tracing::warn!(endpoint = %self.current, "lost the ZeroMQ broker");
                        let _ = self
                            .events
                            .send(ConnectionEvent::Lost("the ZeroMQ broker went away".into()));
                    }
                }
                _ => {}
            }
        }
    }

    fn on_connected(&mut self, connected: &mut Option<oneshot::Sender<()>>) {
        let mut state = self.link.lock();
        state.connected = true;
        let lost = state.lost.take();
        if self.ever_connected {
            // A broker that restarted knows nothing of this client: subscribe again, and
            // send again each task that the lost connection took without a confirm.
            let mut again: Vec<Frame> = self
                .link
                .subscriptions(&state)
                .into_iter()
                .map(|bytes| Frame {
                    bytes: Arc::new(bytes),
                    task_id: None,
                })
                .collect();
            // Settles the broker may not have written down before it went; one it did write
            // is refused harmlessly.
            let since = lost.map(|at| at.checked_sub(SETTLE_MEMORY).unwrap_or(at));
            // The settles and the holdings read under one lock (the settles'), as a settle
            // changes both under it.
            let settled = self.link.settled();
            again.extend(settled.since(since).map(|recent| Frame {
                bytes: recent.frame.clone(),
                task_id: None,
            }));
            // Which tasks reached this client: kiwimq's broker requeues those it took back
            // as this client's that did not (a hand-over cut short by its stop).
            if self.link.is_kiwimq_broker() {
                let held = self.link.held();
                let holding = Outgoing {
                    task_ids: Some(held.iter().map(String::as_str).collect()),
                    ..Outgoing::new(kind::HOLDING, &self.link.sender)
                }
                .encode();
                drop(held);
                again.push(Frame {
                    bytes: Arc::new(holding),
                    task_id: None,
                });
            }
            drop(settled);
            if let Some(lost) = lost {
                for (id, unconfirmed) in state.unconfirmed.iter_mut() {
                    if unconfirmed.handed.is_some_and(|handed| handed <= lost) {
                        unconfirmed.handed = None;
                        again.push(Frame {
                            bytes: unconfirmed.frame.clone(),
                            task_id: Some(id.clone()),
                        });
                    }
                }
            }
            let mut outbox = self.link.outbox();
            for frame in again.into_iter().rev() {
                outbox.push_front(frame);
            }
            drop(outbox);
            drop(state);
            tracing::info!(endpoint = %self.current, "connected to the ZeroMQ broker again");
            let _ = self.events.send(ConnectionEvent::Connected {
                node: self.current.clone(),
            });
            let down = lost.map(|at| at.elapsed()).unwrap_or_default();
            let _ = self.events.send(ConnectionEvent::Restored(down));
        } else {
            drop(state);
            self.ever_connected = true;
            if let Some(connected) = connected.take() {
                let _ = connected.send(());
            }
        }
    }

    fn write_outbox(&mut self) {
        let mut handed = Vec::new();
        {
            let mut outbox = self.link.outbox();
            while let Some(frame) = outbox.front() {
                match self
                    .dealer
                    .send_multipart([&b""[..], frame.bytes.as_slice()], zmq::DONTWAIT)
                {
                    Ok(()) => {
                        let frame = outbox.pop_front().expect("the front was there");
                        handed.extend(frame.task_id);
                    }
                    Err(zmq::Error::EAGAIN) => break,
                    Err(error) => {
                        tracing::error!(%error, "a message could not be sent to the ZeroMQ broker");
                        outbox.pop_front();
                    }
                }
            }
        }
        if handed.is_empty() {
            return;
        }
        // Tasks handed over: note when, to send them again if this connection is lost
        // before their confirm.
        let now = Instant::now();
        let mut state = self.link.lock();
        for id in handed {
            if let Some(unconfirmed) = state.unconfirmed.get_mut(&id) {
                unconfirmed.handed = Some(now);
            }
        }
    }

    fn read_messages(&mut self) {
        loop {
            let frames = match self.dealer.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return,
                Err(error) => {
                    tracing::error!(%error, "reading from the ZeroMQ broker failed");
                    return;
                }
            };
            // `["", json]`, or `[json]` without the delimiter.
            let Some(payload) = frames.iter().rev().find(|f| !f.is_empty()) else {
                continue;
            };
            match Incoming::parse(payload) {
                Ok(message) => self.dispatch(message),
                Err(error) => {
                    tracing::warn!(%error, "an unreadable message from the broker was dropped")
                }
            }
        }
    }

    fn dispatch(&mut self, message: Incoming<'_>) {
        match message.kind.as_deref() {
            Some(kind::TASK) => self.on_task(message),
            Some(kind::TASK_RESPONSE) => self.on_task_response(message),
            Some(kind::RPC) => self.on_rpc(message),
            Some(kind::RPC_RESPONSE) => {
                let Some(rpc_id) = message.rpc_id else {
                    return tracing::warn!("an rpc_response without rpc_id was dropped");
                };
                if let Some(barrier) = self.link.lock().barriers.remove(rpc_id.as_str()) {
                    let _ = barrier.send(());
                    return;
                }
                let body = ReplyEnvelope::encode(message.result, message.error.as_deref());
                self.deliver_reply(1, rpc_id, body);
            }
            Some(kind::BROADCAST) => {
                let envelope = BroadcastEnvelope {
                    body: message.body.unwrap_or_else(|| protocol::null()),
                    sender: message.sender.unwrap_or_else(|| protocol::null()),
                    subject: message.subject.unwrap_or_else(|| protocol::null()),
                    correlation_id: message.correlation_id.unwrap_or_else(|| protocol::null()),
                };
                let body = bytes::Bytes::from(envelope.encode());
                let mut state = self.link.lock();
                state.broadcasts.retain(|(_, deliveries)| {
                    deliveries
                        .unbounded_send(plain_delivery(body.clone(), None, None))
                        .is_ok()
                });
            }
            Some(kind::PRESENCE) => {
                let body = message.body.unwrap_or_else(|| protocol::null());
                let body = bytes::Bytes::copy_from_slice(body.get().as_bytes());
                let mut state = self.link.lock();
                state.presence.retain(|(_, deliveries)| {
                    deliveries
                        .unbounded_send(plain_delivery(body.clone(), None, None))
                        .is_ok()
                });
            }
            Some(kind::PING) => {}
            other => {
                tracing::warn!(kind = ?other, "a message of unknown type from the broker was dropped")
            }
        }
    }

    fn on_task(&mut self, message: Incoming<'_>) {
        let Some(task_id) = message.id else {
            return tracing::warn!("a task without id was dropped (it cannot be acked)");
        };
        self.link.held().insert(task_id.clone());
        // A new delivery of a task settled lately: the old settle is not sent again after a
        // reconnect (on AiiDA's broker, which numbers no deliveries, it would settle this
        // one — requeue a task this client runs).
        self.link.settled().forget_task(&task_id);
        let no_reply = message.no_reply.unwrap_or(false);
        let body = TaskEnvelope::encode(message.body.unwrap_or_else(|| protocol::null()), no_reply);
        let mut delivery = Delivery {
            body: bytes::Bytes::from(body),
            correlation_id: Some(task_id.clone()),
            reply_to: (!no_reply).then(|| TASK_REPLY_TO.to_owned()),
            redelivered: false,
            delivery_count: 0,
            traceparent: None,
            acker: Acker::new(TaskSettle {
                link: self.link.clone(),
                task_id,
                delivery: message.delivery,
            }),
        };
        let mut state = self.link.lock();
        let count = state.tasks.len();
        for step in 0..count {
            let at = (state.next_task + step) % count;
            match state.tasks[at].deliveries.unbounded_send(delivery) {
                Ok(()) => {
                    state.next_task = at + 1;
                    return;
                }
                Err(refused) => delivery = refused.into_inner(),
            }
        }
        drop(state);
        // Nobody here takes tasks any more: dropped, its acker returns it to the broker for
        // another worker.
        tracing::debug!("a task arrived with no task consumer here; returned");
        drop(delivery);
    }

    fn on_task_response(&mut self, message: Incoming<'_>) {
        let Some(task_id) = message.task_id else {
            return tracing::warn!("a task_response without task_id was dropped");
        };
        let confirmed = self.link.lock().unconfirmed.remove(&task_id);
        match confirmed {
            Some(unconfirmed) => {
                let outcome = match message.error {
                    Some(error) => Err(Error::refused(format!(
                        "the broker refused the task: {error}"
                    ))),
                    None => Ok(()),
                };
                let refused = outcome.is_err();
                let _ = unconfirmed.done.send(outcome);
                if unconfirmed.wants_result && !refused && message.results != Some(true) {
                    let body = ReplyEnvelope::encode(None, Some(NO_RESULTS));
                    let correlation_id = unconfirmed.correlation_id.unwrap_or(task_id);
                    self.deliver_reply(0, correlation_id, body);
                }
            }
            // Not a confirm: a worker's result, which kiwimq's broker passes on.
            None => {
                let body = ReplyEnvelope::encode(message.result, message.error.as_deref());
                self.deliver_reply(0, task_id, body);
            }
        }
    }

    fn on_rpc(&mut self, message: Incoming<'_>) {
        let Some(rpc_id) = message.id.clone() else {
            return tracing::warn!("an rpc without id was dropped (it cannot be answered)");
        };
        let recipient = message.recipient().unwrap_or_default();
        let body = message
            .body
            .unwrap_or_else(|| protocol::null())
            .get()
            .as_bytes();
        let delivery = plain_delivery(
            bytes::Bytes::copy_from_slice(body),
            Some(rpc_id.clone()),
            Some(RPC_REPLY_TO.to_owned()),
        );
        let refused = {
            let state = self.link.lock();
            match state.rpcs.get(&recipient) {
                Some((_, deliveries)) => deliveries.unbounded_send(delivery).is_err(),
                None => true,
            }
        };
        if refused {
            // As AiiDA's clients answer a call for an identifier they do not serve.
            let error = format!("No handler for {recipient}");
            let frame = Outgoing {
                rpc_id: Some(&rpc_id),
                result: Some(protocol::null()),
                error: Some(Some(&error)),
                ..Outgoing::new(kind::RPC_RESPONSE, &self.link.sender)
            }
            .encode();
            self.link.send(frame);
        }
    }

    fn deliver_reply(&self, slot: usize, correlation_id: String, body: Vec<u8>) {
        let deliver = self.link.lock().replies[slot].clone();
        match deliver {
            Some(deliver) => deliver(plain_delivery(body.into(), Some(correlation_id), None)),
            None => tracing::debug!(%correlation_id, "a reply with nobody to take it"),
        }
    }
}

/// A delivery that needs no settling.
fn plain_delivery(
    body: bytes::Bytes,
    correlation_id: Option<String>,
    reply_to: Option<String>,
) -> Delivery {
    Delivery {
        body,
        correlation_id,
        reply_to,
        redelivered: false,
        delivery_count: 0,
        traceparent: None,
        acker: Acker::auto(),
    }
}

/// Presence has no channel of kiwimq's own in AiiDA's protocol: every broadcast reaches every
/// AiiDA client, so announcing there would not be invisible to them. kiwimq's broker carries
/// it in message types of its own.
fn presence_refused() -> Error {
    Error::refused(
        "presence needs a channel of kiwimq's own, which AiiDA's ZeroMQ broker lacks (a \
         broadcast there reaches every AiiDA client): only kiwimq's broker carries it, \
         reached as zmq:///SERVICE_DIR",
    )
}

/// Whether the broker of `dir` is kiwimq's: its `broker.status` says `"broker": "kiwimq"`
/// (AiiDA's has no such field). Written before the broker serves, so it is there once a
/// connection is.
fn is_kiwimq_broker(dir: &Path) -> bool {
    ServiceStatus::read(dir).is_ok_and(|status| status.is_kiwimq())
}
