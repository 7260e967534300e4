//! Acknowledging RPC calls and broadcasts in batches: a consumer on a channel of its own
//! acknowledges the longest run of handled deliveries at once (`basic.ack` with `multiple`),
//! when a quarter of its prefetch window is handled or a few milliseconds after the first
//! handled one — so a prefetch window bounds what a worker holds without costing the broker
//! a frame per message. Calls and broadcasts are at most once (as in kiwiPy): whatever
//! became of one, handled, failed or dropped, it is acknowledged.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lapin::options::BasicAckOptions;
use tokio::runtime::Handle;

use super::ConsumerChannel;
use super::consumers::queue_now;
use crate::transport::{Outcome, Settle};

/// How long a handled delivery waits at most for others to share its acknowledgement.
const FLUSH_AFTER: Duration = Duration::from_millis(5);

/// The handled deliveries of one lapin consumer, acknowledged together.
pub(super) struct AckBatch {
    state: Mutex<State>,
    /// Deliveries acknowledged together at most: a quarter of the window.
    batch: usize,
    /// Where the flush timer runs: the connection's I/O runtime.
    io: Handle,
    /// The consumer's channel, open while deliveries wait to be acknowledged; the
    /// acknowledgements are frames queued on it under the state's lock, so in order (a
    /// later one covers an earlier; the other way round the broker would refuse the unknown
    /// tag and close the channel).
    channel: Arc<ConsumerChannel>,
}

struct State {
    /// The number of the oldest delivery not yet acknowledged.
    front: u64,
    /// From `front` on: each delivery's tag once handled, none while it is handled.
    pending: VecDeque<Option<u64>>,
    /// The newest delivery of the handled run from `front`, to acknowledge with `multiple`.
    ready: Option<u64>,
    /// How many deliveries `ready` acknowledges.
    ready_count: usize,
    /// A flush is on its way.
    flushing: bool,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl AckBatch {
    /// A batch for a consumer with this prefetch window on `channel`.
    pub(super) fn new(prefetch: u16, io: Handle, channel: Arc<ConsumerChannel>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                front: 0,
                pending: VecDeque::new(),
                ready: None,
                ready_count: 0,
                flushing: false,
            }),
            batch: usize::from(prefetch / 4).max(1),
            io,
            channel,
        })
    }

    /// Takes in the next delivery (in the order they came); settling what it returns
    /// marks it handled.
    pub(super) fn enroll(self: &Arc<Self>, delivery: &lapin::message::Delivery) -> BatchedAck {
        let mut state = lock(&self.state);
        let number = state.front + state.pending.len() as u64;
        state.pending.push_back(None);
        BatchedAck {
            batch: self.clone(),
            number,
            tag: Some(delivery.delivery_tag),
        }
    }

    /// Delivery `number` is handled: the run from the front grows, and is acknowledged when
    /// long enough or soon.
    fn handled(self: &Arc<Self>, number: u64, tag: u64) {
        let mut state = lock(&self.state);
        let Some(slot) = number
            .checked_sub(state.front)
            .and_then(|at| state.pending.get_mut(at as usize))
        else {
            return;
        };
        *slot = Some(tag);
        while let Some(Some(_)) = state.pending.front() {
            state.ready = state.pending.pop_front().flatten();
            state.front += 1;
            state.ready_count += 1;
        }
        if state.ready_count >= self.batch {
            // Under the lock: acknowledgements are queued in order.
            self.acknowledge(take_ready(&mut state));
        } else if state.ready.is_some() && !state.flushing {
            state.flushing = true;
            drop(state);
            let batch = self.clone();
            self.io.spawn(async move {
                tokio::time::sleep(FLUSH_AFTER).await;
                let mut state = lock(&batch.state);
                state.flushing = false;
                batch.acknowledge(take_ready(&mut state));
            });
        }
    }

    /// Acknowledges every delivery up to `ready`'s (called under the state's lock).
    fn acknowledge(&self, ready: Option<u64>) {
        let Some(tag) = ready else {
            return;
        };
        let acknowledging = self
            .channel
            .channel
            .basic_ack(tag, BasicAckOptions { multiple: true });
        if let Some(error) = queue_now(acknowledging) {
            tracing::debug!(%error, "acknowledging a batch failed: its channel is gone");
        }
    }
}

fn take_ready(state: &mut State) -> Option<u64> {
    state.ready_count = 0;
    state.ready.take()
}

/// One delivery's place in its consumer's [`AckBatch`].
pub(super) struct BatchedAck {
    batch: Arc<AckBatch>,
    number: u64,
    tag: Option<u64>,
}

impl Settle for BatchedAck {
    /// At most once: any outcome marks the delivery handled.
    fn settle(mut self: Box<Self>, _: Outcome) {
        if let Some(tag) = self.tag.take() {
            self.batch.handled(self.number, tag);
        }
    }
}
