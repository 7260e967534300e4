//! The connection flags every RabbitMQ example shares: `--uri` and `--codec`.

use clap::Args;
use futures::StreamExt;
use kiwimq::{Codec, Communicator, ConnectionEvent, Settings};

/// Where to connect and how to encode.
#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// The broker URI.
    #[arg(
        long,
        env = "KIWIMQ_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub(crate) uri: String,
    /// The codec: msgpack, json, yaml (kiwiPy's default), or bincode with its feature.
    #[arg(long, default_value = "msgpack")]
    pub(crate) codec: Codec,
}

impl Connection {
    /// The settings these flags make, with tracing output when `RUST_LOG` is set.
    fn settings(&self) -> Settings {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
        Settings::new(self.uri.clone()).with_codec(self.codec)
    }

    /// Connects with these flags, printing every change of the connection (lost,
    /// restored) on stderr.
    #[allow(dead_code)] // the blocking examples use `connect_blocking`
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
    #[allow(dead_code)] // the async examples use `connect`
    pub(crate) fn connect_blocking(&self) -> kiwimq::Result<kiwimq::blocking::Communicator> {
        let comm = kiwimq::blocking::Communicator::connect_with(self.settings())?;
        let events = comm.connection_events();
        std::thread::spawn(move || events.for_each(report));
        Ok(comm)
    }
}

fn report(event: ConnectionEvent) {
    match event {
        ConnectionEvent::Lost(reason) => eprintln!(" [!] connection lost ({reason}); reconnecting"),
        ConnectionEvent::Restored(after) => eprintln!(" [!] connection restored after {after:.1?}"),
        _ => {}
    }
}
