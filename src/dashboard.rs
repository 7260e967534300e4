//! A live web view of the fleet: workers (from their [presence](crate::presence)), queues,
//! throughput and round trips over the last 15 minutes, an AiiDA profile's processes by pk,
//! and a tail of broadcasts — a page with live updates (server-sent events) and a JSON API
//! beside it. Needs the `dashboard` feature.
//!
//! `kiwimq dashboard --uri … [--bind 127.0.0.1:8080] [--prefix /kiwimq]` serves it; a
//! service mounts the same in its own actix-web app:
//!
//! ```no_run
//! # async fn run(comm: kiwimq::Communicator) -> std::io::Result<()> {
//! use kiwimq::dashboard::{Dashboard, DashboardOptions};
//! let dashboard = Dashboard::start(&comm, DashboardOptions::default()).await.unwrap();
//! actix_web::HttpServer::new(move || {
//!     actix_web::App::new().service(dashboard.scope("/kiwimq"))
//! })
//! .bind(("127.0.0.1", 8080))?
//! .run()
//! .await
//! # }
//! ```
//!
//! Safe by default: the page and its assets are built into the binary (no CDN, works
//! offline); `kiwimq dashboard` binds to 127.0.0.1 and refuses another address without a
//! token ([`DashboardOptions::token`]), before it connects ([`check_serving`]); the broker
//! URI is shown with its password hidden; bad input to the API gets a 4xx with a message
//! (JSON `{"error": …}`).
//!
//! - **The token.** With one, every request but the page's script and style sheet (nothing
//!   secret: the same in every kiwimq) carries it: `Authorization: Bearer TOKEN`,
//!   `?token=TOKEN`, or the cookie a browser gets by opening the page once as
//!   `/?token=TOKEN` — which then sends it on to `/`, so the token leaves the address bar
//!   and the history, and the page's own requests (its event stream cannot carry a header)
//!   never put it in an address a log or a proxy keeps. The cookie is `HttpOnly` and
//!   `SameSite=Strict`, for the session. Without the token the page says so, in words.
//! - **DNS rebinding.** On a loopback address, a request whose `Host` is not `localhost`,
//!   127.0.0.0/8 or `[::1]` (any port) gets 421: another site's page whose name was
//!   rebound to 127.0.0.1 cannot read the page (nor its CSRF token). A proxy in front must
//!   pass a loopback `Host` (nginx's default does).
//! - **Actions** (purge, requeue dead letters) are POSTs that carry the page's CSRF token
//!   in `X-CSRF-Token`, and whose `Origin` (else `Referer`) is the page's own; one with
//!   neither (`curl`, not a browser) needs the CSRF token alone.
//!
//! # Bounds
//!
//! Everything the dashboard keeps is bounded in count and in bytes, whatever the fleet —
//! or anyone who may publish on its broker — sends it; past a bound the oldest goes first.
//! [`Dashboard::footprint`] tells what it holds.
//!
//! | what | count | bytes |
//! |---|---|---|
//! | workers (the presence [`Roster`]) | [`Roster::MAX_MEMBERS`] (10,000), the longest silent forgotten first; lost and closed ones after 15 min | [`Roster::MAX_BYTES`] (32 MiB); an announcement is at most [`Presence::MAX_BYTES`](crate::presence::Presence::MAX_BYTES) (256 KiB) |
//! | queues sampled | 200 (those of the options, the default one, then those of the workers heard most recently), besides those given in the options | a name is at most 255 bytes |
//! | chart samples | 15 min over the sample interval (at most 9,000) | 40 bytes each |
//! | AiiDA processes | 10,000, the longest silent forgotten first | pk and states cut at 500 bytes each |
//! | broadcasts of the tail | [`DashboardOptions::broadcasts_kept`] (500) | subject and sender cut at 500 bytes, body at 2,000 |
//!
//! A flood of forged announcements with distinct ids (`tests/dashboard.rs` sends 100,000)
//! thus pushes the real workers off the roster while it lasts; each is back at its next
//! announcement.
//!
//! # The JSON API (under the prefix)
//!
//! | | |
//! |---|---|
//! | `GET api/overview` | everything the page shows, at once |
//! | `GET api/workers` | the roster: each communicator's latest presence and standing |
//! | `GET api/queues` | each queue's ready, in flight, consumers, rates, dead letters |
//! | `GET api/queues/{name}` | one queue's counts, read from the broker now |
//! | `GET api/series` | throughput and round trip samples of the last 15 minutes |
//! | `GET api/processes` | AiiDA processes by pk, with their last state |
//! | `GET api/broadcasts?subject=GLOB&sender=GLOB&limit=N` | the latest broadcasts |
//! | `GET api/events` | server-sent events: the overview, at every sample |
//! | `POST api/queues/{name}/purge` | deletes the queue's ready tasks |
//! | `POST api/queues/{name}/purge-dead-letters` | deletes its dead letters |
//! | `POST api/queues/{name}/requeue-dead-letters` | sends its dead letters back to it |

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result};
use crate::filter::BroadcastFilter;
use crate::presence::{Member, Roster, Standing, now_ms};
use crate::{Broadcast, Communicator, HandlerError, Rpc};

const PAGE: &str = include_str!("dashboard/page.html");
const SCRIPT: &str = include_str!("dashboard/page.js");
const STYLE: &str = include_str!("dashboard/page.css");

/// How a [`Dashboard`] runs. Every field has a default.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DashboardOptions {
    /// A token every request but the page's assets must carry (`Authorization: Bearer
    /// TOKEN`, `?token=TOKEN`, or the cookie the page sets when opened as `?token=TOKEN`): 1
    /// to 1,024 visible ASCII characters; none: no authentication (for 127.0.0.1 only).
    pub token: Option<String>,
    /// Task queues to show besides those the workers consume (and the default queue).
    pub queues: Vec<String>,
    /// How often the queues are read, the round trip measured and the page updated.
    pub sample_every: Duration,
    /// Broadcasts kept for the tail.
    pub broadcasts_kept: usize,
}

impl Default for DashboardOptions {
    fn default() -> Self {
        Self {
            token: None,
            queues: Vec::new(),
            sample_every: Duration::from_secs(2),
            broadcasts_kept: 500,
        }
    }
}

impl DashboardOptions {
    /// Requires `token` of every request.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Shows these task queues too.
    #[must_use]
    pub fn with_queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues.extend(queues.into_iter().map(Into::into));
        self
    }

    /// Whether its token, if any, is one every way of giving it can carry: 1 to 1,024
    /// visible ASCII characters (no space).
    fn check_token(&self) -> Result<()> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        if token.is_empty() || token.len() > 1024 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::config(
                "a dashboard token is 1 to 1,024 visible ASCII characters, without spaces",
            ));
        }
        Ok(())
    }

    /// Samples every `every` (at least 100 ms).
    #[must_use]
    pub fn with_sample_every(mut self, every: Duration) -> Self {
        self.sample_every = every.max(Duration::from_millis(100));
        self
    }
}

/// History kept for the charts.
const HISTORY: Duration = Duration::from_secs(15 * 60);

/// Processes kept: the longest silent ones go first (an AiiDA profile may run millions).
const PROCESSES_KEPT: usize = 10_000;

/// Queues sampled at most: those given in the options, the default queue, then those of the
/// workers heard from most recently. Each costs two reads of the broker at every sample.
const QUEUES_SAMPLED: usize = 200;

/// The longest subject, sender, pk or state kept of a broadcast, in bytes (cut there, with
/// `…`); a body is cut at [`BODY_KEPT`].
const TEXT_KEPT: usize = 500;

/// The longest broadcast body kept, in bytes of JSON (cut there, with `…`).
const BODY_KEPT: usize = 2000;

/// A running dashboard: watchers of a communicator's fleet, and the web service showing
/// them ([`scope`](Self::scope)). Cloning is cheap; the watchers stop when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Dashboard {
    board: Arc<Board>,
}

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("uri", &self.board.uri)
            .finish_non_exhaustive()
    }
}

/// What the watchers gathered.
struct Board {
    comm: Communicator,
    options: DashboardOptions,
    uri: String,
    backend: String,
    csrf: String,
    /// Where the round trip is measured: an RPC identifier of the dashboard's own.
    ping: String,
    state: Mutex<State>,
    /// The overview as JSON, at each sample: what the live page gets.
    overview: watch::Sender<Arc<str>>,
    /// The watchers, stopped with the board.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Its broadcast subscriber, removed with the board (its ping identifier too).
    broadcasts: Mutex<Option<String>>,
    pinging: std::sync::atomic::AtomicBool,
}

impl Drop for Board {
    /// Stops the watchers and removes the board's subscribers — also when
    /// [`Dashboard::start`] was dropped half way: it registers them with the board.
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        let comm = self.comm.clone();
        let ping = self
            .pinging
            .load(std::sync::atomic::Ordering::Acquire)
            .then(|| self.ping.clone());
        let broadcasts = lock(&self.broadcasts).take();
        if ping.is_none() && broadcasts.is_none() {
            return;
        }
        self.comm.inner.runtime.spawn(async move {
            if let Some(ping) = ping {
                let _ = comm.remove_rpc_subscriber(&ping).await;
            }
            if let Some(id) = broadcasts {
                let _ = comm.remove_broadcast_subscriber(&id).await;
            }
        });
    }
}

/// What the dashboard keeps, each part bounded in count and bytes (see the module docs).
#[derive(Default)]
struct State {
    roster: Roster,
    presence: Option<String>,
    /// The queues of the last sample: at most [`QUEUES_SAMPLED`].
    queues: BTreeMap<String, QueueView>,
    /// At most [`HISTORY`] over the sample interval.
    series: VecDeque<Sample>,
    processes: Processes,
    /// At most [`DashboardOptions::broadcasts_kept`], each cut to [`BODY_KEPT`] and
    /// [`TEXT_KEPT`].
    broadcasts: VecDeque<BroadcastView>,
    /// The previous sample's totals, for rates.
    last: Option<Previous>,
}

/// AiiDA processes by pk, at most [`PROCESSES_KEPT`]: the one heard from longest ago goes
/// first.
#[derive(Default)]
struct Processes {
    by_pk: BTreeMap<String, (ProcessView, u64)>,
    /// The pks by when they were last heard, oldest first.
    order: BTreeMap<u64, String>,
    next: u64,
}

impl Processes {
    fn heard(&mut self, view: ProcessView) {
        let place = self.next;
        self.next += 1;
        if let Some((_, before)) = self.by_pk.remove(&view.pk) {
            self.order.remove(&before);
        }
        self.order.insert(place, view.pk.clone());
        self.by_pk.insert(view.pk.clone(), (view, place));
        while self.by_pk.len() > PROCESSES_KEPT {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.by_pk.remove(&oldest);
        }
    }

    fn views(&self) -> Vec<ProcessView> {
        self.by_pk.values().map(|(view, _)| view.clone()).collect()
    }
}

/// `text` cut to at most `max` bytes (at a character's boundary), marked with `…`.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
        text.push('…');
    }
    text
}

/// A sample's totals: when, tasks done, and per queue tasks done and held.
struct Previous {
    at: Instant,
    done: u64,
    queues: BTreeMap<String, (u64, u64)>,
}

/// One task queue, as the dashboard shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueueView {
    /// Its name.
    pub name: String,
    /// Tasks waiting.
    pub ready: Option<u32>,
    /// Tasks delivered and being handled (the broker's count where it gives one, else the
    /// workers' own).
    pub in_flight: u64,
    /// Consumers, over every communicator.
    pub consumers: Option<u32>,
    /// Tasks in per second, over the last sample.
    pub rate_in: f64,
    /// Tasks done per second (every outcome), over the last sample.
    pub rate_out: f64,
    /// Its dead letters, where it has a dead-letter queue.
    pub dead_letters: Option<u32>,
    /// Why its counts could not be read, if they could not.
    pub error: Option<String>,
}

/// One sample of the charts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Sample {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Tasks done per second over every worker.
    pub tasks_per_sec: f64,
    /// The broker round trip of an RPC from the dashboard to itself, in milliseconds;
    /// none if it failed.
    pub round_trip_ms: Option<f64>,
    /// Workers live.
    pub workers: usize,
}

/// An AiiDA process, from its `state_changed.<from>.<to>` broadcasts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProcessView {
    /// Its pk (the broadcasts' sender).
    pub pk: String,
    /// Its last state.
    pub state: String,
    /// The state before.
    pub previous: String,
    /// When it was heard, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// A broadcast of the tail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BroadcastView {
    /// When it was heard, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Its subject (cut at 500 bytes).
    pub subject: Option<String>,
    /// Its sender (cut at 500 bytes).
    pub sender: Option<String>,
    /// Its body, as JSON text (cut at 2,000 bytes).
    pub body: String,
}

/// Everything the page shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Overview {
    /// The broker, its password hidden.
    pub uri: String,
    /// `mem`, `amqp` or `zmq`.
    pub backend: String,
    /// Why there are no workers to show, if presence is not available.
    pub presence: Option<String>,
    /// The roster.
    pub workers: Vec<Member>,
    /// The queues.
    pub queues: Vec<QueueView>,
    /// The charts' samples, oldest first.
    pub series: Vec<Sample>,
    /// AiiDA processes by pk.
    pub processes: Vec<ProcessView>,
    /// The latest broadcasts, newest first (at most 100).
    pub broadcasts: Vec<BroadcastView>,
    /// When this was made, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Dashboard {
    /// Starts watching `comm`'s fleet: its presence exchange, every broadcast, the queues,
    /// and the round trip of an RPC of its own. Call it inside an actix (or tokio) runtime:
    /// the watchers run there. It adds an RPC subscriber (`kiwimq-dashboard-…`) and a
    /// broadcast subscriber to `comm`; both go when the last clone of the dashboard is
    /// dropped, or when this future is dropped before it resolves.
    pub async fn start(comm: &Communicator, options: DashboardOptions) -> Result<Dashboard> {
        options.check_token()?;
        // Made first, so that whatever is registered below goes with it, even if this
        // future is dropped half way.
        let board = Arc::new(Board {
            comm: comm.clone(),
            uri: comm.settings().redacted_uri(),
            backend: comm.inner.identity.backend().to_owned(),
            csrf: uuid::Uuid::new_v4().simple().to_string(),
            ping: format!("kiwimq-dashboard-{}", uuid::Uuid::new_v4().simple()),
            options,
            state: Mutex::default(),
            overview: watch::Sender::new(Arc::from("{}")),
            tasks: Mutex::default(),
            broadcasts: Mutex::default(),
            pinging: std::sync::atomic::AtomicBool::new(false),
        });
        comm.add_rpc_subscriber(Some(&board.ping), |rpc: Rpc<u64>| async move {
            Ok::<_, HandlerError>(rpc.body)
        })
        .await?;
        board
            .pinging
            .store(true, std::sync::atomic::Ordering::Release);
        let presence = match comm.watch_presence().await {
            Ok(stream) => {
                let weak = Arc::downgrade(&board);
                Some(tokio::spawn(stream.for_each(move |presence| {
                    if let Some(board) = weak.upgrade() {
                        let heard = lock(&board.state).roster.heard(presence, Instant::now());
                        if let Err(refusal) = heard {
                            crate::metrics::presence_refused(refusal.reason());
                            tracing::warn!(%refusal, "a presence announcement refused");
                        }
                    }
                    futures::future::ready(())
                })))
            }
            Err(error) => {
                lock(&board.state).presence = Some(error.to_string());
                None
            }
        };
        if let Some(presence) = presence {
            lock(&board.tasks).push(presence);
        }
        let weak = Arc::downgrade(&board);
        let heard = comm
            .add_broadcast_subscriber(
                BroadcastFilter::new(),
                move |broadcast: Broadcast<serde_json::Value>| {
                    if let Some(board) = weak.upgrade() {
                        board.heard(broadcast);
                    }
                    async { Ok::<_, HandlerError>(()) }
                },
            )
            .await?;
        *lock(&board.broadcasts) = Some(heard);
        let sampler = tokio::spawn(sample(Arc::downgrade(&board)));
        lock(&board.tasks).push(sampler);
        board.sample().await;
        Ok(Dashboard { board })
    }

    /// The page, its assets and the JSON API under `prefix` (`""` or `"/kiwimq"`), for an
    /// actix-web `App`.
    pub fn scope(&self, prefix: &str) -> actix_web::Scope {
        let prefix = prefix.trim_end_matches('/');
        let data = web::Data::new(self.clone());
        web::scope(prefix)
            .app_data(data)
            .route("", web::get().to(page))
            .route("/", web::get().to(page))
            .route("/assets/page.js", web::get().to(script))
            .route("/assets/page.css", web::get().to(style))
            .route("/api/overview", web::get().to(overview))
            .route("/api/workers", web::get().to(workers))
            .route("/api/queues", web::get().to(queues))
            .route("/api/queues/{name}", web::get().to(queue))
            .route("/api/queues/{name}/{action}", web::post().to(act))
            .route("/api/series", web::get().to(series))
            .route("/api/processes", web::get().to(processes))
            .route("/api/broadcasts", web::get().to(broadcasts))
            .route("/api/events", web::get().to(events))
            .default_service(web::to(not_found))
    }

    /// The overview now.
    pub fn overview(&self) -> Overview {
        self.board.overview()
    }

    /// What the dashboard holds now, to check against its bounds.
    pub fn footprint(&self) -> Footprint {
        let state = lock(&self.board.state);
        Footprint {
            workers: state.roster.len(),
            worker_bytes: state.roster.bytes(),
            queues: state.queues.len(),
            samples: state.series.len(),
            processes: state.processes.by_pk.len(),
            broadcasts: state.broadcasts.len(),
        }
    }
}

/// What a [`Dashboard`] holds, each part with its bound (the module docs list them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Footprint {
    /// Workers on the roster: at most [`Roster::MAX_MEMBERS`].
    pub workers: usize,
    /// Bytes of their announcements: at most [`Roster::MAX_BYTES`].
    pub worker_bytes: usize,
    /// Queues sampled: at most 200, besides those given in the options.
    pub queues: usize,
    /// Samples of the charts: at most 15 minutes over the sample interval.
    pub samples: usize,
    /// AiiDA processes: at most 10,000.
    pub processes: usize,
    /// Broadcasts of the tail: at most [`DashboardOptions::broadcasts_kept`].
    pub broadcasts: usize,
}

impl Board {
    fn heard(&self, broadcast: Broadcast<serde_json::Value>) {
        let at_ms = now_ms();
        let subject = broadcast
            .subject_text()
            .map(|s| cut(s.into_owned(), TEXT_KEPT));
        let sender = broadcast
            .sender_text()
            .map(|s| cut(s.into_owned(), TEXT_KEPT));
        let mut state = lock(&self.state);
        if let (Some(subject), Some(pk)) = (&subject, &sender)
            && let Some(change) = subject.strip_prefix("state_changed.")
        {
            let (previous, state_now) = change.split_once('.').unwrap_or(("", change));
            state.processes.heard(ProcessView {
                pk: pk.clone(),
                state: state_now.to_owned(),
                previous: previous.to_owned(),
                at_ms,
            });
        }
        let body = cut(broadcast.body.to_string(), BODY_KEPT);
        state.broadcasts.push_front(BroadcastView {
            at_ms,
            subject,
            sender,
            body,
        });
        state.broadcasts.truncate(self.options.broadcasts_kept);
    }

    /// The queues to sample: those of the options, the default one, then those of the
    /// members heard from most recently, [`QUEUES_SAMPLED`] at most.
    fn queues_to_sample(&self, members: &[Member]) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.options.queues.iter().cloned().collect();
        names.insert(self.comm.settings().task_queue().to_owned());
        let mut recent: Vec<&Member> = members.iter().collect();
        recent.sort_by(|a, b| a.silent_secs.total_cmp(&b.silent_secs));
        let announced = recent
            .into_iter()
            .flat_map(|member| &member.presence.task_queues);
        for queue in announced {
            if names.len() >= QUEUES_SAMPLED.max(self.options.queues.len() + 1) {
                break;
            }
            names.insert(queue.name.clone());
        }
        names
    }

    /// Reads the queues and the round trip, and publishes the overview.
    async fn sample(&self) {
        let started = Instant::now();
        let round_trip = match self.comm.rpc_send::<_, u64>(&self.ping, &1u64).await {
            Ok(reply) => actix_rt::time::timeout(Duration::from_secs(5), reply)
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|_| started.elapsed().as_secs_f64() * 1000.0),
            Err(_) => None,
        };
        let now = Instant::now();
        let members = lock(&self.state).roster.members(now);
        let names = self.queues_to_sample(&members);
        let live: Vec<&Member> = members
            .iter()
            .filter(|m| m.standing == Standing::Live)
            .collect();
        // Done and running per queue, over the live workers and those just lost.
        let mut per_queue: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        // Saturating: the counts come from the network.
        for member in &members {
            for queue in &member.presence.task_queues {
                if !names.contains(&queue.name) {
                    continue;
                }
                let entry = per_queue.entry(queue.name.clone()).or_default();
                entry.0 = entry.0.saturating_add(queue.counts.total());
                if member.standing == Standing::Live {
                    let running = u64::try_from(queue.running).unwrap_or(u64::MAX);
                    entry.1 = entry.1.saturating_add(running);
                }
            }
        }
        let mut views = Vec::with_capacity(names.len());
        for name in names {
            views.push(
                self.read_queue(&name, per_queue.get(&name).map_or(0, |q| q.1))
                    .await,
            );
        }
        let done = per_queue
            .values()
            .fold(0u64, |done, q| done.saturating_add(q.0));
        let mut state = lock(&self.state);
        let mut tasks_per_sec = 0.0;
        if let Some(previous) = &state.last {
            let seconds = now
                .saturating_duration_since(previous.at)
                .as_secs_f64()
                .max(1e-3);
            tasks_per_sec = done.saturating_sub(previous.done) as f64 / seconds;
            for view in &mut views {
                let (done_now, _) = per_queue.get(&view.name).copied().unwrap_or_default();
                let Some((done_before, held_before)) = previous.queues.get(&view.name) else {
                    continue;
                };
                let out = done_now.saturating_sub(*done_before) as f64;
                let held = u64::from(view.ready.unwrap_or(0)).saturating_add(view.in_flight);
                let grew = held as f64 - *held_before as f64;
                view.rate_out = out / seconds;
                view.rate_in = ((out + grew) / seconds).max(0.0);
            }
        }
        let held: BTreeMap<String, (u64, u64)> = views
            .iter()
            .map(|view| {
                let done = per_queue.get(&view.name).map_or(0, |q| q.0);
                let held = u64::from(view.ready.unwrap_or(0)).saturating_add(view.in_flight);
                (view.name.clone(), (done, held))
            })
            .collect();
        state.last = Some(Previous {
            at: now,
            done,
            queues: held,
        });
        state.queues = views.into_iter().map(|v| (v.name.clone(), v)).collect();
        state.series.push_back(Sample {
            at_ms: now_ms(),
            tasks_per_sec,
            round_trip_ms: round_trip,
            workers: live.len(),
        });
        let kept = (HISTORY.as_secs_f64() / self.options.sample_every.as_secs_f64()) as usize;
        while state.series.len() > kept.max(1) {
            state.series.pop_front();
        }
        drop(state);
        let overview = serde_json::to_string(&self.overview()).unwrap_or_default();
        self.overview.send_replace(Arc::from(overview));
    }

    async fn read_queue(&self, name: &str, running: u64) -> QueueView {
        let queue = self.comm.task_queue(name);
        let mut view = QueueView {
            name: name.to_owned(),
            in_flight: running,
            ..QueueView::default()
        };
        match queue.stats().await {
            Ok(stats) => {
                view.ready = Some(stats.ready);
                view.consumers = Some(stats.consumers);
                if let Some(unacked) = stats.unacknowledged {
                    view.in_flight = u64::from(unacked);
                }
            }
            Err(error) => view.error = Some(error.to_string()),
        }
        view.dead_letters = queue.dead_letters().stats().await.ok().map(|s| s.ready);
        view
    }

    fn overview(&self) -> Overview {
        let mut state = lock(&self.state);
        let workers = state.roster.members(Instant::now());
        Overview {
            uri: self.uri.clone(),
            backend: self.backend.clone(),
            presence: state.presence.clone(),
            workers,
            queues: state.queues.values().cloned().collect(),
            series: state.series.iter().copied().collect(),
            processes: state.processes.views(),
            broadcasts: state.broadcasts.iter().take(100).cloned().collect(),
            at_ms: now_ms(),
        }
    }
}

async fn sample(board: std::sync::Weak<Board>) {
    loop {
        let Some(every) = board.upgrade().map(|b| b.options.sample_every) else {
            return;
        };
        actix_rt::time::sleep(every).await;
        let Some(board) = board.upgrade() else {
            return;
        };
        board.sample().await;
    }
}

/// A 4xx or 5xx with a message, as JSON.
fn problem(status: StatusCode, message: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message.to_string() }))
}

fn error_response(error: &Error) -> HttpResponse {
    let status = match error.kind() {
        ErrorKind::Refused(_) | ErrorKind::Unroutable(_) => StatusCode::CONFLICT,
        ErrorKind::Closed => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    problem(status, error)
}

/// The cookie that holds the token in a browser: set by opening the page as `?token=…`, so
/// that the page's own requests — its assets, its API calls and its event stream, which
/// cannot carry a header — need no token in their addresses (where logs and proxies would
/// keep it). `HttpOnly` (the page's script never reads it) and `SameSite=Strict` (another
/// site's page cannot make the browser send it).
const TOKEN_COOKIE: &str = "kiwimq-dashboard-token";

/// The token a request carries: `Authorization: Bearer …`, else `?token=…`, else the cookie.
fn given_token(request: &HttpRequest) -> Option<String> {
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    bearer
        .or_else(|| query_token(request))
        .or_else(|| cookie_token(request))
}

fn query_token(request: &HttpRequest) -> Option<String> {
    web::Query::<BTreeMap<String, String>>::from_query(request.query_string())
        .ok()
        .and_then(|q| q.get("token").cloned())
}

/// The token in [`TOKEN_COOKIE`], which holds it in hexadecimal (any token is then a valid
/// cookie value).
fn cookie_token(request: &HttpRequest) -> Option<String> {
    let cookies = request.headers().get_all(header::COOKIE);
    let value = cookies
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value)?;
    if value.len() % 2 != 0 || !value.is_ascii() {
        return None;
    }
    let bytes = (0..value.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&value[at..at + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// How a request's token compares with the dashboard's.
#[derive(Debug, PartialEq, Eq)]
enum Token {
    /// No token needed, or the right one given.
    Right,
    Wrong,
    Missing,
}

fn token(dashboard: &Dashboard, given: Option<&str>) -> Token {
    let Some(expected) = dashboard.board.options.token.as_deref() else {
        return Token::Right;
    };
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), expected.as_bytes()) => Token::Right,
        Some(_) => Token::Wrong,
        None => Token::Missing,
    }
}

/// The request's token, checked: `None` if it may go on, else the refusal.
fn refused(dashboard: &Dashboard, request: &HttpRequest) -> Option<HttpResponse> {
    match token(dashboard, given_token(request).as_deref()) {
        Token::Right => None,
        Token::Wrong => Some(problem(StatusCode::UNAUTHORIZED, "wrong token")),
        Token::Missing => Some(
            HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
                .json(serde_json::json!({
                    "error": "this dashboard needs a token: open its page as ?token=… once \
                              (a cookie keeps it), or send Authorization: Bearer …"
                })),
        ),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// On a loopback address, refuses a request whose `Host` is not a loopback name or
/// address: a page of another site whose name was rebound to 127.0.0.1 (DNS rebinding) is
/// otherwise of the dashboard's own origin, and could read its CSRF token and act. A
/// request without `Host` (HTTP/1.0, not a browser) passes.
fn misdirected(request: &HttpRequest) -> Option<HttpResponse> {
    if !request.app_config().local_addr().ip().is_loopback() {
        return None;
    }
    let host = request.headers().get(header::HOST)?;
    if host.to_str().is_ok_and(is_loopback_host) {
        return None;
    }
    Some(problem(
        StatusCode::MISDIRECTED_REQUEST,
        format!(
            "this dashboard listens on a loopback address and answers to localhost, \
             127.0.0.1 or [::1] only, not to Host {host:?} (a guard against DNS rebinding; \
             a proxy in front must pass a loopback Host)"
        ),
    ))
}

/// Whether a `Host` header names a loopback host: `localhost`, 127.0.0.0/8 or `[::1]`,
/// with any port or none.
fn is_loopback_host(host: &str) -> bool {
    let is_port = |port: &str| !port.is_empty() && port.parse::<u16>().is_ok();
    if let Some(rest) = host.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return false;
        };
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(is_port);
        return port_ok
            && inside
                .parse::<std::net::Ipv6Addr>()
                .is_ok_and(|ip| ip.is_loopback());
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if is_port(port) => name,
        Some(_) => return false,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a POST whose `Origin` (or, without one, `Referer`) is not the page's own: the
/// host the request was sent to. One with neither (not a browser: `curl`) passes; it still
/// needs the CSRF token.
fn cross_origin(request: &HttpRequest) -> Option<HttpResponse> {
    let headers = request.headers();
    let claimed = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))?;
    let info = request.connection_info();
    let own = info.host();
    let authority = claimed.to_str().ok().and_then(|url| {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))?;
        rest.split(['/', '?', '#']).next()
    });
    if authority.is_some_and(|authority| authority.eq_ignore_ascii_case(own)) {
        return None;
    }
    Some(problem(
        StatusCode::FORBIDDEN,
        format!(
            "an action from another origin ({claimed:?}) is refused: only the dashboard's \
             own page (http://{own}) may act"
        ),
    ))
}

/// Refuses, with its answer, what the request may not do: any request on a loopback
/// address with another `Host`; without the token, anything but the assets.
macro_rules! authorized {
    ($dashboard:expr, $request:expr) => {
        if let Some(refusal) = misdirected(&$request).or_else(|| refused(&$dashboard, &$request)) {
            return refusal;
        }
    };
}

fn no_store(mut response: HttpResponse) -> HttpResponse {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The page says why it shows nothing: shown instead of the dashboard without its token.
const NEEDS_TOKEN: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>kiwimq dashboard: token needed</title>
<link rel="stylesheet" href="{{base}}assets/page.css">
</head>
<body>
<header><h1>kiwimq</h1></header>
<main><p class="alert" id="needs-token">{{why}}</p></main>
</body>
</html>
"#;

/// The page, or why not: `?token=…` sets the cookie and sends the browser on to the page
/// without the token in its address.
async fn page(dashboard: web::Data<Dashboard>, request: HttpRequest) -> HttpResponse {
    if let Some(refusal) = misdirected(&request) {
        return refusal;
    }
    let path = request.path();
    // Relative links resolve under the prefix with or without its trailing slash.
    let base = if path.ends_with('/') {
        path.to_owned()
    } else {
        format!("{path}/")
    };
    let needs_token = |why: &str| {
        let html = NEEDS_TOKEN
            .replace("{{base}}", &html_escape(&base))
            .replace("{{why}}", &html_escape(why));
        no_store(
            HttpResponse::Unauthorized()
                .content_type("text/html; charset=utf-8")
                .insert_header((header::CONTENT_SECURITY_POLICY, PAGE_POLICY))
                .body(html),
        )
    };
    if let Some(given) = query_token(&request) {
        if token(&dashboard, Some(&given)) != Token::Right {
            return needs_token(
                "The token in this address is not this dashboard's: open it again with the \
                 token it was started with (kiwimq dashboard --token, or \
                 KIWIMQ_DASHBOARD_TOKEN).",
            );
        }
        let cookie = format!(
            "{TOKEN_COOKIE}={}; Path={base}; HttpOnly; SameSite=Strict",
            hex(&given)
        );
        return no_store(
            HttpResponse::SeeOther()
                .insert_header((header::LOCATION, base.as_str()))
                .insert_header((header::SET_COOKIE, cookie))
                .insert_header((header::REFERRER_POLICY, "no-referrer"))
                .finish(),
        );
    }
    let given = given_token(&request);
    match token(&dashboard, given.as_deref()) {
        Token::Right => {}
        Token::Wrong => {
            return needs_token(
                "This browser holds a token that is not this dashboard's (was it restarted \
                 with another?): open it again as ?token=… with the token it was started \
                 with.",
            );
        }
        Token::Missing => {
            return needs_token(
                "This dashboard needs its token: open it once as ?token=… with the token it \
                 was started with (kiwimq dashboard --token, or KIWIMQ_DASHBOARD_TOKEN); this \
                 browser then keeps it in a cookie until it closes.",
            );
        }
    }
    let html = PAGE
        .replace("{{csrf}}", &dashboard.board.csrf)
        .replace("{{base}}", &html_escape(&base))
        .replace("{{uri}}", &html_escape(&dashboard.board.uri));
    no_store(
        HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header((header::CONTENT_SECURITY_POLICY, PAGE_POLICY))
            .insert_header((header::X_FRAME_OPTIONS, "DENY"))
            .body(html),
    )
}

/// Scripts, styles and requests from the dashboard itself only; never in a frame.
const PAGE_POLICY: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'";

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The script: no secret in it (it is the same in every kiwimq), so served without the
/// token — the page that loads it sends no token with it.
async fn script(request: HttpRequest) -> HttpResponse {
    if let Some(refusal) = misdirected(&request) {
        return refusal;
    }
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(SCRIPT)
}

/// The style sheet, served without the token, as the script.
async fn style(request: HttpRequest) -> HttpResponse {
    if let Some(refusal) = misdirected(&request) {
        return refusal;
    }
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .body(STYLE)
}

async fn overview(dashboard: web::Data<Dashboard>, request: HttpRequest) -> HttpResponse {
    authorized!(dashboard, request);
    no_store(HttpResponse::Ok().json(dashboard.overview()))
}

async fn workers(dashboard: web::Data<Dashboard>, request: HttpRequest) -> HttpResponse {
    authorized!(dashboard, request);
    let overview = dashboard.overview();
    no_store(HttpResponse::Ok().json(serde_json::json!({
        "presence": overview.presence,
        "workers": overview.workers,
    })))
}

async fn queues(dashboard: web::Data<Dashboard>, request: HttpRequest) -> HttpResponse {
    authorized!(dashboard, request);
    no_store(HttpResponse::Ok().json(dashboard.overview().queues))
}

async fn series(dashboard: web::Data<Dashboard>, request: HttpRequest) -> HttpResponse {
    authorized!(dashboard, request);
    no_store(HttpResponse::Ok().json(dashboard.overview().series))
}

async fn processes(dashboard: web::Data<Dashboard>, request: HttpRequest) -> HttpResponse {
    authorized!(dashboard, request);
    no_store(HttpResponse::Ok().json(dashboard.overview().processes))
}

/// A queue name from a path: not empty, at most 255 bytes (AMQP's limit), no control
/// characters.
pub(crate) fn queue_name(name: &str) -> std::result::Result<&str, Box<HttpResponse>> {
    if !crate::presence::is_queue_name(name) {
        return Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            "a queue name is 1 to 255 bytes without control characters",
        )));
    }
    Ok(name)
}

async fn queue(
    dashboard: web::Data<Dashboard>,
    request: HttpRequest,
    name: web::Path<String>,
) -> HttpResponse {
    authorized!(dashboard, request);
    let name = match queue_name(&name) {
        Ok(name) => name,
        Err(response) => return *response,
    };
    let running = {
        let state = lock(&dashboard.board.state);
        state.queues.get(name).map_or(0, |q| q.in_flight)
    };
    let view = dashboard.board.read_queue(name, running).await;
    match &view.error {
        Some(error) => problem(StatusCode::NOT_FOUND, error),
        None => no_store(HttpResponse::Ok().json(view)),
    }
}

/// `?subject=GLOB&sender=GLOB&limit=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TailQuery {
    pub(crate) subject: Option<String>,
    pub(crate) sender: Option<String>,
    pub(crate) limit: Option<usize>,
    #[serde(rename = "token")]
    _token: Option<String>,
}

/// The longest subject or sender pattern a tail query takes. A glob compiles to a regular
/// expression on every request: one of 30 KB took a second and a half and then did not
/// compile at all (a panic); subjects and senders are short names.
const PATTERN_MAX: usize = 255;

impl TailQuery {
    /// The query's filter and limit, checked: a limit from 1 to 500 (100 if none), patterns
    /// of at most [`PATTERN_MAX`] bytes.
    pub(crate) fn checked(&self) -> std::result::Result<(BroadcastFilter, usize), &'static str> {
        let limit = self.limit.unwrap_or(100);
        if !(1..=500).contains(&limit) {
            return Err("limit is from 1 to 500");
        }
        let patterns = [&self.subject, &self.sender];
        if patterns
            .iter()
            .any(|p| p.as_ref().is_some_and(|p| p.len() > PATTERN_MAX))
        {
            return Err("a subject or sender pattern is at most 255 bytes");
        }
        let mut filter = BroadcastFilter::new();
        if let Some(subject) = &self.subject {
            filter = filter.subject(subject);
        }
        if let Some(sender) = &self.sender {
            filter = filter.sender(sender);
        }
        Ok((filter, limit))
    }
}

async fn broadcasts(dashboard: web::Data<Dashboard>, request: HttpRequest) -> HttpResponse {
    authorized!(dashboard, request);
    let query = match web::Query::<TailQuery>::from_query(request.query_string()) {
        Ok(query) => query.into_inner(),
        Err(error) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("{error} (expected subject=GLOB, sender=GLOB, limit=1..=500)"),
            );
        }
    };
    let (filter, limit) = match query.checked() {
        Ok(checked) => checked,
        Err(refusal) => return problem(StatusCode::BAD_REQUEST, refusal),
    };
    let state = lock(&dashboard.board.state);
    let tail: Vec<&BroadcastView> = state
        .broadcasts
        .iter()
        .filter(|b| {
            let subject_ok = query.subject.is_none() || b.subject.is_some();
            let sender_ok = query.sender.is_none() || b.sender.is_some();
            subject_ok && sender_ok && filter.matches(b.subject.as_deref(), b.sender.as_deref())
        })
        .take(limit)
        .collect();
    no_store(HttpResponse::Ok().json(tail))
}

async fn act(
    dashboard: web::Data<Dashboard>,
    request: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    authorized!(dashboard, request);
    if let Some(refusal) = cross_origin(&request) {
        return refusal;
    }
    let csrf = request
        .headers()
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok());
    if !csrf.is_some_and(|csrf| constant_time_eq(csrf.as_bytes(), dashboard.board.csrf.as_bytes()))
    {
        return problem(
            StatusCode::FORBIDDEN,
            "an action needs the page's CSRF token in the X-CSRF-Token header",
        );
    }
    let (name, action) = path.into_inner();
    let name = match queue_name(&name) {
        Ok(name) => name,
        Err(response) => return *response,
    };
    let queue = dashboard.board.comm.task_queue(name);
    let done = match action.as_str() {
        "purge" => queue.purge().await,
        "purge-dead-letters" => queue.dead_letters().purge().await,
        "requeue-dead-letters" => queue.requeue_dead_letters().await,
        other => {
            return problem(
                StatusCode::NOT_FOUND,
                format!("no action '{other}': purge, purge-dead-letters or requeue-dead-letters"),
            );
        }
    };
    match done {
        Ok(count) => {
            tracing::info!(queue = name, %action, count, "dashboard action");
            let board = dashboard.board.clone();
            actix_rt::spawn(async move { board.sample().await });
            HttpResponse::Ok()
                .json(serde_json::json!({ "queue": name, "action": action, "count": count }))
        }
        Err(error) => error_response(&error),
    }
}

async fn events(dashboard: web::Data<Dashboard>, request: HttpRequest) -> HttpResponse {
    authorized!(dashboard, request);
    let mut overview = dashboard.board.overview.subscribe();
    overview.mark_changed();
    let stream = futures::stream::unfold(overview, |mut overview| async move {
        overview.changed().await.ok()?;
        let data = overview.borrow_and_update().clone();
        let event = web::Bytes::from(format!("event: overview\ndata: {data}\n\n"));
        Some((Ok::<_, actix_web::Error>(event), overview))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(stream)
}

async fn not_found(dashboard: web::Data<Dashboard>, request: HttpRequest) -> HttpResponse {
    authorized!(dashboard, request);
    problem(
        StatusCode::NOT_FOUND,
        format!(
            "no such page or API: {} {}",
            request.method(),
            request.path()
        ),
    )
}

/// Whether a dashboard may be served on `bind` with `options`: its token, if any, is one a
/// header and a cookie can carry ([`DashboardOptions::token`]), and an address other than a
/// loopback one needs a token. `kiwimq dashboard` checks this before it connects.
pub fn check_serving(bind: std::net::SocketAddr, options: &DashboardOptions) -> Result<()> {
    options.check_token()?;
    if !bind.ip().is_loopback() && options.token.is_none() {
        return Err(Error::config(format!(
            "refusing to serve the dashboard on {bind} without a token: anyone who reaches it \
             could purge queues (give --token, or bind to 127.0.0.1)"
        )));
    }
    Ok(())
}

/// Serves a dashboard of `comm` on `bind` under `prefix` until the process is told to stop
/// (SIGINT or SIGTERM): what `kiwimq dashboard` runs. Refuses what [`check_serving`]
/// refuses, and an address it cannot listen on, before it starts watching.
pub async fn serve(
    comm: &Communicator,
    bind: std::net::SocketAddr,
    prefix: &str,
    options: DashboardOptions,
) -> Result<()> {
    check_serving(bind, &options)?;
    serve_on(comm, listen(bind)?, prefix, options).await
}

/// A listening socket on `bind`, for [`serve_on`].
pub fn listen(bind: std::net::SocketAddr) -> Result<std::net::TcpListener> {
    std::net::TcpListener::bind(bind)
        .map_err(|e| Error::config(format!("cannot listen on {bind}: {e}")))
}

/// As [`serve`], on a socket already listening ([`listen`]): a program can then check its
/// address before it connects to the broker, as `kiwimq dashboard` does.
pub async fn serve_on(
    comm: &Communicator,
    listener: std::net::TcpListener,
    prefix: &str,
    options: DashboardOptions,
) -> Result<()> {
    let bind = listener
        .local_addr()
        .map_err(|e| Error::config(format!("a listening socket without an address: {e}")))?;
    check_serving(bind, &options)?;
    let dashboard = Dashboard::start(comm, options).await?;
    let prefix = prefix.to_owned();
    let server =
        actix_web::HttpServer::new(move || actix_web::App::new().service(dashboard.scope(&prefix)))
            .workers(1)
            .disable_signals()
            .listen(listener)
            .map_err(|e| Error::config(format!("cannot listen on {bind}: {e}")))?
            .run();
    let handle = server.handle();
    actix_rt::spawn(async move {
        crate::shutdown_signal().await;
        handle.stop(true).await;
    });
    server
        .await
        .map_err(|e| Error::connection(format!("the dashboard's server failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(query: &str) -> std::result::Result<(BroadcastFilter, usize), &'static str> {
        web::Query::<TailQuery>::from_query(query)
            .expect("a tail query")
            .checked()
    }

    /// Found while fuzzing the dashboard's parameters: a glob of 30 KB in `?subject=` took
    /// the handler 1.5 s to compile and then panicked (too big a regular expression).
    #[test]
    fn a_tail_pattern_longer_than_255_bytes_is_refused_not_compiled() {
        assert!(tail(&format!("subject={}", "*a".repeat(15_000))).is_err());
        assert!(tail(&format!("sender={}", "x".repeat(256))).is_err());
        assert!(tail(&format!("sender={}", "x".repeat(255))).is_ok());
        let (filter, limit) = tail("subject=state_changed.*&sender=47").unwrap();
        assert_eq!(limit, 100);
        assert!(filter.matches(Some("state_changed.created.running"), Some("47")));
        assert!(tail("limit=0").is_err());
        assert!(tail("limit=501").is_err());
    }
}
