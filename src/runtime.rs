//! A thread running an actix System: the communicator's own (its internal actors and the
//! broker connection), the root's, and the handler threads user code runs on — so
//! nothing the user does (blocking an Arbiter, stopping a System, using no async runtime at
//! all) can stall heartbeats or strand a delivery.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, ThreadId};

use actix_rt::{ArbiterHandle, System};
use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::Shared;

use crate::error::{Error, Result};

/// A thread running an actix System. Dropped, it stops the System and lets the thread end
/// on its own: nothing ever blocks on joining it (see [`Runtime::stopped`]).
#[derive(Debug)]
pub(crate) struct Runtime {
    arbiter: ArbiterHandle,
    system: System,
    thread_id: ThreadId,
    /// Resolves once the thread has ended its System (the sender is dropped as it exits).
    ended: Shared<oneshot::Receiver<()>>,
    /// Dropping the handle stops the System (unless its work stops it: `stop_when_done`).
    stop_on_drop: AtomicBool,
}

impl Runtime {
    /// Starts the thread, named `name`, and waits until its System runs.
    pub(crate) fn start(name: &str) -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ended_tx, ended_rx) = oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ended = ended_tx;
                let runner = System::new();
                let _ = ready_tx.send((System::current(), System::current().arbiter().clone()));
                if let Err(error) = runner.run() {
                    tracing::error!(%error, "kiwimq runtime stopped with an error");
                }
            })
            .map_err(|e| {
                Error::connection(format!("cannot start the kiwimq thread {name}: {e}"))
            })?;
        let (system, arbiter) = ready_rx
            .recv()
            .map_err(|_| Error::connection(format!("the kiwimq thread {name} died at start")))?;
        Ok(Self {
            arbiter,
            system,
            thread_id: thread.thread().id(),
            ended: ended_rx.shared(),
            stop_on_drop: AtomicBool::new(true),
        })
    }

    /// The Arbiter on which this runtime's actors run.
    pub(crate) fn arbiter(&self) -> &ArbiterHandle {
        &self.arbiter
    }

    /// Runs `future` on the runtime thread and returns a future of its output, awaitable
    /// from any thread or executor. `Closed` if the runtime has stopped.
    pub(crate) fn run<F, T>(&self, future: F) -> impl Future<Output = Result<T>> + Send + 'static
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let spawned = self.arbiter.spawn(async move {
            let _ = tx.send(future.await);
        });
        async move {
            if !spawned {
                return Err(Error::closed());
            }
            rx.await.map_err(|_| Error::closed())
        }
    }

    /// Spawns `future` on the runtime thread; `false` if the runtime has stopped.
    pub(crate) fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) -> bool {
        self.arbiter.spawn(future)
    }

    /// Asks the System to stop; the thread ends once its current work yields.
    pub(crate) fn stop(&self) {
        self.system.stop();
    }

    /// Leaves the System running when this handle is dropped: for a runtime that was given
    /// work that stops it when done (a connection's last goodbye).
    pub(crate) fn stop_when_done(&self) {
        self.stop_on_drop.store(false, Ordering::Release);
    }

    /// Resolves once the thread has ended (after something stopped its System) — at once
    /// when awaited on that very thread, which cannot wait for itself.
    pub(crate) fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let own = thread::current().id() == self.thread_id;
        let ended = self.ended.clone();
        async move {
            if !own {
                let _ = ended.await;
            }
        }
    }
}

impl Drop for Runtime {
    /// A communicator that failed half way through connecting must not leave its thread
    /// behind: stopping an already stopped System is harmless.
    fn drop(&mut self) {
        if self.stop_on_drop.load(Ordering::Acquire) {
            self.stop();
        }
    }
}
