//! The [`Communicator`]'s RPC: calls sent from the caller's task, and subscribers claimed
//! from the tree's `Root`, each served by an `RpcEndpoint` child.

use serde::Serialize;
use serde::de::DeserializeOwned;

use std::sync::Arc;

use super::{Communicator, Core, new_id, to_completion};
use crate::actors::replies::ReplyFuture;
use crate::actors::rpc_endpoint::{self, RpcFn, rpc_fn};
use crate::error::{Error, ErrorKind, Result};
use crate::messages::Rpc;
use crate::subscriber::IntoSubscriber;
use crate::transport::{Outgoing, Route, Source};
use crate::tree::{ClaimRpc, ReleaseRpc, RemoveRpc, StartRpc};

impl Communicator {
    /// Calls the RPC subscriber registered under `identifier`. Resolves once the broker
    /// accepted the request, with a future of the reply; `Unroutable` if nobody has that
    /// identifier.
    pub async fn rpc_send<T, R>(&self, identifier: &str, body: &T) -> Result<ReplyFuture<R>>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let inner = &self.inner;
        inner.check_open()?;
        let body = inner.conduit.codec.encode(body)?;
        let correlation_id = new_id();
        let reply = inner.replies.expect(
            correlation_id.clone(),
            inner.conduit.codec,
            inner.settings.rpc_timeout,
            "rpc",
        )?;
        let message = Outgoing {
            body,
            correlation_id: Some(correlation_id),
            reply_to: Some(inner.message_reply_queue.clone()),
            persistent: false,
            mandatory: true,
            traceparent: None,
        };
        inner
            .conduit
            .send(Route::Rpc(identifier.to_owned()), message)
            .await?;
        Ok(reply)
    }

    /// Registers an RPC subscriber under `identifier` (generated when `None`) and returns
    /// the identifier. `DuplicateSubscriber` if this communicator already serves that
    /// identifier, or is still removing it (it is free again once
    /// [`remove_rpc_subscriber`](Self::remove_rpc_subscriber) has returned); with
    /// [`Settings::with_exclusive_rpc_identifiers`](crate::Settings::with_exclusive_rpc_identifiers),
    /// also if another communicator serves it.
    pub async fn add_rpc_subscriber<T, R, S>(
        &self,
        identifier: Option<&str>,
        subscriber: S,
    ) -> Result<String>
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        S: IntoSubscriber<Rpc<T, R>>,
    {
        let inner = &self.inner;
        inner.check_open()?;
        let identifier = identifier.map_or_else(new_id, str::to_owned);
        let handler = rpc_fn(
            subscriber.into_subscriber(&inner.scope(&identifier)),
            inner.conduit.codec,
            inner.conduit.max_in_flight,
        );
        // Claim, consume and start as one operation: a caller that gives up half way has
        // it undone, and the identifier is free again.
        to_completion(
            inner,
            add(inner.clone(), identifier, handler),
            |inner, identifier| async move {
                let _ = remove(inner, identifier).await;
            },
        )
        .await
    }

    /// Removes the RPC subscriber `identifier`; `UnknownSubscriber` if there is none. Once
    /// it returns, nothing is bound or consumed for it any more, and it can be added again.
    pub async fn remove_rpc_subscriber(&self, identifier: &str) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        // Runs to its end even if the caller stops waiting: the identifier is then free.
        to_completion(
            inner,
            remove(inner.clone(), identifier.to_owned()),
            |_, ()| async {},
        )
        .await
    }
}

/// Claims `identifier`, consumes its calls and starts its endpoint; the claim is released
/// if the consume fails.
async fn add(inner: Arc<Core>, identifier: String, handler: RpcFn) -> Result<String> {
    let root = &inner.root;
    root.send(ClaimRpc(identifier.clone())).await??;
    let consumed = inner
        .conduit
        .transport
        .consume(
            Source::Rpc(identifier.clone()),
            inner.conduit.message_prefetch,
        )
        .await
        .map_err(|e| match e.kind() {
            ErrorKind::DuplicateSubscriber(_) => {
                Error::new(ErrorKind::DuplicateSubscriber(identifier.clone()))
            }
            _ => e,
        });
    let (started, outcome) = match consumed {
        Ok(consumer) => (Some((handler, consumer)), Ok(identifier.clone())),
        Err(error) => (None, Err(error)),
    };
    root.send(StartRpc {
        identifier,
        started,
    })
    .await?;
    if outcome.is_ok() {
        inner.conduit.subscribers.add("rpc", 1);
    }
    outcome
}

/// Removes `identifier`'s endpoint, waits until its consumer is cancelled, then frees the
/// identifier.
async fn remove(inner: Arc<Core>, identifier: String) -> Result<()> {
    let removed = inner.root.send(RemoveRpc(identifier.clone())).await?;
    let Some(endpoint) = removed else {
        return Err(Error::new(ErrorKind::UnknownSubscriber(identifier)));
    };
    inner.conduit.subscribers.add("rpc", -1);
    // Its consumer cancelled, the endpoint stops; then the identifier is free again.
    let unsubscribed = endpoint.send(rpc_endpoint::Unsubscribe).await;
    // The endpoint's last handle: its supervision ends, and the actor with it.
    drop(endpoint);
    inner.root.do_send(ReleaseRpc(identifier));
    unsubscribed?
}
