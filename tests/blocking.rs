//! The semantics table through the blocking API, on `mem://` and on RabbitMQ: plain
//! functions, no async anywhere.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use kiwimq::blocking::Communicator;
use kiwimq::{Broadcast, BroadcastFilter, BroadcastOptions, ErrorKind, HandlerError, Rpc, Task};

use common::{Backend, SOON, communicator_threads, settings};

fn connect(settings: &kiwimq::Settings) -> Communicator {
    Communicator::connect_with(settings.clone()).expect("connects")
}

fn kind<T: std::fmt::Debug>(result: kiwimq::Result<T>) -> ErrorKind {
    result.expect_err("an error").kind().clone()
}

/// Polls `condition` until it holds, failing after `within`.
fn eventually(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- tasks ---------------------------------------------------------------------------

fn each_task_goes_to_one_of_the_workers(backend: Backend) {
    let settings = settings(backend).with_task_prefetch(4);
    let handled: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    let workers: Vec<Communicator> = (0..2)
        .map(|_| {
            let comm = connect(&settings);
            let handled = handled.clone();
            comm.add_task_subscriber(move |task: Task<u32>| {
                *handled.lock().unwrap().entry(task.body).or_default() += 1;
                Ok(task.body * 10)
            })
            .unwrap();
            comm
        })
        .collect();
    let client = connect(&settings);
    let replies: Vec<_> = (0..20u32)
        .map(|n| client.task_send::<_, u32>(&n).unwrap())
        .collect();
    for (n, reply) in replies.into_iter().enumerate() {
        assert_eq!(reply.wait().unwrap(), n as u32 * 10);
    }
    let handled = handled.lock().unwrap();
    assert_eq!(handled.len(), 20);
    assert!(handled.values().all(|&times| times == 1), "{handled:?}");
    for comm in workers {
        comm.close().unwrap();
    }
    client.close().unwrap();
}

fn a_failing_or_panicking_task_handler_is_a_remote_error(backend: Backend) {
    let comm = connect(&settings(backend));
    comm.add_task_subscriber(|task: Task<i64>| match task.body {
        0 => Err(HandlerError::failed("zero is not allowed")),
        1 => panic!("the handler broke"),
        n => Ok(n),
    })
    .unwrap();
    let failed = comm.task_send::<_, i64>(&0i64).unwrap().wait();
    assert!(matches!(&kind(failed), ErrorKind::Remote(text) if text.contains("zero")));
    let panicked = comm.task_send::<_, i64>(&1i64).unwrap().wait();
    assert!(matches!(&kind(panicked), ErrorKind::Remote(text) if text.contains("panicked")));
    assert_eq!(
        comm.task_send::<_, i64>(&5i64).unwrap().wait().unwrap(),
        5,
        "still serving"
    );
    comm.close().unwrap();
}

fn a_rejected_task_goes_to_the_next_subscriber(backend: Backend) {
    let comm = connect(&settings(backend));
    let rejected = Arc::new(AtomicUsize::new(0));
    let counter = rejected.clone();
    comm.add_task_subscriber(move |_: Task<i64>| {
        counter.fetch_add(1, Ordering::SeqCst);
        Err::<i64, _>(HandlerError::Rejected)
    })
    .unwrap();
    comm.add_task_subscriber(|task: Task<i64>| Ok(task.body + 1))
        .unwrap();
    assert_eq!(comm.task_send::<_, i64>(&1i64).unwrap().wait().unwrap(), 2);
    assert_eq!(rejected.load(Ordering::SeqCst), 1);
    comm.close().unwrap();
}

fn a_task_waits_for_a_worker_and_no_reply_sends_nothing_back(backend: Backend) {
    let settings = settings(backend);
    let client = connect(&settings);
    let reply = client.task_send::<_, String>("later").unwrap();
    client.task_send_no_reply("quiet").unwrap();
    let worker = connect(&settings);
    let first = worker.next_task::<String>(SOON).unwrap();
    assert_eq!(first.body(), "later");
    assert!(!first.no_reply());
    first.process(Ok("done later")).unwrap();
    assert_eq!(reply.wait().unwrap(), "done later");
    let second = worker.next_task::<String>(SOON).unwrap();
    assert!(second.no_reply());
    second.process(Ok("nobody hears this")).unwrap();
    assert_eq!(client.as_async().pending_replies(), 0);
    worker.close().unwrap();
    client.close().unwrap();
}

fn pull_mode_iterates_a_named_queue_and_requeues(backend: Backend) {
    let comm = connect(&settings(backend));
    let queue = comm.task_queue(common::unique("pull"));
    for n in 0..3i64 {
        queue.task_send_no_reply(&n).unwrap();
    }
    let seen: Vec<i64> = queue
        .iter_tasks::<i64>()
        .map(|task| {
            let task = task.unwrap();
            let body = *task.body();
            task.process(Ok(())).unwrap();
            body
        })
        .collect();
    assert_eq!(seen, [0, 1, 2]);
    queue.task_send_no_reply(&7i64).unwrap();
    queue.next_task::<i64>(SOON).unwrap().requeue();
    let again = queue.next_task::<i64>(SOON).unwrap();
    assert!(again.redelivered());
    again.process(Ok(())).unwrap();
    assert_eq!(
        kind(queue.next_task::<i64>(Duration::from_millis(100))),
        ErrorKind::QueueEmpty
    );
    comm.close().unwrap();
}

// ---- RPC -----------------------------------------------------------------------------

fn rpc_answers_fails_and_is_unroutable_to_nobody(backend: Backend) {
    let comm = connect(&settings(backend));
    comm.add_rpc_subscriber(Some("square"), |rpc: Rpc<i64>| match rpc.body {
        n if n < 0 => Err(HandlerError::failed("negative")),
        n => Ok(n * n),
    })
    .unwrap();
    assert_eq!(
        comm.rpc_send::<_, i64>("square", &7i64)
            .unwrap()
            .wait()
            .unwrap(),
        49
    );
    let failed = comm.rpc_send::<_, i64>("square", &-1i64).unwrap().wait();
    assert!(matches!(kind(failed), ErrorKind::Remote(_)));
    assert!(matches!(
        kind(comm.rpc_send::<_, i64>("nobody", &1i64)),
        ErrorKind::Unroutable(_)
    ));
    comm.remove_rpc_subscriber("square").unwrap();
    assert!(matches!(
        kind(comm.rpc_send::<_, i64>("square", &1i64)),
        ErrorKind::Unroutable(_)
    ));
    comm.close().unwrap();
}

fn a_blocking_subscriber_stalls_no_other_and_waits_can_be_retried(backend: Backend) {
    let comm = connect(&settings(backend));
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    comm.add_rpc_subscriber(Some("slow"), move |_: Rpc<i64>| {
        // Blocks until the test lets it go.
        released.lock().unwrap().recv_timeout(SOON).ok();
        Ok(1i64)
    })
    .unwrap();
    comm.add_rpc_subscriber(Some("fast"), |_: Rpc<i64>| Ok(2i64))
        .unwrap();
    let mut slow = comm.rpc_send::<_, i64>("slow", &0i64).unwrap();
    assert_eq!(
        kind(slow.wait_timeout(Duration::from_millis(100))),
        ErrorKind::Timeout
    );
    let mut fast = comm.rpc_send::<_, i64>("fast", &0i64).unwrap();
    assert_eq!(
        fast.wait_timeout(SOON).unwrap(),
        2,
        "answered while the slow one blocks"
    );
    release.send(()).unwrap();
    assert_eq!(slow.wait_timeout(SOON).unwrap(), 1, "waited on again");
    assert_eq!(kind(slow.wait_timeout(SOON)), ErrorKind::Closed, "spent");
    comm.close().unwrap();
}

// ---- broadcasts ----------------------------------------------------------------------

fn broadcasts_reach_every_matching_subscriber(backend: Backend) {
    let settings = settings(backend);
    let heard: Arc<Mutex<Vec<String>>> = Arc::default();
    let listeners: Vec<Communicator> = (0..2)
        .map(|i| {
            let comm = connect(&settings);
            let heard = heard.clone();
            comm.add_broadcast_subscriber(
                BroadcastFilter::new().subject("job.*"),
                move |b: Broadcast<String>| heard.lock().unwrap().push(format!("{i}:{}", b.body)),
            )
            .unwrap();
            comm
        })
        .collect();
    let sender = connect(&settings);
    sender
        .broadcast_send("skipped", BroadcastOptions::subject("other"))
        .unwrap();
    sender
        .broadcast_send("done", BroadcastOptions::subject("job.1"))
        .unwrap();
    eventually(SOON, "both listeners", || heard.lock().unwrap().len() == 2);
    let mut heard = heard.lock().unwrap().clone();
    heard.sort();
    assert_eq!(heard, ["0:done", "1:done"]);
    for comm in listeners {
        comm.close().unwrap();
    }
    sender.close().unwrap();
}

// ---- lifetime ------------------------------------------------------------------------

fn a_closed_communicator_fails_every_call(backend: Backend) {
    let comm = connect(&settings(backend));
    let pending = comm.rpc_send::<_, i64>("x", &1i64);
    drop(pending);
    comm.close().unwrap();
    assert_eq!(kind(comm.task_send::<_, i64>(&1i64)), ErrorKind::Closed);
    assert_eq!(kind(comm.rpc_send::<_, i64>("x", &1i64)), ErrorKind::Closed);
    assert_eq!(
        kind(comm.add_task_subscriber(|t: Task<i64>| Ok(t.body))),
        ErrorKind::Closed
    );
    comm.close().unwrap();
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod mem {
            use super::common::Backend;
            $(
                #[test]
                fn $name() {
                    super::$name(Backend::Mem);
                }
            )*
        }
        mod amqp {
            use super::common::Backend;
            $(
                #[test]
                fn $name() {
                    super::$name(Backend::Amqp);
                }
            )*
        }
    };
}

/// A burst of calls to a blocking subscriber whose handler sleeps runs a bounded number at
/// once (the pool's size) instead of a thread per call; every call is answered.
fn a_burst_of_calls_waits_for_the_bounded_pool(backend: Backend) {
    let comm = connect(&settings(backend).with_blocking_threads(4));
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (now, peak) = (running.clone(), most.clone());
    comm.add_rpc_subscriber(Some("slow"), move |rpc: Rpc<u32>| {
        let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(at_once, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        now.fetch_sub(1, Ordering::SeqCst);
        Ok(rpc.body)
    })
    .unwrap();
    let replies: Vec<_> = (0..100u32)
        .map(|n| comm.rpc_send::<_, u32>("slow", &n).unwrap())
        .collect();
    for (n, reply) in replies.into_iter().enumerate() {
        assert_eq!(reply.wait().unwrap() as usize, n);
    }
    let most = most.load(Ordering::SeqCst);
    assert!((1..=4).contains(&most), "{most} handlers ran at once");
    comm.close().unwrap();
}

both!(
    a_burst_of_calls_waits_for_the_bounded_pool,
    each_task_goes_to_one_of_the_workers,
    a_failing_or_panicking_task_handler_is_a_remote_error,
    a_rejected_task_goes_to_the_next_subscriber,
    a_task_waits_for_a_worker_and_no_reply_sends_nothing_back,
    pull_mode_iterates_a_named_queue_and_requeues,
    rpc_answers_fails_and_is_unroutable_to_nobody,
    a_blocking_subscriber_stalls_no_other_and_waits_can_be_retried,
    broadcasts_reach_every_matching_subscriber,
    a_closed_communicator_fails_every_call,
);

#[test]
fn a_subscriber_sleeping_10_s_keeps_a_2_s_heartbeat_connection() {
    let url = format!("{}?heartbeat=2", common::amqp_url());
    let comm = Communicator::connect_with(common::amqp_settings(&url)).unwrap();
    let events = comm.connection_events();
    comm.add_task_subscriber(|task: Task<u32>| {
        std::thread::sleep(Duration::from_secs(10));
        Ok(task.body)
    })
    .unwrap();
    assert_eq!(comm.task_send::<_, u32>(&4).unwrap().wait().unwrap(), 4);
    assert!(comm.is_connected());
    comm.close().unwrap();
    let events: Vec<_> = events.collect();
    assert_eq!(events, [kiwimq::ConnectionEvent::Closed], "never lost");
}

#[actix_rt::test]
async fn works_inside_an_async_runtime() {
    for settings in [settings(Backend::Mem), settings(Backend::Amqp)] {
        let comm = Communicator::connect_with(settings).unwrap();
        comm.add_rpc_subscriber(Some("inc"), |rpc: Rpc<i64>| Ok(rpc.body + 1))
            .unwrap();
        assert_eq!(
            comm.rpc_send::<_, i64>("inc", &1i64)
                .unwrap()
                .wait()
                .unwrap(),
            2
        );
        drop(comm);
    }
}

#[test]
fn dropping_ends_its_threads() {
    let before = communicator_threads();
    for backend in [Backend::Mem, Backend::Amqp, Backend::Mem, Backend::Amqp] {
        for _ in 0..5 {
            let comm = connect(&settings(backend));
            comm.task_send_no_reply(&1i64).unwrap();
            drop(comm);
        }
    }
    // Twenty communicators would leave twenty to forty threads; others of this binary
    // running meanwhile hold a few.
    eventually(SOON, "the threads to end", || {
        communicator_threads() < before + 10
    });
}

#[test]
fn close_does_not_wait_for_a_handler_past_the_grace() {
    let settings = settings(Backend::Mem).with_shutdown_grace(Duration::from_millis(100));
    let comm = connect(&settings);
    let (started, running) = mpsc::channel();
    comm.add_task_subscriber(move |task: Task<u32>| {
        started.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(60));
        Ok(task.body)
    })
    .unwrap();
    comm.task_send_no_reply(&1u32).unwrap();
    running.recv_timeout(SOON).expect("the handler started");
    let (closed, done) = mpsc::channel();
    std::thread::spawn(move || {
        comm.close().unwrap();
        drop(comm);
        closed.send(()).unwrap();
    });
    done.recv_timeout(SOON)
        .expect("close and drop returned without waiting a minute for the handler");
}
