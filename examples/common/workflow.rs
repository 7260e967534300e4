//! Workflow processes as actors, on plumpy's control protocol (AiiDA's): each process is an
//! actor that listens on RPC identifier `<pid>` for `{"intent": "pause"|"play"|"kill"|
//! "status", "message": …}`, announces each state change as a broadcast with subject
//! `state_changed.<from>.<to>` and sender = pid (an integer), and is launched by a task
//! `{"task": "continue", "args": {"pid": …, "nowait": …, "tag": …}}` on the process queue.
//! Shared by `examples/workflow.rs` and its test.

#![allow(dead_code)] // the example and the test each use part of it

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use kiwimq::{BroadcastOptions, HandlerError, Rpc, Task, Value, WeakCommunicator};

/// A process's state, as plumpy names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Created,
    Running,
    Waiting,
    Finished,
    Killed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Finished => "finished",
            Self::Killed => "killed",
        }
    }

    fn is_terminal(self) -> bool {
        matches!(self, Self::Finished | Self::Killed)
    }
}

/// A workflow process: `steps` steps of `step` each, running and waiting in turn.
pub(crate) struct Process {
    pid: i64,
    /// Weak: the communicator holds this process (its RPC subscriber), so a strong handle
    /// here would keep the communicator open for ever.
    comm: WeakCommunicator,
    state: State,
    paused: bool,
    steps_left: u32,
    step: Duration,
    ctime: f64,
    /// Told the outcome when the process ends (the launching task's reply).
    done: Option<oneshot::Sender<Result<Value, HandlerError>>>,
    /// State changes to announce, sent one after another so they arrive in order.
    announce: mpsc::UnboundedSender<String>,
}

impl Process {
    fn new(pid: i64, comm: WeakCommunicator, steps: u32, step: Duration) -> Self {
        let ctime = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |t| t.as_secs_f64());
        let (announce, subjects) = mpsc::unbounded::<String>();
        let announcer = comm.clone();
        actix::spawn(async move {
            let mut subjects = subjects;
            while let Some(subject) = subjects.next().await {
                let options = BroadcastOptions::subject(subject).with_sender(pid);
                let Some(announcer) = announcer.upgrade() else {
                    return; // the communicator is gone, and the process with it
                };
                if let Err(error) = announcer.broadcast_send(&Value::Nil, options).await {
                    eprintln!("a state change of process {pid} was not announced: {error}");
                }
            }
        });
        Self {
            pid,
            comm,
            state: State::Created,
            paused: false,
            steps_left: steps,
            step,
            ctime,
            done: None,
            announce,
        }
    }

    /// Moves to `to` and broadcasts `state_changed.<from>.<to>` from the pid.
    fn transition(&mut self, to: State) {
        let from = self.state;
        self.state = to;
        let subject = format!("state_changed.{}.{}", from.name(), to.name());
        let _ = self.announce.unbounded_send(subject);
        if to.is_terminal() {
            let outcome = match to {
                State::Finished => Ok(Value::Map(vec![("result".into(), self.pid.into())])),
                _ => Err(HandlerError::failed(format!(
                    "process {} was killed",
                    self.pid
                ))),
            };
            if let Some(done) = self.done.take() {
                let _ = done.send(outcome);
            }
            // Its RPC identifier goes with it.
            if let Some(comm) = self.comm.upgrade() {
                let pid = self.pid.to_string();
                actix::spawn(async move {
                    let _ = comm.remove_rpc_subscriber(&pid).await;
                });
            }
        }
    }

    /// Runs the next step, unless paused or over.
    fn advance(&mut self, ctx: &mut Context<Self>) {
        if self.paused || self.state.is_terminal() {
            return;
        }
        if self.steps_left == 0 {
            self.transition(State::Finished);
            return;
        }
        self.steps_left -= 1;
        if self.state != State::Running {
            self.transition(State::Running);
        }
        ctx.run_later(self.step, |process, ctx| {
            if process.state.is_terminal() {
                return;
            }
            process.transition(State::Waiting);
            process.advance(ctx);
        });
    }

    fn status(&self) -> Value {
        Value::Map(vec![
            ("ctime".into(), Value::F64(self.ctime)),
            ("paused".into(), self.paused.into()),
            (
                "process_string".into(),
                format!("<Process pk={}>", self.pid).into(),
            ),
            ("state".into(), self.state.name().into()),
        ])
    }
}

impl Actor for Process {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // plumpy's first announcement: from no state to created.
        let _ = self
            .announce
            .unbounded_send("state_changed.None.created".to_owned());
        self.advance(ctx);
    }
}

/// The control requests: `{"intent": …, "message": …}`. Replies are plumpy's: `true`, or a
/// status map.
impl Handler<Rpc<Value>> for Process {
    type Result = Result<Value, HandlerError>;

    fn handle(&mut self, rpc: Rpc<Value>, ctx: &mut Context<Self>) -> Self::Result {
        let intent = rpc.body["intent"].as_str().unwrap_or_default();
        match intent {
            "status" => Ok(self.status()),
            "pause" => {
                self.paused = !self.state.is_terminal();
                Ok(Value::from(self.paused))
            }
            "play" => {
                let was_paused = std::mem::take(&mut self.paused);
                if was_paused {
                    self.advance(ctx);
                }
                Ok(Value::from(true))
            }
            "kill" => {
                if self.state.is_terminal() {
                    return Ok(Value::from(false));
                }
                self.transition(State::Killed);
                Ok(Value::from(true))
            }
            other => Err(HandlerError::failed(format!("unknown intent '{other}'"))),
        }
    }
}

/// Wants the process's outcome when it ends.
#[derive(Message)]
#[rtype(result = "()")]
struct WhenDone(oneshot::Sender<Result<Value, HandlerError>>);

impl Handler<WhenDone> for Process {
    type Result = ();

    fn handle(&mut self, WhenDone(done): WhenDone, _: &mut Context<Self>) {
        self.done = Some(done);
    }
}

/// Launches processes on `continue` tasks: starts the process actor, serves its pid, and
/// answers with the pid (`nowait`) or with the process's outputs once it ends.
pub(crate) struct Launcher {
    /// Weak, as a process's: the communicator holds this launcher.
    pub(crate) comm: WeakCommunicator,
    pub(crate) steps: u32,
    pub(crate) step: Duration,
}

impl Actor for Launcher {
    type Context = Context<Self>;
}

impl Handler<Task<Value>> for Launcher {
    type Result = ResponseFuture<Result<Value, HandlerError>>;

    fn handle(&mut self, task: Task<Value>, _: &mut Context<Self>) -> Self::Result {
        let comm = self.comm.clone();
        let (steps, step) = (self.steps, self.step);
        Box::pin(async move {
            if task.body["task"].as_str() != Some("continue") {
                return Err(HandlerError::failed(format!("unknown task {}", task.body)));
            }
            let args = &task.body["args"];
            let Some(pid) = args["pid"].as_i64() else {
                return Ok(Value::from(false)); // as AiiDA answers for an unknown pk
            };
            let nowait = args["nowait"].as_bool().unwrap_or(false);
            let process = Process::new(pid, comm.clone(), steps, step).start();
            let comm = comm.communicator().map_err(HandlerError::from)?;
            let (done, outcome) = oneshot::channel();
            process.do_send(WhenDone(done));
            comm.add_rpc_subscriber(Some(&pid.to_string()), process)
                .await
                .map_err(HandlerError::from)?;
            drop(comm); // a running process keeps no strong handle
            if nowait {
                return Ok(Value::from(pid));
            }
            outcome
                .await
                .unwrap_or_else(|_| Err(HandlerError::failed("the process vanished")))
        })
    }
}

/// The launch task of process `pid`, as AiiDA sends it.
pub(crate) fn continue_task(pid: i64, nowait: bool) -> Value {
    let args = Value::Map(vec![
        ("pid".into(), pid.into()),
        ("nowait".into(), nowait.into()),
        ("tag".into(), Value::Nil),
    ]);
    Value::Map(vec![
        ("task".into(), "continue".into()),
        ("args".into(), args),
    ])
}

/// A control request, as AiiDA's `verdi process pause|play|kill|status` sends it.
pub(crate) fn intent(intent: &str) -> Value {
    Value::Map(vec![
        ("intent".into(), intent.into()),
        ("message".into(), Value::Nil),
    ])
}
