//! kiwimq's ZeroMQ broker: AiiDA's protocol and files, without AiiDA's broker's faults.
//!
//! It writes `broker.pid` (`aiida-zeromq-broker <pid>`, so an AiiDA daemon takes it for its
//! own and starts none), `broker.sockets` and `broker.status` (every 5 s) in AiiDA's formats,
//! and keeps tasks in AiiDA's `storage/tasks/{pending,processing}` layout. Beyond AiiDA's:
//!
//! - a task is on disk before it is confirmed (in the store's journal, one sync for a
//!   batch), and its file and directory are synced before it is handed out;
//! - the socket is at the same path after every restart, and the subscriptions, prefetch
//!   limits and task assignments are kept in `storage/broker-state.json`: clients that
//!   reconnect with their identity (libzmq does by itself) go on, their acks accepted;
//! - a worker that stops answering keeps its tasks for a grace period (30 s by default)
//!   before they go to another worker, so a stalled worker (SIGSTOP, a long pause) that
//!   comes back does not run a task twice; a killed one's tasks run elsewhere after it;
//! - pending RPCs expire (their callers get an error), dead clients are dropped;
//! - no send blocks: a peer whose queue is full gets its task back in the queue, or its
//!   caller an error;
//! - a worker's task result goes back to a sender that asked for it (kiwimq's clients do,
//!   with the optional `results` field AiiDA's never send).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::journal::Wake;
use super::protocol::{Incoming, Outgoing, json_string, kind, null};
use super::store::{Store, StoredTask};
use crate::error::{Error, Result};

/// AiiDA's pid-file sentinel: the daemon calls a broker reachable by it.
const PID_SENTINEL: &str = "aiida-zeromq-broker";
/// How often `broker.status` is rewritten, as AiiDA's broker does.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// How often clients are probed and timers looked at.
const TICK: Duration = Duration::from_millis(250);
/// The most RPCs waiting for an answer at once; more are refused with an error.
const MAX_PENDING_RPCS: usize = 100_000;
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
}

impl Broker {
    /// A broker for `service_dir` (created if missing), with the default grace (30 s) and
    /// RPC timeout (5 min).
    pub fn new(service_dir: impl Into<PathBuf>) -> Self {
        Self {
            service_dir: service_dir.into(),
            worker_grace: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(300),
        }
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
    /// thread of its own. Refuses when another live broker holds the directory.
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

/// A stable, short directory for the socket of `service_dir` (IPC paths are limited to
/// about 107 bytes, which is why AiiDA's broker makes a temporary one each start).
fn sockets_dir(service_dir: &Path) -> PathBuf {
    // FNV-1a: stable across builds and versions, unlike the standard library's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in service_dir.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    std::env::temp_dir().join(format!("kiwimq_zeromq_{hash:016x}"))
}

/// The pid a service directory's `broker.pid` names, if that process is alive.
fn live_broker(pid_file: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let pid: u32 = text.split_whitespace().last()?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state is the field after the parenthesised command name.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    (state != "Z").then_some(pid)
}

/// The files of a service directory.
struct ServiceFiles {
    pid: PathBuf,
    status: PathBuf,
    sockets: PathBuf,
    socket_dir: PathBuf,
    socket: PathBuf,
}

impl ServiceFiles {
    fn new(dir: &Path) -> Self {
        let socket_dir = sockets_dir(dir);
        Self {
            pid: dir.join("broker.pid"),
            status: dir.join("broker.status"),
            sockets: dir.join("broker.sockets"),
            socket: socket_dir.join("router.sock"),
            socket_dir,
        }
    }

    /// Writes `path` whole or not at all.
    fn replace(path: &Path, text: &[u8]) -> std::io::Result<()> {
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, text)?;
        std::fs::rename(temporary, path)
    }

    /// Makes the socket directory, private to this user.
    fn prepare_socket_dir(&self) -> Result<()> {
        match std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.socket_dir)
        {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error("the socket directory", e)),
        }
        let meta = std::fs::symlink_metadata(&self.socket_dir)
            .map_err(|e| io_error("the socket directory", e))?;
        let uid = std::fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(meta.uid());
        if !meta.is_dir() || meta.uid() != uid {
            return Err(Error::connection(format!(
                "broker: {} is not a directory of this user's: refusing to put the socket there",
                self.socket_dir.display()
            )));
        }
        std::fs::set_permissions(&self.socket_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_error("the socket directory", e))?;
        match std::fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("the old socket", e)),
        }
        Ok(())
    }

    /// Announces the broker: sockets first, the pid last (AiiDA reads the pid as "up").
    fn announce(&self) -> Result<()> {
        let sockets = self.socket_dir.display().to_string();
        Self::replace(&self.sockets, sockets.as_bytes())
            .and_then(|()| {
                let pid = format!("{PID_SENTINEL} {}", std::process::id());
                Self::replace(&self.pid, pid.as_bytes())
            })
            .map_err(|e| io_error("the service files", e))
    }

    fn remove(&self) {
        for path in [&self.pid, &self.status, &self.sockets, &self.socket] {
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_dir(&self.socket_dir);
    }
}

/// What survives a restart besides the tasks: who subscribed what, and who holds which task.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    /// Identifier → client identity (hex).
    task_subscribers: HashMap<String, String>,
    rpc_subscribers: HashMap<String, String>,
    /// Client identity (hex) → its prefetch (`None` unlimited).
    prefetch: HashMap<String, Option<u32>>,
    /// Task id → the identity (hex) it was handed to.
    assignments: HashMap<String, String>,
    /// Task id → the identity (hex) its result goes back to.
    result_routes: HashMap<String, String>,
}

type Identity = Vec<u8>;

fn hex(identity: &[u8]) -> String {
    identity.iter().map(|b| format!("{b:02x}")).collect()
}

/// An identity for a log line: as text when it is printable (AiiDA's and kiwimq's clients
/// name themselves `client-<hex>`), else in hex.
fn shown(identity: &[u8]) -> String {
    match std::str::from_utf8(identity) {
        Ok(text) if text.chars().all(|c| c.is_ascii_graphic()) => text.to_owned(),
        _ => hex(identity),
    }
}

fn unhex(text: &str) -> Option<Identity> {
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

/// A task received and not yet on disk, with who to confirm it to.
struct Arrival {
    task: StoredTask,
    from: Identity,
    confirm: bool,
}

/// The service directories this process serves, so that two brokers of one process never
/// share one (a second would take the first one's socket).
static SERVED: std::sync::LazyLock<std::sync::Mutex<HashSet<PathBuf>>> =
    std::sync::LazyLock::new(Default::default);

/// This process's hold on a service directory, given back on drop.
struct Claim(PathBuf);

impl Claim {
    fn take(dir: &Path) -> Result<Self> {
        let dir = dir
            .canonicalize()
            .map_err(|e| io_error("the service directory", e))?;
        let mut served = SERVED.lock().unwrap_or_else(|p| p.into_inner());
        if !served.insert(dir.clone()) {
            return Err(Error::refused(format!(
                "a broker of this process already serves {}",
                dir.display()
            )));
        }
        Ok(Self(dir))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        SERVED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.0);
    }
}

/// The serving loop's state; lives on the broker thread.
struct Server {
    _claim: Claim,
    router: zmq::Socket,
    _context: zmq::Context,
    wakee: UnixStream,
    stop: Arc<AtomicBool>,
    files: ServiceFiles,
    state_file: PathBuf,
    store: Store,
    grace: Duration,
    rpc_timeout: Duration,
    /// This broker's `sender`, as AiiDA's pings carry it.
    sender: Box<RawValue>,

    task_subscribers: HashMap<String, Identity>,
    rpc_subscribers: HashMap<String, Identity>,
    /// Clients that watch presence announcements (kiwimq's own message types; not kept
    /// across a restart: a watcher subscribes again as it reconnects).
    presence_watchers: std::collections::HashSet<Identity>,
    prefetch: HashMap<Identity, Option<u32>>,
    load: HashMap<Identity, u32>,
    available: VecDeque<Identity>,
    assignments: HashMap<String, Identity>,
    result_routes: HashMap<String, (Identity, Option<Instant>)>,
    pending_rpcs: HashMap<String, (Identity, Instant)>,
    /// Clients found unreachable, since when; their tasks are kept until the grace ends.
    unreachable: HashMap<Identity, Instant>,
    /// The tasks taken back at start as each client's (from before a restart), until the
    /// client says which it holds: one handed over just before the stop may never have
    /// reached it. Only kiwimq's clients say; AiiDA's keep theirs until they settle them.
    restored_holds: HashMap<Identity, HashSet<String>>,
    arrivals: Vec<Arrival>,
    dirty: bool,
    /// The state changed only by settles and expiries: written at the next tick (a lost
    /// settle is harmless on restore, where only tasks still stored are taken back).
    settled: bool,
    last_persist: Instant,
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
        let files = ServiceFiles::new(dir);
        let claim = Claim::take(dir)?;
        if let Some(pid) = live_broker(&files.pid).filter(|pid| *pid != std::process::id()) {
            return Err(Error::refused(format!(
                "a broker (pid {pid}) already serves {}",
                dir.display()
            )));
        }
        let storage = dir.join("storage");
        let store = Store::open(&storage.join("tasks"), wake)
            .map_err(|e| io_error("the task storage", e))?;
        let state_file = storage.join("broker-state.json");
        let persisted: Persisted = std::fs::read(&state_file)
            .ok()
            .and_then(|bytes| match serde_json::from_slice(&bytes) {
                Ok(state) => Some(state),
                Err(error) => {
                    tracing::error!(%error, "broker-state.json does not decode; starting without it");
                    None
                }
            })
            .unwrap_or_default();
        files.prepare_socket_dir()?;
        let context = zmq::Context::new();
        let router = context
            .socket(zmq::ROUTER)
            .map_err(|e| zmq_error("a ROUTER socket", e))?;
        let options_set = || -> std::result::Result<(), zmq::Error> {
            router.set_router_mandatory(true)?;
            // A client reconnecting with its identity replaces its old, dead connection.
            router.set_router_handover(true)?;
            router.set_linger(0)?;
            router.set_heartbeat_ivl(2000)?;
            router.set_heartbeat_timeout(6000)?;
            router.set_sndhwm(10_000)?;
            router.set_rcvhwm(10_000)?;
            Ok(())
        };
        options_set().map_err(|e| zmq_error("socket options", e))?;
        let endpoint = format!("ipc://{}", files.socket.display());
        router
            .bind(&endpoint)
            .map_err(|e| zmq_error(&format!("binding {endpoint}"), e))?;

        let mut server = Self {
            _claim: claim,
            router,
            _context: context,
            wakee,
            stop,
            files,
            state_file,
            store,
            grace: options.worker_grace,
            rpc_timeout: options.rpc_timeout,
            sender: json_string("broker"),
            task_subscribers: HashMap::new(),
            rpc_subscribers: HashMap::new(),
            presence_watchers: std::collections::HashSet::new(),
            prefetch: HashMap::new(),
            load: HashMap::new(),
            available: VecDeque::new(),
            assignments: HashMap::new(),
            result_routes: HashMap::new(),
            pending_rpcs: HashMap::new(),
            unreachable: HashMap::new(),
            restored_holds: HashMap::new(),
            arrivals: Vec::new(),
            dirty: false,
            settled: false,
            last_persist: Instant::now(),
        };
        server.restore(persisted);
        server.files.announce()?;
        server.write_status();
        tracing::info!(socket = %endpoint, pending = server.store.pending(), "broker serving");
        Ok(server)
    }

    /// Takes back what the last run knew: subscriptions, limits, and each task's holder —
    /// who is given the grace period to come back for it.
    fn restore(&mut self, persisted: Persisted) {
        let now = Instant::now();
        let decode = |map: HashMap<String, String>| -> HashMap<String, Identity> {
            map.into_iter()
                .filter_map(|(key, identity)| Some((key, unhex(&identity)?)))
                .collect()
        };
        self.task_subscribers = decode(persisted.task_subscribers);
        self.rpc_subscribers = decode(persisted.rpc_subscribers);
        self.prefetch = persisted
            .prefetch
            .into_iter()
            .filter_map(|(identity, limit)| Some((unhex(&identity)?, limit)))
            .collect();
        let mut held = decode(persisted.assignments);
        for task_id in self.store.claim_all(&held) {
            let identity = held.remove(&task_id).expect("a claimed task was asked for");
            *self.load.entry(identity.clone()).or_default() += 1;
            self.unreachable.entry(identity.clone()).or_insert(now);
            self.restored_holds
                .entry(identity.clone())
                .or_default()
                .insert(task_id.clone());
            self.assignments.insert(task_id, identity);
        }
        // A route whose task is not held any more waits only the result's time to live.
        self.result_routes = decode(persisted.result_routes)
            .into_iter()
            .map(|(task_id, identity)| {
                let settled = (!self.assignments.contains_key(&task_id)).then_some(now);
                (task_id, (identity, settled))
            })
            .collect();
        // Everyone known is unreachable until it shows itself (clients reconnect by
        // themselves within a second; a ping then finds them).
        for identity in self.clients(false) {
            self.unreachable.entry(identity).or_insert(now);
        }
    }

    fn persist(&mut self) {
        let due = self.settled && self.last_persist.elapsed() >= TICK;
        if !self.dirty && !due {
            return;
        }
        self.dirty = false;
        self.settled = false;
        self.last_persist = Instant::now();
        let encode = |map: &HashMap<String, Identity>| -> HashMap<String, String> {
            map.iter().map(|(k, v)| (k.clone(), hex(v))).collect()
        };
        let state = Persisted {
            task_subscribers: encode(&self.task_subscribers),
            rpc_subscribers: encode(&self.rpc_subscribers),
            prefetch: self.prefetch.iter().map(|(k, v)| (hex(k), *v)).collect(),
            assignments: encode(&self.assignments),
            result_routes: self
                .result_routes
                .iter()
                .map(|(k, (v, _))| (k.clone(), hex(v)))
                .collect(),
        };
        let bytes = serde_json::to_vec(&state).expect("the state serializes");
        if let Err(error) = ServiceFiles::replace(&self.state_file, &bytes) {
            tracing::error!(%error, "cannot write broker-state.json");
        }
    }

    fn write_status(&self) {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let status = serde_json::json!({
            "running": true,
            "pending_tasks": self.store.pending(),
            "processing_tasks": self.store.processing(),
            "task_subscribers": self.task_subscribers.len(),
            "rpc_subscribers": self.rpc_subscribers.len(),
            "available_workers": self.available.len(),
            "in_flight_tasks": self.assignments.len(),
            "pending_rpc_responses": self.pending_rpcs.len(),
            "timestamp": timestamp,
            "pid": std::process::id(),
            "broker": "kiwimq",
        });
        let text = serde_json::to_vec_pretty(&status).expect("a status serializes");
        if let Err(error) = ServiceFiles::replace(&self.files.status, &text) {
            tracing::warn!(%error, "cannot write broker.status");
        }
    }

    fn run(mut self) -> Result<()> {
        let mut last_status = Instant::now();
        let mut last_tick = Instant::now();
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
            if let Err(error) = self.store_arrivals() {
                break Err(error);
            }
            self.dispatch();
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.probe();
                self.expire();
                if let Err(error) = self.store.sync() {
                    tracing::warn!(%error, "cannot sync the task directories");
                }
            }
            self.persist();
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

    fn handle(&mut self, identity: Identity, message: Incoming<'_>) {
        match message.kind.as_deref() {
            Some(kind::TASK) => self.on_task(identity, message),
            Some(kind::TASK_ACK) | Some(kind::TASK_NACK) => {
                let ack = message.kind.as_deref() == Some(kind::TASK_ACK);
                if let Some(task_id) = message.task_id {
                    self.settle(&identity, &task_id, ack);
                }
            }
            Some(kind::TASK_RESPONSE) => self.on_result(message),
            Some(kind::RPC) => self.on_rpc(identity, message),
            Some(kind::RPC_RESPONSE) => {
                let Some(rpc_id) = message.rpc_id.as_deref() else {
                    return;
                };
                match self.pending_rpcs.remove(rpc_id) {
                    Some((caller, _)) => {
                        let frame = Outgoing {
                            rpc_id: Some(rpc_id),
                            result: Some(message.result.unwrap_or_else(|| null())),
                            error: Some(message.error.as_deref()),
                            ..Outgoing::new(
                                kind::RPC_RESPONSE,
                                message.sender.unwrap_or_else(|| null()),
                            )
                        };
                        self.send(&caller, &frame.encode());
                    }
                    None => tracing::debug!(%rpc_id, "an answer nobody waits for (expired?)"),
                }
            }
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
                self.task_subscribers.insert(identifier, identity.clone());
                let limit = message
                    .prefetch_count
                    .filter(|n| *n > 0)
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
                self.prefetch.insert(identity.clone(), limit);
                self.dirty = true;
                self.mark_available(&identity);
            }
            Some(kind::SUBSCRIBE_RPC) => {
                if let Some(identifier) = message_identifier(&message) {
                    self.rpc_subscribers.insert(identifier, identity);
                    self.dirty = true;
                }
            }
            Some(kind::UNSUBSCRIBE_TASK) => {
                if let Some(identifier) = message_identifier(&message) {
                    if self.task_subscribers.get(&identifier) == Some(&identity) {
                        self.task_subscribers.remove(&identifier);
                        self.dirty = true;
                    }
                    if !self.task_subscribers.values().any(|i| *i == identity) {
                        self.prefetch.remove(&identity);
                    }
                }
            }
            Some(kind::UNSUBSCRIBE_RPC) => {
                if let Some(identifier) = message_identifier(&message)
                    && self.rpc_subscribers.get(&identifier) == Some(&identity)
                {
                    self.rpc_subscribers.remove(&identifier);
                    self.dirty = true;
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
                let watchers: Vec<Identity> = self.presence_watchers.iter().cloned().collect();
                for watcher in watchers {
                    self.send(&watcher, &bytes);
                }
            }
            Some(kind::HOLDING) => self.on_holding(&identity, message.task_ids.unwrap_or_default()),
            Some(kind::WATCH_PRESENCE) => {
                self.presence_watchers.insert(identity);
            }
            Some(kind::UNWATCH_PRESENCE) => {
                self.presence_watchers.remove(&identity);
            }
            other => tracing::warn!(kind = ?other, "a message of unknown type was dropped"),
        }
    }

    fn on_task(&mut self, from: Identity, message: Incoming<'_>) {
        let id = message.id.clone().unwrap_or_else(super::protocol::new_id);
        if !super::store::usable_task_id(&id) {
            // Its file could not be named after it (AiiDA's ids are `uuid4().hex`).
            let refusal = Outgoing {
                task_id: Some(&id),
                result: Some(RawValue::FALSE),
                error: Some(Some(
                    "a task id must be 1 to 128 ASCII letters, digits, '-' or '_'",
                )),
                ..Outgoing::new(kind::TASK_RESPONSE, &self.sender)
            }
            .encode();
            tracing::warn!(client = %shown(&from), task_id = %id, "a task with an id that cannot name its file was refused");
            return self.send(&from, &refusal);
        }
        let body = message.body.unwrap_or_else(|| null()).to_owned();
        let no_reply = message.no_reply.unwrap_or(false);
        let sender = message
            .sender
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .unwrap_or(serde_json::Value::Null);
        self.arrivals.push(Arrival {
            task: StoredTask {
                id: Some(id),
                sender,
                sender_identity: Some(hex(&from)),
                body,
                no_reply,
                timestamp: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
                results: message.results == Some(true),
            },
            from,
            confirm: !no_reply,
        });
    }

    /// Stores what arrived this round, durably, then confirms it.
    fn store_arrivals(&mut self) -> Result<()> {
        if self.arrivals.is_empty() {
            return Ok(());
        }
        let arrivals = std::mem::take(&mut self.arrivals);
        let tasks: Vec<StoredTask> = arrivals.iter().map(|a| a.task.clone()).collect();
        if let Err(error) = self.store.push_all(&tasks) {
            // Not confirmed: the senders time out and send again; nothing is half-stored
            // under a confirm.
            tracing::error!(%error, count = tasks.len(), "tasks could not be stored");
            return Ok(());
        }
        for arrival in arrivals {
            if !arrival.confirm {
                continue;
            }
            let confirm = Outgoing {
                task_id: arrival.task.id.as_deref(),
                result: Some(RawValue::TRUE),
                results: arrival.task.results.then_some(true),
                ..Outgoing::new(kind::TASK_RESPONSE, &self.sender)
            }
            .encode();
            self.send(&arrival.from, &confirm);
        }
        Ok(())
    }

    /// Every client holding a subscription (and, with `holders`, a task), once each.
    fn clients(&self, holders: bool) -> Vec<Identity> {
        let held = self.assignments.values().filter(|_| holders);
        let unique: HashSet<&Identity> = self
            .task_subscribers
            .values()
            .chain(self.rpc_subscribers.values())
            .chain(held)
            .collect();
        unique.into_iter().cloned().collect()
    }

    /// A client unreachable until now showed itself: it gets tasks again.
    fn back(&mut self, identity: &Identity) {
        if self.unreachable.remove(identity).is_some() {
            tracing::info!(client = %shown(identity), "a client is back");
            self.mark_available(identity);
        }
    }

    fn has_capacity(&self, identity: &Identity) -> bool {
        match self.prefetch.get(identity).copied().flatten() {
            None => true,
            Some(limit) => self.load.get(identity).copied().unwrap_or(0) < limit,
        }
    }

    fn mark_available(&mut self, identity: &Identity) {
        if self.task_subscribers.values().any(|i| i == identity)
            && self.has_capacity(identity)
            && !self.available.contains(identity)
        {
            self.available.push_back(identity.clone());
        }
    }

    /// Hands pending tasks round-robin to workers with room. Who holds what is written down
    /// before a task leaves, so a broker killed mid-dispatch still knows after its restart
    /// that the task is taken and waits for its worker rather than running it twice.
    fn dispatch(&mut self) {
        let mut handed = Vec::new();
        let mut rounds = self.available.len();
        while rounds > 0 && self.store.pending() > 0 {
            let Some(worker) = self.available.pop_front() else {
                break;
            };
            rounds = self.available.len() + 1;
            if self.unreachable.contains_key(&worker)
                || !self.task_subscribers.values().any(|i| *i == worker)
                || !self.has_capacity(&worker)
            {
                rounds -= 1;
                continue;
            }
            let Some((task_id, task)) = self.store.pop() else {
                self.available.push_front(worker);
                break;
            };
            let bytes = Outgoing {
                id: task_id.clone(),
                body: Some(&task.body),
                no_reply: Some(task.no_reply),
                ..Outgoing::new(kind::TASK, &self.sender)
            }
            .encode();
            self.assignments.insert(task_id.clone(), worker.clone());
            *self.load.entry(worker.clone()).or_default() += 1;
            if task.results
                && let Some(sender) = task.sender_identity.as_deref().and_then(unhex)
            {
                self.result_routes.insert(task_id.clone(), (sender, None));
            }
            self.dirty = true;
            self.mark_available(&worker);
            handed.push((worker, task_id, bytes));
        }
        if handed.is_empty() {
            return;
        }
        self.persist();
        for (worker, task_id, bytes) in handed {
            let sent = self
                .router
                .send_multipart([&worker[..], b"", &bytes], zmq::DONTWAIT);
            if let Err(error) = sent {
                tracing::warn!(worker = %shown(&worker), %error, "a task could not be handed over; back in the queue");
                self.settle(&worker, &task_id, false);
                if error == zmq::Error::EHOSTUNREACH {
                    self.unreachable.entry(worker).or_insert_with(Instant::now);
                }
            }
        }
    }

    fn settle(&mut self, identity: &Identity, task_id: &str, ack: bool) {
        match self.assignments.get(task_id) {
            Some(holder) if holder == identity => {}
            Some(holder) => {
                tracing::warn!(client = %shown(identity), holder = %shown(holder), %task_id, "a settle of a task another client holds was refused");
                return;
            }
            // A settle sent again after a reconnect, of a task already settled.
            None => {
                tracing::debug!(client = %shown(identity), %task_id, "a settle of a task no one holds was ignored");
                return;
            }
        }
        self.assignments.remove(task_id);
        if let Some(load) = self.load.get_mut(identity) {
            *load = load.saturating_sub(1);
        }
        // A slot is free again, whoever settled (the worker, or the broker for it).
        self.mark_available(identity);
        self.settled = true;
        if ack {
            self.store.ack(task_id);
            if let Some(route) = self.result_routes.get_mut(task_id) {
                route.1 = Some(Instant::now());
            }
        } else {
            self.store.nack(task_id);
            self.result_routes.remove(task_id);
        }
    }

    /// A client back after a restart says which tasks it holds: those taken back as its own
    /// that it does not hold never reached it, and go back to the queue.
    fn on_holding(&mut self, identity: &Identity, holding: Vec<String>) {
        let Some(restored) = self.restored_holds.remove(identity) else {
            return;
        };
        let holding: HashSet<String> = holding.into_iter().collect();
        let lost: Vec<String> = restored
            .into_iter()
            .filter(|task_id| {
                !holding.contains(task_id) && self.assignments.get(task_id) == Some(identity)
            })
            .collect();
        if lost.is_empty() {
            return;
        }
        tracing::info!(
            client = %shown(identity), count = lost.len(),
            "tasks handed to a client just before the broker stopped never reached it; requeued"
        );
        for task_id in lost {
            self.settle(identity, &task_id, false);
        }
        self.dirty = true;
    }

    /// A worker's result: to the sender that asked for it, else dropped (as AiiDA's).
    fn on_result(&mut self, message: Incoming<'_>) {
        let Some(task_id) = message.task_id.as_deref() else {
            return;
        };
        let Some((sender, _)) = self.result_routes.remove(task_id) else {
            return;
        };
        self.settled = true;
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

    fn on_rpc(&mut self, caller: Identity, message: Incoming<'_>) {
        let rpc_id = message.id.clone().unwrap_or_default();
        let Some(recipient) = message.recipient() else {
            return self.rpc_error(&caller, &rpc_id, "Missing recipient");
        };
        let Some(target) = self.rpc_subscribers.get(&recipient).cloned() else {
            return self.rpc_error(
                &caller,
                &rpc_id,
                &format!("Recipient not found: {recipient}"),
            );
        };
        if self.pending_rpcs.len() >= MAX_PENDING_RPCS {
            return self.rpc_error(
                &caller,
                &rpc_id,
                "the broker holds too many unanswered RPCs",
            );
        }
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
            Ok(()) => {
                let deadline = Instant::now() + self.rpc_timeout;
                self.pending_rpcs.insert(rpc_id, (caller, deadline));
            }
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

    fn rpc_error(&mut self, caller: &Identity, rpc_id: &str, error: &str) {
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
    fn send(&mut self, identity: &Identity, bytes: &[u8]) {
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

    /// Pings every client that holds a task or a subscription: the reachable ones are
    /// struck off `unreachable`; those past the grace lose their tasks and subscriptions.
    fn probe(&mut self) {
        let known = self.clients(true);
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
        let known: HashSet<Identity> = self.clients(true).into_iter().collect();
        self.unreachable
            .retain(|identity, _| known.contains(identity));
    }

    fn remove_client(&mut self, identity: &Identity) {
        let tasks: Vec<String> = self
            .assignments
            .iter()
            .filter(|(_, holder)| *holder == identity)
            .map(|(task_id, _)| task_id.clone())
            .collect();
        tracing::warn!(client = %shown(identity), tasks = tasks.len(), "a client gone past its grace: its tasks go back to the queue");
        for task_id in tasks {
            self.settle(identity, &task_id, false);
        }
        self.task_subscribers.retain(|_, holder| holder != identity);
        self.rpc_subscribers.retain(|_, holder| holder != identity);
        self.presence_watchers.remove(identity);
        self.prefetch.remove(identity);
        self.load.remove(identity);
        self.available.retain(|i| i != identity);
        self.unreachable.remove(identity);
        self.restored_holds.remove(identity);
        self.settled = true;
    }

    /// Answers expired RPCs with an error, and forgets result routes gone stale.
    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<(String, Identity)> = self
            .pending_rpcs
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(rpc_id, (caller, _))| (rpc_id.clone(), caller.clone()))
            .collect();
        for (rpc_id, caller) in expired {
            self.pending_rpcs.remove(&rpc_id);
            let error = format!("no answer within {:?}", self.rpc_timeout);
            self.rpc_error(&caller, &rpc_id, &error);
        }
        let before = self.result_routes.len();
        self.result_routes.retain(|_, (_, acked)| {
            acked.is_none_or(|at| now.duration_since(at) < RESULT_ROUTE_TTL)
        });
        if self.result_routes.len() != before {
            self.settled = true;
        }
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
