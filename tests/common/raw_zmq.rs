//! A DEALER speaking AiiDA's ZeroMQ protocol by hand, as AiiDA's client (or a hostile one)
//! would: for the tests of kiwimq's broker that need to say exactly what a client sends.
//! Included by path by the tests that use the `zmq` crate.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use crate::common::aiida::BrokerProcess;

/// One client of the broker.
pub(crate) struct RawWorker {
    _context: zmq::Context,
    socket: zmq::Socket,
}

/// A task as handed to a client.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Handed {
    pub(crate) id: String,
    pub(crate) body: serde_json::Value,
    /// kiwimq's broker numbers each hand-over.
    pub(crate) delivery: Option<u64>,
}

impl RawWorker {
    pub(crate) fn connect(broker: &BrokerProcess, identity: &str) -> Self {
        Self::connect_to(&broker.socket_uri(), identity)
    }

    /// Connects to `socket_uri` (`zmq+ipc://…`) as `identity`.
    pub(crate) fn connect_to(socket_uri: &str, identity: &str) -> Self {
        let context = zmq::Context::new();
        let socket = context.socket(zmq::DEALER).unwrap();
        socket.set_identity(identity.as_bytes()).unwrap();
        socket.set_rcvtimeo(500).unwrap();
        socket.set_reconnect_ivl(50).unwrap();
        let endpoint = socket_uri.replacen("zmq+ipc://", "ipc://", 1);
        socket.connect(&endpoint).unwrap();
        Self {
            _context: context,
            socket,
        }
    }

    pub(crate) fn send(&self, message: serde_json::Value) {
        let bytes = message.to_string();
        self.socket
            .send_multipart([&b""[..], bytes.as_bytes()], 0)
            .unwrap();
    }

    pub(crate) fn subscribe(&self) {
        self.subscribe_with("raw-tasks", 10);
    }

    pub(crate) fn subscribe_with(&self, identifier: &str, prefetch: i64) {
        self.send(
            serde_json::json!({"type": "subscribe_task", "id": "s", "sender": "raw",
            "identifier": identifier, "prefetch_count": prefetch}),
        );
    }

    /// Sends a task with this id and body, asking for the broker's confirm.
    pub(crate) fn send_task(&self, id: &str, body: serde_json::Value) {
        self.send(
            serde_json::json!({"type": "task", "id": id, "sender": "raw",
            "body": body, "no_reply": false}),
        );
    }

    /// Acks (or, with `ack` false, requeues) a task; `delivery` as kiwimq's clients name it.
    pub(crate) fn settle(&self, task_id: &str, delivery: Option<u64>, ack: bool) {
        let kind = if ack { "task_ack" } else { "task_nack" };
        let mut message = serde_json::json!({"type": kind, "id": "a", "sender": "raw",
            "task_id": task_id});
        if let Some(delivery) = delivery {
            message["delivery"] = delivery.into();
        }
        self.send(message);
    }

    /// The next message of type `kind` within `within`. (The broker's pings come between.)
    pub(crate) fn next_of(&self, kind: &str, within: Duration) -> Option<serde_json::Value> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let Ok(frames) = self.socket.recv_multipart(0) else {
                continue;
            };
            let message: serde_json::Value =
                serde_json::from_slice(frames.last().unwrap()).unwrap();
            if message["type"] == kind {
                return Some(message);
            }
        }
        None
    }

    /// The next task handed to it within `within`.
    pub(crate) fn next_handed(&self, within: Duration) -> Option<Handed> {
        let message = self.next_of("task", within)?;
        Some(Handed {
            id: message["id"].as_str().unwrap().to_owned(),
            body: message["body"].clone(),
            delivery: message["delivery"].as_u64(),
        })
    }

    /// The next task handed to it within 10 s: its id.
    pub(crate) fn next_task(&self) -> Option<String> {
        self.next_handed(Duration::from_secs(10)).map(|h| h.id)
    }
}
