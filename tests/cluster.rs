//! Failover on a real 3-node RabbitMQ cluster (`scripts/cluster.sh`, private nodes; the
//! shared broker is untouched): 10,000 tasks through quorum queues while the node holding
//! the client's connection is stopped. Prints its figures (sent, completed, lost,
//! duplicated, failover time).

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiwimq::{ConnectionEvent, Settings, Task};

use common::amqp_settings;

const TASKS: u32 = 10_000;

/// The cluster, started for the test (or found running) and stopped after it.
struct Cluster {
    uris: Vec<String>,
}

impl Cluster {
    fn start() -> Cluster {
        let output = Command::new("scripts/cluster.sh")
            .arg("start")
            .output()
            .expect("scripts/cluster.sh runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the cluster did not start:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let uris = stdout
            .lines()
            .last()
            .expect("the cluster's URIs")
            .split(',')
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert_eq!(uris.len(), 3, "{stdout}");
        Cluster { uris }
    }

    /// The node (1–3) a URI names, by its port's place in the list.
    fn node_of(&self, uri: &str) -> usize {
        let port = |u: &str| {
            u.rsplit(':')
                .next()
                .map(|tail| tail.split('/').next().unwrap_or("").to_owned())
        };
        let wanted = port(uri);
        1 + self
            .uris
            .iter()
            .position(|u| port(u) == wanted)
            .unwrap_or_else(|| panic!("{uri} is none of the cluster's nodes"))
    }

    fn ctl(node: usize, action: &str) {
        let status = Command::new("rabbitmqctl")
            .args([
                "-q",
                "-n",
                &format!("kiwimq-cluster-{node}@localhost"),
                action,
            ])
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success(), "rabbitmqctl {action} on node {node}");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("scripts/cluster.sh").arg("stop").status();
    }
}

fn settings(cluster: &Cluster) -> Settings {
    amqp_settings(&cluster.uris[0])
        .with_nodes(cluster.uris.clone())
        .with_quorum_queues(true)
        .with_reconnect_delay(Duration::from_millis(100), Duration::from_secs(1))
}

#[actix::test]
async fn ten_thousand_tasks_through_quorum_queues_survive_the_loss_of_the_clients_node() {
    let cluster = Cluster::start();
    let settings = settings(&cluster).with_task_prefetch(100);
    let handled: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
    let seen = handled.clone();
    let worker = settings
        .clone()
        .connect()
        .await
        .expect("the worker connects");
    worker
        .add_task_subscriber(move |task: Task<u32>| {
            *seen.lock().unwrap().entry(task.body).or_default() += 1;
            async move { Ok(task.body) }
        })
        .await
        .unwrap();
    let client = settings.connect().await.expect("the client connects");
    let first_node = cluster.node_of(&client.node().expect("connected to a node"));
    let mut events = client.connection_events();

    let started = Instant::now();
    let completed = Arc::new(Mutex::new(0u32));
    let done = completed.clone();
    let sender = client.clone();
    let sending = actix::spawn(async move {
        futures::stream::iter(0..TASKS)
            .map(|n| {
                let client = sender.clone();
                async move {
                    let reply = client.task_send::<_, u32>(&n).await?;
                    reply.await
                }
            })
            .buffer_unordered(500)
            .map(|result| {
                let value = result.expect("every task completes");
                *done.lock().unwrap() += 1;
                value
            })
            .collect::<Vec<u32>>()
            .await
    });

    // A fifth of the way in, the client's node goes.
    let deadline = Instant::now() + Duration::from_secs(120);
    while *completed.lock().unwrap() < TASKS / 5 {
        assert!(
            Instant::now() < deadline,
            "no progress before the node stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped_at = Instant::now();
    Cluster::ctl(first_node, "stop_app");
    let mut failover = None;
    let mut moved_to = None;
    while failover.is_none() {
        let left =
            (stopped_at + Duration::from_secs(120)).saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(ConnectionEvent::Connected { node })) => moved_to = Some(node),
            Ok(Some(ConnectionEvent::Restored(_))) => failover = Some(stopped_at.elapsed()),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("the client never failed over"),
        }
    }
    let moved_to = cluster.node_of(&moved_to.expect("Connected before Restored"));
    assert_ne!(moved_to, first_node, "failed over to another node");

    let results = tokio::time::timeout(Duration::from_secs(300), sending)
        .await
        .expect("every task completes within 5 minutes")
        .expect("the sender finished");
    let elapsed = started.elapsed();
    Cluster::ctl(first_node, "start_app");

    let handled = handled.lock().unwrap().clone();
    let mut returned: Vec<u32> = results;
    returned.sort_unstable();
    returned.dedup();
    let lost = (0..TASKS).filter(|n| !handled.contains_key(n)).count();
    let duplicated: u32 = handled.values().map(|times| times - 1).sum();
    println!(
        "[cluster figures] {TASKS} tasks to quorum queues on a 3-node cluster, the client's node \
         ({first_node}) stopped after {}: completed {}, lost {lost}, duplicated {duplicated}, \
         failover to node {moved_to} in {:.1?}, all done in {:.1?}",
        TASKS / 5,
        returned.len(),
        failover.unwrap(),
        elapsed
    );
    assert_eq!(lost, 0, "no task lost");
    assert_eq!(returned.len(), TASKS as usize, "every result came back");
    let _ = client.close().await;
    let _ = worker.close().await;
}
