//! The Rust side of the cross-language suite (`interop/suite.py`, run by
//! `scripts/interop.sh`): it serves or drives the real kiwiPy on the default kiwiPy names,
//! and reports what it saw as `KEY json` lines on stdout.
//!
//! - `serve`: RPC `rust-echo` (answers `{"echo": body}`) and `rust-fail` (fails), a worker on
//!   the default task queue (answers `{"done": body}`, fails on `{"fail": true}`), and a
//!   broadcast subscriber for subject `py.*` from sender `python`, one for AiiDA's process
//!   state changes from the integer pk 47 (filter `"47"`), one for subject `plain.*`. Prints
//!   `READY`, runs until stdin closes.
//! - `send-first`: sends the no-reply task `{"n": 0}`, declaring the default queue first.
//! - `drive`: calls the Python side's RPC `py-echo`, `py-fail` and an unknown identifier,
//!   sends it tasks (a result, a failure, a no-reply) and broadcasts (one with the integer
//!   sender 47 and correlation id 9).
//!
//! `cargo run --example interop_peer -- --uri URI --codec yaml serve`

#[path = "common/cli.rs"]
mod cli;

use std::io::BufRead;
use std::time::Duration;

use clap::{Parser, Subcommand};
use kiwimq::{
    Broadcast, BroadcastFilter, BroadcastOptions, Communicator, HandlerError, Rpc, Task, Value,
};

/// The Rust side of the cross-language suite against kiwiPy.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    Serve,
    SendFirst,
    Drive,
}

/// One line of the report: `KEY json`.
fn report(key: &str, value: impl serde::Serialize) {
    let json = serde_json::to_string(&value).unwrap_or_else(|e| format!("\"{e}\""));
    println!("{key} {json}");
}

/// An error as the suite checks it: its kind and text.
fn describe(error: &kiwimq::Error) -> serde_json::Value {
    let kind = match error.kind() {
        kiwimq::ErrorKind::Remote(_) => "remote",
        kiwimq::ErrorKind::Unroutable(_) => "unroutable",
        kiwimq::ErrorKind::Timeout => "timeout",
        _ => "other",
    };
    serde_json::json!({"kind": kind, "text": error.to_string()})
}

/// A broadcast's body and headers, as they came.
fn headers(b: Broadcast<Value>) -> Value {
    let or_nil = |v: Option<Value>| v.unwrap_or(Value::Nil);
    map(vec![
        ("body", b.body),
        ("sender", or_nil(b.sender)),
        ("subject", or_nil(b.subject)),
        ("correlation_id", or_nil(b.correlation_id)),
    ])
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

async fn serve(comm: &Communicator) -> kiwimq::Result<()> {
    comm.add_rpc_subscriber(Some("rust-echo"), |rpc: Rpc<Value>| async move {
        Ok::<_, HandlerError>(map(vec![("echo", rpc.body)]))
    })
    .await?;
    comm.add_rpc_subscriber(Some("rust-fail"), |_: Rpc<Value>| async move {
        Err::<Value, _>(HandlerError::failed("rust says no"))
    })
    .await?;
    comm.add_task_subscriber(|task: Task<Value>| async move {
        report("TASK", &task.body);
        if task.body["fail"].as_bool() == Some(true) {
            return Err(HandlerError::failed("the task failed on purpose"));
        }
        Ok(map(vec![("done", task.body)]))
    })
    .await?;
    let filter = BroadcastFilter::new().subject("py.*").sender("python");
    comm.add_broadcast_subscriber(filter, |broadcast: Broadcast<Value>| async move {
        report("BROADCAST", &broadcast.body);
        Ok(())
    })
    .await?;
    comm.add_broadcast_subscriber(
        BroadcastFilter::new()
            .sender("47")
            .subject("state_changed.*"),
        |b: Broadcast<Value>| async move {
            report("PK-BROADCAST", headers(b));
            Ok(())
        },
    )
    .await?;
    comm.add_broadcast_subscriber(
        BroadcastFilter::new().subject("plain.*"),
        |b: Broadcast<Value>| async move {
            report("PLAIN-BROADCAST", headers(b));
            Ok(())
        },
    )
    .await?;
    println!("READY");
    // Until the suite closes our stdin.
    actix_rt::task::spawn_blocking(|| for _ in std::io::stdin().lock().lines() {})
        .await
        .ok();
    Ok(())
}

async fn drive(comm: &Communicator) -> kiwimq::Result<()> {
    let within = Some(Duration::from_secs(20));
    let echo = comm
        .rpc_send::<_, Value>("py-echo", &map(vec![("n", 1.into())]))
        .await?
        .with_timeout(within)
        .await;
    match echo {
        Ok(value) => report("RPC-ECHO", value),
        Err(error) => report("RPC-ECHO-ERROR", describe(&error)),
    }
    let failed = comm
        .rpc_send::<_, Value>("py-fail", &1)
        .await?
        .with_timeout(within)
        .await;
    report("RPC-FAIL", failed.map_err(|e| describe(&e)).err());
    let nobody = comm.rpc_send::<_, Value>("nobody-here", &1).await;
    report("RPC-NOBODY", nobody.err().map(|e| describe(&e)));

    let result = comm
        .task_send::<_, Value>(&map(vec![("n", 2.into())]))
        .await?
        .with_timeout(within)
        .await;
    match result {
        Ok(value) => report("TASK-RESULT", value),
        Err(error) => report("TASK-RESULT-ERROR", describe(&error)),
    }
    let failed = comm
        .task_send::<_, Value>(&map(vec![("fail", true.into())]))
        .await?
        .with_timeout(within)
        .await;
    report("TASK-FAIL", failed.map_err(|e| describe(&e)).err());
    comm.task_send_no_reply(&map(vec![("n", 3.into())])).await?;
    report("TASK-NOREPLY", "sent");

    for (body, subject, sender) in [
        ("hello", "rust.job.1", "rust"),
        ("wrong subject", "other.job", "rust"),
        ("wrong sender", "rust.job.2", "someone"),
    ] {
        let options = BroadcastOptions::subject(subject).with_sender(sender);
        comm.broadcast_send(body, options).await?;
    }
    let pk = BroadcastOptions::subject("pk.state")
        .with_sender(47)
        .with_correlation_id(9);
    comm.broadcast_send("pk", pk).await?;
    report("BROADCASTS", "sent");
    Ok(())
}

#[actix::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let comm = cli.connection.connect().await?;
    // Inside a trace, so that every message this peer sends carries a `traceparent`
    // header: kiwiPy must ignore it.
    let trace = kiwimq::trace::TraceContext::new_trace();
    let outcome = kiwimq::trace::scope(trace, async {
        match cli.role {
            Role::Serve => serve(&comm).await,
            Role::SendFirst => comm
                .task_send_no_reply(&map(vec![("n", 0.into())]))
                .await
                .map(|()| report("SENT", "n=0")),
            Role::Drive => drive(&comm).await,
        }
    })
    .await;
    if let Err(error) = &outcome {
        report("ERROR", describe(error));
    }
    comm.close().await?;
    println!("DONE");
    outcome
}
