//! kiwimq's metrics, through the [`metrics`](https://docs.rs/metrics) facade: whatever
//! recorder the program installs (Prometheus with the `prometheus` feature, see
//! `install_prometheus`) receives them; without one they cost a check each.
//!
//! Counters carry `kind` (`task`, `rpc`, `broadcast`, `reply`) and, for tasks, `queue`.
//! Install the recorder before connecting: kiwimq keeps some handles it registers.
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `kiwimq_messages_sent_total` | counter | messages handed to the broker |
//! | `kiwimq_messages_confirmed_total` | counter | of those, confirmed by the broker |
//! | `kiwimq_messages_delivered_total` | counter | messages delivered to this process's subscribers |
//! | `kiwimq_tasks_acked_total` | counter | tasks finished and acknowledged |
//! | `kiwimq_tasks_rejected_total` | counter | tasks dropped (undecodable, or a panic with a delivery limit) |
//! | `kiwimq_tasks_requeued_total` | counter | tasks returned to their queue (declined, a failed reply, closing) |
//! | `kiwimq_tasks_redelivered_total` | counter | tasks delivered again after an earlier delivery went unfinished |
//! | `kiwimq_tasks_dead_lettered_total` | counter | tasks sent to the dead-letter queue |
//! | `kiwimq_messages_undecodable_total` | counter | bodies no subscriber could decode |
//! | `kiwimq_reconnects_total` | counter | connections restored after a loss |
//! | `kiwimq_presence_refused_total` | counter | presence announcements a watcher refused, by `reason` (`too_large`, `undecodable`, `out_of_range`) |
//! | `kiwimq_tasks_running` | gauge | tasks being handled now |
//! | `kiwimq_results_pending` | gauge | task and RPC results awaited |
//! | `kiwimq_subscribers` | gauge | subscribers, by `kind` |
//! | `kiwimq_handler_seconds` | histogram | time in a subscriber's handler, by `kind` |
//! | `kiwimq_round_trip_seconds` | histogram | from sending a task or RPC to its result, by `kind` |

use std::sync::Arc;
use std::time::Instant;

/// Messages handed to the broker.
pub const SENT: &str = "kiwimq_messages_sent_total";
/// Messages the broker confirmed.
pub const CONFIRMED: &str = "kiwimq_messages_confirmed_total";
/// Messages delivered to this process's subscribers.
pub const DELIVERED: &str = "kiwimq_messages_delivered_total";
/// Tasks finished and acknowledged.
pub const ACKED: &str = "kiwimq_tasks_acked_total";
/// Tasks dropped without a dead-letter queue to take them.
pub const REJECTED: &str = "kiwimq_tasks_rejected_total";
/// Tasks returned to their queue.
pub const REQUEUED: &str = "kiwimq_tasks_requeued_total";
/// Tasks delivered again.
pub const REDELIVERED: &str = "kiwimq_tasks_redelivered_total";
/// Tasks sent to the dead-letter queue.
pub const DEAD_LETTERED: &str = "kiwimq_tasks_dead_lettered_total";
/// Bodies no subscriber could decode.
pub const UNDECODABLE: &str = "kiwimq_messages_undecodable_total";
/// Connections restored after a loss.
pub const RECONNECTS: &str = "kiwimq_reconnects_total";
/// Presence announcements refused by a watcher, by `reason`.
pub const PRESENCE_REFUSED: &str = "kiwimq_presence_refused_total";
/// Tasks being handled now.
pub const TASKS_RUNNING: &str = "kiwimq_tasks_running";
/// Results awaited.
pub const RESULTS_PENDING: &str = "kiwimq_results_pending";
/// Subscribers, by kind.
pub const SUBSCRIBERS: &str = "kiwimq_subscribers";
/// Time in handlers.
pub const HANDLER_SECONDS: &str = "kiwimq_handler_seconds";
/// Send-to-result times.
pub const ROUND_TRIP_SECONDS: &str = "kiwimq_round_trip_seconds";

/// A task counter for `queue`.
pub(crate) fn task(name: &'static str, queue: &Arc<str>) {
    ::metrics::counter!(name, "kind" => "task", "queue" => queue.clone()).increment(1);
}

/// Counts a presence announcement refused for `reason` (see
/// [`InvalidPresence::reason`](crate::presence::InvalidPresence::reason)).
pub(crate) fn presence_refused(reason: &'static str) {
    ::metrics::counter!(PRESENCE_REFUSED, "reason" => reason).increment(1);
}

/// The metrics labelled by kind alone, registered once per process (at first use: the
/// recorder must be installed before).
struct KindMeters {
    sent: ::metrics::Counter,
    confirmed: ::metrics::Counter,
    delivered: ::metrics::Counter,
    undecodable: ::metrics::Counter,
    pending: ::metrics::Gauge,
    subscribers: ::metrics::Gauge,
    handler: Option<::metrics::Histogram>,
    round_trip: Option<::metrics::Histogram>,
}

const KINDS: [&str; 4] = ["task", "rpc", "broadcast", "reply"];

fn kind_meters(kind: &'static str) -> &'static KindMeters {
    static ALL: std::sync::OnceLock<Vec<KindMeters>> = std::sync::OnceLock::new();
    let all = ALL.get_or_init(|| {
        KINDS
            .iter()
            .map(|&kind| KindMeters {
                sent: ::metrics::counter!(SENT, "kind" => kind),
                confirmed: ::metrics::counter!(CONFIRMED, "kind" => kind),
                delivered: ::metrics::counter!(DELIVERED, "kind" => kind),
                undecodable: ::metrics::counter!(UNDECODABLE, "kind" => kind),
                pending: ::metrics::gauge!(RESULTS_PENDING, "kind" => kind),
                subscribers: ::metrics::gauge!(SUBSCRIBERS, "kind" => kind),
                // Registered only where they can move: replies have no handler, and only
                // tasks and RPCs have a round trip.
                handler: (kind != "reply")
                    .then(|| ::metrics::histogram!(HANDLER_SECONDS, "kind" => kind)),
                round_trip: matches!(kind, "task" | "rpc")
                    .then(|| ::metrics::histogram!(ROUND_TRIP_SECONDS, "kind" => kind)),
            })
            .collect()
    });
    &all[KINDS.iter().position(|k| *k == kind).unwrap_or(0)]
}

/// A counter of `kind` (tasks: give the queue with [`task`]).
pub(crate) fn count(name: &'static str, kind: &'static str) {
    let meters = kind_meters(kind);
    match name {
        SENT => meters.sent.increment(1),
        CONFIRMED => meters.confirmed.increment(1),
        DELIVERED => meters.delivered.increment(1),
        UNDECODABLE => meters.undecodable.increment(1),
        _ => ::metrics::counter!(name, "kind" => kind).increment(1),
    }
}

/// The counters of one task queue's consumer, registered once: a delivery then costs an
/// increment, not a key to build and look up. Registered before the program installs its
/// recorder, they record nothing: install it before connecting.
pub(crate) struct QueueMeters {
    pub(crate) delivered: ::metrics::Counter,
    pub(crate) redelivered: ::metrics::Counter,
    pub(crate) acked: ::metrics::Counter,
    pub(crate) rejected: ::metrics::Counter,
    pub(crate) requeued: ::metrics::Counter,
    pub(crate) dead_lettered: ::metrics::Counter,
    pub(crate) undecodable: ::metrics::Counter,
    pub(crate) running: ::metrics::Gauge,
}

impl QueueMeters {
    pub(crate) fn new(queue: &Arc<str>) -> Self {
        let counter = |name: &'static str| ::metrics::counter!(name, "kind" => "task", "queue" => queue.clone());
        Self {
            delivered: counter(DELIVERED),
            redelivered: counter(REDELIVERED),
            acked: counter(ACKED),
            rejected: counter(REJECTED),
            requeued: counter(REQUEUED),
            dead_lettered: counter(DEAD_LETTERED),
            undecodable: counter(UNDECODABLE),
            running: ::metrics::gauge!(TASKS_RUNNING, "kind" => "task"),
        }
    }
}

/// A message sent and, if `confirmed`, confirmed.
pub(crate) fn published(kind: &'static str, queue: Option<&Arc<str>>, confirmed: bool) {
    for (name, happened) in [(SENT, true), (CONFIRMED, confirmed)] {
        if !happened {
            continue;
        }
        match queue {
            Some(queue) => task(name, queue),
            None => count(name, kind),
        }
    }
}

/// Moves a gauge of `kind` by `delta`.
pub(crate) fn gauge(name: &'static str, kind: &'static str, delta: f64) {
    let meters = kind_meters(kind);
    match name {
        RESULTS_PENDING => meters.pending.increment(delta),
        SUBSCRIBERS => meters.subscribers.increment(delta),
        _ => ::metrics::gauge!(name, "kind" => kind).increment(delta),
    }
}

/// One communicator's subscribers by kind, mirrored in the process-wide
/// [`SUBSCRIBERS`] gauge. What is left when the communicator closes (or its last handle
/// goes) is taken off the gauge, and later removals — actors stopping after the close —
/// are not counted twice.
#[derive(Debug, Default)]
pub(crate) struct SubscriberCount {
    /// Task, RPC and broadcast subscribers.
    counts: [std::sync::atomic::AtomicI64; 3],
    closed: std::sync::atomic::AtomicBool,
}

impl SubscriberCount {
    const KINDS: [&'static str; 3] = ["task", "rpc", "broadcast"];

    /// Counts `delta` subscribers of `kind` (`"task"`, `"rpc"` or `"broadcast"`).
    pub(crate) fn add(&self, kind: &'static str, delta: i64) {
        use std::sync::atomic::Ordering;
        let Some(index) = Self::KINDS.iter().position(|known| *known == kind) else {
            return;
        };
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        self.counts[index].fetch_add(delta, Ordering::AcqRel);
        gauge(SUBSCRIBERS, kind, delta as f64);
    }

    /// Takes this communicator's subscribers off the gauge, once.
    pub(crate) fn close(&self) {
        use std::sync::atomic::Ordering;
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for (kind, count) in Self::KINDS.iter().zip(&self.counts) {
            let left = count.swap(0, Ordering::AcqRel);
            if left != 0 {
                gauge(SUBSCRIBERS, kind, -(left as f64));
            }
        }
    }
}

impl Drop for SubscriberCount {
    fn drop(&mut self) {
        self.close();
    }
}

/// Records the time since `since` in a histogram of `kind`.
pub(crate) fn elapsed(name: &'static str, kind: &'static str, since: Instant) {
    let seconds = since.elapsed().as_secs_f64();
    let meters = kind_meters(kind);
    match name {
        HANDLER_SECONDS => meters.handler.iter().for_each(|h| h.record(seconds)),
        ROUND_TRIP_SECONDS => meters.round_trip.iter().for_each(|h| h.record(seconds)),
        _ => ::metrics::histogram!(name, "kind" => kind).record(seconds),
    }
}

/// The histogram buckets of handler and round-trip times, in seconds.
#[cfg(feature = "prometheus")]
const SECONDS_BUCKETS: &[f64] = &[
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    24.0 * 3600.0,
];

/// Installs a Prometheus recorder for the whole process (once; later calls return the same
/// handle) and returns the handle whose [`render`](metrics_exporter_prometheus::PrometheusHandle::render)
/// gives the text to serve at `/metrics`.
#[cfg(feature = "prometheus")]
pub fn install_prometheus() -> crate::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use std::sync::{Mutex, OnceLock};
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    // Held while installing: two first calls at once would otherwise both try, and the
    // second fail, the process's recorder being set by the first.
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _installing = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let config = |e| crate::Error::config(format!("cannot configure the Prometheus recorder: {e}"));
    // Histograms, as documented (the exporter's default is a summary): buckets from 1 ms to
    // a day, for handlers of RPCs and of tasks that run for hours.
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(HANDLER_SECONDS.into()), SECONDS_BUCKETS)
        .map_err(config)?
        .set_buckets_for_metric(Matcher::Full(ROUND_TRIP_SECONDS.into()), SECONDS_BUCKETS)
        .map_err(config)?
        .install_recorder()
        .map_err(|e| {
            crate::Error::config(format!("cannot install the Prometheus recorder: {e}"))
        })?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}
