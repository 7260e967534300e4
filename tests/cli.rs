//! The `kiwimq` command, built with the `cli` feature, run as a user runs it: against
//! RabbitMQ, with communicators of this test answering RPCs and tasks and sending and
//! hearing broadcasts.

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use kiwimq::{Broadcast, BroadcastFilter, BroadcastOptions, Codec, Rpc, Settings, Task, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use common::vhost::Vhost;
use common::{SOON, amqp_settings, amqp_url, eventually, example, seen};

/// Settings of this test's own exchanges, and the `--prefix` that names them.
fn private() -> (Settings, String) {
    let settings = amqp_settings(&amqp_url());
    let prefix = settings
        .message_exchange()
        .strip_suffix(".messages")
        .expect("the test exchanges end in .messages")
        .to_owned();
    (settings, prefix)
}

fn kiwimq(prefix: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiwimq"));
    command
        .args([
            "--uri",
            &amqp_url(),
            "--prefix",
            prefix,
            "--testing-mode",
            "--timeout",
            "10",
        ])
        .args(args)
        .kill_on_drop(true);
    command
}

async fn run(prefix: &str, args: &[&str]) -> Output {
    kiwimq(prefix, args).output().await.expect("kiwimq runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).trim().to_owned()
}

#[actix::test]
async fn rpc_call_prints_the_reply_and_fails_with_one_line() {
    let (settings, prefix) = private();
    let server = settings.connect().await.unwrap();
    server
        .add_rpc_subscriber(Some("echo"), |r: Rpc<Value>| async move { Ok(r.body) })
        .await
        .unwrap();
    server
        .add_rpc_subscriber(Some("broken"), |_: Rpc<Value>| async move {
            Err::<Value, _>(kiwimq::HandlerError::failed("no such intent"))
        })
        .await
        .unwrap();

    let output = run(
        &prefix,
        &["rpc", "call", "echo", "{intent: status, pid: 47}"],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let reply: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(reply, serde_json::json!({"intent": "status", "pid": 47}));

    let output = run(&prefix, &["--yaml", "rpc", "call", "echo", "[1, two]"]).await;
    assert_eq!(stdout(&output), "- 1\n- two");

    for (id, says) in [("nobody", "unroutable"), ("broken", "no such intent")] {
        let output = run(&prefix, &["rpc", "call", id]).await;
        assert_eq!(output.status.code(), Some(1));
        let error = stderr(&output);
        assert!(
            error.starts_with("kiwimq: ") && error.contains(says),
            "{error}"
        );
        assert_eq!(error.lines().count(), 1, "one line: {error}");
    }
    server.close().await.unwrap();
}

#[actix::test]
async fn task_send_prints_the_result_in_aiidas_codec() {
    let (settings, prefix) = private();
    let worker = settings.with_codec(Codec::Yaml).connect().await.unwrap();
    worker
        .task_queue("work")
        .add_task_subscriber(|t: Task<Vec<i64>, i64>| async move { Ok(t.body.iter().sum::<i64>()) })
        .await
        .unwrap();
    let queue = worker.task_queue("work").name().to_owned();
    let send_yaml = |body: &'static str| {
        let args = ["--codec", "yaml", "task", "send", "--queue", &queue, body];
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let prefix = prefix.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&prefix, &args).await
        }
    };
    let output = send_yaml("[1, 2, 39]").await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "42");

    // A body of the wrong shape: the worker's error, one line, exit 1.
    let output = send_yaml("not a list").await;
    assert_eq!(output.status.code(), Some(1), "{}", stdout(&output));
    assert!(stderr(&output).contains("remote"), "{}", stderr(&output));

    // Not JSON, not YAML; an unknown command.
    let output = run(&prefix, &["task", "send", "{unclosed"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("neither JSON nor YAML"),
        "{}",
        stderr(&output)
    );
    let output = run(&prefix, &["task", "juggle"]).await;
    assert_eq!(output.status.code(), Some(2));
    worker.close().await.unwrap();
}

#[actix::test]
async fn broadcasts_are_sent_and_heard_one_line_each() {
    let (settings, prefix) = private();
    let comm = settings.connect().await.unwrap();
    let heard = seen::<(Option<String>, Option<String>, Value)>();
    let log = heard.clone();
    comm.add_broadcast_subscriber(BroadcastFilter::new(), move |b: Broadcast<Value>| {
        let entry = (
            b.subject_text().map(|s| s.into_owned()),
            b.sender_text().map(|s| s.into_owned()),
            b.body,
        );
        log.lock().unwrap().push(entry);
        async { Ok(()) }
    })
    .await
    .unwrap();

    let mut listener = kiwimq(
        &prefix,
        &[
            "broadcast",
            "listen",
            "--subject",
            "state_changed.*",
            "--json",
            "--count",
            "2",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut ready = BufReader::new(listener.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(SOON, ready.next_line()).await;
    assert!(
        matches!(line, Ok(Ok(Some(ref l))) if l == "listening"),
        "{line:?}"
    );

    // AiiDA's state changes: an integer sender; one subject the filter leaves out.
    for subject in [
        "state_changed.running.waiting",
        "other",
        "state_changed.waiting.finished",
    ] {
        comm.broadcast_send(
            &Value::Nil,
            BroadcastOptions::subject(subject).with_sender(47),
        )
        .await
        .unwrap();
    }
    let output = tokio::time::timeout(SOON, listener.wait_with_output())
        .await
        .expect("the listener stops after two")
        .unwrap();
    let lines: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["subject"], "state_changed.running.waiting");
    assert_eq!(lines[0]["sender"], 47);
    assert_eq!(lines[1]["subject"], "state_changed.waiting.finished");

    let output = run(
        &prefix,
        &["broadcast", "send", "hello", "{n: 1}", "--sender", "7"],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    eventually(SOON, "the CLI's broadcast heard", || {
        heard.lock().unwrap().iter().any(|(subject, sender, body)| {
            subject.as_deref() == Some("hello")
                && sender.as_deref() == Some("7")
                && body["n"] == Value::from(1)
        })
    })
    .await;
    comm.close().await.unwrap();
}

#[actix::test]
async fn queue_stats_and_dead_letters_without_taking_a_task() {
    let (settings, prefix) = private();
    let comm = settings.connect().await.unwrap();
    let queue = comm.task_queue("stats");
    let name = queue.name().to_owned();
    for n in 0..3u32 {
        queue.task_send_no_reply(&n).await.unwrap();
    }
    let output = run(&prefix, &["queue", "stats", &name, "--json"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let stats: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(stats["ready"], 3);
    assert_eq!(stats["consumers"], 0);
    let output = run(&prefix, &["queue", "stats", &name]).await;
    assert_eq!(
        stdout(&output),
        format!("{name}: ready 3, unacknowledged unknown, consumers 0")
    );
    let output = run(&prefix, &["queue", "stats", "no-such-queue"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("no queue named 'no-such-queue'"));
    // No dead-letter queue yet: refused at once, not retried as a lost connection.
    let output = run(&prefix, &["queue", "dead-letters", &name, "--requeue"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains(&format!("'{name}' has no dead-letter queue")),
        "{}",
        stderr(&output)
    );

    // Dead letters: counted, sent back to run again, or dropped.
    let dead = queue.dead_letters();
    for n in 10..12u32 {
        dead.task_send_no_reply(&n).await.unwrap();
    }
    let output = run(&prefix, &["queue", "dead-letters", &name]).await;
    assert_eq!(stdout(&output), format!("{name}.dlq: 2 dead letters"));
    let output = run(&prefix, &["queue", "dead-letters", &name, "--requeue"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        format!("2 dead letters sent back to {name}")
    );
    assert_eq!(queue.stats().await.unwrap().ready, 5);
    dead.task_send_no_reply(&99u32).await.unwrap();
    let output = run(&prefix, &["queue", "dead-letters", &name, "--purge"]).await;
    assert_eq!(stdout(&output), format!("1 dead letters of {name} deleted"));
    assert_eq!(dead.stats().await.unwrap().ready, 0);

    // What the worker then runs: the three tasks and the two sent back.
    let done = seen::<u32>();
    let log = done.clone();
    queue
        .add_task_subscriber(move |t: Task<u32, ()>| {
            log.lock().unwrap().push(t.body);
            async { Ok(()) }
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "five tasks run", || {
        done.lock().unwrap().len() == 5
    })
    .await;
    let mut ran = done.lock().unwrap().clone();
    ran.sort_unstable();
    assert_eq!(ran, vec![0, 1, 2, 10, 11]);
    comm.close().await.unwrap();
}

/// An example's output, line by line.
type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// Starts an example and waits for the line saying it is ready; its later lines follow.
/// `workflow launch` returns once the broker holds the tasks, with no worker anywhere.
#[actix::test]
async fn workflow_launch_does_not_wait_for_the_processes() {
    let vhost = Vhost::new();
    let output = tokio::time::timeout(
        SOON,
        tokio::process::Command::new(example("workflow"))
            .args(["--uri", &vhost.uri(), "launch", "7", "8"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("launch returns without a worker")
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "[x] Launched 7: queued for a worker\n [x] Launched 8: queued for a worker"
    );
}

async fn start_example(name: &str, uri: &str, ready: &str) -> (tokio::process::Child, Lines) {
    let mut child = tokio::process::Command::new(example(name))
        .args(["--uri", uri])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("the {name} example runs: {e}"));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(SOON, lines.next_line()).await;
        match line {
            Ok(Ok(Some(line))) if line.contains(ready) => break,
            Ok(Ok(Some(_))) => {}
            other => panic!("{name} never said '{ready}': {other:?}"),
        }
    }
    (child, lines)
}

#[actix::test]
async fn the_command_talks_to_the_examples() {
    let vhost = Vhost::new();
    let uri = vhost.uri();
    let _server = start_example("rpc_server", &uri, "Awaiting RPC requests").await;
    let (_listener, mut heard) =
        start_example("receive_broadcast", &uri, "Waiting for broadcasts").await;
    let output = kiwimq_at(&uri, &["rpc", "call", "fib", "30"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "832040");
    let output = kiwimq_at(&uri, &["rpc", "call", "fib", "100"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("overflows"), "{}", stderr(&output));

    let output = kiwimq_at(
        &uri,
        &[
            "broadcast",
            "send",
            "job.done",
            "all finished",
            "--sender",
            "me",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let line = tokio::time::timeout(SOON, heard.next_line()).await;
    let line = match line {
        Ok(Ok(Some(line))) => line,
        other => panic!("receive_broadcast printed nothing: {other:?}"),
    };
    assert_eq!(
        line,
        " [x] sender=me subject=job.done body=\"all finished\""
    );
}

async fn kiwimq_at(uri: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kiwimq"))
        .args(["--uri", uri, "--timeout", "10"])
        .args(args)
        .output()
        .await
        .unwrap()
}

#[actix::test]
async fn a_timeout_that_is_not_a_positive_number_is_a_usage_error() {
    for bad in ["-1", "0", "nan", "soon"] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiwimq"))
            .args([&format!("--timeout={bad}"), "queue", "stats"])
            .output()
            .await
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "--timeout {bad}");
        let text = stderr(&output);
        assert!(
            text.contains("invalid value") && text.contains("--timeout"),
            "{text}"
        );
    }
}

#[actix::test]
async fn a_task_sent_to_a_new_queue_says_it_made_the_queue() {
    let (settings, prefix) = private();
    let comm = settings.connect().await.unwrap();
    let queue = comm.task_queue("typo");
    // With every log line on, written to a pipe: no colour codes.
    let output = kiwimq(
        &prefix,
        &["task", "send", "1", "--no-reply", "--queue", queue.name()],
    )
    .env("RUST_LOG", "kiwimq=debug")
    .output()
    .await
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("DEBUG"), "{}", stderr(&output));
    assert!(!stderr(&output).contains('\x1b'), "{}", stderr(&output));
    assert!(
        stderr(&output).contains(&format!("there was no queue '{}'", queue.name())),
        "{}",
        stderr(&output)
    );
    assert_eq!(queue.stats().await.unwrap().ready, 1);
    // Once it exists, nothing is said.
    let output = run(
        &prefix,
        &["task", "send", "2", "--no-reply", "--queue", queue.name()],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("there was no queue"));
    assert_eq!(queue.purge().await.unwrap(), 2);
    comm.close().await.unwrap();
}

/// A GET of `path` on 127.0.0.1:`port`: the status code and the body.
async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_owned()))
}

#[actix_rt::test]
async fn the_dashboard_command_serves_the_fleet_and_refuses_an_open_bind_without_a_token() {
    let (settings, prefix) = private();
    let worker = settings
        .with_presence_interval(Some(Duration::from_millis(200)))
        .connect()
        .await
        .unwrap();
    let queue = worker.default_task_queue().name().to_owned();
    worker
        .add_task_subscriber(|task: Task<u32>| async move { Ok(task.body) })
        .await
        .unwrap();
    let port = common::free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut dashboard = kiwimq(
        &prefix,
        &["dashboard", "--bind", &bind, "--sample-every", "0.2"],
    )
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let pid = std::process::id();
    let workers = common::retry(SOON, "the dashboard's worker list", || async {
        let (status, body) = http_get(port, "/api/workers").await?;
        let workers: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| std::io::Error::other(format!("{status}: {e}: {body}")))?;
        match workers["workers"]
            .as_array()
            .is_some_and(|w| w.iter().any(|m| m["presence"]["pid"] == pid))
        {
            true => Ok(workers),
            false => Err(std::io::Error::other(format!("not yet: {body}"))),
        }
    })
    .await;
    // The command's own connection does not announce itself: only this test's worker.
    assert_eq!(workers["workers"].as_array().unwrap().len(), 1, "{workers}");
    let (status, page) = http_get(port, "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("kiwimq-csrf") && !page.contains("guest:guest@"));
    let (status, queues) = http_get(port, "/api/queues").await.unwrap();
    assert_eq!(status, 200);
    assert!(queues.contains(&queue), "{queues}");
    let (status, _) = http_get(port, "/api/broadcasts?limit=9999").await.unwrap();
    assert_eq!(status, 400);
    dashboard.start_kill().unwrap();
    let _ = dashboard.wait().await;

    let open = run(&prefix, &["dashboard", "--bind", "0.0.0.0:0"]).await;
    assert!(!open.status.success());
    assert!(
        stderr(&open).contains("without a token"),
        "{}",
        stderr(&open)
    );
    worker.close().await.unwrap();
}

/// `kiwimq dashboard` refuses what it cannot serve — an open address without a token, a
/// token no header or cookie can carry, an address it cannot listen on — before it
/// connects: here to a broker that is not there, which it must never reach.
#[actix_rt::test]
async fn the_dashboard_command_checks_its_address_and_token_before_it_connects() {
    let nobody = format!("amqp://guest:guest@127.0.0.1:{}/%2f", common::free_port());
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    for (args, refusal) in [
        (vec!["--bind", "0.0.0.0:0"], "without a token"),
        (vec!["--token", "two words"], "visible ASCII"),
        (vec!["--token", ""], "visible ASCII"),
        (vec!["--bind", busy.as_str()], "cannot listen"),
    ] {
        let started = std::time::Instant::now();
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiwimq"))
            .args(["--uri", &nobody, "--timeout", "30", "dashboard"])
            .args(&args)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(SOON, output)
            .await
            .expect("kiwimq dashboard refuses at once")
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        assert!(
            stderr(&output).contains(refusal),
            "{args:?}: {}",
            stderr(&output)
        );
        println!(
            "{args:?} refused in {:?}: {}",
            started.elapsed(),
            stderr(&output)
        );
    }
}
