//! The connection flags every RabbitMQ example shares: `--uri` and `--codec`.

use clap::Args;
use kiwimq::{Codec, Communicator, Settings};

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
    /// The codec: msgpack, json (or bincode with the feature).
    #[arg(long, default_value = "msgpack")]
    pub(crate) codec: Codec,
}

impl Connection {
    /// Connects with these flags, printing tracing output when `RUST_LOG` is set.
    pub(crate) async fn connect(&self) -> kiwimq::Result<Communicator> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        Settings::new(self.uri.clone())
            .with_codec(self.codec)
            .connect()
            .await
    }
}
