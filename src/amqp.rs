//! The `amqp://` backend (RabbitMQ).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::runtime::Runtime;
use crate::settings::Settings;
use crate::transport::Transport;

pub(crate) async fn connect(settings: &Settings, _runtime: &Runtime) -> Result<Arc<dyn Transport>> {
    Err(Error::config(format!(
        "{}: the amqp backend is not built yet",
        settings.redacted_uri()
    )))
}
