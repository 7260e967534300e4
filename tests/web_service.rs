//! `examples/web_service.rs` driven over real HTTP: the built example in front of a worker
//! and an RPC server of this test, on RabbitMQ.

mod common;

use std::time::{Duration, Instant};

use kiwimq::{Rpc, Settings, Task};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{amqp_url, example, free_port, unique};

/// One HTTP/1.1 request; the status and the body.
async fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[actix::test]
async fn the_web_service_enqueues_polls_calls_and_reports() {
    let queue = unique("web");
    let rpc = unique("echo");
    let worker = Settings::new(amqp_url()).connect().await.unwrap();
    worker
        .task_queue(queue.clone())
        .add_task_subscriber(|t: Task<i64>| async move { Ok(t.body * 2) })
        .await
        .unwrap();
    worker
        .add_rpc_subscriber(
            Some(&rpc),
            |r: Rpc<serde_json::Value>| async move { Ok(r.body) },
        )
        .await
        .unwrap();

    let port = free_port();
    let _service = tokio::process::Command::new(example("web_service"))
        .args(["--uri", &amqp_url(), "--queue", &queue, "--timeout", "10"])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .kill_on_drop(true)
        .spawn()
        .expect("the web_service example is built (cargo test --all-features builds it)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the service never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, body) = http(port, "POST", "/tasks", "21").await;
    assert_eq!(
        (status, json(&body)),
        (200, serde_json::json!({"result": 42}))
    );

    let (status, body) = http(port, "POST", "/tasks?wait=false", "5").await;
    assert_eq!(status, 202, "{body}");
    let job = json(&body)["job"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http(port, "GET", &format!("/jobs/{job}"), "").await;
        assert_eq!(status, 200, "{body}");
        let state = json(&body);
        if state["status"] == "done" {
            assert_eq!(state["result"], 10);
            break;
        }
        assert_eq!(state["status"], "pending");
        assert!(Instant::now() < deadline, "the job never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = http(port, "GET", "/jobs/unknown", "").await;
    assert_eq!(status, 404);

    let (status, body) = http(
        port,
        "POST",
        &format!("/rpc/{rpc}"),
        r#"{"intent": "status"}"#,
    )
    .await;
    assert_eq!(
        (status, json(&body)),
        (200, serde_json::json!({"result": {"intent": "status"}}))
    );
    let (status, body) = http(port, "POST", "/rpc/nobody-serves-this", "1").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        json(&body)["error"].as_str().unwrap().contains("nobody"),
        "{body}"
    );
    let (status, _) = http(port, "POST", "/tasks", "not json").await;
    assert_eq!(status, 400);

    let (status, body) = http(port, "GET", "/health", "").await;
    assert_eq!(status, 200, "{body}");
    let health = json(&body);
    assert_eq!(health["connected"], true);
    assert_eq!(health["pending_results"], 0);

    let (status, page) = http(port, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    let sent = format!("kiwimq_messages_sent_total{{kind=\"task\",queue=\"{queue}\"}} 2");
    assert!(page.contains(&sent), "{sent} in:\n{page}");
    assert!(page.contains("kiwimq_round_trip_seconds"), "{page}");

    worker.close().await.unwrap();
    let _ = std::process::Command::new("rabbitmqctl")
        .args(["-q", "delete_queue", &queue])
        .output();
}
