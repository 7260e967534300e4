//! kiwiPy 0.9's names and arguments on RabbitMQ — a contract: the broker refuses to
//! redeclare a queue or exchange with other arguments (PRECONDITION_FAILED), so these must
//! match kiwiPy's exactly.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::settings::Settings;
use crate::transport::{BROADCAST_TOPIC, DEAD_LETTER_SUFFIX, Exchange, dead_letter_queue, rpc_key};

/// Names and arguments derived from the settings.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub(crate) task_exchange: String,
    pub(crate) message_exchange: String,
    testing_mode: bool,
    task_message_ttl: Duration,
    message_ttl: Duration,
    queue_expires: Duration,
    testing_queue_expires: Duration,
    delivery_limit: Option<u32>,
    /// Task queues are quorum queues.
    quorum: bool,
    /// Reply queues are too: asked for, so that replies survive a node's loss.
    quorum_replies: bool,
    /// A queue per RPC identifier, instead of one per communicator bound per identifier.
    pub(crate) exclusive_rpc_identifiers: bool,
}

fn millis(duration: Duration) -> AMQPValue {
    // kiwiPy's arguments arrive as 32-bit integers; the broker compares integer arguments by
    // value across integer types, so any integer type is equivalent.
    AMQPValue::LongInt(i32::try_from(duration.as_millis()).unwrap_or(i32::MAX))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert((*key).into(), value.clone());
    }
    table
}

/// Declares a queue and binds it to `exchange` with `key`.
async fn declare_bound(
    channel: &Channel,
    queue: &str,
    options: QueueDeclareOptions,
    arguments: FieldTable,
    exchange: &str,
    key: &str,
) -> lapin::Result<()> {
    channel
        .queue_declare(queue.into(), options, arguments)
        .await?;
    let bind = QueueBindOptions::default();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            bind,
            FieldTable::default(),
        )
        .await
}

impl Topology {
    pub(crate) fn new(settings: &Settings) -> Self {
        Self {
            task_exchange: settings.task_exchange.clone(),
            message_exchange: settings.message_exchange.clone(),
            testing_mode: settings.testing_mode,
            task_message_ttl: settings.task_message_ttl,
            message_ttl: settings.message_ttl,
            queue_expires: settings.queue_expires,
            testing_queue_expires: settings.testing_queue_expires,
            delivery_limit: settings.delivery_limit,
            quorum: settings.quorum_queues || settings.delivery_limit.is_some(),
            quorum_replies: settings.quorum_queues,
            exclusive_rpc_identifiers: settings.exclusive_rpc_identifiers,
        }
    }

    /// Whether `name` is one of the two exchanges this topology declares.
    pub(crate) fn owns(&self, name: &str) -> bool {
        name == self.exchange(Exchange::Tasks) || name == self.exchange(Exchange::Messages)
    }

    pub(crate) fn exchange(&self, exchange: Exchange) -> &str {
        match exchange {
            Exchange::Tasks => &self.task_exchange,
            Exchange::Messages => &self.message_exchange,
        }
    }

    /// Both exchanges: topic, not durable, auto-deleted in testing mode.
    pub(crate) async fn declare_exchanges(&self, channel: &Channel) -> lapin::Result<()> {
        for name in [&self.task_exchange, &self.message_exchange] {
            let options = ExchangeDeclareOptions {
                auto_delete: self.testing_mode,
                ..Default::default()
            };
            channel
                .exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Topic,
                    options,
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// A task queue: durable with a 7-day message TTL; in testing mode non-durable and
    /// expiring after 10 s unused. Bound with its own name as routing key.
    ///
    /// With [`Settings::with_quorum_queues`](crate::Settings::with_quorum_queues) it is a
    /// quorum queue (always durable), replicated over a cluster. With a delivery limit it is
    /// one too, and dead-letters a message returned too often, or rejected, to
    /// `<queue>.dlq`, which is declared with it.
    pub(crate) async fn declare_task_queue(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> lapin::Result<()> {
        let mut arguments = vec![("x-message-ttl", millis(self.task_message_ttl))];
        if self.testing_mode {
            arguments.push(("x-expires", millis(self.testing_queue_expires)));
        }
        let dead_letters = dead_letter_queue(queue);
        let classic = QueueDeclareOptions {
            durable: !self.testing_mode,
            ..Default::default()
        };
        let quorum_type = ("x-queue-type", AMQPValue::LongString("quorum".into()));
        if let Some(limit) = self.delivery_limit {
            // A dead-letter queue, read as a task queue, keeps its own shape.
            let is_dead_letters = queue.ends_with(DEAD_LETTER_SUFFIX);
            declare_bound(
                channel,
                if is_dead_letters {
                    queue
                } else {
                    &dead_letters
                },
                classic,
                table(&arguments[1..]),
                &self.task_exchange,
                if is_dead_letters {
                    queue
                } else {
                    &dead_letters
                },
            )
            .await?;
            if is_dead_letters {
                return Ok(());
            }
            let limit = i32::try_from(limit).unwrap_or(i32::MAX);
            arguments.extend([
                ("x-delivery-limit", AMQPValue::LongInt(limit)),
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString(self.task_exchange.as_str().into()),
                ),
                (
                    "x-dead-letter-routing-key",
                    AMQPValue::LongString(dead_letters.as_str().into()),
                ),
            ]);
        }
        if self.quorum {
            arguments.push(quorum_type);
        }
        let options = QueueDeclareOptions {
            // Quorum queues are always durable.
            durable: classic.durable || self.quorum,
            ..Default::default()
        };
        declare_bound(
            channel,
            queue,
            options,
            table(&arguments),
            &self.task_exchange,
            queue,
        )
        .await
    }

    /// A reply queue: durable and not exclusive, so that it outlives a lost connection and
    /// a broker restart and keeps the replies sent meanwhile (task replies are persistent);
    /// expiring 60 s after its last consumer went. Bound to its exchange with its own name.
    /// (kiwiPy's is exclusive, which loses those replies; the queue is private to this
    /// communicator, so its arguments are ours to choose.)
    pub(crate) async fn declare_reply_queue(
        &self,
        channel: &Channel,
        exchange: Exchange,
        queue: &str,
    ) -> lapin::Result<()> {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut arguments = vec![("x-expires", millis(self.queue_expires))];
        if self.quorum_replies {
            // Replies then survive the loss of the node the queue was declared on.
            arguments.push(("x-queue-type", AMQPValue::LongString("quorum".into())));
        }
        let arguments = table(&arguments);
        declare_bound(
            channel,
            queue,
            options,
            arguments,
            self.exchange(exchange),
            queue,
        )
        .await
    }

    /// The queue name of an RPC identifier, with exclusive RPC identifiers. Named by us
    /// (never server-named) and exclusive, so a second communicator claiming the
    /// identifier is refused by the broker.
    pub(crate) fn rpc_queue(&self, identifier: &str) -> String {
        format!("{}.rpc.{identifier}", self.message_exchange)
    }

    /// An RPC queue: exclusive, 66 s message TTL, expiring 60 s unused, bound with
    /// `[rpc].<identifier>`.
    pub(crate) async fn declare_rpc_queue(
        &self,
        channel: &Channel,
        identifier: &str,
    ) -> lapin::Result<String> {
        let queue = self.rpc_queue(identifier);
        let options = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let arguments = table(&[
            ("x-message-ttl", millis(self.message_ttl)),
            ("x-expires", millis(self.queue_expires)),
        ]);
        let key = rpc_key(identifier);
        declare_bound(
            channel,
            &queue,
            options,
            arguments,
            &self.message_exchange,
            &key,
        )
        .await?;
        Ok(queue)
    }

    /// The RPC routing key of an identifier: `[rpc].<identifier>`.
    /// A communicator's one RPC queue, bound once per identifier it serves: exclusive,
    /// 66 s message TTL, as kiwiPy's RPC queues.
    pub(crate) async fn declare_rpc_router_queue(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> lapin::Result<()> {
        let (options, arguments) = self.message_queue(false);
        channel
            .queue_declare(queue.into(), options, arguments)
            .await
            .map(drop)
    }

    /// The options and arguments of a queue of messages (RPC or broadcasts): exclusive,
    /// with the 66 s message TTL.
    fn message_queue(&self, auto_delete: bool) -> (QueueDeclareOptions, FieldTable) {
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete,
            ..Default::default()
        };
        let arguments = table(&[("x-message-ttl", millis(self.message_ttl))]);
        (options, arguments)
    }

    /// A broadcast queue: exclusive, 66 s message TTL, bound with `[broadcast]`.
    pub(crate) async fn declare_broadcast_queue(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> lapin::Result<()> {
        let (options, arguments) = self.message_queue(true);
        declare_bound(
            channel,
            queue,
            options,
            arguments,
            &self.message_exchange,
            BROADCAST_TOPIC,
        )
        .await
    }
}
