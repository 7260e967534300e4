//! Refusals no retry can fix fail that send at once, with `Refused` naming the reason, and
//! disturb nothing else: a body over the size limit (checked before sending, on both
//! backends), a body the broker refuses as too large, a publish to a missing exchange.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Backend, SOON, amqp_settings, amqp_url, eventually, settings};
use futures::StreamExt;
use kiwimq::{BroadcastOptions, ConnectionEvent, ErrorKind, HandlerError, Settings, Task};
use serde_bytes::ByteBuf;

/// 140 MiB: over RabbitMQ's default `max_message_size` of 128 MiB.
const TOO_LARGE: usize = 140 * 1024 * 1024;

fn refused_reason<T: std::fmt::Debug>(result: kiwimq::Result<T>) -> String {
    match result.expect_err("expected a refusal").kind() {
        ErrorKind::Refused(reason) => reason.clone(),
        other => panic!("expected Refused, got {other:?}"),
    }
}

/// Doubles numbers, and answers a large body with its length.
async fn worker(comm: &kiwimq::Communicator) {
    comm.add_task_subscriber(|task: Task<ByteBuf, usize>| async move {
        Ok::<_, HandlerError>(task.body.len() * 2)
    })
    .await
    .unwrap();
}

async fn a_body_over_the_size_limit_is_refused_before_sending(backend: Backend) {
    let comm = settings(backend).connect().await.unwrap();
    worker(&comm).await;
    let started = Instant::now();
    let reason = refused_reason(
        comm.task_send::<_, usize>(&ByteBuf::from(vec![7u8; TOO_LARGE]))
            .await,
    );
    assert!(started.elapsed() < SOON, "{:?}", started.elapsed());
    assert!(reason.contains("is larger than the limit"), "{reason}");
    // Nothing was sent: nobody got a task, and the next send works.
    let small: usize = comm
        .task_send(&ByteBuf::from(vec![1u8; 21]))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(small, 42);
    comm.close().await.unwrap();
}

async fn a_result_over_the_size_limit_is_a_remote_error(backend: Backend) {
    let comm = settings(backend)
        .with_max_message_size(1024)
        .connect()
        .await
        .unwrap();
    comm.add_task_subscriber(|task: Task<usize, ByteBuf>| async move {
        Ok::<_, HandlerError>(ByteBuf::from(vec![0u8; task.body]))
    })
    .await
    .unwrap();
    let error = comm
        .task_send::<_, ByteBuf>(&4096usize)
        .await
        .unwrap()
        .await
        .unwrap_err();
    assert!(
        matches!(error.kind(), ErrorKind::Remote(text) if text.contains("larger than the message size limit")),
        "{error}"
    );
    let fine: ByteBuf = comm.task_send(&16usize).await.unwrap().await.unwrap();
    assert_eq!(fine.len(), 16);
    comm.close().await.unwrap();
}

#[actix_rt::test]
async fn mem_a_body_over_the_size_limit_is_refused_before_sending() {
    a_body_over_the_size_limit_is_refused_before_sending(Backend::Mem).await;
}

#[actix_rt::test]
async fn amqp_a_body_over_the_size_limit_is_refused_before_sending() {
    a_body_over_the_size_limit_is_refused_before_sending(Backend::Amqp).await;
}

#[actix_rt::test]
async fn mem_a_result_over_the_size_limit_is_a_remote_error() {
    a_result_over_the_size_limit_is_a_remote_error(Backend::Mem).await;
}

#[actix_rt::test]
async fn amqp_a_result_over_the_size_limit_is_a_remote_error() {
    a_result_over_the_size_limit_is_a_remote_error(Backend::Amqp).await;
}

/// With kiwimq's own limit raised above the broker's, RabbitMQ itself refuses the body:
/// that send fails at once with the broker's reason, the sends beside it on the same
/// channel complete, and the connection is never given up for it.
#[actix_rt::test]
async fn a_body_the_broker_refuses_as_too_large_fails_at_once_and_disturbs_nothing() {
    let comm = amqp_settings(&amqp_url())
        .with_max_message_size(256 * 1024 * 1024)
        .connect()
        .await
        .unwrap();
    worker(&comm).await;
    let mut events = comm.connection_events();
    let started = Instant::now();
    let body = ByteBuf::from(vec![7u8; TOO_LARGE]);
    let big = comm.task_send::<_, usize>(&body);
    let small = futures::future::join_all((0..20).map(|n| {
        let comm = comm.clone();
        async move {
            comm.task_send::<_, usize>(&ByteBuf::from(vec![0u8; n]))
                .await?
                .await
        }
    }));
    let (big, small) = futures::join!(big, small);
    let reason = refused_reason(big);
    assert!(started.elapsed() < SOON, "{:?}", started.elapsed());
    assert!(reason.contains("max size"), "{reason}");
    for (n, result) in small.into_iter().enumerate() {
        assert_eq!(result.unwrap(), 2 * n, "small task {n}");
    }
    let next: usize = comm
        .task_send(&ByteBuf::from(vec![1u8; 5]))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(next, 10);
    assert!(comm.is_connected());
    comm.close().await.unwrap();
    while let Some(event) = events.next().await {
        assert!(
            matches!(event, ConnectionEvent::Closed),
            "the connection was given up for a refusal: {event:?}"
        );
    }
}

/// lapin numbers a publish's confirm before it queues the publish's frames: with several
/// threads publishing on one connection, the broker's ack of one message must never
/// confirm another. A body the broker refuses, sent while three threads send broadcasts
/// on the same communicator, is refused every time.
#[actix_rt::test]
async fn a_refused_body_is_never_confirmed_while_other_threads_send() {
    let comm = amqp_settings(&amqp_url())
        .with_max_message_size(256 * 1024 * 1024)
        .connect()
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..3)
        .map(|_| {
            let (comm, stop, sent) = (comm.clone(), stop.clone(), sent.clone());
            std::thread::spawn(move || {
                actix_rt::System::new().block_on(async move {
                    while !stop.load(Ordering::Relaxed) {
                        comm.broadcast_send(&0u8, BroadcastOptions::default())
                            .await
                            .unwrap();
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
        })
        .collect();
    let body = ByteBuf::from(vec![7u8; TOO_LARGE]);
    for round in 0..3 {
        let before = sent.load(Ordering::Relaxed);
        let reason = refused_reason(comm.task_send_no_reply(&body).await);
        assert!(reason.contains("max size"), "round {round}: {reason}");
        assert!(
            sent.load(Ordering::Relaxed) > before,
            "round {round}: nothing was sent beside the large body"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.join().unwrap();
    }
    comm.close().await.unwrap();
}

/// Someone deletes the task exchange: the next task fails at once with the broker's
/// reason instead of being resent until the send timeout; the communicator declares its
/// exchange again, so later sends go through.
#[actix_rt::test]
async fn a_publish_to_a_missing_exchange_fails_at_once() {
    let settings: Settings = amqp_settings(&amqp_url());
    let comm = settings.clone().connect().await.unwrap();
    comm.task_send_no_reply(&0i64).await.unwrap();
    let raw = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = raw.create_channel().await.unwrap();
    channel
        .exchange_delete(
            settings.task_exchange().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let reason = refused_reason(comm.task_send_no_reply(&1i64).await);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(reason.contains("no exchange"), "{reason}");
    let deadline = Instant::now() + SOON;
    while comm.task_send_no_reply(&2i64).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the exchange was not declared again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(SOON, "connected", || comm.is_connected()).await;
    comm.close().await.unwrap();
    raw.close(200, "done".into()).await.unwrap();
}

/// Quorum queues are an option; a fleet that disagrees on it learns which setting differs,
/// and both kinds of queue carry tasks.
#[actix::test]
async fn a_queue_declared_with_the_other_type_names_the_setting_that_differs() {
    let classic = amqp_settings(&amqp_url());
    let quorum = classic.clone().with_quorum_queues(true);
    let queue = common::unique("quorum");
    let comm = classic.connect().await.unwrap();
    comm.task_queue(&queue)
        .task_send_no_reply(&1u32)
        .await
        .unwrap();
    let other = quorum.clone().connect().await.unwrap();
    let error = other
        .task_queue(&queue)
        .task_send_no_reply(&2u32)
        .await
        .unwrap_err();
    assert!(matches!(error.kind(), ErrorKind::Config(_)), "{error}");
    assert!(error.to_string().contains("with_quorum_queues"), "{error}");
    // A quorum task queue works end to end (its replies through a quorum queue too).
    let fresh = common::unique("quorum-fresh");
    other
        .task_queue(&fresh)
        .add_task_subscriber(|task: Task<u32>| async move { Ok(task.body * 2) })
        .await
        .unwrap();
    let doubled: u32 = other
        .task_queue(&fresh)
        .task_send(&21u32)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(doubled, 42);
    for name in [&queue, &fresh] {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_queue", name])
            .output();
    }
    other.close().await.unwrap();
    comm.close().await.unwrap();
}
