//! The dashboard in a real browser: headless Chromium, driven through chromedriver
//! (WebDriver), loads the page in front of a fleet of two worker processes on RabbitMQ and
//! reads what it renders as the page updates itself: the worker count, a queue's depth
//! moving after 100 tasks, a worker shown lost after SIGKILL, a dead letter requeued
//! through the page's button — without a token, and with one (opened as `?token=…`, after
//! the page said why it needs it). Screenshots go to `target/dashboard-*.png`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/test.sh` installs them).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use kiwimq::dashboard::{Dashboard, DashboardOptions};
use kiwimq::{HandlerError, Settings, Task};

/// What a worker process is told, through its environment.
const WORKER: &str = "KIWIMQ_BROWSER_WORKER";
const INTERVAL: Duration = Duration::from_millis(500);

fn fleet_settings(config: &serde_json::Value) -> Settings {
    Settings::new(config["uri"].as_str().unwrap())
        .with_testing_mode(true)
        .with_message_exchange(config["messages"].as_str().unwrap())
        .with_task_exchange(config["tasks"].as_str().unwrap())
        .with_delivery_limit(1)
        .with_presence_interval(Some(INTERVAL))
}

/// A worker of the fleet: run by the browser test as a process of its own (this binary,
/// with the worker's settings in its environment). Tasks take 20 ms; `"poison"` panics
/// until the file named in the settings exists.
#[actix_rt::test]
#[ignore = "a worker process that dashboard_in_a_browser starts"]
async fn worker_process() {
    let Ok(config) = std::env::var(WORKER) else {
        return;
    };
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let comm = fleet_settings(&config).connect().await.unwrap();
    let cure = std::path::PathBuf::from(config["cure"].as_str().unwrap());
    comm.task_queue(config["queue"].as_str().unwrap())
        .add_task_subscriber(move |task: Task<String, usize>| {
            let cured = cure.exists();
            async move {
                if task.body == "poison" && !cured {
                    panic!("poison");
                }
                actix_rt::time::sleep(Duration::from_millis(20)).await;
                Ok::<_, HandlerError>(task.body.len())
            }
        })
        .await
        .unwrap();
    println!("worker ready");
    // Until killed (or the test ends and closes its stdin).
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
    comm.close().await.unwrap();
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn_worker(config: &serde_json::Value) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "worker_process", "--ignored", "--nocapture"])
        .env(WORKER, config.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("a worker process")
}

fn chromedriver(port: u16) -> Child {
    Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; scripts/test.sh installs it)")
}

async fn browser(port: u16) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1500,1100"],
        }),
    );
    let webdriver = format!("http://127.0.0.1:{port}");
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    retry(Duration::from_secs(20), "chromedriver's session", || {
        let mut builder = ClientBuilder::new(connector.clone());
        builder.capabilities(capabilities.clone());
        let webdriver = webdriver.clone();
        async move { builder.connect(&webdriver).await }
    })
    .await
}

/// The text of the first element at `css`, or `None` if there is none now.
async fn text(browser: &Client, css: &str) -> Option<String> {
    let element = browser.find(Locator::Css(css)).await.ok()?;
    element.text().await.ok()
}

/// Polls the rendered page until `condition` holds of the text at `css`, within 30 s.
async fn until_text(
    browser: &Client,
    css: &str,
    what: &str,
    condition: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(text) = text(browser, css).await
            && condition(&text)
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} ({css}: {:?})",
            text(browser, css).await
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.unwrap();
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let path = target.join(format!("dashboard-{name}.png"));
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
}

#[actix_rt::test]
async fn dashboard_in_a_browser() {
    dashboard_in_a_browser_with(None).await;
}

/// With a token, as a dashboard off loopback must have: opened without it, the page says
/// why it shows nothing; opened as `?token=…`, it keeps the token in a cookie, drops it
/// from the address, and renders and acts as without one.
#[actix_rt::test]
async fn dashboard_in_a_browser_with_its_token() {
    dashboard_in_a_browser_with(Some("T0ken-for-the-browser")).await;
}

async fn dashboard_in_a_browser_with(token: Option<&str>) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let queue = unique("browser-q");
    let cure = std::env::temp_dir().join(format!("kiwimq-browser-cure-{id}"));
    let config = serde_json::json!({
        "uri": amqp_url(),
        "messages": format!("kiwimq-test-{id}.messages"),
        "tasks": format!("kiwimq-test-{id}.tasks"),
        "queue": queue,
        "cure": cure,
    });
    let settings = fleet_settings(&config).with_presence_interval(None);
    let comm = settings.connect().await.unwrap();
    let mut workers = Killed(vec![spawn_worker(&config), spawn_worker(&config)]);

    let mut options = DashboardOptions::default()
        .with_sample_every(Duration::from_millis(250))
        .with_queues([queue.clone()]);
    if let Some(token) = token {
        options = options.with_token(token);
    }
    let dashboard = Dashboard::start(&comm, options).await.unwrap();
    let http = free_port();
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new().service(dashboard.scope("/kiwimq"))
    })
    .workers(1)
    .disable_signals()
    .bind(("127.0.0.1", http))
    .unwrap()
    .run();
    let server_handle = server.handle();
    actix_rt::spawn(server);

    let driver_port = free_port();
    let _driver = Killed(vec![chromedriver(driver_port)]);
    let browser = browser(driver_port).await;
    let page = format!("http://127.0.0.1:{http}/kiwimq/");
    if let Some(token) = token {
        browser.goto(&page).await.unwrap();
        let why = until_text(&browser, "#needs-token", "why the page is empty", |t| {
            t.contains("needs its token")
        })
        .await;
        println!("without its token, the page says: {why}");
        screenshot(&browser, "token-needed").await;
        browser
            .goto(&format!("{page}?token={token}"))
            .await
            .unwrap();
        let at = browser.current_url().await.unwrap();
        assert_eq!(at.as_str(), page, "the token left the address");
    } else {
        browser.goto(&page).await.unwrap();
    }
    let shot = |name: &str| match token {
        Some(_) => format!("token-{name}"),
        None => name.to_owned(),
    };

    // The fleet: two workers, live.
    until_text(&browser, "#worker-count", "two workers", |t| t == "2").await;
    until_text(&browser, "#live", "the live updates", |t| {
        t.starts_with("live")
    })
    .await;
    screenshot(&browser, &shot("workers")).await;

    // 100 tasks: the queue's depth rises, then falls to 0 as the workers take them.
    let sending = comm.task_queue(&queue);
    let mut replies = Vec::new();
    for n in 0..100 {
        replies.push(
            sending
                .task_send::<_, usize>(&format!("task {n}"))
                .await
                .unwrap(),
        );
    }
    let ready = format!("#queues tr[data-queue='{queue}'] td.ready");
    let seen = until_text(&browser, &ready, "the depth after 100 tasks", |t| {
        t.parse::<u32>().is_ok_and(|n| n > 0)
    })
    .await;
    println!("depth seen after 100 tasks: {seen}");
    screenshot(&browser, &shot("depth")).await;
    for reply in replies {
        reply.await.unwrap();
    }
    until_text(&browser, &ready, "the queue drained", |t| t == "0").await;

    // A worker killed (SIGKILL): shown lost, the count goes down.
    let killed = workers.0.remove(0);
    let killed_pid = killed.id();
    let mut killed = Killed(vec![killed]);
    let started = Instant::now();
    killed.0[0].kill().unwrap();
    killed.0[0].wait().unwrap();
    let lost = format!("#workers tr[data-pid='{killed_pid}'][data-standing='lost']");
    until_text(&browser, &lost, "the killed worker shown lost", |t| {
        t.contains("lost")
    })
    .await;
    println!("killed worker shown lost after {:?}", started.elapsed());
    assert_eq!(text(&browser, "#worker-count").await.as_deref(), Some("1"));
    assert_eq!(text(&browser, "#lost-count").await.as_deref(), Some("1"));
    screenshot(&browser, &shot("lost")).await;

    // A dead letter, requeued through the page's button and its confirmation.
    let _ = sending.task_send::<_, usize>(&"poison".to_owned()).await;
    let dead = format!("#queues tr[data-queue='{queue}'] td.dead-letters");
    until_text(&browser, &dead, "the dead letter", |t| t == "1").await;
    std::fs::write(&cure, b"").unwrap();
    let done = "#workers tr[data-standing='live'] td:nth-child(9)";
    let done_before: u64 = text(&browser, done).await.unwrap().parse().unwrap();
    let button =
        format!("#queues tr[data-queue='{queue}'] button[data-action='requeue-dead-letters']");
    browser
        .find(Locator::Css(&button))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&browser, "#confirm-text", "the confirmation", |t| {
        t.contains("Requeue dead letters")
    })
    .await;
    screenshot(&browser, &shot("confirm")).await;
    browser
        .find(Locator::Css("#confirm-yes"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&browser, "#action-result", "the requeue's answer", |t| {
        t.contains("requeue-dead-letters") && t.ends_with(": 1")
    })
    .await;
    until_text(&browser, &dead, "no dead letters", |t| t == "0").await;
    // Handled by the live worker this time.
    until_text(&browser, done, "the requeued task handled", |t| {
        t.parse::<u64>().is_ok_and(|n| n > done_before)
    })
    .await;
    let _ = sending.purge().await;
    screenshot(&browser, &shot("requeued")).await;

    browser.close().await.unwrap();
    server_handle.stop(false).await;
    drop(workers);
    let _ = std::fs::remove_file(&cure);
    comm.close().await.unwrap();
}
