//! The broker's durable task queue, in AiiDA's layout so that `verdi process repair` and
//! AiiDA's own tools read it: `storage/tasks/pending/{time_us}_{task_id}.json` waiting,
//! `storage/tasks/processing/` handed to a worker; ack deletes, nack moves back.
//!
//! Unlike AiiDA's, a task is on disk before it is confirmed: in the write-ahead journal
//! (`journal`), one sync for a batch. Its file follows — written, synced, renamed into
//! `pending/`, the directory synced, a batch at once. It may be handed out before (from
//! memory): its file then goes straight to `processing/`, and a task settled before its
//! file is written gets none (the journal notes the settle, so a start does not bring it
//! back). After each batch the store puts right what the writer could not know in time.
//! A file that does not decode is moved to `corrupt/` and reported, never deleted;
//! leftover temporary files are removed at start, after the journal has written again
//! every confirmed task whose file was not finished.
//!
//! Task files are not created on the way to a worker: creating a file costs ext4 an inode
//! allocation, which under a queue's churn (many files just deleted) is the dearest step of
//! a store, dearer than its sync. A thread of its own keeps `spare/` stocked with empty
//! files, an acked task's file goes back there, and a new task is written over a spare. The
//! tasks stored by this run are kept in memory (up to a bound) so a dispatch does not read
//! them back.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::journal::{self, Dirs, Fate, Journal, Wake};
pub(super) use super::service::sync_dir;

/// A task as stored: AiiDA's fields (`id, sender, sender_identity, body, no_reply,
/// timestamp`) and kiwimq's optional `results`. Tolerates the files `verdi process repair`
/// writes (`{body, no_reply}` only).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct StoredTask {
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) sender: serde_json::Value,
    #[serde(default)]
    pub(crate) sender_identity: Option<String>,
    /// As it came, never parsed: the broker passes it on as it is.
    #[serde(default = "null_body")]
    pub(crate) body: Box<serde_json::value::RawValue>,
    #[serde(default)]
    pub(crate) no_reply: bool,
    #[serde(default)]
    pub(crate) timestamp: f64,
    /// The sender wants the worker's result passed back (kiwimq's clients ask for it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) results: bool,
}

/// Spare files kept ready.
const SPARES_KEPT: usize = 1024;
/// The largest settled task file kept as a spare (a file system's block).
const SPARE_BYTES: u64 = 4096;

/// Empty files for new tasks to be written into, and the thread that makes them.
#[derive(Debug)]
pub(super) struct Spares {
    dir: PathBuf,
    pool: Mutex<Vec<PathBuf>>,
    /// Signalled when the pool runs low, and at the end.
    low: Condvar,
    next: AtomicU64,
    stop: AtomicBool,
}

impl Spares {
    /// The spares under `dir` (created), as a last run left them.
    pub(super) fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        // A spare's content is nothing: one a crash left half written is as good as any.
        let mut pool = Vec::new();
        let mut next = 0u64;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let number = path
                .file_stem()
                .and_then(|stem| stem.to_str()?.parse::<u64>().ok());
            next = next.max(number.map_or(0, |n| n + 1));
            if pool.len() < SPARES_KEPT {
                pool.push(path);
            } else {
                fs::remove_file(path)?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            pool: Mutex::new(pool),
            low: Condvar::new(),
            next: AtomicU64::new(next),
            stop: AtomicBool::new(false),
        })
    }

    pub(super) fn pool(&self) -> MutexGuard<'_, Vec<PathBuf>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn name(&self) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{n}.spare"))
    }

    /// A spare, if one is ready.
    pub(super) fn take(&self) -> Option<PathBuf> {
        let mut pool = self.pool();
        let spare = pool.pop();
        if pool.len() < SPARES_KEPT / 2 {
            self.low.notify_one();
        }
        spare
    }

    /// Makes `path` (a settled task's file) a spare, or removes it when enough are kept or
    /// it is large: a spare keeps its blocks until it is written over, so only small files
    /// are kept (at most `SPARES_KEPT` × `SPARE_BYTES` of disk) and a full disk gets the
    /// room of settled tasks back.
    pub(super) fn give_back(&self, path: &Path) -> io::Result<()> {
        let large = fs::metadata(path).is_ok_and(|meta| meta.len() > SPARE_BYTES);
        if large || self.pool().len() >= SPARES_KEPT {
            return fs::remove_file(path);
        }
        let spare = self.name();
        fs::rename(path, &spare)?;
        self.pool().push(spare);
        Ok(())
    }

    /// The stocking thread: tops the pool up whenever it runs low, until the store goes.
    fn stock(self: Arc<Self>) {
        while !self.stop.load(Ordering::Acquire) {
            let missing = SPARES_KEPT.saturating_sub(self.pool().len());
            if missing == 0 {
                let pool = self.pool();
                let _ = self.low.wait_timeout(pool, Duration::from_secs(1));
                continue;
            }
            for _ in 0..missing.min(64) {
                if self.stop.load(Ordering::Acquire) {
                    return;
                }
                let spare = self.name();
                match File::create(&spare) {
                    Ok(_) => self.pool().push(spare),
                    Err(error) => {
                        tracing::warn!(%error, "cannot make a spare task file");
                        let pool = self.pool();
                        let _ = self.low.wait_timeout(pool, Duration::from_secs(1));
                        break;
                    }
                }
            }
        }
    }
}

/// At most this many stored tasks are kept in memory to dispatch without a read…
const CACHED_TASKS: usize = 65_536;
/// …and at most this many bytes of them (a backlog of large tasks is read back instead).
const CACHED_BYTES: usize = 64 << 20;

/// How long the queue waits after a task file could not be read (not "gone": EIO, EMFILE…)
/// before it tries again.
const READ_RETRY: Duration = Duration::from_secs(1);

/// What the store knows of a task id.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// No task of that id is waiting or handed out.
    Absent,
    /// One is: as stored, when it could be read.
    Present(Option<StoredTask>),
}

fn null_body() -> Box<serde_json::value::RawValue> {
    super::protocol::null().to_owned()
}

/// The queue: the names of the waiting files in order, and the processing ones by task id.
#[derive(Debug)]
pub(crate) struct Store {
    pending_dir: PathBuf,
    processing_dir: PathBuf,
    corrupt_dir: PathBuf,
    pending: VecDeque<String>,
    processing: HashMap<String, String>,
    spares: Arc<Spares>,
    stocking: Option<std::thread::JoinHandle<()>>,
    /// Pending tasks stored by this run, by file name.
    cached: HashMap<String, StoredTask>,
    /// The bytes of `cached`, about.
    cached_bytes: usize,
    /// Waiting tasks by id → their file's name: one id is stored once.
    pending_ids: HashMap<String, String>,
    /// Tasks requeued whose file could not be moved back yet (by file name): tried again
    /// at every sync, never forgotten.
    stranded: Vec<String>,
    /// After a read error, no pop before this.
    read_blocked_until: Option<std::time::Instant>,
    /// The last timestamp used in a name, so names stay unique and ordered within a batch.
    last_us: u128,
    /// Where a stored task is confirmed first; its file follows.
    journal: Journal,
    /// Tasks whose file is not written yet (not marked), by file name: their place in the
    /// journal. Kept in `cached` meanwhile, so they can be handed out.
    unwritten: HashMap<String, u64>,
    /// The same, in journal order, to catch up with the marks.
    unwritten_order: VecDeque<(u64, String)>,
}

/// Whether a task can be stored under `id`: it names the task's file (AiiDA's ids are
/// `uuid4().hex`).
pub(crate) fn usable_task_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether `name` is a task file's name as the store makes them, `{time_us}_{task_id}.json`
/// with a usable id: nothing that names a file outside its directory.
pub(crate) fn is_task_file_name(name: &str) -> bool {
    name.strip_suffix(".json")
        .and_then(|stem| stem.split_once('_'))
        .is_some_and(|(time, id)| {
            !time.is_empty() && time.bytes().all(|b| b.is_ascii_digit()) && usable_task_id(id)
        })
}

/// The task id a file's name carries: `{time_us}_{task_id}.json`.
pub(crate) fn task_id(name: &str) -> Option<&str> {
    name.strip_suffix(".json")?
        .split_once('_')
        .map(|(_, id)| id)
}

/// The bytes a task keeps in memory, about.
fn task_bytes(task: &StoredTask) -> usize {
    task.body.get().len() + 256
}

impl Store {
    /// Opens (creating) the queue under `tasks_dir`: what was processing goes back to
    /// pending (its worker's broker is gone), the journal's unwritten tasks are written,
    /// all in name order. `wake` is called whenever more stored tasks can be handed out.
    pub(crate) fn open(tasks_dir: &Path, wake: Wake) -> io::Result<Self> {
        let pending_dir = tasks_dir.join("pending");
        let processing_dir = tasks_dir.join("processing");
        let corrupt_dir = tasks_dir.join("corrupt");
        let spare_dir = tasks_dir.join("spare");
        fs::create_dir_all(&pending_dir)?;
        fs::create_dir_all(&processing_dir)?;
        let spares = Arc::new(Spares::open(&spare_dir)?);
        let stocker = spares.clone();
        let stocking = std::thread::Builder::new()
            .name("kiwimq-spares".into())
            .spawn(move || stocker.stock())?;
        for entry in fs::read_dir(&processing_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if Path::new(&name).extension().is_some_and(|e| e == "json") {
                fs::rename(entry.path(), pending_dir.join(&name))?;
            }
        }
        let journal_file = tasks_dir.join("journal");
        journal::replay(&journal_file, &pending_dir)?;
        let dirs = Dirs {
            pending: pending_dir.clone(),
            processing: processing_dir.clone(),
        };
        let journal = Journal::start(&journal_file, dirs, spares.clone(), wake)?;
        let mut pending = Vec::new();
        for entry in fs::read_dir(&pending_dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.ends_with(".tmp") {
                // Never confirmed: its sender was not told it was taken.
                fs::remove_file(entry.path())?;
            } else if task_id(&name).is_some() {
                pending.push(name);
            }
        }
        pending.sort();
        // One id, one task: a copy a crash or an older broker left (a resend stored twice)
        // is moved aside, the first in the queue's order kept.
        let mut pending_ids = HashMap::with_capacity(pending.len());
        let mut duplicates = Vec::new();
        pending.retain(|name| {
            let id = task_id(name).unwrap_or_default().to_owned();
            if pending_ids.contains_key(&id) {
                duplicates.push(name.clone());
                return false;
            }
            pending_ids.insert(id, name.clone());
            true
        });
        if !duplicates.is_empty() {
            let duplicate_dir = tasks_dir.join("duplicate");
            fs::create_dir_all(&duplicate_dir)?;
            for name in &duplicates {
                fs::rename(pending_dir.join(name), duplicate_dir.join(name))?;
            }
            tracing::error!(
                count = duplicates.len(),
                "tasks stored twice under one id: the later copies moved to storage/tasks/duplicate/ (not run, not deleted)"
            );
            sync_dir(&duplicate_dir)?;
        }
        sync_dir(&pending_dir)?;
        sync_dir(&processing_dir)?;
        sync_dir(tasks_dir)?;
        Ok(Self {
            pending_dir,
            processing_dir,
            corrupt_dir,
            pending: pending.into(),
            processing: HashMap::new(),
            spares,
            stocking: Some(stocking),
            cached: HashMap::new(),
            cached_bytes: 0,
            pending_ids,
            stranded: Vec::new(),
            read_blocked_until: None,
            last_us: 0,
            journal,
            unwritten: HashMap::new(),
            unwritten_order: VecDeque::new(),
        })
    }

    /// Tasks waiting.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Tasks handed out and not settled (and those requeued whose file is not back yet).
    pub(crate) fn processing(&self) -> usize {
        self.processing.len() + self.stranded.len()
    }

    fn name_for(&mut self, task_id: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        self.last_us = now.max(self.last_us + 1);
        format!("{}_{task_id}.json", self.last_us)
    }

    /// Stores a batch of tasks durably, in order; returns once all are on disk (in the
    /// journal: their files follow; a task may go out before its file, from memory).
    pub(crate) fn push_all(&mut self, tasks: &[StoredTask]) -> io::Result<()> {
        if tasks.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = tasks
            .iter()
            .map(|task| self.name_for(task.id.as_deref().unwrap_or("unnamed")))
            .collect();
        let seqs = self.journal.append(tasks, &names)?;
        for ((name, seq), task) in names.into_iter().zip(seqs).zip(tasks) {
            self.cache(&name, task.clone());
            self.unwritten.insert(name.clone(), seq);
            self.unwritten_order.push_back((seq, name.clone()));
            if let Some(id) = task_id(&name) {
                self.pending_ids.insert(id.to_owned(), name.clone());
            }
            self.pending.push_back(name);
        }
        Ok(())
    }

    /// Whether a task of `id` is stored (waiting, or handed out), and what it is.
    pub(crate) fn lookup(&self, id: &str) -> Lookup {
        let (name, dir) = match (self.pending_ids.get(id), self.processing.get(id)) {
            (Some(name), _) => (name, &self.pending_dir),
            (None, Some(name)) => (name, &self.processing_dir),
            (None, None) => return Lookup::Absent,
        };
        if let Some(task) = self.cached.get(name) {
            return Lookup::Present(Some(task.clone()));
        }
        let read = fs::read(dir.join(name))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        Lookup::Present(read)
    }

    /// A task handed out, as stored (read back from its file).
    pub(crate) fn held(&self, id: &str) -> Option<StoredTask> {
        let name = self.processing.get(id)?;
        if let Some(task) = self.cached.get(name) {
            return Some(task.clone());
        }
        let bytes = fs::read(self.held_file(name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn cache(&mut self, name: &str, task: StoredTask) {
        let bytes = task_bytes(&task);
        if self.cached.len() < CACHED_TASKS && self.cached_bytes + bytes <= CACHED_BYTES {
            self.cached_bytes += bytes;
            self.cached.insert(name.to_owned(), task);
        }
    }

    fn uncache(&mut self, name: &str) -> Option<StoredTask> {
        let task = self.cached.remove(name)?;
        self.cached_bytes = self.cached_bytes.saturating_sub(task_bytes(&task));
        Some(task)
    }

    /// Takes `name` off the waiting ids.
    fn forget_pending(&mut self, name: &str) {
        if let Some(id) = task_id(name)
            && self.pending_ids.get(id).is_some_and(|n| n == name)
        {
            self.pending_ids.remove(id);
        }
    }

    /// Puts `name` back at the head of the queue.
    fn requeue_front(&mut self, name: String) {
        if let Some(id) = task_id(&name) {
            self.pending_ids.insert(id.to_owned(), name.clone());
        }
        self.pending.push_front(name);
    }

    /// Waits (up to `timeout`) until every task stored has its file where it belongs;
    /// whether they do.
    pub(crate) fn flush(&mut self, timeout: Duration) -> bool {
        let done = self.journal.flush(timeout);
        self.catch_up();
        done
    }

    /// Once a batch's files are written (the materializer has put each where its task's
    /// fate said): forgets them as unwritten, and the memory of those no longer waiting.
    fn catch_up(&mut self) {
        if self.unwritten_order.is_empty() {
            return;
        }
        let marked = self.journal.marked();
        while let Some(&(seq, _)) = self.unwritten_order.front() {
            if seq > marked {
                break;
            }
            let Some((_, name)) = self.unwritten_order.pop_front() else {
                break;
            };
            if self.unwritten.get(&name) != Some(&seq) {
                continue;
            }
            self.unwritten.remove(&name);
            let waiting = task_id(&name).is_some_and(|id| self.pending_ids.get(id) == Some(&name));
            if !waiting {
                self.uncache(&name);
            }
        }
    }

    /// Takes the next task into processing. Skips (and quarantines) files that do not
    /// decode, and files gone from under it.
    pub(crate) fn pop(&mut self) -> Option<(String, StoredTask)> {
        if let Some(until) = self.read_blocked_until {
            if std::time::Instant::now() < until {
                return None;
            }
            self.read_blocked_until = None;
        }
        self.catch_up();
        while let Some(name) = self.pending.pop_front() {
            let path = self.pending_dir.join(&name);
            let id = task_id(&name).unwrap_or_default().to_owned();
            self.forget_pending(&name);
            if self.processing.contains_key(&id) {
                // One id, one task: a second copy never goes out beside the first.
                self.set_aside(&name, &path);
                continue;
            }
            if let Some(&seq) = self.unwritten.get(&name) {
                // Its file is still being written: out from memory, the file to follow
                // into `processing/`; or, not kept in memory, it waits for its file.
                let Some(task) = self.cached.get(&name).cloned() else {
                    self.requeue_front(name);
                    return None;
                };
                if self.journal.tell(&name, seq, Fate::Held) {
                    self.processing.insert(id.clone(), name);
                    return Some((id, task));
                }
                // Marked meanwhile: in `pending/`, as any.
            }
            let task = match self.uncache(&name) {
                Some(task) => task,
                None => match fs::read(&path) {
                    Ok(bytes) => match serde_json::from_slice::<StoredTask>(&bytes) {
                        Ok(task) => task,
                        Err(error) => {
                            self.quarantine(&name, &path, &error.to_string());
                            continue;
                        }
                    },
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {
                        // Removed from under the broker (`verdi process repair` does).
                        tracing::warn!(%name, "a pending task file is gone; skipped");
                        continue;
                    }
                    Err(error) => {
                        // Not gone: unreadable for now (EIO, EMFILE…). It stays first.
                        tracing::error!(%name, %error, "cannot read a task file; trying again in 1 s");
                        self.block_reads();
                        self.requeue_front(name);
                        return None;
                    }
                },
            };
            if let Err(error) = fs::rename(&path, self.processing_dir.join(&name)) {
                if error.kind() == io::ErrorKind::NotFound {
                    tracing::warn!(%name, "a pending task file is gone; skipped");
                    continue;
                }
                tracing::error!(%name, %error, "cannot move a task to processing; trying again in 1 s");
                self.cache(&name, task);
                self.block_reads();
                self.requeue_front(name);
                return None;
            }
            self.processing.insert(id.clone(), name);
            return Some((id, task));
        }
        None
    }

    fn block_reads(&mut self) {
        self.read_blocked_until = Some(std::time::Instant::now() + READ_RETRY);
    }

    /// Moves a second copy of a task held already to `duplicate/`.
    fn set_aside(&mut self, name: &str, path: &Path) {
        self.uncache(name);
        let duplicate_dir = self.corrupt_dir.with_file_name("duplicate");
        let moved = fs::create_dir_all(&duplicate_dir)
            .and_then(|()| fs::rename(path, duplicate_dir.join(name)));
        tracing::error!(
            %name, moved = moved.is_ok(),
            "a second task under the id of one handed out: moved to storage/tasks/duplicate/ (not run, not deleted)"
        );
    }

    fn quarantine(&self, name: &str, path: &Path, error: &str) {
        let moved = fs::create_dir_all(&self.corrupt_dir)
            .and_then(|()| fs::rename(path, self.corrupt_dir.join(name)));
        match moved {
            Ok(()) => tracing::error!(
                %name, %error,
                "a task file does not decode: moved to storage/tasks/corrupt/ (not run, not deleted)"
            ),
            Err(move_error) => tracing::error!(
                %name, %error, %move_error,
                "a task file does not decode and cannot be moved aside: left in place"
            ),
        }
    }

    /// Takes the waiting tasks among `task_ids` into processing (their holders are known
    /// from before a restart), in one pass over the queue; the ids taken.
    pub(crate) fn claim_all<V>(&mut self, task_ids: &HashMap<String, V>) -> Vec<String> {
        let mut claimed = Vec::new();
        let mut left = VecDeque::with_capacity(self.pending.len());
        for name in std::mem::take(&mut self.pending) {
            let Some(id) = task_id(&name).filter(|id| task_ids.contains_key(*id)) else {
                left.push_back(name);
                continue;
            };
            let id = id.to_owned();
            match fs::rename(
                self.pending_dir.join(&name),
                self.processing_dir.join(&name),
            ) {
                Ok(()) => {
                    self.uncache(&name);
                    self.forget_pending(&name);
                    self.processing.insert(id.clone(), name);
                    claimed.push(id);
                }
                Err(error) => {
                    tracing::error!(%name, %error, "cannot move a task to processing");
                    left.push_back(name);
                }
            }
        }
        self.pending = left;
        claimed
    }

    /// Done: the task's file goes (to `spare/`, for a later task). `false` if it was not
    /// processing.
    pub(crate) fn ack(&mut self, task_id: &str) -> bool {
        let Some(name) = self.processing.remove(task_id) else {
            return false;
        };
        if let Some(&seq) = self.unwritten.get(&name)
            && self.journal.tell(&name, seq, Fate::Settled)
        {
            // Settled before its file was written: none is, and a start does not bring the
            // task back.
            return true;
        }
        if let Err(error) = self.spares.give_back(&self.held_file(&name)) {
            tracing::warn!(%name, %error, "cannot remove an acked task's file");
        }
        true
    }

    /// Back to the head of the queue. `false` if it was not processing.
    pub(crate) fn nack(&mut self, task_id: &str) -> bool {
        let Some(name) = self.processing.remove(task_id) else {
            return false;
        };
        if let Some(&seq) = self.unwritten.get(&name)
            && self.journal.tell(&name, seq, Fate::Waiting)
        {
            // Its file goes to `pending/` (the materializer puts it there).
            self.requeue_front(name);
            return true;
        }
        if let Err(error) = self.move_back(&name) {
            tracing::error!(%name, %error, "cannot return a task to pending; trying again at the next sync");
            self.stranded.push(name);
        }
        true
    }

    /// Moves a requeued task's file back to `pending/`, at the head of the queue.
    fn move_back(&mut self, name: &str) -> io::Result<()> {
        let held = self.held_file(name);
        let back = self.pending_dir.join(name);
        if held != back {
            fs::rename(&held, &back)?;
        }
        self.requeue_front(name.to_owned());
        Ok(())
    }

    /// Where the file of a task handed out is: in `processing/`, unless AiiDA's own tools
    /// moved it back to `pending/` from under the broker (`verdi process repair` opens the
    /// queue as AiiDA's broker does at its start, which moves all of `processing/` back).
    fn held_file(&self, name: &str) -> PathBuf {
        let processing = self.processing_dir.join(name);
        let pending = self.pending_dir.join(name);
        if !processing.exists() && pending.exists() {
            pending
        } else {
            processing
        }
    }

    /// Syncs the removals and moves since the last call (acks, nacks, pops), so a crash
    /// does not bring back many acked tasks.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        self.catch_up();
        for name in std::mem::take(&mut self.stranded) {
            if let Err(error) = self.move_back(&name) {
                tracing::error!(%name, %error, "cannot return a task to pending; trying again at the next sync");
                self.stranded.push(name);
            }
        }
        sync_dir(&self.pending_dir)?;
        sync_dir(&self.processing_dir)?;
        sync_dir(&self.spares.dir)
    }
}

impl Store {
    /// Ends the thread that stocks spares, and waits for it.
    fn stop_stocking(&mut self) {
        self.spares.stop.store(true, Ordering::Release);
        self.spares.low.notify_one();
        if let Some(stocking) = self.stocking.take() {
            let _ = stocking.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop_stocking();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> StoredTask {
        StoredTask {
            id: Some(id.to_owned()),
            sender: serde_json::json!("client-1"),
            sender_identity: None,
            body: raw(serde_json::json!({"task": "continue", "args": {"pid": 1}})),
            no_reply: true,
            timestamp: 0.0,
            results: false,
        }
    }

    /// Stores `tasks` and waits until their files are written.
    fn push(store: &mut Store, tasks: &[StoredTask]) -> io::Result<()> {
        store.push_all(tasks)?;
        assert!(
            store.flush(Duration::from_secs(10)),
            "the files are written"
        );
        Ok(())
    }

    fn raw(value: serde_json::Value) -> Box<serde_json::value::RawValue> {
        serde_json::value::to_raw_value(&value).unwrap()
    }

    fn parsed(body: &serde_json::value::RawValue) -> serde_json::Value {
        serde_json::from_str(body.get()).unwrap()
    }

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiwimq-store-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tasks_survive_a_reopen_in_order_and_processing_ones_come_back() {
        let dir = scratch();
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        push(&mut store, &[task("a"), task("b"), task("c")]).unwrap();
        assert_eq!(store.pop().unwrap().0, "a");
        assert_eq!(store.processing(), 1);
        drop(store);
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        assert_eq!(store.pending(), 3);
        let order: Vec<_> = std::iter::from_fn(|| store.pop().map(|(id, _)| id)).collect();
        assert_eq!(order, ["a", "b", "c"]);
        assert!(store.ack("b"));
        assert!(!store.ack("b"));
        assert!(store.nack("c"));
        assert_eq!(store.pop().unwrap().0, "c");
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_task_handed_out_before_its_file_gets_it_in_processing_and_one_settled_first_none() {
        let dir = scratch();
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        let spares = store.spares.clone();
        // The journal's materializer waits on the spares while this is held.
        let stalled = spares.pool();
        store
            .push_all(&[
                task("held"),
                task("acked"),
                task("requeued"),
                task("waiting"),
            ])
            .unwrap();
        let ids: Vec<String> = (0..3).map(|_| store.pop().unwrap().0).collect();
        assert_eq!(ids, ["held", "acked", "requeued"], "out from memory");
        assert!(store.ack("acked"));
        assert!(store.nack("requeued"));
        drop(stalled);
        assert!(store.flush(Duration::from_secs(10)));
        let names = |which: &str| -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(dir.join(which))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter_map(|name| task_id(&name).map(str::to_owned))
                .collect();
            names.sort();
            names
        };
        assert_eq!(names("processing"), ["held"]);
        assert_eq!(names("pending"), ["requeued", "waiting"]);
        // And a start after a crash does not bring the acked one back.
        drop(store);
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        let order: Vec<_> = std::iter::from_fn(|| store.pop().map(|(id, _)| id)).collect();
        assert_eq!(order, ["held", "requeued", "waiting"]);
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_task_settled_before_its_file_is_not_brought_back_by_the_journal() {
        let dir = scratch();
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        let spares = store.spares.clone();
        let stalled = spares.pool();
        store.push_all(&[task("acked"), task("kept")]).unwrap();
        assert_eq!(store.pop().unwrap().0, "acked");
        assert!(store.ack("acked"));
        // A crash before the files: the journal alone says what was confirmed.
        let journal = fs::read(dir.join("journal")).unwrap();
        drop(stalled);
        drop(store);
        fs::write(dir.join("journal"), journal).unwrap();
        for which in ["pending", "processing"] {
            for entry in fs::read_dir(dir.join(which)).unwrap() {
                fs::remove_file(entry.unwrap().path()).unwrap();
            }
        }
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        let order: Vec<_> = std::iter::from_fn(|| store.pop().map(|(id, _)| id)).collect();
        assert_eq!(order, ["kept"]);
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_broken_file_is_moved_aside_and_a_repaired_one_is_read() {
        let dir = scratch();
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        push(&mut store, &[task("good")]).unwrap();
        fs::write(
            dir.join("pending/0000000000000001_truncated.json"),
            b"{\"body\": {\"ta",
        )
        .unwrap();
        fs::write(
            dir.join("pending/0000000000000002_repaired.json"),
            br#"{"body": {"task": "continue"}, "no_reply": true}"#,
        )
        .unwrap();
        fs::write(dir.join("pending/3_never.json.tmp"), b"{").unwrap();
        drop(store);
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        let (id, repaired) = store.pop().unwrap();
        assert_eq!(id, "repaired");
        assert_eq!(parsed(&repaired.body)["task"], "continue");
        assert_eq!(store.pop().unwrap().0, "good");
        assert!(store.pop().is_none());
        assert!(dir.join("corrupt/0000000000000001_truncated.json").exists());
        assert!(!dir.join("pending/3_never.json.tmp").exists());
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_acked_tasks_file_is_written_over_for_the_next() {
        use std::os::unix::fs::MetadataExt;
        let dir = scratch();
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        push(&mut store, &[task("a")]).unwrap();
        assert_eq!(store.pop().unwrap().0, "a");
        let name = fs::read_dir(dir.join("processing"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let inode = name.metadata().unwrap().ino();
        // A full pool would take no file back: with the stocker stopped, make room for one.
        store.stop_stocking();
        store.spares.take();
        assert!(store.ack("a"));
        assert_eq!(fs::read_dir(dir.join("processing")).unwrap().count(), 0);
        let spares: Vec<u64> = fs::read_dir(dir.join("spare"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().ino())
            .collect();
        assert!(spares.contains(&inode), "the acked file is a spare");
        let mut longer = task("b");
        longer.body = raw(serde_json::json!({"task": "continue", "args": {"pid": 123456789}}));
        push(&mut store, &[longer, task("c")]).unwrap();
        drop(store);
        // Read back from the files, not the memory: a spare holds the new task only.
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        let (id, b) = store.pop().unwrap();
        assert_eq!(id, "b");
        assert_eq!(parsed(&b.body)["args"]["pid"], 123456789);
        assert_eq!(store.pop().unwrap().0, "c");
        assert!(store.pop().is_none());
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tasks_moved_or_removed_from_under_the_store_are_settled_where_they_are() {
        let dir = scratch();
        let mut store = Store::open(&dir, Box::new(|| {})).unwrap();
        push(&mut store, &[task("a"), task("b"), task("c"), task("d")]).unwrap();
        let (a, _) = store.pop().unwrap();
        let (b, _) = store.pop().unwrap();
        // As `verdi process repair` does: processing/ back to pending/, and one pending
        // task removed.
        for entry in fs::read_dir(dir.join("processing")).unwrap() {
            let entry = entry.unwrap();
            fs::rename(entry.path(), dir.join("pending").join(entry.file_name())).unwrap();
        }
        let c_file = fs::read_dir(dir.join("pending"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_str().unwrap().ends_with("_c.json"))
            .unwrap();
        fs::remove_file(c_file).unwrap();
        assert!(store.ack(&a));
        assert!(store.nack(&b));
        // b comes back; c is gone and skipped; d follows; nothing else.
        let order: Vec<_> = std::iter::from_fn(|| store.pop().map(|(id, _)| id)).collect();
        assert_eq!(order, ["b", "d"]);
        let pending = fs::read_dir(dir.join("pending")).unwrap().count();
        assert_eq!(pending, 0, "the acked task's file was taken from pending/");
        drop(store);
        fs::remove_dir_all(dir).unwrap();
    }
}
