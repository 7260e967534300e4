//! TLS for `amqps://` with rustls (lapin's `rustls--ring` backend): the server verified
//! against the system's roots or a given CA, an optional client certificate, and the name
//! checked and sent as SNI — from the URI query as RabbitMQ's URI spec names them
//! (`cacertfile`, `certfile`, `keyfile`, `verify`, `server_name_indication`) or from
//! [`Settings`](crate::Settings). `amqps://` never falls back to plaintext.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lapin::tcp::RustlsConnector;
use rustls_connector::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use rustls_connector::rustls::crypto::{CryptoProvider, ring};
use rustls_connector::rustls::pki_types::pem::PemObject;
use rustls_connector::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls_connector::rustls::{self, ClientConfig, DigitallySignedStruct, RootCertStore};

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

/// A ready TLS client: what the connection's socket is wrapped in.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) connector: RustlsConnector,
    /// The name to verify and to send as SNI.
    pub(crate) server_name: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Builds the TLS client for `host` from `options`: files are read now, so a missing or
/// malformed one is a `Config` error at connect, not at the first handshake.
pub(crate) fn client(options: &TlsOptions, host: &str) -> Result<Tls> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS: {e}")))?;
    let builder = if options.verify == Some(false) {
        tracing::warn!(
            %host,
            "TLS with verify_none: the server's certificate is not checked, so anyone on the \
             path can pose as the broker (use only to test)"
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        builder.with_root_certificates(roots(options.ca_file.as_deref())?)
    };
    let config = match (&options.cert_file, &options.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(|e| {
                Error::config(format!(
                    "TLS client certificate {} with key {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })?,
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(Error::config(
                "TLS client certificate: certfile and keyfile go together (one is missing)",
            ));
        }
    };
    let server_name = options
        .server_name
        .clone()
        .unwrap_or_else(|| host.to_owned());
    ServerName::try_from(server_name.as_str())
        .map_err(|e| Error::config(format!("TLS server name '{server_name}': {e}")))?;
    Ok(Tls {
        connector: RustlsConnector::from(Arc::new(config)),
        server_name,
    })
}

/// The CAs a server certificate must chain to: the file's, else the system's.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let (added, _) = store.add_parsable_certificates(certificates(path)?);
            if added == 0 {
                return Err(Error::config(format!(
                    "TLS CA file {}: no usable certificate in it",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_connector::rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::debug!(%error, "a system CA certificate could not be read");
            }
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(Error::config(
                    "TLS: no CA certificates found on this system; give one with the URI's \
                     cacertfile or Settings::with_tls_ca_file",
                ));
            }
        }
    }
    Ok(store)
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::config(format!("TLS certificate file {}: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(Error::config(format!(
            "TLS certificate file {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certificates)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| Error::config(format!("TLS key file {}: {e}", path.display())))
}

/// `verify=verify_none`: accepts any certificate, still checks the handshake's signatures.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
