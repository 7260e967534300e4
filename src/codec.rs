//! How bodies become bytes: the [`Codec`] chosen per communicator, and (in `envelope`) the
//! kiwiPy message envelopes every backend puts on the wire.

pub(crate) mod envelope;
#[cfg(feature = "yaml")]
mod yaml;

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use envelope::BroadcastEnvelope;

/// The encoding of message bodies and envelopes, chosen per communicator.
///
/// Every process that talks over the same exchanges must use the same codec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// MessagePack with named struct fields (`rmp-serde`): compact and self-describing, so a
    /// task stored for weeks still decodes after its struct gains an optional field.
    #[default]
    MessagePack,
    /// JSON (`serde_json`): readable, and what kiwiPy users configure with `json.dumps`.
    Json,
    /// bincode 2 with its standard configuration: the smallest bytes, for Rust-only fleets.
    /// Not self-describing: sender and receiver must agree on the exact types.
    #[cfg(feature = "bincode")]
    Bincode,
    /// YAML, kiwiPy's default encoding (feature `yaml`): reads what PyYAML's `yaml.dump`
    /// writes, Python tuples (`!!python/tuple`) and bytes (`!!binary`) included, and writes
    /// plain YAML that `yaml.load(Loader=yaml.FullLoader)` reads. The slowest codec.
    #[cfg(feature = "yaml")]
    Yaml,
}

/// The most a bincode message may claim to hold: RabbitMQ's default largest message.
#[cfg(feature = "bincode")]
const BINCODE_LIMIT: usize = 128 << 20;

impl Codec {
    /// Every codec compiled into this build.
    pub const ALL: &'static [Codec] = &[
        Codec::MessagePack,
        Codec::Json,
        #[cfg(feature = "bincode")]
        Codec::Bincode,
        #[cfg(feature = "yaml")]
        Codec::Yaml,
    ];

    /// The codec's short name, as accepted by [`str::parse`]: `msgpack`, `json`, `bincode`,
    /// `yaml`.
    pub fn name(self) -> &'static str {
        match self {
            Self::MessagePack => "msgpack",
            Self::Json => "json",
            #[cfg(feature = "bincode")]
            Self::Bincode => "bincode",
            #[cfg(feature = "yaml")]
            Self::Yaml => "yaml",
        }
    }

    /// Whether bytes carry their own shape, so that a [`Value`](crate::Value) of unknown
    /// shape can be decoded: every codec but bincode.
    pub fn is_self_describing(self) -> bool {
        match self {
            #[cfg(feature = "bincode")]
            Self::Bincode => false,
            _ => true,
        }
    }

    /// Encodes `value` into bytes.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>> {
        match self {
            Self::MessagePack => rmp_serde::to_vec_named(value).map_err(Error::codec),
            Self::Json => serde_json::to_vec(value).map_err(Error::codec),
            #[cfg(feature = "bincode")]
            Self::Bincode => bincode::serde::encode_to_vec(value, bincode::config::standard())
                .map_err(Error::codec),
            #[cfg(feature = "yaml")]
            Self::Yaml => yaml::encode(value),
        }
    }

    /// Decodes bytes into a `T`. Malformed bytes or a value of another shape give an
    /// [`ErrorKind::Codec`](crate::ErrorKind::Codec) error, never a panic.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        match self {
            Self::MessagePack => {
                let mut deserializer = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
                let value = T::deserialize(&mut deserializer).map_err(Error::codec)?;
                let used = usize::try_from(deserializer.position()).unwrap_or(usize::MAX);
                no_trailing_bytes(bytes.len(), used)?;
                Ok(value)
            }
            // serde_json refuses anything but whitespace after the value.
            Self::Json => serde_json::from_slice(bytes).map_err(Error::codec),
            #[cfg(feature = "bincode")]
            Self::Bincode => {
                // The limit makes a bogus length prefix an error instead of an allocation
                // of that size (which aborts the process).
                let config = bincode::config::standard().with_limit::<BINCODE_LIMIT>();
                let (value, used) =
                    bincode::serde::decode_from_slice(bytes, config).map_err(Error::codec)?;
                no_trailing_bytes(bytes.len(), used)?;
                Ok(value)
            }
            // A YAML stream with a second document is refused by the parser.
            #[cfg(feature = "yaml")]
            Self::Yaml => yaml::decode(bytes),
        }
    }
}

impl Codec {
    /// Encodes a broadcast envelope; bincode, which cannot read a value of unknown shape,
    /// carries its headers as text.
    pub(crate) fn encode_broadcast<T: Serialize>(
        self,
        envelope: BroadcastEnvelope<T>,
    ) -> Result<Vec<u8>> {
        match self {
            #[cfg(feature = "bincode")]
            Self::Bincode => self.encode(&envelope.with_text_headers()),
            _ => self.encode(&envelope),
        }
    }

    /// Decodes a broadcast envelope (see [`encode_broadcast`](Self::encode_broadcast)).
    pub(crate) fn decode_broadcast<T: DeserializeOwned>(
        self,
        bytes: &[u8],
    ) -> Result<BroadcastEnvelope<T>> {
        match self {
            #[cfg(feature = "bincode")]
            Self::Bincode => self
                .decode::<BroadcastEnvelope<T, String>>(bytes)
                .map(BroadcastEnvelope::with_value_headers),
            _ => self.decode(bytes),
        }
    }
}

/// Bytes left after the value mean the sender used another codec (JSON's `30` read as
/// MessagePack is the integer 51 followed by `0`): an error, never a wrong value.
fn no_trailing_bytes(len: usize, used: usize) -> Result<()> {
    if used < len {
        return Err(Error::codec(format!(
            "{} trailing bytes after the value (was it sent with another codec?)",
            len - used
        )));
    }
    Ok(())
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Codec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "msgpack" | "messagepack" => Ok(Self::MessagePack),
            "json" => Ok(Self::Json),
            #[cfg(feature = "bincode")]
            "bincode" => Ok(Self::Bincode),
            #[cfg(feature = "yaml")]
            "yaml" => Ok(Self::Yaml),
            other => Err(Error::config(format!(
                "unknown codec '{other}' (this build knows: {})",
                Self::ALL
                    .iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Job {
        name: String,
        steps: Vec<u32>,
        tags: BTreeMap<String, f64>,
        parent: Option<Box<Job>>,
    }

    fn sample() -> Job {
        Job {
            name: "relax".into(),
            steps: vec![1, 2, 3],
            tags: [("energy".to_string(), -1.5)].into_iter().collect(),
            parent: Some(Box::new(Job {
                name: "scf".into(),
                steps: vec![],
                tags: BTreeMap::new(),
                parent: None,
            })),
        }
    }

    #[test]
    fn every_codec_round_trips_a_nested_struct() {
        for codec in Codec::ALL {
            let bytes = codec.encode(&sample()).unwrap();
            let back: Job = codec.decode(&bytes).unwrap();
            assert_eq!(back, sample(), "{codec}");
        }
    }

    #[test]
    fn malformed_bytes_are_a_codec_error() {
        for codec in Codec::ALL {
            for bytes in [&b""[..], b"\xff\xfe\x00", b"{\"name\": 3", &[0xc1; 7]] {
                let err = codec.decode::<Job>(bytes).unwrap_err();
                assert!(matches!(err.kind(), ErrorKind::Codec(_)), "{codec}: {err}");
            }
        }
    }

    #[test]
    fn a_value_of_the_wrong_shape_is_a_codec_error() {
        for codec in Codec::ALL {
            let bytes = codec.encode(&("not", "a", "job")).unwrap();
            let err = codec.decode::<Job>(&bytes).unwrap_err();
            assert!(matches!(err.kind(), ErrorKind::Codec(_)), "{codec}: {err}");
        }
    }

    #[test]
    fn a_dynamic_value_round_trips_in_every_self_describing_codec() {
        use crate::Value;
        let value = Value::Map(vec![
            ("name".into(), "relax".into()),
            ("steps".into(), Value::Array(vec![1.into(), (-2).into()])),
            ("energy".into(), Value::F64(-1.5)),
            ("done".into(), false.into()),
            ("parent".into(), Value::Nil),
        ]);
        for codec in Codec::ALL {
            let bytes = codec.encode(&value).unwrap();
            match codec.decode::<Value>(&bytes) {
                Ok(back) => {
                    assert_eq!(back["name"].as_str(), Some("relax"), "{codec}");
                    assert_eq!(back["steps"][1].as_i64(), Some(-2), "{codec}");
                    assert_eq!(back["energy"].as_f64(), Some(-1.5), "{codec}");
                    assert_eq!(back["done"].as_bool(), Some(false), "{codec}");
                    assert!(back["parent"].is_nil(), "{codec}");
                    // A typed struct reads what a dynamic value wrote, and back.
                    let typed: BTreeMap<String, Value> = codec.decode(&bytes).unwrap();
                    assert_eq!(typed.len(), 5);
                }
                Err(error) => {
                    assert!(
                        matches!(error.kind(), ErrorKind::Codec(_)),
                        "{codec}: {error}"
                    );
                    assert!(!codec.is_self_describing(), "{codec}: {error}");
                }
            }
        }
    }

    /// Bytes of one codec read by another self-describing one are an error or the very
    /// same value — never another value (a wrong answer computed in silence). Bincode
    /// reads any bytes as its type, and a one-byte body (a one-digit JSON number is a valid
    /// MessagePack integer) cannot be told apart by any codec: those are not claimed.
    #[test]
    fn bytes_of_another_codec_never_decode_to_another_value() {
        fn check<T>(value: &T)
        where
            T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
        {
            for writer in Codec::ALL {
                let bytes = writer.encode(value).unwrap();
                if bytes.len() < 2 {
                    continue;
                }
                let readers = Codec::ALL
                    .iter()
                    .filter(|r| *r != writer && r.is_self_describing());
                for reader in readers {
                    if let Ok(read) = reader.decode::<T>(&bytes) {
                        assert_eq!(&read, value, "{writer} read as {reader}");
                    }
                }
            }
        }
        for n in [10i64, 30, 51, 1000, -12, 123_456_789] {
            check(&n);
            check(&(n, false)); // a task envelope
        }
        check(&"hello".to_owned());
        check(&("task".to_owned(), true));
        check(&sample());
        check(&vec![1u32, 2, 3]);
        check(
            &[("intent".to_owned(), "pause".to_owned())]
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
        );
    }

    #[test]
    fn json_thirty_read_as_messagepack_is_an_error_not_fifty_one() {
        let error = Codec::MessagePack.decode::<i64>(b"30").unwrap_err();
        assert!(error.to_string().contains("trailing bytes"), "{error}");
    }

    #[test]
    fn names_parse_back() {
        for codec in Codec::ALL {
            assert_eq!(codec.name().parse::<Codec>().unwrap(), *codec);
        }
        assert!(matches!(
            "xml".parse::<Codec>().unwrap_err().kind(),
            ErrorKind::Config(_)
        ));
    }
}
