//! What kiwimq declares on a real RabbitMQ, in every mode: every queue a communicator makes
//! (task queues and their dead-letter queues, reply queues, RPC and broadcast queues) is
//! read back from the broker with `rabbitmqctl list_queues`, and none may be transient
//! and non-exclusive — what RabbitMQ 4.3 refuses by default (`transient_nonexcl_queues`) —
//! except kiwiPy's own testing-mode task queues, asked for by
//! `Settings::with_kiwipy_testing_queues`. The in-crate test `topology::tests::rabbitmq_4_3`
//! walks the same declarations without a broker. Debian 12 ships RabbitMQ 3.10.8, which
//! accepts such queues, so this reads what was declared rather than waiting for a refusal.

mod common;

use std::process::Command;
use std::time::Duration;

use common::vhost::Vhost;
use kiwimq::prelude::*;
use kiwimq::{ErrorKind, Settings};

/// One combination of the settings that shape a declaration.
#[derive(Debug, Clone, Copy)]
struct Mode {
    testing: bool,
    kiwipy_testing_queues: bool,
    quorum: bool,
    delivery_limit: bool,
    consumer_timeout: bool,
    exclusive_rpc: bool,
}

impl Mode {
    fn all() -> Vec<Mode> {
        let mut all = Vec::new();
        for bits in 0..16u8 {
            let bit = |n: u8| bits & (1 << n) != 0;
            all.push(Mode {
                testing: bit(0),
                kiwipy_testing_queues: bit(1),
                quorum: bit(2),
                delivery_limit: bit(3),
                // These two shape fewer queues: alternated rather than multiplied.
                consumer_timeout: bits % 3 == 0,
                exclusive_rpc: bits % 2 == 1,
            });
        }
        all
    }

    fn settings(self, uri: &str, prefix: &str) -> Settings {
        let mut settings = Settings::new(uri)
            .with_message_exchange(format!("{prefix}.messages"))
            .with_task_exchange(format!("{prefix}.tasks"))
            .with_task_queue(format!("{prefix}.tasks"))
            .with_testing_mode(self.testing)
            .with_kiwipy_testing_queues(self.kiwipy_testing_queues)
            .with_quorum_queues(self.quorum)
            .with_exclusive_rpc_identifiers(self.exclusive_rpc);
        if self.delivery_limit {
            settings = settings.with_delivery_limit(3);
        }
        if self.consumer_timeout {
            settings = settings.with_consumer_timeout(Duration::from_secs(3600));
        }
        settings
    }

    /// Whether this mode declares kiwiPy's transient testing-mode task queues.
    fn transient_task_queues(self) -> bool {
        self.testing && self.kiwipy_testing_queues && !self.quorum && !self.delivery_limit
    }
}

/// Uses every kind of queue once, so that each is declared.
async fn declare_everything(comm: &Communicator, prefix: &str) {
    comm.add_task_subscriber(|task: Task<i64>| async move { Ok::<_, HandlerError>(task.body) })
        .await
        .unwrap();
    let echoed: i64 = comm.task_send(&7i64).await.unwrap().await.unwrap();
    assert_eq!(echoed, 7);
    let named = comm.task_queue(format!("{prefix}.named"));
    named.task_send_no_reply(&1i64).await.unwrap();
    let pulled = named
        .next_task::<i64>(Duration::from_secs(10))
        .await
        .unwrap();
    pulled.process(Ok(1i64)).await.unwrap();
    match named.dead_letters().stats().await {
        Ok(_) => {}
        Err(error) if matches!(error.kind(), ErrorKind::Refused(_)) => {}
        Err(error) => panic!("dead-letter stats: {error}"),
    }
    comm.add_rpc_subscriber(Some("echo"), |rpc: Rpc<i64>| async move {
        Ok::<_, HandlerError>(rpc.body)
    })
    .await
    .unwrap();
    let answer: i64 = comm.rpc_send("echo", &5i64).await.unwrap().await.unwrap();
    assert_eq!(answer, 5);
    comm.add_broadcast_subscriber(BroadcastFilter::new(), |_: Broadcast<i64>| async move {
        Ok::<_, HandlerError>(())
    })
    .await
    .unwrap();
    comm.broadcast_send(&1i64, BroadcastOptions::subject("s"))
        .await
        .unwrap();
}

/// A queue as `rabbitmqctl list_queues` shows it.
#[derive(Debug)]
struct Declared {
    name: String,
    durable: bool,
    exclusive: bool,
}

fn list_queues(vhost: &str) -> Vec<Declared> {
    let output = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "-p",
            vhost,
            "--no-table-headers",
            "name",
            "durable",
            "exclusive",
        ])
        .output()
        .expect("rabbitmqctl runs");
    assert!(output.status.success(), "rabbitmqctl list_queues");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let name = fields.next()?.to_owned();
            let durable = fields.next()? == "true";
            let exclusive = fields.next()? == "true";
            Some(Declared {
                name,
                durable,
                exclusive,
            })
        })
        .collect()
}

#[actix::test]
async fn nothing_rabbitmq_4_3_refuses_is_declared_in_any_mode() {
    let vhost = Vhost::new();
    let mut open = Vec::new();
    let modes = Mode::all();
    for (n, mode) in modes.iter().enumerate() {
        let prefix = format!("m{n}");
        let comm = mode
            .settings(&vhost.uri(), &prefix)
            .connect()
            .await
            .unwrap();
        declare_everything(&comm, &prefix).await;
        open.push(comm);
    }
    // Exclusive queues go with their connection: read them while every one is open.
    let declared = list_queues(vhost.name());
    for comm in open {
        comm.close().await.unwrap();
    }
    let mut allowed_transient = Vec::new();
    for (n, mode) in modes.iter().enumerate() {
        let task_queues = [format!("m{n}.tasks"), format!("m{n}.named")];
        for name in &task_queues {
            assert!(
                declared.iter().any(|q| &q.name == name),
                "{name} was declared under {mode:?}: {declared:?}"
            );
        }
        if mode.quorum || mode.delivery_limit {
            let dead_letters = format!("m{n}.tasks.dlq");
            assert!(
                declared.iter().any(|q| q.name == dead_letters),
                "{dead_letters} comes with a quorum queue under {mode:?}"
            );
        }
        if mode.transient_task_queues() {
            allowed_transient.extend(task_queues);
        }
    }
    // Reply queues (durable), RPC and broadcast queues (exclusive) are there too.
    let replies = declared
        .iter()
        .filter(|q| q.name.contains("-reply-"))
        .count();
    assert_eq!(replies, 2 * modes.len(), "{declared:?}");
    let exclusive = declared.iter().filter(|q| q.exclusive).count();
    assert!(exclusive >= 2 * modes.len(), "{declared:?}");
    let transient: Vec<&str> = declared
        .iter()
        .filter(|q| !q.durable && !q.exclusive)
        .map(|q| q.name.as_str())
        .collect();
    // Exactly kiwiPy's testing-mode queues, where the setting asks for them; nothing else.
    let mut expected: Vec<&str> = allowed_transient.iter().map(String::as_str).collect();
    let mut seen = transient.clone();
    expected.sort_unstable();
    seen.sort_unstable();
    assert_eq!(
        seen, expected,
        "transient non-exclusive queues, refused by RabbitMQ 4.3"
    );
}
