//! kiwimq: task queues, RPC and broadcasts over RabbitMQ (or in process), for actix
//! services and worker fleets — the Rust counterpart of Python's kiwiPy, wire-compatible
//! with it.
//!
//! # Quick start
//!
//! ```
//! use kiwimq::{BroadcastFilter, BroadcastOptions, Broadcast, HandlerError, Rpc, Task};
//!
//! # fn main() -> kiwimq::Result<()> {
//! # actix_rt::System::new().block_on(async {
//! let comm = kiwimq::connect("mem://").await?;
//!
//! // A worker: the closure's value is the task's result.
//! comm.add_task_subscriber(|task: Task<u64>| async move { Ok(task.body * 2) }).await?;
//! let result: u64 = comm.task_send(&21u64).await?.await?;
//! assert_eq!(result, 42);
//!
//! // RPC by identifier.
//! comm.add_rpc_subscriber(Some("echo"), |rpc: Rpc<String>| async move { Ok::<_, HandlerError>(rpc.body) })
//!     .await?;
//! let echoed: String = comm.rpc_send("echo", "hi").await?.await?;
//! assert_eq!(echoed, "hi");
//!
//! // Broadcasts to every subscriber whose filter matches.
//! comm.add_broadcast_subscriber(BroadcastFilter::new().subject("news.*"), |b: Broadcast<String>| async move {
//!     println!("{:?}: {}", b.subject, b.body);
//!     Ok(())
//! })
//! .await?;
//! comm.broadcast_send("hello", BroadcastOptions::subject("news.today")).await?;
//! comm.close().await
//! # })
//! # }
//! ```
//!
//! # The actor tree
//!
//! ```text
//! Communicator ──Child<Root>──► Root  (own thread; owns the connection and its recovery)
//!                                ├─ TaskConsumer  one per consumed queue  ┐ on kiwimq's
//!                                ├─ RpcEndpoint   one per identifier      │ runtime thread
//!                                └─ BroadcastHub  one per communicator    ┘
//!                                      │ Task<T, R> / Rpc<T, R> / Broadcast<T>
//!                                      ▼
//!         subscribers: closures (handler threads), supervised(factory) actors (a thread
//!                      each), your actors (where you started them)
//! ```
//!
//! Who restarts what is one mechanism (`supervision`), for the root, its children and
//! [`supervised`] subscribers alike: an actor that panics or stops is started again from
//! its factory with what it keeps (the root its children, each child its subscribers and
//! consumer), counted and logged. The root runs where no user code runs; it restores the
//! connection, the topology and every consumer after a loss. No user code runs on kiwimq's
//! threads: a closure computing delays only its own messages. A subscriber that panics
//! answers its message with a `Remote` error; a [`supervised`] one is started afresh, one
//! the user started is reported lost ([`ConnectionEvent::SubscriberLost`]). Sends leave from
//! the caller's task and the children poll their consumers themselves: the hot paths cross
//! no extra actor.
//!
//! # Layout
//!
//! - [`communicator`](Communicator) — the cheap-`Clone` async handle; `connect`, sending, and
//!   subscriptions forwarded to actors by address (`communicator/rpc`,
//!   `communicator/broadcasts`: those two kinds' methods).
//! - `communicator/tasks` — [`TaskQueue`], a named queue with pull mode, and [`PulledTask`].
//! - `messages` — the typed messages subscriber actors handle: [`Task`], [`Rpc`],
//!   [`Broadcast`], and the [`HandlerError`] they answer with.
//! - `subscriber` — [`IntoSubscriber`]: actors' addresses, recipients, closures, or
//!   [`supervised`] actors (`supervised`), and how a message reaches one; `panics` tells a
//!   panicking handler's message from those queued behind it.
//! - `supervision` — who restarts what: the one supervision mechanism, `Child` handles
//!   that follow an actor across restarts, and the tree's incident counts.
//! - `tree` — the `Root` actor and how it starts its children.
//! - `handlers` — the handler threads closure subscribers run on.
//! - `fleet` — [`Fleet`], a worker process's main loop; `health` — [`Health`].
//! - [`presence`] — the records of presence: each communicator's announcement of itself,
//!   checked as a watcher hears it, and the bounded roster a watcher keeps (it imports
//!   nothing of the crate); `communicator/presence` announces and watches them.
//!   `dashboard` (feature `dashboard`) — the fleet's live web view and JSON API, its page
//!   in `dashboard/`.
//! - `actors/` — the consumer-side actors every backend shares: `TaskConsumer`,
//!   `RpcEndpoint`, `BroadcastHub`, and the reply router.
//! - `transport` — the seam to a backend: an AMQP-shaped interface over bytes.
//! - `mem/` — the in-process broker (`mem://`), the embedded default.
//! - `amqp/` — the RabbitMQ backend (`amqp://`): lapin on an I/O runtime of its own, the
//!   URI, the topology, and the recovery the root runs after a loss.
//! - `zeromq/` (feature `zeromq`) — AiiDA's ZeroMQ protocol (`zmq://`): `protocol` (the
//!   messages), `client` (the backend, a DEALER on a thread of its own), `broker` and
//!   `store` — kiwimq's own broker (`kiwimq::broker`) and its durable task directories.
//! - [`blocking`] — the same communicator for code without async: every call blocks;
//!   closures run on a bounded pool.
//! - `events` — [`ConnectionEvent`]: lost, restored, closed.
//! - `codec/` — [`Codec`] (MessagePack, JSON, YAML, bincode), the kiwiPy envelopes, and
//!   [`Value`] for bodies of any shape.
//! - `filter` — [`BroadcastFilter`]. `settings` — [`Settings`]. `error` — [`Error`].
//! - `runtime` — a thread running an actix System: one for the actors, one for the
//!   supervisor.
//! - `fuzzing` (feature `fuzzing`, not an API) — the entry points of the fuzz targets in
//!   `fuzz/`: each decoder of bytes from outside, with the properties it must keep.

mod actors;
mod amqp;
pub mod blocking;
mod codec;
mod communicator;
mod error;
mod events;
mod filter;
mod fleet;
mod handlers;
mod health;
mod mem;
mod messages;
mod panics;
mod runtime;
mod settings;
mod subscriber;
mod supervised;
mod supervision;
mod transport;
mod tree;
#[cfg(feature = "zeromq")]
mod zeromq;
/// kiwimq's ZeroMQ broker (feature `zeromq`): AiiDA's protocol and files, durable and
/// restart-proof. [`Broker`](broker::Broker) embeds it; `kiwimq broker` runs it.
#[cfg(feature = "zeromq")]
pub mod broker {
    pub use crate::zeromq::broker::{Broker, RunningBroker};
}

pub use actors::replies::ReplyFuture;
pub use codec::Codec;
pub use communicator::{
    BroadcastOptions, Communicator, PulledTask, TaskQueue, WeakCommunicator, connect,
};
pub use error::{Error, ErrorKind, Result};
pub use events::ConnectionEvent;
pub use filter::BroadcastFilter;
pub use fleet::{Fleet, RunningFleet, Stop, shutdown_signal};
pub use health::Health;
pub use messages::{Broadcast, HandlerError, Rpc, Task};
pub use transport::QueueStats;

#[cfg(feature = "dashboard")]
pub mod dashboard;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod presence;
pub mod trace;
pub use settings::Settings;

/// A body of any shape — a Python dict of anything, say — for senders and subscribers that
/// do not know the shape in advance: `Task<Value>`, `rpc_send::<_, Value>(…)`. It is
/// [rmpv](https://docs.rs/rmpv)'s value type, which keeps what every self-describing codec
/// carries: maps with keys of any type and in their order, integers, floats, strings,
/// bytes, arrays, nil. Index it with `value["key"]`, read it with `as_str()`, `as_i64()`,
/// `as_map()`…, build it with `Value::from(…)`. Bincode, which is not self-describing,
/// cannot decode it (a `Codec` error).
pub use rmpv::Value;
pub use subscriber::IntoSubscriber;
#[doc(hidden)]
pub use subscriber::{Scope, Subscriber};
pub use supervised::{SupervisedActor, supervised};

// Every Rust snippet of the README and the guides is a doctest, so none can rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeSnippets;
#[cfg(doctest)]
#[doc = include_str!("../docs/concepts.md")]
struct ConceptsSnippets;
#[cfg(doctest)]
#[doc = include_str!("../docs/coming-from-kiwipy.md")]
struct KiwipyGuideSnippets;
#[cfg(doctest)]
#[doc = include_str!("../docs/coming-from-lapin.md")]
struct LapinGuideSnippets;
#[cfg(doctest)]
#[doc = include_str!("../docs/interop.md")]
struct InteropSnippets;
#[cfg(doctest)]
#[doc = include_str!("../docs/reliability.md")]
struct ReliabilitySnippets;
#[cfg(doctest)]
#[doc = include_str!("../docs/performance.md")]
struct PerformanceSnippets;

#[cfg(doctest)]
#[doc = include_str!("../docs/deployment.md")]
struct DeploymentSnippets;

/// The names most programs need: `use kiwimq::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Broadcast, BroadcastFilter, BroadcastOptions, Codec, Communicator, Error, ErrorKind,
        HandlerError, PulledTask, Rpc, Settings, Task, TaskQueue, WeakCommunicator,
    };
}
