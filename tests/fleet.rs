//! The fleet runner under fire, on RabbitMQ: three worker processes of this test binary,
//! each a `kiwimq::Fleet` of four supervised workers; 10,000 tasks of which 1% panic their
//! worker; one process SIGKILLed midway. Every other task completes, every panicking one is
//! answered `Remote`, none is lost, and the surviving processes still have all their
//! workers. Prints its figures.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kiwimq::{ErrorKind, Fleet, HandlerError, Task, supervised};

use common::child::{Child, child_settings};
use common::{SOON, amqp_settings, amqp_url};

const TASKS: u32 = 10_000;
const PROCESSES: usize = 3;
const WORKERS: u16 = 4;

fn poisoned(n: u32) -> bool {
    n % 100 == 7
}

static HANDLED: AtomicUsize = AtomicUsize::new(0);
static REDELIVERED: AtomicUsize = AtomicUsize::new(0);

/// Doubles a number after a millisecond's work; panics on a poisoned one.
#[derive(Default, Clone)]
struct Worker;

impl Actor for Worker {
    type Context = Context<Self>;
}

impl Handler<Task<u32>> for Worker {
    type Result = ResponseFuture<Result<u32, HandlerError>>;

    fn handle(&mut self, task: Task<u32>, _: &mut Context<Self>) -> Self::Result {
        HANDLED.fetch_add(1, Ordering::Relaxed);
        if task.redelivered {
            REDELIVERED.fetch_add(1, Ordering::Relaxed);
        }
        assert!(!poisoned(task.body), "poison task {}", task.body);
        Box::pin(async move {
            actix_rt::time::sleep(Duration::from_millis(1)).await;
            Ok(task.body * 2)
        })
    }
}

/// A worker process: runs a fleet until SIGTERM, then reports its health and what it
/// handled. Only `a_fleet_survives_panics_and_a_killed_process` runs it.
#[actix_rt::test]
#[ignore = "a worker process started by a_fleet_survives_panics_and_a_killed_process"]
async fn fleet_worker_process() {
    let settings = child_settings().expect("run by the fleet fault test");
    let queue = settings.task_queue().to_owned();
    let worker = supervised(Worker::default)
        .with_backoff(Duration::from_millis(5), Duration::from_millis(20))
        .with_max_restarts_per_minute(10_000);
    let fleet = Fleet::new(settings)
        .tasks(queue, WORKERS, worker)
        .start()
        .await
        .unwrap();
    println!("kiwimq-fleet: ready");
    fleet.wait_for_stop().await;
    let health = fleet.health().await;
    println!(
        "kiwimq-fleet: workers {} restarts {} lost {} handled {} redelivered {}",
        health.task_subscribers,
        health.restarts,
        health.subscribers_lost,
        HANDLED.load(Ordering::Relaxed),
        REDELIVERED.load(Ordering::Relaxed)
    );
    fleet.close().await.unwrap();
}

/// `workers 4 restarts 31 lost 0 handled 3301 redelivered 2` as numbers by name.
fn figures(line: &str) -> HashMap<String, u64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .chunks(2)
        .map(|pair| (pair[0].to_owned(), pair[1].parse().unwrap()))
        .collect()
}

#[actix_rt::test]
async fn a_fleet_survives_panics_and_a_killed_process() {
    let settings = amqp_settings(&amqp_url());
    let mut processes: Vec<Child> = (0..PROCESSES)
        .map(|_| Child::start("fleet_worker_process", &settings))
        .collect();
    for process in &mut processes {
        process.expect("kiwimq-fleet: ready").await;
    }

    let client = settings.connect().await.unwrap();
    let started = Instant::now();
    // Sends go on (256 confirms awaited at once) while results come back.
    let (sent, mut to_wait) = futures::channel::mpsc::unbounded();
    let sender = client.clone();
    actix_rt::spawn(async move {
        let mut sends = futures::stream::iter(0..TASKS)
            .map(|n| {
                let sender = sender.clone();
                async move { (n, sender.task_send::<_, u32>(&n).await.unwrap()) }
            })
            .buffer_unordered(256);
        while let Some(reply) = sends.next().await {
            let _ = sent.unbounded_send(reply);
        }
    });
    let mut waiting = FuturesUnordered::new();
    let (mut completed, mut panicked, mut wrong) = (0, 0, Vec::new());
    let mut killed_at = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while completed + panicked + wrong.len() < TASKS as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = async {
            loop {
                tokio::select! {
                    Some((n, reply)) = to_wait.next() => {
                        waiting.push(async move { (n, reply.await) });
                    }
                    Some(answered) = waiting.next() => return Some(answered),
                    else => return None,
                }
            }
        };
        let Ok(Some((n, result))) = tokio::time::timeout(left, next).await else {
            break;
        };
        match result {
            Ok(doubled) if doubled == n * 2 && !poisoned(n) => completed += 1,
            Err(error)
                if poisoned(n)
                    && matches!(error.kind(), ErrorKind::Remote(text) if text.contains(&format!("poison task {n}"))) =>
            {
                panicked += 1;
            }
            other => wrong.push((n, format!("{other:?}"))),
        }
        if killed_at.is_none() && completed + panicked >= TASKS as usize / 3 {
            processes[0].signal("-KILL");
            killed_at = Some(started.elapsed());
        }
    }
    let lost = TASKS as usize - completed - panicked - wrong.len();

    let mut survivors = Vec::new();
    for process in &mut processes[1..] {
        process.signal("-TERM");
        survivors.push(figures(&process.expect("kiwimq-fleet: ").await));
        let status = tokio::time::timeout(SOON, process.process.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "a graceful stop exits cleanly: {status}");
    }
    let handled: u64 = survivors.iter().map(|f| f["handled"]).sum();
    let redelivered: u64 = survivors.iter().map(|f| f["redelivered"]).sum();
    let restarts: u64 = survivors.iter().map(|f| f["restarts"]).sum();
    println!(
        "[fault figures] fleet of {PROCESSES} processes x {WORKERS} supervised workers, 1% poison tasks, one process SIGKILLed at {killed_at:.1?}: sent {TASKS}, completed {completed}, answered Remote (panicked) {panicked}, wrong {}, lost {lost}; the survivors handled {handled} (redelivered {redelivered}), restarted workers {restarts} times; {:.1?} in all",
        wrong.len(),
        started.elapsed()
    );
    assert!(wrong.is_empty(), "{:?}", &wrong[..wrong.len().min(5)]);
    assert_eq!(lost, 0);
    assert_eq!(panicked, (0..TASKS).filter(|n| poisoned(*n)).count());
    assert!(killed_at.is_some(), "a process was killed midway");
    for survivor in &survivors {
        assert_eq!(
            survivor["workers"],
            u64::from(WORKERS),
            "no worker lost: {survivor:?}"
        );
        assert_eq!(survivor["lost"], 0, "{survivor:?}");
    }
    client.close().await.unwrap();
}

/// A worker that panics on every task.
#[derive(Default, Clone)]
struct Doomed;

impl Actor for Doomed {
    type Context = Context<Self>;
}

impl Handler<Task<u32>> for Doomed {
    type Result = Result<u32, HandlerError>;

    fn handle(&mut self, task: Task<u32>, _: &mut Context<Self>) -> Self::Result {
        panic!("doomed on task {}", task.body);
    }
}

/// A fleet whose every worker is lost stops, even when the losses came before anyone
/// waited, and in a crowd (100 workers): the count is kept where the losses are, not read
/// from events a receiver may miss.
#[actix_rt::test]
async fn a_fleet_whose_every_worker_was_lost_stops() {
    const DOOMED: u16 = 100;
    let settings = kiwimq::Settings::new(format!("mem://{}", uuid::Uuid::new_v4().simple()));
    let fleet = Fleet::new(settings)
        .tasks(
            "doomed",
            DOOMED,
            supervised(Doomed::default).with_max_restarts_per_minute(0),
        )
        .start()
        .await
        .unwrap();
    let queue = fleet.communicator().task_queue("doomed");
    for n in 0..u32::from(DOOMED) {
        queue.task_send_no_reply(&n).await.unwrap();
    }
    let deadline = Instant::now() + SOON;
    while fleet.health().await.subscribers_lost < u64::from(DOOMED) {
        assert!(Instant::now() < deadline, "{:?}", fleet.health().await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stop = tokio::time::timeout(SOON, fleet.wait_for_stop())
        .await
        .expect("the fleet stops");
    assert_eq!(stop, kiwimq::Stop::WorkersLost);
    fleet.close().await.unwrap();
}
