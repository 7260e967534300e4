//! kiwimq's own ZeroMQ broker (`kiwimq broker`, [`kiwimq::broker::Broker`]): what it adds to
//! AiiDA's protocol (task results back, durable confirms, a socket that stays put), AiiDA's
//! Python client on it, and its faults: `kill -9` with confirmed tasks in flight, a killed
//! worker, a stalled one. The fault tests print their figures.

mod common;
#[path = "common/raw_zmq.rs"]
mod raw_zmq;

use std::collections::HashSet;
use std::time::Duration;

use common::aiida::{BrokerProcess, PythonPeer, endpoint, scratch};
use common::{SOON, Seen, count, eventually, seen};
use kiwimq::broker::Broker;
use kiwimq::{HandlerError, Rpc, Settings, Task};
use raw_zmq::RawWorker;

async fn connect(uri: &str) -> kiwimq::Communicator {
    Settings::new(uri)
        .connect()
        .await
        .expect("connects to kiwimq's broker")
}

#[actix_rt::test]
async fn kiwimq_clients_get_task_results_through_kiwimqs_broker() {
    let dir = scratch("kiwimq-broker");
    let broker = Broker::new(&dir).start().unwrap();
    let worker = connect(&broker.uri()).await;
    let client = connect(&broker.socket_uri()).await;
    worker
        .add_task_subscriber(|task: Task<u64>| async move { Ok(task.body * 2) })
        .await
        .unwrap();
    worker
        .add_rpc_subscriber(Some("fib"), |rpc: Rpc<u64>| async move {
            Ok::<_, HandlerError>(rpc.body + 1)
        })
        .await
        .unwrap();
    let result: u64 = client.task_send(&21u64).await.unwrap().await.unwrap();
    assert_eq!(result, 42);
    let mut replies = Vec::new();
    for n in 0..100u64 {
        replies.push(client.task_send::<_, u64>(&n).await.unwrap());
    }
    for (n, reply) in replies.into_iter().enumerate() {
        assert_eq!(reply.await.unwrap(), 2 * n as u64);
    }
    let answer: u64 = client.rpc_send("fib", &9u64).await.unwrap().await.unwrap();
    assert_eq!(answer, 10);
    // The `kiwimq` command on a zmq:// URI, with no --codec: JSON, the only one it carries.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiwimq"))
        .args([
            "--uri",
            &broker.uri(),
            "--timeout",
            "10",
            "rpc",
            "call",
            "fib",
            "41",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "42");
    let unknown = client
        .rpc_send::<_, u64>("nobody", &1u64)
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert!(
        unknown.to_string().contains("Recipient not found"),
        "{unknown}"
    );

    // AiiDA's files, in AiiDA's formats.
    let pid = std::fs::read_to_string(dir.join("broker.pid")).unwrap();
    assert_eq!(pid, format!("aiida-zeromq-broker {}", std::process::id()));
    let sockets = std::fs::read_to_string(dir.join("broker.sockets")).unwrap();
    assert!(
        std::path::Path::new(sockets.trim())
            .join("router.sock")
            .exists()
    );
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("broker.status")).unwrap()).unwrap();
    for field in [
        "running",
        "pending_tasks",
        "processing_tasks",
        "task_subscribers",
        "rpc_subscribers",
        "available_workers",
        "in_flight_tasks",
        "pending_rpc_responses",
        "timestamp",
        "pid",
    ] {
        assert!(
            status.get(field).is_some(),
            "broker.status lacks {field}: {status}"
        );
    }
    // A second broker for the same directory is refused.
    let second = Broker::new(&dir).start();
    assert!(second.is_err());

    client.close().await.unwrap();
    worker.close().await.unwrap();
    broker.stop().unwrap();
    // A clean stop takes its announcements away and keeps the storage.
    assert!(!dir.join("broker.pid").exists());
    assert!(!dir.join("broker.sockets").exists());
    assert!(dir.join("storage/tasks/pending").is_dir());
    std::fs::remove_dir_all(dir).unwrap();
}

#[actix_rt::test]
async fn aiidas_python_client_talks_to_kiwimq_through_kiwimqs_broker() {
    let broker = BrokerProcess::kiwimq(30).await;
    let comm = connect(&broker.uri()).await;
    let home = broker.service_dir.join("python-home");
    common::aiida::python_client_both_ways(&comm, &broker.socket_uri(), &home).await;
    comm.close().await.unwrap();
}

/// Every distinct body handled, and how many were handled more than once.
fn tally(handled: &Seen<u64>) -> (usize, usize) {
    let handled = handled.lock().unwrap();
    let distinct: HashSet<u64> = handled.iter().copied().collect();
    (distinct.len(), handled.len() - distinct.len())
}

/// The bodies handled more than once.
fn twice_over(handled: &Seen<u64>) -> Vec<u64> {
    let mut counts = std::collections::HashMap::<u64, usize>::new();
    for body in handled.lock().unwrap().iter() {
        *counts.entry(*body).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(b, _)| b)
        .collect()
}

/// Waits until `tasks` distinct tasks are handled and the broker's storage is empty; the
/// distinct tasks handled, and how many ran more than once.
async fn handled_once_each(
    broker: &BrokerProcess,
    handled: &Seen<u64>,
    tasks: u64,
) -> (usize, usize) {
    eventually(
        Duration::from_secs(60),
        "every confirmed task handled",
        || tally(handled).0 as u64 == tasks,
    )
    .await;
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
    tally(handled)
}

#[actix_rt::test]
async fn a_broker_killed_with_1000_confirmed_tasks_loses_none_and_every_client_resumes() {
    const TASKS: u64 = 1_000;
    let mut broker = BrokerProcess::kiwimq(30).await;
    let worker = Settings::new(broker.uri())
        .with_task_prefetch(50)
        .connect()
        .await
        .unwrap();
    let sender = connect(&broker.socket_uri()).await;
    let handled = seen::<u64>();
    let record = handled.clone();
    worker
        .add_task_subscriber(move |task: Task<u64, ()>| {
            let record = record.clone();
            async move {
                // A little work, so that many tasks are in flight when the broker dies.
                tokio::time::sleep(Duration::from_millis(2)).await;
                record.lock().unwrap().push(task.body);
                Ok(())
            }
        })
        .await
        .unwrap();
    worker
        .add_rpc_subscriber(Some("worker"), |rpc: Rpc<u64>| async move {
            Ok::<_, HandlerError>(rpc.body + 1)
        })
        .await
        .unwrap();
    // Every send returns once the broker has the task on disk.
    let sender_ref = &sender;
    let sends = (0..TASKS).map(|n| async move { sender_ref.task_send_no_reply(&n).await });
    for sent in futures::future::join_all(sends).await {
        sent.expect("confirmed");
    }
    eventually(SOON, "a third of the tasks handled", || {
        count(&handled) as u64 >= TASKS / 3
    })
    .await;
    let before = tally(&handled).0;
    broker.kill().await;
    let at_kill = broker.stored_tasks();
    broker.restart().await;
    let (distinct, twice) = handled_once_each(&broker, &handled, TASKS).await;
    println!(
        "kiwimq broker kill -9: {TASKS} confirmed, {before} handled before the kill, \
         {at_kill:?} (pending, processing) on disk at it; after the restart {distinct} handled, \
         {} lost, {twice} run twice",
        TASKS as usize - distinct
    );
    assert_eq!(
        twice,
        0,
        "a task ran twice ({:?}); the broker's log is in {}",
        twice_over(&handled),
        broker.service_dir.display()
    );
    // Every client goes on without being restarted: tasks, and an RPC both ways.
    sender.task_send_no_reply(&TASKS).await.unwrap();
    eventually(SOON, "a task after the restart", || {
        tally(&handled).0 as u64 == TASKS + 1
    })
    .await;
    let answer: u64 = sender
        .rpc_send("worker", &1u64)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(answer, 2);
    sender.close().await.unwrap();
    worker.close().await.unwrap();
}

/// A task is confirmed once it is in the broker's journal; its file follows. A broker killed
/// between the two writes the file from the journal at its next start.
#[actix_rt::test]
async fn a_broker_killed_right_after_its_confirms_keeps_every_task_of_its_journal() {
    const TASKS: u64 = 3_000;
    let mut broker = BrokerProcess::kiwimq(30).await;
    let sender = connect(&broker.socket_uri()).await;
    let sender_ref = &sender;
    let sends = (0..TASKS).map(|n| async move { sender_ref.task_send_no_reply(&n).await });
    for sent in futures::future::join_all(sends).await {
        sent.expect("confirmed");
    }
    broker.kill().await;
    // Task files only: a temporary one being written does not count.
    let files = std::fs::read_dir(broker.service_dir.join("storage/tasks/pending"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
        })
        .count();
    broker.restart().await;
    let worker = connect(&broker.uri()).await;
    let handled = common::recorded_tasks::<u64>(&worker).await;
    let (distinct, twice) = handled_once_each(&broker, &handled, TASKS).await;
    println!(
        "kiwimq broker kill -9 right after {TASKS} confirms: {files} task files in pending/ at \
         the kill, {} only in the journal; after the restart {distinct} handled, {} lost, \
         {twice} run twice",
        TASKS as usize - files.min(TASKS as usize),
        TASKS as usize - distinct
    );
    assert_eq!(twice, 0, "a task ran twice");
    sender.close().await.unwrap();
    worker.close().await.unwrap();
}

#[actix_rt::test]
async fn the_tasks_of_a_killed_worker_run_elsewhere() {
    const TASKS: u64 = 20;
    let broker = BrokerProcess::kiwimq(2).await;
    let home = broker.service_dir.join("python-home");
    // AiiDA's Python worker holds up to 5 tasks and would finish each after an hour.
    let mut python = PythonPeer::start(
        "work",
        &endpoint(&broker.socket_uri()),
        &["3600", "5"],
        &home,
    );
    python.expect("ready").await;
    let sender = connect(&broker.uri()).await;
    for n in 0..5u64 {
        sender.task_send_no_reply(&n).await.unwrap();
    }
    let mut held = HashSet::new();
    for _ in 0..5 {
        held.insert(python.expect("task").await[0].as_u64().unwrap());
    }
    python.signal("-KILL");
    let worker = connect(&broker.uri()).await;
    let handled = common::recorded_tasks::<u64>(&worker).await;
    for n in 5..TASKS {
        sender.task_send_no_reply(&n).await.unwrap();
    }
    eventually(SOON, "every task handled by the worker left", || {
        tally(&handled).0 as u64 == TASKS
    })
    .await;
    println!(
        "kiwimq broker, worker kill -9: it held {} tasks; all {TASKS} ran on the other worker",
        held.len()
    );
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
    sender.close().await.unwrap();
    worker.close().await.unwrap();
}

#[actix_rt::test]
async fn a_worker_stalled_12_seconds_runs_no_task_twice() {
    const TASKS: u64 = 20;
    let broker = BrokerProcess::kiwimq(30).await;
    let home = broker.service_dir.join("python-home");
    // AiiDA's Python worker finishes each task 3 s after it comes, 5 at a time.
    let mut python = PythonPeer::start("work", &endpoint(&broker.socket_uri()), &["3", "5"], &home);
    python.expect("ready").await;
    let sender = connect(&broker.uri()).await;
    let sender_ref = &sender;
    let sends = (0..5u64).map(|n| async move { sender_ref.task_send_no_reply(&n).await });
    for sent in futures::future::join_all(sends).await {
        sent.unwrap();
    }
    let mut stalled = HashSet::new();
    for _ in 0..5 {
        stalled.insert(python.expect("task").await[0].as_u64().unwrap());
    }
    let done_before = python.printed("done").await;
    assert!(done_before < 5, "the worker finished before it could stall");
    python.signal("-STOP");
    let worker = connect(&broker.uri()).await;
    let handled = common::recorded_tasks::<u64>(&worker).await;
    for n in 5..TASKS {
        sender.task_send_no_reply(&n).await.unwrap();
    }
    eventually(SOON, "the other tasks handled by the other worker", || {
        tally(&handled).0 as u64 == TASKS - 5
    })
    .await;
    // The stall itself: 12 s, twice the 6 s after which the broker's heartbeat drops the
    // connection (AiiDA's broker requeues the stalled worker's tasks then).
    tokio::time::sleep(Duration::from_secs(12)).await;
    python.signal("-CONT");
    let mut finished = HashSet::new();
    while finished.len() < stalled.len() {
        finished.insert(python.expect("done").await[0].as_u64().unwrap());
    }
    assert_eq!(finished, stalled);
    // Its acks are taken: the storage empties, and nothing it held ran elsewhere.
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
    let elsewhere: HashSet<u64> = handled.lock().unwrap().iter().copied().collect();
    let twice = elsewhere.intersection(&stalled).count();
    println!(
        "kiwimq broker, worker SIGSTOP 12 s: it held {} tasks ({} unfinished at the stall) and \
         finished them after SIGCONT; {twice} ran twice",
        stalled.len(),
        stalled.len() - done_before
    );
    assert_eq!(twice, 0);
    assert_eq!(tally(&handled), ((TASKS - 5) as usize, 0));
    python.finish().await;
    sender.close().await.unwrap();
    worker.close().await.unwrap();
}

/// The dashboard on a ZeroMQ profile served by kiwimq's broker: the task queue's counts
/// (from `broker.status`), processes by pk from their state broadcasts, and the workers'
/// presence, which kiwimq's broker carries in message types of its own.
#[actix_rt::test]
async fn the_dashboard_shows_a_zeromq_profile() {
    use kiwimq::BroadcastOptions;
    use kiwimq::dashboard::{Dashboard, DashboardOptions, Overview};

    let dir = scratch("kiwimq-dashboard");
    let broker = Broker::new(&dir).start().unwrap();
    let comm = Settings::new(broker.uri())
        .with_presence_interval(None)
        .connect()
        .await
        .unwrap();
    let options = DashboardOptions::default().with_sample_every(Duration::from_millis(200));
    let dashboard = Dashboard::start(&comm, options).await.unwrap();
    let queue = comm.default_task_queue().name().to_owned();
    let until = async |what: &str, condition: &dyn Fn(&Overview) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let overview = dashboard.overview();
            if condition(&overview) {
                return overview;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}: {overview:?}"
            );
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let ready = |overview: &Overview| {
        overview
            .queues
            .iter()
            .find(|q| q.name == queue)
            .and_then(|q| q.ready)
    };
    for n in 0..3u64 {
        comm.task_send_no_reply(&n).await.unwrap();
    }
    until("three tasks waiting", &|o| ready(o) == Some(3)).await;
    comm.broadcast_send(
        &serde_json::Value::Null,
        BroadcastOptions::subject("state_changed.running.finished").with_sender(12),
    )
    .await
    .unwrap();
    let overview = until("process 12", &|o| {
        o.processes
            .iter()
            .any(|p| p.pk == "12" && p.state == "finished")
    })
    .await;
    assert!(overview.presence.is_none(), "{:?}", overview.presence);
    let worker = Settings::new(broker.uri())
        .with_presence_interval(Some(Duration::from_millis(200)))
        .connect()
        .await
        .unwrap();
    worker
        .add_task_subscriber(|task: Task<u64>| async move { Ok::<_, HandlerError>(task.body) })
        .await
        .unwrap();
    until("the queue drained", &|o| ready(o) == Some(0)).await;
    let overview = until("the worker and its three tasks", &|o| {
        o.workers.iter().any(|m| m.presence.counts.handled == 3)
    })
    .await;
    assert_eq!(overview.workers.len(), 1, "{:?}", overview.workers);
    assert_eq!(overview.workers[0].presence.backend, "zmq");
    // Its last word goes through the broker too.
    worker.close().await.unwrap();
    until("the worker's last word", &|o| {
        o.workers.iter().all(|m| m.presence.closing)
    })
    .await;
    drop(dashboard);
    comm.close().await.unwrap();
    broker.stop().unwrap();
}

/// A task's id names its file: one that cannot (a path, say) is refused with an error, and
/// is neither stored nor in the way of the tasks read with it.
#[test]
fn a_task_whose_id_cannot_name_a_file_is_refused_and_the_others_are_stored() {
    let dir = scratch("kiwimq-broker-ids");
    let broker = Broker::new(&dir).start().unwrap();
    let context = zmq::Context::new();
    let client = context.socket(zmq::DEALER).unwrap();
    client.set_identity(b"client-bad-ids").unwrap();
    client.set_rcvtimeo(10_000).unwrap();
    let endpoint = broker.socket_uri().replacen("zmq+ipc://", "ipc://", 1);
    client.connect(&endpoint).unwrap();
    let task = |id: &str| {
        serde_json::json!({"type": "task", "id": id, "sender": "raw", "body": {"n": 1}, "no_reply": false})
            .to_string()
    };
    for id in ["../../escaped", "good-1"] {
        client
            .send_multipart([&b""[..], task(id).as_bytes()], 0)
            .unwrap();
    }
    let mut answers = std::collections::HashMap::new();
    while answers.len() < 2 {
        let frames = client.recv_multipart(0).expect("an answer within 10 s");
        let answer: serde_json::Value = serde_json::from_slice(frames.last().unwrap()).unwrap();
        if answer["type"] == "task_response" {
            answers.insert(answer["task_id"].as_str().unwrap().to_owned(), answer);
        }
    }
    let refused = &answers["../../escaped"];
    assert_eq!(refused["result"], false);
    assert!(
        refused["error"].as_str().unwrap().contains("task id"),
        "{refused}"
    );
    assert_eq!(answers["good-1"]["result"], true);
    assert!(answers["good-1"]["error"].is_null());
    let stored = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".json"))
            .collect::<Vec<_>>()
    };
    let pending = dir.join("storage/tasks/pending");
    let deadline = std::time::Instant::now() + SOON;
    while stored(&pending).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let names = stored(&pending);
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].ends_with("_good-1.json"), "{names:?}");
    assert!(!dir.join("escaped").exists() && !dir.join("storage/escaped").exists());
    broker.stop().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// The broker writes down who holds a task before it hands it over, so a restarted broker
/// takes it back as that client's; but a hand-over cut short by a `kill -9` never reached
/// the client. A kiwimq client says on its reconnect which tasks it holds; the others it
/// was thought to hold go back to the queue at once instead of waiting for ever.
#[actix_rt::test]
async fn tasks_a_client_never_got_before_a_broker_restart_are_requeued_when_it_says_so() {
    let mut broker = BrokerProcess::kiwimq(30).await;
    let worker = RawWorker::connect(&broker, "client-raw-holder");
    worker.subscribe();
    let sender = connect(&broker.uri()).await;
    for n in 0..3u64 {
        sender.task_send_no_reply(&n).await.unwrap();
    }
    let handed: Vec<String> = (0..3)
        .map(|_| worker.next_task().expect("a task"))
        .collect();
    broker.kill().await;
    broker.restart().await;
    // Back, it holds the first only: the other two never reached it.
    worker.subscribe();
    worker.send(
        serde_json::json!({"type": "kiwimq_holding", "id": "h", "sender": "raw",
        "task_ids": [handed[0]]}),
    );
    let mut again: Vec<String> = (0..2)
        .map(|_| worker.next_task().expect("a requeued task within 10 s"))
        .collect();
    again.sort();
    let mut expected = handed[1..].to_vec();
    expected.sort();
    assert_eq!(again, expected, "the tasks it did not hold, and only those");
    worker.send(
        serde_json::json!({"type": "task_ack", "id": "a", "sender": "raw", "task_id": handed[0]}),
    );
    for task_id in &again {
        worker.send(
            serde_json::json!({"type": "task_ack", "id": "a", "sender": "raw", "task_id": task_id}),
        );
    }
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
    sender.close().await.unwrap();
}

/// The client's side of the same: a kiwimq client tells the restarted broker which tasks it
/// holds. Its broker's state file is written as a `kill -9` during a hand-over leaves it: a
/// task assigned to the client that never reached it.
#[actix_rt::test]
async fn a_kiwimq_client_back_after_a_broker_restart_gets_a_task_it_never_received() {
    let mut broker = BrokerProcess::kiwimq(30).await;
    let worker = connect(&broker.uri()).await;
    let handled = common::recorded_tasks::<u64>(&worker).await;
    broker.restart_after_a_lost_hand_over().await;
    // Back (libzmq reconnects by itself), it holds nothing: the task comes to it.
    eventually(
        Duration::from_secs(10),
        "the task it never received handled",
        || count(&handled) == 1,
    )
    .await;
    assert_eq!(handled.lock().unwrap()[0], 7);
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
    worker.close().await.unwrap();
}
