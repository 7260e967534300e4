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
    /// Connects with these flags, printing tracing output when `RUST_LOG` is set and
    /// every change of the connection (lost, restored) on stderr.
    pub(crate) async fn connect(&self) -> kiwimq::Result<Communicator> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let comm = Settings::new(self.uri.clone())
            .with_codec(self.codec)
            .connect()
            .await?;
        let mut events = comm.connection_events();
        actix_rt::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    ConnectionEvent::Lost(reason) => {
                        eprintln!(" [!] connection lost ({reason}); reconnecting")
                    }
                    ConnectionEvent::Restored(after) => {
                        eprintln!(" [!] connection restored after {after:.1?}")
                    }
                    _ => {}
                }
            }
        });
        Ok(comm)
    }
}
