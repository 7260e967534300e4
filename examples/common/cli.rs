//! What every example shares: the `--uri` and `--codec` flags, logging on by default,
//! errors printed one cause a line, and stopping on Ctrl-C or SIGTERM.

#![allow(dead_code)] // each example uses part of it

use clap::Args;
use futures::StreamExt;
use kiwimq::{Codec, Communicator, ConnectionEvent, Settings};

// Not a doc comment: clap would show it as every example's description.
#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// The broker URI: amqp://user:pass@host[:port][/vhost][?heartbeat=S], amqps://… with TLS
    /// (?cacertfile=…&certfile=…&keyfile=…&verify=…&server_name_indication=…), a
    /// comma-separated list of a cluster's nodes, a ZeroMQ broker's zmq:///SERVICE_DIR (with
    /// `--features zeromq`), or mem:// for the embedded broker.
    #[arg(
        long,
        env = "KIWIMQ_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub(crate) uri: String,
    /// The codec: msgpack, json, yaml (kiwiPy's default), or bincode with its feature
    /// (default msgpack; json on a ZeroMQ broker, which carries only JSON).
    #[arg(long)]
    pub(crate) codec: Option<Codec>,
}

impl Connection {
    /// The settings these flags make; logging starts too.
    pub(crate) fn settings(&self) -> Settings {
        init_logging();
        // A comma-separated list is a cluster's nodes.
        let settings =
            Settings::new(self.uri.clone()).with_nodes(self.uri.split(',').map(str::trim));
        match self.codec {
            Some(codec) => settings.with_codec(codec),
            None => settings,
        }
    }

    /// Connects with these flags, printing every change of the connection (lost,
    /// restored) on stderr.
    pub(crate) async fn connect(&self) -> kiwimq::Result<Communicator> {
        let comm = self.settings().connect().await?;
        let mut events = comm.connection_events();
        actix_rt::spawn(async move {
            while let Some(event) = events.next().await {
                report(event);
            }
        });
        Ok(comm)
    }

    /// Connects a blocking communicator with these flags, reporting as `connect` does.
    pub(crate) fn connect_blocking(&self) -> kiwimq::Result<kiwimq::blocking::Communicator> {
        let comm = kiwimq::blocking::Communicator::connect_with(self.settings())?;
        let events = comm.connection_events();
        std::thread::spawn(move || events.for_each(report));
        Ok(comm)
    }
}

/// Logs to stderr: kiwimq's warnings and errors unless `RUST_LOG` says otherwise
/// (`RUST_LOG=kiwimq=debug` shows every send and receive). lapin's own lines are left out
/// by default: kiwimq reports what they mean (a failed connect, a lost connection).
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off"));
    // Colours only on a terminal: a log written to a file carries no escape codes.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn report(event: ConnectionEvent) {
    match event {
        ConnectionEvent::Lost(reason) => eprintln!(" [!] connection lost ({reason}); reconnecting"),
        ConnectionEvent::Restored(after) => eprintln!(" [!] connection restored after {after:.1?}"),
        ConnectionEvent::Connected { node } => eprintln!(" [!] connected to {node}"),
        _ => {}
    }
}

/// Blocks the calling thread until Ctrl-C or SIGTERM, for examples without async.
pub(crate) fn wait_for_shutdown_signal() {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(kiwimq::shutdown_signal()),
        Err(error) => eprintln!("cannot wait for signals ({error}); stopping"),
    }
}

/// An example's failure: returned from `main`, which prints it with `Debug` — kiwimq's
/// error then reads as its message and each cause on a line of its own.
pub(crate) type Failure = kiwimq::Error;

/// What an example's `main` returns.
pub(crate) type Outcome = Result<(), Failure>;
