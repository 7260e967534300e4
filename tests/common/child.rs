//! Worker processes for fault tests: this test binary run again as a child, on one of its
//! ignored tests, told the names it works with through an environment variable, and read
//! line by line.

use std::process::Stdio;

use kiwimq::Settings;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use super::SOON;

/// The variable that carries a child's settings.
const CHILD_SETTINGS: &str = "KIWIMQ_FAULT_CHILD";

/// The settings of a child process started by [`Child::start`], or none in a process that
/// was not started so.
pub fn child_settings() -> Option<Settings> {
    let names = std::env::var(CHILD_SETTINGS).ok()?;
    let [uri, messages, tasks, queue]: [&str; 4] =
        names.split(' ').collect::<Vec<_>>().try_into().ok()?;
    Some(
        Settings::new(uri)
            .with_testing_mode(true)
            .with_message_exchange(messages)
            .with_task_exchange(tasks)
            .with_task_queue(queue),
    )
}

/// A worker process running this test binary's ignored test `test`.
pub struct Child {
    pub process: tokio::process::Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Child {
    /// Starts `test` in a child process that works with `settings`' broker and names.
    pub fn start(test: &str, settings: &Settings) -> Self {
        let names = [
            settings.uri(),
            settings.message_exchange(),
            settings.task_exchange(),
            settings.task_queue(),
        ]
        .join(" ");
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--include-ignored", "--nocapture"])
            .env(CHILD_SETTINGS, names)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(process.stdout.take().unwrap()).lines();
        Self { process, lines }
    }

    /// The rest of the first line the child prints that starts with `wanted`.
    pub async fn expect(&mut self, wanted: &str) -> String {
        self.expect_within(wanted, SOON).await
    }

    /// The rest of the first line the child prints that starts with `wanted`, within
    /// `within`.
    #[allow(dead_code)] // not every test binary that uses children waits long
    pub async fn expect_within(&mut self, wanted: &str, within: std::time::Duration) -> String {
        let waiting = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if let Some(rest) = line.strip_prefix(wanted) {
                    return rest.to_owned();
                }
            }
            panic!("the worker process ended before saying '{wanted}'");
        };
        tokio::time::timeout(within, waiting).await.expect(wanted)
    }

    /// Sends the child `signal` (`-KILL`, `-TERM`).
    pub fn signal(&self, signal: &str) {
        send_signal(self.process.id().expect("running"), signal);
    }
}

/// Sends process `pid` `signal` (`-KILL`, `-STOP`, `-CONT`).
pub fn send_signal(pid: u32, signal: &str) {
    let pid = pid.to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}
