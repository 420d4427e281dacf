//! Running `runsc` and the other host tools, with time limits.
//!
//! Every runsc command of a sandbox runs inside the sandbox's network
//! namespace: the sandbox's control socket is an abstract unix socket, and
//! abstract sockets belong to a network namespace, so `runsc state`,
//! `checkpoint`, `kill`… only reach a sandbox from its own namespace.
//!
//! `runsc run` and `runsc restore` with `--network=sandbox` also need a
//! workaround for this runsc (2022-12): it refuses to start when it thinks
//! it is in the root network namespace, and it decides that by whether
//! `/proc/sys/net/core/rmem_default` exists, which on recent kernels is true
//! in every namespace. So those two run in a private mount namespace with a
//! tmpfs over `/proc/sys/net` (see [`Runsc::command`]).

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::runtime::{Result, RuntimeError};

/// Set to a directory to get runsc's debug logs there (see [`Runsc::command`]).
pub const DEBUG_LOG_ENV: &str = "SANDMESH_RUNSC_DEBUG_LOG";

/// The runsc binary to use where none is given; else `runsc` on `PATH`.
pub const RUNSC_ENV: &str = "SANDMESH_RUNSC";

/// Overrides runsc's `--platform` (`ptrace`, `systrap`); by default
/// `systrap` where runsc is recent enough, else `ptrace`.
pub const PLATFORM_ENV: &str = "SANDMESH_RUNSC_PLATFORM";

/// Default time limit of a runsc command.
pub const RUNSC_TIMEOUT: Duration = Duration::from_secs(30);

/// The runsc binary and its state directory.
#[derive(Debug, Clone)]
pub struct Runsc {
    pub bin: PathBuf,
    /// `--root`: runsc's own state (one file per container).
    pub root: PathBuf,
    /// First line of `runsc --version`; a checkpoint image only restores
    /// under the same version.
    pub version: String,
    /// `--platform`: how the sentry intercepts the guest's system calls.
    pub platform: String,
    /// `runsc checkpoint --compression=none` is understood (the releases
    /// we support; 2022-12's has no such flag and always deflates).
    pub uncompressed_checkpoints: bool,
}

/// How a runsc command must be entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enter<'a> {
    /// Stay where the node is (for commands on sandboxes whose namespace is
    /// gone).
    Host,
    /// Join this network namespace (a path under /run/netns).
    Netns(&'a Path),
    /// Join this network namespace from a private mount namespace with
    /// `/proc/sys/net` hidden (runsc run/restore; see the module docs).
    NetnsForStart(&'a Path),
}

impl Runsc {
    /// Find runsc at `bin`, else at `$SANDMESH_RUNSC`, else on `PATH`, and
    /// read its version.
    pub fn locate(bin: Option<PathBuf>, root: PathBuf) -> Result<Self> {
        let bin = bin.or_else(|| {
            std::env::var_os(RUNSC_ENV)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        });
        let bin = match bin {
            Some(bin) if bin.is_file() => bin,
            Some(bin) => {
                return Err(RuntimeError::RuntimeMissing {
                    looked_in: bin.display().to_string(),
                });
            }
            None => find_in_path("runsc").ok_or_else(|| RuntimeError::RuntimeMissing {
                looked_in: "PATH".into(),
            })?,
        };
        let out = run_output(Command::new(&bin).arg("--version"), Duration::from_secs(10))?;
        if !out.status.success() {
            return Err(RuntimeError::Unavailable {
                runtime: crate::runtime::RuntimeKind::Gvisor,
                reason: format!(
                    "`{} --version` failed: {}; reinstall it: apt-get install --reinstall runsc",
                    bin.display(),
                    tail(&out.stderr)
                ),
            });
        }
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("runsc (unknown version)")
            .trim()
            .to_owned();
        let good = release_date(&version).is_some_and(|d| d >= FIRST_GOOD_RELEASE);
        if !good {
            tracing::warn!(
                runsc = %bin.display(),
                version = %version,
                "this runsc answers statx(2) with EINVAL, so `ls` and `stat` fail in every sandbox; \
                 use runsc {FIRST_GOOD_RELEASE} or later (`cargo xtask up` fetches one; or --runsc PATH)"
            );
        }
        // systrap (seccomp traps, gVisor's default since 2023) runs system
        // calls ~25x faster than ptrace here: `dd bs=1` of 200 kB took
        // 1.0 s against 24.5 s with runsc 2024-07; creates cost the same.
        // runsc 2022-12 has no systrap.
        let platform = std::env::var(PLATFORM_ENV)
            .ok()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| if good { "systrap" } else { "ptrace" }.into());
        Ok(Self {
            bin,
            root,
            version,
            platform,
            uncompressed_checkpoints: good,
        })
    }

    /// A runsc command with the global flags of every sandmesh sandbox.
    pub fn command(&self, enter: Enter<'_>) -> Result<Command> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--root")
            .arg(&self.root)
            .arg(format!("--platform={}", self.platform))
            .arg("--network=sandbox")
            // The sandbox's root is our own overlay (see `fs`). runsc from
            // 2023 on wraps it in one of its own by default, with a
            // filestore file inside the rootfs that makes every restore of
            // the sandbox fail ("mount source already has a filestore
            // file"); older runsc has it off already.
            .arg("--overlay2=none");
        // For operators chasing a runsc failure: every runsc command (and
        // the sandbox and gofer it starts) logs at debug level, one file
        // per command, into this directory.
        if let Some(dir) = std::env::var_os(DEBUG_LOG_ENV).filter(|d| !d.is_empty()) {
            let mut arg = std::ffi::OsString::from("--debug-log=");
            arg.push(&dir);
            arg.push("/%TIMESTAMP%-%COMMAND%.log");
            cmd.arg("--debug").arg(arg);
        }
        cmd.stdin(Stdio::null());
        match enter {
            Enter::Host => {}
            Enter::Netns(path) => enter_netns(&mut cmd, path, false)?,
            Enter::NetnsForStart(path) => enter_netns(&mut cmd, path, true)?,
        }
        Ok(cmd)
    }

    /// Run a runsc command to completion; a non-zero exit is an error
    /// carrying its output.
    pub fn run(&self, enter: Enter<'_>, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut cmd = self.command(enter)?;
        cmd.args(args);
        let out = run_output(&mut cmd, timeout)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(RuntimeError::Command {
                command: format!("runsc {}", args.join(" ")),
                detail: format!("{}: {}", out.status, tail(&out.stderr)),
            })
        }
    }
}

/// Make `cmd` join the network namespace at `path` before it runs (and, for
/// `hide_proc_sys_net`, enter a private mount namespace with a tmpfs over
/// `/proc/sys/net`). Only async-signal-safe system calls run in the child.
fn enter_netns(cmd: &mut Command, path: &Path, hide_proc_sys_net: bool) -> Result<()> {
    let ns =
        File::open(path).map_err(|e| RuntimeError::io("opening network namespace", path, e))?;
    // Prepared before the fork; the closure owns them.
    let tmpfs = CString::from(c"tmpfs");
    let target = CString::from(c"/proc/sys/net");
    let root = CString::from(c"/");
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe system calls (unshare, mount, setns) on data
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if hide_proc_sys_net {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::mount(
                    tmpfs.as_ptr(),
                    target.as_ptr(),
                    tmpfs.as_ptr(),
                    0,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Run `cmd` with piped output, killing it after `timeout`.
pub fn run_output(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let name = describe(cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| RuntimeError::Command {
        command: name.clone(),
        detail: format!("cannot start it: {e}"),
    })?;
    wait_output(child, timeout, &name)
}

/// Wait for `child` (its output piped) for at most `timeout`.
pub fn wait_output(child: Child, timeout: Duration, name: &str) -> Result<Output> {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let result = match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => {
            // SAFETY: plain kill(2) of our own child, which has not been
            // reaped (the waiting thread still holds it).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let _ = rx.recv_timeout(Duration::from_secs(5));
            return Err(RuntimeError::Command {
                command: name.to_owned(),
                detail: format!("timed out after {timeout:?} and was killed"),
            });
        }
    };
    result.map_err(|e| RuntimeError::Command {
        command: name.to_owned(),
        detail: format!("waiting for it: {e}"),
    })
}

/// Run a host tool (`ip`, `cp`, `mount`…) and fail with its stderr.
pub fn tool(program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let out = run_output(&mut cmd, timeout)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(RuntimeError::Command {
            command: format!("{program} {}", args.join(" ")),
            detail: format!("{}: {}", out.status, tail(&out.stderr)),
        })
    }
}

/// Like [`tool`] with `input` on stdin.
pub fn tool_with_input(program: &str, args: &[&str], input: &str) -> Result<Output> {
    use std::io::Write;
    let name = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RuntimeError::Command {
            command: name.clone(),
            detail: format!("cannot start it: {e}"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| RuntimeError::Command {
                command: name.clone(),
                detail: format!("writing its input: {e}"),
            })?;
    }
    let out = wait_output(child, Duration::from_secs(10), &name)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(RuntimeError::Command {
            command: name,
            detail: format!("{}: {}", out.status, tail(&out.stderr)),
        })
    }
}

/// The last lines of some output, for error messages (runsc prints long
/// Go stack traces; the first line says what failed, so keep it too).
pub fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    const MAX: usize = 600;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let first = text.lines().next().unwrap_or("");
    let first: String = first.chars().take(MAX / 2).collect();
    let mut start = text.len() - MAX / 2;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("{first} … {}", &text[start..])
}

/// The last `max` bytes of a file (for the console log of a failed start).
pub fn file_tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        use std::io::Seek;
        let _ = file.seek(std::io::SeekFrom::Start(len - max));
    }
    let mut buf = Vec::new();
    let _ = file.read_to_end(&mut buf);
    tail(&buf)
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// `program` on `PATH`, plus the sbin directories root's PATH may lack.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The oldest runsc release (a date, `YYYYMMDD`) that runs coreutils'
/// `statx` calls; Debian 12's 20221219 does not, Debian 13's 20240729 does.
pub const FIRST_GOOD_RELEASE: u32 = 20240729;

/// The release date in a `runsc --version` line: `runsc version
/// release-20240729.0` or Debian's `runsc version 0.0~20221219.0`.
pub fn release_date(version: &str) -> Option<u32> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .find(|part| part.len() == 8)
        .and_then(|d| d.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_dates_are_read_from_both_version_styles() {
        assert_eq!(release_date("runsc version 0.0~20221219.0"), Some(20221219));
        assert_eq!(
            release_date("runsc version release-20240729.0"),
            Some(20240729)
        );
        assert_eq!(release_date("runsc version 0.0~20240729.0"), Some(20240729));
        assert_eq!(release_date("runsc (unknown version)"), None);
    }
}
