//! What every backend test shares: a backend's settings with names of its own, actor
//! subscribers, and waiting by polling with a deadline.

#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use kiwimq::{Broadcast, HandlerError, Rpc, Settings, Task};

pub mod aiida;
pub mod child;
pub mod node;
pub mod proxy;
pub mod vhost;

/// Where a behaviour test runs.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Mem,
    Amqp,
}

/// The broker URI for AMQP tests: `KIWIMQ_URL` when it is an `amqp://` URI (the variable
/// the examples read too), else the local RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("KIWIMQ_URL")
        .ok()
        .filter(|url| url.starts_with("amqp"))
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Settings private to one test: a fresh in-process broker, or on RabbitMQ exchanges and
/// queues under a random prefix in testing mode (so nothing outlives the test). Clones
/// share the broker and names, as two processes of one fleet would.
pub fn settings(backend: Backend) -> Settings {
    match backend {
        Backend::Mem => Settings::new(format!("mem://{}", uuid::Uuid::new_v4().simple())),
        Backend::Amqp => amqp_settings(&amqp_url()),
    }
}

/// Settings for the broker at `url` (a proxy or a private node), with names private to
/// one test, in testing mode.
pub fn amqp_settings(url: &str) -> Settings {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Settings::new(url)
        .with_testing_mode(true)
        .with_message_exchange(format!("kiwimq-test-{id}.messages"))
        .with_task_exchange(format!("kiwimq-test-{id}.tasks"))
        .with_task_queue(format!("kiwimq-test-{id}.tasks"))
}

/// A queue name private to one test.
pub fn unique(name: &str) -> String {
    format!("kiwimq-test-{}-{name}", uuid::Uuid::new_v4().simple())
}

/// Polls `condition` until it holds, failing the test after `within`.
pub async fn eventually(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `attempt` again every 200 ms until it gives `Ok`, for at most `within`: its value, or a
/// panic naming `what` and the last error. For conditions that must be awaited (a call to
/// a process, a command to run), where [`eventually`] takes a plain closure.
pub async fn retry<T, E, F, Fut>(within: Duration, what: &str, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + within;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) => assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what}; last: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The usual deadline for something that should happen promptly.
pub const SOON: Duration = Duration::from_secs(10);

/// Shared record of what subscribers saw.
pub type Seen<T> = Arc<Mutex<Vec<T>>>;

pub fn seen<T>() -> Seen<T> {
    Arc::new(Mutex::new(Vec::new()))
}

pub fn count<T>(seen: &Seen<T>) -> usize {
    seen.lock().unwrap().len()
}

/// Subscribes a closure to `comm`'s default task queue that records each task's body and
/// returns nothing; what it recorded.
pub async fn recorded_tasks<T>(comm: &kiwimq::Communicator) -> Seen<T>
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    let tasks = seen::<T>();
    let record = tasks.clone();
    comm.add_task_subscriber(move |task: Task<T, ()>| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(task.body);
            Ok(())
        }
    })
    .await
    .expect("a task subscriber");
    tasks
}

/// A task worker actor: multiplies by `factor` and records what it saw.
pub struct Multiplier {
    pub factor: i64,
    pub seen: Seen<i64>,
}

impl Actor for Multiplier {
    type Context = Context<Self>;
}

impl Handler<Task<i64>> for Multiplier {
    type Result = Result<i64, HandlerError>;

    fn handle(&mut self, task: Task<i64>, _: &mut Context<Self>) -> Self::Result {
        self.seen.lock().unwrap().push(task.body);
        Ok(task.body * self.factor)
    }
}

/// An RPC actor computing Fibonacci numbers; negative input is an error.
pub struct Fib;

impl Actor for Fib {
    type Context = Context<Self>;
}

impl Handler<Rpc<i64, u64>> for Fib {
    type Result = Result<u64, HandlerError>;

    fn handle(&mut self, rpc: Rpc<i64, u64>, _: &mut Context<Self>) -> Self::Result {
        if rpc.body < 0 {
            return Err(HandlerError::failed(format!(
                "fib of a negative number: {}",
                rpc.body
            )));
        }
        let (mut a, mut b) = (0u64, 1u64);
        for _ in 0..rpc.body {
            (a, b) = (b, a + b);
        }
        Ok(a)
    }
}

/// A broadcast listener actor recording every broadcast it gets.
pub struct Listener {
    pub seen: Seen<Broadcast<String>>,
}

impl Actor for Listener {
    type Context = Context<Self>;
}

impl Handler<Broadcast<String>> for Listener {
    type Result = Result<(), HandlerError>;

    fn handle(&mut self, broadcast: Broadcast<String>, _: &mut Context<Self>) -> Self::Result {
        self.seen.lock().unwrap().push(broadcast);
        Ok(())
    }
}

/// Threads of this process named like a communicator's (its runtime, the AMQP I/O
/// runtime, blocking handlers).
pub fn communicator_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with("kiwimq-"))
                .count()
        })
        .unwrap_or(0)
}

/// A TCP port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// An example's binary, built beside the test binaries by `cargo test`.
pub fn example(name: &str) -> std::path::PathBuf {
    let test = std::env::current_exe().expect("the test binary's path");
    let profile = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    profile.join("examples").join(name)
}

/// Runs each `async fn NAME(backend: Backend)` of the test file on both backends, as
/// `mem::NAME` and `amqp::NAME`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod mem {
            $(
                #[actix_rt::test]
                async fn $name() {
                    super::$name(super::Backend::Mem).await;
                }
            )*
        }
        mod amqp {
            $(
                #[actix_rt::test]
                async fn $name() {
                    super::$name(super::Backend::Amqp).await;
                }
            )*
        }
    };
}
