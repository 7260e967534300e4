//! kiwiPy 0.9's names and arguments on RabbitMQ — a contract: the broker refuses to
//! redeclare a queue or exchange with other arguments (PRECONDITION_FAILED), so these must
//! match kiwiPy's exactly. The one departure by default: testing mode's task queues are
//! durable and expiring, where kiwiPy's are transient, which RabbitMQ 4.3 refuses.
//!
//! Every queue is described as a [`QueueDeclaration`] before it is declared, so that a test
//! can walk all of them in every mode.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::settings::Settings;
use crate::transport::{
    BROADCAST_TOPIC, DEAD_LETTER_SUFFIX, Exchange, PRESENCE_TOPIC, dead_letter_queue, rpc_key,
};

/// kiwimq's presence exchange beside a message exchange: its own, so kiwiPy's and AiiDA's
/// peers, which bind only kiwiPy's two, never see an announcement.
pub(crate) fn presence_exchange(message_exchange: &str) -> String {
    format!("{message_exchange}.kiwimq-presence")
}

/// Names and arguments derived from the settings.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub(crate) task_exchange: String,
    pub(crate) message_exchange: String,
    /// kiwimq's own exchange of presence announcements.
    pub(crate) presence_exchange: String,
    testing_mode: bool,
    /// kiwiPy's transient testing-mode task queues instead of durable expiring ones.
    kiwipy_testing_queues: bool,
    task_message_ttl: Duration,
    message_ttl: Duration,
    queue_expires: Duration,
    testing_queue_expires: Duration,
    delivery_limit: Option<u32>,
    /// Task queues are quorum queues.
    quorum: bool,
    /// Reply queues and dead-letter queues are too: asked for, so that replies and dead
    /// letters survive a node's loss.
    quorum_replies: bool,
    /// `x-consumer-timeout` of every task queue, unless the queue has its own.
    consumer_timeout: Option<Duration>,
    queue_consumer_timeouts: Vec<(String, Duration)>,
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

/// One queue declaration as data — its name, durability, exclusivity, arguments and binding —
/// so that what kiwimq declares can be walked by a test (see `tests::rabbitmq_4_3`) as
/// well as sent to the broker.
#[derive(Debug, Clone)]
pub(crate) struct QueueDeclaration {
    pub(crate) name: String,
    pub(crate) options: QueueDeclareOptions,
    pub(crate) arguments: Vec<(&'static str, AMQPValue)>,
    /// The exchange and routing key it is bound with, if any.
    pub(crate) binding: Option<(String, String)>,
}

impl QueueDeclaration {
    fn new(
        name: &str,
        options: QueueDeclareOptions,
        arguments: Vec<(&'static str, AMQPValue)>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            options,
            arguments,
            binding: None,
        }
    }

    fn bound(mut self, exchange: &str, key: &str) -> Self {
        self.binding = Some((exchange.to_owned(), key.to_owned()));
        self
    }

    #[cfg(test)]
    /// Whether RabbitMQ 4.3 refuses it by default: a transient (non-durable) queue that is
    /// not exclusive (the deprecated feature `transient_nonexcl_queues`).
    pub(crate) fn is_transient_non_exclusive(&self) -> bool {
        !self.options.durable && !self.options.exclusive
    }

    /// Declares the queue, then binds it.
    pub(crate) async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let arguments = table(&self.arguments);
        channel
            .queue_declare(self.name.as_str().into(), self.options, arguments)
            .await?;
        if let Some((exchange, key)) = &self.binding {
            channel
                .queue_bind(
                    self.name.as_str().into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

impl Topology {
    pub(crate) fn new(settings: &Settings) -> Self {
        Self {
            task_exchange: settings.task_exchange.clone(),
            message_exchange: settings.message_exchange.clone(),
            presence_exchange: presence_exchange(&settings.message_exchange),
            testing_mode: settings.testing_mode,
            kiwipy_testing_queues: settings.kiwipy_testing_queues,
            task_message_ttl: settings.task_message_ttl,
            message_ttl: settings.message_ttl,
            queue_expires: settings.queue_expires,
            testing_queue_expires: settings.testing_queue_expires,
            delivery_limit: settings.delivery_limit,
            quorum: settings.quorum_queues || settings.delivery_limit.is_some(),
            quorum_replies: settings.quorum_queues,
            consumer_timeout: settings.consumer_timeout,
            queue_consumer_timeouts: settings.queue_consumer_timeouts.clone(),
            exclusive_rpc_identifiers: settings.exclusive_rpc_identifiers,
        }
    }

    /// Whether `name` is one of the exchanges this topology declares.
    pub(crate) fn owns(&self, name: &str) -> bool {
        name == self.exchange(Exchange::Tasks)
            || name == self.exchange(Exchange::Messages)
            || name == self.presence_exchange
    }

    pub(crate) fn exchange(&self, exchange: Exchange) -> &str {
        match exchange {
            Exchange::Tasks => &self.task_exchange,
            Exchange::Messages => &self.message_exchange,
        }
    }

    /// kiwiPy's two exchanges and kiwimq's presence exchange: topic, not durable,
    /// auto-deleted in testing mode.
    pub(crate) async fn declare_exchanges(&self, channel: &Channel) -> lapin::Result<()> {
        for name in [
            &self.task_exchange,
            &self.message_exchange,
            &self.presence_exchange,
        ] {
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

    /// Whether task queues are durable: always, except kiwiPy's own testing-mode queues
    /// (non-durable and not exclusive, which RabbitMQ 4.3 refuses by default).
    fn durable_tasks(&self) -> bool {
        !(self.testing_mode && self.kiwipy_testing_queues)
    }

    /// The consumer timeout a task queue carries (`x-consumer-timeout`), if any.
    fn consumer_timeout(&self, queue: &str) -> Option<Duration> {
        self.queue_consumer_timeouts
            .iter()
            .find(|(name, _)| name == queue)
            .map(|(_, timeout)| *timeout)
            .or(self.consumer_timeout)
    }

    /// The declarations of a task queue, in order: its dead-letter queue first when it has
    /// one, then the queue itself, bound with its own name as routing key.
    ///
    /// A task queue is durable with a 7-day message TTL; in testing mode it also expires
    /// after 10 s unused (`x-expires`), so tests leave nothing behind. (kiwiPy's testing
    /// mode declares it non-durable instead, which RabbitMQ 4.3 refuses by default; see
    /// [`Settings::with_kiwipy_testing_queues`](crate::Settings::with_kiwipy_testing_queues).)
    ///
    /// With [`Settings::with_quorum_queues`](crate::Settings::with_quorum_queues) or a
    /// delivery limit it is a quorum queue (always durable), replicated over a cluster, and
    /// dead-letters a message returned too often, or rejected, to `<queue>.dlq`, declared
    /// with it: RabbitMQ 4.0 gives every quorum queue a delivery limit of 20 by default, and
    /// without a dead-letter exchange a message over it would be dropped.
    pub(crate) fn task_queue_declarations(&self, queue: &str) -> Vec<QueueDeclaration> {
        let mut arguments = vec![("x-message-ttl", millis(self.task_message_ttl))];
        if self.testing_mode {
            arguments.push(("x-expires", millis(self.testing_queue_expires)));
        }
        if let Some(timeout) = self.consumer_timeout(queue) {
            arguments.push(("x-consumer-timeout", millis(timeout)));
        }
        if queue.ends_with(DEAD_LETTER_SUFFIX) && self.quorum {
            // A dead-letter queue, read as a task queue, keeps its own shape.
            return vec![self.dead_letter_declaration(queue)];
        }
        let mut declarations = Vec::with_capacity(2);
        if self.quorum {
            let dead_letters = dead_letter_queue(queue);
            declarations.push(self.dead_letter_declaration(&dead_letters));
            if let Some(limit) = self.delivery_limit {
                let limit = i32::try_from(limit).unwrap_or(i32::MAX);
                arguments.push(("x-delivery-limit", AMQPValue::LongInt(limit)));
            }
            arguments.extend([
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString(self.task_exchange.as_str().into()),
                ),
                (
                    "x-dead-letter-routing-key",
                    AMQPValue::LongString(dead_letters.as_str().into()),
                ),
                ("x-queue-type", AMQPValue::LongString("quorum".into())),
            ]);
        }
        let options = QueueDeclareOptions {
            // Quorum queues are always durable.
            durable: self.durable_tasks() || self.quorum,
            ..Default::default()
        };
        declarations.push(
            QueueDeclaration::new(queue, options, arguments).bound(&self.task_exchange, queue),
        );
        declarations
    }

    /// A quorum task queue's dead-letter queue: durable (kiwimq's own, never kiwiPy's),
    /// without a message TTL (a dead letter waits for a person), expiring in testing mode.
    /// With [`Settings::with_quorum_queues`](crate::Settings::with_quorum_queues) a quorum
    /// queue itself, replicated as its task queue is: a classic one lives on one node, and
    /// with that node down it cannot be declared again, which would stop the task queue's
    /// consumers from being restored on the other nodes. (With a delivery limit alone it
    /// stays classic, as kiwimq has always declared it.)
    fn dead_letter_declaration(&self, queue: &str) -> QueueDeclaration {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut arguments = Vec::new();
        if self.testing_mode {
            arguments.push(("x-expires", millis(self.testing_queue_expires)));
        }
        if self.quorum_replies {
            arguments.push(("x-queue-type", AMQPValue::LongString("quorum".into())));
        }
        QueueDeclaration::new(queue, options, arguments).bound(&self.task_exchange, queue)
    }

    /// Declares a task queue (see [`task_queue_declarations`](Self::task_queue_declarations)).
    pub(crate) async fn declare_task_queue(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> lapin::Result<()> {
        for declaration in self.task_queue_declarations(queue) {
            declaration.declare(channel).await?;
        }
        Ok(())
    }

    /// A reply queue: durable and not exclusive, so that it outlives a lost connection and
    /// a broker restart and keeps the replies sent meanwhile (task replies are persistent);
    /// expiring 60 s after its last consumer went. Bound to its exchange with its own name.
    /// (kiwiPy's is exclusive, which loses those replies; the queue is private to this
    /// communicator, so its arguments are ours to choose.)
    pub(crate) fn reply_queue_declaration(
        &self,
        exchange: Exchange,
        queue: &str,
    ) -> QueueDeclaration {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut arguments = vec![("x-expires", millis(self.queue_expires))];
        if self.quorum_replies {
            // Replies then survive the loss of the node the queue was declared on.
            arguments.push(("x-queue-type", AMQPValue::LongString("quorum".into())));
        }
        QueueDeclaration::new(queue, options, arguments).bound(self.exchange(exchange), queue)
    }

    /// Declares a reply queue (see [`reply_queue_declaration`](Self::reply_queue_declaration)).
    pub(crate) async fn declare_reply_queue(
        &self,
        channel: &Channel,
        exchange: Exchange,
        queue: &str,
    ) -> lapin::Result<()> {
        self.reply_queue_declaration(exchange, queue)
            .declare(channel)
            .await
    }

    /// The queue name of an RPC identifier, with exclusive RPC identifiers. Named by us
    /// (never server-named) and exclusive, so a second communicator claiming the
    /// identifier is refused by the broker.
    pub(crate) fn rpc_queue(&self, identifier: &str) -> String {
        format!("{}.rpc.{identifier}", self.message_exchange)
    }

    /// An RPC identifier's own queue: exclusive, 66 s message TTL, expiring 60 s unused,
    /// bound with `[rpc].<identifier>`.
    pub(crate) fn rpc_queue_declaration(&self, identifier: &str) -> QueueDeclaration {
        let options = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        let arguments = vec![
            ("x-message-ttl", millis(self.message_ttl)),
            ("x-expires", millis(self.queue_expires)),
        ];
        QueueDeclaration::new(&self.rpc_queue(identifier), options, arguments)
            .bound(&self.message_exchange, &rpc_key(identifier))
    }

    /// Declares an RPC identifier's own queue and returns its name.
    pub(crate) async fn declare_rpc_queue(
        &self,
        channel: &Channel,
        identifier: &str,
    ) -> lapin::Result<String> {
        let declaration = self.rpc_queue_declaration(identifier);
        declaration.declare(channel).await?;
        Ok(declaration.name)
    }

    /// A communicator's one RPC queue, bound once per identifier it serves: exclusive,
    /// 66 s message TTL, as kiwiPy's RPC queues.
    pub(crate) fn rpc_router_queue_declaration(&self, queue: &str) -> QueueDeclaration {
        self.message_queue(queue, false)
    }

    /// Declares the communicator's one RPC queue (unbound: each identifier binds it).
    pub(crate) async fn declare_rpc_router_queue(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> lapin::Result<()> {
        self.rpc_router_queue_declaration(queue)
            .declare(channel)
            .await
    }

    /// A queue of messages (RPC or broadcasts): exclusive, with the 66 s message TTL.
    fn message_queue(&self, queue: &str, auto_delete: bool) -> QueueDeclaration {
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete,
            ..Default::default()
        };
        QueueDeclaration::new(
            queue,
            options,
            vec![("x-message-ttl", millis(self.message_ttl))],
        )
    }

    /// A broadcast queue: exclusive, 66 s message TTL, bound with `[broadcast]`.
    pub(crate) fn broadcast_queue_declaration(&self, queue: &str) -> QueueDeclaration {
        self.message_queue(queue, true)
            .bound(&self.message_exchange, BROADCAST_TOPIC)
    }

    /// A presence watcher's queue: exclusive, 66 s message TTL, bound to the presence
    /// exchange.
    pub(crate) fn presence_queue_declaration(&self, queue: &str) -> QueueDeclaration {
        self.message_queue(queue, true)
            .bound(&self.presence_exchange, PRESENCE_TOPIC)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every combination of the settings that change a declaration.
    fn every_topology() -> impl Iterator<Item = (String, Topology)> {
        let flags = [false, true];
        let mut all = Vec::new();
        for testing in flags {
            for kiwipy in flags {
                for quorum in flags {
                    for limit in [None, Some(3)] {
                        for timeout in flags {
                            for exclusive_rpc in flags {
                                let mut settings = Settings::new("amqp://localhost")
                                    .with_testing_mode(testing)
                                    .with_kiwipy_testing_queues(kiwipy)
                                    .with_quorum_queues(quorum)
                                    .with_exclusive_rpc_identifiers(exclusive_rpc);
                                if let Some(limit) = limit {
                                    settings = settings.with_delivery_limit(limit);
                                }
                                if timeout {
                                    settings =
                                        settings.with_consumer_timeout(Duration::from_secs(3600));
                                }
                                all.push((format!("{settings:?}"), Topology::new(&settings)));
                            }
                        }
                    }
                }
            }
        }
        all.into_iter()
    }

    /// Every queue a topology declares, for task queue `queue`.
    fn declarations(topology: &Topology, queue: &str) -> Vec<QueueDeclaration> {
        let mut all = topology.task_queue_declarations(queue);
        all.extend(topology.task_queue_declarations(&dead_letter_queue(queue)));
        all.push(topology.reply_queue_declaration(Exchange::Tasks, "replies"));
        all.push(topology.reply_queue_declaration(Exchange::Messages, "rpc-replies"));
        all.push(topology.rpc_queue_declaration("identifier"));
        all.push(topology.rpc_router_queue_declaration("router"));
        all.push(topology.broadcast_queue_declaration("broadcasts"));
        all
    }

    /// RabbitMQ 4.3 refuses transient non-exclusive queues by default: kiwimq declares none,
    /// in any mode, unless kiwiPy's testing-mode queues are asked for.
    #[test]
    fn rabbitmq_4_3() {
        for (settings, topology) in every_topology() {
            let kiwipy_transient = topology.testing_mode && topology.kiwipy_testing_queues;
            for declaration in declarations(&topology, "kiwipy.tasks") {
                let is_kiwipy_task_queue = !topology.quorum
                    && (declaration.name == "kiwipy.tasks"
                        || declaration.name == "kiwipy.tasks.dlq");
                let allowed = kiwipy_transient && is_kiwipy_task_queue;
                assert_eq!(
                    declaration.is_transient_non_exclusive(),
                    allowed,
                    "{declaration:?} under {settings}"
                );
            }
        }
    }

    /// RabbitMQ 4.0's default delivery limit drops nothing: every quorum task queue has a
    /// dead-letter queue.
    #[test]
    fn quorum_queues_dead_letter() {
        for (settings, topology) in every_topology().filter(|(_, t)| t.quorum) {
            let declared = topology.task_queue_declarations("q");
            let names: Vec<_> = declared.iter().map(|d| d.name.as_str()).collect();
            assert_eq!(names, ["q.dlq", "q"], "{settings}");
            let queue = &declared[1];
            let exchange = queue
                .arguments
                .iter()
                .find(|(key, _)| *key == "x-dead-letter-exchange");
            assert!(exchange.is_some(), "{queue:?} under {settings}");
            // Replicated as its task queue is, so a node's loss does not strand it.
            let dead_letters_are_quorum = declared[0]
                .arguments
                .iter()
                .any(|(key, _)| *key == "x-queue-type");
            assert_eq!(
                dead_letters_are_quorum, topology.quorum_replies,
                "{settings}"
            );
        }
    }

    #[test]
    fn consumer_timeout_per_queue() {
        let settings = Settings::new("amqp://localhost")
            .with_consumer_timeout(Duration::from_secs(60))
            .with_queue_consumer_timeout("long", Duration::from_secs(86_400));
        let topology = Topology::new(&settings);
        let timeout = |queue: &str| {
            let declared = topology.task_queue_declarations(queue);
            declared[0]
                .arguments
                .iter()
                .find(|(key, _)| *key == "x-consumer-timeout")
                .map(|(_, value)| value.clone())
        };
        assert_eq!(timeout("long"), Some(AMQPValue::LongInt(86_400_000)));
        assert_eq!(timeout("short"), Some(AMQPValue::LongInt(60_000)));
        let none = Topology::new(&Settings::new("amqp://localhost"));
        assert!(
            none.task_queue_declarations("q")[0]
                .arguments
                .iter()
                .all(|(key, _)| *key != "x-consumer-timeout")
        );
    }
}
