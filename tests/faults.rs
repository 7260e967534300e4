//! Faults on a real broker: connections cut under load, a broker node restarted, worker
//! processes killed. Each test prints its figures (sent, completed, lost, duplicated).
//!
//! The shared broker is never stopped: connections are cut by a TCP proxy inside the test,
//! and restarts happen on a private broker node.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use kiwimq::{
    Broadcast, BroadcastFilter, BroadcastOptions, Communicator, ConnectionEvent, ErrorKind, Rpc,
    Settings, Task,
};

use common::child::{Child, child_settings};
use common::node::Node;
use common::proxy::{Proxy, upstream};
use common::{SOON, amqp_settings, amqp_url, eventually, seen};

/// How many times each task was handled, by task number.
type Handled = Arc<Mutex<HashMap<u32, u32>>>;

/// A worker that records every task it handles and answers with its number.
async fn worker(settings: Settings, handled: Handled) -> Communicator {
    let comm = settings.connect().await.expect("worker connects");
    comm.add_task_subscriber(move |task: Task<u32>| {
        *handled.lock().unwrap().entry(task.body).or_default() += 1;
        async move { Ok(task.body) }
    })
    .await
    .expect("worker subscribes");
    comm
}

/// The figures a fault test prints, and what it asserts on.
#[derive(Debug, Default)]
struct Figures {
    sent: usize,
    completed: usize,
    lost: usize,
    duplicated: usize,
    results: usize,
}

impl Figures {
    fn of(sent: usize, handled: &Handled, results: usize) -> Self {
        let handled = handled.lock().unwrap();
        Figures {
            sent,
            completed: handled.len(),
            lost: (0..sent as u32)
                .filter(|n| !handled.contains_key(n))
                .count(),
            duplicated: handled.values().map(|&n| n as usize - 1).sum(),
            results,
        }
    }

    fn print(&self, test: &str, extra: &str) {
        println!(
            "[fault figures] {test}: sent {}, completed {}, lost {}, duplicated {}, results {}{extra}",
            self.sent, self.completed, self.lost, self.duplicated, self.results
        );
    }
}

/// Sends tasks `range` with at most `window` awaiting their result at once; returns how
/// many results came back right.
async fn send_tasks(comm: &Communicator, range: std::ops::Range<u32>, window: usize) -> usize {
    let numbers: Vec<u32> = range.collect();
    let mut results = 0;
    for chunk in numbers.chunks(window) {
        let sends = chunk.iter().map(|&n| async move {
            let reply = comm
                .task_send::<_, u32>(&n)
                .await
                .unwrap_or_else(|e| panic!("task {n} was not sent: {e}"));
            let result = reply
                .with_timeout(Some(Duration::from_secs(120)))
                .await
                .unwrap_or_else(|e| panic!("task {n} has no result: {e}"));
            assert_eq!(result, n);
        });
        results += join_all(sends).await.len();
    }
    results
}

#[actix_rt::test]
async fn tasks_survive_a_connection_cut_every_second() {
    const TASKS: u32 = 10_000;
    let proxy = Proxy::start(&upstream()).await;
    let settings = amqp_settings(&proxy.url(&amqp_url()))
        .with_reconnect_delay(Duration::from_millis(20), Duration::from_millis(500))
        .with_task_prefetch(50);
    let handled = Handled::default();
    let workers = [
        worker(settings.clone(), handled.clone()).await,
        worker(settings.clone(), handled.clone()).await,
    ];
    let client = settings.connect().await.unwrap();
    let mut events = client.connection_events();

    let cutting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let cutter = {
        let cutting = cutting.clone();
        actix_rt::spawn(async move {
            let mut cuts = 0;
            while cutting.load(std::sync::atomic::Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                proxy.cut();
                cuts += 1;
            }
            (cuts, proxy)
        })
    };
    let started = Instant::now();
    let results = send_tasks(&client, 0..TASKS, 100).await;
    cutting.store(false, std::sync::atomic::Ordering::Release);
    let (cuts, _proxy) = cutter.await.unwrap();

    let figures = Figures::of(TASKS as usize, &handled, results);
    let mut losses = 0;
    while let Some(Some(event)) = events.next().now_or_never() {
        losses += matches!(event, ConnectionEvent::Lost(_)) as usize;
    }
    figures.print(
        "connection cut every second",
        &format!(
            ", cuts {cuts}, client saw {losses} losses, {:?}",
            started.elapsed()
        ),
    );
    assert_eq!(figures.lost, 0, "{figures:?}");
    assert_eq!(figures.results, TASKS as usize);
    assert!(cuts >= 2, "the run was too short to cut anything");
    assert!(losses >= 1, "the client never saw its connection lost");
    for comm in workers {
        comm.close().await.unwrap();
    }
    client.close().await.unwrap();
}

/// Waits for the next event that `wanted` accepts, failing after `within`.
async fn next_event(
    events: &mut futures::stream::BoxStream<'static, ConnectionEvent>,
    within: Duration,
    wanted: impl Fn(&ConnectionEvent) -> bool,
) -> ConnectionEvent {
    let waiting = async {
        loop {
            match events.next().await {
                Some(event) if wanted(&event) => return event,
                Some(_) => {}
                None => panic!("the connection events ended"),
            }
        }
    };
    tokio::time::timeout(within, waiting)
        .await
        .expect("timed out waiting for a connection event")
}

#[actix_rt::test]
async fn rpc_and_broadcasts_work_again_after_an_outage() {
    let proxy = Proxy::start(&upstream()).await;
    let direct = amqp_settings(&amqp_url()).with_rpc_timeout(Some(Duration::from_secs(2)));
    // The same names through the proxy: one fleet, one of its processes behind a bad link.
    let proxied = direct
        .clone()
        .with_uri(proxy.url(&amqp_url()))
        .with_reconnect_delay(Duration::from_millis(20), Duration::from_millis(200))
        .with_send_timeout(Duration::from_secs(1));
    let server = proxied.clone().connect().await.unwrap();
    let patient = proxied
        .with_send_timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap();
    let client = direct.connect().await.unwrap();
    let identifier = format!("echo-{}", uuid::Uuid::new_v4().simple());
    server
        .add_rpc_subscriber(Some(&identifier), |rpc: Rpc<String>| async move {
            Ok(format!("echo {}", rpc.body))
        })
        .await
        .unwrap();
    client
        .add_rpc_subscriber(
            Some(&format!("{identifier}-client")),
            |rpc: Rpc<u32>| async move { Ok(rpc.body + 1) },
        )
        .await
        .unwrap();
    let heard = seen::<String>();
    let record = heard.clone();
    server
        .add_broadcast_subscriber(BroadcastFilter::new(), move |b: Broadcast<String>| {
            record.lock().unwrap().push(b.body);
            async { Ok(()) }
        })
        .await
        .unwrap();
    let call = |body: &str| {
        let client = client.clone();
        let identifier = identifier.clone();
        let body = body.to_owned();
        async move {
            client
                .rpc_send::<_, String>(&identifier, &body)
                .await?
                .await
        }
    };
    assert_eq!(call("before").await.unwrap(), "echo before");

    let mut events = server.connection_events();
    proxy.pause();
    next_event(&mut events, SOON, |e| matches!(e, ConnectionEvent::Lost(_))).await;
    assert!(!server.is_connected());

    // During the outage every call ends, one way or the other, in bounded time.
    let started = Instant::now();
    // Refused at once when the broker already dropped the server's queue; when the
    // request still reached the old queue, it is lost with it and the RPC timeout ends it.
    let unroutable = call("during").await.unwrap_err();
    assert!(
        matches!(
            unroutable.kind(),
            ErrorKind::Unroutable(_) | ErrorKind::Timeout
        ),
        "{unroutable}"
    );
    let timed_out = server
        .broadcast_send(&"lost".to_owned(), BroadcastOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(timed_out.kind(), ErrorKind::Timeout),
        "{timed_out}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    // A send that starts in the outage and sees it end completes.
    let waiting = {
        let target = format!("{identifier}-client");
        let patient = patient.clone();
        actix_rt::spawn(async move { patient.rpc_send::<_, u32>(&target, &41).await?.await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.resume();
    next_event(&mut events, SOON, |e| {
        matches!(e, ConnectionEvent::Restored(_))
    })
    .await;
    assert!(server.is_connected());
    let answer = tokio::time::timeout(SOON, waiting)
        .await
        .expect("the waiting RPC ended");
    assert_eq!(answer.unwrap().unwrap(), 42);

    // RPC is at-most-once: a call racing the restoration may be lost (it times out) or
    // refused (Unroutable); once the subscriber is back, calls are answered.
    let deadline = Instant::now() + SOON;
    let answer = loop {
        match call("after").await {
            Ok(answer) => break answer,
            Err(error) if Instant::now() < deadline => {
                println!("an RPC right after the restoration: {error}");
            }
            Err(error) => panic!("RPC never answered after the outage: {error}"),
        }
    };
    assert_eq!(answer, "echo after");
    client
        .broadcast_send(&"after".to_owned(), BroadcastOptions::default())
        .await
        .unwrap();
    eventually(SOON, "the broadcast after the outage", || {
        heard.lock().unwrap().contains(&"after".to_owned())
    })
    .await;
    println!(
        "[fault figures] rpc and broadcasts across an outage: rpc during it {unroutable}; broadcast during it {timed_out}; both work again after"
    );
    server.close().await.unwrap();
    patient.close().await.unwrap();
    client.close().await.unwrap();
}

#[actix_rt::test]
async fn queued_and_running_tasks_survive_a_broker_restart() {
    const TASKS: u32 = 500;
    let node = Node::start().await;
    // Durable queues and persistent messages, as in production: not testing mode.
    let settings = amqp_settings(&node.url())
        .with_testing_mode(false)
        .with_reconnect_delay(Duration::from_millis(50), Duration::from_secs(1))
        .with_task_prefetch(10);
    let client = settings.clone().connect().await.unwrap();
    let mut replies = Vec::new();
    for n in 0..TASKS {
        replies.push(client.task_send::<_, u32>(&n).await.unwrap());
    }
    let handled = Handled::default();
    let record = handled.clone();
    let worker = settings.connect().await.unwrap();
    worker
        .add_task_subscriber(move |task: Task<u32>| {
            *record.lock().unwrap().entry(task.body).or_default() += 1;
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(task.body)
            }
        })
        .await
        .unwrap();
    eventually(SOON, "the worker to be busy", || {
        handled.lock().unwrap().len() >= 50
    })
    .await;

    let started = Instant::now();
    node.stop_app().await;
    eventually(SOON, "both to notice", || {
        !client.is_connected() && !worker.is_connected()
    })
    .await;
    let done_before = handled.lock().unwrap().len();
    node.start_app().await;
    let outage = started.elapsed();

    let results = tokio::time::timeout(Duration::from_secs(60), join_all(replies))
        .await
        .expect("every result arrives after the restart");
    let right = results
        .iter()
        .enumerate()
        .filter(|(n, r)| r.as_ref().ok() == Some(&(*n as u32)))
        .count();
    let figures = Figures::of(TASKS as usize, &handled, right);
    figures.print(
        "broker restarted",
        &format!(", {done_before} handled before the stop, outage {outage:?}"),
    );
    assert_eq!(figures.lost, 0, "{figures:?}");
    assert_eq!(right, TASKS as usize, "{results:?}");
    worker.close().await.unwrap();
    client.close().await.unwrap();
}

/// The worker process of `a_killed_worker_process_task_runs_elsewhere`: takes a task,
/// says so, and never finishes it. Only that test runs it.
#[actix_rt::test]
#[ignore = "a worker process started by a_killed_worker_process_task_runs_elsewhere"]
async fn worker_process() {
    let settings = child_settings().expect("run by a_killed_worker_process_task_runs_elsewhere");
    let comm = settings.connect().await.unwrap();
    comm.add_task_subscriber(|task: Task<u32>| async move {
        println!("kiwimq-child: started {}", task.body);
        futures::future::pending::<()>().await;
        Ok(task.body)
    })
    .await
    .unwrap();
    println!("kiwimq-child: ready");
    futures::future::pending::<()>().await;
}

#[actix_rt::test]
async fn a_killed_worker_process_task_runs_elsewhere() {
    let settings = amqp_settings(&amqp_url());
    let mut child = Child::start("worker_process", &settings);
    child.expect("kiwimq-child: ready").await;

    let client = settings.clone().connect().await.unwrap();
    let result = client.task_send::<_, u32>(&7).await.unwrap();
    child.expect("kiwimq-child: started 7").await;
    child.process.start_kill().unwrap(); // SIGKILL: no goodbye to the broker
    let status = child.process.wait().await.unwrap();

    let redelivered = seen::<bool>();
    let record = redelivered.clone();
    let worker = settings.connect().await.unwrap();
    worker
        .add_task_subscriber(move |task: Task<u32>| {
            record.lock().unwrap().push(task.redelivered);
            async move { Ok(task.body * 6) }
        })
        .await
        .unwrap();
    let answer = tokio::time::timeout(SOON, result)
        .await
        .expect("the task ran elsewhere");
    assert_eq!(answer.unwrap(), 42);
    assert_eq!(
        *redelivered.lock().unwrap(),
        [true],
        "seen as a redelivery, once"
    );
    println!(
        "[fault figures] worker process killed mid-task ({status}): sent 1, completed 1, lost 0, duplicated 0 (redelivered to another worker)"
    );
    worker.close().await.unwrap();
    client.close().await.unwrap();
}

#[actix_rt::test]
async fn a_handler_blocking_past_the_heartbeat_keeps_the_connection() {
    // The broker drops a connection that misses two heartbeats: here 2 s.
    let url = format!("{}?heartbeat=1", amqp_url());
    let settings = amqp_settings(&url);
    let worker = settings.clone().connect().await.unwrap();
    let mut events = worker.connection_events();
    // A closure handler runs on the communicator's own runtime thread, and this one blocks
    // it for three heartbeat periods.
    worker
        .add_task_subscriber(|task: Task<u32>| {
            std::thread::sleep(Duration::from_secs(3));
            async move { Ok(task.body) }
        })
        .await
        .unwrap();
    let client = settings.connect().await.unwrap();
    let result = client.task_send::<_, u32>(&9).await.unwrap();
    assert_eq!(
        tokio::time::timeout(SOON, result).await.unwrap().unwrap(),
        9
    );
    assert!(worker.is_connected());
    assert!(
        events.next().now_or_never().is_none(),
        "the connection was never lost"
    );
    println!("[fault figures] handler blocked 3 s with a 1 s heartbeat: connection kept");
    worker.close().await.unwrap();
    client.close().await.unwrap();
}

/// Log lines of this test binary, for the tests that check what an operator is told.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only log subscriber");
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[actix_rt::test]
async fn a_task_outliving_consumer_timeout_is_logged_and_runs_again() {
    let logs = captured_logs();
    // A broker that gives a consumer 1 s per task, and checks every 100 ms.
    let node = Node::start_with(
        "consumer_timeout = 1000",
        Some("[{rabbit, [{channel_tick_interval, 100}]}]."),
    )
    .await;
    let settings = amqp_settings(&node.url());
    let worker = settings.clone().connect().await.unwrap();
    let runs = seen::<bool>();
    let record = runs.clone();
    worker
        .add_task_subscriber(move |task: Task<u32>| {
            record.lock().unwrap().push(task.redelivered);
            async move {
                if !task.redelivered {
                    // Longer than the broker allows.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                Ok(task.body)
            }
        })
        .await
        .unwrap();
    let client = settings.connect().await.unwrap();
    let result = client.task_send::<_, u32>(&3).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(30), result)
        .await
        .expect("the task ran again")
        .unwrap();
    assert_eq!(answer, 3);
    assert_eq!(runs.lock().unwrap()[..2], [false, true]);
    eventually(SOON, "an error naming consumer_timeout", || {
        String::from_utf8_lossy(&logs.lock().unwrap()).contains("consumer_timeout")
    })
    .await;
    println!(
        "[fault figures] task beyond consumer_timeout: sent 1, completed 1, lost 0, ran {} times; the error named consumer_timeout",
        runs.lock().unwrap().len()
    );
    worker.close().await.unwrap();
    client.close().await.unwrap();
}

#[actix_rt::test]
async fn a_broker_that_stops_confirming_fails_sends_in_bounded_time() {
    let node = Node::start().await;
    let comm = amqp_settings(&node.url())
        .with_send_timeout(Duration::from_secs(1))
        .connect()
        .await
        .unwrap();
    comm.task_send_no_reply(&0u32).await.unwrap();
    // A memory alarm: the broker blocks every publishing connection and confirms nothing.
    node.ctl_args(&["set_vm_memory_high_watermark", "0.000001"]);
    let deadline = Instant::now() + SOON;
    let error = loop {
        let started = Instant::now();
        let sent = comm.task_send_no_reply(&1u32).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "bounded by the send timeout"
        );
        match sent {
            Err(error) => break error,
            Ok(()) => assert!(
                Instant::now() < deadline,
                "the alarm never blocked publishes"
            ),
        }
    };
    assert_eq!(*error.kind(), kiwimq::ErrorKind::Timeout, "{error}");
    assert!(
        error.to_string().contains("vm_memory_high_watermark"),
        "the error names the broker's block and its alarm: {error}"
    );
    node.ctl_args(&["set_vm_memory_high_watermark", "0.4"]);
    eventually(SOON, "publishes confirmed again", || {
        futures::executor::block_on(comm.task_send_no_reply(&2u32)).is_ok()
    })
    .await;
    println!(
        "[fault figures] broker blocked by a memory alarm: a send failed with {error}; sends work again after"
    );
    comm.close().await.unwrap();
}
