//! YAML as kiwiPy (PyYAML) writes and reads it.
//!
//! kiwiPy encodes with `yaml.dump` and decodes with `yaml.load(Loader=FullLoader)`. Python's
//! dumper tags tuples `!!python/tuple` (a task is the tuple `(body, no_reply)`); tags of
//! YAML's own namespace (`!!…`) are dropped by the parser, so a tuple reads as a sequence,
//! and we drop any other tag too, reading the node itself. Python bytes (`!!binary`) arrive
//! as their base64 text. We write plain YAML, which `FullLoader` reads back (a list where
//! Python sent a tuple).

use serde::Serialize;
use serde::de::DeserializeOwned;
use yaml_serde::value::TaggedValue;
use yaml_serde::{Mapping, Value};

use crate::error::{Error, Result};

pub(super) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    yaml_serde::to_string(value)
        .map(String::into_bytes)
        .map_err(Error::codec)
}

pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let value: Value = yaml_serde::from_slice(bytes).map_err(Error::codec)?;
    yaml_serde::from_value(untag(value)).map_err(Error::codec)
}

/// The value with every tag dropped (`!custom` tags survive parsing as `Tagged`).
fn untag(value: Value) -> Value {
    match value {
        Value::Tagged(tagged) => {
            let TaggedValue { value, .. } = *tagged;
            untag(value)
        }
        Value::Sequence(items) => Value::Sequence(items.into_iter().map(untag).collect()),
        Value::Mapping(entries) => Value::Mapping(
            entries
                .into_iter()
                .map(|(key, value)| (untag(key), untag(value)))
                .collect::<Mapping>(),
        ),
        scalar => scalar,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Bytes exactly as PyYAML's `yaml.dump(obj, encoding='utf-8')` wrote them.
    #[test]
    fn reads_what_python_writes() {
        let task = b"!!python/tuple\n- a: 1\n  b:\n  - 1\n  - 2.5\n  - null\n  - x\n- false\n";
        let (body, no_reply): (BTreeMap<String, rmpv::Value>, bool) = decode(task).unwrap();
        assert!(!no_reply);
        assert_eq!(body["a"], rmpv::Value::from(1));
        let reply = b"host:\n  hostname: h\n  pid: 3\nresult:\n  a: !!python/tuple\n  - 1\n  - 2\n";
        let reply: BTreeMap<String, BTreeMap<String, rmpv::Value>> = decode(reply).unwrap();
        assert_eq!(
            reply["result"]["a"],
            rmpv::Value::Array(vec![1.into(), 2.into()])
        );
        let bytes: String = decode(b"!!binary |\n  Ynl0ZXM=\n").unwrap();
        assert_eq!(
            bytes.trim(),
            "Ynl0ZXM=",
            "bytes arrive as their base64 text"
        );
        let custom: Vec<i64> = decode(b"!point\n- 1\n- 2\n").unwrap();
        assert_eq!(custom, [1, 2], "a local tag is dropped too");
        let text: String = decode(b"exception: 'ValueError: x'\n")
            .map(|m: BTreeMap<String, String>| m["exception"].clone())
            .unwrap();
        assert_eq!(text, "ValueError: x");
    }

    #[test]
    fn what_we_write_reads_back() {
        let task = (BTreeMap::from([("x", vec![1.5, 2.0])]), true);
        let bytes = encode(&task).unwrap();
        let back: (BTreeMap<String, Vec<f64>>, bool) = decode(&bytes).unwrap();
        assert_eq!(back.0["x"], [1.5, 2.0]);
        assert!(back.1);
    }
}
