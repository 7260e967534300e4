//! Reading a broker URI as kiwiPy does: `amqp://user:pass@host[:port][/vhost][?query]`, where
//! a missing or empty vhost (`amqp://guest:guest@127.0.0.1/`, kiwiPy's own examples) is the
//! default vhost `/`, and `%2f` spells it explicitly.

use lapin::uri::AMQPUri;

use super::tls::TlsOptions;
use crate::error::{Error, Result};

/// The query parameters lapin understands; any other is ignored with a warning.
const QUERY_PARAMETERS: &[&str] = &[
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "auth_mechanism",
];

/// The TLS query parameters, as RabbitMQ's URI spec names them.
const TLS_PARAMETERS: &[&str] = &[
    "cacertfile",
    "certfile",
    "keyfile",
    "verify",
    "server_name_indication",
];

/// Parses `uri` (shown in errors as `redacted`), giving an empty vhost kiwiPy's meaning;
/// returns the TLS options its query gives too.
pub(crate) fn parse(uri: &str, redacted: &str) -> Result<(AMQPUri, TlsOptions)> {
    let mut tls = TlsOptions::default();
    let mut lapin_query = Vec::new();
    let (base, query) = uri.split_once('?').unwrap_or((uri, ""));
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
        if tls.read_query(key, &value)? {
            continue;
        }
        if !QUERY_PARAMETERS.contains(&key) {
            tracing::warn!(
                uri = %redacted,
                %key,
                "ignoring a URI query parameter kiwimq does not understand (it understands: {}, {})",
                QUERY_PARAMETERS.join(", "),
                TLS_PARAMETERS.join(", ")
            );
            continue;
        }
        lapin_query.push(pair);
    }
    let for_lapin = if lapin_query.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", lapin_query.join("&"))
    };
    let mut parsed: AMQPUri = for_lapin
        .parse()
        .map_err(|error| Error::config(format!("invalid broker URI '{redacted}': {error}")))?;
    if parsed.vhost.is_empty() {
        parsed.vhost = "/".to_owned();
    }
    Ok((parsed, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vhost(uri: &str) -> String {
        parse(uri, uri).unwrap().0.vhost
    }

    #[test]
    fn an_empty_or_missing_vhost_is_the_default_one_as_in_kiwipy() {
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1:5672/"), "/");
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1/"), "/");
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1"), "/");
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
        assert_eq!(vhost("amqp://127.0.0.1/aiida"), "aiida");
    }

    #[test]
    fn the_port_defaults_to_5672_and_query_parameters_are_read() {
        let (uri, tls) = parse("amqp://h/?heartbeat=30&unknown=1", "").unwrap();
        assert_eq!(uri.authority.port, 5672);
        assert_eq!(uri.query.heartbeat, Some(30));
        assert!(!tls.is_set());
    }

    #[test]
    fn tls_options_are_read_from_the_query_as_rabbitmq_names_them() {
        let (uri, tls) = parse(
            "amqps://h:5671/?cacertfile=%2Fetc%2Fca.pem&certfile=/c.pem&keyfile=/k.pem\
             &verify=verify_none&server_name_indication=broker.example&heartbeat=5",
            "",
        )
        .unwrap();
        assert_eq!(uri.query.heartbeat, Some(5));
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(
            tls.cert_file.as_deref(),
            Some(std::path::Path::new("/c.pem"))
        );
        assert_eq!(
            tls.key_file.as_deref(),
            Some(std::path::Path::new("/k.pem"))
        );
        assert_eq!(tls.verify, Some(false));
        assert_eq!(tls.server_name.as_deref(), Some("broker.example"));
        let error = parse("amqps://h/?verify=maybe", "").unwrap_err();
        assert!(error.to_string().contains("verify_peer"), "{error}");
    }

    #[test]
    fn a_malformed_uri_is_a_config_error() {
        let error = parse("amqp://h:notaport/", "amqp://h:notaport/").unwrap_err();
        assert!(
            matches!(error.kind(), crate::ErrorKind::Config(_)),
            "{error}"
        );
    }
}
