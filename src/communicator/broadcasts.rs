//! The [`Communicator`]'s broadcasts: sent from the caller's task; subscribers, each with
//! its filter, registered with the communicator's one `BroadcastHub`.

use serde::Serialize;
use serde::de::DeserializeOwned;

use std::sync::Arc;

use super::{Communicator, Core, new_id, to_completion};
use crate::Value;
use crate::actors::broadcast_hub::{self, BroadcastFn, broadcast_fn};
use crate::codec::envelope::BroadcastEnvelope;
use crate::error::{Error, ErrorKind, Result};
use crate::filter::BroadcastFilter;
use crate::messages::Broadcast;
use crate::subscriber::IntoSubscriber;
use crate::transport::{Outgoing, Route};

/// Options of a broadcast beyond its body; every field may be left out. Each is any plain
/// value, as in kiwiPy: text, or an integer (AiiDA's process pk as the sender), a float, a
/// bool.
#[derive(Debug, Clone, Default)]
pub struct BroadcastOptions {
    /// Who sends it.
    pub sender: Option<Value>,
    /// What it is about; subscribers filter on it.
    pub subject: Option<Value>,
    /// A correlation id for the receivers.
    pub correlation_id: Option<Value>,
}

impl BroadcastOptions {
    /// A broadcast about `subject`.
    pub fn subject(subject: impl Into<Value>) -> Self {
        Self {
            subject: Some(subject.into()),
            ..Self::default()
        }
    }

    /// Names the sender: `"worker-1"`, or `47`.
    #[must_use]
    pub fn with_sender(mut self, sender: impl Into<Value>) -> Self {
        self.sender = Some(sender.into());
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: impl Into<Value>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }
}

impl Communicator {
    /// Sends a broadcast to every subscriber on the broker. Nobody listening is fine.
    pub async fn broadcast_send<T: Serialize + ?Sized>(
        &self,
        body: &T,
        options: BroadcastOptions,
    ) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        tracing::debug!(subject = ?options.subject, "sending broadcast");
        let envelope = BroadcastEnvelope {
            body,
            sender: options.sender,
            subject: options.subject,
            correlation_id: options.correlation_id,
        };
        let body = inner.conduit.codec.encode_broadcast(envelope)?;
        let message = Outgoing {
            body,
            ..Outgoing::default()
        };
        inner.conduit.send(Route::Broadcast, message).await
    }

    /// Subscribes to broadcasts that pass `filter`; returns the subscriber's identifier.
    pub async fn add_broadcast_subscriber<T, S>(
        &self,
        filter: BroadcastFilter,
        subscriber: S,
    ) -> Result<String>
    where
        T: DeserializeOwned + Send + 'static,
        S: IntoSubscriber<Broadcast<T>>,
    {
        let inner = &self.inner;
        inner.check_open()?;
        let id = new_id();
        let described = filter.to_string();
        let handler = broadcast_fn(
            subscriber.into_subscriber(&inner.scope(&id)),
            filter,
            inner.conduit.codec,
            inner.conduit.max_in_flight,
        );
        // Added as one operation: a caller that gives up has it undone.
        to_completion(
            inner,
            add(inner.clone(), id, handler, described),
            |inner, id| async move {
                let _ = remove(inner, id).await;
            },
        )
        .await
    }

    /// Removes a broadcast subscriber; `UnknownSubscriber` if there is none.
    pub async fn remove_broadcast_subscriber(&self, identifier: &str) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        to_completion(
            inner,
            remove(inner.clone(), identifier.to_owned()),
            |_, ()| async {},
        )
        .await
    }
}

async fn add(inner: Arc<Core>, id: String, handler: BroadcastFn, filter: String) -> Result<String> {
    let hub = inner.broadcast_hub().await?;
    hub.send(broadcast_hub::AddSubscriber {
        id: id.clone(),
        handler,
    })
    .await??;
    inner.activity.filter_added(&id, filter);
    inner.conduit.subscribers.add("broadcast", 1);
    Ok(id)
}

async fn remove(inner: Arc<Core>, id: String) -> Result<()> {
    let hub = inner.broadcast_hub().await?;
    let removed = hub
        .send(broadcast_hub::RemoveSubscriber {
            id: id.clone(),
            dead: false,
        })
        .await??;
    if !removed {
        return Err(Error::new(ErrorKind::UnknownSubscriber(id)));
    }
    inner.activity.filter_removed(&id);
    inner.conduit.subscribers.add("broadcast", -1);
    Ok(())
}
