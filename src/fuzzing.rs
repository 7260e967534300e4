//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): not an API.
//!
//! Each function takes bytes as they arrive from outside — off a socket, out of a file a
//! crash may have cut short, in a URL — and runs them through the decoder kiwimq uses for
//! them. It returns quietly when the decoder refuses them and panics when a property that
//! must hold does not (a panic is what the fuzzer reports): what was decoded encodes again
//! and reads back the same, a translated message still reads as what it carried, a
//! validated parameter is within its bounds. docs/reliability.md ("Fuzzing") says how they
//! are run.

#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::envelope::{self, BroadcastEnvelope, ReplyEnvelope, TaskEnvelope};
use crate::{BroadcastFilter, Codec, Value};

/// A typed body of the kind users declare: named fields, optional ones, nesting.
#[derive(Debug, Serialize, Deserialize)]
struct Job {
    name: String,
    #[serde(default)]
    steps: Vec<u32>,
    #[serde(default)]
    options: BTreeMap<String, f64>,
    #[serde(default)]
    parent: Option<Box<Job>>,
}

/// plumpy's control RPC body, as AiiDA sends it.
#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    intent: String,
    message: Option<String>,
    #[serde(default)]
    force_kill: bool,
}

/// Decodes `data` as a `T`; when it decodes, its encoding must decode again, and encode to
/// the same bytes (a decoded message can always be passed on, and means one thing).
fn round_trips<T: Serialize + DeserializeOwned + Debug>(codec: Codec, data: &[u8]) {
    let Ok(value) = codec.decode::<T>(data) else {
        return;
    };
    let first = match codec.encode(&value) {
        Ok(bytes) => bytes,
        Err(_) if codec == Codec::Yaml && yaml_has_complex_key(data) => return,
        Err(e) => panic!("{codec}: a decoded {value:?} does not encode: {e}"),
    };
    let again = codec.decode::<T>(&first).unwrap_or_else(|e| {
        panic!(
            "{codec}: the encoding of a decoded {value:?} does not decode: {e}\n{:?}",
            String::from_utf8_lossy(&first)
        )
    });
    let second = codec.encode(&again).expect("a value decoded twice encodes");
    assert_eq!(
        first, second,
        "{codec}: {value:?} encodes differently once decoded again"
    );
}

/// Whether YAML holds a mapping key that is a sequence or a mapping (PyYAML writes a dict
/// keyed by a tuple so). kiwimq reads it; its YAML writer cannot write it back, and says
/// so with a codec error: a handler that returns such a value gets that error, not a panic.
fn yaml_has_complex_key(data: &[u8]) -> bool {
    fn complex(value: &Value) -> bool {
        match value {
            Value::Map(entries) => entries.iter().any(|(key, value)| {
                matches!(key, Value::Map(_) | Value::Array(_)) || complex(value)
            }),
            Value::Array(items) => items.iter().any(complex),
            _ => false,
        }
    }
    Codec::Yaml
        .decode::<Value>(data)
        .is_ok_and(|value| complex(&value))
}

/// How many ways [`envelope`] reads a message: its first byte picks one.
pub const ENVELOPE_READINGS: u8 = 10;

/// A kiwiPy envelope as a subscriber or a reply future decodes it with `codec`: the first
/// byte picks the envelope and its body type (of unknown shape, `Value`, or typed; bincode
/// reads typed ones only), the rest is the message. One reading per input keeps the inputs
/// tried per second high (YAML's parser is slow, and a refusal parses again to explain).
pub fn envelope(codec: Codec, data: &[u8]) {
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    let mut pick = pick % ENVELOPE_READINGS;
    if !codec.is_self_describing() && pick < 4 {
        pick += 4;
    }
    match pick {
        0 => round_trips::<TaskEnvelope<Value>>(codec, data),
        1 => round_trips::<ReplyEnvelope<Value>>(codec, data),
        2 => round_trips::<Value>(codec, data),
        3 => {
            let Ok(broadcast) = codec.decode_broadcast::<Value>(data) else {
                return;
            };
            broadcast_headers(&broadcast);
            let bytes = match codec.encode_broadcast(broadcast) {
                Ok(bytes) => bytes,
                // As in `round_trips`: YAML keyed by a sequence or mapping reads, and its
                // writer says it cannot write it (found at 6.8 M inputs of this target).
                Err(_) if codec == Codec::Yaml && yaml_has_complex_key(data) => return,
                Err(e) => panic!("{codec}: a decoded broadcast does not encode: {e}"),
            };
            let again = codec
                .decode_broadcast::<Value>(&bytes)
                .expect("a re-encoded broadcast decodes");
            assert_eq!(
                codec.encode_broadcast(again).expect("encodes"),
                bytes,
                "{codec}: a broadcast encodes differently once decoded again"
            );
        }
        4 => round_trips::<TaskEnvelope<Job>>(codec, data),
        5 => round_trips::<TaskEnvelope<String>>(codec, data),
        6 => round_trips::<ReplyEnvelope<Job>>(codec, data),
        7 => round_trips::<ReplyEnvelope<Vec<i64>>>(codec, data),
        8 => round_trips::<Intent>(codec, data),
        _ => {
            if let Ok(broadcast) = codec.decode_broadcast::<Option<String>>(data) {
                broadcast_headers(&broadcast);
            }
        }
    }
}

/// What a broadcast subscriber does with the headers: their text, through a filter.
fn broadcast_headers<T>(broadcast: &BroadcastEnvelope<T>) {
    let subject = broadcast.subject.as_ref().and_then(envelope::plain_text);
    let sender = broadcast.sender.as_ref().and_then(envelope::plain_text);
    let _ = broadcast
        .correlation_id
        .as_ref()
        .and_then(envelope::plain_text);
    let filter = BroadcastFilter::new()
        .subject("state_changed.*")
        .sender("*");
    let _ = filter.matches(subject.as_deref(), sender.as_deref());
    if let Some(subject) = subject.as_deref() {
        assert!(
            BroadcastFilter::new()
                .subject(subject)
                .matches(Some(subject), None),
            "a subject's own text as a glob does not match it: {subject:?}"
        );
    }
}

/// A presence announcement as a watcher reads it (`watch_presence`, the dashboard's roster):
/// decoded, placed on a roster, its standing and counts read; what decodes encodes and
/// reads back equal.
pub fn presence(data: &[u8]) {
    use crate::presence::{Presence, Roster};
    use std::time::{Duration, Instant};

    let Ok(presence) = serde_json::from_slice::<Presence>(data) else {
        return;
    };
    let text = serde_json::to_vec(&presence).expect("a decoded presence encodes");
    let again: Presence = serde_json::from_slice(&text).expect("an encoded presence decodes");
    assert_eq!(
        serde_json::to_vec(&again).expect("encodes"),
        text,
        "a presence encodes differently once decoded again"
    );
    let _ = presence.counts.total();
    for queue in &presence.task_queues {
        let _ = queue.counts.total();
    }
    let heard = Instant::now();
    for later in [
        Duration::ZERO,
        Duration::from_secs(60),
        Duration::from_secs(86_400),
    ] {
        let _ = presence.is_lost(heard, heard + later);
    }
    let mut roster = Roster::default();
    // A roster takes what is in range and refuses the rest, clearly.
    let taken = roster.heard(presence, heard).is_ok();
    let members = roster.members(heard + Duration::from_secs(1));
    assert_eq!(
        members.len(),
        usize::from(taken),
        "a roster forgot an announcement it took 1 s ago, or kept one it refused"
    );
    let _ = serde_json::to_vec(&members).expect("a roster's members encode");
}

/// A message from a ZeroMQ broker (AiiDA's or kiwimq's) as kiwimq's client reads it, and the
/// kiwiPy envelope it becomes for the layers above, which must carry exactly what the
/// message did: a body that decodes alone decodes in its envelope, to the same value.
#[cfg(feature = "zeromq")]
pub fn zeromq_from_broker(data: &[u8]) {
    use crate::zeromq::protocol::{self, Answer, Incoming, kind};

    let Ok(message) = Incoming::parse(data) else {
        return;
    };
    let null = protocol::null();
    let alone =
        |raw: &serde_json::value::RawValue| Codec::Json.decode::<Value>(raw.get().as_bytes());
    match message.kind.as_deref() {
        Some(kind::TASK) => {
            let body = message.body.unwrap_or(null);
            let no_reply = message.no_reply.unwrap_or(false);
            let bytes = protocol::TaskEnvelope::encode(body, no_reply);
            let protocol::TaskEnvelope(back, back_no_reply) =
                protocol::TaskEnvelope::parse(&bytes).expect("a task's envelope reads back");
            assert_eq!((back.get(), back_no_reply), (body.get(), no_reply));
            let up = Codec::Json.decode::<TaskEnvelope<Value>>(&bytes);
            same_decoding(
                alone(body),
                up.map(|(value, flag)| {
                    assert_eq!(flag, no_reply);
                    value
                }),
            );
        }
        Some(kind::TASK_RESPONSE) | Some(kind::RPC_RESPONSE) => {
            let bytes = protocol::ReplyEnvelope::encode(message.result, message.error.as_deref());
            let up = Codec::Json.decode::<ReplyEnvelope<Value>>(&bytes);
            match (&message.error, protocol::ReplyEnvelope::parse(&bytes)) {
                (Some(error), Ok(Answer::Error(text))) => {
                    assert_eq!(&text, error);
                    assert!(matches!(
                        up.expect("an error reply decodes").reply,
                        envelope::Reply::Exception(ref e) if e == error
                    ));
                }
                (None, Ok(Answer::Result(raw))) => {
                    let sent = message.result.unwrap_or(null);
                    assert_eq!(raw.get(), sent.get());
                    same_decoding(
                        alone(sent),
                        up.map(|reply| match reply.reply {
                            envelope::Reply::Result(value) => value,
                            other => panic!("a result reply read as {other:?}"),
                        }),
                    );
                }
                (error, answer) => panic!("a response with error {error:?} reads as {answer:?}"),
            }
        }
        Some(kind::BROADCAST) => {
            let envelope = protocol::BroadcastEnvelope {
                body: message.body.unwrap_or(null),
                sender: message.sender.unwrap_or(null),
                subject: message.subject.unwrap_or(null),
                correlation_id: message.correlation_id.unwrap_or(null),
            };
            let bytes = envelope.encode();
            let back = protocol::BroadcastEnvelope::parse(&bytes).expect("a broadcast reads back");
            assert_eq!(back.body.get(), envelope.body.get());
            assert_eq!(back.sender.get(), envelope.sender.get());
            // The envelope decodes exactly when its four values do, each alone.
            let parts = [
                envelope.body,
                envelope.sender,
                envelope.subject,
                envelope.correlation_id,
            ];
            let alone: crate::Result<Vec<Value>> = parts.into_iter().map(alone).collect();
            let up = Codec::Json.decode_broadcast::<Value>(&bytes);
            if let Ok(up) = &up {
                broadcast_headers(up);
            }
            same_decoding(
                alone.map(|mut values| values.swap_remove(0)),
                up.map(|up| up.body),
            );
        }
        Some(kind::RPC) => {
            let _ = message.recipient();
            if let Some(body) = message.body {
                let _ = alone(body);
            }
        }
        Some(kind::PRESENCE) => {
            if let Some(body) = message.body {
                presence(body.get().as_bytes());
            }
        }
        _ => {}
    }
}

/// A message from a client as kiwimq's broker reads it: the fields it routes by, a task as
/// it is stored (its file must read back as what came), an RPC through the router, and the
/// frames it forwards, which a client must read back with the values they carried.
#[cfg(feature = "zeromq")]
pub fn zeromq_from_client(data: &[u8]) {
    use crate::zeromq::protocol::{self, Incoming, Outgoing, json_string, kind};
    use crate::zeromq::rpc_router::RpcRouter;
    use crate::zeromq::store::{StoredTask, usable_task_id};

    let Ok(message) = Incoming::parse(data) else {
        return;
    };
    let null = protocol::null();
    let recipient = message.recipient();
    let _ = message.identifier.as_deref().map(str::is_empty);
    match message.kind.as_deref() {
        Some(kind::TASK) => {
            let id = message.id.clone().unwrap_or_else(protocol::new_id);
            if !usable_task_id(&id) {
                return;
            }
            let task = StoredTask {
                id: Some(id),
                sender: message
                    .sender
                    .and_then(|raw| serde_json::from_str(raw.get()).ok())
                    .unwrap_or(serde_json::Value::Null),
                sender_identity: Some("636c69656e742d31".into()),
                body: message.body.unwrap_or(null).to_owned(),
                no_reply: message.no_reply.unwrap_or(false),
                timestamp: 1_765_000_000.5,
                results: message.results == Some(true),
            };
            let file = serde_json::to_vec(&task).expect("a stored task encodes");
            let back: StoredTask = serde_json::from_slice(&file).expect("a task file reads back");
            assert_eq!(back.body.get(), task.body.get());
            assert_eq!((&back.id, back.no_reply), (&task.id, task.no_reply));
            assert_eq!(back.sender, task.sender);
            // As the broker hands it to a worker, who reads what was sent.
            let sender = json_string("broker");
            let frame = Outgoing {
                id: task.id.clone().unwrap_or_default(),
                body: Some(&task.body),
                no_reply: Some(task.no_reply),
                ..Outgoing::new(kind::TASK, &sender)
            }
            .encode();
            let read = Incoming::parse(&frame).expect("a dispatched task reads");
            // A `null` body reads as none, which the client takes for `null`.
            assert_eq!(read.body.unwrap_or(null).get(), task.body.get());
            assert_eq!(read.id, task.id);
        }
        Some(kind::RPC) => {
            let mut router = RpcRouter::new(std::time::Duration::from_secs(10));
            router.subscribe("8".into(), b"worker".to_vec());
            let rpc_id = message.id.clone().unwrap_or_default();
            match router.route(&rpc_id, recipient.as_deref()) {
                Ok(target) => {
                    assert_eq!(recipient.as_deref(), Some("8"));
                    router.forwarded(rpc_id.clone(), b"caller".to_vec(), target.clone());
                    assert_eq!(
                        router.answer(&target, &rpc_id).ok(),
                        Some(b"caller".to_vec())
                    );
                }
                Err(error) => assert!(!error.is_empty()),
            }
        }
        Some(kind::BROADCAST) | Some(kind::RPC_RESPONSE) | Some(kind::PRESENCE) => {
            // Forwarded with the values the client gave, spliced in as they came.
            let frame = Outgoing {
                body: Some(message.body.unwrap_or(null)),
                subject: Some(message.subject.unwrap_or(null)),
                correlation_id: Some(message.correlation_id.unwrap_or(null)),
                rpc_id: message.rpc_id.as_deref(),
                result: Some(message.result.unwrap_or(null)),
                error: Some(message.error.as_deref()),
                id: message.id.clone().unwrap_or_default(),
                ..Outgoing::new(kind::BROADCAST, message.sender.unwrap_or(null))
            }
            .encode();
            let read = Incoming::parse(&frame).expect("a forwarded frame reads");
            let raw = |v: Option<&serde_json::value::RawValue>| v.unwrap_or(null).get().to_owned();
            assert_eq!(raw(read.body), raw(message.body));
            assert_eq!(raw(read.sender), raw(message.sender));
            assert_eq!(raw(read.subject), raw(message.subject));
            assert_eq!(raw(read.result), raw(message.result));
            assert_eq!(read.error, message.error);
            assert_eq!(read.rpc_id, message.rpc_id);
        }
        _ => {}
    }
}

/// `broker.status` as a client reads it (`verdi status` reads the same file): AiiDA's
/// fields, kiwimq's `broker`; what reads writes back the same.
#[cfg(feature = "zeromq")]
pub fn broker_status(data: &[u8]) {
    use crate::zeromq::service::ServiceStatus;
    let Ok(status) = serde_json::from_slice::<ServiceStatus>(data) else {
        return;
    };
    let _ = status.is_kiwimq();
    let text = serde_json::to_vec(&status).expect("a status encodes");
    let again: ServiceStatus = serde_json::from_slice(&text).expect("a status reads back");
    assert_eq!(serde_json::to_vec(&again).expect("encodes"), text);
    for count in [
        status.pending_tasks,
        status.processing_tasks,
        status.task_subscribers,
    ] {
        let _ = count.map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    }
}

/// `storage/broker-state.json` as kiwimq's broker reads it at start: decoded, every
/// identity unhexed, and its subscriptions, limits and hand-overs restored into a
/// dispatcher as the broker does — after which a new hand-over's number is above every
/// restored one (numbers are never reused), and the state writes back as it read.
#[cfg(feature = "zeromq")]
pub fn broker_state(data: &[u8]) {
    use crate::zeromq::dispatch::{Assignment, Dispatcher};
    use crate::zeromq::state::{PersistedState, hex, unhex};

    let Ok(state) = PersistedState::decode(data) else {
        return;
    };
    let text = serde_json::to_vec(&state).expect("a state encodes");
    let again = PersistedState::decode(&text).expect("a state reads back");
    let value = |state: &PersistedState| serde_json::to_value(state).expect("encodes");
    assert_eq!(value(&again), value(&state), "a state reads back otherwise");

    let mut dispatcher = Dispatcher::new(state.next_delivery);
    for (identifier, identity) in &state.task_subscribers {
        if let Some(client) = unhex(identity) {
            assert_eq!(hex(&client), identity.to_ascii_lowercase());
            dispatcher.restore_subscription(identifier.clone(), client);
        }
    }
    for (identity, limit) in &state.prefetch {
        if let Some(client) = unhex(identity) {
            dispatcher.restore_limit(client, *limit);
        }
    }
    let mut highest = None;
    for (task_id, identity) in &state.assignments {
        let Some(holder) = unhex(identity) else {
            continue;
        };
        let hand_over = state.deliveries.get(task_id).copied();
        let delivery = hand_over.map_or_else(|| dispatcher.next_delivery(), |h| h.delivery);
        let assignment = Assignment {
            holder,
            delivery,
            restored: true,
            lease: None,
        };
        if dispatcher.restore(task_id.clone(), assignment) {
            highest = highest.max(Some(delivery));
        }
    }
    let worker = b"fuzz-worker".to_vec();
    dispatcher.subscribe("fuzz".into(), &worker, None);
    if let Some(delivery) = dispatcher.assign("a-task-no-state-names", &worker)
        && let Some(highest) = highest
    {
        assert!(
            delivery > highest || delivery == u64::MAX,
            "delivery {delivery} reused (restored up to {highest})"
        );
    }
}

/// A task file in `storage/tasks/{pending,processing}/` as the store reads it at start: the
/// first line is the file's name, the rest its content (AiiDA's, kiwimq's, or what
/// `verdi process repair` writes). A name the store takes carries a usable id; a task that
/// reads writes back the same.
#[cfg(feature = "zeromq")]
pub fn task_file(data: &[u8]) {
    use crate::zeromq::store::{StoredTask, is_task_file_name, task_id, usable_task_id};

    let (name, content) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b""[..], data),
    };
    if let Ok(name) = std::str::from_utf8(name) {
        let id = task_id(name);
        if is_task_file_name(name) {
            assert!(id.is_some_and(usable_task_id), "{name:?}");
            assert!(!name.contains('/'), "{name:?} leaves its directory");
        }
    }
    let Ok(task) = serde_json::from_slice::<StoredTask>(content) else {
        return;
    };
    let text = serde_json::to_vec(&task).expect("a task encodes");
    let again: StoredTask = serde_json::from_slice(&text).expect("a task reads back");
    assert_eq!(serde_json::to_vec(&again).expect("encodes"), text);
    assert_eq!(again.body.get(), task.body.get());
}

/// The journal (`storage/tasks/journal`) as the broker replays it at start, in a scratch
/// directory of its own under the system's temporary one: whatever the lines say, files
/// are written only into pending/, each under a task file's name.
#[cfg(feature = "zeromq")]
pub fn journal(data: &[u8]) {
    use crate::zeromq::replay_journal as replay;
    use crate::zeromq::store::is_task_file_name;
    use std::sync::LazyLock;

    static SCRATCH: LazyLock<std::path::PathBuf> = LazyLock::new(|| {
        // In memory where there is a tmpfs: the replay syncs every file it writes.
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("kiwimq-fuzz-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    });
    let dir = &*SCRATCH;
    let inner = dir.join("tasks");
    let pending = inner.join("pending");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(&pending).expect("a scratch directory");
    let path = inner.join("journal");
    std::fs::write(&path, data).expect("the journal written");
    let restored = replay(&path, &pending).expect("a replay of a readable journal");
    let names: Vec<String> = std::fs::read_dir(&pending)
        .expect("pending/ lists")
        .map(|entry| {
            entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // A name journaled twice is written twice, into one file.
    assert!(
        names.len() <= restored,
        "restored {restored} but pending/ holds {names:?}"
    );
    for name in &names {
        assert!(is_task_file_name(name), "replay wrote {name:?}");
    }
    let mut around: Vec<String> = std::fs::read_dir(&inner)
        .expect("tasks/ lists")
        .map(|entry| {
            entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    around.sort();
    assert_eq!(
        around,
        ["journal", "pending"],
        "replay wrote beside pending/"
    );
    assert_eq!(
        std::fs::metadata(&path).map(|m| m.len()).ok(),
        Some(0),
        "journal not emptied"
    );
}

/// A value decoded alone and the same value decoded inside an envelope: both fail, or both
/// give the same value (compared by their encoding, as NaN is not equal to itself).
#[cfg(feature = "zeromq")]
fn same_decoding(alone: crate::Result<Value>, inside: crate::Result<Value>) {
    match (alone, inside) {
        (Ok(a), Ok(b)) => assert_eq!(
            Codec::MessagePack.encode(&a).expect("encodes"),
            Codec::MessagePack.encode(&b).expect("encodes"),
            "a body decodes to {a} alone but {b} in its envelope"
        ),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("a body decodes alone as {a:?} but in its envelope as {b:?}"),
    }
}

/// The dashboard's parameters: `data` is a query string, then (after the first newline)
/// a request path under the dashboard's API. Each goes through what the dashboard's
/// handlers do with it: the token lookup, the broadcast tail's query and its filter, the
/// queue name and action taken from the path.
#[cfg(feature = "dashboard")]
pub fn dashboard_parameters(data: &[u8]) {
    use crate::dashboard::{TailQuery, queue_name};
    use actix_web::web::Query;

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (query, path) = text.split_once('\n').unwrap_or((text, ""));
    let _ = Query::<BTreeMap<String, String>>::from_query(query)
        .ok()
        .and_then(|q| q.get("token").cloned());
    if let Ok(tail) = Query::<TailQuery>::from_query(query)
        && let Ok((filter, limit)) = tail.checked()
    {
        assert!((1..=500).contains(&limit), "a limit of {limit}");
        for pattern in [&tail.subject, &tail.sender].into_iter().flatten() {
            assert!(pattern.len() <= 255, "a pattern of {} bytes", pattern.len());
        }
        if let Some(subject) = &tail.subject {
            assert!(
                filter.matches(Some(subject), None),
                "{subject:?} misses itself"
            );
        }
        if let Some(sender) = &tail.sender {
            assert!(
                filter.matches(None, Some(sender)),
                "{sender:?} misses itself"
            );
        }
        let _ = filter.matches(Some("state_changed.created.running"), Some("47"));
    }
    for segment in path.split('/') {
        let Ok(decoded) = percent_encoding::percent_decode_str(segment).decode_utf8() else {
            continue;
        };
        if let Ok(name) = queue_name(&decoded) {
            assert!(
                !name.is_empty() && name.len() <= 255,
                "a queue name of {} bytes",
                name.len()
            );
            assert!(
                !name.chars().any(char::is_control),
                "{name:?} has a control character"
            );
        }
    }
}

/// Seeds for each target's corpus (`fuzz/corpus/<target>`): messages as kiwimq's own
/// encoders write them and as kiwiPy, AiiDA and its ZeroMQ broker send them.
pub fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let mut seeds = Vec::new();
    for codec in Codec::ALL {
        let name = match codec {
            Codec::MessagePack => "envelope_msgpack",
            Codec::Json => "envelope_json",
            Codec::Bincode => "envelope_bincode",
            Codec::Yaml => "envelope_yaml",
        };
        let every_reading = envelope_seeds(*codec)
            .into_iter()
            .flat_map(|seed| (0..ENVELOPE_READINGS).map(move |pick| [&[pick][..], &seed].concat()))
            .collect();
        seeds.push((name, every_reading));
    }
    seeds.push(("presence", vec![presence_seed()]));
    #[cfg(feature = "zeromq")]
    seeds.push(("zeromq_from_broker", zeromq_seeds()));
    #[cfg(feature = "zeromq")]
    seeds.extend(zeromq_file_seeds());
    seeds.push((
        "dashboard_parameters",
        [
            "",
            "token=s3cret",
            "subject=state_changed.*&sender=47&limit=10",
            "subject=%2A.running&limit=500&token=t\nqueues/aiida-1f6c.process.queue/purge",
            "limit=0\nqueues/kiwipy.tasks",
            "sender=worker-*\nqueues/a%20queue/requeue-dead-letters",
            "subject=x&unknown=1\nqueues/%E2%9C%93/purge-dead-letters",
        ]
        .iter()
        .map(|text| text.as_bytes().to_vec())
        .collect(),
    ));
    seeds
}

fn envelope_seeds(codec: Codec) -> Vec<Vec<u8>> {
    use envelope::{Host, Reply};
    let job = Job {
        name: "relax".into(),
        steps: vec![1, 2, 3],
        options: [("energy".to_owned(), -1.5)].into_iter().collect(),
        parent: Some(Box::new(Job {
            name: "scf".into(),
            steps: vec![],
            options: BTreeMap::new(),
            parent: None,
        })),
    };
    let aiida_task = Value::Map(vec![
        ("task".into(), "continue".into()),
        (
            "args".into(),
            Value::Map(vec![
                ("pid".into(), 8.into()),
                ("nowait".into(), false.into()),
                ("tag".into(), Value::Nil),
            ]),
        ),
    ]);
    let status = Value::Map(vec![
        ("ctime".into(), Value::F64(1_765_000_000.25)),
        ("paused".into(), false.into()),
        (
            "process_string".into(),
            "<ArithmeticAddCalculation> (ProcessState.WAITING)".into(),
        ),
        ("state".into(), "ProcessState.WAITING".into()),
    ]);
    let intent = Intent {
        intent: "kill".into(),
        message: Some("Killed through `verdi process kill`".into()),
        force_kill: true,
    };
    let host = Some(Host {
        hostname: "worker-1".into(),
        pid: 4242,
    });
    let mut out = Vec::new();
    let mut put = |bytes: crate::Result<Vec<u8>>| out.push(bytes.expect("a seed encodes"));
    put(codec.encode(&(&job, false)));
    put(codec.encode(&(&intent, true)));
    put(codec.encode(&ReplyEnvelope {
        reply: Reply::Result(&job),
        host: host.clone(),
    }));
    put(codec.encode(&ReplyEnvelope {
        reply: Reply::Result(vec![1i64, -2, 3]),
        host: None,
    }));
    put(codec.encode(&ReplyEnvelope::<()> {
        reply: Reply::Exception("ValueError: bad input".into()),
        host: None,
    }));
    put(codec.encode(&ReplyEnvelope::<()> {
        reply: Reply::Cancelled(Some("user".into())),
        host: None,
    }));
    put(codec.encode(&ReplyEnvelope::<()> {
        reply: Reply::Pending,
        host: None,
    }));
    put(codec.encode_broadcast(BroadcastEnvelope {
        body: Some("hello".to_owned()),
        sender: Some(Value::from("worker-1")),
        subject: Some(Value::from("state_changed.created.running")),
        correlation_id: None,
    }));
    if codec.is_self_describing() {
        put(codec.encode(&(&aiida_task, false)));
        put(codec.encode(&ReplyEnvelope {
            reply: Reply::Result(&status),
            host,
        }));
        put(codec.encode_broadcast(BroadcastEnvelope {
            body: Value::Nil,
            sender: Some(Value::from(47)),
            subject: Some(Value::from("state_changed.None.created")),
            correlation_id: Some(Value::F64(1.5)),
        }));
        // YAML has no bytes (Python's `!!binary` arrives as its base64 text).
        let bytes = match codec {
            Codec::Yaml => Value::from("AJ+Slg=="),
            _ => Value::Binary(vec![0, 159, 146, 150]),
        };
        put(codec.encode(&Value::Array(vec![
            bytes,
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::F32(0.5),
        ])));
    }
    out
}

fn presence_seed() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": "3f0c2b8e6f1d4d1b9a0e5c7d2b4a6e8f", "host": "worker-1", "pid": 4242,
        "program": "kiwimq", "version": env!("CARGO_PKG_VERSION"), "backend": "amqp",
        "node": "amqp://guest:***@127.0.0.1:5672/%2f", "connected": true,
        "sent_at_ms": 1_765_000_000_000u64, "uptime_secs": 12.5, "interval_secs": 5.0,
        "task_queues": [{"name": "kiwipy.tasks", "prefetch": 1, "subscribers": 1,
            "running": 1, "counts": {"handled": 10, "failed": 1, "panicked": 0, "rejected": 2}}],
        "rpc_identifiers": 3, "broadcast_filters": ["*", "state_changed.*"],
        "in_flight": [{"queue": "kiwipy.tasks", "correlation_id": "a6f1", "age_secs": 1.25,
            "progress": 0.5, "note": "step 2 of 4"}],
        "counts": {"handled": 10, "failed": 1, "panicked": 0, "rejected": 2},
        "restarts": 0, "subscribers_lost": 0, "pending_results": 1, "closing": false
    }))
    .expect("a seed encodes")
}

/// Messages as AiiDA's broker (aiida-core 2.9.4) and kiwimq's send them to a client.
#[cfg(feature = "zeromq")]
fn zeromq_seeds() -> Vec<Vec<u8>> {
    use crate::zeromq::protocol::{Outgoing, json_string, kind};
    let mut seeds: Vec<Vec<u8>> = [
        r#"{"type": "task", "id": "5b1c3e0b2e7f4b8e9d2a6c4f1e3b5d7a", "body": {"task": "continue", "args": {"pid": 8, "nowait": false, "tag": null}}, "no_reply": true}"#,
        r#"{"type": "task_response", "task_id": "5b1c3e0b2e7f4b8e9d2a6c4f1e3b5d7a", "result": true}"#,
        r#"{"type": "rpc", "id": "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b", "sender": "client-1a2b3c4d", "recipient": 8, "body": {"intent": "status", "message": null}}"#,
        r#"{"type": "rpc_response", "rpc_id": "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b", "result": {"ctime": 1765000000.25, "paused": false, "process_string": "<ArithmeticAddCalculation> (ProcessState.WAITING)", "state": "ProcessState.WAITING"}, "error": null}"#,
        r#"{"type": "rpc_response", "rpc_id": "9e8d", "error": "Recipient not found: 8"}"#,
        r#"{"type": "broadcast", "id": "1c2d", "sender": 8, "body": null, "subject": "state_changed.created.running", "correlation_id": null}"#,
        r#"{"type": "ping", "sender": "broker"}"#,
        r#"{"type": "kiwimq_presence", "id": "p", "sender": "client-1", "body": {"id": "x", "interval_secs": 5.0}}"#,
    ]
    .iter()
    .map(|text| text.as_bytes().to_vec())
    .collect();
    let broker = json_string("broker");
    let body = serde_json::value::RawValue::from_string(r#"{"n": 1}"#.into()).expect("JSON");
    seeds.push(
        Outgoing {
            body: Some(&body),
            no_reply: Some(false),
            results: Some(true),
            ..Outgoing::new(kind::TASK, &broker)
        }
        .encode(),
    );
    seeds.push(
        Outgoing {
            task_id: Some("t-1"),
            result: Some(&body),
            error: Some(None),
            results: Some(true),
            ..Outgoing::new(kind::TASK_RESPONSE, &broker)
        }
        .encode(),
    );
    seeds
}

/// Messages as AiiDA's clients and kiwimq's send them to a broker, and the files kiwimq's
/// and AiiDA's brokers keep.
#[cfg(feature = "zeromq")]
fn zeromq_file_seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    use crate::zeromq::state::{HandOver, PersistedState};
    use crate::zeromq::store::StoredTask;
    let text = |texts: &[&str]| {
        texts
            .iter()
            .map(|t| t.as_bytes().to_vec())
            .collect::<Vec<_>>()
    };
    let from_client = text(&[
        r#"{"type": "task", "id": "5b1c3e0b2e7f4b8e9d2a6c4f1e3b5d7a", "sender": "client-1a2b3c4d", "body": {"task": "continue", "args": {"pid": 8, "nowait": false, "tag": null}}, "no_reply": true}"#,
        r#"{"type": "task", "id": "t-2", "sender": "client-1", "body": [1, 2], "no_reply": false, "results": true}"#,
        r#"{"type": "subscribe_task", "id": "a1", "sender": "client-1a2b3c4d", "identifier": "client-1a2b3c4d", "prefetch_count": 200}"#,
        r#"{"type": "subscribe_rpc", "id": "a2", "sender": "client-1a2b3c4d", "identifier": "8", "prefetch_count": null}"#,
        r#"{"type": "unsubscribe_rpc", "id": "a3", "sender": "client-1a2b3c4d", "identifier": "8", "prefetch_count": null}"#,
        r#"{"type": "rpc", "id": "9e8d7c6b", "sender": "client-1", "recipient": 8, "body": {"intent": "pause", "message": null}}"#,
        r#"{"type": "rpc", "id": "9e8d7c6c", "sender": "client-1", "recipient": "8", "body": {"intent": "kill", "message": "bye", "force_kill": true}}"#,
        r#"{"type": "rpc_response", "id": "r1", "sender": "client-2", "rpc_id": "9e8d7c6b", "result": true, "error": null}"#,
        r#"{"type": "rpc_response", "id": "r2", "sender": "client-2", "rpc_id": "9e8d7c6b", "result": null, "error": "No handler for 8"}"#,
        r#"{"type": "broadcast", "id": "b1", "sender": 8, "body": null, "subject": "state_changed.created.running", "correlation_id": null}"#,
        r#"{"type": "task_ack", "id": "k1", "sender": "client-1", "task_id": "5b1c3e0b2e7f4b8e9d2a6c4f1e3b5d7a"}"#,
        r#"{"type": "task_nack", "id": "k2", "sender": "client-1", "task_id": "t-2", "delivery": 3}"#,
        r#"{"type": "kiwimq_holding", "id": "h", "sender": "client-1", "task_ids": ["t-2", "t-3"]}"#,
        r#"{"type": "kiwimq_presence", "id": "p", "sender": "client-1", "body": {"id": "x", "interval_secs": 5.0}}"#,
        r#"{"type": "kiwimq_watch_presence", "id": "w", "sender": "client-1"}"#,
    ]);
    let aiida_status = r#"{"running": true, "pending_tasks": 3, "processing_tasks": 1, "task_subscribers": 1, "rpc_subscribers": 4, "available_workers": 1, "in_flight_tasks": 1, "pending_rpc_responses": 0, "timestamp": 1765000000.123456, "pid": 4242}"#;
    let mut status = text(&[aiida_status, r#"{"running": false}"#]);
    let mut ours: serde_json::Value = serde_json::from_str(aiida_status).expect("JSON");
    ours["broker"] = "kiwimq".into();
    status.push(serde_json::to_vec_pretty(&ours).expect("encodes"));
    let mut state = PersistedState {
        next_delivery: 1_765_000_000_000_042,
        ..PersistedState::default()
    };
    state
        .task_subscribers
        .insert("client-1".into(), "636c69656e742d31".into());
    state
        .rpc_subscribers
        .insert("8".into(), "636c69656e742d31".into());
    state.prefetch.insert("636c69656e742d31".into(), Some(200));
    state.prefetch.insert("636c69656e742d32".into(), None);
    state
        .assignments
        .insert("t-1".into(), "636c69656e742d31".into());
    state.deliveries.insert(
        "t-1".into(),
        HandOver {
            delivery: 1_765_000_000_000_041,
            at: 1_765_000_000.25,
        },
    );
    state
        .result_routes
        .insert("t-1".into(), "636c69656e742d32".into());
    let states = vec![
        serde_json::to_vec(&state).expect("encodes"),
        br#"{"task_subscribers":{"t":"61"},"rpc_subscribers":{},"prefetch":{"61":3},"assignments":{"x":"61"},"result_routes":{}}"#.to_vec(),
    ];
    let task = StoredTask {
        id: Some("5b1c3e0b2e7f4b8e9d2a6c4f1e3b5d7a".into()),
        sender: "client-1a2b3c4d".into(),
        sender_identity: Some("636c69656e742d31".into()),
        body: serde_json::value::RawValue::from_string(
            r#"{"task":"continue","args":{"pid":8,"nowait":false,"tag":null}}"#.into(),
        )
        .expect("JSON"),
        no_reply: true,
        timestamp: 1_765_000_000.123_456,
        results: true,
    };
    let stored = serde_json::to_string(&task).expect("encodes");
    let files = text(&[
        &format!("1765000000123456_5b1c3e0b2e7f4b8e9d2a6c4f1e3b5d7a.json\n{stored}"),
        "1765000000123457_t-2.json\n{\"body\": {\"task\": \"continue\", \"args\": {\"pid\": 9, \"nowait\": false, \"tag\": null}}, \"no_reply\": true}",
        "1765000000123458_t-3.json\n{\"id\": \"t-3\", \"sender\": 8, \"sender_identity\": \"636c\", \"body\": null, \"no_reply\": false, \"timestamp\": 1765000000.5}",
    ]);
    let journal = text(&[
        &format!(
            "{{\"seq\":1,\"name\":\"1765000000123456_t-1.json\",\"task\":{stored}}}\n{{\"seq\":2,\"name\":\"1765000000123457_t-2.json\",\"task\":{stored}}}\n{{\"synced\":1}}\n"
        ),
        &format!(
            "{{\"seq\":7,\"name\":\"1765000000123459_t-9.json\",\"task\":{stored}}}\n{{\"seq\":8,\"na"
        ),
    ]);
    vec![
        ("zeromq_from_client", from_client),
        ("broker_status", status),
        ("broker_state", states),
        ("task_file", files),
        ("journal", journal),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed holds its target's properties. With `KIWIMQ_WRITE_SEEDS=DIR` set (the
    /// fuzz crate's `corpus/`), the seeds are also written there, one file each.
    #[test]
    fn every_seed_holds_its_targets_properties() {
        let write = std::env::var_os("KIWIMQ_WRITE_SEEDS").map(std::path::PathBuf::from);
        for (target, seeds) in seeds() {
            assert!(!seeds.is_empty(), "{target}");
            for (n, seed) in seeds.iter().enumerate() {
                run(target, seed);
                if let Some(dir) = &write {
                    let dir = dir.join(target);
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(dir.join(format!("seed-{n:03}")), seed).unwrap();
                }
            }
        }
    }

    pub(super) fn run(target: &str, data: &[u8]) {
        match target {
            "envelope_msgpack" => envelope(Codec::MessagePack, data),
            "envelope_json" => envelope(Codec::Json, data),
            "envelope_bincode" => envelope(Codec::Bincode, data),
            "envelope_yaml" => envelope(Codec::Yaml, data),
            "presence" => presence(data),
            "zeromq_from_broker" => zeromq_from_broker(data),
            "dashboard_parameters" => dashboard_parameters(data),
            "zeromq_from_client" => zeromq_from_client(data),
            "broker_status" => broker_status(data),
            "broker_state" => broker_state(data),
            "task_file" => task_file(data),
            "journal" => journal(data),
            other => panic!("no target {other}"),
        }
    }
}
