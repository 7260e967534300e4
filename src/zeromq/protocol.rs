//! The messages of AiiDA's ZeroMQ broker protocol (aiida-core 2.9, `aiida/brokers/zeromq`),
//! and their translation to and from the kiwiPy envelopes the layers above speak.
//!
//! Every message is one JSON object with `type`, `id` and `sender`; a DEALER sends it as the
//! frames `["", json]`, the broker's ROUTER as `[identity, "", json]`. Bodies and results
//! are JSON values carried as they are: the envelopes above are JSON too (the backend
//! requires [`Codec::Json`](crate::Codec::Json)), so a body is spliced in as raw text and
//! never parsed into a tree and written again.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};

/// The message types, as AiiDA's `MessageType` spells them.
pub(crate) mod kind {
    pub(crate) const TASK: &str = "task";
    pub(crate) const TASK_RESPONSE: &str = "task_response";
    pub(crate) const TASK_ACK: &str = "task_ack";
    pub(crate) const TASK_NACK: &str = "task_nack";
    pub(crate) const RPC: &str = "rpc";
    pub(crate) const RPC_RESPONSE: &str = "rpc_response";
    pub(crate) const BROADCAST: &str = "broadcast";
    pub(crate) const SUBSCRIBE_TASK: &str = "subscribe_task";
    pub(crate) const SUBSCRIBE_RPC: &str = "subscribe_rpc";
    pub(crate) const UNSUBSCRIBE_TASK: &str = "unsubscribe_task";
    pub(crate) const UNSUBSCRIBE_RPC: &str = "unsubscribe_rpc";
    pub(crate) const PING: &str = "ping";
    /// kiwimq's own, which AiiDA's clients never send and kiwimq's broker alone carries: a
    /// communicator's presence announcement (its body), forwarded to the watchers.
    pub(crate) const PRESENCE: &str = "kiwimq_presence";
    /// kiwimq's own: the sender wants every presence announcement, or no longer.
    pub(crate) const WATCH_PRESENCE: &str = "kiwimq_watch_presence";
    pub(crate) const UNWATCH_PRESENCE: &str = "kiwimq_unwatch_presence";
    /// kiwimq's own, sent by a client to kiwimq's broker on every reconnect: the ids of the
    /// tasks it holds (`task_ids`). A task the broker took back from before its restart as
    /// this client's, and that the client does not hold, never reached it: it is requeued.
    pub(crate) const HOLDING: &str = "kiwimq_holding";
}

/// A message id as AiiDA makes them: a random UUID in simple (hex) form.
pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Any message, as read off the socket: only the fields kiwimq reads; unknown ones are
/// ignored, missing ones are `None` (AiiDA's broker omits `id` and `sender` in what it makes
/// itself, and `verdi process repair` writes tasks with only `body` and `no_reply`).
#[derive(Debug, Deserialize)]
pub(crate) struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    pub(crate) kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default, borrow)]
    pub(crate) body: Option<&'a RawValue>,
    #[serde(default)]
    pub(crate) no_reply: Option<bool>,
    #[serde(default)]
    pub(crate) task_id: Option<String>,
    #[serde(default)]
    pub(crate) rpc_id: Option<String>,
    #[serde(default, borrow)]
    pub(crate) result: Option<&'a RawValue>,
    #[serde(default)]
    pub(crate) error: Option<String>,
    #[serde(default)]
    pub(crate) recipient: Option<serde_json::Value>,
    #[serde(default, borrow)]
    pub(crate) sender: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub(crate) subject: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub(crate) correlation_id: Option<&'a RawValue>,
    /// On a task: its sender wants the worker's result (kiwimq's clients say so). On a
    /// confirm: kiwimq's broker will pass that result on. AiiDA's never sends it.
    #[serde(default)]
    pub(crate) results: Option<bool>,
    /// `subscribe_*`: the subscription's identifier.
    #[serde(default)]
    pub(crate) identifier: Option<String>,
    /// `subscribe_task`: the connection's limit (`null` or ≤ 0 unlimited).
    #[serde(default)]
    pub(crate) prefetch_count: Option<i64>,
    /// `kiwimq_holding`: the tasks the sender holds.
    #[serde(default)]
    pub(crate) task_ids: Option<Vec<String>>,
    /// kiwimq's own, on a task kiwimq's broker hands out: the number of this hand-over; on a
    /// `task_ack`/`task_nack` from kiwimq's clients: the hand-over settled. AiiDA's never
    /// send it, and ignore it.
    #[serde(default)]
    pub(crate) delivery: Option<u64>,
}

impl<'a> Incoming<'a> {
    /// Reads one message; a clear error for bytes that are not one JSON object.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::codec(format!("not a ZeroMQ broker message: {e}")))
    }

    /// The RPC recipient as AiiDA routes it: `str(recipient)` (plumpy sends integers).
    pub(crate) fn recipient(&self) -> Option<String> {
        match self.recipient.as_ref()? {
            serde_json::Value::String(text) => Some(text.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        }
    }
}

/// A message to send: every field AiiDA's clients send, the ones unset left out.
#[derive(Debug, Serialize)]
pub(crate) struct Outgoing<'a> {
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) id: String,
    pub(crate) sender: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) body: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) no_reply: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) recipient: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) task_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rpc_id: Option<&'a str>,
    /// Present (possibly `null`) on responses, as AiiDA's are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) subject: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) correlation_id: Option<&'a RawValue>,
    /// `subscribe_*`: the subscription's identifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) identifier: Option<&'a str>,
    /// `subscribe_*`: `null` for unlimited (always present on subscriptions, as AiiDA's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) prefetch_count: Option<Option<u32>>,
    /// `task`: the sender wants the worker's result (an optional field only kiwimq's broker
    /// reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) results: Option<bool>,
    /// `kiwimq_holding`: the tasks the sender holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) task_ids: Option<Vec<&'a str>>,
    /// `task` from kiwimq's broker, and a settle of it: the hand-over's number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) delivery: Option<u64>,
}

/// JSON `null`, as a raw value.
pub(crate) fn null() -> &'static RawValue {
    RawValue::NULL
}

impl<'a> Outgoing<'a> {
    /// A message of `kind` from `sender`, with a fresh id and nothing else set.
    pub(crate) fn new(kind: &'static str, sender: &'a RawValue) -> Self {
        Self {
            kind,
            id: new_id(),
            sender,
            body: None,
            no_reply: None,
            recipient: None,
            task_id: None,
            rpc_id: None,
            result: None,
            error: None,
            subject: None,
            correlation_id: None,
            identifier: None,
            prefetch_count: None,
            results: None,
            task_ids: None,
            delivery: None,
        }
    }

    /// A `subscribe_*` / `unsubscribe_*` message.
    pub(crate) fn subscription(
        kind: &'static str,
        sender: &'a RawValue,
        identifier: &'a str,
        prefetch_count: Option<u32>,
    ) -> Self {
        Self {
            identifier: Some(identifier),
            prefetch_count: Some(prefetch_count),
            ..Self::new(kind, sender)
        }
    }

    /// The message's bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a message of raw JSON values always serializes")
    }
}

/// The JSON text of a string, as a raw value.
pub(crate) fn json_string(text: &str) -> Box<RawValue> {
    RawValue::from_string(serde_json::to_string(text).expect("a string serializes"))
        .expect("a serialized string is JSON")
}

/// A kiwiPy task envelope, `[task, no_reply]`, as JSON.
#[derive(Debug, Deserialize)]
pub(crate) struct TaskEnvelope<'a>(#[serde(borrow)] pub(crate) &'a RawValue, pub(crate) bool);

impl TaskEnvelope<'_> {
    /// Splits encoded bytes into the task and its `no_reply`.
    pub(crate) fn parse(bytes: &[u8]) -> Result<TaskEnvelope<'_>> {
        serde_json::from_slice(bytes).map_err(|e| Error::codec(format!("not a task envelope: {e}")))
    }

    /// The envelope a worker decodes for a task received with `body` and `no_reply`.
    pub(crate) fn encode(body: &RawValue, no_reply: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.get().len() + 8);
        out.push(b'[');
        out.extend_from_slice(body.get().as_bytes());
        out.extend_from_slice(if no_reply { b",true]" } else { b",false]" });
        out
    }
}

/// A kiwiPy broadcast envelope, `{body, sender, subject, correlation_id}`, as JSON.
#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct BroadcastEnvelope<'a> {
    #[serde(borrow)]
    pub(crate) body: &'a RawValue,
    #[serde(borrow)]
    pub(crate) sender: &'a RawValue,
    #[serde(borrow)]
    pub(crate) subject: &'a RawValue,
    #[serde(borrow)]
    pub(crate) correlation_id: &'a RawValue,
}

impl BroadcastEnvelope<'_> {
    /// Reads encoded bytes.
    pub(crate) fn parse(bytes: &[u8]) -> Result<BroadcastEnvelope<'_>> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::codec(format!("not a broadcast envelope: {e}")))
    }

    /// Its bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope of raw JSON values always serializes")
    }
}

/// A kiwiPy reply envelope as JSON: exactly one of `result`, `exception`, `cancelled`,
/// `pending` (and `host` on task replies, which the ZeroMQ protocol has no place for).
#[derive(Debug, Deserialize)]
pub(crate) struct ReplyEnvelope<'a> {
    #[serde(default, borrow)]
    pub(crate) result: Option<&'a RawValue>,
    #[serde(default)]
    pub(crate) exception: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub(crate) cancelled: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    pub(crate) pending: Option<serde_json::Value>,
}

/// A field that is there, `null` included (a plain `Option` reads `null` as absent).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

/// What a reply envelope says, in the protocol's terms.
#[derive(Debug)]
pub(crate) enum Answer<'a> {
    /// `result` (possibly `null`).
    Result(&'a RawValue),
    /// `error`: the handler failed, or its future was cancelled.
    Error(String),
    /// The result is deferred: the protocol carries only the final answer.
    Pending,
}

impl<'a> ReplyEnvelope<'a> {
    /// Reads the envelope a handler's reply was encoded into.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<Answer<'a>> {
        let envelope: ReplyEnvelope<'a> = serde_json::from_slice(bytes)
            .map_err(|e| Error::codec(format!("not a reply envelope: {e}")))?;
        if let Some(text) = envelope.exception {
            return Ok(Answer::Error(text));
        }
        if let Some(reason) = envelope.cancelled {
            return Ok(Answer::Error(match reason {
                serde_json::Value::String(reason) => format!("cancelled: {reason}"),
                serde_json::Value::Null => "cancelled".to_owned(),
                other => format!("cancelled: {other}"),
            }));
        }
        if envelope.pending.is_some() {
            return Ok(Answer::Pending);
        }
        // `{"result": null}` reads as a missing field: a reply with no outcome is a null one.
        Ok(Answer::Result(envelope.result.unwrap_or_else(|| null())))
    }

    /// The envelope of a response's `result` / `error`, for the reply router above.
    pub(crate) fn encode(result: Option<&RawValue>, error: Option<&str>) -> Vec<u8> {
        match error {
            Some(text) => {
                let mut out = b"{\"exception\":".to_vec();
                serde_json::to_writer(&mut out, text).expect("a string serializes");
                out.push(b'}');
                out
            }
            None => {
                let result = result.unwrap_or_else(|| null());
                let mut out = Vec::with_capacity(result.get().len() + 12);
                out.extend_from_slice(b"{\"result\":");
                out.extend_from_slice(result.get().as_bytes());
                out.push(b'}');
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_envelope_round_trips_through_the_protocol() {
        let bytes = br#"[{"task":"continue","args":{"pid":8}},true]"#;
        let TaskEnvelope(body, no_reply) = TaskEnvelope::parse(bytes).unwrap();
        assert!(no_reply);
        assert_eq!(TaskEnvelope::encode(body, no_reply), bytes.to_vec());
    }

    /// An answer as text, to compare.
    fn said(bytes: &[u8]) -> String {
        match ReplyEnvelope::parse(bytes).unwrap() {
            Answer::Result(value) => format!("result {}", value.get()),
            Answer::Error(text) => format!("error {text}"),
            Answer::Pending => "pending".to_owned(),
        }
    }

    #[test]
    fn replies_translate_both_ways() {
        let host = br#"{"result":{"a":1},"host":{"hostname":"h","pid":1}}"#;
        assert_eq!(said(host), r#"result {"a":1}"#);
        assert_eq!(said(br#"{"exception":"boom"}"#), "error boom");
        assert_eq!(said(br#"{"cancelled":null}"#), "error cancelled");
        assert_eq!(said(br#"{"cancelled":"late"}"#), "error cancelled: late");
        assert_eq!(said(br#"{"pending":null}"#), "pending");
        assert_eq!(said(br#"{"result":null}"#), "result null");
        assert_eq!(
            ReplyEnvelope::encode(None, Some("Recipient not found: 7")),
            br#"{"exception":"Recipient not found: 7"}"#.to_vec()
        );
        let five = RawValue::from_string("5".into()).unwrap();
        assert_eq!(
            ReplyEnvelope::encode(Some(&five), None),
            br#"{"result":5}"#.to_vec()
        );
    }

    #[test]
    fn malformed_messages_are_clear_errors() {
        for bytes in [&b"not json"[..], b"[1,2]", b"\xff\xfe", b""] {
            let error = Incoming::parse(bytes).unwrap_err();
            assert!(error.to_string().contains("ZeroMQ"), "{error}");
        }
        let message = Incoming::parse(br#"{"type":"rpc","recipient":8,"id":"x"}"#).unwrap();
        assert_eq!(message.recipient().as_deref(), Some("8"));
    }

    #[test]
    fn subscriptions_are_written_as_aiidas_clients_write_them() {
        let sender = json_string("client-1");
        let message =
            Outgoing::subscription(kind::SUBSCRIBE_TASK, &sender, "worker", Some(200)).encode();
        let value: serde_json::Value = serde_json::from_slice(&message).unwrap();
        assert_eq!(value["type"], "subscribe_task");
        assert_eq!(value["identifier"], "worker");
        assert_eq!(value["prefetch_count"], 200);
        assert_eq!(value["sender"], "client-1");
        let message = Outgoing::subscription(kind::SUBSCRIBE_RPC, &sender, "8", None).encode();
        let value: serde_json::Value = serde_json::from_slice(&message).unwrap();
        assert!(value["prefetch_count"].is_null());
        assert!(value.as_object().unwrap().contains_key("prefetch_count"));
    }
}
