//! Workflow processes as actors, the way AiiDA runs them: a `worker` hosts processes
//! launched by `continue` tasks; each listens on RPC `<pid>` (pause, play, kill, status) and
//! announces every state change as a broadcast `state_changed.<from>.<to>` from its pid.
//! Names follow AiiDA's profile prefixes (`--prefix aiida-<profile uuid>` talks to a real
//! AiiDA; use `--codec yaml` then).
//!
//! ```text
//! cargo run --example workflow -- worker &                 # hosts processes
//! cargo run --example workflow -- watch &                  # prints every state change
//! cargo run --example workflow -- launch 1 2 3             # launches pids 1, 2, 3 (--wait: until done)
//! cargo run --example workflow -- control 2 pause          # true
//! cargo run --example workflow -- control 2 status         # {"ctime":…,"paused":true,…}
//! cargo run --example workflow -- control 2 play
//! cargo run --example workflow -- control 3 kill
//! ```

#[path = "common/cli.rs"]
mod cli;
#[path = "common/workflow.rs"]
mod workflow;

use std::time::Duration;

use actix::prelude::*;
use clap::{Parser, Subcommand};
use kiwimq::{Broadcast, BroadcastFilter, Value};

/// Workflow processes as actors on plumpy's control protocol (AiiDA's).
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
    /// The name prefix: exchanges `<prefix>.messages` and `<prefix>.tasks`, process queue
    /// `<prefix>.process.queue` (AiiDA: `aiida-<profile uuid>`).
    #[arg(long, default_value = "kiwimq-workflow")]
    prefix: String,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Hosts the processes that `continue` tasks launch, until Ctrl-C or SIGTERM.
    Worker {
        /// Steps each process takes.
        #[arg(long, default_value_t = 10)]
        steps: u32,
        /// Seconds a step takes.
        #[arg(long, default_value_t = 1.0)]
        step: f64,
    },
    /// Launches processes with these pids: returns once the broker holds their tasks (a
    /// worker may start them later), or with --wait once they finished.
    Launch {
        pids: Vec<i64>,
        /// Wait for each process to finish, and print its result.
        #[arg(long)]
        wait: bool,
    },
    /// Sends a process a control intent: pause, play, kill or status; prints the reply.
    Control { pid: i64, intent: String },
    /// Prints every state change, until Ctrl-C or SIGTERM.
    Watch,
}

#[actix::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let settings = cli
        .connection
        .settings()
        .with_message_exchange(format!("{}.messages", cli.prefix))
        .with_task_exchange(format!("{}.tasks", cli.prefix))
        .with_task_queue(format!("{}.process.queue", cli.prefix));
    let comm = settings.connect().await?;
    match cli.role {
        Role::Worker { steps, step } => {
            let launcher = workflow::Launcher {
                comm: comm.downgrade(),
                steps,
                step: Duration::from_secs_f64(step),
            };
            comm.add_task_subscriber(launcher.start()).await?;
            println!(" [*] Hosting processes (Ctrl-C to stop)");
            kiwimq::shutdown_signal().await;
        }
        Role::Launch { pids, wait } => {
            let mut finished = Vec::new();
            for pid in pids {
                let task = workflow::continue_task(pid, true);
                if wait {
                    finished.push((pid, comm.task_send::<_, Value>(&task).await?));
                } else {
                    comm.default_task_queue().task_send_no_reply(&task).await?;
                }
                println!(" [x] Launched {pid}: queued for a worker");
            }
            for (pid, result) in finished {
                let result = serde_json::to_string(&result.await?).unwrap_or_default();
                println!(" [x] Process {pid} finished: {result}");
            }
        }
        Role::Control { pid, intent } => {
            let reply = comm
                .rpc_send::<_, Value>(&pid.to_string(), &workflow::intent(&intent))
                .await?
                .await?;
            println!("{}", serde_json::to_string(&reply).unwrap_or_default());
        }
        Role::Watch => {
            let filter = BroadcastFilter::new().subject("state_changed.*");
            comm.add_broadcast_subscriber(filter, |b: Broadcast<Value>| async move {
                println!(
                    " [x] process {}: {}",
                    b.sender_text().unwrap_or_default(),
                    b.subject_text().unwrap_or_default()
                );
                Ok(())
            })
            .await?;
            kiwimq::shutdown_signal().await;
        }
    }
    comm.close().await
}
