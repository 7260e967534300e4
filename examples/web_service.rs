//! kiwimq inside an actix-web service: an HTTP API in front of a worker fleet.
//!
//! `cargo run --example web_service --features prometheus -- [--bind 127.0.0.1:8080]
//! [--queue NAME] [--uri URI] [--codec NAME]`
//!
//! - `POST /tasks` with a JSON body enqueues a task and answers its result;
//!   `POST /tasks?wait=false` answers `{"job": ID}` at once, and `GET /jobs/ID` says
//!   `{"status": "pending"}`, then `{"status": "done", "result": …}` (or `"failed"`).
//! - `POST /rpc/ID` with a JSON body calls the RPC subscriber `ID` and answers its reply.
//! - `GET /health`: connected, subscribers, tasks running, results pending.
//! - `GET /metrics`: kiwimq's metrics for Prometheus.
//!
//! A failed call answers 502 with `{"error": …}`: 504 on a timeout, 404 when nobody
//! serves an RPC identifier, 400 for a body that is not JSON.

#[path = "common/cli.rs"]
mod cli;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use clap::Parser;
use kiwimq::{Communicator, ErrorKind, Value};
use serde::Deserialize;
use serde_json::json;

/// An HTTP API over a kiwimq communicator: tasks, jobs to poll, RPC, health and metrics.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    connection: cli::Connection,
    /// The address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: String,
    /// The task queue (default: the default task queue).
    #[arg(long)]
    queue: Option<String>,
    /// How long a request waits for a result, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// A job's state, for `GET /jobs/ID`.
#[derive(Clone)]
enum Job {
    Pending,
    Done(Value),
    Failed(String),
}

/// What every request handler shares.
struct Service {
    comm: Communicator,
    queue: Option<String>,
    timeout: Duration,
    jobs: Mutex<HashMap<String, Job>>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

#[derive(Deserialize)]
struct TaskQuery {
    wait: Option<bool>,
}

/// An error as JSON, with the status that says what kind it is.
fn failure(error: &kiwimq::Error) -> HttpResponse {
    let body = json!({ "error": error.to_string() });
    match error.kind() {
        ErrorKind::Timeout => HttpResponse::GatewayTimeout().json(body),
        ErrorKind::Unroutable(_) => HttpResponse::NotFound().json(body),
        ErrorKind::Codec(_) => HttpResponse::BadRequest().json(body),
        _ => HttpResponse::BadGateway().json(body),
    }
}

fn config(reason: String) -> kiwimq::Error {
    kiwimq::Error::new(ErrorKind::Config(reason))
}

/// A result as JSON, or the error with its status.
fn answer(result: kiwimq::Result<Value>) -> HttpResponse {
    match result {
        Ok(result) => HttpResponse::Ok().json(json!({ "result": result })),
        Err(error) => failure(&error),
    }
}

/// A request body as a value (none is null); what is wrong with it otherwise.
fn json_body(bytes: &[u8]) -> Result<Value, String> {
    if bytes.is_empty() {
        return Ok(Value::Nil);
    }
    serde_json::from_slice(bytes).map_err(|error| format!("the body is not JSON: {error}"))
}

fn bad_request(error: String) -> HttpResponse {
    HttpResponse::BadRequest().json(json!({ "error": error }))
}

async fn send_task(
    service: web::Data<Service>,
    query: web::Query<TaskQuery>,
    body: web::Bytes,
) -> HttpResponse {
    let body = match json_body(&body) {
        Ok(body) => body,
        Err(error) => return bad_request(error),
    };
    let queue = match &service.queue {
        Some(name) => service.comm.task_queue(name.clone()),
        None => service.comm.default_task_queue(),
    };
    let reply = match queue.task_send::<_, Value>(&body).await {
        Ok(reply) => reply.with_timeout(Some(service.timeout)),
        Err(error) => return failure(&error),
    };
    if query.wait.unwrap_or(true) {
        return answer(reply.await);
    }
    let job = reply.correlation_id().to_owned();
    service
        .jobs
        .lock()
        .unwrap()
        .insert(job.clone(), Job::Pending);
    let done = service.clone();
    let id = job.clone();
    actix_web::rt::spawn(async move {
        let state = match reply.await {
            Ok(result) => Job::Done(result),
            Err(error) => Job::Failed(error.to_string()),
        };
        done.jobs.lock().unwrap().insert(id, state);
    });
    HttpResponse::Accepted().json(json!({ "job": job }))
}

async fn job(service: web::Data<Service>, id: web::Path<String>) -> HttpResponse {
    let state = service.jobs.lock().unwrap().get(id.as_str()).cloned();
    match state {
        None => HttpResponse::NotFound().json(json!({ "error": "no such job" })),
        Some(Job::Pending) => HttpResponse::Ok().json(json!({ "status": "pending" })),
        Some(Job::Done(result)) => {
            HttpResponse::Ok().json(json!({ "status": "done", "result": result }))
        }
        Some(Job::Failed(error)) => {
            HttpResponse::Ok().json(json!({ "status": "failed", "error": error }))
        }
    }
}

async fn call(
    service: web::Data<Service>,
    id: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let body = match json_body(&body) {
        Ok(body) => body,
        Err(error) => return bad_request(error),
    };
    match service.comm.rpc_send::<_, Value>(&id, &body).await {
        Ok(reply) => answer(reply.with_timeout(Some(service.timeout)).await),
        Err(error) => failure(&error),
    }
}

async fn health(service: web::Data<Service>) -> HttpResponse {
    let health = service.comm.health().await;
    let body = json!({
        "connected": health.connected,
        "node": service.comm.node(),
        "subscribers": health.subscribers(),
        "tasks_running": health.tasks_running,
        "pending_results": health.pending_results,
    });
    if health.connected {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn render_metrics(service: web::Data<Service>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(service.metrics.render())
}

#[actix_web::main]
async fn main() -> cli::Outcome {
    let cli = Cli::parse();
    let metrics = kiwimq::metrics::install_prometheus()?;
    let comm = cli.connection.connect().await?;
    let service = web::Data::new(Service {
        comm: comm.clone(),
        queue: cli.queue,
        timeout: Duration::from_secs(cli.timeout),
        jobs: Mutex::default(),
        metrics,
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(service.clone())
            .route("/tasks", web::post().to(send_task))
            .route("/jobs/{id}", web::get().to(job))
            .route("/rpc/{id}", web::post().to(call))
            .route("/health", web::get().to(health))
            .route("/metrics", web::get().to(render_metrics))
    })
    .bind(&cli.bind)
    .map_err(|error| config(format!("cannot serve on {}: {error}", cli.bind)))?
    .run();
    println!(" [x] Serving on http://{} (Ctrl-C to stop)", cli.bind);
    // actix-web stops on Ctrl-C and SIGTERM, after the requests in hand.
    server
        .await
        .map_err(|error| config(format!("the HTTP server failed: {error}")))?;
    comm.close().await
}
