//! kiwimq's ZeroMQ broker against AiiDA's own (aiida-core 2.9.4), in the same run, with
//! kiwimq's client on both: the same tasks (AiiDA's `continue` bodies) and RPCs, each broker
//! a process of its own started fresh for every round in a service directory of its own,
//! warmed up with a quarter of the tasks before it is measured.
//!
//! - *confirmed*: tasks sent with up to 512 awaiting their confirm at once, per second until
//!   every confirm is back. kiwimq's broker confirms a task once it is in its journal and
//!   the journal is fsynced (the task's file follows); AiiDA's before it writes anything.
//! - *dispatched and acked*: the stored tasks to one worker (prefetch 100;
//!   `KIWIMQ_BENCH_ZMQ_WORKERS` sets more, each a communicator of its own), per second until
//!   the broker's storage is empty.
//! - *sent to acked*: the two phases together, per second — the whole way of a task.
//! - *RPC p50 / p99*: one call at a time to an RPC subscriber.
//!
//! `cargo bench --bench zeromq --features zeromq,cli`. The Python environment is
//! `KIWIMQ_AIIDA_VENV` or `target/aiida-venv` (`scripts/aiida-venv.sh`). Sizes:
//! `KIWIMQ_BENCH_ZMQ_TASKS` (2,000), `KIWIMQ_BENCH_ZMQ_RPC` (500), `KIWIMQ_BENCH_ROUNDS` (3);
//! `KIWIMQ_BENCH_ZMQ_BROKERS=kiwimq` or `aiida` runs one broker only (to profile it).
//! Prints a table and writes `target/kiwimq-bench-zeromq.json`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use kiwimq::{Communicator, HandlerError, Rpc, Settings, Task};
use serde_json::{Value, json};

use common::{median, percentile_us, print_table, rate, size, write_report};

/// Tasks awaiting their confirm at once.
const WINDOW: usize = 512;
const PREFETCH: u16 = 100;

#[derive(Clone, Copy, PartialEq)]
enum Which {
    Kiwimq,
    Aiida,
}

/// One broker process in a service directory of its own, killed and removed on drop.
struct Broker {
    dir: PathBuf,
    child: Child,
}

impl Broker {
    fn start(which: Which) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/tmp")
            .join(format!("bench-zmq-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = match which {
            Which::Kiwimq => {
                let mut command = Command::new(env!("CARGO_BIN_EXE_kiwimq"));
                command.args(["broker", "--service-dir"]).arg(&dir);
                command
            }
            Which::Aiida => {
                let venv = std::env::var("KIWIMQ_AIIDA_VENV").unwrap_or_else(|_| {
                    concat!(env!("CARGO_MANIFEST_DIR"), "/target/aiida-venv").to_owned()
                });
                let mut command = Command::new(Path::new(&venv).join("bin/python"));
                command
                    .args(["-m", "aiida.brokers.zeromq.service", "--service-dir"])
                    .arg(&dir)
                    .env("AIIDA_PATH", dir.join("aiida-home"));
                command
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the broker starts (for AiiDA's: run scripts/aiida-venv.sh)");
        let announced = format!("aiida-zeromq-broker {}", child.id());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pid = std::fs::read_to_string(dir.join("broker.pid")).unwrap_or_default();
            let bound = std::fs::read_to_string(dir.join("broker.sockets"))
                .is_ok_and(|s| Path::new(s.trim()).join("router.sock").exists());
            if bound && pid.trim() == announced {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not start in 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { dir, child }
    }

    fn uri(&self) -> String {
        format!("zmq://{}", self.dir.display())
    }

    /// Tasks in `storage/tasks/{pending,processing}`.
    fn stored(&self) -> usize {
        ["pending", "processing"]
            .iter()
            .map(|which| {
                std::fs::read_dir(self.dir.join("storage/tasks").join(which))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .sum()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SIGTERM: both shut down cleanly and take their socket directories away.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(uri: &str) -> Communicator {
    Settings::new(uri)
        .with_task_prefetch(PREFETCH)
        .connect()
        .await
        .expect("connects")
}

/// Sends `tasks` of AiiDA's `continue` tasks, up to 512 awaiting their confirm at once;
/// returns once every confirm is back.
async fn send_all(sender: &Communicator, tasks: usize) {
    let mut in_flight = FuturesUnordered::new();
    for pid in 0..tasks {
        if in_flight.len() >= WINDOW {
            let sent: kiwimq::Result<()> = in_flight.next().await.unwrap();
            sent.expect("confirmed");
        }
        in_flight.push(async move {
            let body =
                json!({"task": "continue", "args": {"pid": pid, "nowait": false, "tag": null}});
            sender.task_send_no_reply(&body).await
        });
    }
    while let Some(sent) = in_flight.next().await {
        sent.expect("confirmed");
    }
}

/// Drains the `tasks` stored with `workers` communicators of their own (prefetch 100 each);
/// returns them once every task is handled and the broker's storage is empty.
async fn drain(broker: &Broker, tasks: usize, workers: usize) -> Vec<Communicator> {
    let handled = Arc::new(AtomicUsize::new(0));
    let mut comms = Vec::with_capacity(workers);
    for _ in 0..workers {
        let worker = connect(&broker.uri()).await;
        let counter = handled.clone();
        worker
            .add_task_subscriber(move |_: Task<Value, ()>| {
                counter.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            })
            .await
            .unwrap();
        comms.push(worker);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while handled.load(Ordering::Relaxed) < tasks || broker.stored() > 0 {
        assert!(
            Instant::now() < deadline,
            "the tasks did not drain in 600 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    comms
}

/// One round on one broker: tasks confirmed per second, dispatched and acked per second,
/// both phases together per second, RPC p50 and p99 in microseconds.
async fn measure(which: Which, tasks: usize, rpcs: usize, workers: usize) -> [f64; 5] {
    let broker = Broker::start(which);
    let sender = connect(&broker.uri()).await;
    // A warm-up of a quarter of the tasks through, unmeasured: a broker measured as it runs
    // for a while, not in its first second (kiwimq's stocks its spare files then).
    send_all(&sender, tasks / 4).await;
    for worker in drain(&broker, tasks / 4, workers).await {
        worker.close().await.unwrap();
    }

    let started = Instant::now();
    send_all(&sender, tasks).await;
    let sending = started.elapsed();
    let started = Instant::now();
    let workers = drain(&broker, tasks, workers).await;
    let draining = started.elapsed();

    workers[0]
        .add_rpc_subscriber(Some("42"), |rpc: Rpc<Value>| async move {
            Ok::<_, HandlerError>(rpc.body)
        })
        .await
        .unwrap();
    let body = json!({"intent": "status", "message": null});
    let mut samples = Vec::with_capacity(rpcs);
    for _ in 0..rpcs {
        let started = Instant::now();
        let _: Value = sender.rpc_send("42", &body).await.unwrap().await.unwrap();
        samples.push(started.elapsed());
    }
    sender.close().await.unwrap();
    for worker in workers {
        worker.close().await.unwrap();
    }
    [
        rate(tasks, sending),
        rate(tasks, draining),
        rate(tasks, sending + draining),
        percentile_us(&mut samples, 50),
        percentile_us(&mut samples, 99),
    ]
}

#[actix_rt::main]
async fn main() {
    let tasks = size("ZMQ_TASKS", 2_000);
    let rpcs = size("ZMQ_RPC", 500);
    let workers = size("ZMQ_WORKERS", 1).max(1);
    let rounds = size("ROUNDS", 3);
    // `KIWIMQ_BENCH_ZMQ_BROKERS=kiwimq` (or `aiida`) measures one only, to profile it.
    let brokers = match std::env::var("KIWIMQ_BENCH_ZMQ_BROKERS").as_deref() {
        Ok("kiwimq") => vec![Which::Kiwimq],
        Ok("aiida") => vec![Which::Aiida],
        _ => vec![Which::Kiwimq, Which::Aiida],
    };
    let names = [
        "tasks confirmed / s",
        "tasks dispatched and acked / s",
        "tasks sent to acked, both phases / s",
        "rpc p50 (us)",
        "rpc p99 (us)",
    ];
    let mut kiwimq: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let mut aiida: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        // kiwimq's first in even rounds, AiiDA's first in odd ones.
        let order = if round % 2 == 0 {
            [Which::Kiwimq, Which::Aiida]
        } else {
            [Which::Aiida, Which::Kiwimq]
        };
        for which in order {
            if !brokers.contains(&which) {
                continue;
            }
            let name = if which == Which::Kiwimq {
                "kiwimq"
            } else {
                "AiiDA"
            };
            eprintln!("round {}/{rounds}: {name}'s broker", round + 1);
            let values = measure(which, tasks, rpcs, workers).await;
            let into = if which == Which::Kiwimq {
                &mut kiwimq
            } else {
                &mut aiida
            };
            for (figure, value) in into.iter_mut().zip(values) {
                figure.push(value);
            }
        }
    }
    let mut rows = Vec::new();
    let mut report = serde_json::Map::new();
    for (i, name) in names.iter().enumerate() {
        let k = if kiwimq[i].is_empty() {
            f64::NAN
        } else {
            median(kiwimq[i].clone())
        };
        let a = if aiida[i].is_empty() {
            f64::NAN
        } else {
            median(aiida[i].clone())
        };
        // Rates: kiwimq / AiiDA; latencies: AiiDA / kiwimq — above 1 is kiwimq ahead.
        let ratio = if name.contains("/ s") { k / a } else { a / k };
        rows.push((
            (*name).to_owned(),
            vec![format!("{k:.0}"), format!("{a:.0}"), format!("{ratio:.1}x")],
        ));
        report.insert(
            (*name).to_owned(),
            json!({"kiwimq": k, "aiida": a, "kiwimq_ahead": ratio}),
        );
    }
    println!(
        "\n{tasks} tasks, {rpcs} RPCs, median of {rounds} rounds; kiwimq's client on both brokers"
    );
    print_table(&["kiwimq", "AiiDA", "ahead"], &rows);
    write_report("kiwimq-bench-zeromq.json", &Value::Object(report));
}
