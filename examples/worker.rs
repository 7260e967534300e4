//! Consumes the default task queue (`kiwipy.tasks`), printing each task; a task takes one
//! second per `.` in it, as in kiwiPy's worker example. Runs until Ctrl-C.
//! `cargo run --example worker -- [--uri URI] [--codec NAME]`

#[path = "common/cli.rs"]
mod cli;

use std::time::Duration;

use clap::Parser;
use kiwimq::Task;

/// Consumes the default task queue, printing each task; a task takes one second per `.`. Stops on Ctrl-C or SIGTERM.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
}

#[actix::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let comm = cli.connection.connect().await?;
    comm.add_task_subscriber(|task: Task<serde_json::Value, bool>| async move {
        println!(
            " [x] Received {}{}",
            task.body,
            if task.redelivered {
                " (redelivered)"
            } else {
                ""
            }
        );
        let dots = task.body.as_str().map_or(0, |s| s.matches('.').count());
        actix_rt::time::sleep(Duration::from_secs(dots as u64)).await;
        println!(" [x] Done");
        Ok(true)
    })
    .await?;
    println!(" [*] Waiting for tasks on the default queue (Ctrl-C to stop)");
    kiwimq::shutdown_signal().await;
    comm.close().await
}
