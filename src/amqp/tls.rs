//! TLS for `amqps://` with rustls (lapin's `rustls--ring` backend): the server verified
//! against the system's roots or a given CA, an optional client certificate, and the name
//! checked and sent as SNI — from the URI query as RabbitMQ's URI spec names them
//! (`cacertfile`, `certfile`, `keyfile`, `verify`, `server_name_indication`) or from
//! [`Settings`](crate::Settings). `amqps://` never falls back to plaintext.

use std::path::Path;
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
pub(crate) use crate::settings::TlsOptions;

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
