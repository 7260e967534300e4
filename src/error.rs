//! The one error type of kiwimq: an [`Error`] carrying an [`ErrorKind`] the caller can match.

use std::fmt;
use std::sync::Arc;

/// A `Result` whose error is a kiwimq [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, named after what it means for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Nobody could receive the message: no queue is bound to its route (an RPC identifier
    /// with no subscriber, or a task queue that does not exist). Carries the route.
    #[error("unroutable: nobody receives '{0}'")]
    Unroutable(String),
    /// The remote handler failed; carries its error text (kiwiPy's `RemoteException`).
    #[error("remote error: {0}")]
    Remote(String),
    /// The receiver cancelled the request; carries its reason when it gave one.
    #[error("cancelled by the receiver{}", .0.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Cancelled(Option<String>),
    /// A task was rejected by every subscriber that saw it, on its last delivery: with a
    /// delivery limit ([`Settings::with_delivery_limit`](crate::Settings::with_delivery_limit)),
    /// a task every subscriber rejects goes back to its queue (after a short pause, for
    /// another worker) until the limit, then to the dead-letter queue, and its sender gets
    /// this. Without a limit it goes back to its queue until some subscriber takes it.
    #[error("rejected by every subscriber")]
    Rejected,
    /// No task arrived in the queue within the time allowed.
    #[error("the task queue is empty")]
    QueueEmpty,
    /// A subscriber with this identifier already exists.
    #[error("a subscriber '{0}' already exists")]
    DuplicateSubscriber(String),
    /// No subscriber has this identifier.
    #[error("no subscriber '{0}'")]
    UnknownSubscriber(String),
    /// The communicator has been closed.
    #[error("the communicator is closed")]
    Closed,
    /// The operation did not finish within its time limit.
    #[error("timed out")]
    Timeout,
    /// The broker refused a publish (a negative publisher confirm).
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// The message was refused for a reason no retry can change: it is larger than the
    /// message size limit (checked before anything is sent), its exchange does not exist,
    /// access to it is refused, or another precondition failed. Carries the reason, in the
    /// broker's words when the broker refused it. The communicator neither reconnects nor
    /// resends for it; other sends go on.
    #[error("refused: {0}")]
    Refused(String),
    /// The connection to the broker failed or was lost; carries the reason.
    #[error("connection error: {0}")]
    Connection(String),
    /// Bytes that do not decode, or a value that does not encode; carries the reason.
    #[error("codec error: {0}")]
    Codec(String),
    /// An invalid setting or URI; carries the reason.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A kiwimq error: a matchable [`ErrorKind`] with the underlying cause attached.
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error of this kind with no underlying cause.
    pub fn new(kind: ErrorKind) -> Self {
        Self { kind, source: None }
    }

    /// An error of this kind caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            kind,
            source: Some(Arc::new(source)),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// Whether trying the same operation again later may succeed (a lost connection, a
    /// timeout, an empty queue), as opposed to errors that will repeat (bad bytes, closed).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connection(_)
                | ErrorKind::Timeout
                | ErrorKind::QueueEmpty
                | ErrorKind::Nacked
                | ErrorKind::Unroutable(_)
        )
    }

    pub(crate) fn closed() -> Self {
        Self::new(ErrorKind::Closed)
    }

    pub(crate) fn codec(reason: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Codec(reason.to_string()))
    }

    pub(crate) fn connection(reason: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Connection(reason.to_string()))
    }

    /// A `Timeout` that says what did not happen in time.
    pub(crate) fn timeout(what: impl fmt::Display) -> Self {
        Self::with_source(ErrorKind::Timeout, Reason(what.to_string()))
    }

    pub(crate) fn refused(reason: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Refused(reason.to_string()))
    }

    pub(crate) fn config(reason: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Config(reason.to_string()))
    }
}

/// Written for a person, since `main` returning `kiwimq::Result` prints its error with
/// `Debug`: the message, then each cause not already in it on a line of its own
/// (`caused by: …`). The alternate form, `{:#?}`, shows the structure: kind and source.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            let mut s = f.debug_struct("Error");
            s.field("kind", &self.kind);
            if let Some(source) = &self.source {
                s.field("source", source);
            }
            return s.finish();
        }
        let mut shown = self.to_string();
        f.write_str(&shown)?;
        let mut cause = std::error::Error::source(self);
        while let Some(error) = cause {
            let text = error.to_string();
            if !shown.contains(&text) {
                write!(f, "\n  caused by: {text}")?;
                shown.push_str(&text);
            }
            cause = error.source();
        }
        Ok(())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind.to_string();
        f.write_str(&kind)?;
        // Most kinds already carry their cause's words; it is said once.
        match &self.source {
            Some(source) if !kind.contains(&source.to_string()) => write!(f, ": {source}"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Self::new(kind)
    }
}

/// A cause that is only words.
#[derive(Debug)]
struct Reason(String);

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Reason {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_reads_as_words_and_alternate_shows_the_structure() {
        let error = Error::with_source(
            ErrorKind::Connection("lost".into()),
            Reason("the broker went away".into()),
        );
        assert_eq!(
            format!("{error:?}"),
            "connection error: lost: the broker went away"
        );
        let plain = Error::new(ErrorKind::Codec("bad bytes".into()));
        assert_eq!(format!("{plain:?}"), "codec error: bad bytes");
        assert!(format!("{plain:#?}").contains("kind: Codec("));
    }
}
