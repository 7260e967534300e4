//! The `zmq://` backend against AiiDA's own ZeroMQ broker (aiida-core 2.9.4), started for
//! each test: every message type between kiwimq communicators through it, what the
//! protocol lacks refused clearly, and a broker crash followed without a restart of the
//! clients.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::aiida::AiidaBroker;
use common::{SOON, count, eventually, seen};
use kiwimq::{
    Broadcast, BroadcastFilter, BroadcastOptions, Codec, ErrorKind, HandlerError, Rpc, Settings,
    Task,
};

async fn connect(uri: &str) -> kiwimq::Communicator {
    Settings::new(uri)
        .connect()
        .await
        .expect("connects to AiiDA's broker")
}

#[actix_rt::test]
async fn tasks_go_through_aiidas_broker_once_each() {
    let broker = AiidaBroker::start().await;
    let worker = connect(&broker.uri()).await;
    let sender = connect(&broker.socket_uri()).await;
    let tasks = common::recorded_tasks::<u64>(&worker).await;
    for n in 0..50u64 {
        sender.task_send_no_reply(&n).await.unwrap();
    }
    eventually(SOON, "all 50 tasks handled", || count(&tasks) == 50).await;
    let mut handled = tasks.lock().unwrap().clone();
    handled.sort_unstable();
    assert_eq!(handled, (0..50).collect::<Vec<_>>());
    // Acked: nothing is left in the broker's storage.
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
    sender.close().await.unwrap();
    worker.close().await.unwrap();
}

#[actix_rt::test]
async fn a_task_sent_for_its_result_runs_and_says_the_result_cannot_come_back() {
    let broker = AiidaBroker::start().await;
    let comm = connect(&broker.uri()).await;
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = ran.clone();
    comm.add_task_subscriber(move |task: Task<u64>| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(task.body * 2)
        }
    })
    .await
    .unwrap();
    let reply = comm.task_send::<_, u64>(&21u64).await.unwrap();
    let error = reply.await.unwrap_err();
    assert!(
        error.to_string().contains("does not return task results"),
        "{error}"
    );
    eventually(SOON, "the task ran anyway", || {
        ran.load(Ordering::SeqCst) == 1
    })
    .await;
    comm.close().await.unwrap();
}

#[actix_rt::test]
async fn rpc_and_filtered_broadcasts_go_through_aiidas_broker() {
    let broker = AiidaBroker::start().await;
    let server = connect(&broker.uri()).await;
    let client = connect(&broker.uri()).await;
    server
        .add_rpc_subscriber(Some("8"), |rpc: Rpc<serde_json::Value>| async move {
            if rpc.body["intent"] == "fail" {
                return Err(HandlerError::failed("asked to fail"));
            }
            Ok::<_, HandlerError>(serde_json::json!({"echo": rpc.body}))
        })
        .await
        .unwrap();
    let body = serde_json::json!({"intent": "status", "message": null});
    let answer: serde_json::Value = client.rpc_send("8", &body).await.unwrap().await.unwrap();
    assert_eq!(answer, serde_json::json!({"echo": body}));
    let failed = client
        .rpc_send::<_, serde_json::Value>("8", &serde_json::json!({"intent": "fail"}))
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert!(failed.to_string().contains("asked to fail"), "{failed}");
    let unknown = client
        .rpc_send::<_, serde_json::Value>("nobody", &1)
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert!(
        unknown.to_string().contains("Recipient not found: nobody"),
        "{unknown}"
    );

    // Broadcasts reach a communicator with broadcast subscribers only, filtered by subject.
    let listener = connect(&broker.uri()).await;
    let heard = seen::<String>();
    let record = heard.clone();
    listener
        .add_broadcast_subscriber(
            BroadcastFilter::new().subject("state_changed.*"),
            move |broadcast: Broadcast<String>| {
                let record = record.clone();
                async move {
                    record.lock().unwrap().push(broadcast.body);
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
    for subject in ["other.thing", "state_changed.running.waiting"] {
        client
            .broadcast_send(subject, BroadcastOptions::subject(subject))
            .await
            .unwrap();
    }
    eventually(SOON, "the matching broadcast", || count(&heard) == 1).await;
    assert_eq!(heard.lock().unwrap()[0], "state_changed.running.waiting");
    for comm in [listener, client, server] {
        comm.close().await.unwrap();
    }
}

#[actix_rt::test]
async fn what_the_protocol_lacks_is_refused_clearly() {
    let broker = AiidaBroker::start().await;
    let comm = connect(&broker.uri()).await;
    let named = comm.task_queue("another").task_send_no_reply(&1).await;
    let error = named.unwrap_err();
    assert!(matches!(error.kind(), ErrorKind::Refused(_)), "{error}");
    assert!(error.to_string().contains("one task queue"), "{error}");
    let pulled = comm
        .next_task::<u64>(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(pulled.to_string().contains("pull mode"), "{pulled}");
    // The protocol has no request for a queue's counts: zmq:///SERVICE_DIR reads the ones
    // AiiDA's broker writes to broker.status; a bare socket has none to read.
    let queue = comm.default_task_queue();
    let stats = common::retry(common::SOON, "broker.status", || queue.stats()).await;
    assert_eq!((stats.ready, stats.unacknowledged), (0, Some(0)));
    let bare = connect(&broker.socket_uri()).await;
    let stats = bare.default_task_queue().stats().await.unwrap_err();
    assert!(matches!(stats.kind(), ErrorKind::Refused(_)), "{stats}");
    assert!(stats.to_string().contains("broker.status"), "{stats}");
    bare.close().await.unwrap();
    // Presence: every broadcast of AiiDA's broker reaches every AiiDA client, and it has no
    // channel of kiwimq's own.
    let presence = comm.watch_presence().await.err().expect("refused");
    assert!(
        matches!(presence.kind(), ErrorKind::Refused(_)),
        "{presence}"
    );
    assert!(
        presence.to_string().contains("kiwimq's broker"),
        "{presence}"
    );
    comm.close().await.unwrap();
    let closed = comm.task_send_no_reply(&1).await.unwrap_err();
    assert!(matches!(closed.kind(), ErrorKind::Closed), "{closed}");

    let msgpack = Settings::new(broker.uri())
        .with_codec(Codec::MessagePack)
        .connect()
        .await
        .unwrap_err();
    assert!(msgpack.to_string().contains("JSON"), "{msgpack}");
    let relative = kiwimq::connect("zmq://relative/dir").await.unwrap_err();
    assert!(relative.to_string().contains("absolute"), "{relative}");
    // No broker: a clear error within the connect timeout, not a hang.
    let nowhere = common::aiida::scratch("no-broker");
    let missing = Settings::new(format!("zmq://{}", nowhere.display()))
        .with_connect_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("broker.sockets"), "{missing}");
    let dead = Settings::new(format!("zmq+ipc://{}/router.sock", nowhere.display()))
        .with_connect_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap_err();
    assert!(
        dead.to_string().contains("no ZeroMQ broker answers"),
        "{dead}"
    );
    std::fs::remove_dir_all(nowhere).unwrap();
}

#[actix_rt::test]
async fn clients_follow_a_crashed_broker_to_its_new_socket() {
    let mut broker = AiidaBroker::start().await;
    let worker = connect(&broker.uri()).await;
    let caller = connect(&broker.uri()).await;
    let tasks = common::recorded_tasks::<u64>(&worker).await;
    worker
        .add_rpc_subscriber(Some("worker"), |rpc: Rpc<u64>| async move {
            Ok::<_, HandlerError>(rpc.body + 1)
        })
        .await
        .unwrap();
    let answer: u64 = caller
        .rpc_send("worker", &1u64)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(answer, 2);

    let old = broker.sockets_dir();
    broker.kill().await;
    // Subscribing while the broker is down returns at once (nothing can answer it) and
    // stands: it is sent on the reconnect.
    eventually(SOON, "the worker sees the broker gone", || {
        !worker.is_connected()
    })
    .await;
    let subscribed = tokio::time::timeout(
        Duration::from_secs(5),
        worker.add_rpc_subscriber(Some("late"), |rpc: Rpc<u64>| async move {
            Ok::<_, HandlerError>(rpc.body * 10)
        }),
    )
    .await;
    subscribed
        .expect("a subscription while disconnected does not wait for the broker")
        .unwrap();
    broker.restart().await;
    assert_ne!(broker.sockets_dir(), old, "AiiDA's broker moves its socket");

    // Both clients move to the new socket and subscribe again by themselves.
    eventually(SOON, "both clients reconnected", || {
        worker.is_connected() && caller.is_connected()
    })
    .await;
    for n in 0..20u64 {
        caller.task_send_no_reply(&n).await.unwrap();
    }
    eventually(SOON, "the tasks after the crash handled", || {
        count(&tasks) == 20
    })
    .await;
    let answer: u64 = caller
        .rpc_send("worker", &41u64)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(answer, 42);
    let late: u64 = caller.rpc_send("late", &4u64).await.unwrap().await.unwrap();
    assert_eq!(late, 40);
    caller.close().await.unwrap();
    worker.close().await.unwrap();
}

#[actix_rt::test]
async fn aiidas_python_client_talks_to_kiwimq_both_ways() {
    let broker = AiidaBroker::start().await;
    let comm = connect(&broker.uri()).await;
    let home = broker.service_dir.join("python-home");
    common::aiida::python_client_both_ways(&comm, &broker.socket_uri(), &home).await;
    comm.close().await.unwrap();
}
