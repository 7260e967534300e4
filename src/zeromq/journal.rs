//! The broker's write-ahead journal, `storage/tasks/journal`, owned by the [`Store`]: a
//! batch of tasks is confirmed once its lines are appended here and synced — one sync for
//! the whole batch. Each task's file in AiiDA's `pending/` is written afterwards by the
//! materializer (a thread of the store's own), which syncs a batch of files and their
//! directory and then appends a mark: every task up to it has its file where it belongs (or,
//! settled already, none). A task at or below the last mark whose file is gone was settled.
//! The journal is emptied whenever every line in it is marked.
//!
//! A task may be handed out before its file is written: its fate is then told to the
//! materializer ([`Fate`]), which writes a held task's file into `processing/` and writes
//! none for a task settled already — whose settle the store appends here first (a
//! `settled` line), so that a start never writes it again.
//!
//! At start, [`replay`] writes again each task above the last mark whose file in `pending/`
//! is missing or does not decode (a crash between the confirm and the file), unless a
//! `settled` line says it was done, then empties the journal. A last line cut short by a
//! crash was never synced, so never confirmed: it is skipped.
//!
//! [`Store`]: super::store::Store

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::store::{Spares, StoredTask, is_task_file_name, sync_dir};

/// Called when the materializer has marked more tasks: the broker's loop can dispatch them.
pub(crate) type Wake = Box<dyn Fn() + Send>;

/// What became of a task before its file was marked, by file name: told by the store
/// ([`Journal::tell`]) under the same lock under which the materializer, after writing a
/// batch, puts each file where its task's last fate says and then marks the batch — so a
/// fate is either told before the mark (and done by the materializer) or refused (the file
/// is marked: the store moves it itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// A worker holds it: its file goes to `processing/`.
    Held,
    /// It was settled: no file.
    Settled,
    /// Back in the queue: its file goes to `pending/`.
    Waiting,
}

/// The fates, shared by the store and the materializer.
pub(crate) type Fates = Arc<Mutex<HashMap<String, Fate>>>;

/// At most this many tasks are written and synced by the materializer in one go. A batch
/// goes out to workers once it is marked, so smaller batches let dispatch overlap the
/// writing of the next (measured: 4,096 at once halved the rate of 2,000 tasks sent to
/// acked against 512).
const MATERIALIZED_AT_ONCE: usize = 512;

/// Past this length the journal waits for the materializer to catch up (which empties it)
/// before it takes more: a stream of tasks that never lets it catch up would otherwise grow
/// it without end.
const JOURNAL_LIMIT: u64 = 16 << 20;

/// How long an append past the limit waits for the materializer to catch up before it is
/// refused. Far below any client's confirm timeout, so a refused task is said to be so
/// (and not stored) rather than left to time out, be sent again and be stored twice; and
/// short, since the broker's thread (RPCs, pings) waits with it.
const CATCH_UP: Duration = Duration::from_secs(2);

/// One task on its way to `pending/`: its place in the journal, its file name, its bytes.
#[derive(Debug)]
struct Entry {
    seq: u64,
    name: String,
    bytes: Vec<u8>,
}

/// A line of the journal: a task (`seq`, `name`, `task`) or a mark (`synced`).
#[derive(serde::Deserialize)]
struct Line {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    task: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    synced: Option<u64>,
    /// A task settled before its file was written.
    #[serde(default)]
    settled: Option<u64>,
}

/// The journal file, its length, and the last task appended to it.
#[derive(Debug)]
struct Appender {
    file: File,
    len: u64,
    appended: u64,
}

impl Appender {
    /// Appends `lines` (whole lines) and, if `sync`, waits until they are on disk. On an
    /// error the file is cut back to its last whole line, so that the next lines are not
    /// glued to a part of these.
    fn append(&mut self, lines: &[u8], sync: bool) -> io::Result<()> {
        let written = self
            .file
            .write_all(lines)
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                self.len += lines.len() as u64;
                Ok(())
            }
            Err(error) => {
                let _ = self.file.set_len(self.len);
                Err(error)
            }
        }
    }

    /// Empties the journal.
    fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.len = 0;
        Ok(())
    }
}

/// What the broker's thread and the materializer share.
#[derive(Debug)]
struct Shared {
    appender: Mutex<Appender>,
    /// The last task whose file is written and synced.
    marked: Mutex<u64>,
    marked_changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn appender(&self) -> MutexGuard<'_, Appender> {
        self.appender.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn marked(&self) -> MutexGuard<'_, u64> {
        self.marked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that every task up to `seq` has its file: a mark line, or an empty journal
    /// when nothing was appended after it. Neither is synced: lost to a power cut, the tasks
    /// below are written again at start (a settled one may then run again), never lost.
    fn mark(&self, seq: u64) -> io::Result<()> {
        let mut appender = self.appender();
        if appender.appended == seq {
            appender.clear()?;
        } else {
            appender.append(format!("{{\"synced\":{seq}}}\n").as_bytes(), false)?;
        }
        drop(appender);
        *self.marked() = seq;
        self.marked_changed.notify_all();
        Ok(())
    }
}

/// The journal and its materializer.
#[derive(Debug)]
pub(crate) struct Journal {
    shared: Arc<Shared>,
    fates: Fates,
    entries: Option<Sender<Vec<Entry>>>,
    materializer: Option<JoinHandle<()>>,
}

impl Journal {
    /// Opens the journal at `path` (empty: [`replay`] has run) and starts the materializer,
    /// which writes tasks into `pending_dir` over `spares` and calls `wake` after each mark.
    pub(crate) fn start(
        path: &Path,
        dirs: Dirs,
        spares: Arc<Spares>,
        wake: Wake,
    ) -> io::Result<Self> {
        let fates = Fates::default();
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let shared = Arc::new(Shared {
            appender: Mutex::new(Appender {
                len: file.metadata()?.len(),
                file,
                appended: 0,
            }),
            marked: Mutex::new(0),
            marked_changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (entries, received) = mpsc::channel();
        let materializer = {
            let shared = shared.clone();
            let fates = fates.clone();
            std::thread::Builder::new()
                .name("kiwimq-tasks".into())
                .spawn(move || materialize(&shared, &received, &dirs, &spares, &fates, &wake))?
        };
        Ok(Self {
            shared,
            fates,
            entries: Some(entries),
            materializer: Some(materializer),
        })
    }

    /// Appends `tasks` (named `names`) and returns once they are on disk, with the place
    /// of each in the journal; their files follow. Past its limit, it waits a little for the
    /// files to catch up, then refuses ([`io::ErrorKind::StorageFull`]): nothing appended.
    pub(crate) fn append(&self, tasks: &[StoredTask], names: &[String]) -> io::Result<Vec<u64>> {
        if self.shared.appender().len > JOURNAL_LIMIT && !self.flush(CATCH_UP) {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "the broker's disk is behind: {} MiB of confirmed tasks wait for their files                      (try again later)",
                    JOURNAL_LIMIT >> 20
                ),
            ));
        }
        let mut lines = Vec::with_capacity(tasks.len() * 256);
        let mut entries = Vec::with_capacity(tasks.len());
        let mut appender = self.shared.appender();
        let mut seq = appender.appended;
        for (task, name) in tasks.iter().zip(names) {
            seq += 1;
            let bytes = serde_json::to_vec(task).map_err(io::Error::other)?;
            let quoted = serde_json::to_string(name).map_err(io::Error::other)?;
            write!(lines, "{{\"seq\":{seq},\"name\":{quoted},\"task\":")?;
            lines.extend_from_slice(&bytes);
            lines.extend_from_slice(b"}\n");
            entries.push(Entry {
                seq,
                name: name.clone(),
                bytes,
            });
        }
        appender.append(&lines, true)?;
        appender.appended = seq;
        drop(appender);
        let seqs = entries.iter().map(|e| e.seq).collect();
        if let Some(sender) = &self.entries {
            sender
                .send(entries)
                .map_err(|_| io::Error::other("the materializer is gone"))?;
        }
        Ok(seqs)
    }

    fn fates(&self) -> MutexGuard<'_, HashMap<String, Fate>> {
        self.fates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the materializer the fate of the task at `seq` (its file `name`), if its file
    /// is not marked yet: whether it was not (the materializer then puts the file as the
    /// fate says, or writes none). A settle is noted in the journal too, so a start does not
    /// write the task again (written, not synced: a power cut may bring it back, and it
    /// runs again — at least once).
    pub(crate) fn tell(&self, name: &str, seq: u64, fate: Fate) -> bool {
        let mut fates = self.fates();
        if *self.shared.marked() >= seq {
            return false;
        }
        if fate == Fate::Settled {
            let line = format!("{{\"settled\":{seq}}}\n");
            if let Err(error) = self.shared.appender().append(line.as_bytes(), false) {
                tracing::warn!(%error, "cannot note a settle in the journal; a restart may run the task again");
            }
        }
        fates.insert(name.to_owned(), fate);
        true
    }

    /// The last task whose file is written (or, settled first, needs none).
    pub(crate) fn marked(&self) -> u64 {
        *self.shared.marked()
    }

    /// Waits (up to `timeout`) until every task appended has its file; whether they do.
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
        let appended = self.shared.appender().appended;
        let marked = self.shared.marked();
        let (marked, _) = self
            .shared
            .marked_changed
            .wait_timeout_while(marked, timeout, |marked| *marked < appended)
            .unwrap_or_else(|p| p.into_inner());
        *marked >= appended
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // The materializer writes what it was given, then ends with the channel.
        self.entries = None;
        if let Some(materializer) = self.materializer.take() {
            if !self.flush(Duration::from_secs(30)) {
                // A disk that refuses: the journal keeps the tasks for the next start.
                self.shared.stop.store(true, Ordering::Release);
            }
            let _ = materializer.join();
        }
    }
}

/// Where task files go: AiiDA's `pending/` and `processing/`.
#[derive(Debug, Clone)]
pub(crate) struct Dirs {
    pub(crate) pending: PathBuf,
    pub(crate) processing: PathBuf,
}

/// The materializer: writes each batch of journaled tasks, syncs them, puts each where its
/// task's last fate says, and marks them, until the journal goes.
fn materialize(
    shared: &Shared,
    received: &Receiver<Vec<Entry>>,
    dirs: &Dirs,
    spares: &Spares,
    fates: &Fates,
    wake: &Wake,
) {
    while let Ok(mut batch) = received.recv() {
        while batch.len() < MATERIALIZED_AT_ONCE {
            match received.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        while let Err(error) = write_files(dirs, spares, fates, &batch) {
            tracing::error!(
                %error, count = batch.len(),
                "confirmed tasks cannot be written to pending/ (the journal keeps them); trying again in 1 s"
            );
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let Some(last) = batch.last().map(|entry| entry.seq) else {
            continue;
        };
        // The fates told since the files were written are done, then the batch is marked,
        // under one lock: no fate falls between.
        let mut told = fates.lock().unwrap_or_else(|p| p.into_inner());
        put_right(dirs, spares, &batch, &mut told);
        let marked = shared.mark(last);
        drop(told);
        if let Err(error) = marked {
            // The files are there, so they may go out; but a start before the next mark
            // would write again those of them settled by then, and run them again.
            tracing::warn!(%error, "cannot mark tasks written in the journal; a restart may run some again");
            *shared.marked() = last;
            shared.marked_changed.notify_all();
        }
        wake();
    }
}

/// After a batch is written: each file whose task's fate was told is put where the fate
/// says (a settled one's removed, a held one's in `processing/`, a requeued one's in
/// `pending/`), and the fates of the batch forgotten.
fn put_right(dirs: &Dirs, spares: &Spares, batch: &[Entry], fates: &mut HashMap<String, Fate>) {
    if fates.is_empty() {
        return;
    }
    for entry in batch {
        let Some(fate) = fates.remove(&entry.name) else {
            continue;
        };
        let in_pending = dirs.pending.join(&entry.name);
        let in_processing = dirs.processing.join(&entry.name);
        let moved = match fate {
            Fate::Settled => [in_pending, in_processing]
                .iter()
                .filter(|path| path.exists())
                .try_for_each(|path| spares.give_back(path)),
            // One place each (a write tried again after a failure may have left a copy in
            // the other).
            Fate::Held => settle_in(&in_pending, &in_processing),
            Fate::Waiting => settle_in(&in_processing, &in_pending),
        };
        if let Err(error) = moved {
            tracing::error!(name = %entry.name, %error, ?fate, "cannot put a task's file where its fate says");
        }
    }
}

/// Makes `to` the one copy of a task's file: moves `from` there, or removes it when `to`
/// is there already.
fn settle_in(from: &Path, to: &Path) -> io::Result<()> {
    if !from.exists() {
        return Ok(());
    }
    if to.exists() {
        fs::remove_file(from)
    } else {
        fs::rename(from, to)
    }
}

/// Writes `entries` durably: over spares (or temporary files when none is ready), synced
/// together, renamed to their names in `pending/` (or `processing/`, for a task held
/// already), and the directories synced. A task settled already gets no file.
fn write_files(dirs: &Dirs, spares: &Spares, fates: &Fates, entries: &[Entry]) -> io::Result<()> {
    let mut taken = Vec::new();
    let mut placed = 0;
    let written = write_batch(dirs, spares, fates, entries, &mut taken, &mut placed);
    if written.is_err() {
        // What was taken and not put in place goes back: a spare to the pool (its content
        // is nothing), a temporary away — a disk that fails does not eat them.
        for path in taken.into_iter().skip(placed) {
            if path.extension().is_some_and(|e| e == "spare") {
                spares.pool().push(path);
            } else {
                let _ = fs::remove_file(path);
            }
        }
    }
    written
}

/// [`write_files`]' work: `taken` gets each file taken for a task, in order, and `placed`
/// counts those renamed into place.
fn write_batch(
    dirs: &Dirs,
    spares: &Spares,
    fates: &Fates,
    entries: &[Entry],
    taken: &mut Vec<PathBuf>,
    placed: &mut usize,
) -> io::Result<()> {
    let pending_dir = &dirs.pending;
    let mut written = Vec::with_capacity(entries.len());
    let mut to_processing = false;
    for entry in entries {
        let fate = fates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&entry.name)
            .copied();
        let dir = match fate {
            Some(Fate::Settled) => continue,
            Some(Fate::Held) => {
                to_processing = true;
                &dirs.processing
            }
            Some(Fate::Waiting) | None => pending_dir,
        };
        // A spare is written over where it is (a crash leaves it a spare); a new file is
        // made as a temporary one (a crash leaves a `.tmp`, removed at start).
        let (path, mut file) = match spares.take() {
            Some(spare) => {
                taken.push(spare.clone());
                let file = OpenOptions::new().write(true).truncate(true).open(&spare)?;
                (spare, file)
            }
            None => {
                let temporary = pending_dir.join(format!("{}.tmp", entry.name));
                taken.push(temporary.clone());
                let file = File::create(&temporary)?;
                (temporary, file)
            }
        };
        file.write_all(&entry.bytes)?;
        written.push((&entry.name, path, file, dir));
    }
    if written.is_empty() {
        // Every task of the batch was settled before its file: nothing to write.
        return Ok(());
    }
    // Issued together, the syncs share the file system's commits.
    let threads = written.len().clamp(1, 8);
    let chunk = written.len().div_ceil(threads);
    std::thread::scope(|scope| -> io::Result<()> {
        let syncs: Vec<_> = written
            .chunks(chunk)
            .map(|files| {
                scope.spawn(move || {
                    files
                        .iter()
                        .try_for_each(|(_, _, file, _)| file.sync_data())
                })
            })
            .collect();
        for sync in syncs {
            sync.join()
                .map_err(|_| io::Error::other("a sync thread panicked"))??;
        }
        Ok(())
    })?;
    for (name, path, _, dir) in &written {
        fs::rename(path, dir.join(name))?;
        *placed += 1;
    }
    if to_processing {
        sync_dir(&dirs.processing)?;
    }
    sync_dir(pending_dir)
}

/// Brings the journal at `path` (if any) into `pending_dir` after a stop: each task above
/// the last mark whose file is missing or does not decode is written again, durably; then
/// the journal is emptied. Returns how many were written again.
pub(crate) fn replay(path: &Path, pending_dir: &Path) -> io::Result<usize> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut tasks = Vec::new();
    let mut marked = 0;
    let mut settled = HashSet::new();
    for (number, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        match serde_json::from_slice::<Line>(&line) {
            Ok(Line {
                synced: Some(seq), ..
            }) => marked = marked.max(seq),
            Ok(Line {
                settled: Some(seq), ..
            }) => {
                settled.insert(seq);
            }
            Ok(Line {
                seq: Some(seq),
                name: Some(name),
                task: Some(task),
                ..
            }) => tasks.push((seq, name, task)),
            _ if line.is_empty() => {}
            // Cut short by a crash before its sync: never confirmed.
            _ => tracing::warn!(
                line = number + 1,
                "a journal line that does not read was skipped"
            ),
        }
    }
    let mut restored = 0;
    for (seq, name, task) in tasks.into_iter().filter(|(seq, ..)| *seq > marked) {
        // The name is joined to pending/: `../x_1.json` or `/tmp/x_1.json` would write
        // elsewhere (found writing the journal's fuzz target).
        if !is_task_file_name(&name) {
            tracing::warn!(%name, "a journaled task with an unusable name was skipped");
            continue;
        }
        if settled.contains(&seq) {
            // Settled before its mark: a file written for it all the same (its writer had
            // begun) is taken away, so the task does not run again.
            match fs::remove_file(pending_dir.join(&name)) {
                Ok(()) => {
                    tracing::debug!(%name, "the file of a task settled before it was removed")
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
            continue;
        }
        let file = pending_dir.join(&name);
        let intact = fs::read(&file)
            .ok()
            .is_some_and(|bytes| serde_json::from_slice::<StoredTask>(&bytes).is_ok());
        if intact {
            continue;
        }
        let temporary = pending_dir.join(format!("{name}.tmp"));
        let mut written = File::create(&temporary)?;
        written.write_all(task.get().as_bytes())?;
        written.sync_data()?;
        fs::rename(&temporary, &file)?;
        restored += 1;
    }
    sync_dir(pending_dir)?;
    let journal = OpenOptions::new().write(true).open(path)?;
    journal.set_len(0)?;
    journal.sync_all()?;
    if restored > 0 {
        tracing::warn!(
            restored,
            "confirmed tasks the last run had not written to pending/ were written from the journal"
        );
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> (PathBuf, PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("kiwimq-journal-{}", uuid::Uuid::new_v4()));
        let pending = dir.join("pending");
        fs::create_dir_all(&pending).unwrap();
        (dir.join("journal"), pending, dir)
    }

    fn dirs(pending: &Path) -> Dirs {
        let processing = pending.with_file_name("processing");
        fs::create_dir_all(&processing).unwrap();
        Dirs {
            pending: pending.to_owned(),
            processing,
        }
    }

    /// A task `id` whose body is a string of `bytes` bytes.
    fn sized(id: &str, bytes: usize) -> StoredTask {
        StoredTask {
            id: Some(id.to_owned()),
            sender: serde_json::Value::Null,
            sender_identity: None,
            body: serde_json::value::to_raw_value(&"x".repeat(bytes)).unwrap(),
            no_reply: true,
            timestamp: 0.0,
            results: false,
        }
    }

    /// A small task `id`.
    fn task(id: &str) -> StoredTask {
        sized(id, 8)
    }

    fn line(seq: u64, name: &str, pid: u32) -> String {
        format!(
            "{{\"seq\":{seq},\"name\":\"{name}\",\"task\":{{\"id\":\"{pid}\",\"body\":{{\"task\":\"continue\",\"args\":{{\"pid\":{pid}}}}},\"no_reply\":true}}}}\n"
        )
    }

    fn read(file: &Path) -> StoredTask {
        serde_json::from_slice(&fs::read(file).unwrap()).unwrap()
    }

    #[test]
    fn a_confirmed_task_without_its_file_is_written_at_start() {
        let (journal, pending, dir) = scratch();
        fs::write(&journal, line(1, "10_a.json", 1) + &line(2, "11_b.json", 2)).unwrap();
        assert_eq!(replay(&journal, &pending).unwrap(), 2);
        assert_eq!(read(&pending.join("10_a.json")).id.as_deref(), Some("1"));
        assert_eq!(read(&pending.join("11_b.json")).id.as_deref(), Some("2"));
        assert_eq!(
            fs::metadata(&journal).unwrap().len(),
            0,
            "the journal is emptied"
        );
        assert_eq!(replay(&journal, &pending).unwrap(), 0);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_marked_task_whose_file_is_gone_was_settled_and_stays_gone() {
        let (journal, pending, dir) = scratch();
        let text = line(1, "10_a.json", 1) + "{\"synced\":1}\n" + &line(2, "11_b.json", 2);
        fs::write(&journal, text).unwrap();
        assert_eq!(replay(&journal, &pending).unwrap(), 1);
        assert!(
            !pending.join("10_a.json").exists(),
            "a settled task is not brought back"
        );
        assert!(pending.join("11_b.json").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_task_settled_before_its_file_is_not_written_at_start() {
        let (journal, pending, dir) = scratch();
        let text = line(1, "10_a.json", 1)
            + &line(2, "11_b.json", 2)
            + &line(3, "12_c.json", 3)
            + "{\"settled\":1}\n{\"settled\":3}\n";
        fs::write(&journal, text).unwrap();
        // Its writer had begun before the settle: the file is there, and must go.
        fs::write(pending.join("12_c.json"), br#"{"id": "3", "body": 3}"#).unwrap();
        assert_eq!(replay(&journal, &pending).unwrap(), 1);
        assert!(!pending.join("10_a.json").exists(), "settled: never again");
        assert!(
            !pending.join("12_c.json").exists(),
            "settled: its late file gone"
        );
        assert!(pending.join("11_b.json").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_materializer_writes_a_held_tasks_file_to_processing_and_none_for_a_settled_one() {
        let (journal_file, pending, dir) = scratch();
        let spares = Arc::new(Spares::open(&dir.join("spare")).unwrap());
        let stalled = spares.pool();
        let journal = Journal::start(
            &journal_file,
            dirs(&pending),
            spares.clone(),
            Box::new(|| {}),
        )
        .unwrap();
        let names = ["1_a.json", "2_b.json", "3_c.json"].map(str::to_owned);
        journal
            .append(&[task("a"), task("b"), task("c")], &names)
            .unwrap();
        assert!(journal.tell(&names[0], 1, Fate::Held));
        assert!(journal.tell(&names[1], 2, Fate::Settled));
        drop(stalled);
        assert!(journal.flush(Duration::from_secs(10)));
        assert!(
            !journal.tell(&names[2], 3, Fate::Held),
            "a fate after the mark is refused"
        );
        // A batch of settled tasks only: no file at all, and the writer goes on.
        let stalled = spares.pool();
        journal.append(&[task("d")], &["4_d.json".into()]).unwrap();
        assert!(journal.tell("4_d.json", 4, Fate::Settled));
        drop(stalled);
        assert!(journal.flush(Duration::from_secs(10)));
        journal.append(&[task("e")], &["5_e.json".into()]).unwrap();
        assert!(
            journal.flush(Duration::from_secs(10)),
            "the writer is still there"
        );
        assert!(pending.join("5_e.json").exists());
        assert!(journal.fates().is_empty(), "every fate was done as it says");
        assert!(dir.join("processing/1_a.json").exists());
        assert!(!dir.join("processing/2_b.json").exists() && !pending.join("2_b.json").exists());
        assert!(pending.join("3_c.json").exists());
        drop(journal);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_half_written_file_is_written_again_and_a_line_cut_short_is_skipped() {
        let (journal, pending, dir) = scratch();
        fs::write(pending.join("10_a.json"), b"{\"body\": {\"ta").unwrap();
        // A spare truncated for it, the crash before its bytes.
        fs::write(pending.join("11_b.json"), b"").unwrap();
        let cut = &line(3, "12_c.json", 3)[..30];
        let text = line(1, "10_a.json", 1) + &line(2, "11_b.json", 2) + cut;
        fs::write(&journal, text).unwrap();
        assert_eq!(replay(&journal, &pending).unwrap(), 2);
        assert_eq!(read(&pending.join("10_a.json")).id.as_deref(), Some("1"));
        assert_eq!(read(&pending.join("11_b.json")).id.as_deref(), Some("2"));
        assert!(
            !pending.join("12_c.json").exists(),
            "never synced, never confirmed"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    /// Found writing the journal's fuzz target: a line's name is joined to pending/, and only
    /// its id was checked, so `../x_1.json` wrote a task file beside pending/.
    #[test]
    fn a_journaled_name_that_leaves_pending_is_skipped() {
        let (journal, pending, dir) = scratch();
        let outside = pending.parent().unwrap().join("x_1.json");
        let inside = format!(
            "{}\n{}\n",
            line(1, "../x_1.json", 7),
            line(2, "9_t-2.json", 7)
        );
        fs::write(&journal, inside).unwrap();
        assert_eq!(replay(&journal, &pending).unwrap(), 1);
        assert!(
            !outside.exists(),
            "a task file was written outside pending/"
        );
        assert!(pending.join("9_t-2.json").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_journal_is_emptied_once_every_task_has_its_file() {
        let (journal_file, pending, dir) = scratch();
        let spares = Arc::new(Spares::open(&dir.join("spare")).unwrap());
        let journal =
            Journal::start(&journal_file, dirs(&pending), spares, Box::new(|| {})).unwrap();
        let names = ["1_a.json".to_owned(), "2_b.json".to_owned()];
        let seqs = journal.append(&[task("a"), task("b")], &names).unwrap();
        assert_eq!(seqs, [1, 2]);
        assert!(journal.flush(Duration::from_secs(10)));
        assert_eq!(journal.marked(), 2);
        assert_eq!(read(&pending.join("2_b.json")).id.as_deref(), Some("b"));
        assert_eq!(fs::metadata(&journal_file).unwrap().len(), 0);
        drop(journal);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn past_its_limit_the_journal_waits_for_the_files_and_is_emptied() {
        let (journal_file, pending, dir) = scratch();
        let spares = Arc::new(Spares::open(&dir.join("spare")).unwrap());
        let journal = Arc::new(
            Journal::start(
                &journal_file,
                dirs(&pending),
                spares.clone(),
                Box::new(|| {}),
            )
            .unwrap(),
        );
        let big = |n: usize| sized(&n.to_string(), 64 << 10);
        // The materializer stalls on the spares while this is held: nothing gets written.
        let stalled = spares.pool();
        let mut n = 0;
        while fs::metadata(&journal_file).unwrap().len() <= JOURNAL_LIMIT {
            n += 1;
            journal
                .append(&[big(n)], &[format!("{n}_{n}.json")])
                .unwrap();
        }
        let appender = {
            let journal = journal.clone();
            let file = journal_file.clone();
            std::thread::spawn(move || {
                journal.append(&[big(0)], &["0_0.json".to_owned()]).unwrap();
                fs::metadata(&file).unwrap().len()
            })
        };
        let watched = std::time::Instant::now();
        while watched.elapsed() < Duration::from_millis(300) {
            assert!(
                !appender.is_finished(),
                "an append past the limit went on with no file written"
            );
            std::thread::yield_now();
        }
        drop(stalled);
        let after = appender.join().unwrap();
        assert!(
            after < 80 << 10,
            "the journal was emptied before the append: {after} bytes"
        );
        drop(journal);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn past_its_limit_an_append_that_cannot_catch_up_is_refused_and_appends_nothing() {
        let (journal_file, pending, dir) = scratch();
        let spares = Arc::new(Spares::open(&dir.join("spare")).unwrap());
        let journal = Journal::start(
            &journal_file,
            dirs(&pending),
            spares.clone(),
            Box::new(|| {}),
        )
        .unwrap();
        let big = |n: usize| sized(&n.to_string(), 1 << 20);
        let stalled = spares.pool();
        let mut n = 0;
        while fs::metadata(&journal_file).unwrap().len() <= JOURNAL_LIMIT {
            n += 1;
            journal
                .append(&[big(n)], &[format!("{n}_{n}.json")])
                .unwrap();
        }
        let before = fs::metadata(&journal_file).unwrap().len();
        let started = std::time::Instant::now();
        let refused = journal
            .append(&[big(0)], &["0_0.json".to_owned()])
            .unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::StorageFull, "{refused}");
        assert!(started.elapsed() < CATCH_UP * 2, "refused within its wait");
        assert_eq!(fs::metadata(&journal_file).unwrap().len(), before);
        drop(stalled);
        drop(journal);
        fs::remove_dir_all(dir).unwrap();
    }
}
