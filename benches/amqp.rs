//! kiwimq against raw lapin doing the same work on the same RabbitMQ, in the same run.
//!
//! Both sides use the same queue kinds and arguments (kiwiPy's: durable task queues with a
//! message TTL, exclusive RPC queues, broadcast queues), persistent 1 KiB bodies in kiwiPy's
//! envelopes encoded with MessagePack, publisher confirms, mandatory task publishes, manual
//! acks and prefetch 100. Each piece of work runs `KIWIMQ_BENCH_ROUNDS` times (default 3),
//! on both sides back to back — kiwimq first in every other pair — so the two figures of a
//! pair see the same machine; a round's ratio compares its pair, and the median of the
//! rounds' ratios is reported beside their range.
//!
//! `cargo bench --bench amqp`. Broker: `KIWIMQ_URL` (an `amqp://` URI) or the local RabbitMQ. Sizes:
//! `KIWIMQ_BENCH_PUBLISH`, `_CONSUME`, `_PULL`, `_ROUNDTRIPS`, `_CONCURRENT`, `_SENDERS`,
//! `_RPC`, `_BROADCASTS`, `_BROADCASTS10`, `_PENDING`, `_MANY`, `_ROUNDS`. Prints a table and writes
//! `target/kiwimq-bench.json`. `KIWIMQ_BENCH_METRICS=1` with `--features prometheus` measures
//! kiwimq with its metrics recorded.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::stream::{FuturesUnordered, StreamExt};
use kiwimq::{Broadcast, BroadcastFilter, BroadcastOptions, Communicator, Rpc, Settings, Task};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use common::{Body, body, median, percentile_us, rate};

/// Publishes in flight at once, on both sides.
const WINDOW: usize = 512;
const PREFETCH: u16 = 100;

/// RPC calls and broadcasts taken from the broker before they are handled, on both sides:
/// kiwimq's default window (`KIWIMQ_BENCH_MESSAGE_PREFETCH` sets another; 0 is kiwiPy's
/// auto-ack intake, which raw lapin then does too).
fn message_prefetch() -> u16 {
    std::env::var("KIWIMQ_BENCH_MESSAGE_PREFETCH")
        .map_or(256, |count| count.parse().expect("a count"))
}

fn url() -> String {
    std::env::var("KIWIMQ_URL")
        .ok()
        .filter(|url| url.starts_with("amqp"))
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[derive(Clone, Copy)]
struct Sizes {
    publish: usize,
    consume: usize,
    pull: usize,
    roundtrips: usize,
    concurrent: usize,
    senders: usize,
    rpc: usize,
    broadcasts: usize,
    broadcasts10: usize,
    pending: usize,
    rounds: usize,
    /// RPC subscribers on one communicator, for the scale figures.
    many: usize,
}

impl Sizes {
    fn from_env() -> Self {
        Sizes {
            publish: common::size("PUBLISH", 20_000),
            consume: common::size("CONSUME", 20_000),
            pull: common::size("PULL", 2_000),
            roundtrips: common::size("ROUNDTRIPS", 1_000),
            concurrent: common::size("CONCURRENT", 10_000),
            senders: common::size("SENDERS", 64),
            rpc: common::size("RPC", 1_000),
            broadcasts: common::size("BROADCASTS", 20_000),
            broadcasts10: common::size("BROADCASTS10", 5_000),
            pending: common::size("PENDING", 100_000),
            many: common::size("MANY", 10_000),
            rounds: common::size("ROUNDS", 3).max(1),
        }
    }
}

/// Names private to this run, and everything to delete at the end.
struct Names {
    prefix: String,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

impl Names {
    fn new() -> Self {
        Names {
            prefix: format!("kiwimq-bench-{}", uuid::Uuid::new_v4().simple()),
            queues: Mutex::default(),
            exchanges: Mutex::default(),
        }
    }

    fn queue(&self, what: &str) -> String {
        let name = format!("{}-{what}-{}", self.prefix, uuid::Uuid::new_v4().simple());
        self.queues.lock().unwrap().push(name.clone());
        name
    }

    fn exchanges(&self, side: &str) -> (String, String) {
        let tasks = format!("{}-{side}.tasks", self.prefix);
        let messages = format!("{}-{side}.messages", self.prefix);
        let mut exchanges = self.exchanges.lock().unwrap();
        exchanges.push(tasks.clone());
        exchanges.push(messages.clone());
        (tasks, messages)
    }

    async fn clean_up(&self) {
        let connection = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let queues = self.queues.lock().unwrap().clone();
        let exchanges = self.exchanges.lock().unwrap().clone();
        for queue in &queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in &exchanges {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = connection.close(200, "bench done".into()).await;
    }
}

/// One implementation of the benchmark's work: kiwimq, or raw lapin. `names` records what
/// to delete at the end.
trait Side {
    /// Publishes `n` tasks, many in flight, until all are confirmed.
    async fn publish(&self, queue: &str, n: usize) -> Duration;
    /// Consumes `n` queued tasks with a subscriber, acked after its handler.
    async fn consume(&self, queue: &str, n: usize) -> Duration;
    /// Takes `n` queued tasks one by one, acking each.
    async fn pull(&self, queue: &str, n: usize) -> Duration;
    /// `n` task round trips, one at a time.
    async fn roundtrips(&self, queue: &str, n: usize, names: &Names) -> Vec<Duration>;
    /// `n` task round trips by `senders` senders at once.
    async fn concurrent(&self, queue: &str, n: usize, senders: usize, names: &Names) -> Duration;
    /// `n` RPC round trips, one at a time.
    async fn rpc(&self, n: usize, names: &Names) -> Vec<Duration>;
    /// `n` broadcasts, many in flight, until each of `subscribers` got them all.
    async fn broadcast(&self, n: usize, subscribers: usize) -> Duration;
}

/// Every figure, in the order [`WORKS`] yields them, and whether it is a rate (higher is
/// better) rather than a latency.
const FIGURES: [(&str, bool); 10] = [
    ("publish_msgs_per_s", true),
    ("consume_msgs_per_s", true),
    ("pull_msgs_per_s", true),
    ("task_roundtrip_p50_us", false),
    ("task_roundtrip_p99_us", false),
    ("task_roundtrip_concurrent_msgs_per_s", true),
    ("rpc_p50_us", false),
    ("rpc_p99_us", false),
    ("broadcast_msgs_per_s", true),
    ("broadcast10_msgs_per_s", true),
];

/// One piece of the benchmark's work. Each is run by both sides back to back before the
/// next begins, so that the two figures of a pair see the same machine.
#[derive(Clone, Copy)]
enum Work {
    Publish,
    Consume,
    Pull,
    Roundtrips,
    Concurrent,
    Rpc,
    Broadcast,
    Broadcast10,
}

/// The work in the order of [`FIGURES`] (round trips and RPC give two figures each).
const WORKS: [Work; 8] = [
    Work::Publish,
    Work::Consume,
    Work::Pull,
    Work::Roundtrips,
    Work::Concurrent,
    Work::Rpc,
    Work::Broadcast,
    Work::Broadcast10,
];

/// `work` done once by `side`: its figures, in the order of [`FIGURES`].
async fn measure(side: &impl Side, work: Work, tag: &str, names: &Names, s: Sizes) -> Vec<f64> {
    let queue = |what: &str| names.queue(&format!("{tag}-{what}"));
    match work {
        Work::Publish => vec![rate(
            s.publish,
            side.publish(&queue("pub"), s.publish).await,
        )],
        Work::Consume => vec![rate(
            s.consume,
            side.consume(&queue("con"), s.consume).await,
        )],
        Work::Pull => vec![rate(s.pull, side.pull(&queue("pull"), s.pull).await)],
        Work::Roundtrips => {
            let mut samples = side.roundtrips(&queue("rt"), s.roundtrips, names).await;
            vec![
                percentile_us(&mut samples, 50),
                percentile_us(&mut samples, 99),
            ]
        }
        Work::Concurrent => vec![rate(
            s.concurrent,
            side.concurrent(&queue("conc"), s.concurrent, s.senders, names)
                .await,
        )],
        Work::Rpc => {
            let mut samples = side.rpc(s.rpc, names).await;
            vec![
                percentile_us(&mut samples, 50),
                percentile_us(&mut samples, 99),
            ]
        }
        Work::Broadcast => vec![rate(s.broadcasts, side.broadcast(s.broadcasts, 1).await)],
        Work::Broadcast10 => vec![rate(
            s.broadcasts10,
            side.broadcast(s.broadcasts10, 10).await,
        )],
    }
}

// ---- kiwimq ----------------------------------------------------------------------------

struct Kiwimq {
    settings: Settings,
}

impl Kiwimq {
    fn new(names: &Names) -> Self {
        let (tasks, messages) = names.exchanges("kiwimq");
        let settings = Settings::new(url())
            .with_task_exchange(tasks)
            .with_message_exchange(messages)
            .with_task_prefetch(PREFETCH)
            .with_message_prefetch(message_prefetch());
        Kiwimq { settings }
    }

    async fn connect(&self) -> Communicator {
        self.settings.clone().connect().await.unwrap()
    }

    async fn worker(&self, queue: &str) -> Communicator {
        let worker = self.connect().await;
        worker
            .task_queue(queue)
            .add_task_subscriber(|task: Task<Body>| async move { Ok(task.body) })
            .await
            .unwrap();
        worker
    }

    /// `n` RPC subscribers on one communicator: the seconds to add them (512 at once), the
    /// RSS each costs in KiB, the RPC p50 in µs with all of them present, and the seconds to
    /// remove them.
    async fn many_rpc_subscribers(&self, n: usize) -> (f64, f64, f64, f64) {
        let worker = self.connect().await;
        let before = common::rss_mib();
        let started = Instant::now();
        let added: Vec<String> = futures::stream::iter(0..n)
            .map(|i| {
                let worker = worker.clone();
                async move {
                    worker
                        .add_rpc_subscriber(
                            Some(&format!("many-{i}")),
                            |rpc: Rpc<Body>| async move { Ok(rpc.body) },
                        )
                        .await
                        .unwrap()
                }
            })
            .buffer_unordered(WINDOW)
            .collect()
            .await;
        let adding = started.elapsed().as_secs_f64();
        let per_subscriber = (common::rss_mib() - before) * 1024.0 / n as f64;
        let client = self.connect().await;
        let body = body();
        let mut samples = Vec::with_capacity(1000);
        for i in 0..1000 {
            let started = Instant::now();
            let _: Body = client
                .rpc_send(&format!("many-{}", i * 7 % n), &body)
                .await
                .unwrap()
                .await
                .unwrap();
            samples.push(started.elapsed());
        }
        let p50 = percentile_us(&mut samples, 50);
        let started = Instant::now();
        futures::stream::iter(added)
            .for_each_concurrent(WINDOW, |identifier| {
                let worker = worker.clone();
                async move { worker.remove_rpc_subscriber(&identifier).await.unwrap() }
            })
            .await;
        let removing = started.elapsed().as_secs_f64();
        client.close().await.unwrap();
        worker.close().await.unwrap();
        (adding, per_subscriber, p50, removing)
    }

    /// RSS with `n` task results pending (sent, unanswered), in MiB.
    async fn rss_with_pending(&self, queue: &str, n: usize) -> (f64, f64) {
        let comm = self.connect().await;
        let queue = comm.task_queue(queue);
        let before = common::rss_mib();
        let small = 0u32;
        let replies: Vec<kiwimq::ReplyFuture<u32>> = futures::stream::iter(0..n)
            .map(|_| queue.task_send::<_, u32>(&small))
            .buffer_unordered(WINDOW)
            .map(Result::unwrap)
            .collect()
            .await;
        let after = common::rss_mib();
        assert_eq!(comm.pending_replies(), n);
        drop(replies);
        comm.close().await.unwrap();
        (after, after - before)
    }
}

impl Side for Kiwimq {
    async fn publish(&self, queue: &str, n: usize) -> Duration {
        let comm = self.connect().await;
        let queue = comm.task_queue(queue);
        queue.task_send_no_reply(&body()).await.unwrap(); // declares it
        let started = Instant::now();
        let body = body();
        futures::stream::iter(0..n)
            .map(|_| queue.task_send_no_reply(&body))
            .buffer_unordered(WINDOW)
            .for_each(|sent| async move { sent.unwrap() })
            .await;
        let elapsed = started.elapsed();
        comm.close().await.unwrap();
        elapsed
    }

    async fn consume(&self, queue: &str, n: usize) -> Duration {
        self.publish(queue, n).await;
        let comm = self.connect().await;
        let handled = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Notify::new());
        let (counter, finished) = (handled.clone(), done.clone());
        let started = Instant::now();
        comm.task_queue(queue)
            .add_task_subscriber(move |_: Task<Body, ()>| {
                // n + 1: the publish above sent one more to declare the queue.
                if counter.fetch_add(1, Ordering::Relaxed) + 1 == n + 1 {
                    finished.notify_one();
                }
                async { Ok(()) }
            })
            .await
            .unwrap();
        done.notified().await;
        let elapsed = started.elapsed();
        comm.close().await.unwrap();
        elapsed
    }

    async fn pull(&self, queue: &str, n: usize) -> Duration {
        self.publish(queue, n).await;
        let comm = self.connect().await;
        let queue = comm.task_queue(queue);
        let started = Instant::now();
        for _ in 0..=n {
            let task = queue
                .next_task::<Body>(Duration::from_secs(10))
                .await
                .unwrap();
            task.process(Ok(())).await.unwrap();
        }
        let elapsed = started.elapsed();
        comm.close().await.unwrap();
        elapsed
    }

    async fn roundtrips(&self, queue: &str, n: usize, _: &Names) -> Vec<Duration> {
        let worker = self.worker(queue).await;
        let client = self.connect().await;
        let queue = client.task_queue(queue);
        let body = body();
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            let result: Body = queue.task_send(&body).await.unwrap().await.unwrap();
            samples.push(started.elapsed());
            assert_eq!(result.data.len(), body.data.len());
        }
        worker.close().await.unwrap();
        client.close().await.unwrap();
        samples
    }

    async fn concurrent(&self, queue: &str, n: usize, senders: usize, _: &Names) -> Duration {
        let worker = self.worker(queue).await;
        let client = self.connect().await;
        let queue = client.task_queue(queue);
        let body = body();
        let left = AtomicUsize::new(n);
        let started = Instant::now();
        let sender = || async {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                .is_ok()
            {
                let _: Body = queue.task_send(&body).await.unwrap().await.unwrap();
            }
        };
        futures::future::join_all((0..senders).map(|_| sender())).await;
        let elapsed = started.elapsed();
        worker.close().await.unwrap();
        client.close().await.unwrap();
        elapsed
    }

    async fn rpc(&self, n: usize, _: &Names) -> Vec<Duration> {
        let server = self.connect().await;
        let identifier = format!("echo-{}", uuid::Uuid::new_v4().simple());
        server
            .add_rpc_subscriber(
                Some(&identifier),
                |rpc: Rpc<Body>| async move { Ok(rpc.body) },
            )
            .await
            .unwrap();
        let client = self.connect().await;
        let body = body();
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            let _: Body = client
                .rpc_send(&identifier, &body)
                .await
                .unwrap()
                .await
                .unwrap();
            samples.push(started.elapsed());
        }
        server.close().await.unwrap();
        client.close().await.unwrap();
        samples
    }

    async fn broadcast(&self, n: usize, subscribers: usize) -> Duration {
        let received = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Notify::new());
        let mut listeners = Vec::new();
        for _ in 0..subscribers {
            let comm = self.connect().await;
            let (counter, finished) = (received.clone(), done.clone());
            comm.add_broadcast_subscriber(BroadcastFilter::new(), move |_: Broadcast<Body>| {
                if counter.fetch_add(1, Ordering::Relaxed) + 1 == n * subscribers {
                    finished.notify_one();
                }
                async { Ok(()) }
            })
            .await
            .unwrap();
            listeners.push(comm);
        }
        let sender = self.connect().await;
        let body = body();
        let started = Instant::now();
        futures::stream::iter(0..n)
            .map(|_| sender.broadcast_send(&body, BroadcastOptions::subject("bench")))
            .buffer_unordered(WINDOW)
            .for_each(|sent| async move { sent.unwrap() })
            .await;
        done.notified().await;
        let elapsed = started.elapsed();
        for comm in listeners {
            comm.close().await.unwrap();
        }
        sender.close().await.unwrap();
        elapsed
    }
}

// ---- raw lapin -------------------------------------------------------------------------

/// kiwiPy's reply map, as kiwimq writes it.
#[derive(Serialize, Deserialize)]
struct ReplyMap<T> {
    result: T,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    host: Option<HostMap>,
}

#[derive(Serialize, Deserialize, Clone)]
struct HostMap {
    hostname: String,
    pid: u32,
}

#[derive(Serialize, Deserialize)]
struct BroadcastMap<T> {
    body: T,
    sender: Option<String>,
    subject: Option<String>,
    correlation_id: Option<String>,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).unwrap()
}

fn millis(ms: i32) -> AMQPValue {
    AMQPValue::LongInt(ms)
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert((*key).into(), value.clone());
    }
    table
}

struct Lapin {
    tasks: String,
    messages: String,
    host: HostMap,
}

/// A connection with a confirm-mode channel for publishing.
struct Link {
    connection: Connection,
    publisher: Channel,
}

impl Link {
    async fn open() -> Link {
        let connection = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .unwrap();
        let publisher = connection.create_channel().await.unwrap();
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Link {
            connection,
            publisher,
        }
    }

    async fn close(self) {
        self.connection.close(200, "done".into()).await.unwrap();
    }
}

fn task_properties(correlation_id: &str, reply_to: Option<&str>) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_correlation_id(correlation_id.into());
    match reply_to {
        Some(reply_to) => properties.with_reply_to(reply_to.into()),
        None => properties,
    }
}

/// Publishes and awaits the confirm, failing on a return or a nack.
async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    key: &str,
    mandatory: bool,
    payload: &[u8],
    properties: BasicProperties,
) {
    try_publish_confirmed(channel, exchange, key, mandatory, payload, properties)
        .await
        .unwrap();
}

/// As `publish_confirmed`, for a server's background tasks, which may outlive the run's
/// connections by a moment.
async fn try_publish_confirmed(
    channel: &Channel,
    exchange: &str,
    key: &str,
    mandatory: bool,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<(), String> {
    let options = BasicPublishOptions {
        mandatory,
        ..Default::default()
    };
    let confirmation = channel
        .basic_publish(exchange.into(), key.into(), options, payload, properties)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    match confirmation {
        lapin::Confirmation::Ack(None) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// Declares `queue` and binds it to `exchange` with `key`.
async fn declare_bound(
    channel: &Channel,
    queue: &str,
    options: QueueDeclareOptions,
    arguments: FieldTable,
    exchange: &str,
    key: &str,
) {
    channel
        .queue_declare(queue.into(), options, arguments)
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Bounds what `channel`'s consumers take from the broker as kiwimq does for RPC calls and
/// broadcasts (`basic.qos` of the same window, each message acknowledged once handled);
/// `false` when the window is 0 and messages are taken unacknowledged, as kiwiPy does.
async fn bound_intake(channel: &Channel) -> bool {
    let window = message_prefetch();
    if window > 0 {
        channel
            .basic_qos(window, BasicQosOptions::default())
            .await
            .unwrap();
    }
    window > 0
}

/// Consumes `queue` under `tag` (empty: the broker names it).
async fn consume(channel: &Channel, queue: &str, tag: &str, no_ack: bool) -> lapin::Consumer {
    let options = BasicConsumeOptions {
        no_ack,
        ..Default::default()
    };
    channel
        .basic_consume(queue.into(), tag.into(), options, FieldTable::default())
        .await
        .unwrap()
}

/// Answers `request` (at its `reply_to`, with its correlation id) through the default
/// exchange, as kiwimq does; confirmed.
async fn answer(
    publisher: &Channel,
    request: &lapin::message::Delivery,
    reply: &[u8],
    persistent: bool,
) -> Result<(), String> {
    let request = &request.properties;
    let reply_to = request
        .reply_to()
        .as_ref()
        .ok_or("no reply_to")?
        .to_string();
    let mut properties = BasicProperties::default();
    if let Some(correlation_id) = request.correlation_id() {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    if persistent {
        properties = properties.with_delivery_mode(2);
    }
    try_publish_confirmed(publisher, "", &reply_to, false, reply, properties).await
}

/// Correlation id → who waits for that reply.
type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// A reply queue like kiwimq's, consumed with manual acks, routing replies to `waiting`.
async fn reply_queue(link: &Link, exchange: &str, names: &Names) -> (String, Waiting) {
    let queue = names.queue("lapin-reply");
    let channel = link.connection.create_channel().await.unwrap();
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let arguments = table(&[("x-expires", millis(60_000))]);
    declare_bound(&channel, &queue, options, arguments, exchange, &queue).await;
    let mut consumer = consume(&channel, &queue, "", false).await;
    let waiting: Waiting = Arc::default();
    let routes = waiting.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let correlation_id = delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            if let Some(tx) = routes.lock().unwrap().remove(&correlation_id) {
                let _ = tx.send(delivery.data.clone());
            }
            tokio::spawn(async move {
                let _ = delivery.ack(BasicAckOptions::default()).await;
            });
        }
    });
    (queue, waiting)
}

impl Lapin {
    async fn new(names: &Names) -> Self {
        let (tasks, messages) = names.exchanges("lapin");
        let link = Link::open().await;
        for exchange in [&tasks, &messages] {
            link.publisher
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        link.close().await;
        Lapin {
            tasks,
            messages,
            host: HostMap {
                hostname: gethostname(),
                pid: std::process::id(),
            },
        }
    }

    /// kiwiPy's task queue: durable, 7-day message TTL, bound with its name.
    async fn declare_task_queue(&self, channel: &Channel, queue: &str) {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let arguments = table(&[("x-message-ttl", millis(604_800_000))]);
        declare_bound(channel, queue, options, arguments, &self.tasks, queue).await;
    }

    /// A worker like kiwimq's: decode, answer with the body (persistent reply, confirmed),
    /// then ack.
    async fn worker(&self, queue: &str) -> Link {
        let link = Link::open().await;
        let channel = link.connection.create_channel().await.unwrap();
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        self.declare_task_queue(&channel, queue).await;
        let mut consumer = consume(&channel, queue, "", false).await;
        let publisher = link.publisher.clone();
        let host = self.host.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let publisher = publisher.clone();
                let host = host.clone();
                tokio::spawn(async move {
                    let (body, _): (Body, bool) = rmp_serde::from_slice(&delivery.data).unwrap();
                    let reply = encode(&ReplyMap {
                        result: body,
                        host: Some(host),
                    });
                    let replied = answer(&publisher, &delivery, &reply, true).await;
                    if replied.is_ok() {
                        let _ = delivery.ack(BasicAckOptions::default()).await;
                    }
                });
            }
        });
        link
    }

    /// Sends one task and waits for its result.
    async fn roundtrip(&self, link: &Link, queue: &str, reply_to: &str, waiting: &Waiting) {
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        waiting.lock().unwrap().insert(correlation_id.clone(), tx);
        let payload = encode(&(&body(), false));
        publish_confirmed(
            &link.publisher,
            &self.tasks,
            queue,
            true,
            &payload,
            task_properties(&correlation_id, Some(reply_to)),
        )
        .await;
        let reply = rx.await.unwrap();
        let reply: ReplyMap<Body> = rmp_serde::from_slice(&reply).unwrap();
        assert_eq!(reply.result.data.len(), common::BODY_BYTES);
    }
}

impl Side for Lapin {
    async fn publish(&self, queue: &str, n: usize) -> Duration {
        let link = Link::open().await;
        self.declare_task_queue(&link.publisher, queue).await;
        let body = body();
        let started = Instant::now();
        let mut in_flight = FuturesUnordered::new();
        for _ in 0..n {
            if in_flight.len() >= WINDOW {
                in_flight.next().await;
            }
            let payload = encode(&(&body, true));
            let correlation_id = uuid::Uuid::new_v4().to_string();
            let channel = &link.publisher;
            let tasks = self.tasks.as_str();
            in_flight.push(async move {
                publish_confirmed(
                    channel,
                    tasks,
                    queue,
                    true,
                    &payload,
                    task_properties(&correlation_id, None),
                )
                .await
            });
        }
        while in_flight.next().await.is_some() {}
        let elapsed = started.elapsed();
        drop(in_flight);
        link.close().await;
        elapsed
    }

    async fn consume(&self, queue: &str, n: usize) -> Duration {
        self.publish(queue, n).await;
        let link = Link::open().await;
        let channel = link.connection.create_channel().await.unwrap();
        let started = Instant::now();
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .unwrap();
        self.declare_task_queue(&channel, queue).await;
        let mut consumer = consume(&channel, queue, "", false).await;
        let mut acks = Vec::with_capacity(n);
        for _ in 0..n {
            let delivery = consumer.next().await.unwrap().unwrap();
            let _: (Body, bool) = rmp_serde::from_slice(&delivery.data).unwrap();
            acks.push(tokio::spawn(async move {
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            }));
        }
        let elapsed = started.elapsed();
        for ack in acks {
            ack.await.unwrap();
        }
        link.close().await;
        elapsed
    }

    async fn pull(&self, queue: &str, n: usize) -> Duration {
        self.publish(queue, n).await;
        let link = Link::open().await;
        let channel = link.connection.create_channel().await.unwrap();
        self.declare_task_queue(&channel, queue).await;
        let started = Instant::now();
        for _ in 0..n {
            let message = channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap()
                .expect("a task");
            let _: (Body, bool) = rmp_serde::from_slice(&message.delivery.data).unwrap();
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
        }
        let elapsed = started.elapsed();
        link.close().await;
        elapsed
    }

    async fn roundtrips(&self, queue: &str, n: usize, names: &Names) -> Vec<Duration> {
        let worker = self.worker(queue).await;
        let client = Link::open().await;
        let (reply_to, waiting) = reply_queue(&client, &self.tasks, names).await;
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            self.roundtrip(&client, queue, &reply_to, &waiting).await;
            samples.push(started.elapsed());
        }
        worker.close().await;
        client.close().await;
        samples
    }

    async fn concurrent(&self, queue: &str, n: usize, senders: usize, names: &Names) -> Duration {
        let worker = self.worker(queue).await;
        let client = Link::open().await;
        let (reply_to, waiting) = reply_queue(&client, &self.tasks, names).await;
        let left = AtomicUsize::new(n);
        let started = Instant::now();
        let sender = || async {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                .is_ok()
            {
                self.roundtrip(&client, queue, &reply_to, &waiting).await;
            }
        };
        futures::future::join_all((0..senders).map(|_| sender())).await;
        let elapsed = started.elapsed();
        worker.close().await;
        client.close().await;
        elapsed
    }

    async fn rpc(&self, n: usize, names: &Names) -> Vec<Duration> {
        let identifier = format!("echo-{}", uuid::Uuid::new_v4().simple());
        let server = Link::open().await;
        let channel = server.connection.create_channel().await.unwrap();
        let queue = format!("{}.rpc.{identifier}", self.messages);
        let options = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let arguments = table(&[
            ("x-message-ttl", millis(66_000)),
            ("x-expires", millis(60_000)),
        ]);
        let key = format!("[rpc].{identifier}");
        declare_bound(&channel, &queue, options, arguments, &self.messages, &key).await;
        let acked = bound_intake(&channel).await;
        let mut requests = consume(&channel, &queue, &identifier, !acked).await;
        let publisher = server.publisher.clone();
        tokio::spawn(async move {
            while let Some(Ok(request)) = requests.next().await {
                let publisher = publisher.clone();
                tokio::spawn(async move {
                    let body: Body = rmp_serde::from_slice(&request.data).unwrap();
                    let reply = encode(&ReplyMap {
                        result: body,
                        host: None,
                    });
                    let _ = answer(&publisher, &request, &reply, false).await;
                    if acked {
                        let _ = request.ack(BasicAckOptions::default()).await;
                    }
                });
            }
        });
        let client = Link::open().await;
        let (reply_to, waiting) = reply_queue(&client, &self.messages, names).await;
        let key = format!("[rpc].{identifier}");
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            let correlation_id = uuid::Uuid::new_v4().to_string();
            let (tx, rx) = oneshot::channel();
            waiting.lock().unwrap().insert(correlation_id.clone(), tx);
            let properties = BasicProperties::default()
                .with_correlation_id(correlation_id.as_str().into())
                .with_reply_to(reply_to.as_str().into());
            publish_confirmed(
                &client.publisher,
                &self.messages,
                &key,
                true,
                &encode(&body()),
                properties,
            )
            .await;
            let reply: ReplyMap<Body> = rmp_serde::from_slice(&rx.await.unwrap()).unwrap();
            assert_eq!(reply.result.data.len(), common::BODY_BYTES);
            samples.push(started.elapsed());
        }
        server.close().await;
        client.close().await;
        samples
    }

    async fn broadcast(&self, n: usize, subscribers: usize) -> Duration {
        let received = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Notify::new());
        let mut listeners = Vec::new();
        for _ in 0..subscribers {
            let link = Link::open().await;
            let channel = link.connection.create_channel().await.unwrap();
            let queue = format!("broadcast-{}", uuid::Uuid::new_v4());
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            };
            let arguments = table(&[("x-message-ttl", millis(66_000))]);
            let messages = &self.messages;
            declare_bound(
                &channel,
                &queue,
                options,
                arguments,
                messages,
                "[broadcast]",
            )
            .await;
            let acked = bound_intake(&channel).await;
            let mut consumer = consume(&channel, &queue, "", !acked).await;
            let (counter, finished) = (received.clone(), done.clone());
            tokio::spawn(async move {
                while let Some(Ok(delivery)) = consumer.next().await {
                    let _: BroadcastMap<Body> = rmp_serde::from_slice(&delivery.data).unwrap();
                    if counter.fetch_add(1, Ordering::Relaxed) + 1 == n * subscribers {
                        finished.notify_one();
                    }
                    if acked {
                        tokio::spawn(async move {
                            let _ = delivery.ack(BasicAckOptions::default()).await;
                        });
                    }
                }
            });
            listeners.push(link);
        }
        let sender = Link::open().await;
        let body = body();
        let started = Instant::now();
        let mut in_flight = FuturesUnordered::new();
        for _ in 0..n {
            if in_flight.len() >= WINDOW {
                in_flight.next().await;
            }
            let payload = encode(&BroadcastMap {
                body: &body,
                sender: None,
                subject: Some("bench".to_owned()),
                correlation_id: None,
            });
            let channel = &sender.publisher;
            let messages = self.messages.as_str();
            in_flight.push(async move {
                publish_confirmed(
                    channel,
                    messages,
                    "[broadcast]",
                    false,
                    &payload,
                    BasicProperties::default(),
                )
                .await
            });
        }
        while in_flight.next().await.is_some() {}
        drop(in_flight);
        done.notified().await;
        let elapsed = started.elapsed();
        for link in listeners {
            link.close().await;
        }
        sender.close().await;
        elapsed
    }
}

fn gethostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

// ---- the run ---------------------------------------------------------------------------

/// One figure's samples per implementation, and whether higher is better.
struct Figure {
    name: &'static str,
    /// One sample a round, each measured right beside the other side's of the same round.
    kiwimq: Vec<f64>,
    lapin: Vec<f64>,
    rate: bool,
}

impl Figure {
    /// kiwimq against lapin in each round: kiwimq/lapin for a rate, lapin/kiwimq for a
    /// latency, so 1.0 is parity and higher is better for kiwimq.
    fn ratios(&self) -> Vec<f64> {
        let ratio = |(k, l): (&f64, &f64)| if self.rate { k / l } else { l / k };
        self.kiwimq.iter().zip(&self.lapin).map(ratio).collect()
    }
}

fn broker_version() -> String {
    std::process::Command::new("rabbitmqctl")
        .args(["-q", "version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| format!("RabbitMQ {}", String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| "unknown".into())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // With metrics on, kiwimq pays for them (a Prometheus recorder is installed); lapin
    // has none.
    #[cfg(feature = "prometheus")]
    let metrics = std::env::var("KIWIMQ_BENCH_METRICS").is_ok_and(|v| v == "1");
    #[cfg(feature = "prometheus")]
    if metrics {
        kiwimq::metrics::install_prometheus().expect("the Prometheus recorder installs");
        println!("metrics on: kiwimq records into a Prometheus recorder");
    }
    let sizes = Sizes::from_env();
    let names = Names::new();
    let kiwimq = Kiwimq::new(&names);
    let lapin = Lapin::new(&names).await;
    let mut figures: Vec<Figure> = FIGURES
        .into_iter()
        .map(|(name, rate)| Figure {
            name,
            kiwimq: Vec::new(),
            lapin: Vec::new(),
            rate,
        })
        .collect();
    let s = sizes;
    let started = Instant::now();
    for round in 0..s.rounds {
        eprintln!("round {}/{}", round + 1, s.rounds);
        let mut figures_left = figures.iter_mut();
        for (index, work) in WORKS.into_iter().enumerate() {
            // Each side goes first in every other pair, so neither always meets a broker
            // still busy with the other's leftovers.
            let kiwimq_first = (round + index) % 2 == 0;
            let (k, l) = if kiwimq_first {
                let k = measure(&kiwimq, work, "k", &names, s).await;
                (k, measure(&lapin, work, "l", &names, s).await)
            } else {
                let l = measure(&lapin, work, "l", &names, s).await;
                (measure(&kiwimq, work, "k", &names, s).await, l)
            };
            for (k, l) in k.into_iter().zip(l) {
                let figure = figures_left.next().expect("a figure per value");
                figure.kiwimq.push(k);
                figure.lapin.push(l);
            }
        }
    }
    let (rss, rss_growth) = kiwimq
        .rss_with_pending(&names.queue("k-pending"), s.pending)
        .await;
    let (many_add, many_rss, many_p50, many_remove) = kiwimq.many_rpc_subscribers(s.many).await;
    names.clean_up().await;

    let broker = broker_version();
    println!(
        "\nkiwimq vs raw lapin on {broker}, {} B bodies, {} rounds, each figure's two sides back to back; \
         ratio = the median of the rounds' ratios ({:.0?})\n",
        common::BODY_BYTES,
        s.rounds,
        started.elapsed()
    );
    let mut rows = Vec::new();
    let (mut kiwimq_json, mut lapin_json, mut ratio_json) = (
        serde_json::Map::new(),
        serde_json::Map::new(),
        serde_json::Map::new(),
    );
    for figure in &figures {
        let k = median(figure.kiwimq.clone());
        let l = median(figure.lapin.clone());
        // The median of the rounds' ratios: each pair was measured back to back, so a
        // round the machine was slow in moves both of its figures, not one.
        let ratios = figure.ratios();
        let ratio = median(ratios.clone());
        let (lowest, highest) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        rows.push((
            figure.name.to_string(),
            vec![
                format!("{k:.0}"),
                format!("{l:.0}"),
                format!("{ratio:.2}"),
                format!("{lowest:.2}–{highest:.2}"),
            ],
        ));
        kiwimq_json.insert(figure.name.into(), serde_json::json!(k.round()));
        lapin_json.insert(figure.name.into(), serde_json::json!(l.round()));
        ratio_json.insert(
            figure.name.into(),
            serde_json::json!((ratio * 100.0).round() / 100.0),
        );
    }
    rows.push((
        format!("rss_mb_with_{}_pending", s.pending),
        vec![format!("{rss:.0}"), "-".into(), "-".into(), "-".into()],
    ));
    for (name, value) in [
        (
            format!("rpc_subscribers_{}_add_s", s.many),
            format!("{many_add:.1}"),
        ),
        (
            format!("rpc_subscribers_{}_remove_s", s.many),
            format!("{many_remove:.1}"),
        ),
        (
            "rss_kib_per_rpc_subscriber".to_owned(),
            format!("{many_rss:.1}"),
        ),
        (
            format!("rpc_p50_us_with_{}_subscribers", s.many),
            format!("{many_p50:.0}"),
        ),
    ] {
        rows.push((name, vec![value, "-".into(), "-".into(), "-".into()]));
    }
    kiwimq_json.insert("rpc_subscribers_add_s".into(), serde_json::json!(many_add));
    kiwimq_json.insert(
        "rpc_subscribers_remove_s".into(),
        serde_json::json!(many_remove),
    );
    kiwimq_json.insert(
        "rss_kib_per_rpc_subscriber".into(),
        serde_json::json!(many_rss),
    );
    kiwimq_json.insert(
        "rpc_p50_us_with_many_subscribers".into(),
        serde_json::json!(many_p50),
    );
    kiwimq_json.insert(
        "rss_mb_with_pending_results".into(),
        serde_json::json!((rss * 10.0).round() / 10.0),
    );
    kiwimq_json.insert(
        "rss_growth_mb_with_pending_results".into(),
        serde_json::json!((rss_growth * 10.0).round() / 10.0),
    );
    common::print_table(&["kiwimq", "lapin", "ratio", "rounds"], &rows);
    let report = serde_json::json!({
        "kiwimq": kiwimq_json,
        "lapin": lapin_json,
        "ratio": ratio_json,
        "broker": broker,
        "sizes": {
            "body_bytes": common::BODY_BYTES,
            "publish": s.publish,
            "consume": s.consume,
            "pull": s.pull,
            "roundtrips": s.roundtrips,
            "concurrent": s.concurrent,
            "senders": s.senders,
            "rpc": s.rpc,
            "broadcasts": s.broadcasts,
            "broadcasts10": s.broadcasts10,
            "pending": s.pending,
            "many_rpc_subscribers": s.many,
            "rounds": s.rounds,
            "in_flight": WINDOW,
            "prefetch": PREFETCH,
            "message_prefetch": message_prefetch(),
        },
        "samples": figures
            .iter()
            .map(|f| (f.name.to_string(), serde_json::json!({"kiwimq": f.kiwimq, "lapin": f.lapin, "ratios": f.ratios()})))
            .collect::<serde_json::Map<_, _>>(),
    });
    common::write_report("kiwimq-bench.json", &report);
}
