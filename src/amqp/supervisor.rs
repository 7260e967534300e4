//! The `ConnectionSupervisor` actor: the only owner of the lapin connection. It opens
//! channels for the transport and watches the connection's events.

use std::sync::Arc;

use actix::prelude::*;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, Event};

use crate::error::{Error, Result};

/// Owns the connection; lives on the communicator's runtime, which nothing else blocks.
pub(crate) struct ConnectionSupervisor {
    connection: Arc<Connection>,
    /// What the connection last reported, for errors handed to later callers.
    last_error: Option<String>,
}

impl ConnectionSupervisor {
    pub(crate) fn new(connection: Connection) -> Self {
        Self {
            connection: Arc::new(connection),
            last_error: None,
        }
    }
}

impl Actor for ConnectionSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.add_stream(self.connection.events_listener());
    }
}

impl StreamHandler<Event> for ConnectionSupervisor {
    fn handle(&mut self, event: Event, _: &mut Context<Self>) {
        match event {
            Event::Error(error) => {
                tracing::error!(%error, "AMQP connection error");
                self.last_error = Some(error.to_string());
            }
            Event::ConnectionBlocked(reason) => {
                tracing::warn!(%reason, "the broker blocked the connection")
            }
            Event::ConnectionUnblocked => tracing::info!("the broker unblocked the connection"),
            other => tracing::debug!(event = ?other, "AMQP connection event"),
        }
    }

    fn finished(&mut self, _: &mut Context<Self>) {}
}

/// Opens a channel, in confirm mode when asked.
#[derive(Message)]
#[rtype(result = "Result<Channel>")]
pub(crate) struct OpenChannel {
    pub(crate) confirm: bool,
}

impl Handler<OpenChannel> for ConnectionSupervisor {
    type Result = ResponseFuture<Result<Channel>>;

    fn handle(&mut self, message: OpenChannel, _: &mut Context<Self>) -> Self::Result {
        let connection = self.connection.clone();
        let last_error = self.last_error.clone();
        Box::pin(async move {
            let describe = |e: lapin::Error| match &last_error {
                Some(cause) => Error::connection(format!("{e} (after: {cause})")),
                None => Error::connection(e),
            };
            let channel = connection.create_channel().await.map_err(describe)?;
            if message.confirm {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(describe)?;
            }
            Ok(channel)
        })
    }
}

/// Closes the connection.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub(crate) struct Close;

impl Handler<Close> for ConnectionSupervisor {
    type Result = ResponseFuture<Result<()>>;

    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) -> Self::Result {
        let connection = self.connection.clone();
        ctx.stop();
        Box::pin(async move {
            if !connection.status().connected() {
                return Ok(());
            }
            connection
                .close(200, "kiwimq communicator closed".into())
                .await
                .map_err(Error::connection)
        })
    }
}
