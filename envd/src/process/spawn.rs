//! Starting a process as a sandbox user, and supervising it until its end
//! event: reading its output, reaping it, reporting how it ended.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use schema::envd::process::{ProcessEvent, StartRequest, process_event};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::pty;
use super::table::{Input, ProcessHandle, ProcessTable, Subscription};
use crate::State;
use crate::connect::ConnectError;
use crate::users::{self, User};

/// PATH when neither /init nor the request sets one (Debian's login PATH
/// for root, which also works for users).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Read sizes, as in E2B's envd.
const PIPE_CHUNK: usize = 32 << 10;
const PTY_CHUNK: usize = 16 << 10;

/// After the process exits, output still in flight (in pipes or the PTY) is
/// forwarded until the pipes close. A child the process left running in the
/// background may hold them open forever, so the drain also stops after this
/// long without output...
const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// ...or, with output that keeps coming, after this long in all.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// Start the process `req` describes as `user`, register it in `table`
/// and attach the caller before any output can be produced.
pub fn start(
    state: &State,
    table: &Arc<ProcessTable>,
    user: &User,
    req: StartRequest,
) -> Result<(Arc<ProcessHandle>, Subscription), ConnectError> {
    let config = req.process.ok_or_else(|| {
        ConnectError::invalid_argument("the request has no process configuration")
    })?;
    if config.cmd.is_empty() {
        return Err(ConnectError::invalid_argument(
            "the process has no command (cmd is empty)",
        ));
    }
    let init = state.init();

    // The working directory: the request's, else the sandbox default, else
    // the user's home; relative paths are relative to the home.
    let requested_cwd = match &config.cwd {
        Some(cwd) if !cwd.is_empty() => cwd.clone(),
        _ => init
            .default_workdir
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let (guest_cwd, host_cwd) = state.root.resolve(user, &requested_cwd)?;
    match std::fs::metadata(&host_cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ConnectError::invalid_argument(format!(
                "cwd '{}' is not a directory",
                guest_cwd.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ConnectError::invalid_argument(format!(
                "cwd '{}' does not exist",
                guest_cwd.display()
            )));
        }
        Err(e) => {
            return Err(ConnectError::from_io(
                &e,
                &format!("cwd '{}'", guest_cwd.display()),
            ));
        }
    }

    // Environment: the login basics, then the sandbox's variables from
    // /init, then the request's own (later ones win).
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert("PATH".into(), DEFAULT_PATH.into());
    env.insert("HOME".into(), user.home.to_string_lossy().into_owned());
    env.insert("USER".into(), user.name.clone());
    env.insert("LOGNAME".into(), user.name.clone());
    if !user.shell.is_empty() {
        env.insert("SHELL".into(), user.shell.clone());
    }
    env.extend(init.env_vars);
    env.extend(config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(bad) = env
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(ConnectError::invalid_argument(format!(
            "invalid environment variable name {bad:?}"
        )));
    }
    if let Some((k, _)) = env.iter().find(|(_, v)| v.contains('\0')) {
        return Err(ConnectError::invalid_argument(format!(
            "environment variable {k:?} contains a NUL byte"
        )));
    }

    let mut cmd = Command::new(&config.cmd);
    cmd.args(&config.args)
        .env_clear()
        .envs(&env)
        .kill_on_drop(false);
    // chdir happens in the child after dropping privileges (below), as in
    // Go's exec: a user cannot start a process in a directory it may not enter.
    let cwd_c = std::ffi::CString::new(host_cwd.as_os_str().as_encoded_bytes())
        .map_err(|_| ConnectError::invalid_argument("cwd contains a NUL byte"))?;

    let pty_size = match &req.pty {
        None => None,
        Some(p) => {
            let size = p.size.unwrap_or_default();
            Some((pty_dim(size.cols, "cols")?, pty_dim(size.rows, "rows")?))
        }
    };
    let master = match pty_size {
        Some((cols, rows)) => {
            let (master, slave) = pty::open(cols, rows)
                .map_err(|e| ConnectError::internal(format!("opening a PTY: {e}")))?;
            let dup = |fd: &std::os::fd::OwnedFd| {
                fd.try_clone()
                    .map_err(|e| ConnectError::internal(format!("duplicating the PTY: {e}")))
            };
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            Some(Arc::new(master))
        }
        None => {
            // Without a `stdin` field the pipe is kept, as in E2B's envd
            // (older SDKs relied on it); `stdin: false` means /dev/null.
            let stdin = if req.stdin.unwrap_or(true) {
                Stdio::piped()
            } else {
                Stdio::null()
            };
            cmd.stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };

    let mut groups: Vec<libc::gid_t> = vec![user.gid];
    groups.extend(
        users::supplementary_groups(state.root.host_root(), &user.name)
            .into_iter()
            .filter(|g| *g != user.gid),
    );
    let (uid, gid, with_tty) = (user.uid, user.gid, master.is_some());
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            // Its own session (and process group): signals can then reach
            // everything the process starts, and a PTY can become its
            // controlling terminal.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Drop to the user. Not as root (envd run by hand for tests),
            // only the same user can be had, and setgid/setuid say so.
            if libc::geteuid() == 0 {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if (libc::getgid() != gid && libc::setgid(gid) < 0)
                || (libc::getuid() != uid && libc::setuid(uid) < 0)
            {
                return Err(io::Error::last_os_error());
            }
            if libc::chdir(cwd_c.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let spawned = cmd.spawn();
    // The Command holds the parent's copies of the PTY slave: close them now,
    // or reading the master would never see the end of the session.
    drop(cmd);
    let mut child = spawned.map_err(|e| {
        let what = format!(
            "starting {:?} as {} in '{}'",
            config.cmd,
            user.name,
            guest_cwd.display()
        );
        match e.kind() {
            io::ErrorKind::NotFound => {
                ConnectError::invalid_argument(format!("{what}: executable not found ({e})"))
            }
            io::ErrorKind::PermissionDenied => {
                ConnectError::permission_denied(format!("{what}: {e}"))
            }
            _ => ConnectError::internal(format!("{what}: {e}")),
        }
    })?;
    let pid = child
        .id()
        .ok_or_else(|| ConnectError::internal("the process exited before its pid was known"))?;

    // Output readers feed one queue, so the supervisor forwards events in
    // the order they were read and knows when every stream has closed.
    let (out_tx, out_rx) = mpsc::channel(64);
    let mut readers = Vec::new();
    let input = match &master {
        Some(master) => {
            let reader = master.clone();
            let tx = out_tx.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; PTY_CHUNK];
                while let Ok(n @ 1..) = reader.read(&mut buf).await {
                    let out =
                        process_event::data_event::Output::Pty(Bytes::copy_from_slice(&buf[..n]));
                    if tx.send(data_event(out)).await.is_err() {
                        break;
                    }
                }
            }));
            Input::Pty(master.clone())
        }
        None => {
            if let Some(stdout) = child.stdout.take() {
                readers.push(read_pipe(
                    stdout,
                    out_tx.clone(),
                    process_event::data_event::Output::Stdout,
                ));
            }
            if let Some(stderr) = child.stderr.take() {
                readers.push(read_pipe(
                    stderr,
                    out_tx.clone(),
                    process_event::data_event::Output::Stderr,
                ));
            }
            Input::Pipe(child.stdin.take().map(|s| tokio::sync::Mutex::new(Some(s))))
        }
    };
    drop(out_tx);

    let handle = Arc::new(ProcessHandle::new(pid, req.tag, config, input));
    let first = handle.subscribe();
    table.insert(handle.clone());
    tracing::info!(pid, cmd = %handle.config.cmd, user = %user.name, pty = master.is_some(), "process started");
    tokio::spawn(supervise(
        table.clone(),
        handle.clone(),
        child,
        readers,
        out_rx,
    ));
    Ok((handle, first))
}

fn pty_dim(v: u32, what: &str) -> Result<u16, ConnectError> {
    u16::try_from(v)
        .map_err(|_| ConnectError::invalid_argument(format!("PTY {what} {v} is too large")))
}

fn data_event(out: process_event::data_event::Output) -> ProcessEvent {
    ProcessEvent {
        event: Some(process_event::Event::Data(process_event::DataEvent {
            output: Some(out),
        })),
    }
}

fn read_pipe(
    mut pipe: impl AsyncRead + Unpin + Send + 'static,
    tx: mpsc::Sender<ProcessEvent>,
    wrap: fn(Bytes) -> process_event::data_event::Output,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; PIPE_CHUNK];
        while let Ok(n @ 1..) = pipe.read(&mut buf).await {
            if tx
                .send(data_event(wrap(Bytes::copy_from_slice(&buf[..n]))))
                .await
                .is_err()
            {
                break;
            }
        }
    })
}

/// Forward output until the process has exited and its output is drained,
/// reap it, publish the end event and forget the process.
async fn supervise(
    table: Arc<ProcessTable>,
    handle: Arc<ProcessHandle>,
    mut child: Child,
    readers: Vec<JoinHandle<()>>,
    mut output: mpsc::Receiver<ProcessEvent>,
) {
    let mut status: Option<io::Result<ExitStatus>> = None;
    let mut drain_until: Option<Instant> = None;
    loop {
        let idle_deadline = drain_until.map(|until| until.min(Instant::now() + DRAIN_IDLE));
        tokio::select! {
            event = output.recv() => match event {
                Some(event) => handle.publish(event).await,
                None => break,
            },
            // Cancel-safe: a wait interrupted by output resumes next round.
            exit = child.wait(), if status.is_none() => {
                handle.mark_exited();
                status = Some(exit);
                drain_until = Some(Instant::now() + DRAIN_MAX);
            }
            () = sleep_until_opt(idle_deadline), if idle_deadline.is_some() => break,
        }
    }
    let status = match status {
        Some(status) => status,
        None => {
            let status = child.wait().await;
            handle.mark_exited();
            status
        }
    };
    for r in readers {
        r.abort();
    }
    let end = end_event(status);
    tracing::info!(pid = handle.pid, status = %end.status, "process ended");
    // Forget the process before publishing its end, so a client that has
    // seen the end no longer finds it in `List` (attached clients still get
    // the end; a `Connect` racing with this finds nothing or the end).
    table.remove(handle.pid);
    handle.finish(end);
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The end event as E2B's envd (Go) reports it: `exitCode` -1 when killed
/// by a signal, `status` as Go's `ProcessState.String()`, and `error` (Go's
/// `cmd.Wait()` error) whenever the process did not exit with 0.
pub fn end_event(status: io::Result<ExitStatus>) -> process_event::EndEvent {
    match status {
        Ok(st) => {
            let text = go_status(&st);
            process_event::EndEvent {
                exit_code: st.code().unwrap_or(-1),
                exited: st.code().is_some(),
                error: (!st.success()).then(|| text.clone()),
                status: text,
            }
        }
        Err(e) => process_event::EndEvent {
            exit_code: -1,
            exited: false,
            status: String::new(),
            error: Some(format!("waiting for the process: {e}")),
        },
    }
}

/// Go's `os.ProcessState.String()`.
fn go_status(st: &ExitStatus) -> String {
    if let Some(code) = st.code() {
        return format!("exit status {code}");
    }
    if let Some(sig) = st.signal() {
        let core = if st.core_dumped() {
            " (core dumped)"
        } else {
            ""
        };
        return format!("signal: {}{core}", go_signal_name(sig));
    }
    if let Some(sig) = st.stopped_signal() {
        return format!("stop signal: {}", go_signal_name(sig));
    }
    if st.continued() {
        return "continued".into();
    }
    format!("unknown status {}", st.into_raw())
}

/// Go's names of Linux signals (`syscall.Signal.String()`).
fn go_signal_name(sig: i32) -> String {
    const NAMES: [&str; 31] = [
        "hangup",
        "interrupt",
        "quit",
        "illegal instruction",
        "trace/breakpoint trap",
        "aborted",
        "bus error",
        "floating point exception",
        "killed",
        "user defined signal 1",
        "segmentation fault",
        "user defined signal 2",
        "broken pipe",
        "alarm clock",
        "terminated",
        "stack fault",
        "child exited",
        "continued",
        "stopped (signal)",
        "stopped",
        "stopped (tty input)",
        "stopped (tty output)",
        "urgent I/O condition",
        "CPU time limit exceeded",
        "file size limit exceeded",
        "virtual timer expired",
        "profiling timer expired",
        "window changed",
        "I/O possible",
        "power failure",
        "bad system call",
    ];
    usize::try_from(sig)
        .ok()
        .and_then(|s| s.checked_sub(1))
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| format!("signal {sig}"), |n| (*n).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_read_like_go() {
        let exit3 = end_event(Ok(ExitStatus::from_raw(3 << 8)));
        assert_eq!(
            (exit3.exit_code, exit3.exited, exit3.status.as_str()),
            (3, true, "exit status 3")
        );
        assert_eq!(exit3.error.as_deref(), Some("exit status 3"));
        let ok = end_event(Ok(ExitStatus::from_raw(0)));
        assert_eq!(
            (ok.exit_code, ok.status.as_str(), ok.error),
            (0, "exit status 0", None)
        );
        let killed = end_event(Ok(ExitStatus::from_raw(libc::SIGKILL)));
        assert_eq!(
            (killed.exit_code, killed.exited, killed.status.as_str()),
            (-1, false, "signal: killed")
        );
        let term = end_event(Ok(ExitStatus::from_raw(libc::SIGTERM)));
        assert_eq!(term.status, "signal: terminated");
        assert_eq!(go_signal_name(64), "signal 64");
    }
}
