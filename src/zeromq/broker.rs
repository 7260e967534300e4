//! kiwimq's ZeroMQ broker: AiiDA's protocol and files, without AiiDA's broker's faults.
//!
//! It writes `broker.pid` (`aiida-zeromq-broker <pid>`, so an AiiDA daemon takes it for its
//! own and starts none), `broker.sockets` and `broker.status` (every 5 s) in AiiDA's formats,
//! and keeps tasks in AiiDA's `storage/tasks/{pending,processing}` layout. Beyond AiiDA's:
//!
//! - a task is on disk before it is confirmed (in the store's journal, one sync for a
//!   batch), and may go out at once; its file and directory follow, synced; a task whose id
//!   is stored already (a client's resend after a lost confirm) is confirmed again, never
//!   stored twice;
//! - one broker a directory: `broker.lock` is locked (`flock`) for the broker's life, and
//!   every file it writes is written to a temporary of its own, synced, renamed, the
//!   directory synced;
//! - the socket is at the same path after every restart, and the subscriptions, prefetch
//!   limits and task assignments are kept in `storage/broker-state.json`: clients that
//!   reconnect with their identity (libzmq does by itself) go on, their acks accepted;
//! - a worker that stops answering keeps its tasks for a grace period (30 s by default)
//!   before they go to another worker, so a stalled worker (SIGSTOP, a long pause) that
//!   comes back does not run a task twice; a killed one's tasks run elsewhere after it;
//! - a task taken back at start as a client's that was handed over in the last moments
//!   before the stop (it may never have left) is leased: unless its holder claims it within
//!   the lease (30 s by default) — by its settle, by saying it holds it (kiwimq's clients),
//!   or, for AiiDA's, by serving the RPC of the process the task continues — it goes back to
//!   the queue;
//! - a settle counts only for the delivery it names (kiwimq's clients name it), so a settle
//!   sent again after a reconnect never settles a later delivery of the same task;
//! - pending RPCs expire (their callers get an error), an answer counts only from the client
//!   the RPC went to, dead clients are dropped;
//! - no send blocks: a peer whose queue is full gets its task back in the queue, or its
//!   caller an error;
//! - a worker's task result goes back to a sender that asked for it (kiwimq's clients do,
//!   with the optional `results` field AiiDA's never send).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;

use super::dispatch::{Assignment, ClientId, Dispatcher, Refusal};
use super::journal::Wake;
use super::protocol::{Incoming, Outgoing, json_string, kind, null};
use super::rpc_router::{RpcRouter, Unanswered};
use super::service::{HANDOVER, KIWIMQ, ServiceFiles, ServiceLock, ServiceStatus, unix_now};
use super::state::{
    ACKED_KEPT as ACKED_SAVED, Change, HandOver, PersistedState, StateLog, hex, unhex,
};
use super::store::{Lookup, Store, StoredTask};
use crate::error::{Error, Result};
/// How often `broker.status` is rewritten, as AiiDA's broker does.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// How often clients are probed and timers looked at.
const TICK: Duration = Duration::from_millis(250);
/// The most clients watching presence at once; more are refused (a dashboard watches).
const MAX_PRESENCE_WATCHERS: usize = 4096;
/// How long, and how many, ids of acked tasks are remembered, so a resend of a task whose
/// confirm was lost (its sender resends within its send timeout, 60 s by default) is
/// confirmed again rather than run again.
const ACKED_MEMORY: Duration = Duration::from_secs(600);
const ACKED_KEPT: usize = 100_000;
/// How often the state's snapshot is written (when it changed), and past how many lines of
/// its log sooner.
const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(2);
const SNAPSHOT_LINES: usize = 20_000;
/// How long a worker's result may follow its ack.
const RESULT_ROUTE_TTL: Duration = Duration::from_secs(60);
/// The most tasks stored in one durable batch.
const BATCH: usize = 512;

/// kiwimq's ZeroMQ broker for one service directory: configure, then
/// [`start`](Self::start).
///
/// ```no_run
/// # fn main() -> kiwimq::Result<()> {
/// let broker = kiwimq::broker::Broker::new("/home/me/.aiida/broker/profile").start()?;
/// println!("clients connect to {}", broker.uri());
/// broker.stop()
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Broker {
    service_dir: PathBuf,
    worker_grace: Duration,
    rpc_timeout: Duration,
    restore_lease: Duration,
    max_message_size: usize,
}

impl Broker {
    /// A broker for `service_dir` (created if missing), with the default grace (30 s), RPC
    /// timeout (5 min), restore lease (30 s) and message size limit (128 MiB).
    pub fn new(service_dir: impl Into<PathBuf>) -> Self {
        Self {
            service_dir: service_dir.into(),
            worker_grace: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(300),
            restore_lease: Duration::from_secs(30),
            max_message_size: crate::settings::DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    /// How long a task taken back at start as a client's, whose hand-over may not have
    /// reached it (it was handed over within a second of the broker's stop), is kept for
    /// that client before it goes back to the queue. The client claims it sooner by settling
    /// it, by saying it holds it (kiwimq's clients do on reconnect), or — AiiDA's — by
    /// serving the RPC of the process the task continues. Longer spares a slow worker's task
    /// from running twice; shorter brings a lost hand-over back sooner.
    #[must_use]
    pub fn with_restore_lease(mut self, lease: Duration) -> Self {
        self.restore_lease = lease;
        self
    }

    /// The largest message a client may send (libzmq drops the connection of a client
    /// that sends more); the default is kiwimq's clients' own default limit.
    #[must_use]
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How long a worker that stopped answering keeps its tasks before they go to another
    /// worker. Longer spares a stalled worker's work from running twice; shorter brings a
    /// dead worker's tasks back sooner.
    #[must_use]
    pub fn with_worker_grace(mut self, grace: Duration) -> Self {
        self.worker_grace = grace;
        self
    }

    /// How long an RPC waits for its answer in the broker before the caller gets an error.
    #[must_use]
    pub fn with_rpc_timeout(mut self, timeout: Duration) -> Self {
        self.rpc_timeout = timeout;
        self
    }

    /// Opens the storage, binds the socket, writes the service files and serves on a
    /// thread of its own. Refuses when another broker serves the directory (kiwimq's, which
    /// holds its lock; or AiiDA's, which its `broker.pid` names).
    pub fn start(self) -> Result<RunningBroker> {
        let (waker, wakee) = UnixStream::pair()
            .and_then(|(a, b)| {
                a.set_nonblocking(true)?;
                b.set_nonblocking(true)?;
                Ok((a, b))
            })
            .map_err(|e| io_error("a waker", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake_store = waker.try_clone().map_err(|e| io_error("a waker", e))?;
        // The store's materializer wakes the loop when more stored tasks can go out.
        let wake: Wake = Box::new(move || {
            let _ = (&wake_store).write(&[1]);
        });
        let server = Server::open(&self, wakee, wake, stop.clone())?;
        let socket = server.files.socket.clone();
        let thread = std::thread::Builder::new()
            .name("kiwimq-broker".into())
            .spawn(move || server.run())
            .map_err(|e| io_error("the broker thread", e))?;
        Ok(RunningBroker {
            service_dir: self.service_dir,
            socket,
            stop,
            waker,
            thread: Some(thread),
        })
    }
}

fn io_error(what: &str, error: std::io::Error) -> Error {
    Error::connection(format!("broker: {what}: {error}"))
}

fn zmq_error(what: &str, error: zmq::Error) -> Error {
    Error::connection(format!("broker: {what}: {error}"))
}

/// A broker serving; stopping it (or dropping it) shuts it down cleanly: the service files
/// go, the tasks stay.
#[derive(Debug)]
pub struct RunningBroker {
    service_dir: PathBuf,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    waker: UnixStream,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl RunningBroker {
    /// `zmq:///SERVICE_DIR`, for [`connect`](crate::connect).
    pub fn uri(&self) -> String {
        format!("zmq://{}", self.service_dir.display())
    }

    /// `zmq+ipc:///…/router.sock`: the socket, the same after every restart.
    pub fn socket_uri(&self) -> String {
        format!("zmq+ipc://{}", self.socket.display())
    }

    /// Whether it still serves (it ends by itself only on an error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Shuts down and waits for it; the error it ended with, if any.
    pub fn stop(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        let _ = (&self.waker).write(&[1]);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(Error::connection("the broker thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        if let Err(error) = self.finish() {
            tracing::error!(%error, "the broker ended with an error");
        }
    }
}

/// An identity for a log line: as text when it is printable (AiiDA's and kiwimq's clients
/// name themselves `client-<hex>`), else in hex.
fn shown(identity: &[u8]) -> String {
    match std::str::from_utf8(identity) {
        Ok(text) if text.chars().all(|c| c.is_ascii_graphic()) => text.to_owned(),
        _ => hex(identity),
    }
}

/// A task received this round, with who to confirm it to.
struct Arrival {
    task: StoredTask,
    from: ClientId,
    confirm: bool,
    /// A resend of a task that arrived earlier this round: confirmed with it, not stored.
    resent: bool,
}

/// The ids of tasks acked lately, oldest first (bounded in time and count).
#[derive(Default)]
struct RecentIds {
    order: VecDeque<(Instant, String)>,
    ids: HashSet<String>,
}

impl RecentIds {
    fn insert(&mut self, id: &str) {
        if self.ids.insert(id.to_owned()) {
            self.order.push_back((Instant::now(), id.to_owned()));
        }
        self.prune(Instant::now());
    }

    fn prune(&mut self, now: Instant) {
        while let Some((at, id)) = self.order.front() {
            if now.duration_since(*at) < ACKED_MEMORY && self.order.len() <= ACKED_KEPT {
                break;
            }
            self.ids.remove(id);
            self.order.pop_front();
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// The newest `count` ids, oldest first.
    fn newest(&self, count: usize) -> Vec<String> {
        let skip = self.order.len().saturating_sub(count);
        self.order
            .iter()
            .skip(skip)
            .map(|(_, id)| id.clone())
            .collect()
    }
}

/// Where a task's result goes, and from whom it is taken.
struct ResultRoute {
    sender: ClientId,
    /// The client the task was handed to: only its result is passed on.
    holder: Option<ClientId>,
    /// When the task was acked (its result may follow the ack).
    acked: Option<Instant>,
}

/// What a task id that arrives again is.
enum Repeat {
    /// A resend of the task stored (or acked) under it: confirmed again, not stored.
    Resent,
    /// Another task under a taken id: refused.
    Conflict,
}

/// The pid a plumpy `continue` task's body names, as the RPC identifier of its process.
fn continued_pid(body: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Args {
        pid: serde_json::Value,
    }
    #[derive(serde::Deserialize)]
    struct Continue {
        task: String,
        args: Args,
    }
    let parsed: Continue = serde_json::from_str(body.get()).ok()?;
    match (parsed.task.as_str(), parsed.args.pid) {
        ("continue", serde_json::Value::Number(pid)) => Some(pid.to_string()),
        ("continue", serde_json::Value::String(pid)) => Some(pid),
        _ => None,
    }
}

/// The serving loop's state; lives on the broker thread.
struct Server {
    /// Held for the broker's life: no second broker serves the directory.
    lock: ServiceLock,
    router: zmq::Socket,
    _context: zmq::Context,
    wakee: UnixStream,
    stop: Arc<AtomicBool>,
    files: ServiceFiles,
    state_file: PathBuf,
    /// The changes since the last snapshot of `state_file`.
    log: StateLog,
    store: Store,
    grace: Duration,
    restore_lease: Duration,
    /// This broker's `sender`, as AiiDA's pings carry it.
    sender: Box<RawValue>,

    dispatcher: Dispatcher,
    rpcs: RpcRouter,
    /// Clients that watch presence announcements (kiwimq's own message types; not kept
    /// across a restart: a watcher subscribes again as it reconnects).
    presence_watchers: HashSet<ClientId>,
    /// When each task held was handed over (seconds since the epoch), written down with it.
    handed_at: HashMap<String, f64>,
    /// The leased tasks that continue a process: task id → the process's RPC identifier,
    /// whose subscription by the holder claims the task.
    lease_pids: HashMap<String, String>,
    result_routes: HashMap<String, ResultRoute>,
    /// Clients found unreachable, since when; their tasks are kept until the grace ends.
    unreachable: HashMap<ClientId, Instant>,
    acked: RecentIds,
    arrivals: Vec<Arrival>,
    /// Arrivals of this round by task id.
    arrival_ids: HashMap<String, usize>,
    /// The state changed since the last snapshot (the log holds what changed): a snapshot
    /// is written at the next tick.
    dirty: bool,
}

impl Server {
    fn open(
        options: &Broker,
        wakee: UnixStream,
        wake: Wake,
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        let dir = &options.service_dir;
        std::fs::create_dir_all(dir).map_err(|e| io_error("the service directory", e))?;
        // Before anything of the directory is read: a second broker stops here.
        let lock = ServiceLock::take(dir)?;
        let files = ServiceFiles::new(dir);
        let storage = dir.join("storage");
        let store = Store::open(&storage.join("tasks"), wake)
            .map_err(|e| io_error("the task storage", e))?;
        let state_file = storage.join("broker-state.json");
        let log_file = storage.join("broker-state.log");
        let persisted = PersistedState::restore(&state_file, &log_file);
        let log = StateLog::open(&log_file).map_err(|e| io_error("broker-state.log", e))?;
        files.prepare_socket_dir()?;
        let context = zmq::Context::new();
        let router = context
            .socket(zmq::ROUTER)
            .map_err(|e| zmq_error("a ROUTER socket", e))?;
        let max_message_size = i64::try_from(options.max_message_size).unwrap_or(i64::MAX);
        let options_set = || -> std::result::Result<(), zmq::Error> {
            router.set_router_mandatory(true)?;
            // A client reconnecting with its identity replaces its old, dead connection.
            router.set_router_handover(true)?;
            router.set_linger(0)?;
            router.set_heartbeat_ivl(2000)?;
            router.set_heartbeat_timeout(6000)?;
            router.set_sndhwm(10_000)?;
            router.set_rcvhwm(10_000)?;
            router.set_maxmsgsize(max_message_size)?;
            Ok(())
        };
        options_set().map_err(|e| zmq_error("socket options", e))?;
        let endpoint = format!("ipc://{}", files.socket.display());
        router
            .bind(&endpoint)
            .map_err(|e| zmq_error(&format!("binding {endpoint}"), e))?;

        // Delivery numbers never go back: above the last run's, and above the clock's µs
        // (for a state file lost).
        let clock_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let floor = persisted.next_delivery.max(clock_us);
        let mut server = Self {
            lock,
            router,
            _context: context,
            wakee,
            stop,
            files,
            state_file,
            log,
            store,
            grace: options.worker_grace,
            restore_lease: options.restore_lease,
            sender: json_string("broker"),
            dispatcher: Dispatcher::new(floor),
            rpcs: RpcRouter::new(options.rpc_timeout),
            presence_watchers: HashSet::new(),
            handed_at: HashMap::new(),
            lease_pids: HashMap::new(),
            result_routes: HashMap::new(),
            unreachable: HashMap::new(),
            acked: RecentIds::default(),
            arrivals: Vec::new(),
            arrival_ids: HashMap::new(),
            dirty: true,
        };
        server.restore(persisted);
        server.persist();
        server.lock.touch();
        server.files.announce()?;
        server.write_status();
        tracing::info!(socket = %endpoint, pending = server.store.pending(), "broker serving");
        Ok(server)
    }

    /// Takes back what the last run knew: subscriptions, limits, and each task's holder —
    /// who is given the grace period to come back for it. A hand-over made in the last
    /// moments of the last run is leased.
    fn restore(&mut self, persisted: PersistedState) {
        let now = Instant::now();
        let decode = |map: HashMap<String, String>| -> HashMap<String, ClientId> {
            map.into_iter()
                .filter_map(|(key, identity)| Some((key, unhex(&identity)?)))
                .collect()
        };
        for id in &persisted.recently_acked {
            self.acked.insert(id);
        }
        for (identifier, client) in decode(persisted.task_subscribers) {
            self.dispatcher.restore_subscription(identifier, client);
        }
        for (identifier, client) in decode(persisted.rpc_subscribers) {
            self.rpcs.subscribe(identifier, client);
        }
        for (identity, limit) in persisted.prefetch {
            if let Some(client) = unhex(&identity) {
                self.dispatcher.restore_limit(client, limit);
            }
        }
        // The last run's last sign of life: a hand-over after (or just before) it may still
        // have been in the socket's queue when it stopped.
        let alive = self
            .lock
            .previous_alive()
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .map(|at| at.as_secs_f64());
        let held = decode(persisted.assignments);
        let mut leased = 0;
        for task_id in self.store.claim_all(&held) {
            let Some(holder) = held.get(&task_id).cloned() else {
                continue;
            };
            let hand_over = persisted.deliveries.get(&task_id).copied();
            let uncertain = match (hand_over, alive) {
                (Some(hand_over), Some(alive)) => hand_over.at >= alive - HANDOVER.as_secs_f64(),
                (Some(_), None) => true,
                // A state file from before delivery numbers: as that version restored it.
                (None, _) => false,
            };
            let delivery =
                hand_over.map_or_else(|| self.dispatcher.next_delivery(), |h| h.delivery);
            let assignment = Assignment {
                holder: holder.clone(),
                delivery,
                restored: true,
                lease: uncertain.then(|| now + self.restore_lease),
            };
            if !self.dispatcher.restore(task_id.clone(), assignment) {
                continue;
            }
            self.handed_at
                .insert(task_id.clone(), hand_over.map_or_else(unix_now, |h| h.at));
            self.unreachable.entry(holder.clone()).or_insert(now);
            if uncertain {
                leased += 1;
                let pid = self
                    .store
                    .held(&task_id)
                    .and_then(|t| continued_pid(&t.body));
                match pid {
                    Some(pid) if self.rpcs.serves(&holder, &pid) => {
                        self.dispatcher.claim(&holder, &task_id);
                    }
                    Some(pid) => {
                        self.lease_pids.insert(task_id, pid);
                    }
                    None => {}
                }
            }
        }
        if leased > 0 {
            tracing::info!(
                leased, lease = ?self.restore_lease,
                "tasks handed over as the last run stopped may not have reached their workers: \
                 leased to them until they claim them"
            );
        }
        // A route whose task is not held any more waits only the result's time to live.
        self.result_routes = decode(persisted.result_routes)
            .into_iter()
            .map(|(task_id, sender)| {
                let holder = self
                    .dispatcher
                    .assignment(&task_id)
                    .map(|a| a.holder.clone());
                let acked = holder.is_none().then_some(now);
                let route = ResultRoute {
                    sender,
                    holder,
                    acked,
                };
                (task_id, route)
            })
            .collect();
        // Everyone known is unreachable until it shows itself (clients reconnect by
        // themselves within a second; a ping then finds them).
        for identity in self.clients(false) {
            self.unreachable.entry(identity).or_insert(now);
        }
    }

    /// Writes a snapshot of the state, durably, if it changed; then empties the log.
    fn persist(&mut self) {
        if !self.dirty && self.log.lines() == 0 {
            return;
        }
        self.dirty = false;
        let encode = |map: &HashMap<String, ClientId>| -> HashMap<String, String> {
            map.iter().map(|(k, v)| (k.clone(), hex(v))).collect()
        };
        let assignments = self.dispatcher.assignments();
        let state = PersistedState {
            task_subscribers: encode(self.dispatcher.subscriptions()),
            rpc_subscribers: encode(self.rpcs.subscriptions()),
            prefetch: self
                .dispatcher
                .limits()
                .iter()
                .map(|(k, v)| (hex(k), *v))
                .collect(),
            assignments: assignments
                .iter()
                .map(|(task_id, a)| (task_id.clone(), hex(&a.holder)))
                .collect(),
            deliveries: assignments
                .iter()
                .map(|(task_id, a)| {
                    let at = self
                        .handed_at
                        .get(task_id)
                        .copied()
                        .unwrap_or_else(unix_now);
                    let hand_over = HandOver {
                        delivery: a.delivery,
                        at,
                    };
                    (task_id.clone(), hand_over)
                })
                .collect(),
            next_delivery: self.dispatcher.next_delivery(),
            result_routes: self
                .result_routes
                .iter()
                .map(|(k, route)| (k.clone(), hex(&route.sender)))
                .collect(),
            recently_acked: self.acked.newest(ACKED_SAVED),
        };
        match state.save(&self.state_file) {
            Ok(()) => {
                if let Err(error) = self.log.clear() {
                    tracing::error!(%error, "cannot empty broker-state.log");
                }
            }
            Err(error) => tracing::error!(%error, "cannot write broker-state.json"),
        }
    }

    /// Writes a change down before it shows outside, and marks a snapshot due.
    fn record(&mut self, change: Change) {
        self.log.record(std::slice::from_ref(&change));
        self.dirty = true;
    }

    fn write_status(&self) {
        let count = |n: usize| Some(n as u64);
        self.files.write_status(&ServiceStatus {
            running: true,
            pending_tasks: count(self.store.pending()),
            processing_tasks: count(self.store.processing()),
            task_subscribers: count(self.dispatcher.subscriptions().len()),
            rpc_subscribers: count(self.rpcs.subscriptions().len()),
            available_workers: count(self.dispatcher.available()),
            in_flight_tasks: count(self.dispatcher.assignments().len()),
            pending_rpc_responses: count(self.rpcs.pending()),
            timestamp: Some(unix_now()),
            pid: Some(u64::from(std::process::id())),
            broker: Some(KIWIMQ.to_owned()),
        });
    }

    fn run(mut self) -> Result<()> {
        let mut last_status = Instant::now();
        let mut last_tick = Instant::now();
        let mut last_snapshot = Instant::now();
        let result = loop {
            if self.stop.load(Ordering::Acquire) {
                break Ok(());
            }
            let mut items = [
                self.router.as_poll_item(zmq::POLLIN),
                zmq::PollItem::from_fd(self.wakee.as_raw_fd(), zmq::POLLIN),
            ];
            if let Err(error) = zmq::poll(&mut items, TICK.as_millis() as i64) {
                if error == zmq::Error::EINTR {
                    continue;
                }
                break Err(zmq_error("poll", error));
            }
            if items[1].is_readable() {
                let mut sink = [0u8; 64];
                while matches!((&self.wakee).read(&mut sink), Ok(n) if n > 0) {}
            }
            if items[0].is_readable() {
                self.read_messages();
            }
            self.store_arrivals();
            self.dispatch();
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.lock.touch();
                self.probe();
                self.expire();
                if let Err(error) = self.store.sync() {
                    tracing::warn!(%error, "cannot sync the task directories");
                }
                // The log holds every change between snapshots: a synced snapshot every few
                // seconds, or sooner when the log is long, is enough.
                if last_snapshot.elapsed() >= SNAPSHOT_INTERVAL
                    || self.log.lines() >= SNAPSHOT_LINES
                {
                    last_snapshot = Instant::now();
                    self.persist();
                }
            }
            if last_status.elapsed() >= STATUS_INTERVAL {
                last_status = Instant::now();
                self.write_status();
            }
        };
        self.dirty = true;
        self.persist();
        if !self.store.flush(Duration::from_secs(30)) {
            tracing::warn!(
                "stored tasks not yet in pending/ are left in the journal for the next start"
            );
        }
        let _ = self.store.sync();
        self.files.remove();
        tracing::info!("broker stopped");
        result
    }

    fn read_messages(&mut self) {
        // At most a batch a round, so the stored tasks are confirmed in bounded time.
        for _ in 0..BATCH {
            let frames = match self.router.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return,
                Err(error) => return tracing::error!(%error, "reading the socket failed"),
            };
            let Some((identity, rest)) = frames.split_first() else {
                continue;
            };
            let Some(payload) = rest.iter().rev().find(|f| !f.is_empty()) else {
                continue;
            };
            let identity = identity.clone();
            // A client that speaks is reachable.
            self.back(&identity);
            match Incoming::parse(payload) {
                Ok(message) => self.handle(identity, message),
                Err(error) => {
                    tracing::warn!(client = %shown(&identity), %error, "an unreadable message was dropped");
                }
            }
        }
    }

    fn handle(&mut self, identity: ClientId, message: Incoming<'_>) {
        match message.kind.as_deref() {
            Some(kind::TASK) => self.on_task(identity, message),
            Some(kind::TASK_ACK) | Some(kind::TASK_NACK) => {
                let ack = message.kind.as_deref() == Some(kind::TASK_ACK);
                if let Some(task_id) = message.task_id {
                    self.settle(&identity, &task_id, message.delivery, ack);
                }
            }
            Some(kind::TASK_RESPONSE) => self.on_result(&identity, message),
            Some(kind::RPC) => self.on_rpc(identity, message),
            Some(kind::RPC_RESPONSE) => self.on_rpc_response(&identity, message),
            Some(kind::BROADCAST) => {
                let bytes = Outgoing {
                    body: Some(message.body.unwrap_or_else(|| null())),
                    subject: Some(message.subject.unwrap_or_else(|| null())),
                    correlation_id: Some(message.correlation_id.unwrap_or_else(|| null())),
                    id: message.id.clone().unwrap_or_default(),
                    ..Outgoing::new(kind::BROADCAST, message.sender.unwrap_or_else(|| null()))
                }
                .encode();
                for client in self.clients(false) {
                    self.send(&client, &bytes);
                }
            }
            Some(kind::SUBSCRIBE_TASK) => {
                let Some(identifier) = message_identifier(&message) else {
                    return;
                };
                let limit = message
                    .prefetch_count
                    .filter(|n| *n > 0)
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
                self.record(Change::SubscribeTask {
                    identifier: identifier.clone(),
                    client: hex(&identity),
                    limit,
                });
                self.dispatcher.subscribe(identifier, &identity, limit);
            }
            Some(kind::SUBSCRIBE_RPC) => {
                if let Some(identifier) = message_identifier(&message) {
                    self.record(Change::SubscribeRpc {
                        identifier: identifier.clone(),
                        client: hex(&identity),
                    });
                    self.claim_by_rpc(&identity, &identifier);
                    self.rpcs.subscribe(identifier, identity);
                }
            }
            Some(kind::UNSUBSCRIBE_TASK) => {
                if let Some(identifier) = message_identifier(&message) {
                    self.record(Change::UnsubscribeTask {
                        identifier: identifier.clone(),
                        client: hex(&identity),
                    });
                    self.dispatcher.unsubscribe(&identifier, &identity);
                }
            }
            Some(kind::UNSUBSCRIBE_RPC) => {
                if let Some(identifier) = message_identifier(&message)
                    && self.rpcs.serves(&identity, &identifier)
                {
                    self.record(Change::UnsubscribeRpc {
                        identifier: identifier.clone(),
                        client: hex(&identity),
                    });
                    self.rpcs.unsubscribe(&identifier, &identity);
                }
            }
            Some(kind::PING) => {}
            Some(kind::PRESENCE) => {
                let bytes = Outgoing {
                    body: Some(message.body.unwrap_or_else(|| null())),
                    id: message.id.clone().unwrap_or_default(),
                    ..Outgoing::new(kind::PRESENCE, message.sender.unwrap_or_else(|| null()))
                }
                .encode();
                let watchers: Vec<ClientId> = self.presence_watchers.iter().cloned().collect();
                for watcher in watchers {
                    self.send(&watcher, &bytes);
                }
            }
            Some(kind::HOLDING) => self.on_holding(&identity, message.task_ids.unwrap_or_default()),
            Some(kind::WATCH_PRESENCE) => {
                if self.presence_watchers.len() >= MAX_PRESENCE_WATCHERS
                    && !self.presence_watchers.contains(&identity)
                {
                    return tracing::warn!(client = %shown(&identity), "too many presence watchers: one more was refused");
                }
                self.presence_watchers.insert(identity);
            }
            Some(kind::UNWATCH_PRESENCE) => {
                self.presence_watchers.remove(&identity);
            }
            other => tracing::warn!(kind = ?other, "a message of unknown type was dropped"),
        }
    }

    fn on_task(&mut self, from: ClientId, message: Incoming<'_>) {
        let id = message.id.clone().unwrap_or_else(super::protocol::new_id);
        if !super::store::usable_task_id(&id) {
            // Its file could not be named after it (AiiDA's ids are `uuid4().hex`).
            return self.refuse_task(
                &from,
                &id,
                "a task id must be 1 to 128 ASCII letters, digits, '-' or '_'",
            );
        }
        let body = message.body.unwrap_or_else(|| null()).to_owned();
        let no_reply = message.no_reply.unwrap_or(false);
        let results = message.results == Some(true);
        match self.repeat(&id, &from, &body) {
            None => {}
            Some(Repeat::Conflict) => {
                tracing::warn!(client = %shown(&from), task_id = %id, "a task under an id another task holds was refused");
                return self.refuse_task(
                    &from,
                    &id,
                    "a task id must be new: another task holds this one",
                );
            }
            Some(Repeat::Resent) => {
                tracing::debug!(client = %shown(&from), task_id = %id, "a task sent again was confirmed again, not stored twice");
                if let Some(&at) = self.arrival_ids.get(&id) {
                    let first = &self.arrivals[at];
                    let task = first.task.clone();
                    self.arrivals.push(Arrival {
                        task,
                        from,
                        confirm: !no_reply,
                        resent: true,
                    });
                    return;
                }
                if !no_reply {
                    self.confirm_task(&from, &id, results);
                }
                return;
            }
        }
        let sender = message
            .sender
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or(serde_json::Value::Null);
        self.arrival_ids.insert(id.clone(), self.arrivals.len());
        self.arrivals.push(Arrival {
            task: StoredTask {
                id: Some(id),
                sender,
                sender_identity: Some(hex(&from)),
                body,
                no_reply,
                timestamp: unix_now(),
                results,
            },
            from,
            confirm: !no_reply,
            resent: false,
        });
    }

    /// Whether a task arriving under `id` repeats one known: arrived this round, stored
    /// (waiting or handed out), or acked lately. The same sender or the same body is a resend.
    fn repeat(&self, id: &str, from: &ClientId, body: &RawValue) -> Option<Repeat> {
        let same = |task: &StoredTask| {
            task.sender_identity.as_deref() == Some(hex(from).as_str())
                || task.body.get() == body.get()
        };
        if let Some(&at) = self.arrival_ids.get(id) {
            return Some(if same(&self.arrivals[at].task) {
                Repeat::Resent
            } else {
                Repeat::Conflict
            });
        }
        match self.store.lookup(id) {
            Lookup::Present(Some(task)) if !same(&task) => Some(Repeat::Conflict),
            // Stored, and the same (or unreadable now: one id, one task either way).
            Lookup::Present(_) => Some(Repeat::Resent),
            Lookup::Absent => self.acked.contains(id).then_some(Repeat::Resent),
        }
    }

    fn confirm_task(&mut self, to: &ClientId, task_id: &str, results: bool) {
        let confirm = Outgoing {
            task_id: Some(task_id),
            result: Some(RawValue::TRUE),
            results: results.then_some(true),
            ..Outgoing::new(kind::TASK_RESPONSE, &self.sender)
        }
        .encode();
        self.send(to, &confirm);
    }

    fn refuse_task(&mut self, to: &ClientId, task_id: &str, error: &str) {
        let refusal = Outgoing {
            task_id: Some(task_id),
            result: Some(RawValue::FALSE),
            error: Some(Some(error)),
            ..Outgoing::new(kind::TASK_RESPONSE, &self.sender)
        }
        .encode();
        self.send(to, &refusal);
    }

    /// Stores what arrived this round, durably, then confirms it; or, if it cannot be
    /// stored, refuses it (the senders are told, and nothing is half-stored under a
    /// confirm).
    fn store_arrivals(&mut self) {
        if self.arrivals.is_empty() {
            return;
        }
        let arrivals = std::mem::take(&mut self.arrivals);
        self.arrival_ids.clear();
        let tasks: Vec<StoredTask> = arrivals
            .iter()
            .filter(|a| !a.resent)
            .map(|a| a.task.clone())
            .collect();
        let stored = self.store.push_all(&tasks);
        if let Err(error) = &stored {
            tracing::error!(%error, count = tasks.len(), "tasks could not be stored: refused");
        }
        for arrival in arrivals {
            let id = arrival.task.id.as_deref().unwrap_or_default();
            match &stored {
                Ok(()) if arrival.confirm => {
                    self.confirm_task(&arrival.from, id, arrival.task.results);
                }
                Ok(()) => {}
                // Said even to a sender that asked for no reply: its client may listen.
                Err(error) => {
                    let text = format!("the broker cannot store the task: {error}");
                    self.refuse_task(&arrival.from, id, &text);
                }
            }
        }
    }

    /// Every client holding a subscription (and, with `holders`, a task), once each.
    fn clients(&self, holders: bool) -> Vec<ClientId> {
        let held = self
            .dispatcher
            .assignments()
            .values()
            .filter(|_| holders)
            .map(|a| &a.holder);
        let unique: HashSet<&ClientId> = self
            .dispatcher
            .subscriptions()
            .values()
            .chain(self.rpcs.subscriptions().values())
            .chain(held)
            .collect();
        unique.into_iter().cloned().collect()
    }

    /// A client unreachable until now showed itself: it gets tasks again.
    fn back(&mut self, identity: &ClientId) {
        if self.unreachable.remove(identity).is_some() {
            tracing::info!(client = %shown(identity), "a client is back");
            self.dispatcher.mark_available(identity);
        }
    }

    /// Hands pending tasks round-robin to workers with room. Who holds what is written down
    /// (in the state's log) before a task leaves, so a broker killed mid-dispatch still knows after its
    /// restart that the task is taken and waits for its worker rather than running it twice.
    fn dispatch(&mut self) {
        let mut handed = Vec::new();
        let mut changes = Vec::new();
        while self.store.pending() > 0 {
            let unreachable = &self.unreachable;
            let Some(worker) = self
                .dispatcher
                .next_worker(|client| !unreachable.contains_key(client))
            else {
                break;
            };
            let Some((task_id, task)) = self.store.pop() else {
                self.dispatcher.put_back(worker);
                break;
            };
            let Some(delivery) = self.dispatcher.assign(&task_id, &worker) else {
                // The store keeps one id once, so this cannot be; said if it is.
                tracing::error!(%task_id, "a task handed out is held already: left with its holder");
                self.dispatcher.put_back(worker);
                continue;
            };
            let bytes = Outgoing {
                id: task_id.clone(),
                body: Some(&task.body),
                no_reply: Some(task.no_reply),
                delivery: Some(delivery),
                ..Outgoing::new(kind::TASK, &self.sender)
            }
            .encode();
            let at = unix_now();
            self.handed_at.insert(task_id.clone(), at);
            let route = task
                .results
                .then(|| task.sender_identity.as_deref().and_then(unhex))
                .flatten();
            changes.push(Change::Assign {
                task: task_id.clone(),
                client: hex(&worker),
                delivery,
                at,
                route: route.as_deref().map(hex),
            });
            if let Some(sender) = route {
                let route = ResultRoute {
                    sender,
                    holder: Some(worker.clone()),
                    acked: None,
                };
                self.result_routes.insert(task_id.clone(), route);
            }
            handed.push((worker, task_id, delivery, bytes));
        }
        if handed.is_empty() {
            return;
        }
        // Written down before the tasks leave; if it cannot be, they do not leave.
        self.dirty = true;
        if !self.log.record(&changes) {
            for (worker, task_id, delivery, _) in handed {
                self.settle(&worker, &task_id, Some(delivery), false);
            }
            return;
        }
        for (worker, task_id, delivery, bytes) in handed {
            let sent = self
                .router
                .send_multipart([&worker[..], b"", &bytes], zmq::DONTWAIT);
            if let Err(error) = sent {
                tracing::warn!(worker = %shown(&worker), %error, "a task could not be handed over; back in the queue");
                self.settle(&worker, &task_id, Some(delivery), false);
                if error == zmq::Error::EHOSTUNREACH {
                    self.unreachable.entry(worker).or_insert_with(Instant::now);
                }
            }
        }
    }

    /// A client settles a task it holds (for the delivery it names, if it names one).
    fn settle(&mut self, identity: &ClientId, task_id: &str, delivery: Option<u64>, ack: bool) {
        match self.dispatcher.settle(identity, task_id, delivery) {
            Ok(()) => self.settled_task(task_id, ack),
            Err(Refusal::OtherHolder) => {
                tracing::warn!(client = %shown(identity), %task_id, "a settle of a task another client holds was refused");
            }
            Err(Refusal::StaleDelivery) => {
                tracing::info!(client = %shown(identity), %task_id, "a settle of an earlier delivery of a task (sent again after a reconnect) was ignored");
            }
            // A settle sent again after a reconnect, of a task already settled.
            Err(Refusal::NotHeld) => {
                tracing::debug!(client = %shown(identity), %task_id, "a settle of a task no one holds was ignored");
            }
        }
    }

    /// A task the dispatcher let go: acked or back in the queue.
    fn settled_task(&mut self, task_id: &str, ack: bool) {
        self.handed_at.remove(task_id);
        self.lease_pids.remove(task_id);
        // The store first, the log after: a stop between the two leaves a hand-over written
        // down whose task is gone (a restart takes back only tasks still stored), never a
        // task stored whose hand-over is forgotten (it would go out again).
        if ack {
            self.store.ack(task_id);
            self.acked.insert(task_id);
            if let Some(route) = self.result_routes.get_mut(task_id) {
                route.acked = Some(Instant::now());
            }
        } else {
            self.store.nack(task_id);
            self.result_routes.remove(task_id);
        }
        self.record(Change::Release {
            task: task_id.to_owned(),
            acked: ack,
        });
    }

    /// Requeues tasks the dispatcher released for a holder (gone, lease ended, never
    /// reached).
    fn requeue_released(&mut self, task_ids: Vec<String>) {
        for task_id in task_ids {
            self.settled_task(&task_id, false);
        }
    }

    /// A client back after a restart says which tasks it holds: those taken back as its own
    /// that it does not hold never reached it, and go back to the queue.
    fn on_holding(&mut self, identity: &ClientId, holding: Vec<String>) {
        let holding: HashSet<String> = holding.into_iter().collect();
        let lost = self.dispatcher.holding(identity, &holding);
        if lost.is_empty() {
            return;
        }
        tracing::info!(
            client = %shown(identity), count = lost.len(),
            "tasks handed to a client just before the broker stopped never reached it; requeued"
        );
        self.requeue_released(lost);
    }

    /// A client serves a process's RPC: a leased task continuing that process is its own.
    fn claim_by_rpc(&mut self, identity: &ClientId, identifier: &str) {
        let claimed: Vec<String> = self
            .lease_pids
            .iter()
            .filter(|(_, pid)| *pid == identifier)
            .map(|(task_id, _)| task_id.clone())
            .collect();
        for task_id in claimed {
            if self.dispatcher.claim(identity, &task_id) {
                self.lease_pids.remove(&task_id);
            }
        }
    }

    /// A worker's result: to the sender that asked for it, else dropped (as AiiDA's).
    fn on_result(&mut self, from: &ClientId, message: Incoming<'_>) {
        let Some(task_id) = message.task_id.as_deref() else {
            return;
        };
        // Taken only from the client the task was handed to.
        match self.result_routes.get(task_id) {
            Some(route) if route.holder.as_ref().is_none_or(|holder| holder == from) => {}
            Some(_) => {
                return tracing::warn!(client = %shown(from), %task_id, "a result from a client the task was not handed to was refused");
            }
            None => return,
        }
        let Some(ResultRoute { sender, .. }) = self.result_routes.remove(task_id) else {
            return;
        };
        self.dirty = true;
        let frame = Outgoing {
            task_id: Some(task_id),
            result: Some(message.result.unwrap_or_else(|| null())),
            error: Some(message.error.as_deref()),
            ..Outgoing::new(
                kind::TASK_RESPONSE,
                message.sender.unwrap_or_else(|| null()),
            )
        };
        self.send(&sender, &frame.encode());
    }

    fn on_rpc(&mut self, caller: ClientId, message: Incoming<'_>) {
        let rpc_id = message.id.clone().unwrap_or_default();
        let recipient = message.recipient();
        let target = match self.rpcs.route(&rpc_id, recipient.as_deref()) {
            Ok(target) => target,
            Err(error) => return self.rpc_error(&caller, &rpc_id, &error),
        };
        let recipient = recipient.unwrap_or_default();
        let bytes = Outgoing {
            id: rpc_id.clone(),
            recipient: Some(&recipient),
            body: Some(message.body.unwrap_or_else(|| null())),
            ..Outgoing::new(kind::RPC, message.sender.unwrap_or_else(|| null()))
        }
        .encode();
        match self
            .router
            .send_multipart([&target[..], b"", &bytes], zmq::DONTWAIT)
        {
            Ok(()) => self.rpcs.forwarded(rpc_id, caller, target),
            Err(error) => {
                let reason = if error == zmq::Error::EAGAIN {
                    format!("Recipient busy: {recipient}")
                } else {
                    self.unreachable.entry(target).or_insert_with(Instant::now);
                    format!("Recipient not found: {recipient}")
                };
                self.rpc_error(&caller, &rpc_id, &reason);
            }
        }
    }

    fn on_rpc_response(&mut self, from: &ClientId, message: Incoming<'_>) {
        let Some(rpc_id) = message.rpc_id.as_deref() else {
            return;
        };
        match self.rpcs.answer(from, rpc_id) {
            Ok(caller) => {
                let frame = Outgoing {
                    rpc_id: Some(rpc_id),
                    result: Some(message.result.unwrap_or_else(|| null())),
                    error: Some(message.error.as_deref()),
                    ..Outgoing::new(kind::RPC_RESPONSE, message.sender.unwrap_or_else(|| null()))
                };
                self.send(&caller, &frame.encode());
            }
            Err(Unanswered::NotTheRecipient) => {
                tracing::warn!(client = %shown(from), %rpc_id, "an answer from a client the RPC did not go to was refused");
            }
            Err(Unanswered::NotWaiting) => {
                tracing::debug!(%rpc_id, "an answer nobody waits for (expired?)");
            }
        }
    }

    fn rpc_error(&mut self, caller: &ClientId, rpc_id: &str, error: &str) {
        let frame = Outgoing {
            rpc_id: Some(rpc_id),
            result: Some(null()),
            error: Some(Some(error)),
            ..Outgoing::new(kind::RPC_RESPONSE, &self.sender)
        }
        .encode();
        self.send(caller, &frame);
    }

    /// Sends without blocking; a client it cannot reach is noted unreachable.
    fn send(&mut self, identity: &ClientId, bytes: &[u8]) {
        match self
            .router
            .send_multipart([&identity[..], b"", bytes], zmq::DONTWAIT)
        {
            Ok(()) => {}
            Err(zmq::Error::EHOSTUNREACH) => {
                self.unreachable
                    .entry(identity.clone())
                    .or_insert_with(Instant::now);
            }
            Err(error) => {
                tracing::warn!(client = %shown(identity), %error, "a message was not sent")
            }
        }
    }

    /// Pings every client that holds a task, a subscription or a presence watch: the
    /// reachable ones are struck off `unreachable`; those past the grace lose what they
    /// hold.
    fn probe(&mut self) {
        let mut known = self.clients(true);
        known.extend(
            self.presence_watchers
                .iter()
                .filter(|w| !known.contains(w))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let ping = Outgoing::new(kind::PING, &self.sender).encode();
        let now = Instant::now();
        for identity in known {
            match self
                .router
                .send_multipart([&identity[..], b"", &ping], zmq::DONTWAIT)
            {
                Ok(()) | Err(zmq::Error::EAGAIN) => self.back(&identity),
                Err(_) => {
                    let since = *self.unreachable.entry(identity.clone()).or_insert(now);
                    if now.duration_since(since) >= self.grace {
                        self.remove_client(&identity);
                    }
                }
            }
        }
        let mut known: HashSet<ClientId> = self.clients(true).into_iter().collect();
        known.extend(self.presence_watchers.iter().cloned());
        self.unreachable
            .retain(|identity, _| known.contains(identity));
    }

    fn remove_client(&mut self, identity: &ClientId) {
        let tasks = self.dispatcher.remove_client(identity);
        tracing::warn!(client = %shown(identity), tasks = tasks.len(), "a client gone past its grace: its tasks go back to the queue");
        self.requeue_released(tasks);
        self.record(Change::RemoveClient {
            client: hex(identity),
        });
        for (rpc_id, caller) in self.rpcs.remove_client(identity) {
            self.rpc_error(
                &caller,
                &rpc_id,
                "Recipient gone: the client serving it is unreachable",
            );
        }
        self.presence_watchers.remove(identity);
        self.unreachable.remove(identity);
    }

    /// Answers expired RPCs with an error, requeues the leased tasks not claimed in time,
    /// and forgets result routes gone stale.
    fn expire(&mut self) {
        let now = Instant::now();
        for (rpc_id, caller) in self.rpcs.expired(now) {
            let error = format!("no answer within {:?}", self.rpcs.timeout());
            self.rpc_error(&caller, &rpc_id, &error);
        }
        if self.dispatcher.has_leases() {
            let ended = self.dispatcher.expire_leases(now);
            if !ended.is_empty() {
                tracing::warn!(
                    count = ended.len(),
                    "tasks handed over as the last run stopped were not claimed within the lease: requeued"
                );
                self.requeue_released(ended);
            }
        }
        let before = self.result_routes.len();
        self.result_routes.retain(|_, route| {
            route
                .acked
                .is_none_or(|at| now.duration_since(at) < RESULT_ROUTE_TTL)
        });
        if self.result_routes.len() != before {
            self.dirty = true;
        }
        self.acked.prune(now);
    }
}

/// The identifier a subscription names (AiiDA falls back on the sender).
fn message_identifier(message: &Incoming<'_>) -> Option<String> {
    message
        .identifier
        .clone()
        .or_else(|| {
            message
                .sender
                .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
        })
        .filter(|identifier| !identifier.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_continue_tasks_pid_is_its_process_rpc_identifier() {
        let body = |text: &str| RawValue::from_string(text.to_owned()).unwrap();
        let of = |text: &str| continued_pid(&body(text));
        assert_eq!(
            of(r#"{"task":"continue","args":{"pid":8,"nowait":false,"tag":null}}"#),
            Some("8".into())
        );
        assert_eq!(
            of(r#"{"task":"continue","args":{"pid":"8"}}"#),
            Some("8".into())
        );
        assert_eq!(of(r#"{"task":"launch","args":{"pid":8}}"#), None);
        assert_eq!(of(r#"[1, 2]"#), None);
    }

    #[test]
    fn acked_ids_are_remembered_a_while_and_only_so_many() {
        let mut recent = RecentIds::default();
        recent.insert("a");
        assert!(recent.contains("a"));
        recent.prune(Instant::now() + ACKED_MEMORY);
        assert!(!recent.contains("a"));
        for n in 0..ACKED_KEPT + 10 {
            recent.insert(&n.to_string());
        }
        assert!(recent.ids.len() <= ACKED_KEPT);
        assert!(!recent.contains("0") && recent.contains(&(ACKED_KEPT + 9).to_string()));
    }
}
