//! Sends one broadcast: `cargo run --example emit_broadcast -- [--uri URI] [--codec NAME]
//! [--sender NAME] SUBJECT BODY...`

#[path = "common/cli.rs"]
mod cli;

use clap::Parser;
use kiwimq::BroadcastOptions;

/// Sends one broadcast with a subject, a body and an optional sender.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
    /// Who sends it; a number is sent as an integer, as AiiDA's process pk is.
    #[arg(long)]
    sender: Option<String>,
    /// What it is about.
    subject: String,
    /// Its words.
    body: Vec<String>,
}

#[actix::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let comm = cli.connection.connect().await?;
    let body = cli.body.join(" ");
    let mut options = BroadcastOptions::subject(cli.subject.clone());
    options.sender = cli.sender.map(|sender| match sender.parse::<i64>() {
        Ok(number) => kiwimq::Value::from(number),
        Err(_) => kiwimq::Value::from(sender),
    });
    comm.broadcast_send(&body, options).await?;
    println!(" [x] Sent {:?}: {body:?}", cli.subject);
    comm.close().await
}
