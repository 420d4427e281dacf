//! The control socket: a std thread serving `schema::vmm` requests on a
//! unix socket, driving the vCPUs through a [`VmController`].
//!
//! Connections are served one at a time (the node is the only client);
//! each may send any number of requests. A frame that is too large or not
//! JSON gets an `Error` response and the connection is closed (its framing
//! can no longer be trusted); a request of another protocol version gets
//! an `Error` naming both versions. A client that stalls mid-frame is cut
//! off after [`CLIENT_TIMEOUT`].
//!
//! [`VmController`] owns the running vCPUs. `Pause`/`Resume` park and
//! release every vCPU; `Shutdown` posts [`ExitReason::Stopped`] on the VM's
//! [`ExitRequest`], which [`VmController::run_until_exit`] (the VMM's main
//! thread) turns into stopping the vCPUs.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use schema::vmm::{
    FrameError, Request, RequestFrame, Response, ResponseFrame, VmState, decode, read_frame_body,
    write_frame,
};

use crate::builder::Machine;
use crate::snapshot::{self, SnapshotError, SnapshotInfo, SnapshotKind, SnapshotOptions};
use crate::vstate::exit::{ExitReason, ExitRequest};
use crate::vstate::vcpu::{VcpuError, VcpuHandle};

/// Errors of a snapshot request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("snapshot failed: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("this VMM was started without snapshot support")]
    NoMachine,
    #[error("snapshot directory must be an absolute path, not {0:?}")]
    RelativeDir(String),
}

/// How long a vCPU may take to park or resume.
pub const VCPU_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may stall inside a frame.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop and the run loop look for work.
const POLL: Duration = Duration::from_millis(10);

/// The running vCPUs and what the control socket reports about them.
#[derive(Debug)]
pub struct VmController {
    handles: Mutex<Vec<VcpuHandle>>,
    paused: Mutex<bool>,
    vcpus: u8,
    memory_mib: u64,
    started: Instant,
    exit: Arc<ExitRequest>,
    /// The machine, for snapshots (absent: `Snapshot` is refused).
    machine: Option<Arc<Machine>>,
}

impl VmController {
    pub fn new(handles: Vec<VcpuHandle>, memory_mib: u64, exit: Arc<ExitRequest>) -> Self {
        Self {
            vcpus: handles.len() as u8,
            handles: Mutex::new(handles),
            paused: Mutex::new(false),
            memory_mib,
            started: Instant::now(),
            exit,
            machine: None,
        }
    }

    /// Allow snapshots of `machine` (the VM these vCPUs belong to).
    pub fn with_machine(mut self, machine: Arc<Machine>) -> Self {
        self.machine = Some(machine);
        self
    }

    /// Pause (if running), snapshot into `dir`, and resume if `resume` and
    /// the VM was running before. Returns what was written and whether the
    /// VM is paused now. On error the VM is left as the request would have
    /// left it.
    pub fn snapshot(
        &self,
        dir: &Path,
        kind: SnapshotKind,
        resume: bool,
        options: &SnapshotOptions,
    ) -> Result<(SnapshotInfo, bool), ControlError> {
        let machine = self.machine.as_ref().ok_or(ControlError::NoMachine)?;
        let handles = Self::lock(&self.handles);
        let was_paused = *Self::lock(&self.paused);
        for h in handles.iter() {
            h.pause(VCPU_TIMEOUT)?;
        }
        *Self::lock(&self.paused) = !handles.is_empty();
        let result = (|| {
            let mut states = Vec::with_capacity(handles.len());
            for h in handles.iter() {
                states.push(h.save_state(machine.vm.msrs_to_save(), VCPU_TIMEOUT)?);
            }
            Ok::<_, ControlError>(snapshot::create_snapshot(
                machine, states, dir, kind, options,
            )?)
        })();
        let mut paused = !handles.is_empty();
        if resume && !was_paused {
            for h in handles.iter() {
                h.resume(VCPU_TIMEOUT)?;
            }
            paused = false;
            *Self::lock(&self.paused) = false;
        }
        result.map(|info| (info, paused))
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> Response {
        let state = if self.exit.pending().is_some() || Self::lock(&self.handles).is_empty() {
            VmState::ShuttingDown
        } else if *Self::lock(&self.paused) {
            VmState::Paused
        } else {
            VmState::Running
        };
        Response::State {
            state,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    pub fn pause(&self) -> Result<(), VcpuError> {
        let handles = Self::lock(&self.handles);
        for h in handles.iter() {
            h.pause(VCPU_TIMEOUT)?;
        }
        *Self::lock(&self.paused) = !handles.is_empty();
        Ok(())
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        let handles = Self::lock(&self.handles);
        for h in handles.iter() {
            h.resume(VCPU_TIMEOUT)?;
        }
        *Self::lock(&self.paused) = false;
        Ok(())
    }

    /// Ask the VM to end; [`VmController::run_until_exit`] does the rest.
    pub fn shutdown(&self) {
        self.exit.request(ExitReason::Stopped);
    }

    /// Answer one request.
    pub fn handle(&self, request: &Request) -> Response {
        let result = match request {
            Request::GetState => return self.state(),
            Request::Pause => self.pause(),
            Request::Resume => self.resume(),
            Request::Shutdown => {
                self.shutdown();
                Ok(())
            }
            Request::Snapshot { dir, kind, resume } => {
                return self.snapshot_response(dir, *kind, *resume);
            }
        };
        match result {
            Ok(()) => Response::Ok,
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        }
    }

    fn snapshot_response(&self, dir: &str, kind: SnapshotKind, resume: bool) -> Response {
        let path = Path::new(dir);
        let result = if path.is_absolute() {
            self.snapshot(path, kind, resume, &SnapshotOptions::default())
        } else {
            Err(ControlError::RelativeDir(dir.to_owned()))
        };
        match result {
            Ok((info, paused)) => Response::Snapshot {
                dir: info.dir.display().to_string(),
                kind,
                memory_file: info
                    .memory_file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                dirty_pages: info.dirty_pages,
                memory_bytes: info.memory_bytes,
                duration_us: info.duration.as_micros() as u64,
                paused,
            },
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        }
    }

    /// Wait until a vCPU ends (the guest reset, powered off, or failed) or
    /// an exit is requested (a device, or `Shutdown`); then stop every
    /// vCPU and return why the VM ended: the first vCPU's own reason if it
    /// ended by itself, else the requested one.
    pub fn run_until_exit(&self) -> Result<ExitReason, VcpuError> {
        loop {
            let requested = self.exit.pending();
            let finished = Self::lock(&self.handles)
                .iter()
                .any(VcpuHandle::is_finished);
            if requested.is_some() || finished {
                break;
            }
            std::thread::sleep(POLL);
        }
        let handles = std::mem::take(&mut *Self::lock(&self.handles));
        let mut first: Option<Result<ExitReason, VcpuError>> = None;
        for h in handles {
            let r = h.stop(VCPU_TIMEOUT).map(|(reason, _)| reason);
            // Keep the first reason that is the guest's (or an error).
            if matches!(first, None | Some(Ok(ExitReason::Stopped))) {
                first = Some(r);
            }
        }
        let requested = self.exit.pending();
        match first {
            Some(Ok(ExitReason::Stopped)) | None => Ok(requested.unwrap_or(ExitReason::Stopped)),
            Some(r) => r,
        }
    }
}

/// The control socket's server thread.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listen at `path` (which must not exist) and serve `controller`.
    pub fn spawn(path: &Path, controller: Arc<VmController>) -> io::Result<Self> {
        let listener = crate::uds::listen(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on control socket {}: {e}", path.display()),
            )
        })?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(listener, controller, thread_stop))?;
        Ok(Self {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: UnixListener, controller: Arc<VmController>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => serve_client(stream, &controller, &stop),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn serve_client(mut stream: UnixStream, controller: &VmController, stop: &AtomicBool) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(CLIENT_TIMEOUT)).is_err()
        || stream.set_write_timeout(Some(CLIENT_TIMEOUT)).is_err()
    {
        return;
    }
    while !stop.load(Ordering::Acquire) {
        let (response, keep) = match read_frame_body(&mut stream) {
            Err(FrameError::Closed) | Err(FrameError::Io(_)) => return,
            Err(e) => (error(&e), false),
            Ok(body) => match decode::<RequestFrame>(&body) {
                Ok(frame) => (controller.handle(&frame.request), true),
                // A well-framed request of another version or shape: the
                // stream is still in sync.
                Err(e) => (error(&e), true),
            },
        };
        if write_frame(&mut stream, &ResponseFrame::new(response)).is_err() || !keep {
            return;
        }
    }
}

fn error(e: &FrameError) -> Response {
    Response::Error {
        message: e.to_string(),
    }
}
