//! The behaviour suite: every row of the semantics table and kiwiPy's communicator
//! behaviours, written once and run on every backend (see the `suite!` list at the end).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix::prelude::*;
use common::*;
use futures::StreamExt;
use kiwimq::{
    Broadcast, BroadcastFilter, BroadcastOptions, Communicator, ErrorKind, HandlerError, Rpc, Task,
};

async fn connect(settings: &kiwimq::Settings) -> Communicator {
    settings.clone().connect().await.expect("connect")
}

fn kind<T: std::fmt::Debug>(result: kiwimq::Result<T>) -> ErrorKind {
    result.expect_err("expected an error").kind().clone()
}

// ---- lifetime ------------------------------------------------------------------------

async fn close_makes_every_call_fail(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    comm.close().await.unwrap();
    assert!(comm.is_closed());
    let queue = comm.task_queue(unique("q"));
    assert_eq!(kind(comm.task_send::<_, i64>(&1).await), ErrorKind::Closed);
    assert_eq!(kind(comm.task_send_no_reply(&1).await), ErrorKind::Closed);
    assert_eq!(
        kind(comm.rpc_send::<_, i64>("x", &1).await),
        ErrorKind::Closed
    );
    assert_eq!(
        kind(comm.broadcast_send(&1, BroadcastOptions::default()).await),
        ErrorKind::Closed
    );
    assert_eq!(
        kind(
            comm.add_task_subscriber(|t: Task<i64>| async move { Ok(t.body) })
                .await
        ),
        ErrorKind::Closed
    );
    assert_eq!(
        kind(
            comm.add_rpc_subscriber(None, |r: Rpc<i64>| async move { Ok(r.body) })
                .await
        ),
        ErrorKind::Closed
    );
    assert_eq!(
        kind(
            comm.add_broadcast_subscriber(BroadcastFilter::new(), |_: Broadcast<i64>| async {
                Ok(())
            })
            .await
        ),
        ErrorKind::Closed
    );
    assert_eq!(
        kind(comm.remove_task_subscriber("x").await),
        ErrorKind::Closed
    );
    assert_eq!(
        kind(comm.remove_rpc_subscriber("x").await),
        ErrorKind::Closed
    );
    assert_eq!(
        kind(comm.remove_broadcast_subscriber("x").await),
        ErrorKind::Closed
    );
    assert_eq!(
        kind(queue.next_task::<i64>(Duration::from_millis(10)).await),
        ErrorKind::Closed
    );
    comm.close().await.expect("closing twice is fine");
}

async fn closing_fails_pending_results(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let pending = comm.task_send::<_, i64>(&1).await.unwrap();
    comm.close().await.unwrap();
    assert_eq!(kind(pending.await), ErrorKind::Closed);
}

async fn scoped_use_closes(backend: Backend) {
    let settings = settings(backend);
    let observer = connect(&settings).await;
    let uri = settings.clone();
    let inside = async move {
        let comm = uri.connect().await?;
        comm.add_rpc_subscriber(Some("scoped"), |r: Rpc<i64>| async move { Ok(r.body) })
            .await?;
        Ok::<_, kiwimq::Error>(comm)
    };
    let comm = inside.await.unwrap();
    let answer: i64 = observer
        .rpc_send("scoped", &5)
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(answer, 5);
    drop(comm); // the last handle: the communicator closes
    let mut last = None;
    eventually(
        SOON,
        "the dropped communicator's subscriber to vanish",
        || {
            let result = futures::executor::block_on(observer.rpc_send::<_, i64>("scoped", &1));
            last = result.err().map(|e| e.kind().clone());
            matches!(last, Some(ErrorKind::Unroutable(_)))
        },
    )
    .await;
    if let Backend::Mem = backend {
        let result = Communicator::scoped(settings.uri(), |c| async move { Ok(c) })
            .await
            .unwrap();
        assert!(result.is_closed());
    }
    observer.close().await.unwrap();
}

// ---- RPC -----------------------------------------------------------------------------

async fn rpc_send_receive(backend: Backend) {
    let settings = settings(backend);
    let server = connect(&settings).await;
    let client = connect(&settings).await;
    server
        .add_rpc_subscriber(Some("fib"), Fib.start())
        .await
        .unwrap();
    let answer: u64 = client.rpc_send("fib", &30i64).await.unwrap().await.unwrap();
    assert_eq!(answer, 832_040);
    server.close().await.unwrap();
    client.close().await.unwrap();
}

async fn rpc_generated_identifier_is_returned(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let id = comm
        .add_rpc_subscriber(None, |r: Rpc<String>| async move { Ok(r.body + "!") })
        .await
        .unwrap();
    assert!(!id.is_empty());
    let answer: String = comm.rpc_send(&id, "hi").await.unwrap().await.unwrap();
    assert_eq!(answer, "hi!");
    comm.close().await.unwrap();
}

async fn rpc_add_remove_readd_subscriber(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    comm.add_rpc_subscriber(Some("svc"), |r: Rpc<i64>| async move { Ok(r.body + 1) })
        .await
        .unwrap();
    let one: i64 = comm.rpc_send("svc", &0).await.unwrap().await.unwrap();
    assert_eq!(one, 1);
    comm.remove_rpc_subscriber("svc").await.unwrap();
    assert!(matches!(
        kind(comm.rpc_send::<_, i64>("svc", &0).await),
        ErrorKind::Unroutable(_)
    ));
    comm.add_rpc_subscriber(Some("svc"), |r: Rpc<i64>| async move { Ok(r.body + 2) })
        .await
        .unwrap();
    let two: i64 = comm.rpc_send("svc", &0).await.unwrap().await.unwrap();
    assert_eq!(two, 2);
    comm.close().await.unwrap();
}

/// An identifier added again while its removal is under way is either refused (the old
/// subscription is not gone yet) or served — never bound but deaf to its calls.
async fn an_identifier_re_added_during_its_removal_is_never_deaf(backend: Backend) {
    let comm = connect(&settings(backend).with_rpc_timeout(Some(SOON))).await;
    let served = |answer: i64| move |_: Rpc<i64>| async move { Ok::<_, HandlerError>(answer) };
    let mut refused = 0;
    for round in 0..20i64 {
        comm.add_rpc_subscriber(Some("again"), served(round))
            .await
            .unwrap();
        let (removed, added) = futures::join!(
            comm.remove_rpc_subscriber("again"),
            comm.add_rpc_subscriber(Some("again"), served(round + 100)),
        );
        removed.unwrap();
        match added {
            Ok(_) => {
                let answer: i64 = comm.rpc_send("again", &0).await.unwrap().await.unwrap();
                assert_eq!(answer, round + 100, "round {round}");
                comm.remove_rpc_subscriber("again").await.unwrap();
            }
            Err(error) => {
                assert_eq!(
                    *error.kind(),
                    ErrorKind::DuplicateSubscriber("again".into())
                );
                refused += 1;
            }
        }
    }
    println!("re-added during removal: refused {refused} of 20 times, served the others");
    comm.close().await.unwrap();
}

/// An identifier is refused when this communicator serves it already, and — with
/// exclusive RPC identifiers — when another one does.
async fn rpc_duplicate_identifier_is_an_error(backend: Backend) {
    let settings = settings(backend).with_exclusive_rpc_identifiers(true);
    let comm = connect(&settings).await;
    let other = connect(&settings).await;
    comm.add_rpc_subscriber(Some("one"), Fib.start())
        .await
        .unwrap();
    assert_eq!(
        kind(comm.add_rpc_subscriber(Some("one"), Fib.start()).await),
        ErrorKind::DuplicateSubscriber("one".into())
    );
    assert_eq!(
        kind(other.add_rpc_subscriber(Some("one"), Fib.start()).await),
        ErrorKind::DuplicateSubscriber("one".into())
    );
    let answer: u64 = other.rpc_send("one", &10i64).await.unwrap().await.unwrap();
    assert_eq!(answer, 55, "the first subscriber still serves");
    comm.close().await.unwrap();
    other.close().await.unwrap();
}

/// Without exclusive identifiers (the default), an identifier served by this communicator
/// is refused again, and one served by another communicator is served by both, as kiwiPy
/// does: each call is answered, and each stops when it removes its subscriber.
async fn an_identifier_served_elsewhere_is_served_by_both_by_default(backend: Backend) {
    let settings = settings(backend);
    let (one, other) = (connect(&settings).await, connect(&settings).await);
    for (comm, answer) in [(&one, 1i64), (&other, 2)] {
        comm.add_rpc_subscriber(Some("both"), move |_: Rpc<i64>| async move {
            Ok::<_, HandlerError>(answer)
        })
        .await
        .unwrap();
    }
    assert_eq!(
        kind(one.add_rpc_subscriber(Some("both"), Fib.start()).await),
        ErrorKind::DuplicateSubscriber("both".into())
    );
    let mut answers = std::collections::HashSet::new();
    for _ in 0..10 {
        let answer: i64 = one.rpc_send("both", &0i64).await.unwrap().await.unwrap();
        answers.insert(answer);
    }
    assert!(answers.is_subset(&[1, 2].into()), "{answers:?}");
    one.remove_rpc_subscriber("both").await.unwrap();
    let answer: i64 = one.rpc_send("both", &0i64).await.unwrap().await.unwrap();
    assert_eq!(answer, 2, "the other communicator still serves");
    other.remove_rpc_subscriber("both").await.unwrap();
    assert!(matches!(
        kind(one.rpc_send::<_, i64>("both", &0i64).await),
        ErrorKind::Unroutable(_)
    ));
    one.close().await.unwrap();
    other.close().await.unwrap();
}

async fn rpc_handler_error_is_a_remote_error(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    comm.add_rpc_subscriber(Some("fib"), Fib.start())
        .await
        .unwrap();
    let error = kind(comm.rpc_send::<_, u64>("fib", &-1i64).await.unwrap().await);
    assert_eq!(
        error,
        ErrorKind::Remote("fib of a negative number: -1".into())
    );
    comm.close().await.unwrap();
}

async fn rpc_to_nobody_is_unroutable(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    assert!(matches!(
        kind(comm.rpc_send::<_, i64>("nobody", &1).await),
        ErrorKind::Unroutable(_)
    ));
    assert_eq!(
        comm.pending_replies(),
        0,
        "a failed send leaves nothing waiting"
    );
    comm.close().await.unwrap();
}

async fn rpc_with_a_body_of_the_wrong_type_is_a_remote_error(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    comm.add_rpc_subscriber(Some("fib"), Fib.start())
        .await
        .unwrap();
    let error = kind(
        comm.rpc_send::<_, u64>("fib", "thirty")
            .await
            .unwrap()
            .await,
    );
    assert!(
        matches!(&error, ErrorKind::Remote(text) if text.contains("decode")),
        "{error:?}"
    );
    let answer: u64 = comm.rpc_send("fib", &5i64).await.unwrap().await.unwrap();
    assert_eq!(answer, 5, "the subscriber survives bad input");
    comm.close().await.unwrap();
}

async fn removing_unknown_subscribers_is_an_error(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    assert_eq!(
        kind(comm.remove_rpc_subscriber("ghost").await),
        ErrorKind::UnknownSubscriber("ghost".into())
    );
    assert_eq!(
        kind(comm.remove_task_subscriber("ghost").await),
        ErrorKind::UnknownSubscriber("ghost".into())
    );
    assert_eq!(
        kind(comm.remove_broadcast_subscriber("ghost").await),
        ErrorKind::UnknownSubscriber("ghost".into())
    );
    comm.close().await.unwrap();
}

// ---- tasks ---------------------------------------------------------------------------

async fn task_send_and_result(backend: Backend) {
    let settings = settings(backend);
    let worker = connect(&settings).await;
    let client = connect(&settings).await;
    let seen = seen();
    worker
        .add_task_subscriber(
            Multiplier {
                factor: 3,
                seen: seen.clone(),
            }
            .start(),
        )
        .await
        .unwrap();
    let result: i64 = client.task_send(&14i64).await.unwrap().await.unwrap();
    assert_eq!(result, 42);
    assert_eq!(*seen.lock().unwrap(), vec![14]);
    worker.close().await.unwrap();
    client.close().await.unwrap();
}

/// A worker that answers later: the handler returns a future completed by someone else.
struct Deferred {
    waiting: Seen<tokio::sync::oneshot::Sender<i64>>,
}

impl Actor for Deferred {
    type Context = Context<Self>;
}

impl Handler<Task<i64>> for Deferred {
    type Result = ResponseFuture<Result<i64, HandlerError>>;

    fn handle(&mut self, _: Task<i64>, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.lock().unwrap().push(tx);
        Box::pin(async move { rx.await.map_err(HandlerError::from) })
    }
}

async fn deferred_task_result(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let waiting = seen();
    comm.add_task_subscriber(
        Deferred {
            waiting: waiting.clone(),
        }
        .start(),
    )
    .await
    .unwrap();
    let result = comm.task_send::<_, i64>(&0i64).await.unwrap();
    eventually(SOON, "the worker to hold the task", || count(&waiting) == 1).await;
    let answer = waiting.lock().unwrap().pop().unwrap();
    answer.send(99).unwrap();
    assert_eq!(result.await.unwrap(), 99);
    comm.close().await.unwrap();
}

async fn task_handler_error_is_a_remote_error(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let id = comm
        .add_task_subscriber(|_: Task<i64>| async {
            Err::<i64, _>(HandlerError::failed("out of coffee"))
        })
        .await
        .unwrap();
    let error = kind(comm.task_send::<_, i64>(&1i64).await.unwrap().await);
    assert_eq!(error, ErrorKind::Remote("out of coffee".into()));
    // The failed task was acknowledged: it does not come back.
    comm.remove_task_subscriber(&id).await.unwrap();
    assert_eq!(
        kind(comm.next_task::<i64>(Duration::from_millis(200)).await),
        ErrorKind::QueueEmpty
    );
    comm.close().await.unwrap();
}

async fn no_reply_task_is_done_and_nothing_comes_back(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let seen = seen();
    comm.add_task_subscriber(
        Multiplier {
            factor: 1,
            seen: seen.clone(),
        }
        .start(),
    )
    .await
    .unwrap();
    comm.task_send_no_reply(&7i64).await.unwrap();
    eventually(SOON, "the no-reply task to run", || count(&seen) == 1).await;
    assert_eq!(comm.pending_replies(), 0);
    comm.close().await.unwrap();
}

async fn add_and_remove_task_subscriber(backend: Backend) {
    let settings = settings(backend);
    let comm = connect(&settings).await;
    let seen = seen();
    let id = comm
        .add_task_subscriber(
            Multiplier {
                factor: 1,
                seen: seen.clone(),
            }
            .start(),
        )
        .await
        .unwrap();
    let _: i64 = comm.task_send(&1i64).await.unwrap().await.unwrap();
    comm.remove_task_subscriber(&id).await.unwrap();
    assert_eq!(
        kind(comm.remove_task_subscriber(&id).await),
        ErrorKind::UnknownSubscriber(id.clone())
    );
    let later = comm.task_send::<_, i64>(&2i64).await.unwrap();
    let task = comm.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(
        *task.body(),
        2,
        "with no subscriber the task waits in the queue"
    );
    task.process(Ok(20i64)).await.unwrap();
    assert_eq!(later.await.unwrap(), 20);
    assert_eq!(count(&seen), 1);
    comm.close().await.unwrap();
}

async fn tasks_wait_in_the_queue_until_a_worker_comes(backend: Backend) {
    let settings = settings(backend);
    let client = connect(&settings).await;
    let results: Vec<_> = futures::future::try_join_all((0..5i64).map(|i| {
        let client = client.clone();
        async move { client.task_send::<_, i64>(&i).await }
    }))
    .await
    .unwrap();
    let worker = connect(&settings).await;
    worker
        .add_task_subscriber(
            Multiplier {
                factor: 10,
                seen: seen(),
            }
            .start(),
        )
        .await
        .unwrap();
    let answers = futures::future::try_join_all(results).await.unwrap();
    assert_eq!(answers, vec![0, 10, 20, 30, 40]);
    worker.close().await.unwrap();
    client.close().await.unwrap();
}

async fn each_task_goes_to_exactly_one_of_several_workers(backend: Backend) {
    let settings = settings(backend);
    let client = connect(&settings).await;
    let (a, b) = (seen(), seen());
    let worker_a = connect(&settings).await;
    let worker_b = connect(&settings).await;
    worker_a
        .add_task_subscriber(
            Multiplier {
                factor: 1,
                seen: a.clone(),
            }
            .start(),
        )
        .await
        .unwrap();
    worker_b
        .add_task_subscriber(
            Multiplier {
                factor: 1,
                seen: b.clone(),
            }
            .start(),
        )
        .await
        .unwrap();
    let sends = (0..40i64).map(|i| {
        let client = client.clone();
        async move { client.task_send::<_, i64>(&i).await.unwrap().await }
    });
    let results = futures::future::try_join_all(sends).await.unwrap();
    assert_eq!(results, (0..40).collect::<Vec<_>>());
    let mut all: Vec<i64> = a
        .lock()
        .unwrap()
        .iter()
        .chain(b.lock().unwrap().iter())
        .copied()
        .collect();
    all.sort();
    assert_eq!(
        all,
        (0..40).collect::<Vec<_>>(),
        "each task ran exactly once"
    );
    for comm in [client, worker_a, worker_b] {
        comm.close().await.unwrap();
    }
}

/// Several subscribers of one queue take turns: each task is offered to the next one first,
/// so actor subscribers (one message at a time each) work side by side.
async fn subscribers_of_one_queue_take_turns(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let counts: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::default()).collect();
    for count in &counts {
        let count = count.clone();
        comm.add_task_subscriber(move |t: Task<i64>| {
            count.fetch_add(1, Ordering::SeqCst);
            async move { Ok(t.body) }
        })
        .await
        .unwrap();
    }
    for n in 0..10i64 {
        assert_eq!(
            comm.task_send::<_, i64>(&n).await.unwrap().await.unwrap(),
            n
        );
    }
    let handled: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(handled, [5, 5]);
    comm.close().await.unwrap();
}

/// A queue's counts without taking a task, and a purge, agree on both backends; an
/// unknown queue is refused, not counted as empty.
async fn queue_stats_and_purge_without_taking_a_task(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let queue = comm.task_queue(common::unique("stats"));
    for n in 0..3u32 {
        queue.task_send_no_reply(&n).await.unwrap();
    }
    let stats = queue.stats().await.unwrap();
    assert_eq!((stats.ready, stats.consumers), (3, 0));
    assert_eq!(queue.purge().await.unwrap(), 3);
    assert_eq!(queue.stats().await.unwrap().ready, 0);
    let missing = comm.task_queue(common::unique("never-declared"));
    for error in [
        missing.stats().await.unwrap_err(),
        missing.purge().await.unwrap_err(),
    ] {
        assert!(matches!(error.kind(), ErrorKind::Refused(_)), "{error}");
        assert!(error.to_string().contains("no queue named"), "{error}");
    }
    comm.close().await.unwrap();
}

/// Sending back the dead letters of a queue that has no dead-letter queue is refused at
/// once, saying so, on both backends (it used to retry for the send timeout on RabbitMQ,
/// and to report 0 moved on mem://).
async fn requeueing_dead_letters_of_a_queue_without_any_is_refused_at_once(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let queue = comm.task_queue(common::unique("no-dead-letters"));
    queue.task_send_no_reply(&1u32).await.unwrap();
    let error = tokio::time::timeout(SOON, queue.requeue_dead_letters())
        .await
        .expect("answered at once")
        .unwrap_err();
    assert!(matches!(error.kind(), ErrorKind::Refused(_)), "{error}");
    assert!(
        error.to_string().contains("has no dead-letter queue"),
        "{error}"
    );
    assert_eq!(
        queue.stats().await.unwrap().ready,
        1,
        "the queue is untouched"
    );
    comm.close().await.unwrap();
}

async fn a_rejected_task_goes_to_the_next_subscriber(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let rejections = Arc::new(AtomicUsize::new(0));
    let r = rejections.clone();
    comm.add_task_subscriber(move |_: Task<i64>| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Err::<i64, _>(HandlerError::reject()) }
    })
    .await
    .unwrap();
    comm.add_task_subscriber(|t: Task<i64>| async move { Ok(t.body + 100) })
        .await
        .unwrap();
    let answer: i64 = comm.task_send(&1i64).await.unwrap().await.unwrap();
    assert_eq!(answer, 101);
    assert!(rejections.load(Ordering::SeqCst) >= 1);
    comm.close().await.unwrap();
}

async fn a_task_every_subscriber_rejects_goes_back_to_the_queue(backend: Backend) {
    let settings = settings(backend);
    let comm = connect(&settings).await;
    let rejections = Arc::new(AtomicUsize::new(0));
    let r = rejections.clone();
    let id = comm
        .add_task_subscriber(move |_: Task<i64>| {
            r.fetch_add(1, Ordering::SeqCst);
            async { Err::<i64, _>(HandlerError::reject()) }
        })
        .await
        .unwrap();
    let result = comm.task_send::<_, i64>(&5i64).await.unwrap();
    eventually(SOON, "a rejection", || {
        rejections.load(Ordering::SeqCst) >= 1
    })
    .await;
    comm.remove_task_subscriber(&id).await.unwrap();
    let other = connect(&settings).await;
    let task = other.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(*task.body(), 5);
    task.process(Ok(50i64)).await.unwrap();
    assert_eq!(result.await.unwrap(), 50);
    comm.close().await.unwrap();
    other.close().await.unwrap();
}

async fn a_task_is_acked_only_after_its_handler_finished(backend: Backend) {
    // The handler never finishes: close gives up on it quickly.
    let settings = settings(backend).with_shutdown_grace(Duration::from_millis(50));
    let worker = connect(&settings).await;
    let waiting = seen();
    worker
        .add_task_subscriber(
            Deferred {
                waiting: waiting.clone(),
            }
            .start(),
        )
        .await
        .unwrap();
    let result = worker.task_send::<_, i64>(&1i64).await.unwrap();
    eventually(SOON, "the worker to hold the task", || count(&waiting) == 1).await;
    // While the handler runs, the task is neither in the queue nor gone: a worker that dies
    // now hands it back.
    let other = connect(&settings).await;
    assert_eq!(
        kind(other.next_task::<i64>(Duration::from_millis(100)).await),
        ErrorKind::QueueEmpty
    );
    worker.close().await.unwrap();
    assert_eq!(kind(result.await), ErrorKind::Closed);
    let task = other.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(*task.body(), 1);
    assert!(
        task.redelivered(),
        "a task handed back is marked redelivered"
    );
    other.close().await.unwrap();
}

async fn prefetch_limits_how_many_tasks_a_worker_holds(backend: Backend) {
    let settings = settings(backend);
    let worker = connect(&settings).await;
    let waiting = seen();
    worker
        .default_task_queue()
        .with_prefetch(2)
        .add_task_subscriber(
            Deferred {
                waiting: waiting.clone(),
            }
            .start(),
        )
        .await
        .unwrap();
    for i in 0..3i64 {
        worker.task_send_no_reply(&i).await.unwrap();
    }
    eventually(SOON, "the worker to hold two tasks", || {
        count(&waiting) == 2
    })
    .await;
    let other = connect(&settings).await;
    let third = other.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(*third.body(), 2, "the third task stayed in the queue");
    assert_eq!(count(&waiting), 2);
    third.process(Ok(0i64)).await.unwrap();
    for tx in waiting.lock().unwrap().drain(..) {
        tx.send(0).unwrap();
    }
    worker.close().await.unwrap();
    other.close().await.unwrap();
}

async fn a_task_of_the_wrong_type_gets_an_error_reply_and_is_not_redelivered(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    comm.add_task_subscriber(
        Multiplier {
            factor: 1,
            seen: seen(),
        }
        .start(),
    )
    .await
    .unwrap();
    let error = kind(
        comm.task_send::<_, i64>("not a number")
            .await
            .unwrap()
            .await,
    );
    assert!(
        matches!(&error, ErrorKind::Remote(text) if text.contains("decode")),
        "{error:?}"
    );
    let fine: i64 = comm.task_send(&4i64).await.unwrap().await.unwrap();
    assert_eq!(fine, 4);
    comm.close().await.unwrap();
}

async fn an_rpc_that_is_never_answered_times_out(backend: Backend) {
    let settings = settings(backend).with_rpc_timeout(Some(Duration::from_millis(200)));
    let comm = connect(&settings).await;
    comm.add_rpc_subscriber(Some("silent"), |_: Rpc<i64>| {
        futures::future::pending::<Result<i64, HandlerError>>()
    })
    .await
    .unwrap();
    let reply = comm.rpc_send::<_, i64>("silent", &1i64).await.unwrap();
    let error = tokio::time::timeout(SOON, reply)
        .await
        .expect("bounded")
        .unwrap_err();
    assert_eq!(*error.kind(), ErrorKind::Timeout, "{error}");
    assert_eq!(comm.pending_replies(), 0, "forgotten once timed out");
    comm.close().await.unwrap();
}

async fn a_task_result_can_be_awaited_with_a_timeout(backend: Backend) {
    let settings = settings(backend);
    let comm = connect(&settings).await;
    let reply = comm.task_send::<_, i64>(&8i64).await.unwrap();
    let error = tokio::time::timeout(SOON, reply.with_timeout(Some(Duration::from_millis(200))))
        .await
        .expect("bounded")
        .unwrap_err();
    assert_eq!(*error.kind(), ErrorKind::Timeout, "{error}");
    let task = comm.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(*task.body(), 8, "the task itself still waits for a worker");
    task.process(Ok(0i64)).await.unwrap();
    comm.close().await.unwrap();
}

// ---- poison tasks ----------------------------------------------------------------------

async fn a_task_returned_past_the_delivery_limit_is_dead_lettered(backend: Backend) {
    let settings = settings(backend).with_delivery_limit(2);
    let comm = connect(&settings).await;
    comm.task_send_no_reply(&13i64).await.unwrap();
    // Delivered once, then returned twice: as often as the limit allows.
    for delivery in 0..3 {
        let task = comm.next_task::<i64>(SOON).await.unwrap();
        assert_eq!(task.redelivered(), delivery > 0);
        task.requeue();
    }
    assert_eq!(
        kind(comm.next_task::<i64>(Duration::from_millis(300)).await),
        ErrorKind::QueueEmpty,
        "given up on"
    );
    let dead = comm.default_task_queue().dead_letters();
    let task = dead.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(*task.body(), 13, "kept in the dead-letter queue");
    task.process(Ok(0i64)).await.unwrap();
    comm.close().await.unwrap();
}

async fn a_task_whose_workers_keep_dying_is_dead_lettered(backend: Backend) {
    let settings = settings(backend).with_delivery_limit(1);
    let sender = connect(&settings).await;
    sender.task_send_no_reply(&21i64).await.unwrap();
    // Two workers take it and go away without an outcome, as crashing ones would.
    for _ in 0..2 {
        let worker = connect(&settings).await;
        let held = worker.next_task::<i64>(SOON).await.unwrap();
        assert_eq!(*held.body(), 21);
        worker.close().await.unwrap();
        drop(held);
    }
    assert_eq!(
        kind(sender.next_task::<i64>(Duration::from_millis(300)).await),
        ErrorKind::QueueEmpty,
        "not handed to a third worker"
    );
    let dead = sender.default_task_queue().dead_letters();
    let task = dead.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(*task.body(), 21);
    task.process(Ok(0i64)).await.unwrap();
    sender.close().await.unwrap();
}

async fn a_task_every_subscriber_rejects_ends_in_the_dead_letter_queue(backend: Backend) {
    let settings = settings(backend).with_delivery_limit(3);
    let comm = connect(&settings).await;
    let offered = Arc::new(AtomicUsize::new(0));
    let counter = offered.clone();
    comm.add_task_subscriber(move |_: Task<i64>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<i64, _>(HandlerError::Rejected) }
    })
    .await
    .unwrap();
    let result = comm.task_send::<_, i64>(&7i64).await.unwrap();
    // Given up on its last delivery, the sender is told why.
    assert_eq!(kind(result.await), ErrorKind::Rejected);
    let dead = comm.default_task_queue().dead_letters();
    let task = dead.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(*task.body(), 7);
    assert_eq!(
        offered.load(Ordering::SeqCst),
        4,
        "offered once, then after each return"
    );
    task.process(Ok(0i64)).await.unwrap();
    comm.close().await.unwrap();
}

/// Without a delivery limit, a task the one worker's every subscriber rejects goes back to
/// the queue after a pause — not straight back to the same worker in a hot loop — until a
/// worker that takes it comes.
async fn a_task_every_subscriber_rejects_waits_for_a_worker_without_spinning(backend: Backend) {
    let settings = settings(backend);
    let rejecting = connect(&settings).await;
    let offered = Arc::new(AtomicUsize::new(0));
    let counter = offered.clone();
    rejecting
        .add_task_subscriber(move |_: Task<i64>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Err::<i64, _>(HandlerError::Rejected) }
        })
        .await
        .unwrap();
    let result = rejecting.task_send::<_, i64>(&5i64).await.unwrap();
    eventually(SOON, "the first rejection", || {
        offered.load(Ordering::SeqCst) > 0
    })
    .await;
    let taking = connect(&settings).await;
    taking
        .add_task_subscriber(|task: Task<i64>| async move { Ok::<_, HandlerError>(task.body * 2) })
        .await
        .unwrap();
    assert_eq!(result.await.unwrap(), 10);
    let offers = offered.load(Ordering::SeqCst);
    assert!(
        offers <= 3,
        "the rejecting worker was offered the task {offers} times"
    );
    taking.close().await.unwrap();
    rejecting.close().await.unwrap();
}

async fn an_undecodable_task_goes_to_the_dead_letter_queue(backend: Backend) {
    let settings = settings(backend).with_delivery_limit(5);
    let comm = connect(&settings).await;
    comm.add_task_subscriber(
        Multiplier {
            factor: 1,
            seen: seen(),
        }
        .start(),
    )
    .await
    .unwrap();
    let error = kind(comm.task_send::<_, i64>("seven").await.unwrap().await);
    assert!(
        matches!(&error, ErrorKind::Remote(text) if text.contains("decode")),
        "{error:?}"
    );
    let dead = comm.default_task_queue().dead_letters();
    let task = dead.next_task::<String>(SOON).await.unwrap();
    assert_eq!(
        task.body(),
        "seven",
        "rejected once, kept for a person to look at"
    );
    task.process(Ok(0i64)).await.unwrap();
    comm.close().await.unwrap();
}

// ---- named queues and pull mode -------------------------------------------------------

async fn named_task_queue(backend: Backend) {
    let settings = settings(backend);
    let comm = connect(&settings).await;
    let queue = comm.task_queue(unique("named"));
    let seen = seen();
    queue
        .add_task_subscriber(
            Multiplier {
                factor: 2,
                seen: seen.clone(),
            }
            .start(),
        )
        .await
        .unwrap();
    let answer: i64 = queue.task_send(&21i64).await.unwrap().await.unwrap();
    assert_eq!(answer, 42);
    assert_eq!(
        kind(comm.next_task::<i64>(Duration::from_millis(50)).await),
        ErrorKind::QueueEmpty
    );
    comm.close().await.unwrap();
}

async fn next_task_takes_one_task(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let queue = comm.task_queue(unique("pull"));
    let result = queue.task_send::<_, String>("job").await.unwrap();
    let task = queue.next_task::<String>(SOON).await.unwrap();
    assert_eq!(task.body(), "job");
    assert!(!task.no_reply());
    task.process(Ok("done".to_string())).await.unwrap();
    assert_eq!(result.await.unwrap(), "done");
    comm.close().await.unwrap();
}

async fn iterating_a_queue_yields_its_tasks_until_empty(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let queue = comm.task_queue(unique("iter"));
    let mut results = Vec::new();
    for i in 0..5i64 {
        results.push(queue.task_send::<_, i64>(&i).await.unwrap());
    }
    let mut bodies = Vec::new();
    let mut tasks = Box::pin(queue.iter_tasks::<i64>());
    while let Some(task) = tasks.next().await {
        let task = task.unwrap();
        bodies.push(*task.body());
        let body = *task.body();
        task.process(Ok(body * body)).await.unwrap();
    }
    assert_eq!(bodies, vec![0, 1, 2, 3, 4]);
    let squares = futures::future::try_join_all(results).await.unwrap();
    assert_eq!(squares, vec![0, 1, 4, 9, 16]);
    comm.close().await.unwrap();
}

async fn unprocessed_pulled_tasks_return_to_the_queue(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let queue = comm.task_queue(unique("return"));
    for i in 0..3i64 {
        queue.task_send_no_reply(&i).await.unwrap();
    }
    {
        let mut tasks = Box::pin(queue.iter_tasks::<i64>());
        let mut n = 0;
        while let Some(task) = tasks.next().await {
            task.unwrap(); // looked at, dropped undecided
            n += 1;
        }
        assert_eq!(n, 3, "one pass sees each task once");
    }
    let task = queue.next_task::<i64>(SOON).await.unwrap();
    assert!(task.redelivered());
    task.requeue();
    let mut left = 0;
    let mut tasks = Box::pin(queue.iter_tasks::<i64>());
    while let Some(task) = tasks.next().await {
        task.unwrap().process(Ok(())).await.unwrap();
        left += 1;
    }
    assert_eq!(left, 3, "every task came back");
    drop(tasks);
    assert_eq!(
        kind(queue.next_task::<i64>(Duration::from_millis(50)).await),
        ErrorKind::QueueEmpty
    );
    comm.close().await.unwrap();
}

async fn an_empty_queue_is_queue_empty(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let queue = comm.task_queue(unique("empty"));
    let started = std::time::Instant::now();
    assert_eq!(
        kind(queue.next_task::<i64>(Duration::from_millis(100)).await),
        ErrorKind::QueueEmpty
    );
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "it waited for the timeout"
    );
    comm.close().await.unwrap();
}

async fn an_error_while_processing_a_pulled_task_reaches_the_sender(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let queue = comm.task_queue(unique("pull-error"));
    let result = queue.task_send::<_, i64>(&1i64).await.unwrap();
    let task = queue.next_task::<i64>(SOON).await.unwrap();
    task.process(Err::<i64, _>(HandlerError::failed("disk full")))
        .await
        .unwrap();
    assert_eq!(kind(result.await), ErrorKind::Remote("disk full".into()));
    comm.close().await.unwrap();
}

// ---- broadcasts ----------------------------------------------------------------------

async fn a_broadcast_reaches_every_subscriber_with_all_four_fields(backend: Backend) {
    let settings = settings(backend);
    let sender = connect(&settings).await;
    let receiver = connect(&settings).await;
    let (a, b) = (seen(), seen());
    receiver
        .add_broadcast_subscriber(BroadcastFilter::new(), Listener { seen: a.clone() }.start())
        .await
        .unwrap();
    receiver
        .add_broadcast_subscriber(BroadcastFilter::new(), Listener { seen: b.clone() }.start())
        .await
        .unwrap();
    let options = BroadcastOptions::subject("news")
        .with_sender("tester")
        .with_correlation_id("c-1");
    sender.broadcast_send("hello", options).await.unwrap();
    eventually(SOON, "both subscribers to get it", || {
        count(&a) == 1 && count(&b) == 1
    })
    .await;
    for seen in [a, b] {
        let got = seen.lock().unwrap()[0].clone();
        assert_eq!(
            got,
            Broadcast {
                body: "hello".into(),
                sender: Some("tester".into()),
                subject: Some("news".into()),
                correlation_id: Some("c-1".into()),
            }
        );
    }
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

/// AiiDA announces a process's state change with its pk, an integer, as the sender: it
/// reaches a filter on the text "47", and arrives as the integer it was. Floats, bools and
/// integer correlation ids likewise.
async fn broadcast_headers_of_any_plain_value_arrive_and_filter_as_text(backend: Backend) {
    use kiwimq::Value;
    let settings = settings(backend);
    let sender = connect(&settings).await;
    let receiver = connect(&settings).await;
    let (pk47, all) = (seen(), seen());
    receiver
        .add_broadcast_subscriber(
            BroadcastFilter::new()
                .sender("47")
                .subject("state_changed.*"),
            Listener { seen: pk47.clone() }.start(),
        )
        .await
        .unwrap();
    receiver
        .add_broadcast_subscriber(
            BroadcastFilter::new(),
            Listener { seen: all.clone() }.start(),
        )
        .await
        .unwrap();
    let cases: [(&str, Value, Value); 4] = [
        ("pk", Value::from(47), Value::from(9)),
        ("other pk", Value::from(48), Value::from("c")),
        ("float", Value::F64(1.5), Value::Nil),
        ("bool", Value::from(true), Value::from(false)),
    ];
    for (body, who, correlation) in cases.clone() {
        let mut options =
            BroadcastOptions::subject("state_changed.running.waiting").with_sender(who);
        options.correlation_id = Some(correlation).filter(|c| !c.is_nil());
        sender.broadcast_send(body, options).await.unwrap();
    }
    eventually(SOON, "every broadcast to arrive", || {
        count(&all) == cases.len()
    })
    .await;
    let pk47 = pk47.lock().unwrap().clone();
    assert_eq!(pk47.len(), 1, "{pk47:?}");
    assert_eq!(pk47[0].sender, Some(Value::from(47)));
    assert_eq!(pk47[0].sender_text().as_deref(), Some("47"));
    assert_eq!(pk47[0].correlation_id, Some(Value::from(9)));
    let all = all.lock().unwrap().clone();
    let text: Vec<_> = all
        .iter()
        .map(|b| (b.body.as_str(), b.sender_text().map(|s| s.into_owned())))
        .collect();
    for expected in [("float", "1.5"), ("bool", "True"), ("other pk", "48")] {
        assert!(
            text.contains(&(expected.0, Some(expected.1.to_owned()))),
            "{expected:?} in {text:?}"
        );
    }
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
}

/// Sends broadcasts with these (subject, sender) pairs and returns the bodies `filter` let
/// through, in order. A final unfiltered marker tells when all have arrived.
async fn filtered(backend: Backend, filter: BroadcastFilter) -> Vec<String> {
    let comm = connect(&settings(backend)).await;
    let (picked, all) = (seen(), seen());
    comm.add_broadcast_subscriber(
        filter,
        Listener {
            seen: picked.clone(),
        }
        .start(),
    )
    .await
    .unwrap();
    comm.add_broadcast_subscriber(
        BroadcastFilter::new(),
        Listener { seen: all.clone() }.start(),
    )
    .await
    .unwrap();
    let cases = [
        ("a", Some("job.done"), Some("w1")),
        ("b", Some("job.failed"), Some("w2")),
        ("c", Some("jobXdone"), Some("w1")),
        ("d", None, Some("w2")),
        ("e", Some("other"), None),
    ];
    for (body, subject, sender) in cases {
        let options = BroadcastOptions {
            subject: subject.map(Into::into),
            sender: sender.map(Into::into),
            correlation_id: None,
        };
        comm.broadcast_send(body, options).await.unwrap();
    }
    eventually(SOON, "every broadcast to arrive", || {
        count(&all) == cases.len()
    })
    .await;
    comm.close().await.unwrap();
    let picked = picked.lock().unwrap();
    picked.iter().map(|b| b.body.clone()).collect()
}

async fn broadcast_filter_by_subject(backend: Backend) {
    assert_eq!(
        filtered(backend, BroadcastFilter::new().subject("job.*")).await,
        vec!["a", "b", "d"]
    );
}

async fn broadcast_filter_by_sender(backend: Backend) {
    assert_eq!(
        filtered(backend, BroadcastFilter::new().sender("w1")).await,
        vec!["a", "c", "e"]
    );
}

async fn broadcast_filter_by_subject_and_sender(backend: Backend) {
    let filter = BroadcastFilter::new().subject("job.*").sender("w2");
    assert_eq!(filtered(backend, filter).await, vec!["b", "d"]);
}

async fn broadcast_filter_by_regex(backend: Backend) {
    let filter = BroadcastFilter::new()
        .subject_regex("^job.(done|failed)$")
        .unwrap();
    assert_eq!(filtered(backend, filter).await, vec!["a", "b", "c", "d"]);
}

async fn a_broadcast_with_nobody_listening_is_fine(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    comm.broadcast_send(&1, BroadcastOptions::default())
        .await
        .unwrap();
    comm.close().await.unwrap();
}

async fn a_removed_broadcast_subscriber_hears_nothing_more(backend: Backend) {
    let comm = connect(&settings(backend)).await;
    let (gone, stays) = (seen(), seen());
    let id = comm
        .add_broadcast_subscriber(
            BroadcastFilter::new(),
            Listener { seen: gone.clone() }.start(),
        )
        .await
        .unwrap();
    comm.add_broadcast_subscriber(
        BroadcastFilter::new(),
        Listener {
            seen: stays.clone(),
        }
        .start(),
    )
    .await
    .unwrap();
    comm.remove_broadcast_subscriber(&id).await.unwrap();
    comm.broadcast_send("x", BroadcastOptions::default())
        .await
        .unwrap();
    eventually(SOON, "the remaining subscriber to hear it", || {
        count(&stays) == 1
    })
    .await;
    assert_eq!(count(&gone), 0);
    comm.close().await.unwrap();
}

// ---- the suite, per backend -----------------------------------------------------------

async fn close_lets_a_running_task_finish_and_takes_no_more(backend: Backend) {
    let settings = settings(backend).with_shutdown_grace(SOON);
    let worker = connect(&settings).await;
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    worker
        .add_task_subscriber(move |task: Task<i64>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                // Work that takes a while.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(task.body + 1)
            }
        })
        .await
        .unwrap();
    let client = connect(&settings).await;
    let result = client.task_send::<_, i64>(&1i64).await.unwrap();
    eventually(SOON, "the task to start", || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    worker.close().await.unwrap();
    assert_eq!(
        tokio::time::timeout(SOON, result).await.unwrap().unwrap(),
        2,
        "the running task finished before close returned"
    );
    client.task_send_no_reply(&5i64).await.unwrap();
    let next = client.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(*next.body(), 5, "the closed worker took no new task");
    assert_eq!(started.load(Ordering::SeqCst), 1);
    next.process(Ok(0i64)).await.unwrap();
    client.close().await.unwrap();
}

async fn close_requeues_a_task_that_outlives_the_grace(backend: Backend) {
    let settings = settings(backend).with_shutdown_grace(Duration::from_millis(100));
    let stuck = connect(&settings).await;
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    stuck
        .add_task_subscriber(move |_: Task<i64>| {
            counter.fetch_add(1, Ordering::SeqCst);
            futures::future::pending::<Result<i64, HandlerError>>()
        })
        .await
        .unwrap();
    let client = connect(&settings).await;
    let result = client.task_send::<_, i64>(&4i64).await.unwrap();
    eventually(SOON, "the task to start", || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::timeout(SOON, stuck.close())
        .await
        .expect("close is bounded by the grace")
        .unwrap();
    let next = client.next_task::<i64>(SOON).await.unwrap();
    assert_eq!(*next.body(), 4);
    assert!(
        next.redelivered(),
        "the unfinished task came back as a redelivery"
    );
    next.process(Ok(40i64)).await.unwrap();
    assert_eq!(
        tokio::time::timeout(SOON, result).await.unwrap().unwrap(),
        40
    );
    client.close().await.unwrap();
}

macro_rules! suite {
    ($backend:ident: $($name:ident),* $(,)?) => {
        $(
            #[actix_rt::test]
            async fn $name() {
                super::$name(common::Backend::$backend).await;
            }
        )*
    };
}

macro_rules! behaviours {
    ($($module:ident => $backend:ident),*) => {
        $(
            mod $module {
                use super::common;
                suite!($backend:
                    an_rpc_that_is_never_answered_times_out,
                    a_task_result_can_be_awaited_with_a_timeout,
                    a_task_returned_past_the_delivery_limit_is_dead_lettered,
                    a_task_whose_workers_keep_dying_is_dead_lettered,
                    a_task_every_subscriber_rejects_ends_in_the_dead_letter_queue,
                    a_task_every_subscriber_rejects_waits_for_a_worker_without_spinning,
                    an_undecodable_task_goes_to_the_dead_letter_queue,
                    close_lets_a_running_task_finish_and_takes_no_more,
                    close_requeues_a_task_that_outlives_the_grace,
                    close_makes_every_call_fail,
                    closing_fails_pending_results,
                    scoped_use_closes,
                    rpc_send_receive,
                    rpc_generated_identifier_is_returned,
                    rpc_add_remove_readd_subscriber,
                    rpc_duplicate_identifier_is_an_error,
                    an_identifier_served_elsewhere_is_served_by_both_by_default,
                    an_identifier_re_added_during_its_removal_is_never_deaf,
                    rpc_handler_error_is_a_remote_error,
                    rpc_to_nobody_is_unroutable,
                    rpc_with_a_body_of_the_wrong_type_is_a_remote_error,
                    removing_unknown_subscribers_is_an_error,
                    task_send_and_result,
                    deferred_task_result,
                    task_handler_error_is_a_remote_error,
                    no_reply_task_is_done_and_nothing_comes_back,
                    add_and_remove_task_subscriber,
                    tasks_wait_in_the_queue_until_a_worker_comes,
                    each_task_goes_to_exactly_one_of_several_workers,
                    subscribers_of_one_queue_take_turns,
                    queue_stats_and_purge_without_taking_a_task,
                    requeueing_dead_letters_of_a_queue_without_any_is_refused_at_once,
                    a_rejected_task_goes_to_the_next_subscriber,
                    a_task_every_subscriber_rejects_goes_back_to_the_queue,
                    a_task_is_acked_only_after_its_handler_finished,
                    prefetch_limits_how_many_tasks_a_worker_holds,
                    a_task_of_the_wrong_type_gets_an_error_reply_and_is_not_redelivered,
                    named_task_queue,
                    next_task_takes_one_task,
                    iterating_a_queue_yields_its_tasks_until_empty,
                    unprocessed_pulled_tasks_return_to_the_queue,
                    an_empty_queue_is_queue_empty,
                    an_error_while_processing_a_pulled_task_reaches_the_sender,
                    a_broadcast_reaches_every_subscriber_with_all_four_fields,
                    broadcast_filter_by_subject,
                    broadcast_headers_of_any_plain_value_arrive_and_filter_as_text,
                    broadcast_filter_by_sender,
                    broadcast_filter_by_subject_and_sender,
                    broadcast_filter_by_regex,
                    a_broadcast_with_nobody_listening_is_fine,
                    a_removed_broadcast_subscriber_hears_nothing_more,
                );
            }
        )*
    };
}

behaviours!(mem => Mem, amqp => Amqp);
