//! Sends the words of its arguments as one task to the default queue and waits a little
//! for its result (the task stays queued for a worker if none answers in time).
//! With `--count N` it sends N numbered tasks and counts the results, for chaos runs.
//! `cargo run --example new_task -- [--uri URI] [--codec NAME] [--count N] Hello world...`

#[path = "common/cli.rs"]
mod cli;

use std::time::Duration;

use clap::Parser;
use futures::StreamExt;

/// Sends the words of its arguments as one task and prints the result.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
    /// How many seconds to wait for the results.
    #[arg(long, default_value_t = 10)]
    wait: u64,
    /// How many tasks to send (numbered `#1`, `#2`, … after the words when more than one).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// The task's words.
    words: Vec<String>,
}

#[actix::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let message = if cli.words.is_empty() {
        "Hello World!".to_string()
    } else {
        cli.words.join(" ")
    };
    let comm = cli.connection.connect().await?;
    if cli.count > 1 {
        return send_many(&comm, &message, cli.count, Duration::from_secs(cli.wait)).await;
    }
    let result = comm.task_send::<_, serde_json::Value>(&message).await?;
    println!(" [x] Sent {message:?}");
    match tokio::time::timeout(Duration::from_secs(cli.wait), result).await {
        Ok(Ok(value)) => println!(" [x] Result: {value}"),
        Ok(Err(error)) => println!(" [!] The task failed: {error}"),
        Err(_) if cli.connection.uri.starts_with("mem://") => println!(
            " [ ] No result within {} s. mem:// is this process's own broker: no worker of \
             another process can take the task, and it ends with this process. Start a \
             worker with the same --uri amqp://… to share a queue.",
            cli.wait
        ),
        Err(_) => println!(
            " [ ] No result within {} s; the task waits in the queue for a worker",
            cli.wait
        ),
    }
    comm.close().await
}

/// Sends `count` numbered tasks, then counts their results as they come, within `wait`.
async fn send_many(
    comm: &kiwimq::Communicator,
    message: &str,
    count: usize,
    wait: Duration,
) -> kiwimq::Result<()> {
    let mut results = futures::stream::FuturesUnordered::new();
    for n in 1..=count {
        let result = comm
            .task_send::<_, serde_json::Value>(&format!("{message} #{n}"))
            .await?;
        results.push(result);
    }
    println!(" [x] Sent {count} tasks");
    let (mut ok, mut failed) = (0, 0);
    let collect = async {
        while let Some(result) = results.next().await {
            match result {
                Ok(_) => ok += 1,
                Err(error) => {
                    failed += 1;
                    println!(" [!] A task failed: {error}");
                }
            }
        }
    };
    let _ = tokio::time::timeout(wait, collect).await;
    println!(
        " [x] sent {count}, results {ok}, failed {failed}, missing {}",
        count - ok - failed
    );
    comm.close().await
}
