//! The processes envd started, and the fan-out of their events to the
//! clients attached to them (`Start` and any number of `Connect` calls).
//!
//! A process stays in the table from spawn until it has exited and its
//! output is drained; it is removed as its end event is handed to the
//! attached clients, as in E2B's envd.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use schema::envd::process::{
    ProcessConfig, ProcessEvent, ProcessInfo, ProcessSelector, process_event, process_input,
    process_selector,
};
use tokio::process::ChildStdin;
use tokio::sync::{mpsc, watch};

use super::pty::PtyMaster;
use crate::connect::{Code, ConnectError};

/// Events buffered per attached client before the process's output waits
/// for it (back-pressure, as E2B's envd does).
const SUBSCRIBER_BUFFER: usize = 64;

/// The running processes, by pid.
#[derive(Default)]
pub struct ProcessTable {
    procs: Mutex<HashMap<u32, Arc<ProcessHandle>>>,
}

impl ProcessTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Arc<ProcessHandle>>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, handle: Arc<ProcessHandle>) {
        self.lock().insert(handle.pid, handle);
    }

    pub fn remove(&self, pid: u32) {
        self.lock().remove(&pid);
    }

    /// The process a selector names: `not_found` when none does (the SDK's
    /// `kill()` turns that into `False`).
    pub fn find(
        &self,
        selector: Option<&ProcessSelector>,
    ) -> Result<Arc<ProcessHandle>, ConnectError> {
        let selector = selector.and_then(|s| s.selector.as_ref()).ok_or_else(|| {
            ConnectError::invalid_argument("the request names no process: give a pid or a tag")
        })?;
        let procs = self.lock();
        match selector {
            process_selector::Selector::Pid(pid) => procs.get(pid).cloned().ok_or_else(|| {
                ConnectError::not_found(format!("process with pid {pid} not found"))
            }),
            process_selector::Selector::Tag(tag) => procs
                .values()
                .filter(|p| p.tag.as_deref() == Some(tag.as_str()))
                .min_by_key(|p| p.pid)
                .cloned()
                .ok_or_else(|| {
                    ConnectError::not_found(format!("process with tag {tag:?} not found"))
                }),
        }
    }

    /// Every process in the table, ordered by pid.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let procs = self.lock();
        let sorted: BTreeMap<u32, &Arc<ProcessHandle>> =
            procs.iter().map(|(k, v)| (*k, v)).collect();
        sorted
            .into_values()
            .map(|p| ProcessInfo {
                config: Some(p.config.clone()),
                pid: p.pid,
                tag: p.tag.clone(),
            })
            .collect()
    }
}

/// How a client's input reaches the process.
pub enum Input {
    /// Plain pipes. `None` inside the mutex once closed (CloseStdin); the
    /// outer `Option` is `None` when the process was started with
    /// `stdin: false` and reads /dev/null.
    Pipe(Option<tokio::sync::Mutex<Option<ChildStdin>>>),
    Pty(Arc<PtyMaster>),
}

/// One process envd started.
pub struct ProcessHandle {
    pub pid: u32,
    pub tag: Option<String>,
    /// The configuration as the client gave it (what `List` reports).
    pub config: ProcessConfig,
    input: Input,
    subscribers: Mutex<Subscribers>,
    /// False once the process has been reaped: its pid may then belong to
    /// another process, so signals must no longer be sent to it.
    alive: Mutex<bool>,
    /// Flips to true when the end event is published (stops the
    /// Connect-Timeout-Ms killer).
    ended: watch::Sender<bool>,
}

#[derive(Default)]
struct Subscribers {
    senders: Vec<mpsc::Sender<ProcessEvent>>,
    end: Option<process_event::EndEvent>,
}

/// What attaching to a process yields.
pub enum Subscription {
    /// Events as they come, ending with the end event.
    Live(mpsc::Receiver<ProcessEvent>),
    /// The process had already ended (its end event is being delivered).
    Ended(process_event::EndEvent),
}

impl ProcessHandle {
    pub fn new(pid: u32, tag: Option<String>, config: ProcessConfig, input: Input) -> Self {
        Self {
            pid,
            tag,
            config,
            input,
            subscribers: Mutex::default(),
            alive: Mutex::new(true),
            ended: watch::Sender::new(false),
        }
    }

    fn subs(&self) -> MutexGuard<'_, Subscribers> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attach a client: it gets every event published from now on.
    pub fn subscribe(&self) -> Subscription {
        let mut subs = self.subs();
        if let Some(end) = &subs.end {
            return Subscription::Ended(end.clone());
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        subs.senders.push(tx);
        Subscription::Live(rx)
    }

    /// Hand an output event to every attached client, waiting for slow ones.
    /// With nobody attached the output is dropped; the process runs on.
    pub async fn publish(&self, event: ProcessEvent) {
        let senders = self.subs().senders.clone();
        let mut gone = false;
        for s in &senders {
            gone |= s.send(event.clone()).await.is_err();
        }
        if gone {
            // Clients that disconnected dropped their receivers.
            self.subs().senders.retain(|s| !s.is_closed());
        }
    }

    /// Publish the end event: each attached client gets it after the output
    /// queued for it; later subscribers get it directly.
    pub fn finish(&self, end: process_event::EndEvent) {
        let senders = {
            let mut subs = self.subs();
            subs.end = Some(end.clone());
            std::mem::take(&mut subs.senders)
        };
        let event = ProcessEvent {
            event: Some(process_event::Event::End(end)),
        };
        for s in senders {
            let event = event.clone();
            // A slow client must not hold up the others or the table.
            tokio::spawn(async move {
                let _ = s.send(event).await;
            });
        }
        self.ended.send_replace(true);
    }

    /// Resolves once the end event is published.
    pub async fn wait_ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|ended| *ended).await;
    }

    /// Record that the process was reaped.
    pub fn mark_exited(&self) {
        *self.alive.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }

    /// Send `signal` to the process and its process group (every process
    /// envd starts leads its own session, so children started by a shell
    /// die with it). A process that has already exited is left alone.
    pub fn signal(&self, signal: libc::c_int) -> Result<(), ConnectError> {
        let alive = self.alive.lock().unwrap_or_else(|p| p.into_inner());
        if !*alive {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.pid)
            .map_err(|_| ConnectError::internal(format!("pid {} out of range", self.pid)))?;
        // SAFETY: kill has no memory-safety preconditions.
        let group = unsafe { libc::kill(-pid, signal) };
        if group == 0 {
            return Ok(());
        }
        // No such group (the process left it with setsid/setpgid): the
        // process alone.
        // SAFETY: as above.
        if unsafe { libc::kill(pid, signal) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        Err(ConnectError::internal(format!(
            "signalling process {}: {err}",
            self.pid
        )))
    }

    /// Write client input to the process's stdin pipe or PTY.
    pub async fn write_input(
        &self,
        input: Option<&process_input::Input>,
    ) -> Result<(), ConnectError> {
        let pid = self.pid;
        let precondition = |m: String| ConnectError::new(Code::FailedPrecondition, m);
        match (input, &self.input) {
            (None, _) => Err(ConnectError::invalid_argument(
                "the input is empty: give stdin or pty bytes",
            )),
            (Some(process_input::Input::Pty(data)), Input::Pty(master)) => {
                master.write_all(data).await.map_err(|e| {
                    precondition(format!("writing to the terminal of process {pid}: {e}"))
                })
            }
            (Some(process_input::Input::Pty(_)), Input::Pipe(_)) => Err(precondition(format!(
                "process {pid} has no PTY: send its input as stdin, not pty"
            ))),
            (Some(process_input::Input::Stdin(_)), Input::Pty(_)) => Err(precondition(format!(
                "process {pid} runs in a PTY: send its input as pty, not stdin"
            ))),
            (Some(process_input::Input::Stdin(_)), Input::Pipe(None)) => {
                Err(precondition(format!(
                    "process {pid} was started without stdin (stdin: false), so it takes no input"
                )))
            }
            (Some(process_input::Input::Stdin(data)), Input::Pipe(Some(stdin))) => {
                write_pipe(pid, stdin, data).await
            }
        }
    }

    /// Close the stdin pipe so the process reads end-of-file. Closing twice,
    /// or a process without stdin, is not an error (as in E2B's envd).
    pub async fn close_stdin(&self) -> Result<(), ConnectError> {
        match &self.input {
            Input::Pty(_) => Err(ConnectError::new(
                Code::FailedPrecondition,
                format!(
                    "process {} runs in a PTY, which has no stdin to close: send Ctrl+D (0x04) as pty input instead",
                    self.pid
                ),
            )),
            Input::Pipe(None) => Ok(()),
            Input::Pipe(Some(stdin)) => {
                drop(stdin.lock().await.take());
                Ok(())
            }
        }
    }

    /// Resize the PTY.
    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), ConnectError> {
        match &self.input {
            Input::Pty(master) => master.resize(cols, rows).map_err(|e| {
                ConnectError::internal(format!(
                    "resizing the terminal of process {}: {e}",
                    self.pid
                ))
            }),
            Input::Pipe(_) => Err(ConnectError::new(
                Code::FailedPrecondition,
                format!(
                    "process {} was not started with a PTY, so it cannot be resized",
                    self.pid
                ),
            )),
        }
    }
}

async fn write_pipe(
    pid: u32,
    stdin: &tokio::sync::Mutex<Option<ChildStdin>>,
    data: &Bytes,
) -> Result<(), ConnectError> {
    use tokio::io::AsyncWriteExt;
    let mut guard = stdin.lock().await;
    let Some(pipe) = guard.as_mut() else {
        return Err(ConnectError::new(
            Code::FailedPrecondition,
            format!("the stdin of process {pid} has been closed"),
        ));
    };
    pipe.write_all(data).await.map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::BrokenPipe {
            Code::FailedPrecondition
        } else {
            Code::Internal
        };
        ConnectError::new(code, format!("writing to the stdin of process {pid}: {e}"))
    })
}
