//! The `worker` example without async: consumes the default task queue, one second per `.`
//! in each task, in a plain `fn main`; the handler simply sleeps. Stops on Ctrl-C or SIGTERM.
//! `cargo run --example blocking_worker -- [--uri URI] [--codec NAME]`

#[path = "common/cli.rs"]
mod cli;

use std::time::Duration;

use clap::Parser;
use kiwimq::Task;

/// Consumes the default task queue in plain `fn main` (blocking handlers); a task takes one second per `.`. Stops on Ctrl-C or SIGTERM.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
}

fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let comm = cli.connection.connect_blocking()?;
    comm.add_task_subscriber(|task: Task<serde_json::Value, bool>| {
        let redelivered = if task.redelivered {
            " (redelivered)"
        } else {
            ""
        };
        println!(" [x] Received {}{redelivered}", task.body);
        let dots = task.body.as_str().map_or(0, |s| s.matches('.').count());
        // Blocking is fine: the handler runs on a worker thread, not the connection's.
        std::thread::sleep(Duration::from_secs(dots as u64));
        println!(" [x] Done");
        Ok(true)
    })?;
    println!(" [*] Waiting for tasks on the default queue (Ctrl-C to stop)");
    cli::wait_for_shutdown_signal();
    comm.close()
}
