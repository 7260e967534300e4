//! Scale on RabbitMQ: a workflow engine's worker hosts thousands of processes, each an RPC
//! identifier. 10,000 of them on one communicator, each callable, all removable; running out
//! of a broker limit is a clear error, never a hang. Prints its figures.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use kiwimq::{Communicator, ConnectionEvent, ErrorKind, HandlerError, Rpc, Task};

use common::proxy::{Proxy, upstream};
use common::vhost::Vhost;
use common::{SOON, amqp_settings, amqp_url};

const IDENTIFIERS: usize = 10_000;
/// Subscriptions and calls in flight at once.
const AT_ONCE: usize = 512;

/// Serves `process-0` … `process-{n-1}` on `worker`, each answering its number plus the
/// request; returns the identifiers.
async fn serve(worker: &Communicator, n: usize) -> Vec<String> {
    futures::stream::iter(0..n)
        .map(|i| {
            let worker = worker.clone();
            async move {
                let answer =
                    move |rpc: Rpc<u64>| async move { Ok::<_, HandlerError>(rpc.body + i as u64) };
                let identifier = format!("process-{i}");
                worker
                    .add_rpc_subscriber(Some(&identifier), answer)
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await
}

/// Calls every identifier `serve` made, each given `patience` to answer; returns how many
/// did not answer right.
async fn call_all(client: &Communicator, n: usize, patience: Duration) -> usize {
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let identifier = format!("process-{i}");
                match client.rpc_send::<_, u64>(&identifier, &1u64).await {
                    Ok(reply) => {
                        reply.with_timeout(Some(patience)).await.ok() != Some(1 + i as u64)
                    }
                    Err(_) => true,
                }
            }
        })
        .buffer_unordered(AT_ONCE)
        .filter(|wrong| futures::future::ready(*wrong))
        .count()
        .await
}

#[actix_rt::test]
async fn ten_thousand_rpc_identifiers_on_one_communicator() {
    let settings = amqp_settings(&amqp_url());
    let worker = settings.clone().connect().await.unwrap();
    let started = Instant::now();
    let added = serve(&worker, IDENTIFIERS).await;
    let adding = started.elapsed();
    assert_eq!(added.len(), IDENTIFIERS);
    assert_eq!(worker.health().await.rpc_subscribers, IDENTIFIERS);

    let client = settings.connect().await.unwrap();
    let started = Instant::now();
    let wrong = call_all(&client, IDENTIFIERS, SOON).await;
    let calling = started.elapsed();
    assert_eq!(wrong, 0, "every identifier answers");

    let started = Instant::now();
    futures::stream::iter(added)
        .for_each_concurrent(AT_ONCE, |identifier| {
            let worker = worker.clone();
            async move { worker.remove_rpc_subscriber(&identifier).await.unwrap() }
        })
        .await;
    let removing = started.elapsed();
    assert_eq!(worker.health().await.rpc_subscribers, 0);
    let gone = client
        .rpc_send::<_, u64>("process-7", &1u64)
        .await
        .unwrap_err();
    assert!(matches!(gone.kind(), ErrorKind::Unroutable(_)), "{gone}");
    println!(
        "[scale figures] {IDENTIFIERS} RPC identifiers on one communicator: added in {adding:.1?}, each called once in {calling:.1?}, removed in {removing:.1?}"
    );
    client.close().await.unwrap();
    worker.close().await.unwrap();
}

/// Each consumed task queue takes a channel of its own: past the connection's
/// `channel_max` a subscription fails at once with `Refused` naming the limit, and what was
/// subscribed before keeps working.
#[actix_rt::test]
async fn running_out_of_channels_is_a_clear_error_not_a_hang() {
    let url = format!("{}?channel_max=16", amqp_url());
    let comm = amqp_settings(&url).connect().await.unwrap();
    let mut subscribed = Vec::new();
    let refusal = loop {
        let queue = comm.task_queue(common::unique(&format!("q{}", subscribed.len())));
        let started = Instant::now();
        let added = tokio::time::timeout(
            SOON,
            queue.add_task_subscriber(
                |task: Task<u32>| async move { Ok::<_, HandlerError>(task.body) },
            ),
        )
        .await
        .expect("subscribing never hangs");
        match added {
            Ok(_) => subscribed.push(queue),
            Err(error) => break (error, started.elapsed()),
        }
        assert!(subscribed.len() < 16, "the limit was never reached");
    };
    let (error, took) = refusal;
    assert!(
        matches!(error.kind(), ErrorKind::Refused(reason) if reason.contains("channel_max")),
        "{error}"
    );
    assert!(
        took < Duration::from_secs(2),
        "refused at once, not after retries: {took:?}"
    );
    let first = &subscribed[0];
    assert_eq!(
        first.task_send::<_, u32>(&5).await.unwrap().await.unwrap(),
        5
    );
    comm.close().await.unwrap();
}

/// Awaits a call that must be refused for a limit: at once (within `SOON`), as `Refused`
/// in the broker's words. Returns the error and how long it took.
async fn refused_for_a_limit<T: std::fmt::Debug>(
    call: impl std::future::Future<Output = kiwimq::Result<T>>,
    what: &str,
) -> (kiwimq::Error, Duration) {
    let started = Instant::now();
    let outcome = tokio::time::timeout(SOON, call).await;
    let error = outcome
        .unwrap_or_else(|_| panic!("{what} never hangs"))
        .expect_err(what);
    assert!(
        matches!(error.kind(), ErrorKind::Refused(reason) if reason.contains("limit")),
        "{what}: {error}"
    );
    (error, started.elapsed())
}

/// A vhost's `max-queues` limit: a subscription or a send that needs one queue more fails at
/// once with `Refused` in the broker's words, and what was set up before keeps working.
#[actix_rt::test]
async fn a_vhost_queue_limit_is_a_clear_error_not_a_hang() {
    let vhost = Vhost::new();
    // The communicator's two reply queues and one task queue fit; nothing more does.
    vhost.limit(r#"{"max-queues": 3}"#);
    let comm = amqp_settings(&vhost.uri()).connect().await.unwrap();
    let echo = |task: Task<u32>| async move { Ok::<_, HandlerError>(task.body) };
    let first = comm.task_queue(common::unique("first"));
    first.add_task_subscriber(echo).await.unwrap();
    let second = comm.task_queue(common::unique("second"));
    refused_for_a_limit(second.add_task_subscriber(echo), "a second task queue").await;
    let third = comm.task_queue(common::unique("third"));
    refused_for_a_limit(third.task_send::<_, u32>(&1), "a send to a new queue").await;
    let rpc = comm.add_rpc_subscriber(Some("over-the-limit"), |rpc: Rpc<u32>| async move {
        Ok::<_, HandlerError>(rpc.body)
    });
    let (error, took) = refused_for_a_limit(rpc, "the RPC queue").await;
    println!("[scale figures] a vhost's max-queues reached: refused in {took:.1?} with: {error}");
    assert_eq!(
        first.task_send::<_, u32>(&5).await.unwrap().await.unwrap(),
        5
    );
    comm.close().await.unwrap();
}

/// A lost connection takes every RPC queue with it (they are exclusive); the communicator
/// declares and consumes all 10,000 again, many at once, and every identifier answers.
#[actix_rt::test]
async fn ten_thousand_rpc_identifiers_are_restored_after_a_connection_loss() {
    let proxy = Proxy::start(&upstream()).await;
    let settings = amqp_settings(&proxy.url(&amqp_url()));
    let worker = settings.clone().connect().await.unwrap();
    serve(&worker, IDENTIFIERS).await;
    let client = amqp_settings(&amqp_url())
        .with_message_exchange(settings.message_exchange())
        .with_task_exchange(settings.task_exchange())
        .connect()
        .await
        .unwrap();
    let mut events = worker.connection_events();
    let cut = Instant::now();
    proxy.cut();
    let reopened = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(event) = events.next().await {
            if let ConnectionEvent::Restored(down_for) = event {
                return down_for;
            }
        }
        panic!("the events ended without a restoration");
    })
    .await
    .expect("restored within two minutes");
    // The RPC queue the broker still holds for the lost connection is declared again once
    // it lets it go; until then calls are routed to it and lost (RPC is at-most-once), so
    // each call waits a second, not SOON: poll until every identifier answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    let patience = Duration::from_secs(1);
    let mut unanswered = call_all(&client, IDENTIFIERS, patience).await;
    while unanswered > 0 && Instant::now() < deadline {
        unanswered = call_all(&client, IDENTIFIERS, patience).await;
    }
    let all_back = cut.elapsed();
    println!(
        "[fault figures] connection cut under {IDENTIFIERS} RPC identifiers: sends resumed after {reopened:.1?}, all {IDENTIFIERS} answering again {all_back:.1?} after the cut, {unanswered} never"
    );
    assert_eq!(unanswered, 0);
    assert_eq!(worker.health().await.rpc_subscribers, IDENTIFIERS);
    client.close().await.unwrap();
    worker.close().await.unwrap();
}
