//! kiwimq's metrics, through the [`metrics`](https://docs.rs/metrics) facade: whatever
//! recorder the program installs (Prometheus with the `prometheus` feature, see
//! [`install_prometheus`]) receives them; without one they cost a check each.
//!
//! Counters carry `kind` (`task`, `rpc`, `broadcast`, `reply`) and, for tasks, `queue`.
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
//! | `kiwimq_tasks_running` | gauge | tasks being handled now |
//! | `kiwimq_results_pending` | gauge | task and RPC results awaited |
//! | `kiwimq_subscribers` | gauge | subscribers, by `kind` |
//! | `kiwimq_handler_seconds` | histogram | time in a subscriber's handler, by `kind` |
//! | `kiwimq_round_trip_seconds` | histogram | from sending a task or RPC to its result, by `kind` |

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
pub(crate) fn task(name: &'static str, queue: &str) {
    ::metrics::counter!(name, "kind" => "task", "queue" => queue.to_owned()).increment(1);
}

/// A counter of `kind` (tasks: give the queue with [`task`]).
pub(crate) fn count(name: &'static str, kind: &'static str) {
    ::metrics::counter!(name, "kind" => kind).increment(1);
}

/// A message sent and, if `confirmed`, confirmed.
pub(crate) fn published(kind: &'static str, queue: Option<&str>, confirmed: bool) {
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
    ::metrics::gauge!(name, "kind" => kind).increment(delta);
}

/// Records the time since `since` in a histogram of `kind`.
pub(crate) fn elapsed(name: &'static str, kind: &'static str, since: Instant) {
    ::metrics::histogram!(name, "kind" => kind).record(since.elapsed().as_secs_f64());
}

/// Installs a Prometheus recorder for the whole process (once; later calls return the same
/// handle) and returns the handle whose [`render`](metrics_exporter_prometheus::PrometheusHandle::render)
/// gives the text to serve at `/metrics`.
#[cfg(feature = "prometheus")]
pub fn install_prometheus() -> crate::Result<metrics_exporter_prometheus::PrometheusHandle> {
    use std::sync::OnceLock;
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| {
            crate::Error::config(format!("cannot install the Prometheus recorder: {e}"))
        })?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}
