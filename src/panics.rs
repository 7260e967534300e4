//! Telling a panicking handler's message from the ones queued behind it, and saying what
//! the panic was: a panic is an answer (`Remote`), not a silence.
//!
//! A subscriber actor that panics dies with every message in its mailbox; the senders only
//! see a closed mailbox. Each [`Task`](crate::Task) and [`Rpc`](crate::Rpc) carries a
//! [`PanicWatch`]. The message being handled lives in the handler's frame, so its watch is
//! the first one dropped as the thread unwinds; the mailbox, with the messages queued
//! behind, goes later (tokio drops a panicked task's future while still unwinding). So the
//! first watch dropped during a panic takes the blame and keeps the panic's text — which a
//! chained panic hook left on that very thread — and the others are free to go elsewhere.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, OnceLock};

thread_local! {
    /// The latest panic on this thread, as the hook described it, and its number.
    static LAST_PANIC: RefCell<(u64, Option<String>)> = const { RefCell::new((0, None)) };
    /// The number of the latest panic a watch took the blame for.
    static BLAMED: Cell<u64> = const { Cell::new(0) };
    /// The flag of the supervised actor being polled on this thread, if one is: the hook
    /// raises it, so the actor is known to be dying before its unwinding lets any sender
    /// see an answer.
    static POLLED: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Installs, once per process, a panic hook that notes each panic's text on its thread,
/// then calls the hook that was there before (so panics are printed as usual). A program
/// that replaces the hook later still gets its panics answered, without their text.
pub(crate) fn install_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let text = payload_text(info.payload());
            let text = match info.location() {
                Some(at) => format!("{text} (at {}:{})", at.file(), at.line()),
                None => text,
            };
            LAST_PANIC.with(|last| {
                let mut last = last.borrow_mut();
                *last = (last.0 + 1, Some(text));
            });
            let _ = POLLED.try_with(|polled| {
                if let Ok(polled) = polled.try_borrow()
                    && let Some(dying) = &*polled
                {
                    dying.store(true, Ordering::Release);
                }
            });
            previous(info);
        }));
    });
}

/// Runs `future` (a supervised actor's context) so that a panic while it is polled raises
/// `dying` before the thread unwinds: the actor's supervision then hands its address to
/// nobody, although the mailbox lives on until the unwinding ends — or a request sent in
/// answer to the panicking one's reply could land in the dying mailbox.
pub(crate) async fn raising_on_panic<F: Future>(dying: Arc<AtomicBool>, future: F) -> F::Output {
    /// While a poll runs, the thread holds the actor's flag (moved in, not cloned: this is
    /// every message's path) and this the thread's previous one; they swap back after the
    /// poll, on a panic too.
    struct Polling<'a> {
        mine: &'a mut Option<Arc<AtomicBool>>,
        previous: Option<Arc<AtomicBool>>,
    }
    impl Drop for Polling<'_> {
        fn drop(&mut self) {
            let previous = self.previous.take();
            if let Ok(mine) = POLLED.try_with(|polled| polled.replace(previous)) {
                *self.mine = mine;
            }
        }
    }
    let mut mine = Some(dying);
    let mut future = pin!(future);
    std::future::poll_fn(|cx| {
        let previous = POLLED.with(|polled| polled.replace(mine.take()));
        let _polling = Polling {
            mine: &mut mine,
            previous,
        };
        future.as_mut().poll(cx)
    })
    .await
}

/// A panic payload's text: the `&str` or `String` given to `panic!`.
pub(crate) fn payload_text(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Rides inside a message to a subscriber; notes whether the message was dropped by a
/// panic, with the panic's text.
#[derive(Default)]
pub(crate) struct PanicWatch(Option<Arc<OnceLock<String>>>);

/// The sender's side of a [`PanicWatch`].
#[derive(Clone)]
pub(crate) struct PanicNotice(Arc<OnceLock<String>>);

impl PanicWatch {
    /// A watch and the notice that reads it.
    pub(crate) fn new() -> (Self, PanicNotice) {
        let cell = Arc::new(OnceLock::new());
        (Self(Some(cell.clone())), PanicNotice(cell))
    }
}

impl PanicNotice {
    /// The panic that dropped the message, if one did.
    pub(crate) fn panic(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Some(cell) = &self.0 else {
            return;
        };
        let (number, text) = LAST_PANIC.with(|last| last.borrow().clone());
        // Without the hook (replaced by the program) panics are not numbered: the first
        // watch dropped by any panic on this thread then takes the blame.
        if number != 0 && BLAMED.with(Cell::get) == number {
            return;
        }
        BLAMED.with(|blamed| blamed.set(number));
        let _ = cell.set(text.unwrap_or_else(|| "a panic".to_owned()));
    }
}

impl std::fmt::Debug for PanicWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PanicWatch")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_dropped_by_a_panic_keeps_its_text_and_one_dropped_in_peace_does_not() {
        install_hook();
        let (watch, notice) = PanicWatch::new();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = watch;
            panic!("boom on task 7");
        }));
        assert!(caught.is_err());
        assert!(
            notice.panic().unwrap().contains("boom on task 7"),
            "{:?}",
            notice.panic()
        );

        let (watch, notice) = PanicWatch::new();
        drop(watch);
        assert_eq!(notice.panic(), None);
    }

    #[test]
    fn only_the_first_watch_dropped_by_a_panic_takes_the_blame() {
        install_hook();
        let (handled, blamed) = PanicWatch::new();
        let (queued, spared) = PanicWatch::new();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _mailbox = queued; // dropped after the handler's frame
            let handle = move || {
                let _task = handled;
                panic!("boom");
            };
            handle();
        }));
        assert!(caught.is_err());
        assert!(blamed.panic().is_some());
        assert_eq!(spared.panic(), None);
    }
}
