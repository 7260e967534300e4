//! The bounded pool of threads blocking subscribers run on: a burst of calls waits its turn
//! in the pool's queue instead of growing the process by a thread per call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use futures::channel::oneshot;

use crate::messages::HandlerError;
use crate::panics::payload_text;

type Job = Box<dyn FnOnce() + Send>;

/// Up to `size` threads named `kiwimq-handler`, started as work arrives. They end when the
/// pool is dropped and its queue is empty; a handler still running then finishes alone (its
/// task went back to its queue when the connection closed).
pub(crate) struct HandlerPool {
    jobs: Sender<Job>,
    queue: Arc<Mutex<Receiver<Job>>>,
    size: usize,
    started: AtomicUsize,
}

impl HandlerPool {
    pub(crate) fn new(size: usize) -> Self {
        let (jobs, queue) = mpsc::channel();
        Self {
            jobs,
            queue: Arc::new(Mutex::new(queue)),
            size: size.max(1),
            started: AtomicUsize::new(0),
        }
    }

    /// Runs the blocking closure `f` on the pool; a panic in it is the handler's failure
    /// naming the panic, never the end of the subscriber. A call whose answer nobody awaits
    /// any more (its communicator closed meanwhile) is skipped.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, HandlerError>
    where
        F: FnOnce() -> Result<T, HandlerError> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            if tx.is_canceled() {
                return;
            }
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(outcome);
        });
        if let Err(error) = self.submit(job) {
            return Err(HandlerError::failed(format!(
                "no thread for the subscriber: {error}"
            )));
        }
        match rx.await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(panic)) => Err(HandlerError::panicked(&payload_text(&*panic))),
            Err(_) => Err(HandlerError::failed("the subscriber's thread vanished")),
        }
    }

    fn submit(&self, job: Job) -> std::io::Result<()> {
        self.jobs
            .send(job)
            .map_err(|_| std::io::Error::other("the handler pool is closed"))?;
        // One more thread while under the bound; the queue hands work to whoever is free.
        if self.started.fetch_add(1, Ordering::AcqRel) < self.size {
            let queue = self.queue.clone();
            thread::Builder::new()
                .name("kiwimq-handler".into())
                .spawn(move || work(&queue))?;
        } else {
            self.started.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(())
    }
}

/// A pool thread: runs jobs until the pool is gone and its queue empty.
fn work(queue: &Mutex<Receiver<Job>>) {
    loop {
        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

impl std::fmt::Debug for HandlerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerPool")
            .field("size", &self.size)
            .field(
                "started",
                &self.started.load(Ordering::Relaxed).min(self.size),
            )
            .finish()
    }
}
