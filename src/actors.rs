//! The consumer-side actors every backend shares, fed by a [`Transport`]'s delivery streams:
//! one [`TaskConsumer`](task_consumer::TaskConsumer) per consumed task queue, one
//! [`RpcEndpoint`](rpc_endpoint::RpcEndpoint) per RPC identifier, one
//! [`BroadcastHub`](broadcast_hub::BroadcastHub) per communicator; and
//! [`Replies`](replies::Replies), which routes replies to the futures waiting for them.

pub(crate) mod broadcast_hub;
pub(crate) mod replies;
pub(crate) mod rpc_endpoint;
pub(crate) mod task_consumer;

use std::sync::Arc;

use serde::Serialize;
use tracing::Instrument;

use crate::Codec;
use crate::codec::envelope::{Host, Reply, ReplyEnvelope};
use crate::error::Result;
use crate::messages::HandlerError;
use crate::transport::{Exchange, Outgoing, Route, Transport};

/// A communicator's conduit to its broker, as its actors use it: the transport, the codec
/// and the limits they decode, answer and settle with.
#[derive(Clone)]
pub(crate) struct Conduit {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) codec: Codec,
    /// The largest body a publish may carry ([`Settings::with_max_message_size`]).
    ///
    /// [`Settings::with_max_message_size`]: crate::Settings::with_max_message_size
    pub(crate) max_message_size: usize,
    /// Task queues have a delivery limit and a dead-letter queue
    /// ([`Settings::with_delivery_limit`](crate::Settings::with_delivery_limit)).
    pub(crate) dead_lettering: bool,
    /// The delivery limit itself: a task rejected by every subscriber on its last delivery
    /// is given up and its sender told ([`crate::ErrorKind::Rejected`]).
    pub(crate) delivery_limit: Option<u32>,
    /// The prefetch window of RPC and broadcast consumers
    /// ([`Settings::with_message_prefetch`](crate::Settings::with_message_prefetch)).
    pub(crate) message_prefetch: u16,
    /// Messages one RPC or broadcast subscriber handles at once
    /// ([`Settings::with_max_in_flight`](crate::Settings::with_max_in_flight)).
    pub(crate) max_in_flight: usize,
    /// Where closure subscribers' messages are handled.
    pub(crate) handlers: crate::handlers::HandlerThreads,
    /// This communicator's subscribers, in the process-wide gauge.
    pub(crate) subscribers: Arc<crate::metrics::SubscriberCount>,
}

impl Conduit {
    /// Publishes a message of this communicator: as a span of the current trace (a new one
    /// when kiwimq's spans are recorded) whose W3C context rides in the message, counted in
    /// the metrics as sent and, once the broker has it, confirmed.
    pub(crate) async fn send(&self, route: Route, mut message: Outgoing) -> Result<()> {
        let trace = crate::trace::for_send();
        let span = crate::trace::send_span(
            route.kind(),
            route.target(),
            message.correlation_id.as_deref(),
            trace.as_ref(),
        );
        tracing::debug!(parent: &span, kind = route.kind(), target = route.target(), correlation_id = ?message.correlation_id, "sending");
        message.traceparent = trace;
        let queue = match &route {
            Route::Task(queue) => Some(queue.clone()),
            _ => None,
        };
        let kind = route.kind();
        let sent = self
            .transport
            .publish(route, message)
            .instrument(span)
            .await;
        crate::metrics::published(kind, queue.as_ref(), sent.is_ok());
        sent
    }

    /// Sends an encoded reply map to `reply_to`, answering a request that came through
    /// `exchange`. A task's result is persistent, as the task was: it survives a broker
    /// restart in its reply queue. A result too large to send becomes an exception reply
    /// saying so: the sender learns why instead of waiting, and the task is not retried
    /// for a refusal that would repeat.
    pub(crate) async fn reply(
        &self,
        exchange: Exchange,
        reply_to: String,
        correlation_id: Option<String>,
        mut body: Vec<u8>,
    ) -> Result<()> {
        if body.len() > self.max_message_size {
            let text = format!(
                "the result ({} bytes) is larger than the message size limit of {} bytes",
                body.len(),
                self.max_message_size
            );
            tracing::warn!(?correlation_id, "{text}");
            let host = (exchange == Exchange::Tasks).then(Host::this_process);
            body = exception_reply(self.codec, &text, host);
        }
        let message = Outgoing {
            body,
            correlation_id,
            persistent: exchange == Exchange::Tasks,
            ..Outgoing::default()
        };
        // Sent while the request is handled: its span is the reply's parent.
        self.send(Route::Reply(reply_to), message).await
    }
}

/// Encodes a handler's outcome as a kiwiPy reply map. A result that cannot be encoded
/// becomes an exception reply naming the problem, so the caller is never left waiting.
pub(crate) fn encode_reply<R: Serialize>(
    codec: Codec,
    outcome: std::result::Result<R, HandlerError>,
    host: Option<Host>,
) -> Vec<u8> {
    let reply = match outcome {
        Ok(value) => Reply::Result(value),
        Err(error) => Reply::Exception(error.to_string()),
    };
    let envelope = ReplyEnvelope {
        reply,
        host: host.clone(),
    };
    codec.encode(&envelope).unwrap_or_else(|error| {
        exception_reply(
            codec,
            &format!("the result could not be encoded: {error}"),
            host,
        )
    })
}

/// Encodes `{exception: text}`; a string always encodes.
pub(crate) fn exception_reply(codec: Codec, text: &str, host: Option<Host>) -> Vec<u8> {
    let envelope: ReplyEnvelope<()> = ReplyEnvelope {
        reply: Reply::Exception(text.to_owned()),
        host,
    };
    codec.encode(&envelope).unwrap_or_default()
}
