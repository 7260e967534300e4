//! [`Settings`]: how to connect and the names and limits to use. The defaults reproduce
//! kiwiPy 0.9's exchanges, queues and arguments, so kiwimq and kiwiPy processes interoperate.

mod tls;

use std::path::PathBuf;
use std::time::Duration;

pub(crate) use tls::TlsOptions;

use crate::Codec;

/// The longest presence interval: watchers refuse an announcement of a longer one (a day,
/// as `Presence::MAX_INTERVAL_SECS` says; a test in `presence` holds the two together).
pub(crate) const LONGEST_PRESENCE_INTERVAL: Duration = Duration::from_secs(86_400);

/// Connection settings: `Settings::new(uri)`, then `with_*` methods, then
/// [`connect`](Settings::connect).
///
/// ```
/// # async fn example() -> kiwimq::Result<()> {
/// let comm = kiwimq::Settings::new("mem://")
///     .with_codec(kiwimq::Codec::Json)
///     .with_task_prefetch(10)
///     .connect()
///     .await?;
/// # comm.close().await
/// # }
/// ```
#[derive(Clone)]
pub struct Settings {
    pub(crate) uri: String,
    /// The broker's other nodes, tried after `uri`'s (see [`Settings::with_nodes`]).
    pub(crate) more_uris: Vec<String>,
    pub(crate) tls: TlsOptions,
    pub(crate) quorum_queues: bool,
    pub(crate) exclusive_rpc_identifiers: bool,
    pub(crate) codec: Codec,
    pub(crate) message_exchange: String,
    pub(crate) task_exchange: String,
    pub(crate) task_queue: String,
    pub(crate) task_prefetch: u16,
    /// How often the communicator announces its presence; none: never.
    pub(crate) presence_interval: Option<Duration>,
    pub(crate) testing_mode: bool,
    pub(crate) kiwipy_testing_queues: bool,
    pub(crate) consumer_timeout: Option<Duration>,
    pub(crate) queue_consumer_timeouts: Vec<(String, Duration)>,
    pub(crate) task_message_ttl: Duration,
    pub(crate) message_ttl: Duration,
    pub(crate) queue_expires: Duration,
    pub(crate) testing_queue_expires: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) send_timeout: Duration,
    pub(crate) reconnect_delay: (Duration, Duration),
    pub(crate) shutdown_grace: Duration,
    pub(crate) delivery_limit: Option<u32>,
    pub(crate) rpc_timeout: Option<Duration>,
    pub(crate) max_message_size: usize,
    pub(crate) blocking_threads: usize,
    pub(crate) handler_threads: usize,
    pub(crate) message_prefetch: u16,
    pub(crate) max_in_flight: usize,
}

/// RabbitMQ's default `max_message_size` (128 MiB), kiwimq's default limit on both backends.
pub(crate) const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;

impl Settings {
    /// Settings for the broker at `uri`: `mem://`, `mem://NAME`, `amqp://…`, or (feature
    /// `zeromq`) `zmq:///SERVICE_DIR` / `zmq+ipc:///PATH` — whose codec is JSON.
    pub fn new(uri: impl Into<String>) -> Self {
        let uri = uri.into();
        // A ZeroMQ broker carries JSON; everywhere else MessagePack is the default.
        let codec = if uri.starts_with("zmq") {
            Codec::Json
        } else {
            Codec::default()
        };
        Self {
            uri,
            more_uris: Vec::new(),
            tls: TlsOptions::default(),
            quorum_queues: false,
            exclusive_rpc_identifiers: false,
            codec,
            message_exchange: "kiwipy.messages".into(),
            task_exchange: "kiwipy.tasks".into(),
            task_queue: "kiwipy.tasks".into(),
            task_prefetch: 1,
            presence_interval: Some(Duration::from_secs(5)),
            testing_mode: false,
            kiwipy_testing_queues: false,
            consumer_timeout: None,
            queue_consumer_timeouts: Vec::new(),
            task_message_ttl: Duration::from_secs(7 * 24 * 3600),
            message_ttl: Duration::from_millis(66_000),
            queue_expires: Duration::from_millis(60_000),
            testing_queue_expires: Duration::from_millis(10_000),
            connect_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            reconnect_delay: (Duration::from_millis(100), Duration::from_secs(5)),
            shutdown_grace: Duration::from_secs(10),
            delivery_limit: None,
            rpc_timeout: Some(Duration::from_secs(300)),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            blocking_threads: 16,
            handler_threads: 16,
            message_prefetch: 256,
            max_in_flight: 64,
        }
    }

    /// The same settings for another broker: `mem://`, `mem://NAME` or `amqp://…`.
    #[must_use]
    pub fn with_uri(mut self, uri: impl Into<String>) -> Self {
        self.uri = uri.into();
        self
    }

    /// The codec of bodies and envelopes (default MessagePack).
    #[must_use]
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The exchange of RPC and broadcasts (default `kiwipy.messages`).
    #[must_use]
    pub fn with_message_exchange(mut self, name: impl Into<String>) -> Self {
        self.message_exchange = name.into();
        self
    }

    /// The exchange of tasks (default `kiwipy.tasks`).
    #[must_use]
    pub fn with_task_exchange(mut self, name: impl Into<String>) -> Self {
        self.task_exchange = name.into();
        self
    }

    /// The default task queue (default `kiwipy.tasks`).
    #[must_use]
    pub fn with_task_queue(mut self, name: impl Into<String>) -> Self {
        self.task_queue = name.into();
        self
    }

    /// How many tasks a subscribed queue holds unacknowledged at once; 0 = no limit.
    ///
    /// Default 1: a worker whose tasks run for hours should not hoard tasks another worker
    /// could start. (kiwiPy's default is 0.) Raise it for many short tasks.
    #[must_use]
    pub fn with_task_prefetch(mut self, count: u16) -> Self {
        self.task_prefetch = count;
        self
    }

    /// Testing mode, as kiwiPy's: exchanges auto-delete and task queues expire after 10 s
    /// unused (`x-expires`), so tests leave nothing behind on a shared broker.
    ///
    /// Task queues stay durable in testing mode, where kiwiPy declares them transient
    /// (non-durable, not exclusive): RabbitMQ 4.3 refuses such queues by default (the
    /// deprecated feature `transient_nonexcl_queues`), and a durable queue with a queue TTL
    /// is RabbitMQ's advice. A fleet whose kiwiPy peers share a testing-mode queue needs
    /// kiwiPy's declaration: [`with_kiwipy_testing_queues`](Self::with_kiwipy_testing_queues).
    #[must_use]
    pub fn with_testing_mode(mut self, on: bool) -> Self {
        self.testing_mode = on;
        self
    }

    /// In testing mode, declares task queues exactly as kiwiPy's testing mode does:
    /// non-durable (default `false`: durable, expiring).
    ///
    /// A queue's durability is part of its declaration, so a kiwimq and a kiwiPy process in
    /// testing mode can share a task queue only when both declare it alike: the first
    /// declares it, the other is refused (`PRECONDITION_FAILED`, "inequivalent arg
    /// 'durable'", reported naming this setting). RabbitMQ 4.3 refuses these transient
    /// queues unless its configuration says
    /// `deprecated_features.permit.transient_nonexcl_queues = true`.
    #[must_use]
    pub fn with_kiwipy_testing_queues(mut self, on: bool) -> Self {
        self.kiwipy_testing_queues = on;
        self
    }

    /// How long the broker lets a delivered task go unacknowledged before it closes the
    /// worker's channel and requeues the task, for every task queue this communicator
    /// declares (RabbitMQ 3.12+'s `x-consumer-timeout` queue argument; default: none, so
    /// the broker's `consumer_timeout`, 30 minutes by default, applies). Tasks that run for
    /// hours or days need a longer one; see [`with_queue_consumer_timeout`](Self::with_queue_consumer_timeout)
    /// for one queue.
    ///
    /// A queue's arguments are part of its declaration, a wire contract: kiwiPy declares
    /// its task queues without this argument, and RabbitMQ 3.12+ refuses to redeclare a
    /// queue with another value ("inequivalent arg 'x-consumer-timeout'", reported naming
    /// this setting), so in a fleet with kiwiPy peers set it with a policy instead
    /// (`rabbitmqctl set_policy … '{"consumer-timeout": …}'`), which changes no declaration.
    /// RabbitMQ before 3.12 accepts the argument and ignores it.
    #[must_use]
    pub fn with_consumer_timeout(mut self, timeout: Duration) -> Self {
        self.consumer_timeout = Some(timeout);
        self
    }

    /// The consumer timeout of the task queue `queue` alone (see
    /// [`with_consumer_timeout`](Self::with_consumer_timeout)), overriding the one for
    /// every queue.
    #[must_use]
    pub fn with_queue_consumer_timeout(
        mut self,
        queue: impl Into<String>,
        timeout: Duration,
    ) -> Self {
        let queue = queue.into();
        self.queue_consumer_timeouts
            .retain(|(name, _)| *name != queue);
        self.queue_consumer_timeouts.push((queue, timeout));
        self
    }

    /// How long a task may wait in its queue (`x-message-ttl`, default 7 days).
    #[must_use]
    pub fn with_task_message_ttl(mut self, ttl: Duration) -> Self {
        self.task_message_ttl = ttl;
        self
    }

    /// How long `connect` may take before it fails with `Timeout` (default 10 s).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a send may wait for the broker before it fails with `Timeout` (default 60 s):
    /// through a connection outage (it waits for the reconnection, then publishes) and for
    /// the broker's confirm. A send never returns before the broker confirmed the message.
    #[must_use]
    pub fn with_send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// The delays between reconnection attempts after a connection loss: exponential from
    /// `min` up to `max`, jittered (default 100 ms to 5 s). Attempts go on until the
    /// communicator is closed.
    #[must_use]
    pub fn with_reconnect_delay(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_delay = (min, max.max(min));
        self
    }

    /// How long an RPC result is awaited before its future fails with `Timeout` (default
    /// 5 minutes; `None` waits as long as the communicator is open). RPC is at-most-once:
    /// a request or reply lost with a connection or a broker is never answered, and this
    /// bound keeps the caller from waiting forever. Task results have no default bound
    /// (tasks may run for days); see [`ReplyFuture::with_timeout`](crate::ReplyFuture::with_timeout).
    #[must_use]
    pub fn with_rpc_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.rpc_timeout = timeout;
        self
    }

    /// How long [`close`](crate::Communicator::close) lets running task handlers finish before it
    /// closes the connection, which returns their tasks to the queue (default 10 s).
    #[must_use]
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Poison-task protection, off by default: a task may come back to its queue without
    /// being acknowledged (its worker crashed, or every subscriber rejected it) `limit`
    /// times, so it is delivered at most `limit + 1` times; the next time it would come
    /// back, it moves to the dead-letter queue `<queue>.dlq` instead (RabbitMQ's
    /// `x-delivery-limit`, which counts returns).
    ///
    /// On RabbitMQ this declares task queues as quorum queues with `x-delivery-limit`, so
    /// they differ from kiwiPy's classic queues: every process sharing a queue must use the
    /// same setting (the broker refuses to redeclare a queue with other arguments).
    #[must_use]
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit.max(1));
        self
    }

    /// The largest message body a send may carry, in bytes (default 128 MiB, RabbitMQ's
    /// default `max_message_size`). A larger body fails with
    /// [`ErrorKind::Refused`](crate::ErrorKind::Refused) before anything is sent, on every
    /// backend, so `mem://` refuses what RabbitMQ would. A handler's result over the limit
    /// reaches its sender as a `Remote` error. Set it to the broker's `max_message_size` when
    /// that was changed; a broker with a lower limit still refuses at once.
    #[must_use]
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How many threads the [blocking communicator](crate::blocking)'s subscribers run on
    /// at most (default 16). A burst of calls beyond that waits its turn in a queue instead
    /// of growing the process by a thread per call; handlers that block for long need as
    /// many threads as they should run at once.
    #[must_use]
    pub fn with_blocking_threads(mut self, threads: usize) -> Self {
        self.blocking_threads = threads.max(1);
        self
    }

    /// How many threads closure subscribers run on at most (default 16). Closures never run
    /// on kiwimq's own thread: each message's handler goes to a handler thread that is not
    /// busy computing, and another thread starts (up to this many) when every one is. A
    /// handler that awaits holds no thread; only as many handlers as this compute at once
    /// before the next message waits behind one of them. The communicators of one process
    /// share these threads (the pool may grow to the largest count any of them asks for).
    /// Supervised actors each have a thread of their own; an actor the user started runs
    /// where the user started it.
    #[must_use]
    pub fn with_handler_threads(mut self, threads: usize) -> Self {
        self.handler_threads = threads.max(1);
        self
    }

    /// How many RPC calls and broadcasts a communicator takes from the broker before it has
    /// handled them (default 256): each RPC consumer (the communicator's RPC queue, or
    /// each identifier's queue with exclusive identifiers) and the broadcast queue hold at
    /// most this many unsettled, and a flood waits in the broker instead of in the
    /// worker's memory. 0 takes everything at once, as kiwiPy does. The wire format does
    /// not change: calls are acknowledged once answered instead of on delivery, which the
    /// sender never sees.
    #[must_use]
    pub fn with_message_prefetch(mut self, count: u16) -> Self {
        self.message_prefetch = count;
        self
    }

    /// How many messages one RPC or broadcast subscriber handles at once (default 64, at
    /// least 1); the rest wait their turn within the prefetch window. A task subscriber's
    /// bound is its queue's prefetch ([`with_task_prefetch`](Self::with_task_prefetch)).
    #[must_use]
    pub fn with_max_in_flight(mut self, count: usize) -> Self {
        self.max_in_flight = count.max(1);
        self
    }

    /// A broker of several nodes (a RabbitMQ cluster): `amqp://` or `amqps://` URIs, one
    /// per node, replacing the URI given so far. The first connection tries them in turn
    /// from a random one (so a fleet spreads over the cluster); a reconnection after a loss
    /// starts at the next node. [`ConnectionEvent::Connected`](crate::ConnectionEvent)
    /// names the node each connection reached. Pair with
    /// [`with_quorum_queues`](Self::with_quorum_queues) so that tasks survive a node's loss.
    ///
    /// # Panics
    ///
    /// Never; an empty list leaves the URI as it was.
    #[must_use]
    pub fn with_nodes<I, S>(mut self, uris: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut uris = uris.into_iter().map(Into::into);
        if let Some(first) = uris.next() {
            self.uri = first;
            self.more_uris = uris.collect();
        }
        self
    }

    /// For `amqps://`: trust the CA certificates in this PEM file instead of the system's
    /// roots (a URI's `cacertfile` query parameter comes first).
    #[must_use]
    pub fn with_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_file = Some(path.into());
        self
    }

    /// For `amqps://`: present this client certificate (PEM chain) with its private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1) when the broker asks for one (the URI's `certfile` and
    /// `keyfile` come first).
    #[must_use]
    pub fn with_tls_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.tls.cert_file = Some(cert_file.into());
        self.tls.key_file = Some(key_file.into());
        self
    }

    /// For `amqps://`: the name the broker's certificate must carry, sent as SNI (default:
    /// the URI's host; the URI's `server_name_indication` comes first). For a broker
    /// reached by an address its certificate does not name.
    #[must_use]
    pub fn with_tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls.server_name = Some(name.into());
        self
    }

    /// For `amqps://`: whether the broker's certificate is checked (default `true`).
    /// `false` (RabbitMQ's `verify=verify_none`) still encrypts, but anyone on the path can
    /// pose as the broker: for tests only; a warning is logged at each connection.
    #[must_use]
    pub fn with_tls_verify(mut self, verify: bool) -> Self {
        self.tls.verify = Some(verify);
        self
    }

    /// Declares task queues (and task reply queues) as quorum queues, replicated over a
    /// cluster's nodes, so that they and their tasks survive the loss of a node (default
    /// `false`: kiwiPy's classic queues, so that mixed fleets agree). Every process of a
    /// fleet must agree: a queue that exists with the other type is refused with an error
    /// naming this setting.
    #[must_use]
    pub fn with_quorum_queues(mut self, on: bool) -> Self {
        self.quorum_queues = on;
        self
    }

    /// Gives each RPC identifier an exclusive queue of its own on RabbitMQ, so that another
    /// process claiming an identifier this communicator serves is refused with
    /// `DuplicateSubscriber` (default `false`).
    ///
    /// By default a communicator has one RPC queue, bound once per identifier, as kiwiPy
    /// has one queue per identifier without checking other processes: an identifier taken
    /// in this communicator is refused, one served by another process is served by both.
    /// A binding costs the broker far less than a queue: 10,000 identifiers are added in
    /// about 5 s on two cores, against about 20 s with a queue each. `mem://` behaves the
    /// same way under either setting.
    #[must_use]
    pub fn with_exclusive_rpc_identifiers(mut self, on: bool) -> Self {
        self.exclusive_rpc_identifiers = on;
        self
    }

    /// How often the communicator announces itself on kiwimq's presence exchange (see
    /// [`crate::presence`]): every 5 s by default; `None` turns presence off. A watcher
    /// takes a communicator silent for three intervals for lost. On ZeroMQ only through
    /// kiwimq's broker. At most a day (longer is a day): watchers refuse a longer one.
    pub fn with_presence_interval(mut self, interval: Option<Duration>) -> Self {
        self.presence_interval = interval
            .filter(|interval| !interval.is_zero())
            .map(|interval| interval.min(LONGEST_PRESENCE_INTERVAL));
        self
    }

    /// The URI these settings connect to (the first node's, with several).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Every node's URI, the first first.
    pub fn uris(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.uri.as_str()).chain(self.more_uris.iter().map(String::as_str))
    }

    /// The URI with any password replaced by `***`, for logs.
    pub fn redacted_uri(&self) -> String {
        redact(&self.uri)
    }

    /// The exchange of RPC and broadcasts.
    pub fn message_exchange(&self) -> &str {
        &self.message_exchange
    }

    /// The exchange of tasks.
    pub fn task_exchange(&self) -> &str {
        &self.task_exchange
    }

    /// The default task queue.
    pub fn task_queue(&self) -> &str {
        &self.task_queue
    }

    /// The codec these settings use.
    pub fn codec(&self) -> Codec {
        self.codec
    }
}

/// `uri` with any password replaced by `***`.
pub(crate) fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return uri.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => uri.to_owned(),
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("uri", &self.redacted_uri())
            .field(
                "more_uris",
                &self.more_uris.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            )
            .field("tls", &self.tls)
            .field("quorum_queues", &self.quorum_queues)
            .field("exclusive_rpc_identifiers", &self.exclusive_rpc_identifiers)
            .field("codec", &self.codec)
            .field("message_exchange", &self.message_exchange)
            .field("task_exchange", &self.task_exchange)
            .field("task_queue", &self.task_queue)
            .field("task_prefetch", &self.task_prefetch)
            .field("presence_interval", &self.presence_interval)
            .field("testing_mode", &self.testing_mode)
            .field("kiwipy_testing_queues", &self.kiwipy_testing_queues)
            .field("consumer_timeout", &self.consumer_timeout)
            .field("queue_consumer_timeouts", &self.queue_consumer_timeouts)
            .field("send_timeout", &self.send_timeout)
            .field("delivery_limit", &self.delivery_limit)
            .field("max_message_size", &self.max_message_size)
            .finish_non_exhaustive()
    }
}
