//! The dashboard's JSON API, mounted in-process in an actix-web app, on both backends: what
//! it shows of a running fleet (workers, queues, dead letters, processes, broadcasts) and
//! how it refuses bad input, a missing token and a missing CSRF token.

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

on_both_backends!(
    a_dropped_dashboard_leaves_no_subscriber_behind,
    the_api_shows_the_fleet_and_refuses_bad_input,
    a_token_is_required_when_set,
);
