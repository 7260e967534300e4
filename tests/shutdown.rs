//! Closing with a task running says at once what it waits for and how long, so a stop
//! that takes the shutdown grace never looks hung. Its own binary: the log is captured by
//! a global subscriber.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SOON, eventually};
use kiwimq::{HandlerError, Settings, Task};

/// Every log line, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[actix_rt::test]
async fn closing_with_a_task_running_says_what_it_waits_for_at_once() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("kiwimq=warn")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let settings = Settings::new(format!("mem://{}", uuid::Uuid::new_v4().simple()))
        .with_shutdown_grace(Duration::from_secs(20));
    let comm = settings.connect().await.unwrap();
    let (started, mut running) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let released = release.clone();
    comm.add_task_subscriber(move |_: Task<u32, ()>| {
        let started = started.clone();
        let released = released.clone();
        async move {
            let _ = started.send(());
            released.notified().await;
            Ok::<_, HandlerError>(())
        }
    })
    .await
    .unwrap();
    comm.default_task_queue()
        .task_send_no_reply(&1u32)
        .await
        .unwrap();
    running.recv().await.unwrap();

    let closing = actix_rt::spawn({
        let comm = comm.clone();
        async move { comm.close().await }
    });
    // Long before the 20 s grace is over, the log says what the close waits for.
    eventually(SOON, "the close to say what it waits for", || {
        captured
            .text()
            .contains("waiting up to 20s for 1 running task(s) to finish")
    })
    .await;
    release.notify_one();
    closing.await.unwrap().unwrap();
    assert!(
        !captured.text().contains("closing with tasks still running"),
        "the task finished within the grace: {}",
        captured.text()
    );
}
