//! Sends the words of its arguments as one task to the default queue and waits a little
//! for its result (the task stays queued for a worker if none answers in time).
//! `cargo run --example new_task -- [--uri URI] [--codec NAME] Hello world...`

#[path = "common/cli.rs"]
mod cli;

use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
    /// How many seconds to wait for the result.
    #[arg(long, default_value_t = 10)]
    wait: u64,
    /// The task's words.
    words: Vec<String>,
}

#[actix::main]
async fn main() -> kiwimq::Result<()> {
    let cli = Cli::parse();
    let message = if cli.words.is_empty() {
        "Hello World!".to_string()
    } else {
        cli.words.join(" ")
    };
    let comm = cli.connection.connect().await?;
    let result = comm.task_send::<_, serde_json::Value>(&message).await?;
    println!(" [x] Sent {message:?}");
    match tokio::time::timeout(Duration::from_secs(cli.wait), result).await {
        Ok(Ok(value)) => println!(" [x] Result: {value}"),
        Ok(Err(error)) => println!(" [!] The task failed: {error}"),
        Err(_) => println!(
            " [ ] No result within {} s; the task waits in the queue",
            cli.wait
        ),
    }
    comm.close().await
}
