//! Prints every broadcast (or those whose subject matches `--subject`, `*` as wildcard)
//! until Ctrl-C. `cargo run --example receive_broadcast -- [--uri URI] [--codec NAME]
//! [--subject PATTERN]`

#[path = "common/cli.rs"]
mod cli;

use clap::Parser;
use kiwimq::{Broadcast, BroadcastFilter};

/// Prints the sender, subject and body of every broadcast that passes the filters, until Ctrl-C or SIGTERM.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
    /// Only broadcasts whose subject matches this pattern.
    #[arg(long)]
    subject: Option<String>,
}

#[actix::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let comm = cli.connection.connect().await?;
    let filter = match &cli.subject {
        Some(pattern) => BroadcastFilter::new().subject(pattern),
        None => BroadcastFilter::new(),
    };
    comm.add_broadcast_subscriber(filter, |b: Broadcast<serde_json::Value>| async move {
        println!(
            " [x] sender={:?} subject={:?} body={}",
            b.sender, b.subject, b.body
        );
        Ok(())
    })
    .await?;
    println!(" [*] Waiting for broadcasts (Ctrl-C to stop)");
    cli::shutdown_signal().await;
    Ok(comm.close().await?)
}
