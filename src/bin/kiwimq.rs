//! `kiwimq`: see and poke a fleet without writing code — call an RPC, send a task or a
//! broadcast, listen to broadcasts, read a queue's counts, replay or purge dead letters.
//!
//! Built with the `cli` feature: `cargo install --path . --features cli`. Bodies are JSON or
//! YAML text (YAML reads JSON too) and are printed as JSON, or YAML with `--yaml`. Every
//! failure is one line on stderr and exit status 1 (2 for bad arguments).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use kiwimq::{Broadcast, BroadcastFilter, BroadcastOptions, Codec, Communicator, Settings, Value};

#[derive(Debug, Parser)]
#[command(
    name = "kiwimq",
    version,
    about = "Talk to a kiwimq or kiwiPy fleet over RabbitMQ"
)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Connection {
    /// The broker: amqp://user:pass@host[:port][/vhost], amqps://… (TLS options in the
    /// query), a comma-separated list of a cluster's nodes, a ZeroMQ broker's
    /// zmq:///SERVICE_DIR or zmq+ipc:///PATH, or mem:// (this process only).
    #[arg(
        long,
        global = true,
        env = "KIWIMQ_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    uri: String,
    /// The codec of bodies: msgpack, json, yaml (kiwiPy's and AiiDA's), or bincode
    /// (default msgpack; json on a ZeroMQ broker, which carries only JSON).
    #[arg(long, global = true)]
    codec: Option<Codec>,
    /// An exchange prefix, as AiiDA's: exchanges PREFIX.messages and PREFIX.tasks, default
    /// task queue PREFIX.tasks (AiiDA's processes are on --queue PREFIX.process.queue).
    #[arg(long, global = true)]
    prefix: Option<String>,
    /// How long to wait for a reply or a connection, in seconds (more than 0).
    #[arg(long, global = true, default_value = "30", value_parser = seconds)]
    timeout: Duration,
    /// Print bodies as YAML rather than JSON.
    #[arg(long, global = true)]
    yaml: bool,
    /// The exchanges and queues of communicators in testing mode (kiwiPy's testing_mode:
    /// deleted when unused).
    #[arg(long, global = true)]
    testing_mode: bool,
    /// With --testing-mode: task queues declared non-durable, as kiwiPy's testing mode
    /// declares them (which RabbitMQ 4.3 refuses by default), to share them with kiwiPy.
    #[arg(long, global = true, requires = "testing_mode")]
    kiwipy_testing_queues: bool,
}

/// A positive, finite number of seconds.
fn seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!(
            "'{text}': a timeout is a number of seconds above 0"
        ));
    }
    Duration::try_from_secs_f64(seconds).map_err(|error| format!("'{text}': {error}"))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Remote procedure calls.
    #[command(subcommand)]
    Rpc(RpcCommand),
    /// Tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Broadcasts.
    #[command(subcommand)]
    Broadcast(BroadcastCommand),
    /// Task queues.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Run kiwimq's ZeroMQ broker for a service directory, as `verdi daemon broker` runs
    /// AiiDA's (same flags and files; an AiiDA daemon uses it instead of starting its own).
    /// Stops cleanly on SIGINT or SIGTERM. Needs the `zeromq` feature.
    Broker(BrokerArgs),
    /// Serve a live web view of the fleet: workers (from their presence), queues with their
    /// dead letters, throughput and round trips, an AiiDA profile's processes, a tail of
    /// broadcasts; a JSON API under /api. Stops on SIGINT or SIGTERM.
    Dashboard(DashboardArgs),
}

#[derive(Debug, Args)]
struct DashboardArgs {
    /// Where to listen. An address other than a loopback one needs --token.
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: std::net::SocketAddr,
    /// The URL path the dashboard is served under (e.g. /kiwimq).
    #[arg(long, default_value = "/")]
    path: String,
    /// A token every request must carry (?token=… or Authorization: Bearer …).
    #[arg(long, env = "KIWIMQ_DASHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Task queues to show besides those the workers consume (repeat for several).
    #[arg(long = "queue")]
    queues: Vec<String>,
    /// Seconds between samples of the queues and updates of the page.
    #[arg(long, default_value = "2", value_parser = seconds)]
    sample_every: Duration,
}

#[derive(Debug, Args)]
struct BrokerArgs {
    /// The service directory: AiiDA's `<AIIDA_PATH>/.aiida/broker/<UUID>-<profile>/`.
    #[arg(long, short = 's')]
    service_dir: std::path::PathBuf,
    /// Where the log goes (default SERVICE_DIR/broker.log).
    #[arg(long, short = 'l')]
    log_file_path: Option<std::path::PathBuf>,
    /// Seconds a worker that stopped answering keeps its tasks before they go to another.
    #[arg(long, default_value = "30", value_parser = seconds)]
    worker_grace: Duration,
    /// Seconds a task handed over as the last run stopped (which may never have reached its
    /// worker) is kept for that worker at a restart before it goes back to the queue.
    #[arg(long, default_value = "30", value_parser = seconds)]
    restore_lease: Duration,
}

#[derive(Debug, Subcommand)]
enum RpcCommand {
    /// Calls the RPC subscriber ID and prints its reply.
    Call {
        /// The subscriber's identifier (an AiiDA process's pk).
        id: String,
        /// The request body, JSON or YAML (default null).
        body: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Sends a task and prints its result.
    Send {
        /// The task body, JSON or YAML.
        body: String,
        /// The queue (default: the default task queue).
        #[arg(long)]
        queue: Option<String>,
        /// Ask for no result: print nothing once the broker has the task.
        #[arg(long)]
        no_reply: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BroadcastCommand {
    /// Sends a broadcast.
    Send {
        /// Its subject (e.g. state_changed.running.waiting).
        subject: String,
        /// Its body, JSON or YAML (default null).
        body: Option<String>,
        /// Its sender: a JSON or YAML value (AiiDA's are integers), default none.
        #[arg(long)]
        sender: Option<String>,
        /// Its correlation id.
        #[arg(long)]
        correlation_id: Option<String>,
    },
    /// Prints every broadcast, one line each, until interrupted (or --count are seen).
    Listen {
        /// Only subjects matching this glob (* and ?).
        #[arg(long)]
        subject: Option<String>,
        /// Only senders matching this glob.
        #[arg(long)]
        sender: Option<String>,
        /// One JSON object per line, for machines.
        #[arg(long)]
        json: bool,
        /// Stop after this many.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Messages ready, unacknowledged and consumers of task queues, without taking a task.
    Stats {
        /// The queues (default: the default task queue).
        queues: Vec<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The dead letters of a task queue (QUEUE.dlq): counted, sent back, or dropped.
    DeadLetters {
        /// The task queue.
        queue: String,
        /// Send every dead letter back to the queue, to run again.
        #[arg(long, conflicts_with = "purge")]
        requeue: bool,
        /// Delete every dead letter.
        #[arg(long)]
        purge: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Broker(args) = &cli.command {
        return match broker(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("kiwimq: {message}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,lapin=off".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let system = actix_rt::System::new();
    match system.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kiwimq: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `kiwimq broker`: serves until a signal, logging to the log file.
#[cfg(feature = "zeromq")]
fn broker(args: &BrokerArgs) -> Outcome {
    std::fs::create_dir_all(&args.service_dir)
        .map_err(|e| format!("{}: {e}", args.service_dir.display()))?;
    let log_path = args
        .log_file_path
        .clone()
        .unwrap_or_else(|| args.service_dir.join("broker.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::sync::Mutex::new(log))
        .with_ansi(false)
        .init();
    let running = kiwimq::broker::Broker::new(&args.service_dir)
        .with_worker_grace(args.worker_grace)
        .with_restore_lease(args.restore_lease)
        .start()
        .map_err(fail)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let mut check = tokio::time::interval(Duration::from_secs(1));
        let signal = kiwimq::shutdown_signal();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                () = &mut signal => break,
                _ = check.tick() => if !running.is_running() { break },
            }
        }
    });
    running.stop().map_err(fail)
}

#[cfg(not(feature = "zeromq"))]
fn broker(_: &BrokerArgs) -> Outcome {
    Err("this kiwimq was built without the `zeromq` feature: \
         cargo install --path . --features cli,zeromq"
        .into())
}

/// A failure, as the one line printed for it.
type Outcome = Result<(), String>;

/// An error and each of its causes, on one line.
fn line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = source.and_then(std::error::Error::source);
    }
    text
}

fn fail(error: kiwimq::Error) -> String {
    line(&error)
}

async fn run(cli: Cli) -> Outcome {
    let connection = &cli.connection;
    let timeout = connection.timeout;
    // The dashboard's address and token are checked, and its socket bound, before the
    // connection: a command that cannot serve fails at once, not after the broker answered.
    let dashboard = match &cli.command {
        Command::Dashboard(args) => {
            let options = dashboard_options(args);
            kiwimq::dashboard::check_serving(args.bind, &options).map_err(fail)?;
            Some((options, kiwimq::dashboard::listen(args.bind).map_err(fail)?))
        }
        _ => None,
    };
    let comm = connect(connection, timeout).await?;
    let result = match cli.command {
        Command::Rpc(RpcCommand::Call { id, body }) => {
            let body = parse(body.as_deref())?;
            print_reply(comm.rpc_send(&id, &body).await, timeout, connection.yaml).await
        }
        Command::Task(TaskCommand::Send {
            body,
            queue,
            no_reply,
        }) => {
            let body = parse(Some(&body))?;
            let named = queue.is_some();
            let queue = match queue {
                Some(name) => comm.task_queue(name),
                None => comm.default_task_queue(),
            };
            // A mistyped queue name would make a durable queue nobody reads: say so.
            let is_new = named && queue.stats().await.is_err();
            let sent = if no_reply {
                queue.task_send_no_reply(&body).await.map(|()| None)
            } else {
                queue.task_send(&body).await.map(Some)
            };
            if is_new && sent.is_ok() {
                eprintln!(
                    "kiwimq: note: there was no queue '{}': it was created (durable), and \
                     the task waits there for a worker",
                    queue.name()
                );
            }
            match sent.map_err(fail)? {
                None => Ok(()),
                Some(reply) => print_reply(Ok(reply), timeout, connection.yaml).await,
            }
        }
        Command::Broadcast(BroadcastCommand::Send {
            subject,
            body,
            sender,
            correlation_id,
        }) => {
            let body = parse(body.as_deref())?;
            let mut options = BroadcastOptions::subject(subject);
            if let Some(sender) = sender {
                options = options.with_sender(parse(Some(&sender))?);
            }
            if let Some(correlation_id) = correlation_id {
                options = options.with_correlation_id(correlation_id);
            }
            comm.broadcast_send(&body, options).await.map_err(fail)
        }
        Command::Broadcast(BroadcastCommand::Listen {
            subject,
            sender,
            json,
            count,
        }) => listen(&comm, subject, sender, json, count).await,
        Command::Queue(QueueCommand::Stats { queues, json }) => {
            let queues = if queues.is_empty() {
                vec![comm.default_task_queue()]
            } else {
                queues.into_iter().map(|q| comm.task_queue(q)).collect()
            };
            for queue in queues {
                let stats = queue.stats().await.map_err(fail)?;
                let unacknowledged = stats
                    .unacknowledged
                    .map_or_else(|| "null".to_owned(), |n| n.to_string());
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "queue": queue.name(),
                            "ready": stats.ready,
                            "unacknowledged": stats.unacknowledged,
                            "consumers": stats.consumers,
                        })
                    );
                } else {
                    println!(
                        "{}: ready {}, unacknowledged {}, consumers {}",
                        queue.name(),
                        stats.ready,
                        if stats.unacknowledged.is_some() {
                            unacknowledged.as_str()
                        } else {
                            "unknown"
                        },
                        stats.consumers
                    );
                }
            }
            Ok(())
        }
        Command::Queue(QueueCommand::DeadLetters {
            queue,
            requeue,
            purge,
        }) => {
            let queue = comm.task_queue(queue);
            let dead = queue.dead_letters();
            if requeue {
                let moved = queue.requeue_dead_letters().await.map_err(fail)?;
                println!("{moved} dead letters sent back to {}", queue.name());
            } else if purge {
                let dropped = dead.purge().await.map_err(fail)?;
                println!("{dropped} dead letters of {} deleted", queue.name());
            } else {
                let stats = dead.stats().await.map_err(fail)?;
                println!("{}: {} dead letters", dead.name(), stats.ready);
            }
            Ok(())
        }
        // Run by `main` before any connection.
        Command::Broker(_) => Err("the broker takes no connection".into()),
        Command::Dashboard(args) => match dashboard {
            Some((options, listener)) => {
                let path = if args.path == "/" {
                    ""
                } else {
                    args.path.as_str()
                };
                let bind = listener.local_addr().unwrap_or(args.bind);
                println!(
                    "kiwimq dashboard of {} on http://{bind}{path}/",
                    comm.settings().redacted_uri(),
                );
                kiwimq::dashboard::serve_on(&comm, listener, path, options)
                    .await
                    .map_err(fail)
            }
            None => Err("the dashboard's socket was not bound".into()),
        },
    };
    let _ = comm.close().await;
    result
}

fn dashboard_options(args: &DashboardArgs) -> kiwimq::dashboard::DashboardOptions {
    let mut options = kiwimq::dashboard::DashboardOptions::default()
        .with_queues(args.queues.iter().cloned())
        .with_sample_every(args.sample_every);
    if let Some(token) = &args.token {
        options = options.with_token(token.clone());
    }
    options
}

async fn connect(connection: &Connection, timeout: Duration) -> Result<Communicator, String> {
    let mut settings = Settings::new(connection.uri.clone())
        .with_nodes(connection.uri.split(',').map(str::trim))
        .with_connect_timeout(timeout)
        .with_send_timeout(timeout)
        .with_testing_mode(connection.testing_mode)
        .with_kiwipy_testing_queues(connection.kiwipy_testing_queues)
        // A command is not a worker: it does not announce itself to dashboards.
        .with_presence_interval(None);
    if let Some(codec) = connection.codec {
        settings = settings.with_codec(codec);
    }
    if let Some(prefix) = &connection.prefix {
        settings = settings
            .with_message_exchange(format!("{prefix}.messages"))
            .with_task_exchange(format!("{prefix}.tasks"))
            .with_task_queue(format!("{prefix}.tasks"));
    }
    settings.connect().await.map_err(fail)
}

/// A body from JSON or YAML text (YAML reads JSON too); none is null.
fn parse(text: Option<&str>) -> Result<Value, String> {
    let Some(text) = text else {
        return Ok(Value::Nil);
    };
    yaml_serde::from_str::<Value>(text)
        .map_err(|error| format!("the body '{text}' is neither JSON nor YAML: {error}"))
}

/// Waits for a sent request's reply, at most `timeout`, and prints it.
async fn print_reply(
    sent: kiwimq::Result<kiwimq::ReplyFuture<Value>>,
    timeout: Duration,
    yaml: bool,
) -> Outcome {
    let value = sent
        .map_err(fail)?
        .with_timeout(Some(timeout))
        .await
        .map_err(fail)?;
    print(&value, yaml)
}

fn print(value: &Value, yaml: bool) -> Outcome {
    let text = if yaml {
        yaml_serde::to_string(value).map_err(|e| e.to_string())?
    } else {
        serde_json::to_string(value).map_err(|e| e.to_string())?
    };
    println!("{}", text.trim_end());
    Ok(())
}

async fn listen(
    comm: &Communicator,
    subject: Option<String>,
    sender: Option<String>,
    json: bool,
    count: Option<usize>,
) -> Outcome {
    let mut filter = BroadcastFilter::new();
    if let Some(subject) = &subject {
        filter = filter.subject(subject);
    }
    if let Some(sender) = &sender {
        filter = filter.sender(sender);
    }
    let (tx, mut rx) = futures::channel::mpsc::unbounded::<String>();
    comm.add_broadcast_subscriber(filter, move |broadcast: Broadcast<Value>| {
        let text = if json {
            serde_json::json!({
                "subject": broadcast.subject_text(),
                "sender": broadcast.sender,
                "correlation_id": broadcast.correlation_id,
                "body": broadcast.body,
            })
            .to_string()
        } else {
            let body = serde_json::to_string(&broadcast.body).unwrap_or_default();
            format!(
                "{} from {}: {body}",
                broadcast.subject_text().unwrap_or_default(),
                broadcast
                    .sender_text()
                    .unwrap_or(std::borrow::Cow::Borrowed("-")),
            )
        };
        let _ = tx.unbounded_send(text);
        async { Ok(()) }
    })
    .await
    .map_err(fail)?;
    // Ready: a script may send now.
    eprintln!("listening");
    let mut seen = 0;
    let stop = kiwimq::shutdown_signal();
    futures::pin_mut!(stop);
    loop {
        tokio::select! {
            line = rx.next() => {
                let Some(line) = line else { return Ok(()) };
                let mut out = std::io::stdout().lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
                seen += 1;
                if count.is_some_and(|count| seen >= count) {
                    return Ok(());
                }
            }
            () = &mut stop => return Ok(()),
        }
    }
}
