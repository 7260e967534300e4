//! The three message types on the embedded in-process broker (`mem://`): no RabbitMQ
//! needed. Run with `cargo run --example quickstart`.

#[path = "common/cli.rs"]
mod cli;

use actix::prelude::*;
use kiwimq::prelude::*;

/// A worker actor: squares numbers, and refuses negative ones.
struct Squarer;

impl Actor for Squarer {
    type Context = Context<Self>;
}

impl Handler<Task<i64>> for Squarer {
    type Result = Result<i64, HandlerError>;

    fn handle(&mut self, task: Task<i64>, _: &mut Context<Self>) -> Self::Result {
        println!("  worker: got task {}", task.body);
        if task.body < 0 {
            return Err(HandlerError::failed(format!("{} is negative", task.body)));
        }
        Ok(task.body * task.body)
    }
}

/// An RPC actor answering under the identifier `greeter`.
struct Greeter;

impl Actor for Greeter {
    type Context = Context<Self>;
}

impl Handler<Rpc<String>> for Greeter {
    type Result = Result<String, HandlerError>;

    fn handle(&mut self, rpc: Rpc<String>, _: &mut Context<Self>) -> Self::Result {
        Ok(format!("hello, {}", rpc.body))
    }
}

/// A broadcast listener; tells `heard` of each broadcast it printed.
struct Announcer(&'static str, tokio::sync::mpsc::UnboundedSender<()>);

impl Actor for Announcer {
    type Context = Context<Self>;
}

impl Handler<Broadcast<String>> for Announcer {
    type Result = Result<(), HandlerError>;

    fn handle(&mut self, b: Broadcast<String>, _: &mut Context<Self>) -> Self::Result {
        println!(
            "  {}: broadcast {} from {}: {}",
            self.0,
            b.subject_text().unwrap_or_default(),
            b.sender_text().as_deref().unwrap_or("nobody"),
            b.body
        );
        let _ = self.1.send(());
        Ok(())
    }
}

#[actix::main]
async fn main() -> cli::Outcome {
    cli::init_logging();
    // Two communicators on one named in-process broker, as a client and a worker process
    // would share one RabbitMQ.
    let worker = kiwimq::connect("mem://quickstart").await?;
    let client = kiwimq::connect("mem://quickstart").await?;

    println!("tasks: one of N workers, at-least-once, acked after the handler");
    worker.add_task_subscriber(Squarer.start()).await?;
    let result: i64 = client.task_send(&12i64).await?.await?;
    println!("  client: 12 squared is {result}");
    match client.task_send::<_, i64>(&-1i64).await?.await {
        Err(error) => println!("  client: task failed as expected: {error}"),
        Ok(value) => println!("  client: unexpected result {value}"),
    }

    println!("RPC: one named receiver");
    worker
        .add_rpc_subscriber(Some("greeter"), Greeter.start())
        .await?;
    let greeting: String = client.rpc_send("greeter", "kiwimq").await?.await?;
    println!("  client: {greeting}");
    if let Err(error) = client.rpc_send::<_, String>("nobody", "x").await {
        println!("  client: rpc to an unknown identifier: {error}");
    }

    println!("broadcasts: every subscriber whose filter matches");
    let (told, mut heard) = tokio::sync::mpsc::unbounded_channel();
    worker
        .add_broadcast_subscriber(
            BroadcastFilter::new(),
            Announcer("all", told.clone()).start(),
        )
        .await?;
    worker
        .add_broadcast_subscriber(
            BroadcastFilter::new().subject("job.*"),
            Announcer("jobs only", told).start(),
        )
        .await?;
    client
        .broadcast_send(
            "step 3 finished",
            BroadcastOptions::subject("job.progress").with_sender("client"),
        )
        .await?;
    client
        .broadcast_send("lunch is ready", BroadcastOptions::subject("kitchen"))
        .await?;
    // Three deliveries: both broadcasts to "all", the job's to "jobs only". Broadcasts are
    // delivered asynchronously; wait for them (a little) so the output reads in order.
    for _ in 0..3 {
        let wait = std::time::Duration::from_secs(5);
        if !matches!(tokio::time::timeout(wait, heard.recv()).await, Ok(Some(()))) {
            println!("  (a broadcast did not arrive within {wait:?})");
            break;
        }
    }

    println!("pull mode: take a task, hold it, decide");
    let queue = client.task_queue("manual");
    let pending = queue.task_send::<_, String>("reticulate splines").await?;
    let task = queue
        .next_task::<String>(std::time::Duration::from_secs(1))
        .await?;
    println!("  puller: took {:?}", task.body());
    task.process(Ok("splines reticulated")).await?;
    println!("  client: {}", pending.await?);

    client.close().await?;
    worker.close().await?;
    println!("closed");
    Ok(())
}
