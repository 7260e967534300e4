//! The metrics, scraped from the Prometheus recorder after known traffic (feature
//! `prometheus`; the recorder is the process's, so this file is its own test binary).

mod common;

use kiwimq::{Broadcast, BroadcastFilter, BroadcastOptions, HandlerError, Rpc, Settings, Task};

use common::{SOON, eventually, seen};

/// The value of the sample `name{labels…}` in a Prometheus text page (labels in any order).
fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[actix::test]
async fn counts_match_known_traffic() {
    let handle = kiwimq::metrics::install_prometheus().unwrap();
    let settings = Settings::new(format!("mem://metrics-{}", uuid::Uuid::new_v4()));
    let worker = settings.clone().connect().await.unwrap();
    let client = settings.connect().await.unwrap();
    let queue = worker.task_queue("metered");
    queue
        .add_task_subscriber(|t: Task<i64>| async move {
            if t.body < 0 {
                return Err(HandlerError::failed("negative"));
            }
            Ok(t.body * 2)
        })
        .await
        .unwrap();
    worker
        .add_rpc_subscriber(Some("echo"), |r: Rpc<String>| async move { Ok(r.body) })
        .await
        .unwrap();
    let heard = seen::<()>();
    let log = heard.clone();
    worker
        .add_broadcast_subscriber(BroadcastFilter::new(), move |_: Broadcast<String>| {
            log.lock().unwrap().push(());
            async { Ok(()) }
        })
        .await
        .unwrap();

    let tasks = client.task_queue("metered");
    for n in [1i64, 2, -3] {
        let _ = tasks.task_send::<_, i64>(&n).await.unwrap().await;
    }
    for _ in 0..2 {
        let reply: String = client.rpc_send("echo", "hi").await.unwrap().await.unwrap();
        assert_eq!(reply, "hi");
    }
    client
        .broadcast_send(&"news".to_owned(), BroadcastOptions::subject("s"))
        .await
        .unwrap();
    eventually(SOON, "the broadcast heard", || {
        heard.lock().unwrap().len() == 1
    })
    .await;

    let page = handle.render();
    let task = [("kind", "task"), ("queue", "metered")];
    assert_eq!(
        sample(&page, "kiwimq_messages_sent_total", &task),
        Some(3.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "kiwimq_messages_confirmed_total", &task),
        Some(3.0)
    );
    assert_eq!(
        sample(&page, "kiwimq_messages_delivered_total", &task),
        Some(3.0)
    );
    // A failed handler is an answer: the task is acknowledged.
    assert_eq!(sample(&page, "kiwimq_tasks_acked_total", &task), Some(3.0));
    let rpc = [("kind", "rpc")];
    assert_eq!(sample(&page, "kiwimq_messages_sent_total", &rpc), Some(2.0));
    assert_eq!(
        sample(&page, "kiwimq_messages_delivered_total", &rpc),
        Some(2.0)
    );
    let broadcast = [("kind", "broadcast")];
    assert_eq!(
        sample(&page, "kiwimq_messages_sent_total", &broadcast),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, "kiwimq_messages_delivered_total", &broadcast),
        Some(1.0)
    );
    // Five replies: three task results, two RPC results.
    assert_eq!(
        sample(&page, "kiwimq_messages_sent_total", &[("kind", "reply")]),
        Some(5.0)
    );
    assert_eq!(
        sample(&page, "kiwimq_subscribers", &[("kind", "task")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, "kiwimq_subscribers", &[("kind", "rpc")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, "kiwimq_tasks_running", &[("kind", "task")]),
        Some(0.0)
    );
    assert_eq!(
        sample(&page, "kiwimq_results_pending", &[("kind", "task")]),
        Some(0.0)
    );
    assert_eq!(
        sample(&page, "kiwimq_round_trip_seconds_count", &[("kind", "rpc")]),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "kiwimq_handler_seconds_count", &[("kind", "task")]),
        Some(3.0)
    );
    // Histograms, as documented, not summaries: buckets up to +Inf.
    assert!(
        page.contains("# TYPE kiwimq_handler_seconds histogram")
            && page.contains("# TYPE kiwimq_round_trip_seconds histogram"),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "kiwimq_round_trip_seconds_bucket",
            &[("kind", "rpc"), ("le", "+Inf")]
        ),
        Some(2.0),
        "{page}"
    );
    // Series that can never move are not emitted.
    for never in [
        "kiwimq_round_trip_seconds_count{kind=\"broadcast\"}",
        "kiwimq_round_trip_seconds_count{kind=\"reply\"}",
        "kiwimq_handler_seconds_count{kind=\"reply\"}",
    ] {
        assert!(!page.contains(never), "{never} in {page}");
    }
    worker.close().await.unwrap();
    client.close().await.unwrap();
    // Closed with its subscribers: none counted any more.
    let page = handle.render();
    for kind in ["task", "rpc", "broadcast"] {
        assert_eq!(
            sample(&page, "kiwimq_subscribers", &[("kind", kind)]),
            Some(0.0),
            "{kind}: {page}"
        );
    }
}

/// A presence announcement a watcher refuses — here one whose interval no `Duration`
/// holds, published on RabbitMQ as anyone who may publish there can — is counted by reason.
#[actix::test]
async fn a_refused_announcement_is_counted() {
    use futures::StreamExt;
    let handle = kiwimq::metrics::install_prometheus().unwrap();
    let settings = common::amqp_settings(&common::amqp_url());
    let watcher = settings.clone().connect().await.unwrap();
    let mut watch = watcher.watch_presence().await.unwrap();
    let refused = || {
        sample(
            &handle.render(),
            kiwimq::metrics::PRESENCE_REFUSED,
            &[("reason", "out_of_range")],
        )
        .unwrap_or(0.0)
    };
    let before = refused();
    let connection =
        lapin::Connection::connect(&common::amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let exchange = format!("{}.kiwimq-presence", settings.message_exchange());
    let mut presence = serde_json::to_value(watcher.presence().await).unwrap();
    presence["interval_secs"] = 1e300.into();
    channel
        .basic_publish(
            exchange.as_str().into(),
            "[kiwimq.presence]".into(),
            lapin::options::BasicPublishOptions::default(),
            &serde_json::to_vec(&presence).unwrap(),
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    // A communicator that announces itself: heard after the refused one.
    let speaker = settings
        .with_presence_interval(Some(std::time::Duration::from_millis(100)))
        .connect()
        .await
        .unwrap();
    let speaker_id = speaker.presence().await.id;
    let heard = async {
        while let Some(heard) = watch.next().await {
            if heard.id == speaker_id {
                return;
            }
        }
    };
    tokio::time::timeout(SOON, heard).await.unwrap();
    assert_eq!(refused(), before + 1.0);
    drop(watch);
    speaker.close().await.unwrap();
    watcher.close().await.unwrap();
    connection.close(200, "done".into()).await.unwrap();
}
