//! kiwimq's broker's bookkeeping under what clients and crashes leave it: a task id seen
//! twice, two brokers started on one directory, a stale pid file, a settle replayed for an
//! earlier delivery, an answer from a client an RPC did not go to, hand-overs cut short by
//! a `kill -9`, and `kill -9` again and again under load. The fault tests print their
//! figures (sent, confirmed, run, run twice, lost).

mod common;
#[path = "common/raw_zmq.rs"]
mod raw_zmq;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::aiida::{BrokerProcess, scratch};
use common::{SOON, eventually, seen};
use kiwimq::{Settings, Task};
use raw_zmq::RawWorker;

const TEN: Duration = Duration::from_secs(10);

/// A task sent twice under one id — as a client resends a task whose confirm a `kill -9`
/// took — is confirmed both times and stored once; the broker restarted after it serves
/// (it used to die at every start on the id found twice).
#[actix_rt::test]
async fn a_task_sent_twice_under_one_id_is_stored_once_and_the_broker_restarts_after_it() {
    let mut broker = BrokerProcess::kiwimq(30).await;
    let sender = RawWorker::connect(&broker, "client-sender");
    let worker = RawWorker::connect(&broker, "client-holder");
    worker.subscribe();
    let body = serde_json::json!({"task": "continue", "args": {"pid": 8}});
    sender.send_task("same-id", body.clone());
    let first = sender.next_of("task_response", TEN).expect("a confirm");
    assert_eq!(first["result"], true, "{first}");
    let handed = worker.next_handed(TEN).expect("the task");
    // Sent again while it is handed out: confirmed again, not stored again.
    sender.send_task("same-id", body.clone());
    let again = sender
        .next_of("task_response", TEN)
        .expect("a second confirm");
    assert_eq!(again["result"], true, "{again}");
    assert!(
        worker.next_handed(Duration::from_secs(1)).is_none(),
        "the task went out twice"
    );
    broker.kill().await;
    broker.restart().await;
    sender.send_task("same-id", body);
    assert_eq!(
        sender.next_of("task_response", TEN).unwrap()["result"],
        true
    );
    // The holder settles the delivery it got; the queue is empty then.
    worker.settle(&handed.id, handed.delivery, true);
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
    assert!(
        worker.next_handed(Duration::from_secs(1)).is_none(),
        "a second copy ran after the restart"
    );
}

/// Another task under an id a task holds is refused with an error: neither stored nor
/// taken for the first.
#[actix_rt::test]
async fn another_task_under_a_taken_id_is_refused() {
    let broker = BrokerProcess::kiwimq(30).await;
    let first = RawWorker::connect(&broker, "client-first");
    let second = RawWorker::connect(&broker, "client-second");
    first.send_task("taken", serde_json::json!({"n": 1}));
    assert_eq!(first.next_of("task_response", TEN).unwrap()["result"], true);
    second.send_task("taken", serde_json::json!({"n": 2}));
    let refused = second.next_of("task_response", TEN).expect("an answer");
    assert_eq!(refused["result"], false, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("task id"),
        "{refused}"
    );
    let worker = RawWorker::connect(&broker, "client-worker");
    worker.subscribe();
    let handed = worker.next_handed(TEN).unwrap();
    assert_eq!(handed.body, serde_json::json!({"n": 1}));
    worker.settle(&handed.id, handed.delivery, true);
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
}

/// Two `kiwimq broker`s started together on one directory: one serves, the other refuses
/// and exits, every time.
#[actix_rt::test]
async fn of_two_brokers_started_together_on_one_directory_one_serves() {
    for round in 0..5 {
        let dir = scratch("kiwimq-two-brokers");
        let start = || {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_kiwimq"))
                .args(["broker", "--service-dir"])
                .arg(&dir)
                .arg("--log-file-path")
                .arg(dir.join("broker.log"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap()
        };
        let mut brokers = [start(), start()];
        // One exits with its refusal; the other serves on.
        let deadline = Instant::now() + TEN;
        let refused = loop {
            let exited: Vec<usize> = (0..2)
                .filter(|&i| brokers[i].try_wait().unwrap().is_some())
                .collect();
            if !exited.is_empty() {
                assert_eq!(exited.len(), 1, "round {round}: both exited");
                break exited[0];
            }
            assert!(Instant::now() < deadline, "round {round}: both still serve");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let output = stderr_text(&mut brokers[refused]).await;
        assert!(
            output.contains("another broker serves"),
            "round {round}: {output}"
        );
        let serving = &mut brokers[1 - refused];
        let pid = serving.id().unwrap();
        eventually(SOON, "the serving broker's pid file", || {
            std::fs::read_to_string(dir.join("broker.pid"))
                .is_ok_and(|text| text.trim() == format!("aiida-zeromq-broker {pid}"))
        })
        .await;
        assert!(serving.try_wait().unwrap().is_none(), "round {round}");
        // Its socket is there and answers.
        let comm = Settings::new(format!("zmq://{}", dir.display()))
            .connect()
            .await
            .expect("the serving broker answers");
        comm.close().await.unwrap();
        serving.start_kill().unwrap();
        let _ = serving.wait().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Waits for a child, and reads its standard error to its end.
async fn stderr_text(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut text).await;
    }
    let _ = child.wait().await;
    text
}

/// A `broker.pid` left by a crash that names a live process of another kind (pid reuse, a
/// container's pid 1) does not keep the broker from starting.
#[actix_rt::test]
async fn a_stale_pid_file_naming_another_live_process_does_not_block_a_start() {
    let dir = scratch("kiwimq-stale-pid");
    let mut other = tokio::process::Command::new("sleep")
        .arg("600")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    std::fs::write(
        dir.join("broker.pid"),
        format!("aiida-zeromq-broker {}", other.id().unwrap()),
    )
    .unwrap();
    let broker = kiwimq::broker::Broker::new(&dir)
        .start()
        .expect("starts over a stale pid file");
    broker.stop().unwrap();
    other.start_kill().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A settle sent again after a reconnect names its delivery: it never settles a later
/// delivery of the same task (it used to requeue a task its client was running).
#[actix_rt::test]
async fn a_settle_replayed_for_an_earlier_delivery_leaves_the_task_held_now() {
    let broker = BrokerProcess::kiwimq(30).await;
    let sender = RawWorker::connect(&broker, "client-sender");
    let worker = RawWorker::connect(&broker, "client-worker");
    worker.subscribe_with("raw-tasks", 1);
    sender.send_task("once", serde_json::json!(1));
    let first = worker.next_handed(TEN).expect("the task");
    let first_delivery = first.delivery.expect("kiwimq's broker numbers hand-overs");
    worker.settle("once", Some(first_delivery), false);
    let second = worker.next_handed(TEN).expect("the task again");
    assert_ne!(second.delivery, first.delivery);
    // The first delivery's requeue, replayed: ignored.
    worker.settle("once", Some(first_delivery), false);
    assert!(
        worker.next_handed(Duration::from_secs(1)).is_none(),
        "a replayed settle requeued the task held now"
    );
    worker.settle("once", second.delivery, true);
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
}

/// Only the client an RPC went to can answer it.
#[actix_rt::test]
async fn an_rpc_answer_from_a_client_the_rpc_did_not_go_to_is_refused() {
    let broker = BrokerProcess::kiwimq(30).await;
    let server = RawWorker::connect(&broker, "client-server");
    let intruder = RawWorker::connect(&broker, "client-intruder");
    let caller = RawWorker::connect(&broker, "client-caller");
    server.send(
        serde_json::json!({"type": "subscribe_rpc", "id": "s", "sender": "raw",
        "identifier": "42", "prefetch_count": null}),
    );
    intruder.send(
        serde_json::json!({"type": "subscribe_rpc", "id": "s", "sender": "raw",
        "identifier": "other", "prefetch_count": null}),
    );
    let deadline = Instant::now() + TEN;
    let request = loop {
        caller.send(
            serde_json::json!({"type": "rpc", "id": "call-1", "sender": "raw",
            "recipient": "42", "body": {"intent": "status"}}),
        );
        if let Some(request) = server.next_of("rpc", Duration::from_millis(300)) {
            break request;
        }
        // Not subscribed yet: the caller was told so.
        let _ = caller.next_of("rpc_response", Duration::from_millis(10));
        assert!(
            Instant::now() < deadline,
            "the RPC never reached its server"
        );
    };
    let rpc_id = request["id"].as_str().unwrap().to_owned();
    // Drain the "not found" answers to the earlier tries.
    while caller
        .next_of("rpc_response", Duration::from_millis(200))
        .is_some()
    {}
    intruder.send(
        serde_json::json!({"type": "rpc_response", "id": "x", "sender": "raw",
        "rpc_id": rpc_id, "result": "forged", "error": null}),
    );
    server.send(
        serde_json::json!({"type": "rpc_response", "id": "y", "sender": "raw",
        "rpc_id": rpc_id, "result": "real", "error": null}),
    );
    let answer = caller.next_of("rpc_response", TEN).expect("the answer");
    assert_eq!(answer["result"], "real", "{answer}");
}

/// A hand-over made as the broker was killed may never have left it. At the restart such a
/// task is leased to its holder: a client that serves the RPC of the process the task
/// continues (as an AiiDA worker running it does) claims it; one that does not gets it
/// back in the queue once the lease ends — it is not stuck until the worker restarts.
#[actix_rt::test]
async fn hand_overs_cut_short_by_a_kill_are_leased_and_come_back_unless_claimed() {
    let mut broker = BrokerProcess::kiwimq_leased(60, 2).await;
    let sender = RawWorker::connect(&broker, "client-sender");
    let worker = RawWorker::connect(&broker, "client-aiida-like");
    worker.subscribe();
    let continuing = |pid: u64| serde_json::json!({"task": "continue", "args": {"pid": pid, "nowait": false, "tag": null}});
    sender.send_task("running", continuing(7));
    sender.send_task("lost", continuing(8));
    let mut handed: HashMap<String, raw_zmq::Handed> = HashMap::new();
    while handed.len() < 2 {
        let task = worker.next_handed(TEN).expect("both tasks");
        handed.insert(task.id.clone(), task);
    }
    // Killed at once: both hand-overs are within the last second of its life.
    broker.kill().await;
    broker.restart().await;
    // The worker runs process 7 (it serves its RPC), and never got process 8's task.
    worker.send(
        serde_json::json!({"type": "subscribe_rpc", "id": "s", "sender": "raw",
        "identifier": "7", "prefetch_count": null}),
    );
    let started = Instant::now();
    let back = worker.next_handed(TEN).expect("the lost task comes back");
    assert_eq!(back.id, "lost");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "given back before its lease ended"
    );
    assert!(
        worker.next_handed(Duration::from_secs(3)).is_none(),
        "the claimed task came back too"
    );
    worker.settle("running", handed["running"].delivery, true);
    worker.settle("lost", back.delivery, true);
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
}

/// A kiwimq client that knows the broker only by its socket (`zmq+ipc://`, as
/// `RunningBroker::socket_uri` gives it) says too which tasks it holds after a restart.
#[actix_rt::test]
async fn a_kiwimq_client_on_the_socket_alone_says_what_it_holds_after_a_restart() {
    let mut broker = BrokerProcess::kiwimq(60).await;
    let worker = Settings::new(broker.socket_uri())
        .connect()
        .await
        .expect("connects by the socket");
    let handled = common::recorded_tasks::<u64>(&worker).await;
    broker.restart_after_a_lost_hand_over().await;
    eventually(TEN, "the task it never received handled", || {
        common::count(&handled) == 1
    })
    .await;
    worker.close().await.unwrap();
}

/// `kill -9` of the broker ten times while kiwimq clients send and work: every task
/// confirmed runs, none is lost, and none runs twice.
#[actix_rt::test]
async fn ten_kills_of_the_broker_under_load_lose_no_confirmed_task() {
    const ROUNDS: usize = 10;
    const PER_ROUND: u64 = 200;
    let mut broker = BrokerProcess::kiwimq(60).await;
    let worker = Settings::new(broker.uri())
        .with_task_prefetch(20)
        .connect()
        .await
        .unwrap();
    let handled = seen::<u64>();
    let record = handled.clone();
    worker
        .add_task_subscriber(move |task: Task<u64, ()>| {
            let record = record.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                record.lock().unwrap().push(task.body);
                Ok(())
            }
        })
        .await
        .unwrap();
    let sender = Settings::new(broker.uri())
        .with_send_timeout(Duration::from_secs(60))
        .connect()
        .await
        .unwrap();
    let mut confirmed = Vec::new();
    let mut failed = 0;
    for round in 0..ROUNDS as u64 {
        let sends = (0..PER_ROUND).map(|n| {
            let sender = sender.clone();
            let body = round * PER_ROUND + n;
            async move { (body, sender.task_send_no_reply(&body).await) }
        });
        let sending = tokio::spawn(futures::future::join_all(sends));
        // Killed while sends and work are in flight.
        tokio::time::sleep(Duration::from_millis(50 + round * 15)).await;
        broker.kill().await;
        broker.restart().await;
        for (body, sent) in sending.await.unwrap() {
            match sent {
                Ok(()) => confirmed.push(body),
                Err(_) => failed += 1,
            }
        }
    }
    let distinct = |handled: &[u64]| {
        handled
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let missing = {
            let handled = handled.lock().unwrap();
            confirmed
                .iter()
                .filter(|body| !handled.contains(body))
                .count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} confirmed tasks not handled within 120 s; the broker holds {:?} \
             (pending, processing); its directory: {}",
            broker.stored_tasks(),
            broker.service_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
    let handled = handled.lock().unwrap().clone();
    let twice = handled.len() - distinct(&handled);
    let lost = confirmed.iter().filter(|b| !handled.contains(b)).count();
    println!(
        "kiwimq broker, {ROUNDS} kill -9 under load: {} sent, {} confirmed, {failed} refused or \
         timed out (not confirmed), {} run, {twice} run twice, {lost} lost",
        ROUNDS as u64 * PER_ROUND,
        confirmed.len(),
        distinct(&handled),
    );
    assert_eq!(lost, 0, "a confirmed task was lost");
    assert_eq!(twice, 0, "a task ran twice");
    sender.close().await.unwrap();
    worker.close().await.unwrap();
}

/// The broker's disk fills up (a small tmpfs): new tasks are refused with a clear error,
/// every task confirmed before runs once the disk has room again, and none is lost.
#[actix_rt::test]
async fn a_full_disk_refuses_new_tasks_clearly_and_loses_none_it_confirmed() {
    let mount = scratch("kiwimq-full-disk");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&mount)
        .status()
        .expect("mount runs");
    assert!(
        mounted.success(),
        "this test needs to mount a small tmpfs (run as root): {mounted}"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount.clone());
    // Room the test gives back later, as an operator would.
    let filler = mount.join("filler");
    std::fs::write(&filler, vec![7u8; 2 << 20]).unwrap();
    let broker = BrokerProcess::kiwimq_at(mount.join("service"), 60).await;
    let sender = Settings::new(broker.uri())
        .with_send_timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap();
    let body = "x".repeat(32 << 10);
    let mut confirmed = 0u64;
    let refusal = loop {
        match sender.task_send_no_reply(&(confirmed, body.clone())).await {
            Ok(()) => confirmed += 1,
            Err(error) => break error,
        }
        assert!(confirmed < 10_000, "the disk never filled");
    };
    let text = refusal.to_string();
    println!("full disk: {confirmed} confirmed, then refused: {text}");
    assert!(
        text.contains("cannot store the task") && text.contains("space"),
        "a clear refusal: {text}"
    );
    std::fs::remove_file(&filler).unwrap();
    let worker = Settings::new(broker.uri())
        .with_task_prefetch(10)
        .connect()
        .await
        .unwrap();
    let handled = seen::<u64>();
    let record = handled.clone();
    worker
        .add_task_subscriber(move |task: Task<(u64, String), ()>| {
            let record = record.clone();
            async move {
                record.lock().unwrap().push(task.body.0);
                Ok(())
            }
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "every confirmed task handled",
        || {
            let handled = handled.lock().unwrap();
            (0..confirmed).all(|n| handled.contains(&n))
        },
    )
    .await;
    // And it takes tasks again.
    sender
        .task_send_no_reply(&(confirmed, String::new()))
        .await
        .unwrap();
    eventually(SOON, "a task after the disk has room", || {
        handled.lock().unwrap().contains(&confirmed)
    })
    .await;
    let handled = handled.lock().unwrap().clone();
    let distinct = handled
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len();
    println!(
        "full disk: {confirmed} confirmed, {} handled, {} lost, {} run twice",
        distinct - 1,
        (0..confirmed).filter(|n| !handled.contains(n)).count(),
        handled.len() - distinct
    );
    assert_eq!(handled.len(), distinct, "a task ran twice");
    sender.close().await.unwrap();
    worker.close().await.unwrap();
    drop(broker);
}

/// A task's result is passed back only from the client the task was handed to.
#[actix_rt::test]
async fn a_result_from_a_client_the_task_was_not_handed_to_is_refused() {
    let broker = BrokerProcess::kiwimq(30).await;
    let sender = RawWorker::connect(&broker, "client-sender");
    let worker = RawWorker::connect(&broker, "client-worker");
    let intruder = RawWorker::connect(&broker, "client-intruder");
    worker.subscribe();
    sender.send(
        serde_json::json!({"type": "task", "id": "wants-result", "sender": "raw",
        "body": 1, "no_reply": false, "results": true}),
    );
    assert_eq!(
        sender.next_of("task_response", TEN).unwrap()["result"],
        true
    );
    let handed = worker.next_handed(TEN).expect("the task");
    let result = |value: &str| {
        serde_json::json!({"type": "task_response", "id": "x", "sender": "raw",
            "task_id": "wants-result", "result": value, "error": null})
    };
    intruder.send(result("forged"));
    worker.settle(&handed.id, handed.delivery, true);
    worker.send(result("real"));
    let answer = sender.next_of("task_response", TEN).expect("the result");
    assert_eq!(answer["result"], "real", "{answer}");
}

/// However its service directory is spelled (`svc`, `svc/./`, through a symlink), a broker
/// serves one socket at one path.
#[test]
fn one_service_directory_however_spelled_has_one_socket() {
    let dir = scratch("kiwimq-spelled");
    let link = dir.with_extension("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    let mut sockets = Vec::new();
    for spelled in [dir.clone(), dir.join("."), link.clone()] {
        let broker = kiwimq::broker::Broker::new(&spelled).start().unwrap();
        sockets.push(broker.socket_uri());
        broker.stop().unwrap();
    }
    assert!(sockets.iter().all(|s| *s == sockets[0]), "{sockets:?}");
    let _ = std::fs::remove_file(link);
    let _ = std::fs::remove_dir_all(dir);
}
