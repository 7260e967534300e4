//! Bytes that are not a kiwimq message at all, published with plain lapin as a buggy or
//! foreign sender would: an error reply naming the problem, the message not redelivered,
//! and the subscribers still working.

mod common;

use std::collections::BTreeMap;

use futures::StreamExt;
use kiwimq::{Broadcast, BroadcastFilter, BroadcastOptions, Rpc, Task};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use common::{SOON, amqp_settings, amqp_url, eventually, seen};

/// Not MessagePack: 0xc1 is a byte MessagePack never uses.
const GARBAGE: &[u8] = &[0xc1, 0xff, 0x00, 0x13, 0x37];

/// A reply map as kiwiPy sends it.
type ReplyMap = BTreeMap<String, serde_json::Value>;

struct Raw {
    connection: Connection,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
    reply_queue: String,
}

impl Raw {
    async fn connect() -> Raw {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        let queue = channel
            .queue_declare("".into(), options, FieldTable::default())
            .await
            .unwrap();
        let reply_queue = queue.name().to_string();
        let consumer = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Raw {
            connection,
            channel,
            consumer,
            reply_queue,
        }
    }

    async fn publish(&self, exchange: &str, key: &str, body: &[u8]) {
        let properties = BasicProperties::default()
            .with_reply_to(self.reply_queue.as_str().into())
            .with_correlation_id("garbage-1".into());
        self.channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn close(self) {
        self.connection.close(200, "done".into()).await.unwrap();
    }

    async fn reply(&mut self) -> ReplyMap {
        let delivery = tokio::time::timeout(SOON, self.consumer.next())
            .await
            .expect("a reply comes")
            .unwrap()
            .unwrap();
        rmp_serde::from_slice(&delivery.data).expect("the reply is a map")
    }
}

fn exception(reply: &ReplyMap) -> String {
    match reply.get("exception") {
        Some(serde_json::Value::String(text)) => text.clone(),
        other => panic!("not an exception reply: {other:?} in {reply:?}"),
    }
}

#[actix_rt::test]
async fn garbage_task_gets_an_error_reply_and_is_not_redelivered() {
    let settings = amqp_settings(&amqp_url());
    let comm = settings.clone().connect().await.unwrap();
    let handled = seen::<i64>();
    let record = handled.clone();
    comm.add_task_subscriber(move |task: Task<i64>| {
        record.lock().unwrap().push(task.body);
        async move { Ok(task.body) }
    })
    .await
    .unwrap();
    let mut raw = Raw::connect().await;
    raw.publish(settings.task_exchange(), settings.task_queue(), GARBAGE)
        .await;
    let text = exception(&raw.reply().await);
    assert!(text.contains("decode"), "{text}");
    // Still working, and the garbage is gone: a second reply would be a redelivery.
    assert_eq!(
        comm.task_send::<_, i64>(&5i64)
            .await
            .unwrap()
            .await
            .unwrap(),
        5
    );
    assert_eq!(*handled.lock().unwrap(), [5]);
    let next = comm
        .next_task::<i64>(std::time::Duration::from_millis(200))
        .await;
    assert!(next.is_err(), "nothing left in the queue");
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), raw.consumer.next())
            .await
            .is_err(),
        "answered once"
    );
    raw.close().await;
    comm.close().await.unwrap();
}

#[actix_rt::test]
async fn garbage_rpc_gets_an_error_reply() {
    let settings = amqp_settings(&amqp_url());
    let comm = settings.clone().connect().await.unwrap();
    comm.add_rpc_subscriber(
        Some("adder"),
        |rpc: Rpc<i64>| async move { Ok(rpc.body + 1) },
    )
    .await
    .unwrap();
    let mut raw = Raw::connect().await;
    raw.publish(settings.message_exchange(), "[rpc].adder", GARBAGE)
        .await;
    let text = exception(&raw.reply().await);
    assert!(text.contains("decode"), "{text}");
    let fine: i64 = comm.rpc_send("adder", &1i64).await.unwrap().await.unwrap();
    assert_eq!(fine, 2);
    raw.close().await;
    comm.close().await.unwrap();
}

#[actix_rt::test]
async fn garbage_broadcast_is_skipped() {
    let settings = amqp_settings(&amqp_url());
    let comm = settings.clone().connect().await.unwrap();
    let heard = seen::<String>();
    let record = heard.clone();
    comm.add_broadcast_subscriber(BroadcastFilter::new(), move |b: Broadcast<String>| {
        record.lock().unwrap().push(b.body);
        async { Ok(()) }
    })
    .await
    .unwrap();
    let raw = Raw::connect().await;
    raw.publish(settings.message_exchange(), "[broadcast]", GARBAGE)
        .await;
    comm.broadcast_send(&"fine".to_owned(), BroadcastOptions::default())
        .await
        .unwrap();
    eventually(SOON, "the good broadcast", || {
        !heard.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(*heard.lock().unwrap(), ["fine"]);
    raw.close().await;
    comm.close().await.unwrap();
}

/// A client on another codec than the server's gets an error, never a wrong answer: JSON's
/// `30` read as MessagePack would be the integer 51 followed by a stray byte.
#[actix_rt::test]
async fn a_codec_mismatch_is_an_error_not_a_wrong_answer() {
    let broker = format!("mem://{}", uuid::Uuid::new_v4().simple());
    for (server_codec, client_codec) in [
        (kiwimq::Codec::MessagePack, kiwimq::Codec::Json),
        (kiwimq::Codec::Json, kiwimq::Codec::MessagePack),
        (kiwimq::Codec::Yaml, kiwimq::Codec::MessagePack),
        (kiwimq::Codec::MessagePack, kiwimq::Codec::Yaml),
    ] {
        let server = kiwimq::Settings::new(&broker)
            .with_codec(server_codec)
            .connect()
            .await
            .unwrap();
        let asked = seen::<u64>();
        let record = asked.clone();
        server
            .add_rpc_subscriber(Some("fib"), move |rpc: Rpc<u64>| {
                record.lock().unwrap().push(rpc.body);
                async move { Ok::<_, kiwimq::HandlerError>(rpc.body) }
            })
            .await
            .unwrap();
        let client = kiwimq::Settings::new(&broker)
            .with_codec(client_codec)
            .connect()
            .await
            .unwrap();
        let reply = client
            .rpc_send::<_, u64>("fib", &30u64)
            .await
            .unwrap()
            .await;
        assert!(
            reply.is_err(),
            "{server_codec} server, {client_codec} client: {reply:?}"
        );
        assert!(
            asked.lock().unwrap().is_empty(),
            "the server computed {:?}",
            asked.lock().unwrap()
        );
        client.close().await.unwrap();
        server.close().await.unwrap();
    }
}
