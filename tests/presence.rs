//! Presence, on both backends: a communicator announces who it is and what it does — every
//! field — a watcher hears it, its last word on close, and a silent one is taken for lost.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use futures::stream::BoxStream;
use kiwimq::presence::{Presence, Roster, Standing};
use kiwimq::{BroadcastFilter, Communicator, HandlerError, Rpc, Task};

const INTERVAL: Duration = Duration::from_millis(200);

async fn connect(settings: &kiwimq::Settings) -> Communicator {
    settings
        .clone()
        .with_presence_interval(Some(INTERVAL))
        .connect()
        .await
        .expect("connect")
}

/// The next announcement of `id` that passes `condition`, within 20 s.
async fn heard(
    watch: &mut BoxStream<'static, Presence>,
    id: &str,
    what: &str,
    mut condition: impl FnMut(&Presence) -> bool,
) -> Presence {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = actix_rt::time::timeout(left, watch.next()).await;
        let presence = next
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("the watch ended");
        if presence.id == id && condition(&presence) {
            return presence;
        }
    }
}

async fn every_field_is_announced_and_heard(backend: Backend) {
    let settings = settings(backend);
    let watcher = connect(&settings).await;
    let mut watch = watcher.watch_presence().await.unwrap();
    let worker = connect(&settings).await;
    let id = worker.presence().await.id;
    let queue = worker.task_queue(unique("presence-q")).with_prefetch(3);
    let (release, released) = tokio::sync::watch::channel(false);
    queue
        .add_task_subscriber(move |task: Task<u32>| {
            let mut released = released.clone();
            async move {
                if task.body == 0 {
                    return Err(HandlerError::Rejected);
                }
                if task.body == 1 {
                    return Err(HandlerError::failed("one fails"));
                }
                if task.body == 2 {
                    task.report_progress(0.25, Some("a quarter"));
                    let _ = released.wait_for(|go| *go).await;
                }
                Ok(task.body)
            }
        })
        .await
        .unwrap();
    worker
        .add_rpc_subscriber(Some(&unique("presence-rpc")), |rpc: Rpc<u32>| async move {
            Ok::<_, HandlerError>(rpc.body)
        })
        .await
        .unwrap();
    worker
        .add_broadcast_subscriber(
            BroadcastFilter::new().subject("state_changed.*"),
            |_: kiwimq::Broadcast<serde_json::Value>| async { Ok::<_, HandlerError>(()) },
        )
        .await
        .unwrap();
    let sender = connect(&settings).await;
    let sending = sender.task_queue(queue.name());
    assert_eq!(
        sending
            .task_send::<_, u32>(&7u32)
            .await
            .unwrap()
            .await
            .unwrap(),
        7
    );
    let failed = sending.task_send::<_, u32>(&1u32).await.unwrap().await;
    assert!(failed.is_err());
    let long = sending.task_send::<_, u32>(&2u32).await.unwrap();

    let presence = heard(&mut watch, &id, "the long task's progress", |p| {
        p.in_flight.iter().any(|t| t.progress == Some(0.25))
    })
    .await;
    println!(
        "presence: {}",
        serde_json::to_string_pretty(&presence).unwrap()
    );
    assert_eq!(presence.pid, std::process::id());
    assert!(!presence.host.is_empty());
    assert!(
        presence.program.starts_with("presence"),
        "{}",
        presence.program
    );
    assert_eq!(presence.version, env!("CARGO_PKG_VERSION"));
    let scheme = settings.uri().split("://").next().unwrap();
    assert_eq!(presence.backend, scheme);
    assert!(!presence.node.is_empty() && !presence.node.contains("guest:guest@"));
    assert!(presence.connected && !presence.closing);
    assert!(presence.uptime_secs > 0.0);
    assert!((presence.interval_secs - INTERVAL.as_secs_f64()).abs() < 1e-9);
    assert!(presence.sent_at_ms > 1_700_000_000_000);
    let q = &presence.task_queues[0];
    assert_eq!(
        (q.name.as_str(), q.prefetch, q.subscribers, q.running),
        (queue.name(), 3, 1, 1)
    );
    assert_eq!((q.counts.handled, q.counts.failed), (1, 1));
    assert_eq!(presence.counts, q.counts);
    assert_eq!(presence.rpc_identifiers, 1);
    assert_eq!(presence.broadcast_filters.len(), 1);
    assert!(
        presence.broadcast_filters[0].contains("subject ~ ^state_changed"),
        "{:?}",
        presence.broadcast_filters
    );
    let task = &presence.in_flight[0];
    assert_eq!(task.queue, queue.name());
    assert_eq!(task.note.as_deref(), Some("a quarter"));
    assert!(task.correlation_id.is_some());
    assert!(task.age_secs >= 0.0);
    assert_eq!((presence.restarts, presence.subscribers_lost), (0, 0));

    release.send(true).unwrap();
    assert_eq!(long.await.unwrap(), 2);
    // A task every subscriber declines: counted rejected (it waits for another worker).
    sending.task_send_no_reply(&0u32).await.unwrap();
    heard(
        &mut watch,
        &id,
        "the rejection and the end of the long task",
        |p| p.in_flight.is_empty() && p.counts.rejected >= 1 && p.counts.handled == 2,
    )
    .await;

    // The last word.
    worker.close().await.unwrap();
    let last = heard(&mut watch, &id, "the last word", |p| p.closing).await;
    assert!(!last.connected);
    let _ = queue.purge().await;
    sender.close().await.unwrap();
    drop(watch);
    watcher.close().await.unwrap();
}

async fn a_silent_communicator_is_taken_for_lost(backend: Backend) {
    let settings = settings(backend);
    let watcher = connect(&settings).await;
    let mut watch = watcher.watch_presence().await.unwrap();
    let worker = connect(&settings).await;
    let closing = connect(&settings).await;
    let (id, closing_id) = (worker.presence().await.id, closing.presence().await.id);
    let mut roster = Roster::default();
    let presence = heard(&mut watch, &id, "an announcement", |_| true).await;
    roster.heard(presence, Instant::now()).unwrap();
    let presence = heard(&mut watch, &closing_id, "the other's", |_| true).await;
    roster.heard(presence, Instant::now()).unwrap();
    let standing = |roster: &mut Roster, id: &str| {
        let members = roster.members(Instant::now());
        members
            .iter()
            .find(|m| m.presence.id == id)
            .unwrap()
            .standing
    };
    assert_eq!(standing(&mut roster, &id), Standing::Live);
    // One is dropped without a last word (as a killed process would be), one closes.
    let dropped_at = Instant::now();
    drop(worker);
    closing.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while standing(&mut roster, &id) != Standing::Lost
        || standing(&mut roster, &closing_id) != Standing::Closed
    {
        assert!(Instant::now() < deadline, "never taken for lost and closed");
        let next = actix_rt::time::timeout(INTERVAL, watch.next()).await;
        if let Ok(Some(presence)) = next {
            roster.heard(presence, Instant::now()).unwrap();
        }
    }
    let took = dropped_at.elapsed();
    println!("lost after {took:?} (interval {INTERVAL:?})");
    assert!(took >= INTERVAL * 2, "taken for lost too soon: {took:?}");
    drop(watch);
    watcher.close().await.unwrap();
}

async fn presence_off_announces_nothing(backend: Backend) {
    let settings = settings(backend);
    let watcher = connect(&settings).await;
    let mut watch = watcher.watch_presence().await.unwrap();
    let quiet = settings
        .clone()
        .with_presence_interval(None)
        .connect()
        .await
        .unwrap();
    let quiet_id = quiet.presence().await.id;
    let loud = connect(&settings).await;
    let loud_id = loud.presence().await.id;
    // Several of the loud one's intervals, and never a word from the quiet one.
    for _ in 0..3 {
        let presence = watch.next().await.unwrap();
        assert_ne!(presence.id, quiet_id);
        if presence.id == loud_id {
            continue;
        }
    }
    heard(&mut watch, &loud_id, "the loud one", |_| true).await;
    quiet.close().await.unwrap();
    loud.close().await.unwrap();
    drop(watch);
    watcher.close().await.unwrap();
}

/// A watcher whose connection is cut goes on hearing the fleet once it is restored, and a
/// worker whose connection is cut goes on announcing itself.
#[actix_rt::test]
async fn presence_is_heard_again_after_a_connection_cut() {
    use common::proxy::{Proxy, upstream};
    let proxy = Proxy::start(&upstream()).await;
    let settings = amqp_settings(&proxy.url(&amqp_url()))
        .with_reconnect_delay(Duration::from_millis(20), Duration::from_millis(200));
    let watcher = connect(&settings).await;
    let mut watch = watcher.watch_presence().await.unwrap();
    let worker = connect(&settings).await;
    let id = worker.presence().await.id;
    heard(&mut watch, &id, "an announcement before the cut", |_| true).await;
    let cut = proxy.cut();
    assert!(cut >= 2, "both connections cut ({cut})");
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    heard(&mut watch, &id, "an announcement after the cut", |p| {
        p.sent_at_ms > after + 100 && p.connected
    })
    .await;
    worker.close().await.unwrap();
    heard(&mut watch, &id, "the last word after the cut", |p| {
        p.closing
    })
    .await;
    drop(watch);
    watcher.close().await.unwrap();
}

on_both_backends!(
    every_field_is_announced_and_heard,
    a_silent_communicator_is_taken_for_lost,
    presence_off_announces_nothing,
);
