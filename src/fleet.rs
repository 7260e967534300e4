//! [`Fleet`]: the main loop of a worker process — N supervised subscribers per task queue,
//! a health report, and a graceful stop on SIGTERM or SIGINT.

use std::fmt;

use actix::{Actor, Context, Handler};
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::communicator::Communicator;
use crate::error::{Error, ErrorKind, Result};
use crate::health::Health;
use crate::messages::Task;
use crate::settings::Settings;
use crate::supervised::SupervisedActor;

/// Subscribes one queue's workers on a communicator; answers how many it started.
type Subscribe = Box<dyn FnOnce(Communicator) -> BoxFuture<'static, Result<usize>> + Send>;

/// A worker process: connects, starts `concurrency` [`supervised`](crate::supervised)
/// subscribers on each of its task queues (each queue's prefetch is its concurrency, so as
/// many tasks run at once), then runs until SIGTERM or SIGINT and closes gracefully: no new
/// task is taken, running ones get the shutdown grace
/// ([`Settings::with_shutdown_grace`]), and what did not finish goes back to its queue for
/// another worker.
///
/// ```
/// use actix::prelude::*;
/// use kiwimq::{Fleet, HandlerError, Settings, Task, supervised};
///
/// #[derive(Default)]
/// struct Doubler;
/// impl Actor for Doubler { type Context = Context<Self>; }
/// impl Handler<Task<u64>> for Doubler {
///     type Result = Result<u64, HandlerError>;
///     fn handle(&mut self, task: Task<u64>, _: &mut Context<Self>) -> Self::Result {
///         Ok(task.body * 2)
///     }
/// }
///
/// # fn main() -> kiwimq::Result<()> {
/// # actix_rt::System::new().block_on(async {
/// let fleet = Fleet::new(Settings::new("mem://fleet-doc"))
///     .tasks("work", 4, supervised(Doubler::default))
///     .start()
///     .await?;
/// assert_eq!(fleet.health().await.task_subscribers, 4);
/// let client = kiwimq::connect("mem://fleet-doc").await?;
/// assert_eq!(client.task_queue("work").task_send::<_, u64>(&21u64).await?.await?, 42);
/// // A real worker would now wait: `fleet.run_until_signal().await`.
/// fleet.close().await
/// # })
/// # }
/// ```
pub struct Fleet {
    settings: Settings,
    queues: Vec<Subscribe>,
}

impl Fleet {
    /// A fleet that will connect with `settings`.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            queues: Vec::new(),
        }
    }

    /// Runs `concurrency` copies of the supervised actor `worker` on the task queue
    /// `queue`, taking up to `concurrency` tasks at once.
    #[must_use]
    pub fn tasks<T, R, A, F>(
        mut self,
        queue: impl Into<String>,
        concurrency: u16,
        worker: SupervisedActor<F>,
    ) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        A: Actor<Context = Context<A>> + Handler<Task<T, R>>,
        F: Fn() -> A + Clone + Send + 'static,
    {
        let queue = queue.into();
        let concurrency = concurrency.max(1);
        self.queues.push(Box::new(move |comm: Communicator| {
            Box::pin(async move {
                let queue = comm.task_queue(queue).with_prefetch(concurrency);
                for _ in 0..concurrency {
                    queue.add_task_subscriber(worker.clone()).await?;
                }
                Ok(usize::from(concurrency))
            })
        }));
        self
    }

    /// Connects and starts every worker.
    pub async fn start(self) -> Result<RunningFleet> {
        let comm = self.settings.connect().await?;
        let mut workers = 0;
        for subscribe in self.queues {
            match subscribe(comm.clone()).await {
                Ok(started) => workers += started,
                Err(error) => {
                    let _ = comm.close().await;
                    return Err(error);
                }
            }
        }
        tracing::info!(workers, "fleet started");
        Ok(RunningFleet { comm, workers })
    }
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("settings", &self.settings)
            .field("queues", &self.queues.len())
            .finish()
    }
}

/// A started [`Fleet`].
#[derive(Debug)]
pub struct RunningFleet {
    comm: Communicator,
    workers: usize,
}

impl RunningFleet {
    /// The communicator the workers run on, to send or subscribe more.
    pub fn communicator(&self) -> &Communicator {
        &self.comm
    }

    /// How many workers were started.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The fleet's health now: connected, subscribers alive, tasks running, restarts.
    pub async fn health(&self) -> Health {
        self.comm.health().await
    }

    /// Runs until SIGTERM or SIGINT (Ctrl-C), then closes gracefully. Ends early, with a
    /// `Closed` error, when every worker is lost for good (a process manager should then
    /// start the process again).
    pub async fn run_until_signal(self) -> Result<()> {
        match self.wait_for_stop().await {
            Stop::Signal => self.close().await,
            Stop::WorkersLost => {
                let _ = self.comm.close().await;
                Err(Error::with_source(
                    ErrorKind::Closed,
                    std::io::Error::other("every worker of the fleet was lost"),
                ))
            }
        }
    }

    /// Waits for a reason to stop — SIGTERM or SIGINT, or every worker lost — and says
    /// which, without closing: report, then [`close`](Self::close).
    pub async fn wait_for_stop(&self) -> Stop {
        let workers = self.workers;
        // Counted where the losses are, not from events, which a busy receiver can miss.
        let incidents = self.comm.inner.incidents.clone();
        let all_lost = async move {
            incidents
                .lost_at_least(u64::try_from(workers).unwrap_or(u64::MAX))
                .await;
            true
        };
        tokio::select! {
            () = shutdown_signal() => {
                tracing::info!("stop asked: closing gracefully");
                Stop::Signal
            }
            true = all_lost => {
                tracing::error!(workers, "every worker is lost: stopping");
                Stop::WorkersLost
            }
        }
    }

    /// Closes gracefully now (see [`Communicator::close`]).
    pub async fn close(self) -> Result<()> {
        self.comm.close().await
    }
}

/// Why a fleet stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stop {
    /// SIGTERM or SIGINT.
    Signal,
    /// Every worker was lost for good.
    WorkersLost,
}

/// Resolves on SIGTERM (how process managers ask a process to stop) or SIGINT (Ctrl-C): what
/// a worker process waits for before closing gracefully.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
