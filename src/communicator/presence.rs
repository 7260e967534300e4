//! Announcing and watching presence ([`crate::presence`]): a communicator's announcement of
//! itself every interval and its last word, and the stream of everyone's announcements a
//! watcher reads. The records they move live in `presence.rs`, below everything; this is
//! the communicator's side, owned by its `Core`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;

use super::{Communicator, Core};
use crate::error::{ErrorKind, Result};
use crate::presence::{Presence, QueuePresence, now_ms};
use crate::transport::{Outgoing, Route, Source};

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
    /// long as the stream is held; one that is undecodable, too large or has a number out
    /// of range ([`Presence::from_json`]) is skipped and counted
    /// (`kiwimq_presence_refused_total`, see [`crate::metrics`]), with a warning for the
    /// 1st, 2nd, 4th, 8th… of a watch (the others at debug level: a flood does not flood
    /// the log). `Refused`
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
        let consumer = super::to_completion(
            inner,
            async move { consume.await.map(|c| Unwatched::new(owner, c)) },
            |_, unwatched| async move { drop(unwatched) },
        )
        .await?;
        let Unwatched { consumer, cancel } = consumer;
        let mut refused = 0u64;
        let stream = consumer.filter_map(move |delivery| {
            let _held = &cancel;
            let presence = Presence::from_json(&delivery.body);
            delivery.acker.settle(crate::transport::Outcome::Ack);
            futures::future::ready(match presence {
                Ok(presence) => Some(presence),
                Err(refusal) => {
                    crate::metrics::presence_refused(refusal.reason());
                    refused += 1;
                    // A flood of them logs the 1st, 2nd, 4th, 8th…: the counter counts all.
                    if refused.is_power_of_two() {
                        tracing::warn!(%refusal, refused, "a presence announcement refused, skipped");
                    } else {
                        tracing::debug!(%refusal, refused, "a presence announcement refused, skipped");
                    }
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
