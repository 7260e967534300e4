//! The communicator's own lifecycle: closing with a task running says at once what it
//! waits for (the log is captured by a global subscriber, so this is a binary of its own);
//! communicators whose subscribers hold handles on them are closed by dropping the
//! program's last handle; adds and removes cut short by their caller leave nothing behind.

mod common;
#[path = "../examples/common/workflow.rs"]
mod workflow;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Actor;
use common::{Backend, SOON, communicator_threads, eventually, settings};
use kiwimq::{ErrorKind, HandlerError, Rpc, Settings, Task, Value};

/// The tests here count the process's threads: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every log line, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[actix_rt::test]
async fn closing_with_a_task_running_says_what_it_waits_for_at_once() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("kiwimq=warn")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let settings = Settings::new(format!("mem://{}", uuid::Uuid::new_v4().simple()))
        .with_shutdown_grace(Duration::from_secs(20));
    let comm = settings.connect().await.unwrap();
    let (started, mut running) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let released = release.clone();
    comm.add_task_subscriber(move |_: Task<u32, ()>| {
        let started = started.clone();
        let released = released.clone();
        async move {
            let _ = started.send(());
            released.notified().await;
            Ok::<_, HandlerError>(())
        }
    })
    .await
    .unwrap();
    comm.default_task_queue()
        .task_send_no_reply(&1u32)
        .await
        .unwrap();
    running.recv().await.unwrap();

    let closing = actix_rt::spawn({
        let comm = comm.clone();
        async move { comm.close().await }
    });
    // Long before the 20 s grace is over, the log says what the close waits for.
    eventually(SOON, "the close to say what it waits for", || {
        captured
            .text()
            .contains("waiting up to 20s for 1 running task(s) to finish")
    })
    .await;
    release.notify_one();
    closing.await.unwrap().unwrap();
    assert!(
        !captured.text().contains("closing with tasks still running"),
        "the task finished within the grace: {}",
        captured.text()
    );
}

/// The workflow pattern (`examples/workflow.rs`): a launcher subscriber and the process
/// actors it starts hold handles on their communicator. Held weakly, as documented, the
/// program's last handle dropped closes it: threads (and on RabbitMQ connections) go.
async fn dropped_communicators_with_workflow_subscribers_leave_nothing_behind(backend: Backend) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let before = communicator_threads();
    for _ in 0..20 {
        let settings = settings(backend);
        let comm = settings.clone().connect().await.unwrap();
        let launcher = workflow::Launcher {
            comm: comm.downgrade(),
            steps: 1_000,
            step: Duration::from_secs(1),
        };
        comm.add_task_subscriber(launcher.start()).await.unwrap();
        let pid: Value = comm
            .task_send(&workflow::continue_task(7, true))
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(pid, Value::from(7));
        // The process serves its pid: the cycle through its RPC subscriber exists.
        let status: Value = comm
            .rpc_send("7", &workflow::intent("status"))
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(status.is_map(), "{status}");
        drop(comm);
    }
    eventually(SOON, "every dropped communicator's threads to end", || {
        communicator_threads() <= before
    })
    .await;
}

#[actix_rt::test]
async fn mem_dropped_communicators_with_workflow_subscribers_leave_nothing_behind() {
    dropped_communicators_with_workflow_subscribers_leave_nothing_behind(Backend::Mem).await;
}

#[actix_rt::test]
async fn amqp_dropped_communicators_with_workflow_subscribers_leave_nothing_behind() {
    dropped_communicators_with_workflow_subscribers_leave_nothing_behind(Backend::Amqp).await;
}

/// `add_rpc_subscriber` and `remove_rpc_subscriber` dropped at many points — before their
/// first await returns, and after each of many short delays — leave no identifier claimed
/// for good: each can be added again, and answers.
async fn rpc_adds_and_removes_cut_short_leave_nothing_behind(backend: Backend) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let comm = settings(backend).connect().await.unwrap();
    let echo = |rpc: Rpc<u32>| async move { Ok::<_, HandlerError>(rpc.body) };
    let mut identifiers = Vec::new();
    for n in 0..60u64 {
        let identifier = format!("cut-{n}");
        // Cut the add after n × 0.1 ms (0 = at its first poll).
        let cut = Duration::from_micros(100 * n);
        let _ = tokio::time::timeout(cut, comm.add_rpc_subscriber(Some(&identifier), echo)).await;
        // And, every other time, a removal cut short too.
        if n % 2 == 1 {
            let _ = tokio::time::timeout(cut, comm.remove_rpc_subscriber(&identifier)).await;
        }
        identifiers.push(identifier);
    }
    for identifier in &identifiers {
        let deadline = std::time::Instant::now() + SOON;
        loop {
            match comm.add_rpc_subscriber(Some(identifier), echo).await {
                Ok(_) => break,
                // Still served: a completed add whose caller was there to see it, or one
                // being undone. Remove it, then add again.
                Err(error) if matches!(error.kind(), ErrorKind::DuplicateSubscriber(_)) => {
                    match comm.remove_rpc_subscriber(identifier).await {
                        Ok(()) => {}
                        Err(error) if matches!(error.kind(), ErrorKind::UnknownSubscriber(_)) => {}
                        Err(error) => panic!("removing {identifier}: {error}"),
                    }
                }
                Err(error) => panic!("adding {identifier}: {error}"),
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{identifier} can never be added again"
            );
            tokio::task::yield_now().await;
        }
        let answer: u32 = comm
            .rpc_send(identifier, &5u32)
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(answer, 5, "{identifier} answers");
    }
    comm.close().await.unwrap();
}

#[actix_rt::test]
async fn mem_rpc_adds_and_removes_cut_short_leave_nothing_behind() {
    rpc_adds_and_removes_cut_short_leave_nothing_behind(Backend::Mem).await;
}

#[actix_rt::test]
async fn amqp_rpc_adds_and_removes_cut_short_leave_nothing_behind() {
    rpc_adds_and_removes_cut_short_leave_nothing_behind(Backend::Amqp).await;
}

/// A closure computing for 2 s (blocking its thread, as CPU-bound work does) delays only
/// its own messages: an unrelated RPC on the same communicator — to a closure, and to a
/// supervised actor — is answered while it still computes, and the closure's own call
/// answers in the end. No user code runs on kiwimq's own thread.
async fn a_computing_closure_delays_only_its_own_messages(backend: Backend) {
    let comm = settings(backend).connect().await.unwrap();
    let computing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started, mut has_started) = tokio::sync::mpsc::unbounded_channel();
    let flag = computing.clone();
    comm.add_rpc_subscriber(Some("compute"), move |_: Rpc<u32, u32>| {
        let (started, flag) = (started.clone(), flag.clone());
        async move {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = started.send(());
            let begun = std::time::Instant::now();
            let mut spins = 0u32;
            while begun.elapsed() < Duration::from_secs(2) {
                spins = spins.wrapping_add(std::hint::black_box(1));
            }
            flag.store(false, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, HandlerError>(spins.min(1))
        }
    })
    .await
    .unwrap();
    comm.add_rpc_subscriber(Some("quick"), |rpc: Rpc<u32, u32>| async move {
        Ok::<_, HandlerError>(rpc.body + 1)
    })
    .await
    .unwrap();
    comm.add_rpc_subscriber(Some("actor"), kiwimq::supervised(|| Echo))
        .await
        .unwrap();

    let slow = comm.rpc_send::<_, u32>("compute", &0u32).await.unwrap();
    has_started.recv().await.unwrap();
    for (identifier, body, answer) in [("quick", 1u32, 2u32), ("actor", 5, 5)] {
        let asked = std::time::Instant::now();
        let got: u32 = comm
            .rpc_send(identifier, &body)
            .await
            .unwrap()
            .await
            .unwrap();
        let took = asked.elapsed();
        assert_eq!(got, answer);
        assert!(
            computing.load(std::sync::atomic::Ordering::SeqCst),
            "{identifier} was answered only after the computing closure ended ({took:?})"
        );
        println!("{backend:?}: {identifier} answered in {took:?} while a closure computes");
    }
    assert_eq!(slow.await.unwrap(), 1);
    comm.close().await.unwrap();
}

/// The supervised actor of the test above.
struct Echo;

impl Actor for Echo {
    type Context = actix::Context<Self>;
}

impl actix::Handler<Rpc<u32, u32>> for Echo {
    type Result = Result<u32, HandlerError>;

    fn handle(&mut self, rpc: Rpc<u32, u32>, _: &mut actix::Context<Self>) -> Self::Result {
        Ok(rpc.body)
    }
}

#[actix_rt::test]
async fn mem_a_computing_closure_delays_only_its_own_messages() {
    a_computing_closure_delays_only_its_own_messages(Backend::Mem).await;
}

#[actix_rt::test]
async fn amqp_a_computing_closure_delays_only_its_own_messages() {
    a_computing_closure_delays_only_its_own_messages(Backend::Amqp).await;
}
