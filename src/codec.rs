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

/// Decodes bincode with a limit on what the message may claim that grows with its size: at
/// least 64 times its bytes (no value a Rust peer sends takes that much more memory than
/// wire), at most [`BINCODE_LIMIT`]. bincode allocates a string or a vector as long as its
/// length prefix says before it reads it, so under one fixed limit a 10-byte message made
/// the decoder take 128 MiB (found by fuzzing).
#[cfg(feature = "bincode")]
fn decode_bincode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize)> {
    fn limited<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<(T, usize)> {
        let config = bincode::config::standard().with_limit::<LIMIT>();
        bincode::serde::decode_from_slice(bytes, config).map_err(Error::codec)
    }
    match bytes.len() {
        0..=1024 => limited::<T, { 64 << 10 }>(bytes),
        1025..=16384 => limited::<T, { 1 << 20 }>(bytes),
        16385..=262_144 => limited::<T, { 16 << 20 }>(bytes),
        _ => limited::<T, BINCODE_LIMIT>(bytes),
    }
}

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
            Self::MessagePack => with_scratch(|buffer| {
                value.serialize(&mut rmp_serde::Serializer::new(buffer).with_struct_map())
            }),
            Self::Json => with_scratch(|buffer| serde_json::to_writer(buffer, value)),
            #[cfg(feature = "bincode")]
            Self::Bincode => bincode::serde::encode_to_vec(value, bincode::config::standard())
                .map_err(Error::codec),
            #[cfg(feature = "yaml")]
            Self::Yaml => yaml::encode(value),
        }
    }

    /// Decodes bytes into a `T`. Malformed bytes or a value of another shape give an
    /// [`ErrorKind::Codec`](crate::ErrorKind::Codec) error, never a panic, which says what
    /// was expected and, when the bytes read as another codec's, which one.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        self.decode_plain(bytes)
            .map_err(|error| Error::codec(self.explain::<T>(bytes, error)))
    }

    fn decode_plain<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        match self {
            Self::MessagePack => {
                // Finding where the value ends borrows (no copy of its strings and binaries),
                // and reading from a slice does too; a reader would copy each into a buffer.
                let used = msgpack_value_len(bytes)
                    .ok_or_else(|| Error::codec("malformed MessagePack: the value is cut short"))?;
                no_trailing_bytes(bytes.len(), used)?;
                rmp_serde::from_slice(bytes).map_err(Error::codec)
            }
            // serde_json refuses anything but whitespace after the value.
            Self::Json => serde_json::from_slice(bytes).map_err(Error::codec),
            #[cfg(feature = "bincode")]
            Self::Bincode => {
                // The limit makes a bogus length prefix an error instead of an allocation
                // of that size.
                let (value, used) = decode_bincode(bytes)?;
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
    /// Why `bytes` did not decode as a `T`: the decoder's words, then either the codec the
    /// bytes look like (they were sent with another one), or the value they hold (it is of
    /// another type than expected).
    fn explain<T>(self, bytes: &[u8], error: Error) -> String {
        let reason = match error.kind() {
            crate::ErrorKind::Codec(reason) => reason.clone(),
            _ => error.to_string(),
        };
        let expected = short_type_name::<T>();
        match looks_like(bytes) {
            Some(other) if other != self => format!(
                "{reason}: the bytes are not {self} but look like {other} — was it sent with \
                 another codec? (expected {self} of {expected})"
            ),
            Some(_) => match self.decode_plain::<crate::Value>(bytes) {
                Ok(value) => format!(
                    "{reason}: the {self} value {} is not of the expected type {expected}",
                    shortened(&value.to_string())
                ),
                Err(_) => format!("{reason} (expected {self} of {expected})"),
            },
            None => format!("{reason} (expected {self} of {expected})"),
        }
    }

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

/// How many bytes the first MessagePack value in `bytes` takes; `None` if it is cut short.
/// Skims markers and lengths without building anything, so nesting costs
/// neither memory nor stack.
fn msgpack_value_len(bytes: &[u8]) -> Option<usize> {
    use rmp::Marker;
    let mut at = 0usize;
    // Values still to skip: an array or map adds its elements.
    let mut pending: u64 = 1;
    let length = |at: usize, width: usize| -> Option<u64> {
        let field = bytes.get(at..at.checked_add(width)?)?;
        Some(field.iter().fold(0u64, |n, b| n << 8 | u64::from(*b)))
    };
    while pending > 0 {
        pending -= 1;
        let marker = Marker::from_u8(*bytes.get(at)?);
        at += 1;
        // The bytes after the marker: a fixed size, or a length field and what it counts.
        let skip: u64 = match marker {
            // 0xc1 is never used: a lone byte, as rmpv reads it (the decoder then refuses it).
            Marker::Reserved
            | Marker::FixPos(_)
            | Marker::FixNeg(_)
            | Marker::Null
            | Marker::True
            | Marker::False => 0,
            Marker::U8 | Marker::I8 => 1,
            Marker::U16 | Marker::I16 => 2,
            Marker::U32 | Marker::I32 | Marker::F32 => 4,
            Marker::U64 | Marker::I64 | Marker::F64 => 8,
            Marker::FixExt1 => 2,
            Marker::FixExt2 => 3,
            Marker::FixExt4 => 5,
            Marker::FixExt8 => 9,
            Marker::FixExt16 => 17,
            Marker::FixStr(n) => u64::from(n),
            Marker::Str8 | Marker::Bin8 => 1 + length(at, 1)?,
            Marker::Str16 | Marker::Bin16 => 2 + length(at, 2)?,
            Marker::Str32 | Marker::Bin32 => 4 + length(at, 4)?,
            Marker::Ext8 => 2 + length(at, 1)?,
            Marker::Ext16 => 3 + length(at, 2)?,
            Marker::Ext32 => 5 + length(at, 4)?,
            Marker::FixArray(n) => {
                pending += u64::from(n);
                0
            }
            Marker::FixMap(n) => {
                pending += 2 * u64::from(n);
                0
            }
            Marker::Array16 | Marker::Map16 | Marker::Array32 | Marker::Map32 => {
                let width = if matches!(marker, Marker::Array16 | Marker::Map16) {
                    2
                } else {
                    4
                };
                let n = length(at, width)?;
                let per = if matches!(marker, Marker::Map16 | Marker::Map32) {
                    2
                } else {
                    1
                };
                // More elements than bytes left cannot be there.
                if n > bytes.len() as u64 {
                    return None;
                }
                pending += per * n;
                width as u64
            }
        };
        at = at.checked_add(usize::try_from(skip).ok()?)?;
        if at > bytes.len() {
            return None;
        }
    }
    Some(at)
}

/// Encodes into this thread's scratch buffer and copies the bytes out: one allocation of
/// the exact size per message, where growing a fresh vector reallocates as it goes.
fn with_scratch<E: fmt::Display>(
    encode: impl FnOnce(&mut Vec<u8>) -> std::result::Result<(), E>,
) -> Result<Vec<u8>> {
    /// A buffer that grew past this is not kept (one huge message must not pin its memory).
    const KEEP: usize = 64 * 1024;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        // A value whose Serialize encodes with kiwimq again finds the buffer borrowed and
        // takes a fresh one.
        let mut borrowed = scratch.try_borrow_mut().ok();
        let mut fresh = Vec::new();
        let buffer = borrowed.as_deref_mut().unwrap_or(&mut fresh);
        buffer.clear();
        let result = encode(buffer).map(|()| buffer.to_vec());
        if buffer.capacity() > KEEP {
            *buffer = Vec::new();
        }
        result.map_err(Error::codec)
    })
}

/// The codec whose encoding `bytes` are, when it is plain to see: JSON, one whole
/// MessagePack value that is not text, or YAML text of a mapping or a sequence. `None`
/// when they could be anything (bincode carries no mark of its own).
fn looks_like(bytes: &[u8]) -> Option<Codec> {
    if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() {
        return Some(Codec::Json);
    }
    let text = std::str::from_utf8(bytes).ok();
    let structured = bytes
        .first()
        .is_some_and(|b| matches!(b, 0x80..=0x9f | 0xdc..=0xdf));
    if msgpack_value_len(bytes) == Some(bytes.len()) && (text.is_none() || structured) {
        return Some(Codec::MessagePack);
    }
    #[cfg(feature = "yaml")]
    if text.is_some()
        && yaml::decode::<crate::Value>(bytes).is_ok_and(|value| value.is_map() || value.is_array())
    {
        return Some(Codec::Yaml);
    }
    None
}

/// `T`'s name without its module paths: `ReplyEnvelope<i64>`, `Vec<String>`.
pub(crate) fn short_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let mut short = String::with_capacity(full.len());
    let mut word = String::new();
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            short.push_str(word.rsplit("::").next().unwrap_or(&word));
            word.clear();
            short.push(c);
        }
    }
    short.push_str(word.rsplit("::").next().unwrap_or(&word));
    short
}

/// Text cut to a length a log line or an error message can carry.
fn shortened(text: &str) -> String {
    const MAX: usize = 120;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
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

    /// Found by fuzzing (envelope_json): serde_json's default float parser read
    /// `1.0000000000000001e45` one bit off, so what kiwimq read and wrote again read back
    /// as another number.
    #[test]
    fn a_json_float_read_and_written_reads_back_the_same() {
        for text in [
            "1.0000000000000001e45",
            "999999999999999999999999999999999999999999991",
        ] {
            let read: f64 = Codec::Json.decode(text.as_bytes()).unwrap();
            let again: f64 = Codec::Json
                .decode(&Codec::Json.encode(&read).unwrap())
                .unwrap();
            assert_eq!(read.to_bits(), again.to_bits(), "{text}");
        }
    }

    /// Found by fuzzing (envelope_bincode): a string's length prefix of 100 MiB in a
    /// message of a few bytes had bincode allocate the 100 MiB before it found the bytes
    /// missing; now the claim is refused for what the message's size allows.
    #[cfg(feature = "bincode")]
    #[test]
    fn a_bincode_length_prefix_claims_no_more_than_the_message_allows() {
        // A varint of 100 MiB (0xfc: u32 follows), then three bytes of the string.
        let mut bytes = vec![0xfc];
        bytes.extend_from_slice(&(100u32 << 20).to_le_bytes());
        bytes.extend_from_slice(b"abc");
        let error = Codec::Bincode.decode::<String>(&bytes).unwrap_err();
        assert!(error.to_string().contains("LimitExceeded"), "{error}");
        // What a message of its size holds still decodes.
        let long = "x".repeat(60_000);
        let bytes = Codec::Bincode.encode(&vec![long.clone(); 4]).unwrap();
        assert_eq!(
            Codec::Bincode.decode::<Vec<String>>(&bytes).unwrap(),
            vec![long; 4]
        );
        let many = vec![String::new(); 1000];
        let bytes = Codec::Bincode.encode(&many).unwrap();
        assert_eq!(Codec::Bincode.decode::<Vec<String>>(&bytes).unwrap(), many);
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

    proptest::proptest! {
        /// The skimmer finds the same end of the first value as a full MessagePack reader,
        /// and fails exactly where it fails, on any bytes.
        #[test]
        fn msgpack_value_len_agrees_with_a_full_reader(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut rest = &bytes[..];
            let expected = rmpv::decode::read_value_ref(&mut rest).ok().map(|_| bytes.len() - rest.len());
            proptest::prop_assert_eq!(msgpack_value_len(&bytes), expected);
        }
    }

    #[test]
    fn msgpack_value_len_measures_nested_values_and_refuses_bogus_counts() {
        let bytes = Codec::MessagePack.encode(&sample()).unwrap();
        assert_eq!(msgpack_value_len(&bytes), Some(bytes.len()));
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"\x01\x02");
        assert_eq!(msgpack_value_len(&longer), Some(bytes.len()));
        // An array claiming four billion elements in five bytes.
        assert_eq!(msgpack_value_len(b"\xdd\xff\xff\xff\xff"), None);
        // Deep nesting costs no stack.
        let deep = vec![0x91u8; 1_000_000];
        assert_eq!(msgpack_value_len(&deep), None);
    }
}

#[cfg(test)]
mod explained {
    use super::*;
    use crate::codec::envelope::ReplyEnvelope;

    fn reply(result: &str) -> Vec<u8> {
        let mut map = std::collections::BTreeMap::new();
        map.insert("result", result);
        Codec::MessagePack.encode(&map).unwrap()
    }

    #[test]
    fn bytes_of_another_codec_are_named() {
        let bytes = reply("hello!");
        let error = Codec::Json
            .decode::<ReplyEnvelope<i64>>(&bytes)
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("look like msgpack"), "{text}");
        assert!(text.contains("another codec"), "{text}");
        let json = br#"{"result": 3}"#;
        let error = Codec::MessagePack.decode::<i64>(json).unwrap_err();
        assert!(error.to_string().contains("look like json"), "{error}");
    }

    #[cfg(feature = "yaml")]
    #[test]
    fn message_pack_read_as_yaml_is_named() {
        let error = Codec::Yaml
            .decode::<ReplyEnvelope<i64>>(&reply("hello!"))
            .unwrap_err();
        assert!(error.to_string().contains("look like msgpack"), "{error}");
    }

    #[test]
    fn a_value_of_another_type_is_shown() {
        let error = Codec::MessagePack
            .decode::<ReplyEnvelope<i64>>(&reply("hello!"))
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains(r#"{"result": "hello!"}"#), "{text}");
        assert!(
            text.contains("not of the expected type ReplyEnvelope<i64>"),
            "{text}"
        );
    }

    #[test]
    fn type_names_lose_their_paths() {
        assert_eq!(
            short_type_name::<std::collections::HashMap<String, Vec<u8>>>(),
            "HashMap<String, Vec<u8>>"
        );
    }
}
