//! Bounded intake on RabbitMQ: a flood of RPCs to a slow subscriber waits in the broker,
//! not in the worker's memory. The worker is a process of its own (this binary run again),
//! so its peak resident memory is its own; the test prints it.

mod common;

use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::StreamExt;
use kiwimq::{Broadcast, BroadcastFilter, BroadcastOptions, HandlerError, Rpc};

use common::child::{Child, child_settings};
use common::{amqp_settings, amqp_url};

const CALLS: usize = 10_000;
const BROADCASTS: usize = 5_000;
const BODY: usize = 16 * 1024;

/// The slow subscriber: 2 ms a call or a broadcast, one at a time (an actor's mailbox).
#[derive(Default)]
struct Slow {
    heard: usize,
}

impl Actor for Slow {
    type Context = Context<Self>;
}

impl Handler<Broadcast<serde_bytes::ByteBuf>> for Slow {
    type Result = Result<(), HandlerError>;

    fn handle(
        &mut self,
        _: Broadcast<serde_bytes::ByteBuf>,
        _: &mut Context<Self>,
    ) -> Self::Result {
        std::thread::sleep(Duration::from_millis(2));
        self.heard += 1;
        if self.heard.is_multiple_of(1_000) {
            println!("kiwimq-child: heard {}", self.heard);
        }
        Ok(())
    }
}

impl Handler<Rpc<serde_bytes::ByteBuf, usize>> for Slow {
    type Result = Result<usize, HandlerError>;

    fn handle(
        &mut self,
        rpc: Rpc<serde_bytes::ByteBuf, usize>,
        _: &mut Context<Self>,
    ) -> Self::Result {
        std::thread::sleep(Duration::from_millis(2));
        Ok(rpc.body.len())
    }
}

/// The worker process of `a_flood_of_rpcs_waits_in_the_broker`: serves the identifier it
/// is given (as its task queue's name) with the slow actor.
#[actix_rt::test]
#[ignore = "a worker process started by a_flood_of_rpcs_waits_in_the_broker"]
async fn flood_worker() {
    let settings = child_settings().expect("run by a_flood_of_rpcs_waits_in_the_broker");
    let identifier = settings.task_queue().to_owned();
    let comm = settings.connect().await.unwrap();
    let slow = Slow::default().start();
    comm.add_rpc_subscriber(Some(&identifier), slow.clone())
        .await
        .unwrap();
    comm.add_broadcast_subscriber(BroadcastFilter::new().subject(&identifier), slow)
        .await
        .unwrap();
    println!("kiwimq-child: ready");
    futures::future::pending::<()>().await;
}

/// A process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .expect("a VmHWM line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

/// 10,000 calls of 16 KiB (160 MiB in all) sent at once to a worker whose subscriber
/// takes 2 ms each: every call is answered, and the worker's peak memory stays far below
/// what holding the flood would cost (a worker without a prefetch window peaked at 321 MB);
/// then 5,000 broadcasts of 16 KiB, all heard, the same.
#[actix_rt::test]
async fn a_flood_of_rpcs_waits_in_the_broker() {
    let settings = amqp_settings(&amqp_url());
    let mut worker = Child::start("flood_worker", &settings);
    worker.expect("kiwimq-child: ready").await;
    let pid = worker.process.id().expect("running");
    let identifier = settings.task_queue().to_owned();
    let at_rest = peak_rss(pid);

    let client = settings.connect().await.unwrap();
    let body = serde_bytes::ByteBuf::from(vec![7u8; BODY]);
    let started = Instant::now();
    // Every call is sent before the first answers are awaited: the flood is all out.
    let replies: Vec<_> = futures::stream::iter(0..CALLS)
        .map(|_| client.rpc_send::<_, usize>(&identifier, &body))
        .buffer_unordered(256)
        .map(|sent| sent.unwrap().with_timeout(Some(Duration::from_secs(300))))
        .collect()
        .await;
    let sent = started.elapsed();
    let answered = futures::stream::iter(replies)
        .buffer_unordered(CALLS)
        .filter(|answer| futures::future::ready(answer.as_ref().ok() == Some(&BODY)))
        .count()
        .await;
    let peak = peak_rss(pid);
    println!(
        "[intake figures] {CALLS} RPCs of {} KiB to a 2 ms actor: sent in {sent:?}, {answered} answered in {:?}; worker peak RSS {:.1} MB (at rest {:.1} MB)",
        BODY / 1024,
        started.elapsed(),
        peak as f64 / 1e6,
        at_rest as f64 / 1e6,
    );
    assert_eq!(answered, CALLS, "every call is answered");
    assert!(
        peak < 100_000_000,
        "the worker held the flood of calls: peak RSS {peak} bytes"
    );

    // The same for broadcasts, fire and forget: all sent, then all heard.
    let started = Instant::now();
    futures::stream::iter(0..BROADCASTS)
        .for_each_concurrent(256, |_| async {
            client
                .broadcast_send(&body, BroadcastOptions::subject(identifier.as_str()))
                .await
                .unwrap();
        })
        .await;
    let sent = started.elapsed();
    // 10 s of work at 2 ms each: a deadline, not a pace.
    worker
        .expect_within(
            &format!("kiwimq-child: heard {BROADCASTS}"),
            Duration::from_secs(120),
        )
        .await;
    let peak = peak_rss(pid);
    println!(
        "[intake figures] {BROADCASTS} broadcasts of {} KiB to a 2 ms actor: sent in {sent:?}, all heard in {:?}; worker peak RSS {:.1} MB",
        BODY / 1024,
        started.elapsed(),
        peak as f64 / 1e6,
    );
    assert!(
        peak < 100_000_000,
        "the worker held the flood of broadcasts: peak RSS {peak} bytes"
    );
    client.close().await.unwrap();
}
