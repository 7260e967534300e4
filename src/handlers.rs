//! The handler threads: where closure subscribers run, off kiwimq's own runtime, so that a
//! slow or CPU-bound closure delays only its own messages.
//!
//! Each message's handler (the closure's call and its future) runs on one of a small set of
//! threads, each an actix System of its own (so `actix::spawn` and starting actors work in
//! a closure, as on any Arbiter). A thread counts its handlers in flight and notes when it
//! began its current poll; a message goes to a thread that is not stuck in a poll — the one
//! with the fewest handlers in flight — and a new thread is started when every thread is
//! stuck, up to [`Settings::with_handler_threads`](crate::Settings::with_handler_threads).
//! Handlers that await (an RPC, a timer, for days) cost no thread: only the ones computing
//! hold theirs. Threads start on first use. The communicators of a process share one pool
//! (ten communicators in one program do not start ten sets of threads); its threads stop
//! when the last communicator using it is gone.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::channel::oneshot;

use crate::runtime::Runtime;

thread_local! {
    /// The pool this thread is a handler thread of (its address), or 0.
    static CURRENT_POOL: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A poll running this long means its thread is busy computing: messages go elsewhere.
const STUCK: Duration = Duration::from_millis(1);

/// Threads started before one that is merely busy (handlers in flight, none stuck) is
/// shared: a handler that is about to compute is not yet seen stuck when the next message
/// is placed.
const EAGER_THREADS: usize = 2;

/// The process's pool, while a communicator holds it.
static SHARED: Mutex<Weak<Pool>> = Mutex::new(Weak::new());

/// A pool of handler threads (see the module docs). Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct HandlerThreads(Arc<Pool>);

#[derive(Debug)]
struct Pool {
    threads: Mutex<Vec<Arc<HandlerThread>>>,
    /// Threads started at most: the largest any of the pool's users asked for.
    max: AtomicUsize,
    /// The clock polls are timed against.
    epoch: Instant,
}

#[derive(Debug)]
struct HandlerThread {
    runtime: Runtime,
    in_flight: AtomicUsize,
    /// When the current poll began, in microseconds since the pool's epoch, plus one; zero
    /// while the thread polls none of its handlers.
    polling_since: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl HandlerThreads {
    /// A pool of its own that starts at most `max` threads (at least one).
    pub(crate) fn new(max: usize) -> Self {
        Self(Arc::new(Pool {
            threads: Mutex::default(),
            max: AtomicUsize::new(max.max(1)),
            epoch: Instant::now(),
        }))
    }

    /// The process's pool, started if no communicator holds it; it may start `max` threads
    /// from now on if it could start fewer.
    pub(crate) fn shared(max: usize) -> Self {
        let mut shared = lock(&SHARED);
        if let Some(pool) = shared.upgrade() {
            pool.max.fetch_max(max.max(1), Ordering::AcqRel);
            return Self(pool);
        }
        let pool = Self::new(max);
        *shared = Arc::downgrade(&pool.0);
        pool
    }

    /// Runs the handler `make` gives on a handler thread: `make` is called there, so its
    /// future need not be `Send`. `None` if the handler never finished: the pool is
    /// stopping, or the handler panicked (callers catch panics themselves to say more).
    pub(crate) fn run<T, F, Fut>(
        &self,
        make: F,
    ) -> impl Future<Output = Option<T>> + Send + use<T, F, Fut>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let placed = self.start(move || async move {
            let _ = tx.send(make().await);
        });
        async move {
            if !placed {
                return None;
            }
            rx.await.ok()
        }
    }

    /// Runs the handling `make` gives on a handler thread, without waiting for it.
    pub(crate) fn spawn<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.start(make);
    }

    /// Places the handling `make` gives and starts it there, timed and counted in flight;
    /// `false` if no thread could take it.
    fn start<F, Fut>(&self, make: F) -> bool
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let Some(thread) = self.place() else {
            return false;
        };
        thread.in_flight.fetch_add(1, Ordering::AcqRel);
        let epoch = self.0.epoch;
        let on = thread.clone();
        let spawned = thread.runtime.arbiter().spawn_fn(move || {
            actix_rt::spawn(Timed {
                inner: Box::pin(async move { make().await }),
                thread: on,
                epoch,
            });
        });
        if !spawned {
            thread.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        spawned
    }

    /// Whether the current thread is one of these handler threads.
    pub(crate) fn is_current(&self) -> bool {
        CURRENT_POOL.with(|current| current.get() == Arc::as_ptr(&self.0) as usize)
    }

    /// The thread the next handler goes to, started when needed; `None` if none could start.
    fn place(&self) -> Option<Arc<HandlerThread>> {
        let pool = &self.0;
        let now = pool.now();
        let mut threads = lock(&pool.threads);
        let free = threads
            .iter()
            .filter(|thread| !thread.stuck(now))
            .min_by_key(|thread| thread.in_flight.load(Ordering::Acquire))
            .cloned();
        let wanted = match &free {
            None => true,
            Some(thread) => {
                thread.in_flight.load(Ordering::Acquire) > 0 && threads.len() < EAGER_THREADS
            }
        };
        if wanted && threads.len() < pool.max.load(Ordering::Acquire) {
            let name = format!("kiwimq-handlers-{}", threads.len());
            match Runtime::start(&name) {
                Ok(runtime) => {
                    let thread = Arc::new(HandlerThread {
                        runtime,
                        in_flight: AtomicUsize::new(0),
                        polling_since: AtomicU64::new(0),
                    });
                    // The thread knows it belongs to this pool: a handler already running
                    // there calls a closure subscriber in place.
                    let pool_id = Arc::as_ptr(&self.0) as usize;
                    thread.runtime.arbiter().spawn_fn(move || {
                        CURRENT_POOL.with(|current| current.set(pool_id));
                    });
                    threads.push(thread.clone());
                    return Some(thread);
                }
                Err(error) => tracing::warn!(%error, "cannot start another handler thread"),
            }
        }
        free.or_else(|| {
            threads
                .iter()
                .min_by_key(|thread| thread.in_flight.load(Ordering::Acquire))
                .cloned()
        })
    }

    /// How many threads have started.
    #[cfg(test)]
    pub(crate) fn started(&self) -> usize {
        lock(&self.0.threads).len()
    }
}

impl Pool {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

impl HandlerThread {
    fn stuck(&self, now: u64) -> bool {
        let since = self.polling_since.load(Ordering::Acquire);
        since != 0 && now.saturating_sub(since - 1) >= STUCK.as_micros() as u64
    }
}

/// A handler, counted in its thread's in-flight ones until it ends, whose polls are timed
/// on its thread, so that a poll that does not return is seen by the placing of the next
/// message.
struct Timed {
    inner: Pin<Box<dyn Future<Output = ()>>>,
    thread: Arc<HandlerThread>,
    /// The pool's clock.
    epoch: Instant,
}

impl Future for Timed {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Unpin (a box and an Arc): the fields borrow apart, nothing is cloned per poll.
        let Timed {
            inner,
            thread,
            epoch,
        } = self.get_mut();
        let since = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        thread.polling_since.store(since + 1, Ordering::Release);
        // Cleared however the poll ends, a panic included.
        struct Clear<'a>(&'a AtomicU64);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.store(0, Ordering::Release);
            }
        }
        let _clear = Clear(&thread.polling_since);
        inner.as_mut().poll(cx)
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.thread.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler computing on one thread does not hold up the next message: it goes to
    /// another thread, started for it.
    #[actix_rt::test]
    async fn a_computing_handler_does_not_hold_up_the_next() {
        let pool = HandlerThreads::new(4);
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let slow = pool.run(move || async move {
            let _ = started_tx.send(());
            // Computes (blocks its thread) until told to stop.
            let _ = release_rx.recv_timeout(Duration::from_secs(10));
            "slow"
        });
        let slow = tokio::spawn(slow);
        started_rx.await.unwrap();
        // Seen stuck once its poll has run for a while; poll for that.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let thread = lock(&pool.0.threads)[0].clone();
            if thread.stuck(pool.0.now()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the computing thread never looked stuck"
            );
            tokio::task::yield_now().await;
        }
        let fast = pool.run(|| async { "fast" }).await;
        assert_eq!(fast, Some("fast"));
        release_tx.send(()).unwrap();
        assert_eq!(slow.await.unwrap(), Some("slow"));
        assert!(pool.started() >= 2);
    }

    /// The communicators of a process share one pool while any holds it; it grows to the
    /// largest count asked for, and a new one starts once every holder is gone.
    #[test]
    fn the_process_shares_one_pool_while_it_is_held() {
        let first = HandlerThreads::shared(2);
        let second = HandlerThreads::shared(5);
        assert!(Arc::ptr_eq(&first.0, &second.0));
        assert_eq!(first.0.max.load(Ordering::Acquire), 5);
        let weak = Arc::downgrade(&first.0);
        drop((first, second));
        // Other tests of this binary may hold the pool meanwhile; only once it is gone
        // must the next one be new.
        if weak.upgrade().is_none() {
            let third = HandlerThreads::shared(1);
            assert_eq!(third.0.max.load(Ordering::Acquire), 1);
        }
    }

    /// Handlers that only await share a thread: no thread per message.
    #[actix_rt::test]
    async fn awaiting_handlers_share_threads() {
        let pool = HandlerThreads::new(8);
        let handlers: Vec<_> = (0..100u64)
            .map(|i| {
                pool.run(move || async move {
                    actix_rt::time::sleep(Duration::from_millis(20)).await;
                    i
                })
            })
            .collect();
        let sum: u64 = futures::future::join_all(handlers)
            .await
            .into_iter()
            .map(Option::unwrap)
            .sum();
        assert_eq!(sum, (0..100u64).sum::<u64>());
        assert!(pool.started() <= EAGER_THREADS, "{}", pool.started());
    }
}
