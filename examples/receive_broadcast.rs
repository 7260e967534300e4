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
    /// Only broadcasts whose sender matches this pattern (`47` matches AiiDA's integer pk).
    #[arg(long)]
    sender: Option<String>,
}

#[actix::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let comm = cli.connection.connect().await?;
    let mut filter = BroadcastFilter::new();
    if let Some(pattern) = &cli.subject {
        filter = filter.subject(pattern);
    }
    if let Some(pattern) = &cli.sender {
        filter = filter.sender(pattern);
    }
    comm.add_broadcast_subscriber(filter, |b: Broadcast<serde_json::Value>| async move {
        println!(
            " [x] sender={} subject={} body={}",
            b.sender_text().unwrap_or_default(),
            b.subject_text().unwrap_or_default(),
            b.body
        );
        Ok(())
    })
    .await?;
    println!(" [*] Waiting for broadcasts (Ctrl-C to stop)");
    kiwimq::shutdown_signal().await;
    comm.close().await
}
