//! The fork into a new PID namespace, and the supervisor that stays
//! outside.
//!
//! `unshare(CLONE_NEWPID)` only affects the caller's *children*, so the
//! caller forks once: the child is PID 1 of the new namespace (it cannot
//! see or signal any host process, and when it ends the kernel kills
//! whatever else is in the namespace), while the parent keeps every one of
//! its own namespaces and becomes the supervisor.
//!
//! The two sides synchronise over a pipe: the child waits for one byte
//! before it does anything, so the supervisor can first put it into the
//! cgroup. The child also asks for SIGKILL when the supervisor dies
//! (`PR_SET_PDEATHSIG`); if the supervisor died before that, the pipe reads
//! EOF and the child gives up.
//!
//! The supervisor blocks SIGCHLD and the termination signals and takes them
//! with `sigwaitinfo` (no handler, no race between a signal and the wait).
//! A termination signal kills the VMM with SIGKILL — a PID-namespace init
//! ignores signals it has no handler for, and SIGTERM killed the unjailed
//! VMM outright anyway — and, once the jail is cleaned up, the supervisor
//! dies of the same signal, as the unjailed VMM would have.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::JailError;
use super::cgroup::Cgroup;
use super::fs::JailDir;

/// Signals the supervisor passes on (as SIGKILL) to the VMM.
const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];
const GO: u8 = b'g';

/// Threads of the calling process (from `/proc/self/status`).
pub fn thread_count() -> Result<usize, JailError> {
    let path = std::path::Path::new("/proc/self/status");
    let status =
        std::fs::read_to_string(path).map_err(|e| JailError::io("cannot read", path, e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| {
            JailError::io(
                "no thread count in",
                path,
                std::io::Error::from(std::io::ErrorKind::InvalidData),
            )
        })
}

/// Close every descriptor above stderr: whatever the caller let the VMM
/// inherit (a node's sockets, another VM's files) must not reach the jail.
/// Called first thing in jail mode, while the process holds nothing of its
/// own above 2.
pub fn close_inherited_fds() -> Result<(), JailError> {
    // SAFETY: close_range only closes descriptors; none above 2 is in use.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } == 0 {
        return Ok(());
    }
    // Before Linux 5.9: list them first, then close (the listing's own
    // descriptor is closed by then, so closing its number is harmless).
    let dir = std::path::Path::new("/proc/self/fd");
    let fds: Vec<libc::c_int> = std::fs::read_dir(dir)
        .map_err(|e| JailError::io("cannot list", dir, e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: as above.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// The child's side of the start-up pipe.
#[derive(Debug)]
pub struct Release(File);

impl Release {
    /// Wait until the supervisor has placed this process; fails if the
    /// supervisor is gone.
    pub fn wait(mut self) -> Result<SupervisorLink, JailError> {
        // SAFETY: plain prctl. Armed before the wait: a supervisor dying
        // from here on kills us; one dead already shows as EOF below.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(JailError::last_os("PR_SET_PDEATHSIG"));
        }
        let mut b = [0u8];
        loop {
            match self.0.read(&mut b) {
                Ok(1) if b[0] == GO => return Ok(SupervisorLink(self.0)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                _ => return Err(JailError::SupervisorGone),
            }
        }
    }
}

/// The jailed child's read end of the start-up pipe, kept open: the
/// supervisor holds the write end for as long as it lives, so the pipe
/// hangs up exactly when the supervisor is gone.
#[derive(Debug)]
pub struct SupervisorLink(File);

impl SupervisorLink {
    /// (Re-)arm SIGKILL on the supervisor's death and check it is alive.
    /// Needed after every credential change, which clears the setting.
    pub fn die_with_it(&self) -> Result<(), JailError> {
        // SAFETY: plain prctl.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(JailError::last_os("PR_SET_PDEATHSIG"));
        }
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; zero timeout.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        if r != 0 {
            // Hung up (or, against the protocol, readable): gone.
            return Err(JailError::SupervisorGone);
        }
        Ok(())
    }
}

/// The supervisor's view of the jailed VMM.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    release: File,
    signals: libc::sigset_t,
}

/// Which side of the fork this is.
#[derive(Debug)]
pub enum Forked {
    Child(Release),
    Parent(Child),
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Fork the calling (single-threaded) process; the child is PID 1 of a new
/// PID namespace.
pub fn fork_into_pid_namespace() -> Result<Forked, JailError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::last_os("pipe2"));
    }
    // SAFETY: both descriptors were just created and are owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let signals = signal_set();
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sets; blocks the signals the supervisor will wait for,
    // before the child exists, so none is lost.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &signals, &mut old) } != 0 {
        return Err(JailError::last_os("sigprocmask"));
    }
    let restore = |old: &libc::sigset_t| {
        // SAFETY: restores a mask read above.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
    };
    // SAFETY: unshare has no memory-safety preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        let e = JailError::last_os("unshare the PID namespace");
        restore(&old);
        return Err(e);
    }
    // SAFETY: the process is single-threaded (checked by the caller), so the
    // child may go on running arbitrary code.
    match unsafe { libc::fork() } {
        -1 => {
            let e = JailError::last_os("fork");
            restore(&old);
            Err(e)
        }
        0 => {
            // Nothing here may fail: an error would send the child into
            // the caller's clean-up, which is the supervisor's job.
            restore(&old);
            drop(write_end);
            Ok(Forked::Child(Release(File::from(read_end))))
        }
        pid => {
            drop(read_end);
            Ok(Forked::Parent(Child {
                pid,
                release: File::from(write_end),
                signals,
            }))
        }
    }
}

/// How the VMM ended.
enum Ended {
    Exited(i32),
    Signaled(i32),
}

impl Child {
    fn kill(&self) {
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    /// Wait for the VMM, forwarding termination signals (as SIGKILL).
    /// Returns how it ended and the signal that made us kill it, if any.
    fn wait(&self) -> (Ended, Option<i32>) {
        let mut forwarded = None;
        loop {
            let mut status = 0;
            // SAFETY: our own child; `status` is a live local.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r == self.pid {
                let ended = if libc::WIFSIGNALED(status) {
                    Ended::Signaled(libc::WTERMSIG(status))
                } else {
                    Ended::Exited(libc::WEXITSTATUS(status))
                };
                return (ended, forwarded);
            }
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                // Cannot happen for our own child; do not spin.
                return (Ended::Exited(1), forwarded);
            }
            // SAFETY: the set is valid; the signals in it are blocked.
            let sig = unsafe { libc::sigwaitinfo(&self.signals, std::ptr::null_mut()) };
            if FORWARDED.contains(&sig) {
                forwarded.get_or_insert(sig);
                self.kill();
            }
        }
    }
}

/// The supervisor: place the VMM in its cgroup, release it, wait for it,
/// clean up, and exit as it did. Never returns.
pub fn supervise(child: Child, dir: JailDir, cgroup: Option<Cgroup>) -> ! {
    let mut failure = None;
    if let Some(cg) = &cgroup
        && let Err(e) = cg.add(child.pid)
    {
        failure = Some(e);
        child.kill();
    }
    if failure.is_none() {
        let mut release = &child.release;
        if release.write_all(&[GO]).is_err() {
            child.kill();
        }
    }
    let (ended, forwarded) = child.wait();
    if let Some(cg) = cgroup {
        cg.remove();
    }
    dir.remove();
    if let Some(e) = failure {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    if let Some(sig) = forwarded {
        // Die of the signal we were sent, as the unjailed VMM does.
        // SAFETY: default disposition, then unblock and raise it.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
        }
        std::process::exit(128 + sig);
    }
    match ended {
        Ended::Exited(code) => std::process::exit(code),
        Ended::Signaled(sig) => {
            let hint = if sig == libc::SIGSYS {
                " (a system call outside the seccomp allowlist)"
            } else {
                ""
            };
            eprintln!("error: the jailed VMM was killed by signal {sig}{hint}");
            std::process::exit(128 + sig);
        }
    }
}
