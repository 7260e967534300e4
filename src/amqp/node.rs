//! One node of the broker: its URI and, for `amqps://`, its TLS client. A communicator may
//! be given several (a cluster's nodes) and connects to one at a time.

use lapin::tcp::AsyncTcpStream;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

use super::tls::{self, Tls, TlsOptions};
use super::uri;
use crate::error::{Error, Result};
use crate::settings::redact;

/// A broker node to connect to.
pub(super) struct Node {
    uri: AMQPUri,
    /// The URI without its password, for logs and errors.
    pub(super) redacted: String,
    /// Set for `amqps://`: the socket is wrapped in TLS, never left plain.
    tls: Option<Tls>,
}

impl Node {
    /// Reads `uri`; TLS options from its query come before `tls`'s (the settings'), and
    /// any given for a plain `amqp://` URI are an error rather than silently unused.
    pub(super) fn new(uri: &str, tls: &TlsOptions) -> Result<Self> {
        let redacted = redact(uri);
        let (parsed, from_query) = uri::parse(uri, &redacted)?;
        let options = from_query.or(tls);
        let tls = match parsed.scheme {
            AMQPScheme::AMQPS => Some(tls::client(&options, &parsed.authority.host)?),
            AMQPScheme::AMQP if options.is_set() => {
                return Err(Error::config(format!(
                    "TLS options are given for '{redacted}', a plain amqp:// URI: use amqps:// \
                     (the broker's TLS port, 5671 by default) or drop them"
                )));
            }
            AMQPScheme::AMQP => None,
        };
        Ok(Self {
            uri: parsed,
            redacted,
            tls,
        })
    }

    /// Opens an AMQP connection to this node, through TLS for `amqps://`.
    pub(super) async fn connect(&self) -> lapin::Result<Connection> {
        let properties = ConnectionProperties::default();
        let Some(tls) = self.tls.clone() else {
            return Connection::connect_uri(self.uri.clone(), properties).await;
        };
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connector(
            self.uri.clone(),
            runtime,
            async move |uri: AMQPUri, runtime| {
                let address = (uri.authority.host.clone(), uri.authority.port);
                let address = runtime.to_socket_addrs(address);
                let stream = AsyncTcpStream::connect(&runtime, address).await?;
                Ok(stream.into_rustls(&tls.connector, &tls.server_name).await?)
            },
            properties,
        )
        .await
    }

    /// A failed connection's error, with what to check when TLS was involved, or when the
    /// server there does not speak AMQP.
    pub(super) fn explain(&self, error: &lapin::Error) -> String {
        if is_not_amqp(error) {
            let authority = &self.uri.authority;
            return format!(
                "the server on {}:{} did not answer as an AMQP broker (is it another \
                 service's port? RabbitMQ listens on 5672, 5671 for TLS)",
                authority.host, authority.port
            );
        }
        match &self.tls {
            Some(tls) if matches!(error.kind(), lapin::ErrorKind::IOError(_)) => format!(
                "{error} (TLS to '{}': is the port a TLS listener, and its certificate issued \
                 for that name by a trusted CA?)",
                tls.server_name
            ),
            _ => error.to_string(),
        }
    }
}

/// A cluster's nodes are all `amqps://` or all `amqp://`: a list mixing them would fail
/// over from an encrypted connection to a plaintext one, sending the credentials and every
/// message in the clear. Refused as a configuration error.
pub(super) fn one_scheme(nodes: &[Node]) -> Result<()> {
    let plain: Vec<&str> = nodes
        .iter()
        .filter(|node| node.tls.is_none())
        .map(|node| node.redacted.as_str())
        .collect();
    if !plain.is_empty() && plain.len() < nodes.len() {
        return Err(Error::config(format!(
            "the broker's nodes mix amqps:// and amqp:// ({} without TLS): a failover would \
             go from an encrypted connection to plaintext; give every node as amqps://",
            plain.join(", ")
        )));
    }
    Ok(())
}

/// Whether a failed connection's peer answered with something other than AMQP (its words
/// are then the parser's internals, of no use to a person).
pub(super) fn is_not_amqp(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ParsingError(_) | lapin::ErrorKind::InvalidProtocolVersion(_)
    )
}

/// Where the first connection attempt starts among `count` nodes: a random one, so that a
/// fleet's communicators spread over a cluster.
pub(super) fn random_start(count: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    usize::try_from(random % count.max(1) as u64).unwrap_or(0)
}
