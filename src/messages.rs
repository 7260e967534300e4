//! The typed messages subscriber actors handle — [`Task`], [`Rpc`], [`Broadcast`] — and the
//! [`HandlerError`] a handler answers with when it fails or rejects a task.

use std::fmt;
use std::marker::PhantomData;

use actix::Message;

use std::borrow::Cow;

use crate::Value;
use crate::codec::envelope::plain_text;
use crate::panics::PanicWatch;
use crate::trace::{TraceContext, Traced};

/// A task delivered to a task subscriber. The handler's `Ok` value is the task's result,
/// sent back to the sender; `Err` is either a failure (the sender gets
/// [`ErrorKind::Remote`](crate::ErrorKind::Remote)) or a rejection ([`HandlerError::reject`]:
/// the next subscriber gets the task, else it goes back to the queue).
///
/// `T` is the body the sender sent, `R` the result type (the same as `T` unless named).
/// The task is acknowledged only after the handler finished.
pub struct Task<T, R = T> {
    /// The task's body.
    pub body: T,
    /// Whether the broker delivered this task before (to this or another worker) without
    /// its outcome being recorded: handlers of non-idempotent work should check it.
    pub redelivered: bool,
    /// The sender's correlation id, when it expects a reply.
    pub correlation_id: Option<String>,
    pub(crate) trace: Option<TraceContext>,
    pub(crate) result: PhantomData<fn() -> R>,
    /// Its place among the communicator's tasks in flight, which its presence shows.
    pub(crate) progress: Option<crate::presence::Progress>,
    /// Tells the dispatcher whether this task was dropped by its handler's panic (it
    /// works by being dropped: never read).
    pub(crate) _watch: PanicWatch,
}

impl<T: 'static, R: 'static> Message for Task<T, R> {
    type Result = Result<R, HandlerError>;
}

impl<T, R> Task<T, R> {
    /// The trace this task's handling is part of (see [`crate::trace`]): a closure
    /// subscriber's sends continue it by themselves; an actor's with
    /// [`trace::scope`](crate::trace::scope).
    pub fn trace(&self) -> Option<TraceContext> {
        self.trace
    }

    /// Says how far this task's handling is — `fraction` from 0 to 1 (clamped; a NaN says
    /// "unknown"), and what it is doing now if `note` is given — for the communicator's
    /// [presence](crate::presence), which dashboards show beside the task's age. For long
    /// handlers; cheap enough to call often (a lock and a write). A task handled outside
    /// a subscription (pulled with [`next_task`](crate::Communicator::next_task)) has no
    /// place in the presence: this does nothing there.
    pub fn report_progress(&self, fraction: f64, note: Option<&str>) {
        if let Some(progress) = &self.progress {
            progress.report(fraction, note.map(str::to_owned));
        }
    }
}

impl<T, R> Traced for Task<T, R> {
    fn trace_context(&self) -> Option<TraceContext> {
        self.trace
    }
}

impl<T: fmt::Debug, R> fmt::Debug for Task<T, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("body", &self.body)
            .field("redelivered", &self.redelivered)
            .field("correlation_id", &self.correlation_id)
            .finish()
    }
}

/// A remote procedure call delivered to the subscriber registered under an identifier.
/// The handler's `Ok` value is the reply; `Err` reaches the caller as
/// [`ErrorKind::Remote`](crate::ErrorKind::Remote).
pub struct Rpc<T, R = T> {
    /// The request's body.
    pub body: T,
    /// The caller's correlation id.
    pub correlation_id: Option<String>,
    pub(crate) trace: Option<TraceContext>,
    pub(crate) result: PhantomData<fn() -> R>,
    /// Tells the endpoint whether this request was dropped by its handler's panic (it
    /// works by being dropped: never read).
    pub(crate) _watch: PanicWatch,
}

impl<T: 'static, R: 'static> Message for Rpc<T, R> {
    type Result = Result<R, HandlerError>;
}

impl<T, R> Rpc<T, R> {
    /// The trace this request's handling is part of (see [`crate::trace`]).
    pub fn trace(&self) -> Option<TraceContext> {
        self.trace
    }
}

impl<T, R> Traced for Rpc<T, R> {
    fn trace_context(&self) -> Option<TraceContext> {
        self.trace
    }
}

impl<T> Traced for Broadcast<T> {
    fn trace_context(&self) -> Option<TraceContext> {
        None
    }
}

impl<T: fmt::Debug, R> fmt::Debug for Rpc<T, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rpc")
            .field("body", &self.body)
            .field("correlation_id", &self.correlation_id)
            .finish()
    }
}

/// A broadcast delivered to every subscriber whose filter it passes. Nothing is sent back;
/// a handler's error is logged.
///
/// Its headers are any plain value, as kiwiPy allows: AiiDA sends a process's pk, an
/// integer, as the sender. Read them as they came (`sender.as_ref().and_then(Value::as_i64)`)
/// or as text ([`sender_text`](Self::sender_text): `"47"`), which is what filters match.
#[derive(Clone, PartialEq)]
pub struct Broadcast<T> {
    /// The broadcast's body.
    pub body: T,
    /// Who sent it, if the sender said.
    pub sender: Option<Value>,
    /// What it is about, if the sender said.
    pub subject: Option<Value>,
    /// A correlation id, if the sender gave one.
    pub correlation_id: Option<Value>,
}

/// Shows the header values as a person writes them (`"job.42"`, `47`), not as their
/// MessagePack structure.
impl<T: fmt::Debug> fmt::Debug for Broadcast<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broadcast")
            .field("body", &self.body)
            .field("sender", &Readable(self.sender.as_ref()))
            .field("subject", &Readable(self.subject.as_ref()))
            .field("correlation_id", &Readable(self.correlation_id.as_ref()))
            .finish()
    }
}

/// An optional [`Value`] shown by its `Display`: `Some("job.42")`, `Some(47)`, `None`.
struct Readable<'a>(Option<&'a Value>);

impl fmt::Debug for Readable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(value) => write!(f, "Some({value})"),
            None => f.write_str("None"),
        }
    }
}

impl<T> Broadcast<T> {
    /// The sender as text (`"worker-1"`, `"47"` for the integer 47, `"True"`), if any.
    pub fn sender_text(&self) -> Option<Cow<'_, str>> {
        self.sender.as_ref().and_then(plain_text)
    }

    /// The subject as text, if any.
    pub fn subject_text(&self) -> Option<Cow<'_, str>> {
        self.subject.as_ref().and_then(plain_text)
    }

    /// The correlation id as text, if any.
    pub fn correlation_id_text(&self) -> Option<Cow<'_, str>> {
        self.correlation_id.as_ref().and_then(plain_text)
    }
}

impl<T: 'static> Message for Broadcast<T> {
    type Result = Result<(), HandlerError>;
}

/// Why a handler did not produce a result.
///
/// Any `std::error::Error` converts into a failure, so handlers can use `?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// The handler failed; the text is sent to the sender as a remote error.
    Failed(String),
    /// A task subscriber declines the task: it is offered to the next subscriber, else
    /// returned to the queue for another worker. (For RPC it is reported as a failure.)
    Rejected,
    /// The handler panicked; carries the panic's text. kiwimq answers with it: the sender
    /// gets a remote error naming the panic, and the task is settled as handled (or
    /// dead-lettered, with a delivery limit) so that it cannot take down worker after
    /// worker.
    Panicked(String),
}

impl HandlerError {
    /// A failure with this message.
    pub fn failed(message: impl fmt::Display) -> Self {
        Self::Failed(message.to_string())
    }

    /// Declines a task (see [`HandlerError::Rejected`]).
    pub fn reject() -> Self {
        Self::Rejected
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(message) => f.write_str(message),
            Self::Rejected => f.write_str("the subscriber rejected the task"),
            Self::Panicked(text) => write!(f, "the handler panicked: {text}"),
        }
    }
}

impl HandlerError {
    /// The failure reported for a handler that panicked.
    pub(crate) fn panicked(text: &str) -> Self {
        Self::Panicked(text.to_owned())
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::Failed(error.to_string())
    }
}

#[cfg(test)]
mod readable {
    use super::*;

    #[test]
    fn a_broadcast_debugs_its_headers_as_values_not_their_structure() {
        let broadcast = Broadcast {
            body: 3,
            sender: Some(Value::from(47)),
            subject: Some(Value::from("job.progress")),
            correlation_id: None,
        };
        assert_eq!(
            format!("{broadcast:?}"),
            r#"Broadcast { body: 3, sender: Some(47), subject: Some("job.progress"), correlation_id: None }"#
        );
    }
}
