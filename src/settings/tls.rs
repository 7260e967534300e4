//! [`TlsOptions`]: the TLS settings of an `amqps://` connection, as data; the AMQP
//! backend builds its TLS client from them.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// TLS options of a connection; unset ones take the URI's, then the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsOptions {
    /// Trust these CA certificates (PEM) instead of the system's roots.
    pub(crate) ca_file: Option<PathBuf>,
    /// The client's certificate chain (PEM), presented when the server asks.
    pub(crate) cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub(crate) key_file: Option<PathBuf>,
    /// Whether the server's certificate is checked; `Some(false)` is RabbitMQ's
    /// `verify=verify_none`.
    pub(crate) verify: Option<bool>,
    /// The name checked against the server's certificate and sent as SNI; the URI's host
    /// by default.
    pub(crate) server_name: Option<String>,
}

impl TlsOptions {
    /// Whether any option is set.
    pub(crate) fn is_set(&self) -> bool {
        *self != Self::default()
    }

    /// These options, each unset one taken from `fallback`.
    pub(crate) fn or(&self, fallback: &TlsOptions) -> TlsOptions {
        TlsOptions {
            ca_file: self.ca_file.clone().or_else(|| fallback.ca_file.clone()),
            cert_file: self
                .cert_file
                .clone()
                .or_else(|| fallback.cert_file.clone()),
            key_file: self.key_file.clone().or_else(|| fallback.key_file.clone()),
            verify: self.verify.or(fallback.verify),
            server_name: self
                .server_name
                .clone()
                .or_else(|| fallback.server_name.clone()),
        }
    }

    /// Takes a TLS option from a URI query pair; `false` if `key` is not one.
    pub(crate) fn read_query(&mut self, key: &str, value: &str) -> Result<bool> {
        let path = || Some(PathBuf::from(value));
        match key {
            "cacertfile" => self.ca_file = path(),
            "certfile" => self.cert_file = path(),
            "keyfile" => self.key_file = path(),
            "verify" => {
                self.verify = Some(match value {
                    "verify_peer" => true,
                    "verify_none" => false,
                    other => {
                        return Err(Error::config(format!(
                            "URI query verify={other}: expected verify_peer or verify_none"
                        )));
                    }
                })
            }
            "server_name_indication" => self.server_name = Some(value.to_owned()),
            _ => return Ok(false),
        }
        Ok(true)
    }
}
