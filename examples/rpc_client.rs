//! Asks the `fib` RPC subscriber for a Fibonacci number (30 by default: prints 832040).
//! `cargo run --example rpc_client -- [--n 30] [--uri URI] [--codec NAME]`

#[path = "common/cli.rs"]
mod cli;

use clap::Parser;

/// Asks the `fib` RPC subscriber for a Fibonacci number and prints it.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
    /// Which Fibonacci number to ask for.
    #[arg(long, default_value_t = 30)]
    n: u64,
}

#[actix::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let comm = cli.connection.connect().await?;
    let result: u64 = comm.rpc_send("fib", &cli.n).await?.await?;
    println!("{result}");
    comm.close().await
}
