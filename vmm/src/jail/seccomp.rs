//! The jailed VMM's seccomp filter: an allowlist of the system calls the
//! *running* VMM makes, everything else kills the process.
//!
//! The filter goes on after set-up (every file, the KVM VM, its vCPUs and
//! devices exist; credentials are dropped), so it only needs what the
//! threads started afterwards do: the vCPU loop (`KVM_RUN` and friends,
//! its kick signal), the control socket (bind, accept, framed reads and
//! writes with timeouts), the vsock muxer (connect to `<uds>_<port>`,
//! non-blocking reads and writes), the copy-on-write disk (positional
//! reads and writes, fsync, the map's create+rename), thread creation and
//! the allocator. 33 of the calls were seen under `strace -f` on a jailed
//! VMM running a tiny guest (port IO to the serial console, an i8042
//! reset, every control request; `node/tests/vmm_jail.rs` runs the same
//! under the filter); the others serve paths only a Linux guest drives
//! (virtio-blk reads, writes and FLUSH with the map's rename, vsock
//! connections), read off the code rather than measured.
//!
//! Arguments are checked where it closes a door: `socket` only for
//! `AF_UNIX` (no network), `clone` only for threads (no new processes),
//! `prctl` only to name a thread, `ioctl` only `KVM_RUN`, `KVM_GET_REGS`
//! and `FIONBIO` (no new VM, vCPU or memory slot, no terminal ioctls). `clone3` takes its flags in memory a
//! filter cannot read, so a first filter answers it `ENOSYS` (glibc then
//! falls back to `clone`, whose flags the allowlist checks); of two
//! filters the kernel applies the stricter action.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::JailError;

/// System calls allowed whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    // I/O on descriptors the VMM holds: console, disks, sockets, eventfds.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // The overlay map: a temporary file renamed over the map; sockets
    // removed at exit.
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // Unix sockets (`socket` itself is checked below).
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    // Memory.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    // Threads, time, signals (the vCPU kick), exit.
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_tgkill,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// `_IOR(type, nr, size)`.
const fn ior(ty: u64, nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
/// The ioctls of the running VMM: the vCPU loop, the register dump of a
/// KVM internal error, and `set_nonblocking` on sockets. (Every other KVM
/// ioctl is made during set-up, before the filter.)
const KVM_RUN: u64 = 0xAE80;
const KVM_GET_REGS: u64 = ior(0xAE, 0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
const IOCTLS: [u64; 3] = [KVM_RUN, KVM_GET_REGS, libc::FIONBIO];

/// A rule of one condition. Integer (`int`) arguments are compared on
/// their low 32 bits, as the kernel reads them.
fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompRule, JailError> {
    let c = SeccompCondition::new(arg, len, op, value)
        .map_err(|e| JailError::Seccomp(e.to_string()))?;
    SeccompRule::new(vec![c]).map_err(|e| JailError::Seccomp(e.to_string()))
}

/// The allowlist: system call → rules (an empty list allows any
/// arguments; otherwise one matching rule allows the call).
pub fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, JailError> {
    use SeccompCmpArgLen::{Dword, Qword};
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_socket,
        vec![cond(0, Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?],
    );
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![cond(0, Qword, SeccompCmpOp::MaskedEq(thread), thread)?],
    );
    rules.insert(
        libc::SYS_prctl,
        vec![cond(0, Dword, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?],
    );
    rules.insert(
        libc::SYS_ioctl,
        IOCTLS
            .iter()
            .map(|&req| cond(1, Dword, SeccompCmpOp::Eq, req))
            .collect::<Result<_, _>>()?,
    );
    Ok(rules)
}

/// How many system calls the allowlist names.
pub fn allowlist_len() -> usize {
    rules().map_or(0, |r| r.len())
}

fn compile(
    filter: Result<SeccompFilter, seccompiler::BackendError>,
) -> Result<BpfProgram, JailError> {
    filter
        .and_then(BpfProgram::try_from)
        .map_err(|e| JailError::Seccomp(e.to_string()))
}

/// The two programs, in install order: `clone3` → ENOSYS, then the
/// allowlist (anything else kills the process).
pub fn programs() -> Result<[BpfProgram; 2], JailError> {
    let arch = TargetArch::x86_64;
    let clone3 = compile(SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    ))?;
    let allow = compile(SeccompFilter::new(
        rules()?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    ))?;
    Ok([clone3, allow])
}

/// Install the filter on every thread of the process (TSYNC). Sets
/// `no_new_privs` (already set by [`super::creds`]).
pub fn install() -> Result<(), JailError> {
    for program in programs()? {
        seccompiler::apply_filter_all_threads(&program)
            .map_err(|e| JailError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fork; the child installs the filter (compiled here, before the fork:
    /// the test harness is multi-threaded, so the child must not allocate)
    /// and runs `body`, whose return value is its exit code. Returns the
    /// child's wait status.
    fn in_filtered_child(body: fn() -> i32) -> i32 {
        let programs = programs().expect("compile");
        // SAFETY: the child only makes raw system calls and `_exit`s.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                for p in &programs {
                    if seccompiler::apply_filter_all_threads(p).is_err() {
                        // SAFETY: leaving the forked child.
                        unsafe { libc::_exit(100) };
                    }
                }
                // SAFETY: as above.
                unsafe { libc::_exit(body()) }
            }
            pid => {
                let mut status = 0;
                // SAFETY: our own child; a live local.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                status
            }
        }
    }

    fn killed_by_sigsys(status: i32) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    #[test]
    fn allowed_calls_pass() {
        let status = in_filtered_child(|| {
            // SAFETY: raw system calls on the child's own descriptors.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    return 1;
                }
                let mut one: libc::c_int = 1;
                if libc::ioctl(fd, libc::FIONBIO, &mut one) != 0 {
                    return 2;
                }
                libc::close(fd);
                // clone3 is answered ENOSYS (glibc then uses clone).
                let r = libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0);
                if r != -1 || *libc::__errno_location() != libc::ENOSYS {
                    return 3;
                }
            }
            0
        });
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }

    #[test]
    fn network_sockets_kill_the_process() {
        // SAFETY: a raw system call.
        let status = in_filtered_child(|| unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            0
        });
        assert!(killed_by_sigsys(status), "status {status:#x}");
    }

    #[test]
    fn execve_and_fork_kill_the_process() {
        // SAFETY: raw system calls; the argument vectors are null-terminated.
        let status = in_filtered_child(|| unsafe {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            libc::execve(argv[0], argv.as_ptr(), std::ptr::null());
            0
        });
        assert!(killed_by_sigsys(status), "execve: status {status:#x}");
        // A clone without CLONE_THREAD is a new process.
        // SAFETY: as above; if the filter let it through, both sides exit.
        let status = in_filtered_child(|| unsafe {
            libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
            0
        });
        assert!(killed_by_sigsys(status), "fork: status {status:#x}");
        // An ioctl the running VMM never makes (a new VM).
        // SAFETY: as above.
        let status = in_filtered_child(|| unsafe {
            libc::ioctl(0, 0xAE01 as _, 0);
            0
        });
        assert!(
            killed_by_sigsys(status),
            "KVM_CREATE_VM: status {status:#x}"
        );
    }

    #[test]
    fn the_allowlist_is_small() {
        let n = allowlist_len();
        eprintln!("seccomp allowlist: {n} system calls");
        assert!((40..=80).contains(&n), "{n}");
    }
}
