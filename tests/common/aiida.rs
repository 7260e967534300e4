//! AiiDA's own ZeroMQ broker (aiida-core 2.9.4, `python -m aiida.brokers.zeromq.service`),
//! started for one test in a service directory of its own and stopped with it.
//!
//! The Python environment is `KIWIMQ_AIIDA_VENV` or `target/aiida-venv`, which
//! `scripts/aiida-venv.sh` makes (the test script runs it). A test that cannot find it fails
//! and says how to make it: it is never skipped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

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

/// One of AiiDA's brokers, running in its own service directory.
pub struct AiidaBroker {
    pub service_dir: PathBuf,
    process: Option<Child>,
    /// Every socket directory it made (a killed one leaves its own behind).
    sockets_dirs: Vec<String>,
}

impl AiidaBroker {
    /// Starts one and waits until it has written `broker.sockets`.
    pub async fn start() -> Self {
        let mut broker = Self {
            service_dir: scratch("aiida-broker"),
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

    async fn spawn(&mut self) {
        let before = self.sockets_dir();
        let home = self.service_dir.join("aiida-home");
        let process = Command::new(python())
            .args(["-m", "aiida.brokers.zeromq.service", "--service-dir"])
            .arg(&self.service_dir)
            .env("AIIDA_PATH", &home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("AiiDA's broker starts");
        self.process = Some(process);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.sockets_dir();
            let socket_ready = now
                .as_ref()
                .is_some_and(|dir| Path::new(dir).join("router.sock").exists());
            if socket_ready && now != before {
                self.sockets_dirs.extend(now);
                return;
            }
            if let Some(status) = self.process.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "AiiDA's broker exited at start ({status}); its log: {}",
                    std::fs::read_to_string(self.service_dir.join("broker.log"))
                        .unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "AiiDA's broker did not start in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
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
    /// directory, as its daemon's respawn does).
    pub async fn restart(&mut self) {
        self.spawn().await;
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

impl Drop for AiidaBroker {
    fn drop(&mut self) {
        if let Some(process) = self.process.as_mut() {
            let _ = process.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.service_dir);
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
        Self { process, lines }
    }

    /// The rest of the first line whose first field is `tag`, within 30 s.
    pub async fn expect(&mut self, tag: &str) -> Vec<serde_json::Value> {
        let read = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                let fields: Vec<serde_json::Value> = match serde_json::from_str(&line) {
                    Ok(fields) => fields,
                    Err(_) => continue,
                };
                if fields.first().and_then(|f| f.as_str()) == Some(tag) {
                    return fields[1..].to_vec();
                }
            }
            panic!("the Python peer ended before printing '{tag}'");
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .unwrap_or_else(|_| panic!("the Python peer did not print '{tag}' in 30 s"))
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
