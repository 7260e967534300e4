//! kiwimq's own ZeroMQ broker (`kiwimq broker`, [`kiwimq::broker::Broker`]): what it adds to
//! AiiDA's protocol (task results back, durable confirms, a socket that stays put), AiiDA's
//! Python client on it, and its faults: `kill -9` with confirmed tasks in flight, a killed
//! worker, a stalled one. The fault tests print their figures.

mod common;

use common::aiida::scratch;
use kiwimq::broker::Broker;
use kiwimq::{HandlerError, Rpc, Settings, Task};

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
