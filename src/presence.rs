//! Presence: each communicator says, every few seconds, who it is and what it is doing —
//! for a dashboard (`kiwimq dashboard`, the `dashboard` feature) or a script watching
//! the fleet with [`Communicator::watch_presence`](crate::Communicator::watch_presence).
//!
//! An announcement ([`Presence`], JSON) goes to an exchange of kiwimq's own beside the
//! message exchange (`<message exchange>.kiwimq-presence` on RabbitMQ, a binding of its own
//! on `mem://`), which kiwiPy's and AiiDA's peers never bind: they see nothing new. It
//! carries the process (host, pid, program), kiwimq's version, the backend and node, the
//! subscribers by kind, the tasks in flight with their age and the progress their handlers
//! report ([`Task::report_progress`](crate::Task::report_progress)), the outcomes counted
//! so far, restarts, health and uptime. [`close`](crate::Communicator::close) sends a last word
//! (`closing: true`); a watcher that hears nothing from a communicator for three intervals
//! takes it for lost ([`Presence::is_lost`]).
//!
//! Anyone who may publish on the broker can announce anything, so a watcher checks what it
//! hears ([`Presence::from_json`]): an announcement over 256 KiB, undecodable, or with a
//! number out of range (an interval that is not a finite number from 0 to a day, an age or
//! an uptime negative or absurd, progress outside 0 to 1, a queue name AMQP would refuse)
//! is refused alone, logged and counted (`kiwimq_presence_refused_total`); counts are
//! added up saturating. A [`Roster`] is bounded in members and bytes.
//!
//! On by default, every 5 s: [`Settings::with_presence_interval`](crate::Settings::with_presence_interval)
//! changes the interval or turns it off. On ZeroMQ, kiwimq's broker carries announcements in
//! message types of its own, which it forwards to watchers only; AiiDA's broker has no
//! channel its clients would not hear (every broadcast reaches every AiiDA client), so a
//! communicator on it announces nothing, and watching is refused with a clear error.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One communicator's announcement of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Presence {
    /// The communicator's own id (a UUID), the same in each of its announcements.
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// The program's name (its executable's file name).
    pub program: String,
    /// kiwimq's version.
    pub version: String,
    /// `mem`, `amqp` or `zmq`.
    pub backend: String,
    /// The broker node it is connected to (password hidden), or its URI.
    pub node: String,
    /// Whether its connection is up.
    pub connected: bool,
    /// Milliseconds since the Unix epoch when this was sent.
    pub sent_at_ms: u64,
    /// Seconds since it connected.
    pub uptime_secs: f64,
    /// How often it announces itself, in seconds.
    pub interval_secs: f64,
    /// Its task queues, each with its subscribers and counts.
    pub task_queues: Vec<QueuePresence>,
    /// How many RPC identifiers it serves.
    pub rpc_identifiers: usize,
    /// Its broadcast subscribers' filters (`*` for one that takes every broadcast).
    pub broadcast_filters: Vec<String>,
    /// The tasks it is handling now, oldest first.
    pub in_flight: Vec<InFlightTask>,
    /// Its task outcomes so far, over every queue.
    pub counts: TaskCounts,
    /// Restarts of its supervised actors (kiwimq's own and its users').
    pub restarts: u64,
    /// Subscribers it lost for good.
    pub subscribers_lost: u64,
    /// Task and RPC results it awaits.
    pub pending_results: usize,
    /// Its last word: it is closing.
    pub closing: bool,
}

/// One task queue a communicator consumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueuePresence {
    /// The queue's name.
    pub name: String,
    /// Its prefetch: tasks it holds at most.
    pub prefetch: u16,
    /// Its subscribers in this communicator.
    pub subscribers: usize,
    /// Tasks of this queue being handled now.
    pub running: usize,
    /// Outcomes of this queue's tasks so far.
    pub counts: TaskCounts,
}

/// Outcomes of tasks handled by one communicator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TaskCounts {
    /// Answered with a result.
    pub handled: u64,
    /// Answered with an error.
    pub failed: u64,
    /// Their handler panicked.
    pub panicked: u64,
    /// Declined by a subscriber ([`HandlerError::Rejected`](crate::HandlerError::Rejected)).
    pub rejected: u64,
}

impl TaskCounts {
    /// Every outcome (saturating: the counts come from the network).
    pub fn total(&self) -> u64 {
        self.handled
            .saturating_add(self.failed)
            .saturating_add(self.panicked)
            .saturating_add(self.rejected)
    }

    fn add(&mut self, other: &TaskCounts) {
        self.handled = self.handled.saturating_add(other.handled);
        self.failed = self.failed.saturating_add(other.failed);
        self.panicked = self.panicked.saturating_add(other.panicked);
        self.rejected = self.rejected.saturating_add(other.rejected);
    }
}

/// A task being handled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InFlightTask {
    /// Its queue.
    pub queue: String,
    /// Its sender's correlation id, when it expects a reply.
    pub correlation_id: Option<String>,
    /// Seconds since its handling began.
    pub age_secs: f64,
    /// How far its handler says it is, from 0 to 1, if it says.
    pub progress: Option<f64>,
    /// What its handler says it is doing, if it says.
    pub note: Option<String>,
}

impl Presence {
    /// The longest announcement a watcher accepts, in bytes of JSON.
    pub const MAX_BYTES: usize = 256 * 1024;

    /// The longest interval a watcher accepts, in seconds (a day): a communicator announces
    /// itself at least this often ([`Settings::with_presence_interval`](crate::Settings::with_presence_interval)
    /// caps its interval so).
    pub const MAX_INTERVAL_SECS: f64 = 86_400.0;

    /// The longest uptime or task age a watcher accepts, in seconds (about 317 years).
    pub const MAX_AGE_SECS: f64 = 1e10;

    /// The latest `sent_at_ms` a watcher accepts: 2^53, the largest integer a page's
    /// JavaScript reads exactly (the year 287,396).
    pub const MAX_SENT_AT_MS: u64 = 1 << 53;

    /// An announcement from its JSON, checked ([`check`](Self::check)): what a watcher
    /// accepts of the network. At most [`MAX_BYTES`](Self::MAX_BYTES) are read.
    pub fn from_json(bytes: &[u8]) -> Result<Presence, InvalidPresence> {
        if bytes.len() > Self::MAX_BYTES {
            return Err(InvalidPresence::TooLarge(bytes.len()));
        }
        let presence: Presence = serde_json::from_slice(bytes)
            .map_err(|error| InvalidPresence::Undecodable(error.to_string()))?;
        presence.check()?;
        Ok(presence)
    }

    /// Whether every number of the announcement is in its range — intervals, uptimes and
    /// ages finite, not negative and at most their maximum, progress from 0 to 1, queue
    /// names as AMQP allows them — so that arithmetic on it cannot overflow or panic.
    pub fn check(&self) -> Result<(), InvalidPresence> {
        let out_of_range = |what: &str, value: &dyn std::fmt::Display| {
            Err(InvalidPresence::OutOfRange(format!("{what} {value}")))
        };
        let seconds = |value: f64, max: f64| value.is_finite() && (0.0..=max).contains(&value);
        if !seconds(self.interval_secs, Self::MAX_INTERVAL_SECS) {
            return out_of_range("interval_secs", &self.interval_secs);
        }
        if !seconds(self.uptime_secs, Self::MAX_AGE_SECS) {
            return out_of_range("uptime_secs", &self.uptime_secs);
        }
        if self.sent_at_ms > Self::MAX_SENT_AT_MS {
            return out_of_range("sent_at_ms", &self.sent_at_ms);
        }
        for task in &self.in_flight {
            if !seconds(task.age_secs, Self::MAX_AGE_SECS) {
                return out_of_range("in_flight.age_secs", &task.age_secs);
            }
            if let Some(progress) = task.progress
                && !seconds(progress, 1.0)
            {
                return out_of_range("in_flight.progress", &progress);
            }
        }
        if let Some(queue) = self.task_queues.iter().find(|q| !is_queue_name(&q.name)) {
            return out_of_range("task_queues.name", &format!("{:?}", queue.name));
        }
        Ok(())
    }

    /// Whether a communicator last heard from at `last_heard` is lost by `now`: nothing for
    /// three of its intervals (and not closed, which it would have said). Never panics,
    /// whatever its interval: one that no `Duration` holds is never lost.
    pub fn is_lost(&self, last_heard: Instant, now: Instant) -> bool {
        let silent_for =
            Duration::try_from_secs_f64(self.interval_secs.max(0.001) * LOST_AFTER_INTERVALS)
                .unwrap_or(Duration::MAX);
        !self.closing && now.saturating_duration_since(last_heard) > silent_for
    }

    /// About how many bytes of memory it holds: what a [`Roster`] counts against its bound.
    pub fn footprint(&self) -> usize {
        use std::mem::size_of;
        let text = |s: &String| s.len();
        size_of::<Presence>()
            + text(&self.id)
            + text(&self.host)
            + text(&self.program)
            + text(&self.version)
            + text(&self.backend)
            + text(&self.node)
            + self
                .task_queues
                .iter()
                .map(|q| size_of::<QueuePresence>() + q.name.len())
                .sum::<usize>()
            + self
                .broadcast_filters
                .iter()
                .map(|f| size_of::<String>() + f.len())
                .sum::<usize>()
            + self
                .in_flight
                .iter()
                .map(|t| {
                    size_of::<InFlightTask>()
                        + t.queue.len()
                        + t.correlation_id.as_ref().map_or(0, String::len)
                        + t.note.as_ref().map_or(0, String::len)
                })
                .sum::<usize>()
    }
}

/// Whether `name` is a queue name as AMQP allows it: 1 to 255 bytes, no control characters.
pub fn is_queue_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.chars().any(char::is_control)
}

/// Why a watcher refused an announcement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidPresence {
    /// Longer than [`Presence::MAX_BYTES`] (its length).
    #[error("an announcement of {0} bytes, more than {max}", max = Presence::MAX_BYTES)]
    TooLarge(usize),
    /// Not an announcement's JSON.
    #[error("not an announcement: {0}")]
    Undecodable(String),
    /// A field out of its range (which, and its value).
    #[error("an announcement with {0} out of range")]
    OutOfRange(String),
}

impl InvalidPresence {
    /// `too_large`, `undecodable` or `out_of_range`: the refusal's label in the metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            InvalidPresence::TooLarge(_) => "too_large",
            InvalidPresence::Undecodable(_) => "undecodable",
            InvalidPresence::OutOfRange(_) => "out_of_range",
        }
    }
}

/// Silent for this many intervals: lost.
pub const LOST_AFTER_INTERVALS: f64 = 3.0;

/// How a watcher sees a communicator it heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Standing {
    /// Heard from within three of its intervals.
    Live,
    /// Silent for three of its intervals, without a last word: killed, stalled, or cut off.
    Lost,
    /// It said its last word.
    Closed,
}

/// The communicators a watcher heard from, with their standing: what a dashboard shows.
/// Feed it each announcement with [`heard`](Self::heard); those lost or closed are kept
/// for [`Roster::KEPT`], then forgotten. Its members are keyed by an id each announcer
/// chooses, so it is bounded: at most [`MAX_MEMBERS`](Self::MAX_MEMBERS) members and
/// [`MAX_BYTES`](Self::MAX_BYTES) of announcements ([`Presence::footprint`]); past
/// either, the member heard from longest ago is forgotten first. A flood of forged ids
/// thus pushes real members out for as long as it lasts; each comes back at its next
/// announcement.
#[derive(Debug, Default, Clone)]
pub struct Roster {
    members: HashMap<String, Heard>,
    /// The members by when they were last heard, oldest first: who goes first.
    order: BTreeMap<(Instant, u64), String>,
    /// The sum of the members' footprints.
    bytes: usize,
    /// Breaks ties in `order` between members heard at the same instant.
    next: u64,
}

/// A member's latest announcement, when it came, and its place in the roster's order.
#[derive(Debug, Clone)]
struct Heard {
    presence: Presence,
    at: Instant,
    place: u64,
    bytes: usize,
}

/// One communicator in a [`Roster`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Member {
    /// Its latest announcement.
    pub presence: Presence,
    /// Its standing now.
    pub standing: Standing,
    /// Seconds since it was last heard from.
    pub silent_secs: f64,
}

impl Roster {
    /// How long a lost or closed communicator stays on the roster.
    pub const KEPT: Duration = Duration::from_secs(15 * 60);

    /// The most members a roster holds.
    pub const MAX_MEMBERS: usize = 10_000;

    /// The most bytes of announcements a roster holds (32 MiB): a hundred and twenty-eight
    /// of the largest a watcher accepts, or ten thousand of 3 KiB.
    pub const MAX_BYTES: usize = 32 * 1024 * 1024;

    /// Notes an announcement heard at `now`, unless one of its numbers is out of range
    /// ([`Presence::check`]): then the roster is left as it was. Forgets the members heard
    /// from longest ago while it holds more than its bounds.
    pub fn heard(&mut self, presence: Presence, now: Instant) -> Result<(), InvalidPresence> {
        presence.check()?;
        let bytes = presence.footprint();
        if let Some(before) = self.members.remove(&presence.id) {
            self.order.remove(&(before.at, before.place));
            self.bytes -= before.bytes;
        }
        let place = self.next;
        self.next += 1;
        self.order.insert((now, place), presence.id.clone());
        self.bytes += bytes;
        self.members.insert(
            presence.id.clone(),
            Heard {
                presence,
                at: now,
                place,
                bytes,
            },
        );
        while self.members.len() > Self::MAX_MEMBERS || self.bytes > Self::MAX_BYTES {
            if !self.forget_oldest() {
                break;
            }
        }
        Ok(())
    }

    /// Forgets the member heard from longest ago; false if there is none.
    fn forget_oldest(&mut self) -> bool {
        let Some((_, id)) = self.order.pop_first() else {
            return false;
        };
        if let Some(gone) = self.members.remove(&id) {
            self.bytes -= gone.bytes;
        }
        true
    }

    /// How many members it holds.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The bytes of announcements it holds (the sum of their [`Presence::footprint`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Every member at `now`, by host, program and pid; forgets those gone for longer than
    /// [`KEPT`](Self::KEPT).
    pub fn members(&mut self, now: Instant) -> Vec<Member> {
        while let Some((&(at, _), _)) = self.order.first_key_value() {
            if now.saturating_duration_since(at) < Self::KEPT {
                break;
            }
            self.forget_oldest();
        }
        let mut members: Vec<Member> = self
            .members
            .values()
            .map(|Heard { presence, at, .. }| Member {
                standing: if presence.closing {
                    Standing::Closed
                } else if presence.is_lost(*at, now) {
                    Standing::Lost
                } else {
                    Standing::Live
                },
                silent_secs: now.saturating_duration_since(*at).as_secs_f64(),
                presence: presence.clone(),
            })
            .collect();
        members.sort_by(|a, b| {
            (
                &a.presence.host,
                &a.presence.program,
                a.presence.pid,
                &a.presence.id,
            )
                .cmp(&(
                    &b.presence.host,
                    &b.presence.program,
                    b.presence.pid,
                    &b.presence.id,
                ))
        });
        members
    }
}

/// What a communicator did, as its presence tells it: outcomes per queue, the tasks in
/// flight, its broadcast filters. Shared by every subscriber of one communicator.
#[derive(Debug, Clone, Default)]
pub(crate) struct Activity(Arc<ActivityState>);

#[derive(Debug, Default)]
struct ActivityState {
    /// Each queue's counts, taken once per subscriber: counting takes no lock.
    counts: Mutex<HashMap<Arc<str>, Arc<Tally>>>,
    in_flight: Mutex<HashMap<u64, Running, foldhash::fast::RandomState>>,
    next: AtomicU64,
    broadcast_filters: Mutex<BTreeMap<String, String>>,
}

/// One queue's outcomes so far.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    handled: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    rejected: AtomicU64,
}

impl Tally {
    /// Counts a task ended so.
    pub(crate) fn ended(&self, outcome: Outcome) {
        let count = match outcome {
            Outcome::Handled => &self.handled,
            Outcome::Failed => &self.failed,
            Outcome::Panicked => &self.panicked,
            Outcome::Rejected => &self.rejected,
        };
        count.fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> TaskCounts {
        TaskCounts {
            handled: self.handled.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            panicked: self.panicked.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
struct Running {
    queue: Arc<str>,
    correlation_id: Option<String>,
    started: Instant,
    progress: Option<f64>,
    note: Option<String>,
}

/// How one task's handling ended, as counted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Handled,
    Failed,
    Panicked,
    Rejected,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Activity {
    /// A task of `queue` begins: in flight until the returned handle is dropped.
    pub(crate) fn begin(&self, queue: &Arc<str>, correlation_id: Option<&str>) -> Progress {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.0.in_flight).insert(
            id,
            Running {
                queue: queue.clone(),
                correlation_id: correlation_id.map(str::to_owned),
                started: Instant::now(),
                progress: None,
                note: None,
            },
        );
        Progress {
            activity: self.clone(),
            id,
        }
    }

    /// Where the outcomes of `queue`'s tasks are counted.
    pub(crate) fn tally(&self, queue: &Arc<str>) -> Arc<Tally> {
        lock(&self.0.counts)
            .entry(queue.clone())
            .or_default()
            .clone()
    }

    /// Notes a broadcast subscriber's filter.
    pub(crate) fn filter_added(&self, identifier: &str, filter: String) {
        lock(&self.0.broadcast_filters).insert(identifier.to_owned(), filter);
    }

    pub(crate) fn filter_removed(&self, identifier: &str) {
        lock(&self.0.broadcast_filters).remove(identifier);
    }

    pub(crate) fn counts(&self, queue: &str) -> TaskCounts {
        lock(&self.0.counts)
            .get(queue)
            .map(|tally| tally.counts())
            .unwrap_or_default()
    }

    pub(crate) fn total(&self) -> TaskCounts {
        let mut total = TaskCounts::default();
        for tally in lock(&self.0.counts).values() {
            total.add(&tally.counts());
        }
        total
    }

    /// The tasks in flight, oldest first.
    pub(crate) fn in_flight(&self, now: Instant) -> Vec<InFlightTask> {
        let in_flight = lock(&self.0.in_flight);
        let mut running: Vec<(&u64, &Running)> = in_flight.iter().collect();
        running.sort_by_key(|(id, _)| **id);
        running
            .into_iter()
            .map(|(_, running)| InFlightTask {
                queue: running.queue.to_string(),
                correlation_id: running.correlation_id.clone(),
                age_secs: now.saturating_duration_since(running.started).as_secs_f64(),
                progress: running.progress,
                note: running.note.clone(),
            })
            .collect()
    }

    pub(crate) fn filters(&self) -> Vec<String> {
        lock(&self.0.broadcast_filters).values().cloned().collect()
    }
}

/// A task's place among the tasks in flight; it leaves when this is dropped (with the
/// task). See [`Task::report_progress`](crate::Task::report_progress).
#[derive(Debug)]
pub(crate) struct Progress {
    activity: Activity,
    id: u64,
}

impl Progress {
    pub(crate) fn report(&self, fraction: f64, note: Option<String>) {
        let fraction = fraction.is_finite().then(|| fraction.clamp(0.0, 1.0));
        if let Some(running) = lock(&self.activity.0.in_flight).get_mut(&self.id) {
            running.progress = fraction;
            if note.is_some() {
                running.note = note;
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        lock(&self.activity.0.in_flight).remove(&self.id);
    }
}

/// Who a communicator is: what each of its announcements repeats.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) pid: u32,
    pub(crate) program: String,
    pub(crate) backend: String,
    pub(crate) started: Instant,
}

impl Identity {
    /// `mem`, `amqp` or `zmq` (the dashboard shows it).
    #[cfg(feature = "dashboard")]
    pub(crate) fn backend(&self) -> &str {
        &self.backend
    }

    pub(crate) fn new(uri: &str) -> Self {
        let backend = uri.split_once("://").map_or("", |(scheme, _)| scheme);
        let backend = match backend {
            "amqps" => "amqp",
            "zmq+ipc" => "zmq",
            other => other,
        };
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            pid: std::process::id(),
            program: std::env::args_os()
                .next()
                .and_then(|arg| {
                    std::path::Path::new(&arg)
                        .file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                })
                .unwrap_or_default(),
            backend: backend.to_owned(),
            started: Instant::now(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_clamped_and_a_nan_says_unknown() {
        let activity = Activity::default();
        let queue: Arc<str> = "q".into();
        let progress = activity.begin(&queue, Some("c1"));
        let read = || activity.in_flight(Instant::now())[0].clone();
        progress.report(1.7, Some("almost".to_owned()));
        assert_eq!(
            (read().progress, read().note.as_deref()),
            (Some(1.0), Some("almost"))
        );
        progress.report(-3.0, None);
        assert_eq!(
            (read().progress, read().note.as_deref()),
            (Some(0.0), Some("almost"))
        );
        progress.report(f64::NAN, None);
        assert_eq!(read().progress, None);
        assert_eq!(read().correlation_id.as_deref(), Some("c1"));
        drop(progress);
        assert!(activity.in_flight(Instant::now()).is_empty());
    }

    fn announcement(id: &str) -> Presence {
        Presence {
            id: id.into(),
            host: "h".into(),
            pid: 1,
            program: "p".into(),
            version: "0".into(),
            backend: "mem".into(),
            node: "mem://".into(),
            connected: true,
            sent_at_ms: 0,
            uptime_secs: 0.0,
            interval_secs: 1.0,
            task_queues: Vec::new(),
            rpc_identifiers: 0,
            broadcast_filters: Vec::new(),
            in_flight: Vec::new(),
            counts: TaskCounts::default(),
            restarts: 0,
            subscribers_lost: 0,
            pending_results: 0,
            closing: false,
        }
    }

    #[test]
    fn an_interval_too_large_for_a_duration_is_never_lost_and_never_a_panic() {
        // Found by fuzzing the presence decoder: `from_secs_f64` panicked on 1e300.
        let heard = Instant::now();
        for interval in [1e300, f64::INFINITY, f64::MAX] {
            let mut presence = announcement("a");
            presence.interval_secs = interval;
            assert!(!presence.is_lost(heard, heard + Duration::from_secs(3600)));
        }
    }

    #[test]
    fn a_roster_forgets_a_member_silent_longer_than_it_keeps_them() {
        let mut roster = Roster::default();
        let heard = Instant::now();
        roster.heard(announcement("a"), heard).unwrap();
        let standing = |roster: &mut Roster, after: Duration| {
            roster.members(heard + after).first().map(|m| m.standing)
        };
        assert_eq!(
            standing(&mut roster, Duration::from_secs(2)),
            Some(Standing::Live)
        );
        assert_eq!(
            standing(&mut roster, Duration::from_secs(4)),
            Some(Standing::Lost)
        );
        assert_eq!(
            standing(&mut roster, Roster::KEPT + Duration::from_secs(1)),
            None
        );
    }

    #[test]
    fn an_interval_no_duration_holds_is_never_lost_and_never_panics() {
        let heard = Instant::now();
        let later = heard + Duration::from_secs(3600);
        for interval in [1e300, f64::INFINITY, f64::MAX, f64::NAN, -1.0, 0.0] {
            let mut presence = announcement("a");
            presence.interval_secs = interval;
            let lost = presence.is_lost(heard, later);
            assert_eq!(lost, interval.is_nan() || interval <= 0.0, "{interval}");
        }
    }

    #[test]
    fn numbers_out_of_range_are_refused_at_decode_and_by_the_roster() {
        let json = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut value = serde_json::to_value(announcement("a")).unwrap();
            change(&mut value);
            serde_json::to_vec(&value).unwrap()
        };
        assert!(Presence::from_json(&json(&|_| ())).is_ok());
        let refused = |change: &dyn Fn(&mut serde_json::Value)| {
            Presence::from_json(&json(change)).unwrap_err().reason()
        };
        assert_eq!(
            refused(&|v| v["interval_secs"] = 1e300.into()),
            "out_of_range"
        );
        assert_eq!(
            refused(&|v| v["interval_secs"] = (-5.0).into()),
            "out_of_range"
        );
        assert_eq!(refused(&|v| v["uptime_secs"] = 1e11.into()), "out_of_range");
        assert_eq!(
            refused(&|v| v["sent_at_ms"] = u64::MAX.into()),
            "out_of_range"
        );
        assert_eq!(refused(&|v| v["pid"] = (-1).into()), "undecodable");
        let task = |age: f64, progress: f64| {
            serde_json::json!([{"queue": "q", "correlation_id": null, "age_secs": age,
                "progress": progress, "note": null}])
        };
        assert!(Presence::from_json(&json(&|v| v["in_flight"] = task(1.0, 0.5))).is_ok());
        assert_eq!(
            refused(&|v| v["in_flight"] = task(-1.0, 0.5)),
            "out_of_range"
        );
        assert_eq!(
            refused(&|v| v["in_flight"] = task(1.0, 1.5)),
            "out_of_range"
        );
        let long = "q".repeat(256);
        let queue = serde_json::json!([{"name": long, "prefetch": 1, "subscribers": 1,
            "running": 0, "counts": TaskCounts::default()}]);
        assert_eq!(
            refused(&|v| v["task_queues"] = queue.clone()),
            "out_of_range"
        );
        let huge = vec![b' '; Presence::MAX_BYTES + 1];
        assert_eq!(
            Presence::from_json(&huge).unwrap_err().reason(),
            "too_large"
        );

        let mut roster = Roster::default();
        let mut absurd = announcement("absurd");
        absurd.interval_secs = 1e300;
        assert!(roster.heard(absurd, Instant::now()).is_err());
        assert!(roster.is_empty());
        assert!(roster.members(Instant::now()).is_empty());
    }

    #[test]
    fn a_communicator_never_announces_an_interval_its_watchers_refuse() {
        let settings = crate::Settings::new("mem://")
            .with_presence_interval(Some(Duration::from_secs(7 * 86_400)));
        let interval = settings.presence_interval.unwrap().as_secs_f64();
        assert_eq!(interval, Presence::MAX_INTERVAL_SECS);
    }

    #[test]
    fn counts_that_overflow_saturate() {
        let max = TaskCounts {
            handled: u64::MAX,
            failed: u64::MAX,
            panicked: 1,
            rejected: 1,
        };
        assert_eq!(max.total(), u64::MAX);
        let mut sum = max;
        sum.add(&max);
        assert_eq!(
            sum,
            TaskCounts {
                panicked: 2,
                rejected: 2,
                ..max
            }
        );
    }

    #[test]
    fn a_roster_flooded_with_ids_keeps_the_newest_within_its_bounds() {
        let mut roster = Roster::default();
        let start = Instant::now();
        for n in 0..100_000u64 {
            let at = start + Duration::from_millis(n);
            roster
                .heard(announcement(&format!("forged-{n}")), at)
                .unwrap();
        }
        println!(
            "a roster after 100,000 forged ids: {} members, {} bytes",
            roster.len(),
            roster.bytes()
        );
        assert_eq!(roster.len(), Roster::MAX_MEMBERS);
        assert!(roster.bytes() <= Roster::MAX_BYTES);
        let now = start + Duration::from_millis(100_000);
        let members = roster.members(now);
        assert!(members.iter().all(|m| {
            let n: u64 = m.presence.id["forged-".len()..].parse().unwrap();
            n >= 100_000 - Roster::MAX_MEMBERS as u64
        }));
        // Heard again: a member moves to the newest end, and the count is unchanged.
        roster.heard(announcement("forged-90000"), now).unwrap();
        roster.heard(announcement("newcomer"), now).unwrap();
        assert_eq!(roster.len(), Roster::MAX_MEMBERS);
        let ids: Vec<String> = roster
            .members(now)
            .into_iter()
            .map(|m| m.presence.id)
            .collect();
        assert!(ids.contains(&"forged-90000".to_owned()) && ids.contains(&"newcomer".to_owned()));
        assert!(!ids.contains(&"forged-90001".to_owned()));
        // Big announcements: the bytes bound holds first.
        let mut big = Roster::default();
        for n in 0..200 {
            let mut presence = announcement(&format!("big-{n}"));
            presence.broadcast_filters = vec!["x".repeat(250_000)];
            big.heard(presence, start).unwrap();
        }
        assert!(big.bytes() <= Roster::MAX_BYTES, "{}", big.bytes());
        assert!(big.len() < 200);
        // Forgotten after KEPT, bytes and all.
        assert!(big.members(start + Roster::KEPT).is_empty());
        assert_eq!(big.bytes(), 0);
    }
}
