//! Reading a broker URI as kiwiPy does: `amqp://user:pass@host[:port][/vhost][?query]`, where
//! a missing or empty vhost (`amqp://guest:guest@127.0.0.1/`, kiwiPy's own examples) is the
//! default vhost `/`, and `%2f` spells it explicitly.

use lapin::uri::AMQPUri;

use crate::error::{Error, Result};

/// The query parameters lapin understands; any other is ignored with a warning.
const QUERY_PARAMETERS: &[&str] = &[
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "auth_mechanism",
];

/// Parses `uri` (shown in errors as `redacted`), giving an empty vhost kiwiPy's meaning.
pub(crate) fn parse(uri: &str, redacted: &str) -> Result<AMQPUri> {
    let mut parsed: AMQPUri = uri
        .parse()
        .map_err(|error| Error::config(format!("invalid broker URI '{redacted}': {error}")))?;
    if parsed.vhost.is_empty() {
        parsed.vhost = "/".to_owned();
    }
    if let Some((_, query)) = uri.split_once('?') {
        let keys = query
            .split('&')
            .map(|pair| pair.split('=').next().unwrap_or(pair));
        for key in keys.filter(|key| !key.is_empty() && !QUERY_PARAMETERS.contains(key)) {
            tracing::warn!(
                uri = %redacted,
                %key,
                "ignoring a URI query parameter kiwimq does not understand (it understands: {})",
                QUERY_PARAMETERS.join(", ")
            );
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vhost(uri: &str) -> String {
        parse(uri, uri).unwrap().vhost
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
        let uri = parse("amqp://h/?heartbeat=30&unknown=1", "").unwrap();
        assert_eq!(uri.authority.port, 5672);
        assert_eq!(uri.query.heartbeat, Some(30));
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
