//! The communicator's own thread running an actix System: it hosts the internal actors and
//! the broker connection, so nothing the user does (blocking an Arbiter, stopping a System,
//! using no async runtime at all) can stall heartbeats or strand a delivery.

use std::future::Future;
use std::sync::Mutex;
use std::thread::{self, JoinHandle, ThreadId};

use actix_rt::{ArbiterHandle, System};
use futures::channel::oneshot;

use crate::error::{Error, Result};

/// A thread running an actix System for one communicator.
#[derive(Debug)]
pub(crate) struct Runtime {
    arbiter: ArbiterHandle,
    system: System,
    thread_id: ThreadId,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Runtime {
    /// Starts the thread, named `name`, and waits until its System runs.
    pub(crate) fn start(name: &str) -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
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
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The Arbiter on which internal actors run.
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

    /// Stops the System and, unless called from the runtime thread itself, joins it.
    pub(crate) fn stop(&self) {
        self.system.stop();
        self.join();
    }

    /// Waits for the thread to end (after something stopped its System), unless called
    /// from the runtime thread itself.
    pub(crate) fn join(&self) {
        if thread::current().id() == self.thread_id {
            return;
        }
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for Runtime {
    /// A communicator that failed half way through connecting must not leave its thread
    /// behind: stopping an already stopped System is harmless.
    fn drop(&mut self) {
        self.stop();
    }
}
