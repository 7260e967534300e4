//! A panic is an answer, not a silence: on both backends, a panicking handler — an actor's,
//! a closure's, a supervised actor's — answers its message with a `Remote` error naming the
//! panic; the task is acknowledged (dead-lettered with a delivery limit); what was queued
//! behind it is handled elsewhere; a subscriber that dies for good is reported, and a
//! supervised one is started afresh.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix::prelude::*;
use common::*;
use futures::StreamExt;
use kiwimq::{Communicator, ConnectionEvent, ErrorKind, HandlerError, Rpc, Task};

async fn connect(settings: &kiwimq::Settings) -> Communicator {
    settings.clone().connect().await.expect("connect")
}

fn remote_text<T: std::fmt::Debug>(result: kiwimq::Result<T>) -> String {
    match result.expect_err("expected a remote error").kind() {
        ErrorKind::Remote(text) => text.clone(),
        other => panic!("expected Remote, got {other:?}"),
    }
}

/// Squares numbers; panics on 13.
struct Superstitious {
    started: Arc<AtomicUsize>,
}

impl Actor for Superstitious {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }
}

impl Handler<Task<i64>> for Superstitious {
    type Result = Result<i64, HandlerError>;

    fn handle(&mut self, task: Task<i64>, _: &mut Context<Self>) -> Self::Result {
        assert_ne!(task.body, 13, "unlucky number {}", task.body);
        Ok(task.body * task.body)
    }
}

impl Handler<Rpc<i64>> for Superstitious {
    type Result = Result<i64, HandlerError>;

    fn handle(&mut self, rpc: Rpc<i64>, _: &mut Context<Self>) -> Self::Result {
        assert_ne!(rpc.body, 13, "unlucky number {}", rpc.body);
        Ok(rpc.body * rpc.body)
    }
}

impl Handler<kiwimq::Broadcast<i64>> for Superstitious {
    type Result = Result<(), HandlerError>;

    fn handle(&mut self, broadcast: kiwimq::Broadcast<i64>, _: &mut Context<Self>) -> Self::Result {
        assert_ne!(broadcast.body, 13, "unlucky number {}", broadcast.body);
        Ok(())
    }
}

fn superstitious() -> (Superstitious, Arc<AtomicUsize>) {
    let started = Arc::new(AtomicUsize::new(0));
    (
        Superstitious {
            started: started.clone(),
        },
        started,
    )
}

/// Waits for the first event that `wanted` picks.
async fn event(
    events: &mut futures::stream::BoxStream<'static, ConnectionEvent>,
    wanted: impl Fn(&ConnectionEvent) -> bool,
) -> ConnectionEvent {
    tokio::time::timeout(SOON, async {
        loop {
            let event = events.next().await.expect("events ended");
            if wanted(&event) {
                return event;
            }
        }
    })
    .await
    .expect("no such event in time")
}

async fn an_actor_that_panics_answers_remote_and_is_reported_lost(backend: Backend) {
    let settings = settings(backend).with_task_prefetch(4);
    let comm = connect(&settings).await;
    let mut events = comm.connection_events();
    // On an arbiter of its own: its panic takes only it down.
    let arbiter = Arbiter::new();
    let (actor, _) = superstitious();
    let fragile = Superstitious::start_in_arbiter(&arbiter.handle(), |_| actor);
    let id = comm.add_task_subscriber(fragile).await.unwrap();
    let text = remote_text(comm.task_send::<_, i64>(&13i64).await.unwrap().await);
    assert!(
        text.contains("panicked") && text.contains("unlucky number 13"),
        "{text}"
    );
    let lost = event(&mut events, |e| {
        matches!(e, ConnectionEvent::SubscriberLost { .. })
    })
    .await;
    assert!(
        matches!(&lost, ConnectionEvent::SubscriberLost { identifier, reason } if *identifier == id && reason.contains("unlucky")),
        "{lost:?}"
    );
    // The dead subscriber was removed; a healthy one on this communicator takes the rest.
    comm.add_task_subscriber(|task: Task<i64>| async move { Ok::<_, HandlerError>(task.body + 1) })
        .await
        .unwrap();
    let next: i64 = comm.task_send(&4i64).await.unwrap().await.unwrap();
    assert_eq!(next, 5);
    comm.close().await.unwrap();
    arbiter.stop();
}

/// An RPC or broadcast actor the user started that dies is gone for good: reported, no
/// longer counted in `health()`, and its identifier is free again (callers then learn at
/// once that nobody serves it, instead of an error from a dead actor each time).
async fn a_lost_rpc_or_broadcast_actor_is_forgotten(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let mut events = comm.connection_events();
    let arbiter = Arbiter::new();
    let (rpc_actor, _) = superstitious();
    let rpc_actor = Superstitious::start_in_arbiter(&arbiter.handle(), |_| rpc_actor);
    let other = Arbiter::new();
    let (broadcast_actor, _) = superstitious();
    let broadcast_actor = Superstitious::start_in_arbiter(&other.handle(), |_| broadcast_actor);
    comm.add_rpc_subscriber(Some("unlucky"), rpc_actor)
        .await
        .unwrap();
    comm.add_broadcast_subscriber(kiwimq::BroadcastFilter::new(), broadcast_actor)
        .await
        .unwrap();
    assert_eq!(comm.health().await.subscribers(), 2);

    let text = remote_text(
        comm.rpc_send::<_, i64>("unlucky", &13i64)
            .await
            .unwrap()
            .await,
    );
    assert!(text.contains("unlucky number 13"), "{text}");
    // The call after the panic finds the actor dead: reported lost, and forgotten.
    let after = comm
        .rpc_send::<_, i64>("unlucky", &2i64)
        .await
        .unwrap()
        .await;
    assert!(after.is_err(), "{after:?}");
    event(&mut events, |e| {
        matches!(e, ConnectionEvent::SubscriberLost { .. })
    })
    .await;
    comm.broadcast_send(&13i64, kiwimq::BroadcastOptions::default())
        .await
        .unwrap();
    comm.broadcast_send(&2i64, kiwimq::BroadcastOptions::default())
        .await
        .unwrap();
    event(&mut events, |e| {
        matches!(e, ConnectionEvent::SubscriberLost { .. })
    })
    .await;
    let deadline = std::time::Instant::now() + SOON;
    while comm.health().await.subscribers() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            comm.health().await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let health = comm.health().await;
    assert_eq!(health.subscribers_lost, 2, "{health:?}");
    // The identifier is free: served again by a new subscriber.
    comm.add_rpc_subscriber(Some("unlucky"), |rpc: Rpc<i64>| async move {
        Ok::<_, HandlerError>(rpc.body + 1)
    })
    .await
    .unwrap();
    assert_eq!(
        comm.rpc_send::<_, i64>("unlucky", &13i64)
            .await
            .unwrap()
            .await
            .unwrap(),
        14
    );
    comm.close().await.unwrap();
    arbiter.stop();
    other.stop();
}

async fn tasks_queued_behind_a_panic_are_handled_elsewhere(backend: Backend) {
    let settings = settings(backend).with_task_prefetch(8);
    let comm = connect(&settings).await;
    let arbiter = Arbiter::new();
    let (actor, _) = superstitious();
    let fragile = Superstitious::start_in_arbiter(&arbiter.handle(), |_| actor);
    comm.add_task_subscriber(fragile).await.unwrap();
    // A second subscriber: whatever the first cannot take comes here; 13 it leaves to the
    // first.
    comm.add_task_subscriber(|task: Task<i64>| async move {
        match task.body {
            13 => Err(HandlerError::reject()),
            n => Ok(n * n),
        }
    })
    .await
    .unwrap();
    let sends = [2i64, 13, 3, 4, 5, 6].map(|n| {
        let comm = comm.clone();
        async move { (n, comm.task_send::<_, i64>(&n).await.unwrap().await) }
    });
    for (n, result) in futures::future::join_all(sends).await {
        match n {
            13 => assert!(remote_text(result).contains("unlucky"), "13 panics"),
            n => assert_eq!(result.unwrap(), n * n, "task {n}"),
        }
    }
    comm.close().await.unwrap();
    arbiter.stop();
}

async fn a_closure_that_panics_answers_remote_and_keeps_serving(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    comm.add_task_subscriber(|task: Task<i64>| async move {
        assert_ne!(task.body, 13, "unlucky number {}", task.body);
        Ok::<_, HandlerError>(task.body * 2)
    })
    .await
    .unwrap();
    comm.add_rpc_subscriber(Some("sync-panic"), |rpc: Rpc<i64>| {
        assert_ne!(rpc.body, 13, "unlucky before any future");
        async move { Ok::<_, HandlerError>(rpc.body) }
    })
    .await
    .unwrap();
    for _ in 0..2 {
        let text = remote_text(comm.task_send::<_, i64>(&13i64).await.unwrap().await);
        assert!(text.contains("unlucky number 13"), "{text}");
        assert_eq!(
            comm.task_send::<_, i64>(&4i64)
                .await
                .unwrap()
                .await
                .unwrap(),
            8
        );
        let text = remote_text(
            comm.rpc_send::<_, i64>("sync-panic", &13i64)
                .await
                .unwrap()
                .await,
        );
        assert!(text.contains("unlucky before any future"), "{text}");
        assert_eq!(
            comm.rpc_send::<_, i64>("sync-panic", &1i64)
                .await
                .unwrap()
                .await
                .unwrap(),
            1
        );
    }
    comm.close().await.unwrap();
}

async fn a_supervised_actor_is_started_afresh_after_a_panic(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let mut events = comm.connection_events();
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let id = comm
        .add_task_subscriber(
            kiwimq::supervised(move || Superstitious {
                started: counter.clone(),
            })
            .with_backoff(Duration::from_millis(10), Duration::from_millis(50)),
        )
        .await
        .unwrap();
    assert_eq!(
        comm.task_send::<_, i64>(&3i64)
            .await
            .unwrap()
            .await
            .unwrap(),
        9
    );
    for round in 1..=3 {
        let text = remote_text(comm.task_send::<_, i64>(&13i64).await.unwrap().await);
        assert!(text.contains("unlucky number 13"), "{text}");
        let restarted = event(&mut events, |e| {
            matches!(e, ConnectionEvent::SubscriberRestarted { .. })
        })
        .await;
        assert!(
            matches!(&restarted, ConnectionEvent::SubscriberRestarted { identifier, .. } if *identifier == id),
            "{restarted:?}"
        );
        // The fresh actor serves the next task.
        assert_eq!(
            comm.task_send::<_, i64>(&5i64)
                .await
                .unwrap()
                .await
                .unwrap(),
            25
        );
        assert_eq!(started.load(Ordering::SeqCst), round + 1);
    }
    comm.close().await.unwrap();
}

async fn a_supervised_rpc_actor_answers_a_panic_and_serves_again(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    comm.add_rpc_subscriber(
        Some("square"),
        kiwimq::supervised(|| superstitious().0)
            .with_backoff(Duration::from_millis(10), Duration::from_millis(10)),
    )
    .await
    .unwrap();
    let text = remote_text(
        comm.rpc_send::<_, i64>("square", &13i64)
            .await
            .unwrap()
            .await,
    );
    assert!(text.contains("unlucky number 13"), "{text}");
    assert_eq!(
        comm.rpc_send::<_, i64>("square", &7i64)
            .await
            .unwrap()
            .await
            .unwrap(),
        49
    );
    comm.close().await.unwrap();
}

async fn a_supervised_actor_past_its_restart_limit_is_reported_lost(backend: Backend) {
    let settings = settings(backend);
    let comm = connect(&settings).await;
    let mut events = comm.connection_events();
    let id = comm
        .add_task_subscriber(
            kiwimq::supervised(|| superstitious().0)
                .with_max_restarts_per_minute(2)
                .with_backoff(Duration::from_millis(1), Duration::from_millis(1)),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let text = remote_text(comm.task_send::<_, i64>(&13i64).await.unwrap().await);
        assert!(text.contains("unlucky"), "{text}");
    }
    let lost = event(&mut events, |e| {
        matches!(e, ConnectionEvent::SubscriberLost { .. })
    })
    .await;
    assert!(
        matches!(&lost, ConnectionEvent::SubscriberLost { identifier, reason } if *identifier == id && reason.contains("given up")),
        "{lost:?}"
    );
    // Gone: the next task waits in the queue for another worker.
    let waiting = comm.task_send::<_, i64>(&2i64).await.unwrap();
    let worker = connect(&settings).await;
    worker
        .add_task_subscriber(|task: Task<i64>| async move { Ok::<_, HandlerError>(-task.body) })
        .await
        .unwrap();
    assert_eq!(waiting.await.unwrap(), -2);
    worker.close().await.unwrap();
    comm.close().await.unwrap();
}

async fn a_panicking_task_goes_to_the_dead_letter_queue_with_a_delivery_limit(backend: Backend) {
    let comm = connect(&settings(backend).with_delivery_limit(3)).await;
    comm.add_task_subscriber(kiwimq::supervised(|| superstitious().0))
        .await
        .unwrap();
    let text = remote_text(comm.task_send::<_, i64>(&13i64).await.unwrap().await);
    assert!(text.contains("unlucky"), "{text}");
    let dead = comm.default_task_queue().dead_letters();
    let task = dead.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(*task.body(), 13);
    assert!(
        !task.redelivered(),
        "dead-lettered at its first panic, not retried"
    );
    task.process(Ok(0i64)).await.unwrap();
    comm.close().await.unwrap();
}

/// Counts its tasks and stops itself after every third: actix's own `Supervisor` starts it
/// again on the same address.
struct Tired {
    handled: usize,
}

impl Actor for Tired {
    type Context = Context<Self>;
}

impl actix::Supervised for Tired {}

impl Handler<Task<i64>> for Tired {
    type Result = Result<i64, HandlerError>;

    fn handle(&mut self, task: Task<i64>, ctx: &mut Context<Self>) -> Self::Result {
        self.handled += 1;
        if self.handled.is_multiple_of(3) {
            ctx.stop();
        }
        Ok(task.body + 100)
    }
}

async fn an_actor_under_actix_supervisor_keeps_serving_across_its_restarts(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let tired = actix::Supervisor::start(|_| Tired { handled: 0 });
    comm.add_task_subscriber(tired).await.unwrap();
    for n in 0..10i64 {
        assert_eq!(
            comm.task_send::<_, i64>(&n).await.unwrap().await.unwrap(),
            n + 100
        );
    }
    comm.close().await.unwrap();
}

on_both_backends!(
    an_actor_that_panics_answers_remote_and_is_reported_lost,
    a_lost_rpc_or_broadcast_actor_is_forgotten,
    tasks_queued_behind_a_panic_are_handled_elsewhere,
    a_closure_that_panics_answers_remote_and_keeps_serving,
    a_supervised_actor_is_started_afresh_after_a_panic,
    a_supervised_rpc_actor_answers_a_panic_and_serves_again,
    a_supervised_actor_past_its_restart_limit_is_reported_lost,
    a_panicking_task_goes_to_the_dead_letter_queue_with_a_delivery_limit,
    an_actor_under_actix_supervisor_keeps_serving_across_its_restarts,
);
