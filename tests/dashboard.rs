//! The dashboard's JSON API, mounted in-process in an actix-web app, on both backends: what
//! it shows of a running fleet (workers, queues, dead letters, processes, broadcasts) and
//! how it refuses bad input, a missing token and a missing CSRF token; on a real socket,
//! how it refuses another site's Host and Origin; and, with announcements forged on
//! RabbitMQ as anyone who may publish there can, that none makes it panic and a flood of
//! them leaves it within its bounds.

mod common;

use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{App, test};
use common::*;
use kiwimq::dashboard::{Dashboard, DashboardOptions, Overview};
use kiwimq::{BroadcastOptions, Communicator, HandlerError, Task};
use serde_json::Value;

async fn connect(settings: &kiwimq::Settings) -> Communicator {
    settings
        .clone()
        .with_presence_interval(Some(Duration::from_millis(200)))
        .connect()
        .await
        .expect("connect")
}

/// Polls `read` until `condition` holds, within 20 s.
async fn until<T: std::fmt::Debug>(
    what: &str,
    mut read: impl AsyncFnMut() -> T,
    condition: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let value = read().await;
        if condition(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {value:?}"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn the_api_shows_the_fleet_and_refuses_bad_input(backend: Backend) {
    let settings = settings(backend).with_delivery_limit(1);
    let comm = connect(&settings).await;
    let queue = comm.task_queue(unique("dash-q"));
    queue
        .add_task_subscriber(|task: Task<String, usize>| async move {
            if task.body == "poison" {
                panic!("poison");
            }
            Ok::<_, HandlerError>(task.body.len())
        })
        .await
        .unwrap();
    let options = DashboardOptions::default()
        .with_sample_every(Duration::from_millis(100))
        .with_queues([queue.name().to_owned()]);
    let dashboard = Dashboard::start(&comm, options).await.unwrap();
    let app = test::init_service(App::new().service(dashboard.scope("/kiwimq"))).await;
    let get = async |path: &str| -> (StatusCode, Value) {
        let request = test::TestRequest::get().uri(path).to_request();
        let response = test::call_service(&app, request).await;
        let status = response.status();
        let body = test::read_body(response).await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    };

    // The worker (this very communicator) and its queue.
    let (status, workers) = until(
        "the worker",
        async || get("/kiwimq/api/workers").await,
        |(_, w)| w["workers"].as_array().is_some_and(|w| !w.is_empty()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let member = &workers["workers"][0];
    assert_eq!(member["standing"], "live");
    assert_eq!(member["presence"]["pid"], std::process::id());
    assert!(
        member["presence"]["node"]
            .as_str()
            .is_some_and(|n| !n.contains("guest:guest@")),
        "{member}"
    );

    assert_eq!(
        queue
            .task_send::<_, usize>(&"four".to_owned())
            .await
            .unwrap()
            .await
            .unwrap(),
        4
    );
    let _ = queue.task_send::<_, usize>(&"poison".to_owned()).await;
    let (_, view) = until(
        "the dead letter",
        async || get(&format!("/kiwimq/api/queues/{}", queue.name())).await,
        |(_, q)| q["dead_letters"] == 1,
    )
    .await;
    assert_eq!(view["consumers"], 1);
    let (_, queues) = get("/kiwimq/api/queues").await;
    assert!(
        queues
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == queue.name()),
        "{queues}"
    );

    // AiiDA's state broadcasts: processes by pk; the tail, filtered.
    comm.broadcast_send(
        &Value::Null,
        BroadcastOptions::subject("state_changed.created.running").with_sender(47),
    )
    .await
    .unwrap();
    comm.broadcast_send(
        &"hello",
        BroadcastOptions::subject("greeting").with_sender("me"),
    )
    .await
    .unwrap();
    let (_, processes) = until(
        "process 47",
        async || get("/kiwimq/api/processes").await,
        |(_, p)| p.as_array().is_some_and(|p| !p.is_empty()),
    )
    .await;
    assert_eq!(processes[0]["pk"], "47");
    assert_eq!(processes[0]["state"], "running");
    assert_eq!(processes[0]["previous"], "created");
    let (_, tail) = until(
        "the greeting",
        async || get("/kiwimq/api/broadcasts?subject=greet*").await,
        |(_, t)| t.as_array().is_some_and(|t| !t.is_empty()),
    )
    .await;
    assert_eq!(tail.as_array().unwrap().len(), 1);
    assert_eq!(tail[0]["sender"], "me");
    assert_eq!(tail[0]["body"], "\"hello\"");
    let (_, none) = get("/kiwimq/api/broadcasts?sender=nobody").await;
    assert_eq!(none, serde_json::json!([]));

    let (_, series) = get("/kiwimq/api/series").await;
    assert!(
        series
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["round_trip_ms"].as_f64().is_some()),
        "{series}"
    );
    let overview: Overview = serde_json::from_value(get("/kiwimq/api/overview").await.1).unwrap();
    assert!(!overview.uri.contains("guest:guest@"), "{}", overview.uri);

    // Bad input: 4xx with a message.
    for (path, status) in [
        ("/kiwimq/api/broadcasts?limit=0", StatusCode::BAD_REQUEST),
        ("/kiwimq/api/broadcasts?limit=lots", StatusCode::BAD_REQUEST),
        ("/kiwimq/api/broadcasts?colour=red", StatusCode::BAD_REQUEST),
        (
            "/kiwimq/api/queues/no-such-queue-here",
            StatusCode::NOT_FOUND,
        ),
        ("/kiwimq/api/queues/bad%01name", StatusCode::BAD_REQUEST),
        ("/kiwimq/api/nothing", StatusCode::NOT_FOUND),
    ] {
        let (got, body) = get(path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {body}"
        );
    }

    // Actions: a POST without the page's CSRF token is refused; with it, done.
    let requeue = format!("/kiwimq/api/queues/{}/requeue-dead-letters", queue.name());
    let response =
        test::call_service(&app, test::TestRequest::post().uri(&requeue).to_request()).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response =
        test::call_service(&app, test::TestRequest::get().uri("/kiwimq/").to_request()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let page = String::from_utf8(test::read_body(response).await.to_vec()).unwrap();
    let csrf = page
        .split("name=\"kiwimq-csrf\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let wrong = test::TestRequest::post()
        .uri(&requeue)
        .insert_header(("X-CSRF-Token", "guessed"))
        .to_request();
    assert_eq!(
        test::call_service(&app, wrong).await.status(),
        StatusCode::FORBIDDEN
    );
    let unknown = test::TestRequest::post()
        .uri(&format!("/kiwimq/api/queues/{}/explode", queue.name()))
        .insert_header(("X-CSRF-Token", csrf.as_str()))
        .to_request();
    assert_eq!(
        test::call_service(&app, unknown).await.status(),
        StatusCode::NOT_FOUND
    );
    let purge = test::TestRequest::post()
        .uri(&format!(
            "/kiwimq/api/queues/{}/purge-dead-letters",
            queue.name()
        ))
        .insert_header(("X-CSRF-Token", csrf.as_str()))
        .to_request();
    let response = test::call_service(&app, purge).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = serde_json::from_slice(&test::read_body(response).await).unwrap();
    assert_eq!(body["count"], 1);
    let (_, view) = get(&format!("/kiwimq/api/queues/{}", queue.name())).await;
    assert_eq!(view["dead_letters"], 0);

    drop(app);
    drop(dashboard);
    let _ = queue.dead_letters().purge().await;
    comm.close().await.unwrap();
}

async fn a_token_is_required_when_set(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let options = DashboardOptions::default().with_token("s3cret");
    let dashboard = Dashboard::start(&comm, options).await.unwrap();
    let app = test::init_service(App::new().service(dashboard.scope(""))).await;
    let status = async |request: test::TestRequest| {
        test::call_service(&app, request.to_request())
            .await
            .status()
    };
    assert_eq!(
        status(test::TestRequest::get().uri("/api/workers")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(test::TestRequest::get().uri("/")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(test::TestRequest::get().uri("/api/workers?token=wrong")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(test::TestRequest::get().uri("/api/workers?token=s3cret")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(
            test::TestRequest::get()
                .uri("/api/workers")
                .insert_header(("Authorization", "Bearer s3cret"))
        )
        .await,
        StatusCode::OK
    );
    drop(app);
    drop(dashboard);
    comm.close().await.unwrap();
}

#[actix_rt::test]
async fn serving_elsewhere_than_loopback_needs_a_token() {
    let comm = kiwimq::connect("mem://").await.unwrap();
    let bind: std::net::SocketAddr = "0.0.0.0:0".parse().unwrap();
    let error = kiwimq::dashboard::serve(&comm, bind, "", DashboardOptions::default())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("without a token"), "{error}");
    comm.close().await.unwrap();
}

/// A dashboard dropped — or its start dropped at any point — takes its RPC and broadcast
/// subscribers with it.
async fn a_dropped_dashboard_leaves_no_subscriber_behind(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let before = comm.health().await;
    let subscribers = async || {
        let health = comm.health().await;
        (health.rpc_subscribers, health.broadcast_subscribers)
    };
    let dashboard = Dashboard::start(&comm, DashboardOptions::default())
        .await
        .unwrap();
    assert_eq!(
        subscribers().await,
        (before.rpc_subscribers + 1, before.broadcast_subscribers + 1)
    );
    drop(dashboard);
    let at_first = (before.rpc_subscribers, before.broadcast_subscribers);
    until("the dashboard's subscribers removed", subscribers, |s| {
        *s == at_first
    })
    .await;
    for polls in 1..12 {
        let mut start = std::pin::pin!(Dashboard::start(&comm, DashboardOptions::default()));
        for _ in 0..polls {
            if futures::poll!(start.as_mut()).is_ready() {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(1)).await;
        }
    }
    until("every start's subscribers removed", subscribers, |s| {
        *s == at_first
    })
    .await;
    comm.close().await.unwrap();
}

/// In a browser: `/?token=…` sets a cookie and sends it on to the page without the token
/// in its address; the page's assets need no token (nothing secret in them), its API takes
/// the cookie; without a token the page says why.
async fn a_browser_keeps_the_token_in_a_cookie(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let options = DashboardOptions::default().with_token("s3cret");
    let dashboard = Dashboard::start(&comm, options).await.unwrap();
    let app = test::init_service(App::new().service(dashboard.scope("/kiwimq"))).await;
    let call = async |request: test::TestRequest| {
        let response = test::call_service(&app, request.to_request()).await;
        let status = response.status();
        let headers = response.headers().clone();
        let body = String::from_utf8_lossy(&test::read_body(response).await).into_owned();
        (status, headers, body)
    };

    for asset in ["/kiwimq/assets/page.js", "/kiwimq/assets/page.css"] {
        let (status, _, _) = call(test::TestRequest::get().uri(asset)).await;
        assert_eq!(status, StatusCode::OK, "{asset}");
    }
    let (status, _, page) = call(test::TestRequest::get().uri("/kiwimq/")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        page.contains("id=\"needs-token\"") && page.contains("?token="),
        "{page}"
    );
    assert!(!page.contains("kiwimq-csrf"), "{page}");
    let (status, _, page) = call(test::TestRequest::get().uri("/kiwimq/?token=wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(page.contains("not this dashboard's"), "{page}");

    let (status, headers, _) = call(test::TestRequest::get().uri("/kiwimq/?token=s3cret")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers.get("location").unwrap(), "/kiwimq/");
    let cookie = headers
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("s3cret"),
        "the cookie holds the token encoded: {cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let with_cookie = |uri: &str| {
        test::TestRequest::get()
            .uri(uri)
            .insert_header(("Cookie", format!("theme=dark; {pair}")))
    };
    let (status, _, page) = call(with_cookie("/kiwimq/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("kiwimq-csrf"), "{page}");
    let (status, _, _) = call(with_cookie("/kiwimq/api/workers")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call(
        test::TestRequest::get()
            .uri("/kiwimq/api/workers")
            .insert_header(("Cookie", "kiwimq-dashboard-token=77726f6e67")),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    drop(app);
    drop(dashboard);
    comm.close().await.unwrap();
}

/// One raw HTTP/1.1 request to 127.0.0.1:`port`: its status and body.
async fn raw_http(port: u16, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, body.to_owned())
}

fn get_with_host(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

/// DNS rebinding: a page of another site whose name now points at 127.0.0.1 sends its own
/// name as `Host`; on a loopback address the dashboard answers loopback names only. And a
/// POST from another origin is refused, CSRF token or not.
#[actix_rt::test]
async fn on_loopback_another_host_or_origin_is_refused() {
    let comm = connect(&settings(Backend::Mem)).await;
    let queue = unique("origin-q");
    comm.task_queue(&queue)
        .add_task_subscriber(|task: Task<u32>| async move { Ok::<_, HandlerError>(task.body) })
        .await
        .unwrap();
    let options = DashboardOptions::default().with_queues([queue.clone()]);
    let dashboard = Dashboard::start(&comm, options).await.unwrap();
    let port = free_port();
    let server = actix_web::HttpServer::new(move || App::new().service(dashboard.scope("")))
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", port))
        .unwrap()
        .run();
    let server_handle = server.handle();
    actix_rt::spawn(server);

    for host in [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        "[::2]:80".to_owned(),
        "10.0.0.1".to_owned(),
        "127.0.0.1:notaport".to_owned(),
    ] {
        for path in ["/", "/api/overview", "/assets/page.js"] {
            let (status, body) = raw_http(port, &get_with_host(path, &host)).await;
            assert_eq!(status, 421, "Host {host} {path}: {body}");
            assert!(body.contains("DNS rebinding"), "{body}");
        }
    }
    let mut page = String::new();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        "127.9.8.7".to_owned(),
        format!("[::1]:{port}"),
        "localhost".to_owned(),
    ] {
        let (status, body) = raw_http(port, &get_with_host("/", &host)).await;
        assert_eq!(status, 200, "Host {host}: {body}");
        page = body;
    }
    let csrf = page
        .split("name=\"kiwimq-csrf\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_owned();
    let post = |origin: &str| {
        format!(
            "POST /api/queues/{queue}/purge HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{origin}\
             X-CSRF-Token: {csrf}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    for origin in [
        "Origin: http://evil.example\r\n".to_owned(),
        format!("Origin: http://evil.example:{port}\r\n"),
        "Origin: null\r\n".to_owned(),
        format!("Referer: http://evil.example:{port}/kiwimq/\r\n"),
        format!("Origin: http://127.0.0.1:{}\r\n", port.wrapping_add(1)),
    ] {
        let (status, body) = raw_http(port, &post(&origin)).await;
        assert_eq!(status, 403, "{origin}: {body}");
        assert!(body.contains("another origin"), "{body}");
    }
    for origin in [
        format!("Origin: http://127.0.0.1:{port}\r\n"),
        format!("Referer: http://127.0.0.1:{port}/\r\n"),
        // Not a browser (curl): the CSRF token alone guards it.
        String::new(),
    ] {
        let (status, body) = raw_http(port, &post(&origin)).await;
        assert_eq!(status, 200, "{origin}: {body}");
    }
    server_handle.stop(false).await;
    comm.close().await.unwrap();
}

/// Long subjects and senders are cut as bodies are: the tail's bytes are bounded.
async fn the_tail_keeps_at_most_its_bytes(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let dashboard = Dashboard::start(&comm, DashboardOptions::default())
        .await
        .unwrap();
    let long = "x".repeat(100_000);
    comm.broadcast_send(
        &long,
        BroadcastOptions::subject(format!("state_changed.created.{long}"))
            .with_sender(long.as_str()),
    )
    .await
    .unwrap();
    let overview = until(
        "the long broadcast",
        async || dashboard.overview(),
        |o| !o.broadcasts.is_empty() && !o.processes.is_empty(),
    )
    .await;
    let heard = &overview.broadcasts[0];
    let lengths = (
        heard.subject.as_ref().map_or(0, String::len),
        heard.sender.as_ref().map_or(0, String::len),
        heard.body.len(),
    );
    println!("a broadcast of 3 x 100,000 bytes kept as {lengths:?} bytes");
    assert!(
        lengths.0 <= 503 && lengths.1 <= 503 && lengths.2 <= 2003,
        "{lengths:?}"
    );
    let process = &overview.processes[0];
    assert!(process.pk.len() <= 503 && process.state.len() <= 503);
    drop(dashboard);
    comm.close().await.unwrap();
}

/// What anyone who may publish on the broker can send the dashboard: raw announcements on
/// its presence exchange.
struct Forger {
    _connection: lapin::Connection,
    channel: lapin::Channel,
    exchange: String,
}

impl Forger {
    async fn connect(settings: &kiwimq::Settings) -> Forger {
        let connection =
            lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        let channel = connection.create_channel().await.unwrap();
        Forger {
            _connection: connection,
            channel,
            exchange: format!("{}.kiwimq-presence", settings.message_exchange()),
        }
    }

    async fn publish(&self, body: &[u8]) {
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                "[kiwimq.presence]".into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
    }
}

/// An announcement as a kiwimq communicator sends it, with `id` and one queue.
fn forged(id: &str, queue: &str) -> Value {
    serde_json::json!({
        "id": id, "host": "forged-host", "pid": 4242, "program": "forger",
        "version": "0.1.0", "backend": "amqp", "node": "127.0.0.1:5672", "connected": true,
        "sent_at_ms": 1_765_000_000_000u64, "uptime_secs": 12.5, "interval_secs": 5.0,
        "task_queues": [{"name": queue, "prefetch": 1, "subscribers": 1, "running": 0,
            "counts": {"handled": 1, "failed": 0, "panicked": 0, "rejected": 0}}],
        "rpc_identifiers": 0, "broadcast_filters": [], "in_flight": [],
        "counts": {"handled": 1, "failed": 0, "panicked": 0, "rejected": 0},
        "restarts": 0, "subscribers_lost": 0, "pending_results": 0, "closing": false,
    })
}

/// Polls the dashboard until the announcement of `id` shows: every one published before it
/// was read by then.
async fn until_heard(dashboard: &Dashboard, id: &str, within: Duration) -> Overview {
    let deadline = Instant::now() + within;
    loop {
        let overview = dashboard.overview();
        if overview.workers.iter().any(|m| m.presence.id == id) {
            return overview;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {id}");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Announcements whose numbers are out of range — an interval no `Duration` holds (which
/// panicked the roster), progress past 1, ages negative, a timestamp no page reads — are
/// refused one by one, as are undecodable and oversized ones; the dashboard goes on
/// answering and sampling.
#[actix_rt::test]
async fn an_announcement_out_of_range_is_refused_and_the_dashboard_goes_on() {
    let settings = amqp_settings(&amqp_url());
    let comm = connect(&settings).await;
    let options = DashboardOptions::default().with_sample_every(Duration::from_millis(100));
    let dashboard = Dashboard::start(&comm, options).await.unwrap();
    let app = test::init_service(App::new().service(dashboard.scope(""))).await;
    let forger = Forger::connect(&settings).await;
    let queue = unique("forged-q");
    let mut bad = Vec::new();
    for (n, change) in [
        serde_json::json!({"interval_secs": 1e300}),
        serde_json::json!({"interval_secs": -1.0}),
        serde_json::json!({"interval_secs": 1e9}),
        serde_json::json!({"uptime_secs": -3.0}),
        serde_json::json!({"sent_at_ms": u64::MAX}),
        serde_json::json!({"in_flight": [{"queue": queue, "correlation_id": null,
            "age_secs": 1e300, "progress": null, "note": null}]}),
        serde_json::json!({"in_flight": [{"queue": queue, "correlation_id": null,
            "age_secs": 1.0, "progress": 7.5, "note": null}]}),
        serde_json::json!({"task_queues": [{"name": "", "prefetch": 1, "subscribers": 1,
            "running": 0, "counts": {"handled": 0, "failed": 0, "panicked": 0, "rejected": 0}}]}),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("out-of-range-{n}");
        let mut presence = forged(&id, &queue);
        for (key, value) in change.as_object().unwrap() {
            presence[key] = value.clone();
        }
        forger
            .publish(&serde_json::to_vec(&presence).unwrap())
            .await;
        bad.push(id);
    }
    forger.publish(b"{\"id\": 1e999}").await;
    forger.publish(&vec![b' '; 300 * 1024]).await;
    let marker = uuid::Uuid::new_v4().to_string();
    forger
        .publish(&serde_json::to_vec(&forged(&marker, &queue)).unwrap())
        .await;
    let overview = until_heard(&dashboard, &marker, Duration::from_secs(20)).await;
    for id in &bad {
        assert!(
            overview.workers.iter().all(|m| &m.presence.id != id),
            "{id} was not refused"
        );
    }
    // Still answering, and still sampling: new samples keep coming.
    let samples = overview.series.len();
    for _ in 0..3 {
        let response = test::call_service(
            &app,
            test::TestRequest::get().uri("/api/overview").to_request(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    until(
        "another sample",
        async || dashboard.overview().series.len(),
        |n| *n > samples || *n >= 450,
    )
    .await;
    drop(app);
    drop(dashboard);
    comm.close().await.unwrap();
}

/// Counts that are each in range but overflow a `u64` when the dashboard adds them up (over
/// a worker's outcomes, over the workers of a queue, a queue's ready and running tasks):
/// the sums saturate, and the sampler goes on sampling.
#[actix_rt::test]
async fn counts_that_overflow_a_sum_leave_the_dashboard_sampling() {
    let settings = amqp_settings(&amqp_url());
    let comm = connect(&settings).await;
    let queue = unique("huge-q");
    let options = DashboardOptions::default()
        .with_sample_every(Duration::from_millis(100))
        .with_queues([queue.clone()]);
    let dashboard = Dashboard::start(&comm, options).await.unwrap();
    let forger = Forger::connect(&settings).await;
    let max = serde_json::json!({"handled": u64::MAX, "failed": u64::MAX,
        "panicked": 0, "rejected": 0});
    let mut last = String::new();
    for n in 0..2 {
        last = format!("huge-counts-{n}-{}", uuid::Uuid::new_v4().simple());
        let mut presence = forged(&last, &queue);
        presence["counts"] = max.clone();
        presence["task_queues"][0]["counts"] = max.clone();
        presence["task_queues"][0]["running"] = serde_json::json!(u64::MAX);
        forger
            .publish(&serde_json::to_vec(&presence).unwrap())
            .await;
    }
    until_heard(&dashboard, &last, Duration::from_secs(20)).await;
    let samples = dashboard.overview().series.len();
    let overview = until(
        "two more samples",
        async || dashboard.overview(),
        |o| o.series.len() >= samples + 2 || o.series.len() >= 9000,
    )
    .await;
    let view = overview.queues.iter().find(|q| q.name == queue).unwrap();
    assert_eq!(view.in_flight, u64::MAX, "{view:?}");
    drop(dashboard);
    comm.close().await.unwrap();
}

/// This process's resident memory, in bytes (Linux).
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// 100,000 forged announcements with distinct ids, each naming a queue of its own: the
/// roster keeps its bound in count and bytes, the newest; the dashboard samples at most
/// 200 queues; the roster holds at most 32 MiB ([`Roster::MAX_BYTES`]: about 5 MiB here),
/// and this whole process — the forger's own buffers included — grows by less than 128 MiB
/// (about 47 MiB measured).
#[actix_rt::test]
async fn a_flood_of_forged_ids_leaves_the_dashboard_within_its_bounds() {
    const FORGED: usize = 100_000;
    let settings = amqp_settings(&amqp_url());
    let comm = connect(&settings).await;
    let options = DashboardOptions::default().with_sample_every(Duration::from_millis(250));
    let dashboard = Dashboard::start(&comm, options).await.unwrap();
    let forger = Forger::connect(&settings).await;
    let before = resident_bytes();
    let started = Instant::now();
    let prefix = uuid::Uuid::new_v4().simple().to_string();
    for n in 0..FORGED {
        let presence = forged(&format!("{prefix}-{n}"), &format!("forged-{prefix}-{n}"));
        forger
            .publish(&serde_json::to_vec(&presence).unwrap())
            .await;
    }
    let last = format!("{prefix}-{}", FORGED - 1);
    let overview = until_heard(&dashboard, &last, Duration::from_secs(120)).await;
    let after = resident_bytes();
    let footprint = dashboard.footprint();
    let grown = after.saturating_sub(before);
    println!(
        "{FORGED} forged announcements in {:?}: roster {} members, {} bytes ({:.1} MiB); \
         {} queues sampled; resident {:.1} MiB -> {:.1} MiB (+{:.1} MiB)",
        started.elapsed(),
        footprint.workers,
        footprint.worker_bytes,
        footprint.worker_bytes as f64 / 1048576.0,
        footprint.queues,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        grown as f64 / 1048576.0,
    );
    assert_eq!(
        overview.workers.len(),
        kiwimq::presence::Roster::MAX_MEMBERS
    );
    assert!(footprint.workers <= kiwimq::presence::Roster::MAX_MEMBERS);
    assert!(footprint.worker_bytes <= kiwimq::presence::Roster::MAX_BYTES);
    // The newest kept, the oldest forgotten (the dashboard's own communicator aside).
    let forged_kept = overview
        .workers
        .iter()
        .filter_map(|m| m.presence.id.strip_prefix(&format!("{prefix}-")))
        .map(|n| n.parse::<usize>().unwrap());
    assert!(
        forged_kept
            .clone()
            .all(|n| n >= FORGED - kiwimq::presence::Roster::MAX_MEMBERS)
    );
    assert!(forged_kept.count() >= kiwimq::presence::Roster::MAX_MEMBERS - 1);
    until(
        "a sample of at most 200 queues",
        async || dashboard.footprint().queues,
        |queues| (1..=200).contains(queues),
    )
    .await;
    assert!(grown < 128 << 20, "resident memory grew by {grown} bytes");
    drop(dashboard);
    comm.close().await.unwrap();
}

on_both_backends!(
    a_dropped_dashboard_leaves_no_subscriber_behind,
    the_api_shows_the_fleet_and_refuses_bad_input,
    a_token_is_required_when_set,
    a_browser_keeps_the_token_in_a_cookie,
    the_tail_keeps_at_most_its_bytes,
);
