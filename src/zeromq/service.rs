//! A broker's service directory, in AiiDA's layout: `broker.pid`, `broker.sockets`,
//! `broker.status` (written by kiwimq's broker, read by its client as by AiiDA's `verdi
//! status`), and kiwimq's `broker.lock`, held for the broker's life.
//!
//! Every file is written whole or not at all: to a temporary of its own, synced, renamed,
//! and the directory synced, so a power cut leaves the old text or the new, never an empty
//! file.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// AiiDA's pid-file sentinel: the daemon calls a broker reachable by it.
pub(crate) const PID_SENTINEL: &str = "aiida-zeromq-broker";

/// The name of the file in a kiwimq broker's socket directory that names its service
/// directory, so a client given only the socket (`zmq+ipc://`) finds the broker's status.
pub(crate) const SERVICE_DIR_MARK: &str = "service-dir";

/// `broker.status`, AiiDA's fields and kiwimq's `broker`. Every field is optional on
/// reading: AiiDA's broker writes all but `broker`, and a file from another version may
/// lack some.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ServiceStatus {
    #[serde(default)]
    pub(crate) running: bool,
    #[serde(default)]
    pub(crate) pending_tasks: Option<u64>,
    #[serde(default)]
    pub(crate) processing_tasks: Option<u64>,
    #[serde(default)]
    pub(crate) task_subscribers: Option<u64>,
    #[serde(default)]
    pub(crate) rpc_subscribers: Option<u64>,
    #[serde(default)]
    pub(crate) available_workers: Option<u64>,
    #[serde(default)]
    pub(crate) in_flight_tasks: Option<u64>,
    #[serde(default)]
    pub(crate) pending_rpc_responses: Option<u64>,
    #[serde(default)]
    pub(crate) timestamp: Option<f64>,
    #[serde(default)]
    pub(crate) pid: Option<u64>,
    /// `"kiwimq"` from kiwimq's broker; AiiDA's writes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) broker: Option<String>,
}

/// The broker that writes this: kiwimq's.
pub(crate) const KIWIMQ: &str = "kiwimq";

impl ServiceStatus {
    /// Reads `broker.status` of `service_dir`.
    pub(crate) fn read(service_dir: &Path) -> Result<Self> {
        let path = service_dir.join("broker.status");
        let bytes =
            fs::read(&path).map_err(|e| Error::refused(format!("{}: {e}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::codec(format!("{}: {e}", path.display())))
    }

    /// Whether kiwimq's broker wrote it.
    pub(crate) fn is_kiwimq(&self) -> bool {
        self.broker.as_deref() == Some(KIWIMQ)
    }
}

/// Seconds since the epoch, as AiiDA's timestamps are.
pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Syncs a directory, so the names created, renamed or removed in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `path` whole or not at all, durably: a temporary of its own (`<name>.tmp`),
/// synced, renamed over `path`, the directory synced.
pub(crate) fn replace_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let temporary = path.with_file_name(name);
    let mut file = File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
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

/// The service directory a kiwimq broker's socket at `socket` serves, if it says (its
/// socket directory's mark).
pub(crate) fn service_dir_of_socket(socket: &Path) -> Option<PathBuf> {
    let text = fs::read_to_string(socket.parent()?.join(SERVICE_DIR_MARK)).ok()?;
    let dir = PathBuf::from(text.trim());
    dir.is_absolute().then_some(dir)
}

fn io_error(what: &str, error: io::Error) -> Error {
    Error::connection(format!("broker: {what}: {error}"))
}

/// This broker's exclusive hold on a service directory: `broker.lock`, locked (`flock`)
/// for as long as it is kept. Its modification time is this broker's last sign of life,
/// touched every tick, which the next start reads.
#[derive(Debug)]
pub(crate) struct ServiceLock {
    file: File,
    /// When the broker before this one was last alive, as its touches say.
    previous_alive: Option<SystemTime>,
}

impl ServiceLock {
    /// Takes the lock of `dir`, or says who holds it. A `broker.pid` naming a live AiiDA
    /// broker (which takes no lock) refuses too; one naming any other process is stale.
    pub(crate) fn take(dir: &Path) -> Result<Self> {
        let path = dir.join("broker.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_error("broker.lock", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::refused(format!(
                    "another broker serves {} (it holds broker.lock)",
                    dir.display()
                )));
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_error("locking broker.lock", e)),
        }
        let pid_file = dir.join("broker.pid");
        if let Some(pid) = pid_named(&pid_file).filter(|pid| *pid != std::process::id()) {
            match process_cmdline(pid) {
                Some(cmdline) if is_aiida_broker(&cmdline) => {
                    return Err(Error::refused(format!(
                        "AiiDA's broker (pid {pid}) serves {}",
                        dir.display()
                    )));
                }
                Some(_) => tracing::warn!(
                    pid,
                    "broker.pid names a live process that is no broker of this directory: stale"
                ),
                None => {}
            }
        }
        let previous_alive = file.metadata().and_then(|m| m.modified()).ok();
        Ok(Self {
            file,
            previous_alive,
        })
    }

    /// When the broker before this one last touched the lock (a sign of life every tick).
    pub(crate) fn previous_alive(&self) -> Option<SystemTime> {
        self.previous_alive
    }

    /// A sign of life: the lock's modification time is now.
    pub(crate) fn touch(&self) {
        if let Err(error) = self.file.set_modified(SystemTime::now()) {
            tracing::debug!(%error, "cannot touch broker.lock");
        }
    }
}

/// The pid `broker.pid` names (`aiida-zeromq-broker <pid>`).
fn pid_named(pid_file: &Path) -> Option<u32> {
    let text = fs::read_to_string(pid_file).ok()?;
    text.split_whitespace().last()?.parse().ok()
}

/// A live process's command line (arguments joined by spaces); `None` if there is no such
/// process, or a zombie.
fn process_cmdline(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state is the field after the parenthesised command name.
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" {
        return None;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        cmdline
            .split(|b| *b == 0)
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Whether a command line is AiiDA's broker: `verdi … daemon broker …` or
/// `python -m aiida.brokers.zeromq.service …`.
fn is_aiida_broker(cmdline: &str) -> bool {
    (cmdline.contains("verdi") && cmdline.contains("broker"))
        || cmdline.contains("aiida.brokers.zeromq")
}

/// The files of a service directory.
#[derive(Debug)]
pub(crate) struct ServiceFiles {
    dir: PathBuf,
    pid: PathBuf,
    status: PathBuf,
    sockets: PathBuf,
    socket_dir: PathBuf,
    /// The socket's path, the same after every restart.
    pub(crate) socket: PathBuf,
}

impl ServiceFiles {
    /// The files of `dir`.
    pub(crate) fn new(dir: &Path) -> Self {
        let socket_dir = sockets_dir(dir);
        Self {
            dir: dir.to_owned(),
            pid: dir.join("broker.pid"),
            status: dir.join("broker.status"),
            sockets: dir.join("broker.sockets"),
            socket: socket_dir.join("router.sock"),
            socket_dir,
        }
    }

    /// Makes the socket directory, private to this user, and marks it with the service
    /// directory.
    pub(crate) fn prepare_socket_dir(&self) -> Result<()> {
        match fs::DirBuilder::new().mode(0o700).create(&self.socket_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error("the socket directory", e)),
        }
        let meta = fs::symlink_metadata(&self.socket_dir)
            .map_err(|e| io_error("the socket directory", e))?;
        let uid = fs::metadata("/proc/self")
            .map(|m| m.uid())
            .unwrap_or(meta.uid());
        if !meta.is_dir() || meta.uid() != uid {
            return Err(Error::connection(format!(
                "broker: {} is not a directory of this user's: refusing to put the socket there",
                self.socket_dir.display()
            )));
        }
        fs::set_permissions(&self.socket_dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_error("the socket directory", e))?;
        match fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("the old socket", e)),
        }
        let dir = self.dir.canonicalize().unwrap_or_else(|_| self.dir.clone());
        replace_durably(
            &self.socket_dir.join(SERVICE_DIR_MARK),
            dir.display().to_string().as_bytes(),
        )
        .map_err(|e| io_error("the socket directory's mark", e))
    }

    /// Announces the broker: sockets first, the pid last (AiiDA reads the pid as "up").
    pub(crate) fn announce(&self) -> Result<()> {
        let sockets = self.socket_dir.display().to_string();
        replace_durably(&self.sockets, sockets.as_bytes())
            .and_then(|()| {
                let pid = format!("{PID_SENTINEL} {}", std::process::id());
                replace_durably(&self.pid, pid.as_bytes())
            })
            .map_err(|e| io_error("the service files", e))
    }

    /// Writes `broker.status`.
    pub(crate) fn write_status(&self, status: &ServiceStatus) {
        let text = serde_json::to_vec_pretty(status).expect("a status serializes");
        if let Err(error) = replace_durably(&self.status, &text) {
            tracing::warn!(%error, "cannot write broker.status");
        }
    }

    /// Removes the service files and the socket (the broker stops).
    pub(crate) fn remove(&self) {
        for path in [&self.pid, &self.status, &self.sockets, &self.socket] {
            let _ = fs::remove_file(path);
        }
        let _ = fs::remove_file(self.socket_dir.join(SERVICE_DIR_MARK));
        let _ = fs::remove_dir(&self.socket_dir);
        let _ = sync_dir(&self.dir);
    }
}

/// How long a hand-over may take to leave the broker: a task handed over less than this
/// before the broker's last sign of life may never have reached its worker.
pub(crate) const HANDOVER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiwimq-service-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn one_lock_per_directory_and_it_is_given_back_on_drop() {
        let dir = scratch();
        let first = ServiceLock::take(&dir).unwrap();
        let second = ServiceLock::take(&dir).unwrap_err();
        assert!(second.to_string().contains("another broker"), "{second}");
        drop(first);
        ServiceLock::take(&dir).expect("free again");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_pid_file_naming_a_live_process_that_is_no_broker_is_stale() {
        let dir = scratch();
        // This test's own process: alive, and not a broker (pid reuse looks like this).
        let parent = std::os::unix::process::parent_id();
        fs::write(dir.join("broker.pid"), format!("{PID_SENTINEL} {parent}")).unwrap();
        ServiceLock::take(&dir).expect("a stale pid file does not block a start");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn aiidas_broker_is_told_by_its_command_line() {
        assert!(is_aiida_broker(
            "/v/bin/python /v/bin/verdi -p p daemon broker --service-dir /d"
        ));
        assert!(is_aiida_broker(
            "python -m aiida.brokers.zeromq.service --service-dir /d"
        ));
        assert!(!is_aiida_broker("/usr/bin/sleep 100"));
    }

    #[test]
    fn a_file_replaced_durably_leaves_no_temporary_and_the_status_reads_back() {
        let dir = scratch();
        let status = ServiceStatus {
            running: true,
            pending_tasks: Some(3),
            broker: Some(KIWIMQ.into()),
            ..ServiceStatus::default()
        };
        let files = ServiceFiles::new(&dir);
        files.write_status(&status);
        files.write_status(&status);
        let read = ServiceStatus::read(&dir).unwrap();
        assert!(read.is_kiwimq());
        assert_eq!(read.pending_tasks, Some(3));
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["broker.status"]);
        // AiiDA's: no `broker` field.
        fs::write(
            dir.join("broker.status"),
            br#"{"running": true, "pending_tasks": 1}"#,
        )
        .unwrap();
        assert!(!ServiceStatus::read(&dir).unwrap().is_kiwimq());
        fs::remove_dir_all(dir).unwrap();
    }
}
