//! Traces across processes on RabbitMQ: the W3C `traceparent` rides in the AMQP headers
//! from sender to worker, and what a handler sends continues the same trace.

mod common;

use std::sync::{Arc, Mutex};

use kiwimq::trace::{self, TraceContext};
use kiwimq::{Rpc, Task};
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};

use common::{amqp_settings, amqp_url};

#[actix::test]
async fn one_trace_spans_sender_worker_and_what_the_worker_sends() {
    let settings = amqp_settings(&amqp_url());
    let client = settings.clone().connect().await.unwrap();
    let worker = settings.clone().connect().await.unwrap();
    let helper = settings.connect().await.unwrap();

    // The helper answers an RPC the worker makes while handling the task.
    let seen_by_helper: Arc<Mutex<Option<TraceContext>>> = Arc::default();
    let noted = seen_by_helper.clone();
    helper
        .add_rpc_subscriber(Some("helper"), move |r: Rpc<u32>| {
            *noted.lock().unwrap() = r.trace();
            async move { Ok(r.body + 1) }
        })
        .await
        .unwrap();
    let seen_by_worker: Arc<Mutex<Option<TraceContext>>> = Arc::default();
    let noted = seen_by_worker.clone();
    let caller = worker.clone();
    worker
        .add_task_subscriber(move |t: Task<u32>| {
            *noted.lock().unwrap() = t.trace();
            let caller = caller.clone();
            async move {
                let helped: u32 = caller
                    .rpc_send("helper", &t.body)
                    .await
                    .map_err(kiwimq::HandlerError::failed)?
                    .await
                    .map_err(kiwimq::HandlerError::failed)?;
                Ok(helped)
            }
        })
        .await
        .unwrap();

    let origin = TraceContext::new_trace();
    let result: u32 = trace::scope(origin, async {
        client.task_send(&41u32).await.unwrap().await.unwrap()
    })
    .await;
    assert_eq!(result, 42);
    let in_worker = seen_by_worker
        .lock()
        .unwrap()
        .expect("the task carried a trace");
    let in_helper = seen_by_helper
        .lock()
        .unwrap()
        .expect("the RPC carried a trace");
    assert_eq!(
        in_worker.trace_id(),
        origin.trace_id(),
        "the worker continues the sender's trace"
    );
    assert_eq!(
        in_helper.trace_id(),
        origin.trace_id(),
        "so does what the worker sends"
    );
    assert_ne!(in_worker.span_id(), origin.span_id());
    assert_ne!(in_helper.span_id(), in_worker.span_id());

    // Outside any trace, with nobody recording kiwimq's spans (this test installs no
    // subscriber), a send carries no header and the task no trace.
    let _: u32 = client.task_send(&1u32).await.unwrap().await.unwrap();
    assert_eq!(*seen_by_worker.lock().unwrap(), None);

    client.close().await.unwrap();
    worker.close().await.unwrap();
    helper.close().await.unwrap();
}

#[actix::test]
async fn the_traceparent_is_an_amqp_header_on_the_wire() {
    let settings = amqp_settings(&amqp_url());
    let comm = settings.connect().await.unwrap();
    let queue = comm.task_queue("traced");
    let origin = TraceContext::new_trace();
    trace::scope(origin, queue.task_send_no_reply(&7u32))
        .await
        .unwrap();

    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut message = None;
    for _ in 0..50 {
        message = channel
            .basic_get(queue.name().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if message.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let message = message.expect("the task is in the queue");
    let headers = message
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let header = match headers.inner().get("traceparent") {
        Some(AMQPValue::LongString(text)) => text.to_string(),
        other => panic!("no traceparent header: {other:?}"),
    };
    let carried = TraceContext::parse(&header).expect("a W3C traceparent");
    assert_eq!(carried.trace_id(), origin.trace_id());
    assert_ne!(carried.span_id(), origin.span_id(), "the send's own span");
    let _ = connection.close(200, "done".into()).await;
    comm.close().await.unwrap();
}

/// A task pulled with `next_task` carries its sender's trace: `trace()` is a child of it,
/// and the result `process` sends is answered as usual.
#[actix::test]
async fn a_pulled_task_continues_its_senders_trace() {
    let comm = amqp_settings(&amqp_url()).connect().await.unwrap();
    let queue = comm.task_queue("pulled");
    let origin = TraceContext::new_trace();
    let result = trace::scope(origin, queue.task_send::<_, u32>(&20u32))
        .await
        .unwrap();
    let pulled = queue
        .next_task::<u32>(std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let context = pulled.trace().expect("the sender's trace");
    assert_eq!(context.trace_id(), origin.trace_id());
    assert_ne!(
        context.span_id(),
        origin.span_id(),
        "the handling's own span"
    );
    let doubled = pulled.body() * 2;
    pulled
        .process(Ok::<_, kiwimq::HandlerError>(doubled))
        .await
        .unwrap();
    assert_eq!(result.await.unwrap(), 40);
    comm.close().await.unwrap();
}
