//! The in-process backend's throughput, shared by the `mem` and `mem_mimalloc` benchmarks
//! (the same work under the system allocator and under mimalloc): task round trips, RPC
//! round trips and broadcast deliveries per second with 1 KiB bodies.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiwimq::{
    Broadcast, BroadcastFilter, BroadcastOptions, Communicator, ReplyFuture, Rpc, Settings, Task,
};

use super::{Body, body};

const IN_FLIGHT: usize = 256;

/// Connects a server and a client to a fresh in-process broker, lets `serve` subscribe
/// on the server, then runs `n` round trips through `call`, `IN_FLIGHT` at a time; returns
/// how many completed per second.
async fn round_trips<S, SFut, C, CFut>(n: usize, settings: Settings, serve: S, call: C) -> f64
where
    S: FnOnce(Communicator) -> SFut,
    SFut: Future<Output = ()>,
    C: Fn(Communicator) -> CFut,
    CFut: Future<Output = kiwimq::Result<ReplyFuture<Body>>>,
{
    let server = settings.clone().connect().await.unwrap();
    let client = settings.connect().await.unwrap();
    serve(server.clone()).await;
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|_| {
            let sent = call(client.clone());
            async move { sent.await.unwrap().await.unwrap() }
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|_| async {})
        .await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    server.close().await.unwrap();
    client.close().await.unwrap();
    rate
}

async fn task_round_trips(n: usize) -> f64 {
    let settings = Settings::new(format!("mem://bench-tasks-{}", uuid::Uuid::new_v4()))
        .with_task_prefetch(IN_FLIGHT as u16);
    let serve = |worker: Communicator| async move {
        let echo = |t: Task<Body>| async move { Ok(t.body) };
        worker.add_task_subscriber(echo).await.unwrap();
    };
    let call = |client: Communicator| async move { client.task_send(&body()).await };
    round_trips(n, settings, serve, call).await
}

async fn rpc_round_trips(n: usize) -> f64 {
    let settings = Settings::new(format!("mem://bench-rpc-{}", uuid::Uuid::new_v4()));
    let serve = |server: Communicator| async move {
        let echo = |r: Rpc<Body>| async move { Ok(r.body) };
        server.add_rpc_subscriber(Some("echo"), echo).await.unwrap();
    };
    let call = |client: Communicator| async move { client.rpc_send("echo", &body()).await };
    round_trips(n, settings, serve, call).await
}

async fn broadcast_deliveries(n: usize) -> f64 {
    let settings = Settings::new(format!("mem://bench-broadcast-{}", uuid::Uuid::new_v4()));
    let receiver = settings.clone().connect().await.unwrap();
    let sender = settings.connect().await.unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    receiver
        .add_broadcast_subscriber(
            BroadcastFilter::new().subject("bench"),
            move |_: Broadcast<Body>| {
                counter.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            },
        )
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..n {
        sender
            .broadcast_send(&body(), BroadcastOptions::subject("bench"))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while received.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = received.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    receiver.close().await.unwrap();
    sender.close().await.unwrap();
    rate
}

/// Runs every figure, prints the table and writes `target/<report>`; `allocator` names
/// the program's global allocator in both.
pub fn run(allocator: &str, report: &str) {
    actix::System::new().block_on(measure(allocator, report));
}

async fn measure(allocator: &str, report: &str) {
    let n = super::size("N", 100_000);
    let rounds = super::size("ROUNDS", 3).max(1);
    // Warm up allocators and threads.
    task_round_trips(n / 20).await;
    let mut samples: [Vec<f64>; 3] = Default::default();
    for _ in 0..rounds {
        samples[0].push(task_round_trips(n).await);
        samples[1].push(rpc_round_trips(n).await);
        samples[2].push(broadcast_deliveries(n).await);
    }
    let names = [
        "task_roundtrip_msgs_per_s",
        "rpc_roundtrip_msgs_per_s",
        "broadcast_msgs_per_s",
    ];
    let range = |values: &[f64]| {
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(0.0, f64::max);
        format!("{low:.0}–{high:.0}")
    };
    println!(
        "kiwimq mem:// backend, {n} messages of 1 KiB per figure, {IN_FLIGHT} in flight, \
         median of {rounds} rounds, allocator: {allocator}\n"
    );
    let rows: Vec<(String, Vec<String>)> = names
        .iter()
        .zip(&samples)
        .map(|(name, values)| {
            let median = super::median(values.clone());
            (
                name.to_string(),
                vec![format!("{median:.0}"), range(values)],
            )
        })
        .collect();
    super::print_table(&["kiwimq", "range"], &rows);
    let figures: Vec<(&str, f64)> = names
        .iter()
        .zip(&samples)
        .map(|(name, values)| (*name, super::median(values.clone())))
        .collect();
    let json: serde_json::Map<String, serde_json::Value> = figures
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v.round())))
        .collect();
    let json_report = serde_json::json!({
        "kiwimq": json,
        "allocator": allocator,
        "sizes": { "messages": n, "body_bytes": super::BODY_BYTES, "in_flight": IN_FLIGHT, "rounds": rounds },
    });
    super::write_report(report, &json_report);
}
