//! The jailed VMM's seccomp filter: an allowlist of the system calls the
//! *running* VMM makes, everything else kills the process.
//!
//! The filter goes on after set-up (every file, the KVM VM, its vCPUs and
//! devices exist — for a restore, the whole VM is rebuilt, every
//! `KVM_SET_*` made; credentials are dropped), so it only needs what the
//! threads started afterwards do: the vCPU loop (`KVM_RUN` and friends,
//! its kick signal), the control socket (bind, accept, framed reads and
//! writes with timeouts), the device event loop (`epoll_wait` on queue
//! ioeventfds and the vsock muxer's epoll set), the vsock muxer (connect
//! to `<uds>_<port>`, non-blocking reads and writes, `epoll_ctl`), the
//! copy-on-write disk (positional reads and writes, fsync, the map's create+rename), snapshots (the vCPU
//! and VM state `KVM_GET_*`s, the dirty log, the writer's files), thread
//! creation and the allocator. The list holds 64 calls; 46 of them were
//! seen under `strace -f` after the filter went on: a jailed VMM running a
//! tiny guest (port IO to the serial console, an i8042 reset, every
//! control request), jailed VMMs taking full and diff snapshots
//! (`node/tests/vmm_jail_snapshot.rs`, which also restores them jailed),
//! and this module's tests (the copy-on-write disk's reads, copy-up writes
//! and FLUSH; threads; a unix socket server and client). The rest are
//! equivalents a different libc may pick (`renameat2` for `rename`,
//! `unlinkat`, `readv`/`writev`, `clock_gettime` without the vDSO) or
//! paths no test reaches (`mremap`, `brk`, `restart_syscall`). (That
//! count was taken at 61 calls; the three epoll calls came with the
//! device event loop, which every jailed VMM runs from its first
//! instruction, so the jailed tests above fail without them.)
//!
//! Arguments are checked where it closes a door: `socket` only for
//! `AF_UNIX` (no network), `clone` only for threads (no new processes),
//! `prctl` only to name a thread, `ioctl` only `KVM_RUN`, `FIONBIO` and
//! the 15 `KVM_GET_*` a snapshot makes, by exact request number (no new
//! VM, vCPU or memory slot, no `KVM_SET_*`, no terminal ioctls).
//! `clone3` takes its flags in memory a filter cannot read, so a first
//! filter answers it `ENOSYS` (glibc then falls back to `clone`, whose
//! flags the allowlist checks); of two filters the kernel applies the
//! stricter action.

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
    // Snapshots (a control request, on the control thread): the directory
    // created (`create_dir_all`: mkdir), canonicalised (`realpath`:
    // readlink) and listed for a killed writer's leftovers (`read_dir`:
    // newfstatat, getdents64); the memory file sized (`set_len`:
    // ftruncate) and its length read (`metadata`: statx).
    libc::SYS_mkdir,
    libc::SYS_readlink,
    libc::SYS_newfstatat,
    libc::SYS_getdents64,
    libc::SYS_ftruncate,
    libc::SYS_statx,
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
    // The device event loop and the vsock muxer's epoll set (both epoll
    // descriptors are created before the filter).
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
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

/// `_IOC(dir, KVMIO, nr, size)`.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}
/// `_IO(KVMIO, nr)`.
const fn kvm_io(nr: u64) -> u64 {
    kvm_ioc(0, nr, 0)
}
/// `_IOW(KVMIO, nr, T)`.
const fn kvm_iow<T>(nr: u64) -> u64 {
    kvm_ioc(1, nr, std::mem::size_of::<T>())
}
/// `_IOR(KVMIO, nr, T)`.
const fn kvm_ior<T>(nr: u64) -> u64 {
    kvm_ioc(2, nr, std::mem::size_of::<T>())
}
/// `_IOWR(KVMIO, nr, T)`.
const fn kvm_iowr<T>(nr: u64) -> u64 {
    kvm_ioc(3, nr, std::mem::size_of::<T>())
}

use kvm_bindings as kb;

/// The ioctls of the running VMM. (Every other KVM ioctl — creating the
/// VM, its memory slots, vCPUs and devices, and every `KVM_SET_*` of a
/// restore — is made during set-up, before the filter.)
const KVM_RUN: u64 = kvm_io(0x80);
/// `KVM_GET_REGS`: the register dump of a KVM internal error, and part of
/// a vCPU's snapshot.
const KVM_GET_REGS: u64 = kvm_ior::<kb::kvm_regs>(0x81);
/// A vCPU saving its state for a snapshot (`persist::save_vcpu`).
const VCPU_STATE_GET: [u64; 10] = [
    kvm_ior::<kb::kvm_sregs>(0x83),       // KVM_GET_SREGS
    kvm_iowr::<kb::kvm_msrs>(0x88),       // KVM_GET_MSRS
    kvm_ior::<kb::kvm_lapic_state>(0x8e), // KVM_GET_LAPIC
    kvm_iowr::<kb::kvm_cpuid2>(0x91),     // KVM_GET_CPUID2
    kvm_ior::<kb::kvm_mp_state>(0x98),    // KVM_GET_MP_STATE
    kvm_ior::<kb::kvm_vcpu_events>(0x9f), // KVM_GET_VCPU_EVENTS
    kvm_ior::<kb::kvm_debugregs>(0xa1),   // KVM_GET_DEBUGREGS
    kvm_io(0xa3),                         // KVM_GET_TSC_KHZ
    kvm_ior::<kb::kvm_xsave>(0xa4),       // KVM_GET_XSAVE
    kvm_ior::<kb::kvm_xcrs>(0xa6),        // KVM_GET_XCRS
];
/// The VM's state for a snapshot (`persist::save_vm`).
const VM_STATE_GET: [u64; 3] = [
    kvm_iowr::<kb::kvm_irqchip>(0x62),   // KVM_GET_IRQCHIP
    kvm_ior::<kb::kvm_clock_data>(0x7c), // KVM_GET_CLOCK
    kvm_ior::<kb::kvm_pit_state2>(0x9f), // KVM_GET_PIT2
];
/// The pages the guest wrote since the last snapshot (a diff, and the
/// reset of tracking by a full one).
const KVM_GET_DIRTY_LOG: u64 = kvm_iow::<kb::kvm_dirty_log>(0x42);

/// Every ioctl request the filter lets through; `FIONBIO` is
/// `set_nonblocking` on sockets.
fn ioctls() -> Vec<u64> {
    let mut all = vec![KVM_RUN, KVM_GET_REGS, KVM_GET_DIRTY_LOG, libc::FIONBIO];
    all.extend(VCPU_STATE_GET);
    all.extend(VM_STATE_GET);
    all
}

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
        ioctls()
            .into_iter()
            .map(|req| cond(1, Dword, SeccompCmpOp::Eq, req))
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

    /// Fork; the child installs the filter (compiled here, before the fork)
    /// and runs `body`, whose return value is its exit code. Returns the
    /// child's wait status. (glibc's fork leaves malloc usable in the child
    /// of a multi-threaded process, so `body` may allocate.)
    fn in_filtered_child(body: impl FnOnce() -> i32) -> i32 {
        let programs = programs().expect("compile");
        // SAFETY: the child runs `body` and `_exit`s, never returning into
        // the test harness.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                for p in &programs {
                    if seccompiler::apply_filter_all_threads(p).is_err() {
                        // SAFETY: leaving the forked child.
                        unsafe { libc::_exit(100) };
                    }
                }
                let code = body();
                // SAFETY: as above.
                unsafe { libc::_exit(code) }
            }
            pid => {
                let mut status = 0;
                // SAFETY: our own child; a live local.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                status
            }
        }
    }

    fn exited_ok(status: i32) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
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
        assert!(exited_ok(status), "status {status:#x}");
    }

    /// The copy-on-write disk's whole life under the filter: reads, a
    /// partial-cluster write (copy-up), FLUSH (overlay sync, map written to
    /// a temporary file, synced, renamed, directory synced), and the
    /// temporary overlay's removal.
    #[test]
    fn cow_disk_io_passes_the_filter() {
        use crate::devices::virtio::block::{BlockBackend, CowDisk, CowPaths};
        let dir = std::env::temp_dir().join(format!("smjail-seccomp-cow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("base"), vec![7u8; 64 << 10]).unwrap();
        let paths = CowPaths::new(dir.join("base"), dir.join("overlay"));
        let mut disk = CowDisk::create(paths.clone()).unwrap();
        let status = in_filtered_child(move || {
            let mut buf = [0u8; 512];
            let mut steps = || -> std::io::Result<()> {
                disk.read_at(4096, &mut buf)?;
                disk.write_at(4096 + 512, &[1u8; 512])?;
                disk.read_at(4096, &mut buf)?;
                disk.flush()?;
                std::fs::remove_file(&paths.overlay)?;
                std::fs::remove_file(&paths.map)
            };
            if steps().is_err() || buf[0] != 7 {
                return 1;
            }
            0
        });
        assert!(exited_ok(status), "status {status:#x}");
        assert!(!dir.join("overlay").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Threads, a unix socket server with timeouts and a non-blocking
    /// client, as the control socket and the vsock muxer use them.
    #[test]
    fn threads_and_unix_sockets_pass_the_filter() {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        let dir = std::env::temp_dir().join(format!("smjail-seccomp-uds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let status = in_filtered_child(move || {
            let run = || -> std::io::Result<()> {
                let listener = UnixListener::bind(&path)?;
                listener.set_nonblocking(true)?;
                let client_path = path.clone();
                let client = std::thread::Builder::new().name("client".into()).spawn(
                    move || -> std::io::Result<()> {
                        let mut s = UnixStream::connect(&client_path)?;
                        s.write_all(b"ping")?;
                        s.shutdown(std::net::Shutdown::Write)?;
                        Ok(())
                    },
                )?;
                let mut stream = loop {
                    match listener.accept() {
                        Ok((s, _)) => break s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(std::time::Duration::from_millis(1))
                        }
                        Err(e) => return Err(e),
                    }
                };
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                let mut got = Vec::new();
                stream.read_to_end(&mut got)?;
                client
                    .join()
                    .map_err(|_| std::io::Error::other("client panicked"))??;
                std::fs::remove_file(&path)?;
                if got == b"ping" {
                    Ok(())
                } else {
                    Err(std::io::Error::other("wrong bytes"))
                }
            };
            match run() {
                Ok(()) => 0,
                Err(_) => 1,
            }
        });
        assert!(exited_ok(status), "status {status:#x}");
        let _ = std::fs::remove_dir_all(&dir);
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

    /// The request numbers, as `<linux/kvm.h>` gives them on x86-64.
    #[test]
    fn snapshot_ioctls_have_the_kernel_numbers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(
            VCPU_STATE_GET,
            [
                0x8138_ae83, // KVM_GET_SREGS
                0xc008_ae88, // KVM_GET_MSRS
                0x8400_ae8e, // KVM_GET_LAPIC
                0xc008_ae91, // KVM_GET_CPUID2
                0x8004_ae98, // KVM_GET_MP_STATE
                0x8040_ae9f, // KVM_GET_VCPU_EVENTS
                0x8080_aea1, // KVM_GET_DEBUGREGS
                0xaea3,      // KVM_GET_TSC_KHZ
                0x9000_aea4, // KVM_GET_XSAVE
                0x8188_aea6, // KVM_GET_XCRS
            ]
        );
        assert_eq!(VM_STATE_GET, [0xc208_ae62, 0x8030_ae7c, 0x8070_ae9f]);
    }

    /// The snapshot's `KVM_GET_*` pass (on a bad descriptor: EBADF, not
    /// SIGSYS); a `KVM_SET_*` of a restore kills — restores happen before
    /// the filter.
    #[test]
    fn snapshot_gets_pass_and_sets_kill() {
        let status = in_filtered_child(|| {
            for req in ioctls().into_iter().filter(|&r| r != KVM_RUN) {
                // SAFETY: an ioctl on a descriptor that is not open.
                let r = unsafe { libc::ioctl(-1, req as _, 0) };
                // SAFETY: reading errno.
                if r != -1 || unsafe { *libc::__errno_location() } != libc::EBADF {
                    return 1;
                }
            }
            0
        });
        assert!(exited_ok(status), "status {status:#x}");
        // KVM_SET_REGS: _IOW(KVMIO, 0x82, struct kvm_regs).
        let set_regs = kvm_iow::<kb::kvm_regs>(0x82);
        // SAFETY: as above.
        let status = in_filtered_child(|| unsafe {
            libc::ioctl(-1, set_regs as _, 0);
            0
        });
        assert!(killed_by_sigsys(status), "KVM_SET_REGS: status {status:#x}");
    }

    #[test]
    fn the_allowlist_is_small() {
        let n = allowlist_len();
        eprintln!("seccomp allowlist: {n} system calls");
        // 55 for the running VMM, + 6 file calls of the snapshot writer.
        assert_eq!(n, 64, "update the module docs with the new count");
        // KVM_RUN, FIONBIO, KVM_GET_REGS, 10 more vCPU state gets, 3 VM
        // state gets, the dirty log: nothing that creates or sets.
        let ioctls = ioctls();
        assert_eq!(ioctls.len(), 17);
        let set: std::collections::BTreeSet<u64> = ioctls.iter().copied().collect();
        assert_eq!(set.len(), ioctls.len(), "no duplicates");
    }
}
