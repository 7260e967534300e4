//! Workflow processes as actors on RabbitMQ, as AiiDA runs them (`examples/workflow.rs`):
//! 2,000 process actors on one worker communicator, launched by `continue` tasks; another
//! communicator pauses, plays, kills and asks the status of some of them over RPC, and every
//! state change broadcast is checked.

mod common;
#[path = "../examples/common/workflow.rs"]
mod workflow;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::StreamExt;
use kiwimq::{Broadcast, BroadcastFilter, Value};

use common::{amqp_settings, amqp_url};

const PROCESSES: i64 = 2_000;

/// What a pid does in the test, by its last digit.
fn role(pid: i64) -> &'static str {
    match pid % 10 {
        1 => "paused then played",
        2 => "killed",
        _ => "left alone",
    }
}

#[actix_rt::test]
async fn two_thousand_process_actors_are_controlled_and_announce_every_state_change() {
    let settings = amqp_settings(&amqp_url());
    let worker = settings.clone().connect().await.unwrap();
    let launcher = workflow::Launcher {
        comm: worker.downgrade(),
        steps: 6,
        step: Duration::from_millis(2_500),
    };
    worker
        .task_queue(settings.task_queue())
        .with_prefetch(256)
        .add_task_subscriber(launcher.start())
        .await
        .unwrap();

    let control = settings.connect().await.unwrap();
    let changes: Arc<Mutex<HashMap<i64, Vec<String>>>> = Arc::default();
    let record = changes.clone();
    control
        .add_broadcast_subscriber(
            BroadcastFilter::new().subject("state_changed.*"),
            move |b: Broadcast<Value>| {
                let pid = b
                    .sender
                    .as_ref()
                    .and_then(Value::as_i64)
                    .expect("an integer pid");
                let subject = b.subject_text().unwrap_or_default().into_owned();
                record.lock().unwrap().entry(pid).or_default().push(subject);
                async { Ok(()) }
            },
        )
        .await
        .unwrap();

    let started = Instant::now();
    let launched: Vec<Value> = futures::stream::iter(1..=PROCESSES)
        .map(|pid| {
            let control = control.clone();
            async move {
                let task = workflow::continue_task(pid, true);
                let reply = control.task_send::<_, Value>(&task).await.unwrap();
                reply.await.unwrap()
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let launching = started.elapsed();
    assert_eq!(launched.len(), PROCESSES as usize);
    assert_eq!(worker.health().await.rpc_subscribers, PROCESSES as usize);

    let call = |pid: i64, intent: &'static str| {
        let control = control.clone();
        async move {
            control
                .rpc_send::<_, Value>(&pid.to_string(), &workflow::intent(intent))
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    let with_role = |wanted: &'static str| (1..=PROCESSES).filter(move |pid| role(*pid) == wanted);
    for pid in with_role("paused then played") {
        assert_eq!(call(pid, "pause").await, Value::from(true), "pause {pid}");
    }
    for pid in with_role("killed") {
        assert_eq!(call(pid, "kill").await, Value::from(true), "kill {pid}");
    }
    for pid in with_role("paused then played").take(50) {
        let status = call(pid, "status").await;
        assert_eq!(status["paused"], Value::from(true), "{status}");
        assert_eq!(
            status["process_string"].as_str(),
            Some(format!("<Process pk={pid}>").as_str())
        );
    }
    for pid in with_role("paused then played") {
        assert_eq!(call(pid, "play").await, Value::from(true), "play {pid}");
    }

    let over = |subjects: &Vec<String>| {
        subjects
            .last()
            .is_some_and(|last| last.ends_with(".finished") || last.ends_with(".killed"))
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let unfinished: Vec<(i64, Vec<String>)> = {
            let changes = changes.lock().unwrap();
            (1..=PROCESSES)
                .filter(|pid| !changes.get(pid).is_some_and(over))
                .map(|pid| (pid, changes.get(&pid).cloned().unwrap_or_default()))
                .collect()
        };
        if unfinished.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} processes never ended, e.g. {:?}",
            unfinished.len(),
            &unfinished[..unfinished.len().min(3)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let changes = std::mem::take(&mut *changes.lock().unwrap());
    let mut broadcasts = 0;
    for pid in 1..=PROCESSES {
        let subjects = &changes[&pid];
        broadcasts += subjects.len();
        assert_eq!(
            subjects[0], "state_changed.None.created",
            "pid {pid}: {subjects:?}"
        );
        assert_eq!(
            subjects[1], "state_changed.created.running",
            "pid {pid}: {subjects:?}"
        );
        // Each announces a move from the state the previous one moved to.
        for pair in subjects.windows(2) {
            let to = pair[0].rsplit('.').next().unwrap();
            let from = pair[1].split('.').nth(1).unwrap();
            assert_eq!(from, to, "pid {pid}: {subjects:?}");
        }
        let end = subjects.last().unwrap();
        match role(pid) {
            "killed" => assert!(end.ends_with(".killed"), "pid {pid}: {subjects:?}"),
            _ => assert_eq!(
                end, "state_changed.waiting.finished",
                "pid {pid}: {subjects:?}"
            ),
        }
    }
    println!(
        "[workflow figures] {PROCESSES} process actors on one worker: launched in {launching:.1?}, {} paused and played, {} killed, {broadcasts} state changes announced and checked, {:.1?} in all",
        with_role("paused then played").count(),
        with_role("killed").count(),
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.health().await.rpc_subscribers > 0 {
        assert!(
            Instant::now() < deadline,
            "finished processes stop listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    control.close().await.unwrap();
    worker.close().await.unwrap();
}
