//! ZeroMQ brokers as processes — AiiDA's own (aiida-core 2.9.4, `python -m
//! aiida.brokers.zeromq.service`) and `kiwimq broker` — started for one test in a service
//! directory of its own and stopped with it, and AiiDA's Python client as a peer.
//!
//! The Python environment is `KIWIMQ_AIIDA_VENV` or `target/aiida-venv`, which
//! `scripts/aiida-venv.sh` makes (the test script runs it). A test that cannot find it fails
//! and says how to make it: it is never skipped.
//!
//! `KIWIMQ_KEEP_BROKER_DIRS=1` keeps each broker's service directory (its `broker.log`,
//! state and task files) after the test, to read what happened.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiwimq::{Broadcast, BroadcastFilter, BroadcastOptions, Communicator, HandlerError, Rpc};
use tokio::process::{Child, Command};

use super::{SOON, count, eventually, seen};

/// The Python of the environment holding aiida-core.
pub fn python() -> PathBuf {
    let venv = std::env::var("KIWIMQ_AIIDA_VENV")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/aiida-venv").to_owned());
    let python = Path::new(&venv).join("bin/python");
    assert!(
        python.exists(),
        "no Python environment with aiida-core at {venv}: run scripts/aiida-venv.sh"
    );
    python
}

/// A fresh directory under the target directory, removed by the test's broker on drop.
pub fn scratch(what: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/tmp")
        .join(format!("{what}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Which broker a [`BrokerProcess`] runs.
#[derive(Clone, Copy)]
pub enum Program {
    /// AiiDA's own (`python -m aiida.brokers.zeromq.service`).
    Aiida,
    /// `kiwimq broker`, giving an unreachable worker this many seconds, and a hand-over
    /// cut short by a stop `restore_lease` seconds (the default when `None`).
    Kiwimq {
        worker_grace: u64,
        restore_lease: Option<u64>,
    },
}

/// A ZeroMQ broker process (AiiDA's or kiwimq's), in its own service directory.
pub struct BrokerProcess {
    pub service_dir: PathBuf,
    program: Program,
    process: Option<Child>,
    /// Every socket directory it announced (a killed one leaves its own behind).
    sockets_dirs: Vec<String>,
}

/// The tests of AiiDA's broker name it so.
pub type AiidaBroker = BrokerProcess;

impl BrokerProcess {
    /// Starts AiiDA's broker and waits until it serves.
    pub async fn start() -> Self {
        Self::start_program(Program::Aiida).await
    }

    /// Starts `kiwimq broker` and waits until it serves.
    pub async fn kiwimq(worker_grace: u64) -> Self {
        Self::start_program(Program::Kiwimq {
            worker_grace,
            restore_lease: None,
        })
        .await
    }

    /// Starts `kiwimq broker` with a restore lease of `restore_lease` seconds.
    pub async fn kiwimq_leased(worker_grace: u64, restore_lease: u64) -> Self {
        Self::start_program(Program::Kiwimq {
            worker_grace,
            restore_lease: Some(restore_lease),
        })
        .await
    }

    /// Starts `kiwimq broker` for the service directory `service_dir` (an AiiDA profile's).
    pub async fn kiwimq_at(service_dir: PathBuf, worker_grace: u64) -> Self {
        std::fs::create_dir_all(&service_dir).unwrap();
        let mut broker = Self {
            service_dir,
            program: Program::Kiwimq {
                worker_grace,
                restore_lease: None,
            },
            process: None,
            sockets_dirs: Vec::new(),
        };
        broker.spawn().await;
        broker
    }

    async fn start_program(program: Program) -> Self {
        let mut broker = Self {
            service_dir: scratch("zmq-broker"),
            program,
            process: None,
            sockets_dirs: Vec::new(),
        };
        broker.spawn().await;
        broker
    }

    /// `zmq:///SERVICE_DIR`.
    pub fn uri(&self) -> String {
        format!("zmq://{}", self.service_dir.display())
    }

    /// `zmq+ipc:///…/router.sock` of the broker running now.
    pub fn socket_uri(&self) -> String {
        let dir = std::fs::read_to_string(self.service_dir.join("broker.sockets")).unwrap();
        format!("zmq+ipc://{}/router.sock", dir.trim())
    }

    /// The socket directory it announced.
    pub fn sockets_dir(&self) -> Option<String> {
        std::fs::read_to_string(self.service_dir.join("broker.sockets"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    /// The process id of the broker running now.
    pub fn pid(&self) -> u32 {
        self.process
            .as_ref()
            .and_then(Child::id)
            .expect("a running broker")
    }

    fn command(&self) -> Command {
        match self.program {
            Program::Aiida => {
                let mut command = Command::new(python());
                command
                    .args(["-m", "aiida.brokers.zeromq.service", "--service-dir"])
                    .arg(&self.service_dir)
                    .env("AIIDA_PATH", self.service_dir.join("aiida-home"));
                command
            }
            Program::Kiwimq {
                worker_grace,
                restore_lease,
            } => {
                let mut command = Command::new(env!("CARGO_BIN_EXE_kiwimq"));
                command
                    .args(["broker", "--service-dir"])
                    .arg(&self.service_dir)
                    .arg("--log-file-path")
                    .arg(self.service_dir.join("broker.log"))
                    .args(["--worker-grace", &worker_grace.to_string()]);
                if let Some(lease) = restore_lease {
                    command.args(["--restore-lease", &lease.to_string()]);
                }
                command
            }
        }
    }

    /// Starts the process and waits until its pid file names it and its socket is bound.
    async fn spawn(&mut self) {
        let process = self
            .command()
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the broker starts");
        let announced = format!("aiida-zeromq-broker {}", process.id().unwrap());
        self.process = Some(process);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let pid = std::fs::read_to_string(self.service_dir.join("broker.pid"));
            let socket_ready = self
                .sockets_dir()
                .is_some_and(|dir| Path::new(&dir).join("router.sock").exists());
            if socket_ready && pid.is_ok_and(|pid| pid.trim() == announced) {
                let dir = self.sockets_dir().unwrap();
                if !self.sockets_dirs.contains(&dir) {
                    self.sockets_dirs.push(dir);
                }
                return;
            }
            if let Some(status) = self.process.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the broker exited at start ({status}); its log: {}",
                    std::fs::read_to_string(self.service_dir.join("broker.log"))
                        .unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not start in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`, as a crash would; its files stay behind, as they do after one.
    pub async fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.start_kill().unwrap();
            process.wait().await.unwrap();
        }
    }

    /// Starts it again in the same service directory (AiiDA's picks a new socket
    /// directory, as its daemon's respawn does; kiwimq's keeps its own).
    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    /// Once a worker's subscription is written down, `kill -9`s the broker and leaves its
    /// state as a `kill -9` during a hand-over does (long before the end, so not leased): a
    /// task `lost-in-handover` (body 7) assigned to that worker, which never received it;
    /// then starts it again.
    pub async fn restart_after_a_lost_hand_over(&mut self) {
        let state_file = self.service_dir.join("storage/broker-state.json");
        let read_state = || -> serde_json::Value {
            std::fs::read(&state_file)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .unwrap_or_default()
        };
        eventually(SOON, "the worker's subscription written down", || {
            read_state()["task_subscribers"]
                .as_object()
                .is_some_and(|subscribers| !subscribers.is_empty())
        })
        .await;
        self.kill().await;
        let mut state = read_state();
        let holder = state["task_subscribers"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .clone();
        state["assignments"] = serde_json::json!({"lost-in-handover": holder});
        std::fs::write(&state_file, state.to_string()).unwrap();
        // The log of changes since that snapshot says nothing of it.
        let _ = std::fs::remove_file(self.service_dir.join("storage/broker-state.log"));
        std::fs::write(
            self.service_dir
                .join("storage/tasks/pending/1000_lost-in-handover.json"),
            br#"{"id": "lost-in-handover", "body": 7, "no_reply": true}"#,
        )
        .unwrap();
        self.restart().await;
    }

    /// What its `storage/tasks/{pending,processing}` hold.
    pub fn stored_tasks(&self) -> (usize, usize) {
        let count = |which: &str| {
            std::fs::read_dir(self.service_dir.join("storage/tasks").join(which))
                .map(|dir| dir.count())
                .unwrap_or(0)
        };
        (count("pending"), count("processing"))
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(process) = self.process.as_mut() {
            let _ = process.start_kill();
        }
        if std::env::var_os("KIWIMQ_KEEP_BROKER_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.service_dir);
        }
        for dir in &self.sockets_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// AiiDA's Python client (`ZeromqCommunicator`) as a peer: `interop/aiida_zmq_peer.py`,
/// read line by line (one JSON array a line).
pub struct PythonPeer {
    process: Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    /// Lines read while looking for another tag, for a later `expect`.
    backlog: Vec<Vec<serde_json::Value>>,
}

impl PythonPeer {
    /// Runs the peer in `mode` against `endpoint` (`ipc://…`) with `args`.
    pub fn start(mode: &str, endpoint: &str, args: &[&str], home: &Path) -> Self {
        use tokio::io::AsyncBufReadExt;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/aiida_zmq_peer.py");
        let mut process = Command::new(python())
            .arg(script)
            .arg(mode)
            .arg(endpoint)
            .args(args)
            .env("AIIDA_PATH", home)
            .env("PYTHONWARNINGS", "ignore")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the Python peer starts");
        let lines = tokio::io::BufReader::new(process.stdout.take().unwrap()).lines();
        Self {
            process,
            lines,
            backlog: Vec::new(),
        }
    }

    /// The rest of the first line not yet taken whose first field is `tag`, within 30 s.
    pub async fn expect(&mut self, tag: &str) -> Vec<serde_json::Value> {
        let tagged = |fields: &Vec<serde_json::Value>| fields[0].as_str() == Some(tag);
        if let Some(at) = self.backlog.iter().position(tagged) {
            return self.backlog.remove(at)[1..].to_vec();
        }
        let read = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                let fields: Vec<serde_json::Value> = match serde_json::from_str(&line) {
                    Ok(fields) if !Vec::is_empty(&fields) => fields,
                    _ => continue,
                };
                if tagged(&fields) {
                    return fields[1..].to_vec();
                }
                self.backlog.push(fields);
            }
            panic!("the Python peer ended before printing '{tag}'");
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .unwrap_or_else(|_| panic!("the Python peer did not print '{tag}' in 30 s"))
    }

    /// How many lines tagged `tag` it has printed that no `expect` took yet (reads what is
    /// there without waiting).
    pub async fn printed(&mut self, tag: &str) -> usize {
        while let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_millis(10), self.lines.next_line()).await
        {
            if let Ok(fields) = serde_json::from_str::<Vec<serde_json::Value>>(&line)
                && !fields.is_empty()
            {
                self.backlog.push(fields);
            }
        }
        self.backlog
            .iter()
            .filter(|fields| fields[0].as_str() == Some(tag))
            .count()
    }

    /// Sends it `signal` (`-KILL`, `-STOP`, `-CONT`).
    pub fn signal(&self, signal: &str) {
        super::child::send_signal(self.process.id().expect("running"), signal);
    }

    /// Closes its stdin (a serving peer then stops) and waits for it to exit successfully.
    pub async fn finish(mut self) {
        drop(self.process.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(30), self.process.wait())
            .await
            .expect("the Python peer exits")
            .unwrap();
        assert!(status.success(), "the Python peer failed: {status}");
    }
}

/// The `ipc://` endpoint of a `zmq+ipc://` URI.
pub fn endpoint(socket_uri: &str) -> String {
    socket_uri.replacen("zmq+ipc://", "ipc://", 1)
}

/// AiiDA's Python client and kiwimq's `comm` through the broker at `socket_uri`, every
/// message type both ways: kiwimq → Python tasks, an RPC and a broadcast; then Python →
/// kiwimq AiiDA's submit (no-reply tasks), an RPC (and one to nobody), a broadcast and a
/// confirmed task.
pub async fn python_client_both_ways(comm: &Communicator, socket_uri: &str, home: &Path) {
    // kiwimq → Python: tasks, an RPC, a broadcast.
    let mut python = PythonPeer::start("serve", &endpoint(socket_uri), &[], home);
    python.expect("ready").await;
    for pid in 0..3u64 {
        let task = serde_json::json!({"task": "continue", "args": {"pid": pid}});
        comm.task_send_no_reply(&task).await.unwrap();
    }
    let mut pids = Vec::new();
    for _ in 0..3 {
        let task = python.expect("task").await;
        pids.push(task[0]["args"]["pid"].as_u64().unwrap());
    }
    pids.sort_unstable();
    assert_eq!(pids, [0, 1, 2]);
    let answer: serde_json::Value = comm
        .rpc_send("py-rpc", &serde_json::json!({"intent": "play"}))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"python_echo": {"intent": "play"}})
    );
    comm.broadcast_send(
        &serde_json::json!({"state": "finished"}),
        BroadcastOptions::subject("state_changed.running.finished")
            .with_sender(12)
            .with_correlation_id("c-1"),
    )
    .await
    .unwrap();
    let heard = python.expect("broadcast").await;
    assert_eq!(heard[0], serde_json::json!({"state": "finished"}));
    assert_eq!(heard[1], 12);
    assert_eq!(heard[2], "state_changed.running.finished");
    assert_eq!(heard[3], "c-1");
    python.finish().await;

    // Python → kiwimq: AiiDA's submit (no-reply tasks), an RPC, a broadcast, a confirm.
    let tasks = super::recorded_tasks::<serde_json::Value>(comm).await;
    comm.add_rpc_subscriber(Some("rust-rpc"), |rpc: Rpc<serde_json::Value>| async move {
        Ok::<_, HandlerError>(serde_json::json!({"rust_echo": rpc.body}))
    })
    .await
    .unwrap();
    let heard = seen::<(serde_json::Value, String)>();
    let record = heard.clone();
    comm.add_broadcast_subscriber(
        BroadcastFilter::new().subject("state_changed.*"),
        move |broadcast: Broadcast<serde_json::Value>| {
            let record = record.clone();
            async move {
                let sender = format!("{:?}", broadcast.sender);
                record.lock().unwrap().push((broadcast.body, sender));
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    let mut python = PythonPeer::start("send", &endpoint(socket_uri), &["20"], home);
    python.expect("tasks sent").await;
    let rpc = python.expect("rpc").await;
    assert_eq!(
        rpc[0],
        serde_json::json!({"rust_echo": {"intent": "status", "message": null}})
    );
    let error = python.expect("rpc error").await;
    assert!(
        error[0].as_str().unwrap().contains("Recipient not found"),
        "{error:?}"
    );
    python.expect("broadcast sent").await;
    assert_eq!(python.expect("task confirmed").await[0], true);
    python.finish().await;
    eventually(SOON, "21 tasks and the broadcast", || {
        count(&tasks) == 21 && count(&heard) == 1
    })
    .await;
    let (body, sender) = heard.lock().unwrap()[0].clone();
    assert_eq!(body, serde_json::json!({"state": "running"}));
    assert!(sender.contains('7'), "{sender}");
    let pids: std::collections::BTreeSet<i64> = tasks
        .lock()
        .unwrap()
        .iter()
        .map(|t| t["args"]["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(pids, (-1..20).collect());
}

/// A live AiiDA profile made by `verdi presto --use-zeromq` (`core.sqlite_dos`, no
/// PostgreSQL, no RabbitMQ) in a home of its own, with a `bash` code on `localhost`; its
/// daemon is stopped and its home removed on drop.
pub struct AiidaProfile {
    pub home: PathBuf,
    pub name: String,
}

impl AiidaProfile {
    /// Makes the profile.
    pub async fn create() -> Self {
        let profile = Self {
            home: scratch("aiida-profile"),
            name: "kiwimq".to_owned(),
        };
        profile
            .verdi(&["presto", "--use-zeromq", "--profile-name", &profile.name])
            .await;
        profile
            .verdi(&[
                "-p",
                &profile.name,
                "code",
                "create",
                "core.code.installed",
                "--label",
                "bash",
                "--computer",
                "localhost",
                "--filepath-executable",
                "/bin/bash",
                "-n",
            ])
            .await;
        profile
    }

    fn command(&self, program: &Path) -> Command {
        let bin = python().parent().unwrap().to_owned();
        let path = std::env::var("PATH").unwrap_or_default();
        let mut command = Command::new(program);
        command
            .env("AIIDA_PATH", &self.home)
            .env("PATH", format!("{}:{path}", bin.display()))
            .env("PYTHONWARNINGS", "ignore")
            // The daemon imports the tests' workflows from here.
            .env(
                "PYTHONPATH",
                concat!(env!("CARGO_MANIFEST_DIR"), "/interop"),
            )
            .kill_on_drop(true);
        command
    }

    /// Runs `verdi ARGS` to success; its standard output.
    pub async fn verdi(&self, args: &[&str]) -> String {
        let (success, output) = self.try_verdi(args).await;
        assert!(success, "verdi {args:?} failed: {output}");
        output
    }

    /// Runs `verdi ARGS`: whether it succeeded, and its standard output and error.
    pub async fn try_verdi(&self, args: &[&str]) -> (bool, String) {
        let verdi = python().parent().unwrap().join("verdi");
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            self.command(&verdi).args(args).output(),
        )
        .await
        .expect("verdi answers within 120 s")
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    }

    /// Runs `interop/aiida_daemon.py COMMAND PROFILE ARGS`; the JSON it prints.
    pub async fn script(&self, command: &str, args: &[String]) -> serde_json::Value {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/aiida_daemon.py");
        let output = tokio::time::timeout(
            Duration::from_secs(300),
            self.command(&python())
                .arg(script)
                .arg(command)
                .arg(&self.name)
                .args(args)
                .output(),
        )
        .await
        .expect("the AiiDA script answers within 300 s")
        .unwrap();
        assert!(
            output.status.success(),
            "aiida_daemon.py {command} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("the script prints JSON")
    }

    /// The profile's broker service directory, where AiiDA's daemon looks for a broker.
    pub async fn service_dir(&self) -> PathBuf {
        let dir = self.script("service-dir", &[]).await;
        PathBuf::from(dir.as_str().expect("a path"))
    }
}

impl Drop for AiidaProfile {
    fn drop(&mut self) {
        // Synchronously: the daemon's processes must not outlive the test.
        let verdi = python().parent().unwrap().join("verdi");
        let _ = std::process::Command::new(verdi)
            .args(["-p", &self.name, "daemon", "stop"])
            .env("AIIDA_PATH", &self.home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if std::env::var_os("KIWIMQ_KEEP_AIIDA").is_none() {
            let _ = std::fs::remove_dir_all(&self.home);
        }
    }
}
