//! The kiwiPy 0.9 message envelopes, identical on every backend: a task is the 2-sequence
//! `[task, no_reply]`, a reply is a map with exactly one of `result`, `exception`,
//! `cancelled`, `pending` (task replies add `host`), a broadcast is the map
//! `{body, sender, subject, correlation_id}`.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::Value;

/// A task on the wire: `[task, no_reply]`.
pub(crate) type TaskEnvelope<T> = (T, bool);

/// The outcome a reply carries.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply<T> {
    /// `{result: X}`: the handler's value.
    Result(T),
    /// `{exception: "text"}`: the handler failed.
    Exception(String),
    /// `{cancelled: reason}`: the handler's future was cancelled.
    Cancelled(Option<String>),
    /// `{pending: null}`: the result is deferred; more replies follow.
    Pending,
}

/// Where a task reply came from (kiwiPy's `host` key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Host {
    /// Borrowed for this process's own name, so that naming it in every reply copies nothing.
    pub(crate) hostname: std::borrow::Cow<'static, str>,
    pub(crate) pid: u32,
}

impl Host {
    /// This process, as named in task replies.
    pub(crate) fn this_process() -> Self {
        static HOSTNAME: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| gethostname::gethostname().to_string_lossy().into_owned());
        Self {
            hostname: std::borrow::Cow::Borrowed(HOSTNAME.as_str()),
            pid: std::process::id(),
        }
    }
}

/// A reply map: the outcome, plus `host` on task replies.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReplyEnvelope<T> {
    pub(crate) reply: Reply<T>,
    pub(crate) host: Option<Host>,
}

const RESULT: &str = "result";
const EXCEPTION: &str = "exception";
const CANCELLED: &str = "cancelled";
const PENDING: &str = "pending";
const HOST: &str = "host";

impl<T: Serialize> Serialize for ReplyEnvelope<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1 + usize::from(self.host.is_some())))?;
        match &self.reply {
            Reply::Result(value) => map.serialize_entry(RESULT, value)?,
            Reply::Exception(text) => map.serialize_entry(EXCEPTION, text)?,
            Reply::Cancelled(reason) => map.serialize_entry(CANCELLED, reason)?,
            Reply::Pending => map.serialize_entry(PENDING, &())?,
        }
        if let Some(host) = &self.host {
            map.serialize_entry(HOST, host)?;
        }
        map.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ReplyEnvelope<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ReplyVisitor(PhantomData))
    }
}

struct ReplyVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ReplyVisitor<T> {
    type Value = ReplyEnvelope<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a reply map with one of 'result', 'exception', 'cancelled', 'pending'")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut reply = None;
        let mut host = None;
        while let Some(key) = map.next_key::<String>()? {
            let value = match key.as_str() {
                RESULT => Reply::Result(map.next_value()?),
                EXCEPTION => Reply::Exception(map.next_value()?),
                CANCELLED => Reply::Cancelled(map.next_value()?),
                PENDING => {
                    // kiwiPy sends `{pending: None}`; reading a unit works in every codec,
                    // bincode included (which cannot skip values it does not know).
                    map.next_value::<()>()?;
                    Reply::Pending
                }
                HOST => {
                    host = Some(map.next_value::<Host>()?);
                    continue;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if reply.replace(value).is_some() {
                return Err(de::Error::custom("a reply map holds more than one outcome"));
            }
        }
        let reply = reply.ok_or_else(|| {
            de::Error::custom(
                "a reply map needs one of 'result', 'exception', 'cancelled', 'pending'",
            )
        })?;
        Ok(ReplyEnvelope { reply, host })
    }
}

/// A broadcast on the wire. kiwiPy takes any plain value as a sender, subject or
/// correlation id — AiiDA sends a process's pk, an integer, as the sender — so the headers
/// are [`Value`]s; `H` is `String` only for bincode, which cannot read a value of unknown
/// shape and carries their text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BroadcastEnvelope<T, H = Value> {
    pub(crate) body: T,
    #[serde(default = "none")]
    pub(crate) sender: Option<H>,
    #[serde(default = "none")]
    pub(crate) subject: Option<H>,
    #[serde(default = "none")]
    pub(crate) correlation_id: Option<H>,
}

fn none<H>() -> Option<H> {
    None
}

#[cfg(feature = "bincode")]
impl<T> BroadcastEnvelope<T> {
    /// The same broadcast with its headers as text (for bincode).
    pub(crate) fn with_text_headers(self) -> BroadcastEnvelope<T, String> {
        let text = |value: Option<Value>| value.and_then(|v| plain_text(&v).map(Cow::into_owned));
        BroadcastEnvelope {
            body: self.body,
            sender: text(self.sender),
            subject: text(self.subject),
            correlation_id: text(self.correlation_id),
        }
    }
}

#[cfg(feature = "bincode")]
impl<T> BroadcastEnvelope<T, String> {
    /// Text headers as values.
    pub(crate) fn with_value_headers(self) -> BroadcastEnvelope<T> {
        BroadcastEnvelope {
            body: self.body,
            sender: self.sender.map(Value::from),
            subject: self.subject.map(Value::from),
            correlation_id: self.correlation_id.map(Value::from),
        }
    }
}

/// A header value as text, as a filter sees it and as Python's `str()` writes it: a string
/// as it is, `47`, `1.5`, `True`; nil is no header at all. Other values (lists, maps, bytes)
/// in their JSON-like form.
pub(crate) fn plain_text(value: &Value) -> Option<Cow<'_, str>> {
    Some(match value {
        Value::Nil => return None,
        Value::String(text) => match text.as_str() {
            Some(text) => Cow::Borrowed(text),
            None => Cow::Owned(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        },
        Value::Boolean(true) => Cow::Borrowed("True"),
        Value::Boolean(false) => Cow::Borrowed("False"),
        Value::Integer(n) => Cow::Owned(n.to_string()),
        Value::F32(x) => Cow::Owned(python_float(f64::from(*x))),
        Value::F64(x) => Cow::Owned(python_float(*x)),
        other => Cow::Owned(other.to_string()),
    })
}

/// `str(x)` of a Python float: `2.0`, not `2`.
fn python_float(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        x.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Codec;

    fn replies() -> Vec<ReplyEnvelope<Vec<i64>>> {
        vec![
            ReplyEnvelope {
                reply: Reply::Result(vec![1, 2]),
                host: None,
            },
            ReplyEnvelope {
                reply: Reply::Result(vec![]),
                host: Some(Host::this_process()),
            },
            ReplyEnvelope {
                reply: Reply::Exception("ValueError: bad".into()),
                host: None,
            },
            ReplyEnvelope {
                reply: Reply::Cancelled(Some("user".into())),
                host: None,
            },
            ReplyEnvelope {
                reply: Reply::Cancelled(None),
                host: None,
            },
            ReplyEnvelope {
                reply: Reply::Pending,
                host: None,
            },
        ]
    }

    #[test]
    fn reply_envelopes_round_trip_in_every_codec() {
        for codec in Codec::ALL {
            for reply in replies() {
                let bytes = codec.encode(&reply).unwrap();
                let back: ReplyEnvelope<Vec<i64>> = codec.decode(&bytes).unwrap();
                assert_eq!(back, reply, "{codec}");
            }
        }
    }

    #[test]
    fn reply_maps_match_kiwipy_json() {
        let json =
            |r: &ReplyEnvelope<u32>| String::from_utf8(Codec::Json.encode(r).unwrap()).unwrap();
        assert_eq!(
            json(&ReplyEnvelope {
                reply: Reply::Result(5),
                host: None
            }),
            r#"{"result":5}"#
        );
        assert_eq!(
            json(&ReplyEnvelope {
                reply: Reply::Pending,
                host: None
            }),
            r#"{"pending":null}"#
        );
        assert_eq!(
            json(&ReplyEnvelope {
                reply: Reply::Exception("boom".into()),
                host: None
            }),
            r#"{"exception":"boom"}"#
        );
        let from_python: ReplyEnvelope<u32> = Codec::Json
            .decode(br#"{"result": 7, "host": {"hostname": "h", "pid": 12}, "extra": [1]}"#)
            .unwrap();
        assert_eq!(from_python.reply, Reply::Result(7));
        assert_eq!(from_python.host.unwrap().pid, 12);
    }

    #[test]
    fn a_result_of_null_is_not_a_missing_result() {
        let reply: ReplyEnvelope<Option<u32>> = Codec::Json.decode(br#"{"result": null}"#).unwrap();
        assert_eq!(reply.reply, Reply::Result(None));
    }

    #[test]
    fn bad_reply_maps_are_codec_errors() {
        for bytes in [
            &br#"{}"#[..],
            br#"{"result": 1, "exception": "x"}"#,
            br#"[1, 2]"#,
            b"\x00",
        ] {
            let err = Codec::Json.decode::<ReplyEnvelope<u32>>(bytes).unwrap_err();
            assert!(matches!(err.kind(), crate::ErrorKind::Codec(_)), "{err}");
        }
    }

    #[test]
    fn task_envelope_is_a_two_sequence() {
        let bytes = Codec::Json.encode(&("job", true)).unwrap();
        assert_eq!(bytes, br#"["job",true]"#);
        for codec in Codec::ALL {
            let bytes = codec.encode(&(vec![1u8, 2], false)).unwrap();
            let back: TaskEnvelope<Vec<u8>> = codec.decode(&bytes).unwrap();
            assert_eq!(back, (vec![1, 2], false));
        }
    }

    #[test]
    fn broadcast_envelope_has_all_four_keys() {
        let b = BroadcastEnvelope {
            body: 1,
            sender: Some("s".into()),
            subject: None,
            correlation_id: None,
        };
        let json = String::from_utf8(Codec::Json.encode(&b).unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"body":1,"sender":"s","subject":null,"correlation_id":null}"#
        );
        for codec in Codec::ALL {
            let bytes = codec.encode_broadcast(b.clone()).unwrap();
            let back: BroadcastEnvelope<i32> = codec.decode_broadcast(&bytes).unwrap();
            assert_eq!(back, b);
        }
    }

    /// kiwiPy's headers of any plain value survive every self-describing codec as they
    /// were; bincode carries their text.
    #[test]
    fn broadcast_headers_of_any_plain_value_round_trip() {
        let headers = [
            Value::from(47),
            Value::from(-3),
            Value::F64(1.5),
            Value::from(true),
            Value::from("state_changed.running.waiting"),
        ];
        for header in headers {
            let b = BroadcastEnvelope {
                body: (),
                sender: Some(header.clone()),
                subject: Some(header.clone()),
                correlation_id: Some(header.clone()),
            };
            for codec in Codec::ALL {
                let bytes = codec.encode_broadcast(b.clone()).unwrap();
                let back: BroadcastEnvelope<()> = codec.decode_broadcast(&bytes).unwrap();
                let expected = if codec.is_self_describing() {
                    header.clone()
                } else {
                    Value::from(plain_text(&header).unwrap().into_owned())
                };
                assert_eq!(back.sender, Some(expected.clone()), "{codec}: {header}");
                assert_eq!(back.correlation_id, Some(expected), "{codec}: {header}");
            }
        }
    }

    #[test]
    fn headers_read_as_python_writes_them() {
        let text = |v: Value| plain_text(&v).map(Cow::into_owned);
        assert_eq!(text(Value::from(47)).as_deref(), Some("47"));
        assert_eq!(text(Value::F64(2.0)).as_deref(), Some("2.0"));
        assert_eq!(text(Value::F64(1.5)).as_deref(), Some("1.5"));
        assert_eq!(text(Value::from(true)).as_deref(), Some("True"));
        assert_eq!(text(Value::from("x")).as_deref(), Some("x"));
        assert_eq!(text(Value::Nil), None);
    }
}

/// Arbitrary bytes, and valid messages with bytes changed, through every decode path a
/// received message takes: an error or a value, never a panic (nor an allocation as large
/// as a bogus length prefix claims).
#[cfg(test)]
mod fuzz {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::Codec;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Job {
        name: String,
        steps: Vec<u32>,
        options: BTreeMap<String, f64>,
    }

    /// Every envelope a subscriber or a reply future decodes, with several body types.
    fn decode_everything(codec: Codec, bytes: &[u8]) {
        let _ = codec.decode::<TaskEnvelope<i64>>(bytes);
        let _ = codec.decode::<TaskEnvelope<String>>(bytes);
        let _ = codec.decode::<TaskEnvelope<Job>>(bytes);
        let _ = codec.decode::<TaskEnvelope<Vec<Vec<u8>>>>(bytes);
        let _ = codec.decode::<ReplyEnvelope<Job>>(bytes);
        let _ = codec.decode::<ReplyEnvelope<Vec<String>>>(bytes);
        let _ = codec.decode::<ReplyEnvelope<serde::de::IgnoredAny>>(bytes);
        let _ = codec.decode::<BroadcastEnvelope<Job>>(bytes);
        let _ = codec.decode::<BroadcastEnvelope<serde::de::IgnoredAny>>(bytes);
        let _ = codec.decode::<Job>(bytes);
        let _ = codec.decode::<BTreeMap<String, Vec<i64>>>(bytes);
    }

    fn valid(codec: Codec, job: &Job) -> Vec<Vec<u8>> {
        let task: TaskEnvelope<&Job> = (job, false);
        let reply = ReplyEnvelope {
            reply: Reply::Result(job),
            host: Some(Host::this_process()),
        };
        let broadcast = BroadcastEnvelope {
            body: job,
            sender: Some("sender".to_owned()),
            subject: Some("subject".to_owned()),
            correlation_id: None,
        };
        vec![
            codec.encode(&task).unwrap(),
            codec.encode(&reply).unwrap(),
            codec.encode(&broadcast).unwrap(),
        ]
    }

    fn job() -> impl Strategy<Value = Job> {
        (
            ".{0,12}",
            prop::collection::vec(any::<u32>(), 0..6),
            prop::collection::btree_map(".{0,6}", any::<f64>(), 0..4),
        )
            .prop_map(|(name, steps, options)| Job {
                name,
                steps,
                options,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            for codec in Codec::ALL {
                decode_everything(*codec, &bytes);
            }
        }

        #[test]
        fn damaged_messages_never_panic(
            job in job(),
            damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            for codec in Codec::ALL {
                for mut bytes in valid(*codec, &job) {
                    for (at, byte) in &damage {
                        let at = at.index(bytes.len());
                        bytes[at] = *byte;
                    }
                    decode_everything(*codec, &bytes);
                    decode_everything(*codec, &bytes[..cut.index(bytes.len() + 1)]);
                }
            }
        }
    }

    #[test]
    fn a_huge_length_prefix_is_an_error_not_an_allocation() {
        // An array of 2^32-1 elements, then nothing.
        let msgpack = [0xdd, 0xff, 0xff, 0xff, 0xff];
        assert!(Codec::MessagePack.decode::<Vec<u64>>(&msgpack).is_err());
        assert!(
            Codec::MessagePack
                .decode::<TaskEnvelope<Vec<u64>>>(&msgpack)
                .is_err()
        );
        #[cfg(feature = "bincode")]
        {
            // A sequence length of u64::MAX as a varint.
            let bincode = [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
            assert!(Codec::Bincode.decode::<Vec<u64>>(&bincode).is_err());
        }
    }
}
