//! A worker process on kiwimq's fleet runner: `--concurrency` supervised workers on a task
//! queue, a health line every few seconds, a graceful stop on SIGTERM or Ctrl-C (running
//! tasks get the grace; unfinished ones go back to the queue). A task takes one second per
//! `.` in it, as in kiwiPy's worker example; a task containing `panic` panics its worker,
//! which answers the sender with the panic and is started afresh.
//! `cargo run --example fleet -- [--queue NAME] [--concurrency N] [--uri URI] [--codec NAME]`
//! then `cargo run --example new_task -- Hello... ` and `cargo run --example new_task -- panic`.

#[path = "common/cli.rs"]
mod cli;

use std::time::Duration;

use actix::prelude::*;
use clap::Parser;
use kiwimq::{Fleet, HandlerError, Task, supervised};

/// Runs a fleet of supervised workers on a task queue until SIGTERM or Ctrl-C.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
    /// The task queue to work on (kiwiPy's default queue unless given).
    #[arg(long, default_value = "kiwipy.tasks")]
    queue: String,
    /// How many workers run at once.
    #[arg(long, default_value_t = 4)]
    concurrency: u16,
    /// Seconds between health lines on stderr.
    #[arg(long, default_value_t = 5)]
    report_every: u64,
}

/// One worker: handles one task at a time.
#[derive(Default)]
struct Worker;

impl Actor for Worker {
    type Context = Context<Self>;
}

impl Handler<Task<serde_json::Value, bool>> for Worker {
    type Result = ResponseFuture<Result<bool, HandlerError>>;

    fn handle(
        &mut self,
        task: Task<serde_json::Value, bool>,
        _: &mut Context<Self>,
    ) -> Self::Result {
        let text = task.body.as_str().unwrap_or_default().to_owned();
        println!(" [x] Received {}", task.body);
        assert!(!text.contains("panic"), "asked to panic by {text:?}");
        Box::pin(async move {
            let dots = text.matches('.').count() as u64;
            actix_rt::time::sleep(Duration::from_secs(dots)).await;
            println!(" [x] Done {text:?}");
            Ok(true)
        })
    }
}

#[actix::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let settings = cli.connection.settings();
    let fleet = Fleet::new(settings)
        .tasks(&cli.queue, cli.concurrency, supervised(Worker::default))
        .start()
        .await?;
    println!(
        " [*] {} workers on {} (Ctrl-C or SIGTERM to stop)",
        fleet.workers(),
        cli.queue
    );
    let comm = fleet.communicator().clone();
    let every = Duration::from_secs(cli.report_every.max(1));
    actix_rt::spawn(async move {
        loop {
            actix_rt::time::sleep(every).await;
            if comm.is_closed() {
                return;
            }
            let health = comm.health().await;
            eprintln!(
                " [h] connected={} workers={} running={} restarts={} lost={}",
                health.connected,
                health.task_subscribers,
                health.tasks_running,
                health.restarts,
                health.subscribers_lost
            );
        }
    });
    fleet.run_until_signal().await
}
