//! The `rpc_client` example without async: asks the `fib` RPC subscriber (the `rpc_server`
//! example, or kiwiPy's `rmq_rpc_server.py` with `--codec yaml`) for a Fibonacci number.
//! `cargo run --example blocking_rpc_client -- [--n 30] [--timeout 10] [--uri URI] [--codec NAME]`

#[path = "common/cli.rs"]
mod cli;

use std::time::Duration;

use clap::Parser;

/// Asks the `fib` RPC subscriber for a Fibonacci number with the blocking communicator, waiting with a timeout.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
    /// Which Fibonacci number to ask for.
    #[arg(long, default_value_t = 30)]
    n: u64,
    /// How many seconds to wait for the answer.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let comm = cli.connection.connect_blocking()?;
    println!(" [x] Requesting fib({})", cli.n);
    let mut reply = comm.rpc_send::<_, u64>("fib", &cli.n)?;
    match reply.wait_timeout(Duration::from_secs(cli.timeout)) {
        Ok(value) => println!("{value}"),
        Err(error) => println!(" [!] {error}"),
    }
    comm.close()
}
