//! Presence: each communicator says, every few seconds, who it is and what it is doing —
//! for a dashboard (`kiwimq dashboard`, the `dashboard` feature) or a script watching
//! the fleet with [`Communicator::watch_presence`].
//!
//! An announcement ([`Presence`], JSON) goes to an exchange of kiwimq's own beside the
//! message exchange (`<message exchange>.kiwimq-presence` on RabbitMQ, a binding of its own
//! on `mem://`), which kiwiPy's and AiiDA's peers never bind: they see nothing new. It
//! carries the process (host, pid, program), kiwimq's version, the backend and node, the
//! subscribers by kind, the tasks in flight with their age and the progress their handlers
//! report ([`Task::report_progress`](crate::Task::report_progress)), the outcomes counted
//! so far, restarts, health and uptime. [`close`](Communicator::close) sends a last word
//! (`closing: true`); a watcher that hears nothing from a communicator for three intervals
//! takes it for lost ([`Presence::is_lost`]).
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

use futures::StreamExt;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::communicator::{Communicator, Core};
use crate::error::{ErrorKind, Result};
use crate::transport::{Outgoing, Route, Source};

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
    /// Every outcome.
    pub fn total(&self) -> u64 {
        // Counts from an announcement are the sender's to choose: near u64::MAX, a sum
        // saturates rather than overflow.
        self.handled
            .saturating_add(self.failed)
            .saturating_add(self.panicked)
            .saturating_add(self.rejected)
    }

    fn add(&mut self, other: &TaskCounts) {
        self.handled += other.handled;
        self.failed += other.failed;
        self.panicked += other.panicked;
        self.rejected += other.rejected;
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
    /// Whether a communicator last heard from at `last_heard` is lost by `now`: nothing for
    /// three of its intervals (and not closed, which it would have said).
    pub fn is_lost(&self, last_heard: Instant, now: Instant) -> bool {
        // The interval is the sender's to choose: one too large for a Duration (1e300, or
        // infinite) is never lost, where `from_secs_f64` would panic (found by fuzzing).
        let lost_after =
            Duration::try_from_secs_f64(self.interval_secs.max(0.001) * LOST_AFTER_INTERVALS)
                .unwrap_or(Duration::MAX);
        !self.closing && now.saturating_duration_since(last_heard) > lost_after
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
/// for [`Roster::KEPT`], then forgotten.
#[derive(Debug, Default, Clone)]
pub struct Roster {
    members: BTreeMap<String, (Presence, Instant)>,
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

    /// Notes an announcement heard at `now`.
    pub fn heard(&mut self, presence: Presence, now: Instant) {
        self.members.insert(presence.id.clone(), (presence, now));
    }

    /// Every member at `now`, by host, program and pid; forgets those gone for longer than
    /// [`KEPT`](Self::KEPT).
    pub fn members(&mut self, now: Instant) -> Vec<Member> {
        self.members
            .retain(|_, (_, heard)| now.saturating_duration_since(*heard) < Self::KEPT);
        let mut members: Vec<Member> = self
            .members
            .values()
            .map(|(presence, heard)| Member {
                standing: if presence.closing {
                    Standing::Closed
                } else if presence.is_lost(*heard, now) {
                    Standing::Lost
                } else {
                    Standing::Live
                },
                silent_secs: now.saturating_duration_since(*heard).as_secs_f64(),
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

    fn counts(&self, queue: &str) -> TaskCounts {
        lock(&self.0.counts)
            .get(queue)
            .map(|tally| tally.counts())
            .unwrap_or_default()
    }

    fn total(&self) -> TaskCounts {
        let mut total = TaskCounts::default();
        for tally in lock(&self.0.counts).values() {
            total.add(&tally.counts());
        }
        total
    }

    /// The tasks in flight, oldest first.
    fn in_flight(&self, now: Instant) -> Vec<InFlightTask> {
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

    fn filters(&self) -> Vec<String> {
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
    id: String,
    host: String,
    pid: u32,
    program: String,
    backend: String,
    started: Instant,
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

impl Core {
    /// This communicator's announcement now, from what it can tell at once: its queues and
    /// identifiers only with `tree` (asked of the actor tree).
    fn presence_now(&self, tree: Option<Subscriptions>, closing: bool) -> Presence {
        let identity = &self.identity;
        let activity = &self.activity;
        let now = Instant::now();
        let tree = tree.unwrap_or_default();
        let task_queues = tree
            .queues
            .into_iter()
            .map(|(name, prefetch, subscribers, running)| QueuePresence {
                counts: activity.counts(&name),
                name: name.to_string(),
                prefetch,
                subscribers,
                running,
            })
            .collect();
        Presence {
            id: identity.id.clone(),
            host: identity.host.clone(),
            pid: identity.pid,
            program: identity.program.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            backend: identity.backend.clone(),
            node: self
                .conduit
                .transport
                .node()
                .unwrap_or_else(|| self.settings.redacted_uri()),
            connected: self.conduit.transport.is_connected() && !closing,
            sent_at_ms: now_ms(),
            uptime_secs: now
                .saturating_duration_since(identity.started)
                .as_secs_f64(),
            interval_secs: self
                .settings
                .presence_interval
                .unwrap_or_default()
                .as_secs_f64(),
            task_queues,
            rpc_identifiers: tree.rpc_identifiers,
            broadcast_filters: activity.filters(),
            in_flight: activity.in_flight(now),
            counts: activity.total(),
            restarts: self.incidents.restarts(),
            subscribers_lost: self.incidents.losses(),
            pending_results: self.replies.len(),
            closing,
        }
    }

    /// Its subscriptions, as the actor tree knows them.
    async fn subscriptions(&self) -> Option<Subscriptions> {
        let tree = self.root.send(crate::tree::Inspect).await.ok()?;
        let mut queues = Vec::with_capacity(tree.task_queues.len());
        for queue in tree.task_queues {
            if let Ok(stats) = queue.send(crate::actors::task_consumer::Describe).await {
                queues.push(stats);
            }
        }
        queues.sort_by(|a, b| a.0.cmp(&b.0));
        Some(Subscriptions {
            queues,
            rpc_identifiers: tree.rpc_endpoints.len(),
        })
    }

    /// Sends one announcement. Nobody watching is fine.
    async fn announce(&self, presence: &Presence) -> Result<()> {
        announce(&self.conduit, presence).await
    }

    /// The last word, sent by [`Communicator::close`].
    pub(crate) async fn say_goodbye(&self) {
        if self.settings.presence_interval.is_none() || !self.presence_supported() {
            return;
        }
        let presence = self.presence_now(self.subscriptions().await, true);
        if let Err(error) = self.announce(&presence).await {
            tracing::debug!(%error, "the presence's last word was not sent");
        }
    }

    /// Whether its backend has a channel for presence (every one but a `zmq://` connection
    /// to AiiDA's broker).
    pub(crate) fn presence_supported(&self) -> bool {
        self.conduit.transport.carries_presence()
    }
}

/// Sends one announcement through `conduit`.
async fn announce(conduit: &crate::actors::Conduit, presence: &Presence) -> Result<()> {
    let body = serde_json::to_vec(presence)
        .map_err(|e| crate::Error::codec(format!("a presence that is not JSON: {e}")))?;
    let message = Outgoing {
        body,
        ..Outgoing::default()
    };
    conduit.send(Route::Presence, message).await
}

/// A communicator's queues `(name, prefetch, subscribers, running)` and identifiers.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    queues: Vec<(Arc<str>, u16, usize, usize)>,
    rpc_identifiers: usize,
}

/// Announces the communicator every interval while it lives. Holds it weakly: presence
/// never keeps a communicator open.
pub(crate) async fn announce_while_open(core: std::sync::Weak<Core>, interval: Duration) {
    loop {
        let (presence, conduit) = {
            let Some(core) = core.upgrade() else {
                return;
            };
            if core.check_open().is_err() {
                return;
            }
            let presence = core.presence_now(core.subscriptions().await, false);
            (presence, core.conduit.clone())
        };
        // Sent without the communicator: a publish that waits for its confirm (up to the
        // send timeout, with the broker away) does not keep a dropped one open; its
        // transport is closed then, and the send fails `Closed`.
        if let Err(error) = announce(&conduit, &presence).await {
            if matches!(error.kind(), ErrorKind::Closed) {
                return;
            }
            tracing::debug!(%error, "a presence announcement was not sent");
        }
        drop(conduit);
        actix_rt::time::sleep(interval).await;
    }
}

impl Communicator {
    /// What this communicator would announce now (see [`crate::presence`]), whether or
    /// not presence is on.
    pub async fn presence(&self) -> Presence {
        let inner = &self.inner;
        let closed = inner.check_open().is_err();
        inner.presence_now(inner.subscriptions().await, closed)
    }

    /// Every announcement on the broker from now on, this communicator's own included, as
    /// long as the stream is held; an undecodable one is skipped with a warning. `Refused`
    /// on AiiDA's ZeroMQ broker (see the module docs). At most the message prefetch
    /// ([`Settings::with_message_prefetch`](crate::Settings::with_message_prefetch)) of
    /// announcements wait in the stream; more wait in the broker while it is not read
    /// (for 66 s, the presence queue's message TTL). Dropping the stream, or this future
    /// before it resolves, removes the watcher's queue.
    pub async fn watch_presence(&self) -> Result<BoxStream<'static, Presence>> {
        let inner = &self.inner;
        inner.check_open()?;
        let queue = format!(
            "{}.presence-watch-{}",
            inner.settings.message_exchange,
            uuid::Uuid::new_v4().simple()
        );
        let consume = inner
            .conduit
            .transport
            .consume(Source::Presence(queue), inner.conduit.message_prefetch);
        let owner = Arc::downgrade(inner);
        // Consumed as one operation: a caller that gives up has the consumer cancelled.
        let consumer = crate::communicator::to_completion(
            inner,
            async move { consume.await.map(|c| Unwatched::new(owner, c)) },
            |_, unwatched| async move { drop(unwatched) },
        )
        .await?;
        let Unwatched { consumer, cancel } = consumer;
        let stream = consumer.filter_map(move |delivery| {
            let _held = &cancel;
            let presence = serde_json::from_slice::<Presence>(&delivery.body);
            delivery.acker.settle(crate::transport::Outcome::Ack);
            futures::future::ready(match presence {
                Ok(presence) => Some(presence),
                Err(error) => {
                    tracing::warn!(%error, "an undecodable presence announcement, skipped");
                    None
                }
            })
        });
        Ok(stream.boxed())
    }
}

/// A watcher's deliveries, and what cancels its consumer when they are dropped.
struct Unwatched {
    consumer: BoxStream<'static, crate::transport::Delivery>,
    cancel: CancelOnDrop,
}

impl Unwatched {
    fn new(owner: std::sync::Weak<Core>, consumer: crate::transport::Consumer) -> Self {
        Self {
            consumer: consumer.deliveries,
            cancel: CancelOnDrop {
                owner,
                tag: Some(consumer.tag),
            },
        }
    }
}

/// Cancels a watcher's consumer (its queue goes with it) when its stream is dropped, on the
/// communicator's runtime; held weakly: a watch does not keep a communicator open (a
/// closing one drops its consumers anyway).
struct CancelOnDrop {
    owner: std::sync::Weak<Core>,
    tag: Option<String>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let (Some(tag), Some(core)) = (self.tag.take(), self.owner.upgrade()) {
            let cancel = core.conduit.transport.cancel(&tag);
            core.runtime.spawn(async move {
                if let Err(error) = cancel.await {
                    tracing::debug!(%error, "a presence watcher's consumer was not cancelled");
                }
            });
        }
    }
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

    fn sample_presence() -> Presence {
        Presence {
            id: "a".into(),
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
        let heard = Instant::now();
        for interval in [1e300, f64::INFINITY, f64::MAX, f64::NAN, -1.0] {
            let mut presence = sample_presence();
            presence.interval_secs = interval;
            let lost = presence.is_lost(heard, heard + Duration::from_secs(3600));
            assert_eq!(lost, interval.is_nan() || interval < 0.0, "{interval}");
            let mut roster = Roster::default();
            roster.heard(presence, heard);
            assert_eq!(roster.members(heard + Duration::from_secs(1)).len(), 1);
        }
    }

    #[test]
    fn counts_near_the_largest_number_total_without_overflow() {
        let counts = TaskCounts {
            handled: u64::MAX,
            failed: u64::MAX,
            panicked: 1,
            rejected: 1,
        };
        assert_eq!(counts.total(), u64::MAX);
    }

    #[test]
    fn a_roster_forgets_a_member_silent_longer_than_it_keeps_them() {
        let mut roster = Roster::default();
        let heard = Instant::now();
        let presence = sample_presence();
        roster.heard(presence, heard);
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
}
