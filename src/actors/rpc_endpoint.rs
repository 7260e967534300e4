//! The `RpcEndpoint` actor: consumes the exclusive queue of one RPC identifier and answers
//! each request with its subscriber's result.

use std::marker::PhantomData;
use std::sync::Arc;

use actix::prelude::*;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Link, encode_reply, exception_reply};
use crate::Codec;
use crate::messages::{HandlerError, Rpc};
use crate::panics::PanicWatch;
use crate::subscriber::{Delivered, Subscriber};
use crate::transport::{Delivery, Exchange};

/// An RPC subscriber with its types erased: request bytes in, reply map bytes out.
pub(crate) type RpcFn =
    Arc<dyn Fn(bytes::Bytes, Option<String>) -> BoxFuture<'static, Vec<u8>> + Send + Sync>;

/// Erases a typed RPC subscriber. Every request gets a reply: bad bytes, a panic and a
/// dead subscriber become exception replies naming the problem.
pub(crate) fn rpc_fn<T, R>(subscriber: Subscriber<Rpc<T, R>>, codec: Codec) -> RpcFn
where
    T: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
{
    let subscriber = Arc::new(subscriber);
    Arc::new(move |body: bytes::Bytes, correlation_id: Option<String>| {
        let subscriber = subscriber.clone();
        async move {
            let body: T = match codec.decode(&body) {
                Ok(body) => body,
                Err(error) => {
                    tracing::warn!(?correlation_id, %error, "undecodable RPC request");
                    return exception_reply(
                        codec,
                        &format!("the request could not be decoded: {error}"),
                        None,
                    );
                }
            };
            let (watch, notice) = PanicWatch::new();
            let request = Rpc {
                body,
                correlation_id,
                result: PhantomData,
                _watch: watch,
            };
            match subscriber.deliver(request, Some(&notice)).await {
                Delivered::Answer(outcome) => encode_reply(codec, outcome, None),
                Delivered::Panicked(text) => {
                    tracing::error!(identifier = %subscriber.identifier(), "an RPC handler panicked; the caller gets the panic as an error");
                    encode_reply::<R>(codec, Err(HandlerError::Panicked(text)), None)
                }
                Delivered::Interrupted | Delivered::Lost => exception_reply(
                    codec,
                    "the RPC subscriber died before it handled the request",
                    None,
                ),
            }
        }
        .boxed()
    })
}

/// Serves one RPC identifier.
pub(crate) struct RpcEndpoint {
    link: Link,
    identifier: String,
    handler: RpcFn,
}

impl RpcEndpoint {
    pub(crate) fn new(link: Link, identifier: String, handler: RpcFn) -> Self {
        Self {
            link,
            identifier,
            handler,
        }
    }
}

impl Actor for RpcEndpoint {
    type Context = Context<Self>;
}

impl StreamHandler<Delivery> for RpcEndpoint {
    fn handle(&mut self, delivery: Delivery, _: &mut Context<Self>) {
        let Delivery {
            body,
            correlation_id,
            reply_to,
            ..
        } = delivery;
        tracing::debug!(identifier = %self.identifier, ?correlation_id, "RPC received");
        let answer = (self.handler)(body, correlation_id.clone());
        let link = self.link.clone();
        let identifier = self.identifier.clone();
        actix::spawn(async move {
            let bytes = answer.await;
            let Some(reply_to) = reply_to else {
                tracing::warn!(%identifier, ?correlation_id, "RPC without reply_to: the reply is dropped");
                return;
            };
            if let Err(error) = link
                .reply(Exchange::Messages, reply_to, correlation_id, bytes)
                .await
            {
                tracing::warn!(%identifier, %error, "RPC reply failed");
            }
        });
    }
}
