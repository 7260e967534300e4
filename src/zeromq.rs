//! The `zmq://` backend: kiwimq as a client of AiiDA's ZeroMQ broker (aiida-core 2.9,
//! `aiida/brokers/zeromq`), or of any broker speaking its protocol.
//!
//! - `zmq:///ABS/SERVICE_DIR` — a broker's service directory: the client reads the socket's
//!   place from `broker.sockets` (waiting for it within the connect timeout, as AiiDA's
//!   clients wait for it) and follows it when a restarted broker writes another one.
//! - `zmq+ipc:///ABS/router.sock` — one socket, for good.
//!
//! The protocol is narrower than AMQP, and the backend says so rather than behave
//! differently: one task queue (the settings' default; any other name is refused), no pull
//! mode, no queue counts or purge, and AiiDA's broker drops a worker's task result — a
//! task sent for its result gets a clear error once the broker has confirmed it (it still
//! runs); kiwimq's broker returns it (the optional `results` field, which AiiDA's clients
//! never send). JSON only ([`Codec::Json`](crate::Codec::Json), the default for `zmq://` URIs).
//! `protocol` holds the messages, `client` the transport, `broker` kiwimq's own broker
//! (`kiwimq broker`) — its loop, over `dispatch` (who holds which task: socket-free),
//! `rpc_router` (who serves which RPC), `state` (`broker-state.json`), `service` (the
//! service directory's files and lock, `broker.status` as both sides read it), `store` its
//! durable task queue and `journal` the write-ahead journal that confirms its tasks.

pub(crate) mod broker;
mod client;
pub(crate) mod dispatch;
mod journal;
pub(crate) mod protocol;
pub(crate) mod rpc_router;
pub(crate) mod service;
pub(crate) mod state;
pub(crate) mod store;

pub(crate) use client::ZmqTransport;
#[cfg(feature = "fuzzing")]
pub(crate) use journal::replay as replay_journal;
