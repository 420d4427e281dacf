//! One Jupyter kernel: its process and the three ZeroMQ channels the
//! interpreter uses (shell for requests, IOPub for output, control for
//! interrupts), spoken directly with `runtimelib` — no Jupyter server in
//! between (ARCHITECTURE.md says why and what it measured).
//!
//! A kernel runs in a process group of its own so that an interrupt
//! reaches what the code started too (as `jupyter_client` does), and so
//! that a restart or a removal kills all of it.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jupyter_protocol::messaging::{
    ExecuteRequest, ExecutionState, KernelInfoRequest, ReplyStatus, Stdio as Channel,
};
use jupyter_protocol::{ConnectionInfo, JupyterMessage, JupyterMessageContent, Transport};
use runtimelib::{
    ClientControlConnection, ClientIoPubConnection, ClientShellConnection, KernelspecDir,
};
use serde_json::{Map, Value};
use tokio::process::Child;

/// How long a kernel may take to answer its first `kernel_info_request`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// After an interrupt, how long the code may take to stop before the
/// interrupt is sent again; after [`MAX_INTERRUPTS`] the kernel is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
const MAX_INTERRUPTS: u32 = 3;
/// How long a TCP kernel's sandbox stays marked unsaveable after the
/// kernel is gone.
const UNSAVEABLE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("starting the {kernel} kernel: {source}")]
    Spawn {
        kernel: String,
        source: std::io::Error,
    },
    #[error("the {kernel} kernel exited while starting ({status}){log}")]
    ExitedAtStart {
        kernel: String,
        status: String,
        log: String,
    },
    #[error("the {kernel} kernel did not answer within {secs} s of its start{log}")]
    StartTimeout {
        kernel: String,
        secs: u64,
        log: String,
    },
    #[error("talking to the kernel: {0}")]
    Protocol(#[from] runtimelib::RuntimeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What an execution produced, in the order the kernel sent it.
#[derive(Debug)]
pub enum Event {
    Stream {
        stderr: bool,
        text: String,
        timestamp: String,
    },
    /// A MIME bundle: the cell's value (`main`) or a `display()` call.
    Result {
        main: bool,
        data: Map<String, Value>,
    },
    Error {
        name: String,
        value: String,
        traceback: String,
    },
    ExecutionCount(usize),
}

/// How an execution ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel went idle after it (with or without an error).
    Finished,
    /// It was interrupted because the caller went away.
    Interrupted,
    /// The kernel process exited during it (killed, crashed, out of memory).
    KernelDied(String),
}

pub struct Kernel {
    name: String,
    child: Child,
    pgid: i32,
    interrupt_by_message: bool,
    shell: ClientShellConnection,
    iopub: ClientIoPubConnection,
    control: ClientControlConnection,
    session: String,
    connection_file: PathBuf,
    log_file: PathBuf,
    /// The `ipc` sockets' path prefix (None: TCP).
    ipc_prefix: Option<String>,
    /// While a TCP kernel runs: its file in `UNSAVEABLE_DIR`.
    unsaveable: Option<PathBuf>,
}

impl Kernel {
    /// Starts the kernel of `spec` in `cwd` and waits until it answers on
    /// both shell and IOPub (so no output of the first execution is lost to
    /// ZeroMQ's late subscription).
    pub async fn start(
        spec: &KernelspecDir,
        cwd: &Path,
        runtime_dir: &Path,
        id: &str,
    ) -> Result<Kernel, KernelError> {
        let name = spec.kernel_name.clone();
        tokio::fs::create_dir_all(runtime_dir).await?;
        // A fresh name per start: a restarted kernel never meets its
        // predecessor's sockets or files.
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let (info, listeners) = if supports_ipc(&name) {
            let prefix = runtime_dir.join(format!("k-{instance}"));
            (
                ConnectionInfo {
                    ip: prefix.to_string_lossy().into_owned(),
                    transport: Transport::IPC,
                    shell_port: 1,
                    iopub_port: 2,
                    stdin_port: 3,
                    control_port: 4,
                    hb_port: 5,
                    key: random_key(),
                    signature_scheme: "hmac-sha256".into(),
                    kernel_name: Some(name.clone()),
                },
                Vec::new(),
            )
        } else {
            let (ports, listeners) =
                runtimelib::peek_ports_with_listeners(IpAddr::V4(Ipv4Addr::LOCALHOST), 5).await?;
            (
                ConnectionInfo {
                    ip: "127.0.0.1".into(),
                    transport: Transport::TCP,
                    shell_port: ports[0],
                    iopub_port: ports[1],
                    stdin_port: ports[2],
                    control_port: ports[3],
                    hb_port: ports[4],
                    key: random_key(),
                    signature_scheme: "hmac-sha256".into(),
                    kernel_name: Some(name.clone()),
                },
                listeners,
            )
        };
        let connection_file = runtime_dir.join(format!("k-{instance}.json"));
        let log_file = runtime_dir.join(format!("k-{instance}.log"));
        let json = serde_json::to_vec(&info).map_err(std::io::Error::other)?;
        write_private(&connection_file, &json).await?;
        let log = std::fs::File::create(&log_file)?;
        let mut command = spec
            .clone()
            .command(
                &connection_file,
                Some(Stdio::from(log.try_clone()?)),
                Some(Stdio::from(log)),
            )
            .map_err(KernelError::Protocol)?;
        command
            .current_dir(cwd)
            .process_group(0)
            .kill_on_drop(true)
            // debugpy's "frozen modules" notice on every start is noise in
            // the kernel log, and the debugger is not offered here.
            .env("PYDEVD_DISABLE_FILE_VALIDATION", "1");
        drop(listeners);
        let child = command.spawn().map_err(|source| KernelError::Spawn {
            kernel: name.clone(),
            source,
        })?;
        let pgid = child.id().map(|p| p as i32).unwrap_or(0);
        let session = uuid::Uuid::new_v4().to_string();
        let identity = runtimelib::peer_identity_for_session(&session)?;
        let shell =
            runtimelib::create_client_shell_connection_with_identity(&info, &session, identity)
                .await?;
        let iopub = runtimelib::create_client_iopub_connection(&info, "", &session).await?;
        let control = runtimelib::create_client_control_connection(&info, &session).await?;
        let interrupt_by_message = spec.kernelspec.interrupt_mode.as_deref() == Some("message");
        let ipc_prefix = matches!(info.transport, Transport::IPC).then(|| info.ip.clone());
        let unsaveable = match ipc_prefix {
            Some(_) => None,
            None => Some(mark_unsaveable(&name, id, &instance).await?),
        };
        let mut kernel = Kernel {
            ipc_prefix,
            unsaveable,
            name,
            child,
            pgid,
            interrupt_by_message,
            shell,
            iopub,
            control,
            session,
            connection_file,
            log_file,
        };
        kernel.wait_ready().await?;
        tracing::info!(context = id, kernel = %kernel.name, pid = kernel.pgid, "kernel ready");
        Ok(kernel)
    }

    /// Asks for `kernel_info` until a reply's status shows up on IOPub too.
    async fn wait_ready(&mut self) -> Result<(), KernelError> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let request = new_message(&self.session, KernelInfoRequest {});
            let id = request.header.msg_id.clone();
            self.shell.send(request).await?;
            let attempt = tokio::time::sleep(Duration::from_millis(500));
            tokio::pin!(attempt);
            loop {
                tokio::select! {
                    message = self.iopub.read() => {
                        if parent_id(&message?) == Some(id.as_str()) {
                            // Drain the reply so it is not mistaken later.
                            let _ = tokio::time::timeout(Duration::from_secs(5), self.shell.read()).await;
                            return Ok(());
                        }
                    }
                    _ = self.shell.read() => {}
                    status = self.child.wait() => {
                        let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                        return Err(KernelError::ExitedAtStart {
                            kernel: self.name.clone(),
                            status,
                            log: self.log_tail().await,
                        });
                    }
                    _ = &mut attempt => break,
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(KernelError::StartTimeout {
                    kernel: self.name.clone(),
                    secs: START_TIMEOUT.as_secs(),
                    log: self.log_tail().await,
                });
            }
        }
    }

    /// Runs `code`, handing each output to `on_event` as it comes. When
    /// `abandoned` resolves (the caller left) the code is interrupted and
    /// the kernel is drained until idle, so the next execution starts clean.
    /// `silent` runs leave no execution count, history or output (the
    /// environment-variable set-up around a call).
    pub async fn execute(
        &mut self,
        code: &str,
        silent: bool,
        mut on_event: impl FnMut(Event),
        abandoned: impl Future<Output = ()>,
    ) -> Result<Outcome, KernelError> {
        let request = new_message(
            &self.session,
            ExecuteRequest {
                code: code.to_owned(),
                silent,
                store_history: !silent,
                user_expressions: None,
                allow_stdin: false,
                stop_on_error: true,
            },
        );
        let id = request.header.msg_id.clone();
        self.shell.send(request).await?;
        tokio::pin!(abandoned);
        let mut idle = false;
        let mut replied = false;
        let mut errored = false;
        let mut interrupts = 0u32;
        let mut caller_gone = false;
        let regrace = tokio::time::sleep(Duration::from_secs(u64::MAX / 4));
        tokio::pin!(regrace);
        let Kernel {
            iopub,
            shell,
            control,
            child,
            pgid,
            interrupt_by_message,
            session,
            ..
        } = self;
        while !(idle && replied) {
            tokio::select! {
                message = iopub.read() => {
                    let message = message?;
                    if parent_id(&message) != Some(id.as_str()) {
                        continue;
                    }
                    let timestamp = message.header.date.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                    match message.content {
                        JupyterMessageContent::StreamContent(s) => on_event(Event::Stream {
                            stderr: matches!(s.name, Channel::Stderr),
                            text: s.text,
                            timestamp,
                        }),
                        JupyterMessageContent::ExecuteResult(r) => on_event(Event::Result {
                            main: true,
                            data: media_map(&r.data),
                        }),
                        JupyterMessageContent::DisplayData(d) => on_event(Event::Result {
                            main: false,
                            data: media_map(&d.data),
                        }),
                        JupyterMessageContent::ErrorOutput(e) if !errored => {
                            errored = true;
                            on_event(Event::Error {
                                name: e.ename,
                                value: e.evalue,
                                traceback: e.traceback.join("\n"),
                            });
                        }
                        JupyterMessageContent::ExecuteInput(i) if !silent => {
                            on_event(Event::ExecutionCount(i.execution_count.value()))
                        }
                        JupyterMessageContent::Status(s) => {
                            if matches!(s.execution_state, ExecutionState::Idle) {
                                idle = true;
                            }
                        }
                        _ => {}
                    }
                }
                message = shell.read() => {
                    let message = message?;
                    if parent_id(&message) != Some(id.as_str()) {
                        continue;
                    }
                    if let JupyterMessageContent::ExecuteReply(reply) = message.content {
                        replied = true;
                        match reply.status {
                            ReplyStatus::Error if !errored => {
                                errored = true;
                                let e = reply.error.map(|e| *e).unwrap_or_default();
                                on_event(Event::Error {
                                    name: e.ename,
                                    value: e.evalue,
                                    traceback: e.traceback.join("\n"),
                                });
                            }
                            ReplyStatus::Aborted if !errored => {
                                errored = true;
                                on_event(Event::Error {
                                    name: "ExecutionAborted".into(),
                                    value: "the kernel aborted the execution".into(),
                                    traceback: String::new(),
                                });
                            }
                            _ => {}
                        }
                    }
                }
                status = child.wait() => {
                    let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    return Ok(Outcome::KernelDied(status));
                }
                _ = &mut abandoned, if !caller_gone => {
                    caller_gone = true;
                    interrupts += 1;
                    interrupt(*pgid, *interrupt_by_message, control, session).await?;
                    regrace.as_mut().reset(tokio::time::Instant::now() + INTERRUPT_GRACE);
                }
                _ = &mut regrace => {
                    // The code ignores interrupts (a bare `except:` in a
                    // loop, a blocked system call): ask again, then kill.
                    if interrupts >= MAX_INTERRUPTS {
                        signal_group(*pgid, libc::SIGKILL);
                    } else {
                        interrupts += 1;
                        interrupt(*pgid, *interrupt_by_message, control, session).await?;
                    }
                    regrace.as_mut().reset(tokio::time::Instant::now() + INTERRUPT_GRACE);
                }
            }
        }
        Ok(if caller_gone {
            Outcome::Interrupted
        } else {
            Outcome::Finished
        })
    }
}

impl Kernel {
    /// The kernelspec name (`python3`, `bash`, `deno`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kernel's process group (its pid).
    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    /// Whether the kernel process is still there.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the kernel and everything it started, and waits for it.
    pub async fn kill(mut self) {
        signal_group(self.pgid, libc::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// The last lines of the kernel's own output, for a start that failed.
    async fn log_tail(&self) -> String {
        let text = tokio::fs::read_to_string(&self.log_file)
            .await
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        if tail.trim().is_empty() {
            String::new()
        } else {
            format!("; its output ends with:\n{tail}")
        }
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal_group(self.pgid, libc::SIGKILL);
        }
        let _ = std::fs::remove_file(&self.connection_file);
        let _ = std::fs::remove_file(&self.log_file);
        if let Some(marker) = self.unsaveable.take() {
            // Not at once: this side's ZeroMQ connections to the killed
            // kernel (in epoll, like its listeners were) take a moment to
            // close; a pause in that moment is refused, not lost.
            std::thread::spawn(move || {
                std::thread::sleep(UNSAVEABLE_GRACE);
                let _ = std::fs::remove_file(marker);
            });
        }
        if let Some(prefix) = &self.ipc_prefix {
            for channel in 1..=5 {
                let _ = std::fs::remove_file(format!("{prefix}-{channel}"));
            }
        }
    }
}

fn new_message(session: &str, content: impl Into<JupyterMessageContent>) -> JupyterMessage {
    let mut message = JupyterMessage::new(content, None);
    message.header.session = session.to_owned();
    message.header.username = "sandmesh".into();
    message
}

/// Whether the kernel can listen on Unix sockets (ZeroMQ's `ipc`
/// transport). Kernels on libzmq (ipykernel, bash_kernel) can; Deno's
/// kernel listens on TCP only.
///
/// Unix sockets matter for pause: gVisor's checkpoint fails (and stops
/// the sandbox) while a listening TCP socket is registered in an epoll set,
/// which is what a ZeroMQ kernel's listeners are; a Unix socket saves fine.
fn supports_ipc(kernel: &str) -> bool {
    kernel != "deno"
}

/// Says, for as long as the kernel runs, that the sandbox cannot be paused
/// (`schema::envd::UNSAVEABLE_DIR`): its TCP listeners are in epoll, and
/// gVisor's save would lose the sandbox. The pause is refused instead,
/// naming the way out.
async fn mark_unsaveable(kernel: &str, context: &str, instance: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = Path::new(schema::envd::UNSAVEABLE_DIR);
    if tokio::fs::create_dir(dir).await.is_ok() {
        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777)).await?;
    }
    let marker = dir.join(format!("interpreter-{instance}"));
    let reason = format!(
        "the code interpreter's context {context} runs a {kernel} kernel, whose TCP listeners this gVisor cannot save; \
         remove that context (remove_code_context), then pause"
    );
    tokio::fs::write(&marker, reason).await?;
    Ok(marker)
}

/// Interrupts the running code as the kernelspec asks: SIGINT to the
/// kernel's process group (ipykernel, bash_kernel), or an
/// `interrupt_request` on the control channel.
async fn interrupt(
    pgid: i32,
    by_message: bool,
    control: &mut ClientControlConnection,
    session: &str,
) -> Result<(), KernelError> {
    if by_message {
        control
            .send(new_message(
                session,
                jupyter_protocol::messaging::InterruptRequest {},
            ))
            .await?;
    } else {
        signal_group(pgid, libc::SIGINT);
    }
    Ok(())
}

fn signal_group(pgid: i32, signal: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative pid signals that process group;
        // the group is the kernel's own (process_group(0) at spawn).
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

fn parent_id(message: &JupyterMessage) -> Option<&str> {
    message.parent_header.as_ref().map(|h| h.msg_id.as_str())
}

/// A MIME bundle as the kernel sent it: mime type to value.
fn media_map(media: &jupyter_protocol::Media) -> Map<String, Value> {
    match serde_json::to_value(media) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// The HMAC key of a kernel's messages: 32 random bytes, hex.
fn random_key() -> String {
    let mut bytes = [0u8; 32];
    // getrandom only fails where the OS has no randomness at all.
    if getrandom::fill(&mut bytes).is_err() {
        let fallback = uuid::Uuid::new_v4();
        bytes[..16].copy_from_slice(fallback.as_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the connection file (it holds the key) readable by its owner only.
async fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = path.to_owned();
    let contents = contents.to_vec();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(&contents)
    })
    .await
    .map_err(std::io::Error::other)?
}
