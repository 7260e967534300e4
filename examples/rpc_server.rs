//! Serves Fibonacci numbers over RPC under the identifier `fib` until Ctrl-C.
//! `cargo run --example rpc_server -- [--uri URI] [--codec NAME]`

#[path = "common/cli.rs"]
mod cli;

use actix::prelude::*;
use clap::Parser;
use kiwimq::{HandlerError, Rpc};

/// Serves `fib(n)` under the RPC identifier `fib` until Ctrl-C or SIGTERM.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
}

/// The RPC subscriber: `fib(n)`.
struct Fib;

impl Actor for Fib {
    type Context = Context<Self>;
}

impl Handler<Rpc<u64>> for Fib {
    type Result = Result<u64, HandlerError>;

    fn handle(&mut self, rpc: Rpc<u64>, _: &mut Context<Self>) -> Self::Result {
        println!(" [.] fib({})", rpc.body);
        let (mut a, mut b) = (0u64, 1u64);
        for _ in 0..rpc.body {
            (a, b) = (
                b,
                a.checked_add(b)
                    .ok_or_else(|| HandlerError::failed("fib overflows u64"))?,
            );
        }
        Ok(a)
    }
}

#[actix::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let comm = cli.connection.connect().await?;
    comm.add_rpc_subscriber(Some("fib"), Fib.start()).await?;
    println!(" [x] Awaiting RPC requests (Ctrl-C to stop)");
    kiwimq::shutdown_signal().await;
    comm.close().await
}
