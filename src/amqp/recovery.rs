//! Recovery, as the [`Root`](crate::tree::Root) runs it: watch the
//! connection, and after a loss reconnect with exponential, capped, jittered backoff,
//! declare the topology again, restore every consumer under its old tag and queue name —
//! appending the new lapin consumer to the stream its actor polls — and only then let
//! waiting senders through. It runs on the root's thread; only opening a connection
//! goes to the I/O runtime, where lapin's own tasks must live.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use lapin::{Connection, Event};
use tokio::time::Instant;

use super::Shared;

/// How often the connection's status is looked at, besides its events.
const POLL: Duration = Duration::from_millis(250);

/// Runs until the transport closes.
pub(super) async fn run(shared: Arc<Shared>, mut connection: Arc<Connection>) {
    let mut epoch = 0;
    loop {
        let Some(reason) = watch(&shared, &connection, epoch).await else {
            return;
        };
        shared.lost(&reason);
        let lost_at = Instant::now();
        let Some(restored) = reconnect(&shared).await else {
            return;
        };
        connection = restored;
        epoch += 1;
        // The reply queues first, so that no reply to what is sent after the gate opens can
        // miss them; every other consumer right after (there may be thousands of RPC
        // identifiers: sends need not wait for them).
        shared.reserve_channels(&connection, epoch).await;
        shared.restore_consumers(&connection, epoch, true).await;
        shared.restored(connection.clone(), epoch, lost_at.elapsed());
    }
}

/// Watches a live connection, restoring interrupted consumers, until it is lost (returns
/// why) or the transport closes (returns nothing).
async fn watch(shared: &Arc<Shared>, connection: &Connection, epoch: u64) -> Option<String> {
    let mut events = connection.events_listener();
    loop {
        if shared.broker.is_closed() {
            return None;
        }
        if !connection.status().connected() {
            return Some("the connection closed".to_owned());
        }
        shared.restore_consumers(connection, epoch, false).await;
        tokio::select! {
            _ = shared.broker.wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            event = events.next() => match event {
                // The broker closed one channel (refused a publish, a consumer's ack timed
                // out): that channel's users deal with it; the connection is fine.
                Some(Event::Error(error)) if super::soft_error(&error).is_some() => {
                    tracing::debug!(%error, "the broker closed a channel");
                }
                Some(Event::Error(error)) => return Some(error.to_string()),
                Some(Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(%reason, "the broker blocked the connection (it is short of memory or disk); publishes wait");
                    *super::lock(&shared.broker.blocked) = Some(reason.to_string());
                }
                Some(Event::ConnectionUnblocked) => {
                    tracing::info!("the broker unblocked the connection");
                    super::lock(&shared.broker.blocked).take();
                }
                Some(other) => tracing::debug!(event = ?other, "AMQP connection event"),
                None => return Some("the connection's events ended".to_owned()),
            },
        }
    }
}

/// Connects again until it works (returns the connection, its topology declared) or the
/// transport closes (returns nothing).
async fn reconnect(shared: &Arc<Shared>) -> Option<Arc<Connection>> {
    let (min, max) = shared.broker.reconnect_delay;
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt = 0u32;
    loop {
        let delay = delays.next().unwrap_or(max);
        tokio::time::sleep(delay).await;
        if shared.broker.is_closed() {
            return None;
        }
        attempt += 1;
        let opener = shared.clone();
        let opened = shared
            .io
            .run(async move { opener.open_connection().await })
            .await
            .and_then(|opened| opened);
        let error = match opened {
            Ok(connection) => {
                let connection = Arc::new(connection);
                match shared.declare_topology(&connection).await {
                    Ok(()) => return Some(connection),
                    Err(error) => {
                        let _ = connection.close(200, "topology failed".into()).await;
                        error
                    }
                }
            }
            Err(error) => error,
        };
        tracing::warn!(attempt, %error, "reconnecting failed; trying again");
    }
}
